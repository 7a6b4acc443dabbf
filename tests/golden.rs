//! Golden end-to-end case: `datasets/sample/logs` must produce `datasets/sample/expected`
//! exactly, with any number of workers, and the reference model must agree with the files.

mod common;

use std::path::Path;

use common::reference::{reference_outputs, RefConfig};
use common::{assert_same_outputs, read_outputs, run_outputs};

fn sample() -> (&'static Path, &'static Path) {
    (Path::new("datasets/sample/logs"), Path::new("datasets/sample/expected"))
}

#[test]
fn sample_logs_give_the_expected_files() {
    let (logs, expected_dir) = sample();
    let expected = read_outputs(expected_dir);
    for workers in [1, 2, 4] {
        let actual = run_outputs(logs, workers, &RefConfig::default(), &[256, 16]);
        assert_same_outputs(&expected, &actual, &format!("sample, {workers} workers"));
    }
}

#[test]
fn reference_model_agrees_with_the_expected_files() {
    let (logs, expected_dir) = sample();
    assert_same_outputs(&read_outputs(expected_dir), &reference_outputs(logs, &RefConfig::default()), "reference");
}

/// The README's walkthrough: a late click that makes an IP a bot retroactively, and a late click
/// that corrects the sliding top K.
fn walkthrough_config() -> RefConfig {
    RefConfig { top_k: 3, windows: vec![5], max_clicks_per_minute: Some(2), ..RefConfig::default() }
}

#[test]
fn walkthrough_gives_the_expected_files() {
    let logs = Path::new("datasets/walkthrough/logs");
    let expected = read_outputs(Path::new("datasets/walkthrough/expected"));
    assert_same_outputs(&expected, &reference_outputs(logs, &walkthrough_config()), "walkthrough, reference");
    for workers in [1, 2] {
        let actual = run_outputs(logs, workers, &walkthrough_config(), &[256, 16]);
        assert_same_outputs(&expected, &actual, &format!("walkthrough, {workers} workers"));
    }
    let changelog = &expected["changelog/updates.csv"];
    for line in [
        "1767225660000,ad_minute,29453760/7,2,-1",
        "1767225660000,fraud_minute,29453760/7,3,1",
        "1767225660000,top_window_5m,8,2,-1",
        "1767225660000,top_window_5m,8,3,1",
    ] {
        assert!(changelog.lines().any(|l| l == line), "the walkthrough's changelog lacks {line}");
    }
}

#[test]
fn sample_covers_the_hard_cases() {
    let (_, expected_dir) = sample();
    let dead = std::fs::read_to_string(expected_dir.join("dead_letter.csv")).unwrap();
    for reason in ["too_late", "bad_ts", "bad_ip", "bad_country", "unterminated_line", "invalid_utf8"] {
        assert!(dead.contains(&format!(",{reason},")), "the sample has no {reason} row");
    }
    let changelog = std::fs::read_to_string(expected_dir.join("changelog/updates.csv")).unwrap();
    assert!(changelog.lines().any(|l| l.ends_with(",-1")), "the sample has no correction");
}
