//! Serving: the answers the sink has applied, kept in memory ([`state`]), and the HTTP API and
//! dashboard over them ([`http`]).

pub mod embedded;
pub mod http;
pub mod listener;
pub mod params;
pub mod peek;
pub mod state;
pub mod store_tier;
pub mod tiers;

pub use http::{serve, HttpServer};
pub use state::{ServingState, Settings};
