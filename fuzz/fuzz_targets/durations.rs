#![no_main]
// See clickagg::fuzzing::durations for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| clickagg::fuzzing::durations(data));
