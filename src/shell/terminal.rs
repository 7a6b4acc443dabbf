//! The shell in a terminal: line editing, history kept in the user's data directory, completion
//! of commands and arrangement names, and Ctrl-C that stops a running command (`watch`) rather
//! than the shell.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Config, Context, Editor, Helper};

use super::{execute, Client, COMMANDS};

/// How many lines the history file keeps.
const HISTORY_LINES: usize = 1000;

/// Set by SIGINT while the shell runs a command; a running `watch` polls it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Takes SIGINT for the rest of the process: Ctrl-C sets [`INTERRUPTED`] instead of ending it.
/// While a line is edited the terminal is raw and Ctrl-C reaches the editor as a key instead
/// (rustyline puts back this handler when the line is done).
fn catch_interrupts() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the sigaction
    // struct is zeroed (no flags, empty mask) before the handler is set.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
    }
}

/// Clears a pending Ctrl-C, before a command starts.
pub(super) fn clear_interrupt() {
    INTERRUPTED.store(false, Ordering::SeqCst);
}

/// Whether Ctrl-C was pressed since [`clear_interrupt`].
pub(super) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Where the history lives: `$XDG_DATA_HOME/clickagg/history`, else
/// `$HOME/.local/share/clickagg/history` (an empty or relative `XDG_DATA_HOME` is ignored, as
/// the XDG base directory specification says). `None` without either.
pub fn history_path() -> Option<PathBuf> {
    history_path_in(|name| std::env::var_os(name))
}

/// [`history_path`] with the environment given by `var`.
fn history_path_in(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let absolute = |name: &str| var(name).map(PathBuf::from).filter(|p| p.is_absolute());
    let data = absolute("XDG_DATA_HOME").or_else(|| absolute("HOME").map(|home| home.join(".local").join("share")))?;
    Some(data.join("clickagg").join("history"))
}

/// Completes the command (the first word, or the one after `watch [N]`), and an arrangement's
/// name after `peek`. The names are asked of the server once, when first needed.
struct Completion<'a> {
    client: &'a Client,
    arrangements: Mutex<Option<Vec<String>>>,
}

impl Completion<'_> {
    /// The arrangement names the server lists, without the `Arrange: ` prefix that peek does not
    /// need; empty (and asked again next time) when the server cannot answer.
    fn arrangements(&self) -> Vec<String> {
        let mut known = self.arrangements.lock().unwrap_or_else(|e| e.into_inner());
        if known.is_none() {
            if let Ok(json) = self.client.get("/v1/introspection/arrangements") {
                let mut names: Vec<String> = json["arrangements"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a["name"].as_str())
                    .map(|n| n.strip_prefix("Arrange: ").unwrap_or(n).to_string())
                    .collect();
                names.sort();
                names.dedup();
                *known = Some(names);
            }
        }
        known.clone().unwrap_or_default()
    }
}

/// The candidates for the word at `start..pos` of `line`, given the words before it.
pub fn candidates(before: &[&str], word: &str, arrangements: impl FnOnce() -> Vec<String>) -> Vec<String> {
    // `watch` and `watch N` are followed by a command.
    let before = match before {
        ["watch", n, rest @ ..] if n.parse::<usize>().is_ok() => rest,
        ["watch", rest @ ..] => rest,
        other => other,
    };
    let options: Vec<String> = match before {
        [] => COMMANDS.iter().map(|c| c.to_string()).collect(),
        ["peek"] => arrangements(),
        ["top"] => ["minute", "1m", "5m", "60m"].map(String::from).to_vec(),
        ["peek", _, _] => vec!["limit".to_string()],
        _ => Vec::new(),
    };
    let mut matching: Vec<String> = options.into_iter().filter(|o| o.starts_with(word)).collect();
    matching.sort();
    matching
}

impl Completer for Completion<'_> {
    type Candidate = Pair;

    fn complete(&self, line: &str, pos: usize, _ctx: &Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        let head = &line[..pos];
        let start = head.rfind(char::is_whitespace).map_or(0, |i| i + 1);
        let before: Vec<&str> = head[..start].split_whitespace().collect();
        let found = candidates(&before, &head[start..], || self.arrangements());
        let pairs = found
            .into_iter()
            .map(|c| Pair { display: c.clone(), replacement: if before.is_empty() || before == ["watch"] { format!("{c} ") } else { c } })
            .collect();
        Ok((start, pairs))
    }
}

impl Hinter for Completion<'_> {
    type Hint = String;
}
impl Highlighter for Completion<'_> {}
impl Validator for Completion<'_> {}
impl Helper for Completion<'_> {}

/// Loads the history, if there is one: a missing file is a first start, anything else a warning.
/// Returns whether the file can be written to later.
fn load(editor: &mut Editor<Completion<'_>, DefaultHistory>, path: &Path) -> bool {
    if let Some(dir) = path.parent() {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("clickagg shell: warning: history is not kept: cannot create {}: {e}", dir.display());
            return false;
        }
    }
    match editor.load_history(path) {
        Ok(()) => true,
        Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            eprintln!("clickagg shell: warning: cannot read the history {}: {e}", path.display());
            true
        }
    }
}

/// Edits lines until `quit` or end of input (Ctrl-D); Ctrl-C drops the line being edited.
/// Each line is appended to the history file as it is entered, so that history survives a
/// killed shell; a history that cannot be written is warned about once and then kept in memory.
pub fn interactive(client: &Client) -> Result<(), String> {
    let config = Config::builder().max_history_size(HISTORY_LINES).map_err(|e| e.to_string())?.auto_add_history(false).build();
    let mut editor: Editor<Completion<'_>, DefaultHistory> = Editor::with_config(config).map_err(|e| e.to_string())?;
    editor.set_helper(Some(Completion { client, arrangements: Mutex::new(None) }));
    let mut path = history_path();
    if path.is_none() {
        eprintln!("clickagg shell: warning: history is not kept: neither XDG_DATA_HOME nor HOME is set");
    }
    if let Some(p) = &path {
        if !load(&mut editor, p) {
            path = None;
        }
    }
    catch_interrupts();
    loop {
        match editor.readline("clickagg> ") {
            Ok(line) => {
                if !line.trim().is_empty() && editor.add_history_entry(line.as_str()).unwrap_or(false) {
                    if let Some(p) = &path {
                        if let Err(e) = editor.append_history(p) {
                            eprintln!("clickagg shell: warning: history is not kept: cannot write {}: {e}", p.display());
                            path = None;
                        }
                    }
                }
                clear_interrupt();
                if !execute(client, line.trim(), &mut std::io::stdout()) {
                    break;
                }
            }
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(format!("reading the terminal: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["AdMinute".into(), "ClicksByIp".into(), "ClicksByUser".into()]
    }

    #[test]
    fn completes_commands_and_arrangement_names() {
        assert_eq!(candidates(&[], "wa", names), ["watch", "watermark"]);
        assert_eq!(candidates(&["peek"], "ClicksBy", names), ["ClicksByIp", "ClicksByUser"]);
        assert_eq!(candidates(&["watch", "3"], "pa", names), ["partitions"]);
        assert_eq!(candidates(&["watch"], "pe", names), ["peek"]);
        assert_eq!(candidates(&["peek", "AdMinute", "1"], "l", names), ["limit"]);
        assert!(candidates(&["count"], "1", names).is_empty());
    }

    #[test]
    fn history_lives_in_the_data_directory() {
        let env = |xdg: Option<&'static str>| {
            move |name: &str| match name {
                "HOME" => Some("/home/someone".into()),
                "XDG_DATA_HOME" => xdg.map(Into::into),
                _ => None,
            }
        };
        assert_eq!(history_path_in(env(Some("/data"))), Some(PathBuf::from("/data/clickagg/history")));
        let default = Some(PathBuf::from("/home/someone/.local/share/clickagg/history"));
        assert_eq!(history_path_in(env(Some("relative"))), default);
        assert_eq!(history_path_in(env(Some(""))), default);
        assert_eq!(history_path_in(env(None)), default);
        assert_eq!(history_path_in(|_| None), None);
    }
}
