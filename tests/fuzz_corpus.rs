//! Every file of every fuzz target's corpus (`fuzz/corpus/<target>/`), replayed through the same
//! entry point the fuzzer calls: a crash the fuzzer once found, once its input is added to the
//! corpus, fails the normal test suite if it comes back.

use std::path::Path;

fn replay(target: &str, entry: fn(&[u8])) {
    let dir = Path::new("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{target}: the seed corpus is missing");
    for file in files {
        let data = std::fs::read(&file).unwrap();
        let outcome = std::panic::catch_unwind(|| entry(&data));
        assert!(outcome.is_ok(), "{target}: {} crashes the parser", file.display());
    }
}

#[test]
fn log_file_corpus() {
    replay("log_file", clickagg::fuzzing::log_file);
}

#[test]
fn header_corpus() {
    replay("header", clickagg::fuzzing::header);
}

#[test]
fn durations_corpus() {
    replay("durations", clickagg::fuzzing::durations);
}

#[test]
fn query_corpus() {
    replay("query", clickagg::fuzzing::query);
}

#[test]
fn cluster_config_corpus() {
    replay("cluster_config", clickagg::fuzzing::cluster_config);
}
