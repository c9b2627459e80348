//! The agent side of the coordinator: the `warmroll.v1.Fleet` gRPC server, agent
//! authentication, and the fleet view (every node's inventory, session and warm orders).
//!
//! - [`auth`]: TokenReview authentication of the agents' ServiceAccount tokens.
//! - [`view`]: the [`FleetView`]; the rollout logic sends warm orders through it.
//! - [`server`]: the tonic service and its TLS listener.
//! - [`conn`]: the listener's connections (a cap, and a switch that closes one).
//! - [`limits`]: bounds on what one agent session may send.
//! - [`receive`]: what one session's messages do to the view.

pub mod auth;
pub mod conn;
pub mod limits;
mod receive;
pub mod server;
pub mod view;

pub use auth::{Authenticator, Identity, TokenReviewAuthenticator};
pub use limits::SessionLimits;
pub use server::{FleetService, ServeError, SessionConfig, TlsFiles, serve};
pub use view::{
    FleetCounts, FleetEvent, FleetEventKind, FleetView, NodeInfo, SessionEnd, ViewError,
    WarmRequest, WarmState, WarmTicket,
};
