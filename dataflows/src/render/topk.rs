//! Top-K (SPEC §3 answer 2), two ways.
//!
//! One `reduce` over every ad of a minute re-sorts the whole minute whenever one count moves
//! (differential #29). [`top_k`] is hierarchical: each level keeps the top K of a hash bucket of
//! ad ids, and the next level the top K of the winners of several buckets, so that a changed
//! count re-sorts one small bucket, and moves up only while it is still among the winners. It
//! ranks any collection of counts, all in arrangements.
//!
//! [`top_k_of_counts`] ranks counts it keeps itself, one share of the ads per worker, and updates
//! each worker's top K from the changed counts alone unless one of its members falls. The minutes
//! (whose counts only rise until the minute is forgotten) and the sliding windows (where every
//! count of a window changes each minute) use it; the per-country minutes, served only, keep
//! [`top_k`] and its inspectable arrangements.

use std::collections::BTreeMap;

use differential_dataflow::collection::AsCollection;
use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;

use crate::hashing::{FastMap, FastSet};
use crate::plan::Plan;
use crate::render::minute_state::StateLog;
use crate::types::Time;

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
        let mut counts: FastMap<G, FastMap<u64, i64>> = FastMap::default();
        let mut sent: FastMap<G, Vec<Rank>> = FastMap::default();
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
                let mut touched: BTreeMap<G, Touched> = BTreeMap::new();
                for ((group, ad), change) in held {
                    if change == 0 {
                        continue;
                    }
                    let group_counts = counts.entry(group.clone()).or_default();
                    let count = group_counts.entry(ad).or_insert(0);
                    let old = *count;
                    *count += change;
                    let new = *count;
                    assert!(new >= 0, "{operator}: a count went below zero");
                    if new == 0 {
                        group_counts.remove(&ad);
                    }
                    // A full local top K loses a member to ads outside it only when one of its
                    // members falls: then it must be found again from every count.
                    let falls_from_top = change < 0
                        && sent.get(&group).is_some_and(|top| top.len() == k && top.binary_search(&rank(ad, old as u64)).is_ok());
                    let touched = touched.entry(group).or_default();
                    touched.rescan |= falls_from_top;
                    touched.changed.push((ad, new as u64));
                }
                let mut session = output.session(&capability);
                for (group, touched) in touched {
                    let before = sent.remove(&group).unwrap_or_default();
                    ranked.clear();
                    if touched.rescan {
                        if let Some(group_counts) = counts.get(&group) {
                            ranked.extend(group_counts.iter().map(|(&ad, &clicks)| rank(ad, clicks as u64)));
                        }
                    } else {
                        // Every ad outside the top K ranks below its last member, and only the
                        // changed ones can have risen above it.
                        let changed: FastSet<u64> = touched.changed.iter().map(|&(ad, _)| ad).collect();
                        let last = (before.len() == k).then(|| before[k - 1]);
                        ranked.extend(before.iter().filter(|(_, ad)| !changed.contains(ad)));
                        ranked.extend(
                            touched
                                .changed
                                .iter()
                                .filter(|&&(_, clicks)| clicks > 0)
                                .map(|&(ad, clicks)| rank(ad, clicks))
                                .filter(|r| last.is_none_or(|last| *r <= last)),
                        );
                    }
                    select_first(&mut ranked, k);
                    let time = *capability.time();
                    for_each_difference(&before, &ranked, |r, diff| session.give(((group.clone(), r), time, diff)));
                    if ranked.is_empty() {
                        counts.remove(&group);
                    } else {
                        sent.insert(group, ranked.clone());
                    }
                }
                if let Some(before) = reported {
                    let held = counts.values().map(|group_counts| group_counts.len()).sum();
                    log.resized(before, held);
                    reported = Some(held);
                }
            }
            if frontier.frontier().is_empty() && pending.is_empty() {
                if let Some(held) = reported.take() {
                    log.dropped(held);
                    counts.clear();
                    sent.clear();
                }
            }
        }
    });
    keep_top(name, local.as_collection(), k).map(|(group, r)| (group, unrank(r)))
}

/// What one time changed in one group: each changed ad with its new count, and whether a member
/// of the local top K fell.
#[derive(Default)]
struct Touched {
    rescan: bool,
    changed: Vec<(u64, u64)>,
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

    use super::{select_first, top_k_of_counts};
    use crate::render::testing::{generator, held_at, run_operator, times_of};
    use crate::types::Time;

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
}
