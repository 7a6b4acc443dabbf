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

/// Everything the sink commits: answers, and what the sources report beside them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SinkRecord {
    Answer(Answer),
    Note(crate::types::SourceNote),
    /// Kept for the server only: in no file and not in the changelog.
    Serving(ServingAnswer),
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
