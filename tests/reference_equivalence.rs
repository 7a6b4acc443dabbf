//! The backbone: on seeded random logs, `clickagg run` writes exactly the reference model's
//! files (every answer, every dead letter, and the changelog at every time), byte for byte,
//! with 1, 2 and 3 workers.

mod common;

use common::reference::{reference_outputs, RefConfig};
use common::{assert_same_outputs, random_logs, run_outputs, write_logs};
use proptest::prelude::*;

fn check(seed: u64, max_events: u64, config: RefConfig, buckets: &[u32]) {
    let dir = tempfile::tempdir().unwrap();
    write_logs(dir.path(), &random_logs(seed, max_events));
    let expected = reference_outputs(dir.path(), &config);
    for workers in [1, 2, 3] {
        let actual = run_outputs(dir.path(), workers, &config, buckets);
        assert_same_outputs(&expected, &actual, &format!("seed {seed}, {workers} workers"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn run_equals_reference(
        seed in any::<u64>(),
        delay_s in prop::sample::select(vec![0u64, 5, 30]),
        lateness_m in prop::sample::select(vec![0u64, 2, 5]),
        tick_ms in prop::sample::select(vec![1_000u64, 10_000, 60_000]),
        top_k in prop::sample::select(vec![1usize, 3, 100]),
        buckets in prop::sample::select(vec![vec![], vec![4], vec![8, 2], vec![256, 16]]),
        windows in prop::sample::select(vec![vec![], vec![1], vec![2, 3], vec![1, 5, 60]]),
        max_clicks_per_minute in prop::sample::select(vec![None, None, Some(1u64), Some(3)]),
        blocklist in prop::sample::select(vec![vec![], vec![], vec!["10.0.0.0/31"], vec!["2001:db8::/32", "192.168.1.1"]]),
    ) {
        let config = RefConfig {
            watermark_delay_ms: delay_s * 1_000,
            allowed_lateness_ms: Some(lateness_m * 60_000),
            tick_ms,
            top_k,
            windows,
            max_clicks_per_minute,
            blocklist: blocklist.into_iter().map(String::from).collect(),
        };
        check(seed, 300, config, &buckets);
    }
}

#[test]
fn empty_and_header_only_logs() {
    let dir = tempfile::tempdir().unwrap();
    write_logs(
        dir.path(),
        &[
            ("part-0.csv".into(), Vec::new()),
            ("part-1.csv".into(), b"event_id,ts,ad_id,campaign_id,user_id,ip,country\n".to_vec()),
            ("part-2.csv".into(), b"event_id,ts,ad_id\ne1,5,1\n".to_vec()),
            ("part-3.csv".into(), b"event_id,ts,ad_id,campaign_id,user_id,ip,country".to_vec()),
        ],
    );
    let config = RefConfig::default();
    let expected = reference_outputs(dir.path(), &config);
    assert_eq!(expected["dead_letter.csv"].lines().count(), 4, "bad header, its line, unterminated header");
    assert_same_outputs(&expected, &run_outputs(dir.path(), 2, &config, &[256, 16]), "edge files");
}

#[test]
fn larger_random_logs_with_default_settings() {
    for seed in 0..4 {
        check(seed, 3_000, RefConfig::default(), &[256, 16]);
    }
}

/// A case the property test found: with three workers, the last changelog line (a fraud
/// count) was missing now and then. Worker 0 finished its sink once a probe placed before the
/// exchange to the sink said the answers were complete, while another worker's last records were
/// still on their way to it. The loss depends on timing, so the case runs many times.
#[test]
fn the_sink_waits_for_every_workers_last_records() {
    for _ in 0..120 {
        let config = RefConfig {
            watermark_delay_ms: 5_000,
            allowed_lateness_ms: Some(0),
            tick_ms: 10_000,
            top_k: 3,
            windows: vec![2, 3],
            max_clicks_per_minute: Some(1),
            blocklist: vec!["2001:db8::/32".into(), "192.168.1.1".into()],
        };
        check(13869075569033756180, 300, config, &[4]);
    }
}
