//! How a run stops: on a signal in follow mode, when a worker fails, and when the workers are
//! done and their results are gathered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use timely::communication::WorkerGuards;

use crate::cluster;
use crate::model::Summary;
use crate::storage::committer::{COMMIT_LOCK, MIRROR_LOCK};

/// What a worker returns: the sink's summary (worker 0 of process 0) and the errors it met.
pub(super) type WorkerResult = (Option<Result<Summary, String>>, Vec<String>);

/// Follow mode stops on SIGTERM or SIGINT: a thread waits for the signal (signal-hook's
/// iterator, no handler of our own), takes the commit lock (so that no commit is half-way) and
/// exits. The store holds every answer before its last committed watermark; a restart resumes
/// from there. Without the signal thread (it could not be set up) the signals keep their default
/// action, which ends the process as SIGKILL would: the store is still consistent, only the last
/// advance may be replayed.
pub(super) fn stop_on_signal() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("clickagg: cannot handle SIGTERM and SIGINT ({e}); they will stop the follower abruptly");
            return;
        }
    };
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            // PostgreSQL's lock first, as its thread commits first; neither thread holds both.
            let _mirroring = MIRROR_LOCK.lock();
            let _committing = COMMIT_LOCK.lock();
            // Not `eprintln!`, which panics when stderr is gone (a closed pipe): the process
            // would then never exit.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"clickagg: stopped; the store holds every answer before the last committed watermark\n",
            );
            std::process::exit(0);
        }
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
