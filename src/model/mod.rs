//! The model: plain data every layer may import (the answers as reconciliation compares them,
//! a run's summary and snapshots, the settings that change answers). It imports nothing of the
//! crate's own.

pub mod answers;
pub mod positions;
pub mod served;
pub mod settings;
pub mod summary;

pub use answers::{per_minute_view, AnswerKey, Answers};
pub use served::{HistoryEntry, Subject};
pub use settings::{AnswerSettings, ClusterSettings, Setting};
pub use summary::{BusiestMinute, Counters, SnapshotByWindow, Summary, WindowSnapshot};
