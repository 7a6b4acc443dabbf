//! The steps before the workers start: list the partitions, open the storage (and the mirror),
//! recover from what the store committed, and set up the sink on process 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clickagg_dataflows::PartitionProgress;

use super::worker::{lower_thread_priority, WORKER_NICENESS};
use super::RunConfig;
use crate::sink::{OutputSink, SinkRunner};
use crate::source::{list_partitions, partition_name};
use crate::storage::postgres::{MirroredStore, PostgresSink};
use crate::storage::{CommitStore, Committed, Store};

/// The partitions listed at the start, by name order, and where each is read from.
pub(super) struct Partitions {
    pub paths: Vec<PathBuf>,
    pub names: Vec<String>,
    /// Where to start reading each partition (`None`: its beginning).
    pub resume: Vec<Option<PartitionProgress>>,
}

impl Partitions {
    /// Lists the log directory and checks what is there before any worker starts (see
    /// `source::preflight`); the reading starts at `config.start_at` when given.
    pub fn list(config: &RunConfig) -> Result<Partitions, String> {
        let paths = list_partitions(&config.logs)?;
        let warnings = crate::source::preflight::check_partitions(&config.logs, &paths, config.follow.is_some(), config.dead_letter_bad_headers)?;
        for warning in warnings.0 {
            eprintln!("clickagg: warning: {warning}");
        }
        let names: Vec<String> = paths.iter().map(|p| partition_name(p)).collect();
        let resume: Vec<Option<PartitionProgress>> = match &config.start_at {
            Some(start_at) if start_at.len() != paths.len() => {
                return Err(format!("{} start offsets for {} partitions", start_at.len(), paths.len()))
            }
            Some(start_at) => start_at.clone(),
            None => vec![None; paths.len()],
        };
        Ok(Partitions { paths, names, resume })
    }
}

/// The sink of process 0, with everything it writes to opened (the store, resumed; the mirror;
/// the output directory; the server), so that a run fails before its workers start if its
/// output cannot be written. `None` on the other processes.
pub(super) fn open_sink(config: &RunConfig, partitions: &mut Partitions) -> Result<Option<SinkRunner>, String> {
    if !config.is_sink_process() {
        return Ok(None);
    }
    let mut sink = OutputSink::new(partitions.names.clone(), config.dataflow_rules(), &config.logs);
    if let Some(path) = &config.store {
        let (store, committed) = Store::open(path, &config.store_settings(), &config.logs, &partitions.paths)?;
        if let Some(committed) = &committed {
            recover(config, path, &store, committed, partitions)?;
        }
        let mirror = connect_mirror(config, &store, &committed)?;
        sink.commit_to(store, committed, mirror);
    }
    if let Some(out) = &config.out {
        sink.write_files(out, &config.plan.windows).map_err(|e| e.to_string())?;
    }
    if let Some(state) = &config.serving {
        sink.serve_into(Arc::clone(state) as Arc<dyn crate::sink::Publish>);
    }
    let serving = config.serving.is_some();
    let sink = match config.follow {
        Some(_) => SinkRunner::on_worker(sink),
        None => SinkRunner::on_thread(sink, move || {
            if serving {
                // Ingest, as the workers are: the server's threads come first.
                lower_thread_priority(WORKER_NICENESS);
            }
        })
        .map_err(|e| format!("cannot start the sink's thread: {e}"))?,
    };
    Ok(Some(sink))
}

/// Recovery from a store that committed before: each partition is read again from its latest
/// checkpoint before the first minute still live at the committed watermark, so that the
/// dataflow's state is rebuilt as it was; the sink writes nothing before that watermark.
fn recover(config: &RunConfig, path: &Path, store: &Store, committed: &Committed, partitions: &mut Partitions) -> Result<(), String> {
    if config.out.is_some() {
        return Err(format!(
            "the store {} is being resumed, so this run computes only what comes after it: write \
             the files with `clickagg export --store {} --out DIR` instead of --out",
            path.display(),
            path.display()
        ));
    }
    if config.cluster.as_ref().is_some_and(|c| c.processes > 1) {
        return Err("resuming a store needs one process (its checkpoints are on process 0): run the \
                    recovery with -n 1, then go on as a cluster"
            .into());
    }
    let live_from = clickagg_dataflows::render::first_live_minute(committed.frontier, &config.plan, &config.rules, config.serve_filters);
    let live_from_ms = live_from as u64 * clickagg_dataflows::MINUTE_MS;
    for (slot, name) in partitions.resume.iter_mut().zip(&partitions.names) {
        *slot = store.checkpoint_before(name, live_from_ms)?.map(|c| c.progress);
    }
    let skipped: u64 = partitions.resume.iter().flatten().map(|p| p.offset).sum();
    eprintln!(
        "clickagg: resuming {}: committed before watermark {}; replaying from minute {live_from} \
         ({skipped} bytes of the logs skipped)",
        path.display(),
        committed.frontier
    );
    Ok(())
}

/// The PostgreSQL mirror of `store`, when `--sink` asks for one.
fn connect_mirror(config: &RunConfig, store: &Store, committed: &Option<Committed>) -> Result<Option<Box<dyn CommitStore>>, String> {
    let Some(url) = &config.sink else { return Ok(None) };
    let mirrored = MirroredStore { id: store.id()?, committed: committed.clone() };
    let mirror = PostgresSink::connect(url, &config.store_settings(), &mirrored)?;
    Ok(Some(Box::new(mirror)))
}
