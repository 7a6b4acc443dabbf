//! Serving for months (SPEC §6): what the server holds is bounded by the retention, never by the
//! log's length, and minutes long past the retention still answer what the reference model
//! computes (they are read from the store).

mod common;

use std::path::Path;

use clickagg::generate::{generate, GenConfig};
use common::server::{ads_of, get_json, rank, serve_replay, serve_replay_env};

/// Clicks per minute of event time: both lengths run at the same rate.
const CLICKS_PER_MINUTE: u64 = 400;

/// Generated logs spanning `minutes` minutes of event time at [`CLICKS_PER_MINUTE`].
fn logs_of(dir: &Path, minutes: u64, seed: u64) -> std::path::PathBuf {
    let logs = dir.join("logs");
    let config = GenConfig { events: CLICKS_PER_MINUTE * minutes, partitions: 4, minutes, ads: 300, seed, ..GenConfig::default() };
    generate(&config, &logs).unwrap();
    logs
}

/// The server's own figure of what it holds in memory, after a served replay of `minutes`;
/// with `keep_final_minutes`, the server keeps every minute in memory (fault injection: as it
/// did before it read final minutes from the store).
fn served_entries_after(minutes: u64, keep_final_minutes: bool) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs_of(dir.path(), minutes, 7);
    let fault = if keep_final_minutes { "1" } else { "" };
    let served = serve_replay_env(
        &logs,
        &dir.path().join("out"),
        &["-w", "1", "--windows", "1m,5m"],
        &[("CLICKAGG_FAULT_KEEP_FINAL_MINUTES", fault)],
    );
    let status = get_json(&served.address, "/v1/status");
    let entries = status["served_entries"].as_u64().expect("/v1/status has served_entries");
    let metrics = common::server::get(&served.address, "/metrics", &[]).1;
    assert!(metrics.contains(&format!("clickagg_served_entries {entries}")), "{metrics}");
    entries
}

#[test]
fn served_state_does_not_grow_with_the_logs_length() {
    let short = served_entries_after(30, false);
    let long = served_entries_after(120, false);
    assert!(short > 1_000, "the short replay holds something to compare: {short}");
    // Four times the log at the same rate: the entries held stay within a quarter of each other
    // (the minutes still open and the windows hold about the same either way).
    assert!(
        long * 4 <= short * 5,
        "served state grows with the log's length: {short} entries after 30 minutes, {long} after 120"
    );
    // The figure sees growth where there is some: a server that keeps every minute fails the
    // bound above.
    let (short, long) = (served_entries_after(30, true), served_entries_after(120, true));
    assert!(long * 4 > short * 5 * 2, "keeping every minute: {short} entries after 30 minutes, {long} after 120");
}

/// Rows of a CSV file, header dropped, fields split.
fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines().skip(1).map(|l| l.split(',').map(str::to_string).collect()).collect()
}

fn number(field: &str) -> u64 {
    field.parse().unwrap()
}

/// A replay over 125 minutes with the default 5 minutes of allowed lateness: its first minutes
/// are long final and read from the store, its last ones from memory, and every answer about
/// either (counts, ranges across both, top K, by country, by campaign, history) is the
/// reference model's.
#[test]
fn minutes_long_past_retention_answer_what_the_reference_model_computes() {
    use std::collections::{BTreeMap, HashMap};
    let dir = tempfile::tempdir().unwrap();
    let logs = logs_of(dir.path(), 125, 3);
    let config = common::reference::RefConfig { windows: vec![1, 5], ..Default::default() };
    let (files, clicks) = common::reference::reference_run(&logs, &config);
    let served = serve_replay(&logs, &dir.path().join("out"), &["-w", "2", "--windows", "1m,5m"]);
    let a = served.address.as_str();
    let ad: HashMap<(u64, u64), u64> =
        rows(&files["ad_minute.csv"]).iter().map(|r| ((number(&r[0]), number(&r[1])), number(&r[2]))).collect();
    let campaign: HashMap<(u64, u64), u64> =
        rows(&files["campaign_minute.csv"]).iter().map(|r| ((number(&r[0]), number(&r[1])), number(&r[2]))).collect();
    let country: BTreeMap<(u64, String, u64), u64> =
        rows(&files["country_minute.csv"]).iter().map(|r| ((number(&r[0]), r[1].clone(), number(&r[2])), number(&r[3]))).collect();
    let first = ad.keys().map(|k| k.0).min().unwrap();
    let boundary = ad.keys().map(|k| k.0).max().unwrap() + 1;

    let status = get_json(a, "/v1/status");
    assert_eq!(status["as_of_minute"].as_u64(), Some(boundary));
    let memory_from = status["memory_from_minute"].as_u64().unwrap();
    assert!(memory_from >= boundary - 10, "minutes before {memory_from} are read from the store, up to {boundary}");
    let minutes_with_clicks = ad.keys().map(|k| k.0).collect::<std::collections::BTreeSet<_>>().len() as u64;
    assert_eq!(status["minutes"].as_u64(), Some(minutes_with_clicks));
    let old = |m: u64| m < first + 10;

    // Every count of the first ten minutes, by ad and by campaign.
    for (&(minute, id), &clicks) in ad.iter().filter(|((m, _), _)| old(*m)) {
        let got = get_json(a, &format!("/v1/ads/{id}/aggregated_count?from={minute}&to={}", minute + 1));
        assert_eq!(got["clicks"].as_u64(), Some(clicks), "ad {id} minute {minute}");
    }
    for (&(minute, id), &clicks) in campaign.iter().filter(|((m, _), _)| old(*m)) {
        let got = get_json(a, &format!("/v1/campaigns/{id}/aggregated_count?from={minute}&to={}", minute + 1));
        assert_eq!(got["clicks"].as_u64(), Some(clicks), "campaign {id} minute {minute}");
    }
    // By country, and over ranges across both tiers.
    for ((minute, code, id), clicks) in country.iter().filter(|((m, _, _), _)| old(*m)).step_by(5) {
        let got = get_json(a, &format!("/v1/ads/{id}/aggregated_count?from={minute}&to={}&country={code}", minute + 1));
        assert_eq!(got["clicks"].as_u64(), Some(*clicks), "ad {id} minute {minute} in {code}");
    }
    for id in [1u64, 2, 3, 7, 50] {
        for (from, to) in [(first, boundary), (first + 2, memory_from + 2), (memory_from - 1, boundary)] {
            let sum: u64 = (from..to).map(|m| ad.get(&(m, id)).copied().unwrap_or(0)).sum();
            let got = get_json(a, &format!("/v1/ads/{id}/aggregated_count?from={from}&to={to}"));
            assert_eq!(got["clicks"].as_u64(), Some(sum), "ad {id} [{from},{to})");
            let code = "US";
            let sum: u64 = (from..to).map(|m| country.get(&(m, code.to_string(), id)).copied().unwrap_or(0)).sum();
            let got = get_json(a, &format!("/v1/ads/{id}/aggregated_count?from={from}&to={to}&country={code}"));
            assert_eq!(got["clicks"].as_u64(), Some(sum), "ad {id} [{from},{to}) in {code}");
        }
    }

    // A campaign's clicks by country, which only the serving tables hold.
    let mut per_campaign_country: HashMap<(u64, String), Vec<u64>> = HashMap::new();
    for c in &clicks {
        per_campaign_country.entry((c.2, c.5.clone())).or_default().push(c.0);
    }
    let mut keys: Vec<&(u64, String)> = per_campaign_country.keys().collect();
    keys.sort();
    for (id, code) in keys.into_iter().step_by(5).take(30) {
        let minutes = &per_campaign_country[&(*id, code.clone())];
        for (from, to) in [(first, first + 1), (first + 1, first + 4), (first, boundary)] {
            let want = minutes.iter().filter(|&&m| m >= from && m < to).count() as u64;
            let got = get_json(a, &format!("/v1/campaigns/{id}/aggregated_count?from={from}&to={to}&country={code}"));
            assert_eq!(got["clicks"].as_u64(), Some(want), "campaign {id} in {code} [{from},{to})");
        }
    }

    // The maintained top K of each old minute, globally and in each country.
    let mut top_minute: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for r in rows(&files["top_minute.csv"]) {
        top_minute.entry(number(&r[0])).or_default().push((number(&r[2]), number(&r[3])));
    }
    for (minute, top) in top_minute.iter().filter(|(m, _)| old(**m)) {
        let got = get_json(a, &format!("/v1/ads/popular_ads?minute={minute}&count=100"));
        assert_eq!(&ads_of(&got), top, "top of minute {minute}");
        assert_eq!(got["source"], "maintained");
    }
    let mut per_minute_country: BTreeMap<(u64, String), Vec<(u64, u64)>> = BTreeMap::new();
    for ((minute, code, id), clicks) in country.iter().filter(|((m, _, _), _)| old(*m)) {
        per_minute_country.entry((*minute, code.clone())).or_default().push((*id, *clicks));
    }
    assert!(per_minute_country.len() > 20);
    for ((minute, code), ads) in per_minute_country.into_iter().step_by(3) {
        let got = get_json(a, &format!("/v1/ads/popular_ads?minute={minute}&country={code}&count=100"));
        assert_eq!(ads_of(&got), rank(ads, 100), "top of minute {minute} in {code}");
        assert_eq!(got["source"], "maintained");
    }
    // Computed tops over windows that reach into the store.
    for (window, code) in [(120u64, None), (30, Some("US")), (200, Some("DE"))] {
        let from = boundary.saturating_sub(window);
        let mut sums: HashMap<u64, u64> = HashMap::new();
        for ((m, c, id), n) in &country {
            if *m >= from && code.is_none_or(|code| c == code) {
                *sums.entry(*id).or_default() += n;
            }
        }
        let filter = code.map_or(String::new(), |c| format!("&country={c}"));
        let got = get_json(a, &format!("/v1/ads/popular_ads?window={window}m&count=50{filter}"));
        assert_eq!(ads_of(&got), rank(sums.into_iter().collect(), 50), "top of {window}m {filter}");
    }

    // History of old minutes' corrected counts, from the changelog.
    let changelog = rows(&files["changelog/updates.csv"]);
    let mut corrected: Vec<&String> =
        changelog.iter().filter(|r| r[1] == "ad_minute" && r[4] == "-1").map(|r| &r[2]).filter(|k| old(number(k.split_once('/').unwrap().0))).collect();
    corrected.sort();
    corrected.dedup();
    assert!(corrected.len() >= 5, "the data set should have corrected counts in its first minutes");
    for key in corrected.iter().take(20) {
        let (minute, id) = key.split_once('/').unwrap();
        let want: Vec<(u64, u64, i64)> =
            changelog.iter().filter(|r| r[1] == "ad_minute" && &r[2] == *key).map(|r| (number(&r[0]), number(&r[3]), r[4].parse().unwrap())).collect();
        let got = get_json(a, &format!("/v1/ads/{id}/history?minute={minute}"));
        let got_updates: Vec<(u64, u64, i64)> = got["updates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| (u["time"].as_u64().unwrap(), u["clicks"].as_u64().unwrap(), u["diff"].as_i64().unwrap()))
            .collect();
        assert_eq!(got_updates, want, "history of {key}");
        assert_eq!(got["clicks"].as_u64(), ad.get(&(number(minute), number(id))).copied(), "clicks of {key}");
    }
}

/// A server without `--store` keeps its segment store in `.clickagg-serve-PID/` beside the
/// output directory, writes the final minutes there, and removes it on SIGTERM; a directory
/// left by a process that is gone is removed by the next server started beside it.
#[test]
fn the_embedded_store_lives_beside_the_output_and_goes_with_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs_of(dir.path(), 30, 5);
    // Above any Linux pid_max: no process has it.
    let abandoned = dir.path().join(".clickagg-serve-999999999");
    std::fs::create_dir(&abandoned).unwrap();
    std::fs::write(abandoned.join("segment-000000"), b"left behind").unwrap();
    let served = serve_replay(&logs, &dir.path().join("out"), &["-w", "1"]);
    let store = dir.path().join(format!(".clickagg-serve-{}", served.pid()));
    let files: Vec<String> = std::fs::read_dir(&store).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(files, vec!["segment-000000".to_string()], "the final minutes are in {}", store.display());
    assert!(!abandoned.exists(), "the abandoned store {} was removed", abandoned.display());
    let status = std::process::Command::new("kill").args(["-TERM", &served.pid().to_string()]).status().unwrap();
    assert!(status.success());
    let started = std::time::Instant::now();
    while store.exists() && started.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!store.exists(), "{} was removed on SIGTERM", store.display());
}
