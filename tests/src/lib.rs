//! The warmroll test bed: real containerd and a real OCI registry started per test,
//! an in-process Kubernetes API stand-in, and the image builder that feeds them (also
//! with warmroll's own release binaries, for the real cluster tests).
//!
//! Everything a test starts is owned by a guard value; dropping it (also while a failed
//! test unwinds) stops the processes, unmounts and removes the temp dirs.

pub mod cluster;
pub mod containerd;
pub mod image;
pub mod kube;
pub mod kubeapi;
pub mod registry;
pub mod scratch;
pub mod tls;
pub mod warmroll_image;
