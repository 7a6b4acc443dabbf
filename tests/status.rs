//! `/v1/status`, `/metrics` and the series endpoint as an operator reads them: duplicates counted
//! where de-duplication finds them (compared with the reference model, for 1 and 2 workers),
//! what waits behind the watermark, lag after a finished replay, and a follower fed by a writer
//! that sends no duplicates reporting none.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use clickagg::generate::{generate, GenConfig};
use common::follow::{clickagg, s, sigterm};
use common::reference::{reference_duplicates, reference_outputs, RefConfig};
use common::server::{get, get_json, serve_replay, serving_address, start_feed};
use serde_json::Value;

fn logs(dir: &Path) -> std::path::PathBuf {
    let logs = dir.join("logs");
    let config = GenConfig { events: 40_000, partitions: 4, minutes: 20, ads: 300, seed: 11, ..GenConfig::default() };
    generate(&config, &logs).unwrap();
    logs
}

/// Rows of a CSV file, header dropped, fields split.
fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines().skip(1).map(|l| l.split(',').map(str::to_string).collect()).collect()
}

#[test]
fn a_finished_replay_reports_the_reference_duplicates_and_no_lag() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path());
    let config = RefConfig::default();
    let want = reference_duplicates(&logs, &config);
    assert!(want > 100, "the generator should write duplicates: {want}");
    let files = reference_outputs(&logs, &config);
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    for row in rows(&files["dead_letter.csv"]) {
        *reasons.entry(row[2].clone()).or_default() += 1;
    }
    for workers in ["1", "2"] {
        let served = serve_replay(&logs, &dir.path().join(format!("out-{workers}")), &["-w", workers]);
        let status = get_json(&served.address, "/v1/status");
        assert_eq!(status["duplicates"].as_u64(), Some(want), "{workers} workers: {status}");
        assert_eq!(status["pending_behind_watermark"].as_u64(), Some(0), "{workers} workers: {status}");
        let accepted = status["accepted"].as_u64().unwrap();
        assert_eq!(accepted, want + status["clicks"].as_u64().unwrap() + status["fraud_excluded"].as_u64().unwrap());
        assert_eq!(status["finished"], Value::Bool(true));
        assert_eq!(status["lag_seconds"], Value::Null, "a finished replay has no lag");
        for partition in status["partitions"].as_array().unwrap() {
            assert_eq!(partition["finished"], Value::Bool(true));
            assert_eq!(partition["lag_seconds"], Value::Null, "{partition}");
        }
        let by_reason: BTreeMap<String, u64> =
            status["dead_letters"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap())).collect();
        assert_eq!(by_reason, reasons, "dead letters by reason");
        let (code, metrics) = get(&served.address, "/metrics", &[]);
        assert_eq!(code, 200);
        assert!(metrics.contains(&format!("clickagg_duplicates_total {want}\n")), "{metrics}");
        assert!(metrics.contains("clickagg_pending_behind_watermark 0\n"), "{metrics}");
        assert!(metrics.contains("clickagg_dead_letters_total{reason=\"too_late\"}"), "{metrics}");
    }
}

#[test]
fn a_series_is_one_request_with_every_minute_of_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path());
    let files = reference_outputs(&logs, &RefConfig::default());
    let number = |f: &str| f.parse::<u64>().unwrap();
    let ad: HashMap<(u64, u64), u64> = rows(&files["ad_minute.csv"]).iter().map(|r| ((number(&r[0]), number(&r[1])), number(&r[2]))).collect();
    let campaign: HashMap<(u64, u64), u64> =
        rows(&files["campaign_minute.csv"]).iter().map(|r| ((number(&r[0]), number(&r[1])), number(&r[2]))).collect();
    let country: HashMap<(u64, String, u64), u64> =
        rows(&files["country_minute.csv"]).iter().map(|r| ((number(&r[0]), r[1].clone(), number(&r[2])), number(&r[3]))).collect();
    let first = ad.keys().map(|k| k.0).min().unwrap();
    let boundary = ad.keys().map(|k| k.0).max().unwrap() + 1;
    let served = serve_replay(&logs, &dir.path().join("out"), &[]);
    let a = served.address.as_str();
    let points = |body: &Value| -> Vec<(u64, Option<u64>, String)> {
        body["minutes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["minute"].as_u64().unwrap(), m["clicks"].as_u64(), m["state"].as_str().unwrap().to_string()))
            .collect()
    };
    // Past the boundary, minutes are open: no click of them is visible.
    let (from, to) = (first.saturating_sub(2), boundary + 2);
    for id in [1u64, 2, 7, 40] {
        let got = get_json(a, &format!("/v1/ads/{id}/series?from={from}&to={to}"));
        let want: Vec<(u64, Option<u64>, String)> = (from..to)
            .map(|m| match m < boundary {
                true => (m, Some(ad.get(&(m, id)).copied().unwrap_or(0)), "final".to_string()),
                false => (m, None, "open".to_string()),
            })
            .collect();
        assert_eq!(points(&got), want, "ad {id}");
        assert_eq!(got["watermark"].as_u64(), Some(boundary * 60_000));
    }
    let (&(_, some_campaign), _) = campaign.iter().next().unwrap();
    let got = get_json(a, &format!("/v1/campaigns/{some_campaign}/series?from={first}&to={boundary}"));
    let want: Vec<Option<u64>> = (first..boundary).map(|m| Some(campaign.get(&(m, some_campaign)).copied().unwrap_or(0))).collect();
    assert_eq!(points(&got).into_iter().map(|p| p.1).collect::<Vec<_>>(), want);
    let (_, code, ad_id) = country.keys().next().unwrap().clone();
    let got = get_json(a, &format!("/v1/ads/{ad_id}/series?from={first}&to={boundary}&country={}", code.to_lowercase()));
    let want: Vec<Option<u64>> = (first..boundary).map(|m| Some(country.get(&(m, code.clone(), ad_id)).copied().unwrap_or(0))).collect();
    assert_eq!(points(&got).into_iter().map(|p| p.1).collect::<Vec<_>>(), want);
    // The default: the hour before the boundary.
    let got = get_json(a, "/v1/ads/1/series");
    assert_eq!((got["from_minute"].as_u64(), got["to_minute"].as_u64()), (Some(boundary - 60), Some(boundary)));
    // Bad ranges are clear 400s.
    for (target, says) in [
        (format!("/v1/ads/1/series?from={boundary}&to={boundary}"), "must be after"),
        (format!("/v1/ads/1/series?from={}&to={boundary}", boundary - 2000), "at most 1440"),
        ("/v1/ads/1/series?from=yesterday".to_string(), "from:"),
        ("/v1/ads/1/series?window=5m".to_string(), "window"),
        ("/v1/ads/x/series".to_string(), "ad_id"),
    ] {
        let (code, body) = get(a, &target, &[]);
        assert!(code == 400 && body.contains(says), "{target}: {code} {body}");
    }
}

/// `clickagg feed` writes no duplicates: a follower of what it writes must report none, while
/// clicks wait behind the watermark (which the old figure, accepted less counted, called
/// duplicates).
#[test]
fn a_follower_fed_without_duplicates_reports_none() {
    let dir = tempfile::tempdir().unwrap();
    let (logs, store) = (dir.path().join("logs"), dir.path().join("store.sqlite"));
    // The feed creates the partitions at once; the follower lists them when it starts.
    let mut feed = start_feed(&logs, 2, &["--rate", "3000", "--duration", "14s", "--ads", "500"]);
    let mut follower = clickagg()
        .args(["run", "--logs", s(&logs), "--store", s(&store), "--follow", "-w", "2", "--serve", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let address = serving_address(&mut follower);
    let mut most_pending = 0;
    while feed.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(300));
        let (code, body) = get(&address, "/v1/status", &[]);
        if code == 503 {
            continue;
        }
        let status: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status["duplicates"].as_u64(), Some(0), "{status}");
        assert_eq!(status["finished"], Value::Bool(false));
        assert!(status["lag_seconds"].as_f64().is_some_and(|lag| lag < 60.0), "{status}");
        most_pending = most_pending.max(status["pending_behind_watermark"].as_u64().unwrap());
    }
    assert!(feed.wait().unwrap().success());
    sigterm(&follower);
    let _ = follower.wait();
    assert!(most_pending > 0, "clicks should have waited behind the watermark");
}
