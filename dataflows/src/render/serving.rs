//! The regions only a server needs, rendered beside [`render_clicks`](super::render_clicks):
//! the clicks arranged by ip and by user for filtered queries (`Filters`), and the answers no
//! view file holds (`ServingViews`).

use differential_dataflow::VecCollection;

use super::counts::count_per_minute;
use super::filters::{render_filters, FilterArrangements};
use super::topk::top_k;
use super::windows::sliding_top_k_with_minute_tops;
use super::{sliding_counts, Rendered};
use crate::answer::{ServingAnswer, SinkRecord};
use crate::event_time::EventTimeRules;
use crate::plan::Plan;
use crate::types::{minute_of, Time};

/// The billable clicks arranged by ip and by user, in a region named `Filters`, each held until
/// the longest of `plan`'s windows after its minute is final.
pub fn filters_region(rendered: &Rendered<'_>, plan: &Plan, rules: &EventTimeRules) -> FilterArrangements {
    let horizon = plan.windows.iter().copied().max().unwrap_or(0);
    let clicks = rendered.clicks.clone();
    let scope = clicks.scope();
    scope.region_named("Filters", |inner| render_filters(clicks.enter_region(inner), rules, horizon))
}

/// The answers a server keeps that no view file holds, in a region named `ServingViews`: clicks
/// per campaign and country each minute, the top K of each country by minute and by window, and
/// each campaign's clicks in each window. `rules` are the run's; `dataflow_rules` the ones the
/// dataflow keeps time by (without a lateness bound when reconciling).
pub fn serving_views<'scope>(
    rendered: &Rendered<'scope>,
    plan: &Plan,
    rules: &EventTimeRules,
    dataflow_rules: &EventTimeRules,
) -> VecCollection<'scope, Time, SinkRecord> {
    let clicks = rendered.clicks.clone();
    let counts = rendered.counts.clone();
    let scope = clicks.scope();
    scope.region_named("ServingViews", |inner| {
        let per_campaign = clicks.enter_region(inner).map(|(key, attrs)| (minute_of(key.ts), attrs.country, attrs.campaign));
        let campaign_country = count_per_minute("CampaignCountryMinute", per_campaign, dataflow_rules).map(|((minute, country, campaign), clicks)| {
            ServingAnswer::CampaignCountryMinute { minute, country, campaign, clicks }
        });
        let country = counts.country.enter_region(inner);
        let per_country_minute = country.clone().map(|((minute, country, ad), clicks)| ((minute, country), (ad, clicks)));
        let top_country_minute = top_k("TopCountryMinute", per_country_minute, plan);
        let country_clicks = counts.clicks.country.enter_region(inner);
        let top_country_window = sliding_top_k_with_minute_tops("TopCountryWindow", country_clicks, || top_country_minute.clone(), plan, rules, |&(m, c, _)| (m, c))
            .map(|((window, country), (ad, clicks))| ServingAnswer::TopCountryWindow { window, country, ad, clicks });
        let top_country_minute =
            top_country_minute.map(|((minute, country), (ad, clicks))| ServingAnswer::TopCountryMinute { minute, country, ad, clicks });
        let campaign_windows = sliding_counts("CampaignWindowCounts", counts.clicks.campaign.enter_region(inner), &plan.windows, rules, |&(m, campaign)| (m, campaign))
            .map(|((window, campaign), clicks)| ServingAnswer::CampaignWindow { window, campaign, clicks });
        campaign_country
            .concat(top_country_minute)
            .concat(top_country_window)
            .concat(campaign_windows)
            .map(SinkRecord::Serving)
            .leave_region(scope)
    })
}
