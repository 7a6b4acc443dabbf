//! The partitions a worker reads, as a loop of steps: a replay reads them to their end, the
//! partition furthest behind in event time first; follow mode tails them as they grow, notices
//! rotations, and picks up partitions created after the start.

use std::time::{Duration, Instant};

use clickagg_dataflows::{EventTimeRules, PartitionProgress, Time};

use super::{list_partitions, partition_name, PartitionSource, SourceOutput};

/// What a worker's reader feeds: the dataflow's inputs, at the time they stand at.
pub trait WorkerInput: SourceOutput {
    /// The time the inputs stand at: nothing read now enters before it.
    fn time(&self) -> Time;
    /// Notes a partition's progress at the inputs' time.
    fn progress(&mut self, progress: PartitionProgress);
}

/// Follow mode's settings.
#[derive(Clone, Copy, Debug)]
pub struct Follow {
    /// A partition with no new line for this long stops holding the watermark back.
    pub idle_timeout: Duration,
    /// How often a partition at its end is looked at again.
    pub poll: Duration,
    /// How often the log directory is listed for new partitions.
    pub rescan: Duration,
}

impl Default for Follow {
    fn default() -> Self {
        Follow { idle_timeout: Duration::from_secs(30), poll: Duration::from_millis(5), rescan: Duration::from_secs(1) }
    }
}

/// The id of a partition found after the start (follow mode). The partitions listed at the
/// start are numbered by name order; later ones by a hash of their name, which every worker
/// computes alike, in the upper half so that the two never meet.
pub fn discovered_partition_id(name: &str) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(name.as_bytes()) as u32) | 0x8000_0000
}

/// One partition as a worker reads it, with what follow mode knows of its recent activity.
pub struct Tail {
    source: PartitionSource,
    /// When a line last came.
    last_data: Instant,
    /// At the end of the data on the last read; read again after the poll interval.
    at_end: bool,
    polled: Instant,
    rotation_checked: Instant,
}

impl Tail {
    fn new(source: PartitionSource) -> Tail {
        let now = Instant::now();
        Tail { source, last_data: now, at_end: false, polled: now, rotation_checked: now }
    }

    /// Follow mode: whether this partition holds the watermark back. One at its end with no
    /// new line for the idle timeout does not, nor one that has not had a row yet.
    fn holds_watermark(&self, follow: &Follow) -> bool {
        !self.source.is_finished()
            && !(self.at_end && (self.source.progress().max_ts.is_none() || self.last_data.elapsed() >= follow.idle_timeout))
    }
}

/// A worker's partitions and how it reads them.
pub struct Reader {
    tails: Vec<Tail>,
    names: Vec<String>,
    errors: Vec<String>,
    rules: EventTimeRules,
    batch_lines: usize,
}

impl Reader {
    /// Opens the partitions of worker `index` of `peers`: those at positions `index`,
    /// `index + peers`, … of `paths`, each from its `resume` point. Partitions that cannot be
    /// opened are errors the run reports at its end. With `hold_too_late_until`, rows too late
    /// for `rules` are held to that time (reconciliation).
    pub fn open(
        paths: &[std::path::PathBuf],
        names: &[String],
        resume: &[Option<PartitionProgress>],
        (index, peers): (usize, usize),
        hold_too_late_until: Option<Time>,
        rules: EventTimeRules,
        batch_lines: usize,
    ) -> Reader {
        let mut errors = Vec::new();
        let mut tails = Vec::new();
        for (i, path) in paths.iter().enumerate().skip(index).step_by(peers) {
            match PartitionSource::open_at(i as u32, path, resume[i]) {
                Ok(mut source) => {
                    if let Some(at) = hold_too_late_until {
                        source.hold_too_late_until(at);
                    }
                    tails.push(Tail::new(source))
                }
                Err(e) => errors.push(e),
            }
        }
        Reader { tails, names: names.to_vec(), errors, rules, batch_lines }
    }

    /// Reports every partition's progress as it stands: once the input ends.
    pub fn report_progress(&self, inputs: &mut impl WorkerInput) {
        for tail in &self.tails {
            inputs.progress(tail.source.progress());
        }
    }

    /// The errors met reading, taken.
    pub fn take_errors(&mut self) -> Vec<String> {
        std::mem::take(&mut self.errors)
    }

    fn name(&self, tail: &Tail) -> String {
        let partition = tail.source.progress().partition as usize;
        self.names.get(partition).cloned().unwrap_or_else(|| partition_name(tail.source.path()))
    }

    /// Replay: reads a batch from the partition furthest behind in event time, so that
    /// partitions (and the watermark) advance together. Returns the new input frontier, or
    /// `None` when every partition is read to its end.
    pub fn replay_step(&mut self, inputs: &mut impl WorkerInput) -> Option<Time> {
        let rules = self.rules;
        let position = (0..self.tails.len())
            .filter(|&i| !self.tails[i].source.is_finished())
            .min_by_key(|&i| self.tails[i].source.watermark(&rules))?;
        let floor = inputs.time();
        let tail = &mut self.tails[position];
        if let Err(e) = tail.source.read_some(&rules, self.batch_lines, true, floor, inputs) {
            let name = self.names.get(tail.source.progress().partition as usize).cloned().unwrap_or_default();
            self.errors.push(format!("reading {name}: {e}"));
            // An unreadable partition stops holding the watermark back; the run fails at the end.
            tail.source.give_up();
        }
        inputs.progress(tail.source.progress());
        let frontier = self.tails.iter().map(|t| t.source.watermark(&rules)).min().unwrap_or(Time::MAX);
        (frontier != Time::MAX).then_some(frontier)
    }

    /// Follow: reads a batch from the partition furthest behind that may have new lines, and
    /// checks the ones at their end for rotation. Returns the watermark of the partitions that
    /// hold it back, `None` if none does.
    pub fn follow_step(&mut self, follow: &Follow, floor: Time, inputs: &mut impl WorkerInput) -> Option<Time> {
        let rules = self.rules;
        let now = Instant::now();
        let ready = (0..self.tails.len())
            .filter(|&i| {
                let t = &self.tails[i];
                !t.source.is_finished() && (!t.at_end || now.duration_since(t.polled) >= follow.poll)
            })
            .min_by_key(|&i| self.tails[i].source.watermark(&rules));
        if let Some(position) = ready {
            let name = self.name(&self.tails[position]);
            let tail = &mut self.tails[position];
            match tail.source.read_some(&rules, self.batch_lines, false, floor, inputs) {
                Ok(0) => {
                    tail.at_end = true;
                    tail.polled = now;
                    if now.duration_since(tail.rotation_checked) >= Duration::from_secs(1) {
                        tail.rotation_checked = now;
                        if let Some(what) = tail.source.rotation() {
                            eprintln!("clickagg: partition {name}: {what}; it is no longer read (dead letter: partition_rotated)");
                            tail.source.report_rotation(what, &rules, floor, inputs);
                        }
                    }
                }
                Ok(_) => {
                    tail.at_end = false;
                    tail.last_data = now;
                }
                Err(e) => {
                    self.errors.push(format!("reading {name}: {e}"));
                    eprintln!("clickagg: reading {name}: {e}; it is no longer read");
                    tail.source.give_up();
                }
            }
            inputs.progress(tail.source.progress());
        }
        self.tails.iter().filter(|t| t.holds_watermark(follow)).map(|t| t.source.watermark(&rules)).min()
    }

    /// Whether some partition may have lines to read now (otherwise the worker parks).
    pub fn has_data(&self, follow: &Follow) -> bool {
        let now = Instant::now();
        self.tails.iter().any(|t| !t.source.is_finished() && (!t.at_end || now.duration_since(t.polled) >= follow.poll))
    }

    /// Follow: lists the log directory and opens the new partitions that this worker owns.
    pub fn discover(&mut self, logs: &std::path::Path, known: &mut std::collections::BTreeSet<String>, index: usize, peers: usize) {
        let Ok(paths) = list_partitions(logs) else { return };
        for path in paths {
            let name = partition_name(&path);
            if known.contains(&name) {
                continue;
            }
            known.insert(name.clone());
            let id = discovered_partition_id(&name);
            if id as usize % peers != index {
                continue;
            }
            match PartitionSource::open(id, &path) {
                Ok(source) => {
                    eprintln!("clickagg: new partition {name}");
                    self.tails.push(Tail::new(source));
                }
                Err(e) => self.errors.push(e),
            }
        }
    }
}
