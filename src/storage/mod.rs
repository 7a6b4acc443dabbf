//! Durable storage of the answers: one trait for a store that commits each watermark advance
//! ([`CommitStore`]), the embedded SQLite store that recovery restarts from ([`sqlite`]), the
//! PostgreSQL mirror ([`postgres`]), the append-only [`segments`] of final minutes a server
//! without `--store` reads from, and the [`committer`] that chains them on threads of their
//! own. Storage knows the answers and the tables; it knows nothing of the dataflow, the sink or
//! the server.

pub mod committer;
pub mod postgres;
pub mod segments;
pub mod sqlite;

use std::collections::BTreeMap;

use clickagg_dataflows::{Answer, DeadLetter, Minute, PartitionProgress, ServingAnswer, Time, View};

use crate::model::{Summary, WindowSnapshot};

pub use committer::Committer;
pub use sqlite::{Checkpoint, Store};

/// Bumped when the tables change; a store of another version is refused with a clear error.
pub const SCHEMA_VERSION: u32 = 1;

/// A store that commits watermark advances: each [`Batch`] with its frontier in one transaction.
pub trait CommitStore: Send + 'static {
    /// Commits what of `batch` this store does not hold yet, and `frontier` (`None`: the end of
    /// the input), in one transaction. Returns whether there was anything to commit. A frontier
    /// behind the one committed (during recovery) moves nothing back.
    fn commit(&mut self, frontier: Option<Time>, batch: &Batch) -> Result<bool, String>;
}

/// The store a run commits to on the commit thread ([`Committer`]): the SQLite store, or the
/// segment store of a server without `--store`.
pub trait RunStore: CommitStore {
    /// The frontier of the last commit, if any.
    fn frontier(&self) -> Option<Time>;

    /// Fills the summary's totals (clicks, excluded, minutes, the busiest minute) from what the
    /// store holds, once the whole input is committed: for a run that writes no files.
    fn summarize(&self, summary: &mut Summary) -> Result<(), String>;
}

/// Everything one watermark advance commits.
#[derive(Default)]
pub struct Batch {
    /// Answer changes, in the order the sink applied them (the changelog's order).
    pub changes: Vec<(Time, Answer, isize)>,
    /// Serving-only answer changes (when serving), in time order: see `sqlite::serving`.
    pub serving: Vec<(Time, ServingAnswer, isize)>,
    /// Window snapshots: `(boundary, [(window, ad, clicks)])`.
    pub snapshots: Vec<WindowSnapshot>,
    pub dead_letters: Vec<(Time, DeadLetter)>,
    /// The latest progress of each partition, by name.
    pub progress: BTreeMap<String, PartitionProgress>,
    pub next_boundary: Option<Minute>,
    pub last_minute: Option<Minute>,
    /// Partition names by the ids the dataflow uses; kept across commits.
    pub partition_names: Vec<String>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
            && self.serving.is_empty()
            && self.snapshots.is_empty()
            && self.dead_letters.is_empty()
            && self.progress.is_empty()
    }
}

/// Where a store left off: what recovery needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// Every update before this time is committed.
    pub frontier: Time,
    pub next_boundary: Option<Minute>,
    pub last_minute: Option<Minute>,
}

/// The per-minute tables an answer is a row of, numbered by their position here:
/// `(view, table, id column, count column)`. The store and the PostgreSQL mirror share them.
pub const ANSWER_TABLES: [(View, &str, &str, &str); 5] = [
    (View::AdMinute, "ad_minute", "ad_id", "clicks"),
    (View::CampaignMinute, "campaign_minute", "campaign_id", "clicks"),
    (View::CountryMinute, "country_minute", "ad_id", "clicks"),
    (View::TopMinute, "top_minute", "ad_id", "clicks"),
    (View::FraudMinute, "fraud_minute", "ad_id", "excluded_clicks"),
];

/// An answer as a row of one of `ANSWER_TABLES`.
#[derive(Clone, Copy, Debug)]
pub struct AnswerRow {
    /// The table's position in `ANSWER_TABLES`.
    pub table: usize,
    pub minute: Minute,
    /// Only `country_minute` rows have one.
    pub country: Option<clickagg_dataflows::Country>,
    pub id: u64,
    pub clicks: u64,
}

impl AnswerRow {
    /// `None` for the current window tops: the sink keeps them, the tables keep their snapshots.
    pub fn of(answer: &Answer) -> Option<AnswerRow> {
        let (view, minute, country, id, clicks) = match *answer {
            Answer::AdMinute { minute, ad, clicks } => (View::AdMinute, minute, None, ad, clicks),
            Answer::CampaignMinute { minute, campaign, clicks } => (View::CampaignMinute, minute, None, campaign, clicks),
            Answer::CountryMinute { minute, country, ad, clicks } => (View::CountryMinute, minute, Some(country), ad, clicks),
            Answer::TopMinute { minute, ad, clicks } => (View::TopMinute, minute, None, ad, clicks),
            Answer::FraudMinute { minute, ad, clicks } => (View::FraudMinute, minute, None, ad, clicks),
            Answer::TopWindow { .. } => return None,
        };
        let table = ANSWER_TABLES.iter().position(|t| t.0 == view).expect("every per-minute view has a table");
        Some(AnswerRow { table, minute, country, id, clicks })
    }

    /// The row's primary key: `(table, minute, country code, id)`.
    pub fn key(&self) -> (usize, Minute, u16, u64) {
        (self.table, self.minute, self.country.map_or(0, |c| c.0), self.id)
    }
}
