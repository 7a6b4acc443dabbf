//! A plain reference model of SPEC §1–§4: strings, hash maps and sorting, no dataflow, no code
//! shared with the implementation. Tests require `clickagg run` to write exactly these files.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;

pub struct RefConfig {
    pub watermark_delay_ms: u64,
    /// `None`: reconciliation, no lateness bound.
    pub allowed_lateness_ms: Option<u64>,
    pub tick_ms: u64,
    pub top_k: usize,
    /// Sliding windows, in minutes.
    pub windows: Vec<u32>,
    /// Fraud: more clicks than this per (minute, ip) or (minute, user) excludes them all.
    pub max_clicks_per_minute: Option<u64>,
    /// Fraud: IPs or CIDR networks whose clicks are excluded.
    pub blocklist: Vec<String>,
}

impl Default for RefConfig {
    fn default() -> Self {
        RefConfig {
            watermark_delay_ms: 5_000,
            allowed_lateness_ms: Some(300_000),
            tick_ms: 60_000,
            top_k: 100,
            windows: vec![1, 5, 60],
            max_clicks_per_minute: None,
            blocklist: Vec::new(),
        }
    }
}

/// The attributes that break ties: (ad, campaign, user, ip, country), ip as an IPv6 number.
type Attrs = (u64, u64, u64, u128, String);

struct Copy {
    event_id: Vec<u8>,
    ts: u64,
    attrs: Attrs,
    time: u64,
}

const COLUMNS: [&str; 7] = ["event_id", "ts", "ad_id", "campaign_id", "user_id", "ip", "country"];

fn number(field: &str) -> Option<u64> {
    if field.is_empty() || !field.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    field.parse().ok()
}

fn header_positions(line: &[u8]) -> Option<(Vec<usize>, usize)> {
    let line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
    let text = std::str::from_utf8(line).ok()?;
    let names: Vec<String> = text.split(',').map(|n| n.trim().to_ascii_lowercase()).collect();
    let mut positions = Vec::new();
    for column in COLUMNS {
        let at: Vec<usize> = names.iter().enumerate().filter(|(_, n)| *n == column).map(|(i, _)| i).collect();
        if at.len() != 1 {
            return None;
        }
        positions.push(at[0]);
    }
    Some((positions, names.len()))
}

/// A data line's verdict: the click's (event_id, ts, attrs) or the dead-letter reason.
fn parse_line(line: &[u8], positions: &[usize], field_count: usize) -> Result<(Vec<u8>, u64, Attrs), &'static str> {
    if line.is_empty() {
        return Err("empty_line");
    }
    let text = std::str::from_utf8(line).map_err(|_| "invalid_utf8")?;
    let fields: Vec<&str> = text.split(',').collect();
    if fields.len() < field_count {
        return Err("missing_field");
    }
    if fields.len() > field_count {
        return Err("extra_field");
    }
    let f = |i: usize| fields[positions[i]];
    let event_id = f(0);
    if event_id.is_empty() || event_id.len() > 64 {
        return Err("bad_event_id");
    }
    let ts = number(f(1)).ok_or("bad_ts")?;
    let ad = number(f(2)).ok_or("bad_ad_id")?;
    let campaign = number(f(3)).ok_or("bad_campaign_id")?;
    let user = number(f(4)).ok_or("bad_user_id")?;
    let ip: IpAddr = f(5).parse().map_err(|_| "bad_ip")?;
    let ip = match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    };
    let country = f(6);
    if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err("bad_country");
    }
    Ok((event_id.as_bytes().to_vec(), ts, (ad, campaign, user, ip, country.to_ascii_uppercase())))
}

fn csv_quote(bytes: &[u8]) -> String {
    format!("\"{}\"", String::from_utf8_lossy(bytes).replace('"', "\"\""))
}

/// The rows of every view for one minute, given the click copies visible so far.
/// Keys are `(view order, changelog key, value)`, so sorting them gives the changelog order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Row {
    Ad { minute: u64, ad: u64, clicks: u64 },
    Campaign { minute: u64, campaign: u64, clicks: u64 },
    Country { minute: u64, country: String, ad: u64, clicks: u64 },
    Top { minute: u64, ad: u64, clicks: u64 },
    Fraud { minute: u64, ad: u64, clicks: u64 },
    Window { window: u32, ad: u64, clicks: u64 },
}

impl Row {
    fn changelog(&self, time: u64, diff: i64) -> String {
        match self {
            Row::Ad { minute, ad, clicks } => format!("{time},ad_minute,{minute}/{ad},{clicks},{diff}"),
            Row::Campaign { minute, campaign, clicks } => format!("{time},campaign_minute,{minute}/{campaign},{clicks},{diff}"),
            Row::Country { minute, country, ad, clicks } => {
                format!("{time},country_minute,{minute}/{country}/{ad},{clicks},{diff}")
            }
            Row::Top { minute, ad, clicks } => format!("{time},top_minute,{minute}/{ad},{clicks},{diff}"),
            Row::Fraud { minute, ad, clicks } => format!("{time},fraud_minute,{minute}/{ad},{clicks},{diff}"),
            Row::Window { window, ad, clicks } => format!("{time},top_window_{window}m,{ad},{clicks},{diff}"),
        }
    }
}

fn top_k_of(per_ad: HashMap<u64, u64>, top_k: usize) -> Vec<(u64, u64)> {
    let mut ranked: Vec<(u64, u64)> = per_ad.into_iter().filter(|(_, c)| *c > 0).collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(top_k);
    ranked
}

/// The top K of each window as of `time`: the clicks visible by then whose minute the window
/// has not yet left (`(minute + M) * 60000 > time`).
fn window_rows(time: u64, rows_of_minute: &BTreeMap<u64, BTreeSet<Row>>, config: &RefConfig) -> BTreeSet<Row> {
    let mut rows = BTreeSet::new();
    for &window in &config.windows {
        let mut per_ad: HashMap<u64, u64> = HashMap::new();
        for (minute, minute_rows) in rows_of_minute {
            if (minute + window as u64) * 60_000 > time {
                for row in minute_rows {
                    if let Row::Ad { ad, clicks, .. } = row {
                        *per_ad.entry(*ad).or_default() += clicks;
                    }
                }
            }
        }
        for (ad, clicks) in top_k_of(per_ad, config.top_k) {
            rows.insert(Row::Window { window, ad, clicks });
        }
    }
    rows
}

/// Whether `ip` (as a mapped IPv6 number) is in `network` (`a.b.c.d[/n]` or `v6[/n]`).
fn in_network(ip: u128, network: &str) -> bool {
    let (address, bits) = match network.split_once('/') {
        Some((a, b)) => (a, Some(b.parse::<u32>().unwrap())),
        None => (network, None),
    };
    match address.parse::<IpAddr>().unwrap() {
        IpAddr::V4(net) => {
            let ip = std::net::Ipv6Addr::from(ip);
            let Some(v4) = ip.to_ipv4_mapped() else { return false };
            let bits = bits.unwrap_or(32);
            bits == 0 || (u32::from(v4) >> (32 - bits)) == (u32::from(net) >> (32 - bits))
        }
        IpAddr::V6(net) => {
            let bits = bits.unwrap_or(128);
            bits == 0 || (ip >> (128 - bits)) == (u128::from(net) >> (128 - bits))
        }
    }
}

fn minute_rows(minute: u64, all_clicks: &[&Attrs], config: &RefConfig) -> BTreeSet<Row> {
    let top_k = config.top_k;
    let mut per_ip: HashMap<u128, u64> = HashMap::new();
    let mut per_user: HashMap<u64, u64> = HashMap::new();
    for (_, _, user, ip, _) in all_clicks.iter().copied() {
        *per_ip.entry(*ip).or_default() += 1;
        *per_user.entry(*user).or_default() += 1;
    }
    let excluded = |(_, _, user, ip, _): &Attrs| {
        config.max_clicks_per_minute.is_some_and(|limit| per_ip[ip] > limit || per_user[user] > limit)
            || config.blocklist.iter().any(|net| in_network(*ip, net))
    };
    let mut rows = BTreeSet::new();
    let mut fraud: HashMap<u64, u64> = HashMap::new();
    let mut clicks = Vec::new();
    for attrs in all_clicks.iter().copied() {
        if excluded(attrs) {
            *fraud.entry(attrs.0).or_default() += 1;
        } else {
            clicks.push(attrs);
        }
    }
    for (ad, clicks) in fraud {
        rows.insert(Row::Fraud { minute, ad, clicks });
    }
    let mut per_ad: HashMap<u64, u64> = HashMap::new();
    let mut per_campaign: HashMap<u64, u64> = HashMap::new();
    let mut per_country: HashMap<(String, u64), u64> = HashMap::new();
    for (ad, campaign, _, _, country) in clicks.iter().copied() {
        *per_ad.entry(*ad).or_default() += 1;
        *per_campaign.entry(*campaign).or_default() += 1;
        *per_country.entry((country.clone(), *ad)).or_default() += 1;
    }
    for (&ad, &clicks) in &per_ad {
        rows.insert(Row::Ad { minute, ad, clicks });
    }
    for (&campaign, &clicks) in &per_campaign {
        rows.insert(Row::Campaign { minute, campaign, clicks });
    }
    for ((country, ad), &clicks) in &per_country {
        rows.insert(Row::Country { minute, country: country.clone(), ad: *ad, clicks });
    }
    for (ad, clicks) in top_k_of(per_ad, top_k) {
        rows.insert(Row::Top { minute, ad, clicks });
    }
    rows
}

/// One distinct accepted click as the run ends: `(minute, ad, campaign, user, ip as IPv6
/// number, country)`.
pub type RefClick = (u64, u64, u64, u64, u128, String);

/// The output files `run` must write for the logs in `dir`: file name → contents.
pub fn reference_outputs(dir: &Path, config: &RefConfig) -> BTreeMap<String, String> {
    reference_run(dir, config).0
}

/// The output files and every distinct accepted click (the fraud rules not applied).
pub fn reference_run(dir: &Path, config: &RefConfig) -> (BTreeMap<String, String>, Vec<RefClick>) {
    let (files, clicks, _) = model(dir, config);
    (files, clicks)
}

/// How many accepted rows were further deliveries of a click already accepted: the accepted
/// rows less the distinct clicks.
pub fn reference_duplicates(dir: &Path, config: &RefConfig) -> u64 {
    let (_, clicks, accepted) = model(dir, config);
    accepted - clicks.len() as u64
}

/// The output files, every distinct accepted click, and how many rows were accepted.
fn model(dir: &Path, config: &RefConfig) -> (BTreeMap<String, String>, Vec<RefClick>, u64) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("part-") && n.ends_with(".csv"))
        .collect();
    names.sort();

    let tick = |ms: u64| ms - ms % config.tick_ms;
    let mut copies: Vec<Copy> = Vec::new();
    let mut dead: Vec<String> = Vec::new();
    for name in &names {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let mut offset = 0usize;
        let mut header: Option<Option<(Vec<usize>, usize)>> = None;
        let mut max_ts: Option<u64> = None;
        while offset < bytes.len() {
            let (raw, terminated) = match bytes[offset..].iter().position(|&b| b == b'\n') {
                Some(n) => (&bytes[offset..offset + n], true),
                None => (&bytes[offset..], false),
            };
            let line_offset = offset;
            offset += raw.len() + terminated as usize;
            let line = if terminated { raw.strip_suffix(b"\r").unwrap_or(raw) } else { raw };
            let mut dead_letter = |reason: &str, line: &[u8]| {
                dead.push(format!("{name},{line_offset},{reason},{}", csv_quote(&line[..line.len().min(4096)])));
            };
            let framing = if line.len() > 4096 {
                Some("line_too_long")
            } else if !terminated {
                Some("unterminated_line")
            } else {
                None
            };
            let Some(parsed_header) = &header else {
                let parsed = if framing.is_none() { header_positions(line) } else { None };
                if parsed.is_none() {
                    dead_letter(framing.unwrap_or("bad_header"), line);
                }
                header = Some(parsed);
                continue;
            };
            let verdict = match (framing, parsed_header) {
                (Some(reason), _) => Err(reason),
                (None, None) => Err("bad_header"),
                (None, Some((positions, count))) => parse_line(line, positions, *count),
            };
            match verdict {
                Err(reason) => dead_letter(reason, line),
                Ok((event_id, ts, attrs)) => {
                    let too_late = match (max_ts, config.allowed_lateness_ms) {
                        (Some(max), Some(lateness)) => ts < max.saturating_sub(lateness),
                        _ => false,
                    };
                    if too_late {
                        dead_letter("too_late", line);
                    } else {
                        let watermark = max_ts.map_or(0, |m| m.saturating_sub(config.watermark_delay_ms));
                        copies.push(Copy { event_id, ts, attrs, time: tick(ts.max(watermark)) });
                    }
                    max_ts = Some(max_ts.map_or(ts, |m| m.max(ts)));
                }
            }
        }
    }

    // Walk the distinct times in order (arrivals, and windows moving past a minute); at each,
    // recompute the minutes that changed. The windows' top K are recomputed only on minute
    // boundaries and at each minute's last tick: a count change reaches the windows at the last
    // tick of its minute (SPEC's window answers are defined at boundaries only).
    let window_time = |time: u64| if time.is_multiple_of(60_000) { time } else { (time / 60_000 + 1) * 60_000 - config.tick_ms };
    let mut by_time: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, copy) in copies.iter().enumerate() {
        by_time.entry(copy.time).or_default().push(i);
        by_time.entry(window_time(copy.time)).or_default();
        for &window in &config.windows {
            by_time.entry((copy.ts / 60_000 + window as u64) * 60_000).or_default();
        }
    }
    let first_minute = copies.iter().map(|c| c.ts / 60_000).min();
    let last_minute = copies.iter().map(|c| c.ts / 60_000).max();
    let mut winner: HashMap<(Vec<u8>, u64), usize> = HashMap::new();
    let mut clicks_of_minute: BTreeMap<u64, HashMap<(Vec<u8>, u64), usize>> = BTreeMap::new();
    let mut rows_of_minute: BTreeMap<u64, BTreeSet<Row>> = BTreeMap::new();
    let mut windows_now: BTreeSet<Row> = BTreeSet::new();
    let mut snapshots: Vec<(u64, BTreeSet<Row>)> = Vec::new();
    let mut next_boundary = first_minute.map_or(u64::MAX, |m| m + 1);
    let boundary_end = last_minute.map_or(0, |m| m + 1);
    let mut changelog = vec!["time,view,key,value,diff".to_string()];
    for (time, arrived) in by_time {
        while next_boundary <= boundary_end && next_boundary * 60_000 <= time {
            snapshots.push((next_boundary, windows_now.clone()));
            next_boundary += 1;
        }
        let mut touched = BTreeSet::new();
        for i in arrived {
            let key = (copies[i].event_id.clone(), copies[i].ts);
            let best = winner.entry(key.clone()).or_insert(i);
            if copies[i].attrs < copies[*best].attrs {
                *best = i;
            }
            let minute = copies[i].ts / 60_000;
            clicks_of_minute.entry(minute).or_default().insert(key.clone(), winner[&key]);
            touched.insert(minute);
        }
        let mut changes: Vec<(Row, i64)> = Vec::new();
        for minute in touched {
            let attrs: Vec<&Attrs> = clicks_of_minute[&minute].values().map(|&i| &copies[i].attrs).collect();
            let new_rows = minute_rows(minute, &attrs, config);
            let old_rows = rows_of_minute.remove(&minute).unwrap_or_default();
            changes.extend(old_rows.difference(&new_rows).map(|r| (r.clone(), -1)));
            changes.extend(new_rows.difference(&old_rows).map(|r| (r.clone(), 1)));
            rows_of_minute.insert(minute, new_rows);
        }
        if window_time(time) == time {
            let new_windows = window_rows(time, &rows_of_minute, config);
            changes.extend(windows_now.difference(&new_windows).map(|r| (r.clone(), -1)));
            changes.extend(new_windows.difference(&windows_now).map(|r| (r.clone(), 1)));
            windows_now = new_windows;
        }
        changes.sort();
        changelog.extend(changes.iter().map(|(row, diff)| row.changelog(time, *diff)));
    }
    while next_boundary <= boundary_end {
        snapshots.push((next_boundary, windows_now.clone()));
        next_boundary += 1;
    }

    let mut files = BTreeMap::new();
    let mut ad = vec!["minute,ad_id,clicks".to_string()];
    let mut campaign = vec!["minute,campaign_id,clicks".to_string()];
    let mut country = vec!["minute,country,ad_id,clicks".to_string()];
    let mut top = vec!["minute,rank,ad_id,clicks".to_string()];
    let mut fraud = vec!["minute,ad_id,excluded_clicks".to_string()];
    for (minute, rows) in &rows_of_minute {
        let mut ranked = Vec::new();
        for row in rows {
            match row {
                Row::Ad { ad: a, clicks, .. } => ad.push(format!("{minute},{a},{clicks}")),
                Row::Campaign { campaign: c, clicks, .. } => campaign.push(format!("{minute},{c},{clicks}")),
                Row::Country { country: c, ad, clicks, .. } => country.push(format!("{minute},{c},{ad},{clicks}")),
                Row::Top { ad, clicks, .. } => ranked.push((*ad, *clicks)),
                Row::Fraud { ad, clicks, .. } => fraud.push(format!("{minute},{ad},{clicks}")),
                Row::Window { .. } => unreachable!("window rows are not kept per minute"),
            }
        }
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (rank, (a, clicks)) in ranked.iter().enumerate() {
            top.push(format!("{minute},{},{a},{clicks}", rank + 1));
        }
    }
    for &window in &config.windows {
        let mut lines = vec!["as_of,rank,ad_id,clicks".to_string()];
        for (boundary, rows) in &snapshots {
            let per_ad = rows
                .iter()
                .filter_map(|row| match row {
                    Row::Window { window: w, ad, clicks } if *w == window => Some((*ad, *clicks)),
                    _ => None,
                })
                .collect();
            for (rank, (ad, clicks)) in top_k_of(per_ad, config.top_k).iter().enumerate() {
                lines.push(format!("{boundary},{},{ad},{clicks}", rank + 1));
            }
        }
        files.insert(format!("top_window_{window}m.csv"), lines.join("\n") + "\n");
    }
    let mut dead_file = vec!["partition,offset,reason,line".to_string()];
    dead_file.extend(dead);
    for (name, lines) in [
        ("ad_minute.csv", ad),
        ("campaign_minute.csv", campaign),
        ("country_minute.csv", country),
        ("top_minute.csv", top),
        ("fraud_minute.csv", fraud),
        ("dead_letter.csv", dead_file),
        ("changelog/updates.csv", changelog),
    ] {
        files.insert(name.to_string(), lines.join("\n") + "\n");
    }
    let clicks = winner
        .iter()
        .map(|((_, ts), &i)| {
            let (ad, campaign, user, ip, country) = copies[i].attrs.clone();
            (ts / 60_000, ad, campaign, user, ip, country)
        })
        .collect();
    (files, clicks, copies.len() as u64)
}
