//! How one final minute is laid out on disk: seven sections, one after the other, each a run of
//! fixed-width records sorted by key, so that a reader finds a key (or a country's run of keys)
//! by binary search inside the section without reading the rest.
//!
//! Every number is big-endian: a record's key bytes (`country` then `id`) then compare as the
//! numbers do, and a search compares byte slices. Sections, by [`Section`]:
//!
//! | section            | record                                   | bytes |
//! |--------------------|------------------------------------------|-------|
//! | `Ad`               | ad, clicks                               | 16    |
//! | `Campaign`         | campaign, clicks                         | 16    |
//! | `Country`          | country, ad, clicks                      | 18    |
//! | `CampaignCountry`  | country, campaign, clicks                | 18    |
//! | `Top`              | ad, clicks (the minute's top K members)  | 16    |
//! | `TopCountry`       | country, ad, clicks                      | 18    |
//! | `History`          | ad, time, clicks, diff                   | 32    |
//!
//! `History` holds every update of each ad's count (the changelog's `ad_minute` rows), sorted
//! by ad with each ad's updates in the order they were made.

/// The sections of a minute, in the order they are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Ad = 0,
    Campaign = 1,
    Country = 2,
    CampaignCountry = 3,
    Top = 4,
    TopCountry = 5,
    History = 6,
}

/// How many sections a minute has.
pub const SECTIONS: usize = 7;

impl Section {
    /// Every section, in the order a minute's are written.
    pub const ALL: [Section; SECTIONS] = [
        Section::Ad,
        Section::Campaign,
        Section::Country,
        Section::CampaignCountry,
        Section::Top,
        Section::TopCountry,
        Section::History,
    ];

    /// Whether the section's key begins with a country.
    pub fn has_country(self) -> bool {
        matches!(self, Section::Country | Section::CampaignCountry | Section::TopCountry)
    }

    /// The width of one record.
    pub fn width(self) -> usize {
        match self {
            Section::History => 32,
            s if s.has_country() => 18,
            _ => 16,
        }
    }

    /// The width of a record's key: the country (when it has one) and the id.
    pub fn key_width(self) -> usize {
        if self.has_country() {
            10
        } else {
            8
        }
    }
}

/// Where one sealed minute's records are: its file, its first byte, and each section's record
/// count; with its total clicks (for the run's summary). 56 bytes in memory per minute with
/// any answer, whatever the minute holds: a day of minutes is 80 KiB, a year 28 MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MinuteEntry {
    pub minute: u32,
    /// The segment file's number.
    pub file: u32,
    pub offset: u64,
    pub counts: [u32; SECTIONS],
    /// The sum of the minute's `Ad` clicks.
    pub clicks: u64,
}

impl MinuteEntry {
    /// The byte range of `section` within the minute's file.
    pub fn range_of(&self, section: Section) -> std::ops::Range<usize> {
        let mut start = self.offset as usize;
        for s in Section::ALL {
            let len = self.counts[s as usize] as usize * s.width();
            if s == section {
                return start..start + len;
            }
            start += len;
        }
        unreachable!("every section is in the list")
    }
}

/// A record's key bytes: the country's two letters (when the section has one) and the id.
pub fn key(country: Option<u16>, id: u64) -> ([u8; 10], usize) {
    let mut bytes = [0u8; 10];
    match country {
        Some(country) => {
            bytes[..2].copy_from_slice(&country.to_be_bytes());
            bytes[2..].copy_from_slice(&id.to_be_bytes());
            (bytes, 10)
        }
        None => {
            bytes[..8].copy_from_slice(&id.to_be_bytes());
            (bytes, 8)
        }
    }
}

/// Appends a record of a country-less section: `id`, then each value.
pub fn put(out: &mut Vec<u8>, id: u64, values: &[u64]) {
    out.extend_from_slice(&id.to_be_bytes());
    for v in values {
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// Appends a record of a section keyed by country: `country`, `id`, then each value.
pub fn put_in(out: &mut Vec<u8>, country: u16, id: u64, values: &[u64]) {
    out.extend_from_slice(&country.to_be_bytes());
    put(out, id, values);
}

/// The big-endian `u64` at `at` in `bytes`.
pub fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("eight bytes"))
}

/// The records of `section` (its bytes) whose key begins with `prefix`, as a range of record
/// numbers: two binary searches, reading only the records they compare.
pub fn records_with_prefix(bytes: &[u8], width: usize, prefix: &[u8]) -> std::ops::Range<usize> {
    let n = bytes.len() / width;
    let record_prefix = |i: usize| &bytes[i * width..i * width + prefix.len()];
    let first_not_below = |strictly_above: bool| {
        let (mut low, mut high) = (0, n);
        while low < high {
            let mid = low + (high - low) / 2;
            let below = match strictly_above {
                false => record_prefix(mid) < prefix,
                true => record_prefix(mid) <= prefix,
            };
            if below {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        low
    };
    first_not_below(false)..first_not_below(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prefix search finds exactly the records with the prefix, at the ends and between.
    #[test]
    fn prefix_search_finds_each_run_of_keys() {
        let mut bytes = Vec::new();
        let keys: Vec<(u16, u64)> = vec![(1, 5), (1, 9), (3, 0), (3, 2), (3, 400), (7, 1)];
        for &(country, id) in &keys {
            put_in(&mut bytes, country, id, &[id * 2]);
        }
        let width = Section::Country.width();
        for country in 0..9u16 {
            let range = records_with_prefix(&bytes, width, &country.to_be_bytes());
            let wanted: Vec<usize> = (0..keys.len()).filter(|&i| keys[i].0 == country).collect();
            assert_eq!(range.clone().collect::<Vec<_>>(), wanted, "country {country}");
        }
        for (i, &(country, id)) in keys.iter().enumerate() {
            let (k, len) = key(Some(country), id);
            assert_eq!(records_with_prefix(&bytes, width, &k[..len]), i..i + 1);
            assert_eq!(u64_at(&bytes, i * width + 10), id * 2);
        }
        let (k, len) = key(Some(3), 1);
        assert!(records_with_prefix(&bytes, width, &k[..len]).is_empty());
    }
}
