//! One worker of the computation: it builds the dataflow, reads its share of the partitions
//! into it until they end (a replay) or until stopped (follow mode), and, on worker 0 of
//! process 0, finishes the sink.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use differential_dataflow::collection::AsCollection;
use differential_dataflow::input::Input;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::Input as _;
use timely::dataflow::operators::Probe;
use timely::worker::Worker;

use clickagg_dataflows::batches::LargeBatches;
use clickagg_dataflows::render::filters::FilterArrangements;
use clickagg_dataflows::render::serving::{filters_region, serving_views};
use clickagg_dataflows::render::{answers_for_sink, render_clicks};
use clickagg_dataflows::{Click, PartitionProgress, SinkRecord, SourceNote, Time};

use super::inputs::Inputs;
use super::shutdown::{abandon, FlagOnPanic, WorkerResult};
use super::RunConfig;
use crate::serve::peek::{self, PeekRequest};
use crate::sink::SinkRunner;
use crate::layout::Layout;
use crate::source::tail::{KafkaOrigin, Reader, Seen, WorkerInput};
use crate::source::Follow;

/// How much lower than the server's threads the workers run when serving (nice levels).
pub(super) const WORKER_NICENESS: i32 = 5;

/// Lowers this thread's scheduling priority (Linux's per-thread nice value); best effort.
pub(super) fn lower_thread_priority(niceness: i32) {
    // SAFETY: plain system calls on the calling thread; failure leaves the priority as it was.
    unsafe {
        let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let current = libc::getpriority(libc::PRIO_PROCESS, thread);
        libc::setpriority(libc::PRIO_PROCESS, thread, current + niceness);
    }
}

/// What every worker of this process shares.
pub(super) struct Shared {
    pub config: RunConfig,
    /// Who reads which partition of the cluster; `layout.names[id]` names partition `id`.
    pub layout: Layout,
    /// The partitions this process listed in its own `--logs` at the start.
    pub own_names: Vec<String>,
    /// Where to start reading each partition, by id.
    pub resume: Vec<Option<PartitionProgress>>,
    /// A Kafka replay's end for each partition, by id.
    pub ends: Vec<Option<u64>>,
    /// Recovery: where each partition's committed lines end, and the committed frontier.
    pub uncommitted: Option<(Vec<u64>, Time)>,
    /// Process 0's sink, taken by worker 0.
    pub sink: Mutex<Option<SinkRunner>>,
    /// The server's filter queries, taken by worker 0.
    pub peek_requests: Mutex<Option<Receiver<PeekRequest>>>,
    /// The highest watermark among this process's workers whose partitions hold it back.
    pub process_watermark: AtomicU64,
    /// Set when a worker of this process panics.
    pub panicked: Arc<AtomicBool>,
}

/// The dataflow as one worker drives it.
struct Dataflow {
    inputs: Inputs,
    probe: ProbeHandle<Time>,
    /// The sink, on worker 0 of process 0.
    sink: Rc<RefCell<Option<SinkRunner>>>,
    /// Whether the sink operator's input is complete. The probe sits before the exchange that
    /// brings every record to the sink's worker, so it can be done while other workers' last
    /// records are still on their way there: a worker must not finish its sink until the
    /// sink's own input frontier is empty too.
    sink_input_complete: Rc<Cell<bool>>,
    /// Filter queries, answered from this worker's filter arrangements.
    peeks: Option<peek::PeekEndpoint>,
}

impl Dataflow {
    /// Answers the filter queries that have come.
    fn poll_peeks(&mut self) {
        if let Some(peeks) = self.peeks.as_mut() {
            peeks.poll();
        }
    }
}

/// The body of every worker: build, read, finish. Returns the summary on worker 0 of process 0.
pub(super) fn work(worker: &mut Worker, shared: &Shared) -> WorkerResult {
    let index = worker.index();
    let _guard = FlagOnPanic(Arc::clone(&shared.panicked));
    let config = &shared.config;
    if config.serving.is_some() {
        // On a saturated machine, queries come before ingest: the server's threads keep
        // normal priority, the workers yield to them.
        lower_thread_priority(WORKER_NICENESS);
    }
    if let Some(state) = &config.serving {
        crate::introspect::install(worker, Arc::clone(&state.introspection));
    }
    let mut dataflow = build(worker, shared);
    let processes = worker.peers() / config.workers;
    let kafka = config.kafka.as_ref().map(|spec| KafkaOrigin { spec, ends: &shared.ends, worker: index });
    let mut reader = Reader::open(
        &config.logs,
        kafka,
        &shared.layout.names,
        &shared.resume,
        shared.layout.partitions_of(index, config.workers, processes),
        config.hold_too_late_until,
        config.rules,
        config.batch_lines,
    );
    if let Some((offsets, frontier)) = &shared.uncommitted {
        reader.hold_uncommitted_lines(offsets, *frontier);
    }
    match config.follow {
        None => replay(worker, shared, &mut dataflow, &mut reader),
        Some(follow) => tail(worker, shared, &mut dataflow, &mut reader, &follow),
    }
    finish(worker, shared, dataflow, reader)
}

/// Builds the dataflow on this worker: inputs, the rendered plan, the serving regions when
/// serving, and the sink operator that gathers every record on worker 0.
fn build(worker: &mut Worker, shared: &Shared) -> Dataflow {
    let config = &shared.config;
    let sink = if worker.index() == 0 { shared.sink.lock().ok().and_then(|mut s| s.take()) } else { None };
    let sink = Rc::new(RefCell::new(sink));
    let probe = ProbeHandle::new();
    let sink_input_complete = Rc::new(Cell::new(false));
    let (inputs, filters) = worker.dataflow::<Time, _, _>(|scope| {
        let (clicks, deliveries) = scope.new_input_with_builder::<LargeBatches<(Click, Time, isize)>>();
        let deliveries = deliveries.as_collection();
        let (notes, note_collection) = scope.new_collection::<SourceNote, isize>();
        let dataflow_rules = config.dataflow_rules();
        // The server's filters retract each click themselves, when it leaves their horizon, and
        // ignore retention's retractions: the clicks need not be retracted for them.
        let rendered = render_clicks(deliveries, &config.plan, &dataflow_rules);
        // Serving: the billable clicks arranged by ip and by user, for filtered queries.
        let filters: Option<FilterArrangements> = config.serve_filters.then(|| filters_region(&rendered, &config.plan, &config.rules));
        // Serving: answers that no view file holds, maintained for the server.
        let serving_answers = config.serve_filters.then(|| serving_views(&rendered, &config.plan, &config.rules, &dataflow_rules));
        let answers = answers_for_sink(rendered.answers, &dataflow_rules);
        let records = answers
            .map(SinkRecord::Answers)
            .concat(note_collection.map(SinkRecord::Note))
            .concat(rendered.duplicates.map(|()| SinkRecord::Duplicates));
        let records = match serving_answers {
            Some(serving) => records.concat(serving),
            None => records,
        };
        let sink = Rc::clone(&sink);
        let complete = Rc::clone(&sink_input_complete);
        records
            .inner
            .probe_with(&probe)
            .sink(Exchange::new(|_| 0), "OutputSink", move |(input, frontier)| {
                let mut batches = Vec::new();
                input.for_each(|_time, data| batches.push(std::mem::take(data)));
                if let Some(sink) = sink.borrow_mut().as_mut() {
                    sink.advance(batches, frontier.frontier().first().copied());
                }
                complete.set(frontier.frontier().is_empty());
            });
        (Inputs::new(clicks, notes, scope.peers()), filters)
    });
    let peek_requests = if worker.index() == 0 { shared.peek_requests.lock().ok().and_then(|mut r| r.take()) } else { None };
    let peeks = filters.map(|filters| peek::build(worker, Rc::new(RefCell::new(filters)), peek_requests));
    Dataflow { inputs, probe, sink, sink_input_complete, peeks }
}

/// A replay: reads the partitions to their end, never more than `max_ahead_ms` of event time
/// ahead of the computation's frontier.
fn replay(worker: &mut Worker, shared: &Shared, dataflow: &mut Dataflow, reader: &mut Reader) {
    let failed = || shared.panicked.load(Ordering::SeqCst);
    while let Some(frontier) = reader.replay_step(&mut dataflow.inputs) {
        dataflow.inputs.advance_to(frontier);
        worker.step();
        let behind = frontier.saturating_sub(shared.config.max_ahead_ms);
        // Park rather than spin: the other workers need the cores to catch up.
        dataflow.poll_peeks();
        if failed() {
            break;
        }
        while dataflow.probe.less_than(&behind) && !failed() {
            worker.step_or_park(Some(Duration::from_millis(1)));
            dataflow.poll_peeks();
        }
    }
}

/// Follow mode: tails the partitions, and picks up new ones, until a worker fails (a signal
/// ends the process from its own thread).
fn tail(worker: &mut Worker, shared: &Shared, dataflow: &mut Dataflow, reader: &mut Reader, follow: &Follow) {
    let failed = || shared.panicked.load(Ordering::SeqCst);
    let (index, workers) = (worker.index(), shared.config.workers);
    let processes = worker.peers() / workers;
    let own: std::collections::BTreeSet<String> = shared.own_names.iter().cloned().collect();
    let others = shared.layout.names.iter().filter(|name| !own.contains(*name)).cloned().collect();
    let mut seen = Seen { own, others };
    let mut last_scan = Instant::now();
    while !failed() {
        if last_scan.elapsed() >= follow.rescan {
            last_scan = Instant::now();
            let reads = |id| shared.layout.reads_discovered(id, index, workers, processes);
            reader.discover(&shared.config.logs, &mut seen, reads, &mut dataflow.inputs);
        }
        let floor = dataflow.inputs.time();
        let frontier = match reader.follow_step(follow, floor, &mut dataflow.inputs) {
            Some(active) => {
                shared.process_watermark.fetch_max(active, Ordering::SeqCst);
                active
            }
            // Every partition of this worker is idle: it holds nothing back, and
            // keeps up with the busiest worker of the process.
            None => shared.process_watermark.load(Ordering::SeqCst),
        };
        dataflow.inputs.advance_to(frontier);
        worker.step();
        dataflow.poll_peeks();
        if !reader.has_data(follow) {
            worker.step_or_park(Some(follow.poll));
            dataflow.poll_peeks();
        }
        let behind = frontier.saturating_sub(shared.config.max_ahead_ms);
        while dataflow.probe.less_than(&behind) && !failed() {
            worker.step_or_park(Some(Duration::from_millis(1)));
            dataflow.poll_peeks();
        }
    }
}

/// Ends the input, runs the dataflow to completion and finishes the sink; when serving filter
/// queries, keeps answering them and never returns.
fn finish(worker: &mut Worker, shared: &Shared, mut dataflow: Dataflow, mut reader: Reader) -> WorkerResult {
    let failed = || shared.panicked.load(Ordering::SeqCst);
    let config = &shared.config;
    if failed() {
        return abandon(worker);
    }
    reader.report_progress(&mut dataflow.inputs);
    let errors = reader.take_errors();
    let Dataflow { inputs, probe, sink, sink_input_complete, mut peeks } = dataflow;
    drop(inputs);
    let mut poll_peeks = move || {
        if let Some(peeks) = peeks.as_mut() {
            peeks.poll();
        }
    };
    while !probe.done() || !sink_input_complete.get() {
        if failed() {
            return abandon(worker);
        }
        poll_peeks();
        worker.step();
    }
    let summary = sink.borrow_mut().take().map(|s| s.finish().map_err(|e| e.to_string()));
    if config.serve_filters {
        // The replay is over; the arrangements for filters stay, and peeks keep coming.
        match (&summary, &config.serving) {
            (Some(Ok(summary)), Some(state)) => state.replay_complete(summary),
            (Some(Err(e)), _) => eprintln!("clickagg: writing the output failed: {e}"),
            _ if worker.index() == 0 => eprintln!("clickagg: replay complete; serving filter queries for process 0"),
            _ => {}
        }
        for error in &errors {
            eprintln!("clickagg: {error}");
        }
        loop {
            worker.step_or_park(Some(std::time::Duration::from_millis(2)));
            poll_peeks();
        }
    }
    (summary, errors)
}
