//! Temporal operators: updates that undo themselves at a time computed from their data, the
//! "retract later" idiom of Materialize's temporal filters. Future retractions wait in the
//! arrangements' batchers until their time comes, so coarse times keep them few.

use differential_dataflow::collection::AsCollection;
use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;

use crate::types::Time;

/// For each update `(d, t, r)` and each `(e, expiry, w)` that `logic(&d, t)` yields, emits
/// `(e, t, w·r)` and `(e, max(t, expiry), -w·r)`: `e` is in the output from `t` until `expiry`
/// (never, when it arrives at or after `expiry`).
///
/// `logic` must be a pure function of its arguments, so that every worker count gives the same
/// updates.
pub fn expiring<'scope, D, D2, I, L>(name: &str, input: VecCollection<'scope, Time, D>, mut logic: L) -> VecCollection<'scope, Time, D2>
where
    D: Clone + 'static,
    D2: Clone + 'static,
    I: IntoIterator<Item = (D2, Time, isize)>,
    L: FnMut(&D, Time) -> I + 'static,
{
    input
        .inner
        .unary(Pipeline, name, move |_, _| {
            move |input, output| {
                input.for_each(|capability, data| {
                    let mut session = output.session(&capability);
                    for (datum, time, diff) in data.drain(..) {
                        for (out, expiry, weight) in logic(&datum, time) {
                            session.give((out.clone(), time, diff * weight));
                            session.give((out, time.max(expiry), -diff * weight));
                        }
                    }
                });
            }
        })
        .as_collection()
}
