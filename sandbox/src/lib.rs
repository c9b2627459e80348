//! The warmroll sandbox: a real CNCF registry behind a throttled link, a cluster of real
//! containerd nodes with kubelet and controller loops (the test bed's), one warmroll
//! agent per node and the coordinator, all in one process. The `warmroll-sandbox demo`
//! command and the rollout benchmark are built on it.

pub mod agents;
pub mod coordinator;
pub mod sandbox;
pub mod workloads;

pub use sandbox::{Progress, Rollout, Sandbox, SandboxOptions, WarmMode};
pub use workloads::{Kind, Workload};
