//! `clickagg generate`: seeded synthetic click logs with the traits real ones have: Zipf ad
//! popularity, campaigns, a viral burst, bots, retried (duplicate) deliveries, network delay with
//! late and very late tails, IPv4 and IPv6, skewed countries, and a few malformed lines.
//! The same seed always writes the same bytes.

use std::io::{BufWriter, Write};
use std::path::Path;

use clickagg_dataflows::Ip;

/// Generator knobs; `Default` is the "default traits" data set of the issues.
#[derive(Clone, Debug, PartialEq)]
pub struct GenConfig {
    pub events: u64,
    pub partitions: u32,
    pub seed: u64,
    /// Event time of the first minute (ms since the epoch).
    pub start_ms: u64,
    /// Event times are spread over this many minutes.
    pub minutes: u64,
    pub ads: u64,
    pub zipf_exponent: f64,
    pub ads_per_campaign: u64,
    pub users: u64,
    /// Share of clicks that go to one single ad (the hot-key data set uses 0.5).
    pub hot_ad_share: f64,
    /// Share of clicks in the middle tenth of the span that go to one viral ad.
    pub viral_share: f64,
    /// Share of clicks made by a handful of bot users and IPs.
    pub bot_share: f64,
    /// Share of clicks delivered twice (a retry); some of the copies land in another partition.
    pub duplicate_rate: f64,
    /// Share of duplicates whose copy disagrees in ad, user or ip (the smallest counts).
    pub conflicting_duplicate_share: f64,
    /// Typical network delay (exponential mean, ms).
    pub delay_mean_ms: f64,
    /// Share of clicks with a late delay (exponential, mean `late_mean_ms`): mostly within
    /// the allowed lateness, some beyond it.
    pub late_rate: f64,
    pub late_mean_ms: f64,
    /// Share of clicks delayed by one to six hours: too late for `run`.
    pub very_late_rate: f64,
    pub ipv6_share: f64,
    pub malformed_rate: f64,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            events: 1_000_000,
            partitions: 8,
            seed: 1,
            start_ms: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            minutes: 60,
            ads: 2_000_000,
            zipf_exponent: 1.07,
            ads_per_campaign: 20,
            users: 5_000_000,
            hot_ad_share: 0.0,
            viral_share: 0.2,
            bot_share: 0.01,
            duplicate_rate: 0.01,
            conflicting_duplicate_share: 0.05,
            delay_mean_ms: 300.0,
            late_rate: 0.02,
            late_mean_ms: 90_000.0,
            very_late_rate: 0.001,
            ipv6_share: 0.15,
            malformed_rate: 0.0005,
        }
    }
}

impl GenConfig {
    /// Named presets: `default`, `hot-key` (one ad takes 50% of clicks), `clean` (no
    /// duplicates, lateness or malformed lines).
    pub fn preset(name: &str) -> Result<GenConfig, String> {
        let base = GenConfig::default();
        match name {
            "default" => Ok(base),
            "hot-key" => Ok(GenConfig { hot_ad_share: 0.5, ..base }),
            "clean" => Ok(GenConfig {
                duplicate_rate: 0.0,
                late_rate: 0.0,
                very_late_rate: 0.0,
                malformed_rate: 0.0,
                ..base
            }),
            other => Err(format!("unknown preset '{other}': expected default, hot-key or clean")),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.partitions == 0 {
            return Err("--partitions must be at least 1".into());
        }
        if self.ads == 0 || self.users == 0 || self.minutes == 0 || self.ads_per_campaign == 0 {
            return Err("ads, users, minutes and ads per campaign must be at least 1".into());
        }
        for (name, share) in [
            ("hot-ad-share", self.hot_ad_share),
            ("viral-share", self.viral_share),
            ("bot-share", self.bot_share),
            ("duplicate-rate", self.duplicate_rate),
            ("conflicting-duplicate-share", self.conflicting_duplicate_share),
            ("late-rate", self.late_rate),
            ("very-late-rate", self.very_late_rate),
            ("ipv6-share", self.ipv6_share),
            ("malformed-rate", self.malformed_rate),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return Err(format!("--{name} must be between 0 and 1, not {share}"));
            }
        }
        Ok(())
    }
}

/// xoshiro256**: small, fast, and its sequence is fixed forever (unlike a library's StdRng).
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            mix64(s)
        };
        Rng([next(), next(), next(), next()])
    }
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
}

/// splitmix64's finaliser: a bijective mix of a u64.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const COUNTRIES: [(&str, u32); 20] = [
    ("US", 300), ("IN", 120), ("BR", 80), ("GB", 60), ("DE", 60), ("FR", 50), ("JP", 50), ("ID", 40),
    ("MX", 35), ("CA", 30), ("IT", 25), ("ES", 25), ("KR", 20), ("NG", 20), ("TR", 15), ("PL", 15),
    ("NL", 15), ("AU", 15), ("SE", 10), ("ZA", 10),
];

/// One line to write, before it is formatted.
#[derive(Clone, Copy)]
struct Row {
    arrival: u64,
    sequence: u64,
    ts: u64,
    event: u64,
    ad: u64,
    campaign: u64,
    user: u64,
    ip: Ip,
    country: u8,
    /// 0 for a good line; otherwise which corruption to write.
    corruption: u8,
}

/// The popularity ranks of ads, sampled by inverting a Zipf CDF.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: u64, exponent: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n as usize);
        let mut total = 0.0;
        for rank in 1..=n {
            total += 1.0 / (rank as f64).powf(exponent);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }
    fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        (self.cdf.partition_point(|&c| c < u) as u64).min(self.cdf.len() as u64 - 1)
    }
}

/// An ad's id and campaign from its popularity rank; ids are scattered, campaigns group
/// `ads_per_campaign` ads of similar popularity.
fn ad_of_rank(rank: u64, ads_per_campaign: u64) -> (u64, u64) {
    let id = ((rank as u32).wrapping_add(1)).wrapping_mul(2_654_435_761) as u64;
    (id, 100_000 + rank / ads_per_campaign)
}

fn ip_of_user(user: u64, ipv6_share: f64) -> Ip {
    let h = mix64(user ^ 0x1234_5678);
    if (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64) < ipv6_share {
        // 2001:db8::/32, the documentation prefix, with the rest from the hash.
        Ip::new((0x2001_0db8u128 << 96) | (mix64(h) as u128) << 32 | (h & 0xFFFF_FFFF) as u128)
    } else {
        let v4 = std::net::Ipv4Addr::from(((h as u32) % 0xDF00_0000).max(0x0100_0000));
        Ip::from_std(v4.into())
    }
}

/// Writes `config.partitions` files `part-NNNNN.csv` into `out`. Returns the lines written.
pub fn generate(config: &GenConfig, out: &Path) -> Result<u64, String> {
    config.validate()?;
    std::fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let rows = generate_rows(config);
    let written: u64 = rows.iter().map(|r| r.len() as u64).sum();
    let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
        let chunks: Vec<_> = rows.chunks(rows.len().div_ceil(2).max(1)).enumerate().collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|(chunk_index, chunk)| {
                let first = chunk_index * rows.len().div_ceil(2).max(1);
                scope.spawn(move || -> Result<(), String> {
                    for (offset, partition_rows) in chunk.iter().enumerate() {
                        write_partition(out, (first + offset) as u32, partition_rows)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("writer thread panicked".into()))).collect()
    });
    results.into_iter().collect::<Result<Vec<()>, String>>()?;
    Ok(written)
}

fn generate_rows(config: &GenConfig) -> Vec<Vec<Row>> {
    let mut rng = Rng::new(config.seed);
    let zipf = Zipf::new(config.ads, config.zipf_exponent);
    let country_total: u32 = COUNTRIES.iter().map(|c| c.1).sum();
    let span = config.minutes * 60_000;
    let viral_start = config.start_ms + span * 45 / 100;
    let viral_end = config.start_ms + span * 55 / 100;
    let viral_rank = 5_000.min(config.ads - 1);
    let bots = 10;
    let mut partitions: Vec<Vec<Row>> = (0..config.partitions)
        .map(|_| Vec::with_capacity((config.events / config.partitions as u64) as usize + 16))
        .collect();
    let mut sequence = 0u64;

    for i in 0..config.events {
        let ts = config.start_ms + rng.below(span);
        let rank = if rng.chance(config.hot_ad_share) {
            0
        } else if ts >= viral_start && ts < viral_end && rng.chance(config.viral_share) {
            viral_rank
        } else {
            zipf.sample(&mut rng)
        };
        let (ad, campaign) = ad_of_rank(rank, config.ads_per_campaign);
        let (user, ip) = if rng.chance(config.bot_share) {
            let bot = rng.below(bots);
            (900_000_000 + bot, Ip::from_std(std::net::Ipv4Addr::new(203, 0, 113, bot as u8 + 1).into()))
        } else {
            let user = 1 + rng.below(config.users);
            (user, ip_of_user(user, config.ipv6_share))
        };
        let mut pick = rng.below(country_total as u64) as u32;
        let country = COUNTRIES.iter().position(|c| if pick < c.1 { true } else { pick -= c.1; false }).unwrap_or(0) as u8;
        let delay = if rng.chance(config.very_late_rate) {
            3_600_000 + rng.below(5 * 3_600_000)
        } else if rng.chance(config.late_rate) {
            rng.exponential(config.late_mean_ms) as u64
        } else {
            rng.exponential(config.delay_mean_ms) as u64
        };
        let corruption = if rng.chance(config.malformed_rate) { 1 + rng.below(6) as u8 } else { 0 };
        let partition = rng.below(config.partitions as u64) as usize;
        let row = Row {
            arrival: ts + delay,
            sequence,
            ts,
            event: mix64(config.seed.wrapping_mul(0x100_0000_01B3) ^ i),
            ad,
            campaign,
            user,
            ip,
            country,
            corruption,
        };
        sequence += 1;
        partitions[partition].push(row);

        if rng.chance(config.duplicate_rate) {
            let mut copy = row;
            copy.sequence = sequence;
            sequence += 1;
            copy.corruption = 0;
            copy.arrival += 200 + rng.exponential(2_000.0) as u64;
            if rng.chance(config.conflicting_duplicate_share) {
                match rng.below(3) {
                    0 => (copy.ad, copy.campaign) = ad_of_rank(zipf.sample(&mut rng), config.ads_per_campaign),
                    1 => copy.user = 1 + rng.below(config.users),
                    _ => copy.ip = ip_of_user(rng.next_u64(), config.ipv6_share),
                }
            }
            let target = if rng.chance(0.3) { rng.below(config.partitions as u64) as usize } else { partition };
            partitions[target].push(copy);
        }
    }
    for rows in &mut partitions {
        rows.sort_unstable_by_key(|r| (r.arrival, r.sequence));
    }
    partitions
}

fn write_partition(dir: &Path, index: u32, rows: &[Row]) -> Result<(), String> {
    let path = dir.join(format!("part-{index:05}.csv"));
    let file = std::fs::File::create(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    out.write_all(b"event_id,ts,ad_id,campaign_id,user_id,ip,country\n").map_err(fail)?;
    let mut line = Vec::with_capacity(128);
    let mut num = itoa::Buffer::new();
    for row in rows {
        line.clear();
        write!(line, "{:016x}", row.event).expect("writing to a Vec");
        line.push(b',');
        line.extend_from_slice(num.format(row.ts).as_bytes());
        line.push(b',');
        line.extend_from_slice(num.format(row.ad).as_bytes());
        line.push(b',');
        line.extend_from_slice(num.format(row.campaign).as_bytes());
        line.push(b',');
        line.extend_from_slice(num.format(row.user).as_bytes());
        line.push(b',');
        write!(line, "{}", row.ip).expect("writing to a Vec");
        line.push(b',');
        line.extend_from_slice(COUNTRIES[row.country as usize].0.as_bytes());
        corrupt(&mut line, row.corruption);
        line.push(b'\n');
        out.write_all(&line).map_err(fail)?;
    }
    out.flush().map_err(fail)
}

/// Damages a formatted line the ways real logs get damaged.
fn corrupt(line: &mut Vec<u8>, kind: u8) {
    match kind {
        0 => {}
        1 => line.truncate(line.iter().rposition(|&b| b == b',').unwrap_or(0)), // missing field
        2 => line.splice(17..18, b"x".iter().copied()).for_each(drop),           // bad ts digit
        3 => line.extend_from_slice(b"X"),                                      // 3-letter country
        4 => {
            // an IP with an octet out of range
            let ip_start = line.iter().enumerate().filter(|(_, &b)| b == b',').nth(4).map_or(0, |(i, _)| i + 1);
            line.splice(ip_start..ip_start, b"999.".iter().copied()).for_each(drop);
        }
        5 => line.extend_from_slice(b"\xff\xfe"), // invalid UTF-8
        _ => line.clear(),                        // empty line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_rows_and_traits_present() {
        let config = GenConfig { events: 20_000, partitions: 3, ads: 10_000, ..GenConfig::default() };
        let a = generate_rows(&config);
        let b = generate_rows(&config);
        assert_eq!(a.iter().map(|p| p.len()).collect::<Vec<_>>(), b.iter().map(|p| p.len()).collect::<Vec<_>>());
        assert!(a.iter().zip(&b).all(|(x, y)| x.iter().zip(y).all(|(r, s)| (r.event, r.arrival) == (s.event, s.arrival))));
        let rows: Vec<&Row> = a.iter().flatten().collect();
        let duplicates = rows.len() as u64 - config.events;
        assert!(duplicates > 100 && duplicates < 400, "about 1% duplicates, got {duplicates}");
        assert!(rows.iter().any(|r| r.arrival - r.ts > 3_600_000), "a very late tail");
        assert!(rows.iter().any(|r| r.corruption != 0), "some malformed lines");
        assert!(rows.iter().any(|r| r.ip.to_std().is_ipv6()) && rows.iter().any(|r| r.ip.to_std().is_ipv4()));
    }
}
