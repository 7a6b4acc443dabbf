//! Collections partitioned by ad: every record of one ad on one worker.
//!
//! The per-minute counts per ad and per (country, ad), each minute's top K and the sliding
//! windows all keep per-ad state, so each needs every update of an ad on one worker. Exchanged
//! by each reader on its own, the same updates crossed between workers once per reader: the
//! clicks per (minute, ad) three times. Exchanged once by ad
//! ([`MinuteClicks`](crate::render::counts::MinuteClicks)), they are read where they are.
//!
//! [`ByAd`] says so in the type: a reader that takes one does not exchange its input.
//!
//! (Exchanging the clicks themselves by ad, before pre-aggregation, would spare the readers the
//! updates of an ad that every worker pre-aggregated its own share of; it measured slower, as
//! every click then crosses twice: once to be de-duplicated, once by ad.)

use differential_dataflow::collection::AsCollection;
use differential_dataflow::VecCollection;
use timely::dataflow::operators::generic::Operator;

use crate::batches::exchange_updates;
use crate::types::{Country, Minute, Time};

/// A well-mixed bucket of an ad id; ad ids themselves may be dense or patterned.
pub(crate) fn bucket_of(ad: u64) -> u32 {
    (ad.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32
}

/// A record that belongs to one ad.
pub trait OfAd: differential_dataflow::ExchangeData {
    fn ad(&self) -> u64;
}

impl OfAd for (Minute, u64) {
    fn ad(&self) -> u64 {
        self.1
    }
}

impl OfAd for (Minute, Country, u64) {
    fn ad(&self) -> u64 {
        self.2
    }
}

/// A collection whose records of each ad ([`OfAd::ad`]) are all on one worker.
#[derive(Clone)]
pub struct ByAd<'scope, D: 'static> {
    collection: VecCollection<'scope, Time, D>,
}

impl<'scope, D: OfAd> ByAd<'scope, D> {
    /// Exchanges `collection` by ad.
    pub fn exchange(collection: VecCollection<'scope, Time, D>) -> Self {
        let by_ad = exchange_updates(|record: &D| u64::from(bucket_of(record.ad())));
        let inner = collection.inner.unary(by_ad, "ExchangeByAd", |_, _| {
            move |input, output| {
                input.for_each_stamp(|time, data| output.session(&time).give_containers(data));
            }
        });
        ByAd { collection: inner.as_collection() }
    }
}

impl<'scope, D: 'static> ByAd<'scope, D> {
    /// The records, to read where they are.
    pub fn into_collection(self) -> VecCollection<'scope, Time, D> {
        self.collection
    }

    /// Regions keep every record on its worker.
    pub fn enter_region<'inner>(self, child: timely::dataflow::Scope<'inner, Time>) -> ByAd<'inner, D> {
        ByAd { collection: self.collection.enter_region(child) }
    }

    pub fn leave_region<'outer>(self, outer: timely::dataflow::Scope<'outer, Time>) -> ByAd<'outer, D> {
        ByAd { collection: self.collection.leave_region(outer) }
    }
}
