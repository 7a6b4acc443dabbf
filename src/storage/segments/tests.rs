//! The segment store against a plain model: random changes over many minutes, committed with
//! advancing frontiers, and every query on every final minute compared at every step.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use clickagg_dataflows::{Answer, Country, EventTimeRules, Minute, ServingAnswer, Time, MINUTE_MS};
use proptest::prelude::*;

use super::{SegmentReader, SegmentStore};
use crate::model::{HistoryEntry, Subject, Summary};
use crate::storage::{Batch, CommitStore, RunStore};

/// Minutes are final once the frontier is a minute past their end (no watermark delay).
fn rules() -> EventTimeRules {
    EventTimeRules { watermark_delay_ms: 0, allowed_lateness_ms: Some(MINUTE_MS), tick_ms: 1_000 }
}

/// What every query should answer: each minute's rows as plain maps.
#[derive(Default)]
struct Model {
    ad: BTreeMap<(Minute, u64), u64>,
    campaign: BTreeMap<(Minute, u64), u64>,
    country: BTreeMap<(Minute, u16, u64), u64>,
    campaign_country: BTreeMap<(Minute, u16, u64), u64>,
    top: BTreeSet<(Minute, u64, u64)>,
    top_country: BTreeSet<(Minute, u16, u64, u64)>,
    history: BTreeMap<(Minute, u64), Vec<HistoryEntry>>,
    excluded: BTreeMap<(Minute, u64), u64>,
}

const ADS: u64 = 6;

/// The id of the `i`th ad or campaign: spread over all 64 bits, so that keys differ in every
/// byte and their order is the bytes' order only if the encoding is right.
fn id(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}
const COUNTRIES: [u16; 3] = [0x4155, 0x4445, 0x5553];

/// A random generator with a fixed seed (the proptest case gives it).
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Replaces the row at `key` of `map` with `clicks` as the dataflow does, `-old +new` at `time`,
/// or removes it (`clicks == 0`), pushing the changes made through `answer`.
fn change<K: Ord + Copy>(
    map: &mut BTreeMap<K, u64>,
    key: K,
    clicks: u64,
    time: Time,
    answer: impl Fn(u64) -> Answer,
    out: &mut Vec<(Time, Answer, isize)>,
) {
    // An unchanged row has no change: `-x +x` at one time consolidates away in the dataflow.
    if map.get(&key) == Some(&clicks) {
        return;
    }
    let mut changes = Vec::new();
    if let Some(old) = map.remove(&key) {
        changes.push((time, answer(old), -1));
    }
    if clicks > 0 {
        map.insert(key, clicks);
        changes.push((time, answer(clicks), 1));
    }
    // Within one time, the retraction and the insertion come in either order.
    if clicks.is_multiple_of(2) {
        changes.reverse();
    }
    out.extend(changes);
}

fn serving_change<K: Ord + Copy>(
    map: &mut BTreeMap<K, u64>,
    key: K,
    clicks: u64,
    time: Time,
    answer: impl Fn(u64) -> ServingAnswer,
    out: &mut Vec<(Time, ServingAnswer, isize)>,
) {
    if map.get(&key) == Some(&clicks) {
        return;
    }
    if let Some(old) = map.remove(&key) {
        out.push((time, answer(old), -1));
    }
    if clicks > 0 {
        map.insert(key, clicks);
        out.push((time, answer(clicks), 1));
    }
}

/// One advance's random changes to minutes that are not final at `time`.
fn random_batch(model: &mut Model, random: &mut Random, time: Time, open_from: Minute, open_to: Minute) -> Batch {
    let mut batch = Batch::default();
    for _ in 0..random.below(40) {
        let minute = open_from + random.below((open_to - open_from) as u64) as Minute;
        let ad = id(random.below(ADS));
        let country = COUNTRIES[random.below(3) as usize];
        let clicks = random.below(5);
        match random.below(7) {
            0 => {
                let history_of = model.history.entry((minute, ad)).or_default();
                let before = batch.changes.len();
                change(&mut model.ad, (minute, ad), clicks, time, |c| Answer::AdMinute { minute, ad, clicks: c }, &mut batch.changes);
                for (t, answer, diff) in &batch.changes[before..] {
                    if let Answer::AdMinute { clicks, .. } = answer {
                        history_of.push(HistoryEntry { time: *t, clicks: *clicks, diff: *diff as i64 });
                    }
                }
            }
            1 => change(&mut model.campaign, (minute, ad), clicks, time, |c| Answer::CampaignMinute { minute, campaign: ad, clicks: c }, &mut batch.changes),
            2 => change(
                &mut model.country,
                (minute, country, ad),
                clicks,
                time,
                |c| Answer::CountryMinute { minute, country: Country(country), ad, clicks: c },
                &mut batch.changes,
            ),
            3 => change(&mut model.excluded, (minute, ad), clicks, time, |c| Answer::FraudMinute { minute, ad, clicks: c }, &mut batch.changes),
            4 => {
                let diff = if model.top.remove(&(minute, ad, clicks)) { -1 } else { 1 };
                if diff > 0 {
                    model.top.insert((minute, ad, clicks));
                }
                batch.changes.push((time, Answer::TopMinute { minute, ad, clicks }, diff));
            }
            5 => serving_change(
                &mut model.campaign_country,
                (minute, country, ad),
                clicks,
                time,
                |c| ServingAnswer::CampaignCountryMinute { minute, country: Country(country), campaign: ad, clicks: c },
                &mut batch.serving,
            ),
            _ => {
                let diff = if model.top_country.remove(&(minute, country, ad, clicks)) { -1 } else { 1 };
                if diff > 0 {
                    model.top_country.insert((minute, country, ad, clicks));
                }
                batch.serving.push((time, ServingAnswer::TopCountryMinute { minute, country: Country(country), ad, clicks }, diff));
            }
        }
    }
    // The sink's order: by time (one time per batch here), then as applied.
    batch
}

fn ranked(mut top: Vec<(u64, u64)>) -> Option<Vec<(u64, u64)>> {
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    (!top.is_empty()).then_some(top)
}

/// Every query over the final minutes `[0, final_before)` answers as the model does.
fn check(reader: &SegmentReader, model: &Model, final_before: Minute) {
    let sum_range = |from: Minute, to: Minute, f: &dyn Fn(Minute) -> u64| (from..to).map(f).sum::<u64>();
    for from in 0..final_before {
        for to in [from, from + 1, from + 3, final_before] {
            let to = to.min(final_before);
            // One id more than were written: absent ids count nothing.
            for id in (0..=ADS).map(id) {
                let ad = sum_range(from, to, &|m| model.ad.get(&(m, id)).copied().unwrap_or(0));
                assert_eq!(reader.count(Subject::Ad(id), from, to, None), ad, "ad {id} {from}..{to}");
                let campaign = sum_range(from, to, &|m| model.campaign.get(&(m, id)).copied().unwrap_or(0));
                assert_eq!(reader.count(Subject::Campaign(id), from, to, None), campaign, "campaign {id} {from}..{to}");
                for c in COUNTRIES {
                    let ad = sum_range(from, to, &|m| model.country.get(&(m, c, id)).copied().unwrap_or(0));
                    assert_eq!(reader.count(Subject::Ad(id), from, to, Some(Country(c))), ad, "ad {id} in {c} {from}..{to}");
                    let campaign = sum_range(from, to, &|m| model.campaign_country.get(&(m, c, id)).copied().unwrap_or(0));
                    assert_eq!(reader.count(Subject::Campaign(id), from, to, Some(Country(c))), campaign, "campaign {id} in {c}");
                }
            }
            let mut sums = HashMap::new();
            reader.add_sums(from, to, None, &mut sums);
            let mut wanted: HashMap<u64, u64> = HashMap::new();
            for ((_, ad), clicks) in model.ad.range((from, 0)..(to, 0)) {
                *wanted.entry(*ad).or_default() += clicks;
            }
            assert_eq!(sums, wanted, "sums {from}..{to}");
            for c in COUNTRIES {
                let mut sums = HashMap::new();
                reader.add_sums(from, to, Some(Country(c)), &mut sums);
                let mut wanted: HashMap<u64, u64> = HashMap::new();
                for ((_, _, ad), clicks) in model.country.range((from, 0, 0)..(to, 0, 0)).filter(|((_, country, _), _)| *country == c) {
                    *wanted.entry(*ad).or_default() += clicks;
                }
                assert_eq!(sums, wanted, "sums in {c} {from}..{to}");
            }
        }
        let top = model.top.iter().filter(|t| t.0 == from).map(|t| (t.1, t.2)).collect();
        assert_eq!(reader.top_of_minute(from, None), ranked(top), "top of {from}");
        for c in COUNTRIES {
            let top = model.top_country.iter().filter(|t| t.0 == from && t.1 == c).map(|t| (t.2, t.3)).collect();
            assert_eq!(reader.top_of_minute(from, Some(Country(c))), ranked(top), "top of {from} in {c}");
        }
        for ad in (0..=ADS).map(id) {
            let wanted = (model.ad.get(&(from, ad)).copied().unwrap_or(0), model.history.get(&(from, ad)).cloned().unwrap_or_default());
            assert_eq!(reader.history(ad, from), wanted, "history of {ad} in {from}");
        }
    }
    let with_clicks: BTreeSet<Minute> = model.ad.keys().map(|k| k.0).filter(|&m| m < final_before).collect();
    assert_eq!(reader.minutes_before(final_before), with_clicks.len() as u64);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random changes over 30 minutes, committed as the frontier advances by random steps: at
    /// every step, every query over every final minute equals the model's answer; at the end
    /// (frontier `None`) every minute is final, and the summary agrees too.
    #[test]
    fn every_query_on_final_minutes_equals_the_model(seed in any::<u64>()) {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, reader) = SegmentStore::create(dir.path(), rules());
        let mut model = Model::default();
        let mut random = Random(seed);
        let mut frontier: Time = 0;
        while frontier < 30 * MINUTE_MS {
            frontier += 1_000 * (1 + random.below(90));
            let final_before = rules().final_minutes_before(frontier);
            // Changes at the frontier's time, to minutes not final yet, up to two minutes ahead.
            let batch = random_batch(&mut model, &mut random, frontier, final_before, final_before + 3);
            let later = rules().final_minutes_before(frontier + 1_000);
            store.commit(Some(frontier + 1_000), &batch).unwrap();
            check(&reader, &model, later);
        }
        store.commit(None, &Batch::default()).unwrap();
        let last = model.ad.keys().chain(model.campaign.keys()).map(|k| k.0 + 1).max().unwrap_or(0);
        check(&reader, &model, last.max(rules().final_minutes_before(frontier)) + 3);
        let mut summary = Summary::default();
        store.summarize(&mut summary).unwrap();
        prop_assert_eq!(summary.clicks, model.ad.values().sum::<u64>());
        prop_assert_eq!(summary.excluded, model.excluded.values().sum::<u64>());
        let mut per_minute: BTreeMap<Minute, u64> = BTreeMap::new();
        for ((m, _), c) in &model.ad {
            *per_minute.entry(*m).or_default() += c;
        }
        prop_assert_eq!(summary.minutes, per_minute.len() as u64);
        let busiest = per_minute.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))).map(|(m, c)| (*m, *c));
        prop_assert_eq!(summary.busiest_minute.map(|b| (b.0, b.1)), busiest);
    }
}

/// The entries the store holds in memory are the open minutes' alone: they stay bounded as
/// thousands of minutes are sealed, while the sealed minutes keep answering.
#[test]
fn memory_holds_only_the_open_minutes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, reader) = SegmentStore::create(dir.path(), rules());
    let mut most = 0;
    for minute in 0..3_000u32 {
        let time = (minute as Time + 1) * MINUTE_MS;
        let mut batch = Batch::default();
        for ad in 0..20u64 {
            batch.changes.push((time, Answer::AdMinute { minute, ad, clicks: ad + 1 }, 1));
            batch.changes.push((time, Answer::CountryMinute { minute, country: Country(COUNTRIES[0]), ad, clicks: ad + 1 }, 1));
        }
        store.commit(Some(time), &batch).unwrap();
        most = most.max(store.open_entries());
    }
    // A minute is final one minute after its end: at most two minutes of 60 entries are open.
    assert!(most <= 2 * 60, "{most} entries held in memory");
    assert_eq!(reader.sealed(), 2_999);
    assert_eq!(reader.count(Subject::Ad(4), 0, 2_999, None), 5 * 2_999);
    assert_eq!(reader.count(Subject::Ad(4), 1_000, 1_010, Some(Country(COUNTRIES[0]))), 50);
}

/// A change to a minute already sealed (retention forgetting it, which the sink also drops)
/// changes nothing: the minute stays as it was written.
#[test]
fn changes_to_sealed_minutes_are_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, reader) = SegmentStore::create(dir.path(), rules());
    let mut batch = Batch::default();
    batch.changes.push((1_000, Answer::AdMinute { minute: 0, ad: 9, clicks: 3 }, 1));
    store.commit(Some(2 * MINUTE_MS), &batch).unwrap();
    assert_eq!(reader.count(Subject::Ad(9), 0, 1, None), 3);
    let mut forgetting = Batch::default();
    forgetting.changes.push((2 * MINUTE_MS, Answer::AdMinute { minute: 0, ad: 9, clicks: 3 }, -1));
    store.commit(Some(3 * MINUTE_MS), &forgetting).unwrap();
    store.commit(None, &Batch::default()).unwrap();
    assert_eq!(reader.count(Subject::Ad(9), 0, 1, None), 3);
    assert_eq!(reader.history(9, 0).1.len(), 1);
    assert_eq!(reader.sealed(), 1);
}
