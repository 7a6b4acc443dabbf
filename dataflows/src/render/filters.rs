//! Arrangements of the retained billable clicks keyed by ip and by user_id, for answers with
//! the high-cardinality filters of SPEC §3. Counting every (minute, ip, ad) would cost a row per
//! click; instead the clicks themselves are arranged by the filtered column, and a query reads
//! the one key it asks for (a peek).
//!
//! A click stays from its minute until the minute is older than allowed lateness plus the
//! largest window: as far back as any windowed answer reaches.

use std::cell::Cell;
use std::hash::Hash;
use std::rc::Rc;

use differential_dataflow::operators::arrange::TraceAgent;
use differential_dataflow::trace::implementations::ValSpine;
use differential_dataflow::trace::cursor::cursor_list;
use differential_dataflow::trace::{Cursor, TraceReader};
use differential_dataflow::{ExchangeData, VecCollection};
use timely::progress::Antichain;

use super::temporal;
use crate::event_time::EventTimeRules;
use crate::types::{minute_of, ClickAttrs, ClickKey, Country, Ip, Minute, Time, MINUTE_MS};

/// What a filter query needs of one click.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct FilterRow {
    pub minute: Minute,
    pub ad: u64,
    pub campaign: u64,
    pub country: Country,
    pub user: u64,
    pub ip: Ip,
}

/// A trace of filter rows keyed by `K`.
pub type FilterTrace<K> = TraceAgent<ValSpine<K, FilterRow, Time, isize>>;

/// The arrangements, and how far back they are complete.
pub struct FilterArrangements {
    pub by_ip: FilterTrace<Ip>,
    pub by_user: FilterTrace<u64>,
    /// The last input frontier the expiry has seen: every click whose expiry is after it is
    /// still held (see [`FilterArrangements::retained_from`]).
    pub expired_through: Rc<Cell<Option<Time>>>,
    pub rules: EventTimeRules,
    pub horizon_minutes: u32,
}

/// When a click of `minute` leaves the filter arrangements.
fn expiry(rules: &EventTimeRules, minute: Minute, horizon_minutes: u32) -> Option<Time> {
    rules.minute_final_at(minute).map(|at| at + horizon_minutes as u64 * MINUTE_MS)
}

/// Arranges `clicks` (distinct billable clicks, with the pipeline's own retention retractions)
/// by ip and by user, held until `horizon_minutes` after each minute is final.
///
/// Updates at or after a minute's final time are the pipeline's retention forgetting it, and
/// are dropped; the click is retracted here later instead. At the end of the input, retractions
/// still pending are dropped rather than sent, so that after a replay the arrangements hold the
/// last `horizon` of clicks for queries, as they did at the last frontier.
pub fn render_filters<'scope>(
    clicks: VecCollection<'scope, Time, (ClickKey, ClickAttrs)>,
    rules: &EventTimeRules,
    horizon_minutes: u32,
) -> FilterArrangements {
    let rules = *rules;
    let expired_through = Rc::new(Cell::new(None));
    let retained = temporal::expiring_observed(
        "RetainForFilters",
        clicks,
        move |(key, attrs): &(ClickKey, ClickAttrs), time| {
            let minute = minute_of(key.ts);
            let current = !rules.is_final_at(minute, time);
            let row = FilterRow { minute, ad: attrs.ad, campaign: attrs.campaign, country: attrs.country, user: attrs.user, ip: attrs.ip };
            current.then(|| (row, expiry(&rules, minute, horizon_minutes).unwrap_or(Time::MAX), 1))
        },
        Rc::clone(&expired_through),
    );
    let by_ip = retained.clone().map(|row| (row.ip, row)).arrange_by_key_named("Arrange: ClicksByIp").trace;
    let by_user = retained.map(|row| (row.user, row)).arrange_by_key_named("Arrange: ClicksByUser").trace;
    // Their first rows, for a peek without a key (a peek with one reads `FilterArrangements`).
    super::traces::register_trace("Arrange: ClicksByIp", &by_ip);
    super::traces::register_trace("Arrange: ClicksByUser", &by_user);
    FilterArrangements { by_ip, by_user, expired_through, rules, horizon_minutes }
}

/// A key to peek at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FilterKey {
    Ip(Ip),
    User(u64),
}

/// What one worker holds for one key, or, merged, what all of them hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeekResult {
    /// Each distinct row held for the key with its multiplicity.
    pub rows: Vec<(FilterRow, isize)>,
    /// The first minute held completely (by every worker, once merged).
    pub retained_from: Minute,
    /// Every update before this time is in the trace (the least over workers, once merged);
    /// `None` when the input is complete.
    pub upper: Option<Time>,
}

impl PeekResult {
    /// Adds another worker's part: rows together, the latest retention, the least upper
    /// (`None`, the complete input, is the identity).
    pub fn merge(&mut self, part: PeekResult) {
        self.rows.extend(part.rows);
        self.retained_from = self.retained_from.max(part.retained_from);
        self.upper = match (self.upper, part.upper) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

impl FilterArrangements {
    /// The first minute whose clicks are all still held: minutes before it may have expired.
    pub fn retained_from(&self) -> Minute {
        let Some(through) = self.expired_through.get() else { return 0 };
        // Expiry grows with the minute; find the first minute that expires after `through`.
        let (mut low, mut high) = (0, minute_of(through) + 1);
        while low < high {
            let mid = low + (high - low) / 2;
            if expiry(&self.rules, mid, self.horizon_minutes).is_none_or(|at| at > through) {
                high = mid;
            } else {
                low = mid + 1;
            }
        }
        low
    }

    /// The rows held for `key` on this worker, accumulated over every time in the trace.
    pub fn peek(&mut self, key: FilterKey) -> PeekResult {
        let rows = match key {
            FilterKey::Ip(ip) => read_key(&mut self.by_ip, &ip),
            FilterKey::User(user) => read_key(&mut self.by_user, &user),
        };
        let mut upper = Antichain::new();
        self.by_ip.read_upper(&mut upper);
        PeekResult { rows, retained_from: self.retained_from(), upper: upper.as_option().copied() }
    }

    /// Lets the traces compact up to what they hold: a peek reads the accumulation over every
    /// time, which compaction does not change. Without this a held trace never compacts.
    ///
    /// Once the input is complete the upper is empty; the frontiers then stay where they were,
    /// since a trace compacted to the empty frontier can no longer be read.
    pub fn allow_compaction(&mut self) {
        compact_to_upper(&mut self.by_ip);
        compact_to_upper(&mut self.by_user);
    }
}

fn compact_to_upper<K: ExchangeData + Hash>(trace: &mut FilterTrace<K>) {
    let upper = read_upper(trace);
    if !upper.is_empty() {
        trace.set_logical_compaction(upper.borrow());
        trace.set_physical_compaction(upper.borrow());
    }
}

fn read_upper<K: ExchangeData + Hash>(trace: &mut FilterTrace<K>) -> Antichain<Time> {
    let mut upper = Antichain::new();
    trace.read_upper(&mut upper);
    upper
}

fn read_key<K: ExchangeData + Hash>(trace: &mut FilterTrace<K>, key: &K) -> Vec<(FilterRow, isize)> {
    let upper = read_upper(trace);
    let Some(batches) = trace.batches_through(upper.borrow()) else {
        unreachable!("the trace is compacted only up to its upper, so it can be read through it")
    };
    let (mut cursor, storage) = cursor_list(batches);
    let mut rows = Vec::new();
    cursor.seek_key(&storage, key);
    if cursor.get_key(&storage) == Some(key) {
        while let Some(row) = cursor.get_val(&storage) {
            let mut count = 0;
            cursor.map_times(&storage, |_, diff| count += *diff);
            if count != 0 {
                rows.push((*row, count));
            }
            cursor.step_val(&storage);
        }
    }
    rows
}
