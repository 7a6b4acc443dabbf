//! The command line as a user runs it: the real binary, its flags, its errors and exit codes.

use std::path::Path;
use std::process::Command;

fn clickagg(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_clickagg")).args(args).output().expect("the binary runs")
}

#[test]
fn run_writes_every_file_and_honours_windows() {
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap();
    let result = clickagg(&["run", "--logs", "datasets/sample/logs", "--out", out_dir, "-w", "2", "--windows", "2m,3m", "--summary"]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let summary = String::from_utf8_lossy(&result.stdout);
    assert!(summary.contains("too late") && summary.contains("busiest minute"), "{summary}");
    for file in ["ad_minute.csv", "campaign_minute.csv", "country_minute.csv", "top_minute.csv", "dead_letter.csv",
                 "changelog/updates.csv", "top_window_2m.csv", "top_window_3m.csv"] {
        assert!(Path::new(out_dir).join(file).is_file(), "{file} missing");
    }
    assert!(!Path::new(out_dir).join("top_window_5m.csv").exists());
}

/// A run into a directory that a previous, larger run wrote leaves there exactly what a run into
/// an empty directory writes: the previous files are replaced, not written over from their start,
/// and what was set aside to be deleted is gone, with what a killed run set aside. A file of the
/// user's own stays.
#[test]
fn a_run_replaces_what_a_previous_run_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let (small, reused, fresh) = (path("small"), path("reused"), path("fresh"));
    let result = clickagg(&["generate", "--out", &small, "--events", "300", "--partitions", "2"]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let listing = |out: &str| {
        let mut names: Vec<String> = walk(Path::new(out)).iter().map(|p| p.strip_prefix(out).unwrap().display().to_string()).collect();
        names.sort();
        names
    };
    for (logs, out) in [("datasets/sample/logs", &reused), (small.as_str(), &reused), (small.as_str(), &fresh)] {
        if out == &reused && Path::new(out).exists() {
            // What a run killed before deleting its set-aside files would leave, beside the
            // user's own file.
            let killed = Path::new(out).join(".clickagg-replaced-1-2");
            std::fs::create_dir_all(&killed).unwrap();
            std::fs::write(killed.join("0"), "old rows\n").unwrap();
            std::fs::write(Path::new(out).join("notes.txt"), "mine\n").unwrap();
        }
        let result = clickagg(&["run", "--logs", logs, "--out", out, "-w", "2"]);
        assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    }
    for file in ["ad_minute.csv", "campaign_minute.csv", "country_minute.csv", "top_minute.csv", "dead_letter.csv",
                 "changelog/updates.csv", "top_window_1m.csv", "top_window_5m.csv", "top_window_60m.csv"] {
        let read = |out: &str| std::fs::read_to_string(Path::new(out).join(file)).unwrap();
        assert_eq!(read(&reused), read(&fresh), "{file}");
    }
    let mut expected = listing(&fresh);
    expected.push("notes.txt".into());
    expected.sort();
    assert_eq!(listing(&reused), expected);
    assert_eq!(std::fs::read_to_string(Path::new(&reused).join("notes.txt")).unwrap(), "mine\n");
}

/// Every file under `dir`, and every directory (so that an empty one left behind shows).
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(walk(&path));
        }
        found.push(path);
    }
    found
}

#[test]
fn bad_flags_and_paths_are_clear_errors_not_panics() {
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().to_str().unwrap();
    for (args, needle) in [
        (vec!["run", "--logs", "/nonexistent/logs", "--out", out_dir], "cannot read the log directory"),
        (vec!["run", "--logs", "datasets/sample/logs", "--out", out_dir, "--windows", "30s"], "whole number of minutes"),
        (vec!["run", "--logs", "datasets/sample/logs", "--out", out_dir, "--allowed-lateness", "5"], "needs a unit"),
        (vec!["run", "--logs", "datasets/sample/logs", "--out", out_dir, "--tick", "7s"], "must divide a minute"),
        (vec!["run", "--logs", "datasets/sample/logs", "--out", out_dir, "--top-k", "0"], "top-K"),
        (vec!["run", "--logs", "datasets/sample/logs", "--out", "/proc/clickagg-cannot-write"], "cannot create"),
    ] {
        let result = clickagg(&args);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{args:?} should fail");
        assert!(stderr.contains(needle), "{args:?}: expected '{needle}' in: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}

#[test]
fn generate_then_parse_only() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    let logs = logs.to_str().unwrap();
    let result = clickagg(&["generate", "--out", logs, "--events", "5000", "--partitions", "3", "--preset", "hot-key"]);
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    let result = clickagg(&["parse-only", "--logs", logs, "-w", "2"]);
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(result.status.success() && stdout.starts_with("lines "), "{stdout}");
}

#[test]
fn edge_errors_are_typed_and_say_what_to_do() {
    use clickagg::error::EdgeError;
    match clickagg::source::list_partitions(Path::new("/nonexistent/logs")) {
        Err(EdgeError::LogDirectory { source, .. }) => assert_eq!(source.kind(), std::io::ErrorKind::NotFound),
        other => panic!("expected a LogDirectory error, got {other:?}"),
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("part-00000.csv")).unwrap();
    let error = clickagg::source::list_partitions(dir.path()).unwrap_err();
    assert!(matches!(error, EdgeError::NotAPartition { .. }), "{error:?}");
    assert!(error.to_string().contains("move it out of the log directory"), "{error}");
}

/// `-h` is help in every subcommand, `run` included (its hostfile is `-H`).
#[test]
fn dash_h_is_help_everywhere() {
    for command in ["run", "demo", "shell", "export", "reconcile", "generate", "feed", "parse-only", "cluster-local"] {
        let result = clickagg(&[command, "-h"]);
        let stdout = String::from_utf8_lossy(&result.stdout);
        assert!(result.status.success(), "{command} -h: {}", String::from_utf8_lossy(&result.stderr));
        assert!(stdout.contains("Usage: clickagg"), "{command} -h printed no usage: {stdout}");
    }
    let help = String::from_utf8_lossy(&clickagg(&["run", "-h"]).stdout).into_owned();
    assert!(help.contains("-H, --hostfile"), "{help}");
}

/// A log directory without partition files is an error naming the pattern a partition must
/// have, not a run over 0 partitions that exits 0.
#[test]
fn an_empty_log_directory_is_an_error_that_names_the_pattern() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("clicks.csv"), "event_id,ts,ad_id,campaign_id,user_id,ip,country\n").unwrap();
    let out = dir.path().join("out");
    let result = clickagg(&["run", "--logs", dir.path().to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "{stderr}");
    assert!(stderr.contains("no partition files in") && stderr.contains("part-NNNNN.csv"), "{stderr}");
}

/// Timestamps in seconds are accepted as SPEC says (milliseconds), with a warning that says
/// what they look like.
#[test]
fn timestamps_in_seconds_get_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(logs.join("part-00000.csv"), "event_id,ts,ad_id,campaign_id,user_id,ip,country\ne1,1767225600,7,1,1,10.0.0.1,US\n").unwrap();
    let out = dir.path().join("out");
    let result = clickagg(&["run", "--logs", logs.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert!(stderr.contains("timestamps look like seconds") && stderr.contains("1970-01-21T10:53:45.600Z"), "{stderr}");
}
