//! `pagecast_fuzz_entries::cert_subject` under libFuzzer (its doc says what it
//! checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pagecast_fuzz_entries::cert_subject(data));
