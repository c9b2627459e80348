//! warmroll-agent: the node side of warmroll. It reads the node's running containers and
//! images through the CRI socket ([`inventory`]), pulls images on order ([`warm`]) and
//! exposes health and metrics ([`http`], [`metrics`]). Where the runtime is containerd,
//! its own API ([`containerd`]) adds instant inventory changes and pull [`progress`].

pub mod cli;
pub mod containerd;
pub mod cri;
#[cfg(test)]
mod fake;
pub mod http;
pub mod inventory;
pub mod metrics;
pub mod node;
pub mod progress;
pub mod session;
pub mod warm;
