//! Fuzz target `wire_frame`: see `ferry_fuzz::wire` (fuzz/src/wire.rs) for the input format and
//! what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::wire::run(data);
});
