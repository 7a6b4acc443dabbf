//! The output sink (SPEC §4): applies the dataflow's updates in time order, appends them to the
//! changelog, and writes each minute's answers to the view files once the minute is final, so
//! that the files hold every answer ever made final, whatever the dataflow later forgets.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clickagg_dataflows::{
    minute_of, Answer, DeadLetter, EventTimeRules, Minute, PartitionProgress, ServingAnswer, SinkRecord, SourceNote, Time,
    View, MINUTE_MS,
};

use crate::serve::state::{Counters, ServingState};
use crate::store::{Batch, Committed, Committer, Store};

/// What a run saw, for the summary a human reads and for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub partitions: Vec<PartitionProgress>,
    /// Distinct billable clicks counted (the sum of `ad_minute.csv`).
    pub clicks: u64,
    /// Distinct clicks excluded by the fraud rules (the sum of `fraud_minute.csv`).
    pub excluded: u64,
    pub minutes: u64,
    pub busiest_minute: Option<BusiestMinute>,
    pub changelog_rows: u64,
}

/// The minute with the most clicks, its clicks, and its top 10 `(ad, clicks)`.
pub type BusiestMinute = (Minute, u64, Vec<(u64, u64)>);

/// The sliding windows' top K at a minute boundary, as the sink takes it: the boundary, and
/// `(window, ad, clicks)` for each member of each window.
pub type WindowSnapshot = (Minute, Vec<(u32, u64, u64)>);

/// The same snapshot as the server keeps it: the boundary, and each window's `(ad, clicks)`.
pub type SnapshotByWindow = (Minute, BTreeMap<u32, Vec<(u64, u64)>>);

impl Summary {
    fn total(&self, f: impl Fn(&PartitionProgress) -> u64) -> u64 {
        self.partitions.iter().map(f).sum()
    }
    pub fn lines(&self) -> u64 {
        self.total(|p| p.lines)
    }
    pub fn accepted(&self) -> u64 {
        self.total(|p| p.accepted)
    }
    pub fn late(&self) -> u64 {
        self.total(|p| p.late)
    }
    pub fn too_late(&self) -> u64 {
        self.total(|p| p.too_late)
    }
    pub fn malformed(&self) -> u64 {
        self.total(|p| p.malformed)
    }
    /// Accepted deliveries that were copies of a click already counted.
    pub fn duplicates(&self) -> u64 {
        self.accepted() - self.clicks - self.excluded
    }
}

/// The files of an output directory being written.
struct Files {
    dir: PathBuf,
    changelog: LineFile,
    /// The per-minute views' files, in `View::PER_MINUTE` order.
    views: Vec<LineFile>,
    /// `top_window_{M}m.csv` for each window M.
    window_files: BTreeMap<u32, LineFile>,
    /// Every change applied to each minute that is not final yet; consolidated when it closes.
    open_minutes: BTreeMap<Minute, Vec<(Answer, isize)>>,
    /// The lists of minutes written out, emptied, for minutes to come: a minute's list grows to
    /// tens of thousands of changes, and a reused one is neither grown again nor faulted in.
    spare_minutes: Vec<Vec<(Answer, isize)>>,
    /// Snapshots taken, held until a click at or after the minute before their boundary is seen:
    /// the files stop at the last minute's end, which is only known then.
    snapshots: VecDeque<WindowSnapshot>,
    dead_letters: Vec<DeadLetter>,
    /// The start of the changelog lines being written.
    prefix: LinePrefix,
    /// Deleting what a previous run wrote here (see [`set_aside_previous`]).
    deleting_previous: Option<std::thread::JoinHandle<()>>,
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
    serving: Option<Arc<ServingState>>,
    applied: Vec<(Time, Answer, isize)>,
    /// Serving-only updates not yet complete, by time.
    pending_serving: BTreeMap<Time, Vec<(ServingAnswer, isize)>>,
    applied_serving: Vec<(ServingAnswer, isize)>,
    /// Window snapshots taken since the last publication, for the server.
    new_snapshots: Vec<SnapshotByWindow>,
}

/// The partition a note is about.
fn note_partition(note: &SourceNote) -> u32 {
    match note {
        SourceNote::Dead(dead) => dead.partition,
        SourceNote::Progress(progress) => progress.partition,
        SourceNote::Found { partition, .. } => *partition,
    }
}

/// Creates (or empties) the file `path`, buffered for large writes: for the store's export, and
/// the dead letters.
pub(crate) fn create(path: &Path) -> io::Result<BufWriter<File>> {
    create_unbuffered(path).map(|f| BufWriter::with_capacity(1 << 20, f))
}

/// Creates (or empties) the file `path`, with an error that names it. The output directory's
/// files are created once [`set_aside_previous`] has moved a previous run's out of the way.
fn create_unbuffered(path: &Path) -> io::Result<File> {
    File::create(path).map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display())))
}

/// An output file whose lines are formatted straight into its buffer.
///
/// Through a `BufWriter`, each line is built in a buffer of its own and then copied in: for the
/// 15M short lines of a 10M-click replay, that second copy was a tenth of the sink's time.
struct LineFile {
    file: File,
    buffer: Vec<u8>,
}

impl LineFile {
    /// Written to the file once the buffer holds this much.
    const WRITE_AT: usize = 1 << 20;

    fn create(path: &Path) -> io::Result<LineFile> {
        let file = create_unbuffered(path)?;
        // Room for the longest line past `WRITE_AT`, so that the buffer never grows.
        Ok(LineFile { file, buffer: Vec::with_capacity(Self::WRITE_AT + 4096) })
    }

    /// The buffer, to append one whole line to; then [`LineFile::end_line`].
    fn line(&mut self) -> &mut Vec<u8> {
        &mut self.buffer
    }

    fn end_line(&mut self) -> io::Result<()> {
        if self.buffer.len() >= Self::WRITE_AT {
            self.write_buffer()?;
        }
        Ok(())
    }

    fn write_buffer(&mut self) -> io::Result<()> {
        self.file.write_all(&self.buffer)?;
        self.buffer.clear();
        Ok(())
    }
}

impl Write for LineFile {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        self.end_line()?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_buffer()?;
        self.file.flush()
    }
}

impl Drop for LineFile {
    /// As a `BufWriter` does: what is buffered is written, and an error here goes unreported
    /// (a run that ends normally has flushed every file, and reported any error then).
    fn drop(&mut self) {
        let _ = self.write_buffer();
    }
}

/// Where [`set_aside_previous`] moves a previous run's files, inside the output directory.
const SET_ASIDE_PREFIX: &str = ".clickagg-replaced-";

/// Moves the files at `paths` that a previous run wrote into a directory of their own inside
/// `dir`, and deletes that directory (and any that a run stopped before deleting) on a thread.
/// Other files in `dir` stay.
///
/// Why not empty or replace them in place: a previous run's 600 MB are often still being
/// written back. Truncating them blocks until that is done, and ext4 writes back a file emptied
/// this way when it is closed, at the end of the run, on the sink's thread; renaming onto them
/// makes the rename free their pages. A rename to a new name does neither, and a fresh file
/// costs what it costs in an empty directory. With 2 workers, a run over its own previous output
/// took 3.13 s against 3.01 s into a new directory; setting the files aside took it from 3.07 to
/// 2.91 s (interleaved, the same CPU time).
fn set_aside_previous(dir: &Path, paths: &[PathBuf]) -> io::Result<Option<std::thread::JoinHandle<()>>> {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let aside = dir.join(format!("{SET_ASIDE_PREFIX}{}-{stamp}", std::process::id()));
    for (number, path) in paths.iter().enumerate() {
        // Only a file: a symbolic link is written through, as before, and a directory in the
        // way is an error when the file is created, not something to delete.
        if std::fs::symlink_metadata(path).is_ok_and(|meta| meta.is_file()) {
            std::fs::create_dir_all(&aside)?;
            std::fs::rename(path, aside.join(number.to_string()))
                .map_err(|e| io::Error::new(e.kind(), format!("cannot move {} aside: {e}", path.display())))?;
        }
    }
    let mut doomed = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(SET_ASIDE_PREFIX) {
            doomed.push(entry.path());
        }
    }
    if doomed.is_empty() {
        return Ok(None);
    }
    let thread = std::thread::Builder::new().name("clickagg:rm-old".into()).spawn(move || {
        for path in doomed {
            // This run's files are complete without it: said, not failed.
            if let Err(e) = std::fs::remove_dir_all(&path) {
                eprintln!("clickagg: warning: cannot delete {}, a previous run's files: {e}", path.display());
            }
        }
    })?;
    Ok(Some(thread))
}

impl Files {
    /// Creates the output directory's files, setting aside what a previous run wrote there.
    fn create(dir: &Path, windows: &[u32]) -> io::Result<Files> {
        std::fs::create_dir_all(dir.join("changelog"))
            .map_err(|source| crate::error::EdgeError::OutputDirectory { path: dir.to_path_buf(), source })?;
        let changelog_path = dir.join("changelog").join("updates.csv");
        let view_path = |view: View| dir.join(format!("{}.csv", view.name()));
        let window_path = |window: u32| dir.join(format!("top_window_{window}m.csv"));
        let previous: Vec<PathBuf> = std::iter::once(changelog_path.clone())
            .chain(View::PER_MINUTE.iter().map(|&view| view_path(view)))
            .chain(windows.iter().map(|&window| window_path(window)))
            .chain(std::iter::once(dir.join("dead_letter.csv")))
            .collect();
        let deleting_previous = set_aside_previous(dir, &previous)?;
        let mut changelog = LineFile::create(&changelog_path)?;
        changelog.write_all(b"time,view,key,value,diff\n")?;
        let mut views = Vec::new();
        for view in View::PER_MINUTE {
            let mut file = LineFile::create(&view_path(view))?;
            file.write_all(match view {
                View::AdMinute => b"minute,ad_id,clicks\n".as_slice(),
                View::CampaignMinute => b"minute,campaign_id,clicks\n",
                View::CountryMinute => b"minute,country,ad_id,clicks\n",
                View::TopMinute => b"minute,rank,ad_id,clicks\n",
                View::FraudMinute => b"minute,ad_id,excluded_clicks\n",
                View::TopWindow => unreachable!("window files are opened below, one per window"),
            })?;
            views.push(file);
        }
        let mut window_files = BTreeMap::new();
        for &window in windows {
            let mut file = LineFile::create(&window_path(window))?;
            file.write_all(b"as_of,rank,ad_id,clicks\n")?;
            window_files.insert(window, file);
        }
        Ok(Files {
            dir: dir.to_path_buf(),
            changelog,
            views,
            window_files,
            open_minutes: BTreeMap::new(),
            spare_minutes: Vec::new(),
            snapshots: VecDeque::new(),
            dead_letters: Vec::new(),
            prefix: LinePrefix::default(),
            deleting_previous,
        })
    }

    /// Writes the snapshots of boundaries up to `through` (inclusive).
    fn write_snapshots(&mut self, through: Minute) -> io::Result<()> {
        while self.snapshots.front().is_some_and(|(boundary, _)| *boundary <= through) {
            let (boundary, members) = self.snapshots.pop_front().expect("checked above");
            for (&window, file) in &mut self.window_files {
                let mut ranked: Vec<(u64, u64)> =
                    members.iter().filter(|m| m.0 == window).map(|&(_, ad, clicks)| (ad, clicks)).collect();
                write_ranked(file, boundary, &mut ranked)?;
            }
        }
        Ok(())
    }

    /// Writes a final minute's rows to each view file, in the files' sort order.
    fn write_minute(&mut self, minute: Minute, mut changes: Vec<(Answer, isize)>, summary: &mut Summary) -> io::Result<()> {
        differential_dataflow::consolidation::consolidate(&mut changes);
        let mut top: Vec<(u64, u64)> = Vec::new();
        let mut total = 0;
        // Rows are built with itoa rather than `writeln!`: the views are most of what is written,
        // and the formatting machinery cost more than the numbers.
        let mut num = itoa::Buffer::new();
        let mut minute_num = itoa::Buffer::new();
        let minute_text = minute_num.format(minute).as_bytes();
        for (answer, count) in changes.drain(..) {
            assert_eq!(count, 1, "a view holds each answer once: {answer:?} x {count}");
            let (_, id, clicks) = answer.key_and_clicks();
            match answer.view() {
                View::AdMinute => total += clicks,
                View::TopMinute => {
                    top.push((id, clicks));
                    continue;
                }
                View::FraudMinute => summary.excluded += clicks,
                View::TopWindow => unreachable!("window answers belong to no minute"),
                View::CampaignMinute | View::CountryMinute => {}
            }
            let file = &mut self.views[answer.view() as usize];
            let line = file.line();
            line.extend_from_slice(minute_text);
            line.push(b',');
            push_key_and_clicks(line, &mut num, &answer, b',');
            line.push(b'\n');
            file.end_line()?;
        }
        self.spare_minutes.push(changes);
        write_ranked(&mut self.views[View::TopMinute as usize], minute, &mut top)?;
        if total > 0 {
            summary.clicks += total;
            summary.minutes += 1;
            if summary.busiest_minute.as_ref().is_none_or(|(_, best, _)| total > *best) {
                top.truncate(10);
                summary.busiest_minute = Some((minute, total, top));
            }
        }
        Ok(())
    }

    fn finish(&mut self, partition_names: &[String]) -> io::Result<()> {
        self.changelog.flush()?;
        for file in self.views.iter_mut().chain(self.window_files.values_mut()) {
            file.flush()?;
        }
        let mut file = create(&self.dir.join("dead_letter.csv"))?;
        file.write_all(b"partition,offset,reason,line\n")?;
        let name = |p: u32| partition_names.get(p as usize).map_or("?", String::as_str);
        self.dead_letters.sort_by(|a, b| (name(a.partition), a.offset).cmp(&(name(b.partition), b.offset)));
        for dead in &self.dead_letters {
            write!(file, "{},{},{},", name(dead.partition), dead.offset, dead.reason.as_str())?;
            write_quoted(&mut file, &dead.line)?;
            file.write_all(b"\n")?;
        }
        file.flush()?;
        // Long done by now, on any but the slowest disk: the run leaves no set-aside files behind.
        if let Some(thread) = self.deleting_previous.take() {
            thread.join().map_err(|_| io::Error::other("the thread deleting the previous run's files panicked"))?;
        }
        Ok(())
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
    pub fn commit_to(&mut self, store: Store, committed: Option<Committed>, mirror: Option<crate::postgres_sink::PostgresSink>) {
        if let Some(committed) = committed {
            self.committed_before = committed.frontier;
            self.recovering_since = Some(std::time::Instant::now());
            self.next_boundary = committed.next_boundary;
            self.last_minute = committed.last_minute;
        }
        let batch = Batch { partition_names: self.partition_names.clone(), ..Default::default() };
        self.store = Some((Committer::start(store, mirror), batch));
    }

    /// Publishes every advance to `state` too, for the server.
    pub fn serve_into(&mut self, state: Arc<ServingState>) {
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
                if let Some((_, batch)) = &mut self.store {
                    batch.dead_letters.push((time, dead.clone()));
                }
                if let Some(files) = &mut self.files {
                    files.dead_letters.push(dead);
                }
            }
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
        if let Some((store, batch)) = &mut self.store {
            // From the committed watermark on: at it exactly, every update before it is skipped
            // above, but the offsets of lines that did not move it must still be committed.
            if frontier.is_none_or(|f| f >= self.committed_before) {
                batch.next_boundary = self.next_boundary;
                batch.last_minute = self.last_minute;
                store.commit(frontier, batch).map_err(io::Error::other)?;
            }
        }
        self.publish_serving(frontier);
        Ok(())
    }

    fn publish_serving(&mut self, frontier: Option<Time>) {
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
                    self.applied_serving.push((answer, diff));
                }
            }
        }
        if let Some(state) = &self.serving {
            let counters = Counters {
                partitions: self.summary.partitions.clone(),
                changelog_rows: self.summary.changelog_rows,
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

/// The changelog's `view` of an answer: its view's name, and a window's its length too.
fn changelog_view(answer: &Answer) -> std::borrow::Cow<'static, str> {
    match answer {
        Answer::TopWindow { window, .. } => std::borrow::Cow::Owned(format!("top_window_{window}m")),
        _ => std::borrow::Cow::Borrowed(answer.view().name()),
    }
}

/// The changelog's `view` and `value` of an answer, its key columns joined by `/` in `key`.
pub fn changelog_fields(answer: &Answer, key: &mut String) -> (std::borrow::Cow<'static, str>, u64) {
    use std::fmt::Write as _;
    key.clear();
    let view = changelog_view(answer);
    if let Some(minute) = answer.minute() {
        let _ = write!(key, "{minute}/");
    }
    let (country, id, value) = answer.key_and_clicks();
    if let Some(country) = country {
        let _ = write!(key, "{country}/");
    }
    let _ = write!(key, "{id}");
    (view, value)
}

/// Ranks `(ad, clicks)` by clicks descending, then ad ascending (SPEC §3), and writes
/// `{at},{rank},{ad},{clicks}` rows.
pub fn write_ranked(out: &mut impl Write, at: Minute, ranked: &mut [(u64, u64)]) -> io::Result<()> {
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (rank, (ad, clicks)) in ranked.iter().enumerate() {
        writeln!(out, "{at},{},{ad},{clicks}", rank + 1)?;
    }
    Ok(())
}

/// A time's runs of answers, each sorted and consolidated as the workers send them, read as
/// one: in order, each answer once, with its diffs summed and none that sum to zero. Two runs
/// (one per worker, with two) are merged as they are read; one is read as it is; more are
/// sorted together.
struct MergedRuns {
    first: Vec<(Answer, isize)>,
    second: Vec<(Answer, isize)>,
    /// How much of each run has been read.
    read: (usize, usize),
}

impl MergedRuns {
    fn of(mut runs: Vec<Vec<(Answer, isize)>>) -> MergedRuns {
        let (first, second) = match runs.len() {
            0 | 1 => (runs.pop().unwrap_or_default(), Vec::new()),
            2 => {
                let second = runs.pop().expect("two runs");
                (runs.pop().expect("two runs"), second)
            }
            _ => {
                let mut all = runs.concat();
                differential_dataflow::consolidation::consolidate(&mut all);
                (all, Vec::new())
            }
        };
        MergedRuns { first, second, read: (0, 0) }
    }
}

impl Iterator for MergedRuns {
    type Item = (Answer, isize);

    fn next(&mut self) -> Option<(Answer, isize)> {
        loop {
            let (i, j) = self.read;
            let (a, b) = match (self.first.get(i), self.second.get(j)) {
                (Some(&a), Some(&b)) => (a, b),
                (Some(&a), None) => {
                    self.read.0 += 1;
                    return Some(a);
                }
                (None, Some(&b)) => {
                    self.read.1 += 1;
                    return Some(b);
                }
                (None, None) => return None,
            };
            match a.0.cmp(&b.0) {
                std::cmp::Ordering::Less => {
                    self.read.0 += 1;
                    return Some(a);
                }
                std::cmp::Ordering::Greater => {
                    self.read.1 += 1;
                    return Some(b);
                }
                std::cmp::Ordering::Equal => {
                    self.read = (i + 1, j + 1);
                    if a.1 + b.1 != 0 {
                        return Some((a.0, a.1 + b.1));
                    }
                }
            }
        }
    }
}

/// The start of a changelog line, `{time},{view},{minute}/` (`{time},top_window_{M}m,` for a
/// window), kept while consecutive lines share it: a time's answers come sorted, so in runs of
/// one view and minute.
#[derive(Default)]
struct LinePrefix {
    bytes: Vec<u8>,
    /// The length of `{time},`.
    stamp: usize,
    /// The view and the minute (the window's length, for a window) that `bytes` ends with.
    of: Option<(View, u32)>,
}

impl LinePrefix {
    /// Starts the lines of `time`.
    fn start(&mut self, time: Time) {
        self.bytes.clear();
        self.bytes.extend_from_slice(itoa::Buffer::new().format(time).as_bytes());
        self.bytes.push(b',');
        self.stamp = self.bytes.len();
        self.of = None;
    }

    /// The start of `answer`'s line.
    fn of(&mut self, answer: &Answer) -> &[u8] {
        let of = match *answer {
            Answer::TopWindow { window, .. } => (View::TopWindow, window),
            _ => (answer.view(), answer.minute().expect("only window answers have no minute")),
        };
        if self.of != Some(of) {
            self.of = Some(of);
            self.bytes.truncate(self.stamp);
            self.bytes.extend_from_slice(changelog_view(answer).as_bytes());
            self.bytes.push(b',');
            if let Some(minute) = answer.minute() {
                self.bytes.extend_from_slice(itoa::Buffer::new().format(minute).as_bytes());
                self.bytes.push(b'/');
            }
        }
        &self.bytes
    }
}

/// Appends one changelog line: `time,view,key,value,diff`, key columns joined by `/`.
fn write_change(out: &mut LineFile, prefix: &mut LinePrefix, answer: &Answer, diff: isize) -> io::Result<()> {
    let mut num = itoa::Buffer::new();
    let line = out.line();
    line.extend_from_slice(prefix.of(answer));
    push_key_and_clicks(line, &mut num, answer, b'/');
    line.push(b',');
    line.extend_from_slice(num.format(diff).as_bytes());
    line.push(b'\n');
    out.end_line()
}

/// Appends an answer's key below its minute and its clicks, `{country}{separator}{id},{clicks}`
/// (the country for the per-country view only): the tail of a view's row and of a changelog line.
fn push_key_and_clicks(line: &mut Vec<u8>, num: &mut itoa::Buffer, answer: &Answer, separator: u8) {
    let (country, id, clicks) = answer.key_and_clicks();
    if let Some(country) = country {
        line.extend_from_slice(&country.as_bytes());
        line.push(separator);
    }
    line.extend_from_slice(num.format(id).as_bytes());
    line.push(b',');
    line.extend_from_slice(num.format(clicks).as_bytes());
}

/// A CSV field in double quotes, any invalid UTF-8 replaced so the file stays text.
pub fn write_quoted(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    let text = String::from_utf8_lossy(bytes);
    out.write_all(b"\"")?;
    out.write_all(text.replace('"', "\"\"").as_bytes())?;
    out.write_all(b"\"")
}

/// Where the sink runs, as worker 0 sees it: on worker 0 itself, or on a thread of its own.
///
/// A replay runs it on its own thread ([`SinkThread`]), so that consolidating, formatting and
/// writing the answers does not hold the workers back. A follower runs it on worker 0: there
/// each tick's answers are few, and what matters is committing them as soon as the frontier
/// passes, without waiting for another thread to be scheduled on a saturated machine: at 200k
/// clicks/s on the benchmark machine, the p99 append-to-commit latency was 1.03 s with the sink
/// on a thread, and 0.41 s with it on worker 0.
pub enum SinkRunner {
    OnWorker { sink: Option<Box<OutputSink>>, error: Option<io::Error> },
    OnThread(SinkThread),
}

impl SinkRunner {
    pub fn on_worker(sink: OutputSink) -> SinkRunner {
        SinkRunner::OnWorker { sink: Some(Box::new(sink)), error: None }
    }

    /// See [`SinkThread::spawn`].
    pub fn on_thread(sink: OutputSink, setup: impl FnOnce() + Send + 'static) -> io::Result<SinkRunner> {
        SinkThread::spawn(sink, setup).map(SinkRunner::OnThread)
    }

    /// Hands the sink one activation's batches of updates and the frontier after it.
    pub fn advance(&mut self, batches: Vec<Vec<(SinkRecord, Time, isize)>>, frontier: Option<Time>) {
        match self {
            SinkRunner::OnThread(thread) => thread.advance(batches, frontier),
            SinkRunner::OnWorker { sink, error } => {
                let Some(running) = sink.as_mut() else { return };
                if let Err(e) = running.take_batches(batches, frontier) {
                    // Nothing more is written; `finish` reports why.
                    *error = Some(e);
                    *sink = None;
                }
            }
        }
    }

    /// Applies everything handed over, writes what is still open, and commits the end of the
    /// input; returns the run's summary.
    pub fn finish(self) -> io::Result<Summary> {
        match self {
            SinkRunner::OnThread(thread) => thread.finish(),
            SinkRunner::OnWorker { error: Some(e), .. } => Err(e),
            SinkRunner::OnWorker { sink: Some(sink), .. } => (*sink).finish(),
            SinkRunner::OnWorker { sink: None, error: None } => unreachable!("the sink is only dropped with its error"),
        }
    }
}

/// What worker 0 hands the sink's thread.
enum ToSink {
    /// The batches of updates of one activation, as they arrived, and the frontier after it
    /// (`None`: the input is complete).
    Advance(Vec<Vec<(SinkRecord, Time, isize)>>, Option<Time>),
    /// The dataflow is done: write what is still open and report the summary.
    Finish,
}

/// An [`OutputSink`] on a thread of its own, so that consolidating, formatting, writing and
/// committing the answers run beside the workers instead of on worker 0, which would otherwise
/// hold every other worker back by that much.
///
/// The channel is bounded: a sink that falls behind blocks worker 0, and through it the
/// dataflow, rather than letting the updates queue without limit. If the thread stops (an
/// error, or a dropped handle), the updates sent after it are lost with the run, which fails.
pub struct SinkThread {
    to_sink: Option<std::sync::mpsc::SyncSender<ToSink>>,
    thread: std::thread::JoinHandle<io::Result<Option<Summary>>>,
    last_frontier: Option<Option<Time>>,
}

/// Activations of worker 0's sink operator that may wait for the sink's thread.
const SINK_BACKLOG: usize = 256;

impl SinkThread {
    /// Starts `sink`'s thread; `setup` runs on it first (a thread's priority, say).
    pub fn spawn(mut sink: OutputSink, setup: impl FnOnce() + Send + 'static) -> io::Result<SinkThread> {
        let (to_sink, received) = std::sync::mpsc::sync_channel::<ToSink>(SINK_BACKLOG);
        let thread = std::thread::Builder::new().name("clickagg:sink".into()).spawn(move || {
            setup();
            for message in received {
                match message {
                    ToSink::Advance(batches, frontier) => sink.take_batches(batches, frontier)?,
                    ToSink::Finish => return sink.finish().map(Some),
                }
            }
            // Worker 0 went away without finishing (it failed): neither the files nor the
            // store may claim that the input is complete.
            Ok(None)
        })?;
        Ok(SinkThread { to_sink: Some(to_sink), thread, last_frontier: None })
    }

    /// Hands the sink one activation's batches of updates, moved rather than copied, and the
    /// frontier after it. An activation with no updates and no new frontier is not sent.
    pub fn advance(&mut self, batches: Vec<Vec<(SinkRecord, Time, isize)>>, frontier: Option<Time>) {
        if batches.is_empty() && self.last_frontier == Some(frontier) {
            return;
        }
        self.last_frontier = Some(frontier);
        let sent = self.to_sink.as_ref().is_some_and(|to_sink| to_sink.send(ToSink::Advance(batches, frontier)).is_ok());
        if !sent {
            // The thread has stopped with an error, which `finish` reports.
            self.to_sink = None;
        }
    }

    /// Waits for the sink to apply everything sent, write what is still open, and commit the
    /// end of the input; returns the run's summary.
    pub fn finish(mut self) -> io::Result<Summary> {
        if let Some(to_sink) = self.to_sink.take() {
            // A failed send means the thread has stopped; its error is what `join` returns.
            let _ = to_sink.send(ToSink::Finish);
        }
        match self.thread.join() {
            Ok(Ok(Some(summary))) => Ok(summary),
            Ok(Ok(None)) => Err(io::Error::other("the sink stopped before the input was complete")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::other("the sink's thread panicked")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs as workers send them: sorted, consolidated, no zero diffs. Few distinct answers, so
    /// that runs share some, and diffs of both signs, so that some cancel when merged.
    fn runs() -> impl Strategy<Value = Vec<Vec<(Answer, isize)>>> {
        let update = (0u32..3, 0u64..6, 1u64..3, -2isize..3).prop_map(|(minute, ad, clicks, diff)| {
            let answer = if ad % 2 == 0 { Answer::AdMinute { minute, ad, clicks } } else { Answer::TopMinute { minute, ad, clicks } };
            (answer, diff)
        });
        let run = prop::collection::vec(update, 0..12).prop_map(|mut run| {
            differential_dataflow::consolidation::consolidate(&mut run);
            run
        });
        prop::collection::vec(run, 0..5)
    }

    proptest! {
        /// However many runs, reading them merged gives what sorting them together gives.
        #[test]
        fn merged_runs_are_the_runs_consolidated(runs in runs()) {
            let mut expected = runs.concat();
            differential_dataflow::consolidation::consolidate(&mut expected);
            let merged: Vec<(Answer, isize)> = MergedRuns::of(runs).collect();
            prop_assert_eq!(merged, expected);
        }
    }
}
