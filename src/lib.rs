//! clickagg: exact ad-click aggregation over partitioned logs, on timely and differential
//! dataflow. The dataflow itself is the IO-free `clickagg_dataflows` crate; this crate holds
//! what touches the world: sources, the sink, the generator and the command line.

pub mod cluster;
pub mod cluster_local;
pub mod config;
pub mod demo;
pub mod error;
pub mod feed;
#[doc(hidden)]
pub mod fuzzing;
pub mod generate;
pub mod introspect;
pub mod model;
pub mod output;
pub mod reconcile;
pub mod run;
pub mod serve;
pub mod shell;
pub mod sink;
pub mod source;
pub mod storage;
