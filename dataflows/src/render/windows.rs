//! Sliding-window top-K (SPEC §3 answer 2, "the top 100 ads of the last M minutes").
//!
//! A window of M minutes moves every minute, and each move changes the count of nearly every ad
//! it holds: one minute enters and one leaves. Kept as a differential count per (window, ad)
//! feeding the hierarchical top-K, every move re-sorted every bucket of every level — the
//! windows' top K was a third of a replay's time. They are ranked with
//! [`top_k_of_counts`](crate::render::topk::top_k_of_counts) instead, from the changes
//! [`contributions`] says each per-minute count makes; [`sliding_counts`](crate::render::sliding_counts)
//! counts the same contributions where the counts themselves are the answer.

use differential_dataflow::VecCollection;

use crate::event_time::EventTimeRules;
use crate::plan::Plan;
use crate::render::topk::top_k_of_counts;
use crate::types::{Minute, Time, MINUTE_MS};

/// How a change at `time` to the clicks of `minute` moves the sliding counts: for each window M,
/// `(window index, from, until)`, meaning "add the change from `from` until `until`". A minute's changes before it is final are its answer; later ones are
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

/// `((window minutes, group), (ad, clicks))`: the ads in the top K of each window of each group.
pub type WindowTops<'scope, G> = VecCollection<'scope, Time, ((u32, G), (u64, u64))>;

/// The top `plan.top_k` ads of each window of `plan.windows` in each group, by clicks over the
/// window's last M minutes, as `((window minutes, group), (ad, clicks))`, from the clicks per
/// minute and key (`C`, with the clicks as its multiplicity, as
/// [`MinuteCounts::clicks`](crate::render::counts::MinuteCounts::clicks) gives them), whose key
/// `split` takes apart into `(minute, group, ad)`. Ranked by clicks descending, then ad ascending.
pub fn sliding_top_k<'scope, C, G>(
    name: &str,
    clicks: VecCollection<'scope, Time, C>,
    plan: &Plan,
    rules: &EventTimeRules,
    split: impl Fn(&C) -> (Minute, G, u64) + Clone + 'static,
) -> WindowTops<'scope, G>
where
    C: differential_dataflow::ExchangeData,
    G: differential_dataflow::ExchangeData + std::hash::Hash,
{
    let windows = plan.windows.clone();
    let rules = *rules;
    let ad_of = {
        let split = split.clone();
        move |key: &C| split(key).2
    };
    let changes = move |key: &C, time: Time, diff: isize, emit: &mut dyn FnMut((u32, G), u64, Time, i64)| {
        let (minute, group, ad) = split(key);
        let change = diff as i64;
        for (index, from, until) in contributions(rules, &windows, minute, time) {
            emit((windows[index], group.clone()), ad, from, change);
            emit((windows[index], group.clone()), ad, until, -change);
        }
    };
    top_k_of_counts(name, clicks, ad_of, changes, plan.top_k)
}
