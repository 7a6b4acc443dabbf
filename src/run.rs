//! `clickagg run`: one timely computation over all partitions, in one process or several. Each
//! of the computation's W·N workers reads partitions `i, i+W·N, …`; its input frontier is the
//! watermark of those partitions, so the computation's frontier is the watermark of SPEC §2.
//! Worker 0 of process 0 gathers the answers and hands them to the sink, which runs on a thread of
//! its own during a replay, and on worker 0 itself when following (see [`SinkRunner`]).

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use differential_dataflow::collection::AsCollection;
use differential_dataflow::input::{Input, InputSession};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Input as _;
use timely::container::{ContainerBuilder, PushInto};
use timely::dataflow::InputHandle;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::Probe;

use clickagg_dataflows::batches::{worker_of, LargeBatches};
use clickagg_dataflows::render::dedup::route_delivery;
use clickagg_dataflows::{
    minute_of, render::{answers_for_sink, render_clicks}, Click, DeadLetter, EventTimeRules, Plan, ServingAnswer, SinkRecord, SourceNote, Time,
};

use crate::cluster::{self, Cluster, Greeting};
use crate::serve::{peek, ServingState};
use clickagg_dataflows::render::counts::count_per_minute;
use clickagg_dataflows::render::topk::top_k;
use clickagg_dataflows::render::sliding_counts;
use clickagg_dataflows::render::windows::sliding_top_k_with_minute_tops;
use clickagg_dataflows::render::filters::render_filters;
use crate::sink::{OutputSink, SinkRunner, Summary};
use crate::source::{list_partitions, partition_name, PartitionSource, SourceOutput};
use crate::store::Store;
use clickagg_dataflows::PartitionProgress;

/// Everything `run` needs, as plain data.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub logs: PathBuf,
    /// The output directory; only process 0 writes one.
    pub out: Option<PathBuf>,
    /// Worker threads in this process (the same in every process).
    pub workers: usize,
    /// The other processes, when running as a cluster.
    pub cluster: Option<Cluster>,
    /// Where the sink publishes the answers for the server, when serving (process 0).
    pub serving: Option<Arc<ServingState>>,
    /// Keep the clicks arranged by ip and user for filtered queries, and keep the workers
    /// answering them after the replay (every process of a serving cluster).
    pub serve_filters: bool,
    pub rules: EventTimeRules,
    pub plan: Plan,
    /// Lines a worker reads from one partition before it lets the dataflow run.
    pub batch_lines: usize,
    /// How far (event time, ms) a worker may read ahead of the computation's frontier; bounds
    /// the updates held in operators while other workers catch up.
    pub max_ahead_ms: u64,
    /// The durable store the answers are committed to (process 0), and resumed from.
    pub store: Option<PathBuf>,
    /// A PostgreSQL database (`postgres://…`) that receives every advance the store commits.
    pub sink: Option<String>,
    /// Tail the partitions as they grow instead of replaying them to their end.
    pub follow: Option<Follow>,
    /// Where to start reading each partition (by index in name order) instead of its beginning:
    /// reconciliation of a range skips what belongs to earlier minutes. Every row before a
    /// checkpoint's offset has a ts at most its `max_ts`.
    pub start_at: Option<Vec<Option<PartitionProgress>>>,
    /// Reconciliation: rows too late for `rules` still count, all entering at this time, which
    /// is after every other row's; the dataflow then keeps every minute open to the end (no
    /// retention), so that the answers before this time are `run`'s and those after it have no
    /// lateness bound. See `PartitionSource::hold_too_late_until`.
    pub hold_too_late_until: Option<Time>,
    /// A partition whose header cannot be used has every line dead-lettered instead of failing
    /// the run before it starts (see `source::preflight`).
    pub dead_letter_bad_headers: bool,
}

/// Follow mode's settings.
#[derive(Clone, Copy, Debug)]
pub struct Follow {
    /// A partition with no new line for this long stops holding the watermark back.
    pub idle_timeout: Duration,
    /// How often a partition at its end is looked at again.
    pub poll: Duration,
    /// How often the log directory is listed for new partitions.
    pub rescan: Duration,
}

impl Default for Follow {
    fn default() -> Self {
        Follow { idle_timeout: Duration::from_secs(30), poll: Duration::from_millis(5), rescan: Duration::from_secs(1) }
    }
}

/// Set by SIGTERM or SIGINT in follow mode: stop at the last commit.
static SHUTDOWN: AtomicBool = AtomicBool::new(false);

extern "C" fn request_shutdown(_signal: libc::c_int) {
    SHUTDOWN.store(true, Ordering::SeqCst);
}

/// Follow mode stops on SIGTERM or SIGINT: a thread waits for the signal, takes the commit lock
/// (so that no commit is half-way) and exits. The store holds every answer before its last
/// committed watermark; a restart resumes from there.
fn stop_on_signal() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, request_shutdown as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, request_shutdown as *const () as libc::sighandler_t);
    }
    std::thread::spawn(|| loop {
        if SHUTDOWN.load(Ordering::SeqCst) {
            // PostgreSQL's lock first, as its thread commits first; neither thread holds both.
            let _mirroring = crate::store::MIRROR_LOCK.lock();
            let _committing = crate::store::COMMIT_LOCK.lock();
            eprintln!("clickagg: stopped; the store holds every answer before the last committed watermark");
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_millis(20));
    });
}

/// The id of a partition found after the start (follow mode). The partitions listed at the
/// start are numbered by name order; later ones by a hash of their name, which every worker
/// computes alike, in the upper half so that the two never meet.
pub fn discovered_partition_id(name: &str) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(name.as_bytes()) as u32) | 0x8000_0000
}

impl RunConfig {
    pub fn new(logs: PathBuf, out: PathBuf) -> RunConfig {
        RunConfig {
            logs,
            out: Some(out),
            workers: 1,
            cluster: None,
            serving: None,
            serve_filters: false,
            rules: EventTimeRules::default(),
            plan: Plan::default(),
            batch_lines: 50_000,
            max_ahead_ms: 5 * 60_000,
            store: None,
            sink: None,
            follow: None,
            start_at: None,
            hold_too_late_until: None,
            dead_letter_bad_headers: false,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        self.plan.validate()?;
        if self.workers == 0 {
            return Err("--workers must be at least 1".into());
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        if let Some(sink) = &self.sink {
            if !(sink.starts_with("postgres://") || sink.starts_with("postgresql://")) {
                return Err(format!("--sink takes a postgres:// or postgresql:// URL, not {sink}"));
            }
            if self.store.is_none() {
                return Err("--sink mirrors the store into PostgreSQL: add --store PATH, which keeps the checkpoints \
                            a restart resumes from"
                    .into());
            }
        }
        if self.is_sink_process() && self.out.is_none() && self.store.is_none() {
            return Err("--out DIR or --store PATH is required (on process 0, which writes the answers)".into());
        }
        if self.follow.is_some() {
            if self.store.is_none() && self.is_sink_process() {
                return Err("--follow commits to a store: add --store PATH (and write files from it with `clickagg export`)".into());
            }
            if self.out.is_some() {
                return Err("--follow writes no output directory, only the store: write the files with `clickagg export --store PATH --out DIR`".into());
            }
        }
        if self.hold_too_late_until.is_some() && (self.store.is_some() || self.follow.is_some()) {
            return Err("holding too-late rows to the end is for reconciling a replay, not for a store or follow mode".into());
        }
        if self.rules.tick_ms == 0 || 60_000 % self.rules.tick_ms != 0 {
            return Err(format!("the tick ({} ms) must divide a minute", self.rules.tick_ms));
        }
        Ok(())
    }

    /// The rules the dataflow and the sink keep time by. The sources admit rows by `rules`; when
    /// reconciling, the dataflow must not forget a minute before the held too-late rows arrive.
    pub fn dataflow_rules(&self) -> EventTimeRules {
        match self.hold_too_late_until {
            Some(_) => EventTimeRules { allowed_lateness_ms: None, ..self.rules },
            None => self.rules,
        }
    }

    /// Process 0 holds the sink; the others only compute.
    pub fn is_sink_process(&self) -> bool {
        self.cluster.as_ref().is_none_or(|c| c.process == 0)
    }

    /// The settings that change what a store holds: a store is only resumed with the same.
    pub fn store_settings(&self) -> String {
        let settings = self.answer_settings();
        match settings.find(" serve=") {
            Some(at) => settings[..at].to_string(),
            None => settings,
        }
    }

    /// The settings that change answers, in a form a person can compare: every process of a
    /// cluster must have the same.
    pub fn answer_settings(&self) -> String {
        let list = |v: &[u32]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",");
        let blocklist = format!("{:?}", self.plan.fraud.blocklist);
        format!(
            "watermark_delay_ms={} allowed_lateness_ms={:?} tick_ms={} top_k={} buckets={} windows={} \
             max_clicks_per_minute={:?} blocklist={}:{:016x} serve={}",
            self.rules.watermark_delay_ms,
            self.rules.allowed_lateness_ms,
            self.rules.tick_ms,
            self.plan.top_k,
            list(&self.plan.top_k_buckets),
            list(&self.plan.windows),
            self.plan.fraud.max_clicks_per_minute,
            self.plan.fraud.blocklist.len(),
            xxhash_rust::xxh3::xxh3_64(blocklist.as_bytes()),
            self.serve_filters,
        )
    }
}

/// The worker's inputs: clicks and notes, each at the time the rules give.
///
/// The clicks go in containers of [`LargeBatches`]' size, sent whole to timely's input handle
/// rather than through differential's `InputSession`, which ships them 85 at a time. Each
/// container holds the clicks of one de-duplication worker ([`route_delivery`]), so that its
/// exchange forwards it as it is ([`exchange_routed`](clickagg_dataflows::batches::exchange_routed)).
struct Inputs {
    clicks: InputHandle<Time, LargeBatches<(Click, Time, isize)>>,
    /// The clicks not yet sent, in containers by the worker they are for.
    routed: Vec<LargeBatches<(Click, Time, isize)>>,
    notes: InputSession<Time, SourceNote, isize>,
}

impl SourceOutput for Inputs {
    fn click(&mut self, click: Click, time: Time) {
        assert!(time >= *self.clicks.time(), "a click before the input's time");
        let peers = self.routed.len();
        let builder = &mut self.routed[worker_of(route_delivery(&click), peers)];
        builder.push_into((click, time, 1));
        while let Some(container) = builder.extract() {
            self.clicks.send_batch(container);
        }
    }
    fn dead_letter(&mut self, dead: DeadLetter, time: Time) {
        self.notes.update_at(SourceNote::Dead(dead), time, 1);
    }
}

impl Inputs {
    fn new(clicks: InputHandle<Time, LargeBatches<(Click, Time, isize)>>, notes: InputSession<Time, SourceNote, isize>, peers: usize) -> Self {
        Inputs { clicks, routed: (0..peers).map(|_| LargeBatches::default()).collect(), notes }
    }

    fn advance_to(&mut self, time: Time) {
        // Sent at the time they were read at, before it moves on.
        self.send_routed();
        if time > *self.clicks.time() {
            self.clicks.advance_to(time);
            self.notes.advance_to(time);
        }
        self.clicks.flush();
        self.notes.flush();
    }

    fn send_routed(&mut self) {
        for builder in &mut self.routed {
            while let Some(container) = builder.finish() {
                self.clicks.send_batch(container);
            }
        }
    }
}

impl Drop for Inputs {
    /// Whatever ends the input, no click read is left unsent; unless a panic is unwinding, when
    /// the run is lost anyway and a second panic would abort the process before it can say why.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.send_routed();
        }
    }
}

/// How much lower than the server's threads the workers run when serving (nice levels).
const WORKER_NICENESS: i32 = 5;

/// Lowers this thread's scheduling priority (Linux's per-thread nice value); best effort.
fn lower_thread_priority(niceness: i32) {
    // SAFETY: plain system calls on the calling thread; failure leaves the priority as it was.
    unsafe {
        let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let current = libc::getpriority(libc::PRIO_PROCESS, thread);
        libc::setpriority(libc::PRIO_PROCESS, thread, current + niceness);
    }
}

/// Set when a worker of this process panics, so that the others stop waiting for progress it
/// will never make. (The binary's panic hook ends the process first; a caller of [`run`], a
/// test, gets an error instead of a run that never ends.)
struct FlagOnPanic(Arc<AtomicBool>);

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
fn abandon(worker: &mut timely::worker::Worker) -> (Option<Result<Summary, String>>, Vec<String>) {
    for dataflow in worker.installed_dataflows() {
        worker.drop_dataflow(dataflow);
    }
    (None, vec!["another worker failed".to_string()])
}

/// Replays the logs to their end and writes the output directory. Returns the summary on the
/// process that holds the sink (process 0), `None` on the others.
pub fn run(config: &RunConfig) -> Result<Option<Summary>, String> {
    config.validate()?;
    if config.follow.is_some() {
        // First, so that a stop during start-up or recovery is as clean as one later.
        stop_on_signal();
    }
    let paths = list_partitions(&config.logs)?;
    let warnings = crate::source::preflight::check_partitions(&config.logs, &paths, config.follow.is_some(), config.dead_letter_bad_headers)?;
    for warning in warnings.0 {
        eprintln!("clickagg: warning: {warning}");
    }
    let names: Vec<String> = paths.iter().map(|p| partition_name(p)).collect();
    // Open the store, and fail before starting workers if the output cannot be written.
    let mut resume: Vec<Option<PartitionProgress>> = match &config.start_at {
        Some(start_at) if start_at.len() != paths.len() => {
            return Err(format!("{} start offsets for {} partitions", start_at.len(), paths.len()))
        }
        Some(start_at) => start_at.clone(),
        None => vec![None; paths.len()],
    };
    let sink = if config.is_sink_process() {
        let mut sink = OutputSink::new(names.clone(), config.dataflow_rules(), &config.logs);
        if let Some(path) = &config.store {
            let (store, committed) = Store::open(path, &config.store_settings(), &config.logs, &paths)?;
            if let Some(committed) = &committed {
                if config.out.is_some() {
                    return Err(format!(
                        "the store {} is being resumed, so this run computes only what comes after it: write \
                         the files with `clickagg export --store {} --out DIR` instead of --out",
                        path.display(),
                        path.display()
                    ));
                }
                if config.cluster.as_ref().is_some_and(|c| c.processes > 1) {
                    return Err("resuming a store needs one process (its checkpoints are on process 0): run the \
                                recovery with -n 1, then go on as a cluster"
                        .into());
                }
                let live_from = clickagg_dataflows::render::first_live_minute(committed.frontier, &config.plan, &config.rules, config.serve_filters);
                let live_from_ms = live_from as u64 * clickagg_dataflows::MINUTE_MS;
                for (slot, name) in resume.iter_mut().zip(&names) {
                    *slot = store.checkpoint_before(name, live_from_ms)?.map(|c| c.progress);
                }
                let skipped: u64 = resume.iter().flatten().map(|p| p.offset).sum();
                eprintln!(
                    "clickagg: resuming {}: committed before watermark {}; replaying from minute {live_from} \
                     ({skipped} bytes of the logs skipped)",
                    path.display(),
                    committed.frontier
                );
            }
            let mirror = match &config.sink {
                Some(url) => {
                    let mirrored = crate::postgres_sink::MirroredStore { id: store.id()?, committed: committed.clone() };
                    Some(crate::postgres_sink::PostgresSink::connect(url, &config.store_settings(), &mirrored)?)
                }
                None => None,
            };
            sink.commit_to(store, committed, mirror);
        }
        if let Some(out) = &config.out {
            sink.write_files(out, &config.plan.windows).map_err(|e| e.to_string())?;
        }
        if let Some(state) = &config.serving {
            sink.serve_into(Arc::clone(state));
        }
        let serving = config.serving.is_some();
        let sink = match config.follow {
            Some(_) => SinkRunner::on_worker(sink),
            None => SinkRunner::on_thread(sink, move || {
                if serving {
                    // Ingest, as the workers are: the server's threads come first.
                    lower_thread_priority(WORKER_NICENESS);
                }
            })
            .map_err(|e| format!("cannot start the sink's thread: {e}"))?,
        };
        Some(sink)
    } else {
        None
    };
    let resume = Arc::new(resume);
    let process_watermark = Arc::new(AtomicU64::new(0));
    let sink = std::sync::Mutex::new(sink);
    let peek_requests = std::sync::Mutex::new(config.serving.as_ref().map(|state| state.peek_channel()));
    let greeting = config.cluster.as_ref().map(|cluster| Greeting {
        process: cluster.process,
        processes: cluster.processes,
        workers: config.workers,
        settings: config.answer_settings(),
        partitions: names.len(),
        partitions_fingerprint: xxhash_rust::xxh3::xxh3_64(names.join("\n").as_bytes()),
    });
    let cluster = config.cluster.as_ref().zip(greeting.as_ref());
    let sink_process = config.is_sink_process();
    let config = config.clone();

    let panicked = Arc::new(AtomicBool::new(false));
    let guards = cluster::execute(config.workers, cluster, move |worker| {
        let index = worker.index();
        let _guard = FlagOnPanic(Arc::clone(&panicked));
        let failed = || panicked.load(Ordering::SeqCst);
        if config.serving.is_some() {
            // On a saturated machine, queries come before ingest: the server's threads keep
            // normal priority, the workers yield to them.
            lower_thread_priority(WORKER_NICENESS);
        }
        let peers = worker.peers();
        let sink = if index == 0 { sink.lock().ok().and_then(|mut s| s.take()) } else { None };
        let sink = Rc::new(RefCell::new(sink));
        let probe = ProbeHandle::new();
        // Whether the sink operator's input is complete. The probe sits before the exchange that
        // brings every record to the sink's worker, so it can be done while other workers' last
        // records are still on their way there: a worker must not finish its sink until the
        // sink's own input frontier is empty too.
        let sink_input_complete = Rc::new(Cell::new(false));
        if let Some(state) = &config.serving {
            crate::introspect::install(worker, Arc::clone(&state.introspection));
        }

        let (mut inputs, filters) = worker.dataflow::<Time, _, _>(|scope| {
            let (clicks, deliveries) = scope.new_input_with_builder::<LargeBatches<(Click, Time, isize)>>();
            let deliveries = deliveries.as_collection();
            let (notes, note_collection) = scope.new_collection::<SourceNote, isize>();
            let dataflow_rules = config.dataflow_rules();
            // Only the server's filters arrange the clicks beside the views, and must see them retracted.
            let rendered = render_clicks(deliveries, &config.plan, &dataflow_rules, config.serve_filters);
            // Serving: the billable clicks arranged by ip and by user, for filtered queries.
            let filters = config.serve_filters.then(|| {
                let horizon = config.plan.windows.iter().copied().max().unwrap_or(0);
                let clicks = rendered.clicks.clone();
                scope.region_named("Filters", |inner| render_filters(clicks.enter_region(inner), &config.rules, horizon))
            });
            // Serving: answers that no view file holds, maintained for the server.
            let serving_answers = config.serve_filters.then(|| {
                let clicks = rendered.clicks.clone();
                let counts = rendered.counts.clone();
                let (plan, rules) = (&config.plan, &config.rules);
                scope.region_named("ServingViews", |inner| {
                    let per_campaign = clicks.enter_region(inner).map(|(key, attrs)| (minute_of(key.ts), attrs.country, attrs.campaign));
                    let campaign_country = count_per_minute("CampaignCountryMinute", per_campaign, &dataflow_rules).map(|((minute, country, campaign), clicks)| {
                        ServingAnswer::CampaignCountryMinute { minute, country, campaign, clicks }
                    });
                    let country = counts.country.enter_region(inner);
                    let per_country_minute = country.clone().map(|((minute, country, ad), clicks)| ((minute, country), (ad, clicks)));
                    let top_country_minute = top_k("TopCountryMinute", per_country_minute, plan);
                    let country_clicks = counts.clicks.country.enter_region(inner);
                    let top_country_window = sliding_top_k_with_minute_tops("TopCountryWindow", country_clicks, || top_country_minute.clone(), plan, rules, |&(m, c, _)| (m, c))
                        .map(|((window, country), (ad, clicks))| ServingAnswer::TopCountryWindow { window, country, ad, clicks });
                    let top_country_minute =
                        top_country_minute.map(|((minute, country), (ad, clicks))| ServingAnswer::TopCountryMinute { minute, country, ad, clicks });
                    let campaign_windows = sliding_counts("CampaignWindowCounts", counts.clicks.campaign.enter_region(inner), &plan.windows, rules, |&(m, campaign)| (m, campaign))
                        .map(|((window, campaign), clicks)| ServingAnswer::CampaignWindow { window, campaign, clicks });
                    campaign_country
                        .concat(top_country_minute)
                        .concat(top_country_window)
                        .concat(campaign_windows)
                        .map(SinkRecord::Serving)
                        .leave_region(scope)
                })
            });
            let answers = answers_for_sink(rendered.answers, &dataflow_rules);
            let records = answers.map(SinkRecord::Answers).concat(note_collection.map(SinkRecord::Note));
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
        let peek_requests = if index == 0 { peek_requests.lock().ok().and_then(|mut r| r.take()) } else { None };
        let mut peeks = filters.map(|filters| peek::build(worker, Rc::new(RefCell::new(filters)), peek_requests));
        let mut poll_peeks = move || {
            if let Some(peeks) = peeks.as_mut() {
                peeks.poll();
            }
        };

        let mut errors = Vec::new();
        let mut tails = Vec::new();
        for (i, path) in paths.iter().enumerate().skip(index).step_by(peers) {
            match PartitionSource::open_at(i as u32, path, resume[i]) {
                Ok(mut source) => {
                    if let Some(at) = config.hold_too_late_until {
                        source.hold_too_late_until(at);
                    }
                    tails.push(Tail::new(source))
                }
                Err(e) => errors.push(e),
            }
        }
        let mut reader = Reader { tails, names: names.clone(), errors, rules: config.rules, batch_lines: config.batch_lines };

        match config.follow {
            None => {
                while let Some(frontier) = reader.replay_step(&mut inputs) {
                    inputs.advance_to(frontier);
                    worker.step();
                    let behind = frontier.saturating_sub(config.max_ahead_ms);
                    // Park rather than spin: the other workers need the cores to catch up.
                    poll_peeks();
                    if failed() {
                        break;
                    }
                    while probe.less_than(&behind) && !failed() {
                        worker.step_or_park(Some(Duration::from_millis(1)));
                        poll_peeks();
                    }
                }
            }
            Some(follow) => {
                let mut known: std::collections::BTreeSet<String> = names.iter().cloned().collect();
                let mut last_scan = Instant::now();
                while !failed() {
                    if last_scan.elapsed() >= follow.rescan {
                        last_scan = Instant::now();
                        reader.discover(&config.logs, &mut known, index, peers);
                    }
                    let floor = *inputs.clicks.time();
                    let frontier = match reader.follow_step(&follow, floor, &mut inputs) {
                        Some(active) => {
                            process_watermark.fetch_max(active, Ordering::SeqCst);
                            active
                        }
                        // Every partition of this worker is idle: it holds nothing back, and
                        // keeps up with the busiest worker of the process.
                        None => process_watermark.load(Ordering::SeqCst),
                    };
                    inputs.advance_to(frontier);
                    worker.step();
                    poll_peeks();
                    if !reader.has_data(&follow) {
                        worker.step_or_park(Some(follow.poll));
                        poll_peeks();
                    }
                    let behind = frontier.saturating_sub(config.max_ahead_ms);
                    while probe.less_than(&behind) && !failed() {
                        worker.step_or_park(Some(Duration::from_millis(1)));
                        poll_peeks();
                    }
                }
            }
        }
        if failed() {
            return abandon(worker);
        }
        for tail in &reader.tails {
            inputs.notes.update_at(SourceNote::Progress(tail.source.progress()), *inputs.notes.time(), 1);
        }
        let errors = std::mem::take(&mut reader.errors);
        drop(inputs);
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
                _ if index == 0 => eprintln!("clickagg: replay complete; serving filter queries for process 0"),
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
    })?;

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

/// One partition as a worker reads it, with what follow mode knows of its recent activity.
struct Tail {
    source: PartitionSource,
    /// When a line last came.
    last_data: Instant,
    /// At the end of the data on the last read; read again after the poll interval.
    at_end: bool,
    polled: Instant,
    rotation_checked: Instant,
}

impl Tail {
    fn new(source: PartitionSource) -> Tail {
        let now = Instant::now();
        Tail { source, last_data: now, at_end: false, polled: now, rotation_checked: now }
    }

    /// Follow mode: whether this partition holds the watermark back. One at its end with no
    /// new line for the idle timeout does not, nor one that has not had a row yet.
    fn holds_watermark(&self, follow: &Follow) -> bool {
        !self.source.is_finished()
            && !(self.at_end && (self.source.progress().max_ts.is_none() || self.last_data.elapsed() >= follow.idle_timeout))
    }
}

/// A worker's partitions and how it reads them.
struct Reader {
    tails: Vec<Tail>,
    names: Vec<String>,
    errors: Vec<String>,
    rules: EventTimeRules,
    batch_lines: usize,
}

impl Reader {
    fn name(&self, tail: &Tail) -> String {
        let partition = tail.source.progress().partition as usize;
        self.names.get(partition).cloned().unwrap_or_else(|| partition_name(tail.source.path()))
    }

    /// Replay: reads a batch from the partition furthest behind in event time, so that
    /// partitions (and the watermark) advance together. Returns the new input frontier, or
    /// `None` when every partition is read to its end.
    fn replay_step(&mut self, inputs: &mut Inputs) -> Option<Time> {
        let rules = self.rules;
        let position = (0..self.tails.len())
            .filter(|&i| !self.tails[i].source.is_finished())
            .min_by_key(|&i| self.tails[i].source.watermark(&rules))?;
        let floor = *inputs.clicks.time();
        let tail = &mut self.tails[position];
        if let Err(e) = tail.source.read_some(&rules, self.batch_lines, true, floor, inputs) {
            let name = self.names.get(tail.source.progress().partition as usize).cloned().unwrap_or_default();
            self.errors.push(format!("reading {name}: {e}"));
            // An unreadable partition stops holding the watermark back; the run fails at the end.
            tail.source.give_up();
        }
        let now = *inputs.notes.time();
        inputs.notes.update_at(SourceNote::Progress(tail.source.progress()), now, 1);
        let frontier = self.tails.iter().map(|t| t.source.watermark(&rules)).min().unwrap_or(Time::MAX);
        (frontier != Time::MAX).then_some(frontier)
    }

    /// Follow: reads a batch from the partition furthest behind that may have new lines, and
    /// checks the ones at their end for rotation. Returns the watermark of the partitions that
    /// hold it back, `None` if none does.
    fn follow_step(&mut self, follow: &Follow, floor: Time, inputs: &mut Inputs) -> Option<Time> {
        let rules = self.rules;
        let now = Instant::now();
        let ready = (0..self.tails.len())
            .filter(|&i| {
                let t = &self.tails[i];
                !t.source.is_finished() && (!t.at_end || now.duration_since(t.polled) >= follow.poll)
            })
            .min_by_key(|&i| self.tails[i].source.watermark(&rules));
        if let Some(position) = ready {
            let name = self.name(&self.tails[position]);
            let tail = &mut self.tails[position];
            match tail.source.read_some(&rules, self.batch_lines, false, floor, inputs) {
                Ok(0) => {
                    tail.at_end = true;
                    tail.polled = now;
                    if now.duration_since(tail.rotation_checked) >= Duration::from_secs(1) {
                        tail.rotation_checked = now;
                        if let Some(what) = tail.source.rotation() {
                            eprintln!("clickagg: partition {name}: {what}; it is no longer read (dead letter: partition_rotated)");
                            tail.source.report_rotation(what, &rules, floor, inputs);
                        }
                    }
                }
                Ok(_) => {
                    tail.at_end = false;
                    tail.last_data = now;
                }
                Err(e) => {
                    self.errors.push(format!("reading {name}: {e}"));
                    eprintln!("clickagg: reading {name}: {e}; it is no longer read");
                    tail.source.give_up();
                }
            }
            let now_time = *inputs.notes.time();
            inputs.notes.update_at(SourceNote::Progress(tail.source.progress()), now_time, 1);
        }
        self.tails.iter().filter(|t| t.holds_watermark(follow)).map(|t| t.source.watermark(&rules)).min()
    }

    /// Whether some partition may have lines to read now (otherwise the worker parks).
    fn has_data(&self, follow: &Follow) -> bool {
        let now = Instant::now();
        self.tails.iter().any(|t| !t.source.is_finished() && (!t.at_end || now.duration_since(t.polled) >= follow.poll))
    }

    /// Follow: lists the log directory and opens the new partitions that this worker owns.
    fn discover(&mut self, logs: &std::path::Path, known: &mut std::collections::BTreeSet<String>, index: usize, peers: usize) {
        let Ok(paths) = list_partitions(logs) else { return };
        for path in paths {
            let name = partition_name(&path);
            if known.contains(&name) {
                continue;
            }
            known.insert(name.clone());
            let id = discovered_partition_id(&name);
            if id as usize % peers != index {
                continue;
            }
            match PartitionSource::open(id, &path) {
                Ok(source) => {
                    eprintln!("clickagg: new partition {name}");
                    self.tails.push(Tail::new(source));
                }
                Err(e) => self.errors.push(e),
            }
        }
    }
}
