//! How a run stops: on a signal in follow mode, when a worker fails, and when the workers are
//! done and their results are gathered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use timely::communication::WorkerGuards;

use crate::cluster;
use crate::model::Summary;
use crate::storage::committer::{COMMIT_LOCK, MIRROR_LOCK};

/// What a worker returns: the sink's summary (worker 0 of process 0) and the errors it met.
pub(super) type WorkerResult = (Option<Result<Summary, String>>, Vec<String>);

/// Set by SIGTERM or SIGINT in follow mode: stop at the last commit.
static SHUTDOWN: AtomicBool = AtomicBool::new(false);

extern "C" fn request_shutdown(_signal: libc::c_int) {
    SHUTDOWN.store(true, Ordering::SeqCst);
}

/// Follow mode stops on SIGTERM or SIGINT: a thread waits for the signal, takes the commit lock
/// (so that no commit is half-way) and exits. The store holds every answer before its last
/// committed watermark; a restart resumes from there.
pub(super) fn stop_on_signal() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, request_shutdown as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, request_shutdown as *const () as libc::sighandler_t);
    }
    std::thread::spawn(|| loop {
        if SHUTDOWN.load(Ordering::SeqCst) {
            // PostgreSQL's lock first, as its thread commits first; neither thread holds both.
            let _mirroring = MIRROR_LOCK.lock();
            let _committing = COMMIT_LOCK.lock();
            eprintln!("clickagg: stopped; the store holds every answer before the last committed watermark");
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_millis(20));
    });
}

/// Set when a worker of this process panics, so that the others stop waiting for progress it
/// will never make. (The binary's panic hook ends the process first; a caller of
/// [`run`](super::run), a test, gets an error instead of a run that never ends.)
pub(super) struct FlagOnPanic(pub(super) Arc<AtomicBool>);

impl Drop for FlagOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// What a worker returns when another has failed: its dataflows are dropped, or timely would
/// step them after it returns until they complete, which they never will. The sink is dropped
/// unfinished, so nothing claims that the input was complete.
pub(super) fn abandon(worker: &mut timely::worker::Worker) -> WorkerResult {
    for dataflow in worker.installed_dataflows() {
        worker.drop_dataflow(dataflow);
    }
    (None, vec!["another worker failed".to_string()])
}

/// Waits for every worker and gathers their results: the summary when this process holds the
/// sink (`sink_process`), or every worker's errors.
pub(super) fn gather(guards: WorkerGuards<WorkerResult>, sink_process: bool) -> Result<Option<Summary>, String> {
    // A lost peer makes timely's communication threads panic, and joining them panics again;
    // either way the user gets one message saying what happened.
    let results = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| guards.join()))
        .map_err(|_| cluster::failure_message())?;
    let mut summary = None;
    let mut errors = Vec::new();
    for result in results {
        let (worker_summary, worker_errors) = result.map_err(|_| cluster::failure_message())?;
        errors.extend(worker_errors);
        match worker_summary {
            Some(Ok(s)) => summary = Some(s),
            Some(Err(e)) => errors.push(e),
            None => {}
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }
    match (summary, sink_process) {
        (None, true) => Err("worker 0 produced no summary".to_string()),
        (summary, _) => Ok(summary),
    }
}
