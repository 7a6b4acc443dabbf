//! Sliding-window top-K (SPEC §3 answer 2, "the top 100 ads of the last M minutes").
//!
//! A window of M minutes moves every minute, and each move changes the count of nearly every ad
//! it holds: one minute enters and one leaves. Kept as a differential count per (window, ad)
//! feeding the hierarchical top-K, every move re-sorted every bucket of every level — the
//! windows' top K was a third of a replay's time. [`sliding_top_k`] keeps each worker's share of
//! the window counts in hash maps instead, with a local top K that it updates from the changed
//! counts (`LocalTop`), and remembers what each minute contributed, once for every window, to
//! take it out again when the minute leaves each window. [`contributions`] says when a change
//! enters and leaves each window; [`sliding_counts`](crate::render::sliding_counts) counts the
//! same contributions where the counts themselves are the answer.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use differential_dataflow::collection::AsCollection;
use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::core::Map;
use timely::dataflow::operators::Capability;

use crate::event_time::EventTimeRules;
use crate::hashing::{FastMap, ProbeMap, PREFETCH_AHEAD};
use crate::plan::Plan;
use crate::render::minute_state::StateLog;
use crate::render::partition::{ByAd, OfAd};
use crate::render::peekable::{register, FirstRows, Peekable};
use crate::render::topk::{keep_top, unrank, LocalTop, Rank};
use crate::types::{Minute, Time, MINUTE_MS};

/// How a change at `time` to the clicks of `minute` moves the sliding counts: for each window M,
/// `(window index, from, until)`, meaning "add the change from `from` until `until`". A minute's changes before it is final are its answer; later ones are
/// retention forgetting it, which must not take it out of a window early, so they yield nothing.
/// Contributions enter at the minute's last tick ([`EventTimeRules::window_time`]), so that a
/// window's top K changes twice a minute, not once per tick.
pub fn contributions(rules: EventTimeRules, windows: &[u32], minute: Minute, time: Time) -> impl Iterator<Item = (usize, Time, Time)> + '_ {
    let current = !rules.is_final_at(minute, time);
    let from = time.max(rules.window_time(time));
    windows
        .iter()
        .enumerate()
        .filter(move |_| current)
        .map(move |(index, &window)| (index, from, from.max((minute + window) as u64 * MINUTE_MS)))
}

/// `((window minutes, group), (ad, clicks))`: the ads in the top K of each window of each group.
pub type WindowTops<'scope, G> = VecCollection<'scope, Time, ((u32, G), (u64, u64))>;

/// `((minute, group), (ad, clicks))`: the ads in the top K of each minute of each group.
pub type MinuteTops<'scope, G> = VecCollection<'scope, Time, ((Minute, G), (u64, u64))>;

/// The top `plan.top_k` ads of each window of `plan.windows` in each group, by clicks over the
/// window's last M minutes, as `((window minutes, group), (ad, clicks))`, from the clicks per
/// minute and key (`C`, with the clicks as its multiplicity, as
/// [`MinuteCounts::clicks`](crate::render::counts::MinuteCounts::clicks) gives them), partitioned
/// by ad; `split` gives a key's minute and group, and [`OfAd::ad`] its ad. Ranked by clicks
/// descending, then ad ascending.
///
/// The output is, time for time, the top K of the sum of every change's [`contributions`]: each
/// change counts in window M from when it enters until it leaves. Each worker holds the ads it
/// is given. It applies the changes entering at a time and the minutes leaving a window at that
/// time once the frontier has passed it, then updates each changed group's local top K
/// (`LocalTop`); a `reduce` over the workers' local tops gives the global one. A minute's
/// contributions are kept once, per (group, ad), from its first change until it has left the
/// widest window, and subtracted from each window as it leaves: not a future retraction per
/// window and change, held until its time.
///
/// `split` must be a pure function, so that every worker count gives the same output.
pub fn sliding_top_k<'scope, C, G>(
    name: &str,
    clicks: ByAd<'scope, C>,
    plan: &Plan,
    rules: &EventTimeRules,
    split: impl Fn(&C) -> (Minute, G) + 'static,
) -> WindowTops<'scope, G>
where
    C: OfAd,
    G: differential_dataflow::ExchangeData + std::hash::Hash + serde::Serialize,
{
    let windows = plan.windows.clone();
    let widest = windows.iter().copied().max().unwrap_or(0);
    let (k, rules) = (plan.top_k, *rules);
    let operator = format!("{name}Local");
    let clicks = clicks.into_collection();
    let logger = StateLog::logger(&clicks.scope());
    // The window counts, shared with the peeks of this worker under the operator's name.
    let shared: Rc<RefCell<Tops<G>>> = Rc::new(RefCell::new(FastMap::default()));
    register(&operator, Rc::new(PeekWindows(Rc::clone(&shared))));
    let local = clicks.inner.unary_frontier(Pipeline, &operator, move |_, info| {
        // The window counts held, reported as one batch (see `StateLog`) until the input ends.
        let log = StateLog { logger, operator: info.global_id };
        log.created();
        let mut reported = Some(0);
        // Changes `(minute, group, ad, clicks)` by the time they enter the windows.
        let mut entering: BTreeMap<Time, Entering<G>> = BTreeMap::new();
        // The times at which minutes leave windows.
        let mut leaving: BTreeMap<Time, Capability<Time>> = BTreeMap::new();
        // What each minute still in a window contributed, per (group, ad).
        let mut minutes: BTreeMap<Minute, ProbeMap<(G, u64), i64>> = BTreeMap::new();
        let mut touched: Vec<(u32, G)> = Vec::new();
        let mut ranked: Vec<Rank> = Vec::new();
        move |(input, frontier), output| {
            let mut tops = shared.borrow_mut();
            let tops = &mut *tops;
            input.for_each(|capability, data| {
                let mut changes = data
                    .drain(..)
                    .filter_map(|(datum, time, diff)| {
                        let ((minute, group), ad) = (split(&datum), datum.ad());
                        // Every window enters at the same time; one that it would leave at once
                        // (a late change to a minute the window has moved past) never holds it.
                        let from = contributions(rules, &windows, minute, time).find(|(_, from, until)| from < until).map(|(_, from, _)| from)?;
                        Some((from, (minute, group, ad, diff as i64)))
                    })
                    .peekable();
                while let Some((from, change)) = changes.next() {
                    let (_, held) = entering.entry(from).or_insert_with(|| (capability.delayed(&from, 0), Vec::new()));
                    held.push(change);
                    // The rest of the run entering at the same time, without looking it up again.
                    while let Some((_, change)) = changes.next_if(|(next, _)| *next == from) {
                        held.push(change);
                    }
                }
            });
            let complete = |time: &Time| frontier.frontier().first().is_none_or(|f| f > time);
            loop {
                let next_entering = entering.first_key_value().map(|(&time, _)| time);
                let next_leaving = leaving.first_key_value().map(|(&time, _)| time);
                let Some(time) = next_entering.into_iter().chain(next_leaving).min().filter(complete) else { break };
                let mut capability = None;
                if next_leaving == Some(time) {
                    let (_, held) = leaving.pop_first().expect("just seen");
                    for &window in &windows {
                        let Some(minute) = (time / MINUTE_MS).checked_sub(u64::from(window)) else { continue };
                        let Some(contributed) = minutes.get(&(minute as Minute)) else { continue };
                        // Each change goes to a random place in a window's counts: the count a
                        // few changes ahead is prefetched (see `ProbeMap::prefetch`).
                        let mut ahead = contributed.iter().skip(PREFETCH_AHEAD);
                        for ((group, ad), &clicks) in contributed.iter() {
                            if let Some(((group, ad), _)) = ahead.next() {
                                prefetch_top(tops, window, group, *ad);
                            }
                            change_top(tops, &mut touched, window, group, *ad, -clicks);
                        }
                    }
                    // Out of the widest window, a minute is out of all of them.
                    if let Some(minute) = (time / MINUTE_MS).checked_sub(u64::from(widest)) {
                        minutes.remove(&(minute as Minute));
                    }
                    capability = Some(held);
                }
                if next_entering == Some(time) {
                    let (_, (held, changes)) = entering.pop_first().expect("just seen");
                    // When a minute's contribution leaves the window of M minutes.
                    let window_end = |minute: Minute, window: u32| (u64::from(minute) + u64::from(window)) * MINUTE_MS;
                    for at in 0..changes.len() {
                        if let Some((minute, group, ad, _)) = changes.get(at + PREFETCH_AHEAD) {
                            if let Some(contributed) = minutes.get(minute) {
                                contributed.prefetch(&(group.clone(), *ad));
                            }
                            for &window in windows.iter().filter(|&&window| window_end(*minute, window) > time) {
                                prefetch_top(tops, window, group, *ad);
                            }
                        }
                        let (minute, group, ad, clicks) = changes[at].clone();
                        let end_of = |window: u32| window_end(minute, window);
                        let contributed = minutes.entry(minute).or_insert_with(|| {
                            for &window in &windows {
                                let until = end_of(window);
                                if until > time {
                                    leaving.entry(until).or_insert_with(|| held.delayed(&until));
                                }
                            }
                            ProbeMap::default()
                        });
                        *contributed.get_or_insert_with((group.clone(), ad), || 0) += clicks;
                        for &window in windows.iter().filter(|&&window| end_of(window) > time) {
                            change_top(tops, &mut touched, window, &group, ad, clicks);
                        }
                    }
                    capability = Some(held);
                }
                let capability = capability.expect("a time entering or leaving");
                let mut session = output.session(&capability);
                for group in touched.drain(..) {
                    let top = tops.get_mut(&group).expect("a touched group has a top");
                    top.settle(k, &mut ranked, |r, diff| session.give(((group.clone(), r), time, diff)));
                    if top.is_empty() {
                        tops.remove(&group);
                    }
                }
                if let Some(before) = reported {
                    let held = tops.values().map(LocalTop::len).sum();
                    log.resized(before, held);
                    reported = Some(held);
                }
            }
            if frontier.frontier().is_empty() && entering.is_empty() && leaving.is_empty() {
                if let Some(held) = reported.take() {
                    log.dropped(held);
                    tops.clear();
                    minutes.clear();
                }
            }
        }
    });
    keep_top(name, local.as_collection(), k).map(|(group, r)| (group, unrank(r)))
}

/// The one-minute window's top K, from each minute's top K (`(minute, ranked)`, as
/// [`top_k_per_minute`](crate::render::topk::top_k_per_minute) gives it), when every logical time
/// is a minute boundary (`rules.tick_ms` is a minute, as in a replay by default).
///
/// Then minute m's changes enter the one-minute window only at m's first time, `m * MINUTE_MS`:
/// a change at a later time is late for it ([`contributions`]). Minute m has no change before
/// that time either, so its top K then is the window's top K until the window moves on, a minute
/// later. Each update of a minute's top K at the minute's first time enters the window then and
/// leaves it a minute later; later updates (late clicks, retention) never reach it. This is what
/// [`sliding_top_k`] computes for the window, time for time, without keeping the window's counts.
pub fn one_minute_window<'scope, R>(tops: VecCollection<'scope, Time, (Minute, R)>, rules: &EventTimeRules) -> VecCollection<'scope, Time, R>
where
    R: differential_dataflow::Data,
{
    assert_eq!(rules.tick_ms, MINUTE_MS, "the one-minute window is each minute's top K only with minute ticks");
    tops.inner
        .flat_map(|((minute, ranked), time, diff)| {
            let first = u64::from(minute) * MINUTE_MS;
            (time == first).then(|| [(ranked.clone(), time, diff), (ranked, first + MINUTE_MS, -diff)]).into_iter().flatten()
        })
        .as_collection()
}

/// [`sliding_top_k`] for every window of `plan.windows`, except that with minute ticks the
/// one-minute window is taken from `minute_tops()`, each minute's top `plan.top_k` per group
/// (`((minute, group), (ad, clicks))`), by [`one_minute_window`], instead of keeping its counts.
/// `minute_tops` is called only then, so that other ticks render nothing for it.
pub fn sliding_top_k_with_minute_tops<'scope, C, G>(
    name: &str,
    clicks: ByAd<'scope, C>,
    minute_tops: impl FnOnce() -> MinuteTops<'scope, G>,
    plan: &Plan,
    rules: &EventTimeRules,
    split: impl Fn(&C) -> (Minute, G) + 'static,
) -> WindowTops<'scope, G>
where
    C: OfAd,
    G: differential_dataflow::ExchangeData + std::hash::Hash,
{
    if rules.tick_ms != MINUTE_MS || !plan.windows.contains(&1) {
        return sliding_top_k(name, clicks, plan, rules, split);
    }
    let counted = Plan { windows: plan.windows.iter().copied().filter(|&window| window != 1).collect(), ..plan.clone() };
    let one_minute = one_minute_window(minute_tops().map(|((minute, group), ranked)| (minute, (group, ranked))), rules).map(|(group, ranked)| ((1, group), ranked));
    sliding_top_k(name, clicks, &counted, rules, split).concat(one_minute)
}

/// Each (window, group)'s counts on one worker, with their local top K.
type Tops<G> = FastMap<(u32, G), LocalTop>;

/// A [`sliding_top_k`]'s window counts, as a peek reads them.
struct PeekWindows<G>(Rc<RefCell<Tops<G>>>);

impl<G: serde::Serialize> Peekable for PeekWindows<G> {
    /// Each `(window, group, ad)` this worker counts, with its clicks in the window as its
    /// multiplicity.
    fn peek(&self, rows: &mut FirstRows) -> Result<(), String> {
        for ((window, group), top) in self.0.borrow().iter() {
            top.for_each_count(|ad, clicks| rows.offer(&(window, group, ad), &(), clicks as isize));
        }
        Ok(())
    }
}

/// Adds `clicks` to `ad`'s count in the counts of `window` and `group`, noting them in `touched`
/// at their first change of the time being processed.
fn change_top<G: std::hash::Hash + Eq + Clone>(tops: &mut Tops<G>, touched: &mut Vec<(u32, G)>, window: u32, group: &G, ad: u64, clicks: i64) {
    let top = tops.entry((window, group.clone())).or_default();
    if !top.is_changed() {
        touched.push((window, group.clone()));
    }
    top.change(ad, clicks);
}

/// A hint that `ad`'s count in the counts of `window` and `group` changes soon, if they exist.
fn prefetch_top<G: std::hash::Hash + Eq + Clone>(tops: &Tops<G>, window: u32, group: &G, ad: u64) {
    if let Some(top) = tops.get(&(window, group.clone())) {
        top.prefetch(ad);
    }
}

/// The changes entering the windows at one time, and its capability.
type Entering<G> = (Capability<Time>, Vec<(Minute, G, u64, i64)>);

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{contributions, one_minute_window, sliding_top_k};
    use crate::render::partition::ByAd;
    use crate::event_time::EventTimeRules;
    use crate::plan::Plan;
    use crate::render::testing::{held_at, minute_updates, reference_top_k, rules_and_workers, run_operator, scattered, times_of, with_transient_negatives};
    use crate::render::topk::top_k_per_minute;
    use crate::types::MINUTE_MS;
    use crate::types::{Minute, Time};

    /// `((window, ()), (ad, clicks))` records, as `sliding_top_k` sends them.
    type WindowTops = BTreeMap<((u32, ()), (u64, u64)), isize>;

    /// The top `k` of each window at `time`: every change counted from when it enters each window
    /// until it leaves it, as [`contributions`] says.
    fn reference(
        updates: &[((Minute, u64), Time, isize)],
        rules: EventTimeRules,
        windows: &[u32],
        time: Time,
        k: usize,
    ) -> WindowTops {
        let mut counts: BTreeMap<(u32, u64), isize> = BTreeMap::new();
        for &((minute, ad), at, diff) in updates {
            for (index, from, until) in contributions(rules, windows, minute, at) {
                if from <= time && time < until {
                    *counts.entry((windows[index], ad)).or_default() += diff;
                }
            }
        }
        reference_top_k(&counts, k).into_iter().map(|((window, top), diff)| (((window, ()), top), diff)).collect()
    }

    #[test]
    fn sliding_top_k_matches_a_reference_at_every_time() {
        let windows = vec![1, 2, 3];
        let plan = Plan { top_k: 2, windows: windows.clone(), ..Plan::default() };
        for seed in 0..6 {
            for (rules, workers) in rules_and_workers() {
                let updates = minute_updates(seed, 300, &rules);
                let transient = with_transient_negatives(&updates);
                for input in [&updates, &transient] {
                    let built = plan.clone();
                    let output = run_operator(workers, input, move |clicks| {
                        sliding_top_k("TopWindow", ByAd::exchange(scattered(clicks)), &built, &rules, |&(minute, _): &(Minute, u64)| (minute, ()))
                    });
                    // The windows move on after the last update: check until every minute has left.
                    let mut times = times_of(input, &output);
                    times.extend((0..8).map(|minute| minute * crate::types::MINUTE_MS));
                    times.sort();
                    times.dedup();
                    for time in times {
                        let expected = reference(&updates, rules, &windows, time, plan.top_k);
                        assert_eq!(held_at(&output, time), expected, "seed {seed}, {workers} workers, time {time}, {rules:?}");
                    }
                }
            }
        }
    }

    /// With minute ticks, the one-minute window derived from each minute's top K is the window
    /// that `sliding_top_k` keeps counts for: the same updates at the same times.
    #[test]
    fn one_minute_window_is_each_minutes_first_top_k() {
        let plan = Plan { top_k: 2, windows: vec![1], ..Plan::default() };
        let bounded = EventTimeRules { watermark_delay_ms: 0, allowed_lateness_ms: Some(2 * MINUTE_MS), tick_ms: MINUTE_MS };
        let unbounded = EventTimeRules { allowed_lateness_ms: None, ..bounded };
        for seed in 0..8 {
            for (rules, workers) in [(bounded, 1), (bounded, 3), (unbounded, 2)] {
                // Updates at minute ticks: on time at their minute's first time, late after it.
                let mut updates: Vec<_> = minute_updates(seed, 300, &rules).into_iter().map(|(key, time, diff)| (key, rules.tick(time), diff)).collect();
                updates.sort_by_key(|update| update.1);
                let (k, counted) = (plan.top_k, plan.clone());
                let derived = run_operator(workers, &updates, move |clicks| {
                    one_minute_window(top_k_per_minute("TopMinute", ByAd::exchange(scattered(clicks)), k, &rules), &rules)
                });
                let kept = run_operator(workers, &updates, move |clicks| {
                    sliding_top_k("TopWindow", ByAd::exchange(scattered(clicks)), &counted, &rules, |&(minute, _): &(Minute, u64)| (minute, ()))
                        .map(|(_, ranked)| ranked)
                });
                assert!(updates.iter().any(|&((minute, _), time, _)| time > u64::from(minute) * MINUTE_MS), "seed {seed}: no late update");
                let consolidated = |output: Vec<((u64, u64), Time, isize)>| {
                    let mut sums: BTreeMap<(Time, (u64, u64)), isize> = BTreeMap::new();
                    for (ranked, time, diff) in output {
                        *sums.entry((time, ranked)).or_default() += diff;
                    }
                    sums.retain(|_, diff| *diff != 0);
                    sums
                };
                let (derived, kept) = (consolidated(derived), consolidated(kept));
                assert!(!kept.is_empty());
                assert_eq!(derived, kept, "seed {seed}, {workers} workers, {rules:?}");
            }
        }
    }
}
