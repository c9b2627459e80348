//! warmroll-coordinator library: registry resolution, drift, warm-up and rollouts, the
//! agents' fleet API, plus the command line that drives it.

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
pub mod steer;
pub mod supervise;
pub mod window;
pub mod workload;
