//! Who is on the other end of a session: the agent's projected ServiceAccount token,
//! checked by a Kubernetes TokenReview with warmroll's audience.
//!
//! [`identity_from_review`] is the pure decision (authenticated? the agent
//! ServiceAccount? bound to which node?); [`TokenReviewAuthenticator`] does the I/O and
//! caches successful reviews briefly by token hash, so a fleet reconnecting at once costs
//! one review per token, not one per attempt; at most [`REVIEWS_IN_FLIGHT`] reviews run
//! at a time, so thousands of agents reconnecting together (after a coordinator restart)
//! reach the API server as a steady stream over a few kept-alive connections rather than
//! as thousands of new connections. Tokens never reach a log line.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{debug, instrument};

/// The `extra` key under which Kubernetes names the node a pod-bound token belongs to.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// An authenticated agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub username: String,
    /// The node the token is bound to, when the review names one.
    pub node: Option<String>,
}

/// Why a session was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No usable token (missing, unknown, expired, wrong audience): `unauthenticated`.
    #[error("token rejected: {0}")]
    Rejected(String),
    /// A valid token of someone other than the agent: `permission_denied`.
    #[error("{username} is not the agent ServiceAccount {expected}")]
    NotAgent { username: String, expected: String },
    /// The review itself failed (API unreachable): `unavailable`.
    #[error("TokenReview failed: {0}")]
    Review(String),
}

/// Authenticates a bearer token. The benchmark plugs in a trivial one.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, token: &str)
    -> impl Future<Output = Result<Identity, AuthError>> + Send;
}

/// The agent ServiceAccount's user name.
pub fn service_account_user(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

/// The decision on a TokenReview status: the token must be authenticated for
/// `audience` and belong to `agent_user`.
pub fn identity_from_review(
    status: Option<&TokenReviewStatus>,
    audience: &str,
    agent_user: &str,
) -> Result<Identity, AuthError> {
    let Some(status) = status else {
        return Err(AuthError::Review("the review has no status".into()));
    };
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().unwrap_or("not authenticated");
        return Err(AuthError::Rejected(why.to_owned()));
    }
    // An audience-aware reviewer returns the granted audiences; one that returns none
    // only checked the API server's own audience, which is not ours.
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Err(AuthError::Rejected(format!(
            "the token is not valid for the audience {audience:?}"
        )));
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.clone()).unwrap_or_default();
    if username != agent_user {
        return Err(AuthError::NotAgent {
            username,
            expected: agent_user.to_owned(),
        });
    }
    let node = user
        .and_then(|u| u.extra.as_ref())
        .and_then(|extra| extra.get(NODE_NAME_EXTRA))
        .and_then(|values| values.first())
        .filter(|n| !n.is_empty())
        .cloned();
    Ok(Identity { username, node })
}

type TokenHash = [u8; 32];

/// Reviews tokens with the Kubernetes API and caches the successes for `ttl`.
pub struct TokenReviewAuthenticator {
    api: Api<TokenReview>,
    audience: String,
    agent_user: String,
    ttl: Duration,
    cache: Mutex<HashMap<TokenHash, (Instant, Identity)>>,
    in_flight: Semaphore,
}

/// TokenReviews sent to the API server at a time; more sessions wait their turn.
pub const REVIEWS_IN_FLIGHT: usize = 16;

/// Above this many cached reviews, expired ones are swept on insert.
const CACHE_SWEEP_AT: usize = 16_384;

impl TokenReviewAuthenticator {
    pub fn new(client: kube::Client, audience: &str, agent_user: &str, ttl: Duration) -> Self {
        TokenReviewAuthenticator {
            api: Api::all(client),
            audience: audience.to_owned(),
            agent_user: agent_user.to_owned(),
            ttl,
            cache: Mutex::new(HashMap::new()),
            in_flight: Semaphore::new(REVIEWS_IN_FLIGHT),
        }
    }

    fn cached(&self, hash: &TokenHash) -> Option<Identity> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(hash)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, identity)| identity.clone())
    }

    fn remember(&self, hash: TokenHash, identity: &Identity) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_SWEEP_AT {
            let ttl = self.ttl;
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
        }
        cache.insert(hash, (Instant::now(), identity.clone()));
    }
}

impl Authenticator for TokenReviewAuthenticator {
    #[instrument(skip_all, fields(audience = %self.audience))]
    async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        let hash: TokenHash = Sha256::digest(token.as_bytes()).into();
        if let Some(identity) = self.cached(&hash) {
            return Ok(identity);
        }
        // The semaphore is never closed, so acquiring only waits.
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|e| AuthError::Review(e.to_string()))?;
        // Another session of the same token may have been reviewed meanwhile.
        if let Some(identity) = self.cached(&hash) {
            return Ok(identity);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(vec![self.audience.clone()]),
                token: token.to_owned(),
            },
            ..Default::default()
        };
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Review(e.to_string()))?;
        let identity =
            identity_from_review(answer.status.as_ref(), &self.audience, &self.agent_user)?;
        debug!(user = %identity.username, node = ?identity.node, "token reviewed");
        self.remember(hash, &identity);
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    const AGENT: &str = "system:serviceaccount:warmroll:warmroll-agent";

    fn status(username: &str, audiences: &[&str], node: Option<&str>) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(username.into()),
                extra: node
                    .map(|n| BTreeMap::from([(NODE_NAME_EXTRA.to_string(), vec![n.to_string()])])),
                ..Default::default()
            }),
            error: None,
        }
    }

    #[test]
    fn the_agent_service_account_with_our_audience_is_accepted_with_its_node() {
        let id = identity_from_review(
            Some(&status(AGENT, &["warmroll"], Some("node-a"))),
            "warmroll",
            AGENT,
        )
        .unwrap();
        assert_eq!(id.node.as_deref(), Some("node-a"));
        let id = identity_from_review(Some(&status(AGENT, &["warmroll"], None)), "warmroll", AGENT)
            .unwrap();
        assert_eq!(id.node, None);
    }

    #[test]
    fn other_accounts_audiences_and_failures_are_refused() {
        let other = "system:serviceaccount:default:default";
        assert_eq!(
            identity_from_review(Some(&status(other, &["warmroll"], None)), "warmroll", AGENT),
            Err(AuthError::NotAgent {
                username: other.into(),
                expected: AGENT.into()
            })
        );
        assert!(matches!(
            identity_from_review(
                Some(&status(AGENT, &["https://kubernetes.default.svc"], None)),
                "warmroll",
                AGENT
            ),
            Err(AuthError::Rejected(_))
        ));
        assert!(matches!(
            identity_from_review(Some(&status(AGENT, &[], None)), "warmroll", AGENT),
            Err(AuthError::Rejected(_))
        ));
        let failed = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("invalid bearer token".into()),
            ..Default::default()
        };
        assert_eq!(
            identity_from_review(Some(&failed), "warmroll", AGENT),
            Err(AuthError::Rejected("invalid bearer token".into()))
        );
        assert!(matches!(
            identity_from_review(None, "warmroll", AGENT),
            Err(AuthError::Review(_))
        ));
    }
}
