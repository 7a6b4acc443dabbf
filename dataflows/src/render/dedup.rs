//! De-duplication of retried deliveries (SPEC §2 "Duplicates").

use std::hash::Hash;

use differential_dataflow::collection::AsCollection;
use differential_dataflow::trace::cursor::cursor_list;
use differential_dataflow::trace::{Cursor, TraceReader};
use differential_dataflow::{ExchangeData, VecCollection};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::CapabilitySet;
use timely::progress::Antichain;

use crate::types::{Click, ClickAttrs, ClickKey, Time};

/// One record per distinct `(event_id, ts)`: the copy with the smallest attributes.
///
/// At every time the output holds, for each click with at least one visible copy, the minimum
/// of the visible copies; so a click counts from its earliest visible copy on, and a smaller
/// copy arriving later moves the count (a retraction and a restatement downstream).
pub fn distinct_clicks<'scope>(
    deliveries: VecCollection<'scope, Time, Click>,
) -> VecCollection<'scope, Time, (ClickKey, ClickAttrs)> {
    smallest_per_key("DistinctClicks", deliveries.map(|click| (click.key, click.attrs)))
}

/// For each key, its smallest value with positive multiplicity: what `reduce` with
/// `output.push((input[0].0, 1))` computes, for totally ordered times.
///
/// `reduce` keeps an arrangement of its output to compare against; with totally ordered
/// times the previous answer can be recomputed from the input arrangement alone (as
/// `count_total` does), which halves the state of de-duplication, where nearly every key is a
/// single click. Output is `(key, value)` with `-1` for the value that stops being the
/// smallest and `+1` for the one that starts, at the time that happens.
pub fn smallest_per_key<'scope, K, V>(
    name: &str,
    updates: VecCollection<'scope, Time, (K, V)>,
) -> VecCollection<'scope, Time, (K, V)>
where
    K: ExchangeData + Hash,
    V: ExchangeData,
{
    let arranged = updates.arrange_by_key_named(&format!("Arrange: {name}"));
    let mut trace = arranged.trace.clone();
    arranged
        .stream
        .unary_frontier(Pipeline, name, move |_, _| {
            // The times of the batches received so far: [lower, upper).
            let mut lower_limit = Antichain::from_elem(0);
            let mut upper_limit = Antichain::from_elem(0);
            // Accumulated values of the current key, sorted, all non-zero.
            let mut values: Vec<(V, isize)> = Vec::new();
            let mut changes: Vec<(Time, V, isize)> = Vec::new();

            move |(input, _frontier), output| {
                let mut batches = Vec::new();
                lower_limit.clone_from(&upper_limit);
                let mut caps = CapabilitySet::new();
                input.for_each(|capability, received| {
                    for capability in capability.retain_stamp(0).iter() {
                        caps.insert(capability.clone());
                    }
                    for batch in received.drain(..) {
                        upper_limit.clone_from(batch.upper()); // batches arrive in order
                        batches.push(batch);
                    }
                });

                if !caps.is_empty() {
                    let mut session = output.session(&caps);
                    let (mut batch_cursor, batch_storage) =
                        cursor_list(batches.into_iter().filter_map(|b| b.inner).collect());
                    let (mut trace_cursor, trace_storage) =
                        cursor_list(trace.batches_through(lower_limit.borrow()).expect("trace compacted too far"));

                    while let Some(key) = batch_cursor.get_key(&batch_storage) {
                        values.clear();
                        trace_cursor.seek_key(&trace_storage, key);
                        if trace_cursor.get_key(&trace_storage) == Some(key) {
                            while let Some(value) = trace_cursor.get_val(&trace_storage) {
                                let mut count = 0isize;
                                trace_cursor.map_times(&trace_storage, |_, diff| count += *diff);
                                if count != 0 {
                                    values.push((value.clone(), count));
                                }
                                trace_cursor.step_val(&trace_storage);
                            }
                        }
                        changes.clear();
                        while let Some(value) = batch_cursor.get_val(&batch_storage) {
                            batch_cursor.map_times(&batch_storage, |time, diff| changes.push((*time, value.clone(), *diff)));
                            batch_cursor.step_val(&batch_storage);
                        }
                        changes.sort_by_key(|change| change.0);

                        let mut next = 0;
                        while next < changes.len() {
                            let time = changes[next].0;
                            let before = smallest(&values).cloned();
                            while next < changes.len() && changes[next].0 == time {
                                let (_, value, diff) = &changes[next];
                                match values.binary_search_by(|(v, _)| v.cmp(value)) {
                                    Ok(at) => {
                                        values[at].1 += diff;
                                        if values[at].1 == 0 {
                                            values.remove(at);
                                        }
                                    }
                                    Err(at) => values.insert(at, (value.clone(), *diff)),
                                }
                                next += 1;
                            }
                            let after = smallest(&values);
                            if before.as_ref() != after {
                                if let Some(old) = before {
                                    session.give(((key.clone(), old), time, -1));
                                }
                                if let Some(new) = after {
                                    session.give(((key.clone(), new.clone()), time, 1));
                                }
                            }
                        }
                        batch_cursor.step_key(&batch_storage);
                    }
                }

                // The arrangement only ever needs to be read as of the current lower limit.
                trace.advance_upper(&mut upper_limit);
                trace.set_logical_compaction(upper_limit.borrow());
                trace.set_physical_compaction(upper_limit.borrow());
            }
        })
        .as_collection()
}

/// The smallest value with positive multiplicity.
fn smallest<V>(values: &[(V, isize)]) -> Option<&V> {
    values.iter().find(|(_, count)| *count > 0).map(|(value, _)| value)
}
