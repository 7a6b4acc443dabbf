//! What a run reports: its summary, the window snapshots the sink takes, and the counters the
//! server shows.

use std::collections::BTreeMap;

use clickagg_dataflows::{Minute, PartitionProgress};

/// What a run saw, for the summary a human reads and for tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub partitions: Vec<PartitionProgress>,
    /// Distinct billable clicks counted (the sum of `ad_minute.csv`).
    pub clicks: u64,
    /// Distinct clicks excluded by the fraud rules (the sum of `fraud_minute.csv`).
    pub excluded: u64,
    pub minutes: u64,
    pub busiest_minute: Option<BusiestMinute>,
    pub changelog_rows: u64,
    /// Accepted deliveries that de-duplication found to be copies of a click it already held,
    /// at times the sink has applied (the same number for any worker count).
    pub duplicates: u64,
}

/// The minute with the most clicks, its clicks, and its top 10 `(ad, clicks)`.
pub type BusiestMinute = (Minute, u64, Vec<(u64, u64)>);

/// The sliding windows' top K at a minute boundary, as the sink takes it: the boundary, and
/// `(window, ad, clicks)` for each member of each window.
pub type WindowSnapshot = (Minute, Vec<(u32, u64, u64)>);

/// The same snapshot as the server keeps it: the boundary, and each window's `(ad, clicks)`.
pub type SnapshotByWindow = (Minute, BTreeMap<u32, Vec<(u64, u64)>>);

impl Summary {
    fn total(&self, f: impl Fn(&PartitionProgress) -> u64) -> u64 {
        self.partitions.iter().map(f).sum()
    }
    pub fn lines(&self) -> u64 {
        self.total(|p| p.lines)
    }
    pub fn accepted(&self) -> u64 {
        self.total(|p| p.accepted)
    }
    pub fn late(&self) -> u64 {
        self.total(|p| p.late)
    }
    pub fn too_late(&self) -> u64 {
        self.total(|p| p.too_late)
    }
    pub fn malformed(&self) -> u64 {
        self.total(|p| p.malformed)
    }
    /// Accepted deliveries that were copies of a click already counted.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }
}

/// What one process has ingested, for `/v1/status` and `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub partitions: Vec<PartitionProgress>,
    /// Distinct billable clicks applied (the sum of the ad counts).
    pub billable: u64,
    /// Distinct clicks excluded by the fraud rules.
    pub excluded: u64,
    pub changelog_rows: u64,
    /// Deliveries found to be copies of a click already held, at times before the frontier.
    pub duplicates: u64,
    /// Dead letters taken since this process started, by reason.
    pub dead_letters: BTreeMap<&'static str, u64>,
}

impl Counters {
    /// Accepted deliveries not yet visible in the answers: accepted, less the duplicates and the
    /// distinct clicks (billable or excluded) at times before the frontier. Every accepted
    /// delivery is one of the three once the frontier passes its time, so this is what waits
    /// behind the watermark (0 once a replay is complete).
    pub fn pending_behind_watermark(&self) -> u64 {
        let accepted: u64 = self.partitions.iter().map(|p| p.accepted).sum();
        accepted.saturating_sub(self.duplicates + self.billable + self.excluded)
    }
}
