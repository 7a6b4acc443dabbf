//! Where the sink runs: on worker 0, or on a thread of its own.

use std::io;

use clickagg_dataflows::{SinkRecord, Time};

use super::OutputSink;
use crate::model::Summary;

/// Where the sink runs, as worker 0 sees it: on worker 0 itself, or on a thread of its own.
///
/// A replay runs it on its own thread ([`SinkThread`]), so that consolidating, formatting and
/// writing the answers does not hold the workers back. A follower runs it on worker 0: there
/// each tick's answers are few, and what matters is committing them as soon as the frontier
/// passes, without waiting for another thread to be scheduled on a saturated machine: at 200k
/// clicks/s on the benchmark machine, the p99 append-to-commit latency was 1.03 s with the sink
/// on a thread, and 0.41 s with it on worker 0.
pub enum SinkRunner {
    OnWorker { sink: Option<Box<OutputSink>>, error: Option<io::Error> },
    OnThread(SinkThread),
}

impl SinkRunner {
    pub fn on_worker(sink: OutputSink) -> SinkRunner {
        SinkRunner::OnWorker { sink: Some(Box::new(sink)), error: None }
    }

    /// See [`SinkThread::spawn`].
    pub fn on_thread(sink: OutputSink, setup: impl FnOnce() + Send + 'static) -> io::Result<SinkRunner> {
        SinkThread::spawn(sink, setup).map(SinkRunner::OnThread)
    }

    /// Hands the sink one activation's batches of updates and the frontier after it.
    pub fn advance(&mut self, batches: Vec<Vec<(SinkRecord, Time, isize)>>, frontier: Option<Time>) {
        match self {
            SinkRunner::OnThread(thread) => thread.advance(batches, frontier),
            SinkRunner::OnWorker { sink, error } => {
                let Some(running) = sink.as_mut() else { return };
                if let Err(e) = running.take_batches(batches, frontier) {
                    // Nothing more is written; `finish` reports why.
                    *error = Some(e);
                    *sink = None;
                }
            }
        }
    }

    /// Applies everything handed over, writes what is still open, and commits the end of the
    /// input; returns the run's summary.
    pub fn finish(self) -> io::Result<Summary> {
        match self {
            SinkRunner::OnThread(thread) => thread.finish(),
            SinkRunner::OnWorker { error: Some(e), .. } => Err(e),
            SinkRunner::OnWorker { sink: Some(sink), .. } => (*sink).finish(),
            SinkRunner::OnWorker { sink: None, error: None } => unreachable!("the sink is only dropped with its error"),
        }
    }
}

/// What worker 0 hands the sink's thread.
enum ToSink {
    /// The batches of updates of one activation, as they arrived, and the frontier after it
    /// (`None`: the input is complete).
    Advance(Vec<Vec<(SinkRecord, Time, isize)>>, Option<Time>),
    /// The dataflow is done: write what is still open and report the summary.
    Finish,
}

/// An [`OutputSink`] on a thread of its own, so that consolidating, formatting, writing and
/// committing the answers run beside the workers instead of on worker 0, which would otherwise
/// hold every other worker back by that much.
///
/// The channel is bounded: a sink that falls behind blocks worker 0, and through it the
/// dataflow, rather than letting the updates queue without limit. If the thread stops (an
/// error, or a dropped handle), the updates sent after it are lost with the run, which fails.
pub struct SinkThread {
    to_sink: Option<std::sync::mpsc::SyncSender<ToSink>>,
    thread: std::thread::JoinHandle<io::Result<Option<Summary>>>,
    last_frontier: Option<Option<Time>>,
}

/// Activations of worker 0's sink operator that may wait for the sink's thread.
const SINK_BACKLOG: usize = 256;

impl SinkThread {
    /// Starts `sink`'s thread; `setup` runs on it first (a thread's priority, say).
    pub fn spawn(mut sink: OutputSink, setup: impl FnOnce() + Send + 'static) -> io::Result<SinkThread> {
        let (to_sink, received) = std::sync::mpsc::sync_channel::<ToSink>(SINK_BACKLOG);
        let thread = std::thread::Builder::new().name("clickagg:sink".into()).spawn(move || {
            setup();
            for message in received {
                match message {
                    ToSink::Advance(batches, frontier) => sink.take_batches(batches, frontier)?,
                    ToSink::Finish => return sink.finish().map(Some),
                }
            }
            // Worker 0 went away without finishing (it failed): neither the files nor the
            // store may claim that the input is complete.
            Ok(None)
        })?;
        Ok(SinkThread { to_sink: Some(to_sink), thread, last_frontier: None })
    }

    /// Hands the sink one activation's batches of updates, moved rather than copied, and the
    /// frontier after it. An activation with no updates and no new frontier is not sent.
    pub fn advance(&mut self, batches: Vec<Vec<(SinkRecord, Time, isize)>>, frontier: Option<Time>) {
        if batches.is_empty() && self.last_frontier == Some(frontier) {
            return;
        }
        self.last_frontier = Some(frontier);
        let sent = self.to_sink.as_ref().is_some_and(|to_sink| to_sink.send(ToSink::Advance(batches, frontier)).is_ok());
        if !sent {
            // The thread has stopped with an error, which `finish` reports.
            self.to_sink = None;
        }
    }

    /// Waits for the sink to apply everything sent, write what is still open, and commit the
    /// end of the input; returns the run's summary.
    pub fn finish(mut self) -> io::Result<Summary> {
        if let Some(to_sink) = self.to_sink.take() {
            // A failed send means the thread has stopped; its error is what `join` returns.
            let _ = to_sink.send(ToSink::Finish);
        }
        match self.thread.join() {
            Ok(Ok(Some(summary))) => Ok(summary),
            Ok(Ok(None)) => Err(io::Error::other("the sink stopped before the input was complete")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::other("the sink's thread panicked")),
        }
    }
}
