//! The tier the server reads final minutes from (SPEC §6), whichever store holds them: the
//! SQLite store of `--store` ([`StoreTier`]), or the segment store of a server without one
//! ([`SegmentReader`]). Each answers a minute as it was when it became final.

use std::collections::HashMap;

use clickagg_dataflows::{Country, Minute};

use super::store_tier::StoreTier;
use crate::model::{HistoryEntry, Subject};
use crate::storage::segments::SegmentReader;

/// The queries the server sends to the final minutes. The caller bounds each query to minutes
/// that are final and committed; within them, answers never change.
pub trait ColdTier: Send + Sync + std::fmt::Debug {
    /// Clicks of `subject` with minute in `[from, to)`, in `country` if given.
    fn count(&self, subject: Subject, from: Minute, to: Minute, country: Option<Country>) -> Result<u64, String>;

    /// Each ad's clicks summed over minutes `[from, to)`, in `country` if given, added to `sums`.
    fn add_sums(&self, from: Minute, to: Minute, country: Option<Country>, sums: &mut HashMap<u64, u64>) -> Result<(), String>;

    /// The maintained top K of `minute` (in `country` if given), ranked; `None` when it has none.
    fn top_of_minute(&self, minute: Minute, country: Option<Country>) -> Result<Option<Vec<(u64, u64)>>, String>;

    /// `ad`'s clicks in `minute`, and every update of it, in order.
    fn history(&self, ad: u64, minute: Minute) -> Result<(u64, Vec<HistoryEntry>), String>;

    /// How many minutes before `minute` have clicks.
    fn minutes_before(&self, minute: Minute) -> Result<u64, String>;
}

impl ColdTier for StoreTier {
    fn count(&self, subject: Subject, from: Minute, to: Minute, country: Option<Country>) -> Result<u64, String> {
        StoreTier::count(self, subject, from, to, country)
    }

    fn add_sums(&self, from: Minute, to: Minute, country: Option<Country>, sums: &mut HashMap<u64, u64>) -> Result<(), String> {
        StoreTier::add_sums(self, from, to, country, sums)
    }

    fn top_of_minute(&self, minute: Minute, country: Option<Country>) -> Result<Option<Vec<(u64, u64)>>, String> {
        StoreTier::top_of_minute(self, minute, country)
    }

    fn history(&self, ad: u64, minute: Minute) -> Result<(u64, Vec<HistoryEntry>), String> {
        StoreTier::history(self, ad, minute)
    }

    fn minutes_before(&self, minute: Minute) -> Result<u64, String> {
        StoreTier::minutes_before(self, minute)
    }
}

/// The segment store's reads cannot fail: its files are mapped, and the index says where each
/// minute's bytes are.
impl ColdTier for SegmentReader {
    fn count(&self, subject: Subject, from: Minute, to: Minute, country: Option<Country>) -> Result<u64, String> {
        Ok(SegmentReader::count(self, subject, from, to, country))
    }

    fn add_sums(&self, from: Minute, to: Minute, country: Option<Country>, sums: &mut HashMap<u64, u64>) -> Result<(), String> {
        SegmentReader::add_sums(self, from, to, country, sums);
        Ok(())
    }

    fn top_of_minute(&self, minute: Minute, country: Option<Country>) -> Result<Option<Vec<(u64, u64)>>, String> {
        Ok(SegmentReader::top_of_minute(self, minute, country))
    }

    fn history(&self, ad: u64, minute: Minute) -> Result<(u64, Vec<HistoryEntry>), String> {
        Ok(SegmentReader::history(self, ad, minute))
    }

    fn minutes_before(&self, minute: Minute) -> Result<u64, String> {
        Ok(SegmentReader::minutes_before(self, minute))
    }
}
