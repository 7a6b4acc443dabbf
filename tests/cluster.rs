//! Cluster mode as an operator runs it: several `clickagg run` processes on loopback, joined
//! by a hostfile, must write exactly what one process with one worker writes; and a cluster
//! that cannot form or loses a member must say so and exit non-zero, never hang.

mod common;


use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use clickagg::cluster_local::write_local_hostfile;
use clickagg::generate::{generate, GenConfig};
use common::{assert_same_outputs, read_outputs};

fn clickagg() -> Command {
    Command::new(env!("CARGO_BIN_EXE_clickagg"))
}

/// Generated logs with every kind of row: duplicates, late, too late and malformed.
fn logs(dir: &Path, events: u64, partitions: u32) -> String {
    let logs = dir.join("logs");
    let config = GenConfig { events, partitions, minutes: 30, seed: 7, ..GenConfig::default() };
    generate(&config, &logs).unwrap();
    logs.to_str().unwrap().to_string()
}

const SETTINGS: [&str; 6] = ["--windows", "1m,5m", "--max-clicks-per-minute", "25", "--allowed-lateness", "2m"];

fn single_process_outputs(logs: &str, dir: &Path) -> std::collections::BTreeMap<String, String> {
    let out = dir.join("single");
    let result = clickagg().args(["run", "--logs", logs, "--out", out.to_str().unwrap(), "-w", "1"]).args(SETTINGS).output().unwrap();
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    read_outputs(&out)
}

/// Starts process `process` of `processes`, as the README tells an operator to.
fn start(logs: &str, out: Option<&Path>, workers: usize, processes: usize, process: usize, hostfile: &Path, extra: &[&str]) -> Child {
    let mut command = clickagg();
    command.args(["run", "--logs", logs, "-w", &workers.to_string(), "-n", &processes.to_string()]);
    command.args(["-p", &process.to_string(), "-H", hostfile.to_str().unwrap()]).args(SETTINGS).args(extra);
    if let Some(out) = out {
        command.arg("--out").arg(out);
    }
    command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Waits for a process, failing the test instead of hanging if it does not end.
fn finish(child: Child, limit: Duration) -> Output {
    let started = Instant::now();
    let mut child = child;
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("a clickagg process did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn two_processes_of_two_workers_write_what_one_worker_writes() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path(), 60_000, 5);
    let expected = single_process_outputs(&logs, dir.path());
    let dead = &expected["dead_letter.csv"];
    for reason in ["too_late", "bad_ts"] {
        assert!(dead.contains(reason), "the data set should have {reason} rows");
    }
    assert!(expected["changelog/updates.csv"].lines().any(|l| l.contains(",-1")), "the data set should cause corrections");

    let hostfile = write_local_hostfile(dir.path(), 2).unwrap();
    let out = dir.path().join("cluster");
    // Process 1 first: the order processes start in must not matter. It needs no --out.
    let second = start(&logs, None, 2, 2, 1, &hostfile, &[]);
    let first = start(&logs, Some(&out), 2, 2, 0, &hostfile, &[]);
    for (name, output) in [("process 0", finish(first, Duration::from_secs(120))), ("process 1", finish(second, Duration::from_secs(120)))] {
        assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
    }
    assert_same_outputs(&expected, &read_outputs(&out), "2 processes × 2 workers vs 1 × 1");
}

#[test]
fn cluster_local_starts_a_working_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path(), 20_000, 4);
    let expected = single_process_outputs(&logs, dir.path());
    let out = dir.path().join("local");
    let mut command = clickagg();
    command.args(["cluster-local", "-n", "3", "-w", "1", "--", "--logs", &logs, "--out", out.to_str().unwrap()]).args(SETTINGS);
    let output = finish(command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap(), Duration::from_secs(120));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_same_outputs(&expected, &read_outputs(&out), "cluster-local 3 × 1 vs 1 × 1");
}

#[test]
fn a_killed_process_brings_the_others_down_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // Large enough that the run is still going when process 1 dies.
    let logs = logs(dir.path(), 1_000_000, 4);
    let hostfile = write_local_hostfile(dir.path(), 2).unwrap();
    let out = dir.path().join("out");
    let mut first = start(&logs, Some(&out), 1, 2, 0, &hostfile, &["--tick", "1s"]);
    let mut second = start(&logs, None, 1, 2, 1, &hostfile, &["--tick", "1s"]);
    // Wait until process 0 has joined the cluster, then kill process 1 as `kill -9` would.
    let mut stderr = BufReader::new(first.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("connected") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "process 0 ended before connecting");
    }
    second.kill().unwrap();
    second.wait().unwrap();
    let started = Instant::now();
    let output = finish(first, Duration::from_secs(60));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(!output.status.success(), "process 0 should fail when a peer dies");
    assert!(rest.contains("lost the connection to another process"), "unclear error: {rest}");
    assert!(!rest.contains("panicked") && !rest.contains("abort"), "a panic reached the user: {rest}");
    assert!(started.elapsed() < Duration::from_secs(30), "process 0 took {:?} to notice", started.elapsed());
}

#[test]
fn processes_with_different_worker_counts_refuse_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path(), 2_000, 2);
    let hostfile = write_local_hostfile(dir.path(), 2).unwrap();
    let first = start(&logs, Some(&dir.path().join("out")), 2, 2, 0, &hostfile, &["--connect-timeout", "20s"]);
    let second = start(&logs, None, 1, 2, 1, &hostfile, &["--connect-timeout", "20s"]);
    for output in [finish(first, Duration::from_secs(60)), finish(second, Duration::from_secs(60))] {
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(stderr.contains("every process must be given the same --workers"), "{stderr}");
    }
}

#[test]
fn processes_with_different_settings_refuse_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path(), 2_000, 2);
    let hostfile = write_local_hostfile(dir.path(), 2).unwrap();
    let first = start(&logs, Some(&dir.path().join("out")), 1, 2, 0, &hostfile, &["--top-k", "5"]);
    let second = start(&logs, None, 1, 2, 1, &hostfile, &["--top-k", "6"]);
    let output = finish(second, Duration::from_secs(60));
    finish(first, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("different settings") && stderr.contains("top k: 5 on process 0, 6 on process 1"), "{stderr}");
}

#[test]
fn a_peer_that_never_starts_is_an_error_after_the_timeout_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path(), 2_000, 2);
    let hostfile = write_local_hostfile(dir.path(), 3).unwrap();
    let started = Instant::now();
    let output = finish(start(&logs, Some(&dir.path().join("out")), 1, 3, 0, &hostfile, &["--connect-timeout", "1s"]), Duration::from_secs(30));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("process 1") && stderr.contains("process 2") && stderr.contains("never connected"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn cluster_flags_are_checked_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path(), 100, 1);
    let hostfile = write_local_hostfile(dir.path(), 2).unwrap();
    let h = hostfile.to_str().unwrap();
    let out = dir.path().join("out");
    let o = out.to_str().unwrap();
    for (args, needle) in [
        (vec!["-n", "2", "-p", "0", "--out", o], "needs --hostfile"),
        (vec!["-n", "2", "-p", "2", "-H", h, "--out", o], "out of range"),
        (vec!["-n", "3", "-p", "0", "-H", h, "--out", o], "one host:port line per process"),
        (vec!["-n", "2", "-p", "0", "-H", h], "--out DIR or --store PATH is required"),
        (vec!["-n", "2", "-p", "0", "-H", "/nonexistent/hosts", "--out", o], "cannot read the hostfile"),
    ] {
        let output = clickagg().args(["run", "--logs", &logs]).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success() && stderr.contains(needle), "{args:?}: expected {needle:?} in {stderr}");
    }
}

/// Reads a child's stderr until a line containing `needle`; returns every line read.
fn wait_for(child: &mut Child, needle: &str) -> (BufReader<std::process::ChildStderr>, String) {
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut line = String::new();
    while !line.contains(needle) {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "the process ended before saying {needle:?}: {seen}");
        seen.push_str(&line);
    }
    (stderr, seen)
}

#[test]
fn a_serving_cluster_answers_filter_queries_from_every_process() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path(), 30_000, 5);
    let single = common::server::serve_replay(Path::new(&logs), &dir.path().join("single"), &SETTINGS);
    let hostfile = write_local_hostfile(dir.path(), 2).unwrap();
    let serve = ["--serve", "127.0.0.1:0"];
    let mut second = start(&logs, None, 2, 2, 1, &hostfile, &serve);
    let mut first = start(&logs, Some(&dir.path().join("cluster")), 2, 2, 0, &hostfile, &serve);
    let (_keep, seen) = wait_for(&mut first, "replay complete");
    let address = seen.lines().find_map(|l| l.strip_prefix("clickagg: serving on http://")).unwrap().trim_end_matches('/').to_string();

    // Ask both for the same filtered answers: the clicks of an ip or user live on whichever
    // worker their key hashes to, in either process.
    let sample = std::fs::read_to_string(Path::new(&logs).join("part-00000.csv")).unwrap();
    let mut checked = 0;
    // Recent lines: their clicks are within the arrangements' retention.
    let lines: Vec<&str> = sample.lines().collect();
    for line in lines[lines.len() - 600..].iter().step_by(50) {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != 7 {
            continue;
        }
        for param in [format!("ip={}", fields[5]), format!("user_id={}", fields[4])] {
            let target = format!("/v1/ads/popular_ads?window=5m&count=50&{param}");
            let (want, got) = (common::server::get(&single.address, &target, &[]), common::server::get(&address, &target, &[]));
            assert_eq!(want.0, got.0, "{target}");
            if want.0 == 200 {
                let strip = |body: &str| {
                    let mut v: serde_json::Value = serde_json::from_str(body).unwrap();
                    v.as_object_mut().unwrap().remove("retained_from_minute");
                    v["ads"].clone()
                };
                assert_eq!(strip(&want.1), strip(&got.1), "{target}");
                checked += !strip(&want.1).as_array().unwrap().is_empty() as usize;
            }
        }
    }
    assert!(checked >= 10, "too few filtered answers compared: {checked}");
    for child in [&mut first, &mut second] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Copies the partitions of `logs` into one directory per process, `dir/local-P`, process P
/// getting the partitions numbered in `split[P]`: each process's own disk.
fn split_logs(logs: &Path, dir: &Path, split: &[&[u32]]) -> Vec<std::path::PathBuf> {
    split
        .iter()
        .enumerate()
        .map(|(process, parts)| {
            let local = dir.join(format!("local-{process}"));
            std::fs::create_dir_all(&local).unwrap();
            for part in *parts {
                let name = format!("part-{part:05}.csv");
                std::fs::copy(logs.join(&name), local.join(&name)).unwrap();
            }
            local
        })
        .collect()
}

/// Starts process `process` of a cluster whose processes each read their own `logs`.
fn start_local(logs: &Path, workers: usize, processes: usize, process: usize, hostfile: &Path, extra: &[&str]) -> Child {
    let mut command = clickagg();
    command.args(["run", "--local-logs", "--logs", logs.to_str().unwrap(), "-w", &workers.to_string()]);
    command.args(["-n", &processes.to_string(), "-p", &process.to_string(), "--hostfile", hostfile.to_str().unwrap()]);
    command.args(extra).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Starts every process of a `--local-logs` cluster (the last first), each with `extra` and
/// process 0 with `first` too, and waits for them all.
fn local_cluster(dirs: &[std::path::PathBuf], workers: usize, hostfile: &Path, extra: &[&str], first: &[&str]) -> Vec<Output> {
    let mut children: Vec<Child> = (1..dirs.len()).rev().map(|p| start_local(&dirs[p], workers, dirs.len(), p, hostfile, extra)).collect();
    let zero_args: Vec<&str> = extra.iter().chain(first).copied().collect();
    children.push(start_local(&dirs[0], workers, dirs.len(), 0, hostfile, &zero_args));
    children.reverse();
    children.into_iter().map(|child| finish(child, Duration::from_secs(120))).collect()
}

/// SPEC §5: each process reads only the partition files on its own disk, and the cluster writes
/// exactly what one process writes over the union of the directories: every partition keeps
/// its cluster-wide index (the dead letters name them), whichever process and worker reads it.
#[test]
fn processes_reading_their_own_directories_write_what_one_process_writes_over_the_union() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path(), 60_000, 8);
    let expected = single_process_outputs(&logs, dir.path());
    assert!(expected["dead_letter.csv"].contains("part-00006.csv"), "the dead letters should name partitions of process 1");
    let hostfile = write_local_hostfile(dir.path(), 2).unwrap();
    let halves: [&[u32]; 2] = [&[0, 1, 2, 3], &[4, 5, 6, 7]];
    let interleaved: [&[u32]; 2] = [&[0, 2, 3, 7], &[1, 4, 5, 6]];
    for (case, split, workers) in [("halves", halves, 1), ("halves", halves, 2), ("interleaved", interleaved, 2)] {
        let case_dir = dir.path().join(format!("{case}-{workers}"));
        let dirs = split_logs(Path::new(&logs), &case_dir, &split);
        let out = case_dir.join("out");
        let outputs = local_cluster(&dirs, workers, &hostfile, &SETTINGS, &["--out", out.to_str().unwrap()]);
        for (process, output) in outputs.iter().enumerate() {
            assert!(output.status.success(), "{case}, process {process}: {}", String::from_utf8_lossy(&output.stderr));
        }
        assert_same_outputs(&expected, &read_outputs(&out), &format!("2 processes × {workers} workers on their own {case} vs 1 × 1 on all"));
    }
}

/// A partition name on two processes' disks would be counted twice (or, were the directories
/// taken for one shared one, each process's other files dropped): refused, naming the
/// partitions and the processes. Without --local-logs, directories that differ are refused.
#[test]
fn directories_that_share_partitions_or_disagree_on_the_mode_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path(), 2_000, 8);
    let hostfile = write_local_hostfile(dir.path(), 2).unwrap();
    let out = dir.path().join("out");
    let out = ["--out", out.to_str().unwrap()];
    let run_both = |dirs: &[std::path::PathBuf], flags: [&[&str]; 2]| -> Vec<String> {
        let mut second = clickagg();
        second.args(["run", "--logs", dirs[1].to_str().unwrap(), "-n", "2", "-p", "1", "--hostfile", hostfile.to_str().unwrap()]);
        let second = second.args(flags[1]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut first = clickagg();
        first.args(["run", "--logs", dirs[0].to_str().unwrap(), "-n", "2", "-p", "0", "--hostfile", hostfile.to_str().unwrap()]);
        let first = first.args(flags[0]).args(out).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        [first, second]
            .into_iter()
            .map(|child| {
                let output = finish(child, Duration::from_secs(60));
                let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
                assert!(!output.status.success(), "should be refused: {stderr}");
                assert!(!stderr.contains("panicked"), "{stderr}");
                stderr
            })
            .collect()
    };
    let local: &[&str] = &["--local-logs"];

    let overlapping = split_logs(Path::new(&logs), &dir.path().join("overlapping"), &[&[0, 1, 2, 3, 4], &[3, 4, 5, 6, 7]]);
    for stderr in run_both(&overlapping, [local, local]) {
        assert!(stderr.contains("names must be unique") || stderr.contains("name must be unique"), "{stderr}");
        for duplicate in ["part-00003.csv is on processes 0 and 1", "part-00004.csv is on processes 0 and 1"] {
            assert!(stderr.contains(duplicate), "{stderr}");
        }
        assert!(!stderr.contains("part-00002.csv is on"), "{stderr}");
    }

    let disjoint = split_logs(Path::new(&logs), &dir.path().join("disjoint"), &[&[0, 1, 2, 3], &[4, 5, 6, 7]]);
    for stderr in run_both(&disjoint, [&[], &[]]) {
        assert!(stderr.contains("same log directory") && stderr.contains("process 1 lacks part-00000.csv"), "{stderr}");
        assert!(stderr.contains("start every process with --local-logs"), "{stderr}");
    }
    let stderr = run_both(&disjoint, [local, &[]]).join("\n");
    assert!(stderr.contains("every process must be given --local-logs, or none"), "{stderr}");
}

/// Following with --local-logs: process 0's store holds every process's partitions (their
/// offsets and checkpoints, the heads hashed by the process that has the file), a partition that
/// appears later on process 1's disk is read there and named in the store, and resuming the
/// store is refused to the cluster (process 0 has not the other files) and done by one process
/// over the union, after which the store equals a clean replay.
#[test]
fn a_following_local_logs_cluster_commits_every_partition_and_is_resumed_by_one_process() {
    use common::follow::{self, clean_replay, export, run_ok, s, sigterm, wait_until_caught_up};
    let dir = tempfile::tempdir().unwrap();
    let union = dir.path().join("union");
    follow::generate(&union, 20_000, 5, 12, 5);
    // The partition that appears later: rows after every other row (so that a follower, whose
    // watermark has moved on, admits them as a replay does), and one that is not a click.
    let last_ts = (0..5)
        .flat_map(|p| {
            let bytes = std::fs::read(union.join(format!("part-{p:05}.csv"))).unwrap();
            String::from_utf8_lossy(&bytes).lines().map(str::to_string).collect::<Vec<_>>()
        })
        .filter_map(|line| line.split(',').nth(1)?.parse::<u64>().ok())
        .filter(|&ts| ts < 1_900_000_000_000)
        .max()
        .unwrap();
    let mut late = String::from("event_id,ts,ad_id,campaign_id,user_id,ip,country\n");
    for i in 0..3 {
        late.push_str(&format!("late-{i},{},4242,7,{i},10.9.9.{i},US\n", last_ts + 120_000 + i));
    }
    late.push_str("not a click\n");
    std::fs::write(union.join("part-00005.csv"), &late).unwrap();
    let dirs = split_logs(&union, dir.path(), &[&[0, 1, 2], &[3, 4]]);
    let store = dir.path().join("answers.db");
    let hostfile = write_local_hostfile(dir.path(), 2).unwrap();
    let mut extra = vec!["--follow", "--idle-timeout", "60s"];
    extra.extend(follow::SETTINGS);
    let second = start_local(&dirs[1], 2, 2, 1, &hostfile, &extra);
    let first = start_local(&dirs[0], 2, 2, 0, &hostfile, &[extra.as_slice(), &["--store", s(&store)]].concat());
    std::thread::sleep(Duration::from_millis(2000));
    // Written under another name and renamed, as a log shipper would: it appears whole.
    let staged = dirs[1].join("incoming.tmp");
    std::fs::write(&staged, &late).unwrap();
    std::fs::rename(&staged, dirs[1].join("part-00005.csv")).unwrap();
    wait_until_caught_up(&union, &store, Duration::from_secs(90));
    sigterm(&first);
    let first = finish(first, Duration::from_secs(30));
    sigterm(&second);
    let second = finish(second, Duration::from_secs(30));
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("new partition part-00005.csv"), "process 1 should read its new partition: {stderr}");

    let outputs = local_cluster(&dirs, 2, &hostfile, &extra, &["--store", s(&store)]);
    let stderr = String::from_utf8_lossy(&outputs[0].stderr);
    assert!(!outputs[0].status.success() && stderr.contains("gather every process's partition files"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let mut recover = vec!["run", "--logs", s(&union), "--store", s(&store), "-w", "2"];
    recover.extend(follow::SETTINGS);
    run_ok(&recover);
    assert_same_outputs(&clean_replay(&union), &export(&store), "a local-logs follower's store, resumed over the union, vs a clean replay");
}

/// The processes whose command line mentions `needle` (from /proc).
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn sigterm_to_cluster_local_stops_every_process_of_its_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path(), 5_000, 4);
    let store = dir.path().join("answers.db");
    let parent = clickagg()
        .args(["cluster-local", "-n", "2", "-w", "1", "--", "--logs", &logs, "--store", store.to_str().unwrap(), "--follow"])
        .args(SETTINGS)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Its processes name the cluster's hostfile, in a directory named after the parent.
    let marker = format!("clickagg-cluster-{}", parent.id());
    let started = Instant::now();
    while processes_mentioning(&marker).len() < 2 {
        assert!(started.elapsed() < Duration::from_secs(20), "the cluster's processes did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: a signal to a child this test started and has not reaped.
    unsafe {
        libc::kill(parent.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = finish(parent, Duration::from_secs(20)).status;
    assert!(status.success(), "the cluster should stop cleanly on SIGTERM: {status}");
    assert_eq!(processes_mentioning(&marker), Vec::<u32>::new(), "processes of the cluster outlived cluster-local");
}
