//! The answers as the sink has applied them, kept in memory for the server: every update of
//! every view up to one frontier, so that each query reads one consistent watermark.
//!
//! The sink applies the dataflow's updates in time order and publishes them here once per
//! frontier advance: a reader sees the state before or after an advance, never half of one.
//!
//! Memory holds only the minutes that can still change, and the sliding windows (SPEC §6). Once
//! a minute is final and the store has committed it, it is dropped from here: `hot_from` is the
//! first minute held, and the minutes before it are read from the store
//! ([`super::cold`]), where they can no longer change. Retention retractions are never
//! applied, so a minute is answered the same from either tier.
//!
//! There are two copies (the "left-right" scheme): the sink applies an advance to the copy no
//! reader is directed to, points readers at it, then brings the other copy level. Applying a
//! minute's updates takes tens of milliseconds during a replay; with one copy under a lock,
//! every query in that time waited for it. Readers now wait only if they picked a copy just
//! before the switch, and memory is twice the answers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, RwLock, RwLockReadGuard};


use super::peek::Peeks;
use crate::model::{Counters, SnapshotByWindow, Summary};
pub use crate::model::{HistoryEntry, Subject};
use std::time::Instant;

use clickagg_dataflows::{minute_of, Answer, Country, Minute, ServingAnswer, Time, MINUTE_MS};

/// The materialized answers.
#[derive(Debug, Default)]
pub struct Materialized {
    /// Every update before this time is applied (the sink's frontier); `None` before the first.
    pub frontier: Option<Time>,
    /// Set when the input is complete (a replay has ended): the answers stand as of the end of
    /// the last minute read.
    pub complete_at: Option<Time>,
    pub ad: BTreeMap<Minute, HashMap<u64, u64>>,
    pub campaign: BTreeMap<Minute, HashMap<u64, u64>>,
    pub country: BTreeMap<(Minute, Country), HashMap<u64, u64>>,
    /// Clicks per campaign per country (served only, in no file).
    pub campaign_country: BTreeMap<(Minute, Country), HashMap<u64, u64>>,
    /// The maintained top K of each minute in each country.
    pub top_country_minute: BTreeMap<(Minute, Country), BTreeSet<Ranked>>,
    /// The maintained top K of the last M minutes in each country, as of the frontier.
    pub top_country_window: BTreeMap<(u32, Country), BTreeSet<Ranked>>,
    /// The maintained clicks of each campaign in the last M minutes, as of the frontier.
    pub campaign_window: HashMap<(u32, u64), u64>,
    /// The maintained top K of each minute, ranked.
    pub top_minute: BTreeMap<Minute, BTreeSet<Ranked>>,
    /// The top K of each window at the latest minute boundaries, as `top_window_{M}m.csv` has
    /// them (a few are kept: the frontier can run ahead of the boundary answers stand at).
    pub window_snapshots: BTreeMap<Minute, BTreeMap<u32, Vec<(u64, u64)>>>,
    /// Every update of each ad's count, by minute.
    pub history: BTreeMap<Minute, HashMap<u64, Vec<HistoryEntry>>>,
    /// Minutes before this one are not held here: they are final and committed to the store.
    pub hot_from: Minute,
    /// How many minutes before `hot_from` have clicks.
    pub cold_minutes: u64,
    pub counters: Counters,
    /// The latest minute with an accepted click.
    pub last_minute: Option<Minute>,
    /// How many advances have been published: answers with the same version are the same.
    pub version: u64,
}

/// `(clicks descending, ad ascending)`: a set of these iterates in SPEC §3's rank order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ranked {
    pub neg_clicks: std::cmp::Reverse<u64>,
    pub ad: u64,
}

impl Ranked {
    pub fn new(ad: u64, clicks: u64) -> Ranked {
        Ranked { neg_clicks: std::cmp::Reverse(clicks), ad }
    }
    pub fn clicks(&self) -> u64 {
        self.neg_clicks.0
    }
}

/// A top-K membership row: in with `+1`, out with `-1`.
fn member(set: &mut BTreeSet<Ranked>, ad: u64, clicks: u64, diff: isize) {
    if diff > 0 {
        set.insert(Ranked::new(ad, clicks));
    } else {
        set.remove(&Ranked::new(ad, clicks));
    }
}

fn add<K: std::hash::Hash + Eq + Copy>(map: &mut HashMap<K, u64>, key: K, clicks: u64, diff: isize) {
    // A count is a row: the old value's retraction and the new one's insertion arrive together,
    // so a key holds at most one value once a time's updates are applied.
    let entry = map.entry(key).or_insert(0);
    if diff > 0 {
        *entry = clicks;
    } else if *entry == clicks {
        map.remove(&key);
    }
}

impl Materialized {
    /// The minute boundary the answers stand at: `floor(watermark / 1 min)`.
    pub fn boundary(&self) -> Option<Minute> {
        self.watermark().map(minute_of)
    }

    /// The watermark the answers are exact as of.
    pub fn watermark(&self) -> Option<Time> {
        self.complete_at.or(self.frontier)
    }

    /// How many entries this copy holds: per-minute counts, top-K members, window members and
    /// snapshot rows, history updates. The figure that must not grow with the log's length
    /// (`/v1/status` `served_entries`, `clickagg_served_entries`).
    pub fn entries(&self) -> u64 {
        let counts = self.ad.values().chain(self.campaign.values()).map(HashMap::len).sum::<usize>()
            + self.country.values().chain(self.campaign_country.values()).map(HashMap::len).sum::<usize>();
        let tops = self.top_minute.values().map(BTreeSet::len).sum::<usize>()
            + self.top_country_minute.values().chain(self.top_country_window.values()).map(BTreeSet::len).sum::<usize>();
        let snapshots = self.window_snapshots.values().flat_map(BTreeMap::values).map(Vec::len).sum::<usize>();
        let history = self.history.values().flat_map(HashMap::values).map(Vec::len).sum::<usize>();
        (counts + tops + snapshots + history + self.campaign_window.len()) as u64
    }

    /// Every update of `ad`'s count in `minute` that this copy holds, in order.
    pub fn history_of(&self, ad: u64, minute: Minute) -> &[HistoryEntry] {
        self.history.get(&minute).and_then(|ads| ads.get(&ad)).map_or(&[], Vec::as_slice)
    }

    /// Drops every minute before `before` (they are final and committed: the store answers
    /// them from now on). The sliding windows and snapshots stay.
    pub fn evict_before(&mut self, before: Minute) {
        if before <= self.hot_from {
            return;
        }
        let first = (before, Country(0));
        let kept = self.ad.split_off(&before);
        // A minute's map is removed when its last count is, so each one left has clicks.
        self.cold_minutes += self.ad.len() as u64;
        self.ad = kept;
        self.campaign = self.campaign.split_off(&before);
        self.country = self.country.split_off(&first);
        self.campaign_country = self.campaign_country.split_off(&first);
        self.top_country_minute = self.top_country_minute.split_off(&first);
        self.top_minute = self.top_minute.split_off(&before);
        self.history = self.history.split_off(&before);
        self.hot_from = before;
    }

    /// Applies one update at `time`. Within one time, the old row's retraction and the new row's
    /// insertion may come in either order.
    pub fn apply(&mut self, time: Time, answer: &Answer, diff: isize) {
        if answer.minute().is_some_and(|minute| minute < self.hot_from) {
            // Recovery replays minutes the store already holds as final: the store answers them.
            if let Answer::AdMinute { clicks, .. } = *answer {
                self.counters.billable = (self.counters.billable as i64 + diff as i64 * clicks as i64) as u64;
            }
            return;
        }
        match *answer {
            Answer::AdMinute { minute, ad, clicks } => {
                let map = self.ad.entry(minute).or_default();
                add(map, ad, clicks, diff);
                if map.is_empty() {
                    self.ad.remove(&minute);
                }
                self.counters.billable = (self.counters.billable as i64 + diff as i64 * clicks as i64) as u64;
                self.history.entry(minute).or_default().entry(ad).or_default().push(HistoryEntry { time, clicks, diff: diff as i64 });
                self.last_minute = self.last_minute.max(Some(minute));
            }
            Answer::CampaignMinute { minute, campaign, clicks } => {
                add(self.campaign.entry(minute).or_default(), campaign, clicks, diff)
            }
            Answer::CountryMinute { minute, country, ad, clicks } => {
                add(self.country.entry((minute, country)).or_default(), ad, clicks, diff)
            }
            Answer::TopMinute { minute, ad, clicks } => member(self.top_minute.entry(minute).or_default(), ad, clicks, diff),
            Answer::FraudMinute { minute, clicks, .. } => {
                self.counters.excluded = (self.counters.excluded as i64 + diff as i64 * clicks as i64) as u64;
                self.last_minute = self.last_minute.max(Some(minute));
            }
            // Windows are served from the sink's boundary snapshots (`window_snapshots`), the
            // rows `top_window_{M}m.csv` has; the dataflow's current window is not read.
            Answer::TopWindow { .. } => {}
        }
    }

    /// Applies one serving-only update (see [`Materialized::apply`]).
    pub fn apply_serving(&mut self, answer: &ServingAnswer, diff: isize) {
        if answer.minute().is_some_and(|minute| minute < self.hot_from) {
            return;
        }
        match *answer {
            ServingAnswer::CampaignCountryMinute { minute, country, campaign, clicks } => {
                add(self.campaign_country.entry((minute, country)).or_default(), campaign, clicks, diff)
            }
            ServingAnswer::TopCountryMinute { minute, country, ad, clicks } => {
                member(self.top_country_minute.entry((minute, country)).or_default(), ad, clicks, diff)
            }
            ServingAnswer::TopCountryWindow { window, country, ad, clicks } => {
                member(self.top_country_window.entry((window, country)).or_default(), ad, clicks, diff)
            }
            ServingAnswer::CampaignWindow { window, campaign, clicks } => add(&mut self.campaign_window, (window, campaign), clicks, diff),
        }
    }

    /// Whether state maintained "as of the frontier" is the state at the boundary answers stand
    /// at: true when the frontier is on a minute boundary (always, with the default 1m tick),
    /// or the input is complete.
    pub fn frontier_on_boundary(&self) -> bool {
        self.complete_at.is_some() || self.frontier.is_some_and(|f| f % MINUTE_MS == 0)
    }

    /// Clicks of `ad` (or of `campaign`) with minute in `[from, to)`, in `country` if given.
    pub fn count(&self, subject: Subject, from: Minute, to: Minute, country: Option<Country>) -> Result<u64, String> {
        let range = from..to.max(from);
        Ok(match (subject, country) {
            (Subject::Ad(ad), None) => self.ad.range(range).filter_map(|(_, ads)| ads.get(&ad)).sum(),
            (Subject::Campaign(campaign), None) => {
                self.campaign.range(range).filter_map(|(_, campaigns)| campaigns.get(&campaign)).sum()
            }
            (Subject::Ad(ad), Some(country)) => in_country(&self.country, range, country).filter_map(|ads| ads.get(&ad)).sum(),
            (Subject::Campaign(campaign), Some(country)) => {
                in_country(&self.campaign_country, range, country).filter_map(|campaigns| campaigns.get(&campaign)).sum()
            }
        })
    }

    /// Clicks of `ad` (or of `campaign`) in each minute of `[from, to)`, in `country` if given:
    /// one `(minute, clicks)` per minute, in order, zeros included.
    pub fn series(&self, subject: Subject, from: Minute, to: Minute, country: Option<Country>) -> Vec<(Minute, u64)> {
        let of = |maps: Option<&HashMap<u64, u64>>, id: u64| maps.and_then(|m| m.get(&id)).copied().unwrap_or(0);
        (from..to.max(from))
            .map(|minute| {
                let clicks = match (subject, country) {
                    (Subject::Ad(ad), None) => of(self.ad.get(&minute), ad),
                    (Subject::Campaign(campaign), None) => of(self.campaign.get(&minute), campaign),
                    (Subject::Ad(ad), Some(country)) => of(self.country.get(&(minute, country)), ad),
                    (Subject::Campaign(campaign), Some(country)) => of(self.campaign_country.get(&(minute, country)), campaign),
                };
                (minute, clicks)
            })
            .collect()
    }

    /// Adds each ad's clicks over minutes `[from, to)`, in `country` if given, to `sums`.
    pub fn add_sums(&self, from: Minute, to: Minute, country: Option<Country>, sums: &mut HashMap<u64, u64>) {
        let mut absorb = |ads: &HashMap<u64, u64>| {
            for (&ad, &clicks) in ads {
                *sums.entry(ad).or_insert(0) += clicks;
            }
        };
        match country {
            None => self.ad.range(from..to.max(from)).for_each(|(_, ads)| absorb(ads)),
            Some(c) => in_country(&self.country, from..to.max(from), c).for_each(absorb),
        }
    }
}

/// The maps of `country` in the minutes of `range`: a walk over the minutes held, not over
/// every minute of the range.
fn in_country<V>(
    maps: &BTreeMap<(Minute, Country), V>,
    range: std::ops::Range<Minute>,
    country: Country,
) -> impl Iterator<Item = &V> {
    maps.range((range.start, Country(0))..(range.end, Country(0))).filter(move |((_, c), _)| *c == country).map(|(_, map)| map)
}

/// The `count` best `(ad, clicks)` by clicks descending, then ad ascending.
pub fn top_of(mut all: Vec<(u64, u64)>, count: usize) -> Vec<(u64, u64)> {
    let rank = |a: &(u64, u64), b: &(u64, u64)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
    if all.len() > count {
        all.select_nth_unstable_by(count, rank);
        all.truncate(count);
    }
    all.sort_by(rank);
    all
}

/// How many minute boundaries' window snapshots the server keeps beyond the largest window:
/// once every row is read, the frontier runs on past the boundary answers stand at while the
/// windows empty (up to the largest window's length), and that boundary's snapshot is the one
/// served.
const SNAPSHOTS_BEYOND_WINDOWS: usize = 4;

/// The store tier and the rules that say which minutes are final.
#[derive(Debug)]
pub struct Tiering {
    pub store: Box<dyn super::cold::ColdTier>,
    rules: clickagg_dataflows::EventTimeRules,
    /// Fault injection for the tests (`CLICKAGG_FAULT_KEEP_FINAL_MINUTES`, with the
    /// `fault-injection` feature only): never drop a minute
    /// from memory, as the server did before it had a store tier, so that a test can show that
    /// its figure sees the growth.
    keep_final_minutes: bool,
}

/// The state shared by the sink (one writer) and the server's threads (readers).
pub struct ServingState {
    copies: [RwLock<Materialized>; 2],
    /// Responses already rendered, by request target, with the version they were rendered at:
    /// dashboards poll the same few queries, which change only when the watermark moves.
    pub responses: RwLock<HashMap<String, (u64, std::sync::Arc<String>)>>,
    /// The copy readers use.
    active: AtomicUsize,
    pub started: Instant,
    /// Operators and arrangement sizes of this process's workers.
    pub introspection: crate::introspect::SharedIntrospection,
    /// The settings the answers were computed with, for `/v1/status`.
    pub settings: Settings,
    /// Where peeks go to the workers.
    pub peeks: Peeks,
    /// Called once when the replay is complete, with its summary.
    #[allow(clippy::type_complexity)]
    on_complete: Mutex<Option<Box<dyn FnOnce(&Summary) + Send>>>,
    /// The store the final minutes are read from, once attached.
    tiering: OnceLock<Tiering>,
    /// Held by the one writer at a time (the sink publishing, the committer evicting): the
    /// latest frontier the store has committed (`Time::MAX`: the end of the input).
    writer: Mutex<Option<Time>>,
}

impl std::fmt::Debug for ServingState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingState").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// What the server needs to know of the run's configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub top_k: usize,
    pub windows: Vec<u32>,
    pub partition_names: Vec<String>,
    pub logs: std::path::PathBuf,
    pub watermark_delay_ms: u64,
    pub allowed_lateness_ms: Option<u64>,
}

impl Settings {
    /// The size of partition `name`'s file, when the partitions are files (a topic partition's
    /// end is in [`crate::model::positions`]).
    pub fn partition_file_size(&self, name: &str) -> Option<u64> {
        if self.logs.as_os_str().is_empty() {
            return None;
        }
        std::fs::metadata(self.logs.join(name)).map(|m| m.len()).ok()
    }
}

impl ServingState {
    pub fn new(settings: Settings) -> ServingState {
        ServingState {
            copies: [RwLock::new(Materialized::default()), RwLock::new(Materialized::default())],
            active: AtomicUsize::new(0),
            responses: RwLock::new(HashMap::new()),
            started: Instant::now(),
            introspection: Default::default(),
            peeks: Peeks::default(),
            on_complete: Mutex::new(None),
            tiering: OnceLock::new(),
            writer: Mutex::new(None),
            settings,
        }
    }

    /// What to do once the replay is complete (print its summary, say so).
    pub fn on_complete(&self, action: impl FnOnce(&Summary) + Send + 'static) {
        if let Ok(mut slot) = self.on_complete.lock() {
            *slot = Some(Box::new(action));
        }
    }

    /// Called by worker 0 when the replay is complete.
    pub fn replay_complete(&self, summary: &Summary) {
        if let Some(action) = self.on_complete.lock().ok().and_then(|mut slot| slot.take()) {
            action(summary);
        }
    }

    /// The answers as of one frontier, for as long as the guard is held.
    pub fn read(&self) -> RwLockReadGuard<'_, Materialized> {
        loop {
            let copy = &self.copies[self.active.load(Ordering::Acquire)];
            match copy.try_read() {
                Ok(guard) => return guard,
                // The sink is bringing this copy level after a switch: the other one is current.
                Err(std::sync::TryLockError::WouldBlock) => std::thread::yield_now(),
                Err(std::sync::TryLockError::Poisoned(poisoned)) => return poisoned.into_inner(),
            }
        }
    }

    /// Reads the final minutes from the store at `path` from now on. `committed`: the frontier
    /// the store had already committed (a resumed store), whose final minutes the dataflow will
    /// not rebuild. Minutes are dropped from memory as the store commits them ([`Self::committed`]).
    pub fn attach_store(&self, path: &std::path::Path, committed: Option<Time>, rules: clickagg_dataflows::EventTimeRules) -> Result<(), String> {
        self.attach_cold(Box::new(super::store_tier::StoreTier::open(path)?), committed, rules)
    }

    /// Reads the final minutes from `store` from now on (see [`Self::attach_store`]).
    pub fn attach_cold(
        &self,
        store: Box<dyn super::cold::ColdTier>,
        committed: Option<Time>,
        rules: clickagg_dataflows::EventTimeRules,
    ) -> Result<(), String> {
        let mut writer = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(committed) = committed {
            let hot_from = rules.final_minutes_before(committed);
            let cold_minutes = store.minutes_before(hot_from)?;
            for copy in &self.copies {
                let mut answers = copy.write().unwrap_or_else(|poisoned| poisoned.into_inner());
                answers.evict_before(hot_from);
                answers.cold_minutes = cold_minutes;
            }
            *writer = Some(committed);
        }
        // Read only by builds with the `fault-injection` feature (the tests'): a production build
        // never looks at the environment here.
        let keep_final_minutes = cfg!(feature = "fault-injection") && std::env::var_os("CLICKAGG_FAULT_KEEP_FINAL_MINUTES").is_some();
        self.tiering.set(Tiering { store, rules, keep_final_minutes }).map_err(|_| "a store is already attached to the server".to_string())
    }

    /// The store the final minutes are read from, if one is attached.
    pub fn store(&self) -> Option<&dyn super::cold::ColdTier> {
        self.tiering.get().map(|t| t.store.as_ref())
    }

    /// Called by the committer once the store has committed every update before `frontier`
    /// (`None`: the whole input): the minutes final by then are dropped from memory.
    pub fn committed(&self, frontier: Option<Time>) {
        let mut writer = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let frontier = frontier.unwrap_or(Time::MAX);
        *writer = Some(writer.map_or(frontier, |f| f.max(frontier)));
        self.evict(*writer);
    }

    /// Drops the minutes that are final as of both the published watermark and `committed`
    /// from both copies, the one readers are not directed to first. The caller holds `writer`.
    /// Until a copy is switched to, its readers read the minutes it still holds from it; after,
    /// from the store, which has them final: a reader sees each minute in exactly one tier.
    fn evict(&self, committed: Option<Time>) {
        let (Some(tiering), Some(committed)) = (self.tiering.get(), committed) else { return };
        if tiering.keep_final_minutes {
            return;
        }
        let active = self.active.load(Ordering::Acquire);
        for copy in [1 - active, active] {
            let mut answers = self.copies[copy].write().unwrap_or_else(|poisoned| poisoned.into_inner());
            let Some(watermark) = answers.watermark() else { return };
            answers.evict_before(tiering.rules.final_minutes_before(watermark.min(committed)));
            drop(answers);
            if copy != active {
                self.active.store(copy, Ordering::Release);
            }
        }
    }

    /// Applies one frontier advance's updates atomically.
    pub fn publish(
        &self,
        frontier: Option<Time>,
        updates: &[(Time, Answer, isize)],
        serving: &[(ServingAnswer, isize)],
        snapshots: Vec<SnapshotByWindow>,
        counters: Option<Counters>,
    ) {
        let writer = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let snapshots_kept = self.settings.windows.iter().max().map_or(0, |&w| w as usize) + SNAPSHOTS_BEYOND_WINDOWS;
        let active = self.active.load(Ordering::Acquire);
        for copy in [1 - active, active] {
            let mut answers = self.copies[copy].write().unwrap_or_else(|poisoned| poisoned.into_inner());
            for (time, answer, diff) in updates {
                answers.apply(*time, answer, *diff);
            }
            for (answer, diff) in serving {
                answers.apply_serving(answer, *diff);
            }
            answers.window_snapshots.extend(snapshots.iter().cloned());
            while answers.window_snapshots.len() > snapshots_kept {
                answers.window_snapshots.pop_first();
            }
            if let Some(counters) = &counters {
                let (billable, excluded) = (answers.counters.billable, answers.counters.excluded);
                answers.counters = Counters { billable, excluded, ..counters.clone() };
            }
            match frontier {
                Some(frontier) => answers.frontier = Some(frontier),
                None => {
                    let end = answers.last_minute.map_or(0, |m| (m as Time + 1) * MINUTE_MS);
                    answers.complete_at = Some(end);
                }
            }
            answers.version += 1;
            drop(answers);
            if copy != active {
                self.active.store(copy, Ordering::Release);
            }
        }
        self.evict(*writer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_retractions_and_ranges() {
        let mut m = Materialized::default();
        m.apply(60_000, &Answer::AdMinute { minute: 0, ad: 7, clicks: 2 }, 1);
        m.apply(120_000, &Answer::AdMinute { minute: 0, ad: 7, clicks: 2 }, -1);
        m.apply(120_000, &Answer::AdMinute { minute: 0, ad: 7, clicks: 3 }, 1);
        m.apply(120_000, &Answer::AdMinute { minute: 1, ad: 7, clicks: 1 }, 1);
        assert_eq!(m.count(Subject::Ad(7), 0, 1, None), Ok(3));
        assert_eq!(m.count(Subject::Ad(7), 0, 2, None), Ok(4));
        assert_eq!(m.count(Subject::Ad(7), 2, 0, None), Ok(0));
        assert_eq!(m.counters.billable, 4);
        assert_eq!(m.history_of(7, 0).len(), 3);
    }

    #[test]
    fn top_of_ranks_by_clicks_then_ad() {
        assert_eq!(top_of(vec![(5, 1), (3, 9), (4, 9), (1, 2)], 3), vec![(3, 9), (4, 9), (1, 2)]);
        assert_eq!(top_of(vec![(5, 1)], 10), vec![(5, 1)]);
    }
}
