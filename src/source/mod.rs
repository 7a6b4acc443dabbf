//! Sources: each worker reads its share of the partition files, turns lines into clicks (or dead
//! letters), and decides by the partition's own event-time rules when each click enters.

pub mod kafka;
pub mod parse;
pub mod preflight;
pub mod reader;
pub mod tail;

pub use tail::{discovered_partition_id, Follow};

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clickagg_dataflows::{
    Admission, Click, DeadLetter, EventTimeRules, PartitionClock, PartitionProgress, Reason, Time,
};

use crate::error::EdgeError;
use kafka::feed::KafkaFeed;
use parse::{Header, LineParser};
use reader::{Line, LineReader};

/// The partition files of a log directory, sorted by name: `part-*.csv`.
pub fn list_partitions(dir: &Path) -> Result<Vec<PathBuf>, EdgeError> {
    let unreadable = |source| EdgeError::LogDirectory { path: dir.to_path_buf(), source };
    let entries = std::fs::read_dir(dir).map_err(unreadable)?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(unreadable)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("part-") && name.ends_with(".csv") {
            // Something named like a partition that cannot be read as one is an error, not a
            // partition that silently goes missing.
            if !entry.path().is_file() {
                return Err(EdgeError::NotAPartition { path: entry.path() });
            }
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// The partitions a run found at its start, where they live: a store being resumed checks that
/// each one it read is still there and still the one it read.
pub enum Located<'a> {
    /// Partition files.
    Files(&'a [PathBuf]),
    /// A Kafka topic's partitions, with their offsets at the start.
    Topic(&'a kafka::TopicPartitions),
}

/// The name a partition is known by in outputs: its file name.
pub fn partition_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

enum HeaderState {
    Unread,
    Good(LineParser),
    Bad,
}

/// Where a partition's lines come from.
enum Feed {
    /// A partition file, read from a byte offset.
    File {
        path: PathBuf,
        /// The inode of the file opened, to tell a replaced file from a grown one.
        inode: u64,
        reader: LineReader<File>,
        /// How many bytes `progress.head_hash` covers (`u64::MAX`: none taken yet).
        head_bytes: u64,
    },
    /// A Kafka topic partition, read from an offset (see [`kafka::feed`]).
    Kafka(KafkaFeed),
}

/// One partition being read by one worker.
pub struct PartitionSource {
    progress: PartitionProgress,
    name: String,
    feed: Feed,
    header: HeaderState,
    clock: PartitionClock,
    /// Reconciliation: rows too late for `run` still enter, all at this time, after every other
    /// row (see `hold_too_late_until`).
    too_late_at: Option<Time>,
    /// Recovery: lines from this offset on enter no earlier than this time (see
    /// `hold_uncommitted_lines`).
    uncommitted_from: Option<(u64, Time)>,
}

/// How long a replay's read of a topic partition waits for the first message of a batch.
const KAFKA_FIRST_WAIT: Duration = Duration::from_millis(20);

/// A partition's head, hashed for the store: its first bytes, up to this many.
pub const HEAD_BYTES: u64 = 4096;

/// The first bytes of a partition hashed, to tell at a restart that the file is still the one
/// the store read (a replaced file fails this even when it is longer).
pub fn head_hash(path: &Path, len: u64) -> std::io::Result<u64> {
    use std::io::Read;
    let mut head = Vec::new();
    File::open(path)?.take(len.min(HEAD_BYTES)).read_to_end(&mut head)?;
    Ok(xxhash_rust::xxh3::xxh3_64(&head))
}

/// Where a source sends what it reads.
pub trait SourceOutput {
    fn click(&mut self, click: Click, time: Time);
    fn dead_letter(&mut self, dead: DeadLetter, time: Time);
}

impl PartitionSource {
    pub fn open(index: u32, path: &Path) -> Result<PartitionSource, String> {
        Self::open_at(index, path, None)
    }

    fn with_feed(index: u32, name: String, feed: Feed, header: HeaderState) -> PartitionSource {
        PartitionSource {
            progress: PartitionProgress { partition: index, ..Default::default() },
            name,
            feed,
            header,
            clock: PartitionClock::default(),
            too_late_at: None,
            uncommitted_from: None,
        }
    }

    /// Opens a partition to read from a checkpoint: `resume.offset` just past a line, with the
    /// partition's largest ts and counters as they were there. The header is read first.
    pub fn open_at(index: u32, path: &Path, resume: Option<PartitionProgress>) -> Result<PartitionSource, String> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::MetadataExt;
        let cannot = |e: std::io::Error| format!("cannot open partition {}: {e}", path.display());
        let mut file = File::open(path).map_err(cannot)?;
        let inode = file.metadata().map_err(cannot)?.ino();
        let feed = Feed::File {
            path: path.to_path_buf(),
            inode,
            reader: LineReader::new(File::open(path).map_err(cannot)?, 0),
            head_bytes: u64::MAX,
        };
        let mut source = Self::with_feed(index, partition_name(path), feed, HeaderState::Unread);
        let Some(resume) = resume.filter(|r| r.offset > 0) else { return Ok(source) };
        let Feed::File { reader, .. } = &mut source.feed else { unreachable!("a file's feed") };
        // The header decides how every later line parses.
        source.header = match reader.next_line(false).map_err(cannot)? {
            Some(Line::Complete { bytes, .. }) => match Header::parse(bytes) {
                Ok(header) => HeaderState::Good(LineParser::new(header)),
                Err(_) => HeaderState::Bad,
            },
            _ => HeaderState::Bad,
        };
        file.seek(SeekFrom::Start(resume.offset)).map_err(cannot)?;
        *reader = LineReader::new(file, resume.offset);
        source.resume_from(index, resume);
        source.take_head_hash().map_err(cannot)?;
        Ok(source)
    }

    /// A Kafka topic partition (`feed`, positioned at `resume.offset` when given), whose
    /// messages are lines in `header`'s column order.
    pub fn open_kafka(index: u32, name: String, feed: KafkaFeed, header: Header, resume: Option<PartitionProgress>) -> PartitionSource {
        let mut source = Self::with_feed(index, name, Feed::Kafka(feed), HeaderState::Good(LineParser::new(header)));
        if let Some(resume) = resume {
            source.resume_from(index, resume);
        }
        source
    }

    fn resume_from(&mut self, index: u32, resume: PartitionProgress) {
        self.progress = PartitionProgress { partition: index, finished: false, head_hash: 0, ..resume };
        self.clock = PartitionClock { max_ts: resume.max_ts };
    }

    /// Where the next line starts: a byte offset in a file, a Kafka offset in a topic partition.
    fn offset(&self) -> u64 {
        match &self.feed {
            Feed::File { reader, .. } => reader.offset(),
            Feed::Kafka(feed) => feed.offset(),
        }
    }

    /// Hashes the head of the file again if the offset grew past what the hash covers (only
    /// while in the first [`HEAD_BYTES`]: a partition's first read or two). The hash covers the
    /// first `min(offset, HEAD_BYTES)` bytes, so that the store can tell at a resume whether the
    /// file is the one it read. A topic partition has none: its offsets name its messages.
    fn take_head_hash(&mut self) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let Feed::File { reader, head_bytes, .. } = &mut self.feed else { return Ok(()) };
        let wanted = reader.offset().min(HEAD_BYTES);
        if wanted == *head_bytes {
            return Ok(());
        }
        let mut head = vec![0u8; wanted as usize];
        reader.get_ref().read_exact_at(&mut head, 0)?;
        self.progress.head_hash = xxhash_rust::xxh3::xxh3_64(&head);
        *head_bytes = wanted;
        Ok(())
    }

    /// After a read that found no line: whether that means the partition has no more now. A
    /// file at its end has none; a topic partition's empty queue means so only once the broker
    /// has said where the partition ends (see [`KafkaFeed::caught_up`]).
    pub fn is_caught_up(&self) -> bool {
        match &self.feed {
            Feed::File { .. } => true,
            Feed::Kafka(feed) => feed.caught_up(),
        }
    }

    /// The partition's name: its file name, or `TOPIC-N`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reconciliation: a row too late for `run` is still dead-lettered as `too_late` (so that it
    /// can be listed), and also enters the dataflow as a click at `time`, which must be after
    /// every other row's time. The answers before `time` are then `run`'s, and those after it
    /// the reconciled ones: one replay gives both, and the updates at `time` are the difference.
    pub fn hold_too_late_until(&mut self, time: Time) {
        self.too_late_at = Some(time);
    }

    /// Recovery of a store: the lines from `offset` on (where the partition's committed lines
    /// end) were never read by the run that committed, or were read after its last commit, so
    /// that run would have given them times at or after `frontier`, its committed frontier. They
    /// enter no earlier than that here too. Otherwise a line finished after the stop (the end of
    /// an overlong line, or rows of a partition that had gone idle) could fall before the
    /// frontier, where the recovery writes nothing: it would be lost.
    pub fn hold_uncommitted_lines(&mut self, offset: u64, frontier: Time) {
        self.uncommitted_from = Some((offset, frontier));
    }

    /// Follow mode, at the end of the data: whether the file is still the one being read and
    /// has not shrunk. `Some(description)` when it was truncated, replaced or deleted.
    pub fn rotation(&self) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        // A topic partition is never truncated or replaced under its offsets: what retention
        // deletes is a gap, which the feed reports.
        let Feed::File { path, inode, reader, .. } = &self.feed else { return None };
        let position = reader.read_position();
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("the partition file was deleted".into()),
            Err(e) => Some(format!("the partition file cannot be read: {e}")),
            Ok(meta) if meta.ino() != *inode => Some("the partition file was replaced by another file".into()),
            Ok(meta) if meta.len() < position => {
                Some(format!("the partition file was truncated from {position} to {} bytes", meta.len()))
            }
            Ok(_) => None,
        }
    }

    /// Stops reading a partition that was rotated, with a dead letter that says how.
    pub fn report_rotation(&mut self, description: String, rules: &EventTimeRules, floor: Time, out: &mut impl SourceOutput) {
        let dead = DeadLetter {
            partition: self.progress.partition,
            offset: self.offset(),
            reason: Reason::PartitionRotated,
            line: description.into_bytes(),
        };
        out.dead_letter(dead, rules.partition_watermark(&self.clock).max(floor));
        self.progress.finished = true;
    }

    pub fn progress(&self) -> PartitionProgress {
        PartitionProgress { offset: self.offset(), max_ts: self.clock.max_ts, ..self.progress }
    }

    /// Stops reading after an IO error: the partition no longer holds the watermark back.
    pub fn give_up(&mut self) {
        self.progress.finished = true;
    }

    pub fn is_finished(&self) -> bool {
        self.progress.finished
    }

    /// The logical time before which this partition will send nothing more.
    pub fn watermark(&self, rules: &EventTimeRules) -> Time {
        if self.progress.finished {
            Time::MAX
        } else {
            rules.partition_watermark(&self.clock)
        }
    }

    /// Reads up to `max_lines` lines and returns how many it read. At the end of a final file
    /// the partition is finished.
    ///
    /// `floor` is the earliest time the worker's input can still take. The rules' times are never
    /// below it in a replay; in follow mode a partition that was idle, or appeared late, may be
    /// behind it, and its rows then enter at `floor`, or go to the dead letter when their minute
    /// is already final there.
    pub fn read_some(
        &mut self,
        rules: &EventTimeRules,
        max_lines: usize,
        file_is_final: bool,
        floor: Time,
        out: &mut impl SourceOutput,
    ) -> std::io::Result<usize> {
        let read = self.read_lines(rules, max_lines, file_is_final, floor, out)?;
        self.take_head_hash()?;
        Ok(read)
    }

    /// [`read_some`](Self::read_some) but for the head's hash.
    fn read_lines(
        &mut self,
        rules: &EventTimeRules,
        max_lines: usize,
        file_is_final: bool,
        floor: Time,
        out: &mut impl SourceOutput,
    ) -> std::io::Result<usize> {
        let partition = self.progress.partition;
        for read in 0..max_lines {
            let line = match &mut self.feed {
                Feed::File { reader, .. } => reader.next_line(file_is_final)?,
                // A replay waits a moment for a batch's first message, which is usually on its
                // way (librdkafka fetches ahead); then it takes only what is there.
                Feed::Kafka(feed) => {
                    let wait = if read == 0 && feed.is_bounded() { KAFKA_FIRST_WAIT } else { Duration::ZERO };
                    feed.next_line(wait)?
                }
            };
            let Some(line) = line else {
                let at_end = match &self.feed {
                    Feed::File { .. } => file_is_final,
                    Feed::Kafka(feed) => feed.at_end(),
                };
                if at_end {
                    self.progress.finished = true;
                }
                return Ok(read);
            };
            let (offset, bytes, verdict) = match line {
                Line::Complete { offset, bytes } => (offset, bytes, None),
                Line::TooLong { offset, prefix } => (offset, prefix, Some(Reason::LineTooLong)),
                Line::Unterminated { offset, bytes } => (offset, bytes, Some(Reason::UnterminatedLine)),
            };
            let floor = match self.uncommitted_from {
                Some((from, frontier)) if offset >= from => floor.max(frontier),
                _ => floor,
            };
            if let HeaderState::Unread = self.header {
                self.header = match (verdict, Header::parse(bytes)) {
                    (None, Ok(header)) => HeaderState::Good(LineParser::new(header)),
                    _ => {
                        let reason = verdict.unwrap_or(Reason::BadHeader);
                        let dead = DeadLetter { partition, offset, reason, line: bytes.to_vec() };
                        self.progress.malformed += 1;
                        out.dead_letter(dead, rules.partition_watermark(&self.clock).max(floor));
                        HeaderState::Bad
                    }
                };
                continue;
            }
            self.progress.lines += 1;
            let parsed = match (&mut self.header, verdict) {
                (_, Some(reason)) => Err(reason),
                (HeaderState::Good(parser), None) => parser.parse(bytes),
                _ => Err(Reason::BadHeader),
            };
            match parsed {
                Ok(click) => match rules.admit(&mut self.clock, click.key.ts) {
                    Admission::Accepted { time, .. }
                        if time < floor && rules.is_final_at(click.minute(), floor) =>
                    {
                        self.progress.too_late += 1;
                        let dead = DeadLetter { partition, offset, reason: Reason::BehindWatermark, line: bytes.to_vec() };
                        out.dead_letter(dead, floor);
                    }
                    Admission::Accepted { time, late } => {
                        self.progress.accepted += 1;
                        self.progress.late += (late || time < floor) as u64;
                        out.click(click, time.max(floor));
                    }
                    Admission::TooLate => {
                        self.progress.too_late += 1;
                        let dead = DeadLetter { partition, offset, reason: Reason::TooLate, line: bytes.to_vec() };
                        out.dead_letter(dead, rules.partition_watermark(&self.clock).max(floor));
                        if let Some(at) = self.too_late_at {
                            out.click(click, at);
                        }
                    }
                },
                Err(reason) => {
                    self.progress.malformed += 1;
                    let dead = DeadLetter { partition, offset, reason, line: bytes.to_vec() };
                    out.dead_letter(dead, rules.partition_watermark(&self.clock).max(floor));
                }
            }
        }
        Ok(max_lines)
    }
}

/// Counts from reading and parsing partitions with no dataflow: the floor `run` is measured
/// against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParseCounts {
    pub lines: u64,
    pub accepted: u64,
    pub dead: u64,
    /// The largest ts of any click, accepted or not.
    pub max_ts: Option<u64>,
}

struct Tally<'a>(&'a mut ParseCounts);

impl SourceOutput for Tally<'_> {
    fn click(&mut self, click: Click, _time: Time) {
        self.0.accepted += 1;
        self.0.max_ts = self.0.max_ts.max(Some(click.key.ts));
    }
    fn dead_letter(&mut self, dead: DeadLetter, _time: Time) {
        self.0.dead += 1;
        std::hint::black_box(dead);
    }
}

/// Reads and parses every partition under `dir` with `threads` threads (partition `i` on thread
/// `i % threads`, as `run` assigns them to workers), applying the same event-time rules.
pub fn parse_only(dir: &Path, threads: usize, rules: &EventTimeRules) -> Result<ParseCounts, String> {
    let paths = list_partitions(dir)?;
    let results: Vec<Result<ParseCounts, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|thread| {
                let paths = &paths;
                scope.spawn(move || {
                    let mut counts = ParseCounts::default();
                    for (i, path) in paths.iter().enumerate().skip(thread).step_by(threads.max(1)) {
                        let mut source = PartitionSource::open(i as u32, path)?;
                        while !source.is_finished() {
                            source
                                .read_some(rules, 50_000, true, 0, &mut Tally(&mut counts))
                                .map_err(|e| format!("reading {}: {e}", path.display()))?;
                        }
                        counts.lines += source.progress().lines;
                    }
                    Ok(counts)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("parser thread panicked".into()))).collect()
    });
    let mut total = ParseCounts::default();
    for counts in results {
        let counts = counts?;
        total.lines += counts.lines;
        total.accepted += counts.accepted;
        total.dead += counts.dead;
        total.max_ts = total.max_ts.max(counts.max_ts);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Discard;
    impl SourceOutput for Discard {
        fn click(&mut self, _click: Click, _time: Time) {}
        fn dead_letter(&mut self, _dead: DeadLetter, _time: Time) {}
    }

    /// The reader hashes the head the store would hash from the file: the store checks it at a
    /// resume, on the one process that then reads every partition.
    #[test]
    fn the_head_hash_is_the_stores_hash_of_the_bytes_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("part-00000.csv");
        let mut text = String::from("event_id,ts,ad_id,campaign_id,user_id,ip,country\n");
        for i in 0..200u64 {
            text.push_str(&format!("e{i},{},{},7,1,10.0.0.1,US\n", 1_767_225_600_000 + i, i % 5));
        }
        std::fs::write(&path, &text).unwrap();
        let rules = EventTimeRules::default();
        let mut source = PartitionSource::open(0, &path).unwrap();
        let mut seen = Vec::new();
        while !source.is_finished() {
            source.read_some(&rules, 7, true, 0, &mut Discard).unwrap();
            let progress = source.progress();
            assert_eq!(progress.head_hash, super::head_hash(&path, progress.offset).unwrap(), "at {}", progress.offset);
            seen.push(progress.offset);
        }
        assert!(seen.iter().any(|&o| o < HEAD_BYTES) && seen.iter().any(|&o| o > HEAD_BYTES), "{seen:?}");
        // Resumed from a checkpoint, before any read.
        let checkpoint = PartitionProgress { offset: seen[2], head_hash: 0, ..source.progress() };
        let resumed = PartitionSource::open_at(0, &path, Some(checkpoint)).unwrap();
        assert_eq!(resumed.progress().head_hash, super::head_hash(&path, seen[2]).unwrap());
    }
}
