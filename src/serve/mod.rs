//! Serving: the answers the sink has applied, kept in memory ([`state`]), and the HTTP API and
//! dashboard over them ([`http`]).

pub mod auth;
pub mod guard;
pub mod http;
pub mod metrics;
pub mod params;
pub mod peek;
pub mod state;
pub mod transport;

pub use http::{serve, HttpServer};
pub use state::{ServingState, Settings};
