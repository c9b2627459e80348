//! warmroll-coordinator library: registry resolution (and, later, drift, warm-up and
//! rollouts), plus the command line that drives it.

pub mod cli;
pub mod fleet;
pub mod registry;
