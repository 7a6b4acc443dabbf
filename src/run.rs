//! `clickagg run`: one timely computation over all partitions. Each worker reads partitions
//! `i, i+W, …`; its input frontier is the watermark of those partitions, so the computation's
//! frontier is the watermark of SPEC §2. The sink lives on worker 0.

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;

use differential_dataflow::input::{Input, InputSession};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::Probe;

use clickagg_dataflows::{
    render::render_clicks, Click, DeadLetter, EventTimeRules, Plan, SinkRecord, SourceNote, Time,
};

use crate::sink::{OutputSink, Summary};
use crate::source::{list_partitions, partition_name, PartitionSource, SourceOutput};

/// Everything `run` needs, as plain data.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub logs: PathBuf,
    pub out: PathBuf,
    pub workers: usize,
    pub rules: EventTimeRules,
    pub plan: Plan,
    /// Lines a worker reads from one partition before it lets the dataflow run.
    pub batch_lines: usize,
    /// How far (event time, ms) a worker may read ahead of the computation's frontier; bounds
    /// the updates held in operators while other workers catch up.
    pub max_ahead_ms: u64,
}

impl RunConfig {
    pub fn new(logs: PathBuf, out: PathBuf) -> RunConfig {
        RunConfig {
            logs,
            out,
            workers: 1,
            rules: EventTimeRules::default(),
            plan: Plan::default(),
            batch_lines: 50_000,
            max_ahead_ms: 5 * 60_000,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        self.plan.validate()?;
        if self.workers == 0 {
            return Err("--workers must be at least 1".into());
        }
        if self.rules.tick_ms == 0 || 60_000 % self.rules.tick_ms != 0 {
            return Err(format!("the tick ({} ms) must divide a minute", self.rules.tick_ms));
        }
        Ok(())
    }
}

/// The worker's inputs: clicks and notes, each at the time the rules give.
struct Inputs {
    clicks: InputSession<Time, Click, isize>,
    notes: InputSession<Time, SourceNote, isize>,
}

impl SourceOutput for Inputs {
    fn click(&mut self, click: Click, time: Time) {
        self.clicks.update_at(click, time, 1);
    }
    fn dead_letter(&mut self, dead: DeadLetter, time: Time) {
        self.notes.update_at(SourceNote::Dead(dead), time, 1);
    }
}

impl Inputs {
    fn advance_to(&mut self, time: Time) {
        if time > *self.clicks.time() {
            self.clicks.advance_to(time);
            self.notes.advance_to(time);
        }
        self.clicks.flush();
        self.notes.flush();
    }
}

/// Replays the logs to their end and writes the output directory.
pub fn run(config: &RunConfig) -> Result<Summary, String> {
    config.validate()?;
    let paths = list_partitions(&config.logs)?;
    let names: Vec<String> = paths.iter().map(|p| partition_name(p)).collect();
    // Fail before starting workers if the output cannot be written.
    let sink = OutputSink::create(&config.out, names.clone(), config.rules, &config.plan.windows).map_err(|e| e.to_string())?;
    let sink = std::sync::Mutex::new(Some(sink));
    let config = config.clone();

    let guards = timely::execute(timely::Config::process(config.workers), move |worker| {
        let index = worker.index();
        let peers = worker.peers();
        let sink = if index == 0 { sink.lock().unwrap().take() } else { None };
        let sink = Rc::new(RefCell::new(sink));
        let sink_error: Rc<RefCell<Option<String>>> = Rc::new(RefCell::new(None));
        let mut probe = ProbeHandle::new();

        let mut inputs = worker.dataflow::<Time, _, _>(|scope| {
            let (clicks, deliveries) = scope.new_collection::<Click, isize>();
            let (notes, note_collection) = scope.new_collection::<SourceNote, isize>();
            let rendered = render_clicks(deliveries, &config.plan, &config.rules);
            let records = rendered.answers.map(SinkRecord::Answer).concat(note_collection.map(SinkRecord::Note));
            let sink = Rc::clone(&sink);
            let sink_error = Rc::clone(&sink_error);
            records
                .inner
                .probe_with(&mut probe)
                .sink(Exchange::new(|_| 0), "OutputSink", move |(input, frontier)| {
                    let mut sink = sink.borrow_mut();
                    input.for_each(|_time, data| {
                        if let Some(sink) = sink.as_mut() {
                            for (record, time, diff) in data.drain(..) {
                                sink.absorb(record, time, diff);
                            }
                        }
                    });
                    if let Some(s) = sink.as_mut() {
                        if let Err(e) = s.advance(frontier.frontier().first().copied()) {
                            sink_error.borrow_mut().get_or_insert(e.to_string());
                            *sink = None;
                        }
                    }
                });
            Inputs { clicks, notes }
        });

        let mut sources = Vec::new();
        let mut errors = Vec::new();
        for (i, path) in paths.iter().enumerate().skip(index).step_by(peers) {
            match PartitionSource::open(i as u32, path) {
                Ok(source) => sources.push(source),
                Err(e) => errors.push(e),
            }
        }

        loop {
            // Read from the partition that is furthest behind in event time, so that partitions
            // advance together and the watermark does too.
            let Some(source) = sources
                .iter_mut()
                .filter(|s| !s.is_finished())
                .min_by_key(|s| s.watermark(&config.rules))
            else {
                break;
            };
            if let Err(e) = source.read_some(&config.rules, config.batch_lines, true, &mut inputs) {
                errors.push(format!("reading {}: {e}", names[source.progress().partition as usize]));
                // An unreadable partition stops holding the watermark back; the run fails at the end.
                source.give_up();
            }
            let progress = source.progress();
            let now = *inputs.notes.time();
            inputs.notes.update_at(SourceNote::Progress(progress), now, 1);
            let frontier = sources.iter().map(|s| s.watermark(&config.rules)).min().unwrap_or(Time::MAX);
            if frontier == Time::MAX {
                break;
            }
            inputs.advance_to(frontier);
            worker.step();
            let behind = frontier.saturating_sub(config.max_ahead_ms);
            // Park rather than spin: the other workers need the cores to catch up.
            while probe.less_than(&behind) {
                worker.step_or_park(Some(std::time::Duration::from_millis(1)));
            }
        }
        for source in &sources {
            inputs.notes.update_at(SourceNote::Progress(source.progress()), *inputs.notes.time(), 1);
        }
        drop(inputs);
        while !probe.done() {
            worker.step();
        }
        if let Some(e) = sink_error.borrow_mut().take() {
            errors.push(e);
        }
        let summary = sink.borrow_mut().take().map(|s| s.finish().map_err(|e| e.to_string()));
        (summary, errors)
    })?;

    let mut summary = None;
    let mut errors = Vec::new();
    for result in guards.join() {
        let (worker_summary, worker_errors) = result.map_err(|e| format!("a worker failed: {e}"))?;
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
    summary.ok_or_else(|| "worker 0 produced no summary".to_string())
}
