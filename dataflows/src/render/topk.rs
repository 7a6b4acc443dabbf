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
//! top K from the changed counts and a pool of candidates, looking at every count only when the
//! pool runs short (`LocalTop`); a `reduce` over the workers' local tops gives the global one.
//! The per-country minutes, served only, are ranked the same way ([`top_k_per_minute_in_groups`]).

use differential_dataflow::trace::implementations::{ValBuilder, ValSpine};
use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Pipeline;

use crate::event_time::EventTimeRules;
use crate::hashing::{FastMap, ProbeMap, PREFETCH_AHEAD};
use crate::plan::Plan;
use crate::render::minute_state::{per_minute, MinuteState};
use crate::render::peekable::FirstRows;
use crate::render::partition::{bucket_of, ByAd};
use crate::render::traces::register_trace;
use crate::types::{Country, Minute, Time};

/// Sort key of a ranked entry: clicks descending, then ad ascending.
pub(crate) type Rank = (u64, u64);

fn rank(ad: u64, clicks: u64) -> Rank {
    (u64::MAX - clicks, ad)
}

pub(crate) fn unrank((inverse_clicks, ad): Rank) -> (u64, u64) {
    (ad, u64::MAX - inverse_clicks)
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

/// Keeps the first `k` ranks of each key: differential's `reduce_named`, spelled out so that
/// its input arrangement (`Arrange: {name}`) and its output (`name`) can be peeked at
/// ([`register_trace`]).
pub(crate) fn keep_top<'scope, K>(
    name: &str,
    ranked: VecCollection<'scope, Time, (K, Rank)>,
    k: usize,
) -> VecCollection<'scope, Time, (K, Rank)>
where
    K: differential_dataflow::ExchangeData + std::hash::Hash + serde::Serialize,
{
    let input = ranked.arrange_by_key_named(&format!("Arrange: {name}"));
    register_trace(&format!("Arrange: {name}"), &input.trace);
    let output = input.reduce_abelian::<_, ValBuilder<_, _, _, _>, ValSpine<K, Rank, Time, isize>, _, _>(
        name,
        move |_key, input, output| keep_first(k, input, output),
        |updates, key, values| {
            updates.clear();
            updates.extend(values.drain(..).map(|(v, t, r)| ((key.clone(), v), t, r)));
        },
    );
    register_trace(name, &output.trace);
    output.as_collection(|key, rank| (key.clone(), *rank))
}

/// The reduction of [`keep_top`]: the first `k` ranks of a key, from its ranks in order.
fn keep_first(k: usize, input: &[(&Rank, isize)], output: &mut Vec<(Rank, isize)>) {
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
}

/// The top `k` ads of each minute, from the clicks per `(minute, ad)` (with the clicks as their
/// multiplicity, as [`MinuteClicks::ad`](crate::render::counts::MinuteClicks::ad) gives them), as
/// `(minute, (ad, clicks))`, ranked by clicks descending, then ad ascending: the same collection,
/// time for time, as counting the clicks per (minute, ad) and ranking them with [`top_k`].
///
/// Each worker keeps the counts of the ads it holds (the clicks are partitioned by ad, so an ad's
/// count is whole on one worker) for each minute ([`per_minute`]), and
/// updates its local top K from the changed counts (`LocalTop`); a `reduce` over the workers'
/// local tops gives the global one. A minute's counts are forgotten whole when it is final, and
/// its top K retracted then, so the clicks need not be retracted to forget them. The counts are
/// not an arrangement, so they cannot be shared or inspected as one; that is the price.
pub fn top_k_per_minute<'scope>(
    name: &str,
    clicks: ByAd<'scope, (Minute, u64)>,
    k: usize,
    rules: &EventTimeRules,
) -> VecCollection<'scope, Time, (Minute, (u64, u64))> {
    let empty = move || TopOfMinute { minute: 0, k, top: LocalTop::default(), ranked: Vec::new() };
    let local = per_minute(&format!("{name}Local"), clicks.into_collection(), Pipeline, |&(minute, _)| minute, rules, empty);
    keep_top(name, local, k).map(|(minute, r)| (minute, unrank(r)))
}

/// The top K of each (minute, country): `((minute, country), (ad, clicks))`.
pub type CountryMinuteTop<'scope> = VecCollection<'scope, Time, ((Minute, Country), (u64, u64))>;

/// [`top_k_per_minute`] within countries: the top `k` ads of each `(minute, country)`, from the
/// clicks per `(minute, country, ad)`, as `((minute, country), (ad, clicks))`; the same
/// collection, time for time, as counting them and ranking them with [`top_k`].
///
/// Measured on a 2M-event replay with `--serve`, [`top_k`]'s levels of arrangements for the
/// per-country minutes took a quarter of the workers' time; kept per minute like the global top,
/// they cost about what the global top does.
pub fn top_k_per_minute_in_groups<'scope>(
    name: &str,
    clicks: ByAd<'scope, (Minute, Country, u64)>,
    k: usize,
    rules: &EventTimeRules,
) -> CountryMinuteTop<'scope> {
    let empty = move || TopOfMinuteInGroups { minute: 0, k, tops: FastMap::default(), touched: Vec::new(), ranked: Vec::new() };
    let local = per_minute(&format!("{name}Local"), clicks.into_collection(), Pipeline, |&(minute, _, _)| minute, rules, empty);
    keep_top(name, local, k).map(|(group, r)| (group, unrank(r)))
}

/// One minute's counts of one worker's share of the ads, and their local top K, per group.
struct TopOfMinuteInGroups<G> {
    minute: Minute,
    k: usize,
    tops: FastMap<G, LocalTop>,
    /// The groups changed since the last `settle`, each once.
    touched: Vec<G>,
    ranked: Vec<Rank>,
}

impl<G: differential_dataflow::ExchangeData + std::hash::Hash + serde::Serialize> MinuteState for TopOfMinuteInGroups<G> {
    type Update = (Minute, G, u64);
    type Output = ((Minute, G), Rank);

    fn apply(&mut self, (minute, group, ad): (Minute, G, u64), diff: isize, _emit: &mut impl FnMut(Self::Output, isize)) {
        self.minute = minute;
        let top = match self.tops.get_mut(&group) {
            Some(top) => top,
            None => self.tops.entry(group.clone()).or_default(),
        };
        if !top.is_changed() {
            self.touched.push(group);
        }
        top.change(ad, diff as i64);
    }

    fn settle(&mut self, emit: &mut impl FnMut(Self::Output, isize)) {
        let minute = self.minute;
        for group in self.touched.drain(..) {
            let top = self.tops.get_mut(&group).expect("a touched group has counts");
            top.settle(self.k, &mut self.ranked, |r, diff| emit(((minute, group.clone()), r), diff));
            if top.is_empty() {
                self.tops.remove(&group);
            }
        }
    }

    fn retire(&mut self, emit: &mut impl FnMut(Self::Output, isize)) {
        for (group, top) in self.tops.drain() {
            for &r in &top.sent {
                emit(((self.minute, group.clone()), r), -1);
            }
        }
        self.touched.clear();
    }

    fn keys(&self) -> usize {
        self.tops.values().map(LocalTop::len).sum()
    }

    /// Each `(minute, group, ad)` this worker counts, with its clicks as its multiplicity.
    fn peek(&self, minute: Minute, rows: &mut FirstRows) {
        if rows.may_hold(minute) {
            for (group, top) in &self.tops {
                for (ad, count) in top.counts.iter().filter(|(_, c)| c.clicks != 0) {
                    rows.offer(&(minute, group, *ad), &(), count.clicks as isize);
                }
            }
        }
    }
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

    /// Each `(minute, ad)` this worker counts, with its clicks as its multiplicity.
    fn peek(&self, minute: Minute, rows: &mut FirstRows) {
        if rows.may_hold(minute) {
            for (ad, count) in self.top.counts.iter().filter(|(_, c)| c.clicks != 0) {
                rows.offer(&(minute, *ad), &(), count.clicks as isize);
            }
        }
    }
}

/// One group's counts on one worker, and the local top K last sent for them.
///
/// The top K is selected from a pool of candidates, not from every count: every ad outside the
/// pool ranks behind `bar`, so while at least K members rank at or before it, the top K is among
/// them. A count changes only through `change`, so an ad outside the pool stays behind the bar
/// until it changes, and is looked at then. Only when the pool runs short (members fell
/// behind the bar, as when a minute leaves a sliding window and takes clicks from every ad) is
/// the pool selected again from every count, with the bar at its last member.
///
/// A count that rises is checked against the bar in `change`, where it is in hand, and joins the
/// pool there; only ads whose counts fell (which may have to leave, or reach zero) are looked up
/// again in `settle`. Within a minute counts only rise, so a minute's top K looks each changed
/// ad up once.
pub(crate) struct LocalTop {
    /// Below zero only between `change` and `settle`: a time's changes may come in any order. A
    /// count that reaches zero stays until `settle`, so that its ad is in `fallen` once.
    counts: ProbeMap<u64, Count>,
    /// The local top K last sent, sorted.
    sent: Vec<Rank>,
    /// The ads whose counts fell since the last `settle`, each once.
    fallen: Vec<u64>,
    /// Whether any count changed since the last `settle`.
    changed: bool,
    /// The candidates, each once: every ad with a count that ranks at or before `bar`, and maybe
    /// others.
    pool: Vec<u64>,
    bar: Rank,
}

impl Default for LocalTop {
    fn default() -> Self {
        LocalTop { counts: ProbeMap::default(), sent: Vec::new(), fallen: Vec::new(), changed: false, pool: Vec::new(), bar: LAST_RANK }
    }
}

/// Behind every ad's rank: with the bar here, every ad with a count is in the pool.
const LAST_RANK: Rank = (u64::MAX, u64::MAX);

/// An ad's count, whether it fell since the last `settle`, and whether it is in the pool.
struct Count {
    clicks: i64,
    fell: bool,
    pooled: bool,
}

impl Count {
    /// Puts `ad`, whose count this is, in `pool` if the count ranks at or before `bar` and the
    /// ad is not there yet.
    fn join_pool_if_before(&mut self, bar: Rank, ad: u64, pool: &mut Vec<u64>) {
        if !self.pooled && self.clicks > 0 && rank(ad, self.clicks as u64) <= bar {
            self.pooled = true;
            pool.push(ad);
        }
    }
}

/// A pool selected from every count keeps this many times K candidates, and is cut back to that
/// once it has grown to twice as many: room for the top K to drift before the pool runs short,
/// little enough to walk at every `settle`.
const POOL_PER_K: usize = 4;

impl LocalTop {
    /// Calls `f` with each ad counted and its clicks, those at zero (until `settle`) left out.
    pub(crate) fn for_each_count(&self, mut f: impl FnMut(u64, i64)) {
        for (ad, count) in self.counts.iter().filter(|(_, c)| c.clicks != 0) {
            f(*ad, count.clicks);
        }
    }

    /// A hint that `ad`'s count is changed soon (see [`ProbeMap::prefetch`]).
    pub(crate) fn prefetch(&self, ad: u64) {
        self.counts.prefetch(&ad);
    }

    /// Adds `change` to `ad`'s count, which must not be below zero once a time's changes are
    /// all made.
    pub(crate) fn change(&mut self, ad: u64, change: i64) {
        self.changed = true;
        let count = self.counts.get_or_insert_with(ad, || Count { clicks: 0, fell: false, pooled: false });
        count.clicks += change;
        // A change of zero is taken as a fall, so that a count it leaves at zero goes in `settle`.
        if change <= 0 {
            if !count.fell {
                count.fell = true;
                self.fallen.push(ad);
            }
        } else {
            // It may fall behind the bar again before `settle`: the pool may hold others.
            count.join_pool_if_before(self.bar, ad, &mut self.pool);
        }
    }

    pub(crate) fn is_changed(&self) -> bool {
        self.changed
    }

    /// Finds the local top `k` of the counts after the changes since the last call, and calls
    /// `give(rank, -1)` for each rank that left it and `give(rank, 1)` for each that entered.
    /// `ranked` is room to work in.
    pub(crate) fn settle(&mut self, k: usize, ranked: &mut Vec<Rank>, mut give: impl FnMut(Rank, isize)) {
        if !self.changed {
            return;
        }
        self.changed = false;
        // Ads whose counts fell may have risen after (changes come in any order): those that now
        // rank at or before the bar join the pool; counts that reached zero go (and leave the pool
        // below). Ads whose counts only rose joined in `change`.
        for at in 0..self.fallen.len() {
            if let Some(&ahead) = self.fallen.get(at + PREFETCH_AHEAD) {
                self.counts.prefetch(&ahead);
            }
            let ad = self.fallen[at];
            let count = self.counts.get_mut(&ad).expect("a fallen ad has a count");
            count.fell = false;
            assert!(count.clicks >= 0, "a count went below zero");
            if count.clicks == 0 {
                self.counts.remove(&ad);
            } else {
                count.join_pool_if_before(self.bar, ad, &mut self.pool);
            }
        }
        self.fallen.clear();
        // Members behind the bar may leave the pool: nothing outside it ranks before the bar.
        let (counts, bar) = (&mut self.counts, self.bar);
        ranked.clear();
        self.pool.retain(|&ad| match counts.get_mut(&ad) {
            None => false,
            Some(count) if rank(ad, count.clicks as u64) > bar => {
                count.pooled = false;
                false
            }
            Some(count) => {
                ranked.push(rank(ad, count.clicks as u64));
                true
            }
        });
        let room = POOL_PER_K * k.max(1);
        if ranked.len() < k && self.bar != LAST_RANK {
            // Short of K: an ad behind the bar may now be in the top K. Select the pool again.
            ranked.clear();
            ranked.extend(self.counts.iter().map(|(&ad, count)| rank(ad, count.clicks as u64)));
            self.repool(ranked, room, true);
        } else if ranked.len() > 2 * room {
            self.repool(ranked, room, false);
        }
        select_first(ranked, k);
        for_each_difference(&self.sent, ranked, &mut give);
        self.sent.clear();
        self.sent.extend_from_slice(ranked);
    }

    /// Makes the first `room` of `ranked` (or all of it, if it is no longer) the pool, with the
    /// bar at its last member, or behind every rank when `ranked` held every count and all of it
    /// is kept; `ranked` is left holding the pool's ranks. `every` says whether `ranked` holds
    /// every count or the pool's members.
    fn repool(&mut self, ranked: &mut Vec<Rank>, room: usize, every: bool) {
        for ad in self.pool.drain(..) {
            if let Some(count) = self.counts.get_mut(&ad) {
                count.pooled = false;
            }
        }
        if ranked.len() > room {
            ranked.select_nth_unstable(room - 1);
            ranked.truncate(room);
            self.bar = ranked[room - 1];
        } else if every {
            self.bar = LAST_RANK;
        }
        for &r in ranked.iter() {
            let (ad, _) = unrank(r);
            self.counts.get_mut(&ad).expect("a ranked ad has a count").pooled = true;
            self.pool.push(ad);
        }
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
        self.fallen.clear();
        self.changed = false;
        self.pool.clear();
        self.bar = LAST_RANK;
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

    use super::{rank, select_first, top_k_per_minute, top_k_per_minute_in_groups, LocalTop, Rank};
    use crate::render::partition::ByAd;
    use crate::render::testing::{generator, held_at, minute_updates, reference_top_k, rules_and_workers, run_operator, scattered, times_of, with_transient_negatives};
    use crate::types::{Country, Minute, Time};

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
                    let output = run_operator(workers, input, move |clicks| top_k_per_minute("TopMinute", ByAd::exchange(scattered(clicks)), k, &rules));
                    for time in times_of(&updates, &output) {
                        let expected = reference_per_minute(&updates, time, k);
                        assert_eq!(held_at(&output, time), expected, "seed {seed}, {workers} workers, time {time}, {rules:?}");
                    }
                }
            }
        }
    }

    /// The top K of each (minute, group), three groups (as countries) sharing ads, against a
    /// ranking from scratch at every time, with and without retention's retractions, and with
    /// counts that dip below zero within a time.
    #[test]
    fn top_k_per_minute_in_groups_matches_a_reference_at_every_time() {
        for seed in 0..6 {
            for (rules, workers) in rules_and_workers() {
                let k = 2;
                let grouped = |updates: &[((Minute, u64), Time, isize)]| -> Vec<((Minute, Country, u64), Time, isize)> {
                    updates.iter().map(|&((minute, ad), time, diff)| ((minute, Country((ad % 3) as u16), ad / 3), time, diff)).collect()
                };
                let updates = minute_updates(seed, 300, &rules);
                let until_final: Vec<_> =
                    updates.iter().filter(|(key, time, _)| rules.minute_final_at(key.0).is_none_or(|at| *time < at)).cloned().collect();
                let transient = with_transient_negatives(&updates);
                let all = grouped(&updates);
                for input in [grouped(&updates), grouped(&until_final), grouped(&transient)] {
                    let output = run_operator(workers, &input, move |clicks| {
                        top_k_per_minute_in_groups("TopCountryMinute", ByAd::exchange(scattered(clicks)), k, &rules)
                    });
                    for time in times_of(&all, &output) {
                        let mut counts: BTreeMap<((Minute, Country), u64), isize> = BTreeMap::new();
                        for ((minute, group, ad), _, diff) in all.iter().filter(|u| u.1 <= time) {
                            *counts.entry(((*minute, *group), *ad)).or_default() += diff;
                        }
                        let expected = reference_top_k(&counts, k);
                        assert_eq!(held_at(&output, time), expected, "seed {seed}, {workers} workers, time {time}, {rules:?}");
                    }
                }
            }
        }
    }

    /// `LocalTop` against a from-scratch ranking after every settle, over runs of changes that
    /// make its pool run short and overflow: many ads against a small K, counts that grow, that
    /// drain as when a minute leaves a window (every ad loses some), that pass through zero and
    /// come back, that go below zero within a time, and changes of zero. What `settle` gives must
    /// also add up to the top K it holds.
    #[test]
    fn local_top_matches_a_reference_after_every_settle() {
        for seed in 0..400 {
            let mut next = generator(seed);
            let k = 1 + next(4) as usize;
            let ads = 5 + next(200);
            let mut top = LocalTop::default();
            let mut counts: BTreeMap<u64, i64> = BTreeMap::new();
            let mut given: BTreeMap<Rank, isize> = BTreeMap::new();
            let mut ranked = Vec::new();
            for step in 0..300 {
                let mut changes: Vec<(u64, i64)> = Vec::new();
                match next(4) {
                    // A minute leaves: most ads lose part of their clicks, or all of them.
                    0 => {
                        for (&ad, &count) in &counts {
                            if next(4) != 0 {
                                changes.push((ad, -(1 + next(count as u64) as i64)));
                            }
                        }
                    }
                    // Clicks arrive, skewed towards a few ads.
                    _ => {
                        for _ in 0..next(3 * ads) {
                            let ad = if next(3) == 0 { next(4) } else { next(ads) };
                            changes.push((ad, 1 + next(3) as i64));
                        }
                    }
                }
                // Within a time the changes come in any order, so a count may dip below zero
                // before the change that raised it: take one away early and give it back.
                if let Some(&(ad, _)) = changes.first() {
                    changes.insert(0, (ad, -1));
                    changes.push((ad, 1));
                }
                // A change of nothing, to an ad that has no count, leaves it none.
                if next(8) == 0 {
                    changes.push((ads + next(4), 0));
                }
                for &(ad, change) in &changes {
                    if next(2) == 0 {
                        top.prefetch(ad);
                    }
                    top.change(ad, change);
                    *counts.entry(ad).or_default() += change;
                }
                counts.retain(|_, count| *count != 0);
                top.settle(k, &mut ranked, |r, diff| *given.entry(r).or_default() += diff);
                given.retain(|_, diff| *diff != 0);
                let mut expected: Vec<Rank> = counts.iter().map(|(&ad, &count)| rank(ad, count as u64)).collect();
                expected.sort_unstable();
                expected.truncate(k);
                assert_eq!(top.sent, expected, "seed {seed}, step {step}, k {k}");
                assert_eq!(given.keys().copied().collect::<Vec<_>>(), expected, "seed {seed}, step {step}: what settle gave");
                assert!(given.values().all(|&diff| diff == 1), "seed {seed}, step {step}");
                assert_eq!(top.len(), counts.len(), "seed {seed}, step {step}");
            }
        }
    }
}

/// Peeks at the top K trace through the registry ([`crate::render::traces`]).
#[cfg(test)]
mod trace_peeks {
    use std::collections::BTreeMap;

    use differential_dataflow::input::Input;
    use timely::dataflow::operators::Probe;

    use crate::render::peekable;
    use crate::render::testing::{minute_updates, reference_top_k, rules_and_workers};
    use crate::render::topk::top_k_per_minute;
    use crate::render::partition::ByAd;
    use crate::types::{Minute, Time};

    /// Peeks at `name` on every worker after each time of `updates` is complete, and merges the
    /// workers' rows, as the server's peek does: `(time, prefix, rows)` per peek.
    type Peeked = Vec<(Time, Vec<String>, peekable::StateRows)>;

    fn peek_top_minute(workers: usize, updates: Vec<((Minute, u64), Time, isize)>, rules: crate::event_time::EventTimeRules, k: usize, name: &'static str) -> Peeked {
        let times: Vec<Time> = updates.iter().map(|(_, t, _)| *t).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        let peeked = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<(Time, Vec<String>), peekable::StateRows>::new()));
        let shared = std::sync::Arc::clone(&peeked);
        let dropped_after = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let dropped = std::sync::Arc::clone(&dropped_after);
        timely::execute(timely::Config::process(workers), move |worker| {
            let (mut input, probe) = worker.dataflow::<Time, _, _>(|scope| {
                let (input, clicks) = scope.new_collection::<(Minute, u64), isize>();
                let top = top_k_per_minute("TopMinute", ByAd::exchange(crate::render::testing::scattered(clicks)), k, &rules);
                (input, top.inner.probe().0)
            });
            let mut at = 0;
            for &time in &times {
                if worker.index() == 0 {
                    input.advance_to(time);
                    while at < updates.len() && updates[at].1 == time {
                        input.update(updates[at].0, updates[at].2);
                        at += 1;
                    }
                }
                input.advance_to(time + 1);
                input.flush();
                while probe.less_than(&(time + 1)) {
                    worker.step();
                }
                // Each worker's peek at a minute that exists and at a minute prefix and none.
                let minute = (time / crate::types::MINUTE_MS) as Minute;
                for prefix in [vec![], vec![minute.to_string()], vec![(minute + 1000).to_string()]] {
                    let rows = peekable::peek(name, &prefix, 3);
                    let mut all = shared.lock().unwrap();
                    all.entry((time, prefix)).or_default().merge(rows, 3);
                }
            }
            input.close();
            while worker.step() {}
            // The dataflow is gone, and with it the trace: the registry never held it.
            dropped.lock().unwrap().push(peekable::peek(name, &[], 3));
        })
        .unwrap();
        for after in dropped_after.lock().unwrap().iter() {
            assert!(after.found && after.rows.is_empty() && after.unreadable.as_deref() == Some(crate::render::traces::DROPPED), "{after:?}");
        }
        assert_eq!(dropped_after.lock().unwrap().len(), workers);
        let peeked = peeked.lock().unwrap();
        peeked.iter().map(|((t, p), rows)| (*t, p.clone(), rows.clone())).collect()
    }

    /// The global top K of each minute at `time`, as `(minute, rank)` rows, from scratch.
    fn reference_rows(updates: &[((Minute, u64), Time, isize)], time: Time, k: usize) -> Vec<(String, String, isize)> {
        let mut counts = BTreeMap::new();
        for (key, _, diff) in updates.iter().filter(|(_, t, _)| *t <= time) {
            *counts.entry(*key).or_insert(0) += diff;
        }
        counts.retain(|_, c| *c != 0);
        // In key order, then value (rank) order.
        let mut top: Vec<(Minute, (u64, u64), isize)> =
            reference_top_k(&counts, k).into_iter().map(|((minute, (ad, clicks)), count)| (minute, (u64::MAX - clicks, ad), count)).collect();
        top.sort();
        top.into_iter().map(|(minute, rank, count)| (minute.to_string(), serde_json::to_string(&rank).unwrap(), count)).collect()
    }

    #[test]
    fn peeks_at_the_top_k_trace_match_a_reference_at_every_time() {
        for (rules, workers) in rules_and_workers() {
            let updates = minute_updates(11, 400, &rules);
            let k = 3;
            let peeked = peek_top_minute(workers, updates.clone(), rules, k, "TopMinute");
            assert!(!peeked.is_empty());
            for (time, prefix, rows) in peeked {
                assert!(rows.found, "TopMinute is registered");
                let expected: Vec<(String, String, isize)> = reference_rows(&updates, time, k)
                    .into_iter()
                    .filter(|(minute, _, _)| prefix.first().is_none_or(|p| p == minute))
                    .collect();
                let got: Vec<(String, String, isize)> = rows.rows.iter().map(|r| (r.key.clone(), r.value.clone(), r.count)).collect();
                // The first `limit + 1` rows in key order, and no more.
                assert_eq!(got, expected[..expected.len().min(4)], "{workers} workers, time {time}, prefix {prefix:?}");
            }
        }
    }
}
