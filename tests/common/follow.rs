//! Helpers for the tests that run the binary against logs that grow: running it, generating
//! logs, and a writer that appends to partitions as ad servers do.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clickagg::generate::Rng;

/// The settings every run of a follow test shares: a store is only resumed under the same. The
/// fraud rule fills `fraud_minute`.
pub const SETTINGS: [&str; 8] = ["--tick", "1s", "--windows", "1m,5m", "--allowed-lateness", "1m", "--max-clicks-per-minute", "40"];

pub fn clickagg() -> Command {
    Command::new(env!("CARGO_BIN_EXE_clickagg"))
}

pub fn run_ok(args: &[&str]) -> String {
    let output = clickagg().args(args).output().expect("the binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "clickagg {args:?} failed: {stderr}");
    stderr
}

pub fn run_err(args: &[&str]) -> String {
    let output = clickagg().args(args).output().expect("the binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "clickagg {args:?} should have failed");
    assert!(!stderr.contains("panicked"), "clickagg {args:?} panicked: {stderr}");
    stderr
}

pub fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Generated logs with duplicates, late, too-late and bad rows, over `minutes` of event time.
pub fn generate(dir: &Path, events: u64, partitions: u32, minutes: u32, seed: u64) {
    run_ok(&[
        "generate", "--out", s(dir), "--events", &events.to_string(), "--partitions", &partitions.to_string(),
        "--minutes", &minutes.to_string(), "--seed", &seed.to_string(),
    ]);
}

pub fn log_bytes(logs: &Path) -> u64 {
    std::fs::read_dir(logs).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

/// Appends the lines of generated partitions to the followed directory in random chunks, as ad
/// servers do, sometimes stopping in the middle of a line and finishing it on the next write.
pub struct Writer {
    done: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl Writer {
    /// Creates every partition with its header and first lines, then appends the rest from a
    /// thread, about `rounds` writes to each partition, `pause` apart.
    pub fn start(source: &Path, logs: &Path, seed: u64, rounds: u64, pause: Duration) -> Writer {
        std::fs::create_dir_all(logs).unwrap();
        let mut partitions: Vec<(PathBuf, Vec<u8>, usize)> = Vec::new();
        let mut names: Vec<_> = std::fs::read_dir(source).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        for path in names {
            let bytes = std::fs::read(&path).unwrap();
            let target = logs.join(path.file_name().unwrap());
            // The header and the first line, so that every partition holds the watermark back
            // from the start as it would in a clean replay.
            let first = nth_line_end(&bytes, 0, 2);
            std::fs::write(&target, &bytes[..first]).unwrap();
            partitions.push((target, bytes, first));
        }
        let done = Arc::new(AtomicBool::new(false));
        let finished = Arc::clone(&done);
        let handle = std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            let total: usize = partitions.iter().map(|p| p.1.len()).sum();
            let per_round = (total as u64 / rounds / partitions.len() as u64).max(1) as usize;
            while partitions.iter().any(|(_, bytes, at)| *at < bytes.len()) {
                for (target, bytes, at) in &mut partitions {
                    if *at >= bytes.len() {
                        continue;
                    }
                    let want = (*at + per_round / 2 + rng.below(per_round as u64 + 1) as usize).min(bytes.len());
                    // Mostly whole lines; now and then a line cut in two.
                    let end = if rng.below(5) == 0 { want } else { nth_line_end(bytes, want, 1).min(bytes.len()) };
                    let mut file = std::fs::OpenOptions::new().append(true).open(&*target).unwrap();
                    file.write_all(&bytes[*at..end]).unwrap();
                    *at = end;
                }
                std::thread::sleep(pause);
            }
            finished.store(true, Ordering::SeqCst);
        });
        Writer { done, handle }
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    pub fn join(self) {
        self.handle.join().expect("the writer thread");
    }
}

/// The offset just past the `lines`-th newline at or after `from` (or the end).
pub fn nth_line_end(bytes: &[u8], from: usize, lines: usize) -> usize {
    let mut at = from;
    for _ in 0..lines {
        match bytes[at.min(bytes.len())..].iter().position(|&b| b == b'\n') {
            Some(i) => at += i + 1,
            None => return bytes.len(),
        }
    }
    at
}

pub fn sigterm(child: &Child) {
    signal(child, libc::SIGTERM);
}

/// Sends `signal` to `child`.
pub fn signal(child: &Child, signal: libc::c_int) {
    // SAFETY: sending a signal to a child this test started and has not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// The committed frontier, and the bytes of the logs the store has read.
pub fn store_position(store: &Path) -> Option<(u64, u64)> {
    let conn = rusqlite::Connection::open_with_flags(store, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    let frontier: String = conn.query_row("SELECT value FROM meta WHERE key = 'frontier'", [], |r| r.get(0)).ok()?;
    let offsets: i64 = conn.query_row("SELECT coalesce(sum(offset), 0) FROM partitions", [], |r| r.get(0)).ok()?;
    Some((frontier.parse().ok()?, offsets as u64))
}

/// Waits until the store has committed every byte of the logs.
pub fn wait_until_caught_up(logs: &Path, store: &Path, within: Duration) {
    let started = Instant::now();
    let total = log_bytes(logs);
    loop {
        if store_position(store).is_some_and(|(_, read)| read == total) {
            return;
        }
        assert!(started.elapsed() < within, "the follower did not commit the logs' {total} bytes within {within:?}: {:?}", store_position(store));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a clean replay of `logs` writes, with the shared settings.
pub fn clean_replay(logs: &Path) -> BTreeMap<String, String> {
    let out = tempfile::tempdir().unwrap();
    let mut args = vec!["run", "--logs", s(logs), "--out", s(out.path()), "-w", "2"];
    args.extend(SETTINGS);
    run_ok(&args);
    super::read_outputs(out.path())
}

/// The files `clickagg export` writes from `store`.
pub fn export(store: &Path) -> BTreeMap<String, String> {
    let out = tempfile::tempdir().unwrap();
    run_ok(&["export", "--store", s(store), "--out", s(out.path())]);
    super::read_outputs(out.path())
}

/// A follower of `logs` committing to `store`, with the shared settings and `extra` flags.
pub fn start_follower(logs: &Path, store: &Path, extra: &[&str]) -> Child {
    let mut args = vec!["run", "--logs", s(logs), "--store", s(store), "--follow", "-w", "2", "--idle-timeout", "60s"];
    args.extend(SETTINGS);
    args.extend(extra);
    clickagg().args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("the follower starts")
}

/// Starts a follower with `start`, lets it run for `pause_ms` plus up to 900 ms, and kills it
/// with SIGKILL; again and again until it was killed `at_least` times and `writer` is done.
/// `after_each` runs after each kill. A follower that exits on its own fails the test. Returns
/// how many times it was killed.
pub fn kill_at_random_moments(
    writer_done: impl Fn() -> bool,
    at_least: u32,
    seed: u64,
    pause_ms: u64,
    mut start: impl FnMut() -> Child,
    mut after_each: impl FnMut(),
) -> u32 {
    let mut rng = Rng::new(seed);
    let mut kills = 0;
    while kills < at_least || !writer_done() {
        let mut follower = start();
        std::thread::sleep(Duration::from_millis(pause_ms + rng.below(900)));
        if let Ok(Some(status)) = follower.try_wait() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(follower.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            panic!("the follower exited on its own ({status}): {stderr}");
        }
        follower.kill().unwrap();
        follower.wait().unwrap();
        kills += 1;
        after_each();
    }
    kills
}

/// Waits until `follower` has committed every byte of `logs` to `store`, then stops it with
/// SIGTERM, which must stop it cleanly. The store may hold every byte already, so the follower
/// is given time to start first.
pub fn stop_when_caught_up(mut follower: Child, logs: &Path, store: &Path) {
    std::thread::sleep(Duration::from_millis(700));
    wait_until_caught_up(logs, store, Duration::from_secs(60));
    sigterm(&follower);
    let status = follower.wait().unwrap();
    assert!(status.success(), "SIGTERM should stop the follower cleanly: {status}");
}
