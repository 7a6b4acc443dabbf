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
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use clickagg_dataflows::{minute_of, Minute, PartitionProgress, View, MINUTE_MS};

use crate::run::{run, RunConfig};
use crate::source::parse::{Header, LineParser};
use crate::source::{list_partitions, partition_name};
use crate::model::{per_minute_view, AnswerKey, AnswerSettings, Answers, Setting};
use crate::storage::Store;

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
    /// The settings given on the command line. Against a store, the others are the store's;
    /// these must be the store's too.
    pub given: Vec<Setting>,
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
    /// Why no minute was compared, in words, when none was.
    pub why_none: Option<String>,
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

    /// The report's summary: the line, and why no minute was compared when none was.
    pub fn text(&self) -> String {
        match &self.why_none {
            Some(why) => format!("{}\nreconcile: no minute was compared: {why}\n", self.line()),
            None => format!("{}\n", self.line()),
        }
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

/// Replays the logs under the reconciliation rule, compares, writes the report (and, with
/// `apply`, the reconciled answers into the store), and returns the figures.
pub fn reconcile(config: &ReconcileConfig) -> Result<Outcome, String> {
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
    let mut config = config.clone();
    if let Some(store) = &store {
        adopt_settings(&mut config.run, &store.settings()?, &config.given, &config.against)?;
    }
    let config = &config;
    if config.run.rules.allowed_lateness_ms.is_none() {
        return Err("reconcile needs the allowed lateness the answers were made with".into());
    }
    // The minutes the committed answers are final for, and the offsets to start reading from.
    let mut compare = (config.from.unwrap_or(0), config.to.unwrap_or(Minute::MAX));
    let mut start_at = None;
    if let Some(store) = &store {
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
    let create = |name: &str| -> Result<BufWriter<std::fs::File>, String> {
        let path = config.report.join(name);
        std::fs::File::create(&path).map(BufWriter::new).map_err(|e| format!("cannot create {}: {e}", path.display()))
    };
    let io = |e: std::io::Error| format!("writing the report in {}: {e}", config.report.display());
    let mut differences = create("differences.csv")?;
    writeln!(differences, "view,minute,key,committed,reconciled,difference,explained").map_err(io)?;
    let mut unexplained = create("unexplained.csv")?;
    writeln!(unexplained, "view,minute,key,committed,expected,reconciled").map_err(io)?;
    let mut explanations = create("explanations.csv")?;
    writeln!(explanations, "minute,ad_id,partition,offset,line").map_err(io)?;
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
        writeln!(differences, "{view},{minute},{text},{c},{r},{:+},{}", r as i64 - c as i64, if explained { "yes" } else { "no" })
            .map_err(io)?;
        if explained {
            outcome.corrected += 1;
            if key.view == View::AdMinute {
                let ad = key.id;
                for row in too_late.get(&(*minute, ad)).into_iter().flatten() {
                    writeln!(explanations, "{minute},{ad},{},{},\"{}\"", row.partition, row.offset, row.line.replace('"', "\"\""))
                        .map_err(io)?;
                }
            }
        } else {
            outcome.unexplained += 1;
            writeln!(unexplained, "{view},{minute},{text},{c},{e},{r}").map_err(io)?;
        }
        corrections.push((key, c, r));
    }
    outcome.minutes = minutes.len() as u64;
    if outcome.minutes == 0 {
        outcome.why_none = Some(why_none(config, store.as_ref(), compare)?);
    }
    for mut file in [differences, unexplained, explanations] {
        file.flush().map_err(io)?;
    }
    if config.apply {
        let mut store = Store::open_to_apply(&config.against)?;
        outcome.applied = store.apply_reconciliation(&corrections, compare, &config.run.logs)?;
    }
    std::fs::write(config.report.join("summary.txt"), outcome.text()).map_err(io)?;
    Ok(outcome)
}

/// Takes the settings a store's answers were made with into `run`: each setting not `given` on
/// the command line is the store's, and each given must be the store's. A blocklist cannot come
/// from the store (it records only a fingerprint), so the same file must be given.
fn adopt_settings(run: &mut RunConfig, stored: &AnswerSettings, given: &[Setting], store: &Path) -> Result<(), String> {
    let flags = run.store_settings();
    let conflicting: Vec<Setting> =
        stored.differing(&flags).into_iter().filter(|s| given.contains(s) || *s == Setting::Blocklist).collect();
    if conflicting.contains(&Setting::Blocklist) && flags.blocklist.networks == 0 {
        return Err(format!(
            "the answers in the store {} leave out the clicks of a blocklist of {} networks, which the store does not \
             hold: give the same file with --blocklist",
            store.display(),
            stored.blocklist.networks
        ));
    }
    if !conflicting.is_empty() {
        let lines: Vec<String> = conflicting
            .iter()
            .map(|&s| format!("  {}: {} in the store, {} given", s.name(), stored.describe(s), flags.describe(s)))
            .collect();
        return Err(format!(
            "the store {} was written with other settings than those given; leave those flags out to reconcile under \
             the store's:\n{}",
            store.display(),
            lines.join("\n")
        ));
    }
    run.rules.watermark_delay_ms = stored.watermark_delay_ms;
    run.rules.allowed_lateness_ms = stored.allowed_lateness_ms;
    run.rules.tick_ms = stored.tick_ms;
    run.plan.top_k = stored.top_k;
    run.plan.top_k_buckets = stored.top_k_buckets.clone();
    run.plan.windows = stored.windows.clone();
    run.plan.fraud.max_clicks_per_minute = stored.max_clicks_per_minute;
    debug_assert_eq!(run.store_settings(), *stored);
    Ok(())
}

/// Why no minute was compared, in words: a range with nothing in it, a store with no minute
/// final yet, or no answers in the range on either side.
fn why_none(config: &ReconcileConfig, store: Option<&Store>, compare: (Minute, Minute)) -> Result<String, String> {
    let (from, to) = (config.from.unwrap_or(0), config.to.unwrap_or(Minute::MAX));
    if from >= to {
        return Ok(format!("--from (minute {from}) is not before --to (minute {to})"));
    }
    let lateness = config.run.rules.allowed_lateness_ms.map_or("none".into(), crate::model::settings::duration);
    if let Some(store) = store {
        if compare.1 <= from {
            let watermark = store.committed()?.map(|c| c.frontier);
            return Ok(match (watermark, compare.1) {
                (None, _) => format!("the store {} has committed nothing yet", config.against.display()),
                (Some(watermark), 0) => format!(
                    "no minute of the store {} is final yet: it has committed up to watermark {watermark} (ms), and a \
                     minute is final once the watermark passes its end by the allowed lateness ({lateness})",
                    config.against.display()
                ),
                (Some(_), final_before) => format!(
                    "the answers in the store {} are final only before minute {final_before}, and the comparison starts at \
                     minute {from} (a minute is final once the watermark passes its end by the allowed lateness, {lateness})",
                    config.against.display()
                ),
            });
        }
    }
    let range = match (config.from, config.to) {
        (None, None) => "in any minute".to_string(),
        _ => format!("in minutes {from} to {}", compare.1.min(to).saturating_sub(1)),
    };
    Ok(format!("neither {} nor the logs hold an answer {range}", config.against.display()))
}

/// A scratch directory for the replays, beside the report (so on the same disk).
fn replay_scratch_dir(report: &Path) -> Result<PathBuf, String> {
    let dir = report.join(format!(".replays-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Reads the per-minute view files of an output directory.
pub fn read_answers_dir(dir: &Path, in_range: impl Fn(Minute) -> bool) -> Result<Answers, String> {
    let mut answers = Answers::new();
    for view in View::PER_MINUTE {
        let name = view.name();
        let path = dir.join(format!("{name}.csv"));
        let file = std::fs::File::open(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for (number, line) in std::io::BufReader::new(file).lines().enumerate().skip(1) {
            let line = line.map_err(|e| format!("reading {}: {e}", path.display()))?;
            let bad = || format!("{}:{}: not a row of {name}: {line}", path.display(), number + 1);
            let fields: Vec<&str> = line.split(',').collect();
            let minute: Minute = fields.first().and_then(|m| m.parse().ok()).ok_or_else(bad)?;
            if !in_range(minute) {
                continue;
            }
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
    let file = std::fs::File::open(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut retracted = Vec::new();
    let mut appeared = Vec::new();
    let prefix = format!("{time},");
    for line in std::io::BufReader::new(file).lines() {
        let line = line.map_err(|e| format!("reading {}: {e}", path.display()))?;
        let Some(rest) = line.strip_prefix(&prefix) else { continue };
        let bad = || format!("{}: not a changelog row: {line}", path.display());
        // view,key,value,diff with key = minute/the answer's key.
        let fields: Vec<&str> = rest.split(',').collect();
        let [view, key, value, diff] = fields.as_slice() else { return Err(bad()) };
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
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut parsers: BTreeMap<String, Option<LineParser>> = BTreeMap::new();
    let mut rows = Vec::new();
    for line in text.lines().skip(1) {
        let mut fields = line.splitn(4, ',');
        let (Some(partition), Some(offset), Some("too_late"), Some(quoted)) = (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let row = quoted.trim_matches('"').replace("\"\"", "\"");
        let parser = parsers.entry(partition.to_string()).or_insert_with(|| {
            let file = std::fs::File::open(logs.join(partition)).ok()?;
            let mut header = String::new();
            std::io::BufReader::new(file).read_line(&mut header).ok()?;
            Header::parse(header.trim_end_matches(['\n', '\r']).as_bytes()).ok().map(LineParser::new)
        });
        let Some(click) = parser.as_mut().and_then(|p| p.parse(row.as_bytes()).ok()) else { continue };
        let minute = minute_of(click.key.ts);
        if in_range(minute) {
            rows.push(TooLate { minute, ad: click.attrs.ad, partition: partition.to_string(), offset: offset.parse().unwrap_or(0), line: row });
        }
    }
    Ok(rows)
}
