//! The clickagg dataflow: IO-free, unit-testable differential dataflow over click deliveries.
//!
//! The crate is split the way Materialize's compute layer is: [`plan`] is plain configuration,
//! [`render`] turns it into operators (one file per operator kind), and [`event_time`] holds the
//! per-partition rules that decide at which logical time a row enters. Sources and sinks (files,
//! stores, servers) live in the `clickagg` binary crate.

pub mod answer;
pub mod batches;
pub mod event_time;
pub mod hashing;
pub mod plan;
pub mod radix;
pub mod render;
pub mod types;

pub use answer::{Answer, ServingAnswer, SinkRecord, View};
pub use event_time::{Admission, EventTimeRules, PartitionClock};
pub use plan::{FraudRules, Plan};
pub use plan::IpNet;
pub use types::*;
