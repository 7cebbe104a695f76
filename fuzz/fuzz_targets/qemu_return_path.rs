//! `pagecast_fuzz_entries::qemu_return_path` under libFuzzer (its doc says
//! what it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pagecast_fuzz_entries::qemu_return_path(data));
