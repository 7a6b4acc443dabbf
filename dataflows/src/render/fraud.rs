//! Fraud rules: which clicks are not billable. Both sides are kept: the billable clicks feed every
//! answer of SPEC §4, the excluded ones their own per-minute count.

use std::hash::Hash;

use differential_dataflow::operators::ThresholdTotal;
use differential_dataflow::{ExchangeData, VecCollection};

use crate::plan::FraudRules;
use crate::render::counts::count_named;
use crate::render::traces::register_trace;
use crate::types::{minute_of, ClickAttrs, ClickKey, Minute, Time};

type Clicks<'scope> = VecCollection<'scope, Time, (ClickKey, ClickAttrs)>;

/// The clicks and their split by the rules.
pub struct Billing<'scope> {
    pub billable: Clicks<'scope>,
    pub excluded: Clicks<'scope>,
}

/// Splits distinct clicks into billable and excluded: a click is excluded when its ip or its
/// user_id has more than `max_clicks_per_minute` clicks in its minute, or its ip is blocklisted.
///
/// The rule is exact and retroactive: when the group's click over the limit arrives, every click
/// of the group leaves the billable side at that time, so every answer built on it is retracted
/// and restated.
pub fn split_billable<'scope>(clicks: Clicks<'scope>, rules: &FraudRules) -> Billing<'scope> {
    let mut exclusions = Vec::new();
    if let Some(limit) = rules.max_clicks_per_minute {
        exclusions.push(over_limit("Ip", clicks.clone(), limit, |key, attrs| (minute_of(key.ts), attrs.ip)));
        exclusions.push(over_limit("User", clicks.clone(), limit, |key, attrs| (minute_of(key.ts), attrs.user)));
    }
    if !rules.blocklist.is_empty() {
        let blocklist = rules.blocklist.clone();
        exclusions.push(clicks.clone().filter(move |(_, attrs)| blocklist.iter().any(|net| net.contains(attrs.ip))));
    }
    let scope = clicks.scope();
    // A click broken by several rules is excluded once.
    let excluded = differential_dataflow::collection::concatenate(scope, exclusions).arrange_by_self_named("Arrange: ExcludedClicks");
    register_trace("Arrange: ExcludedClicks", &excluded.trace);
    let excluded = excluded.distinct_total();
    let billable = clicks.concat(excluded.clone().negate());
    Billing { billable, excluded }
}

/// The clicks of every `(minute, group)` that has more than `limit` clicks.
fn over_limit<'scope, G>(
    name: &str,
    clicks: Clicks<'scope>,
    limit: u64,
    group_of: impl Fn(&ClickKey, &ClickAttrs) -> (Minute, G) + Clone + 'static,
) -> Clicks<'scope>
where
    G: ExchangeData + Hash + serde::Serialize,
{
    let group = group_of.clone();
    let counts = count_named(&format!("{name}Minute"), clicks.clone().map(move |(key, attrs)| group(&key, &attrs)));
    let flagged = counts
        .filter(move |(_, clicks)| *clicks > limit)
        .map(|(group, _)| group)
        .arrange_by_self_named(&format!("Arrange: {name}MinuteOverLimit"));
    register_trace(&format!("Arrange: {name}MinuteOverLimit"), &flagged.trace);
    let by_group = clicks
        .map(move |(key, attrs)| (group_of(&key, &attrs), (key, attrs)))
        .arrange_by_key_named(&format!("Arrange: ClicksBy{name}Minute"));
    register_trace(&format!("Arrange: ClicksBy{name}Minute"), &by_group.trace);
    by_group.join_core(flagged, |_group, click, ()| Some(*click))
}
