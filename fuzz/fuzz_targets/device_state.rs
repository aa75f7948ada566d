//! Fuzz target `device_state`: see `ferry_fuzz::device` (fuzz/src/device.rs) for the input format and
//! what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ferry_fuzz::device::run(data);
});
