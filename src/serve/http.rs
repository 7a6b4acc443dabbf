//! The HTTP API, the Prometheus metrics and the dashboard, over [`ServingState`].
//!
//! Every answer carries the watermark it is exact as of: the reader takes the state's read lock
//! once, so that an answer never mixes two frontiers. Requests are GET only, with size-limited
//! query strings; anything unexpected is a 4xx with a JSON body naming the problem.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use clickagg_dataflows::{Country, Minute, MINUTE_MS};

use clickagg_dataflows::render::filters::{FilterKey, FilterRow};
use clickagg_dataflows::Ip;

use super::listener::{listen, Request, Response};
use crate::source::parse::parse_ip;
use super::state::{top_of, Materialized, ServingState, Subject};

/// Longest accepted request target (path and query string), in bytes.
pub const MAX_URL_BYTES: usize = 4096;
/// Largest `count` of `popular_ads` (SPEC §3: k up to 1000).
pub const MAX_COUNT: usize = 1000;
/// Longest window or range a query may span, in minutes (a week).
pub const MAX_SPAN_MINUTES: u64 = 7 * 24 * 60;

const DASHBOARD: &str = include_str!("dashboard.html");

/// A running server; its threads serve until the process ends.
pub struct HttpServer {
    pub address: std::net::SocketAddr,
}

/// Binds `address` and serves `state`. Fails at once, with the reason, if the address cannot be
/// bound.
pub fn serve(address: &str, state: Arc<ServingState>, token: Option<String>) -> Result<HttpServer, String> {
    let handler = move |request: &Request| {
        let (status, content_type, body) = respond(request, &state, token.as_deref());
        Response { status, content_type, body }
    };
    let local = listen(address, handler).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse { " (another process holds the port; choose another with --serve)" } else { "" };
        format!("cannot serve on {address}: {e}{hint}")
    })?;
    Ok(HttpServer { address: local })
}

/// An error answer: status and message.
struct Failure(u16, String);

fn bad(message: impl Into<String>) -> Failure {
    Failure(400, message.into())
}

fn respond(request: &Request, state: &ServingState, token: Option<&str>) -> (u16, &'static str, String) {
    let url = request.target.as_str();
    if url.len() > MAX_URL_BYTES {
        return error(Failure(414, format!("the request target is longer than {MAX_URL_BYTES} bytes")));
    }
    if request.method != "GET" {
        return error(Failure(405, "only GET is served".into()));
    }
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    if path == "/" || path == "/index.html" {
        return (200, "text/html; charset=utf-8", DASHBOARD.to_string());
    }
    if let Some(token) = token {
        let expected = format!("Bearer {token}");
        let authorized = request.header("authorization") == Some(expected.as_str());
        if !authorized {
            return error(Failure(401, "this server needs Authorization: Bearer <token>".into()));
        }
    }
    let params = match parse_query(query) {
        Ok(params) => params,
        Err(e) => return error(bad(e)),
    };
    // A filter by ip or user_id waits on the workers, which may be waiting to publish: it must
    // not hold the answers' read guard meanwhile. So does a peek.
    if path == "/v1/introspection/peek" {
        return match peek_arrangement(&params, state) {
            Ok(value) => (200, "application/json", value.to_string()),
            Err(failure) => error(failure),
        };
    }
    if params.get("ip").is_some() || params.get("user_id").is_some() {
        return match filtered(path, &params, state) {
            Ok(value) => (200, "application/json", value.to_string()),
            Err(failure) => error(failure),
        };
    }
    let answers = state.read();
    // `/v1/status` and `/metrics` carry uptime and lag: rendered each time.
    let cacheable = path.starts_with("/v1/") && path != "/v1/status" && !path.starts_with("/v1/introspection");
    if cacheable {
        let cached = state.responses.read().ok().and_then(|c| c.get(url).filter(|(v, _)| *v == answers.version).map(|(_, b)| b.clone()));
        if let Some(body) = cached {
            return (200, "application/json", body.to_string());
        }
    }
    let result = route(path, &params, &answers, state);
    let version = answers.version;
    drop(answers);
    match result {
        Ok(Body::Json(value)) => {
            let body = value.to_string();
            if cacheable {
                if let Ok(mut cache) = state.responses.write() {
                    if cache.len() >= MAX_CACHED_RESPONSES {
                        cache.retain(|_, (v, _)| *v == version);
                        if cache.len() >= MAX_CACHED_RESPONSES {
                            cache.clear();
                        }
                    }
                    cache.insert(url.to_string(), (version, Arc::new(body.clone())));
                }
            }
            (200, "application/json", body)
        }
        Ok(Body::Text(text)) => (200, "text/plain; version=0.0.4", text),
        Err(failure) => error(failure),
    }
}

/// Rendered responses kept for reuse; the cache is emptied of stale ones when it fills.
const MAX_CACHED_RESPONSES: usize = 10_000;

fn error(Failure(status, message): Failure) -> (u16, &'static str, String) {
    (status, "application/json", json!({ "error": message, "status": status }).to_string())
}

enum Body {
    Json(Value),
    Text(String),
}

fn route(path: &str, params: &Params, answers: &Materialized, state: &ServingState) -> Result<Body, Failure> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segments.as_slice() {
        ["v1", "ads", "popular_ads"] => popular_ads(params, answers, state).map(Body::Json),
        ["v1", "ads", id, "aggregated_count"] => aggregated_count(Subject::Ad(parse_id(id, "ad_id")?), params, answers).map(Body::Json),
        ["v1", "campaigns", id, "aggregated_count"] => {
            aggregated_count(Subject::Campaign(parse_id(id, "campaign_id")?), params, answers).map(Body::Json)
        }
        ["v1", "ads", id, "history"] => history(parse_id(id, "ad_id")?, params, answers).map(Body::Json),
        ["v1", "introspection", "arrangements"] => {
            params.only(&[])?;
            Ok(Body::Json(arrangements(state, answers)))
        }
        ["v1", "introspection", "dataflow"] => {
            params.only(&[])?;
            Ok(Body::Json(dataflow(state)))
        }
        ["v1", "status"] => {
            params.only(&[])?;
            Ok(Body::Json(status(answers, state)))
        }
        ["metrics"] => {
            params.only(&[])?;
            Ok(Body::Text(metrics(answers, state)))
        }
        _ => Err(Failure(404, format!("no such endpoint: {path}"))),
    }
}

/// A query string's parameters; each may appear once.
#[derive(Debug)]
pub struct Params(BTreeMap<String, String>);

/// Parses `a=1&b=2`, percent-decoding names and values. Repeated names are an error: a client
/// that sends `country=US&country=FR` means something we would otherwise guess at.
pub fn parse_query(query: &str) -> Result<Params, String> {
    let mut params = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (name, value) = (percent_decode(name)?, percent_decode(value)?);
        if params.insert(name.clone(), value).is_some() {
            return Err(format!("parameter {name} is given more than once"));
        }
    }
    Ok(Params(params))
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| format!("bad percent-escape in {text:?}"))?;
                out.push(byte);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

impl Params {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|s| s.as_str()).filter(|s| !s.is_empty())
    }

    /// Refuses parameters outside `allowed`, so that a typo is an error, not a silent default.
    fn only(&self, allowed: &[&str]) -> Result<(), Failure> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(unknown) => Err(bad(format!("unknown parameter {unknown}; this endpoint takes: {}", allowed.join(", ")))),
            None => Ok(()),
        }
    }

    fn filter(&self) -> Result<Filter, Failure> {
        let country = match self.get("country") {
            Some(text) => Some(Country::parse(text.as_bytes()).ok_or_else(|| bad(format!("country must be two ASCII letters, not {text:?}")))?),
            None => None,
        };
        let ip = match self.get("ip") {
            Some(text) => Some(parse_ip(text.as_bytes()).ok_or_else(|| bad(format!("ip must be an IPv4 or IPv6 address, not {text:?}")))?),
            None => None,
        };
        let user = self.get("user_id").map(|text| parse_id(text, "user_id")).transpose()?;
        Ok(Filter { country, ip, user })
    }
}

struct Filter {
    country: Option<Country>,
    ip: Option<Ip>,
    user: Option<u64>,
}

impl Filter {
    fn json(&self) -> Value {
        json!({
            "country": self.country.map(|c| c.to_string()),
            "ip": self.ip.map(|ip| ip.to_string()),
            "user_id": self.user,
        })
    }

    /// The key to peek at, when the filter has a high-cardinality column.
    fn peek_key(&self) -> Option<FilterKey> {
        match (self.ip, self.user) {
            (Some(ip), _) => Some(FilterKey::Ip(ip)),
            (None, Some(user)) => Some(FilterKey::User(user)),
            (None, None) => None,
        }
    }

    fn admits(&self, row: &FilterRow) -> bool {
        self.country.is_none_or(|c| row.country == c)
            && self.ip.is_none_or(|ip| row.ip == ip)
            && self.user.is_none_or(|user| row.user == user)
    }
}

fn parse_id(text: &str, what: &str) -> Result<u64, Failure> {
    text.parse().map_err(|_| bad(format!("{what} must be an unsigned integer, not {text:?}")))
}

/// A minute given as a minute number (`floor(ts / 60000)`) or an RFC 3339 time.
pub fn parse_minute(text: &str) -> Result<Minute, String> {
    if let Ok(minute) = text.parse::<Minute>() {
        return Ok(minute);
    }
    let ms = parse_rfc3339_ms(text).ok_or_else(|| format!("{text:?} is neither a minute number nor an RFC 3339 time"))?;
    Minute::try_from(ms.div_euclid(MINUTE_MS as i64)).map_err(|_| format!("{text:?} is out of range"))
}

/// `YYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)` to ms since the epoch.
fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(r)?;
        s.bytes().all(|c| c.is_ascii_digit()).then(|| s.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        let padded = format!("{:0<3}", &fraction[..digits.min(3)]);
        millis = padded.parse::<i64>().ok()?;
        rest = &fraction[digits..];
    }
    let offset_minutes = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) && &rest[3..4] == ":" => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (rest[1..3].parse::<i64>().ok()? * 60 + rest[4..6].parse::<i64>().ok()?)
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 24 + hour) * 60 + minute - offset_minutes) * 60_000 + second * 1000 + millis)
}

/// The boundary answers stand at, or a 503 before anything is known.
fn boundary(answers: &Materialized) -> Result<Minute, Failure> {
    answers.boundary().ok_or_else(|| Failure(503, "no watermark yet: the logs are still being opened".into()))
}

fn watermark_json(answers: &Materialized) -> Value {
    json!({
        "watermark": answers.watermark(),
        "as_of_minute": answers.boundary(),
        "complete": answers.complete_at.is_some(),
    })
}

fn aggregated_count(subject: Subject, params: &Params, answers: &Materialized) -> Result<Value, Failure> {
    params.only(&["from", "to", "window", "country", "ip", "user_id"])?;
    let filter = params.filter()?;
    let w = boundary(answers)?;
    let (from, to) = count_range(params, w)?;
    // A campaign's count of a configured window is maintained (as of the frontier).
    let maintained = match (subject, params.get("window"), filter.country) {
        (Subject::Campaign(campaign), Some(_), None) if answers.frontier_on_boundary() && state_has_window(answers, to - from) => {
            Some(answers.campaign_window.get(&(to - from, campaign)).copied().unwrap_or(0))
        }
        _ => None,
    };
    let source = if maintained.is_some() { "maintained" } else { "computed" };
    let clicks = match maintained {
        Some(clicks) => clicks,
        None => answers.count(subject, from, to, filter.country).map_err(|e| Failure(501, e))?,
    };
    let (key, id) = match subject {
        Subject::Ad(id) => ("ad_id", id),
        Subject::Campaign(id) => ("campaign_id", id),
    };
    let mut body = json!({ key: id, "from_minute": from, "to_minute": to, "filter": filter.json(), "clicks": clicks, "source": source });
    merge(&mut body, watermark_json(answers));
    Ok(body)
}

fn popular_ads(params: &Params, answers: &Materialized, state: &ServingState) -> Result<Value, Failure> {
    params.only(&["count", "window", "minute", "country", "ip", "user_id"])?;
    let filter = params.filter()?;
    let count = popular_count(params, state)?;
    let w = boundary(answers)?;
    let (ads, from, to, source, as_of) = match (params.get("minute"), params.get("window")) {
        (Some(_), Some(_)) => return Err(bad("give minute or window, not both")),
        (Some(minute), None) => {
            let minute = parse_minute(minute).map_err(bad)?;
            let maintained = match filter.country {
                None => answers.top_minute.get(&minute),
                Some(country) => answers.top_country_minute.get(&(minute, country)),
            };
            match maintained {
                Some(top) if count <= state.settings.top_k => {
                    (top.iter().take(count).map(|r| (r.ad, r.clicks())).collect(), minute, minute + 1, "maintained", answers.watermark())
                }
                _ => (answers.top_over(minute, minute + 1, filter.country, count), minute, minute + 1, "computed", answers.watermark()),
            }
        }
        (None, window) => {
            let minutes = parse_window(window.unwrap_or("5m"))?;
            let from = w.saturating_sub(minutes);
            let configured = state.settings.windows.contains(&minutes) && count <= state.settings.top_k;
            let maintained: Option<Vec<(u64, u64)>> = match filter.country {
                None => answers.window_snapshots.get(&w).and_then(|tops| tops.get(&minutes)).map(|top| top.iter().take(count).copied().collect()),
                // The per-country windows are kept as of the frontier, which is the boundary's
                // state when the frontier is on it.
                Some(country) if answers.frontier_on_boundary() => Some(
                    answers
                        .top_country_window
                        .get(&(minutes, country))
                        .map(|top| top.iter().take(count).map(|r| (r.ad, r.clicks())).collect())
                        .unwrap_or_default(),
                ),
                Some(_) => None,
            };
            match maintained {
                Some(top) if configured => (top, from, w, "maintained", Some(w as u64 * MINUTE_MS)),
                _ => (answers.top_over(from, w, filter.country, count), from, w, "computed", answers.watermark()),
            }
        }
    };
    let ads: Vec<Value> = top_of(ads, count)
        .into_iter()
        .enumerate()
        .map(|(i, (ad, clicks))| json!({ "rank": i + 1, "ad_id": ad, "clicks": clicks }))
        .collect();
    let mut body = json!({
        "count": count, "from_minute": from, "to_minute": to, "filter": filter.json(), "ads": ads, "source": source,
    });
    merge(&mut body, watermark_json(answers));
    body["watermark"] = json!(as_of);
    Ok(body)
}

fn history(ad: u64, params: &Params, answers: &Materialized) -> Result<Value, Failure> {
    params.only(&["minute"])?;
    let minute = params.get("minute").ok_or_else(|| bad("history needs minute="))?;
    let minute = parse_minute(minute).map_err(bad)?;
    let updates: Vec<Value> = answers
        .history
        .get(&(ad, minute))
        .map(|entries| entries.iter().map(|e| json!({ "time": e.time, "clicks": e.clicks, "diff": e.diff })).collect())
        .unwrap_or_default();
    let current = answers.ad.get(&minute).and_then(|ads| ads.get(&ad)).copied().unwrap_or(0);
    let mut body = json!({ "ad_id": ad, "minute": minute, "clicks": current, "updates": updates });
    merge(&mut body, watermark_json(answers));
    Ok(body)
}

/// Every row an arrangement holds for one key, over all workers. The arrangements kept outside
/// the dataflow, and so readable, are the filter arrangements.
fn peek_arrangement(params: &Params, state: &ServingState) -> Result<Value, Failure> {
    params.only(&["arrangement", "key"])?;
    let name = params.get("arrangement").ok_or_else(|| bad("peek needs arrangement= (ClicksByIp or ClicksByUser)"))?;
    let text = params.get("key").ok_or_else(|| bad("peek needs key="))?;
    let key = match name.strip_prefix("Arrange: ").unwrap_or(name) {
        "ClicksByIp" => FilterKey::Ip(parse_ip(text.as_bytes()).ok_or_else(|| bad(format!("{text:?} is not an ip")))?),
        "ClicksByUser" => FilterKey::User(parse_id(text, "user_id")?),
        other => {
            return Err(bad(format!(
                "{other} cannot be peeked: only ClicksByIp and ClicksByUser are held outside the dataflow"
            )))
        }
    };
    let answer = state.peek(key).map_err(|e| Failure(503, e))?;
    let mut rows = answer.rows;
    rows.sort();
    let rows: Vec<Value> = rows
        .iter()
        .map(|(r, n)| {
            json!({
                "minute": r.minute, "ad_id": r.ad, "campaign_id": r.campaign, "country": r.country.to_string(),
                "user_id": r.user, "ip": r.ip.to_string(), "count": n,
            })
        })
        .collect();
    Ok(json!({
        "arrangement": name, "key": text, "rows": rows, "upper": answer.upper,
        "retained_from_minute": answer.retained_from,
    }))
}

/// Counts and top-K with an `ip` or `user_id` filter, from a peek at the filter arrangements.
fn filtered(path: &str, params: &Params, state: &ServingState) -> Result<Value, Failure> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let (subject, is_top) = match segments.as_slice() {
        ["v1", "ads", "popular_ads"] => (None, true),
        ["v1", "ads", id, "aggregated_count"] => (Some(Subject::Ad(parse_id(id, "ad_id")?)), false),
        ["v1", "campaigns", id, "aggregated_count"] => (Some(Subject::Campaign(parse_id(id, "campaign_id")?)), false),
        _ => return Err(bad("ip and user_id filter only aggregated_count and popular_ads")),
    };
    if is_top {
        params.only(&["count", "window", "minute", "country", "ip", "user_id"])?;
    } else {
        params.only(&["from", "to", "window", "country", "ip", "user_id"])?;
    }
    let filter = params.filter()?;
    let key = filter.peek_key().expect("only called with an ip or user_id");
    let w = boundary(&state.read())?;
    let (from, to, count) = if is_top {
        let count = popular_count(params, state)?;
        match (params.get("minute"), params.get("window")) {
            (Some(_), Some(_)) => return Err(bad("give minute or window, not both")),
            (Some(minute), None) => {
                let minute = parse_minute(minute).map_err(bad)?;
                (minute, minute + 1, count)
            }
            (None, window) => {
                let minutes = parse_window(window.unwrap_or("5m"))?;
                (w.saturating_sub(minutes), w, count)
            }
        }
    } else {
        let (from, to) = count_range(params, w)?;
        (from, to, 0)
    };
    let answer = state.peek(key).map_err(|e| Failure(503, e))?;
    if from < answer.retained_from {
        return Err(bad(format!(
            "minute {from} is outside retention: filters by ip or user_id reach back to minute {} \
             (allowed lateness plus the largest window)",
            answer.retained_from
        )));
    }
    let rows = answer.rows.iter().filter(|(row, _)| row.minute >= from && row.minute < to && filter.admits(row));
    let mut body = match subject {
        Some(subject) => {
            let clicks: isize = rows
                .filter(|(row, _)| match subject {
                    Subject::Ad(ad) => row.ad == ad,
                    Subject::Campaign(campaign) => row.campaign == campaign,
                })
                .map(|(_, n)| n)
                .sum();
            let (name, id) = match subject {
                Subject::Ad(id) => ("ad_id", id),
                Subject::Campaign(id) => ("campaign_id", id),
            };
            json!({ name: id, "from_minute": from, "to_minute": to, "filter": filter.json(), "clicks": clicks.max(0) })
        }
        None => {
            let mut per_ad: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
            for (row, n) in rows {
                *per_ad.entry(row.ad).or_default() += (*n).max(0) as u64;
            }
            let ads: Vec<Value> = top_of(per_ad.into_iter().collect(), count)
                .into_iter()
                .enumerate()
                .map(|(i, (ad, clicks))| json!({ "rank": i + 1, "ad_id": ad, "clicks": clicks }))
                .collect();
            json!({ "count": count, "from_minute": from, "to_minute": to, "filter": filter.json(), "ads": ads, "source": "peek" })
        }
    };
    // Exact as of the least frontier of the workers' arrangements (all of the input, after a replay).
    let answers = state.read();
    merge(&mut body, watermark_json(&answers));
    if let Some(upper) = answer.upper {
        body["watermark"] = json!(upper);
    }
    body["retained_from_minute"] = json!(answer.retained_from);
    Ok(body)
}

/// Whether the dataflow maintains sliding counts for a window of `minutes` (they are kept per
/// configured window, and the campaign windows only when some campaign has clicks in one).
fn state_has_window(answers: &Materialized, minutes: Minute) -> bool {
    answers.configured_windows.contains(&minutes)
}

fn popular_count(params: &Params, state: &ServingState) -> Result<usize, Failure> {
    match params.get("count") {
        None => Ok(state.settings.top_k.min(100)),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|c| (1..=MAX_COUNT).contains(c))
            .ok_or_else(|| bad(format!("count must be a whole number from 1 to {MAX_COUNT}, not {text:?}"))),
    }
}

fn parse_window(window: &str) -> Result<Minute, Failure> {
    let minutes = crate::config::parse_windows(window)
        .ok()
        .filter(|w| w.len() == 1)
        .map(|w| w[0])
        .ok_or_else(|| bad(format!("window must be a whole number of minutes like 5m or 1h, not {window:?}")))?;
    if u64::from(minutes) > MAX_SPAN_MINUTES {
        return Err(bad(format!("window is {minutes} minutes; at most {MAX_SPAN_MINUTES}")));
    }
    Ok(minutes)
}

/// `[from, to)` of a count: `window=M` (the last M minutes), or given, or around the boundary
/// `w` (default the last minute).
fn count_range(params: &Params, w: Minute) -> Result<(Minute, Minute), Failure> {
    if let Some(window) = params.get("window") {
        if params.get("from").is_some() || params.get("to").is_some() {
            return Err(bad("give window or from/to, not both"));
        }
        let minutes = parse_window(window)?;
        return Ok((w.saturating_sub(minutes), w));
    }
    let from = params.get("from").map(parse_minute).transpose().map_err(bad)?;
    let to = params.get("to").map(parse_minute).transpose().map_err(bad)?;
    let (from, to) = match (from, to) {
        (None, None) => (w.saturating_sub(1), w),
        (Some(from), None) => (from, w.max(from)),
        (None, Some(to)) => (to.saturating_sub(1), to),
        (Some(from), Some(to)) => (from, to),
    };
    if to < from {
        return Err(bad(format!("to ({to}) is before from ({from})")));
    }
    if u64::from(to - from) > MAX_SPAN_MINUTES {
        return Err(bad(format!("the range spans {} minutes; at most {MAX_SPAN_MINUTES}", to - from)));
    }
    Ok((from, to))
}

fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(into), Value::Object(from)) = (into, from) {
        into.extend(from);
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn status(answers: &Materialized, state: &ServingState) -> Value {
    let now = now_ms();
    let c = &answers.counters;
    let partitions: Vec<Value> = c
        .partitions
        .iter()
        .map(|p| {
            let name = state.settings.partition_names.get(p.partition as usize).cloned().unwrap_or_default();
            let size = std::fs::metadata(state.settings.logs.join(&name)).map(|m| m.len()).ok();
            json!({
                "partition": name,
                "offset": p.offset,
                "size": size,
                "lag_bytes": size.map(|s| s.saturating_sub(p.offset)),
                "max_ts": p.max_ts,
                "lag_seconds": p.max_ts.map(|ts| now.saturating_sub(ts) as f64 / 1000.0),
                "lines": p.lines,
                "accepted": p.accepted,
                "late": p.late,
                "too_late": p.too_late,
                "malformed": p.malformed,
                "finished": p.finished,
            })
        })
        .collect();
    let total = |f: fn(&clickagg_dataflows::PartitionProgress) -> u64| c.partitions.iter().map(f).sum::<u64>();
    let accepted = total(|p| p.accepted);
    let mut body = json!({
        "partitions": partitions,
        "lines": total(|p| p.lines),
        "accepted": accepted,
        "clicks": c.billable,
        "duplicates": accepted.saturating_sub(c.billable + c.excluded),
        "late": total(|p| p.late),
        "too_late": total(|p| p.too_late),
        "malformed": total(|p| p.malformed),
        "fraud_excluded": c.excluded,
        "changelog_rows": c.changelog_rows,
        "minutes": answers.ad.len(),
        "top_k": state.settings.top_k,
        "windows": state.settings.windows,
        "watermark_delay_ms": state.settings.watermark_delay_ms,
        "allowed_lateness_ms": state.settings.allowed_lateness_ms,
        "uptime_seconds": state.started.elapsed().as_secs_f64(),
    });
    merge(&mut body, watermark_json(answers));
    body
}

fn operators(state: &ServingState) -> Vec<crate::introspect::OperatorSummary> {
    state.introspection.lock().map(|i| i.summary()).unwrap_or_default()
}

/// The arrangements of this process's workers: names, key and value types, records and batches
/// their traces hold now. Their compaction follows the dataflow's frontier (no trace handle is
/// held outside it), which is the watermark reported beside them.
fn arrangements(state: &ServingState, answers: &Materialized) -> Value {
    let list: Vec<Value> = operators(state)
        .into_iter()
        .filter(|op| op.arranges)
        .map(|op| {
            let (key, value) = clickagg_dataflows::render::arrangement_schema(&op.name).unwrap_or(("?", "?"));
            json!({
                "name": op.name, "operator": op.id, "address": op.address, "key": key, "value": value,
                "records": op.records, "batches": op.batches, "batches_created": op.batches_created,
                "records_per_worker": op.per_worker,
            })
        })
        .collect();
    // After a replay the dataflow has completed: only the filter arrangements are still held.
    let compacted_to = if answers.complete_at.is_some() { None } else { answers.frontier };
    json!({
        "arrangements": list, "compacted_to": compacted_to, "watermark": answers.watermark(),
        "dataflow_complete": answers.complete_at.is_some(),
    })
}

/// Every operator of the dataflow (the same on every worker), with the records of those that
/// hold a trace.
fn dataflow(state: &ServingState) -> Value {
    let list: Vec<Value> = operators(state)
        .into_iter()
        .map(|op| json!({ "operator": op.id, "address": op.address, "name": op.name, "records": op.arranges.then_some(op.records) }))
        .collect();
    json!({ "operators": list })
}

fn metrics(answers: &Materialized, state: &ServingState) -> String {
    let c = &answers.counters;
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        text.push_str(&format!("# HELP clickagg_{name} {help}\n# TYPE clickagg_{name} {kind}\n"));
        for (labels, value) in samples {
            text.push_str(&format!("clickagg_{name}{labels} {value}\n"));
        }
    };
    let per_partition = |f: fn(&clickagg_dataflows::PartitionProgress) -> u64| -> Vec<(String, f64)> {
        c.partitions
            .iter()
            .map(|p| {
                let name = state.settings.partition_names.get(p.partition as usize).map_or("", |s| s.as_str());
                (format!("{{partition=\"{name}\"}}"), f(p) as f64)
            })
            .collect()
    };
    metric("watermark_ms", "gauge", "Every answer is exact as of this event time.", vec![(String::new(), answers.watermark().unwrap_or(0) as f64)]);
    metric("lines_total", "counter", "Lines read, per partition.", per_partition(|p| p.lines));
    metric("accepted_total", "counter", "Clicks accepted (duplicates included), per partition.", per_partition(|p| p.accepted));
    metric("late_total", "counter", "Accepted clicks that corrected a reported minute.", per_partition(|p| p.late));
    metric("too_late_total", "counter", "Rows beyond the allowed lateness (dead letter).", per_partition(|p| p.too_late));
    metric("malformed_total", "counter", "Lines that are not clicks (dead letter).", per_partition(|p| p.malformed));
    metric("offset_bytes", "gauge", "Byte offset read to, per partition.", per_partition(|p| p.offset));
    metric("clicks_total", "counter", "Distinct billable clicks counted.", vec![(String::new(), c.billable as f64)]);
    metric("fraud_excluded_total", "counter", "Distinct clicks excluded by the fraud rules.", vec![(String::new(), c.excluded as f64)]);
    metric("changelog_rows_total", "counter", "Updates the sink applied.", vec![(String::new(), c.changelog_rows as f64)]);
    let lines: u64 = c.partitions.iter().map(|p| p.lines).sum();
    let seconds = state.started.elapsed().as_secs_f64().max(1e-9);
    metric("events_per_second", "gauge", "Lines read per second since start.", vec![(String::new(), lines as f64 / seconds)]);
    metric("minutes_kept", "gauge", "Minutes whose answers the server holds.", vec![(String::new(), answers.ad.len() as f64)]);
    let arranged: Vec<(String, f64)> = operators(state)
        .into_iter()
        .filter(|op| op.arranges)
        .map(|op| (format!("{{name=\"{}\",operator=\"{}\"}}", op.name.replace('"', "'"), op.id), op.records as f64))
        .collect();
    metric("arrangement_records", "gauge", "Updates held by each arrangement's trace, over this process's workers.", arranged);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode_and_refuse_repeats() {
        let p = parse_query("count=10&country=U%53&x=a+b").unwrap();
        assert_eq!((p.get("count"), p.get("country"), p.get("x")), (Some("10"), Some("US"), Some("a b")));
        assert!(parse_query("a=1&a=2").unwrap_err().contains("more than once"));
        assert!(parse_query("a=%zz").is_err());
        assert!(parse_query("a=%ff").is_err());
    }

    #[test]
    fn minutes_as_numbers_or_rfc3339() {
        assert_eq!(parse_minute("29000000"), Ok(29_000_000));
        assert_eq!(parse_minute("1970-01-01T00:01:00Z"), Ok(1));
        assert_eq!(parse_minute("1970-01-01T00:01:59.999Z"), Ok(1));
        assert_eq!(parse_minute("2026-11-22T10:00:00Z"), Ok((1_795_341_600_000u64 / 60_000) as u32));
        assert_eq!(parse_minute("2026-11-22T11:00:00+01:00"), parse_minute("2026-11-22T10:00:00Z"));
        for bad in ["", "yesterday", "2026-13-01T00:00:00Z", "2026-11-22T10:00:00", "-5", "2026-11-22T10:00:00.Z"] {
            assert!(parse_minute(bad).is_err(), "{bad:?}");
        }
    }
}
