//! The store a server uses when `run --serve` is given no `--store` (SPEC §6: final minutes are
//! read from a store, so a server always has one): a segment store
//! ([`crate::storage::segments`]), append-only files of final minutes.
//!
//! It lives in a directory of its own, `.clickagg-serve-<pid>/`, next to `--out` (beside the
//! output, on the same disk: the system's temporary directory is often memory, which is what
//! the store is there to spare), or in the temporary directory without `--out`. Nothing is
//! recovered from it, and it is removed when the process ends normally or on SIGINT/SIGTERM. A
//! directory left by a process that was killed is removed by the next server that starts
//! beside it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The prefix of an embedded store's directory name; the process id follows.
const PREFIX: &str = ".clickagg-serve-";

/// A served `--store`'s writer page cache. Each commit touches the pages of the minutes still
/// open and of the by-ad indexes; a larger cache is memory that grows with the store (it counts
/// in the server's RSS), a smaller one re-reads pages from the operating system's cache.
pub const CACHE_KIB: i64 = 32 * 1024;

/// The directories to remove at exit.
static TEMPORARY: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Creates an embedded store's directory next to `out` (or in the temporary directory) and
/// returns it, for the segment store's files. Says where it is.
pub fn create(out: Option<&Path>) -> Result<PathBuf, String> {
    let parent = match out.map(std::path::absolute) {
        Some(Ok(out)) => out.parent().map_or_else(std::env::temp_dir, Path::to_path_buf),
        _ => std::env::temp_dir(),
    };
    std::fs::create_dir_all(&parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    remove_abandoned(&parent);
    let dir = parent.join(format!("{PREFIX}{}", std::process::id()));
    // Left by an earlier process with this id (ids are reused): it is not ours to resume.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).map_err(|e| format!("cannot create the embedded store's directory {}: {e}", dir.display()))?;
    if let Ok(mut temporary) = TEMPORARY.lock() {
        temporary.push(dir.clone());
    }
    eprintln!("clickagg: no --store: final minutes are served from an embedded segment store in {} (removed at exit)", dir.display());
    Ok(dir)
}

/// Readies a `--store` the server reads final minutes from: its serving tables and indexes, and
/// the page cache of [`CACHE_KIB`].
///
/// A served store's writer cache is bounded as the embedded one's is: in the soak (bench/, 6 h
/// of event time), a `--store` follower with the replay's 256 MiB cache grew by the cache's
/// size over hours as the store grew, and levelled off only once it was full.
pub fn prepare_store(store: &mut crate::storage::Store) -> Result<(), String> {
    store.prepare_for_serving()?;
    store.set_cache_kib(CACHE_KIB)
}

/// Removes the embedded stores' directories (at exit).
pub fn remove_temporary() {
    if let Ok(mut dirs) = TEMPORARY.lock() {
        for dir in dirs.drain(..) {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Removes the embedded stores when dropped: at the end of `main`, however it returns.
pub struct RemoveAtExit;

impl Drop for RemoveAtExit {
    fn drop(&mut self) {
        remove_temporary();
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_signal: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// A served replay runs until SIGINT or SIGTERM: then a thread waits for any commit under way,
/// removes the embedded store, and exits.
pub fn remove_on_signal() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, request_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, request_stop as *const () as libc::sighandler_t);
    }
    std::thread::spawn(|| loop {
        if STOP.load(Ordering::SeqCst) {
            let _committing = crate::storage::committer::COMMIT_LOCK.lock();
            remove_temporary();
            // Not `eprintln!`, which panics when stderr is gone (a closed pipe): the process
            // would then never exit.
            let _ = std::io::Write::write_all(&mut std::io::stderr(), b"clickagg: stopped; the embedded store was removed\n");
            std::process::exit(0);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    });
}

/// Removes embedded stores in `parent` whose process is gone (where `/proc` tells).
fn remove_abandoned(parent: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)).and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
