//! What a run is asked to do, as plain data, and the checks made before anything starts.

use std::path::PathBuf;
use std::sync::Arc;

use clickagg_dataflows::{EventTimeRules, PartitionProgress, Plan, Time};

use crate::cluster::Cluster;
use crate::model::{AnswerSettings, ClusterSettings};
use crate::serve::ServingState;
use crate::source::kafka::KafkaSpec;
use crate::source::Follow;

/// Everything `run` needs, as plain data.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The log directory of partition files (unused when `kafka` is given).
    pub logs: PathBuf,
    /// Read the partitions of a Kafka topic instead of files.
    pub kafka: Option<KafkaSpec>,
    /// The output directory; only process 0 writes one.
    pub out: Option<PathBuf>,
    /// Worker threads in this process (the same in every process).
    pub workers: usize,
    /// The other processes, when running as a cluster.
    pub cluster: Option<Cluster>,
    /// Where the sink publishes the answers for the server, when serving (process 0).
    pub serving: Option<Arc<ServingState>>,
    /// Keep the clicks arranged by ip and user for filtered queries, and keep the workers
    /// answering them after the replay (every process of a serving cluster).
    pub serve_filters: bool,
    pub rules: EventTimeRules,
    pub plan: Plan,
    /// Lines a worker reads from one partition before it lets the dataflow run.
    pub batch_lines: usize,
    /// How far (event time, ms) a worker may read ahead of the computation's frontier; bounds
    /// the updates held in operators while other workers catch up.
    pub max_ahead_ms: u64,
    /// The durable store the answers are committed to (process 0), and resumed from.
    pub store: Option<PathBuf>,
    /// A server without `--store` keeps the final minutes in a segment store in this directory
    /// (`serve::embedded`), which nothing resumes from.
    pub embedded: Option<PathBuf>,
    /// A PostgreSQL database (`postgres://…`) that receives every advance the store commits.
    pub sink: Option<String>,
    /// Tail the partitions as they grow instead of replaying them to their end.
    pub follow: Option<Follow>,
    /// Where to start reading each partition (by index in name order) instead of its beginning:
    /// reconciliation of a range skips what belongs to earlier minutes. Every row before a
    /// checkpoint's offset has a ts at most its `max_ts`.
    pub start_at: Option<Vec<Option<PartitionProgress>>>,
    /// Reconciliation: rows too late for `rules` still count, all entering at this time, which
    /// is after every other row's; the dataflow then keeps every minute open to the end (no
    /// retention), so that the answers before this time are `run`'s and those after it have no
    /// lateness bound. See `PartitionSource::hold_too_late_until`.
    pub hold_too_late_until: Option<Time>,
    /// A partition whose header cannot be used has every line dead-lettered instead of failing
    /// the run before it starts (see `source::preflight`).
    pub dead_letter_bad_headers: bool,
}

impl RunConfig {
    pub fn new(logs: PathBuf, out: PathBuf) -> RunConfig {
        RunConfig {
            logs,
            kafka: None,
            out: Some(out),
            workers: 1,
            cluster: None,
            serving: None,
            serve_filters: false,
            rules: EventTimeRules::default(),
            plan: Plan::default(),
            batch_lines: 50_000,
            max_ahead_ms: 5 * 60_000,
            store: None,
            embedded: None,
            sink: None,
            follow: None,
            start_at: None,
            hold_too_late_until: None,
            dead_letter_bad_headers: false,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        self.plan.validate()?;
        if self.workers == 0 {
            return Err("--workers must be at least 1".into());
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        if let Some(sink) = &self.sink {
            if !(sink.starts_with("postgres://") || sink.starts_with("postgresql://")) {
                return Err(format!(
                    "--sink takes a postgres:// or postgresql:// URL, not {}",
                    crate::storage::postgres::redact(sink)
                ));
            }
            if self.store.is_none() {
                return Err("--sink mirrors the store into PostgreSQL: add --store PATH, which keeps the checkpoints \
                            a restart resumes from"
                    .into());
            }
        }
        if self.is_sink_process() && self.out.is_none() && self.store.is_none() && self.embedded.is_none() {
            return Err("--out DIR or --store PATH is required (on process 0, which writes the answers)".into());
        }
        if self.follow.is_some() {
            if self.store.is_none() && self.is_sink_process() {
                return Err("--follow commits to a store: add --store PATH (and write files from it with `clickagg export`)".into());
            }
            if self.out.is_some() {
                return Err("--follow writes no output directory, only the store: write the files with `clickagg export --store PATH --out DIR`".into());
            }
        }
        if self.hold_too_late_until.is_some() && (self.store.is_some() || self.follow.is_some()) {
            return Err("holding too-late rows to the end is for reconciling a replay, not for a store or follow mode".into());
        }
        if self.kafka.is_some() {
            if self.cluster.as_ref().is_some_and(|c| c.local_logs) {
                return Err("--local-logs is for partition files on each process's disk; every process reads the same topic".into());
            }
            if self.start_at.is_some() || self.hold_too_late_until.is_some() {
                return Err("reconciliation reads partition files, not a Kafka topic".into());
            }
        }
        if self.rules.tick_ms == 0 || 60_000 % self.rules.tick_ms != 0 {
            return Err(format!("the tick ({} ms) must divide a minute", self.rules.tick_ms));
        }
        Ok(())
    }

    /// The rules the dataflow and the sink keep time by. The sources admit rows by `rules`; when
    /// reconciling, the dataflow must not forget a minute before the held too-late rows arrive.
    pub fn dataflow_rules(&self) -> EventTimeRules {
        match self.hold_too_late_until {
            Some(_) => EventTimeRules { allowed_lateness_ms: None, ..self.rules },
            None => self.rules,
        }
    }

    /// Process 0 holds the sink; the others only compute.
    pub fn is_sink_process(&self) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.process == 0)
    }

    /// The settings that change what a store holds: a store is only resumed with the same.
    pub fn store_settings(&self) -> AnswerSettings {
        AnswerSettings::of(&self.rules, &self.plan)
    }

    /// The settings that change answers, and whether filter queries are served: every process
    /// of a cluster must have the same.
    pub fn answer_settings(&self) -> ClusterSettings {
        ClusterSettings { answers: self.store_settings(), serve: self.serve_filters }
    }
}
