//! Running as several processes, on timely's own communication layer.
//!
//! Data and progress travel over timely's TCP allocator exactly as `timely::execute` would set
//! it up. Only the connection step is ours, for two reasons an operator feels: timely retries a
//! peer that is not up forever (we give up after `--connect-timeout` with a message naming it),
//! and timely trusts every process to have the same `-w` and the same inputs (we exchange a
//! greeting first, so that a mismatch is refused by name instead of routing bytes to workers
//! that do not exist).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
use timely::communication::allocator::ProcessBuilder;
use timely::communication::{AllocatorBuilder, Hooks, WorkerGuards};
use timely::worker::Worker;
use timely::WorkerConfig;

use crate::model::ClusterSettings;

/// Where this process sits in a cluster: plain data from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    /// Number of processes (`-n`).
    pub processes: usize,
    /// This process's index, `0..processes` (`-p`). Process 0 holds the sink.
    pub process: usize,
    /// `host:port` of every process, in process order (the hostfile's first `processes` lines).
    pub addresses: Vec<String>,
    /// How long to wait for every peer to come up.
    pub connect_timeout: Duration,
}

impl Cluster {
    pub fn validate(&self) -> Result<(), String> {
        if self.processes == 0 {
            return Err("--processes must be at least 1".into());
        }
        if self.process >= self.processes {
            return Err(format!(
                "--process {} is out of range: with --processes {} it must be 0 to {}",
                self.process,
                self.processes,
                self.processes - 1
            ));
        }
        if self.addresses.len() < self.processes {
            return Err(format!(
                "the hostfile lists {} address(es) but --processes is {}: it needs one host:port line per process",
                self.addresses.len(),
                self.processes
            ));
        }
        Ok(())
    }
}

/// Reads a hostfile: one `host:port` per line, in process order; blank lines and `#` comments
/// are skipped.
pub fn read_hostfile(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the hostfile {}: {e}", path.display()))?;
    parse_hostfile(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses a hostfile's text; see [`read_hostfile`].
pub fn parse_hostfile(text: &str) -> Result<Vec<String>, String> {
    let mut addresses = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let port_ok = line
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
        if !port_ok || line.contains(char::is_whitespace) {
            return Err(format!("line {}: expected host:port (e.g. 10.0.0.7:2101), found {line:?}", number + 1));
        }
        addresses.push(line.to_string());
    }
    if addresses.is_empty() {
        return Err("the hostfile lists no host:port lines".into());
    }
    Ok(addresses)
}

/// What every process of one computation must agree on, sent when two processes connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Greeting {
    pub process: usize,
    pub processes: usize,
    pub workers: usize,
    /// The run settings that change answers (a [`ClusterSettings`] as JSON).
    pub settings: String,
    /// The partition files every process found, as a count and a fingerprint of their names:
    /// worker `i` reads partitions `i, i + N·W, …`, which only works if all see the same list.
    pub partitions: usize,
    pub partitions_fingerprint: u64,
}

const GREETING_TAG: &str = "clickagg-cluster/1";
const MAX_GREETING_BYTES: usize = 64 * 1024;

impl Greeting {
    fn encode(&self) -> String {
        format!(
            "{GREETING_TAG} version={} process={} processes={} workers={} partitions={} fingerprint={:016x} settings={}\n",
            env!("CARGO_PKG_VERSION"),
            self.process,
            self.processes,
            self.workers,
            self.partitions,
            self.partitions_fingerprint,
            self.settings.replace(['\n', ' '], "_"),
        )
    }

    fn decode(line: &str) -> Result<(String, Greeting), String> {
        let mut fields = line.trim_end().split(' ');
        if fields.next() != Some(GREETING_TAG) {
            return Err("not a clickagg cluster greeting".into());
        }
        let mut get = std::collections::HashMap::new();
        for field in fields {
            let (key, value) = field.split_once('=').ok_or("malformed greeting")?;
            get.insert(key, value);
        }
        let text = |key: &str| get.get(key).map(|v| v.to_string()).ok_or(format!("greeting lacks {key}"));
        let number = |key: &str| text(key)?.parse::<usize>().map_err(|_| format!("greeting has a bad {key}"));
        let greeting = Greeting {
            process: number("process")?,
            processes: number("processes")?,
            workers: number("workers")?,
            settings: text("settings")?,
            partitions: number("partitions")?,
            partitions_fingerprint: u64::from_str_radix(&text("fingerprint")?, 16).map_err(|_| "greeting has a bad fingerprint")?,
        };
        Ok((text("version")?, greeting))
    }

    /// Why `theirs` cannot join a computation with `self`, if it cannot.
    fn mismatch(&self, version: &str, theirs: &Greeting) -> Option<String> {
        let (me, them) = (self.process, theirs.process);
        if version != env!("CARGO_PKG_VERSION") {
            return Some(format!(
                "process {them} runs clickagg {version} but process {me} runs {}: run the same build everywhere",
                env!("CARGO_PKG_VERSION")
            ));
        }
        if theirs.processes != self.processes {
            return Some(format!(
                "process {them} was started with -n {} but process {me} with -n {}: every process must be given the same --processes",
                theirs.processes, self.processes
            ));
        }
        if theirs.workers != self.workers {
            return Some(format!(
                "process {them} was started with -w {} but process {me} with -w {}: every process must be given the same --workers",
                theirs.workers, self.workers
            ));
        }
        if theirs.partitions != self.partitions || theirs.partitions_fingerprint != self.partitions_fingerprint {
            return Some(format!(
                "process {them} found {} partition file(s) in its --logs and process {me} found {} (or their names differ): \
                 every process must see the same log directory",
                theirs.partitions, self.partitions
            ));
        }
        if theirs.settings != self.settings.replace(['\n', ' '], "_") {
            let parse = |text: &str| serde_json::from_str::<ClusterSettings>(text).ok();
            let differences = match (parse(&theirs.settings), parse(&self.settings)) {
                (Some(their), Some(mine)) => their.differences(&format!("on process {them}"), &mine, &format!("on process {me}")),
                _ => format!("  process {them}: {}\n  process {me}: {}", theirs.settings, self.settings),
            };
            return Some(format!("process {them} and process {me} were started with different settings:\n{differences}"));
        }
        None
    }
}

/// Decodes a greeting line (for the fuzz targets): the sender's version and greeting.
pub fn decode_greeting(line: &str) -> Result<(String, Greeting), String> {
    Greeting::decode(line)
}

/// Connects this process to every other one, exchanging greetings, and returns one socket per
/// process in process order (`None` for this one), ready for timely.
///
/// Process `i` connects to every `j < i` and accepts every `j > i`. Each connection starts with
/// the connecting side's greeting and the accepting side's reply; both sides check the other's.
pub fn connect(cluster: &Cluster, greeting: &Greeting) -> Result<Vec<Option<TcpStream>>, String> {
    cluster.validate()?;
    let me = cluster.process;
    let deadline = Instant::now() + cluster.connect_timeout;
    let addresses = &cluster.addresses[..cluster.processes];
    // Listen before connecting out, so that higher processes can reach us while we wait on lower ones.
    let listener = TcpListener::bind(&addresses[me]).map_err(|e| {
        let hint = if e.kind() == ErrorKind::AddrInUse { " (the port is in use: another process holds it)" } else { "" };
        format!("process {me} cannot listen on {}, its line in the hostfile: {e}{hint}", addresses[me])
    })?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut sockets: Vec<Option<TcpStream>> = (0..cluster.processes).map(|_| None).collect();

    for (peer, address) in addresses.iter().enumerate().take(me) {
        let mut stream = connect_with_retry(address, deadline)
            .map_err(|e| format!("process {peer} at {address} did not come up within {}: {e}", humantime::format_duration(cluster.connect_timeout)))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream.write_all(greeting.encode().as_bytes()).map_err(|e| format!("greeting process {peer} at {address}: {e}"))?;
        let (version, theirs) = read_greeting(&mut stream, deadline)
            .map_err(|e| format!("process {peer} at {address} did not answer the greeting: {e}"))?;
        if theirs.process != peer {
            return Err(format!("{address} answered as process {} but the hostfile says process {peer} is there", theirs.process));
        }
        if let Some(why) = greeting.mismatch(&version, &theirs) {
            return Err(why);
        }
        sockets[peer] = Some(stream);
    }

    while sockets.iter().enumerate().any(|(peer, s)| peer > me && s.is_none()) {
        match listener.accept() {
            Ok((mut stream, from)) => {
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                stream.set_nodelay(true).map_err(|e| e.to_string())?;
                let Ok((version, theirs)) = read_greeting(&mut stream, deadline) else {
                    // Something that is not a clickagg peer (a port scan, a health check).
                    eprintln!("clickagg: process {me}: ignored a connection from {from} that sent no cluster greeting");
                    continue;
                };
                // Reply even when refusing, so that the other side can report the mismatch too.
                let _ = stream.write_all(greeting.encode().as_bytes());
                if let Some(why) = greeting.mismatch(&version, &theirs) {
                    return Err(why);
                }
                let peer = theirs.process;
                if peer <= me || peer >= cluster.processes || sockets[peer].is_some() {
                    return Err(format!(
                        "a process at {from} says it is process {peer}, which process {me} does not expect: \
                         give each process its own --process from 0 to {}",
                        cluster.processes - 1
                    ));
                }
                sockets[peer] = Some(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (me + 1..cluster.processes)
                        .filter(|&p| sockets[p].is_none())
                        .map(|p| format!("process {p} ({})", addresses[p]))
                        .collect();
                    return Err(format!(
                        "{} never connected to process {me} within {}: is it started, with this hostfile?",
                        missing.join(", "),
                        humantime::format_duration(cluster.connect_timeout)
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("process {me} accepting connections: {e}")),
        }
    }
    for stream in sockets.iter().flatten() {
        stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    }
    Ok(sockets)
}

fn connect_with_retry(address: &str, deadline: Instant) -> Result<TcpStream, String> {
    loop {
        let attempt = address
            .to_socket_addrs()
            .map_err(|e| e.to_string())
            .and_then(|mut addrs| addrs.next().ok_or_else(|| "the address does not resolve".to_string()))
            .and_then(|addr| {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
                TcpStream::connect_timeout(&addr, left).map_err(|e| e.to_string())
            });
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Reads one greeting line, byte by byte: whatever follows it belongs to timely.
fn read_greeting(stream: &mut TcpStream, deadline: Instant) -> Result<(String, Greeting), String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
        stream.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match stream.read(&mut byte) {
            Ok(0) => return Err("the connection closed".into()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= MAX_GREETING_BYTES => return Err("greeting too long".into()),
            Ok(_) => line.push(byte[0]),
            Err(e) => return Err(e.to_string()),
        }
    }
    Greeting::decode(&String::from_utf8_lossy(&line))
}

/// Starts `workers` timely workers in this process, joined to the cluster if there is one, each
/// running `func`.
pub fn execute<T, F>(workers: usize, cluster: Option<(&Cluster, &Greeting)>, func: F) -> Result<WorkerGuards<T>, String>
where
    T: Send + 'static,
    F: Fn(&mut Worker) -> T + Send + Sync + 'static,
{
    let (builders, others): (Vec<AllocatorBuilder>, Box<dyn std::any::Any + Send>) = match cluster {
        Some((cluster, greeting)) if cluster.processes > 1 => {
            let sockets = connect(cluster, greeting)?;
            eprintln!(
                "clickagg: process {} of {} connected; {} workers each, {} in all",
                cluster.process,
                cluster.processes,
                workers,
                workers * cluster.processes
            );
            let hooks = Hooks::default();
            let local = ProcessBuilder::new_typed_vector(workers, hooks.refill.clone(), hooks.spill.clone());
            let (builders, guard) = initialize_networking_from_sockets(local, sockets, cluster.process, workers, hooks)
                .map_err(|e| format!("starting timely's communication: {e}"))?;
            (builders.into_iter().map(AllocatorBuilder::Tcp).collect(), Box::new(guard))
        }
        _ => timely::CommunicationConfig::Process(workers).try_build()?,
    };
    timely::execute::execute_from(builders, others, WorkerConfig::default(), func)
}

/// Panic messages seen in this process, so that a cluster failure (which timely reports by
/// panicking its communication threads) can be told to the user as one clear error.
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Records every panic's message; prints the ones that are not timely's cascade after a peer
/// failed (those are summarized once by [`failure_message`]). For the binary's `main`.
///
/// A lost peer ends the process at once with that message and exit status 1: timely's threads
/// would otherwise go on to panic inside destructors while unwinding, which aborts the process
/// with a message that names nothing a user can act on.
pub fn install_panic_recorder() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = if let Some(s) = info.payload().downcast_ref::<&str>() {
            s.to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "a panic with no message".to_string()
        };
        let cascade = is_cascade(&message);
        let lost_peer = message.starts_with("timely communication error");
        if let Ok(mut panics) = PANICS.lock() {
            panics.push(message);
        }
        if lost_peer {
            eprintln!("clickagg: {}", failure_message());
            std::process::exit(1);
        }
        if !cascade {
            default(info);
            // A worker that panicked leaves the computation unable to make progress, and when
            // serving nothing would ever join it: end the process with the message above.
            if std::thread::current().name().is_some_and(|name| name.starts_with("timely:work")) {
                eprintln!("clickagg: a worker failed; stopping");
                std::process::exit(101);
            }
        }
    }));
}

fn is_cascade(message: &str) -> bool {
    message.starts_with("timely communication error")
        || message.contains("MergeQueue poisoned")
        || message.contains("Send thread panic")
        || message.contains("Recv thread panic")
}

/// The error to report when workers failed: a lost peer if timely said so, else the panics.
pub fn failure_message() -> String {
    let panics = PANICS.lock().map(|p| p.clone()).unwrap_or_default();
    if let Some(lost) = panics.iter().find(|m| m.starts_with("timely communication error")) {
        return format!(
            "lost the connection to another process of the cluster ({lost}); the computation cannot go on without it. \
             Stop every process and start them all again."
        );
    }
    let own: Vec<&String> = panics.iter().filter(|m| !is_cascade(m)).collect();
    if own.is_empty() {
        "a worker failed".to_string()
    } else {
        format!("a worker failed: {}", own.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostfile_lines_comments_and_errors() {
        assert_eq!(parse_hostfile("# a cluster\n127.0.0.1:2101\n\n  host-b:2102  # second\n").unwrap(), ["127.0.0.1:2101", "host-b:2102"]);
        assert_eq!(parse_hostfile("[::1]:2101\n").unwrap(), ["[::1]:2101"]);
        for bad in ["", "# nothing\n", "127.0.0.1\n", "127.0.0.1:0\n", ":2101\n", "a b:1\n", "h:99999\n"] {
            assert!(parse_hostfile(bad).is_err(), "{bad:?} should be refused");
        }
    }

    fn greeting(process: usize) -> Greeting {
        Greeting { process, processes: 2, workers: 2, settings: "delay=5000 windows=1,5".into(), partitions: 4, partitions_fingerprint: 7 }
    }

    #[test]
    fn greetings_round_trip_and_name_each_mismatch() {
        let ours = greeting(0);
        let (version, decoded) = Greeting::decode(&greeting(1).encode()).unwrap();
        assert_eq!(decoded.settings, "delay=5000_windows=1,5");
        assert_eq!(ours.mismatch(&version, &decoded), None);
        // A change to our greeting, and what the mismatch it causes must say.
        type Case = (fn(&mut Greeting), &'static str);
        let cases: [Case; 4] = [
            (|g| g.workers = 1, "same --workers"),
            (|g| g.processes = 3, "same --processes"),
            (|g| g.partitions_fingerprint = 8, "same log directory"),
            (|g| g.settings = "delay=1".into(), "different settings"),
        ];
        for (change, needle) in cases {
            let mut theirs = greeting(1);
            change(&mut theirs);
            let (version, theirs) = Greeting::decode(&theirs.encode()).unwrap();
            let why = ours.mismatch(&version, &theirs).expect("a mismatch");
            assert!(why.contains(needle), "{why}");
        }
        assert!(ours.mismatch("0.0.0-other", &decoded).unwrap().contains("same build"));
        assert!(Greeting::decode("GET / HTTP/1.1").is_err());
    }

    #[test]
    fn a_peer_that_never_comes_up_is_an_error_after_the_timeout() {
        let free = TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = free.local_addr().unwrap().to_string();
        drop(free);
        let ours = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = ours.local_addr().unwrap().to_string();
        drop(ours);
        let cluster = Cluster { processes: 2, process: 1, addresses: vec![dead.clone(), address], connect_timeout: Duration::from_millis(500) };
        let started = Instant::now();
        let error = connect(&cluster, &greeting(1)).unwrap_err();
        assert!(error.contains("process 0") && error.contains("did not come up"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
