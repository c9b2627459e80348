//! Why a resolution failed, in words the drift report can show.

use jiff::Timestamp;

/// A failed registry operation. Every variant names the registry (and the image when
/// there is one); none carries a secret. `Clone` because one result is shared by every
/// caller of a single-flight resolution.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The registry refused the credentials (or demanded some and none matched).
    #[error("authentication to registry {registry} failed for {image}: {reason}")]
    Auth {
        registry: String,
        image: String,
        reason: String,
    },
    /// The registry has no such repository or tag.
    #[error("{image} not found at registry {registry}")]
    NotFound { registry: String, image: String },
    /// The registry answered 429; it is not asked again before `until`.
    #[error("registry {registry} is rate-limiting requests; not asking again before {until}")]
    RateLimited { registry: String, until: Timestamp },
    /// The registry failed recently (5xx, timeouts, network) and is left alone until
    /// `until` (exponential backoff with jitter).
    #[error("registry {registry} is failing ({reason}); backing off until {until}")]
    BackingOff {
        registry: String,
        until: Timestamp,
        reason: String,
    },
    /// The registry answered with a server error.
    #[error("registry {registry} answered HTTP {status} for {image}")]
    Server {
        registry: String,
        image: String,
        status: u16,
    },
    /// The registry answered something that is not a usable manifest response.
    #[error("bad response from registry {registry} for {image}: {reason}")]
    BadResponse {
        registry: String,
        image: String,
        reason: String,
    },
    /// The registry could not be reached, or did not answer in time.
    #[error("network error reaching registry {registry} for {image}: {reason}")]
    Network {
        registry: String,
        image: String,
        reason: String,
    },
    /// A pull secret or Docker config file could not be read.
    #[error("invalid registry credentials in {origin}: {reason}")]
    Credentials { origin: String, reason: String },
    /// The HTTP client could not be set up (bad CA bundle, TLS setup).
    #[error("cannot set up the registry client: {reason}")]
    Client { reason: String },
}

impl RegistryError {
    /// A short, stable name for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            RegistryError::Auth { .. } => "auth",
            RegistryError::NotFound { .. } => "not_found",
            RegistryError::RateLimited { .. } => "rate_limited",
            RegistryError::BackingOff { .. } => "backing_off",
            RegistryError::Server { .. } => "server_error",
            RegistryError::BadResponse { .. } => "bad_response",
            RegistryError::Network { .. } => "network",
            RegistryError::Credentials { .. } => "credentials",
            RegistryError::Client { .. } => "client",
        }
    }

    /// Whether the failure says the registry itself is in trouble (5xx, timeouts,
    /// unreachable): these start the host's backoff and count against its health.
    pub(crate) fn is_registry_failure(&self) -> bool {
        matches!(
            self,
            RegistryError::Server { .. } | RegistryError::Network { .. }
        )
    }
}
