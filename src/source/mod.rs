//! Sources: each worker reads its share of the partition files, turns lines into clicks (or dead
//! letters), and decides by the partition's own event-time rules when each click enters.

pub mod parse;
pub mod preflight;
pub mod reader;
pub mod tail;

pub use tail::{discovered_partition_id, Follow};

use std::fs::File;
use std::path::{Path, PathBuf};

use clickagg_dataflows::{
    Admission, Click, DeadLetter, EventTimeRules, PartitionClock, PartitionProgress, Reason, Time,
};

use crate::error::EdgeError;
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

/// The name a partition is known by in outputs: its file name.
pub fn partition_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

enum HeaderState {
    Unread,
    Good(LineParser),
    Bad,
}

/// One partition being read by one worker.
pub struct PartitionSource {
    progress: PartitionProgress,
    path: PathBuf,
    /// The inode of the file opened, to tell a replaced file from a grown one.
    inode: u64,
    reader: LineReader<File>,
    header: HeaderState,
    clock: PartitionClock,
    /// Reconciliation: rows too late for `run` still enter, all at this time, after every other
    /// row (see `hold_too_late_until`).
    too_late_at: Option<Time>,
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

    /// Opens a partition to read from a checkpoint: `resume.offset` just past a line, with the
    /// partition's largest ts and counters as they were there. The header is read first.
    pub fn open_at(index: u32, path: &Path, resume: Option<PartitionProgress>) -> Result<PartitionSource, String> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::MetadataExt;
        let cannot = |e: std::io::Error| format!("cannot open partition {}: {e}", path.display());
        let mut file = File::open(path).map_err(cannot)?;
        let inode = file.metadata().map_err(cannot)?.ino();
        let mut source = PartitionSource {
            progress: PartitionProgress { partition: index, ..Default::default() },
            path: path.to_path_buf(),
            inode,
            reader: LineReader::new(File::open(path).map_err(cannot)?, 0),
            header: HeaderState::Unread,
            clock: PartitionClock::default(),
            too_late_at: None,
        };
        let Some(resume) = resume.filter(|r| r.offset > 0) else { return Ok(source) };
        // The header decides how every later line parses.
        source.header = match source.reader.next_line(false).map_err(cannot)? {
            Some(Line::Complete { bytes, .. }) => match Header::parse(bytes) {
                Ok(header) => HeaderState::Good(LineParser::new(header)),
                Err(_) => HeaderState::Bad,
            },
            _ => HeaderState::Bad,
        };
        file.seek(SeekFrom::Start(resume.offset)).map_err(cannot)?;
        source.reader = LineReader::new(file, resume.offset);
        source.progress = PartitionProgress { partition: index, finished: false, ..resume };
        source.clock = PartitionClock { max_ts: resume.max_ts };
        Ok(source)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reconciliation: a row too late for `run` is still dead-lettered as `too_late` (so that it
    /// can be listed), and also enters the dataflow as a click at `time`, which must be after
    /// every other row's time. The answers before `time` are then `run`'s, and those after it
    /// the reconciled ones: one replay gives both, and the updates at `time` are the difference.
    pub fn hold_too_late_until(&mut self, time: Time) {
        self.too_late_at = Some(time);
    }

    /// Follow mode, at the end of the data: whether the file is still the one being read and
    /// has not shrunk. `Some(description)` when it was truncated, replaced or deleted.
    pub fn rotation(&self) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let position = self.reader.read_position();
        match std::fs::metadata(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("the partition file was deleted".into()),
            Err(e) => Some(format!("the partition file cannot be read: {e}")),
            Ok(meta) if meta.ino() != self.inode => Some("the partition file was replaced by another file".into()),
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
            offset: self.reader.offset(),
            reason: Reason::PartitionRotated,
            line: description.into_bytes(),
        };
        out.dead_letter(dead, rules.partition_watermark(&self.clock).max(floor));
        self.progress.finished = true;
    }

    pub fn progress(&self) -> PartitionProgress {
        PartitionProgress { offset: self.reader.offset(), max_ts: self.clock.max_ts, ..self.progress }
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
        let partition = self.progress.partition;
        for read in 0..max_lines {
            let Some(line) = self.reader.next_line(file_is_final)? else {
                if file_is_final {
                    self.progress.finished = true;
                }
                return Ok(read);
            };
            let (offset, bytes, verdict) = match line {
                Line::Complete { offset, bytes } => (offset, bytes, None),
                Line::TooLong { offset, prefix } => (offset, prefix, Some(Reason::LineTooLong)),
                Line::Unterminated { offset, bytes } => (offset, bytes, Some(Reason::UnterminatedLine)),
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
