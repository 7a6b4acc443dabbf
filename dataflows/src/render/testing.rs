//! What the operators' reference tests share: a seeded generator, a run of one operator over
//! given updates on some number of workers, and the collection its output holds at a time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use differential_dataflow::input::Input;
use differential_dataflow::VecCollection;
use timely::dataflow::operators::{Exchange, Inspect, Probe};

use crate::event_time::EventTimeRules;
use crate::types::{minute_of, Minute, Time, MINUTE_MS};

/// The settings the per-minute operators are tried under: one-minute lateness on 1 and 3
/// workers, and no lateness bound (nothing is ever final) on 2.
pub fn rules_and_workers() -> [(EventTimeRules, usize); 3] {
    let bounded = EventTimeRules { watermark_delay_ms: 0, allowed_lateness_ms: Some(60_000), tick_ms: 10_000 };
    let unbounded = EventTimeRules { allowed_lateness_ms: None, ..bounded };
    [(bounded, 1), (bounded, 3), (unbounded, 2)]
}

/// A seeded xorshift generator: `next(bound)` is in `0..bound`.
pub fn generator(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move |bound| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound
    }
}

/// `updates` spread over the workers by their record and time, not by any key: for a reader that
/// is to put each key's updates on one worker itself. (Fed in on worker 0, they are all on one.)
pub fn scattered<'scope, D: differential_dataflow::ExchangeData + std::hash::Hash>(updates: VecCollection<'scope, Time, D>) -> VecCollection<'scope, Time, D> {
    use differential_dataflow::collection::AsCollection;
    updates.inner.exchange(|(record, time, _): &(D, Time, isize)| crate::hashing::fast_hash(&(record, time))).as_collection()
}

/// Every update the operator `build` makes on `workers` workers, from `updates` (sorted by time)
/// fed in on worker 0. A worker that panics (an operator's assertion) fails the run: the others
/// stop too, instead of waiting for its progress forever.
pub fn run_operator<D, O>(
    workers: usize,
    updates: &[(D, Time, isize)],
    build: impl for<'scope> Fn(VecCollection<'scope, Time, D>) -> VecCollection<'scope, Time, O> + Send + Sync + 'static,
) -> Vec<(O, Time, isize)>
where
    D: differential_dataflow::ExchangeData + Sync,
    O: Clone + Send + 'static,
{
    let output = Arc::new(Mutex::new(Vec::new()));
    let (shared, updates) = (Arc::clone(&output), updates.to_vec());
    let failed = Arc::new(AtomicBool::new(false));
    timely::execute(timely::Config::process(workers), move |worker| {
        let _failing = FailOnPanic(Arc::clone(&failed));
        let shared = Arc::clone(&shared);
        let (mut input, probe) = worker.dataflow::<Time, _, _>(|scope| {
            let (input, collection) = scope.new_collection::<D, isize>();
            let probe = build(collection).inner.inspect(move |update| shared.lock().unwrap().push(update.clone())).probe().0;
            (input, probe)
        });
        if worker.index() == 0 {
            for (datum, time, diff) in &updates {
                input.advance_to(*time);
                input.update(datum.clone(), *diff);
            }
        }
        input.close();
        while !probe.done() {
            assert!(!failed.load(Ordering::Relaxed), "another worker panicked");
            worker.step();
        }
    })
    .unwrap();
    let output = output.lock().unwrap().clone();
    output
}

/// Marks a run failed when the worker holding it unwinds.
struct FailOnPanic(Arc<AtomicBool>);

impl Drop for FailOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// What `output` holds at `time`: its updates up to then, summed, without the zeros.
pub fn held_at<O: Ord + Clone>(output: &[(O, Time, isize)], time: Time) -> BTreeMap<O, isize> {
    let mut held: BTreeMap<O, isize> = BTreeMap::new();
    for (record, _, diff) in output.iter().filter(|update| update.1 <= time) {
        *held.entry(record.clone()).or_default() += diff;
    }
    held.retain(|_, count| *count != 0);
    held
}

/// Every time at which `updates` or `output` has an update, in order.
pub fn times_of<D, O>(updates: &[(D, Time, isize)], output: &[(O, Time, isize)]) -> Vec<Time> {
    let mut times: Vec<Time> = updates.iter().map(|u| u.1).chain(output.iter().map(|u| u.1)).collect();
    times.sort();
    times.dedup();
    times
}

/// Updates `((minute, ad), time, diff)` as de-duplication sends them: clicks from their time
/// on, some taken back later (a smaller copy moved them), and every click still counted
/// retracted when its minute is final.
pub fn minute_updates(seed: u64, count: usize, rules: &EventTimeRules) -> Vec<((Minute, u64), Time, isize)> {
    let mut next = generator(seed);
    let mut updates = Vec::new();
    for _ in 0..count {
        let ts = next(4 * MINUTE_MS);
        let key = (minute_of(ts), next(6));
        let time = ts + next(MINUTE_MS);
        let time = time - time % 10_000;
        let final_at = rules.minute_final_at(key.0).unwrap_or(Time::MAX);
        if time >= final_at {
            continue;
        }
        let until = if next(5) == 0 { (time + next(MINUTE_MS)).min(final_at) } else { final_at };
        updates.push((key, time, 1));
        if until < Time::MAX {
            updates.push((key, until, -1));
        }
    }
    updates.sort_by_key(|update| update.1);
    updates
}

/// The same updates, with a `-1` and a `+1` of the key just before each addition: a time's
/// changes come in any order (from several workers, or from paths that add and take back the
/// same click), so a count may go below zero before a time's last change.
pub fn with_transient_negatives<K: Copy>(updates: &[(K, Time, isize)]) -> Vec<(K, Time, isize)> {
    updates
        .iter()
        .flat_map(|&(key, time, diff)| {
            let before = if diff > 0 { vec![(key, time, -1), (key, time, 1)] } else { Vec::new() };
            before.into_iter().chain([(key, time, diff)])
        })
        .collect()
}

/// The top `k` ads of each group by clicks descending, then ad ascending, from counts per
/// `(group, ad)` (those not above zero ignored), as `(group, (ad, clicks))` records.
pub fn reference_top_k<G: Ord + Clone>(counts: &BTreeMap<(G, u64), isize>, k: usize) -> BTreeMap<(G, (u64, u64)), isize> {
    let mut ranked: BTreeMap<G, Vec<(u64, u64)>> = BTreeMap::new();
    for ((group, ad), &clicks) in counts.iter().filter(|(_, clicks)| **clicks > 0) {
        ranked.entry(group.clone()).or_default().push((u64::MAX - clicks as u64, *ad));
    }
    let mut tops = BTreeMap::new();
    for (group, mut ranked) in ranked {
        ranked.sort();
        for (inverse, ad) in ranked.into_iter().take(k) {
            tops.insert((group.clone(), (ad, u64::MAX - inverse)), 1);
        }
    }
    tops
}
