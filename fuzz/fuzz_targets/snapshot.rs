//! Fuzz target `snapshot`: see `ferry_fuzz::snapshot` (fuzz/src/snapshot.rs) for the input format and
//! what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::snapshot::run(data);
});
