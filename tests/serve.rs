//! The HTTP API as a dashboard or billing job uses it: `clickagg run --serve` over generated
//! logs, every answer compared with the reference model's files, and every bad request a clear
//! 4xx that leaves the server answering.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;

use clickagg::generate::{generate, GenConfig};
use common::reference::{reference_outputs, RefConfig};
use common::server::{ads_of, get, get_json, rank, serve_replay};
use serde_json::Value;

/// Rows of a CSV file, header dropped, fields split.
fn rows(text: &str) -> Vec<Vec<String>> {
    text.lines().skip(1).map(|l| l.split(',').map(str::to_string).collect()).collect()
}

fn number(field: &str) -> u64 {
    field.parse().unwrap()
}

/// The reference's answers in the shapes the API serves.
struct Expected {
    ad: HashMap<(u64, u64), u64>,
    campaign: HashMap<(u64, u64), u64>,
    country: HashMap<(u64, String, u64), u64>,
    top_minute: BTreeMap<u64, Vec<(u64, u64)>>,
    window_5m_last: (u64, Vec<(u64, u64)>),
    last_minute: u64,
    changelog: Vec<Vec<String>>,
}

fn expected(files: &BTreeMap<String, String>) -> Expected {
    let ad: HashMap<_, _> = rows(&files["ad_minute.csv"]).iter().map(|r| ((number(&r[0]), number(&r[1])), number(&r[2]))).collect();
    let campaign = rows(&files["campaign_minute.csv"]).iter().map(|r| ((number(&r[0]), number(&r[1])), number(&r[2]))).collect();
    let country =
        rows(&files["country_minute.csv"]).iter().map(|r| ((number(&r[0]), r[1].clone(), number(&r[2])), number(&r[3]))).collect();
    let mut top_minute: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for r in rows(&files["top_minute.csv"]) {
        top_minute.entry(number(&r[0])).or_default().push((number(&r[2]), number(&r[3])));
    }
    let mut windows: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
    for r in rows(&files["top_window_5m.csv"]) {
        windows.entry(number(&r[0])).or_default().push((number(&r[2]), number(&r[3])));
    }
    let window_5m_last = windows.into_iter().next_back().unwrap();
    let last_minute = ad.keys().map(|k| k.0).max().unwrap();
    Expected { ad, campaign, country, top_minute, window_5m_last, last_minute, changelog: rows(&files["changelog/updates.csv"]) }
}

fn logs(dir: &Path) -> std::path::PathBuf {
    let logs = dir.join("logs");
    let config = GenConfig { events: 40_000, partitions: 4, minutes: 20, ads: 300, seed: 11, ..GenConfig::default() };
    generate(&config, &logs).unwrap();
    logs
}

#[test]
fn every_endpoint_answers_what_the_reference_model_computes() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path());
    let files = reference_outputs(&logs, &RefConfig::default());
    let want = expected(&files);
    let served = serve_replay(&logs, &dir.path().join("out"), &["-w", "2"]);
    let a = served.address.as_str();
    let boundary = want.last_minute + 1;

    // The watermark after a replay: the end of the last minute read.
    let status = get_json(a, "/v1/status");
    assert_eq!(status["as_of_minute"].as_u64(), Some(boundary));
    assert_eq!(status["watermark"].as_u64(), Some(boundary * 60_000));
    assert_eq!(status["complete"], Value::Bool(true));
    let dead = rows(&files["dead_letter.csv"]);
    let too_late = dead.iter().filter(|r| r[2] == "too_late").count() as u64;
    assert_eq!(status["too_late"].as_u64(), Some(too_late));
    assert_eq!(status["malformed"].as_u64(), Some(dead.len() as u64 - too_late));
    assert_eq!(status["clicks"].as_u64(), Some(want.ad.values().sum::<u64>()));
    assert_eq!(status["partitions"].as_array().unwrap().len(), 4);

    // Counts: single minutes, ranges, the default (the last minute), by campaign, by country.
    let mut checked = 0;
    for (&(minute, ad), &clicks) in want.ad.iter().filter(|((m, ad), _)| (m + ad) % 37 == 0) {
        let got = get_json(a, &format!("/v1/ads/{ad}/aggregated_count?from={minute}&to={}", minute + 1));
        assert_eq!(got["clicks"].as_u64(), Some(clicks), "ad {ad} minute {minute}");
        checked += 1;
    }
    assert!(checked > 20, "too few counts checked: {checked}");
    let first = *want.ad.keys().map(|(m, _)| m).min().unwrap();
    for ad in [1u64, 2, 3, 5, 8, 13, 21, 34] {
        for (from, to) in [(first, boundary), (first + 3, first + 9), (boundary - 1, boundary)] {
            let sum: u64 = (from..to).map(|m| want.ad.get(&(m, ad)).copied().unwrap_or(0)).sum();
            let got = get_json(a, &format!("/v1/ads/{ad}/aggregated_count?from={from}&to={to}"));
            assert_eq!(got["clicks"].as_u64(), Some(sum), "ad {ad} [{from},{to})");
        }
        let last = get_json(a, &format!("/v1/ads/{ad}/aggregated_count"));
        assert_eq!(last["clicks"].as_u64(), Some(want.ad.get(&(boundary - 1, ad)).copied().unwrap_or(0)));
        assert_eq!((last["from_minute"].as_u64(), last["to_minute"].as_u64()), (Some(boundary - 1), Some(boundary)));
    }
    for (&(minute, campaign), &clicks) in want.campaign.iter().take(40) {
        let got = get_json(a, &format!("/v1/campaigns/{campaign}/aggregated_count?from={minute}&to={}", minute + 1));
        assert_eq!(got["clicks"].as_u64(), Some(clicks), "campaign {campaign} minute {minute}");
    }
    for ((minute, country, ad), clicks) in want.country.iter().take(60) {
        let got = get_json(a, &format!("/v1/ads/{ad}/aggregated_count?from={minute}&to={}&country={}", minute + 1, country.to_lowercase()));
        assert_eq!(got["clicks"].as_u64(), Some(*clicks), "ad {ad} minute {minute} country {country}");
    }
    // RFC 3339 times mean the minute they fall in.
    let (&(minute, ad), &clicks) = want.ad.iter().next().unwrap();
    let from = format_rfc3339(minute * 60_000 + 1234);
    let got = get_json(a, &format!("/v1/ads/{ad}/aggregated_count?from={from}&to={}", minute + 1));
    assert_eq!(got["clicks"].as_u64(), Some(clicks));

    // Top K: every minute (maintained), the last 5 minutes (the last snapshot of the file), and
    // computed ones (a larger count, a country, an unconfigured window).
    for (minute, top) in &want.top_minute {
        let got = get_json(a, &format!("/v1/ads/popular_ads?minute={minute}&count=100"));
        assert_eq!(&ads_of(&got), top, "top of minute {minute}");
    }
    let got = get_json(a, "/v1/ads/popular_ads?window=5m");
    assert_eq!(want.window_5m_last.0, boundary);
    assert_eq!(ads_of(&got), want.window_5m_last.1, "popular_ads window=5m");
    assert_eq!(got["source"], "maintained");
    for (window, count) in [(7u64, 1000usize), (60, 1000), (1, 3)] {
        let from = boundary.saturating_sub(window);
        let mut sums: HashMap<u64, u64> = HashMap::new();
        for (&(m, ad), &c) in &want.ad {
            if m >= from && m < boundary {
                *sums.entry(ad).or_default() += c;
            }
        }
        let got = get_json(a, &format!("/v1/ads/popular_ads?window={window}m&count={count}"));
        assert_eq!(ads_of(&got), rank(sums.into_iter().collect(), count), "window {window}m count {count}");
    }
    // A replay ticks by the minute, so the one-minute window per country is taken from each
    // minute's top K per country; the others keep their counts.
    let country = want.country.keys().next().unwrap().1.clone();
    for window in [1, 5] {
        let mut sums: HashMap<u64, u64> = HashMap::new();
        for ((m, c, ad), clicks) in &want.country {
            if *c == country && *m + window >= boundary {
                *sums.entry(*ad).or_default() += clicks;
            }
        }
        let got = get_json(a, &format!("/v1/ads/popular_ads?window={window}m&country={country}&count=50"));
        assert_eq!(ads_of(&got), rank(sums.into_iter().collect(), 50), "window {window}m in {country}");
        assert_eq!(got["source"], "maintained", "the per-country windows are maintained");
    }

    // The maintained top of each minute in each country, for every (minute, country).
    let mut per_minute_country: BTreeMap<(u64, String), Vec<(u64, u64)>> = BTreeMap::new();
    for ((minute, country, ad), clicks) in &want.country {
        per_minute_country.entry((*minute, country.clone())).or_default().push((*ad, *clicks));
    }
    for ((minute, country), ads) in per_minute_country.into_iter().step_by(3) {
        let got = get_json(a, &format!("/v1/ads/popular_ads?minute={minute}&country={country}&count=100"));
        assert_eq!(ads_of(&got), rank(ads, 100), "top of minute {minute} in {country}");
        assert_eq!(got["source"], "maintained");
    }

    // Each campaign's clicks in the last M minutes, maintained for configured windows.
    for &campaign in want.campaign.keys().map(|(_, c)| c).collect::<std::collections::BTreeSet<_>>().iter().take(30) {
        for window in [1u64, 5, 60] {
            let sum: u64 = want.campaign.iter().filter(|((m, c), _)| c == campaign && m + window >= boundary && *m < boundary).map(|(_, n)| n).sum();
            let got = get_json(a, &format!("/v1/campaigns/{campaign}/aggregated_count?window={window}m"));
            assert_eq!(got["clicks"].as_u64(), Some(sum), "campaign {campaign}, last {window}m");
            assert_eq!(got["source"], "maintained");
        }
    }

    // History: every changelog update of that (minute, ad), with its time.
    let mut corrected = want
        .changelog
        .iter()
        .filter(|r| r[1] == "ad_minute" && r[4] == "-1")
        .map(|r| r[2].clone())
        .collect::<Vec<_>>();
    corrected.sort();
    corrected.dedup();
    assert!(!corrected.is_empty(), "the data set should have corrected counts");
    for key in corrected.iter().take(10) {
        let (minute, ad) = key.split_once('/').unwrap();
        let want_updates: Vec<(u64, u64, i64)> = want
            .changelog
            .iter()
            .filter(|r| r[1] == "ad_minute" && &r[2] == key)
            .map(|r| (number(&r[0]), number(&r[3]), r[4].parse().unwrap()))
            .collect();
        let got = get_json(a, &format!("/v1/ads/{ad}/history?minute={minute}"));
        let got_updates: Vec<(u64, u64, i64)> = got["updates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| (u["time"].as_u64().unwrap(), u["clicks"].as_u64().unwrap(), u["diff"].as_i64().unwrap()))
            .collect();
        assert_eq!(got_updates, want_updates, "history of {key}");
    }

    // Metrics: Prometheus text with the same figures.
    let (code, metrics) = get(a, "/metrics", &[]);
    assert_eq!(code, 200);
    assert!(metrics.contains(&format!("clickagg_clicks_total {}", want.ad.values().sum::<u64>())), "{metrics}");
    assert!(metrics.contains(&format!("clickagg_watermark_ms {}", boundary * 60_000)));
}

/// `ms` since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`, with no date library.
fn format_rfc3339(ms: u64) -> String {
    let days = (ms / 86_400_000) as i64;
    let rest = ms % 86_400_000;
    // Civil date from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3_600_000,
        rest / 60_000 % 60,
        rest / 1000 % 60,
        rest % 1000
    )
}

#[test]
fn bad_requests_get_clear_errors_and_the_server_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path());
    let served = serve_replay(&logs, &dir.path().join("out"), &[]);
    let a = served.address.as_str();
    let long = format!("/v1/ads/1/aggregated_count?country={}", "x".repeat(10_000));
    for (target, status, needle) in [
        ("/v1/ads/abc/aggregated_count", 400, "ad_id must be"),
        ("/v1/ads/1/aggregated_count?from=yesterday", 400, "RFC 3339"),
        ("/v1/ads/1/aggregated_count?from=10&to=5", 400, "before"),
        ("/v1/ads/1/aggregated_count?from=0&to=99999999", 400, "at most"),
        ("/v1/ads/1/aggregated_count?country=USA", 400, "two ASCII letters"),
        ("/v1/ads/1/aggregated_count?country=US&country=FR", 400, "more than once"),
        ("/v1/ads/1/aggregated_count?colour=red", 400, "unknown parameter colour"),
        ("/v1/ads/popular_ads?count=0", 400, "count must be"),
        ("/v1/ads/popular_ads?count=1000000", 400, "count must be"),
        ("/v1/ads/popular_ads?window=30s", 400, "window must be"),
        ("/v1/ads/popular_ads?window=5m&minute=3", 400, "not both"),
        ("/v1/ads/1/history", 400, "needs minute"),
        ("/v1/nothing", 404, "no such endpoint"),
        (long.as_str(), 414, "longer than"),
    ] {
        let (code, body) = get(a, target, &[]);
        assert_eq!(code, status, "{target}: {body}");
        let json: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: not JSON ({e}): {body}"));
        assert!(json["error"].as_str().unwrap().contains(needle), "{target}: {body}");
    }
    // Unknown ads are not errors: they have no clicks.
    assert_eq!(get_json(a, "/v1/ads/999999999999/aggregated_count")["clicks"].as_u64(), Some(0));
    assert_eq!(get_json(a, "/v1/status")["complete"], Value::Bool(true));
}

/// The API answers only `Bearer s3cret`, whichever way the server was given it; a refusal is a
/// 401 with a JSON body.
fn assert_guarded_by_s3cret(a: &str) {
    for wrong in [None, Some("Bearer wrong"), Some("Bearer s3cre"), Some("Bearer s3cretx"), Some("bearer s3cret")] {
        let headers: Vec<(&str, &str)> = wrong.map(|w| ("Authorization", w)).into_iter().collect();
        let (status, body) = get(a, "/v1/status", &headers);
        assert_eq!(status, 401, "{wrong:?}");
        let json: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{wrong:?}: not JSON ({e}): {body}"));
        assert_eq!(json["status"], 401);
        assert!(json["error"].as_str().unwrap().contains("Bearer"), "{body}");
    }
    assert_eq!(get(a, "/v1/status", &[("Authorization", "Bearer s3cret")]).0, 200);
    assert_eq!(get(a, "/metrics", &[]).0, 401);
    assert_eq!(get(a, "/metrics", &[("Authorization", "Bearer s3cret")]).0, 200);
    // The page itself is public; it sends the token it is given in its address.
    assert_eq!(get(a, "/", &[]).0, 200);
}

#[test]
fn a_token_guards_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path());
    let served = serve_replay(&logs, &dir.path().join("out"), &["--token", "s3cret"]);
    assert_guarded_by_s3cret(&served.address);
}

#[test]
fn the_token_can_come_from_a_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path());
    let file = dir.path().join("token");
    std::fs::write(&file, "s3cret\n").unwrap();
    let from_file = serve_replay(&logs, &dir.path().join("out-file"), &["--token-file", file.to_str().unwrap()]);
    assert_guarded_by_s3cret(&from_file.address);
    drop(from_file);
    let from_env = common::server::serve_replay_env(&logs, &dir.path().join("out-env"), &[], &[("CLICKAGG_TOKEN", "s3cret")]);
    assert_guarded_by_s3cret(&from_env.address);
    drop(from_env);
    // A flag beats the environment; an empty or missing file is an error, not an open server.
    let flag = common::server::serve_replay_env(&logs, &dir.path().join("out-flag"), &["--token", "s3cret"], &[("CLICKAGG_TOKEN", "other")]);
    assert_guarded_by_s3cret(&flag.address);
    drop(flag);
    std::fs::write(&file, "").unwrap();
    for token_file in [file.clone(), dir.path().join("missing")] {
        let output = Command::new(env!("CARGO_BIN_EXE_clickagg"))
            .args(["run", "--logs", logs.to_str().unwrap(), "--out", dir.path().join("out-bad").to_str().unwrap()])
            .args(["--serve", "127.0.0.1:0", "--token-file", token_file.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains("token file"), "{stderr}");
    }
}

/// Resident memory of process `pid`, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn a_client_that_pipelines_and_never_reads_costs_the_server_little_memory() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path());
    let served = serve_replay(&logs, &dir.path().join("out"), &[]);
    let a = served.address.clone();
    // Each answer is a few KiB: 100k of them held for the client would be hundreds of MiB.
    let target = "/v1/ads/popular_ads?window=60m&count=100";
    let (status, one) = get(&a, target, &[]);
    assert_eq!(status, 200);
    assert!(one.len() > 2000, "{one}");
    let before = rss_bytes(served.pid());

    let stream = std::net::TcpStream::connect(&a).unwrap();
    stream.set_write_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
    let requests = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").repeat(100_000);
    let mut writer = stream.try_clone().unwrap();
    let mut sent = 0;
    while sent < requests.len() {
        match writer.write(&requests.as_bytes()[sent..]) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    // Whatever the kernel's buffers took, give the server time to read and answer what it will.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let after = rss_bytes(served.pid());
    let grown = after.saturating_sub(before);
    assert!(grown < 64 << 20, "RSS grew by {} MiB ({} of {} request bytes sent)", grown >> 20, sent, requests.len());
    // The server answers others meanwhile, and the pipelining client its first requests, in order.
    assert_eq!(get(&a, "/v1/status", &[]).0, 200);
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let mut reader = std::io::BufReader::new(stream);
    let mut head = [0u8; 12];
    reader.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_clickagg"))
        .args(["run", "--logs", "datasets/sample/logs", "--out", dir.path().to_str().unwrap(), "--serve", &address])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("cannot serve on"), "{stderr}");
}

/// Writes raw bytes on a fresh connection and returns the status the server answers with.
fn raw_status(address: &str, request: &[u8]) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response);
    text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[test]
fn slow_clients_many_connections_and_odd_requests_do_not_stop_the_server() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path());
    let served = serve_replay(&logs, &dir.path().join("out"), &[]);
    let a = served.address.clone();

    // A client that starts a request and never finishes it holds only its own connection.
    let mut slow = std::net::TcpStream::connect(&a).unwrap();
    slow.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n").unwrap();
    let started = std::time::Instant::now();
    assert_eq!(get(&a, "/v1/status", &[]).0, 200, "the server stopped answering behind a slow client");

    // Many clients at once.
    let handles: Vec<_> = (0..300)
        .map(|i| {
            let a = a.clone();
            std::thread::spawn(move || get(&a, &format!("/v1/ads/{i}/aggregated_count"), &[]).0)
        })
        .collect();
    for handle in handles {
        assert_eq!(handle.join().unwrap(), 200);
    }

    // Requests the API does not take.
    assert_eq!(raw_status(&a, b"POST /v1/status HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"), 413);
    assert_eq!(raw_status(&a, b"DELETE /v1/status HTTP/1.1\r\n\r\n"), 405);
    assert_eq!(raw_status(&a, b"NONSENSE\r\n\r\n"), 400);
    assert_eq!(raw_status(&a, b"GET /v1/status HTTP/1.1\r\n\xff\xfe: \xff\r\n\r\n"), 400);
    let huge_header = format!("GET /v1/status HTTP/1.1\r\nX-Junk: {}\r\n\r\n", "j".repeat(20_000));
    assert_eq!(raw_status(&a, huge_header.as_bytes()), 431);

    // The slow client is cut off with 408 once it has been silent for the idle timeout.
    let mut response = String::new();
    slow.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let _ = std::io::Read::read_to_string(&mut slow, &mut response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(25));
    assert_eq!(get(&a, "/v1/status", &[]).0, 200);
}

/// An IPv6 number as text, IPv4-mapped addresses as IPv4.
fn ip_text(ip: u128) -> String {
    let v6 = std::net::Ipv6Addr::from(ip);
    match v6.to_ipv4_mapped() {
        Some(v4) => v4.to_string(),
        None => v6.to_string(),
    }
}

#[test]
fn filters_by_ip_and_user_id_answer_what_the_reference_model_computes() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path());
    let (files, clicks) = common::reference::reference_run(&logs, &RefConfig::default());
    let want = expected(&files);
    let served = serve_replay(&logs, &dir.path().join("out"), &["-w", "2"]);
    let a = served.address.as_str();
    let boundary = want.last_minute + 1;
    let first = clicks.iter().map(|c| c.0).min().unwrap();

    // The busiest ips and users (bots among them), and some quiet ones.
    let mut per_ip: HashMap<u128, usize> = HashMap::new();
    let mut per_user: HashMap<u64, usize> = HashMap::new();
    for c in &clicks {
        *per_ip.entry(c.4).or_default() += 1;
        *per_user.entry(c.3).or_default() += 1;
    }
    let mut ips: Vec<(u128, usize)> = per_ip.into_iter().collect();
    ips.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    let mut users: Vec<(u64, usize)> = per_user.into_iter().collect();
    users.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    let chosen_ips: Vec<u128> = ips.iter().take(5).chain(ips.iter().rev().take(3)).map(|x| x.0).collect();
    let chosen_users: Vec<u64> = users.iter().take(5).chain(users.iter().rev().take(3)).map(|x| x.0).collect();

    let top_of = |selected: Vec<&common::reference::RefClick>, count: usize| {
        let mut per_ad: HashMap<u64, u64> = HashMap::new();
        for c in selected {
            *per_ad.entry(c.1).or_default() += 1;
        }
        rank(per_ad.into_iter().collect(), count)
    };
    let mut checked = 0;
    let filters: Vec<(String, Vec<&common::reference::RefClick>)> = chosen_ips
        .iter()
        .map(|&ip| (format!("ip={}", ip_text(ip)), clicks.iter().filter(|c| c.4 == ip).collect()))
        .chain(chosen_users.iter().map(|&user| (format!("user_id={user}"), clicks.iter().filter(|c| c.3 == user).collect())))
        .collect();
    for (param, mine) in filters {
        // Counts of each of its ads over everything, and over a few minutes.
        for ad in mine.iter().map(|c| c.1).take(3) {
            let total = mine.iter().filter(|c| c.1 == ad).count() as u64;
            let got = get_json(a, &format!("/v1/ads/{ad}/aggregated_count?from={first}&to={boundary}&{param}"));
            assert_eq!(got["clicks"].as_u64(), Some(total), "ad {ad}, {param}");
            let (from, to) = (first + 5, first + 9);
            let some = mine.iter().filter(|c| c.1 == ad && c.0 >= from && c.0 < to).count() as u64;
            let got = get_json(a, &format!("/v1/ads/{ad}/aggregated_count?from={from}&to={to}&{param}"));
            assert_eq!(got["clicks"].as_u64(), Some(some), "ad {ad} [{from},{to}), {param}");
            checked += 1;
        }
        // A campaign, and a country on top of the filter.
        if let Some(c) = mine.first() {
            let (campaign, country) = (c.2, c.5.clone());
            let total = mine.iter().filter(|x| x.2 == campaign).count() as u64;
            let got = get_json(a, &format!("/v1/campaigns/{campaign}/aggregated_count?from={first}&to={boundary}&{param}"));
            assert_eq!(got["clicks"].as_u64(), Some(total), "campaign {campaign}, {param}");
            let in_country: Vec<&common::reference::RefClick> = mine.iter().copied().filter(|x| x.5 == country).collect();
            let got = get_json(a, &format!("/v1/ads/popular_ads?window=60m&count=10&country={country}&{param}"));
            assert_eq!(ads_of(&got), top_of(in_country, 10), "top in {country}, {param}");
        }
        // The top of the last 60 minutes, and of one minute.
        let got = get_json(a, &format!("/v1/ads/popular_ads?window=60m&count=20&{param}"));
        assert_eq!(ads_of(&got), top_of(mine.clone(), 20), "top 60m, {param}");
        let minute = boundary - 3;
        let got = get_json(a, &format!("/v1/ads/popular_ads?minute={minute}&count=5&{param}"));
        assert_eq!(ads_of(&got), top_of(mine.iter().copied().filter(|c| c.0 == minute).collect(), 5), "minute {minute}, {param}");
    }
    assert!(checked >= 20, "too few filtered counts checked: {checked}");

    // A campaign's count by country, which no view file holds (kept for the server only).
    let mut per_campaign_country: HashMap<(u64, String), Vec<u64>> = HashMap::new();
    for c in &clicks {
        per_campaign_country.entry((c.2, c.5.clone())).or_default().push(c.0);
    }
    let mut keys: Vec<&(u64, String)> = per_campaign_country.keys().collect();
    keys.sort();
    for (campaign, country) in keys.into_iter().step_by(7).take(40) {
        let minutes = &per_campaign_country[&(*campaign, country.clone())];
        for (from, to) in [(first, boundary), (first + 2, first + 6), (boundary - 1, boundary)] {
            let want = minutes.iter().filter(|&&m| m >= from && m < to).count() as u64;
            let got = get_json(a, &format!("/v1/campaigns/{campaign}/aggregated_count?from={from}&to={to}&country={country}"));
            assert_eq!(got["clicks"].as_u64(), Some(want), "campaign {campaign} in {country} [{from},{to})");
        }
    }

    // Both filters at once.
    let c = &clicks[0];
    let both = clicks.iter().filter(|x| x.4 == c.4 && x.3 == c.3 && x.1 == c.1).count() as u64;
    let got = get_json(a, &format!("/v1/ads/{}/aggregated_count?from={first}&to={boundary}&ip={}&user_id={}", c.1, ip_text(c.4), c.3));
    assert_eq!(got["clicks"].as_u64(), Some(both));

    // Filters reach back as far as the arrangements keep clicks; older is a clear 400.
    let got = get_json(a, &format!("/v1/ads/popular_ads?window=5m&ip={}", ip_text(c.4)));
    let retained = got["retained_from_minute"].as_u64().unwrap();
    let (code, body) = get(a, &format!("/v1/ads/1/aggregated_count?from={}&to={boundary}&ip={}", retained - 1, ip_text(c.4)), &[]);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("outside retention"), "{body}");
    let (code, body) = get(a, "/v1/ads/1/aggregated_count?ip=999.1.1.1", &[]);
    assert!(code == 400 && body.contains("ip must be"), "{body}");
}

#[test]
fn served_answers_do_not_depend_on_the_worker_count() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    // The 1M-event set of the core tests' size: the served answers of #3 (filters, per-country
    // windows, campaign windows) against the reference, and the same for 1, 2 and 4 workers.
    let config = GenConfig { events: 1_000_000, partitions: 6, minutes: 90, seed: 29, ..GenConfig::default() };
    generate(&config, &logs).unwrap();
    let (files, clicks) = common::reference::reference_run(&logs, &RefConfig::default());
    let want = expected(&files);
    let boundary = want.last_minute + 1;
    let countries: std::collections::BTreeSet<String> = want.country.keys().map(|k| k.1.clone()).collect();
    let mut targets = Vec::new();
    for country in &countries {
        targets.push(format!("/v1/ads/popular_ads?window=5m&count=100&country={country}"));
        targets.push(format!("/v1/ads/popular_ads?window=60m&count=100&country={country}"));
        targets.push(format!("/v1/ads/popular_ads?minute={}&count=100&country={country}", boundary - 2));
    }
    // Clicks of the last hour, whose ip and user the filter arrangements still hold.
    let recent: Vec<&common::reference::RefClick> = clicks.iter().filter(|c| c.0 + 30 >= boundary).collect();
    for c in recent.iter().step_by(recent.len() / 25) {
        targets.push(format!("/v1/ads/popular_ads?window=60m&count=100&ip={}", ip_text(c.4)));
        targets.push(format!("/v1/ads/popular_ads?window=60m&count=100&user_id={}", c.3));
        targets.push(format!("/v1/campaigns/{}/aggregated_count?window=5m", c.2));
        targets.push(format!("/v1/campaigns/{}/aggregated_count?window=60m&country={}", c.2, c.5));
    }
    let answers = |workers: &str| -> Vec<serde_json::Value> {
        let served = serve_replay(&logs, &dir.path().join(format!("out-{workers}")), &["-w", workers]);
        targets
            .iter()
            .map(|t| {
                let body = get_json(&served.address, t);
                serde_json::json!({ "ads": body["ads"], "clicks": body["clicks"], "watermark": body["watermark"] })
            })
            .collect()
    };
    let one = answers("1");
    // The per-country windows, checked against the reference once.
    for (target, answer) in targets.iter().zip(&one).filter(|(t, _)| t.contains("window=60m&count=100&country=")) {
        let country = target.rsplit('=').next().unwrap();
        let mut sums: HashMap<u64, u64> = HashMap::new();
        for ((_, c, ad), n) in want.country.iter().filter(|((m, c, _), _)| c == country && m + 60 >= boundary) {
            let _ = c;
            *sums.entry(*ad).or_default() += n;
        }
        assert_eq!(ads_of(answer), rank(sums.into_iter().collect(), 100), "{target}");
    }
    // The ip and user filters, against the clicks of the last 60 minutes.
    for (target, answer) in targets.iter().zip(&one).filter(|(t, _)| t.contains("&ip=") || t.contains("&user_id=")) {
        let value = target.rsplit('=').next().unwrap();
        let mut per_ad: HashMap<u64, u64> = HashMap::new();
        for c in clicks.iter().filter(|c| c.0 + 60 >= boundary && c.0 < boundary) {
            let matches = if target.contains("&ip=") { ip_text(c.4) == value } else { c.3.to_string() == value };
            if matches {
                *per_ad.entry(c.1).or_default() += 1;
            }
        }
        assert_eq!(ads_of(answer), rank(per_ad.into_iter().collect(), 100), "{target}");
    }
    for workers in ["2", "4"] {
        let other = answers(workers);
        for ((target, a), b) in targets.iter().zip(&one).zip(&other) {
            assert_eq!(a, b, "{target}: 1 worker and {workers} differ");
        }
    }
}
