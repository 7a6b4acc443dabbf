//! Per-minute counts (SPEC §3 answers 1 and 3).

use std::hash::Hash;

use differential_dataflow::collection::AsCollection;
use differential_dataflow::operators::CountTotal;
use differential_dataflow::{ExchangeData, VecCollection};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::{Operator, OutputBuilder};
use timely::dataflow::operators::Capability;

use crate::answer::SortWords;
use crate::batches::{exchange_updates, LargeBatches};
use crate::event_time::EventTimeRules;
use crate::hashing::{fast_hash, FastMap, ProbeMap, PREFETCH_AHEAD};
use crate::radix::consolidate_words;
use crate::render::minute_state::{per_minute, MinuteState};
use crate::render::peekable::FirstRows;
use crate::render::traces::register_trace;
use crate::render::partition::{ByAd, OfAd};
use crate::types::{ClickAttrs, ClickKey, Country, Minute, Time};

/// The per-minute count collections: `(key, clicks)`, one record per key with clicks > 0.
#[derive(Clone)]
pub struct MinuteCounts<'scope> {
    pub ad: VecCollection<'scope, Time, ((Minute, u64), u64)>,
    pub campaign: VecCollection<'scope, Time, ((Minute, u64), u64)>,
    pub country: VecCollection<'scope, Time, ((Minute, Country, u64), u64)>,
    /// The clicks behind the counts, as they arrive: each key with a multiplicity equal to the
    /// clicks it gains (or loses), pre-aggregated in the worker and not yet exchanged. Whatever
    /// adds counts up again (a sliding window over minutes) reads these instead: one update per
    /// change, where the counts give two (`-old`, `+new`).
    ///
    /// A minute's clicks stop at its final time (`rules.minute_final_at`): retention's
    /// retractions of the clicks are not in these, because every reader keeps its state per
    /// minute and forgets a minute whole, or ignores a minute's changes once it is final.
    pub clicks: MinuteClicks<'scope>,
}

/// See [`MinuteCounts::clicks`]. The keys that hold an ad are exchanged by it once, for every
/// reader (see [`partition`](crate::render::partition)); the campaigns' are exchanged by each
/// reader.
#[derive(Clone)]
pub struct MinuteClicks<'scope> {
    pub ad: ByAd<'scope, (Minute, u64)>,
    pub campaign: VecCollection<'scope, Time, (Minute, u64)>,
    pub country: ByAd<'scope, (Minute, Country, u64)>,
}

/// Counts distinct clicks per (minute, ad), (minute, campaign) and (minute, country, ad).
pub fn minute_counts<'scope>(clicks: VecCollection<'scope, Time, (ClickKey, ClickAttrs)>, rules: &EventTimeRules) -> MinuteCounts<'scope> {
    let keys = pre_aggregate_minute_keys(clicks, rules);
    MinuteCounts {
        ad: count_per_minute_by_ad("AdMinute", keys.ad.clone(), rules),
        campaign: count_per_minute("CampaignMinute", keys.campaign.clone(), rules),
        country: count_per_minute_by_ad("CountryMinute", keys.country.clone(), rules),
        clicks: keys,
    }
}

/// A key that belongs to one minute.
pub trait MinuteKey: ExchangeData + Hash {
    fn minute(&self) -> Minute;
}

impl MinuteKey for (Minute, u64) {
    fn minute(&self) -> Minute {
        self.0
    }
}

impl MinuteKey for (Minute, Country, u64) {
    fn minute(&self) -> Minute {
        self.0
    }
}

/// What [`count_named`] computes, for keys that each belong to one minute, given a minute's
/// updates until it is final, with or without its retention retractions after (which it ignores):
/// the counts are kept per minute in hash maps ([`per_minute`]), and a minute's counts are
/// retracted, once per key, when the minute is final, instead of sorting and arranging every
/// click's update and its retraction. Changes are netted per time, as `count_total` nets them.
pub fn count_per_minute<'scope, K: MinuteKey>(
    name: &str,
    changes: VecCollection<'scope, Time, K>,
    rules: &EventTimeRules,
) -> VecCollection<'scope, Time, (K, u64)> {
    let by_key = exchange_updates(|key: &K| fast_hash(key));
    per_minute(name, changes, by_key, K::minute, rules, CountsOfMinute::default)
}

/// [`count_per_minute`] of keys partitioned by ad, counted where they are.
pub fn count_per_minute_by_ad<'scope, K: MinuteKey + OfAd>(
    name: &str,
    changes: ByAd<'scope, K>,
    rules: &EventTimeRules,
) -> VecCollection<'scope, Time, (K, u64)> {
    per_minute(name, changes.into_collection(), Pipeline, K::minute, rules, CountsOfMinute::default)
}

/// `clicks` before the first change of the time being processed; `UNTOUCHED` when it has none.
struct Count {
    clicks: i64,
    before: i64,
}

const UNTOUCHED: i64 = i64::MIN;

/// One minute's counts, and the keys changed at the time being processed.
struct CountsOfMinute<K> {
    counts: FastMap<K, Count>,
    changed: Vec<K>,
}

impl<K> Default for CountsOfMinute<K> {
    fn default() -> Self {
        CountsOfMinute { counts: FastMap::default(), changed: Vec::new() }
    }
}

impl<K: MinuteKey> MinuteState for CountsOfMinute<K> {
    type Update = K;
    type Output = (K, u64);

    fn apply(&mut self, key: K, diff: isize, _emit: &mut impl FnMut(Self::Output, isize)) {
        let count = match self.counts.get_mut(&key) {
            Some(count) => count,
            None => self.counts.entry(key.clone()).or_insert(Count { clicks: 0, before: UNTOUCHED }),
        };
        if count.before == UNTOUCHED {
            count.before = count.clicks;
            self.changed.push(key);
        }
        count.clicks += diff as i64;
    }

    fn settle(&mut self, emit: &mut impl FnMut(Self::Output, isize)) {
        for key in self.changed.drain(..) {
            let count = self.counts.get_mut(&key).expect("a changed key has a count");
            let (before, now) = (std::mem::replace(&mut count.before, UNTOUCHED), count.clicks);
            assert!(now >= 0, "a count went below zero");
            if now == 0 {
                self.counts.remove(&key);
            }
            if before != now {
                if before > 0 {
                    emit((key.clone(), before as u64), -1);
                }
                if now > 0 {
                    emit((key, now as u64), 1);
                }
            }
        }
    }

    fn retire(&mut self, emit: &mut impl FnMut(Self::Output, isize)) {
        for (key, count) in self.counts.drain() {
            if count.clicks > 0 {
                emit((key, count.clicks as u64), -1);
            }
        }
    }

    fn keys(&self) -> usize {
        self.counts.len()
    }

    /// Each key with its clicks as its multiplicity, as an arrangement of the keys would hold it.
    fn peek(&self, minute: Minute, rows: &mut FirstRows) {
        if rows.may_hold(minute) {
            for (key, count) in self.counts.iter().filter(|(_, c)| c.clicks != 0) {
                rows.offer(key, &(), count.clicks as isize);
            }
        }
    }
}

/// Counts records per key (sums their multiplicities, which may be any weight), in an
/// arrangement named `Arrange: {name}`, which can be peeked at ([`register_trace`]).
///
/// Updates are consolidated inside the worker before they are exchanged (two-stage aggregation):
/// a key that gets many clicks at one time, a viral ad, costs one update per batch, not one per
/// click. Times are totally ordered, so `count_total` needs no arrangement of its output.
pub fn count_named<'scope, K>(name: &str, keys: VecCollection<'scope, Time, K>) -> VecCollection<'scope, Time, (K, u64)>
where
    K: differential_dataflow::ExchangeData + std::hash::Hash + serde::Serialize,
{
    let changes = pre_aggregate(&format!("PreAggregate: {name}"), keys);
    let arranged = changes.arrange_by_self_named(&format!("Arrange: {name}"));
    register_trace(&format!("Arrange: {name}"), &arranged.trace);
    arranged.count_total_core::<isize>().map(|(key, clicks)| {
        debug_assert!(clicks > 0);
        (key, clicks as u64)
    })
}

/// A time's capability and its updates, as words.
type HeldWords<const N: usize> = (Capability<Time>, Vec<([u64; N], isize)>);

/// Each completed time's updates for which `keep(data, time)` holds, consolidated in the worker
/// and sent as one sorted run, once the frontier has passed the time: one record
/// `(run, time, 1)` per worker and time, whose `run` lists the non-zero `(data, diff)` of the
/// time in the data's order.
///
/// A consumer that gathers the updates on one worker (the sink) then receives a few sorted runs
/// per time, one per worker, and merges them instead of sorting from scratch; each worker's
/// share of the sorting runs in parallel; and the exchange to that worker moves one record per
/// time and worker rather than copying every update. It adds no delay to such a consumer, which
/// waits for the same frontier before it reads a time. The runs are not a collection of the
/// updates: only a consumer that reads them as runs may take them.
///
/// The updates are held and sorted as their [`SortWords`]: smaller than the records, and sorted
/// by their bytes ([`consolidate_words`]).
///
/// `keep` sees each update before it is held, so what it drops costs neither memory nor sorting;
/// it must depend on the data and time only, not on the diff.
pub fn consolidate_completed_times<'scope, D, const N: usize>(
    name: &str,
    updates: VecCollection<'scope, Time, D>,
    keep: impl Fn(&D, Time) -> bool + 'static,
) -> VecCollection<'scope, Time, Vec<(D, isize)>>
where
    D: differential_dataflow::Data + SortWords<N>,
{
    updates
        .inner
        .unary_frontier(Pipeline, name, |_, _| {
            let mut pending: std::collections::BTreeMap<Time, HeldWords<N>> = Default::default();
            let mut scratch = Vec::new();
            move |(input, frontier), output| {
                input.for_each(|capability, data| {
                    let mut data = data.drain(..).filter(|(data, time, _)| keep(data, *time)).peekable();
                    while let Some((record, time, diff)) = data.next() {
                        let (_, held) = pending.entry(time).or_insert_with(|| (capability.delayed(&time, 0), Vec::new()));
                        held.push((record.to_words(), diff));
                        // The rest of the time's run, without looking it up again.
                        while let Some((record, _, diff)) = data.next_if(|(_, next, _)| *next == time) {
                            held.push((record.to_words(), diff));
                        }
                    }
                });
                while let Some(entry) = pending.first_entry() {
                    if frontier.frontier().first().is_some_and(|f| f <= entry.key()) {
                        break;
                    }
                    let (capability, mut updates) = entry.remove();
                    consolidate_words(&mut updates, &mut scratch);
                    let run: Vec<(D, isize)> = updates.into_iter().map(|(words, diff)| (D::from_words(words), diff)).collect();
                    if !run.is_empty() {
                        output.session(&capability).give((run, *capability.time(), 1));
                    }
                }
            }
        })
        .as_collection()
}

/// An activated output of updates `(K, Time, isize)`.
type UpdatesSession<'a, K> = timely::dataflow::operators::generic::OutputBuilderSession<'a, Time, LargeBatches<(K, Time, isize)>>;

/// Sends the non-zero sums of `sums` as updates, leaving it empty. It keeps its room for the
/// next activation unless that room is far more than this one used: draining walks every slot,
/// and after a replay's minute-sized batches a follower's small ones would walk them all.
fn send_changes<K: Hash + Eq + Clone + 'static>(
    output: &mut UpdatesSession<'_, K>,
    at: &Capability<Time>,
    sums: &mut ProbeMap<(K, Time), isize>,
) {
    let used = sums.len();
    output.session_with_builder(at).give_iterator(sums.drain().filter(|(_, diff)| *diff != 0).map(|((key, time), diff)| (key, time, diff)));
    if 16 * used < sums.capacity() {
        *sums = ProbeMap::default();
    }
}

/// The (minute, ad), (minute, campaign) and (minute, country, ad) keys of the clicks, each
/// consolidated as [`pre_aggregate`] does, in one pass over the clicks: every reader of a stream
/// gets its own copy of each of its batches, so three readers would copy every click three times.
///
/// Clicks at or after their minute's final time are dropped first (see [`MinuteCounts::clicks`]):
/// they are as many as the clicks themselves, and no reader would use them.
fn pre_aggregate_minute_keys<'scope>(clicks: VecCollection<'scope, Time, (ClickKey, ClickAttrs)>, rules: &EventTimeRules) -> MinuteClicks<'scope> {
    let rules = *rules;
    let mut builder = OperatorBuilder::new("PreAggregate: MinuteKeys".to_owned(), clicks.scope());
    let mut input = builder.new_input(clicks.inner, Pipeline);
    let (ad, ad_stream) = builder.new_output();
    let (campaign, campaign_stream) = builder.new_output();
    let (country, country_stream) = builder.new_output();
    let mut ad = OutputBuilder::<_, LargeBatches<((Minute, u64), Time, isize)>>::from(ad);
    let mut campaign = OutputBuilder::<_, LargeBatches<((Minute, u64), Time, isize)>>::from(campaign);
    let mut country = OutputBuilder::<_, LargeBatches<((Minute, Country, u64), Time, isize)>>::from(country);
    builder.build(move |_initial_capabilities| {
        // Summed in hash maps rather than sorted: a batch is mostly distinct keys, and sorting
        // them only to find the few that repeat cost more than the counting after it.
        // A batch is a minute's clicks in a replay, so the sums outgrow the caches: each click's
        // three slots are prefetched a few clicks ahead.
        let mut ads: ProbeMap<((Minute, u64), Time), isize> = ProbeMap::default();
        let mut campaigns: ProbeMap<((Minute, u64), Time), isize> = ProbeMap::default();
        let mut countries: ProbeMap<((Minute, Country, u64), Time), isize> = ProbeMap::default();
        move |_frontiers| {
            // One capability per output, at the least time received.
            let mut least: Vec<Capability<Time>> = Vec::new();
            input.for_each(|capability, data| {
                if least.first().is_none_or(|l| capability.least().is_some_and(|t| t < l.time())) {
                    least = (0..3).map(|port| capability.retain_least(port).expect("a message has a time")).collect();
                }
                // A click's three keys, each with its time.
                let keys_of = |&((key, attrs), time, _): &((ClickKey, ClickAttrs), Time, isize)| {
                    let minute = crate::types::minute_of(key.ts);
                    (((minute, attrs.ad), time), ((minute, attrs.campaign), time), ((minute, attrs.country, attrs.ad), time))
                };
                for at in 0..data.len() {
                    if let Some(ahead) = data.get(at + PREFETCH_AHEAD) {
                        let (ad, campaign, country) = keys_of(ahead);
                        ads.prefetch(&ad);
                        campaigns.prefetch(&campaign);
                        countries.prefetch(&country);
                    }
                    let (ad, campaign, country) = keys_of(&data[at]);
                    let ((minute, _), time) = ad;
                    if rules.is_final_at(minute, time) {
                        continue;
                    }
                    let diff = data[at].2;
                    *ads.get_or_insert_with(ad, || 0) += diff;
                    *campaigns.get_or_insert_with(campaign, || 0) += diff;
                    *countries.get_or_insert_with(country, || 0) += diff;
                }
                data.clear();
            });
            if let [ad_at, campaign_at, country_at] = &least[..] {
                send_changes(&mut ad.activate(), ad_at, &mut ads);
                send_changes(&mut campaign.activate(), campaign_at, &mut campaigns);
                send_changes(&mut country.activate(), country_at, &mut countries);
            }
        }
    });
    MinuteClicks {
        ad: ByAd::exchange(ad_stream.as_collection()),
        campaign: campaign_stream.as_collection(),
        country: ByAd::exchange(country_stream.as_collection()),
    }
}

/// Consolidates, inside the worker, everything one activation receives, before the exchange.
///
/// Upstream operators emit a completed time's updates in a burst, so one activation sees most of
/// them: a key's many `+1`s at one time leave as one update. (`consolidate_stream` does this only
/// within each small container.) Output goes under the least capability received, which is at or
/// before every update's time.
pub fn pre_aggregate<'scope, K>(name: &str, keys: VecCollection<'scope, Time, K>) -> VecCollection<'scope, Time, K>
where
    K: differential_dataflow::ExchangeData,
{
    let mut buffer: Vec<(K, Time, isize)> = Vec::new();
    keys.inner
        .unary(Pipeline, name, move |_, _| {
            move |input, output| {
                let mut least: Option<timely::dataflow::operators::Capability<Time>> = None;
                input.for_each(|capability, data| {
                    if let Some(capability) = capability.retain_least(0) {
                        if least.as_ref().is_none_or(|l| capability.time() < l.time()) {
                            least = Some(capability);
                        }
                    }
                    buffer.append(data);
                });
                if let Some(capability) = least {
                    differential_dataflow::consolidation::consolidate_updates(&mut buffer);
                    output.session(&capability).give_iterator(buffer.drain(..));
                }
            }
        })
        .as_collection()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{count_per_minute, count_per_minute_by_ad};
    use crate::render::partition::ByAd;
    use crate::render::testing::{held_at, minute_updates, rules_and_workers, run_operator, scattered, times_of};
    use crate::types::{Minute, Time};

    #[test]
    fn counts_per_minute_match_a_reference_at_every_time() {
        for seed in 0..6 {
            for (rules, workers) in rules_and_workers() {
                let updates = minute_updates(seed, 300, &rules);
                // Exchanged by the counting, or once by ad before it (for every reader of the ads).
                let exchanged = run_operator(workers, &updates, move |keys| count_per_minute("AdMinute", keys, &rules));
                let by_ad = run_operator(workers, &updates, move |keys| count_per_minute_by_ad("AdMinute", ByAd::exchange(scattered(keys)), &rules));
                for output in [exchanged, by_ad] {
                    for time in times_of(&updates, &output) {
                        // The reference: every update up to `time`, summed per key.
                        let mut counts: BTreeMap<(Minute, u64), isize> = BTreeMap::new();
                        for (key, _, diff) in updates.iter().filter(|u| u.1 <= time) {
                            *counts.entry(*key).or_default() += diff;
                        }
                        let expected: BTreeMap<((Minute, u64), u64), isize> =
                            counts.into_iter().filter(|(_, n)| *n > 0).map(|(key, n)| ((key, n as u64), 1)).collect();
                        assert_eq!(held_at(&output, time), expected, "seed {seed}, {workers} workers, time {time}, {rules:?}");
                    }
                    // Each count is sent once per change of the time it changes at, not once per update.
                    let changes: std::collections::BTreeSet<(Time, (Minute, u64))> = output.iter().map(|(record, time, _)| (*time, record.0)).collect();
                    assert!(output.len() <= 2 * changes.len(), "seed {seed}: {} updates for {} changes", output.len(), changes.len());
                }
            }
        }
    }
}
