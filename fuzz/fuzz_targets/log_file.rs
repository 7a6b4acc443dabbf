#![no_main]
// See clickagg::fuzzing::log_file for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| clickagg::fuzzing::log_file(data));
