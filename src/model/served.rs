//! What the server's two tiers (memory and the store) both speak of.

use clickagg_dataflows::Time;

/// One update of one ad's count in one minute, as the changelog has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The logical time of the update: the watermark at which it became visible.
    pub time: Time,
    pub clicks: u64,
    pub diff: i64,
}

/// What a count is of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject {
    Ad(u64),
    Campaign(u64),
}
