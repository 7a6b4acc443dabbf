//! Peeks: a query with an `ip` or `user_id` filter reads the one key it needs from the
//! arrangements of every worker (`Arrange: ClicksByIp`, `Arrange: ClicksByUser`).
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

use clickagg_dataflows::render::filters::{FilterArrangements, FilterKey, PeekResult};
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::Input;
use timely::dataflow::InputHandle;
use timely::worker::Worker;

/// A peek from the server, and where to send its answer.
pub struct PeekRequest {
    pub key: FilterKey,
    /// Every worker's [`PeekResult`] for the key, merged.
    pub reply: Sender<PeekResult>,
}

type Pending = Rc<RefCell<BTreeMap<u64, (Option<Sender<PeekResult>>, PeekResult)>>>;

/// The peek dataflow's input: `(peek id, what to look up)`.
type PeekInput = InputHandle<u64, CapacityContainerBuilder<Vec<(u64, FilterKey)>>>;

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
        let (input, peeks) = scope.new_input::<Vec<(u64, FilterKey)>>();
        peeks
            .broadcast()
            .unary(Pipeline, "Peek", move |_, _| {
                move |input, output| {
                    input.for_each(|capability, peeks| {
                        let mut session = output.session(&capability);
                        for (id, key) in peeks.drain(..) {
                            session.give((id, reader.borrow_mut().peek(key)));
                        }
                    });
                }
            })
            .sink(Exchange::new(|_: &(u64, PeekResult)| 0), "PeekReplies", move |(input, frontier)| {
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
