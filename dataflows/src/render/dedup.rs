//! De-duplication of retried deliveries (SPEC §2 "Duplicates"), and the retention of its state.

use differential_dataflow::VecCollection;

use crate::batches::exchange_routed;
use crate::event_time::EventTimeRules;
use crate::hashing::{fast_hash, TagIndex};
use crate::render::minute_state::{per_minute_tallied, MinuteState};
use crate::render::peekable::FirstRows;
use crate::types::{Click, ClickAttrs, ClickKey, Minute, Time};

/// One record per distinct `(event_id, ts)`: the copy with the smallest attributes.
///
/// At every time the output holds, for each click with at least one visible copy, the minimum
/// of the visible copies; so a click counts from its earliest visible copy on, and a smaller
/// copy arriving later moves the count (a retraction and a restatement downstream).
///
/// With a lateness bound, a copy is visible from its time until its minute is final
/// (`rules.minute_final_at`): then every click of the minute is retracted, at that time, and the
/// minute's state is dropped; a copy that arrives once its minute is final is never visible.
/// This is the collection that retracting each delivery at its minute's final time and taking
/// the smallest copy per key gives, time for time, without holding a retraction per delivery or
/// arranging the deliveries: each worker keeps, for its share of the keys, one hash map per live
/// minute ([`per_minute`]).
///
/// Without `retract`, a minute's state is dropped when it is final but its clicks are not
/// retracted: the output is then the same until a click's minute is final, and the clicks stay
/// after it, for consumers that forget a minute by themselves and ignore its changes once it is
/// final (as the per-minute counts do).
pub fn distinct_clicks<'scope>(
    name: &str,
    deliveries: VecCollection<'scope, Time, Click>,
    rules: &EventTimeRules,
    retract: bool,
) -> VecCollection<'scope, Time, (ClickKey, ClickAttrs)> {
    distinct_clicks_counting_copies(name, deliveries, rules, retract).0
}

/// [`distinct_clicks`], and the duplicates counted where they are found: a record `()` at each
/// time, its multiplicity the change at that time in the deliveries beyond the first of each
/// click, over the clicks whose minutes are live (every delivery of a click reaches its minute
/// before the minute is final, see `EventTimeRules::minute_final_at`). With deliveries only
/// added, that is how many deliveries at that time were copies of a click already held. It is a
/// function of the deliveries up to each time, so it is the same for any worker count.
pub fn distinct_clicks_counting_copies<'scope>(
    name: &str,
    deliveries: VecCollection<'scope, Time, Click>,
    rules: &EventTimeRules,
    retract: bool,
) -> (VecCollection<'scope, Time, (ClickKey, ClickAttrs)>, VecCollection<'scope, Time, ()>) {
    let empty = move || DistinctClicks { clicks: Vec::new(), index: TagIndex::default(), retract, copies_beyond_first: 0 };
    per_minute_tallied(name, deliveries, exchange_routed(route_delivery), Click::minute, rules, empty)
}

/// The hash that sends a delivery to its worker: every copy of a click goes to the same one.
/// A source that builds each container for one worker ([`crate::batches::worker_of`]) saves the
/// exchange copying its clicks ([`exchange_routed`]).
pub fn route_delivery(click: &Click) -> u64 {
    click.key.event.low()
}

/// One minute's clicks, each with its visible copies.
///
/// A new click's lookup misses, and nearly every click is new: the index it probes is kept
/// small ([`TagIndex`], 8 bytes a slot) so that it stays in the caches, and the clicks are
/// appended to a list, which is written in order.
struct DistinctClicks {
    /// Every click of the minute, in the order of its first copy. A click whose copies all went
    /// keeps its place, with none; if a copy comes back, it is added again.
    clicks: Vec<(ClickKey, Copies)>,
    /// The position in `clicks` of each click with copies.
    index: TagIndex,
    /// Whether retiring the minute retracts its clicks.
    retract: bool,
    /// The change, since it was last taken, in the deliveries held beyond the first of each click.
    copies_beyond_first: isize,
}

impl MinuteState for DistinctClicks {
    type Update = Click;
    type Output = (ClickKey, ClickAttrs);

    fn prefetch(&self, click: &Click) {
        self.index.prefetch(fast_hash(&click.key));
    }

    fn apply(&mut self, click: Click, diff: isize, emit: &mut impl FnMut(Self::Output, isize)) {
        let hash = fast_hash(&click.key);
        let clicks = &self.clicks;
        let at = match self.index.find_or_add(hash, |at| clicks[at as usize].0 == click.key, clicks.len() as u32) {
            Some(at) => at as usize,
            None => {
                self.clicks.push((click.key, Copies::None));
                self.clicks.len() - 1
            }
        };
        let copies = &mut self.clicks[at].1;
        let before = copies.smallest();
        let beyond_before = copies.beyond_first();
        copies.add(click.attrs, diff);
        let after = copies.smallest();
        self.copies_beyond_first += copies.beyond_first() - beyond_before;
        if copies.is_empty() {
            self.index.remove(hash, at as u32);
        }
        if before != after {
            if let Some(old) = before {
                emit((click.key, old), -1);
            }
            if let Some(new) = after {
                emit((click.key, new), 1);
            }
        }
    }

    fn settle(&mut self, _emit: &mut impl FnMut(Self::Output, isize)) {}

    fn retire(&mut self, emit: &mut impl FnMut(Self::Output, isize)) {
        self.index.clear();
        if !self.retract {
            self.clicks.clear();
            return;
        }
        for (key, copies) in self.clicks.drain(..) {
            if let Some(attrs) = copies.smallest() {
                emit((key, attrs), -1);
            }
        }
    }

    /// Each click with each visible copy and its multiplicity: the key is `(event, ts)`, the
    /// event being the 128-bit hash of the event_id as `[high, low]`. Every click is serialized
    /// to be compared with the prefix, so a peek here costs time in the click count.
    fn peek(&self, _minute: Minute, rows: &mut FirstRows) {
        for (key, copies) in &self.clicks {
            match copies {
                Copies::None => {}
                Copies::One(attrs, count) => rows.offer(key, attrs, *count),
                Copies::Many(list) => list.iter().for_each(|(attrs, count)| rows.offer(key, attrs, *count)),
            }
        }
    }

    fn keys(&self) -> usize {
        self.index.len()
    }

    fn take_tally(&mut self) -> isize {
        std::mem::take(&mut self.copies_beyond_first)
    }
}

/// The visible copies of one click, with their multiplicities: nearly always one copy, so it is
/// kept inline.
#[derive(Default)]
enum Copies {
    #[default]
    None,
    One(ClickAttrs, isize),
    /// Sorted by attributes, all multiplicities non-zero.
    Many(Vec<(ClickAttrs, isize)>),
}

impl Copies {
    /// The smallest copy with positive multiplicity.
    fn smallest(&self) -> Option<ClickAttrs> {
        match self {
            Copies::None => None,
            Copies::One(attrs, count) => (*count > 0).then_some(*attrs),
            Copies::Many(copies) => copies.iter().find(|(_, count)| *count > 0).map(|(attrs, _)| *attrs),
        }
    }

    /// The deliveries held beyond the first: the positive multiplicities' sum, less one if any.
    fn beyond_first(&self) -> isize {
        let held = match self {
            Copies::None => 0,
            Copies::One(_, count) => (*count).max(0),
            Copies::Many(copies) => copies.iter().map(|(_, count)| (*count).max(0)).sum(),
        };
        (held - 1).max(0)
    }

    fn add(&mut self, attrs: ClickAttrs, diff: isize) {
        match self {
            Copies::None => *self = Copies::One(attrs, diff),
            Copies::One(held, count) if *held == attrs => *count += diff,
            Copies::One(held, count) => {
                let mut copies = vec![(*held, *count), (attrs, diff)];
                copies.sort_by_key(|(attrs, _)| *attrs);
                *self = Copies::Many(copies);
            }
            Copies::Many(copies) => match copies.binary_search_by_key(&attrs, |(held, _)| *held) {
                Ok(at) => copies[at].1 += diff,
                Err(at) => copies.insert(at, (attrs, diff)),
            },
        }
        match self {
            Copies::One(_, 0) => *self = Copies::None,
            Copies::Many(copies) => {
                copies.retain(|(_, count)| *count != 0);
                if copies.is_empty() {
                    *self = Copies::None;
                }
            }
            _ => {}
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Copies::None)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{distinct_clicks, distinct_clicks_counting_copies, Copies};
    use crate::render::testing::{generator, held_at, run_operator, rules_and_workers, times_of};
    use crate::event_time::EventTimeRules;
    use crate::types::{Bits128, Click, ClickAttrs, ClickKey, Country, Ip, Time, MINUTE_MS};

    fn attrs(ad: u64) -> ClickAttrs {
        ClickAttrs { ad, campaign: 1, user: 1, ip: Ip::new(1), country: Country(1) }
    }

    #[test]
    fn copies_keep_the_smallest_visible_one() {
        let mut copies = Copies::default();
        assert_eq!(copies.smallest(), None);
        copies.add(attrs(5), 1);
        copies.add(attrs(5), 1);
        assert_eq!(copies.smallest(), Some(attrs(5)));
        copies.add(attrs(3), 1);
        assert_eq!(copies.smallest(), Some(attrs(3)));
        copies.add(attrs(3), -1);
        assert_eq!(copies.smallest(), Some(attrs(5)));
        // A negative multiplicity is held, and does not count as visible.
        copies.add(attrs(1), -1);
        assert_eq!(copies.smallest(), Some(attrs(5)));
        copies.add(attrs(5), -2);
        assert_eq!(copies.smallest(), None);
        assert!(!copies.is_empty());
        copies.add(attrs(1), 1);
        assert!(copies.is_empty());
    }

    /// Deliveries `(click, time, diff)` from a seeded generator: few distinct clicks, so that
    /// copies collide and disagree, over a few minutes, with times that run ahead of a click's
    /// minute by up to three minutes (late copies, and copies after the minute is final).
    fn deliveries(seed: u64, count: usize) -> Vec<(Click, Time, isize)> {
        let mut next = generator(seed);
        let mut updates: Vec<(Click, Time, isize)> = (0..count)
            .map(|_| {
                let ts = next(4 * MINUTE_MS);
                let key = ClickKey { event: Bits128::new(u128::from(next(40))), ts: ts - ts % 20_000 };
                let time = key.ts + next(3 * MINUTE_MS);
                let time = time - time % 10_000;
                // Now and then a delivery is taken back (a retraction upstream).
                let diff = if next(10) == 0 { -1 } else { 1 };
                (Click { key, attrs: attrs(next(4)) }, time, diff)
            })
            .collect();
        updates.sort_by_key(|update| update.1);
        updates
    }

    /// What the output must hold at `time`: for each key, the smallest copy whose multiplicity,
    /// over the deliveries at or before `time` that are still visible then, is positive.
    fn reference(updates: &[(Click, Time, isize)], rules: &EventTimeRules, time: Time) -> BTreeMap<(ClickKey, ClickAttrs), isize> {
        let mut copies: BTreeMap<(ClickKey, ClickAttrs), isize> = BTreeMap::new();
        for (click, at, diff) in updates {
            let final_at = rules.minute_final_at(click.minute());
            if *at <= time && final_at.is_none_or(|f| *at < f && time < f) {
                *copies.entry((click.key, click.attrs)).or_default() += diff;
            }
        }
        let mut smallest: BTreeMap<ClickKey, ClickAttrs> = BTreeMap::new();
        for (&(key, attrs), &count) in &copies {
            if count > 0 {
                smallest.entry(key).or_insert(attrs);
            }
        }
        smallest.into_iter().map(|(key, attrs)| ((key, attrs), 1)).collect()
    }

    #[test]
    fn distinct_clicks_match_a_reference_at_every_time() {
        for seed in 0..6 {
            for (rules, workers) in rules_and_workers() {
                let updates = deliveries(seed, 400);
                let output = run_operator(workers, &updates, move |deliveries| distinct_clicks("DistinctClicks", deliveries, &rules, true));
                for time in times_of(&updates, &output) {
                    assert_eq!(held_at(&output, time), reference(&updates, &rules, time), "seed {seed}, {workers} workers, time {time}, {rules:?}");
                }
                // With retention every click leaves again once its minute is final.
                assert_eq!(held_at(&output, Time::MAX).is_empty(), rules.allowed_lateness_ms.is_some(), "seed {seed}, {workers} workers, {rules:?}");
                // Without retractions: the same updates, less those at or after their minute's
                // final time.
                let kept = run_operator(workers, &updates, move |deliveries| distinct_clicks("DistinctClicks", deliveries, &rules, false));
                let before_final = |output: &[((ClickKey, ClickAttrs), Time, isize)]| {
                    let mut sums: BTreeMap<((ClickKey, ClickAttrs), Time), isize> = BTreeMap::new();
                    for &(record, time, diff) in output {
                        if rules.minute_final_at(crate::types::minute_of(record.0.ts)).is_none_or(|at| time < at) {
                            *sums.entry((record, time)).or_default() += diff;
                        }
                    }
                    sums.retain(|_, diff| *diff != 0);
                    sums
                };
                assert_eq!(before_final(&kept), before_final(&output), "seed {seed}, {workers} workers, {rules:?}");
                let after_final = kept.iter().filter(|(record, time, _)| {
                    rules.minute_final_at(crate::types::minute_of(record.0.ts)).is_some_and(|at| *time >= at)
                });
                assert_eq!(after_final.count(), 0, "seed {seed}, {workers} workers: a retraction at a final time without `retract`");
            }
        }
    }

    /// The duplicates counted up to `time`: for each click, the deliveries beyond the first
    /// (positive multiplicities only) over those that reached its minute while it was live.
    fn reference_duplicates(updates: &[(Click, Time, isize)], rules: &EventTimeRules, time: Time) -> isize {
        let mut copies: BTreeMap<ClickKey, BTreeMap<ClickAttrs, isize>> = BTreeMap::new();
        for (click, at, diff) in updates {
            if *at <= time && rules.minute_final_at(click.minute()).is_none_or(|f| *at < f) {
                *copies.entry(click.key).or_default().entry(click.attrs).or_default() += diff;
            }
        }
        copies.values().map(|by_attrs| (by_attrs.values().map(|c| (*c).max(0)).sum::<isize>() - 1).max(0)).sum()
    }

    #[test]
    fn duplicates_are_counted_where_they_are_found() {
        for seed in 0..6 {
            for (rules, workers) in rules_and_workers() {
                let updates = deliveries(seed, 400);
                let tallies = run_operator(workers, &updates, move |deliveries| distinct_clicks_counting_copies("DistinctClicks", deliveries, &rules, true).1);
                let mut total = 0;
                for time in times_of(&updates, &tallies) {
                    let counted = held_at(&tallies, time).get(&()).copied().unwrap_or(0);
                    assert_eq!(counted, reference_duplicates(&updates, &rules, time), "seed {seed}, {workers} workers, time {time}, {rules:?}");
                    total = counted;
                }
                assert!(total > 0, "seed {seed}: the generator makes copies");
            }
        }
    }
}
