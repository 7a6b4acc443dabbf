//! Peeks at differential's own arrangements (an `arrange`'s trace, a `reduce`'s output), by the
//! operator name introspection lists them under: [`register_trace`] makes a trace peekable on the
//! worker that builds it, beside the per-minute state of [`super::peekable`].
//!
//! # Why no trace handle is held
//!
//! A [`TraceAgent`] is a read capability: while one exists, the trace may not compact past that
//! handle's logical compaction frontier, and the spine is not freed. A peekable that cloned the
//! agent would have to advance its frontiers after the dataflow's own handles on every step
//! (or read through `import`, a dataflow of its own per arrangement), and would still keep the
//! trace alive after the dataflow has finished with it. Instead the registry keeps only a
//! [`Weak`] reference to the trace's shared box: it never takes part in the compaction frontiers
//! (the operators that read the trace alone decide them), and the trace is freed exactly when
//! the dataflow drops its last handle, as if it were not peekable at all. A follower running for
//! months therefore holds no more than it would without peeks.
//!
//! A peek reads every batch the trace holds (`map_spans`, which takes `&self` and so changes no
//! frontier), merges them with a cursor list, and sums each `(key, value)`'s differences over
//! every time: the accumulation over all times, which logical compaction does not change. Every
//! update in a sealed batch is at a time before the trace's upper, so the rows are the
//! arrangement's collection as of the last time it has completed on this worker. The peek runs on
//! the worker between operator invocations, so no borrow of the trace is outstanding then.

use std::cell::RefCell;
use std::rc::{Rc, Weak};

use differential_dataflow::operators::arrange::TraceAgent;
use differential_dataflow::trace::cursor::cursor_list;
use differential_dataflow::trace::{BatchCursor, Cursor, Navigable, TraceReader};
use serde::Serialize;

use super::peekable::{register, FirstRows, Peekable};
use crate::types::Time;

/// Why a registered trace can no longer be read: the dataflow has dropped it.
pub const DROPPED: &str = "its trace was dropped when the dataflow finished with it (after a replay completes, \
                           only the filter arrangements are kept)";

/// A trace, read without a handle (see the module's documentation).
struct WeakTrace<F>(F);

impl<F: Fn(&mut FirstRows) -> Result<(), String>> Peekable for WeakTrace<F> {
    fn peek(&self, rows: &mut FirstRows) -> Result<(), String> {
        (self.0)(rows)
    }
}

/// Makes the trace behind `trace` peekable under `name` on this worker, keyed by `K` with values
/// `V` and integer differences: a peek offers each `(key, value)` whose differences sum to
/// non-zero, with that sum as its count. Holds no handle: the trace compacts and is dropped as if
/// it were not registered.
pub fn register_trace<Tr, K, V>(name: &str, trace: &TraceAgent<Tr>)
where
    Tr: TraceReader<Time = Time> + 'static,
    Tr::Batch: Navigable,
    for<'a> BatchCursor<Tr>: Cursor<Key<'a> = &'a K, Val<'a> = &'a V, DiffGat<'a> = &'a isize>,
    K: Serialize + 'static,
    V: Serialize + 'static,
{
    let held: Weak<RefCell<_>> = Rc::downgrade(&trace.trace_box_unstable());
    register(
        name,
        Rc::new(WeakTrace(move |rows: &mut FirstRows| {
            let trace = held.upgrade().ok_or_else(|| DROPPED.to_string())?;
            let trace = trace.borrow();
            let mut batches = Vec::new();
            trace.trace().map_spans(|span| batches.extend(span.inner.clone()));
            offer_batches::<Tr::Batch, K, V>(batches, rows);
            Ok(())
        })),
    );
}

/// Offers every `(key, value)` of `batches` whose differences, summed over all times and
/// batches, are not zero.
fn offer_batches<B, K, V>(batches: Vec<B>, rows: &mut FirstRows)
where
    B: Navigable,
    for<'a> B::Cursor: Cursor<Key<'a> = &'a K, Val<'a> = &'a V, DiffGat<'a> = &'a isize>,
    K: Serialize,
    V: Serialize,
{
    let (mut cursor, storage) = cursor_list(batches);
    while let Some(key) = cursor.get_key(&storage) {
        // One test of the key against the prefix for all of its values.
        if rows.key_may_match(key) {
            while let Some(value) = cursor.get_val(&storage) {
                let mut count = 0isize;
                cursor.map_times(&storage, |_, diff| count += *diff);
                if count != 0 {
                    rows.offer(key, value, count);
                }
                cursor.step_val(&storage);
            }
        }
        cursor.step_key(&storage);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use differential_dataflow::input::Input;
    use timely::dataflow::operators::Probe;

    use crate::render::peekable;
    use crate::render::testing::{minute_updates, reference_top_k, rules_and_workers};
    use crate::render::topk::top_k_per_minute;
    use crate::render::partition::ByAd;
    use crate::types::{Minute, Time};

    /// Peeks at `name` on every worker after each time of `updates` is complete, and merges the
    /// workers' rows, as the server's peek does: `(time, prefix, rows)` per peek.
    type Peeked = Vec<(Time, Vec<String>, peekable::StateRows)>;

    fn peek_top_minute(workers: usize, updates: Vec<((Minute, u64), Time, isize)>, rules: crate::event_time::EventTimeRules, k: usize, name: &'static str) -> Peeked {
        let times: Vec<Time> = updates.iter().map(|(_, t, _)| *t).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let peeked = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<(Time, Vec<String>), peekable::StateRows>::new()));
        let shared = std::sync::Arc::clone(&peeked);
        let dropped_after = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let dropped = std::sync::Arc::clone(&dropped_after);
        timely::execute(timely::Config::process(workers), move |worker| {
            let (mut input, probe) = worker.dataflow::<Time, _, _>(|scope| {
                let (input, clicks) = scope.new_collection::<(Minute, u64), isize>();
                let top = top_k_per_minute("TopMinute", ByAd::exchange(crate::render::testing::scattered(clicks)), k, &rules);
                (input, top.inner.probe().0)
            });
            let mut at = 0;
            for &time in &times {
                if worker.index() == 0 {
                    input.advance_to(time);
                    while at < updates.len() && updates[at].1 == time {
                        input.update(updates[at].0, updates[at].2);
                        at += 1;
                    }
                }
                input.advance_to(time + 1);
                input.flush();
                while probe.less_than(&(time + 1)) {
                    worker.step();
                }
                // Each worker's peek at a minute that exists and at a minute prefix and none.
                let minute = (time / crate::types::MINUTE_MS) as Minute;
                for prefix in [vec![], vec![minute.to_string()], vec![(minute + 1000).to_string()]] {
                    let rows = peekable::peek(name, &prefix, 3);
                    let mut all = shared.lock().unwrap();
                    all.entry((time, prefix)).or_default().merge(rows, 3);
                }
            }
            input.close();
            while worker.step() {}
            // The dataflow is gone, and with it the trace: the registry never held it.
            dropped.lock().unwrap().push(peekable::peek(name, &[], 3));
        })
        .unwrap();
        for after in dropped_after.lock().unwrap().iter() {
            assert!(after.found && after.rows.is_empty() && after.unreadable.as_deref() == Some(super::DROPPED), "{after:?}");
        }
        assert_eq!(dropped_after.lock().unwrap().len(), workers);
        let peeked = peeked.lock().unwrap();
        peeked.iter().map(|((t, p), rows)| (*t, p.clone(), rows.clone())).collect()
    }

    /// The global top K of each minute at `time`, as `(minute, rank)` rows, from scratch.
    fn reference_rows(updates: &[((Minute, u64), Time, isize)], time: Time, k: usize) -> Vec<(String, String, isize)> {
        let mut counts = BTreeMap::new();
        for (key, _, diff) in updates.iter().filter(|(_, t, _)| *t <= time) {
            *counts.entry(*key).or_insert(0) += diff;
        }
        counts.retain(|_, c| *c != 0);
        // In key order, then value (rank) order.
        let mut top: Vec<(Minute, (u64, u64), isize)> =
            reference_top_k(&counts, k).into_iter().map(|((minute, (ad, clicks)), count)| (minute, (u64::MAX - clicks, ad), count)).collect();
        top.sort();
        top.into_iter().map(|(minute, rank, count)| (minute.to_string(), serde_json::to_string(&rank).unwrap(), count)).collect()
    }

    #[test]
    fn peeks_at_the_top_k_trace_match_a_reference_at_every_time() {
        for (rules, workers) in rules_and_workers() {
            let updates = minute_updates(11, 400, &rules);
            let k = 3;
            let peeked = peek_top_minute(workers, updates.clone(), rules, k, "TopMinute");
            assert!(!peeked.is_empty());
            for (time, prefix, rows) in peeked {
                assert!(rows.found, "TopMinute is registered");
                let expected: Vec<(String, String, isize)> = reference_rows(&updates, time, k)
                    .into_iter()
                    .filter(|(minute, _, _)| prefix.first().is_none_or(|p| p == minute))
                    .collect();
                let got: Vec<(String, String, isize)> = rows.rows.iter().map(|r| (r.key.clone(), r.value.clone(), r.count)).collect();
                // The first `limit + 1` rows in key order, and no more.
                assert_eq!(got, expected[..expected.len().min(4)], "{workers} workers, time {time}, prefix {prefix:?}");
            }
        }
    }
}
