//! Shared helpers for the end-to-end tests: building logs, running clickagg, reading outputs.
#![allow(dead_code)]

pub mod follow;
pub mod reference;
pub mod server;

use std::collections::BTreeMap;
use std::path::Path;

use clickagg::generate::Rng;
use clickagg::run::{run, RunConfig};
use reference::RefConfig;

/// The files a run writes, by path relative to the output directory.
pub const OUTPUT_FILES: [&str; 7] = [
    "ad_minute.csv",
    "campaign_minute.csv",
    "country_minute.csv",
    "top_minute.csv",
    "fraud_minute.csv",
    "dead_letter.csv",
    "changelog/updates.csv",
];

/// Every output file: the fixed ones and each `top_window_{M}m.csv`.
pub fn read_outputs(out: &Path) -> BTreeMap<String, String> {
    let mut names: Vec<String> = OUTPUT_FILES.iter().map(|n| n.to_string()).collect();
    for entry in std::fs::read_dir(out).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with("top_window_") {
            names.push(name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let text = std::fs::read_to_string(out.join(&name)).unwrap_or_else(|e| panic!("reading {name}: {e}"));
            (name, text)
        })
        .collect()
}

/// Runs clickagg over `logs` with the reference's settings and returns what it wrote.
pub fn run_outputs(logs: &Path, workers: usize, config: &RefConfig, buckets: &[u32]) -> BTreeMap<String, String> {
    let out = tempfile::tempdir().unwrap();
    let mut run_config = RunConfig::new(logs.to_path_buf(), out.path().to_path_buf());
    run_config.workers = workers;
    // The reference model dead-letters the lines of a partition with a bad header.
    run_config.dead_letter_bad_headers = true;
    run_config.rules.watermark_delay_ms = config.watermark_delay_ms;
    run_config.rules.allowed_lateness_ms = config.allowed_lateness_ms;
    run_config.rules.tick_ms = config.tick_ms;
    run_config.plan.top_k = config.top_k;
    run_config.plan.top_k_buckets = buckets.to_vec();
    run_config.plan.windows = config.windows.clone();
    run_config.plan.fraud.max_clicks_per_minute = config.max_clicks_per_minute;
    run_config.plan.fraud.blocklist =
        config.blocklist.iter().map(|net| clickagg_dataflows::IpNet::parse(net).unwrap()).collect();
    run_config.batch_lines = batch_lines_for(logs);
    run(&run_config).unwrap_or_else(|e| panic!("run failed: {e}")).expect("a summary");
    read_outputs(out.path())
}

/// Small batches for small logs, so that they are read in many rounds and frontiers move
/// often; the default for large ones.
fn batch_lines_for(logs: &Path) -> usize {
    let bytes: u64 = std::fs::read_dir(logs)
        .map(|entries| entries.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0);
    if bytes < 1 << 20 {
        7
    } else {
        RunConfig::new(logs.into(), logs.into()).batch_lines
    }
}

/// Asserts two output sets are equal file by file, showing the first differing line.
pub fn assert_same_outputs(expected: &BTreeMap<String, String>, actual: &BTreeMap<String, String>, what: &str) {
    let names = |files: &BTreeMap<String, String>| files.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(expected), names(actual), "{what}: different output files");
    for (name, want) in expected {
        let got = actual.get(name).unwrap_or_else(|| panic!("{what}: {name} missing"));
        if want != got {
            let (line, (w, g)) = want
                .lines()
                .chain(std::iter::repeat("<end>"))
                .zip(got.lines().chain(std::iter::repeat("<end>")))
                .enumerate()
                .find(|(_, (w, g))| w != g)
                .unwrap();
            panic!("{what}: {name} differs at line {}:\n  expected {w}\n  actual   {g}", line + 1);
        }
    }
}

pub fn write_logs(dir: &Path, files: &[(String, Vec<u8>)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

const BAD_LINES: [&[u8]; 10] = [
    b"",
    b"garbage",
    b"e1,notanumber,1,1,1,1.2.3.4,US",
    b"e1,1767225600000,1,1,1,300.2.3.4,US",
    b"e1,1767225600000,1,1,1,1.2.3.4,USA",
    b"e1,1767225600000,1,1,1,1.2.3.4",
    b"e1,1767225600000,1,1,1,1.2.3.4,US,extra,more,fields",
    b"\xff\xfe\x00binary",
    b",1767225600000,1,1,1,1.2.3.4,US",
    b"e1,1767225600000,-1,1,1,1.2.3.4,US",
];

/// Seeded random click logs with the hard cases: several partitions, shuffled column orders,
/// CRLF, duplicates across partitions (some disagreeing), delays from none to far beyond
/// allowed lateness, bad lines, an unterminated last line, a few ads so top-K ties happen.
pub fn random_logs(seed: u64, max_events: u64) -> Vec<(String, Vec<u8>)> {
    let mut rng = Rng::new(seed);
    let partitions = 1 + rng.below(4) as usize;
    let events = rng.below(max_events + 1);
    let base = 1_767_225_600_000 + rng.below(120_000);
    let ads = 1 + rng.below(8);
    let ips = ["10.0.0.1", "10.0.0.2", "::ffff:10.0.0.1", "2001:db8::7", "192.168.1.1"];
    let countries = ["US", "FR", "de", "DE", "JP"];

    // (arrival, sequence, event_id, ts, ad, campaign, user, ip, country)
    type Delivery = (u64, u64, String, u64, u64, u64, u64, &'static str, &'static str);
    let mut deliveries: Vec<Vec<Delivery>> = vec![Vec::new(); partitions];
    let mut sequence = 0;
    for i in 0..events {
        let ts = base + rng.below(8 * 60_000);
        let ad = 1 + rng.below(ads);
        let campaign = 100 + ad / 2;
        let user = 1 + rng.below(5);
        let ip = ips[rng.below(ips.len() as u64) as usize];
        let country = countries[rng.below(countries.len() as u64) as usize];
        let delay = match rng.below(10) {
            0..=6 => rng.below(3_000),
            7 | 8 => rng.below(6 * 60_000),
            _ => rng.below(20 * 60_000),
        };
        let partition = rng.below(partitions as u64) as usize;
        let id = format!("ev{i}");
        deliveries[partition].push((ts + delay, sequence, id.clone(), ts, ad, campaign, user, ip, country));
        sequence += 1;
        if rng.chance(0.15) {
            let (mut ad2, mut user2) = (ad, user);
            if rng.chance(0.3) {
                ad2 = 1 + rng.below(ads);
                user2 = 1 + rng.below(5);
            }
            let target = rng.below(partitions as u64) as usize;
            let arrival = ts + delay + rng.below(90_000);
            deliveries[target].push((arrival, sequence, id, ts, ad2, 100 + ad2 / 2, user2, ip, country));
            sequence += 1;
        }
    }

    let mut files = Vec::new();
    for (p, mut rows) in deliveries.into_iter().enumerate() {
        rows.sort();
        let mut columns = vec!["event_id", "ts", "ad_id", "campaign_id", "user_id", "ip", "country"];
        if rng.chance(0.5) {
            for i in (1..columns.len()).rev() {
                columns.swap(i, rng.below(i as u64 + 1) as usize);
            }
        }
        let extra = rng.chance(0.3);
        if extra {
            columns.insert(rng.below(columns.len() as u64 + 1) as usize, "referrer");
        }
        let line_end: &[u8] = if rng.chance(0.2) { b"\r\n" } else { b"\n" };
        let mut bytes = columns.join(",").into_bytes();
        bytes.extend_from_slice(line_end);
        for (_, _, id, ts, ad, campaign, user, ip, country) in rows {
            if rng.chance(0.05) {
                bytes.extend_from_slice(BAD_LINES[rng.below(BAD_LINES.len() as u64) as usize]);
                bytes.extend_from_slice(line_end);
            }
            let fields: Vec<String> = columns
                .iter()
                .map(|c| match *c {
                    "event_id" => id.clone(),
                    "ts" => ts.to_string(),
                    "ad_id" => ad.to_string(),
                    "campaign_id" => campaign.to_string(),
                    "user_id" => user.to_string(),
                    "ip" => ip.to_string(),
                    "country" => country.to_string(),
                    _ => "x".to_string(),
                })
                .collect();
            bytes.extend_from_slice(fields.join(",").as_bytes());
            bytes.extend_from_slice(line_end);
        }
        if rng.chance(0.1) {
            bytes.extend_from_slice(format!("tail{p},{base},1,1,1,10.0.0.1,US").as_bytes());
        }
        files.push((format!("part-{p:05}.csv"), bytes));
    }
    files
}
