//! The answers as reconciliation compares them: each per-minute answer by its key.

use clickagg_dataflows::{Answer, Country, Minute, View};

/// Which answer: one of the per-minute views (`View::PER_MINUTE`), the minute, and the key
/// columns after it: a country (0 in the views without one) and an id (the ad, or the
/// campaign). Ordered as the report lists answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AnswerKey {
    pub view: View,
    pub minute: Minute,
    pub country: u16,
    pub id: u64,
}

impl AnswerKey {
    pub fn view_name(&self) -> &'static str {
        self.view.name()
    }

    /// The key columns after the minute, joined by `/` as in the changelog.
    pub fn key_text(&self) -> String {
        if self.view == View::CountryMinute {
            format!("{}/{}", Country(self.country), self.id)
        } else {
            self.id.to_string()
        }
    }

    /// This answer's row with `clicks`, as the dataflow and the store know it.
    pub fn answer(&self, clicks: u64) -> Answer {
        let (minute, id) = (self.minute, self.id);
        match self.view {
            View::AdMinute => Answer::AdMinute { minute, ad: id, clicks },
            View::CampaignMinute => Answer::CampaignMinute { minute, campaign: id, clicks },
            View::CountryMinute => Answer::CountryMinute { minute, country: Country(self.country), ad: id, clicks },
            View::TopMinute => Answer::TopMinute { minute, ad: id, clicks },
            View::FraudMinute => Answer::FraudMinute { minute, ad: id, clicks },
            View::TopWindow => unreachable!("reconcile compares the per-minute views only"),
        }
    }

    /// From a view and the key columns after the minute as the files and changelog write them.
    pub fn parse(view: View, minute: Minute, text: &str) -> Option<AnswerKey> {
        let (country, id) = match text.split_once('/') {
            Some((country, id)) => (Country::parse(country.as_bytes())?.0, id),
            None => (0, text),
        };
        Some(AnswerKey { view, minute, country, id: id.parse().ok()? })
    }
}

/// The per-minute view of a changelog or file name.
pub fn per_minute_view(name: &str) -> Option<View> {
    View::PER_MINUTE.into_iter().find(|v| v.name() == name)
}

/// Answers with their clicks, sorted by key.
pub type Answers = Vec<(AnswerKey, u64)>;
