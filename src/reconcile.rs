//! `clickagg reconcile` (issue #8): replays the logs with SPEC §2's reconciliation rule (no
//! lateness bound: every distinct click counts), compares every per-minute answer with what was
//! committed, and says why each one differs.
//!
//! Three sets of answers per key:
//! - *committed*: what the store or output directory holds;
//! - *expected*: what `run`'s rules give from these logs;
//! - *reconciled*: what the reconciliation rule gives (no lateness bound).
//!
//! One replay of the same dataflow code as `run` gives both of the last two, the differential
//! way: the rows too late for `run` are held back and enter together at one last logical time,
//! after every other row. The answers before that time are `run`'s; the updates at it turn
//! them into the reconciled ones, so the changelog at that time is exactly the correction.
//!
//! SPEC §2 says the difference between `run` and `reconcile` is exactly the too-late rows, so a
//! committed answer that equals the expected one and differs from the reconciled one is a
//! difference the dead letter explains; its too-late rows are listed beside it. A committed
//! answer that is not the expected one is unexplained: a store changed by hand, clicks lost or
//! counted twice. After `--apply`, committed equals reconciled and nothing differs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};

use clickagg_dataflows::{minute_of, Answer, Country, Minute, PartitionProgress, View, MINUTE_MS};

use crate::run::{run, RunConfig};
use crate::source::parse::{Header, LineParser};
use crate::source::{list_partitions, partition_name};
use crate::store::Store;

/// Which answer: one of the per-minute views (`View::PER_MINUTE`), the minute, and the key
/// columns after it: a country (0 in the views without one) and an id (the ad, or the
/// campaign). Ordered as the report lists answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AnswerKey {
    pub view: View,
    pub minute: Minute,
    pub country: u16,
    pub id: u64,
}

impl AnswerKey {
    pub fn view_name(&self) -> &'static str {
        self.view.name()
    }

    /// The key columns after the minute, joined by `/` as in the changelog.
    pub fn key_text(&self) -> String {
        if self.view == View::CountryMinute {
            format!("{}/{}", Country(self.country), self.id)
        } else {
            self.id.to_string()
        }
    }

    /// This answer's row with `clicks`, as the dataflow and the store know it.
    pub fn answer(&self, clicks: u64) -> Answer {
        let (minute, id) = (self.minute, self.id);
        match self.view {
            View::AdMinute => Answer::AdMinute { minute, ad: id, clicks },
            View::CampaignMinute => Answer::CampaignMinute { minute, campaign: id, clicks },
            View::CountryMinute => Answer::CountryMinute { minute, country: Country(self.country), ad: id, clicks },
            View::TopMinute => Answer::TopMinute { minute, ad: id, clicks },
            View::FraudMinute => Answer::FraudMinute { minute, ad: id, clicks },
            View::TopWindow => unreachable!("reconcile compares the per-minute views only"),
        }
    }

    /// From a view and the key columns after the minute as the files and changelog write them.
    fn parse(view: View, minute: Minute, text: &str) -> Option<AnswerKey> {
        let (country, id) = match text.split_once('/') {
            Some((country, id)) => (Country::parse(country.as_bytes())?.0, id),
            None => (0, text),
        };
        Some(AnswerKey { view, minute, country, id: id.parse().ok()? })
    }
}

/// The per-minute view of a changelog or file name.
fn per_minute_view(name: &str) -> Option<View> {
    View::PER_MINUTE.into_iter().find(|v| v.name() == name)
}

/// Answers with their clicks, sorted by key.
pub type Answers = Vec<(AnswerKey, u64)>;

/// What `reconcile` is asked to do.
#[derive(Clone, Debug)]
pub struct ReconcileConfig {
    /// `run`'s configuration: the logs, the workers, and the settings the answers were made with.
    pub run: RunConfig,
    /// A store (`run --store`) or an output directory (`run --out`).
    pub against: PathBuf,
    pub report: PathBuf,
    /// Compare minutes in `[from, to)` only.
    pub from: Option<Minute>,
    pub to: Option<Minute>,
    /// Write the reconciled answers into the store as a new version.
    pub apply: bool,
}

/// The figures a human reads first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub minutes: u64,
    pub equal: u64,
    pub corrected: u64,
    /// Reconciled minus committed clicks, over `ad_minute`.
    pub clicks_added: i64,
    pub unexplained: u64,
    /// Answers written by `--apply`.
    pub applied: u64,
}

impl Outcome {
    pub fn line(&self) -> String {
        format!(
            "reconcile: {} minutes compared, {} answers equal, {} answers corrected ({:+} clicks), {} unexplained differences{}",
            self.minutes,
            self.equal,
            self.corrected,
            self.clicks_added,
            self.unexplained,
            if self.applied > 0 { format!("; {} answers applied to the store", self.applied) } else { String::new() }
        )
    }
}

/// A too-late row, parsed, with where it was.
struct TooLate {
    minute: Minute,
    ad: u64,
    partition: String,
    offset: u64,
    line: String,
}

pub fn reconcile(config: &ReconcileConfig) -> Result<Outcome, String> {
    if config.run.rules.allowed_lateness_ms.is_none() {
        return Err("reconcile needs the allowed lateness the answers were made with".into());
    }
    let is_store = config.against.is_file();
    if !is_store && !config.against.is_dir() {
        return Err(format!(
            "--against {}: there is no store or output directory there (give the --store file or the --out directory of a run)",
            config.against.display()
        ));
    }
    if config.apply && !is_store {
        return Err("--apply writes a new version into a store: --against must be a store, not an output directory".into());
    }
    let store = is_store.then(|| Store::open_read_only(&config.against)).transpose()?;
    // The minutes the committed answers are final for, and the offsets to start reading from.
    let mut compare = (config.from.unwrap_or(0), config.to.unwrap_or(Minute::MAX));
    let mut start_at = None;
    if let Some(store) = &store {
        let settings = config.run.store_settings();
        let stored = store.settings()?;
        if stored != settings {
            return Err(format!(
                "the store {} was written with other settings; reconcile with the same flags as the run.\n  store: {stored}\n  now:   {settings}",
                config.against.display()
            ));
        }
        if let Some(final_before) = store.final_minutes_before(&config.run.rules)? {
            compare.1 = compare.1.min(final_before);
        }
        if let Some(from) = config.from {
            // Rows before a checkpoint whose largest ts is before `from` belong to earlier minutes,
            // and so do every copy of them (copies share the ts): they can be skipped.
            let paths = list_partitions(&config.run.logs)?;
            let mut offsets: Vec<Option<PartitionProgress>> = Vec::new();
            for path in &paths {
                offsets.push(store.checkpoint_before(&partition_name(path), from as u64 * MINUTE_MS)?.map(|c| c.progress));
            }
            start_at = Some(offsets);
        }
    }

    let scratch = replay_scratch_dir(&config.report)?;
    // The last logical time: after every row's, which is at most the tick of the largest ts.
    let largest_ts = crate::source::parse_only(&config.run.logs, config.run.workers, &config.run.rules)?.max_ts.unwrap_or(0);
    let held_until = config.run.rules.tick(largest_ts) + config.run.rules.tick_ms;
    let mut run_config = config.run.clone();
    run_config.out = Some(scratch.clone());
    run_config.store = None;
    run_config.follow = None;
    // The sliding windows are history of what was shown, not answers to correct.
    run_config.plan.windows.clear();
    run_config.start_at = start_at;
    run_config.hold_too_late_until = Some(held_until);
    run(&run_config)?;
    let in_range = |minute: Minute| minute >= compare.0 && minute < compare.1;
    let reconciled = read_answers_dir(&scratch, in_range)?;
    let before_held = values_before(&scratch, held_until, in_range)?;
    let committed = match &store {
        Some(store) => store.answers(in_range)?,
        None => read_answers_dir(&config.against, in_range)?,
    };
    let mut too_late: BTreeMap<(Minute, u64), Vec<TooLate>> = BTreeMap::new();
    for row in too_late_rows(&scratch, &config.run.logs, in_range)? {
        too_late.entry((row.minute, row.ad)).or_default().push(row);
    }
    std::fs::remove_dir_all(&scratch).ok();

    let mut outcome = Outcome::default();
    let mut held: Vec<AnswerKey> = before_held.keys().copied().collect();
    held.sort_unstable();
    let mut minutes = BTreeSet::new();
    std::fs::create_dir_all(&config.report).map_err(|e| format!("cannot create the report directory {}: {e}", config.report.display()))?;
    // The report's files, written with the `csv` crate: a too-late row's line is quoted (it holds
    // commas), and so would be a partition whose name needs it.
    let csv_error = |e: csv::Error| format!("writing the report in {}: {e}", config.report.display());
    let create = |name: &str, header: &str| -> Result<csv::Writer<std::fs::File>, String> {
        let path = config.report.join(name);
        let mut file = csv::Writer::from_path(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        file.write_record(header.split(',')).map_err(csv_error)?;
        Ok(file)
    };
    let io = |e: std::io::Error| format!("writing the report in {}: {e}", config.report.display());
    let mut differences = create("differences.csv", "view,minute,key,committed,reconciled,difference,explained")?;
    let mut unexplained = create("unexplained.csv", "view,minute,key,committed,expected,reconciled")?;
    let mut explanations = create("explanations.csv", "minute,ad_id,partition,offset,line")?;
    let mut corrections: Vec<(AnswerKey, u64, u64)> = Vec::new();
    for (key, c, r) in merge_join(&committed, &reconciled, &held) {
        // The expected answer is the reconciled one unless the held rows changed it.
        let e = before_held.get(&key).map_or(r, |before| before.unwrap_or(0));
        minutes.insert(key.minute);
        let (view, minute, text) = (key.view_name(), &key.minute, key.key_text());
        if c == r {
            outcome.equal += 1;
            continue;
        }
        let explained = c == e;
        if key.view == View::AdMinute {
            outcome.clicks_added += r as i64 - c as i64;
        }
        let difference = format!("{:+}", r as i64 - c as i64);
        differences.serialize((view, minute, &text, c, r, difference, if explained { "yes" } else { "no" })).map_err(csv_error)?;
        if explained {
            outcome.corrected += 1;
            if key.view == View::AdMinute {
                let ad = key.id;
                for row in too_late.get(&(*minute, ad)).into_iter().flatten() {
                    explanations.serialize((minute, ad, &row.partition, row.offset, &row.line)).map_err(csv_error)?;
                }
            }
        } else {
            outcome.unexplained += 1;
            unexplained.serialize((view, minute, &text, c, e, r)).map_err(csv_error)?;
        }
        corrections.push((key, c, r));
    }
    outcome.minutes = minutes.len() as u64;
    for mut file in [differences, unexplained, explanations] {
        file.flush().map_err(io)?;
    }
    if config.apply {
        let mut store = Store::open_to_apply(&config.against)?;
        outcome.applied = store.apply_reconciliation(&corrections, compare, &config.run.logs)?;
    }
    std::fs::write(config.report.join("summary.txt"), format!("{}\n", outcome.line())).map_err(io)?;
    Ok(outcome)
}

/// A scratch directory for the replays, beside the report (so on the same disk).
fn replay_scratch_dir(report: &Path) -> Result<PathBuf, String> {
    let dir = report.join(format!(".replays-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// A CSV file with a header line, read with the `csv` crate (fields may be quoted). Every record
/// must have the header's number of fields.
fn csv_reader(path: &Path) -> Result<csv::Reader<std::fs::File>, String> {
    csv::ReaderBuilder::new().from_path(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The line number of a record, for messages.
fn line_of(record: &csv::StringRecord) -> u64 {
    record.position().map_or(0, |p| p.line())
}

/// Reads the per-minute view files of an output directory.
pub fn read_answers_dir(dir: &Path, in_range: impl Fn(Minute) -> bool) -> Result<Answers, String> {
    let mut answers = Answers::new();
    for view in View::PER_MINUTE {
        let name = view.name();
        let path = dir.join(format!("{name}.csv"));
        let mut reader = csv_reader(&path)?;
        let mut record = csv::StringRecord::new();
        while reader.read_record(&mut record).map_err(|e| format!("reading {}: {e}", path.display()))? {
            let bad = || format!("{}:{}: not a row of {name}: {}", path.display(), line_of(&record), record.iter().collect::<Vec<_>>().join(","));
            let minute: Minute = record.get(0).and_then(|m| m.parse().ok()).ok_or_else(bad)?;
            if !in_range(minute) {
                continue;
            }
            let fields: Vec<&str> = record.iter().collect();
            let (key, clicks) = match (view, fields.as_slice()) {
                (View::CountryMinute, [_, country, ad, clicks]) => (format!("{country}/{ad}"), clicks),
                // top_minute: minute,rank,ad_id,clicks; its key is the ad.
                (View::TopMinute, [_, _, ad, clicks]) => (ad.to_string(), clicks),
                (_, [_, key, clicks]) => (key.to_string(), clicks),
                _ => return Err(bad()),
            };
            let key = AnswerKey::parse(view, minute, &key).ok_or_else(bad)?;
            answers.push((key, clicks.parse().map_err(|_| bad())?));
        }
    }
    answers.sort_unstable();
    Ok(answers)
}

/// Every key of `committed`, `reconciled` and `held` (all sorted) once, in order, with its
/// committed and reconciled clicks (0 where absent).
fn merge_join<'a>(committed: &'a Answers, reconciled: &'a Answers, held: &'a [AnswerKey]) -> impl Iterator<Item = (AnswerKey, u64, u64)> + 'a {
    let (mut c, mut r, mut h) = (committed.iter().peekable(), reconciled.iter().peekable(), held.iter().peekable());
    std::iter::from_fn(move || {
        let key = [c.peek().map(|x| x.0), r.peek().map(|x| x.0), h.peek().map(|k| **k)].into_iter().flatten().min()?;
        let take = |it: &mut std::iter::Peekable<std::slice::Iter<'a, (AnswerKey, u64)>>| match it.peek() {
            Some((k, v)) if *k == key => {
                let v = *v;
                it.next();
                v
            }
            _ => 0,
        };
        let (committed, reconciled) = (take(&mut c), take(&mut r));
        if h.peek().is_some_and(|k| **k == key) {
            h.next();
        }
        Some((key, committed, reconciled))
    })
}

/// What each answer that changed at `time` held before it (`None`: it was absent), from the
/// changelog's updates at `time`.
fn values_before(out: &Path, time: u64, in_range: impl Fn(Minute) -> bool) -> Result<HashMap<AnswerKey, Option<u64>>, String> {
    let path = out.join("changelog").join("updates.csv");
    let mut reader = csv_reader(&path)?;
    let mut retracted = Vec::new();
    let mut appeared = Vec::new();
    let time = time.to_string();
    let mut record = csv::StringRecord::new();
    while reader.read_record(&mut record).map_err(|e| format!("reading {}: {e}", path.display()))? {
        if record.get(0) != Some(time.as_str()) {
            continue;
        }
        let bad = || format!("{}:{}: not a changelog row: {}", path.display(), line_of(&record), record.iter().collect::<Vec<_>>().join(","));
        // time,view,key,value,diff with key = minute/the answer's key.
        let fields: Vec<&str> = record.iter().collect();
        let [_, view, key, value, diff] = fields.as_slice() else { return Err(bad()) };
        let Some(view) = per_minute_view(view) else { continue };
        let (minute, key) = key.split_once('/').ok_or_else(bad)?;
        let minute: Minute = minute.parse().map_err(|_| bad())?;
        if !in_range(minute) {
            continue;
        }
        let key = AnswerKey::parse(view, minute, key).ok_or_else(bad)?;
        match *diff {
            "-1" => retracted.push((key, value.parse::<u64>().map_err(|_| bad())?)),
            "1" => appeared.push(key),
            _ => return Err(bad()),
        }
    }
    // A retraction says what was there; an answer that only appeared was absent.
    let mut before: HashMap<AnswerKey, Option<u64>> = retracted.into_iter().map(|(k, v)| (k, Some(v))).collect();
    for key in appeared {
        before.entry(key).or_insert(None);
    }
    Ok(before)
}

/// The too-late rows of a replay's dead letter, parsed with their partition's header.
fn too_late_rows(out: &Path, logs: &Path, in_range: impl Fn(Minute) -> bool) -> Result<Vec<TooLate>, String> {
    let path = out.join("dead_letter.csv");
    let mut reader = csv_reader(&path)?;
    let mut parsers: BTreeMap<String, Option<LineParser>> = BTreeMap::new();
    let mut rows = Vec::new();
    let mut record = csv::StringRecord::new();
    while reader.read_record(&mut record).map_err(|e| format!("reading {}: {e}", path.display()))? {
        let (Some(partition), Some(offset), Some("too_late"), Some(row)) = (record.get(0), record.get(1), record.get(2), record.get(3))
        else {
            continue;
        };
        let offset: u64 = offset
            .parse()
            .map_err(|_| format!("{}:{}: offset {offset:?} is not a number", path.display(), line_of(&record)))?;
        let parser = parsers.entry(partition.to_string()).or_insert_with(|| {
            let file = std::fs::File::open(logs.join(partition)).ok()?;
            let mut header = String::new();
            std::io::BufReader::new(file).read_line(&mut header).ok()?;
            Header::parse(header.trim_end_matches(['\n', '\r']).as_bytes()).ok().map(LineParser::new)
        });
        let Some(click) = parser.as_mut().and_then(|p| p.parse(row.as_bytes()).ok()) else { continue };
        let minute = minute_of(click.key.ts);
        if in_range(minute) {
            rows.push(TooLate { minute, ad: click.attrs.ad, partition: partition.to_string(), offset, line: row.to_string() });
        }
    }
    Ok(rows)
}
