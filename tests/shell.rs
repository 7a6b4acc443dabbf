//! `clickagg shell` driven through stdin, as a script would: every command's answer must be
//! the API's, and a bad command must be an error line, not the end of the session.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use clickagg::generate::{generate, GenConfig};
use common::server::{follow_until_caught_up, get, get_json, serve_replay};
use serde_json::Value;

/// Runs the shell on `script`, which must succeed: its stdout.
fn shell(address: &str, script: &str) -> String {
    let (success, stdout, stderr) = shell_with(address, &[], &[], script);
    assert!(success, "{stderr}");
    stdout
}

#[test]
fn scripted_commands_answer_what_the_api_answers() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&GenConfig { events: 20_000, partitions: 3, minutes: 15, ads: 200, seed: 5, ..GenConfig::default() }, &logs).unwrap();
    let served = serve_replay(&logs, &dir.path().join("out"), &[]);
    let a = served.address.as_str();

    let status = get_json(a, "/v1/status");
    let boundary = status["as_of_minute"].as_u64().unwrap();
    let top = get_json(a, "/v1/ads/popular_ads?window=5m&count=3");
    let best = top["ads"][0]["ad_id"].as_u64().unwrap();
    let from = boundary - 10;
    let count = get_json(a, &format!("/v1/ads/{best}/aggregated_count?from={from}&to={boundary}"))["clicks"].as_u64().unwrap();
    let minute = boundary - 1;
    let history = get_json(a, &format!("/v1/ads/{best}/history?minute={minute}"));
    let top_minute = get_json(a, &format!("/v1/ads/popular_ads?minute={minute}&count=2&country=US"));
    // A user with clicks in the last minute, and what the arrangement holds for it.
    let sample = String::from_utf8_lossy(&std::fs::read(logs.join("part-00000.csv")).unwrap()).into_owned();
    // (The file ends with late rows, some too late: take the first user the arrangement holds.)
    let (user, peeked_rows) = sample
        .lines()
        .rev()
        .filter_map(|l| l.split(',').nth(4).filter(|_| l.split(',').count() == 7)?.parse::<u64>().ok())
        .take(200)
        .map(|user| (user, get_json(a, &format!("/v1/introspection/peek?arrangement=ClicksByUser&key={user}"))["rows"].as_array().unwrap().len()))
        .find(|(_, rows)| *rows > 0)
        .expect("a recent user with clicks held");

    let script = format!(
        "help\nwatermark\ntop 5m 3\ncount {best} {from} {boundary}\nhistory {best} {minute}\npartitions\n\
         frobnicate\ncount notanumber\ntop minute {minute} 2 country US\nwatch 1 watermark\narrangements\ndataflow\npeek ClicksByUser {user}\npeek AdMinute 1\npeek TopWindow 1\nquit\nwatermark\n"
    );
    let out = shell(a, &script);

    assert!(out.contains("history AD MINUTE"), "help is missing: {out}");
    assert!(out.contains(&format!("watermark {} (minute {boundary}), replay complete", boundary * 60_000)), "{out}");
    for (rank, ad) in top["ads"].as_array().unwrap().iter().enumerate() {
        let row = format!("{:>4}  {:<20} {:>7}", rank + 1, ad["ad_id"].to_string(), ad["clicks"].to_string());
        assert!(out.contains(&row), "top row {row:?} missing: {out}");
    }
    assert!(out.contains(&format!("ad {best}: {count} clicks in minutes [{from}, {boundary})")), "{out}");
    assert!(out.contains(&format!("ad {best}, minute {minute}: {} clicks now", history["clicks"])), "{out}");
    let first_update = &history["updates"][0];
    let update_row = format!("\n{:<15} {:>6}  {:>+4}", first_update["time"].to_string(), first_update["clicks"].to_string(), first_update["diff"].as_i64().unwrap());
    assert!(out.contains(&update_row), "history row {update_row:?} missing: {out}");
    assert!(out.contains("part-00002.csv"), "partitions missing: {out}");
    assert!(out.contains("error: unknown command \"frobnicate\""), "{out}");
    assert!(out.contains("error: 400: ad_id must be an unsigned integer"), "{out}");
    for ad in top_minute["ads"].as_array().unwrap() {
        assert!(out.contains(&format!("  {:<20} {:>7}", ad["ad_id"].to_string(), ad["clicks"].to_string())), "{out}");
    }
    assert!(out.contains(&format!("-- watermark {}", boundary * 60_000)), "watch printed nothing: {out}");
    // Introspection: the named arrangements with their types, and the operators by region.
    assert!(out.contains("DistinctClicks") && out.contains("ClickKey (xxh3-128 of event_id, ts) -> ClickAttrs"), "{out}");
    assert!(out.contains("only the filter arrangements are still held"), "{out}");
    for operator in ["Dedup", "DistinctClicks", "MinuteCounts", "AdMinute", "TopK", "SlidingWindows", "TopWindowLocal"] {
        assert!(out.lines().any(|l| l.ends_with(&format!("  {operator}"))), "operator {operator} missing: {out}");
    }
    // Batch, merge and drop events balance: a completed dataflow holds nothing but the
    // arrangements kept for filter queries, and every arrangement saw batches (so the balance
    // is not trivially zero).
    let arrangements = get_json(a, "/v1/introspection/arrangements");
    let list = arrangements["arrangements"].as_array().unwrap();
    assert!(list.len() >= 10, "{arrangements}");
    for arrangement in list {
        let name = arrangement["name"].as_str().unwrap();
        if name.starts_with("Arrange: ClicksBy") {
            assert!(arrangement["records"].as_i64() > Some(0), "{arrangement}");
        } else {
            assert_eq!((arrangement["records"].as_i64(), arrangement["batches"].as_i64()), (Some(0), Some(0)), "{arrangement}");
        }
        assert_ne!(arrangement["key"], "?", "an arrangement without a schema: {arrangement}");
        assert!(arrangement["batches_created"].as_u64() > Some(0), "{arrangement}");
    }
    assert!(out.contains(&format!("ClicksByUser [{user}]: {peeked_rows} rows")), "{out}");
    // The per-minute state is peekable, and after a replay holds nothing; the arrangements
    // inside differential's operators are not.
    assert!(out.contains("AdMinute [1]: 0 rows (as of what the workers hold now)"), "{out}");
    // Differential's traces are dropped with the completed dataflow: a peek says so.
    assert!(out.contains("error: 410: TopWindow cannot be peeked: its trace was dropped"), "{out}");
    // `watermark` and `watch 1 watermark` answer; the `watermark` after `quit` does not.
    assert_eq!(out.matches("), replay complete").count(), 2, "{out}");
}

#[test]
fn an_unreachable_server_is_a_clear_error() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = free.local_addr().unwrap().to_string();
    drop(free);
    let output = Command::new(env!("CARGO_BIN_EXE_clickagg")).args(["shell", "--connect", &address]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("cannot connect"), "{stderr}");
}

/// A peek at `name` (spaces escaped) with `key` and `limit`: `(status, body)`.
fn peek(address: &str, name: &str, key: &str, limit: usize) -> (u16, Value) {
    let (status, body) = get(address, &format!("/v1/introspection/peek?arrangement={}&key={key}&limit={limit}", name.replace(' ', "%20")), &[]);
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{name}: {e}: {body}")))
}

#[test]
fn every_listed_arrangement_is_peekable_while_following() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&GenConfig { events: 20_000, partitions: 3, minutes: 15, ads: 200, seed: 5, ..GenConfig::default() }, &logs).unwrap();
    // Two workers, and a fraud rule low enough to exclude some clicks, so that every kind of
    // arrangement is built and holds rows.
    let follower = follow_until_caught_up(&logs, &dir.path().join("store.db"), &["-w", "2", "--max-clicks-per-minute", "3"]);
    let a = follower.address.as_str();

    let listing = get_json(a, "/v1/introspection/arrangements");
    let names: Vec<String> = listing["arrangements"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap().to_string()).collect();
    for expected in ["TopMinute", "Arrange: TopMinute", "TopWindow", "TopWindowLocal", "Arrange: CampaignWindowCounts", "Arrange: ExcludedClicks", "AdMinute", "Arrange: ClicksByIp"] {
        assert!(names.iter().any(|n| n == expected), "{expected} is not listed: {names:?}");
    }
    for name in &names {
        // Each listed arrangement, by the name it is listed under: its first rows, at most the
        // limit, the first of all it holds, and `more` exactly when it holds more.
        let (status, first) = peek(a, name, "", 3);
        assert_eq!(status, 200, "{name}: {first}");
        let rows = first["rows"].as_array().unwrap();
        assert!(!rows.is_empty() && rows.len() <= 3, "{name}: {first}");
        let (_, all) = peek(a, name, "", 10_000);
        let all = all["rows"].as_array().unwrap();
        assert_eq!(rows[..], all[..rows.len()], "{name}: the first rows of a larger peek");
        assert_eq!(first["more"], Value::Bool(all.len() > 3), "{name}: {first}");
        assert!(all.iter().all(|r| r["count"].as_i64() != Some(0)), "{name}: a row with no count");
        // A key prefix: the first field of the first key, typed as a person would, gives every
        // row whose key begins with it.
        let first_field = |key: &Value| match key {
            Value::Array(fields) => fields[0].clone(),
            other => other.clone(),
        };
        let field = first_field(&rows[0]["key"]);
        if let Some(typed) = field.as_u64().map(|f| f.to_string()) {
            let (status, keyed) = peek(a, name, &typed, 10_000);
            assert_eq!(status, 200, "{name} [{typed}]: {keyed}");
            let expected: Vec<&Value> = all.iter().filter(|r| first_field(&r["key"]) == field).collect();
            let keyed: Vec<&Value> = keyed["rows"].as_array().unwrap().iter().collect();
            if name.starts_with("Arrange: ClicksBy") && !name.ends_with("Minute") {
                // A filter arrangement read at one key gives its rows as columns.
                let counts = |rows: &[&Value]| rows.iter().map(|r| r["count"].as_i64().unwrap()).collect::<Vec<_>>();
                assert_eq!(counts(&keyed), counts(&expected), "{name} [{typed}]");
            } else {
                assert_eq!(keyed, expected, "{name} [{typed}]");
            }
        }
    }

    // The top K of a minute, as differential's reduce holds it, is the minute's answer.
    let status = get_json(a, "/v1/status");
    let (minute, k) = (status["as_of_minute"].as_u64().unwrap() - 2, status["top_k"].as_u64().unwrap());
    let top = get_json(a, &format!("/v1/ads/popular_ads?minute={minute}&count={k}"));
    let served: Vec<(u64, u64)> = top["ads"].as_array().unwrap().iter().map(|ad| (ad["ad_id"].as_u64().unwrap(), ad["clicks"].as_u64().unwrap())).collect();
    assert!(!served.is_empty(), "{top}");
    let (status, peeked) = peek(a, "TopMinute", &minute.to_string(), 10_000);
    assert_eq!(status, 200, "{peeked}");
    let peeked: Vec<(u64, u64)> = peeked["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["value"][1].as_u64().unwrap(), u64::MAX - r["value"][0].as_u64().unwrap()))
        .collect();
    assert_eq!(peeked, served);

    // Unknown names list the names; `Arrange: X` is one name in the shell, and a key is optional.
    let (status, unknown) = peek(a, "NoSuchArrangement", "", 3);
    assert_eq!(status, 404, "{unknown}");
    assert!(unknown["error"].as_str().unwrap().contains("the arrangements are: ") && unknown["error"].as_str().unwrap().contains("Arrange: TopMinute"), "{unknown}");
    let out = shell(a, "peek Arrange: TopMinute limit 2\npeek TopWindowLocal\npeek NoSuchArrangement 1\n");
    assert!(out.contains("Arrange: TopMinute []: 2 rows, the first 2 shown: more are held"), "{out}");
    assert!(out.contains("TopWindowLocal []: "), "{out}");
    assert!(out.contains("error: 404: no arrangement is named \"NoSuchArrangement\""), "{out}");
}

/// Runs the shell with `args` and `env` on `script`: (success, stdout, stderr).
fn shell_with(address: &str, args: &[&str], env: &[(&str, &str)], script: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_clickagg"))
        .args(["shell", "--connect", address])
        .args(args)
        .env_remove("CLICKAGG_TOKEN")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    (output.status.success(), String::from_utf8(output.stdout).unwrap(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn the_shell_takes_its_token_from_a_flag_a_file_or_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&GenConfig { events: 5_000, partitions: 2, minutes: 5, ads: 50, seed: 7, ..GenConfig::default() }, &logs).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").unwrap();
    let served = common::server::serve_replay_env(&logs, &dir.path().join("out"), &[], &[("CLICKAGG_TOKEN", "s3cret")]);
    let a = served.address.as_str();
    let file = token_file.to_str().unwrap();
    for (args, env) in [(vec!["--token", "s3cret"], vec![]), (vec!["--token-file", file], vec![]), (vec![], vec![("CLICKAGG_TOKEN", "s3cret")])] {
        let (ok, out, err) = shell_with(a, &args, &env, "watermark\nquit\n");
        assert!(ok && out.contains("replay complete"), "{args:?} {env:?}: {out} {err}");
    }
    // Without the token, or with a wrong one, the server's 401 is the shell's error.
    for (args, env) in [(vec![], vec![]), (vec!["--token", "wrong"], vec![]), (vec![], vec![("CLICKAGG_TOKEN", "wrong")])] {
        let (ok, _, err) = shell_with(a, &args, &env, "watermark\nquit\n");
        assert!(!ok && err.contains("401"), "{args:?} {env:?}: {err}");
    }
}
