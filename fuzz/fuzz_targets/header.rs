#![no_main]
// See clickagg::fuzzing::header for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| clickagg::fuzzing::header(data));
