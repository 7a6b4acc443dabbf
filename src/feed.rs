//! `clickagg feed`: appends clicks to partition files in real time, as ad servers do, each
//! stamped with the wall-clock time it is written at. It drives follow mode in the freshness
//! benchmark: since a click's ts is the moment it was appended, the time from `ts` to the commit
//! that first includes it is the time from append to committed answer.
//!
//! With a time scale above one, event time runs that many times faster than the wall clock from
//! the moment `feed` starts: `--time-scale 60` writes a minute of event time each wall second,
//! so a soak test covers hours of event time (minutes opened, made final, forgotten) in minutes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::generate::{mix64, Rng};

/// What `feed` writes, and how fast.
#[derive(Clone, Debug)]
pub struct FeedConfig {
    pub logs: PathBuf,
    pub partitions: u32,
    /// Clicks per second, over all partitions.
    pub rate: u64,
    pub duration: Duration,
    /// How often a batch is appended to every partition.
    pub interval: Duration,
    pub ads: u64,
    pub seed: u64,
    /// Event time advances this many times faster than the wall clock (1: real time).
    pub time_scale: u64,
}

/// What was written.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fed {
    pub clicks: u64,
    /// Batches written later than their due time by more than one interval: the writer could
    /// not keep the rate.
    pub late_batches: u64,
}

const COUNTRIES: [&str; 12] = ["US", "DE", "FR", "GB", "JP", "BR", "IN", "CA", "AU", "NL", "ES", "IT"];

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The event time stamped `elapsed` after a feed that started at wall time `start_ms`, with event
/// time running `scale` times faster than the wall clock.
pub fn event_time(start_ms: u64, elapsed: Duration, scale: u64) -> u64 {
    start_ms.saturating_add((elapsed.as_millis() as u64).saturating_mul(scale.max(1)))
}

/// Appends `config.rate` clicks a wall-clock second to `config.partitions` files for
/// `config.duration` of wall-clock time, stamped as [`FeedConfig::time_scale`] says.
/// Partition files that do not exist are created with a header.
pub fn feed(config: &FeedConfig) -> Result<Fed, String> {
    if config.partitions == 0 || config.rate == 0 || config.ads == 0 || config.time_scale == 0 {
        return Err("feed needs at least one partition, a rate, one ad and a time scale of at least 1".into());
    }
    std::fs::create_dir_all(&config.logs).map_err(|e| format!("cannot create {}: {e}", config.logs.display()))?;
    let mut files: Vec<File> = (0..config.partitions).map(|p| open_partition(&config.logs, p)).collect::<Result<_, _>>()?;
    let mut rng = Rng::new(config.seed);
    let mut line = Vec::with_capacity(128);
    let mut batch = Vec::new();
    let mut fed = Fed::default();
    let started = Instant::now();
    let start_ms = now_ms();
    let mut due = Duration::ZERO;
    let per_second = config.rate as f64;
    while due < config.duration {
        let now = started.elapsed();
        if now < due {
            std::thread::sleep(due - now);
        } else if now > due + config.interval {
            fed.late_batches += 1;
        }
        // Every click owed by now, so that the rate holds even when a batch was late.
        let owed = (per_second * started.elapsed().as_secs_f64()).min(per_second * config.duration.as_secs_f64()) as u64;
        let ts = if config.time_scale == 1 { now_ms() } else { event_time(start_ms, started.elapsed(), config.time_scale) };
        for (p, file) in files.iter_mut().enumerate() {
            batch.clear();
            let share = owed.saturating_sub(fed.clicks) / (config.partitions as u64 - p as u64).max(1);
            for _ in 0..share {
                write_click(&mut line, &mut rng, config, fed.clicks, ts);
                batch.extend_from_slice(&line);
                fed.clicks += 1;
            }
            file.write_all(&batch).map_err(|e| format!("appending to partition {p}: {e}"))?;
        }
        due += config.interval;
    }
    Ok(fed)
}

fn open_partition(dir: &Path, index: u32) -> Result<File, String> {
    let path = dir.join(format!("part-{index:05}.csv"));
    let fresh = !path.exists();
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    if fresh {
        file.write_all(b"event_id,ts,ad_id,campaign_id,user_id,ip,country\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(file)
}

/// One click: skewed towards low ad ids (a few ads get most clicks), as real traffic is.
fn write_click(line: &mut Vec<u8>, rng: &mut Rng, config: &FeedConfig, serial: u64, ts: u64) {
    let spread = 1 + rng.below(config.ads);
    let ad = 1 + rng.below(spread);
    let user = rng.below(1_000_000);
    let ip = mix64(user) as u32;
    line.clear();
    let mut number = itoa::Buffer::new();
    line.extend_from_slice(format!("{:016x}", mix64(config.seed ^ serial.wrapping_mul(0x9e37_79b9))).as_bytes());
    for value in [ts, ad, ad % 1000, user] {
        line.push(b',');
        line.extend_from_slice(number.format(value).as_bytes());
    }
    line.extend_from_slice(format!(",{}.{}.{}.{},", ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255).as_bytes());
    line.extend_from_slice(COUNTRIES[(user % COUNTRIES.len() as u64) as usize].as_bytes());
    line.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_scale_runs_event_time_ahead_of_the_wall_clock() {
        assert_eq!(event_time(1_000, Duration::from_secs(1), 1), 2_000);
        assert_eq!(event_time(1_000, Duration::from_secs(1), 60), 61_000);
        assert_eq!(event_time(u64::MAX - 1, Duration::from_secs(1), 60), u64::MAX);
    }

    #[test]
    fn a_fast_feed_writes_hours_of_event_time_in_seconds() {
        let dir = tempfile::tempdir().unwrap();
        let config = FeedConfig {
            logs: dir.path().to_path_buf(),
            partitions: 2,
            rate: 2_000,
            duration: Duration::from_millis(1_500),
            interval: Duration::from_millis(10),
            ads: 100,
            seed: 3,
            time_scale: 3_600,
        };
        let fed = feed(&config).unwrap();
        let mut stamps = Vec::new();
        for p in 0..2 {
            let text = std::fs::read_to_string(dir.path().join(format!("part-{p:05}.csv"))).unwrap();
            stamps.extend(text.lines().skip(1).map(|line| line.split(',').nth(1).unwrap().parse::<u64>().unwrap()));
        }
        assert_eq!(stamps.len() as u64, fed.clicks);
        let span = stamps.iter().max().unwrap() - stamps.iter().min().unwrap();
        // 1.5 s of wall time at an hour a second: well over an hour of event time.
        assert!(span > 3_600_000, "{span} ms of event time");
    }
}
