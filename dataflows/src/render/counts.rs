//! Per-minute counts (SPEC §3 answers 1 and 3).

use differential_dataflow::collection::AsCollection;
use differential_dataflow::operators::CountTotal;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use differential_dataflow::VecCollection;

use crate::types::{ClickAttrs, ClickKey, Country, Minute, Time};

/// The per-minute count collections: `(key, clicks)`, one record per key with clicks > 0.
#[derive(Clone)]
pub struct MinuteCounts<'scope> {
    pub ad: VecCollection<'scope, Time, ((Minute, u64), u64)>,
    pub campaign: VecCollection<'scope, Time, ((Minute, u64), u64)>,
    pub country: VecCollection<'scope, Time, ((Minute, Country, u64), u64)>,
    /// The clicks behind the counts, as they arrive: each key with a multiplicity equal to the
    /// clicks it gains (or loses), pre-aggregated in the worker and not yet exchanged. Whatever
    /// adds counts up again (a sliding window over minutes) reads these instead: one update per
    /// change, where the counts give two (`-old`, `+new`).
    pub clicks: MinuteClicks<'scope>,
}

/// See [`MinuteCounts::clicks`].
#[derive(Clone)]
pub struct MinuteClicks<'scope> {
    pub ad: VecCollection<'scope, Time, (Minute, u64)>,
    pub campaign: VecCollection<'scope, Time, (Minute, u64)>,
    pub country: VecCollection<'scope, Time, (Minute, Country, u64)>,
}

/// Counts distinct clicks per (minute, ad), (minute, campaign) and (minute, country, ad).
pub fn minute_counts<'scope>(clicks: VecCollection<'scope, Time, (ClickKey, ClickAttrs)>) -> MinuteCounts<'scope> {
    let (ad, ad_clicks) = count_with_changes("AdMinute", clicks.clone().map(|(key, attrs)| (crate::types::minute_of(key.ts), attrs.ad)));
    let (campaign, campaign_clicks) =
        count_with_changes("CampaignMinute", clicks.clone().map(|(key, attrs)| (crate::types::minute_of(key.ts), attrs.campaign)));
    let (country, country_clicks) = count_with_changes(
        "CountryMinute",
        clicks.map(|(key, attrs)| (crate::types::minute_of(key.ts), attrs.country, attrs.ad)),
    );
    MinuteCounts { ad, campaign, country, clicks: MinuteClicks { ad: ad_clicks, campaign: campaign_clicks, country: country_clicks } }
}

/// Counts records per key (sums their multiplicities, which may be any weight), in an
/// arrangement named `name`.
///
/// Updates are consolidated inside the worker before they are exchanged (two-stage aggregation):
/// a key that gets many clicks at one time, a viral ad, costs one update per batch, not one per
/// click. Times are totally ordered, so `count_total` needs no arrangement of its output.
pub fn count_named<'scope, K>(name: &str, keys: VecCollection<'scope, Time, K>) -> VecCollection<'scope, Time, (K, u64)>
where
    K: differential_dataflow::ExchangeData + std::hash::Hash,
{
    count_with_changes(name, keys).0
}

/// [`count_named`], and the pre-aggregated changes it counts (see [`MinuteCounts::clicks`]).
fn count_with_changes<'scope, K>(
    name: &str,
    keys: VecCollection<'scope, Time, K>,
) -> (VecCollection<'scope, Time, (K, u64)>, VecCollection<'scope, Time, K>)
where
    K: differential_dataflow::ExchangeData + std::hash::Hash,
{
    let changes = pre_aggregate(&format!("PreAggregate: {name}"), keys);
    let counts = changes
        .clone()
        .arrange_by_self_named(&format!("Arrange: {name}"))
        .count_total_core::<isize>()
        .map(|(key, clicks)| {
            debug_assert!(clicks > 0);
            (key, clicks as u64)
        });
    (counts, changes)
}

/// Consolidates, inside the worker, everything one activation receives, before the exchange.
///
/// Upstream operators emit a completed time's updates in a burst, so one activation sees most of
/// them: a key's many `+1`s at one time leave as one update. (`consolidate_stream` does this only
/// within each small container.) Output goes under the least capability received, which is at or
/// before every update's time.
pub fn pre_aggregate<'scope, K>(name: &str, keys: VecCollection<'scope, Time, K>) -> VecCollection<'scope, Time, K>
where
    K: differential_dataflow::ExchangeData,
{
    let mut buffer: Vec<(K, Time, isize)> = Vec::new();
    keys.inner
        .unary(Pipeline, name, move |_, _| {
            move |input, output| {
                let mut least: Option<timely::dataflow::operators::Capability<Time>> = None;
                input.for_each(|capability, data| {
                    if let Some(capability) = capability.retain_least(0) {
                        if least.as_ref().is_none_or(|l| capability.time() < l.time()) {
                            least = Some(capability);
                        }
                    }
                    buffer.append(data);
                });
                if let Some(capability) = least {
                    differential_dataflow::consolidation::consolidate_updates(&mut buffer);
                    output.session(&capability).give_iterator(buffer.drain(..));
                }
            }
        })
        .as_collection()
}
