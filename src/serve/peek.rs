//! Peeks: a query with an `ip` or `user_id` filter reads the one key it needs from the
//! arrangements of every worker (`Arrange: ClicksByIp`, `Arrange: ClicksByUser`); introspection
//! reads the first rows of any arrangement `/v1/introspection/arrangements` lists, by that name:
//! the per-minute state and differential's own traces register themselves ([`peekable`]).
//!
//! A peek travels through a small timely dataflow of its own, as Materialize sends commands
//! to its workers: worker 0 gives it a timestamp (a sequence number) and broadcasts it; every
//! worker, in every process, reads its own part of the arrangement and sends what it holds back
//! to worker 0; once the peek dataflow's frontier passes that timestamp, timely's progress
//! tracking says every worker has answered, and worker 0 replies to the server.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Value};

use clickagg_dataflows::render::filters::{FilterArrangements, FilterKey, PeekResult};
use clickagg_dataflows::render::peekable::{self, StateRows};
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::Input;
use timely::dataflow::InputHandle;
use timely::worker::Worker;

use super::params::{bad, parse_id, Failure, Params};
use crate::introspect::SharedIntrospection;
use crate::source::parse::parse_ip;

/// What to look up.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum PeekKey {
    /// One key of the filter arrangements: every row held for it.
    Filter(FilterKey),
    /// The first `limit` rows of the per-minute state named `name` (as introspection lists it)
    /// whose key begins with the fields `prefix`.
    State { name: String, prefix: Vec<String>, limit: usize },
}

/// What the workers hold for a [`PeekKey`]: `filter` for a filter key, `state` for a state's.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PeekAnswer {
    pub filter: PeekResult,
    pub state: StateRows,
    /// The state rows asked for; `state` keeps one more, to tell that there are more.
    pub limit: usize,
}

impl PeekAnswer {
    /// Adds another worker's answer.
    fn merge(&mut self, part: PeekAnswer) {
        self.limit = self.limit.max(part.limit);
        self.filter.merge(part.filter);
        self.state.merge(part.state, self.limit);
    }
}

/// Rows a peek gives when the request names no limit, and the most it may ask for.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;

/// `GET /v1/introspection/peek?arrangement=NAME&key=FIELDS[&limit=N]`: the first N rows (in key
/// order, then value order) that an arrangement holds for a key, over all workers, and whether
/// there are more. The filter arrangements (`ClicksByIp`, `ClicksByUser`) take one ip or
/// user_id, or nothing for their first rows; any other takes the first fields of its key,
/// comma-separated (`minute` or `minute,ad_id` for `AdMinute`), or nothing for its first rows.
///
/// `NAME` is a name the arrangements listing gives; `Arrange: X` may also be written `Arrange:X`,
/// or `X` when no other arrangement is named `X`. An unknown name is a 404 listing the names; an
/// arrangement whose trace the dataflow has dropped (after a replay completes) is a 410 that says
/// so, never an empty answer.
pub fn answer(params: &Params, peeks: &Peeks, introspection: &SharedIntrospection) -> Result<Value, Failure> {
    params.only(&["arrangement", "key", "limit"])?;
    let given = params.get("arrangement").ok_or_else(|| bad("peek needs arrangement= (a name /v1/introspection/arrangements lists)"))?;
    let spelled = spelled_out(given);
    let name = spelled.as_str();
    let text = params.get("key").unwrap_or("");
    let limit = match params.get("limit") {
        None => DEFAULT_LIMIT,
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| bad(format!("limit must be a whole number from 1 to {MAX_LIMIT}, not {n:?}")))?,
    };
    let short = name.strip_prefix("Arrange: ").unwrap_or(name);
    let (key, value) = clickagg_dataflows::render::arrangement_schema(name).unwrap_or(("?", "?"));
    let schema = json!({ "key": key, "value": value });
    // With a key, the filter arrangements are read at that key; without one, like any other.
    let filter_key = match short {
        _ if text.trim().is_empty() => None,
        "ClicksByIp" => Some(FilterKey::Ip(parse_ip(text.as_bytes()).ok_or_else(|| bad(format!("{text:?} is not an ip")))?)),
        "ClicksByUser" => Some(FilterKey::User(parse_id(text, "user_id")?)),
        _ => None,
    };
    if let Some(filter_key) = filter_key {
        let answer = peeks.filter(filter_key).map_err(|e| Failure(503, e))?;
        let mut rows = answer.rows;
        rows.sort();
        let more = rows.len() > limit;
        let rows: Vec<Value> = rows
            .iter()
            .take(limit)
            .map(|(r, n)| {
                json!({
                    "minute": r.minute, "ad_id": r.ad, "campaign_id": r.campaign, "country": r.country.to_string(),
                    "user_id": r.user, "ip": r.ip.to_string(), "count": n,
                })
            })
            .collect();
        return Ok(json!({
            "arrangement": name, "key": text, "schema": schema, "rows": rows, "limit": limit, "more": more,
            "upper": answer.upper, "retained_from_minute": answer.retained_from,
        }));
    }
    let prefix: Vec<String> = text.split(',').map(str::trim).filter(|f| !f.is_empty()).map(String::from).collect();
    let listed = listed_names(introspection);
    let (name, answer) = peek_named(peeks, name, &listed, prefix, limit)?;
    if let Some(why) = answer.state.unreadable {
        return Err(Failure(410, format!("{name} cannot be peeked: {why}")));
    }
    let mut rows = answer.state.rows;
    let more = rows.len() > limit;
    rows.truncate(limit);
    let rows: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            let parse = |text: &str| serde_json::from_str::<Value>(text).unwrap_or(Value::Null);
            json!({ "key": parse(&r.key), "value": parse(&r.value), "count": r.count })
        })
        .collect();
    // Each worker's state as it holds it when the peek reaches it: no frontier is claimed.
    Ok(json!({ "arrangement": name, "key": text, "schema": schema, "rows": rows, "limit": limit, "more": more }))
}

/// `Arrange:X` (as a shell user may type it, without the space) as the listing spells it.
fn spelled_out(name: &str) -> String {
    match name.strip_prefix("Arrange:") {
        Some(rest) => format!("Arrange: {}", rest.trim()),
        None => name.trim().to_string(),
    }
}

/// The names `/v1/introspection/arrangements` lists, in its order (empty without introspection).
fn listed_names(introspection: &SharedIntrospection) -> Vec<String> {
    let operators = introspection.lock().map(|i| i.summary()).unwrap_or_default();
    let mut names: Vec<String> = Vec::new();
    for op in operators.into_iter().filter(|op| op.total.arranges) {
        if !names.contains(&op.total.name) {
            names.push(op.total.name);
        }
    }
    names
}

/// Peeks at the state registered under `name`, or under `Arrange: {name}` when only that is
/// listed: the name it was found under and every worker's rows. A name that is neither listed
/// nor registered is a 404 that lists the names.
fn peek_named(peeks: &Peeks, name: &str, listed: &[String], prefix: Vec<String>, limit: usize) -> Result<(String, PeekAnswer), Failure> {
    let prefixed = format!("Arrange: {name}");
    let mut candidates = vec![name.to_string()];
    if !name.starts_with("Arrange: ") && !listed.iter().any(|l| l == name) {
        candidates.push(prefixed);
    }
    for candidate in candidates {
        let key = PeekKey::State { name: candidate.clone(), prefix: prefix.clone(), limit };
        let answer = peeks.any(key).map_err(|e| Failure(503, e))?;
        if answer.state.found {
            return Ok((candidate, answer));
        }
    }
    if listed.iter().any(|l| *l == name || l.strip_prefix("Arrange: ") == Some(name)) {
        // Every arrangement the dataflow builds registers itself; this is a defect, said plainly.
        return Err(Failure(500, format!("{name} is listed but no worker registered it for peeks")));
    }
    Err(Failure(404, format!("no arrangement is named {name:?}; the arrangements are: {}", listed.join(", "))))
}

/// How long a peek waits for the workers.
const PEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's end of the peek dataflow: where peeks go to the workers.
#[derive(Default)]
pub struct Peeks {
    sender: Mutex<Option<Sender<PeekRequest>>>,
}

impl Peeks {
    /// Creates the channel peeks travel on; worker 0 takes the receiving end.
    pub fn channel(&self) -> Receiver<PeekRequest> {
        let (sender, receiver) = std::sync::mpsc::channel();
        if let Ok(mut peeks) = self.sender.lock() {
            *peeks = Some(sender);
        }
        receiver
    }

    /// Reads `key` from every worker's filter arrangements.
    pub fn filter(&self, key: FilterKey) -> Result<PeekResult, String> {
        self.any(PeekKey::Filter(key)).map(|answer| answer.filter)
    }

    /// Asks every worker for what it holds under `key`, and waits for all of their answers.
    pub fn any(&self, key: PeekKey) -> Result<PeekAnswer, String> {
        let sender = self.sender.lock().ok().and_then(|p| p.clone()).ok_or("peeks are not served here")?;
        let (reply, answer) = std::sync::mpsc::channel();
        sender.send(PeekRequest { key, reply }).map_err(|_| "the workers have stopped".to_string())?;
        answer
            .recv_timeout(PEEK_TIMEOUT)
            .map_err(|_| format!("the workers did not answer within {}", humantime::format_duration(PEEK_TIMEOUT)))
    }
}

/// A peek from the server, and where to send its answer.
pub struct PeekRequest {
    pub key: PeekKey,
    /// Every worker's [`PeekAnswer`] for the key, merged.
    pub reply: Sender<PeekAnswer>,
}

type Pending = Rc<RefCell<BTreeMap<u64, (Option<Sender<PeekAnswer>>, PeekAnswer)>>>;

/// The peek dataflow's input: `(peek id, what to look up)`.
type PeekInput = InputHandle<u64, CapacityContainerBuilder<Vec<(u64, PeekKey)>>>;

/// A worker's end of the peek dataflow.
pub struct PeekEndpoint {
    /// Worker 0 only: where peeks come in, and the dataflow's input.
    input: Option<(Receiver<PeekRequest>, PeekInput)>,
    pending: Pending,
    filters: Rc<RefCell<FilterArrangements>>,
    next: u64,
}

/// Builds the peek dataflow on this worker. Worker 0 passes the server's requests; the other
/// workers close their input at once, so that only worker 0's holds the frontier.
pub fn build(worker: &mut Worker, filters: Rc<RefCell<FilterArrangements>>, requests: Option<Receiver<PeekRequest>>) -> PeekEndpoint {
    let pending: Pending = Rc::new(RefCell::new(BTreeMap::new()));
    let collected = Rc::clone(&pending);
    let reader = Rc::clone(&filters);
    let input = worker.dataflow::<u64, _, _>(|scope| {
        let (input, peeks) = scope.new_input::<Vec<(u64, PeekKey)>>();
        peeks
            .broadcast()
            .unary(Pipeline, "Peek", move |_, _| {
                move |input, output| {
                    input.for_each(|capability, peeks| {
                        let mut session = output.session(&capability);
                        for (id, key) in peeks.drain(..) {
                            let answer = match key {
                                PeekKey::Filter(key) => PeekAnswer { filter: reader.borrow_mut().peek(key), ..PeekAnswer::default() },
                                PeekKey::State { name, prefix, limit } => {
                                    PeekAnswer { state: peekable::peek(&name, &prefix, limit), limit, ..PeekAnswer::default() }
                                }
                            };
                            session.give((id, answer));
                        }
                    });
                }
            })
            .sink(Exchange::new(|_: &(u64, PeekAnswer)| 0), "PeekReplies", move |(input, frontier)| {
                let mut pending = collected.borrow_mut();
                input.for_each(|_, parts| {
                    for (id, part) in parts.drain(..) {
                        pending.entry(id).or_default().1.merge(part);
                    }
                });
                // Every worker has answered the peeks the frontier has passed.
                while let Some(entry) = pending.first_entry() {
                    if frontier.less_equal(entry.key()) {
                        break;
                    }
                    let (reply, answer) = entry.remove();
                    if let Some(reply) = reply {
                        let _ = reply.send(answer);
                    }
                }
            });
        input
    });
    let input = match requests {
        Some(requests) => Some((requests, input)),
        None => {
            drop(input);
            None
        }
    };
    PeekEndpoint { input, pending, filters, next: 0 }
}

impl PeekEndpoint {
    /// Takes the server's new peeks into the dataflow (worker 0), and lets the arrangements
    /// compact what no peek can need. Call it often.
    pub fn poll(&mut self) {
        if let Some((requests, input)) = &mut self.input {
            while let Ok(request) = requests.try_recv() {
                let id = self.next;
                self.pending.borrow_mut().entry(id).or_default().0 = Some(request.reply);
                input.send((id, request.key));
                self.next += 1;
                input.advance_to(self.next);
            }
        }
        self.filters.borrow_mut().allow_compaction();
    }
}
