//! `clickagg run`: one timely computation over all partitions, in one process or several. Each
//! of the computation's W·N workers reads its share of the partitions ([`Layout`]: `i, i+W·N, …`
//! of a shared directory, or of its own process's files with `--local-logs`); its input frontier
//! is the watermark of those partitions, so the computation's frontier is the watermark of SPEC §2.
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
use crate::layout::{Layout, LogsMode};
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
    let local_logs = config.cluster.as_ref().is_some_and(|c| c.processes > 1 && c.local_logs);
    let mut partitions = Partitions::list(config, local_logs)?;
    // Open the store, and fail before starting workers if the output cannot be written. With
    // one shared directory every process lists the whole cluster's partitions, so this comes
    // before the cluster forms; with --local-logs it needs every process's names first.
    let early = if local_logs { None } else { Some(open_sink(config, &mut partitions)?) };
    let own_names = partitions.names.clone();
    let (layout, connected) = join(config, &own_names)?;
    let sink = match early {
        Some(sink) => sink,
        None => {
            partitions.spread_over(&layout, config)?;
            open_sink(config, &mut partitions)?
        }
    };
    recover::check_retained(&partitions)?;
    let shared = share(config, partitions, sink, layout, own_names);
    let cluster = config.cluster.as_ref().zip(connected);
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
        local_logs: cluster.local_logs,
        partition_names: names.to_vec(),
    })
}

/// Joins the cluster, if there is one, and agrees with the other processes on who reads which
/// partition ([`Layout::agree`], from every process's greeting). One process reads all it lists.
fn join(config: &RunConfig, names: &[String]) -> Result<(Layout, Option<cluster::Connected>), String> {
    let greeting = greeting(config, names);
    match config.cluster.as_ref().zip(greeting.as_ref()) {
        Some((cluster, greeting)) if cluster.processes > 1 => {
            let connected = cluster::connect(cluster, greeting)?;
            let lists: Vec<Vec<String>> = connected.greetings.iter().map(|g| g.partition_names.clone()).collect();
            let mode = if cluster.local_logs { LogsMode::Local } else { LogsMode::Shared };
            let layout = Layout::agree(mode, &lists)?;
            if layout.names.is_empty() && config.follow.is_none() {
                return Err("no process of the cluster has partition files in its --logs: expected files named \
                            part-NNNNN.csv (part-00000.csv, part-00001.csv, …)"
                    .into());
            }
            Ok((layout, Some(connected)))
        }
        _ => Ok((Layout::single(names.to_vec()), None)),
    }
}

/// What the workers of this process share.
fn share(config: &RunConfig, partitions: Partitions, sink: Option<SinkRunner>, layout: Layout, own_names: Vec<String>) -> Shared {
    Shared {
        config: config.clone(),
        layout,
        own_names,
        resume: partitions.resume,
        ends: partitions.ends,
        uncommitted: partitions.uncommitted,
        sink: Mutex::new(sink),
        peek_requests: Mutex::new(config.serving.as_ref().map(|state| state.peeks.channel())),
        process_watermark: AtomicU64::new(0),
        panicked: Arc::new(AtomicBool::new(false)),
    }
}
