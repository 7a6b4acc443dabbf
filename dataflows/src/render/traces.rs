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
//!
//! Tested with the top K it serves (`topk.rs`: the registry's rows against the reference, and
//! the trace gone with its dataflow).

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
