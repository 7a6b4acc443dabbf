//! `clickagg reconcile` (issue #8), through the binary as an analyst runs it, checked against the
//! reference model: with and without a lateness bound, the model gives the committed and the
//! reconciled answers independently of the dataflow.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use clickagg::reconcile::read_answers_dir;
use common::reference::{reference_outputs, RefConfig};

const LATENESS: &str = "20s";

fn clickagg(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_clickagg")).args(args).output().expect("the binary runs")
}

fn ok(args: &[&str]) -> String {
    let output = clickagg(args);
    assert!(output.status.success(), "clickagg {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Answers by `(view, minute, key)` as the report writes them.
type Named = BTreeMap<(String, u32, String), u64>;

fn named(dir: &Path) -> Named {
    read_answers_dir(dir, |_| true).unwrap().into_iter().map(|(k, v)| ((k.view_name().to_string(), k.minute, k.key_text()), v)).collect()
}

fn model(logs: &Path, lateness: Option<u64>, scratch: &Path) -> Named {
    let config = RefConfig { allowed_lateness_ms: lateness, max_clicks_per_minute: Some(6), ..RefConfig::default() };
    let dir = scratch.join(format!("model-{lateness:?}"));
    std::fs::create_dir_all(dir.join("changelog")).unwrap();
    for (name, text) in reference_outputs(logs, &config) {
        std::fs::write(dir.join(name), text).unwrap();
    }
    named(&dir)
}

/// `(view, minute, key) → (committed, reconciled)` of a report's differences.csv.
fn differences(report: &Path) -> BTreeMap<(String, u32, String), (u64, u64, bool)> {
    let text = std::fs::read_to_string(report.join("differences.csv")).unwrap();
    text.lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            ((f[0].to_string(), f[1].parse().unwrap(), f[2].to_string()), (f[3].parse().unwrap(), f[4].parse().unwrap(), f[6] == "yes"))
        })
        .collect()
}

/// Seeded logs with late, too-late, duplicated and bad rows over a few minutes.
fn logs(dir: &Path) -> std::path::PathBuf {
    let logs = dir.join("logs");
    ok(&["generate", "--out", s(&logs), "--events", "30000", "--partitions", "3", "--minutes", "8", "--seed", "4"]);
    logs
}

/// The settings the run and the reconcile share, as flags: reconcile must be given the run's.
const SETTINGS: [&str; 6] = ["-w", "2", "--allowed-lateness", LATENESS, "--max-clicks-per-minute", "6"];

fn run_args<'a>(logs: &'a Path, flag: &'a str, target: &'a Path) -> Vec<&'a str> {
    let mut args = vec!["run", "--logs", s(logs), flag, s(target)];
    args.extend(SETTINGS);
    args
}

fn reconcile_args<'a>(logs: &'a Path, against: &'a Path, report: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["reconcile", "--logs", s(logs), "--against", s(against), "--report", s(report)];
    args.extend(SETTINGS);
    args.extend(extra);
    args
}

#[test]
fn reconcile_reports_exactly_the_too_late_rows_and_apply_closes_them() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path());
    let store = dir.path().join("answers.db");
    ok(&run_args(&logs, "--store", &store));
    let committed = model(&logs, Some(20_000), dir.path());
    let reconciled = model(&logs, None, dir.path());
    assert_ne!(committed, reconciled, "the logs must have too-late rows that matter");

    let report = dir.path().join("report");
    let summary = ok(&reconcile_args(&logs, &store, &report, &[]));
    assert!(summary.contains(" 0 unexplained differences"), "{summary}");
    // Every answer that differs between the two models, and no other, is reported, explained.
    let mut want = BTreeMap::new();
    for key in committed.keys().chain(reconciled.keys()) {
        let (c, r) = (committed.get(key).copied().unwrap_or(0), reconciled.get(key).copied().unwrap_or(0));
        if c != r {
            want.insert(key.clone(), (c, r, true));
        }
    }
    assert_eq!(differences(&report), want);
    let added: i64 = want.iter().filter(|(k, _)| k.0 == "ad_minute").map(|(_, v)| v.1 as i64 - v.0 as i64).sum();
    assert!(summary.contains(&format!("({added:+} clicks)")), "{summary}");

    // Each explanation is a too-late row of the dead letter, on a (minute, ad) that differs.
    let out = dir.path().join("exported");
    ok(&["export", "--store", s(&store), "--out", s(&out)]);
    let dead_letter = std::fs::read_to_string(out.join("dead_letter.csv")).unwrap();
    let explanations = std::fs::read_to_string(report.join("explanations.csv")).unwrap();
    let mut explained_ads = 0;
    for row in explanations.lines().skip(1) {
        let f: Vec<&str> = row.splitn(5, ',').collect();
        assert!(dead_letter.contains(&format!("{},{},too_late,{}", f[2], f[3], f[4])), "not a too-late row: {row}");
        assert!(want.contains_key(&("ad_minute".to_string(), f[0].parse().unwrap(), f[1].to_string())), "{row}");
        explained_ads += 1;
    }
    let ad_differences = want.keys().filter(|k| k.0 == "ad_minute").count();
    assert!(explained_ads >= ad_differences, "{explained_ads} explanations for {ad_differences} ad differences");

    // --apply: the store now holds the reconciled answers, and keeps the old ones.
    let applied = ok(&reconcile_args(&logs, &store, &dir.path().join("applied"), &["--apply"]));
    assert!(applied.contains(&format!("{} answers applied", want.len())), "{applied}");
    let again = ok(&reconcile_args(&logs, &store, &dir.path().join("again"), &[]));
    assert!(again.contains(" 0 answers corrected") && again.contains(" 0 unexplained"), "{again}");
    assert!(differences(&dir.path().join("again")).is_empty());
    let conn = rusqlite::Connection::open(&store).unwrap();
    let superseded: i64 = conn.query_row("SELECT count(*) FROM superseded WHERE version = 1", [], |r| r.get(0)).unwrap();
    assert_eq!(superseded as usize, want.len());
    let audit: (i64, i64) = conn.query_row("SELECT answers_changed, clicks_added FROM reconciliations", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    assert_eq!(audit, (want.len() as i64, added));
    let applied_out = dir.path().join("applied-export");
    ok(&["export", "--store", s(&store), "--out", s(&applied_out)]);
    assert_eq!(named(&applied_out), reconciled, "the applied store holds the model's reconciled answers");
}

#[test]
fn a_doctored_count_is_unexplained_and_fails_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path());
    let store = dir.path().join("answers.db");
    ok(&run_args(&logs, "--store", &store));
    let (minute, ad): (i64, i64) = {
        let conn = rusqlite::Connection::open(&store).unwrap();
        let key = conn.query_row("SELECT minute, ad_id FROM ad_minute ORDER BY clicks DESC LIMIT 1", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        conn.execute("UPDATE ad_minute SET clicks = clicks - 1 WHERE minute = ?1 AND ad_id = ?2", key).unwrap();
        key
    };
    let report = dir.path().join("report");
    let output = clickagg(&reconcile_args(&logs, &store, &report, &[]));
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains(" 1 unexplained differences"));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not explained by too-late rows"));
    let unexplained = std::fs::read_to_string(report.join("unexplained.csv")).unwrap();
    let rows: Vec<&str> = unexplained.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{unexplained}");
    assert!(rows[0].starts_with(&format!("ad_minute,{minute},{},", ad as u64)), "{unexplained}");
}

#[test]
fn an_output_directory_and_a_range_give_the_same_report_as_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path());
    let store = dir.path().join("answers.db");
    let out = dir.path().join("out");
    ok(&run_args(&logs, "--store", &store));
    ok(&run_args(&logs, "--out", &out));
    let (from_store, from_out) = (dir.path().join("r-store"), dir.path().join("r-out"));
    let a = ok(&reconcile_args(&logs, &store, &from_store, &[]));
    let b = ok(&reconcile_args(&logs, &out, &from_out, &[]));
    assert_eq!(a, b);
    assert_eq!(differences(&from_store), differences(&from_out));
    for file in ["explanations.csv", "unexplained.csv"] {
        assert_eq!(std::fs::read(from_store.join(file)).unwrap(), std::fs::read(from_out.join(file)).unwrap(), "{file}");
    }
    // A range: the full report's rows of those minutes, read from the store's checkpoints on.
    let all = differences(&from_store);
    let first = all.keys().map(|k| k.1).min().unwrap();
    let (from, to) = (first + 3, first + 6);
    let ranged = dir.path().join("r-range");
    let (from_text, to_text) = (from.to_string(), to.to_string());
    ok(&reconcile_args(&logs, &store, &ranged, &["--from", &from_text, "--to", &to_text]));
    let want: BTreeMap<_, _> = all.into_iter().filter(|(k, _)| k.1 >= from && k.1 < to).collect();
    assert!(!want.is_empty());
    assert_eq!(differences(&ranged), want);
    // --apply needs a store.
    let output = clickagg(&reconcile_args(&logs, &out, &dir.path().join("x"), &["--apply"]));
    assert!(!output.status.success() && String::from_utf8_lossy(&output.stderr).contains("must be a store"));
}

#[test]
fn reconcile_takes_the_stores_settings_and_says_why_it_compared_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let logs = logs(dir.path());
    let store = dir.path().join("answers.db");
    let chosen = ["--tick", "10s", "--windows", "1m,2m"];
    let mut args = run_args(&logs, "--store", &store);
    args.extend(chosen);
    ok(&args);
    // Without the run's flags, the store's settings are used: the report is the one the
    // flags give.
    let (bare, flagged) = (dir.path().join("bare"), dir.path().join("flagged"));
    let a = ok(&["reconcile", "--logs", s(&logs), "--against", s(&store), "--report", s(&bare), "-w", "2"]);
    let b = ok(&reconcile_args(&logs, &store, &flagged, &chosen));
    assert_eq!(a, b);
    assert!(!differences(&bare).is_empty());
    assert_eq!(differences(&bare), differences(&flagged));
    // A flag that is not the store's is refused, in the command line's words.
    let output = clickagg(&["reconcile", "--logs", s(&logs), "--against", s(&store), "--report", s(&bare), "--allowed-lateness", "5m"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("allowed lateness: 20s in the store, 5m given"), "{stderr}");
    // No minute compared: said why.
    let empty = ok(&reconcile_args(&logs, &store, &dir.path().join("empty"), &["--from", "100000", "--to", "100005"]));
    assert!(empty.contains("0 minutes compared") && empty.contains("hold an answer in minutes 100000 to 100004"), "{empty}");
    let backwards = ok(&reconcile_args(&logs, &store, &dir.path().join("backwards"), &["--from", "9", "--to", "9"]));
    assert!(backwards.contains("--from (minute 9) is not before --to (minute 9)"), "{backwards}");
    let summary = std::fs::read_to_string(dir.path().join("backwards").join("summary.txt")).unwrap();
    assert!(summary.contains("no minute was compared"), "{summary}");
}
