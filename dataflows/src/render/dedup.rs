//! De-duplication of retried deliveries (SPEC §2 "Duplicates").

use differential_dataflow::VecCollection;

use crate::types::{Click, ClickAttrs, ClickKey, Time};

/// One record per distinct `(event_id, ts)`: the copy with the smallest attributes.
///
/// At every time the output holds, for each click with at least one visible copy, the minimum
/// of the visible copies; so a click counts from its earliest visible copy on, and a smaller
/// copy arriving later moves the count (a retraction and a restatement downstream).
pub fn distinct_clicks<'scope>(
    deliveries: VecCollection<'scope, Time, Click>,
) -> VecCollection<'scope, Time, (ClickKey, ClickAttrs)> {
    deliveries.map(|click| (click.key, click.attrs)).reduce_named("DistinctClicks", |_key, copies, output| {
        // Values arrive sorted and with positive multiplicity: the first is the minimum.
        output.push((*copies[0].0, 1));
    })
}
