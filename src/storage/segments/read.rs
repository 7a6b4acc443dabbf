//! The read side of the segment store: the queries the server answers final minutes with, each
//! a binary search (or two) inside the sections of the minutes it covers.
//!
//! A query copies the index entries of its minutes (and the maps they are in) under the
//! index's lock, then reads without it: the writer appends beside it, and what a query reads
//! never changes.

use std::collections::HashMap;
use std::sync::Arc;

use clickagg_dataflows::{Country, Minute};
use memmap2::Mmap;

use super::files::Shared;
use super::format::{key, records_with_prefix, u64_at, MinuteEntry, Section};
use crate::model::{HistoryEntry, Subject, Summary};

/// Read access to the minutes a segment store has sealed; cheap to clone.
#[derive(Clone)]
pub struct SegmentReader {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SegmentReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentReader").field("dir", &self.shared.dir).finish_non_exhaustive()
    }
}

/// One sealed minute to read: its entry and the map of its file.
struct Sealed {
    entry: MinuteEntry,
    map: Arc<Mmap>,
}

impl Sealed {
    /// The bytes of `section`.
    fn section(&self, section: Section) -> &[u8] {
        &self.map[self.entry.range_of(section)]
    }

    /// The records of `section` whose key is `country` (when given) and then `id` (when given).
    fn records(&self, section: Section, country: Option<Country>, id: Option<u64>) -> impl Iterator<Item = &[u8]> {
        let bytes = self.section(section);
        let width = section.width();
        let (k, len) = key(country.map(|c| c.0), id.unwrap_or(0));
        let prefix = match (country, id) {
            (Some(_), None) => &k[..2],
            (_, Some(_)) => &k[..len],
            (None, None) => &k[..0],
        };
        records_with_prefix(bytes, width, prefix).map(move |i| &bytes[i * width..(i + 1) * width])
    }
}

impl SegmentReader {
    pub(super) fn new(shared: Arc<Shared>) -> SegmentReader {
        SegmentReader { shared }
    }

    /// The sealed minutes in `[from, to)`, in order.
    fn minutes(&self, from: Minute, to: Minute) -> Vec<Sealed> {
        let index = self.shared.read();
        let first = index.minutes.partition_point(|e| e.minute < from);
        let end = index.minutes.partition_point(|e| e.minute < to);
        index.minutes[first..end.max(first)].iter().map(|&entry| Sealed { entry, map: Arc::clone(&index.maps[entry.file as usize]) }).collect()
    }

    /// Clicks of `subject` with minute in `[from, to)`, in `country` if given.
    pub fn count(&self, subject: Subject, from: Minute, to: Minute, country: Option<Country>) -> u64 {
        let (section, id) = match (subject, country) {
            (Subject::Ad(ad), None) => (Section::Ad, ad),
            (Subject::Campaign(campaign), None) => (Section::Campaign, campaign),
            (Subject::Ad(ad), Some(_)) => (Section::Country, ad),
            (Subject::Campaign(campaign), Some(_)) => (Section::CampaignCountry, campaign),
        };
        let at = section.key_width();
        let mut total = 0;
        for minute in self.minutes(from, to) {
            total += minute.records(section, country, Some(id)).map(|r| u64_at(r, at)).sum::<u64>();
        }
        total
    }

    /// Each ad's clicks summed over minutes `[from, to)`, in `country` if given, added to `sums`.
    pub fn add_sums(&self, from: Minute, to: Minute, country: Option<Country>, sums: &mut HashMap<u64, u64>) {
        let section = if country.is_some() { Section::Country } else { Section::Ad };
        let id_at = section.key_width() - 8;
        for minute in self.minutes(from, to) {
            for record in minute.records(section, country, None) {
                *sums.entry(u64_at(record, id_at)).or_insert(0) += u64_at(record, id_at + 8);
            }
        }
    }

    /// The top K of `minute` (in `country` if given) as sealed, ranked; `None` when it has no
    /// member.
    pub fn top_of_minute(&self, minute: Minute, country: Option<Country>) -> Option<Vec<(u64, u64)>> {
        let section = if country.is_some() { Section::TopCountry } else { Section::Top };
        let id_at = section.key_width() - 8;
        let mut top = Vec::new();
        for sealed in self.minutes(minute, minute + 1) {
            top.extend(sealed.records(section, country, None).map(|r| (u64_at(r, id_at), u64_at(r, id_at + 8))));
        }
        if top.is_empty() {
            return None;
        }
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Some(top)
    }

    /// `ad`'s clicks in `minute` as sealed, and every update of it, in order.
    pub fn history(&self, ad: u64, minute: Minute) -> (u64, Vec<HistoryEntry>) {
        let Some(sealed) = self.minutes(minute, minute + 1).pop() else { return (0, Vec::new()) };
        let clicks = sealed.records(Section::Ad, None, Some(ad)).next().map_or(0, |r| u64_at(r, 8));
        let updates = sealed
            .records(Section::History, None, Some(ad))
            .map(|r| HistoryEntry { time: u64_at(r, 8), clicks: u64_at(r, 16), diff: u64_at(r, 24) as i64 })
            .collect();
        (clicks, updates)
    }

    /// How many minutes before `minute` have clicks.
    pub fn minutes_before(&self, minute: Minute) -> u64 {
        self.minutes(0, minute).iter().filter(|m| m.entry.counts[Section::Ad as usize] > 0).count() as u64
    }

    /// How many minutes are sealed.
    pub fn sealed(&self) -> usize {
        self.shared.read().minutes.len()
    }

    /// The run's totals as the sealed minutes have them (SPEC §5's summary): clicks, excluded
    /// clicks, minutes with clicks, and the busiest minute with its top 10.
    pub fn summarize(&self, summary: &mut Summary) {
        let (entries, excluded) = {
            let index = self.shared.read();
            (index.minutes.clone(), index.excluded)
        };
        summary.clicks = entries.iter().map(|e| e.clicks).sum();
        summary.excluded = excluded;
        summary.minutes = entries.iter().filter(|e| e.clicks > 0).count() as u64;
        // The most clicks, the earliest minute among equals.
        let busiest = entries.iter().filter(|e| e.clicks > 0).max_by(|a, b| a.clicks.cmp(&b.clicks).then(b.minute.cmp(&a.minute)));
        summary.busiest_minute = busiest.map(|e| {
            let mut top = self.top_of_minute(e.minute, None).unwrap_or_default();
            top.truncate(10);
            (e.minute, e.clicks, top)
        });
    }
}
