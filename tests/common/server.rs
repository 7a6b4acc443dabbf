//! A served replay for the tests that talk to the server: start it, wait for it, GET from it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A `clickagg run --serve` process, killed when dropped.
pub struct Served {
    child: Child,
    pub address: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Reads a `clickagg run --serve` process's stderr (piped) up to its `serving on` line and
/// returns the address; the rest of stderr is drained on a thread of its own, so that the
/// process never blocks on a full pipe.
pub fn serving_address(child: &mut Child) -> String {
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let mut line = String::new();
    let address = loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "clickagg ended before serving");
        if let Some(rest) = line.trim().strip_prefix("clickagg: serving on http://") {
            break rest.trim_end_matches('/').to_string();
        }
    };
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    address
}

/// Starts `clickagg feed --logs logs --partitions N args…` and waits until it has created the
/// partition files (a follower lists the partitions when it starts).
pub fn start_feed(logs: &Path, partitions: usize, args: &[&str]) -> Child {
    let feed = Command::new(env!("CARGO_BIN_EXE_clickagg"))
        .args(["feed", "--logs", logs.to_str().unwrap(), "--partitions", &partitions.to_string()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::fs::read_dir(logs).map_or(0, |d| d.count()) < partitions {
        assert!(started.elapsed() < Duration::from_secs(10), "feed created no partitions");
        std::thread::sleep(Duration::from_millis(20));
    }
    feed
}

/// Starts `clickagg run --follow --serve` over fixed logs with `args` and waits until it has
/// caught up: every partition read to its end, clicks counted, and the watermark and counts
/// the same a second later. The idle timeout is long, so that they then stay put; its answers
/// never become complete, so a shell's `watch` runs until it is stopped.
pub fn follow_until_caught_up(logs: &Path, store: &Path, args: &[&str]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_clickagg"))
        .args(["run", "--follow", "--logs", logs.to_str().unwrap(), "--store", store.to_str().unwrap(), "--serve", "127.0.0.1:0"])
        .args(["--idle-timeout", "10m"])
        .args(args)
        .env_remove("CLICKAGG_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let address = serving_address(&mut child);
    let follower = Served { child, address };
    let started = Instant::now();
    let mut last = None;
    loop {
        let status = get_json(&follower.address, "/v1/status");
        let read = status["partitions"].as_array().is_some_and(|p| !p.is_empty() && p.iter().all(|p| p["lag_bytes"] == 0));
        let now = (status["watermark"].clone(), status["clicks"].clone());
        if read && status["clicks"].as_u64() > Some(0) && last.as_ref() == Some(&now) {
            break;
        }
        last = Some(now);
        assert!(started.elapsed() < Duration::from_secs(60), "not caught up after a minute: {status}");
        std::thread::sleep(Duration::from_secs(1));
    }
    follower
}

/// Starts `clickagg run --serve 127.0.0.1:0 args…` and waits until the replay is complete.
pub fn serve_replay(logs: &Path, out: &Path, args: &[&str]) -> Served {
    serve_replay_env(logs, out, args, &[])
}

/// [`serve_replay`] with environment variables set (an empty value removes the variable);
/// `CLICKAGG_TOKEN` is removed unless given.
pub fn serve_replay_env(logs: &Path, out: &Path, args: &[&str], env: &[(&str, &str)]) -> Served {
    let mut all = vec!["--logs", logs.to_str().unwrap(), "--out", out.to_str().unwrap()];
    all.extend(args);
    serve_until_complete(&all, env)
}

/// Starts `clickagg run --serve 127.0.0.1:0 args…` (its input and output in `args`), with
/// environment variables set as [`serve_replay_env`] does, and waits until the replay is
/// complete (its output files written).
pub fn serve_until_complete(args: &[&str], env: &[(&str, &str)]) -> Served {
    let mut command = Command::new(env!("CARGO_BIN_EXE_clickagg"));
    command.env_remove("CLICKAGG_TOKEN");
    for (name, value) in env {
        match value.is_empty() {
            true => command.env_remove(name),
            false => command.env(name, value),
        };
    }
    let mut child = command
        .args(["run", "--serve", "127.0.0.1:0"])
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut address = None;
    let mut line = String::new();
    loop {
        line.clear();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("clickagg ended before the replay completed");
        }
        if let Some(rest) = line.trim().strip_prefix("clickagg: serving on http://") {
            address = Some(rest.trim_end_matches('/').to_string());
        }
        if line.contains("replay complete") {
            break;
        }
    }
    // Keep draining stderr so that the server never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    Served { child, address: address.expect("the server's address") }
}

/// One GET over a fresh connection: `(status, body)`.
pub fn get(address: &str, target: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut request = format!("GET {target} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

pub fn get_json(address: &str, target: &str) -> Value {
    let (status, body) = get(address, target, &[]);
    assert_eq!(status, 200, "{target}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{target}: {e}: {body}"))
}

/// The `(ad_id, clicks)` pairs of a top-K answer's `ads`, in the order given.
pub fn ads_of(json: &Value) -> Vec<(u64, u64)> {
    json["ads"].as_array().unwrap().iter().map(|a| (a["ad_id"].as_u64().unwrap(), a["clicks"].as_u64().unwrap())).collect()
}

/// The first `count` of `all` as the contract ranks them: clicks descending, then ad ascending.
pub fn rank(mut all: Vec<(u64, u64)>, count: usize) -> Vec<(u64, u64)> {
    all.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(count);
    all
}
