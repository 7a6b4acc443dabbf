//! The answers the dataflow maintains, as one record type so that a single sink can commit them
//! and a single changelog can list them.

use serde::{Deserialize, Serialize};

use crate::types::{Country, Minute};

/// The views of SPEC §4, in the order their files are listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum View {
    AdMinute,
    CampaignMinute,
    CountryMinute,
    TopMinute,
    /// Clicks excluded by the fraud rules.
    FraudMinute,
    /// The top K of the last M minutes, for each configured M.
    TopWindow,
}

impl View {
    /// The views with one file each, their rows grouped by minute.
    pub const PER_MINUTE: [View; 5] =
        [View::AdMinute, View::CampaignMinute, View::CountryMinute, View::TopMinute, View::FraudMinute];

    /// The view's name in the changelog; its file is `{name}.csv`.
    pub fn name(self) -> &'static str {
        match self {
            View::AdMinute => "ad_minute",
            View::CampaignMinute => "campaign_minute",
            View::CountryMinute => "country_minute",
            View::TopMinute => "top_minute",
            View::FraudMinute => "fraud_minute",
            View::TopWindow => "top_window",
        }
    }
}

/// One row of one view. A changed answer is a retraction of its old row and an insertion of the
/// new one; a top-K row is a membership: ad `ad` is in the minute's top K with `clicks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Answer {
    AdMinute { minute: Minute, ad: u64, clicks: u64 },
    CampaignMinute { minute: Minute, campaign: u64, clicks: u64 },
    CountryMinute { minute: Minute, country: Country, ad: u64, clicks: u64 },
    TopMinute { minute: Minute, ad: u64, clicks: u64 },
    /// `clicks` of ad `ad` in `minute` were excluded by the fraud rules.
    FraudMinute { minute: Minute, ad: u64, clicks: u64 },
    /// Ad `ad` is in the top K of the last `window` minutes with `clicks`.
    TopWindow { window: u32, ad: u64, clicks: u64 },
}

impl Answer {
    pub fn view(&self) -> View {
        match self {
            Answer::AdMinute { .. } => View::AdMinute,
            Answer::CampaignMinute { .. } => View::CampaignMinute,
            Answer::CountryMinute { .. } => View::CountryMinute,
            Answer::TopMinute { .. } => View::TopMinute,
            Answer::FraudMinute { .. } => View::FraudMinute,
            Answer::TopWindow { .. } => View::TopWindow,
        }
    }

    /// What the answer says below its minute or window: `(country, id, clicks)`, with the
    /// country for the per-country view only, and the id an ad's, or a campaign's.
    pub fn key_and_clicks(&self) -> (Option<Country>, u64, u64) {
        match *self {
            Answer::CampaignMinute { campaign, clicks, .. } => (None, campaign, clicks),
            Answer::CountryMinute { country, ad, clicks, .. } => (Some(country), ad, clicks),
            Answer::AdMinute { ad, clicks, .. }
            | Answer::TopMinute { ad, clicks, .. }
            | Answer::FraudMinute { ad, clicks, .. }
            | Answer::TopWindow { ad, clicks, .. } => (None, ad, clicks),
        }
    }

    /// The minute a per-minute answer is about; it is final once that minute is.
    /// Sliding-window answers belong to no one minute.
    pub fn minute(&self) -> Option<Minute> {
        match *self {
            Answer::AdMinute { minute, .. }
            | Answer::CampaignMinute { minute, .. }
            | Answer::CountryMinute { minute, .. }
            | Answer::TopMinute { minute, .. }
            | Answer::FraudMinute { minute, .. } => Some(minute),
            Answer::TopWindow { .. } => None,
        }
    }
}

/// Records that sort as `N` machine words: [`to_words`](SortWords::to_words) is one-to-one,
/// [`from_words`](SortWords::from_words) undoes it, and the words' order (as arrays compare) is
/// the records' order. Sorting the words instead of the records compares integers, not enum
/// variants field by field, and can go by their bytes ([`consolidate_words`](crate::radix::consolidate_words)).
pub trait SortWords<const N: usize>: Sized {
    fn to_words(&self) -> [u64; N];
    /// Only for words that `to_words` made.
    fn from_words(words: [u64; N]) -> Self;
}

/// `[view, then minute or window, then country | id | clicks]`: the view's index (the variants'
/// order) in bits 48 and up, the minute or window in bits 16 to 47, the country (or zero) below.
impl SortWords<3> for Answer {
    fn to_words(&self) -> [u64; 3] {
        let head = |of: u32, country: Country| (self.view() as u64) << 48 | u64::from(of) << 16 | u64::from(country.0);
        match *self {
            Answer::AdMinute { minute, ad: id, clicks }
            | Answer::CampaignMinute { minute, campaign: id, clicks }
            | Answer::TopMinute { minute, ad: id, clicks }
            | Answer::FraudMinute { minute, ad: id, clicks } => [head(minute, Country(0)), id, clicks],
            Answer::CountryMinute { minute, country, ad, clicks } => [head(minute, country), ad, clicks],
            Answer::TopWindow { window, ad, clicks } => [head(window, Country(0)), ad, clicks],
        }
    }

    fn from_words([head, id, clicks]: [u64; 3]) -> Answer {
        let (of, country) = ((head >> 16) as u32, Country(head as u16));
        match head >> 48 {
            0 => Answer::AdMinute { minute: of, ad: id, clicks },
            1 => Answer::CampaignMinute { minute: of, campaign: id, clicks },
            2 => Answer::CountryMinute { minute: of, country, ad: id, clicks },
            3 => Answer::TopMinute { minute: of, ad: id, clicks },
            4 => Answer::FraudMinute { minute: of, ad: id, clicks },
            5 => Answer::TopWindow { window: of, ad: id, clicks },
            view => unreachable!("no view has index {view}"),
        }
    }
}

/// Everything the sink commits: answers, and what the sources report beside them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SinkRecord {
    /// One worker's changes to the answers at the record's time, consolidated and sorted by
    /// answer, sent with diff 1 (a diff of n counts each change n times): see
    /// [`answers_for_sink`](crate::render::answers_for_sink).
    Answers(Vec<(Answer, isize)>),
    Note(crate::types::SourceNote),
    /// Kept for the server only: in no file and not in the changelog.
    Serving(ServingAnswer),
    /// Deliveries found to be copies of a click already held, at the record's time: the
    /// multiplicity is how many ([`Rendered::duplicates`](crate::render::Rendered::duplicates)).
    /// In no file and not in the changelog.
    Duplicates,
}

/// Answers maintained only when serving, for queries that no view file answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ServingAnswer {
    /// Clicks of `campaign` from `country` in `minute`.
    CampaignCountryMinute { minute: Minute, country: Country, campaign: u64, clicks: u64 },
    /// Ad `ad` is in the top K of `minute` in `country`.
    TopCountryMinute { minute: Minute, country: Country, ad: u64, clicks: u64 },
    /// Ad `ad` is in the top K of the last `window` minutes in `country`.
    TopCountryWindow { window: u32, country: Country, ad: u64, clicks: u64 },
    /// Clicks of `campaign` in the last `window` minutes.
    CampaignWindow { window: u32, campaign: u64, clicks: u64 },
}

impl ServingAnswer {
    /// The minute a per-minute answer is about (its changes after the minute is final are
    /// retention); sliding answers belong to no one minute.
    pub fn minute(&self) -> Option<Minute> {
        match *self {
            ServingAnswer::CampaignCountryMinute { minute, .. } | ServingAnswer::TopCountryMinute { minute, .. } => Some(minute),
            ServingAnswer::TopCountryWindow { .. } | ServingAnswer::CampaignWindow { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Answer, SortWords};
    use crate::types::Country;

    /// Answers of every view, with values at and near the ends of their ranges, so that a field
    /// that overlapped another, or an order that ignored one, would show.
    fn answers() -> Vec<Answer> {
        let small = [0u32, 1, 2, u32::MAX - 1, u32::MAX];
        let wide = [0u64, 1, 2, 1 << 32, u64::MAX - 1, u64::MAX];
        let countries = [Country(0), Country(1), Country(u16::from_be_bytes(*b"US")), Country(u16::MAX)];
        let mut all = Vec::new();
        for &of in &small {
            for &id in &wide {
                for &clicks in &wide[..4] {
                    all.push(Answer::AdMinute { minute: of, ad: id, clicks });
                    all.push(Answer::CampaignMinute { minute: of, campaign: id, clicks });
                    all.push(Answer::TopMinute { minute: of, ad: id, clicks });
                    all.push(Answer::FraudMinute { minute: of, ad: id, clicks });
                    all.push(Answer::TopWindow { window: of, ad: id, clicks });
                    for &country in &countries {
                        all.push(Answer::CountryMinute { minute: of, country, ad: id, clicks });
                    }
                }
            }
        }
        all
    }

    #[test]
    fn answers_sort_as_their_words_do() {
        let all = answers();
        for a in &all {
            assert_eq!(Answer::from_words(a.to_words()), *a);
        }
        for a in all.iter().step_by(7) {
            for b in &all {
                assert_eq!(a.to_words().cmp(&b.to_words()), a.cmp(b), "{a:?} against {b:?}");
            }
        }
    }
}
