//! Top-K (SPEC §3 answer 2), two ways.
//!
//! One `reduce` over every ad of a minute re-sorts the whole minute whenever one count moves
//! (differential #29). [`top_k`] is hierarchical: each level keeps the top K of a hash bucket of
//! ad ids, and the next level the top K of the winners of several buckets, so that a changed
//! count re-sorts one small bucket, and moves up only while it is still among the winners. It
//! ranks any collection of counts, all in arrangements.
//!
//! [`top_k_of_counts`] ranks counts it keeps itself, one share of the ads per worker, and updates
//! each worker's top K from the changed counts alone unless one of its members falls. The sliding
//! windows (where every count of a window changes each minute) use it, and the minutes (whose
//! counts only rise until the minute is forgotten) use [`top_k_per_minute`], the same ranking with
//! each minute's counts forgotten whole when it is final; the per-country minutes, served only,
//! keep [`top_k`] and its inspectable arrangements.

use std::collections::BTreeMap;

use differential_dataflow::collection::AsCollection;
use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;

use crate::event_time::EventTimeRules;
use crate::hashing::FastMap;
use crate::plan::Plan;
use crate::render::minute_state::{per_minute, MinuteState, StateLog};
use crate::types::{Minute, Time};

/// Sort key of a ranked entry: clicks descending, then ad ascending.
type Rank = (u64, u64);

fn rank(ad: u64, clicks: u64) -> Rank {
    (u64::MAX - clicks, ad)
}

fn unrank((inverse_clicks, ad): Rank) -> (u64, u64) {
    (ad, u64::MAX - inverse_clicks)
}

/// A well-mixed bucket of an ad id; ad ids themselves may be dense or patterned.
fn bucket_of(ad: u64) -> u32 {
    (ad.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32
}

/// The top `plan.top_k` of each group: from `(group, (ad, clicks))` (one record per ad of a
/// group) to the subset of those records that rank in the top K of their group by clicks
/// descending, then ad ascending.
pub fn top_k<'scope, G>(
    name: &str,
    entries: VecCollection<'scope, Time, (G, (u64, u64))>,
    plan: &Plan,
) -> VecCollection<'scope, Time, (G, (u64, u64))>
where
    G: differential_dataflow::ExchangeData + std::hash::Hash,
{
    let k = plan.top_k;
    let mut ranked =
        entries.map(|(group, (ad, clicks))| ((group, bucket_of(ad)), rank(ad, clicks)));
    for (level, &buckets) in plan.top_k_buckets.iter().enumerate() {
        let mask = buckets - 1;
        ranked = keep_top(&format!("{name}Level{level}"), ranked.map(move |((group, bucket), r)| ((group, bucket & mask), r)), k);
    }
    keep_top(name, ranked.map(|((group, _bucket), r)| ((group, 0), r)), k)
        .map(|((group, _), r)| (group, unrank(r)))
}

/// Keeps the first `k` ranks of each key.
fn keep_top<'scope, K>(
    name: &str,
    ranked: VecCollection<'scope, Time, (K, Rank)>,
    k: usize,
) -> VecCollection<'scope, Time, (K, Rank)>
where
    K: differential_dataflow::ExchangeData + std::hash::Hash,
{
    ranked.reduce_named(name, move |_key, input, output| {
        // Input is sorted by rank; each (ad, clicks) occurs once, but stay exact if not.
        let mut remaining = k as isize;
        for (r, count) in input {
            if remaining <= 0 {
                break;
            }
            let taken = (*count).min(remaining);
            output.push((**r, taken));
            remaining -= taken;
        }
    })
}

/// What is held for one time: its capability and each (group, ad)'s change of count.
type Pending<G> = (Capability<Time>, FastMap<(G, u64), i64>);

/// The top `k` ads of each group, from changes to per-ad counts: `changes(datum, time, diff, emit)`
/// says whose count moves, calling `emit(group, ad, at, change)` for a change from time `at` (at
/// or after `time`) on.
/// The output is `(group, (ad, clicks))` for the ads that rank in the top K of their group by
/// clicks descending, then ad ascending: the same collection, time for time, as counting the
/// changes per (group, ad) and ranking them with [`top_k`].
///
/// [`top_k`] keeps every count in an arrangement and re-sorts, level by level, each bucket a
/// change touches. When most counts of a group change at once — a sliding window moving on,
/// which changes nearly every active ad's count — that is every bucket, every time. Here each
/// worker keeps the counts of its share of the ads (by `ad_of`) in hash maps, applies a time's
/// changes once the frontier has passed it, and finds the new local top K of each changed group
/// from the last one and the changed counts: only they can have risen into it. Only when a member
/// of a full local top K falls is it selected again from every count of the group, in linear
/// time. It sends on only what entered or left that local top K. The global top K is
/// the top K of the workers' local tops (the shares are disjoint): a `reduce` over at most
/// workers × K records per group. The counts are not an arrangement, so they cannot be shared
/// or inspected as one; that is the price.
///
/// `changes` must be a pure function of its arguments, so that every worker count gives the same
/// output, and no count may go below zero.
pub fn top_k_of_counts<'scope, D, G, L>(
    name: &str,
    input: VecCollection<'scope, Time, D>,
    ad_of: impl Fn(&D) -> u64 + 'static,
    mut changes: L,
    k: usize,
) -> VecCollection<'scope, Time, (G, (u64, u64))>
where
    D: differential_dataflow::ExchangeData,
    G: differential_dataflow::ExchangeData + std::hash::Hash,
    L: FnMut(&D, Time, isize, &mut dyn FnMut(G, u64, Time, i64)) + 'static,
{
    let by_ad = Exchange::new(move |update: &(D, Time, isize)| u64::from(bucket_of(ad_of(&update.0))));
    let operator = format!("{name}Local");
    let logger = StateLog::logger(&input.scope());
    let local = input.inner.unary_frontier(by_ad, &operator.clone(), move |_, info| {
        // The counts held, reported as one batch (see `StateLog`) until the input ends.
        let log = StateLog { logger, operator: info.global_id };
        log.created();
        let mut reported = Some(0);
        let mut pending: BTreeMap<Time, Pending<G>> = BTreeMap::new();
        // Per group: this worker's ads' counts, and the local top K last sent.
        let mut tops: FastMap<G, LocalTop> = FastMap::default();
        let mut touched: Vec<G> = Vec::new();
        let mut ranked: Vec<Rank> = Vec::new();
        move |(input, frontier), output| {
            input.for_each(|capability, data| {
                for (datum, time, diff) in data.drain(..) {
                    changes(&datum, time, diff, &mut |group, ad, at, change| {
                        let (_, held) = pending.entry(at).or_insert_with(|| (capability.delayed(&at, 0), FastMap::default()));
                        *held.entry((group, ad)).or_insert(0) += change;
                    });
                }
            });
            // A time is complete once the frontier is past it: nothing more can arrive for it.
            while let Some(entry) = pending.first_entry() {
                if frontier.frontier().first().is_some_and(|f| f <= entry.key()) {
                    break;
                }
                let (capability, held) = entry.remove();
                for ((group, ad), change) in held {
                    if change == 0 {
                        continue;
                    }
                    let top = tops.entry(group.clone()).or_default();
                    if !top.is_changed() {
                        touched.push(group);
                    }
                    top.change(ad, change);
                }
                let mut session = output.session(&capability);
                let time = *capability.time();
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
            if frontier.frontier().is_empty() && pending.is_empty() {
                if let Some(held) = reported.take() {
                    log.dropped(held);
                    tops.clear();
                }
            }
        }
    });
    keep_top(name, local.as_collection(), k).map(|(group, r)| (group, unrank(r)))
}

/// The top `k` ads of each minute, from the clicks per `(minute, ad)` (with the clicks as their
/// multiplicity, as [`MinuteClicks::ad`](crate::render::counts::MinuteClicks::ad) gives them), as
/// `(minute, (ad, clicks))`: what [`top_k_of_counts`] ranks from the same clicks, time for time,
/// with each minute's counts kept by [`per_minute`] and forgotten whole when the minute is final
/// (its top K retracted then), so that the clicks need not be retracted to forget them.
pub fn top_k_per_minute<'scope>(
    name: &str,
    clicks: VecCollection<'scope, Time, (Minute, u64)>,
    k: usize,
    rules: &EventTimeRules,
) -> VecCollection<'scope, Time, (Minute, (u64, u64))> {
    let route = |&(_, ad): &(Minute, u64)| u64::from(bucket_of(ad));
    let empty = move || TopOfMinute { minute: 0, k, top: LocalTop::default(), ranked: Vec::new() };
    let local = per_minute(&format!("{name}Local"), clicks, route, |&(minute, _)| minute, rules, empty);
    keep_top(name, local, k).map(|(minute, r)| (minute, unrank(r)))
}

/// One minute's counts of one worker's share of the ads, and their local top K.
struct TopOfMinute {
    minute: Minute,
    k: usize,
    top: LocalTop,
    ranked: Vec<Rank>,
}

impl MinuteState for TopOfMinute {
    type Update = (Minute, u64);
    type Output = (Minute, Rank);

    fn apply(&mut self, (minute, ad): (Minute, u64), diff: isize, _emit: &mut impl FnMut(Self::Output, isize)) {
        self.minute = minute;
        self.top.change(ad, diff as i64);
    }

    fn settle(&mut self, emit: &mut impl FnMut(Self::Output, isize)) {
        let minute = self.minute;
        self.top.settle(self.k, &mut self.ranked, |r, diff| emit((minute, r), diff));
    }

    fn retire(&mut self, emit: &mut impl FnMut(Self::Output, isize)) {
        for &r in &self.top.sent {
            emit((self.minute, r), -1);
        }
        self.top.clear();
    }

    fn keys(&self) -> usize {
        self.top.len()
    }
}

/// One group's counts on one worker, and the local top K last sent for them.
#[derive(Default)]
struct LocalTop {
    /// Below zero only between `change` and `settle`: a time's changes may come in any order.
    counts: FastMap<u64, i64>,
    /// The local top K last sent, sorted.
    sent: Vec<Rank>,
    /// The ads whose counts changed since the last `settle`, an ad once per change.
    changed: Vec<u64>,
}

impl LocalTop {
    /// Adds `change` to `ad`'s count, which must not be below zero once a time's changes are
    /// all made.
    fn change(&mut self, ad: u64, change: i64) {
        let count = self.counts.entry(ad).or_insert(0);
        *count += change;
        if *count == 0 {
            self.counts.remove(&ad);
        }
        self.changed.push(ad);
    }

    fn is_changed(&self) -> bool {
        !self.changed.is_empty()
    }

    /// Finds the local top `k` of the counts after the changes since the last call, and calls
    /// `give(rank, -1)` for each rank that left it and `give(rank, 1)` for each that entered.
    /// `ranked` is room to work in.
    ///
    /// Every ad outside a full top K ranks below its last member, and a change can only move the
    /// changed ad: so unless a member fell, the new top K is among the old members and the changed
    /// ads. When one fell, an ad outside may have overtaken it, and the top K is selected again
    /// from every count, in linear time.
    fn settle(&mut self, k: usize, ranked: &mut Vec<Rank>, mut give: impl FnMut(Rank, isize)) {
        if self.changed.is_empty() {
            return;
        }
        self.changed.sort_unstable();
        self.changed.dedup();
        let (counts, changed) = (&self.counts, &self.changed);
        assert!(changed.iter().all(|ad| counts.get(ad).is_none_or(|&count| count > 0)), "a count went below zero");
        let count = |ad: u64| counts.get(&ad).copied().unwrap_or(0) as u64;
        let last = k.checked_sub(1).and_then(|last| self.sent.get(last)).copied();
        let member_fell = last.is_some()
            && self.sent.iter().any(|&r| {
                let (ad, clicks) = unrank(r);
                changed.binary_search(&ad).is_ok() && count(ad) < clicks
            });
        ranked.clear();
        if member_fell {
            ranked.extend(counts.iter().map(|(&ad, &clicks)| rank(ad, clicks as u64)));
        } else {
            ranked.extend(self.sent.iter().filter(|&&(_, ad)| changed.binary_search(&ad).is_err()));
            ranked.extend(
                changed
                    .iter()
                    .map(|&ad| (ad, count(ad)))
                    .filter(|&(_, clicks)| clicks > 0)
                    .map(|(ad, clicks)| rank(ad, clicks))
                    .filter(|r| last.is_none_or(|last| *r <= last)),
            );
        }
        select_first(ranked, k);
        for_each_difference(&self.sent, ranked, &mut give);
        self.sent.clear();
        self.sent.extend_from_slice(ranked);
        self.changed.clear();
    }

    /// How many ads have a count.
    fn len(&self) -> usize {
        self.counts.len()
    }

    /// No ad has a count, and none is in the top K.
    fn is_empty(&self) -> bool {
        self.counts.is_empty() && self.sent.is_empty()
    }

    /// Forgets every count, keeping the room.
    fn clear(&mut self) {
        self.counts.clear();
        self.sent.clear();
        self.changed.clear();
    }
}

/// Calls `give(r, -1)` for each rank of `before` not in `after` and `give(r, 1)` for each of
/// `after` not in `before`; both sorted.
fn for_each_difference(before: &[Rank], after: &[Rank], mut give: impl FnMut(Rank, isize)) {
    let (mut b, mut a) = (before.iter().peekable(), after.iter().peekable());
    loop {
        match (b.peek(), a.peek()) {
            (Some(&&x), Some(&&y)) if x == y => {
                b.next();
                a.next();
            }
            (Some(&&x), Some(&&y)) if x < y => {
                give(x, -1);
                b.next();
            }
            (_, Some(&&y)) => {
                give(y, 1);
                a.next();
            }
            (Some(&&x), None) => {
                give(x, -1);
                b.next();
            }
            (None, None) => break,
        }
    }
}

/// Leaves the first `k` of `ranked` at its front, sorted, and drops the rest, in time linear in
/// its length.
fn select_first(ranked: &mut Vec<Rank>, k: usize) {
    if ranked.len() > k {
        ranked.select_nth_unstable(k);
        ranked.truncate(k);
    }
    ranked.sort_unstable();
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{select_first, top_k_of_counts, top_k_per_minute};
    use crate::render::testing::{generator, held_at, minute_updates, run_operator, rules_and_workers, times_of};
    use crate::types::{Minute, Time};

    #[test]
    fn select_first_keeps_the_first_k_in_order() {
        let ranks = || (0..1000u64).map(|i| ((i * 7919) % 1000, i));
        let mut ranked: Vec<(u64, u64)> = ranks().collect();
        select_first(&mut ranked, 10);
        let mut expected: Vec<(u64, u64)> = ranks().collect();
        expected.sort_unstable();
        expected.truncate(10);
        assert_eq!(ranked, expected);
        let mut short = vec![(3, 1), (1, 2)];
        select_first(&mut short, 10);
        assert_eq!(short, vec![(1, 2), (3, 1)]);
    }

    /// Count changes `((group, ad), time, change)` from a seeded generator: mostly clicks, some
    /// taken back, and now and then a group emptied (a minute forgotten), never below zero.
    fn changes(seed: u64, count: usize) -> Vec<((u32, u64), Time, isize)> {
        let mut next = generator(seed);
        let mut counts: BTreeMap<(u32, u64), isize> = BTreeMap::new();
        let mut changes = Vec::new();
        let mut time = 0;
        for _ in 0..count {
            time += next(3);
            let group = next(3) as u32;
            match next(20) {
                0 => {
                    for (key, clicks) in counts.iter_mut().filter(|(key, _)| key.0 == group) {
                        changes.push((*key, time, -*clicks));
                        *clicks = 0;
                    }
                }
                1..=4 => {
                    let key = (group, next(30));
                    let clicks = counts.entry(key).or_default();
                    let taken = (next(3) as isize).min(*clicks);
                    *clicks -= taken;
                    changes.push((key, time, -taken));
                }
                _ => {
                    let key = (group, next(30));
                    let added = 1 + next(4) as isize;
                    *counts.entry(key).or_default() += added;
                    changes.push((key, time, added));
                }
            }
        }
        changes.retain(|change| change.2 != 0);
        changes
    }

    /// The top `k` of each group at `time`, by clicks descending then ad, from every change so far.
    fn reference(changes: &[((u32, u64), Time, isize)], time: Time, k: usize) -> BTreeMap<(u32, (u64, u64)), isize> {
        let mut counts: BTreeMap<(u32, u64), isize> = BTreeMap::new();
        for (key, _, change) in changes.iter().filter(|c| c.1 <= time) {
            *counts.entry(*key).or_default() += change;
        }
        let mut tops = BTreeMap::new();
        for group in 0..3 {
            let mut ranked: Vec<(u64, u64)> =
                counts.iter().filter(|(key, clicks)| key.0 == group && **clicks > 0).map(|(key, clicks)| (u64::MAX - *clicks as u64, key.1)).collect();
            ranked.sort();
            for (inverse, ad) in ranked.into_iter().take(k) {
                tops.insert((group, (ad, u64::MAX - inverse)), 1);
            }
        }
        tops
    }

    #[test]
    fn top_k_of_counts_matches_a_reference_at_every_time() {
        for seed in 0..8 {
            for workers in [1, 3] {
                let k = 5;
                let changes = changes(seed, 400);
                let output = run_operator(workers, &changes, move |keys| {
                    let changes = |&(group, ad): &(u32, u64), time, diff: isize, emit: &mut dyn FnMut(_, _, _, _)| {
                        emit(group, ad, time, diff as i64)
                    };
                    top_k_of_counts("Top", keys, |&(_, ad)| ad, changes, k)
                });
                for time in times_of(&changes, &output) {
                    assert_eq!(held_at(&output, time), reference(&changes, time, k), "seed {seed}, {workers} workers, time {time}");
                }
            }
        }
    }

    /// The top `k` of each minute at `time`, from every update up to then.
    fn reference_per_minute(updates: &[((Minute, u64), Time, isize)], time: Time, k: usize) -> BTreeMap<(Minute, (u64, u64)), isize> {
        let mut counts: BTreeMap<(Minute, u64), isize> = BTreeMap::new();
        for (key, _, diff) in updates.iter().filter(|u| u.1 <= time) {
            *counts.entry(*key).or_default() += diff;
        }
        let mut ranked: BTreeMap<Minute, Vec<(u64, u64)>> = BTreeMap::new();
        for (&(minute, ad), &clicks) in counts.iter().filter(|(_, clicks)| **clicks > 0) {
            ranked.entry(minute).or_default().push((u64::MAX - clicks as u64, ad));
        }
        let mut tops = BTreeMap::new();
        for (minute, mut ranked) in ranked {
            ranked.sort();
            for (inverse, ad) in ranked.into_iter().take(k) {
                tops.insert((minute, (ad, u64::MAX - inverse)), 1);
            }
        }
        tops
    }

    #[test]
    fn top_k_per_minute_matches_a_reference_at_every_time() {
        for seed in 0..6 {
            for (rules, workers) in rules_and_workers() {
                let k = 2;
                let updates = minute_updates(seed, 300, &rules);
                // As `MinuteClicks` gives them, the clicks stop at their minute's final time: the
                // minute is forgotten with or without retention's retractions.
                let until_final: Vec<_> =
                    updates.iter().filter(|(key, time, _)| rules.minute_final_at(key.0).is_none_or(|at| *time < at)).cloned().collect();
                // A time's changes come in any order (from several workers, or from paths that
                // add and take back the same click): a count may go below zero before a time's
                // last change.
                let transient: Vec<_> = updates
                    .iter()
                    .flat_map(|&(key, time, diff)| {
                        let before = if diff > 0 { vec![(key, time, -1), (key, time, 1)] } else { Vec::new() };
                        before.into_iter().chain([(key, time, diff)])
                    })
                    .collect();
                for input in [&updates, &until_final, &transient] {
                    let output = run_operator(workers, input, move |clicks| top_k_per_minute("TopMinute", clicks, k, &rules));
                    for time in times_of(&updates, &output) {
                        let expected = reference_per_minute(&updates, time, k);
                        assert_eq!(held_at(&output, time), expected, "seed {seed}, {workers} workers, time {time}, {rules:?}");
                    }
                }
            }
        }
    }
}
