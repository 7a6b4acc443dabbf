//! Rendering: turns a [`Plan`] into differential operators, one file per operator kind.
//! Every stage is a small function from collection to collection; `render_clicks` chains them.

pub mod counts;
pub mod dedup;
pub mod filters;
pub mod fraud;
pub mod minute_state;
pub mod partition;
pub mod peekable;
pub mod serving;
pub mod temporal;
pub mod traces;
#[cfg(test)]
pub(crate) mod testing;
pub mod topk;
pub mod windows;

use differential_dataflow::VecCollection;

use crate::answer::Answer;
use crate::batches::map_updates;
use crate::event_time::EventTimeRules;
use crate::plan::Plan;
use crate::types::{Click, ClickAttrs, ClickKey, Time, MINUTE_MS};

/// The key and value of each arrangement this module names, as a person reads them, for
/// introspection: `name` is the operator's name (`Arrange: X` for an input arrangement).
pub fn arrangement_schema(name: &str) -> Option<(&'static str, &'static str)> {
    const RANK: &str = "rank (u64::MAX - clicks, ad_id)";
    let name = name.strip_prefix("Arrange: ").unwrap_or(name);
    Some(match name {
        "DistinctClicks" => ("ClickKey (xxh3-128 of event_id, ts)", "ClickAttrs (ad_id, campaign_id, user_id, ip, country)"),
        "AdMinute" | "FraudMinute" => ("(minute, ad_id)", "()"),
        "CampaignMinute" => ("(minute, campaign_id)", "()"),
        "CountryMinute" => ("(minute, country, ad_id)", "()"),
        "CampaignWindowCounts" => ("(window minutes, campaign_id)", "()"),
        "CampaignCountryMinute" => ("(minute, country, campaign_id)", "()"),
        "TopCountryMinute" => ("(minute, country)", RANK),
        "TopCountryMinuteLocal" => ("(minute, country)", "clicks per ad_id, this worker's share"),
        "TopCountryWindow" => ("(window minutes, country)", RANK),
        "IpMinute" | "IpMinuteOverLimit" => ("(minute, ip)", "()"),
        "UserMinute" | "UserMinuteOverLimit" => ("(minute, user_id)", "()"),
        "ClicksByIpMinute" => ("(minute, ip)", "(ClickKey, ClickAttrs)"),
        "ClicksByUserMinute" => ("(minute, user_id)", "(ClickKey, ClickAttrs)"),
        "ExcludedClicks" => ("(ClickKey, ClickAttrs) excluded by a fraud rule", "()"),
        "ClicksByIp" => ("ip", "FilterRow (minute, ad_id, campaign_id, country, user_id, ip)"),
        "ClicksByUser" => ("user_id", "FilterRow (minute, ad_id, campaign_id, country, user_id, ip)"),
        "TopMinute" => ("minute", RANK),
        "TopMinuteLocal" => ("minute", "clicks per ad_id, this worker's share"),
        "TopWindowLocal" => ("(window minutes, (), ad_id)", "() with the ad's clicks in the window as its count, this worker's share"),
        "TopCountryWindowLocal" => ("(window minutes, country, ad_id)", "() with the ad's clicks in the window as its count, this worker's share"),
        "TopWindow" => ("window minutes", RANK),
        _ => return None,
    })
}

/// Sliding counts: for each window M of `windows` and each key, the clicks of the last M
/// minutes, from the clicks per minute and key (`C`, with the clicks as its multiplicity, as
/// [`counts::MinuteCounts::clicks`] gives them), keyed by `split`.
///
/// A minute's clicks before it is final are its answer; later changes are retention forgetting
/// it, which must not take it out of a window early. Each contribution leaves the window of M
/// minutes when that window has moved past its minute.
pub fn sliding_counts<'scope, C, K>(
    name: &str,
    clicks: VecCollection<'scope, Time, C>,
    windows: &[u32],
    rules: &EventTimeRules,
    split: impl Fn(&C) -> (crate::types::Minute, K) + 'static,
) -> VecCollection<'scope, Time, ((u32, K), u64)>
where
    C: Clone + 'static,
    K: differential_dataflow::ExchangeData + std::hash::Hash + Clone + serde::Serialize,
{
    let windows = windows.to_vec();
    let rules = *rules;
    let contributions = temporal::expiring_from(&format!("{name}Contributions"), clicks, move |key, time| {
        let (minute, key) = split(key);
        windows::contributions(rules, &windows, minute, time)
            .map(|(index, from, until)| ((windows[index], key.clone()), from, until, 1))
            .collect::<Vec<_>>()
    });
    counts::count_named(name, contributions)
}

/// The last logical time at which a click of `minute` still changes anything in the dataflow:
/// its retention retraction, its last sliding window, and (when serving) the filters' hold.
/// `None` without a lateness bound, when nothing is ever forgotten.
pub fn last_effect_of_minute(minute: crate::types::Minute, plan: &Plan, rules: &EventTimeRules, serving: bool) -> Option<Time> {
    let final_at = rules.minute_final_at(minute)?;
    let widest = plan.windows.iter().copied().max().unwrap_or(0) as u64 * MINUTE_MS;
    let window_end = (minute as u64) * MINUTE_MS + widest;
    Some(final_at.max(window_end).max(if serving { final_at + widest } else { 0 }))
}

/// The first minute whose clicks still change the dataflow at or after `frontier`: a replay
/// that starts with every click from that minute on rebuilds, by `frontier`, exactly the state
/// that a replay from the very beginning has then. Recovery is bounded by this, not by the
/// length of the logs.
pub fn first_live_minute(frontier: Time, plan: &Plan, rules: &EventTimeRules, serving: bool) -> crate::types::Minute {
    let mut minute = crate::types::minute_of(frontier);
    while minute > 0 {
        match last_effect_of_minute(minute - 1, plan, rules, serving) {
            Some(last) if last < frontier => break,
            Some(_) => minute -= 1,
            None => return 0,
        }
    }
    minute
}

/// The collections a rendered dataflow exposes.
pub struct Rendered<'scope> {
    /// Distinct accepted clicks that are billable: one record per `(event_id, ts)`, with the
    /// attributes that count (all distinct clicks when there are no fraud rules). Retracted when
    /// their minute is final only when the fraud rules are active (see [`render_clicks`]).
    pub clicks: VecCollection<'scope, Time, (ClickKey, ClickAttrs)>,
    /// Every answer of every view, for the sink.
    pub answers: VecCollection<'scope, Time, Answer>,
    /// The per-minute counts of billable clicks, for views rendered beside these.
    pub counts: counts::MinuteCounts<'scope>,
    /// Duplicates as de-duplication finds them: at each time, a record `()` whose multiplicity
    /// is how many deliveries then were copies of a click already held
    /// ([`dedup::distinct_clicks_counting_copies`]).
    pub duplicates: VecCollection<'scope, Time, ()>,
}

/// Renders the whole plan over the stream of click deliveries (duplicates included).
///
/// With a lateness bound, de-duplication and the per-minute state hold only the minutes that can
/// still change: each forgets a minute once it is final (`rules.minute_final_at`), and retracts
/// what it sent of it; the sink has written those minutes' answers by then, and ignores the
/// retractions. No click of `Rendered::clicks` is retracted then unless the fraud rules, which
/// arrange them, need it: consumers beside these that hold clicks (the server's filters) forget
/// them on their own schedule. Retracting every click for them cost a second update per click
/// through de-duplication and every consumer of the clicks, which all drop it.
pub fn render_clicks<'scope>(
    deliveries: VecCollection<'scope, Time, Click>,
    plan: &Plan,
    rules: &EventTimeRules,
) -> Rendered<'scope> {
    let scope = deliveries.scope();
    let rules = *rules;
    let retract = plan.fraud.is_active();
    let (clicks, duplicates) = scope.region_named("Dedup", |inner| {
        let (clicks, duplicates) = dedup::distinct_clicks_counting_copies("DistinctClicks", deliveries.enter_region(inner), &rules, retract);
        (clicks.leave_region(scope), duplicates.leave_region(scope))
    });
    let (clicks, excluded) = if plan.fraud.is_active() {
        scope.region_named("Fraud", |inner| {
            let billing = fraud::split_billable(clicks.enter_region(inner), &plan.fraud);
            (billing.billable.leave_region(scope), Some(billing.excluded.leave_region(scope)))
        })
    } else {
        (clicks, None)
    };
    let counts = scope.region_named("MinuteCounts", |inner| {
        let counts = counts::minute_counts(clicks.clone().enter_region(inner), &rules);
        counts::MinuteCounts {
            ad: counts.ad.leave_region(scope),
            campaign: counts.campaign.leave_region(scope),
            country: counts.country.leave_region(scope),
            clicks: counts::MinuteClicks {
                ad: counts.clicks.ad.leave_region(scope),
                campaign: counts.clicks.campaign.leave_region(scope),
                country: counts.clicks.country.leave_region(scope),
            },
        }
    });
    let top = scope.region_named("TopK", |inner| {
        topk::top_k_per_minute("TopMinute", counts.clicks.ad.clone().enter_region(inner), plan.top_k, &rules).leave_region(scope)
    });
    let top_window = scope.region_named("SlidingWindows", |inner| {
        let minute_tops = || top.clone().enter_region(inner).map(|(minute, ranked)| ((minute, ()), ranked));
        windows::sliding_top_k_with_minute_tops("TopWindow", counts.clicks.ad.clone().enter_region(inner), minute_tops, plan, &rules, |&(minute, _)| (minute, ()))
            .map(|((window, ()), ranked)| (window, ranked))
            .leave_region(scope)
    });

    let answers = map_updates("AdMinuteAnswers", counts.ad.clone(), |((minute, ad), clicks)| Answer::AdMinute { minute, ad, clicks })
        .concat(map_updates("CampaignMinuteAnswers", counts.campaign.clone(), |((minute, campaign), clicks)| Answer::CampaignMinute { minute, campaign, clicks }))
        .concat(map_updates("CountryMinuteAnswers", counts.country.clone(), |((minute, country, ad), clicks)| Answer::CountryMinute { minute, country, ad, clicks }))
        .concat(top.map(|(minute, (ad, clicks))| Answer::TopMinute { minute, ad, clicks }))
        .concat(top_window.map(|(window, (ad, clicks))| Answer::TopWindow { window, ad, clicks }));
    let answers = match excluded {
        Some(excluded) => answers.concat(scope.region_named("FraudMinute", |inner| {
            let per_ad = excluded.enter_region(inner).map(|(key, attrs)| (crate::types::minute_of(key.ts), attrs.ad));
            counts::count_named("FraudMinute", per_ad)
                .map(|((minute, ad), clicks)| Answer::FraudMinute { minute, ad, clicks })
                .leave_region(scope)
        })),
        None => answers,
    };
    Rendered { clicks, answers, counts, duplicates }
}

/// The answers as the sink applies them: each worker consolidates its share of every completed
/// time and sends it as one sorted run (see [`counts::consolidate_completed_times`]), which the
/// sink, gathering them on one worker, merges.
///
/// Changes to a minute's answers at or after the minute's final time (`rules.minute_final_at`)
/// are dropped here, in parallel, before they are sorted and sent: they can only be retention
/// forgetting a minute whose answers the sink has written, and the sink ignores them (for the
/// files, the store and the server's copy alike).
pub fn answers_for_sink<'scope>(answers: VecCollection<'scope, Time, Answer>, rules: &EventTimeRules) -> VecCollection<'scope, Time, Vec<(Answer, isize)>> {
    let rules = *rules;
    counts::consolidate_completed_times("SortAnswers", answers, move |answer: &Answer, time| {
        answer.minute().is_none_or(|minute| !rules.is_final_at(minute, time))
    })
}
