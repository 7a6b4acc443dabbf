//! A minute that can still change: its answers folded in memory as the commits bring their
//! changes, until the minute is final and written out once ([`OpenMinute::encode`]).
//!
//! The changes are folded as the server's memory tier folds them (`serve::state`): a count is
//! a row whose old value's retraction and new value's insertion come at one time in either
//! order, a top-K member is in with `+1` and out with `-1`; so a minute reads the same from
//! either tier.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;

use clickagg_dataflows::hashing::FastHasher;
use clickagg_dataflows::{Answer, ServingAnswer, Time};

use super::format::{put, put_in, Section, SECTIONS};

type Fast = BuildHasherDefault<FastHasher>;

/// The answers of one minute that is not final yet.
#[derive(Default)]
pub struct OpenMinute {
    ad: HashMap<u64, u64, Fast>,
    campaign: HashMap<u64, u64, Fast>,
    country: HashMap<(u16, u64), u64, Fast>,
    campaign_country: HashMap<(u16, u64), u64, Fast>,
    top: HashSet<(u64, u64), Fast>,
    top_country: HashSet<(u16, u64, u64), Fast>,
    /// Each update of an ad's count, in the order applied: `(ad, time, clicks, diff)`.
    history: Vec<(u64, Time, u64, i64)>,
    /// Clicks the fraud rules excluded, by ad (only their sum is kept once final).
    excluded: HashMap<u64, u64, Fast>,
}

/// A count row: a key holds at most one value once a time's updates are applied.
fn add<K: std::hash::Hash + Eq + Copy>(map: &mut HashMap<K, u64, Fast>, key: K, clicks: u64, diff: isize) {
    let entry = map.entry(key).or_insert(0);
    if diff > 0 {
        *entry = clicks;
    } else if *entry == clicks {
        map.remove(&key);
    }
}

/// A top-K membership row.
fn member<K: std::hash::Hash + Eq>(set: &mut HashSet<K, Fast>, key: K, diff: isize) {
    if diff > 0 {
        set.insert(key);
    } else {
        set.remove(&key);
    }
}

impl OpenMinute {
    /// Folds one answer change at `time` (the window tops have no minute and never come here).
    pub fn apply(&mut self, time: Time, answer: &Answer, diff: isize) {
        match *answer {
            Answer::AdMinute { ad, clicks, .. } => {
                add(&mut self.ad, ad, clicks, diff);
                self.history.push((ad, time, clicks, diff as i64));
            }
            Answer::CampaignMinute { campaign, clicks, .. } => add(&mut self.campaign, campaign, clicks, diff),
            Answer::CountryMinute { country, ad, clicks, .. } => add(&mut self.country, (country.0, ad), clicks, diff),
            Answer::TopMinute { ad, clicks, .. } => member(&mut self.top, (ad, clicks), diff),
            Answer::FraudMinute { ad, clicks, .. } => add(&mut self.excluded, ad, clicks, diff),
            Answer::TopWindow { .. } => {}
        }
    }

    /// Folds one serving-only change (the sliding ones have no minute and never come here).
    pub fn apply_serving(&mut self, answer: &ServingAnswer, diff: isize) {
        match *answer {
            ServingAnswer::CampaignCountryMinute { country, campaign, clicks, .. } => {
                add(&mut self.campaign_country, (country.0, campaign), clicks, diff)
            }
            ServingAnswer::TopCountryMinute { country, ad, clicks, .. } => member(&mut self.top_country, (country.0, ad, clicks), diff),
            ServingAnswer::TopCountryWindow { .. } | ServingAnswer::CampaignWindow { .. } => {}
        }
    }

    /// How many entries the minute holds (rows, members, history updates).
    pub fn entries(&self) -> usize {
        self.ad.len()
            + self.campaign.len()
            + self.country.len()
            + self.campaign_country.len()
            + self.top.len()
            + self.top_country.len()
            + self.history.len()
            + self.excluded.len()
    }

    /// The minute's records, section after section (see [`super::format`]), each section's
    /// record count, its total clicks and its excluded clicks.
    pub fn encode(self, out: &mut Vec<u8>) -> ([u32; SECTIONS], u64, u64) {
        let mut counts = [0u32; SECTIONS];
        let clicks = self.ad.values().sum();
        let excluded = self.excluded.values().sum();
        let start = out.len();
        let mut ad: Vec<(u64, u64)> = self.ad.into_iter().collect();
        ad.sort_unstable();
        ad.iter().for_each(|&(id, clicks)| put(out, id, &[clicks]));
        let mut campaign: Vec<(u64, u64)> = self.campaign.into_iter().collect();
        campaign.sort_unstable();
        campaign.iter().for_each(|&(id, clicks)| put(out, id, &[clicks]));
        let mut country: Vec<((u16, u64), u64)> = self.country.into_iter().collect();
        country.sort_unstable();
        country.iter().for_each(|&((c, id), clicks)| put_in(out, c, id, &[clicks]));
        let mut campaign_country: Vec<((u16, u64), u64)> = self.campaign_country.into_iter().collect();
        campaign_country.sort_unstable();
        campaign_country.iter().for_each(|&((c, id), clicks)| put_in(out, c, id, &[clicks]));
        let mut top: Vec<(u64, u64)> = self.top.into_iter().collect();
        top.sort_unstable();
        top.iter().for_each(|&(id, clicks)| put(out, id, &[clicks]));
        let mut top_country: Vec<(u16, u64, u64)> = self.top_country.into_iter().collect();
        top_country.sort_unstable();
        top_country.iter().for_each(|&(c, id, clicks)| put_in(out, c, id, &[clicks]));
        let mut history = self.history;
        // Stable: each ad's updates stay in the order they were made.
        history.sort_by_key(|h| h.0);
        history.iter().for_each(|&(id, time, clicks, diff)| put(out, id, &[time, clicks, diff as u64]));
        let lens = [ad.len(), campaign.len(), country.len(), campaign_country.len(), top.len(), top_country.len(), history.len()];
        for (count, len) in counts.iter_mut().zip(lens) {
            *count = len as u32;
        }
        debug_assert_eq!(out.len() - start, Section::ALL.iter().map(|s| counts[*s as usize] as usize * s.width()).sum::<usize>());
        (counts, clicks, excluded)
    }
}
