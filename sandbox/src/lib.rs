//! The warmroll sandbox. [`real`]: the demo on a real Kubernetes (the test bed's
//! official control plane and kubelets, warmroll installed with its chart). The rest:
//! the stand-in sandbox, a real CNCF registry behind a throttled link, a cluster of real
//! containerd nodes with kubelet and controller loops (the test bed's), one warmroll
//! agent per node and the coordinator, all in one process; `warmroll-sandbox demo
//! --stand-in` and the rollout benchmark are built on it.

pub mod agents;
pub mod coordinator;
pub mod print;
pub mod real;
pub mod sandbox;
pub mod workloads;

pub use sandbox::{Progress, Rollout, Sandbox, SandboxOptions, WarmMode};
pub use workloads::{Kind, Workload};
