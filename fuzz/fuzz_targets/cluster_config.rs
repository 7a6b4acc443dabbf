#![no_main]
// See clickagg::fuzzing::cluster_config for what this target checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| clickagg::fuzzing::cluster_config(data));
