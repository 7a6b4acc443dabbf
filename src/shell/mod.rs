//! `clickagg shell --connect HOST:PORT`: an interactive shell over a running server's API, for
//! people who want to look inside without writing URLs. With a terminal it edits lines and
//! keeps history ([`terminal`]); otherwise it reads commands from stdin, one per line, so it can
//! be scripted.

pub mod terminal;

use std::io::{BufRead, IsTerminal, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

const HELP: &str = "\
commands:
  top [WINDOW|minute M] [COUNT] [country XX]   top ads of the last WINDOW (e.g. 5m) or of minute M
  count AD [FROM [TO]] [country XX]             clicks of an ad over minutes [FROM, TO) (default: the last minute)
  campaign ID [FROM [TO]]                       clicks of a campaign
  history AD MINUTE                             every update of that minute's count, with its time
  watermark                                     the watermark every answer is exact as of
  partitions                                    per partition: offset, max_ts, lag, counts
  status                                        everything /v1/status says, as JSON
  arrangements                                  each arrangement: name, key/value types, records (per worker), batches
  dataflow                                      every operator: records per worker of those holding state, time scheduled
  peek ARRANGEMENT [KEY] [limit N]              the rows any listed arrangement holds for KEY (its first key
                                                fields, comma-separated; none: its first rows), at most N
                                                (default 100), in key order, over all workers
  watch [N] COMMAND                             run COMMAND each time the watermark moves, until the answers
                                                are complete, N times, or Ctrl-C
  get PATH                                      any API path, raw JSON
  help                                          this text
  quit                                          leave (or Ctrl-D)
minutes are numbers (floor(ts / 60000)) or RFC 3339 times
Tab completes commands and arrangement names; Up and Down recall earlier lines, kept across sessions";

/// The commands, for completion.
pub const COMMANDS: [&str; 14] = [
    "arrangements", "campaign", "count", "dataflow", "get", "help", "history", "partitions", "peek", "quit", "status", "top",
    "watch", "watermark",
];

/// A connection target and optional bearer token.
pub struct Client {
    pub address: String,
    pub token: Option<String>,
}

impl Client {
    /// GETs `target` and returns the JSON body, or the server's error message.
    pub fn get(&self, target: &str) -> Result<Value, String> {
        let mut stream = TcpStream::connect(&self.address).map_err(|e| format!("cannot connect to {}: {e}", self.address))?;
        stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        let auth = self.token.as_ref().map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let request = format!("GET {target} HTTP/1.1\r\nHost: {}\r\n{auth}Connection: close\r\n\r\n", self.address);
        stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).map_err(|e| format!("reading the answer: {e}"))?;
        let response = String::from_utf8_lossy(&response);
        let (head, body) = response.split_once("\r\n\r\n").ok_or("the server sent no HTTP answer")?;
        let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or("the server sent no status")?;
        let json: Value = serde_json::from_str(body).map_err(|e| format!("the server sent no JSON ({e})"))?;
        if status == 200 {
            Ok(json)
        } else {
            Err(format!("{status}: {}", json["error"].as_str().unwrap_or("error")))
        }
    }
}

/// Runs the shell until `quit` or end of input. Returns an error only if the server cannot be
/// reached at all at start; a failing command prints its error and the shell goes on.
pub fn shell(client: &Client) -> Result<(), String> {
    let status = client.get("/v1/status")?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        println!("clickagg shell: {} (watermark {}); type help", client.address, status["watermark"]);
        terminal::interactive(client)?;
    } else {
        for line in std::io::stdin().lock().lines() {
            let line = line.map_err(|e| e.to_string())?;
            if !execute(client, line.trim(), &mut std::io::stdout()) {
                break;
            }
        }
    }
    Ok(())
}

/// Runs one command, writing its answer to `out`; false when the shell should end.
pub fn execute(client: &Client, line: &str, out: &mut impl Write) -> bool {
    let words: Vec<&str> = line.split_whitespace().collect();
    let result = match words.as_slice() {
        [] => Ok(String::new()),
        ["quit" | "exit"] => return false,
        ["help"] => Ok(HELP.to_string()),
        ["watch", n, rest @ ..] if !rest.is_empty() && n.parse::<usize>().is_ok() => {
            watch(client, &rest.join(" "), out, n.parse().ok())
        }
        ["watch", rest @ ..] if !rest.is_empty() => watch(client, &rest.join(" "), out, None),
        words => answer(client, words),
    };
    let _ = match result {
        Ok(text) if text.is_empty() => Ok(()),
        Ok(text) => writeln!(out, "{text}"),
        Err(e) => writeln!(out, "error: {e}"),
    };
    let _ = out.flush();
    true
}

/// Re-runs `command` each time the watermark moves, until the answers are complete (a finished
/// replay: nothing will change), `rounds` rounds are shown, or Ctrl-C in a terminal.
pub fn watch(client: &Client, command: &str, out: &mut impl Write, rounds: Option<usize>) -> Result<String, String> {
    let words: Vec<&str> = command.split_whitespace().collect();
    let mut last = None;
    let mut shown = 0;
    loop {
        let status = client.get("/v1/status")?;
        let watermark = status["watermark"].clone();
        if last.as_ref() != Some(&watermark) {
            writeln!(out, "-- watermark {watermark}\n{}", answer(client, &words)?).map_err(|e| e.to_string())?;
            out.flush().map_err(|e| e.to_string())?;
            last = Some(watermark);
            shown += 1;
            if rounds.is_some_and(|r| shown >= r) {
                return Ok(String::new());
            }
        }
        if status["complete"] == Value::Bool(true) {
            return Ok("-- the answers are complete: the replay has finished, nothing will change".to_string());
        }
        // Poll twice a second, looking for Ctrl-C every 50 ms.
        for _ in 0..10 {
            if terminal::interrupted() {
                return Ok("-- stopped".to_string());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A JSON scalar as text a column can pad (a JSON `Value` ignores width), strings unquoted.
fn plain(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Splits off a trailing `country XX`.
fn country<'a>(words: &'a [&'a str]) -> (&'a [&'a str], Option<&'a str>) {
    match words {
        [rest @ .., "country", c] => (rest, Some(c)),
        _ => (words, None),
    }
}

fn with_country(mut target: String, country: Option<&str>) -> String {
    if let Some(c) = country {
        target.push_str(if target.contains('?') { "&" } else { "?" });
        target.push_str("country=");
        target.push_str(c);
    }
    target
}

fn range(words: &[&str]) -> String {
    match words {
        [] => String::new(),
        [from] => format!("?from={from}"),
        [from, to, ..] => format!("?from={from}&to={to}"),
    }
}

/// `text` percent-encoded for a query string: every byte but unreserved ones (RFC 3986).
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Per-worker figures as `a+b+c`, or the one figure with a single worker.
fn per_worker(values: &Value) -> String {
    let list: Vec<String> = values.as_array().into_iter().flatten().map(plain).collect();
    list.join("+")
}

/// The operators: id, address, records held (total, and per worker), time scheduled, name.
fn dataflow(json: &Value) -> Result<String, String> {
    let mut text = format!(
        "operators of {} worker(s) in this process; records are held updates, per worker; time is spent scheduled, over all workers\n{:>5}  {:<14} {:>10} {:<20} {:>10} {:>9}  name",
        json["workers"], "id", "address", "records", "per worker", "time ms", "runs"
    );
    for op in json["operators"].as_array().into_iter().flatten() {
        let address: Vec<String> = op["address"].as_array().into_iter().flatten().map(plain).collect();
        let (records, workers) = if op["records"].is_null() { (String::new(), String::new()) } else { (plain(&op["records"]), per_worker(&op["records_per_worker"])) };
        let millis = op["scheduled_ns"].as_u64().map_or(String::new(), |ns| format!("{:.1}", ns as f64 / 1e6));
        text.push_str(&format!(
            "\n{:>5}  {:<14} {:>10} {:<20} {:>10} {:>9}  {}",
            plain(&op["operator"]),
            address.join("."),
            records,
            workers,
            millis,
            plain(&op["schedules"]),
            plain(&op["name"])
        ));
    }
    Ok(text)
}

/// The words after `peek`: the arrangement (`Arrange: X` as listed, two words, is one name),
/// the key (empty for the first rows) and the limit, if given; `None` if they do not fit.
fn peek_words<'a>(words: &[&'a str]) -> Option<(String, &'a str, Option<&'a str>)> {
    let (arrangement, rest) = match words {
        ["Arrange:", name, rest @ ..] => (format!("Arrange: {name}"), rest),
        [name, rest @ ..] => (name.to_string(), rest),
        [] => return None,
    };
    match rest {
        [] => Some((arrangement, "", None)),
        ["limit", n] => Some((arrangement, "", Some(n))),
        [key] => Some((arrangement, key, None)),
        [key, "limit", n] => Some((arrangement, key, Some(n))),
        _ => None,
    }
}

/// A peek's rows: the filter arrangements' rows as columns, any other's as key, value and count.
fn peek(arrangement: &str, key: &str, json: &Value) -> String {
    let rows = json["rows"].as_array().cloned().unwrap_or_default();
    let upper = match json.get("upper") {
        None => "what the workers hold now".to_string(),
        Some(Value::Null) => "the end of the input".to_string(),
        Some(upper) => plain(upper),
    };
    let more = if json["more"] == Value::Bool(true) { format!(", the first {} shown: more are held", json["limit"]) } else { String::new() };
    let mut text = format!("{arrangement} [{key}]: {} rows{more} (as of {upper}", rows.len());
    if json["retained_from_minute"].is_null() {
        text.push(')');
    } else {
        text.push_str(&format!(", complete from minute {})", json["retained_from_minute"]));
    }
    if json["schema"].is_object() {
        text.push_str(&format!("\nkey: {}\nvalue: {}", plain(&json["schema"]["key"]), plain(&json["schema"]["value"])));
    }
    let filter_rows = rows.first().is_some_and(|r| r.get("ad_id").is_some());
    if filter_rows {
        text.push_str("\nminute      ad_id        campaign_id  country  user_id      ip                       count");
    } else if !rows.is_empty() {
        text.push_str(&format!("\n{:<40} {:<40} count", "key", "value"));
    }
    for r in rows {
        if filter_rows {
            text.push_str(&format!(
                "\n{:<11} {:<12} {:<12} {:<8} {:<12} {:<24} {}",
                plain(&r["minute"]),
                plain(&r["ad_id"]),
                plain(&r["campaign_id"]),
                plain(&r["country"]),
                plain(&r["user_id"]),
                plain(&r["ip"]),
                plain(&r["count"])
            ));
        } else {
            text.push_str(&format!("\n{:<40} {:<40} {}", r["key"].to_string(), r["value"].to_string(), plain(&r["count"])));
        }
    }
    text
}

fn answer(client: &Client, words: &[&str]) -> Result<String, String> {
    match words {
        ["top", rest @ ..] => {
            let (rest, country) = country(rest);
            let mut query = Vec::new();
            let mut rest = rest;
            if let ["minute", m, more @ ..] = rest {
                query.push(format!("minute={m}"));
                rest = more;
            } else if let [w, more @ ..] = rest {
                if w.ends_with('m') || w.ends_with('h') {
                    query.push(format!("window={w}"));
                    rest = more;
                }
            }
            if let [count, ..] = rest {
                query.push(format!("count={count}"));
            }
            let target = with_country(format!("/v1/ads/popular_ads?{}", query.join("&")), country);
            let json = client.get(&target)?;
            let mut text = format!(
                "top {} of minutes [{}, {}) as of watermark {} ({})\nrank  ad_id                 clicks",
                json["ads"].as_array().map_or(0, |a| a.len()),
                json["from_minute"],
                json["to_minute"],
                json["watermark"],
                json["source"].as_str().unwrap_or("")
            );
            for ad in json["ads"].as_array().into_iter().flatten() {
                text.push_str(&format!("\n{:>4}  {:<20} {:>7}", plain(&ad["rank"]), plain(&ad["ad_id"]), plain(&ad["clicks"])));
            }
            Ok(text)
        }
        ["count", ad, rest @ ..] => {
            let (rest, country) = country(rest);
            let json = client.get(&with_country(format!("/v1/ads/{ad}/aggregated_count{}", range(rest)), country))?;
            Ok(format!(
                "ad {ad}: {} clicks in minutes [{}, {}) as of watermark {}",
                json["clicks"], json["from_minute"], json["to_minute"], json["watermark"]
            ))
        }
        ["campaign", id, rest @ ..] => {
            let (rest, country) = country(rest);
            let json = client.get(&with_country(format!("/v1/campaigns/{id}/aggregated_count{}", range(rest)), country))?;
            Ok(format!(
                "campaign {id}: {} clicks in minutes [{}, {}) as of watermark {}",
                json["clicks"], json["from_minute"], json["to_minute"], json["watermark"]
            ))
        }
        ["history", ad, minute] => {
            let json = client.get(&format!("/v1/ads/{ad}/history?minute={minute}"))?;
            let mut text = format!("ad {ad}, minute {minute}: {} clicks now\ntime            clicks  diff", json["clicks"]);
            for u in json["updates"].as_array().into_iter().flatten() {
                text.push_str(&format!("\n{:<15} {:>6}  {:>+4}", plain(&u["time"]), plain(&u["clicks"]), u["diff"].as_i64().unwrap_or(0)));
            }
            Ok(text)
        }
        ["watermark"] => {
            let json = client.get("/v1/status")?;
            Ok(format!(
                "watermark {} (minute {}){}",
                json["watermark"],
                json["as_of_minute"],
                if json["complete"] == Value::Bool(true) { ", replay complete" } else { "" }
            ))
        }
        ["partitions"] => {
            // A file's lag is in bytes, a topic partition's in messages.
            let lag_of = |p: &Value| match (&p["lag_bytes"], &p["lag_messages"]) {
                (Value::Number(bytes), _) => format!("{bytes} B"),
                (_, Value::Number(messages)) => format!("{messages} msg"),
                _ => "-".to_string(),
            };
            let json = client.get("/v1/status")?;
            let mut text = "partition         offset     lag        max_ts         lines     accepted  late    too_late  malformed".to_string();
            for p in json["partitions"].as_array().into_iter().flatten() {
                text.push_str(&format!(
                    "\n{:<17} {:<10} {:<10} {:<14} {:<9} {:<9} {:<7} {:<9} {}",
                    plain(&p["partition"]),
                    plain(&p["offset"]),
                    lag_of(p),
                    plain(&p["max_ts"]),
                    plain(&p["lines"]),
                    plain(&p["accepted"]),
                    plain(&p["late"]),
                    plain(&p["too_late"]),
                    plain(&p["malformed"])
                ));
            }
            Ok(text)
        }
        ["arrangements"] => {
            let json = client.get("/v1/introspection/arrangements")?;
            let held = if json["dataflow_complete"] == Value::Bool(true) {
                "the replay is complete: only the filter arrangements are still held".to_string()
            } else {
                format!("compacted to the dataflow's frontier {}", json["compacted_to"])
            };
            let mut text = format!(
                "arrangements as of watermark {} ({held})\n{:<34} {:>10} {:<20} {:>8}  key -> value",
                json["watermark"], "name", "records", "per worker", "batches"
            );
            for a in json["arrangements"].as_array().into_iter().flatten() {
                text.push_str(&format!(
                    "\n{:<34} {:>10} {:<20} {:>8}  {} -> {}",
                    plain(&a["name"]),
                    plain(&a["records"]),
                    per_worker(&a["records_per_worker"]),
                    plain(&a["batches"]),
                    plain(&a["key"]),
                    plain(&a["value"])
                ));
            }
            Ok(text)
        }
        ["dataflow"] => dataflow(&client.get("/v1/introspection/dataflow")?),
        ["peek", rest @ ..] => {
            let (arrangement, key, limit) = peek_words(rest).ok_or("peek ARRANGEMENT [KEY] [limit N]")?;
            let limit = limit.map_or(String::new(), |n| format!("&limit={}", encode(n)));
            let target = format!("/v1/introspection/peek?arrangement={}&key={}{limit}", encode(&arrangement), encode(key));
            Ok(peek(&arrangement, key, &client.get(&target)?))
        }
        ["status"] => client.get("/v1/status").map(|j| serde_json::to_string_pretty(&j).unwrap_or_default()),
        ["get", path] => client.get(path).map(|j| serde_json::to_string_pretty(&j).unwrap_or_default()),
        [other, ..] => Err(format!("unknown command {other:?}; type help")),
        [] => Ok(String::new()),
    }
}
