//! Serving: the answers the sink has applied, kept in memory ([`state`]), and the HTTP API and
//! dashboard over them ([`http`]).

pub mod auth;
pub mod cold;
pub mod embedded;
pub mod guard;
pub mod http;
pub mod metrics;
pub mod params;
pub mod peek;
pub mod state;
pub mod store_tier;
pub mod tiers;
pub mod transport;

pub use http::{serve, HttpServer};
pub use state::{ServingState, Settings};

use clickagg_dataflows::{Answer, ServingAnswer, Time};

use crate::model::{Counters, SnapshotByWindow};

/// The sink publishes each frontier advance into the server's copy of the answers.
impl crate::sink::Publish for ServingState {
    fn publish(
        &self,
        frontier: Option<Time>,
        updates: &[(Time, Answer, isize)],
        serving: &[(ServingAnswer, isize)],
        snapshots: Vec<SnapshotByWindow>,
        counters: Option<Counters>,
    ) {
        ServingState::publish(self, frontier, updates, serving, snapshots, counters)
    }

    fn committed(&self, frontier: Option<Time>) {
        ServingState::committed(self, frontier)
    }
}
