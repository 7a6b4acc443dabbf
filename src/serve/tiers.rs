//! The API's per-minute queries over both tiers (SPEC §6): minutes from `hot_from` on are read
//! from memory ([`Materialized`]), the ones before it from the store ([`ColdTier`]: the SQLite
//! store of `--store`, or the segment store of a server without one).
//!
//! The split is taken from the copy of the answers the reader holds, so every minute of a query
//! comes from exactly one tier, and the answer is the one as of that copy's watermark: the
//! minutes before its `hot_from` were final and committed before that copy dropped them, and a
//! final minute never changes in the store.

use std::collections::HashMap;

use clickagg_dataflows::{Country, Minute};

use super::state::{top_of, HistoryEntry, Materialized, Subject};
use super::cold::ColdTier;

/// One reader's view of both tiers.
pub struct Tiers<'a> {
    pub hot: &'a Materialized,
    pub cold: Option<&'a dyn ColdTier>,
}

impl<'a> Tiers<'a> {
    /// `[from, to)` as its part before `hot_from` (the store's) and its part from it on (memory's).
    fn split(&self, from: Minute, to: Minute) -> ((Minute, Minute), (Minute, Minute)) {
        let to = to.max(from);
        let at = self.hot.hot_from.clamp(from, to);
        ((from, at), (at, to))
    }

    /// The store, which holds every minute before `hot_from` (memory drops minutes only once
    /// one is attached).
    fn cold(&self) -> Result<&'a dyn ColdTier, String> {
        self.cold.ok_or_else(|| "minutes before the ones in memory need a store, and none is attached".to_string())
    }

    /// Clicks of `subject` with minute in `[from, to)`, in `country` if given.
    pub fn count(&self, subject: Subject, from: Minute, to: Minute, country: Option<Country>) -> Result<u64, String> {
        let ((cold_from, cold_to), (hot_from, hot_to)) = self.split(from, to);
        let cold = if cold_from < cold_to { self.cold()?.count(subject, cold_from, cold_to, country)? } else { 0 };
        Ok(cold + self.hot.count(subject, hot_from, hot_to, country)?)
    }

    /// The `count` ads with most clicks over minutes `[from, to)`, in `country` if given,
    /// computed from the per-minute counts.
    pub fn top_over(&self, from: Minute, to: Minute, country: Option<Country>, count: usize) -> Result<Vec<(u64, u64)>, String> {
        let ((cold_from, cold_to), (hot_from, hot_to)) = self.split(from, to);
        let mut sums: HashMap<u64, u64> = HashMap::new();
        if cold_from < cold_to {
            self.cold()?.add_sums(cold_from, cold_to, country, &mut sums)?;
        }
        self.hot.add_sums(hot_from, hot_to, country, &mut sums);
        Ok(top_of(sums.into_iter().collect(), count))
    }

    /// The maintained top K of `minute` (in `country` if given), ranked; `None` if there is none.
    pub fn top_of_minute(&self, minute: Minute, country: Option<Country>) -> Result<Option<Vec<(u64, u64)>>, String> {
        if minute < self.hot.hot_from {
            return self.cold()?.top_of_minute(minute, country);
        }
        let top = match country {
            None => self.hot.top_minute.get(&minute),
            Some(country) => self.hot.top_country_minute.get(&(minute, country)),
        };
        Ok(top.map(|top| top.iter().map(|r| (r.ad, r.clicks())).collect()))
    }

    /// `ad`'s clicks in `minute`, and every update of that count, in order.
    pub fn history(&self, ad: u64, minute: Minute) -> Result<(u64, Vec<HistoryEntry>), String> {
        if minute < self.hot.hot_from {
            return self.cold()?.history(ad, minute);
        }
        let clicks = self.hot.ad.get(&minute).and_then(|ads| ads.get(&ad)).copied().unwrap_or(0);
        Ok((clicks, self.hot.history_of(ad, minute).to_vec()))
    }

    /// Clicks of `subject` in each minute of `[from, to)`, in `country` if given: one
    /// `(minute, clicks)` per minute, in order, zeros included. Each minute before `hot_from` is
    /// one indexed lookup in the store (a series spans at most a day of minutes).
    pub fn series(&self, subject: Subject, from: Minute, to: Minute, country: Option<Country>) -> Result<Vec<(Minute, u64)>, String> {
        let ((cold_from, cold_to), (hot_from, hot_to)) = self.split(from, to);
        let mut series = Vec::with_capacity((to.max(from) - from) as usize);
        for minute in cold_from..cold_to {
            series.push((minute, self.cold()?.count(subject, minute, minute + 1, country)?));
        }
        series.extend(self.hot.series(subject, hot_from, hot_to, country));
        Ok(series)
    }

    /// How many minutes have clicks.
    pub fn minutes(&self) -> u64 {
        self.hot.cold_minutes + self.hot.ad.len() as u64
    }
}
