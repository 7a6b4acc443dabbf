//! `clickagg shell` driven through stdin, as a script would: every command's answer must be
//! the API's, and a bad command must be an error line, not the end of the session.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use clickagg::generate::{generate, GenConfig};
use common::server::{get_json, serve_replay};

fn shell(address: &str, script: &str) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_clickagg"))
        .args(["shell", "--connect", address])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
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
    assert!(out.contains("error: 404: TopWindow cannot be peeked"), "{out}");
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
    (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
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
