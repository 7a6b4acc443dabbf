//! `/metrics`: the figures of `/v1/status` and the arrangements' sizes in Prometheus' text
//! format (0.0.4), encoded by `prometheus-client`, which escapes label values.
//!
//! The figures are read from the served state at each scrape into a registry made for that
//! scrape: they are the sink's and the introspection's, not counters this process bumps. The
//! one figure measured over time, events/s, comes from a [`Rate`] sampled once a second.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::state::{Materialized, ServingState};
use crate::introspect::OperatorSummary;

/// The content type of what [`render`] writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The interval events/s is measured over.
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// Lines read, sampled about once a second, for a rate over the last [`RATE_WINDOW`].
#[derive(Default)]
pub struct Rate {
    samples: Mutex<VecDeque<(Instant, u64)>>,
}

impl Rate {
    /// Records that `lines` had been read by `at`; samples older than the window are dropped.
    pub fn record(&self, at: Instant, lines: u64) {
        if let Ok(mut samples) = self.samples.lock() {
            samples.push_back((at, lines));
            while samples.front().is_some_and(|(t, _)| at.duration_since(*t) > RATE_WINDOW) {
                samples.pop_front();
            }
        }
    }

    /// Lines per second from the oldest sample within [`RATE_WINDOW`] of `now` to `lines`, read
    /// at `now`; 0 before there is a sample to measure from.
    pub fn per_second(&self, now: Instant, lines: u64) -> f64 {
        let Ok(samples) = self.samples.lock() else { return 0.0 };
        let oldest = samples.iter().find(|(t, _)| now.saturating_duration_since(*t) <= RATE_WINDOW);
        match oldest {
            Some(&(t, then)) if now > t => lines.saturating_sub(then) as f64 / now.duration_since(t).as_secs_f64(),
            _ => 0.0,
        }
    }
}

type Labels = Vec<(String, String)>;

/// A family of gauges of one type, registered under `name`.
fn gauges<N, A>(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge<N, A>>
where
    Gauge<N, A>: prometheus_client::metrics::TypedMetric + prometheus_client::encoding::EncodeMetric + Default + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<Labels, Gauge<N, A>>::default();
    registry.register(name, help, family.clone());
    family
}

fn counters(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

fn label(name: &str, value: &str) -> Labels {
    vec![(name.to_string(), value.to_string())]
}

/// Every figure as Prometheus text. `events_per_second` is the recent rate ([`Rate`]);
/// `operators` the introspection's summary (arrangements are those that arrange).
pub fn render(answers: &Materialized, state: &ServingState, operators: &[OperatorSummary], events_per_second: f64) -> String {
    let c = &answers.counters;
    let mut registry = Registry::with_prefix("clickagg");
    let none = Labels::new;

    let watermark = gauges::<i64, AtomicI64>(&mut registry, "watermark_ms", "Every answer is exact as of this event time");
    watermark.get_or_create(&none()).set(answers.watermark().unwrap_or(0) as i64);

    let lines = counters(&mut registry, "lines", "Lines read, per partition");
    let accepted = counters(&mut registry, "accepted", "Clicks accepted (duplicates included), per partition");
    let late = counters(&mut registry, "late", "Accepted clicks that corrected a reported minute, per partition");
    let too_late = counters(&mut registry, "too_late", "Rows beyond the allowed lateness (dead letter), per partition");
    let malformed = counters(&mut registry, "malformed", "Lines that are not clicks (dead letter), per partition");
    let offset = gauges::<i64, AtomicI64>(&mut registry, "offset_bytes", "Byte offset read to, per partition");
    let lag_bytes = gauges::<i64, AtomicI64>(&mut registry, "lag_bytes", "Bytes of the partition file not yet read");
    let lag_messages = gauges::<i64, AtomicI64>(
        &mut registry,
        "lag_messages",
        "Messages of the Kafka topic partition not yet read (its high watermark as last fetched, minus the offset)",
    );
    let lag_seconds = gauges::<f64, AtomicU64>(
        &mut registry,
        "lag_seconds",
        "Wall-clock time minus the newest event time read, per partition (for a replay of old logs, their age)",
    );
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    for p in &c.partitions {
        let name = state.settings.partition_names.get(p.partition as usize).map_or("", |s| s.as_str());
        let labels = label("partition", name);
        lines.get_or_create(&labels).inc_by(p.lines);
        accepted.get_or_create(&labels).inc_by(p.accepted);
        late.get_or_create(&labels).inc_by(p.late);
        too_late.get_or_create(&labels).inc_by(p.too_late);
        malformed.get_or_create(&labels).inc_by(p.malformed);
        offset.get_or_create(&labels).set(p.offset as i64);
        if let Some(size) = state.settings.partition_file_size(name) {
            lag_bytes.get_or_create(&labels).set(size.saturating_sub(p.offset) as i64);
        }
        if let Some(end) = crate::model::positions::end_of(name) {
            lag_messages.get_or_create(&labels).set(end.saturating_sub(p.offset) as i64);
        }
        if let Some(ts) = p.max_ts {
            lag_seconds.get_or_create(&labels).set(now_ms.saturating_sub(ts) as f64 / 1000.0);
        }
    }

    let totals = [
        ("clicks", "Distinct billable clicks counted", c.billable),
        ("fraud_excluded", "Distinct clicks excluded by the fraud rules", c.excluded),
        ("duplicates", "Accepted deliveries that de-duplication found to be copies of a click already held", c.duplicates),
        ("changelog_rows", "Updates the sink applied", c.changelog_rows),
    ];
    for (name, help, value) in totals {
        counters(&mut registry, name, help).get_or_create(&none()).inc_by(value);
    }
    let pending = gauges::<i64, AtomicI64>(&mut registry, "pending_behind_watermark", "Accepted deliveries not yet visible in the answers");
    pending.get_or_create(&none()).set(c.pending_behind_watermark() as i64);
    let dead_letters = counters(&mut registry, "dead_letters", "Dead letters since this process started, by reason");
    for (reason, n) in &c.dead_letters {
        dead_letters.get_or_create(&label("reason", reason)).inc_by(*n);
    }
    let rate = gauges::<f64, AtomicU64>(&mut registry, "events_per_second", "Lines read per second over the last 10 seconds");
    rate.get_or_create(&none()).set(events_per_second);
    let kept = gauges::<i64, AtomicI64>(
        &mut registry,
        "minutes_kept",
        "Minutes with clicks whose answers the server holds in memory (older ones are read from the store)",
    );
    kept.get_or_create(&none()).set(answers.ad.len() as i64);
    let served = gauges::<i64, AtomicI64>(
        &mut registry,
        "served_entries",
        "Entries the server holds in memory (counts, top-K members, snapshots, history)",
    );
    served.get_or_create(&none()).set(answers.entries() as i64);
    let uptime = gauges::<f64, AtomicU64>(&mut registry, "uptime_seconds", "Seconds since the server started");
    uptime.get_or_create(&none()).set(state.started.elapsed().as_secs_f64());

    let records = gauges::<i64, AtomicI64>(&mut registry, "arrangement_records", "Updates held by each arrangement's trace, over this process's workers");
    let batches = gauges::<i64, AtomicI64>(&mut registry, "arrangement_batches", "Batches held by each arrangement's trace, over this process's workers");
    for op in operators.iter().filter(|op| op.total.arranges) {
        let labels = vec![("name".to_string(), op.total.name.clone()), ("operator".to_string(), op.id.to_string())];
        records.get_or_create(&labels).set(op.total.records);
        batches.get_or_create(&labels).set(op.total.batches);
    }

    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_over_the_last_window_not_since_start() {
        let rate = Rate::default();
        let start = Instant::now();
        assert_eq!(rate.per_second(start, 0), 0.0);
        // 1000 lines/s for 20 s, then nothing for 5 s.
        for s in 0..=20u64 {
            rate.record(start + Duration::from_secs(s), s * 1000);
        }
        let now = start + Duration::from_secs(20);
        assert!((rate.per_second(now, 20_000) - 1000.0).abs() < 1e-9);
        for s in 21..=25u64 {
            rate.record(start + Duration::from_secs(s), 20_000);
        }
        let now = start + Duration::from_secs(25);
        // From second 15 (15k) to 25 (20k): 500/s; since start it would be 800/s.
        assert!((rate.per_second(now, 20_000) - 500.0).abs() < 1e-9);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut registry = Registry::with_prefix("clickagg");
        let family = gauges::<i64, AtomicI64>(&mut registry, "arrangement_records", "Records");
        family.get_or_create(&label("name", "Arrange: \"odd\\name\"\nline")).set(3);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        assert!(text.contains(r#"clickagg_arrangement_records{name="Arrange: \"odd\\name\"\nline"} 3"#), "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("clickagg_")).count(), 1, "{text}");
    }
}
