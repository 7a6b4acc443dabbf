//! Hierarchical top-K (SPEC §3 answer 2).
//!
//! One `reduce` over every ad of a minute re-sorts the whole minute whenever one count moves
//! (differential #29). Instead each level keeps the top K of a hash bucket of ad ids, and the next
//! level the top K of the winners of several buckets: a changed count re-sorts one small bucket,
//! and moves up only while it is still among the winners.

use differential_dataflow::VecCollection;

use crate::plan::Plan;
use crate::types::Time;

/// Sort key of a ranked entry: clicks descending, then ad ascending.
type Rank = (u64, u64);

fn rank(ad: u64, clicks: u64) -> Rank {
    (u64::MAX - clicks, ad)
}

fn unrank((inverse_clicks, ad): Rank) -> (u64, u64) {
    (ad, u64::MAX - inverse_clicks)
}

/// A well-mixed bucket of an ad id; ad ids themselves may be dense or patterned.
fn bucket_of(ad: u64) -> u32 {
    (ad.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32
}

/// The top `plan.top_k` of each group: from `(group, (ad, clicks))` (one record per ad of a
/// group) to the subset of those records that rank in the top K of their group by clicks
/// descending, then ad ascending.
pub fn top_k<'scope, G>(
    name: &str,
    entries: VecCollection<'scope, Time, (G, (u64, u64))>,
    plan: &Plan,
) -> VecCollection<'scope, Time, (G, (u64, u64))>
where
    G: differential_dataflow::ExchangeData + std::hash::Hash,
{
    let k = plan.top_k;
    let mut ranked =
        entries.map(|(group, (ad, clicks))| ((group, bucket_of(ad)), rank(ad, clicks)));
    for (level, &buckets) in plan.top_k_buckets.iter().enumerate() {
        let mask = buckets - 1;
        ranked = keep_top(&format!("{name}Level{level}"), ranked.map(move |((group, bucket), r)| ((group, bucket & mask), r)), k);
    }
    keep_top(name, ranked.map(|((group, _bucket), r)| ((group, 0), r)), k)
        .map(|((group, _), r)| (group, unrank(r)))
}

/// Keeps the first `k` ranks of each key.
fn keep_top<'scope, K>(
    name: &str,
    ranked: VecCollection<'scope, Time, (K, Rank)>,
    k: usize,
) -> VecCollection<'scope, Time, (K, Rank)>
where
    K: differential_dataflow::ExchangeData + std::hash::Hash,
{
    ranked.reduce_named(name, move |_key, input, output| {
        // Input is sorted by rank; each (ad, clicks) occurs once, but stay exact if not.
        let mut remaining = k as isize;
        for (r, count) in input {
            if remaining <= 0 {
                break;
            }
            let taken = (*count).min(remaining);
            output.push((**r, taken));
            remaining -= taken;
        }
    })
}
