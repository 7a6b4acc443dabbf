//! The durable store and follow mode (issue #6): what `run --store` commits is what `run --out`
//! writes; a follower killed with SIGKILL at random moments and restarted each time ends with
//! exactly the store of a clean replay; and a store that cannot be resumed safely is refused,
//! byte for byte untouched.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::follow::{
    clean_replay, clickagg, export, generate, kill_at_random_moments, run_err, run_ok, s, sigterm, start_follower,
    stop_when_caught_up, store_position, Writer, SETTINGS,
};
use common::{assert_same_outputs, read_outputs};

/// Finishes a store with a replay to the end of the logs, and returns its exported files.
fn finish_and_export(logs: &Path, store: &Path) -> BTreeMap<String, String> {
    let mut args = vec!["run", "--logs", s(logs), "--store", s(store), "-w", "2"];
    args.extend(SETTINGS);
    run_ok(&args);
    export(store)
}

#[test]
fn a_replayed_store_exports_what_run_out_writes() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&logs, 30_000, 3, 12, 7);
    let store = dir.path().join("answers.db");
    let exported = finish_and_export(&logs, &store);
    assert_same_outputs(&clean_replay(&logs), &exported, "store export vs run --out");
    // A finished store is not resumed again by mistake.
    let mut args = vec!["run", "--logs", s(&logs), "--store", s(&store)];
    args.extend(SETTINGS);
    assert!(run_err(&args).contains("finished replay"));
}

/// Issue #6's crash test: a writer appends to 4 partitions; the follower is killed with SIGKILL
/// at random moments (at least 10 times, while it recovers too) and restarted each time; at the
/// end its store equals a clean replay of the same files, every file and the whole changelog.
#[test]
fn kill_9_at_random_moments_while_following_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    let logs = dir.path().join("logs");
    let store = dir.path().join("store").join("answers.db");
    generate(&source, 60_000, 4, 30, 11);
    let writer = Writer::start(&source, &logs, 5, 250, Duration::from_millis(25));
    let mut frontiers = Vec::new();
    let kills = kill_at_random_moments(|| writer.is_done(), 12, 2026, 150, || start_follower(&logs, &store, &[]), || {
        frontiers.push(store_position(&store).map(|p| p.0))
    });
    writer.join();
    // The committed watermark moved on between kills: the followers did commit, not only rebuild.
    let distinct: std::collections::BTreeSet<_> = frontiers.iter().flatten().collect();
    assert!(distinct.len() >= 4, "the store hardly advanced across {kills} kills: {frontiers:?}");
    // One last follower catches up and is stopped cleanly.
    stop_when_caught_up(start_follower(&logs, &store, &[]), &logs, &store);
    assert_same_outputs(&clean_replay(&logs), &finish_and_export(&logs, &store), "store after 12 SIGKILLs vs a clean replay");
}

/// A clean stop (SIGTERM) and a restart continue where the store left off.
#[test]
fn a_restart_after_a_clean_stop_continues_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    let logs = dir.path().join("logs");
    let store = dir.path().join("answers.db");
    generate(&source, 20_000, 4, 15, 3);
    let writer = Writer::start(&source, &logs, 9, 60, Duration::from_millis(25));
    let follower = start_follower(&logs, &store, &[]);
    std::thread::sleep(Duration::from_millis(1200));
    sigterm(&follower);
    let output = follower.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && stderr.contains("stopped"), "{stderr}");
    let (stopped_at, _) = store_position(&store).expect("the first follower committed");
    writer.join();
    stop_when_caught_up(start_follower(&logs, &store, &[]), &logs, &store);
    assert!(store_position(&store).unwrap().0 > stopped_at);
    assert_same_outputs(&clean_replay(&logs), &finish_and_export(&logs, &store), "store after a stop and a restart");
}

/// A follower picks up a partition that appears later, reads a line only once its newline has
/// come, and reports a partition truncated or deleted under it instead of re-reading it.
#[test]
fn follow_mode_new_partitions_partial_lines_and_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let store = dir.path().join("answers.db");
    std::fs::create_dir_all(&logs).unwrap();
    let header = "event_id,ts,ad_id,campaign_id,user_id,ip,country\n";
    let line = |id: &str, ts: u64, ad: u64| format!("{id},{ts},{ad},7,1,10.0.0.1,US\n");
    let t0 = 1_767_225_600_000u64;
    std::fs::write(logs.join("part-00000.csv"), format!("{header}{}", line("a1", t0, 1))).unwrap();
    std::fs::write(logs.join("part-00001.csv"), format!("{header}{}", line("b1", t0, 2))).unwrap();
    let mut args = vec!["run", "--logs", s(&logs), "--store", s(&store), "--follow", "--idle-timeout", "1s"];
    args.extend(SETTINGS);
    let follower = clickagg().args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let append = |name: &str, text: &str| {
        std::fs::OpenOptions::new().append(true).open(logs.join(name)).unwrap().write_all(text.as_bytes()).unwrap();
    };
    std::thread::sleep(Duration::from_millis(500));
    // Half a line, then the rest: it must count once, whole.
    let cut = line("a2", t0 + 1_000, 1);
    append("part-00000.csv", &cut[..9]);
    std::thread::sleep(Duration::from_millis(400));
    append("part-00000.csv", &cut[9..]);
    // A partition that appears while following.
    std::fs::write(logs.join("part-00002.csv"), format!("{header}{}", line("c1", t0 + 2_000, 3))).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // Truncated under the reader, and deleted.
    std::fs::write(logs.join("part-00001.csv"), header).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Past the first minute and its lateness, so that minute is committed.
    for (name, id) in [("part-00000.csv", "a3"), ("part-00002.csv", "c2")] {
        append(name, &line(id, t0 + 3 * 60_000, 9));
    }
    std::thread::sleep(Duration::from_millis(2500));
    std::fs::remove_file(logs.join("part-00002.csv")).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    sigterm(&follower);
    let output = follower.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("new partition part-00002.csv"), "{stderr}");
    assert!(stderr.contains("part-00001.csv: the partition file was truncated"), "{stderr}");
    assert!(stderr.contains("part-00002.csv: the partition file was deleted"), "{stderr}");
    let out = dir.path().join("out");
    run_ok(&["export", "--store", s(&store), "--out", s(&out)]);
    let files = read_outputs(&out);
    let first_minute = t0 / 60_000;
    assert_eq!(
        files["ad_minute.csv"],
        format!("minute,ad_id,clicks\n{first_minute},1,2\n{first_minute},2,1\n{first_minute},3,1\n"),
        "a1 and the cut a2 on ad 1, b1 on ad 2, c1 from the new partition on ad 3"
    );
    let dead = &files["dead_letter.csv"];
    assert!(dead.contains("part-00001.csv,") && dead.contains("partition_rotated"), "{dead}");
    assert!(dead.contains("part-00002.csv,") && dead.contains("deleted"), "{dead}");
    assert!(!dead.contains("a2"), "the cut line was read whole: {dead}");
}

/// Stores that cannot be resumed safely are refused with a message that says what to do, and
/// are left byte for byte as they were.
#[test]
fn stores_that_cannot_be_resumed_are_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&logs, 5_000, 2, 6, 1);
    let run_args = |store: &Path, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["run", "--logs", s(&logs), "--store", s(store)].map(String::from).to_vec();
        args.extend(SETTINGS.iter().chain(extra).map(|a| a.to_string()));
        args
    };
    let refuse = |args: &[String], needle: &str, store: &Path| {
        let digest = |p: &Path| std::fs::read(p).ok().map(|b| xxhash_rust::xxh3::xxh3_128(&b));
        let before = digest(store);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let stderr = run_err(&args);
        assert!(stderr.contains(needle), "expected '{needle}' in: {stderr}");
        assert!(digest(store) == before, "{} was changed", store.display());
    };

    // Not a database at all.
    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, b"this is not a clickagg store\n".repeat(200)).unwrap();
    refuse(&run_args(&garbage, &[]), "is not a clickagg store", &garbage);
    assert!(run_err(&["export", "--store", s(&garbage), "--out", s(&dir.path().join("x"))]).contains("not a clickagg store"));

    // A store with commits, stopped cleanly part-way.
    let committed = dir.path().join("committed.db");
    let mut follower = clickagg().args(run_args(&committed, &["--follow"])).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    sigterm(&follower);
    follower.wait().unwrap();
    assert!(store_position(&committed).is_some(), "the follower committed");

    // Cut short (a disk that lost its tail): an error naming the file, no panic.
    let cut = dir.path().join("cut.db");
    let bytes = std::fs::read(&committed).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    refuse(&run_args(&cut, &[]), "cut.db", &cut);

    // Written under other settings.
    refuse(&run_args(&committed, &["--top-k", "5"]), "written with other settings", &committed);

    // From a newer clickagg.
    let newer = dir.path().join("newer.db");
    for suffix in ["", "-wal"] {
        let from = format!("{}{suffix}", committed.display());
        if Path::new(&from).exists() {
            std::fs::copy(&from, format!("{}{suffix}", newer.display())).unwrap();
        }
    }
    {
        let conn = rusqlite::Connection::open(&newer).unwrap();
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'", []).unwrap();
    }
    refuse(&run_args(&newer, &[]), "schema version 99", &newer);

    // Its write-ahead log is there but the store is not: moved or deleted part-way.
    let missing = dir.path().join("missing.db");
    std::fs::write(dir.path().join("missing.db-wal"), b"wal").unwrap();
    refuse(&run_args(&missing, &[]), "write-ahead log", &missing);
    assert!(!missing.exists());

    // A partition truncated or replaced under the store.
    let original = std::fs::read(logs.join("part-00000.csv")).unwrap();
    std::fs::write(logs.join("part-00000.csv"), &original[..original.len() / 4]).unwrap();
    refuse(&run_args(&committed, &[]), "truncated or replaced", &committed);
    let mut replaced = original.clone();
    replaced[60] ^= 1;
    std::fs::write(logs.join("part-00000.csv"), &replaced).unwrap();
    refuse(&run_args(&committed, &[]), "does not begin with the bytes", &committed);
    // Restored, it resumes and finishes.
    std::fs::write(logs.join("part-00000.csv"), &original).unwrap();
    run_ok(&run_args(&committed, &[]).iter().map(String::as_str).collect::<Vec<_>>());
}

/// Issue #26: a line over 4 KiB (SPEC §1: not a click, dead-lettered) still being written when
/// the follower is killed. The committed offset, and the checkpoint a restart resumes from, must
/// stay at the line's start, so that the restart reads the line whole once its newline comes and
/// dead-letters it once, at its true offset. A checkpoint inside the line would make its tail a
/// row of its own. A restart resumes there when the partition went idle behind the others (the
/// writer of the half line hung), so that the others moved the watermark on.
#[test]
fn a_follower_killed_while_an_overlong_line_is_half_written_resumes_at_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let store = dir.path().join("answers.db");
    std::fs::create_dir_all(&logs).unwrap();
    let header = "event_id,ts,ad_id,campaign_id,user_id,ip,country\n";
    let t0 = 1_767_225_600_000u64;
    // Rows every 20 s of event time in [from, to) minutes, on ads 1 to 5.
    let rows = |prefix: &str, from: u64, to: u64| -> String {
        (from * 3..to * 3)
            .map(|i| format!("{prefix}{i},{},{},7,{},10.0.0.{},US\n", t0 + i * 20_000, 1 + i % 5, i % 11, 1 + i % 3))
            .collect()
    };
    let (quiet, busy) = ("part-00000.csv", "part-00001.csv");
    let before_long_line = format!("{header}{}", rows("a", 0, 1));
    let long_line_at = before_long_line.len() as u64;
    std::fs::write(logs.join(quiet), format!("{before_long_line}{}", "x".repeat(5_000))).unwrap();
    std::fs::write(logs.join(busy), format!("{header}{}", rows("b", 0, 11))).unwrap();

    let follow = |idle: &str| {
        let mut args = vec!["run", "--logs", s(&logs), "--store", s(&store), "--follow", "-w", "2", "--idle-timeout", idle];
        args.extend(SETTINGS);
        clickagg().args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("the follower starts")
    };
    let mut follower = follow("1s");
    // The quiet partition goes idle, and the busy one moves the watermark past minute 9.
    let started = std::time::Instant::now();
    while store_position(&store).is_none_or(|(frontier, _)| frontier < t0 + 9 * 60_000) {
        assert!(started.elapsed() < Duration::from_secs(60), "the follower did not commit minute 9: {:?}", store_position(&store));
        std::thread::sleep(Duration::from_millis(50));
    }
    follower.kill().unwrap();
    follower.wait().unwrap();
    let committed_at_kill = {
        let conn = rusqlite::Connection::open_with_flags(&store, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        conn.query_row("SELECT offset FROM partitions WHERE name = ?1", [quiet], |r| r.get::<_, i64>(0)).unwrap() as u64
    };

    // The line is finished, both partitions grow on, and a new follower catches up.
    let append = |name: &str, text: &str| {
        std::fs::OpenOptions::new().append(true).open(logs.join(name)).unwrap().write_all(text.as_bytes()).unwrap();
    };
    append(quiet, &format!("{}\n{}", "y".repeat(1_000), rows("c", 11, 13)));
    append(busy, &rows("d", 11, 14));
    stop_when_caught_up(follow("1s"), &logs, &store);
    let replay = clean_replay(&logs);
    let dead = &replay["dead_letter.csv"];
    assert_eq!(dead.matches(&format!("{quiet},{long_line_at},line_too_long,")).count(), 1, "{dead}");
    assert_same_outputs(&replay, &finish_and_export(&logs, &store), "store after a kill inside an overlong line vs a clean replay");
    assert_eq!(committed_at_kill, long_line_at, "the committed offset was the overlong line's start, not its middle");
}

/// A store written before the settings were typed holds them as `key=value` text: it is read
/// field by field, so it exports as before, and is compared as data when resumed.
#[test]
fn a_store_with_the_old_settings_text_reads_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&logs, 20_000, 2, 8, 3);
    let store = dir.path().join("answers.db");
    let exported = finish_and_export(&logs, &store);
    let conn = rusqlite::Connection::open(&store).unwrap();
    let json: String = conn.query_row("SELECT value FROM meta WHERE key = 'settings'", [], |r| r.get(0)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let optional = |v: &serde_json::Value| v.as_u64().map_or("None".to_string(), |n| format!("Some({n})"));
    let list = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
    let legacy = format!(
        "watermark_delay_ms={} allowed_lateness_ms={} tick_ms={} top_k={} buckets={} windows={} max_clicks_per_minute={} blocklist={}:{}",
        v["watermark_delay_ms"],
        optional(&v["allowed_lateness_ms"]),
        v["tick_ms"],
        v["top_k"],
        list(&v["top_k_buckets"]),
        list(&v["windows"]),
        optional(&v["max_clicks_per_minute"]),
        v["blocklist"]["networks"],
        v["blocklist"]["fingerprint"].as_str().unwrap(),
    );
    assert!(legacy.contains("windows=1,5 ") && legacy.contains("max_clicks_per_minute=Some(40)"), "{legacy}");
    conn.execute("UPDATE meta SET value = ?1 WHERE key = 'settings'", [&legacy]).unwrap();
    drop(conn);
    assert_eq!(export(&store), exported, "the window files come from the old text's windows");
    // Compared as data: the same settings pass (the store is then refused for being finished),
    // other ones are named in the command line's words.
    let mut args = vec!["run", "--logs", s(&logs), "--store", s(&store)];
    args.extend(SETTINGS);
    assert!(run_err(&args).contains("finished replay"));
    args.extend(["--top-k", "5"]);
    let refused = run_err(&args);
    assert!(refused.contains("written with other settings") && refused.contains("top k: 100 in the store, 5 now"), "{refused}");
}
