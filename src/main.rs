use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

/// Differential merges allocate and free large batches constantly; glibc returns them to the
/// kernel each time (a page fault per fresh page). mimalloc keeps them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clickagg::cluster::{install_panic_recorder, read_hostfile, Cluster};
use clickagg::cluster_local::cluster_local;
use clickagg::config::{parse_duration_ms, parse_windows, read_blocklist};
use clickagg::demo::{demo, render_summary};
use clickagg::generate::{generate, GenConfig};
use clickagg::model::Setting;
use clickagg::run::{run, RunConfig};
use clickagg::serve::{serve, ServingState, Settings};
use clickagg::shell::{shell, Client};

/// Exact ad-click aggregation over partitioned logs, on timely and differential dataflow.
#[derive(Parser)]
#[command(name = "clickagg", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a small data set, aggregate it, and print a summary.
    Demo {
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        #[arg(short, long, default_value_t = 2)]
        workers: usize,
        /// Keep the data and the output here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Replay a directory of partitioned click logs and write the answers (SPEC §4).
    Run(RunArgs),
    /// Start a cluster of processes on 127.0.0.1 (free ports, a temporary hostfile) running
    /// `run` with the arguments after `--`; for trying cluster mode on one machine.
    ClusterLocal {
        /// Processes to start.
        #[arg(short = 'n', long, default_value_t = 2)]
        processes: usize,
        /// Worker threads per process.
        #[arg(short, long, default_value_t = 1)]
        workers: usize,
        /// Arguments for `clickagg run`, e.g. `-- --logs LOGS --out OUT`.
        #[arg(last = true, required = true)]
        run_args: Vec<String>,
    },
    /// An interactive shell over a running server (`run --serve`): top, count, history,
    /// watermark, partitions, watch. Reads commands from stdin when it is not a terminal.
    Shell {
        /// The server's host:port.
        #[arg(long, default_value = "127.0.0.1:8080")]
        connect: String,
        /// The server's bearer token, if it needs one (visible to other users in /proc: prefer
        /// --token-file or $CLICKAGG_TOKEN).
        #[arg(long, conflicts_with = "token_file")]
        token: Option<String>,
        /// Read the bearer token from the first line of this file.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Write SPEC §4's files from a store (`run --store`): the answers as of its last commit,
    /// byte for byte what `run --out` writes for the same logs.
    Export {
        #[arg(long)]
        store: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Replay the logs with no lateness bound (every distinct click counts), compare every
    /// per-minute answer with a store or output directory, and report each difference with the
    /// too-late rows that explain it. Exits non-zero when a difference is unexplained. Against a
    /// store, the settings are the ones the store was written with (a flag given must agree).
    Reconcile(ReconcileArgs),
    /// Write synthetic click logs.
    Generate(GenerateArgs),
    /// Append clicks to partition files in real time, each stamped with the time it is written
    /// (for trying `run --follow`, and for the freshness benchmark).
    Feed {
        /// The log directory; missing partition files are created with a header.
        #[arg(long)]
        logs: PathBuf,
        #[arg(long, default_value_t = 4)]
        partitions: u32,
        /// Clicks per second, over all partitions.
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        /// How long to write.
        #[arg(long, default_value = "30s", value_parser = parse_duration_ms)]
        duration: u64,
        /// How often a batch is appended to each partition.
        #[arg(long, default_value = "10ms", value_parser = parse_duration_ms)]
        interval: u64,
        #[arg(long, default_value_t = 100_000)]
        ads: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Event time runs this many times faster than the wall clock (60: a minute of clicks
        /// each second), from the wall-clock time `feed` starts; `--rate` stays per wall second.
        #[arg(long, default_value_t = 1)]
        time_scale: u64,
    },
    /// Load a log directory into a Kafka topic: the lines of partition file i (in name order)
    /// go to topic partition i, one message per line, without the header. The topic is created
    /// with one partition per file when it does not exist. For tests, demos and benchmarks of
    /// `run --kafka`.
    Produce {
        /// The brokers, host:port[,…].
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        logs: PathBuf,
    },
    /// Read and parse the logs with no dataflow: the floor that `run` is measured against.
    ParseOnly {
        #[arg(long)]
        logs: PathBuf,
        #[arg(short, long, default_value_t = 1)]
        workers: usize,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Directory of part-NNNNN.csv files (in a cluster, every process must see the same files,
    /// unless --local-logs).
    #[arg(long, required_unless_present = "kafka", conflicts_with = "kafka")]
    logs: Option<PathBuf>,
    /// Read the partitions of a Kafka topic instead of files: the brokers, host:port[,…]. Each
    /// topic partition N is a partition named TOPIC-N; a replay reads each up to its end at the
    /// start, --follow tails them. Offsets are committed in --store with the answers.
    #[arg(long, value_name = "BROKERS", requires = "topic")]
    kafka: Option<String>,
    /// The topic to read, with --kafka.
    #[arg(long, requires = "kafka")]
    topic: Option<String>,
    /// With --kafka: the column order of each message (a topic has no header line), e.g.
    /// `ts,event_id,ad_id,campaign_id,user_id,ip,country`. Default: SPEC's order.
    #[arg(long, requires = "kafka")]
    columns: Option<String>,
    /// In a cluster, each process reads only the partition files of its own --logs (an ad
    /// server's own disk): names must be unique across the cluster. Give it to every process.
    #[arg(long)]
    local_logs: bool,
    /// Output directory (created; its files are replaced). Process 0 needs it or --store.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Commit the answers to this store (SQLite), one transaction per watermark advance, and
    /// resume from it after a crash or a stop. Created when missing.
    #[arg(long)]
    store: Option<PathBuf>,
    /// Also commit every advance to this PostgreSQL database (postgres://user@host/db): the same
    /// tables, exactly once. The store stays the recovery log, so --store is required.
    #[arg(long)]
    sink: Option<String>,
    /// Tail the partitions as they grow (and pick up new ones) until SIGTERM or Ctrl-C,
    /// committing to --store; a restart resumes where the store left off.
    #[arg(long)]
    follow: bool,
    /// Follow mode: a partition with no new line for this long stops holding the watermark back.
    #[arg(long, default_value = "30s", value_parser = parse_duration_ms)]
    idle_timeout: u64,
    /// Worker threads per process (the same in every process of a cluster).
    #[arg(short, long, default_value_t = 1)]
    workers: usize,
    /// Processes in the cluster.
    #[arg(short = 'n', long, default_value_t = 1)]
    processes: usize,
    /// This process's index, 0 to processes-1. Process 0 writes the answers.
    #[arg(short = 'p', long, default_value_t = 0)]
    process: usize,
    /// host:port of every process, one per line in process order (needed when --processes > 1).
    /// (`-H`: `-h` is help, as in every other command.)
    #[arg(short = 'H', long)]
    hostfile: Option<PathBuf>,
    /// Give up when a peer process has not connected within this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration_ms)]
    connect_timeout: u64,
    /// A partition whose header cannot be used (a column missing or named twice) has every line
    /// dead-lettered as bad_header, instead of failing the run before it starts.
    #[arg(long)]
    dead_letter_bad_headers: bool,
    #[command(flatten)]
    answers: AnswerArgs,
    /// Print the summary when done.
    #[arg(long)]
    summary: bool,
    /// Serve the HTTP API and dashboard here during the replay, and keep serving its final
    /// answers afterwards until interrupted. Process 0 only. `--serve` alone is 127.0.0.1:8080;
    /// a port alone (`8080` or `:8080`) is that port on 127.0.0.1.
    #[arg(long, num_args = 0..=1, default_missing_value = "127.0.0.1:8080")]
    serve: Option<String>,
    /// Require `Authorization: Bearer TOKEN` on the API (the dashboard takes it as #token=).
    /// Visible to other users in /proc: prefer --token-file or $CLICKAGG_TOKEN.
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// Read the token from the first line of this file.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

/// The settings that change answers: `run` and `reconcile` take the same, and a store is only
/// resumed or reconciled under the ones it was written with.
#[derive(Args)]
struct AnswerArgs {
    /// The watermark trails each partition's newest event by this much.
    #[arg(long, default_value = "5s", value_parser = parse_duration_ms)]
    watermark_delay: u64,
    /// Rows older than their partition's newest event by more than this are too late.
    #[arg(long, default_value = "5m", value_parser = parse_duration_ms)]
    allowed_lateness: u64,
    /// Logical time granularity; must divide a minute. Finer ticks give more, earlier updates
    /// (and commits): the default is 1m for a replay and 250ms with --follow.
    #[arg(long, value_parser = parse_duration_ms)]
    tick: Option<u64>,
    /// How many ads each top-K keeps.
    #[arg(long, default_value_t = 100)]
    top_k: usize,
    /// Sliding windows: for each, the top K of the last M minutes (`top_window_{M}m.csv`).
    // The full path keeps clap from treating a `Vec` as a repeated flag: one flag, one list.
    #[arg(long, default_value = "1m,5m,60m", value_parser = parse_windows)]
    windows: ::std::vec::Vec<u32>,
    /// Fraud rule: a click is not billable when its ip or its user_id has more clicks than this in
    /// its minute (retroactively: the whole group leaves the billable counts).
    #[arg(long)]
    max_clicks_per_minute: Option<u64>,
    /// Fraud rule: a file of IPs or CIDR networks, one per line, whose clicks are not billable.
    #[arg(long)]
    blocklist: Option<PathBuf>,
}

impl AnswerArgs {
    /// The settings given on the command line `matches` (not left at their defaults).
    fn given(matches: &ArgMatches) -> Vec<Setting> {
        [
            ("watermark_delay", Setting::WatermarkDelay),
            ("allowed_lateness", Setting::AllowedLateness),
            ("tick", Setting::Tick),
            ("top_k", Setting::TopK),
            ("windows", Setting::Windows),
            ("max_clicks_per_minute", Setting::MaxClicksPerMinute),
            ("blocklist", Setting::Blocklist),
        ]
        .into_iter()
        .filter(|(id, _)| matches.value_source(id) == Some(ValueSource::CommandLine))
        .map(|(_, setting)| setting)
        .collect()
    }

    /// Sets `config`'s rules and plan. The tick defaults to 1m for a replay, 250ms when following.
    fn configure(&self, config: &mut RunConfig, follow: bool) -> Result<(), String> {
        config.rules.watermark_delay_ms = self.watermark_delay;
        config.rules.allowed_lateness_ms = Some(self.allowed_lateness);
        config.rules.tick_ms = self.tick.unwrap_or(if follow { 250 } else { 60_000 });
        config.plan.top_k = self.top_k;
        config.plan.windows = self.windows.clone();
        config.plan.fraud.max_clicks_per_minute = self.max_clicks_per_minute;
        if let Some(path) = &self.blocklist {
            config.plan.fraud.blocklist = read_blocklist(path)?;
        }
        Ok(())
    }
}

#[derive(Args)]
struct ReconcileArgs {
    /// Directory of part-NNNNN.csv files: the logs the answers were made from.
    #[arg(long)]
    logs: PathBuf,
    /// What was committed: a store (`run --store`) or an output directory (`run --out`).
    #[arg(long)]
    against: PathBuf,
    /// Directory for the report: summary.txt, differences.csv, explanations.csv, unexplained.csv.
    #[arg(long)]
    report: PathBuf,
    /// Compare minutes from this one on (a minute number or an RFC 3339 time).
    #[arg(long, value_parser = parse_minute)]
    from: Option<u32>,
    /// Compare minutes before this one.
    #[arg(long, value_parser = parse_minute)]
    to: Option<u32>,
    /// Write the reconciled answers into the store as a new version (the old values and an audit
    /// row are kept).
    #[arg(long)]
    apply: bool,
    #[arg(short, long, default_value_t = 1)]
    workers: usize,
    /// As for `run`: dead-letter the lines of a partition whose header cannot be used.
    #[arg(long)]
    dead_letter_bad_headers: bool,
    #[command(flatten)]
    answers: AnswerArgs,
}

fn parse_minute(text: &str) -> Result<u32, String> {
    clickagg::serve::params::parse_minute(text)
}

#[derive(Args)]
struct GenerateArgs {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// default, hot-key (one ad takes half the clicks) or clean (no duplicates, late or bad rows).
    #[arg(long, default_value = "default")]
    preset: String,
    /// Event times span this many minutes.
    #[arg(long)]
    minutes: Option<u64>,
    #[arg(long)]
    ads: Option<u64>,
    #[arg(long)]
    users: Option<u64>,
    #[arg(long)]
    zipf_exponent: Option<f64>,
    #[arg(long)]
    hot_ad_share: Option<f64>,
    #[arg(long)]
    viral_share: Option<f64>,
    #[arg(long)]
    bot_share: Option<f64>,
    #[arg(long)]
    duplicate_rate: Option<f64>,
    #[arg(long)]
    late_rate: Option<f64>,
    #[arg(long)]
    very_late_rate: Option<f64>,
    #[arg(long)]
    ipv6_share: Option<f64>,
    #[arg(long)]
    malformed_rate: Option<f64>,
}

impl GenerateArgs {
    fn config(&self) -> Result<GenConfig, String> {
        let mut c = GenConfig::preset(&self.preset)?;
        c.events = self.events;
        c.partitions = self.partitions;
        c.seed = self.seed;
        let set = |field: &mut f64, value: Option<f64>| {
            if let Some(v) = value {
                *field = v
            }
        };
        set(&mut c.zipf_exponent, self.zipf_exponent);
        set(&mut c.hot_ad_share, self.hot_ad_share);
        set(&mut c.viral_share, self.viral_share);
        set(&mut c.bot_share, self.bot_share);
        set(&mut c.duplicate_rate, self.duplicate_rate);
        set(&mut c.late_rate, self.late_rate);
        set(&mut c.very_late_rate, self.very_late_rate);
        set(&mut c.ipv6_share, self.ipv6_share);
        set(&mut c.malformed_rate, self.malformed_rate);
        c.minutes = self.minutes.unwrap_or(c.minutes);
        c.ads = self.ads.unwrap_or(c.ads);
        c.users = self.users.unwrap_or(c.users);
        Ok(c)
    }
}

/// `mi_option_purge_delay` in mimalloc.h's option enum (the sys crate does not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 14 + 1;

/// Freed pages stay with the process instead of going back to the kernel after a delay: a replay
/// frees and reallocates large batches and per-minute state continuously, and zeroing fresh pages
/// was a fifth of its CPU time with a 10 ms delay, and still a seventh with mimalloc 3's default
/// of 1 s. Memory then stays at its high mark, which the retention bounds;
/// `MIMALLOC_PURGE_DELAY` (milliseconds) overrides this.
///
/// Transparent huge pages are turned off for the process, as databases commonly advise: mimalloc
/// asks for them, and the kernel then zeroes 2 MiB at each first touch. On the benchmark machine
/// that cost a replay about a second of system time (1.6–2.4 s against 0.7 s with 4 KiB pages)
/// and half a second to a second of its wall time, for no gain in user time.
/// `MIMALLOC_ALLOW_THP=1` keeps them.
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: a plain system call that sets a flag of this process; failure changes nothing.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: plain calls into mimalloc's option table; the guard checks that the index really is
    // the purge delay (its documented defaults are 10 ms, and 1 s since mimalloc 3) before
    // changing it.
    unsafe {
        if matches!(libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY), 10 | 1000) {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}

/// How long a long-running process's freed pages stay with it before mimalloc returns them. A
/// follower runs for months: with freed pages kept forever its RSS was its heap's high mark,
/// which rose at each transient peak (a large merge of a trace), 0.52 → 0.69 GiB from 2 h to 6 h
/// of event time in the soak (bench/); returned after a second, it held at 0.36 → 0.40 GiB once
/// the retention was full, for the same CPU time (154 against 157 s). A `--serve` replay's peak
/// RSS, 60 and 240 minutes at one rate (bench/ `lengths`): 1.47 → 3.28 GiB keeping freed pages,
/// 1.39 → 2.29 GiB returning them after 1 s, 1.17 → 1.94 GiB after 100 ms, 1.05 → 1.62 GiB at
/// once (for a fifth more CPU time); 100 ms cost no CPU time measurable beside 1 s.
const LONG_RUNNING_PURGE_DELAY_MS: std::os::raw::c_long = 100;

/// A long-running process (a follower, or a server) returns freed pages to the kernel after
/// [`LONG_RUNNING_PURGE_DELAY_MS`], unless `MIMALLOC_PURGE_DELAY` says otherwise.
fn purge_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: as in `tune_allocator`: only the purge delay is changed, once it is known to be
    // that option (set to -1 there).
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == -1 {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, LONG_RUNNING_PURGE_DELAY_MS);
        }
    }
}

/// The cluster this process belongs to, from `-n/-p/-h`; `None` for a single process.
fn cluster_of(args: &RunArgs) -> Result<Option<Cluster>, String> {
    if args.processes <= 1 && args.process == 0 {
        return Ok(None);
    }
    let hostfile = args.hostfile.as_ref().ok_or("--processes > 1 needs --hostfile (-H) with each process's host:port")?;
    let cluster = Cluster {
        processes: args.processes,
        process: args.process,
        addresses: read_hostfile(hostfile)?,
        connect_timeout: std::time::Duration::from_millis(args.connect_timeout),
        local_logs: args.local_logs,
    };
    cluster.validate()?;
    Ok(Some(cluster))
}

fn main() -> ExitCode {
    tune_allocator();
    install_panic_recorder();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match execute(cli.command, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("clickagg: {e}");
            ExitCode::FAILURE
        }
    }
}

fn execute(command: Command, matches: &ArgMatches) -> Result<(), String> {
    match command {
        Command::Demo { events, workers, dir } => {
            let temp;
            let dir = match dir {
                Some(dir) => dir,
                None => {
                    temp = std::env::temp_dir().join(format!("clickagg-demo-{}", std::process::id()));
                    temp.clone()
                }
            };
            println!("clickagg demo: {events} generated clicks in 4 partitions, {workers} workers, under {}", dir.display());
            let started = std::time::Instant::now();
            let summary = demo(&dir, events, workers)?;
            print!("{}", render_summary(&summary));
            println!("done in {:.2} s; answers in {}", started.elapsed().as_secs_f64(), dir.join("out").display());
            println!(
                "next: clickagg run --logs {} --out {} -w 2 --serve 127.0.0.1:8080   (then open http://127.0.0.1:8080/)",
                dir.join("logs").display(),
                dir.join("out").display()
            );
            Ok(())
        }
        Command::Run(args) => {
            let cluster = cluster_of(&args)?;
            let mut config = RunConfig::new(args.logs.clone().unwrap_or_default(), PathBuf::new());
            if let (Some(brokers), Some(topic)) = (&args.kafka, &args.topic) {
                config.kafka = Some(clickagg::source::kafka::KafkaSpec::new(brokers, topic, args.columns.as_deref())?);
            }
            config.out = args.out;
            config.workers = args.workers;
            config.cluster = cluster;
            args.answers.configure(&mut config, args.follow)?;
            config.store = args.store;
            config.sink = args.sink;
            config.dead_letter_bad_headers = args.dead_letter_bad_headers;
            if args.follow || args.serve.is_some() {
                purge_freed_pages();
            }
            if args.follow {
                config.follow = Some(clickagg::run::Follow {
                    idle_timeout: std::time::Duration::from_millis(args.idle_timeout),
                    ..Default::default()
                });
            }
            let serving = match &args.serve {
                Some(_) if !config.is_sink_process() => {
                    eprintln!(
                        "clickagg: process {}: the server runs on process 0; this one keeps its share of the filter arrangements",
                        args.process
                    );
                    None
                }
                Some(address) => {
                    let names = match &config.kafka {
                        Some(spec) => clickagg::source::kafka::describe(spec)?.names,
                        None => clickagg::source::list_partitions(&config.logs)?
                            .iter()
                            .map(|p| clickagg::source::partition_name(p))
                            .collect(),
                    };
                    let state = Arc::new(ServingState::new(Settings {
                        top_k: config.plan.top_k,
                        windows: config.plan.windows.clone(),
                        partition_names: names,
                        logs: config.logs.clone(),
                        watermark_delay_ms: config.rules.watermark_delay_ms,
                        allowed_lateness_ms: config.rules.allowed_lateness_ms,
                    }));
                    let loops = clickagg::serve::http::event_loops_beside(config.workers);
                    let token = clickagg::serve::auth::resolve(args.token.clone(), args.token_file.as_deref())?;
                    let server = serve(address, Arc::clone(&state), token, loops)?;
                    eprintln!("clickagg: serving on http://{}/", server.address);
                    Some(state)
                }
                None => None,
            };
            config.serve_filters = args.serve.is_some();
            if let Some(state) = &serving {
                let print_summary = args.summary;
                state.on_complete(move |summary| {
                    if print_summary {
                        print!("{}", render_summary(summary));
                    }
                    eprintln!("clickagg: replay complete; serving its answers until interrupted");
                });
            }
            config.serving = serving;
            // A server reads final minutes from a store: without --store, one of its own.
            let _embedded = clickagg::serve::embedded::RemoveAtExit;
            if config.serving.is_some() && config.store.is_none() && config.follow.is_none() {
                config.embedded = Some(clickagg::serve::embedded::create(config.out.as_deref())?);
                clickagg::serve::embedded::remove_on_signal();
            }
            // When serving, the workers keep answering after the replay and this does not return.
            match run(&config)? {
                Some(summary) if args.summary => print!("{}", render_summary(&summary)),
                Some(_) => {}
                None => eprintln!("clickagg: process {} done", args.process),
            }
            Ok(())
        }
        Command::Reconcile(args) => {
            let mut run = RunConfig::new(args.logs, PathBuf::new());
            run.workers = args.workers;
            run.dead_letter_bad_headers = args.dead_letter_bad_headers;
            args.answers.configure(&mut run, false)?;
            let config = clickagg::reconcile::ReconcileConfig {
                run,
                against: args.against,
                report: args.report,
                from: args.from,
                to: args.to,
                apply: args.apply,
                given: matches.subcommand_matches("reconcile").map(AnswerArgs::given).unwrap_or_default(),
            };
            let outcome = clickagg::reconcile::reconcile(&config)?;
            print!("{}", outcome.text());
            if outcome.unexplained > 0 {
                return Err(format!(
                    "{} differences are not explained by too-late rows: see {}",
                    outcome.unexplained,
                    config.report.join("unexplained.csv").display()
                ));
            }
            Ok(())
        }
        Command::Export { store, out } => {
            let store = clickagg::storage::Store::open_read_only(&store)?;
            store.export(&out)?;
            eprintln!("clickagg: wrote the answers of {} to {}", store.path().display(), out.display());
            Ok(())
        }
        Command::Shell { connect, token, token_file } => {
            let token = clickagg::serve::auth::resolve(token, token_file.as_deref())?;
            shell(&Client { address: connect, token })
        }
        Command::ClusterLocal { processes, workers, run_args } => cluster_local(processes, workers, &run_args),
        Command::Produce { brokers, topic, logs } => {
            let started = std::time::Instant::now();
            let produced = clickagg::source::kafka::produce::produce(&brokers, &topic, &logs)?;
            let seconds = started.elapsed().as_secs_f64();
            eprintln!(
                "produced {} messages from {} partition files to {topic}{} in {seconds:.2} s ({:.0} messages/s)",
                produced.messages,
                produced.partitions,
                if produced.created { " (created)" } else { "" },
                produced.messages as f64 / seconds.max(1e-9)
            );
            for name in &produced.unterminated {
                eprintln!("clickagg: {name}: the last line has no newline yet and was not sent");
            }
            let spec_columns = clickagg::source::parse::COLUMNS.join(",");
            let columns = if produced.columns == spec_columns { String::new() } else { format!(" --columns {}", produced.columns) };
            eprintln!("next: clickagg run --kafka {brokers} --topic {topic}{columns} --out OUT");
            Ok(())
        }
        Command::ParseOnly { logs, workers } => {
            let started = std::time::Instant::now();
            let counts = clickagg::source::parse_only(&logs, workers, &Default::default())?;
            let seconds = started.elapsed().as_secs_f64();
            println!(
                "lines {} accepted {} dead {} in {seconds:.3}s: {:.0} lines/s",
                counts.lines,
                counts.accepted,
                counts.dead,
                counts.lines as f64 / seconds
            );
            Ok(())
        }
        Command::Feed { logs, partitions, rate, duration, interval, ads, seed, time_scale } => {
            let config = clickagg::feed::FeedConfig {
                logs,
                partitions,
                rate,
                duration: std::time::Duration::from_millis(duration),
                interval: std::time::Duration::from_millis(interval.max(1)),
                ads,
                seed,
                time_scale,
            };
            let fed = clickagg::feed::feed(&config)?;
            eprintln!(
                "fed {} clicks to {} partitions in {} ({} batches late)",
                fed.clicks,
                config.partitions,
                config.logs.display(),
                fed.late_batches
            );
            Ok(())
        }
        Command::Generate(args) => {
            let config = args.config()?;
            let lines = generate(&config, &args.out)?;
            eprintln!("wrote {lines} lines in {} partitions to {}", config.partitions, args.out.display());
            Ok(())
        }
    }
}
