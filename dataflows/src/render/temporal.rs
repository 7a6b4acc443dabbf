//! Temporal operators: updates that undo themselves at a time computed from their data, the
//! "retract later" idiom of Materialize's temporal filters.

use std::collections::BTreeMap;

use differential_dataflow::collection::AsCollection;
use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;

use crate::types::Time;

/// For each update `(d, t, r)` and each `(e, from, until, w)` that `logic(&d, t)` yields, emits
/// `(e, max(t, from), w·r)` and `(e, max(t, from, until), -w·r)`: `e` is in the output from
/// `max(t, from)` until `until` (never, when it would enter at or after `until`).
///
/// The retractions are held here, by time, and sent only once the input frontier reaches their
/// time. Sent at once, they would wait in the next arrangement's batcher, which re-sorts every
/// update it holds back each time it seals a batch: with minutes of retractions pending, that
/// was a third of a replay's time. Times are coarse (ticks), so few capabilities are held. An
/// update postponed by `from` is held the same way, and for the same reason: postponing to a
/// coarser time lets an expensive downstream operator (a sliding window's count) run once per
/// coarse time instead of once per tick.
///
/// `logic` must be a pure function of its arguments, so that every worker count gives the same
/// updates.
pub fn expiring_from<'scope, D, D2, I, L>(name: &str, input: VecCollection<'scope, Time, D>, logic: L) -> VecCollection<'scope, Time, D2>
where
    D: Clone + 'static,
    D2: Ord + Clone + 'static,
    I: IntoIterator<Item = (D2, Time, Time, isize)>,
    L: FnMut(&D, Time) -> I + 'static,
{
    render_expiring(name, input, logic, true, None)
}

/// As [`expiring_from`] with every `e` entering at `t`, so that `logic` yields `(e, until, w)`,
/// except that retractions still held when the input ends are dropped, not sent: the output
/// keeps what it held at the last frontier, for reading after a replay. The last input frontier
/// seen is recorded in `observed`.
pub fn expiring_observed<'scope, D, D2, I, L>(
    name: &str,
    input: VecCollection<'scope, Time, D>,
    logic: L,
    observed: std::rc::Rc<std::cell::Cell<Option<Time>>>,
) -> VecCollection<'scope, Time, D2>
where
    D: Clone + 'static,
    D2: Ord + Clone + 'static,
    I: IntoIterator<Item = (D2, Time, isize)>,
    L: FnMut(&D, Time) -> I + 'static,
{
    let mut logic = logic;
    render_expiring(name, input, move |d: &D, t| logic(d, t).into_iter().map(move |(e, expiry, w)| (e, t, expiry, w)), false, Some(observed))
}

/// What is held for one release time: its capability, the updates, and how many there were
/// after the last consolidation.
type Held<D2> = (Capability<Time>, Vec<(D2, Time, isize)>, usize);

fn render_expiring<'scope, D, D2, I, L>(
    name: &str,
    input: VecCollection<'scope, Time, D>,
    mut logic: L,
    release_at_end: bool,
    observed: Option<std::rc::Rc<std::cell::Cell<Option<Time>>>>,
) -> VecCollection<'scope, Time, D2>
where
    D: Clone + 'static,
    D2: Ord + Clone + 'static,
    I: IntoIterator<Item = (D2, Time, Time, isize)>,
    L: FnMut(&D, Time) -> I + 'static,
{
    input
        .inner
        .unary_frontier(Pipeline, name, move |_, _| {
            // A count that changes every tick is held as `-old`, `+new` pairs that telescope:
            // consolidating when the updates double keeps a minute's worth of them from piling
            // up and arriving at once.
            let mut held: BTreeMap<Time, Held<D2>> = BTreeMap::new();
            move |(input, frontier), output| {
                input.for_each(|capability, data| {
                    let mut session = output.session(&capability);
                    let mut hold = |update: (D2, Time, isize)| match held.get_mut(&update.1) {
                        Some((_, pending, consolidated)) => {
                            pending.push(update);
                            if pending.len() >= 2 * *consolidated {
                                differential_dataflow::consolidation::consolidate_updates(pending);
                                *consolidated = pending.len().max(1024);
                            }
                        }
                        None => {
                            let cap = capability.delayed(&update.1, 0);
                            held.insert(update.1, (cap, vec![update], 1024));
                        }
                    };
                    for (datum, time, diff) in data.drain(..) {
                        for (out, from, until, weight) in logic(&datum, time) {
                            let from = time.max(from);
                            let until = from.max(until);
                            if from == time {
                                session.give((out.clone(), time, diff * weight));
                            } else {
                                hold((out.clone(), from, diff * weight));
                            }
                            hold((out, until, -diff * weight));
                        }
                    }
                });
                let current = frontier.frontier().first().copied();
                if let (Some(observed), Some(time)) = (&observed, current) {
                    observed.set(Some(time));
                }
                if current.is_none() && !release_at_end {
                    held.clear();
                }
                // Release what is due: nothing earlier than the input frontier can still arrive.
                while let Some(entry) = held.first_entry() {
                    if frontier.frontier().first().is_some_and(|f| f < entry.key()) {
                        break;
                    }
                    let (capability, mut pending, _) = entry.remove();
                    output.session(&capability).give_container(&mut pending);
                }
            }
        })
        .as_collection()
}
