//! The HTTP API, the Prometheus metrics and the dashboard, over [`ServingState`].
//!
//! Every answer carries the watermark it is exact as of: the reader takes the state's read lock
//! once, so that an answer never mixes two frontiers. Requests are GET only, with size-limited
//! query strings; anything unexpected is a 4xx with a JSON body naming the problem.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use clickagg_dataflows::{Minute, MINUTE_MS};


use super::auth::Token;
use super::metrics::Rate;
use super::transport::{listen, Handler, Request, Response};
use super::params::{bad, count_range, parse_id, parse_minute, parse_query, Failure, Params, TopSpan, MAX_COUNT, MAX_URL_BYTES};
use super::state::{top_of, Materialized, ServingState, Subject};
use super::tiers::Tiers;

const DASHBOARD: &str = include_str!("dashboard.html");

/// How many threads the HTTP runtime has next to `workers` dataflow workers: the cores the
/// workers leave, at least one. A thread that shares a core with a busy worker waits a
/// scheduler tick (4 ms) at a time for it, and every connection it serves waits too; on this
/// project's two-core machine one serving thread measured a lower p99 than two (`bench/`,
/// serving, with the earlier epoll server).
pub fn event_loops_beside(workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.saturating_sub(workers).clamp(1, 8)
}

/// A running server; its threads serve until the process ends.
pub struct HttpServer {
    pub address: std::net::SocketAddr,
}

/// Binds `address` (a port alone means 127.0.0.1) and serves `state` on `event_loops`
/// threads; with a `token`, the API needs `Authorization: Bearer TOKEN`. Fails at once, with the
/// reason, if the address cannot be bound or the token is unusable.
pub fn serve(
    address: &str,
    state: Arc<ServingState>,
    token: Option<String>,
    event_loops: usize,
) -> Result<HttpServer, crate::error::EdgeError> {
    let listen_error = |source| crate::error::EdgeError::Listen { address: address.to_string(), source };
    let token = token
        .map(|t| Token::new(&t))
        .transpose()
        .map_err(|e| listen_error(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let local = listen(address, Api { state, token, rate: Rate::default() }, event_loops).map_err(listen_error)?;
    Ok(HttpServer { address: local })
}

struct Api {
    state: Arc<ServingState>,
    token: Option<Token>,
    /// Lines read, sampled each second, for `/metrics`' events/s.
    rate: Rate,
}

impl Handler for Api {
    fn respond(&self, request: &Request) -> Response {
        let (status, content_type, body) = respond(request, &self.state, self.token.as_ref(), &self.rate);
        Response { status, content_type, body }
    }

    fn tick(&self) {
        let lines = self.state.read().counters.partitions.iter().map(|p| p.lines).sum();
        self.rate.record(std::time::Instant::now(), lines);
    }

    /// A peek, and a filter by ip or user_id (answered by a peek), wait on the workers. The
    /// query is decoded as `respond` decodes it, so that no spelling of `ip` slips past.
    fn waits(&self, request: &Request) -> bool {
        let (path, query) = request.target.split_once('?').unwrap_or((&request.target, ""));
        path.trim_end_matches('/') == "/v1/introspection/peek"
            || parse_query(query).is_ok_and(|params| params.get("ip").is_some() || params.get("user_id").is_some())
    }
}

fn respond(request: &Request, state: &ServingState, token: Option<&Token>, rate: &Rate) -> (u16, &'static str, String) {
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
        if !token.admits(request.header("authorization").map(str::as_bytes)) {
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
        return match super::peek::answer(&params, &state.peeks, &state.introspection) {
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
    let result = route(path, &params, &answers, state, rate);
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
        Ok(Body::Text(text)) => (200, super::metrics::CONTENT_TYPE, text),
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

fn route(path: &str, params: &Params, answers: &Materialized, state: &ServingState, rate: &Rate) -> Result<Body, Failure> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match segments.as_slice() {
        ["v1", "ads", "popular_ads"] => popular_ads(params, answers, state).map(Body::Json),
        ["v1", "ads", id, "aggregated_count"] => aggregated_count(Subject::Ad(parse_id(id, "ad_id")?), params, answers, state).map(Body::Json),
        ["v1", "campaigns", id, "aggregated_count"] => {
            aggregated_count(Subject::Campaign(parse_id(id, "campaign_id")?), params, answers, state).map(Body::Json)
        }
        ["v1", "ads", id, "series"] => series(Subject::Ad(parse_id(id, "ad_id")?), params, answers, state).map(Body::Json),
        ["v1", "campaigns", id, "series"] => series(Subject::Campaign(parse_id(id, "campaign_id")?), params, answers, state).map(Body::Json),
        ["v1", "ads", id, "history"] => history(parse_id(id, "ad_id")?, params, answers, state).map(Body::Json),
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
            let lines = answers.counters.partitions.iter().map(|p| p.lines).sum();
            let per_second = rate.per_second(std::time::Instant::now(), lines);
            Ok(Body::Text(super::metrics::render(answers, state, &operators(state), per_second)))
        }
        _ => Err(Failure(404, format!("no such endpoint: {path}"))),
    }
}

/// Both tiers as `answers` splits them: memory from its `hot_from` on, the store before.
fn tiers<'a>(answers: &'a Materialized, state: &'a ServingState) -> Tiers<'a> {
    Tiers { hot: answers, cold: state.store() }
}

/// A store that cannot be read is the server's problem, not the request's.
fn store_failure(message: String) -> Failure {
    Failure(503, message)
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

fn aggregated_count(subject: Subject, params: &Params, answers: &Materialized, state: &ServingState) -> Result<Value, Failure> {
    params.only(&["from", "to", "window", "country", "ip", "user_id"])?;
    let filter = params.filter()?;
    let w = boundary(answers)?;
    let (from, to) = count_range(params, w)?;
    // A campaign's count of a configured window is maintained (as of the frontier).
    let maintained = match (subject, params.get("window"), filter.country) {
        (Subject::Campaign(campaign), Some(_), None) if answers.frontier_on_boundary() && state.settings.windows.contains(&(to - from)) => {
            Some(answers.campaign_window.get(&(to - from, campaign)).copied().unwrap_or(0))
        }
        _ => None,
    };
    let source = if maintained.is_some() { "maintained" } else { "computed" };
    let clicks = match maintained {
        Some(clicks) => clicks,
        None => tiers(answers, state).count(subject, from, to, filter.country).map_err(store_failure)?,
    };
    let (key, id) = match subject {
        Subject::Ad(id) => ("ad_id", id),
        Subject::Campaign(id) => ("campaign_id", id),
    };
    let mut body = json!({ key: id, "from_minute": from, "to_minute": to, "filter": filter.json(), "clicks": clicks, "source": source });
    merge(&mut body, watermark_json(answers));
    Ok(body)
}

/// Most minutes one series request may span: a day.
const MAX_SERIES_MINUTES: u32 = 24 * 60;

/// `/v1/{ads,campaigns}/{id}/series?from=&to=[&country=XX]`: the clicks of each minute of
/// `[from, to)` (minute numbers or RFC 3339 times; `to` defaults to the boundary the answers
/// stand at, `from` to an hour before `to`), in one answer exact as of one watermark.
///
/// Each minute says what it is: `final` (no late click can change it any more), `provisional`
/// (closed, but late clicks may still correct it), or `open`: the minute the watermark is in,
/// with the clicks visible so far (a follower ticks within the minute; a replay stands on its
/// boundary, where none is), and the minutes after it, whose `clicks` are null.
fn series(subject: Subject, params: &Params, answers: &Materialized, state: &ServingState) -> Result<Value, Failure> {
    params.only(&["from", "to", "country"])?;
    let filter = params.filter()?;
    let w = boundary(answers)?;
    let minute = |name: &str| params.get(name).map(parse_minute).transpose().map_err(|e| bad(format!("{name}: {e}")));
    let to = minute("to")?.unwrap_or(w);
    let from = minute("from")?.unwrap_or(to.saturating_sub(60));
    if to <= from {
        return Err(bad(format!("to ({to}) must be after from ({from})")));
    }
    if to - from > MAX_SERIES_MINUTES {
        return Err(bad(format!("the series spans {} minutes; at most {MAX_SERIES_MINUTES} in one request", to - from)));
    }
    let final_before = match answers.complete_at {
        Some(_) => Minute::MAX,
        None => clickagg_dataflows::EventTimeRules {
            watermark_delay_ms: state.settings.watermark_delay_ms,
            allowed_lateness_ms: state.settings.allowed_lateness_ms,
            tick_ms: MINUTE_MS,
        }
        .final_minutes_before(answers.watermark().unwrap_or(0)),
    };
    // Before a replay ends its last minute is open too; once it has, nothing is.
    let open = if answers.complete_at.is_some() { w } else { w + 1 };
    let visible = tiers(answers, state).series(subject, from.min(open), to.min(open), filter.country).map_err(store_failure)?;
    let minutes: Vec<Value> = (from..to)
        .map(|m| match visible.get((m - from) as usize) {
            Some(&(_, clicks)) if m < w => {
                json!({ "minute": m, "clicks": clicks, "state": if m < final_before { "final" } else { "provisional" } })
            }
            Some(&(_, clicks)) if m < open => json!({ "minute": m, "clicks": clicks, "state": "open" }),
            _ => json!({ "minute": m, "clicks": null, "state": "open" }),
        })
        .collect();
    let (key, id) = match subject {
        Subject::Ad(id) => ("ad_id", id),
        Subject::Campaign(id) => ("campaign_id", id),
    };
    let mut body = json!({
        key: id, "from_minute": from, "to_minute": to, "filter": filter.json(), "minutes": minutes,
        "final_before_minute": final_before.min(w), "open_from_minute": w,
    });
    merge(&mut body, watermark_json(answers));
    Ok(body)
}

fn popular_ads(params: &Params, answers: &Materialized, state: &ServingState) -> Result<Value, Failure> {
    params.only(&["count", "window", "minute", "country", "ip", "user_id"])?;
    let filter = params.filter()?;
    let count = popular_count(params, state)?;
    let w = boundary(answers)?;
    let span = TopSpan::parse(params)?;
    let (from, to) = span.range(w);
    let tiers = tiers(answers, state);
    let (ads, source, as_of) = match span {
        TopSpan::Minute(minute) => {
            let maintained = tiers.top_of_minute(minute, filter.country).map_err(store_failure)?;
            match maintained {
                Some(mut top) if count <= state.settings.top_k => {
                    top.truncate(count);
                    (top, "maintained", answers.watermark())
                }
                _ => (tiers.top_over(from, to, filter.country, count).map_err(store_failure)?, "computed", answers.watermark()),
            }
        }
        TopSpan::Window(minutes) => {
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
                Some(top) if configured => (top, "maintained", Some(w as u64 * MINUTE_MS)),
                _ => (tiers.top_over(from, to, filter.country, count).map_err(store_failure)?, "computed", answers.watermark()),
            }
        }
    };
    let mut body = json!({
        "count": count, "from_minute": from, "to_minute": to, "filter": filter.json(), "ads": ranked_json(ads, count),
        "source": source,
    });
    merge(&mut body, watermark_json(answers));
    body["watermark"] = json!(as_of);
    Ok(body)
}

fn history(ad: u64, params: &Params, answers: &Materialized, state: &ServingState) -> Result<Value, Failure> {
    params.only(&["minute"])?;
    let minute = params.get("minute").ok_or_else(|| bad("history needs minute="))?;
    let minute = parse_minute(minute).map_err(bad)?;
    let (current, entries) = tiers(answers, state).history(ad, minute).map_err(store_failure)?;
    let updates: Vec<Value> = entries.iter().map(|e| json!({ "time": e.time, "clicks": e.clicks, "diff": e.diff })).collect();
    let mut body = json!({ "ad_id": ad, "minute": minute, "clicks": current, "updates": updates });
    merge(&mut body, watermark_json(answers));
    Ok(body)
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
        let (from, to) = TopSpan::parse(params)?.range(w);
        (from, to, popular_count(params, state)?)
    } else {
        let (from, to) = count_range(params, w)?;
        (from, to, 0)
    };
    let answer = state.peeks.filter(key).map_err(|e| Failure(503, e))?;
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
            let ads = ranked_json(per_ad.into_iter().collect(), count);
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

/// The `count` best `(ad, clicks)` as ranked JSON rows.
fn ranked_json(ads: Vec<(u64, u64)>, count: usize) -> Vec<Value> {
    top_of(ads, count)
        .into_iter()
        .enumerate()
        .map(|(i, (ad, clicks))| json!({ "rank": i + 1, "ad_id": ad, "clicks": clicks }))
        .collect()
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

fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(into), Value::Object(from)) = (into, from) {
        into.extend(from);
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `/v1/status`. A partition's `lag_seconds` is how far its newest event time is behind the
/// wall clock while it is still being read; `null` once it is read to the end (`finished`), as
/// every partition of a completed replay is.
fn status(answers: &Materialized, state: &ServingState) -> Value {
    let now = now_ms();
    let c = &answers.counters;
    let partitions: Vec<Value> = c
        .partitions
        .iter()
        .map(|p| {
            let name = state.settings.partition_names.get(p.partition as usize).cloned().unwrap_or_default();
            let size = state.settings.partition_file_size(&name);
            // A topic partition's end is its high watermark, as its reader last saw it.
            let end = crate::model::positions::end_of(&name);
            json!({
                "partition": name,
                "offset": p.offset,
                "size": size,
                "lag_bytes": size.map(|s| s.saturating_sub(p.offset)),
                "end_offset": end,
                "lag_messages": end.map(|e| e.saturating_sub(p.offset)),
                "max_ts": p.max_ts,
                "lag_seconds": p.max_ts.filter(|_| !p.finished).map(|ts| now.saturating_sub(ts) as f64 / 1000.0),
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
    let finished = answers.complete_at.is_some() || (!c.partitions.is_empty() && c.partitions.iter().all(|p| p.finished));
    let lag_seconds = c.partitions.iter().filter(|p| !p.finished).filter_map(|p| p.max_ts).map(|ts| now.saturating_sub(ts) as f64 / 1000.0).reduce(f64::max);
    let uptime = state.started.elapsed().as_secs_f64();
    let mut body = json!({
        "partitions": partitions,
        "lines": total(|p| p.lines),
        "lines_per_second": total(|p| p.lines) as f64 / uptime.max(1e-9),
        "accepted": total(|p| p.accepted),
        "clicks": c.billable,
        "duplicates": c.duplicates,
        "pending_behind_watermark": answers.counters.pending_behind_watermark(),
        "dead_letters": c.dead_letters,
        "finished": finished,
        "lag_seconds": if finished { None } else { lag_seconds },
        "late": total(|p| p.late),
        "too_late": total(|p| p.too_late),
        "malformed": total(|p| p.malformed),
        "fraud_excluded": c.excluded,
        "changelog_rows": c.changelog_rows,
        "minutes": tiers(answers, state).minutes(),
        "served_entries": answers.entries(),
        "memory_from_minute": answers.hot_from,
        "top_k": state.settings.top_k,
        "windows": state.settings.windows,
        "watermark_delay_ms": state.settings.watermark_delay_ms,
        "allowed_lateness_ms": state.settings.allowed_lateness_ms,
        "uptime_seconds": uptime,
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
        .filter(|op| op.total.arranges)
        .map(|op| {
            let t = &op.total;
            let (key, value) = clickagg_dataflows::render::arrangement_schema(&t.name).unwrap_or(("?", "?"));
            json!({
                "name": t.name, "operator": op.id, "address": t.address, "key": key, "value": value,
                "records": t.records, "batches": t.batches, "batches_created": t.batches_created,
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
/// hold state (in total and per worker) and the time they were scheduled (summed over workers).
fn dataflow(state: &ServingState) -> Value {
    let operators = operators(state);
    let workers = operators.iter().map(|op| op.per_worker.len()).max().unwrap_or(0);
    let list: Vec<Value> = operators
        .into_iter()
        .map(|op| {
            let t = &op.total;
            json!({
                "operator": op.id, "address": t.address, "name": t.name, "records": t.arranges.then_some(t.records),
                "records_per_worker": t.arranges.then_some(&op.per_worker),
                "scheduled_ns": t.scheduled_ns, "schedules": t.schedules,
            })
        })
        .collect();
    json!({ "operators": list, "workers": workers })
}
