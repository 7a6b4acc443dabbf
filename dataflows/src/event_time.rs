//! The per-partition event-time rules of SPEC §2: lateness, visibility, and the logical time a
//! row enters the dataflow at. They depend only on the partition's own rows, which is what makes
//! every output a function of the files, whatever the number of workers.

use crate::types::Time;

/// Event-time settings shared by the sources and the sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventTimeRules {
    /// The watermark trails each partition's largest ts by this much.
    pub watermark_delay_ms: u64,
    /// Rows older than the partition's largest ts by more than this are too late.
    /// `None` is reconciliation: no bound.
    pub allowed_lateness_ms: Option<u64>,
    /// Logical times are rounded down to a multiple of this; it divides a minute.
    pub tick_ms: u64,
}

impl Default for EventTimeRules {
    fn default() -> Self {
        EventTimeRules { watermark_delay_ms: 5_000, allowed_lateness_ms: Some(300_000), tick_ms: 60_000 }
    }
}

/// What the rules make of one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Enters the dataflow at `time`. `late` when its ts was already behind its partition's
    /// watermark, so that it corrects answers that were reported.
    Accepted { time: Time, late: bool },
    /// Older than allowed lateness: dead-lettered, never counted by `run`.
    TooLate,
}

/// The event-time state of one partition: the largest ts read so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartitionClock {
    pub max_ts: Option<u64>,
}

impl EventTimeRules {
    pub fn tick(&self, ms: u64) -> Time {
        ms - ms % self.tick_ms
    }

    /// This partition's contribution to the watermark: every row it will still admit enters at
    /// this logical time or later.
    pub fn partition_watermark(&self, clock: &PartitionClock) -> Time {
        match clock.max_ts {
            Some(max_ts) => self.tick(max_ts.saturating_sub(self.watermark_delay_ms)),
            None => 0,
        }
    }

    /// Classifies a row of this partition and advances the partition's clock past it.
    pub fn admit(&self, clock: &mut PartitionClock, ts: u64) -> Admission {
        let admission = match clock.max_ts {
            None => Admission::Accepted { time: self.tick(ts), late: false },
            Some(max_ts) => {
                let too_late = match self.allowed_lateness_ms {
                    Some(lateness) => ts < max_ts.saturating_sub(lateness),
                    None => false,
                };
                if too_late {
                    Admission::TooLate
                } else {
                    let watermark = max_ts.saturating_sub(self.watermark_delay_ms);
                    Admission::Accepted { time: self.tick(ts.max(watermark)), late: ts < watermark }
                }
            }
        };
        clock.max_ts = Some(clock.max_ts.map_or(ts, |m| m.max(ts)));
        admission
    }

    /// When a count change at `time` reaches the sliding windows: at the last tick of its minute
    /// (a time on a minute boundary stays). Every window answer is defined at minute boundaries,
    /// and a snapshot at boundary w holds the updates before w, so postponing a change within its
    /// minute changes no snapshot; it makes each window's top K run twice a minute (on the
    /// boundary, where windows move, and at the minute's last tick) instead of once per tick.
    /// With a one-minute tick it changes nothing.
    pub fn window_time(&self, time: Time) -> Time {
        if time.is_multiple_of(crate::types::MINUTE_MS) {
            time
        } else {
            (time / crate::types::MINUTE_MS + 1) * crate::types::MINUTE_MS - self.tick_ms
        }
    }

    /// Rounds up to a tick.
    pub fn tick_up(&self, ms: u64) -> Time {
        ms.div_ceil(self.tick_ms) * self.tick_ms
    }

    /// The logical time at which `minute` is final: from then on no row of it can arrive, so its
    /// answers can be written and its state forgotten (see `final_minutes_before`).
    /// `None` in reconciliation, where nothing is final before the end.
    pub fn minute_final_at(&self, minute: crate::types::Minute) -> Option<Time> {
        let lateness = self.allowed_lateness_ms?;
        let end = (minute as u64 + 1) * crate::types::MINUTE_MS;
        Some(self.tick_up(end + lateness.saturating_sub(self.watermark_delay_ms)))
    }

    /// Whether `minute` is final at `time` ([`minute_final_at`](Self::minute_final_at)): a change
    /// to it then can only be retention forgetting it. Never, without a lateness bound.
    pub fn is_final_at(&self, minute: crate::types::Minute, time: Time) -> bool {
        self.minute_final_at(minute).is_some_and(|final_at| time >= final_at)
    }

    /// The last minute (exclusive bound) whose answers can no longer change once the frontier
    /// is at `frontier`: any row still to come has `ts >= min(frontier, frontier + delay - lateness)`.
    /// Reconciliation (no lateness bound) never finalises before the end.
    pub fn final_minutes_before(&self, frontier: Time) -> crate::types::Minute {
        match self.allowed_lateness_ms {
            None => 0,
            Some(lateness) => {
                let earliest_ts = (frontier + self.watermark_delay_ms).saturating_sub(lateness).min(frontier);
                crate::types::minute_of(earliest_ts)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_row_is_on_time_and_sets_the_clock() {
        let rules = EventTimeRules { tick_ms: 1_000, ..Default::default() };
        let mut clock = PartitionClock::default();
        assert_eq!(rules.admit(&mut clock, 12_345), Admission::Accepted { time: 12_000, late: false });
        assert_eq!(clock.max_ts, Some(12_345));
    }

    #[test]
    fn late_rows_enter_at_the_partition_watermark() {
        let rules = EventTimeRules { tick_ms: 1_000, ..Default::default() };
        let mut clock = PartitionClock::default();
        rules.admit(&mut clock, 100_000);
        // 95_000 is the watermark; 94_999 is behind it, 90_000 is within lateness.
        assert_eq!(rules.admit(&mut clock, 94_999), Admission::Accepted { time: 95_000, late: true });
        assert_eq!(rules.admit(&mut clock, 95_000), Admission::Accepted { time: 95_000, late: false });
        assert_eq!(clock.max_ts, Some(100_000));
    }

    #[test]
    fn too_late_is_strictly_older_than_the_lateness_bound() {
        let rules = EventTimeRules::default();
        let mut clock = PartitionClock::default();
        rules.admit(&mut clock, 1_000_000);
        assert_eq!(rules.admit(&mut clock, 700_000), Admission::Accepted { time: 960_000, late: true });
        assert_eq!(rules.admit(&mut clock, 699_999), Admission::TooLate);
        let reconcile = EventTimeRules { allowed_lateness_ms: None, ..rules };
        assert!(matches!(reconcile.admit(&mut clock, 0), Admission::Accepted { late: true, .. }));
    }

    #[test]
    fn a_minute_is_final_at_the_time_the_frontier_closes_it() {
        for rules in [
            EventTimeRules::default(),
            EventTimeRules { tick_ms: 1_000, allowed_lateness_ms: Some(0), ..Default::default() },
            EventTimeRules { tick_ms: 10_000, watermark_delay_ms: 7_000, allowed_lateness_ms: Some(125_000) },
        ] {
            for minute in [0u32, 7, 1_000] {
                let at = rules.minute_final_at(minute).unwrap();
                assert!(rules.final_minutes_before(at) > minute);
                // and it is the first tick that does
                assert!(rules.final_minutes_before(at - rules.tick_ms) <= minute);
            }
        }
        assert_eq!(EventTimeRules { allowed_lateness_ms: None, ..Default::default() }.minute_final_at(3), None);
    }

    #[test]
    fn minutes_become_final_after_lateness() {
        let rules = EventTimeRules::default();
        // frontier 10 min: rows still to come have ts >= 10m + 5s - 5m = 5m5s, so minutes < 5 are final.
        assert_eq!(rules.final_minutes_before(600_000), 5);
        let strict = EventTimeRules { allowed_lateness_ms: Some(0), ..rules };
        assert_eq!(strict.final_minutes_before(600_000), 10);
    }
}
