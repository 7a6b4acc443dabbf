//! Rendering: turns a [`Plan`] into differential operators, one file per operator kind.
//! Every stage is a small function from collection to collection; `render_clicks` chains them.

pub mod counts;
pub mod dedup;
pub mod topk;

use differential_dataflow::VecCollection;

use crate::answer::Answer;
use crate::plan::Plan;
use crate::types::{Click, ClickAttrs, ClickKey, Time};

/// The collections a rendered dataflow exposes.
pub struct Rendered<'scope> {
    /// Distinct accepted clicks: one record per `(event_id, ts)`, with the attributes that count.
    pub clicks: VecCollection<'scope, Time, (ClickKey, ClickAttrs)>,
    /// Every answer of every view, for the sink.
    pub answers: VecCollection<'scope, Time, Answer>,
}

/// Renders the whole plan over the stream of click deliveries (duplicates included).
pub fn render_clicks<'scope>(deliveries: VecCollection<'scope, Time, Click>, plan: &Plan) -> Rendered<'scope> {
    let scope = deliveries.scope();
    let clicks = scope.region_named("Dedup", |inner| {
        dedup::distinct_clicks(deliveries.enter_region(inner)).leave_region(scope)
    });
    let counts = scope.region_named("MinuteCounts", |inner| {
        let counts = counts::minute_counts(clicks.clone().enter_region(inner));
        counts::MinuteCounts {
            ad: counts.ad.leave_region(scope),
            campaign: counts.campaign.leave_region(scope),
            country: counts.country.leave_region(scope),
        }
    });
    let top = scope.region_named("TopK", |inner| {
        let per_ad = counts.ad.clone().enter_region(inner).map(|((minute, ad), clicks)| (minute, (ad, clicks)));
        topk::top_k("TopMinute", per_ad, plan).leave_region(scope)
    });

    let answers = counts
        .ad
        .map(|((minute, ad), clicks)| Answer::AdMinute { minute, ad, clicks })
        .concat(counts.campaign.map(|((minute, campaign), clicks)| Answer::CampaignMinute { minute, campaign, clicks }))
        .concat(
            counts
                .country
                .map(|((minute, country, ad), clicks)| Answer::CountryMinute { minute, country, ad, clicks }),
        )
        .concat(top.map(|(minute, (ad, clicks))| Answer::TopMinute { minute, ad, clicks }));

    Rendered { clicks, answers }
}
