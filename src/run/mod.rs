//! `clickagg run`: one timely computation over all partitions, in one process or several. Each
//! of the computation's W·N workers reads partitions `i, i+W·N, …`; its input frontier is the
//! watermark of those partitions, so the computation's frontier is the watermark of SPEC §2.
//! Worker 0 of process 0 gathers the answers and hands them to the sink, which runs on a thread of
//! its own during a replay, and on worker 0 itself when following (see [`SinkRunner`]).
//!
//! A run's lifecycle, one step each: list the partitions and open the storage, recovering from
//! what it committed ([`recover`]); start the workers, each building the dataflow and reading
//! its partitions ([`worker`]); gather their results and shut down ([`shutdown`]).

mod config;
mod inputs;
mod recover;
mod shutdown;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

pub use config::RunConfig;
pub use crate::source::Follow;

use crate::cluster::{self, Greeting};
use crate::model::Summary;
use crate::sink::SinkRunner;
use recover::{open_sink, Partitions};
use worker::Shared;

/// Replays the logs to their end and writes the output directory. Returns the summary on the
/// process that holds the sink (process 0), `None` on the others.
pub fn run(config: &RunConfig) -> Result<Option<Summary>, String> {
    config.validate()?;
    if config.follow.is_some() {
        // First, so that a stop during start-up or recovery is as clean as one later.
        shutdown::stop_on_signal();
    }
    let mut partitions = Partitions::list(config)?;
    // Open the store, and fail before starting workers if the output cannot be written.
    let sink = open_sink(config, &mut partitions)?;
    let greeting = greeting(config, &partitions.names);
    let shared = share(config, partitions, sink);
    let cluster = config.cluster.as_ref().zip(greeting.as_ref());
    let guards = cluster::execute(config.workers, cluster, move |worker| worker::work(worker, &shared))?;
    shutdown::gather(guards, config.is_sink_process())
}

/// What this process tells the others of a cluster, so that processes started differently
/// refuse each other.
fn greeting(config: &RunConfig, names: &[String]) -> Option<Greeting> {
    config.cluster.as_ref().map(|cluster| Greeting {
        process: cluster.process,
        processes: cluster.processes,
        workers: config.workers,
        settings: serde_json::to_string(&config.answer_settings()).expect("settings are plain data"),
        partitions: names.len(),
        partitions_fingerprint: xxhash_rust::xxh3::xxh3_64(names.join("\n").as_bytes()),
    })
}

/// What the workers of this process share.
fn share(config: &RunConfig, partitions: Partitions, sink: Option<SinkRunner>) -> Shared {
    Shared {
        config: config.clone(),
        paths: partitions.paths,
        names: partitions.names,
        resume: partitions.resume,
        sink: Mutex::new(sink),
        peek_requests: Mutex::new(config.serving.as_ref().map(|state| state.peek_channel())),
        process_watermark: AtomicU64::new(0),
        panicked: Arc::new(AtomicBool::new(false)),
    }
}
