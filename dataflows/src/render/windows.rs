//! Sliding-window top-K (SPEC §3 answer 2, "the top 100 ads of the last M minutes").
//!
//! A window of M minutes moves every minute, and each move changes the count of nearly every ad
//! it holds: one minute enters and one leaves. Kept as a differential count per (window, ad)
//! feeding a hierarchical top-K, every move re-sorts every bucket of every level — the window's
//! top K was a third of a replay's time. Here each worker instead keeps the counts of its share
//! of the ads in a hash map, applies each time's changes once that time is complete, and selects
//! its local top K in linear time; the global top K, the top K of the workers' local tops (the
//! shares are disjoint), is then a differential `reduce` over at most `workers × K` records.
//!
//! The output is the same collection, time for time, as counting the contributions of
//! [`contributions`] per (window, ad) and ranking each window: what enters at a time and what
//! leaves is decided by the same function.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use differential_dataflow::collection::AsCollection;
use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;

use crate::event_time::EventTimeRules;
use crate::plan::Plan;
use crate::types::{Minute, Time, MINUTE_MS};

/// How one per-minute count update `((minute, key), clicks)` at `time` moves the sliding counts:
/// for each window M, `(window index, from, until, clicks)`, meaning "add `clicks` from `from`
/// until `until`". A minute's changes before it is final are its answer; later ones are
/// retention forgetting it, which must not take it out of a window early, so they yield nothing.
/// Contributions enter at the minute's last tick ([`EventTimeRules::window_time`]), so that a
/// window's top K changes twice a minute, not once per tick.
pub fn contributions(rules: EventTimeRules, windows: &[u32], minute: Minute, time: Time) -> impl Iterator<Item = (usize, Time, Time)> + '_ {
    let current = rules.minute_final_at(minute).is_none_or(|final_at| time < final_at);
    let from = time.max(rules.window_time(time));
    windows
        .iter()
        .enumerate()
        .filter(move |_| current)
        .map(move |(index, &window)| (index, from, from.max((minute + window) as u64 * MINUTE_MS)))
}

/// What is held for one time: its capability and each (window index, ad)'s change of count.
type Pending = (Capability<Time>, HashMap<(usize, u64), i64>);

/// The top `plan.top_k` ads of each window of `plan.windows`, by clicks over the window's last M
/// minutes, as `(window minutes, (ad, clicks))`, from the per-minute counts `((minute, ad),
/// clicks)` (one record per key with clicks > 0). Ranked by clicks descending, then ad ascending.
pub fn sliding_top_k<'scope>(
    name: &str,
    per_minute: VecCollection<'scope, Time, ((Minute, u64), u64)>,
    plan: &Plan,
    rules: &EventTimeRules,
) -> VecCollection<'scope, Time, (u32, (u64, u64))> {
    let windows = plan.windows.clone();
    let k = plan.top_k;
    let rules = *rules;
    let by_ad = Exchange::new(|update: &(((Minute, u64), u64), Time, isize)| spread(update.0 .0 .1));
    let local = per_minute.inner.unary_frontier(by_ad, &format!("{name}Local"), move |_, _| {
        let mut pending: BTreeMap<Time, Pending> = BTreeMap::new();
        // Per window: this worker's ads' counts, and the local top K last sent.
        let mut counts: Vec<HashMap<u64, i64>> = vec![HashMap::new(); windows.len()];
        let mut sent: Vec<Vec<(u64, u64)>> = vec![Vec::new(); windows.len()];
        let mut ranked: Vec<(u64, u64)> = Vec::new();
        move |(input, frontier), output| {
            input.for_each(|capability, data| {
                for (((minute, ad), clicks), time, diff) in data.drain(..) {
                    let change = clicks as i64 * diff as i64;
                    for (index, from, until) in contributions(rules, &windows, minute, time) {
                        for (at, change) in [(from, change), (until, -change)] {
                            let (_, changes) =
                                pending.entry(at).or_insert_with(|| (capability.delayed(&at, 0), HashMap::new()));
                            *changes.entry((index, ad)).or_insert(0) += change;
                        }
                    }
                }
            });
            // A time is complete once the frontier is past it: nothing more can arrive for it.
            while let Some(entry) = pending.first_entry() {
                if frontier.frontier().first().is_some_and(|f| f <= entry.key()) {
                    break;
                }
                let (capability, changes) = entry.remove();
                let mut touched = vec![false; windows.len()];
                for ((index, ad), change) in changes {
                    if change == 0 {
                        continue;
                    }
                    touched[index] = true;
                    let count = counts[index].entry(ad).or_insert(0);
                    *count += change;
                    debug_assert!(*count >= 0, "a sliding count went below zero");
                    if *count == 0 {
                        counts[index].remove(&ad);
                    }
                }
                let mut session = output.session(&capability);
                for index in (0..windows.len()).filter(|&i| touched[i]) {
                    ranked.clear();
                    ranked.extend(counts[index].iter().filter(|(_, &c)| c > 0).map(|(&ad, &c)| (u64::MAX - c as u64, ad)));
                    local_top(&mut ranked, k);
                    let top: Vec<(u64, u64)> = ranked.iter().map(|&(inverse, ad)| (ad, u64::MAX - inverse)).collect();
                    let window = windows[index];
                    // Send the difference: what left this worker's top K, and what entered it.
                    for &(ad, clicks) in sent[index].iter().filter(|entry| !top.contains(entry)) {
                        session.give(((window, (ad, clicks)), *capability.time(), -1isize));
                    }
                    for &(ad, clicks) in top.iter().filter(|entry| !sent[index].contains(entry)) {
                        session.give(((window, (ad, clicks)), *capability.time(), 1isize));
                    }
                    sent[index] = top;
                }
            }
        }
    });
    let candidates = local.as_collection().map(|(window, (ad, clicks))| (window, (ad, clicks)));
    crate::render::topk::top_k(name, candidates, &Plan { top_k_buckets: Vec::new(), ..plan.clone() })
}

/// Leaves the first `k` of `ranked` (by its order) at its front, sorted, and drops the rest, in
/// time linear in its length.
fn local_top(ranked: &mut Vec<(u64, u64)>, k: usize) {
    if ranked.len() > k {
        ranked.select_nth_unstable(k);
        ranked.truncate(k);
    }
    ranked.sort_unstable();
}

/// Which worker holds an ad: a hash, so that patterned ad ids spread.
fn spread(ad: u64) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    ad.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::local_top;

    #[test]
    fn local_top_keeps_the_first_k_in_order() {
        let mut ranked: Vec<(u64, u64)> = (0..1000u64).map(|i| ((i * 7919) % 1000, i)).collect();
        local_top(&mut ranked, 10);
        let mut expected: Vec<(u64, u64)> = (0..1000u64).map(|i| ((i * 7919) % 1000, i)).collect();
        expected.sort_unstable();
        expected.truncate(10);
        assert_eq!(ranked, expected);
        let mut short = vec![(3, 1), (1, 2)];
        local_top(&mut short, 10);
        assert_eq!(short, vec![(1, 2), (3, 1)]);
    }
}
