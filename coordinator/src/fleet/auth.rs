//! Who is on the other end of a session: the agent's projected ServiceAccount token,
//! checked by a Kubernetes TokenReview with warmroll's audience.
//!
//! [`identity_from_review`] is the pure decision (authenticated? the agent
//! ServiceAccount? bound to which node?); [`TokenReviewAuthenticator`] does the I/O and
//! caches reviews briefly by token hash, successes and refusals alike, so a fleet
//! reconnecting at once costs one review per token, not one per attempt, and a refused
//! token presented again costs none; at most [`REVIEWS_IN_FLIGHT`] reviews run at a
//! time, so thousands of agents reconnecting together (after a coordinator restart)
//! reach the API server as a steady stream over a few kept-alive connections rather than
//! as thousands of new connections. Tokens never reach a log line.
//!
//! Under a flood of bogus handshakes: [`precheck`] refuses, without a review, what
//! cannot be the agent's projected token (not a JWT, another audience or subject,
//! expired); at most [`PENDING_REVIEWS`] handshakes wait for a review, and at most
//! [`PENDING_PER_NODE`] of them per node the token claims, so tokens claiming many
//! nodes cannot crowd out the one real agent of each; past that a handshake is refused
//! with `unavailable` at once and the agent retries with backoff.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;
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
    /// Too many handshakes wait for a review: `unavailable`, retry later.
    #[error("{0}; retry later")]
    Busy(String),
}

impl AuthError {
    /// The `result` label of `warmroll_agent_handshakes_total`.
    fn label(&self) -> &'static str {
        match self {
            AuthError::Rejected(_) => "rejected",
            AuthError::NotAgent { .. } => "not_agent",
            AuthError::Review(_) => "review_failed",
            AuthError::Busy(_) => "busy",
        }
    }
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

/// A SHA-256 of a bearer token: what token caches are keyed by, never the token.
pub type TokenHash = [u8; 32];

pub fn token_hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// The claims of a Kubernetes projected ServiceAccount token that [`precheck`] reads.
#[derive(Debug, Default, serde::Deserialize)]
struct Claims {
    #[serde(default)]
    aud: Audiences,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<i64>,
    #[serde(default, rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(untagged)]
enum Audiences {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, serde::Deserialize)]
struct KubernetesClaims {
    #[serde(default)]
    node: Option<NamedClaim>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct NamedClaim {
    #[serde(default)]
    name: Option<String>,
}

/// The most bytes a bearer token may have (agents' and HTTP readers'): projected tokens
/// are about a kilobyte.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// What a token says about itself before anyone checked its signature: only good for
/// refusing what cannot be the agent's token, and for sharing out the review queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unverified {
    /// The node the token claims (`kubernetes.io.node.name`).
    pub node: Option<String>,
}

/// Refuses, without a TokenReview, a token that cannot be the agent's projected
/// ServiceAccount token at `now` (Unix seconds): not a JWT, not for `audience`, not
/// for `agent_user`, or expired. Its signature is left to the review.
pub fn precheck(
    token: &str,
    audience: &str,
    agent_user: &str,
    now: i64,
) -> Result<Unverified, AuthError> {
    let rejected = |why: &str| AuthError::Rejected(why.to_owned());
    if token.len() > MAX_TOKEN_BYTES {
        return Err(rejected(
            "the token is too long to be a projected ServiceAccount token",
        ));
    }
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(rejected(
            "the token is not a JWT (a projected ServiceAccount token)",
        ));
    };
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| rejected("the token's payload is not base64url"))?;
    let claims: Claims = serde_json::from_slice(&payload)
        .map_err(|_| rejected("the token's payload is not JSON claims"))?;
    let for_us = match &claims.aud {
        Audiences::None => false,
        Audiences::One(a) => a == audience,
        Audiences::Many(all) => all.iter().any(|a| a == audience),
    };
    if !for_us {
        return Err(AuthError::Rejected(format!(
            "the token is not valid for the audience {audience:?}"
        )));
    }
    if claims.sub.as_deref() != Some(agent_user) {
        return Err(AuthError::NotAgent {
            username: claims.sub.unwrap_or_default(),
            expected: agent_user.to_owned(),
        });
    }
    if claims.exp.is_some_and(|exp| exp <= now) {
        return Err(rejected("the token has expired"));
    }
    let node = claims
        .kubernetes
        .and_then(|k| k.node)
        .and_then(|n| n.name)
        .filter(|n| !n.is_empty());
    Ok(Unverified { node })
}

/// TokenReviews sent to the API server at a time; more sessions wait their turn.
pub const REVIEWS_IN_FLIGHT: usize = 16;
/// Handshakes that may wait for a review at once; more are refused at once.
pub const PENDING_REVIEWS: usize = 512;
/// Of those, how many may claim one node.
pub const PENDING_PER_NODE: usize = 2;
/// Cached reviews kept at most (successes and refusals alike).
const CACHE_ENTRIES: u64 = 65_536;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Reviews tokens with the Kubernetes API and caches the answers for `ttl`.
pub struct TokenReviewAuthenticator {
    api: Api<TokenReview>,
    audience: String,
    agent_user: String,
    cache: moka::sync::Cache<TokenHash, Result<Identity, AuthError>>,
    in_flight: Semaphore,
    pending: Mutex<Pending>,
    handshakes: Family<ResultLabel, Counter>,
    reviews: Counter,
}

/// The handshakes waiting for a review: in all, and per claimed node.
#[derive(Debug, Default)]
struct Pending {
    total: usize,
    per_node: HashMap<String, usize>,
}

impl Pending {
    /// Takes a place for a handshake claiming `node`, if there is one.
    fn enter(&mut self, node: &str) -> Result<(), AuthError> {
        if self.total >= PENDING_REVIEWS {
            return Err(AuthError::Busy(format!(
                "{PENDING_REVIEWS} agent handshakes already wait for a TokenReview"
            )));
        }
        let mine = self.per_node.entry(node.to_owned()).or_default();
        if *mine >= PENDING_PER_NODE {
            return Err(AuthError::Busy(format!(
                "{PENDING_PER_NODE} handshakes for this node already wait for a TokenReview"
            )));
        }
        *mine += 1;
        self.total += 1;
        Ok(())
    }

    fn leave(&mut self, node: &str) {
        self.total = self.total.saturating_sub(1);
        if let Some(mine) = self.per_node.get_mut(node) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                self.per_node.remove(node);
            }
        }
    }
}

/// A place in [`Pending`], given back on drop (also when the handshake is dropped).
struct PendingPlace<'a> {
    pending: &'a Mutex<Pending>,
    node: String,
}

impl Drop for PendingPlace<'_> {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .leave(&self.node);
    }
}

impl TokenReviewAuthenticator {
    pub fn new(client: kube::Client, audience: &str, agent_user: &str, ttl: Duration) -> Self {
        TokenReviewAuthenticator {
            api: Api::all(client),
            audience: audience.to_owned(),
            agent_user: agent_user.to_owned(),
            cache: moka::sync::Cache::builder()
                .max_capacity(CACHE_ENTRIES)
                .time_to_live(ttl)
                .build(),
            in_flight: Semaphore::new(REVIEWS_IN_FLIGHT),
            pending: Mutex::new(Pending::default()),
            handshakes: Family::default(),
            reviews: Counter::default(),
        }
    }

    /// Registers `warmroll_agent_handshakes_total{result}` and
    /// `warmroll_token_reviews_total`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "warmroll_agent_handshakes",
            "Agent session handshakes by result (accepted; rejected: not a valid agent token, refused at once or by a review; not_agent: another account's token; busy: too many handshakes waiting; review_failed: the TokenReview call failed)",
            self.handshakes.clone(),
        );
        registry.register(
            "warmroll_token_reviews",
            "TokenReviews sent to the API server for agent handshakes",
            self.reviews.clone(),
        );
    }

    fn count(&self, result: &Result<Identity, AuthError>) {
        let label = match result {
            Ok(_) => "accepted",
            Err(e) => e.label(),
        };
        self.handshakes
            .get_or_create(&ResultLabel { result: label })
            .inc();
    }

    async fn review(&self, token: &str, hash: TokenHash) -> Result<Identity, AuthError> {
        if let Some(known) = self.cache.get(&hash) {
            return known;
        }
        let now = jiff::Timestamp::now().as_second();
        let claimed = precheck(token, &self.audience, &self.agent_user, now)?;
        let _place = {
            let node = claimed.node.unwrap_or_default();
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.enter(&node)?;
            PendingPlace {
                pending: &self.pending,
                node,
            }
        };
        // The semaphore is never closed, so acquiring only waits.
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|e| AuthError::Review(e.to_string()))?;
        // Another session of the same token may have been reviewed meanwhile.
        if let Some(known) = self.cache.get(&hash) {
            return known;
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                audiences: Some(vec![self.audience.clone()]),
                token: token.to_owned(),
            },
            ..Default::default()
        };
        self.reviews.inc();
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Review(e.to_string()))?;
        let decided =
            identity_from_review(answer.status.as_ref(), &self.audience, &self.agent_user);
        if let Ok(identity) = &decided {
            debug!(user = %identity.username, node = ?identity.node, "token reviewed");
        }
        // An answer is remembered, a failure to get one is not.
        if !matches!(decided, Err(AuthError::Review(_))) {
            self.cache.insert(hash, decided.clone());
        }
        decided
    }
}

impl Authenticator for TokenReviewAuthenticator {
    #[instrument(skip_all, fields(audience = %self.audience))]
    async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        let hash = token_hash(token);
        let result = self.review(token, hash).await;
        self.count(&result);
        result
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

    fn jwt(claims: serde_json::Value) -> String {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256"}"#),
            b64(claims.to_string().as_bytes()),
            b64(b"signature")
        )
    }

    #[test]
    fn what_cannot_be_the_agents_token_is_refused_without_a_review() {
        let now = 1_000_000;
        let good = serde_json::json!({
            "aud": ["warmroll"], "sub": AGENT, "exp": now + 60,
            "kubernetes.io": {"node": {"name": "node-a"}},
        });
        assert_eq!(
            precheck(&jwt(good.clone()), "warmroll", AGENT, now),
            Ok(Unverified {
                node: Some("node-a".into())
            })
        );
        let mut one_audience = good.clone();
        one_audience["aud"] = "warmroll".into();
        assert!(precheck(&jwt(one_audience), "warmroll", AGENT, now).is_ok());
        for (bad, why) in [
            ("not-a-jwt".to_owned(), "not a JWT"),
            ("a.b.c.d".to_owned(), "not a JWT"),
            ("a.!!!.c".to_owned(), "base64url"),
            (format!("a.{}.c", "e30"), "audience"),
            ("x".repeat(MAX_TOKEN_BYTES + 1), "too long"),
        ] {
            let e = precheck(&bad, "warmroll", AGENT, now).unwrap_err();
            assert!(e.to_string().contains(why), "{bad:.20}: {e}");
        }
        let mut other = good.clone();
        other["aud"] = serde_json::json!(["https://kubernetes.default.svc"]);
        assert!(matches!(
            precheck(&jwt(other), "warmroll", AGENT, now),
            Err(AuthError::Rejected(_))
        ));
        let mut other = good.clone();
        other["sub"] = "system:serviceaccount:default:default".into();
        assert!(matches!(
            precheck(&jwt(other), "warmroll", AGENT, now),
            Err(AuthError::NotAgent { .. })
        ));
        let mut expired = good;
        expired["exp"] = (now - 1).into();
        assert!(
            precheck(&jwt(expired), "warmroll", AGENT, now)
                .unwrap_err()
                .to_string()
                .contains("expired")
        );
    }

    #[test]
    fn pending_reviews_are_bounded_in_all_and_per_claimed_node() {
        let mut pending = Pending::default();
        for _ in 0..PENDING_PER_NODE {
            pending.enter("node-a").unwrap();
        }
        assert!(matches!(pending.enter("node-a"), Err(AuthError::Busy(_))));
        pending.enter("node-b").unwrap();
        pending.leave("node-a");
        pending.enter("node-a").unwrap();
        let mut full = Pending::default();
        for i in 0..PENDING_REVIEWS {
            full.enter(&format!("node-{i}")).unwrap();
        }
        let e = full.enter("node-x").unwrap_err();
        assert!(e.to_string().contains("retry later"), "{e}");
        for i in 0..PENDING_REVIEWS {
            full.leave(&format!("node-{i}"));
        }
        assert_eq!(full.total, 0);
        assert!(full.per_node.is_empty(), "nothing kept for nodes that left");
    }
}
