//! `run --kafka` (issue #29) against a real broker on loopback: nisshi, started by
//! `scripts/kafka.sh` (which builds it when missing). Logs loaded with `clickagg produce` and
//! replayed from the topic give what a replay of the files gives, with 1, 2 and 4 workers and
//! with 2 processes; a follower killed with SIGKILL again and again while messages arrive ends
//! equal to a clean replay; and what cannot be read (no broker, no topic, deleted offsets) is an
//! error that says so.
//!
//! Every file is compared byte for byte but `dead_letter.csv`, whose rows name a partition and a
//! position: `part-0000i.csv` and a byte offset for a file, `TOPIC-i` and a Kafka offset for a
//! topic. Those are mapped (the byte offset of the line that is message `n` of a partition) and
//! the rows then compared exactly.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::assert_same_outputs;
use common::follow::{clean_replay, clickagg, export, generate, kill_at_random_moments, run_err, run_ok, s, signal, sigterm, SETTINGS};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::TopicPartitionList;

/// A broker of the test's own, stopped when dropped.
struct Broker {
    dir: tempfile::TempDir,
    address: String,
}

impl Broker {
    fn start() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let output = Command::new("bash")
            .args(["scripts/kafka.sh", "start", s(dir.path()), &port.to_string()])
            .output()
            .expect("bash runs");
        assert!(output.status.success(), "the broker did not start: {}", String::from_utf8_lossy(&output.stderr));
        let address = String::from_utf8(output.stdout).unwrap().trim().to_string();
        Broker { dir, address }
    }

    /// Deletes the messages of `topic` partition `partition` before `offset`, as retention does.
    fn delete_before(&self, topic: &str, partition: i32, offset: rdkafka::Offset) {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", &self.address).create().unwrap();
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(topic, partition, offset).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let result = runtime.block_on(admin.delete_records(&list, &AdminOptions::new())).unwrap();
        for element in result.elements() {
            assert!(element.error().is_ok(), "delete_records: {:?}", element.error());
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new("bash").args(["scripts/kafka.sh", "stop", s(self.dir.path())]).output();
    }
}

fn produce(broker: &Broker, topic: &str, logs: &Path) -> String {
    run_ok(&["produce", "--brokers", &broker.address, "--topic", topic, "--logs", s(logs)])
}

/// For each partition file of `logs`, the byte offset at which each line after the header
/// starts: line `n`'s offset is message `n`'s position in the topic.
fn line_starts(logs: &Path) -> BTreeMap<String, Vec<u64>> {
    let mut starts = BTreeMap::new();
    for entry in std::fs::read_dir(logs).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        let mut offsets = Vec::new();
        let mut at = 0;
        for (i, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
            if i > 0 && line.ends_with(b"\n") {
                offsets.push(at as u64);
            }
            at += line.len();
        }
        starts.insert(name, offsets);
    }
    starts
}

/// `dead_letter.csv` of a file replay with each row's partition and byte offset written as the
/// topic's partition and message offset, rows in the topic's order (partition name, offset).
fn as_topic_dead_letters(text: &str, logs: &Path, topic: &str) -> String {
    let starts = line_starts(logs);
    let files: Vec<&String> = starts.keys().collect();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let mut rows: Vec<(String, u64, String)> = lines
        .map(|line| {
            let mut fields = line.splitn(3, ',');
            let (file, offset, rest) = (fields.next().unwrap(), fields.next().unwrap(), fields.next().unwrap());
            let index = files.iter().position(|f| *f == file).unwrap();
            let offset: u64 = offset.parse().unwrap();
            let message = starts[file].binary_search(&offset).unwrap_or_else(|_| panic!("{file}: no line starts at {offset}"));
            (format!("{topic}-{index}"), message as u64, rest.to_string())
        })
        .collect();
    rows.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut out = format!("{header}\n");
    for (partition, offset, rest) in rows {
        out.push_str(&format!("{partition},{offset},{rest}\n"));
    }
    out
}

/// A file replay's outputs as a replay of the same lines from `topic` writes them.
fn as_topic_outputs(mut files: BTreeMap<String, String>, logs: &Path, topic: &str) -> BTreeMap<String, String> {
    let dead = files.get("dead_letter.csv").cloned().unwrap();
    files.insert("dead_letter.csv".into(), as_topic_dead_letters(&dead, logs, topic));
    files
}

fn run_kafka(broker: &Broker, topic: &str, out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["run", "--kafka", &broker.address, "--topic", topic, "--out", s(out)];
    args.extend(extra);
    args.extend(SETTINGS);
    run_ok(&args)
}

#[test]
fn a_replay_of_produced_logs_writes_what_the_file_replay_writes() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&logs, 40_000, 4, 20, 11);
    let said = produce(&broker, "clicks", &logs);
    assert!(said.contains("produced") && said.contains("(created)"), "{said}");
    let expected = as_topic_outputs(clean_replay(&logs), &logs, "clicks");
    assert!(expected["dead_letter.csv"].lines().count() > 10, "the logs should have dead letters to compare");
    for workers in ["1", "2", "4"] {
        let out = dir.path().join(format!("out-{workers}"));
        run_kafka(&broker, "clicks", &out, &["-w", workers]);
        assert_same_outputs(&expected, &common::read_outputs(&out), &format!("kafka replay, {workers} workers"));
    }
    // Two processes, each reading its share of the topic's partitions.
    let out = dir.path().join("out-cluster");
    let mut args = vec!["cluster-local", "-n", "2", "-w", "1", "--", "--kafka", &broker.address, "--topic", "clicks", "--out", s(&out)];
    args.extend(SETTINGS);
    run_ok(&args);
    assert_same_outputs(&expected, &common::read_outputs(&out), "kafka replay, 2 processes");

    // Served: the status names the topic's partitions, each read to its end, with its lag in
    // messages (a topic partition has no file size); /metrics has the same.
    let out = dir.path().join("out-served");
    let mut args = vec!["--kafka", &broker.address, "--topic", "clicks", "--out", s(&out), "-w", "2"];
    args.extend(SETTINGS);
    let served = common::server::serve_until_complete(&args, &[]);
    let address = served.address.clone();
    let status = common::server::get_json(&address, "/v1/status");
    assert_eq!(status["complete"], true, "{status}");
    let messages = line_starts(&logs);
    let partitions = status["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 4, "{status}");
    for (p, (_, lines)) in partitions.iter().zip(&messages) {
        let name = p["partition"].as_str().unwrap();
        assert!(name.starts_with("clicks-"), "{p}");
        assert_eq!(p["end_offset"], lines.len() as u64, "{p}");
        assert_eq!(p["offset"], lines.len() as u64, "{p}");
        assert_eq!(p["lag_messages"], 0, "{p}");
        assert!(p["size"].is_null() && p["lag_bytes"].is_null(), "{p}");
    }
    let (code, metrics) = common::server::get(&address, "/metrics", &[]);
    assert_eq!(code, 200);
    assert!(metrics.contains("lag_messages{partition=\"clicks-0\"} 0"), "{metrics}");
    drop(served);
    assert_same_outputs(&expected, &common::read_outputs(&out), "served kafka replay");
}

#[test]
fn messages_in_another_column_order_read_with_columns_and_bad_ones_are_dead_letters() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let rows = "ts,event_id,country,ip,user_id,campaign_id,ad_id\n\
                1767225600000,e1,US,10.0.0.1,1,7,100\n\
                not a click\n\
                1767225601000,e2,FR,10.0.0.2,2,7,100\n\
                1767225602000,e3,DE,10.0.0.3,3,8,200\n";
    std::fs::write(logs.join("part-00000.csv"), rows).unwrap();
    let said = produce(&broker, "reordered", &logs);
    assert!(said.contains("--columns ts,event_id,country,ip,user_id,campaign_id,ad_id"), "produce names the columns: {said}");
    let out = dir.path().join("out");
    run_ok(&[
        "run", "--kafka", &broker.address, "--topic", "reordered", "--columns", "ts,event_id,country,ip,user_id,campaign_id,ad_id",
        "--out", s(&out),
    ]);
    let ad_minute = std::fs::read_to_string(out.join("ad_minute.csv")).unwrap();
    assert_eq!(ad_minute, "minute,ad_id,clicks\n29453760,100,2\n29453760,200,1\n");
    let dead = std::fs::read_to_string(out.join("dead_letter.csv")).unwrap();
    assert_eq!(dead, "partition,offset,reason,line\nreordered-0,1,missing_field,\"not a click\"\n");
    // Read in SPEC's order, the same messages are every one a dead letter, and the run says so.
    let out = dir.path().join("out-spec-order");
    run_ok(&["run", "--kafka", &broker.address, "--topic", "reordered", "--out", s(&out)]);
    let dead = std::fs::read_to_string(out.join("dead_letter.csv")).unwrap();
    assert_eq!(dead.lines().count(), 5, "{dead}");
}

#[test]
fn what_cannot_be_read_is_an_error_at_the_start() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // No broker listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nowhere = format!("127.0.0.1:{closed}");
    let output = clickagg()
        .args(["run", "--kafka", &nowhere, "--topic", "clicks", "--out", s(&out)])
        .env("CLICKAGG_KAFKA_TIMEOUT_MS", "2000")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("cannot reach the Kafka brokers"), "{stderr}");
    // A topic that does not exist.
    let stderr = run_err(&["run", "--kafka", &broker.address, "--topic", "missing", "--out", s(&out)]);
    assert!(stderr.contains("missing"), "{stderr}");
    // Flags that do not go together.
    let stderr = run_err(&["run", "--kafka", &broker.address, "--out", s(&out)]);
    assert!(stderr.contains("--topic"), "{stderr}");
    let stderr = run_err(&["run", "--kafka", &broker.address, "--topic", "t", "--logs", s(dir.path()), "--out", s(&out)]);
    assert!(stderr.contains("cannot be used with"), "{stderr}");
    // Messages deleted before the run read them (retention): an error naming them, no output.
    let logs = dir.path().join("logs");
    generate(&logs, 2_000, 2, 3, 5);
    produce(&broker, "trimmed", &logs);
    broker.delete_before("trimmed", 1, rdkafka::Offset::Offset(100));
    let stderr = run_err(&["run", "--kafka", &broker.address, "--topic", "trimmed", "--out", s(&out)]);
    assert!(stderr.contains("offsets 0 to 99 of trimmed-1 were deleted"), "{stderr}");
}

/// The messages of `logs` in `chunks` slices per partition, as directories `produce` loads one
/// after another: each holds the header and the next slice of each partition's lines.
fn chunked(logs: &Path, dir: &Path, chunks: usize) -> Vec<PathBuf> {
    let slices: Vec<PathBuf> = (0..chunks).map(|c| dir.join(format!("chunk-{c:03}"))).collect();
    for slice in &slices {
        std::fs::create_dir_all(slice).unwrap();
    }
    for (name, _) in line_starts(logs) {
        let bytes = std::fs::read(logs.join(&name)).unwrap();
        let lines: Vec<&[u8]> = bytes.split_inclusive(|&b| b == b'\n').collect();
        let (header, rows) = lines.split_first().unwrap();
        let per = rows.len().div_ceil(chunks);
        for (c, slice) in slices.iter().enumerate() {
            let mut content = header.to_vec();
            for row in rows.iter().skip(c * per).take(per) {
                content.extend_from_slice(row);
            }
            std::fs::write(slice.join(&name), content).unwrap();
        }
    }
    slices
}

/// The messages the store has committed reading: the sum of its partitions' offsets.
fn committed_messages(store: &Path) -> u64 {
    common::follow::store_position(store).map_or(0, |(_, offsets)| offsets)
}

fn start_follower(broker: &Broker, topic: &str, store: &Path) -> Child {
    let mut args = vec![
        "run", "--kafka", &broker.address, "--topic", topic, "--store", s(store), "--follow", "-w", "2", "--idle-timeout", "60s",
    ];
    args.extend(SETTINGS);
    clickagg().args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("the follower starts")
}

#[test]
fn a_follower_killed_again_and_again_while_messages_arrive_ends_equal_to_a_clean_replay() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&logs, 30_000, 3, 15, 21);
    let chunks = chunked(&logs, dir.path(), 12);
    let total: u64 = line_starts(&logs).values().map(|v| v.len() as u64).sum();
    // The topic exists (empty partitions would not be created by the first chunk otherwise).
    produce(&broker, "live", &chunks[0]);
    let producer = {
        let address = broker.address.clone();
        let chunks = chunks[1..].to_vec();
        std::thread::spawn(move || {
            for chunk in chunks {
                let output = clickagg().args(["produce", "--brokers", &address, "--topic", "live", "--logs", s(&chunk)]).output().unwrap();
                assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    let store = dir.path().join("store.db");
    let kills = kill_at_random_moments(|| producer.is_finished(), 5, 3, 600, || start_follower(&broker, "live", &store), || {});
    producer.join().unwrap();
    // The last follower reads to the end and stops cleanly.
    let mut follower = start_follower(&broker, "live", &store);
    std::thread::sleep(Duration::from_millis(700));
    let started = Instant::now();
    while committed_messages(&store) < total {
        assert!(started.elapsed() < Duration::from_secs(90), "the follower did not commit {total} messages: {}", committed_messages(&store));
        assert!(follower.try_wait().unwrap().is_none(), "the follower exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    sigterm(&follower);
    let output = follower.wait_with_output().unwrap();
    assert!(output.status.success(), "SIGTERM stops the follower cleanly: {}: {}", output.status, String::from_utf8_lossy(&output.stderr));
    let unfinished = dir.path().join("unfinished.db");
    std::fs::copy(&store, &unfinished).unwrap();
    let wal = |path: &Path| PathBuf::from(format!("{}-wal", path.display()));
    if wal(&store).exists() {
        std::fs::copy(wal(&store), wal(&unfinished)).unwrap();
    }
    // A replay resumes the store and ends the input (the last minutes become final), as the
    // file tests finish theirs.
    let mut args = vec!["run", "--kafka", &broker.address, "--topic", "live", "--store", s(&store), "-w", "2"];
    args.extend(SETTINGS);
    run_ok(&args);
    let expected = as_topic_outputs(clean_replay(&logs), &logs, "live");
    assert_same_outputs(&expected, &export(&store), &format!("kafka follower killed {kills} times"));

    // Retention deletes what the store would have to read again: resuming is an error naming it.
    for partition in 0..3 {
        broker.delete_before("live", partition, rdkafka::Offset::End);
    }
    let mut args = vec!["run", "--kafka", &broker.address, "--topic", "live", "--store", s(&unfinished), "--follow"];
    args.extend(SETTINGS);
    let stderr = run_err(&args);
    assert!(stderr.contains("were deleted from the topic"), "{stderr}");
}

/// The lines `child` writes to its stderr (piped), read on a thread of their own.
fn stderr_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (lines, said) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(stderr).map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    said
}

/// Waits until the lines `said` hold every one of `wanted`, failing after 30 s with no new line.
fn wait_for_saying(said: &std::sync::mpsc::Receiver<String>, wanted: &[&str]) {
    let mut seen = String::new();
    while !wanted.iter().all(|w| seen.contains(w)) {
        match said.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => seen.push_str(&(line + "\n")),
            Err(_) => panic!("expected {wanted:?} within 30 s; it said: {seen}"),
        }
    }
}

#[test]
fn offsets_deleted_while_a_follower_reads_are_an_error_naming_them() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&logs, 3_000, 1, 3, 9);
    let chunks = chunked(&logs, dir.path(), 3);
    let count = |chunk: &Path| line_starts(chunk).values().map(|v| v.len() as u64).sum::<u64>();
    produce(&broker, "gap", &chunks[0]);
    let store = dir.path().join("store.db");
    let mut follower = start_follower(&broker, "gap", &store);
    let started = Instant::now();
    while committed_messages(&store) < count(&chunks[0]) {
        assert!(started.elapsed() < Duration::from_secs(60), "the follower did not read the first messages");
        std::thread::sleep(Duration::from_millis(100));
    }
    // While the follower is stopped, more messages come and retention deletes them: when it
    // goes on, the offset it reads from is gone.
    signal(&follower, libc::SIGSTOP);
    produce(&broker, "gap", &chunks[1]);
    let deleted_to = count(&chunks[0]) + count(&chunks[1]);
    broker.delete_before("gap", 0, rdkafka::Offset::Offset(deleted_to as i64));
    produce(&broker, "gap", &chunks[2]);
    signal(&follower, libc::SIGCONT);
    let said = stderr_lines(&mut follower);
    wait_for_saying(&said, &[&format!("offsets {} to {} of gap-0 were deleted", count(&chunks[0]), deleted_to - 1)]);
    // Nothing after the gap was counted: the store stays at the offset before it.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(committed_messages(&store), count(&chunks[0]));
    // With its broker gone too, SIGTERM still stops it at its last commit.
    drop(broker);
    sigterm(&follower);
    let started = Instant::now();
    while follower.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(15) {
            follower.kill().unwrap();
            panic!("SIGTERM did not stop the follower within 15 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(follower.wait().unwrap().success());
}

/// The committed offset of each partition the store has read, by name.
fn committed_offsets(store: &Path) -> BTreeMap<String, u64> {
    let Ok(conn) = rusqlite::Connection::open_with_flags(store, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return BTreeMap::new();
    };
    let Ok(mut statement) = conn.prepare("SELECT name, offset FROM partitions") else { return BTreeMap::new() };
    statement
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

/// The test broker cannot add partitions to a topic, so the topic is deleted and made again
/// with one more (the old partitions hold the same messages again): the follower finds the new
/// partition and reads it from its first offset.
#[test]
fn a_follower_reads_the_partitions_a_topic_gains() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&logs, 3_000, 3, 3, 13);
    let two = dir.path().join("two");
    std::fs::create_dir_all(&two).unwrap();
    for name in ["part-00000.csv", "part-00001.csv"] {
        std::fs::copy(logs.join(name), two.join(name)).unwrap();
    }
    produce(&broker, "grow", &two);
    let store = dir.path().join("store.db");
    let mut follower = start_follower(&broker, "grow", &store);
    let said = stderr_lines(&mut follower);
    let messages = line_starts(&logs);
    let count = |name: &str| messages[name].len() as u64;
    let started = Instant::now();
    while committed_offsets(&store).get("grow-1") != Some(&count("part-00001.csv")) {
        assert!(started.elapsed() < Duration::from_secs(60), "the follower did not read the first partitions");
        std::thread::sleep(Duration::from_millis(100));
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", &broker.address).create().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for result in runtime.block_on(admin.delete_topics(&["grow"], &AdminOptions::new())).unwrap() {
        result.unwrap();
    }
    produce(&broker, "grow", &logs);
    wait_for_saying(&said, &["has 3 partitions now, 2 before", "new partition grow-2"]);
    let started = Instant::now();
    while committed_offsets(&store).get("grow-2") != Some(&count("part-00002.csv")) {
        assert!(started.elapsed() < Duration::from_secs(60), "the new partition was not read: {:?}", committed_offsets(&store));
        std::thread::sleep(Duration::from_millis(100));
    }
    // The old partitions, made again with the same messages, are not read twice.
    assert!(committed_offsets(&store)["grow-0"] == count("part-00000.csv"), "{:?}", committed_offsets(&store));
    follower.kill().unwrap();
    follower.wait().unwrap();
}
