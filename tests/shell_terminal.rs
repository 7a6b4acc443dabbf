//! `clickagg shell` in a pseudo-terminal, as a person uses it: the prompt, line editing, Tab
//! completion, Ctrl-C during `watch`, history recalled with the Up arrow after a restart, and a
//! home directory where history cannot be kept.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use clickagg::generate::{generate, GenConfig};
use common::server::{follow_until_caught_up, get_json};
use rexpect::reader::Options;
use rexpect::session::{spawn_with_options, PtySession};

const PROMPT: &str = "clickagg> ";
const UP: &str = "\x1b[A";

/// The shell in a fresh pseudo-terminal, with `home` as HOME and no XDG_DATA_HOME.
fn shell(address: &str, home: &Path) -> PtySession {
    let mut command = Command::new(env!("CARGO_BIN_EXE_clickagg"));
    command.args(["shell", "--connect", address]).env("HOME", home).env_remove("XDG_DATA_HOME").env("TERM", "xterm");
    spawn_with_options(command, Options { timeout_ms: Some(30_000), strip_ansi_escape_codes: true }).unwrap()
}

/// Types `keys` without Enter.
fn keys(session: &mut PtySession, keys: &str) {
    session.send(keys).unwrap();
    session.flush().unwrap();
}

/// Sends `line` and returns what the shell printed up to its next prompt.
fn run(session: &mut PtySession, line: &str) -> String {
    session.send_line(line).unwrap();
    session.exp_string(PROMPT).unwrap_or_else(|e| panic!("no prompt after {line:?}: {e}"))
}

#[test]
fn a_person_at_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&GenConfig { events: 20_000, partitions: 2, minutes: 10, ads: 100, seed: 9, ..GenConfig::default() }, &logs).unwrap();
    let server = follow_until_caught_up(&logs, &dir.path().join("store.db"), &[]);
    let a = server.address.as_str();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();

    let mut session = shell(a, &home);
    session.exp_string("type help").unwrap();
    session.exp_string(PROMPT).unwrap();
    let help = run(&mut session, "help");
    assert!(help.contains("peek ARRANGEMENT [KEY] [limit N]") && help.contains("Ctrl-C"), "{help}");

    let top = run(&mut session, "top 60m 3");
    assert!(top.contains("rank  ad_id"), "{top}");
    let expected = get_json(a, "/v1/ads/popular_ads?window=60m&count=3");
    let best = &expected["ads"][0];
    assert!(top.contains(&format!("   1  {:<20} {:>7}", best["ad_id"].to_string(), best["clicks"].to_string())), "{top}\n{expected}");

    // A user the filter arrangement holds, peeked with a limit of one row.
    let minute = get_json(a, "/v1/status")["as_of_minute"].as_u64().unwrap() - 1;
    let user = std::fs::read_to_string(logs.join("part-00000.csv"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split(',').nth(4)?.parse::<u64>().ok())
        .find(|u| get_json(a, &format!("/v1/introspection/peek?arrangement=ClicksByUser&key={u}"))["rows"].as_array().unwrap().len() > 1)
        .expect("a user with two rows held");
    let peeked = run(&mut session, &format!("peek ClicksByUser {user} limit 1"));
    assert!(peeked.contains(&format!("ClicksByUser [{user}]: 1 rows, the first 1 shown: more are held")), "{peeked}");
    let peeked = run(&mut session, &format!("peek AdMinute {minute} limit 2"));
    assert!(peeked.contains(&format!("AdMinute [{minute}]: 2 rows, the first 2 shown: more are held")), "{peeked}");

    // watch, then Ctrl-C: back at the prompt, and the shell still answers.
    session.send_line("watch watermark").unwrap();
    session.exp_string("-- watermark").unwrap();
    std::thread::sleep(Duration::from_millis(700));
    session.send_control('c').unwrap();
    session.exp_string("-- stopped").unwrap();
    session.exp_string(PROMPT).unwrap();
    let watermark = run(&mut session, "watermark");
    assert!(watermark.contains("(minute "), "{watermark}");

    // Tab completes a command, and an arrangement's name after peek.
    keys(&mut session, "arrang\t");
    session.exp_string("arrangements").unwrap();
    let arrangements = run(&mut session, "");
    assert!(arrangements.contains("arrangements as of watermark") && arrangements.contains("ClicksByIp"), "{arrangements}");
    keys(&mut session, "peek ClicksByU\t");
    session.exp_string("ClicksByUser").unwrap();
    keys(&mut session, &format!(" {user} limit 1"));
    let completed = run(&mut session, "");
    assert!(completed.contains(&format!("ClicksByUser [{user}]: 1 rows")), "{completed}");

    let dataflow = run(&mut session, "dataflow");
    assert!(dataflow.contains("per worker") && dataflow.contains("time ms"), "{dataflow}");
    session.send_line("quit").unwrap();
    session.exp_eof().unwrap();

    let history = std::fs::read_to_string(home.join(".local/share/clickagg/history")).unwrap();
    assert!(history.contains("watch watermark") && history.contains("top 60m 3"), "{history}");

    // After a restart the Up arrow recalls the last lines, newest first.
    let mut session = shell(a, &home);
    session.exp_string(PROMPT).unwrap();
    keys(&mut session, UP);
    session.exp_string("quit").unwrap();
    keys(&mut session, UP);
    session.exp_string("dataflow").unwrap();
    keys(&mut session, UP);
    session.exp_string(&format!("peek ClicksByUser {user} limit 1")).unwrap();
    let recalled = run(&mut session, "");
    assert!(recalled.contains(&format!("ClicksByUser [{user}]: 1 rows")), "{recalled}");
    session.send_control('d').unwrap();
    session.exp_eof().unwrap();
}

#[test]
fn a_home_where_history_cannot_be_kept_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&GenConfig { events: 2_000, partitions: 1, minutes: 3, ads: 10, seed: 2, ..GenConfig::default() }, &logs).unwrap();
    let server = follow_until_caught_up(&logs, &dir.path().join("store.db"), &[]);
    // HOME is a file: no directory can be made under it.
    let home = dir.path().join("not-a-directory");
    std::fs::write(&home, "").unwrap();
    let mut session = shell(&server.address, &home);
    session.exp_string("warning: history is not kept").unwrap();
    session.exp_string(PROMPT).unwrap();
    let watermark = run(&mut session, "watermark");
    assert!(watermark.contains("(minute "), "{watermark}");
    session.send_line("quit").unwrap();
    session.exp_eof().unwrap();
    assert!(matches!(session.process().wait().unwrap(), rexpect::process::wait::WaitStatus::Exited(_, 0)));

    // A history that is a directory can be neither read nor written: two warnings, no panic.
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join(".local/share/clickagg/history")).unwrap();
    let mut session = shell(&server.address, &home);
    session.exp_string("warning: cannot read the history").unwrap();
    session.exp_string(PROMPT).unwrap();
    session.send_line("watermark").unwrap();
    session.exp_string("warning: history is not kept: cannot write").unwrap();
    session.exp_string(PROMPT).unwrap();
    session.send_line("quit").unwrap();
    session.exp_eof().unwrap();
    assert!(matches!(session.process().wait().unwrap(), rexpect::process::wait::WaitStatus::Exited(_, 0)));
}
