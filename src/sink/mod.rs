//! The output sink (SPEC §4): applies the dataflow's updates in time order, appends them to the
//! changelog, and writes each minute's answers to the view files once the minute is final, so
//! that the files hold every answer ever made final, whatever the dataflow later forgets.
//!
//! The sink depends on the layers below it: [`output`](crate::output) for the files,
//! [`storage`](crate::storage) for the store; a server receives each advance through
//! [`Publish`], which the serving layer implements.

mod merge;
mod runner;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;
use std::sync::Arc;

use clickagg_dataflows::{
    minute_of, Answer, EventTimeRules, Minute, PartitionProgress, ServingAnswer, SinkRecord, SourceNote, Time, MINUTE_MS,
};

use crate::model::{Counters, SnapshotByWindow, Summary};
use crate::output::changelog::write_change;
use crate::output::Files;
use crate::storage::{Batch, CommitStore, Committed, Committer, RunStore};
use merge::MergedRuns;
pub use runner::{SinkRunner, SinkThread};

/// Where the sink publishes what each frontier advance applied, for a server to read. The
/// serving layer implements it; the sink knows nothing else of serving.
pub trait Publish: Send + Sync {
    /// Applies one frontier advance atomically: the answers' updates in the order the sink
    /// applied them, the serving-only answers, the window snapshots taken, and the ingest
    /// counters. `frontier: None`: the input is complete.
    fn publish(
        &self,
        frontier: Option<Time>,
        updates: &[(Time, Answer, isize)],
        serving: &[(ServingAnswer, isize)],
        snapshots: Vec<SnapshotByWindow>,
        counters: Option<Counters>,
    );

    /// Told, on the commit thread, that the store has committed every update before `frontier`
    /// (`None`: the whole input): a server may then read those minutes from the store.
    fn committed(&self, _frontier: Option<Time>) {}
}

/// Applies the dataflow's updates in time order, and hands them to the output directory, the
/// store, and the server, whichever this run has.
pub struct OutputSink {
    /// Partition names by slot: the partitions listed at the start (slot = id), then those
    /// found later in follow mode.
    partition_names: Vec<String>,
    /// Slots of the partitions found after the start, by id.
    discovered: BTreeMap<u32, usize>,
    /// Notes of partitions found after the start that came before their names.
    unnamed: Vec<(SourceNote, Time, isize)>,
    rules: EventTimeRules,
    files: Option<Files>,
    /// The durable store and what its next commit holds.
    store: Option<(Committer, Batch)>,
    /// Recovery: updates before this time were committed by an earlier run. They are applied
    /// to the sink's own state (the window tops) but written nowhere.
    committed_before: Time,
    /// Recovery: when it began, until the frontier passes `committed_before`.
    recovering_since: Option<std::time::Instant>,
    /// Updates not yet complete (the frontier has not passed their time), as the sorted runs
    /// the workers sent.
    pending: BTreeMap<Time, Vec<Vec<(Answer, isize)>>>,
    /// Minutes before this one are final: later changes to them are retention forgetting them.
    closed_before: Minute,
    /// The current top K of each window: `(window, ad, clicks)`.
    window_members: BTreeSet<(u32, u64, u64)>,
    /// The next minute boundary whose window snapshot is due.
    next_boundary: Option<Minute>,
    /// The latest minute with an accepted click so far.
    last_minute: Option<Minute>,
    summary: Summary,
    /// The server's copy of the answers, when serving: fed what each advance applied.
    serving: Option<Arc<dyn Publish>>,
    applied: Vec<(Time, Answer, isize)>,
    /// Serving-only updates not yet complete, by time.
    pending_serving: BTreeMap<Time, Vec<(ServingAnswer, isize)>>,
    applied_serving: Vec<(ServingAnswer, isize)>,
    /// Window snapshots taken since the last publication, for the server.
    new_snapshots: Vec<SnapshotByWindow>,
    /// Duplicates found at times the frontier has not passed yet, by time.
    pending_duplicates: BTreeMap<Time, i64>,
    /// Dead letters taken since this process started, by reason, for the server.
    dead_letters_by_reason: BTreeMap<&'static str, u64>,
}

/// The partition a note is about.
fn note_partition(note: &SourceNote) -> u32 {
    match note {
        SourceNote::Dead(dead) => dead.partition,
        SourceNote::Progress(progress) => progress.partition,
        SourceNote::Found { partition, .. } => *partition,
    }
}

impl OutputSink {
    /// A sink that writes nowhere yet: add an output directory, a store, or a server.
    pub fn new(partition_names: Vec<String>, rules: EventTimeRules) -> OutputSink {
        let partitions = (0..partition_names.len() as u32)
            .map(|partition| PartitionProgress { partition, ..Default::default() })
            .collect();
        OutputSink {
            partition_names,
            discovered: BTreeMap::new(),
            unnamed: Vec::new(),
            rules,
            files: None,
            store: None,
            committed_before: 0,
            recovering_since: None,
            pending: BTreeMap::new(),
            closed_before: 0,
            window_members: BTreeSet::new(),
            next_boundary: None,
            last_minute: None,
            summary: Summary { partitions, ..Default::default() },
            serving: None,
            applied: Vec::new(),
            new_snapshots: Vec::new(),
            pending_serving: BTreeMap::new(),
            pending_duplicates: BTreeMap::new(),
            dead_letters_by_reason: BTreeMap::new(),
            applied_serving: Vec::new(),
        }
    }

    /// Writes the output directory `dir` (created; its files are replaced).
    pub fn write_files(&mut self, dir: &Path, windows: &[u32]) -> io::Result<()> {
        self.files = Some(Files::create(dir, windows)?);
        Ok(())
    }

    /// Commits every advance to `store`. With `committed`, the store already holds the updates
    /// before `committed.frontier`: this run rebuilds its state from them without writing them.
    /// `mirror` receives every advance too, before the store does.
    pub fn commit_to(&mut self, store: Box<dyn RunStore>, committed: Option<Committed>, mirror: Option<Box<dyn CommitStore>>) {
        if let Some(committed) = committed {
            self.committed_before = committed.frontier;
            self.recovering_since = Some(std::time::Instant::now());
            self.next_boundary = committed.next_boundary;
            self.last_minute = committed.last_minute;
        }
        let batch = Batch { partition_names: self.partition_names.clone(), ..Default::default() };
        // The server drops the minutes the store has committed as final (`serve_into` first).
        let on_commit = self
            .serving
            .clone()
            .map(|state| Box::new(move |frontier| state.committed(frontier)) as crate::storage::committer::OnCommit);
        self.store = Some((Committer::start(store, mirror, on_commit), batch));
    }

    /// Publishes every advance to `state` too, for the server; before [`Self::commit_to`], so
    /// that the server learns of each commit.
    pub fn serve_into(&mut self, state: Arc<dyn Publish>) {
        self.serving = Some(state);
    }

    /// The slot of partition `id`; `None` for a partition found after the start whose name has
    /// not come yet (see [`SourceNote::Found`]).
    fn slot(&self, id: u32) -> Option<usize> {
        if id & 0x8000_0000 == 0 {
            return ((id as usize) < self.partition_names.len()).then_some(id as usize);
        }
        self.discovered.get(&id).copied()
    }

    /// Names partition `id`, found after the start, and takes the notes of it that came first.
    ///
    /// One worker of the cluster reads each partition, and says so once. A second word of the
    /// same id means two processes read files of one name (`--local-logs` needs names unique),
    /// or two names share an id: either way its clicks would count twice, so the sink stops
    /// before the frontier passes the time of the second reader's first click.
    fn found(&mut self, id: u32, name: String) -> io::Result<()> {
        let clash = self.discovered.get(&id).copied().or_else(|| self.partition_names.iter().position(|known| *known == name));
        if let Some(slot) = clash {
            let error = format!(
                "partition {name} (found after the start) is read twice: two processes have a partition file of that name, \
                 or it shares its id with {}; nothing after it is committed. Give every partition a name of its own and restart",
                self.partition_names[slot]
            );
            eprintln!("clickagg: {error}");
            return Err(io::Error::other(error));
        }
        let slot = self.partition_names.len();
        self.partition_names.push(name.clone());
        self.summary.partitions.push(PartitionProgress { partition: slot as u32, ..Default::default() });
        self.discovered.insert(id, slot);
        if let Some((_, batch)) = &mut self.store {
            batch.partition_names.push(name);
        }
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unnamed).into_iter().partition(|(note, _, _)| note_partition(note) == id);
        self.unnamed = later;
        for (note, time, diff) in now {
            self.absorb(SinkRecord::Note(note), time, diff)?;
        }
        Ok(())
    }

    /// Takes one activation's batches of updates ([`absorb`](Self::absorb)), then applies what
    /// the frontier after it completes ([`advance`](Self::advance)).
    pub fn take_batches(&mut self, batches: Vec<Vec<(SinkRecord, Time, isize)>>, frontier: Option<Time>) -> io::Result<()> {
        for (record, time, diff) in batches.into_iter().flatten() {
            self.absorb(record, time, diff)?;
        }
        self.advance(frontier)
    }

    /// Takes one update from the dataflow; it is applied once the frontier passes its time.
    fn absorb(&mut self, record: SinkRecord, time: Time, diff: isize) -> io::Result<()> {
        match record {
            SinkRecord::Answers(run) => {
                // Sent with diff 1; were two equal runs ever consolidated, each change counts
                // that many times.
                let run = if diff == 1 { run } else { run.into_iter().map(|(answer, d)| (answer, d * diff)).collect() };
                // Beside the other workers' runs of the time: `advance` merges them.
                self.pending.entry(time).or_default().push(run);
            }
            SinkRecord::Note(SourceNote::Found { partition, name }) => return self.found(partition, name),
            SinkRecord::Note(note) if self.slot(note_partition(&note)).is_none() && note_partition(&note) & 0x8000_0000 != 0 => {
                self.unnamed.push((note, time, diff));
            }
            SinkRecord::Note(SourceNote::Dead(mut dead)) => {
                debug_assert_eq!(diff, 1);
                if time < self.committed_before {
                    return Ok(());
                }
                dead.partition = self.slot(dead.partition).unwrap_or(u32::MAX as usize) as u32;
                *self.dead_letters_by_reason.entry(dead.reason.as_str()).or_default() += 1;
                if let Some((_, batch)) = &mut self.store {
                    batch.dead_letters.push((time, dead.clone()));
                }
                if let Some(files) = &mut self.files {
                    files.dead_letters.push(dead);
                }
            }
            SinkRecord::Duplicates => *self.pending_duplicates.entry(time).or_default() += diff as i64,
            SinkRecord::Serving(answer) => {
                if self.serving.is_some() {
                    self.pending_serving.entry(time).or_default().push((answer, diff));
                }
            }
            SinkRecord::Note(SourceNote::Progress(mut progress)) => {
                let Some(slot) = self.slot(progress.partition) else { return Ok(()) };
                progress.partition = slot as u32;
                let known = &mut self.summary.partitions[slot];
                if (progress.offset, progress.finished) >= (known.offset, known.finished) {
                    *known = progress;
                    if let Some((_, batch)) = &mut self.store {
                        batch.progress.insert(self.partition_names[progress.partition as usize].clone(), progress);
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies every update at times before `frontier` (`None`: the input is complete) in time
    /// order, writes out the minutes that became final and the window snapshots that fell due,
    /// and commits to the store.
    fn advance(&mut self, frontier: Option<Time>) -> io::Result<()> {
        while let Some(entry) = self.pending.first_entry() {
            if frontier.is_some_and(|f| *entry.key() >= f) {
                break;
            }
            let (time, runs) = entry.remove_entry();
            // Everything before `time` is applied: close and snapshot what that completes.
            self.reach(time)?;
            let updates = MergedRuns::of(runs);
            let committed_earlier = time < self.committed_before;
            let mut open: Option<(Minute, Vec<(Answer, isize)>)> = None;
            if let Some(files) = &mut self.files {
                files.prefix.start(time);
            }
            for (answer, diff) in updates {
                match answer.minute() {
                    // A change to a closed minute can only be state retention forgetting it.
                    Some(minute) if minute < self.closed_before => continue,
                    Some(minute) => {
                        if let Some(files) = &mut self.files {
                            // Sorted answers come in runs of one minute: its rows are taken out of
                            // the map for the run, not looked up for each.
                            if open.as_ref().is_none_or(|(held, _)| *held != minute) {
                                if let Some((held, rows)) = open.take() {
                                    files.open_minutes.insert(held, rows);
                                }
                                let rows = files.open_minutes.remove(&minute);
                                open = Some((minute, rows.unwrap_or_else(|| files.spare_minutes.pop().unwrap_or_default())));
                            }
                            open.as_mut().expect("just taken").1.push((answer, diff));
                        }
                        // Every accepted click is counted billable or excluded.
                        if let Answer::AdMinute { .. } | Answer::FraudMinute { .. } = answer {
                            self.last_minute = self.last_minute.max(Some(minute));
                        }
                    }
                    None => {
                        if let Answer::TopWindow { window, ad, clicks } = answer {
                            if diff > 0 {
                                self.window_members.insert((window, ad, clicks));
                            } else {
                                self.window_members.remove(&(window, ad, clicks));
                            }
                        }
                    }
                }
                if self.serving.is_some() {
                    self.applied.push((time, answer, diff));
                }
                if committed_earlier {
                    continue;
                }
                if let Some(files) = &mut self.files {
                    write_change(&mut files.changelog, &mut files.prefix, &answer, diff)?;
                }
                if let Some((_, batch)) = &mut self.store {
                    batch.changes.push((time, answer, diff));
                }
                self.summary.changelog_rows += 1;
            }
            if let (Some(files), Some((held, rows))) = (&mut self.files, open) {
                files.open_minutes.insert(held, rows);
            }
            self.next_boundary.get_or_insert(minute_of(time) + 1);
        }
        self.count_duplicates_before(frontier);
        match frontier {
            Some(frontier) => self.reach(frontier)?,
            None => {
                self.close_minutes_before(Minute::MAX)?;
                let last_boundary = self.last_minute.map_or(0, |m| m + 1);
                self.take_snapshots_through(last_boundary);
                if let Some(files) = &mut self.files {
                    files.write_snapshots(last_boundary)?;
                }
            }
        }
        // Every update before the committed watermark is applied again: the state is as it was.
        if frontier.is_none_or(|f| f >= self.committed_before) {
            if let Some(since) = self.recovering_since.take() {
                // Said once, for operators and for the recovery benchmark.
                eprintln!(
                    "clickagg: recovered: the state as of the committed watermark {} was rebuilt in {:.3} s; committing again",
                    self.committed_before,
                    since.elapsed().as_secs_f64()
                );
            }
        }
        let serving_frontier = self.take_serving(frontier);
        if let Some((store, batch)) = &mut self.store {
            // From the committed watermark on: at it exactly, every update before it is skipped
            // above, but the offsets of lines that did not move it must still be committed.
            if frontier.is_none_or(|f| f >= self.committed_before) {
                batch.next_boundary = self.next_boundary;
                batch.last_minute = self.last_minute;
                store.commit(frontier, batch).map_err(io::Error::other)?;
            }
        }
        self.publish_serving(serving_frontier);
        Ok(())
    }

    /// Adds the duplicates found at times before `frontier` (all of them, when the input is
    /// complete) to the summary.
    fn count_duplicates_before(&mut self, frontier: Option<Time>) {
        while let Some(entry) = self.pending_duplicates.first_entry() {
            if frontier.is_some_and(|f| *entry.key() >= f) {
                break;
            }
            let found = entry.remove();
            self.summary.duplicates = (self.summary.duplicates as i64 + found).max(0) as u64;
        }
    }

    /// Applies the serving-only updates that `frontier` completes (into `applied_serving`, and
    /// the store's batch), and returns the frontier the server's answers stand at.
    fn take_serving(&mut self, frontier: Option<Time>) -> Option<Time> {
        // Serving-only answers: a change at or after its minute's final time is retention
        // forgetting it, as for the view files.
        // Once every row is read, updates from the end of the last minute on are the sliding
        // windows emptying as their minutes expire: the answers stand as of that boundary, and
        // so does the watermark they report. The frontier may pass through those times before
        // it is empty (when one path of the dataflow finishes before another), so the end is
        // recognised by the partitions being read to the end, not only by the empty frontier.
        let end = self.last_minute.map_or(0, |m| (m as Time + 1) * MINUTE_MS);
        let read = !self.summary.partitions.is_empty() && self.summary.partitions.iter().all(|p| p.finished);
        let frontier = match frontier {
            Some(f) if read => Some(f.min(end)),
            other => other,
        };
        let limit = frontier.unwrap_or(end);
        while let Some(entry) = self.pending_serving.first_entry() {
            if *entry.key() >= limit {
                if frontier.is_none() {
                    self.pending_serving.clear();
                }
                break;
            }
            let (time, mut updates) = entry.remove_entry();
            differential_dataflow::consolidation::consolidate(&mut updates);
            for (answer, diff) in updates {
                let forgetting = answer.minute().is_some_and(|minute| self.rules.is_final_at(minute, time));
                if !forgetting {
                    if let Some((_, batch)) = self.store.as_mut().filter(|_| time >= self.committed_before) {
                        batch.serving.push((time, answer, diff));
                    }
                    self.applied_serving.push((answer, diff));
                }
            }
        }
        frontier
    }

    /// Hands what the advance applied to the server, as of `frontier` ([`Self::take_serving`]'s).
    fn publish_serving(&mut self, frontier: Option<Time>) {
        if let Some(state) = &self.serving {
            let counters = Counters {
                partitions: self.summary.partitions.clone(),
                changelog_rows: self.summary.changelog_rows,
                duplicates: self.summary.duplicates,
                dead_letters: self.dead_letters_by_reason.clone(),
                ..Default::default()
            };
            state.publish(frontier, &self.applied, &self.applied_serving, std::mem::take(&mut self.new_snapshots), Some(counters));
            self.applied.clear();
            self.applied_serving.clear();
        }
    }

    /// Every update before `time` has been applied.
    fn reach(&mut self, time: Time) -> io::Result<()> {
        self.close_minutes_before(self.rules.final_minutes_before(time))?;
        // Snapshot w holds the updates before w's first millisecond.
        self.take_snapshots_through(minute_of(time));
        let known = self.last_minute.map_or(0, |m| m + 1);
        match &mut self.files {
            Some(files) => files.write_snapshots(known),
            None => Ok(()),
        }
    }

    fn close_minutes_before(&mut self, close_before: Minute) -> io::Result<()> {
        if let Some(files) = &mut self.files {
            while let Some(entry) = files.open_minutes.first_entry() {
                if *entry.key() >= close_before {
                    break;
                }
                let (minute, rows) = entry.remove_entry();
                files.write_minute(minute, rows, &mut self.summary)?;
            }
        }
        self.closed_before = self.closed_before.max(close_before);
        Ok(())
    }

    fn take_snapshots_through(&mut self, boundary: Minute) {
        let Some(next) = self.next_boundary.as_mut() else { return };
        while *next <= boundary {
            let members: Vec<(u32, u64, u64)> = self.window_members.iter().copied().collect();
            if self.serving.is_some() {
                let mut tops: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
                for &(window, ad, clicks) in &members {
                    tops.entry(window).or_default().push((ad, clicks));
                }
                for top in tops.values_mut() {
                    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                }
                self.new_snapshots.push((*next, tops));
            }
            // The store keeps every snapshot as it is taken (export stops at the last minute).
            if let Some((_, batch)) = &mut self.store {
                batch.snapshots.push((*next, members.clone()));
            }
            if let Some(files) = &mut self.files {
                files.snapshots.push_back((*next, members));
            }
            *next += 1;
        }
    }

    /// Writes what is still open and the dead letters, commits the end of the input, and
    /// returns the run's summary.
    pub fn finish(mut self) -> io::Result<Summary> {
        self.advance(None)?;
        // Every queued commit lands before the run reports success.
        let store = match self.store.take() {
            Some((committer, _)) => Some(committer.finish().map_err(io::Error::other)?),
            None => None,
        };
        if let Some(files) = &mut self.files {
            files.finish(&self.partition_names)?;
        } else if let Some(store) = store {
            store.summarize(&mut self.summary).map_err(io::Error::other)?;
        }
        Ok(self.summary)
    }
}
