//! `clickagg demo`: generate a small data set, run it, and show what happened.

use std::path::Path;

use crate::generate::{generate, GenConfig};
use crate::run::{run, RunConfig};
use crate::model::Summary;

/// Generates `events` clicks under `dir`, runs them with `workers`, and returns the summary.
pub fn demo(dir: &Path, events: u64, workers: usize) -> Result<Summary, String> {
    let logs = dir.join("logs");
    let out = dir.join("out");
    let config = GenConfig { events, partitions: 4, minutes: 20, ..GenConfig::default() };
    generate(&config, &logs)?;
    let mut run_config = RunConfig::new(logs, out);
    run_config.workers = workers;
    run(&run_config)?.ok_or_else(|| "the run wrote no summary".to_string())
}

/// The summary as a human reads it.
pub fn render_summary(summary: &Summary) -> String {
    let mut text = String::new();
    let mut line = |s: String| {
        text.push_str(&s);
        text.push('\n')
    };
    line(format!("partitions       {}", summary.partitions.len()));
    line(format!("lines read       {}", summary.lines()));
    line(format!("clicks counted   {} in {} minutes", summary.clicks, summary.minutes));
    line(format!("duplicates       {} (retried deliveries, counted once)", summary.duplicates()));
    line(format!("late             {} (accepted after their minute was reported: corrections)", summary.late()));
    line(format!("too late         {} (beyond allowed lateness: dead letter, not counted)", summary.too_late()));
    line(format!("malformed        {} (dead letter)", summary.malformed()));
    if summary.excluded > 0 {
        line(format!("fraud excluded   {} (not billable; fraud_minute.csv)", summary.excluded));
    }
    line(format!("changelog rows   {}", summary.changelog_rows));
    if let Some((minute, clicks, top)) = &summary.busiest_minute {
        line(format!("busiest minute   {minute} ({clicks} clicks); its top {}:", top.len()));
        line("  rank  ad_id        clicks".to_string());
        for (rank, (ad, clicks)) in top.iter().enumerate() {
            line(format!("  {:>4}  {:<12} {:>6}", rank + 1, ad, clicks));
        }
    }
    text
}
