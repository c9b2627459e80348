//! The agent side of the coordinator: the `warmroll.v1.Fleet` gRPC server, agent
//! authentication, and the fleet view (every node's inventory, session and warm orders).
//!
//! - [`auth`]: TokenReview authentication of the agents' ServiceAccount tokens.
//! - [`view`]: the [`FleetView`]; the rollout logic sends warm orders through it.
//! - [`server`]: the tonic service and its TLS listener.

pub mod auth;
pub mod server;
pub mod view;

pub use auth::{Authenticator, Identity, TokenReviewAuthenticator};
pub use server::{FleetService, ServeError, SessionConfig, TlsFiles, serve};
pub use view::{
    FleetCounts, FleetEvent, FleetEventKind, FleetView, NodeInfo, ViewError, WarmRequest,
    WarmState, WarmTicket,
};
