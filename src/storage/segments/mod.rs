//! The segment store: where a server without `--store` keeps the final minutes it no longer
//! holds in memory (SPEC §6), in place of an SQLite store of its own.
//!
//! A final minute never changes, so it is written once, as compact sorted records, and only
//! read after that; nothing is recovered from it (it lives as long as the process). The commit
//! thread folds each advance's answer changes into the minutes still open ([`open`]); when a
//! minute becomes final (`EventTimeRules::final_minutes_before` the committed frontier) its
//! records are sorted, appended to a segment file ([`files`], laid out as [`format`] says)
//! and the minute leaves memory. Readers ([`SegmentReader`]) binary-search inside each
//! minute's sections through a read-only map of the file.
//!
//! Memory: the open minutes (bounded by retention: the minutes not final yet), and a
//! [`format::MinuteEntry`] of 56 bytes per sealed minute.
//!
//! Why not SQLite here: a served replay's committer inserted every answer row into B-trees and
//! their by-span indexes, and spent about 45% of the run's CPU doing so (perf, 10M events);
//! the sink waited for it. Sorting a minute once it is final and appending it costs a
//! fraction of that, and the server's queries need nothing more than a sorted run per minute.

mod files;
mod format;
mod open;
mod read;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::Path;

use clickagg_dataflows::{EventTimeRules, Minute, Time};

use super::{Batch, CommitStore, RunStore};
use crate::model::Summary;
use files::Appender;
use open::OpenMinute;
pub use read::SegmentReader;

/// The writer: the minutes still open, and the files the final ones are appended to.
pub struct SegmentStore {
    rules: EventTimeRules,
    open: BTreeMap<Minute, OpenMinute>,
    /// Every minute before this one is sealed (or had no answer): changes to it are retention
    /// forgetting it, as the sink treats them, and are not applied.
    sealed_before: Minute,
    appender: Appender,
    frontier: Option<Time>,
    /// The buffer a minute is encoded into.
    buffer: Vec<u8>,
}

impl SegmentStore {
    /// A new, empty store writing its files into `dir` (which exists, and is the store's
    /// alone), whose minutes are final by `rules`; and a reader of it.
    pub fn create(dir: &Path, rules: EventTimeRules) -> (SegmentStore, SegmentReader) {
        let appender = Appender::new(dir);
        let reader = SegmentReader::new(std::sync::Arc::clone(appender.shared()));
        let store = SegmentStore { rules, open: BTreeMap::new(), sealed_before: 0, appender, frontier: None, buffer: Vec::new() };
        (store, reader)
    }

    /// How many entries the open minutes hold (rows, members, history updates): bounded by the
    /// minutes retention keeps open, not by how many have been sealed.
    pub fn open_entries(&self) -> usize {
        self.open.values().map(OpenMinute::entries).sum()
    }

    /// Folds `batch`'s answer changes into the open minutes.
    fn fold(&mut self, batch: &Batch) {
        for (time, answer, diff) in &batch.changes {
            match answer.minute() {
                Some(minute) if minute >= self.sealed_before => self.open.entry(minute).or_default().apply(*time, answer, *diff),
                _ => {}
            }
        }
        for (_, answer, diff) in &batch.serving {
            match answer.minute() {
                Some(minute) if minute >= self.sealed_before => self.open.entry(minute).or_default().apply_serving(answer, *diff),
                _ => {}
            }
        }
    }

    /// Writes out every open minute before `before`, in minute order, and drops it from memory.
    fn seal_before(&mut self, before: Minute) -> Result<(), String> {
        while let Some(entry) = self.open.first_entry() {
            if *entry.key() >= before {
                break;
            }
            let (minute, answers) = entry.remove_entry();
            self.buffer.clear();
            let (counts, clicks, excluded) = answers.encode(&mut self.buffer);
            self.appender.append(minute, &self.buffer, counts, clicks, excluded)?;
        }
        self.sealed_before = self.sealed_before.max(before);
        Ok(())
    }
}

impl CommitStore for SegmentStore {
    /// Folds `batch` into the open minutes and seals the ones `frontier` makes final (all of
    /// them at the end of the input, `None`). Once this returns, a reader finds every minute
    /// final as of `frontier`.
    fn commit(&mut self, frontier: Option<Time>, batch: &Batch) -> Result<bool, String> {
        self.fold(batch);
        let before = frontier.map_or(Minute::MAX, |f| self.rules.final_minutes_before(f));
        self.seal_before(before)?;
        self.frontier = Some(frontier.unwrap_or(Time::MAX)).max(self.frontier);
        Ok(true)
    }
}

impl RunStore for SegmentStore {
    fn frontier(&self) -> Option<Time> {
        self.frontier
    }

    fn summarize(&self, summary: &mut Summary) -> Result<(), String> {
        SegmentReader::new(std::sync::Arc::clone(self.appender.shared())).summarize(summary);
        Ok(())
    }
}
