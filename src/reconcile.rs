//! `clickagg reconcile` (issue #8): replays the logs with SPEC §2's reconciliation rule (no
//! lateness bound: every distinct click counts), compares every per-minute answer with what was
//! committed, and says why each one differs.
//!
//! Two replays of the same dataflow code as `run`, and three sets of answers per key:
//! - *committed*: what the store or output directory holds;
//! - *expected*: what `run`'s rules give from these logs (a replay with the allowed lateness);
//! - *reconciled*: what the reconciliation rule gives (a replay with no lateness bound).
//!
//! SPEC §2 says the difference between `run` and `reconcile` is exactly the too-late rows, so a
//! committed answer that equals the expected one and differs from the reconciled one is a
//! difference the dead letter explains; its too-late rows are listed beside it. A committed
//! answer that is not the expected one is unexplained: a store changed by hand, clicks lost or
//! counted twice. After `--apply`, committed equals reconciled and nothing differs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};

use clickagg_dataflows::{minute_of, EventTimeRules, Minute, PartitionProgress, MINUTE_MS};

use crate::run::{run, RunConfig};
use crate::source::parse::{Header, LineParser};
use crate::source::{list_partitions, partition_name};
use crate::store::Store;

/// The per-minute views compared, as their files and tables are named.
pub const VIEWS: [&str; 5] = ["ad_minute", "campaign_minute", "country_minute", "top_minute", "fraud_minute"];

/// One answer: `(view, minute, key)` → clicks. `key` is the answer's key columns after the
/// minute, joined by `/` as in the changelog (`ad_id`, `campaign_id`, `country/ad_id`).
pub type Answers = BTreeMap<(&'static str, Minute, String), u64>;

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
    let lateness = config.run.rules.allowed_lateness_ms.ok_or("reconcile needs the allowed lateness the answers were made with")?;
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
    let replay = |lateness: Option<u64>, out: &Path| -> Result<(), String> {
        let mut run_config = config.run.clone();
        run_config.out = Some(out.to_path_buf());
        run_config.store = None;
        run_config.follow = None;
        run_config.rules = EventTimeRules { allowed_lateness_ms: lateness, ..config.run.rules };
        // The sliding windows are history of what was shown, not answers to correct.
        run_config.plan.windows.clear();
        run_config.start_at = start_at.clone();
        run(&run_config).map(|_| ())
    };
    let expected_dir = scratch.join("expected");
    let reconciled_dir = scratch.join("reconciled");
    replay(Some(lateness), &expected_dir)?;
    replay(None, &reconciled_dir)?;
    let in_range = |minute: Minute| minute >= compare.0 && minute < compare.1;
    let expected = read_answers_dir(&expected_dir, in_range)?;
    let reconciled = read_answers_dir(&reconciled_dir, in_range)?;
    let committed = match &store {
        Some(store) => store.answers(in_range)?,
        None => read_answers_dir(&config.against, in_range)?,
    };
    let too_late = too_late_rows(&expected_dir, &config.run.logs, in_range)?;
    std::fs::remove_dir_all(&scratch).ok();

    let mut outcome = Outcome::default();
    let keys: BTreeSet<&(&'static str, Minute, String)> = committed.keys().chain(reconciled.keys()).chain(expected.keys()).collect();
    outcome.minutes = keys.iter().map(|k| k.1).collect::<BTreeSet<_>>().len() as u64;
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
    let mut corrections: Vec<(&'static str, Minute, String, u64, u64)> = Vec::new();
    for key in keys {
        let get = |answers: &Answers| answers.get(key).copied().unwrap_or(0);
        let (c, e, r) = (get(&committed), get(&expected), get(&reconciled));
        let (view, minute, text) = key;
        if c == r {
            outcome.equal += 1;
            continue;
        }
        let explained = c == e;
        if *view == "ad_minute" {
            outcome.clicks_added += r as i64 - c as i64;
        }
        writeln!(differences, "{view},{minute},{text},{c},{r},{:+},{}", r as i64 - c as i64, if explained { "yes" } else { "no" })
            .map_err(io)?;
        if explained {
            outcome.corrected += 1;
            if *view == "ad_minute" {
                let ad: u64 = text.parse().unwrap_or(u64::MAX);
                for row in too_late.iter().filter(|t| t.minute == *minute && t.ad == ad) {
                    writeln!(explanations, "{minute},{ad},{},{},\"{}\"", row.partition, row.offset, row.line.replace('"', "\"\""))
                        .map_err(io)?;
                }
            }
        } else {
            outcome.unexplained += 1;
            writeln!(unexplained, "{view},{minute},{text},{c},{e},{r}").map_err(io)?;
        }
        corrections.push((view, *minute, text.clone(), c, r));
    }
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

/// Reads the per-minute view files of an output directory.
pub fn read_answers_dir(dir: &Path, in_range: impl Fn(Minute) -> bool) -> Result<Answers, String> {
    let mut answers = Answers::new();
    for view in VIEWS {
        let path = dir.join(format!("{view}.csv"));
        let file = std::fs::File::open(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for (number, line) in std::io::BufReader::new(file).lines().enumerate().skip(1) {
            let line = line.map_err(|e| format!("reading {}: {e}", path.display()))?;
            let bad = || format!("{}:{}: not a row of {view}: {line}", path.display(), number + 1);
            let fields: Vec<&str> = line.split(',').collect();
            let minute: Minute = fields.first().and_then(|m| m.parse().ok()).ok_or_else(bad)?;
            if !in_range(minute) {
                continue;
            }
            let (key, clicks) = match (view, fields.as_slice()) {
                ("country_minute", [_, country, ad, clicks]) => (format!("{country}/{ad}"), clicks),
                // top_minute: minute,rank,ad_id,clicks; its key is the ad.
                ("top_minute", [_, _, ad, clicks]) => (ad.to_string(), clicks),
                (_, [_, key, clicks]) => (key.to_string(), clicks),
                _ => return Err(bad()),
            };
            answers.insert((view, minute, key), clicks.parse().map_err(|_| bad())?);
        }
    }
    Ok(answers)
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
