//! The partitions a worker reads, as a loop of steps: a replay reads them to their end, the
//! partition furthest behind in event time first; follow mode tails them as they grow, notices
//! rotations, and picks up partitions created after the start.

use std::time::{Duration, Instant};

use clickagg_dataflows::{EventTimeRules, PartitionProgress, Time};

use super::kafka::feed::{Assigned, WorkerConsumer};
use super::kafka::{partition_count, partition_name as topic_partition_name, partition_number, KafkaSpec};
use super::{list_partitions, partition_name, PartitionSource, SourceOutput};

/// What a worker's reader feeds: the dataflow's inputs, at the time they stand at.
pub trait WorkerInput: SourceOutput {
    /// The time the inputs stand at: nothing read now enters before it.
    fn time(&self) -> Time;
    /// Notes a partition's progress at the inputs' time.
    fn progress(&mut self, progress: PartitionProgress);
    /// Names a partition found after the start, before any other note of it.
    fn found(&mut self, partition: u32, name: String);
}

/// The partition names a follower has seen: in its own `--logs`, and (with `--local-logs`)
/// those the other processes listed at the start, which its own directory must not repeat.
pub struct Seen {
    pub own: std::collections::BTreeSet<String>,
    pub others: std::collections::BTreeSet<String>,
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
    /// Known to be at the end of its data on the last read (see
    /// [`PartitionSource::is_caught_up`]): only then can it be idle.
    caught_up: bool,
    polled: Instant,
    rotation_checked: Instant,
}

impl Tail {
    fn new(source: PartitionSource) -> Tail {
        let now = Instant::now();
        Tail { source, last_data: now, at_end: false, caught_up: false, polled: now, rotation_checked: now }
    }

    /// Follow mode: whether this partition holds the watermark back. One at its end with no
    /// new line for the idle timeout does not, nor one that has not had a row yet.
    fn holds_watermark(&self, follow: &Follow) -> bool {
        !self.source.is_finished()
            && !(self.at_end
                && self.caught_up
                && (self.source.progress().max_ts.is_none() || self.last_data.elapsed() >= follow.idle_timeout))
    }
}

/// Where a worker's partitions are when they are Kafka topic partitions.
pub struct KafkaOrigin<'a> {
    pub spec: &'a KafkaSpec,
    /// A replay's end for each partition, by id: its high watermark at the start.
    pub ends: &'a [Option<u64>],
    /// The worker's index in the cluster (it names the worker's client).
    pub worker: usize,
}

/// A worker's Kafka client, and how many partitions its topic had when last looked at.
struct KafkaReader {
    consumer: WorkerConsumer,
    partitions: usize,
}

/// A worker's partitions and how it reads them.
pub struct Reader {
    tails: Vec<Tail>,
    names: Vec<String>,
    errors: Vec<String>,
    rules: EventTimeRules,
    batch_lines: usize,
    kafka: Option<KafkaReader>,
}

impl Reader {
    /// Opens the partitions `ids` (this worker's share, see `crate::layout::Layout`), each
    /// `logs/names[id]` (or topic partition `names[id]` of `kafka`) from its `resume` point.
    /// Partitions that cannot be opened are errors the run reports at its end. With
    /// `hold_too_late_until`, rows too late for `rules` are held to that time (reconciliation).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        logs: &std::path::Path,
        kafka: Option<KafkaOrigin<'_>>,
        names: &[String],
        resume: &[Option<PartitionProgress>],
        ids: Vec<usize>,
        hold_too_late_until: Option<Time>,
        rules: EventTimeRules,
        batch_lines: usize,
    ) -> Reader {
        let mut reader = Reader { tails: Vec::new(), names: names.to_vec(), errors: Vec::new(), rules, batch_lines, kafka: None };
        let sources = match kafka {
            None => ids
                .into_iter()
                .filter_map(|i| {
                    PartitionSource::open_at(i as u32, &logs.join(&names[i]), resume[i]).map_err(|e| reader.errors.push(e)).ok()
                })
                .collect(),
            Some(origin) => reader.open_kafka(origin, &ids, resume).unwrap_or_else(|e| {
                reader.errors.push(e);
                Vec::new()
            }),
        };
        for mut source in sources {
            if let Some(at) = hold_too_late_until {
                source.hold_too_late_until(at);
            }
            reader.tails.push(Tail::new(source));
        }
        reader
    }

    /// The topic partitions `ids` through one consumer for this worker.
    fn open_kafka(&mut self, origin: KafkaOrigin<'_>, ids: &[usize], resume: &[Option<PartitionProgress>]) -> Result<Vec<PartitionSource>, String> {
        let consumer = WorkerConsumer::new(origin.spec, origin.worker)?;
        let mut assigned = Vec::new();
        for &id in ids {
            let name = &self.names[id];
            let number = partition_number(&origin.spec.topic, name)
                .ok_or_else(|| format!("{name} is not a partition of topic {}", origin.spec.topic))?;
            let from = resume[id].map_or(0, |r| r.offset);
            assigned.push(Assigned { name: name.clone(), number, from, end: origin.ends.get(id).copied().flatten() });
        }
        let feeds = consumer.assign(assigned)?;
        let header = origin.spec.header();
        let sources = ids
            .iter()
            .zip(feeds)
            .map(|(&id, feed)| PartitionSource::open_kafka(id as u32, self.names[id].clone(), feed, header.clone(), resume[id]))
            .collect();
        self.kafka = Some(KafkaReader { consumer, partitions: self.names.len() });
        Ok(sources)
    }

    /// Recovery: the lines of partition `i` from `offsets[i]` on enter no earlier than
    /// `frontier` (see [`PartitionSource::hold_uncommitted_lines`]).
    pub fn hold_uncommitted_lines(&mut self, offsets: &[u64], frontier: Time) {
        for tail in &mut self.tails {
            if let Some(&offset) = offsets.get(tail.source.progress().partition as usize) {
                tail.source.hold_uncommitted_lines(offset, frontier);
            }
        }
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
            self.errors.push(format!("reading {}: {e}", tail.source.name()));
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
            let name = self.tails[position].source.name().to_string();
            let tail = &mut self.tails[position];
            match tail.source.read_some(&rules, self.batch_lines, false, floor, inputs) {
                Ok(0) => {
                    tail.at_end = true;
                    tail.caught_up = tail.source.is_caught_up();
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
                    tail.caught_up = false;
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

    /// Follow: lists the log directory and opens the new partitions that this worker `reads`,
    /// telling the sink each one's name through `inputs`.
    pub fn discover(&mut self, logs: &std::path::Path, seen: &mut Seen, reads: impl Fn(u32) -> bool, inputs: &mut impl WorkerInput) {
        if self.kafka.is_some() {
            return self.discover_topic_partitions(reads, inputs);
        }
        let Ok(paths) = list_partitions(logs) else { return };
        for path in paths {
            let name = partition_name(&path);
            if seen.own.contains(&name) {
                continue;
            }
            seen.own.insert(name.clone());
            if seen.others.contains(&name) {
                let error = format!(
                    "partition {name} appeared in this process's --logs, but another process of the cluster has a partition \
                     of that name: names must be unique across the cluster with --local-logs; this one is not read"
                );
                eprintln!("clickagg: {error}");
                self.errors.push(error);
                continue;
            }
            let id = discovered_partition_id(&name);
            if !reads(id) {
                continue;
            }
            match PartitionSource::open(id, &path) {
                Ok(source) => {
                    eprintln!("clickagg: new partition {name}");
                    inputs.found(id, name);
                    self.tails.push(Tail::new(source));
                }
                Err(e) => self.errors.push(e),
            }
        }
    }

    /// Follow mode over a topic: partitions added to it since the start (Kafka only ever adds
    /// them) are read from their first offset, each by one worker, as new files are.
    fn discover_topic_partitions(&mut self, reads: impl Fn(u32) -> bool, inputs: &mut impl WorkerInput) {
        let Some(kafka) = self.kafka.as_mut() else { return };
        let spec = kafka.consumer.spec();
        let Some(count) = partition_count(kafka.consumer.client(), spec, Duration::from_secs(1)) else { return };
        if count <= kafka.partitions {
            return;
        }
        let mut assigned = Vec::new();
        for number in kafka.partitions as i32..count as i32 {
            let name = topic_partition_name(&spec.topic, number);
            let id = discovered_partition_id(&name);
            if reads(id) {
                assigned.push((id, Assigned { name, number, from: 0, end: None }));
            }
        }
        eprintln!("clickagg: topic {} has {count} partitions now, {} before; reading the new ones", spec.topic, kafka.partitions);
        kafka.partitions = count;
        let (ids, assigned): (Vec<u32>, Vec<Assigned>) = assigned.into_iter().unzip();
        match kafka.consumer.assign(assigned) {
            Ok(feeds) => {
                let header = kafka.consumer.spec().header();
                for (id, feed) in ids.into_iter().zip(feeds) {
                    let name = feed.name().to_string();
                    eprintln!("clickagg: new partition {name}");
                    inputs.found(id, name.clone());
                    self.tails.push(Tail::new(PartitionSource::open_kafka(id, name, feed, header.clone(), None)));
                }
            }
            Err(e) => {
                eprintln!("clickagg: {e}");
                self.errors.push(e);
            }
        }
    }
}
