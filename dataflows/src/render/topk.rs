//! Top-K (SPEC §3 answer 2), two ways.
//!
//! One `reduce` over every ad of a minute re-sorts the whole minute whenever one count moves
//! (differential #29). [`top_k`] is hierarchical: each level keeps the top K of a hash bucket of
//! ad ids, and the next level the top K of the winners of several buckets, so that a changed
//! count re-sorts one small bucket, and moves up only while it is still among the winners. It
//! ranks any collection of counts, all in arrangements.
//!
//! [`top_k_per_minute`] and the sliding windows ([`sliding_top_k`](crate::render::windows::sliding_top_k))
//! rank counts they keep themselves, one share of the ads per worker, and update each worker's
//! top K from the changed counts alone unless one of its members falls (`LocalTop`); a `reduce`
//! over the workers' local tops gives the global one. The per-country minutes, served only, keep
//! [`top_k`] and its inspectable arrangements.

use differential_dataflow::VecCollection;

use crate::event_time::EventTimeRules;
use crate::hashing::ProbeMap;
use crate::plan::Plan;
use crate::render::minute_state::{per_minute, MinuteState};
use crate::types::{Minute, Time};

/// Sort key of a ranked entry: clicks descending, then ad ascending.
pub(crate) type Rank = (u64, u64);

fn rank(ad: u64, clicks: u64) -> Rank {
    (u64::MAX - clicks, ad)
}

pub(crate) fn unrank((inverse_clicks, ad): Rank) -> (u64, u64) {
    (ad, u64::MAX - inverse_clicks)
}

/// A well-mixed bucket of an ad id; ad ids themselves may be dense or patterned.
pub(crate) fn bucket_of(ad: u64) -> u32 {
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
pub(crate) fn keep_top<'scope, K>(
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

/// The top `k` ads of each minute, from the clicks per `(minute, ad)` (with the clicks as their
/// multiplicity, as [`MinuteClicks::ad`](crate::render::counts::MinuteClicks::ad) gives them), as
/// `(minute, (ad, clicks))`, ranked by clicks descending, then ad ascending: the same collection,
/// time for time, as counting the clicks per (minute, ad) and ranking them with [`top_k`].
///
/// Each worker keeps the counts of its share of the ads for each minute ([`per_minute`]), and
/// updates its local top K from the changed counts (`LocalTop`); a `reduce` over the workers'
/// local tops gives the global one. A minute's counts are forgotten whole when it is final, and
/// its top K retracted then, so the clicks need not be retracted to forget them. The counts are
/// not an arrangement, so they cannot be shared or inspected as one; that is the price.
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

    fn prefetch(&self, &(_, ad): &(Minute, u64)) {
        self.top.prefetch(ad);
    }

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
pub(crate) struct LocalTop {
    /// Below zero only between `change` and `settle`: a time's changes may come in any order. A
    /// count that reaches zero stays until `settle`, so that its ad is in `changed` once.
    counts: ProbeMap<u64, Count>,
    /// The local top K last sent, sorted.
    sent: Vec<Rank>,
    /// The ads whose counts changed since the last `settle`, each once.
    changed: Vec<u64>,
}

/// An ad's count, and whether it changed since the last `settle`.
struct Count {
    clicks: i64,
    changed: bool,
}

/// How many changed ads ahead `settle` prefetches the count of.
const PREFETCH_AHEAD: usize = 8;

impl LocalTop {
    /// A hint that `ad`'s count is changed soon (see [`ProbeMap::prefetch`]).
    pub(crate) fn prefetch(&self, ad: u64) {
        self.counts.prefetch(&ad);
    }

    /// Adds `change` to `ad`'s count, which must not be below zero once a time's changes are
    /// all made.
    pub(crate) fn change(&mut self, ad: u64, change: i64) {
        let count = self.counts.get_or_insert_with(ad, || Count { clicks: 0, changed: false });
        count.clicks += change;
        if !count.changed {
            count.changed = true;
            self.changed.push(ad);
        }
    }

    pub(crate) fn is_changed(&self) -> bool {
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
    pub(crate) fn settle(&mut self, k: usize, ranked: &mut Vec<Rank>, mut give: impl FnMut(Rank, isize)) {
        if self.changed.is_empty() {
            return;
        }
        let last = k.checked_sub(1).and_then(|last| self.sent.get(last)).copied();
        ranked.clear();
        // The members that did not change stay candidates; a member that changed is one of the
        // changed ads. (A member's count is held until `settle` finds it zero.)
        let mut member_fell = false;
        for &r in &self.sent {
            let (ad, clicks) = unrank(r);
            let count = self.counts.get(&ad).expect("a member of the top K has a count");
            if !count.changed {
                ranked.push(r);
            } else if count.clicks < clicks as i64 {
                member_fell = true;
            }
        }
        let member_fell = member_fell && last.is_some();
        for at in 0..self.changed.len() {
            if let Some(&ahead) = self.changed.get(at + PREFETCH_AHEAD) {
                self.counts.prefetch(&ahead);
            }
            let ad = self.changed[at];
            let count = self.counts.get_mut(&ad).expect("a changed ad has a count");
            count.changed = false;
            let clicks = count.clicks;
            assert!(clicks >= 0, "a count went below zero");
            if clicks == 0 {
                self.counts.remove(&ad);
            } else if !member_fell {
                let r = rank(ad, clicks as u64);
                if last.is_none_or(|last| r <= last) {
                    ranked.push(r);
                }
            }
        }
        if member_fell {
            ranked.clear();
            ranked.extend(self.counts.iter().map(|(&ad, count)| rank(ad, count.clicks as u64)));
        }
        select_first(ranked, k);
        for_each_difference(&self.sent, ranked, &mut give);
        self.sent.clear();
        self.sent.extend_from_slice(ranked);
        self.changed.clear();
    }

    /// How many ads have a count.
    pub(crate) fn len(&self) -> usize {
        self.counts.len()
    }

    /// No ad has a count, and none is in the top K.
    pub(crate) fn is_empty(&self) -> bool {
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

    use super::{select_first, top_k_per_minute};
    use crate::render::testing::{held_at, minute_updates, reference_top_k, run_operator, rules_and_workers, times_of, with_transient_negatives};
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

    /// The top `k` of each minute at `time`, from every update up to then.
    fn reference_per_minute(updates: &[((Minute, u64), Time, isize)], time: Time, k: usize) -> BTreeMap<(Minute, (u64, u64)), isize> {
        let mut counts: BTreeMap<(Minute, u64), isize> = BTreeMap::new();
        for (key, _, diff) in updates.iter().filter(|u| u.1 <= time) {
            *counts.entry(*key).or_default() += diff;
        }
        reference_top_k(&counts, k)
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
                let transient = with_transient_negatives(&updates);
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
