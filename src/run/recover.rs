//! The steps before the workers start: list the partitions, open the storage (and the mirror),
//! recover from what the store committed, and set up the sink on process 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clickagg_dataflows::{PartitionProgress, Time};

use super::worker::{lower_thread_priority, WORKER_NICENESS};
use super::RunConfig;
use crate::layout::Layout;
use crate::sink::{OutputSink, SinkRunner};
use crate::source::kafka::TopicPartitions;
use crate::source::{list_partitions, partition_name, Located};
use crate::storage::postgres::{MirroredStore, PostgresSink};
use crate::storage::segments::SegmentStore;
use crate::storage::{CommitStore, Committed, Store};

/// The partitions listed at the start, by name order, and where each is read from.
pub(super) struct Partitions {
    pub paths: Vec<PathBuf>,
    /// A Kafka run's topic partitions, with their offsets at the start.
    pub topic: Option<TopicPartitions>,
    pub names: Vec<String>,
    /// A Kafka replay reads each partition up to here: its high watermark at the start.
    pub ends: Vec<Option<u64>>,
    /// Where to start reading each partition (`None`: its beginning).
    pub resume: Vec<Option<PartitionProgress>>,
    /// Recovery: where each partition's committed lines end, and the committed frontier (see
    /// `PartitionSource::hold_uncommitted_lines`).
    pub uncommitted: Option<(Vec<u64>, Time)>,
}

impl Partitions {
    /// Lists the log directory and checks what is there before any worker starts (see
    /// `source::preflight`); the reading starts at `config.start_at` when given.
    /// With `--local-logs` (`local_logs`) an empty directory is no error here: the cluster
    /// refuses a replay only when no process has a partition.
    pub fn list(config: &RunConfig, local_logs: bool) -> Result<Partitions, String> {
        if let Some(spec) = &config.kafka {
            let topic = crate::source::kafka::describe(spec)?;
            let count = topic.names.len();
            let ends = match config.follow {
                Some(_) => vec![None; count],
                None => topic.high.iter().map(|&h| Some(h)).collect(),
            };
            let names = topic.names.clone();
            return Ok(Partitions { paths: Vec::new(), topic: Some(topic), names, ends, resume: vec![None; count], uncommitted: None });
        }
        let paths = list_partitions(&config.logs)?;
        let may_be_empty = config.follow.is_some() || local_logs;
        let warnings = crate::source::preflight::check_partitions(&config.logs, &paths, may_be_empty, config.dead_letter_bad_headers)?;
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
        let ends = vec![None; paths.len()];
        Ok(Partitions { paths, topic: None, names, ends, resume, uncommitted: None })
    }

    /// With `--local-logs`: every partition of the cluster (`layout.names`, by id) now has a
    /// place, read from its beginning; this process's own files keep their `paths`.
    pub fn spread_over(&mut self, layout: &Layout, config: &RunConfig) -> Result<(), String> {
        if config.start_at.is_some() {
            return Err("start offsets are for one process reading every partition, not --local-logs".into());
        }
        self.names = layout.names.clone();
        self.resume = vec![None; self.names.len()];
        self.ends = vec![None; self.names.len()];
        Ok(())
    }
}

/// The sink of process 0, with everything it writes to opened (the store, resumed; the mirror;
/// the output directory; the server), so that a run fails before its workers start if its
/// output cannot be written. `None` on the other processes.
pub(super) fn open_sink(config: &RunConfig, partitions: &mut Partitions) -> Result<Option<SinkRunner>, String> {
    if !config.is_sink_process() {
        return Ok(None);
    }
    let mut sink = OutputSink::new(partitions.names.clone(), config.dataflow_rules());
    // The server first, so that the committer tells it of each commit.
    if let Some(state) = &config.serving {
        sink.serve_into(Arc::clone(state) as Arc<dyn crate::sink::Publish>);
    }
    if let Some(path) = &config.store {
        refuse_local_resume(config, path)?;
        let located = match &partitions.topic {
            Some(topic) => Located::Topic(topic),
            None => Located::Files(&partitions.paths),
        };
        let logs = match &config.kafka {
            Some(spec) => spec.location(),
            None => config.logs.display().to_string(),
        };
        let (mut store, committed) = Store::open(path, &config.store_settings(), &logs, &located)?;
        if let Some(committed) = &committed {
            recover(config, path, &store, committed, partitions)?;
        }
        let mirror = connect_mirror(config, &store, &committed)?;
        if let Some(state) = &config.serving {
            // Final minutes are read from the store from now on, and dropped from memory.
            crate::serve::embedded::prepare_store(&mut store)?;
            state.attach_store(path, committed.as_ref().map(|c| c.frontier), config.dataflow_rules())?;
        }
        sink.commit_to(Box::new(store), committed, mirror);
    }
    if let (Some(dir), Some(state)) = (&config.embedded, &config.serving) {
        // A server without --store: the final minutes go to a segment store of its own.
        let (store, reader) = SegmentStore::create(dir, config.dataflow_rules());
        state.attach_cold(Box::new(reader), None, config.dataflow_rules())?;
        sink.commit_to(Box::new(store), None, None);
    }
    if let Some(out) = &config.out {
        sink.write_files(out, &config.plan.windows).map_err(|e| e.to_string())?;
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
    let offsets = partitions.names.iter().map(|name| store.committed_offset(name)).collect::<Result<Vec<_>, _>>()?;
    partitions.uncommitted = Some((offsets, committed.frontier));
    let skipped: u64 = partitions.resume.iter().flatten().map(|p| p.offset).sum();
    eprintln!(
        "clickagg: resuming {}: committed before watermark {}; replaying from minute {live_from} \
         ({skipped} bytes of the logs skipped)",
        path.display(),
        committed.frontier
    );
    Ok(())
}

/// A Kafka run starts each partition at its resume point, or its first offset: offsets there
/// that retention has deleted are clicks that can no longer be counted, an error naming them.
pub(super) fn check_retained(partitions: &Partitions) -> Result<(), String> {
    let Some(topic) = &partitions.topic else { return Ok(()) };
    for (index, name) in topic.names.iter().enumerate() {
        let Some(id) = partitions.names.iter().position(|n| n == name) else { continue };
        let from = partitions.resume[id].map_or(0, |r| r.offset);
        let low = topic.low[index];
        if from < low {
            return Err(format!(
                "offsets {from} to {} of {name} were deleted from the topic (retention) before this run could read them: \
                 their clicks cannot be counted. Nothing was skipped; to count from offset {low} on, load the data again \
                 into a new topic",
                low - 1
            ));
        }
    }
    Ok(())
}

/// A store being resumed needs one process that reads every partition: refused with a reason a
/// `--local-logs` operator can act on, before the store's own checks look for partition files
/// that are on other processes' disks.
fn refuse_local_resume(config: &RunConfig, path: &Path) -> Result<(), String> {
    if !config.cluster.as_ref().is_some_and(|c| c.processes > 1 && c.local_logs) || !path.exists() {
        return Ok(());
    }
    let store = Store::open_read_only(path)?;
    if store.committed()?.is_some() && !store.is_complete()? {
        return Err(format!(
            "the store {} holds committed answers, and resuming it needs one process that reads every partition \
             (its checkpoints are on process 0; with --local-logs each process has only its own files): gather \
             every process's partition files into one directory and resume with -n 1 over it",
            path.display()
        ));
    }
    Ok(())
}

/// The PostgreSQL mirror of `store`, when `--sink` asks for one.
fn connect_mirror(config: &RunConfig, store: &Store, committed: &Option<Committed>) -> Result<Option<Box<dyn CommitStore>>, String> {
    let Some(url) = &config.sink else { return Ok(None) };
    let mirrored = MirroredStore { id: store.id()?, committed: committed.clone() };
    let mirror = PostgresSink::connect(url, &config.store_settings(), &mirrored)?;
    Ok(Some(Box::new(mirror)))
}
