//! The core issue's acceptance check: on a generated 1M-event set with the default traits,
//! `run` writes byte-identical files with 1, 2 and 4 workers, equal to the reference model's:
//! every answer, sliding windows and fraud rules included (the generator's bots trip the limit).

mod common;

use clickagg::generate::{generate, GenConfig};
use common::reference::{reference_outputs, RefConfig};
use common::{assert_same_outputs, run_outputs};

#[test]
fn one_million_events_same_bytes_for_1_2_4_workers_and_reference() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&GenConfig { events: 1_000_000, ..GenConfig::default() }, &logs).unwrap();
    let config = RefConfig {
        max_clicks_per_minute: Some(10),
        blocklist: vec!["203.0.113.1".into(), "2001:db8:ff00::/40".into()],
        ..RefConfig::default()
    };
    let expected = reference_outputs(&logs, &config);
    assert!(expected["fraud_minute.csv"].lines().count() > 100, "the bots are excluded");
    assert!(expected["top_window_60m.csv"].lines().count() > 1_000);
    assert!(expected["dead_letter.csv"].contains(",too_late,"));
    assert!(expected["changelog/updates.csv"].lines().filter(|l| l.ends_with(",-1")).count() > 1_000);
    for workers in [1, 2, 4] {
        let actual = run_outputs(&logs, workers, &config, &[256, 16]);
        assert_same_outputs(&expected, &actual, &format!("1M events, {workers} workers"));
    }
}
