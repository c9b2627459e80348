//! warmroll-coordinator library: registry resolution (and, later, drift, warm-up and
//! rollouts), plus the command line that drives it.

pub mod cli;
pub mod config;
pub mod drift;
pub mod engine;
pub mod fleet;
pub mod http;
pub mod leader;
pub mod placement;
pub mod registry;
pub mod report;
pub mod run;
pub mod workload;
