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

/// What a run saw, for the summary a human reads and for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub partitions: Vec<PartitionProgress>,
    /// Distinct billable clicks counted (the sum of `ad_minute.csv`).
    pub clicks: u64,
    /// Distinct clicks excluded by the fraud rules (the sum of `fraud_minute.csv`).
    pub excluded: u64,
    pub minutes: u64,
    /// The minute with the most clicks, its clicks, and its top 10 `(ad, clicks)`.
    pub busiest_minute: Option<(Minute, u64, Vec<(u64, u64)>)>,
    pub changelog_rows: u64,
}

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

/// Writes the output directory of `run`.
pub struct OutputSink {
    dir: PathBuf,
    partition_names: Vec<String>,
    rules: EventTimeRules,
    changelog: BufWriter<File>,
    /// The per-minute views' files, in `View::PER_MINUTE` order.
    views: Vec<BufWriter<File>>,
    /// `top_window_{M}m.csv` for each window M.
    window_files: BTreeMap<u32, BufWriter<File>>,
    /// Updates not yet complete: the frontier has not passed their time.
    pending: BTreeMap<Time, Vec<(Answer, isize)>>,
    /// Every change applied to each minute that is not final yet; consolidated when it closes.
    open_minutes: BTreeMap<Minute, Vec<(Answer, isize)>>,
    /// Minutes before this one are written out and closed.
    closed_before: Minute,
    /// The current top K of each window: `(window, ad, clicks)`.
    window_members: BTreeSet<(u32, u64, u64)>,
    /// The next minute boundary whose window snapshot is due.
    next_boundary: Option<Minute>,
    /// Snapshots taken, held until a click at or after the minute before their boundary is seen:
    /// the files stop at the last minute's end, which is only known then.
    snapshots: VecDeque<(Minute, Vec<(u32, u64, u64)>)>,
    /// The latest minute with an accepted click so far.
    last_minute: Option<Minute>,
    dead_letters: Vec<DeadLetter>,
    summary: Summary,
    line: Vec<u8>,
    /// The server's copy of the answers, when serving: fed what each advance applied.
    serving: Option<Arc<ServingState>>,
    applied: Vec<(Time, Answer, isize)>,
    /// Serving-only updates not yet complete, by time.
    pending_serving: BTreeMap<Time, Vec<(ServingAnswer, isize)>>,
    applied_serving: Vec<(ServingAnswer, isize)>,
    /// Window snapshots taken since the last publication, for the server.
    new_snapshots: Vec<(Minute, BTreeMap<u32, Vec<(u64, u64)>>)>,
}

fn create(path: &Path) -> io::Result<BufWriter<File>> {
    File::create(path)
        .map(|f| BufWriter::with_capacity(1 << 20, f))
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display())))
}

impl OutputSink {
    /// Creates (or empties) the output directory's files.
    pub fn create(
        dir: &Path,
        partition_names: Vec<String>,
        rules: EventTimeRules,
        windows: &[u32],
    ) -> io::Result<OutputSink> {
        std::fs::create_dir_all(dir.join("changelog"))
            .map_err(|e| io::Error::new(e.kind(), format!("cannot create output directory {}: {e}", dir.display())))?;
        let mut changelog = create(&dir.join("changelog").join("updates.csv"))?;
        changelog.write_all(b"time,view,key,value,diff\n")?;
        let mut views = Vec::new();
        for view in View::PER_MINUTE {
            let mut file = create(&dir.join(format!("{}.csv", view.name())))?;
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
            let mut file = create(&dir.join(format!("top_window_{window}m.csv")))?;
            file.write_all(b"as_of,rank,ad_id,clicks\n")?;
            window_files.insert(window, file);
        }
        let partitions = (0..partition_names.len() as u32)
            .map(|partition| PartitionProgress { partition, ..Default::default() })
            .collect();
        Ok(OutputSink {
            dir: dir.to_path_buf(),
            partition_names,
            rules,
            changelog,
            views,
            window_files,
            pending: BTreeMap::new(),
            open_minutes: BTreeMap::new(),
            closed_before: 0,
            window_members: BTreeSet::new(),
            next_boundary: None,
            snapshots: VecDeque::new(),
            last_minute: None,
            dead_letters: Vec::new(),
            summary: Summary { partitions, ..Default::default() },
            line: Vec::with_capacity(256),
            serving: None,
            applied: Vec::new(),
            new_snapshots: Vec::new(),
            pending_serving: BTreeMap::new(),
            applied_serving: Vec::new(),
        })
    }

    /// Publishes every advance to `state` too, for the server.
    pub fn serve_into(&mut self, state: Arc<ServingState>) {
        self.serving = Some(state);
    }

    /// Takes one update from the dataflow; it is applied once the frontier passes its time.
    pub fn absorb(&mut self, record: SinkRecord, time: Time, diff: isize) {
        match record {
            SinkRecord::Answer(answer) => match self.pending.last_entry() {
                Some(mut last) if *last.key() == time => last.get_mut().push((answer, diff)),
                _ => self.pending.entry(time).or_default().push((answer, diff)),
            },
            SinkRecord::Note(SourceNote::Dead(dead)) => {
                debug_assert_eq!(diff, 1);
                self.dead_letters.push(dead)
            }
            SinkRecord::Serving(answer) => {
                if self.serving.is_some() {
                    self.pending_serving.entry(time).or_default().push((answer, diff));
                }
            }
            SinkRecord::Note(SourceNote::Progress(progress)) => {
                let known = &mut self.summary.partitions[progress.partition as usize];
                if (progress.offset, progress.finished) >= (known.offset, known.finished) {
                    *known = progress;
                }
            }
        }
    }

    /// Applies every update at times before `frontier` (`None`: the input is complete) in time
    /// order, and writes out the minutes that became final and the window snapshots that fell due.
    pub fn advance(&mut self, frontier: Option<Time>) -> io::Result<()> {
        while let Some(entry) = self.pending.first_entry() {
            if frontier.is_some_and(|f| *entry.key() >= f) {
                break;
            }
            let (time, mut updates) = entry.remove_entry();
            // Everything before `time` is applied: close and snapshot what that completes.
            self.reach(time)?;
            differential_dataflow::consolidation::consolidate(&mut updates);
            for (answer, diff) in updates {
                match answer.minute() {
                    // A change to a closed minute can only be state retention forgetting it.
                    Some(minute) if minute < self.closed_before => continue,
                    Some(minute) => {
                        self.open_minutes.entry(minute).or_default().push((answer, diff));
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
                write_change(&mut self.changelog, &mut self.line, time, &answer, diff)?;
                self.summary.changelog_rows += 1;
                if self.serving.is_some() {
                    self.applied.push((time, answer, diff));
                }
            }
            self.next_boundary.get_or_insert(minute_of(time) + 1);
        }
        match frontier {
            Some(frontier) => self.reach(frontier)?,
            None => {
                self.close_minutes_before(Minute::MAX)?;
                let last_boundary = self.last_minute.map_or(0, |m| m + 1);
                self.take_snapshots_through(last_boundary);
                self.write_snapshots(last_boundary)?;
            }
        }
        // Serving-only answers: a change at or after its minute's final time is retention
        // forgetting it, as for the view files.
        // At the end of the input, updates from the end of the last minute on are the sliding
        // windows emptying as their minutes expire: the answers stand as of that boundary.
        let limit = frontier.unwrap_or_else(|| self.last_minute.map_or(0, |m| (m as Time + 1) * MINUTE_MS));
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
                let forgetting = answer.minute().and_then(|m| self.rules.minute_final_at(m)).is_some_and(|final_at| time >= final_at);
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
        Ok(())
    }

    /// Every update before `time` has been applied.
    fn reach(&mut self, time: Time) -> io::Result<()> {
        self.close_minutes_before(self.rules.final_minutes_before(time))?;
        // Snapshot w holds the updates before w's first millisecond.
        self.take_snapshots_through(minute_of(time));
        let known = self.last_minute.map_or(0, |m| m + 1);
        self.write_snapshots(known)
    }

    fn close_minutes_before(&mut self, close_before: Minute) -> io::Result<()> {
        while let Some(entry) = self.open_minutes.first_entry() {
            if *entry.key() >= close_before {
                break;
            }
            let (minute, rows) = entry.remove_entry();
            self.write_minute(minute, rows)?;
        }
        self.closed_before = self.closed_before.max(close_before);
        Ok(())
    }

    fn take_snapshots_through(&mut self, boundary: Minute) {
        let Some(next) = self.next_boundary.as_mut() else { return };
        while *next <= boundary {
            self.snapshots.push_back((*next, self.window_members.iter().copied().collect()));
            if self.serving.is_some() {
                let mut tops: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
                for &(window, ad, clicks) in &self.window_members {
                    tops.entry(window).or_default().push((ad, clicks));
                }
                for top in tops.values_mut() {
                    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                }
                self.new_snapshots.push((*next, tops));
            }
            *next += 1;
        }
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
    fn write_minute(&mut self, minute: Minute, mut changes: Vec<(Answer, isize)>) -> io::Result<()> {
        differential_dataflow::consolidation::consolidate(&mut changes);
        let mut top: Vec<(u64, u64)> = Vec::new();
        let mut total = 0;
        for (answer, count) in changes {
            assert_eq!(count, 1, "a view holds each answer once: {answer:?} x {count}");
            let file = &mut self.views[answer.view() as usize];
            match answer {
                Answer::AdMinute { ad, clicks, .. } => {
                    total += clicks;
                    writeln!(file, "{minute},{ad},{clicks}")?
                }
                Answer::CampaignMinute { campaign, clicks, .. } => writeln!(file, "{minute},{campaign},{clicks}")?,
                Answer::CountryMinute { country, ad, clicks, .. } => writeln!(file, "{minute},{country},{ad},{clicks}")?,
                Answer::TopMinute { ad, clicks, .. } => top.push((ad, clicks)),
                Answer::FraudMinute { ad, clicks, .. } => {
                    self.summary.excluded += clicks;
                    writeln!(file, "{minute},{ad},{clicks}")?
                }
                Answer::TopWindow { .. } => unreachable!("window answers belong to no minute"),
            }
        }
        write_ranked(&mut self.views[View::TopMinute as usize], minute, &mut top)?;
        if total > 0 {
            self.summary.clicks += total;
            self.summary.minutes += 1;
            if self.summary.busiest_minute.as_ref().is_none_or(|(_, best, _)| total > *best) {
                top.truncate(10);
                self.summary.busiest_minute = Some((minute, total, top));
            }
        }
        Ok(())
    }

    /// Writes what is still open and the dead letters, and returns the run's summary.
    pub fn finish(mut self) -> io::Result<Summary> {
        self.advance(None)?;
        self.changelog.flush()?;
        for file in self.views.iter_mut().chain(self.window_files.values_mut()) {
            file.flush()?;
        }
        let mut file = create(&self.dir.join("dead_letter.csv"))?;
        file.write_all(b"partition,offset,reason,line\n")?;
        self.dead_letters.sort();
        for dead in &self.dead_letters {
            write!(file, "{},{},{},", self.partition_names[dead.partition as usize], dead.offset, dead.reason.as_str())?;
            write_quoted(&mut file, &dead.line)?;
            file.write_all(b"\n")?;
        }
        file.flush()?;
        Ok(self.summary)
    }
}

/// Ranks `(ad, clicks)` by clicks descending, then ad ascending (SPEC §3), and writes
/// `{at},{rank},{ad},{clicks}` rows.
fn write_ranked(out: &mut impl Write, at: Minute, ranked: &mut [(u64, u64)]) -> io::Result<()> {
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (rank, (ad, clicks)) in ranked.iter().enumerate() {
        writeln!(out, "{at},{},{ad},{clicks}", rank + 1)?;
    }
    Ok(())
}

/// Appends one changelog line: `time,view,key,value,diff`, key columns joined by `/`.
fn write_change(out: &mut impl Write, line: &mut Vec<u8>, time: Time, answer: &Answer, diff: isize) -> io::Result<()> {
    let mut num = itoa::Buffer::new();
    line.clear();
    line.extend_from_slice(num.format(time).as_bytes());
    line.push(b',');
    match (answer.minute(), answer) {
        (Some(minute), _) => {
            line.extend_from_slice(answer.view().name().as_bytes());
            line.push(b',');
            line.extend_from_slice(num.format(minute).as_bytes());
            line.push(b'/');
        }
        (None, Answer::TopWindow { window, .. }) => {
            line.extend_from_slice(b"top_window_");
            line.extend_from_slice(num.format(*window).as_bytes());
            line.extend_from_slice(b"m,");
        }
        (None, _) => unreachable!("only window answers have no minute"),
    }
    let (key, value) = match *answer {
        Answer::AdMinute { ad, clicks, .. } => (ad, clicks),
        Answer::CampaignMinute { campaign, clicks, .. } => (campaign, clicks),
        Answer::CountryMinute { country, ad, clicks, .. } => {
            line.extend_from_slice(&country.as_bytes());
            line.push(b'/');
            (ad, clicks)
        }
        Answer::TopMinute { ad, clicks, .. }
        | Answer::FraudMinute { ad, clicks, .. }
        | Answer::TopWindow { ad, clicks, .. } => (ad, clicks),
    };
    line.extend_from_slice(num.format(key).as_bytes());
    line.push(b',');
    line.extend_from_slice(num.format(value).as_bytes());
    line.push(b',');
    line.extend_from_slice(num.format(diff).as_bytes());
    line.push(b'\n');
    out.write_all(line)
}

/// A CSV field in double quotes, any invalid UTF-8 replaced so the file stays text.
pub fn write_quoted(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    let text = String::from_utf8_lossy(bytes);
    out.write_all(b"\"")?;
    out.write_all(text.replace('"', "\"\"").as_bytes())?;
    out.write_all(b"\"")
}
