//! Who may read the HTTP port. `/metrics`, `/report`, `/fleet` and `/fleet/nodes/{node}`
//! list every node's pods, images and digests, so every path but the probes and the
//! registry webhook ([`OPEN_PATHS`]) needs a Kubernetes bearer token whose account may
//! `get` that path as a non-resource URL: the API server's own check, made as
//! controller-runtime's `WithAuthenticationAndAuthorization` and kube-rbac-proxy make
//! it. A TokenReview says who the token belongs to (the API server's audience, so a
//! Prometheus ServiceAccount token or a kubeconfig's token work as they are), a
//! SubjectAccessReview whether that user may `get` the path as requested (RBAC:
//! `nonResourceURLs: ["/metrics", "/report", "/fleet", "/fleet/*"]`).
//!
//! The decisions are pure ([`needs_token`], [`bearer_token`], [`user_of`],
//! [`access_review`], [`access_of`]); [`Gate`] asks Kubernetes through [`Reviews`] and
//! caches both answers, successes and refusals, for a short while in bounded caches
//! keyed by a hash of the token (never the token); concurrent requests with one token
//! wait for one review. A failed review is not cached: the request gets 503. Tokens
//! never reach a log line, an answer or a metric.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use clap::Args;
use k8s_openapi::api::authentication::v1::{
    TokenReview, TokenReviewSpec, TokenReviewStatus, UserInfo,
};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec, SubjectAccessReviewStatus,
};
use kube::api::{Api, PostParams};
use moka::future::Cache;
use sha2::{Digest as _, Sha256};

use crate::fleet::auth::{MAX_TOKEN_BYTES, TokenHash, token_hash};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use warmroll_proto::units::parse_duration;

/// Paths anyone may request: the kubelet's probes, and the registry webhook, which
/// checks its own shared secret.
pub const OPEN_PATHS: [&str; 3] = ["/healthz", "/readyz", "/webhooks/registry"];

/// Cached answers, per cache (users by token, decisions by token, verb and path).
pub const CACHE_ENTRIES: u64 = 4_096;

/// Reviews sent to the API server at a time.
const REVIEWS_IN_FLIGHT: usize = 8;

/// How long a request waits for a review slot, and a review for its answer, before
/// the request gets 503.
const REVIEW_WAIT: Duration = Duration::from_secs(10);

/// The `run` flags of the HTTP port's authentication.
#[derive(Debug, Clone, Args)]
pub struct HttpAuthArgs {
    /// Require a Kubernetes bearer token, checked by a TokenReview and authorized by a
    /// SubjectAccessReview (verb get on the path as a non-resource URL), on every HTTP
    /// path but /healthz, /readyz and /webhooks/registry. false leaves /metrics, /report
    /// and /fleet open to anyone who reaches the port.
    #[arg(
        long = "http-auth",
        env = "WARMROLL_HTTP_AUTH",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub enabled: bool,
    /// How long the answers of those reviews (allowed and refused alike) are cached, by
    /// a hash of the token.
    #[arg(
        long = "http-auth-cache-ttl",
        env = "WARMROLL_HTTP_AUTH_CACHE_TTL",
        default_value = "30s",
        value_parser = parse_duration
    )]
    pub cache_ttl: Duration,
}

/// Why a request was not let through. Nothing here holds the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// 401: no `Authorization` header.
    #[error(
        "this path needs a Kubernetes bearer token (Authorization: Bearer <token>) whose account may get it"
    )]
    NoToken,
    /// 401: an `Authorization` header that is not `Bearer <token>`.
    #[error("the Authorization header is not \"Bearer <token>\": {0}")]
    NotBearer(&'static str),
    /// 401: the TokenReview did not authenticate the token.
    #[error("the token is not valid (TokenReview): {0}")]
    Unauthenticated(String),
    /// 403: the SubjectAccessReview did not allow the user.
    #[error("{0}")]
    Forbidden(Forbidden),
    /// 503: a review could not be made; not cached.
    #[error("cannot check the token: {0}")]
    Unavailable(String),
}

/// A user the SubjectAccessReview did not allow, as the API server words it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forbidden {
    pub user: String,
    pub verb: String,
    pub path: String,
    /// The authorizer's reason or evaluation error; often empty.
    pub reason: String,
}

impl std::fmt::Display for Forbidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "user {:?} cannot {} path {:?} (RBAC: grant verb {:?} on nonResourceURL {:?}, e.g. by binding the chart's reader ClusterRole)",
            self.user, self.verb, self.path, self.verb, self.path
        )?;
        if !self.reason.is_empty() {
            write!(f, ": {}", self.reason)?;
        }
        Ok(())
    }
}

impl Refusal {
    /// Whether the answer may be cached: every decision, but not a failed review.
    fn cacheable(&self) -> bool {
        !matches!(self, Refusal::Unavailable(_))
    }

    fn status(&self) -> StatusCode {
        match self {
            Refusal::NoToken | Refusal::NotBearer(_) | Refusal::Unauthenticated(_) => {
                StatusCode::UNAUTHORIZED
            }
            Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
            Refusal::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, format!("{self}\n")).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"warmroll\""),
            );
        }
        response
    }
}

/// Whether a request for `path` must present a token: every path but [`OPEN_PATHS`],
/// so a route added later is closed until it is opened on purpose.
pub fn needs_token(path: &str) -> bool {
    !OPEN_PATHS.contains(&path)
}

/// The bearer token of a request's `Authorization` header.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, Refusal> {
    let value = headers.get(header::AUTHORIZATION).ok_or(Refusal::NoToken)?;
    let text = value
        .to_str()
        .map_err(|_| Refusal::NotBearer("it is not text"))?;
    let (scheme, token) = text
        .split_once(' ')
        .ok_or(Refusal::NotBearer("no scheme"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Refusal::NotBearer("another scheme than Bearer"));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(Refusal::NotBearer("an empty token"));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Refusal::NotBearer("a token longer than 16 KiB"));
    }
    Ok(token)
}

/// The user a TokenReview answer names, if it authenticated the token.
pub fn user_of(status: Option<&TokenReviewStatus>) -> Result<UserInfo, Refusal> {
    let Some(status) = status else {
        return Err(Refusal::Unavailable("the TokenReview has no status".into()));
    };
    if status.authenticated != Some(true) {
        let why = status
            .error
            .as_deref()
            .filter(|e| !e.is_empty())
            .unwrap_or("not authenticated");
        return Err(Refusal::Unauthenticated(why.to_owned()));
    }
    match &status.user {
        Some(user) if user.username.as_deref().is_some_and(|u| !u.is_empty()) => Ok(user.clone()),
        _ => Err(Refusal::Unauthenticated(
            "the TokenReview names no user".into(),
        )),
    }
}

/// The SubjectAccessReview asking whether `user` may `verb` the non-resource URL `path`.
pub fn access_review(user: &UserInfo, verb: &str, path: &str) -> SubjectAccessReviewSpec {
    SubjectAccessReviewSpec {
        user: user.username.clone(),
        uid: user.uid.clone(),
        groups: user.groups.clone(),
        extra: user.extra.clone(),
        non_resource_attributes: Some(NonResourceAttributes {
            path: Some(path.to_owned()),
            verb: Some(verb.to_owned()),
        }),
        resource_attributes: None,
    }
}

/// The decision of a SubjectAccessReview answer.
pub fn access_of(
    status: Option<&SubjectAccessReviewStatus>,
    user: &UserInfo,
    verb: &str,
    path: &str,
) -> Result<(), Refusal> {
    let Some(status) = status else {
        return Err(Refusal::Unavailable(
            "the SubjectAccessReview has no status".into(),
        ));
    };
    if status.allowed {
        return Ok(());
    }
    let reason = [status.reason.as_deref(), status.evaluation_error.as_deref()]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    Err(Refusal::Forbidden(Forbidden {
        user: user.username.clone().unwrap_or_default(),
        verb: verb.to_owned(),
        path: path.to_owned(),
        reason,
    }))
}

/// `text` with every occurrence of `token` replaced, for messages built from what an
/// API answered about a request that carried the token.
fn redact(text: &str, token: &str) -> String {
    if token.is_empty() {
        text.to_owned()
    } else {
        text.replace(token, "<token>")
    }
}

/// The cache key of one decision: the token, the verb and the path, hashed together.
fn decision_key(token: &str, verb: &str, path: &str) -> TokenHash {
    let mut hasher = Sha256::new();
    for part in [token, verb, path] {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hasher.finalize().into()
}

/// The two reviews, as the Kubernetes API answers them.
pub trait Reviews: Send + Sync + 'static {
    /// A TokenReview of `token` for the API server's own audience.
    fn token(
        &self,
        token: &str,
    ) -> impl Future<Output = Result<Option<TokenReviewStatus>, kube::Error>> + Send;
    /// A SubjectAccessReview.
    fn access(
        &self,
        spec: SubjectAccessReviewSpec,
    ) -> impl Future<Output = Result<Option<SubjectAccessReviewStatus>, kube::Error>> + Send;
}

/// [`Reviews`] through a Kubernetes client (RBAC: `create` on `tokenreviews` and
/// `subjectaccessreviews`).
pub struct KubeReviews {
    tokens: Api<TokenReview>,
    access: Api<SubjectAccessReview>,
}

impl KubeReviews {
    pub fn new(client: kube::Client) -> Self {
        KubeReviews {
            tokens: Api::all(client.clone()),
            access: Api::all(client),
        }
    }
}

impl Reviews for KubeReviews {
    async fn token(&self, token: &str) -> Result<Option<TokenReviewStatus>, kube::Error> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                audiences: None,
                token: token.to_owned(),
            },
            ..Default::default()
        };
        let answer = self.tokens.create(&PostParams::default(), &review).await?;
        Ok(answer.status)
    }

    async fn access(
        &self,
        spec: SubjectAccessReviewSpec,
    ) -> Result<Option<SubjectAccessReviewStatus>, kube::Error> {
        let review = SubjectAccessReview {
            spec,
            ..Default::default()
        };
        let answer = self.access.create(&PostParams::default(), &review).await?;
        Ok(answer.status)
    }
}

/// A cache of [`CACHE_ENTRIES`] answers kept for `ttl`.
fn cache<V: Clone + Send + Sync + 'static>(ttl: Duration) -> Cache<TokenHash, V> {
    Cache::builder()
        .max_capacity(CACHE_ENTRIES)
        .time_to_live(ttl)
        .build()
}

/// Checks requests' tokens, caching users and decisions for `ttl`.
pub struct Gate<R> {
    reviews: R,
    users: Cache<TokenHash, Result<Arc<UserInfo>, Refusal>>,
    decisions: Cache<TokenHash, Result<(), Refusal>>,
    in_flight: Semaphore,
}

impl<R: Reviews> Gate<R> {
    pub fn new(reviews: R, ttl: Duration) -> Self {
        Gate {
            reviews,
            users: cache(ttl),
            decisions: cache(ttl),
            in_flight: Semaphore::new(REVIEWS_IN_FLIGHT),
        }
    }

    /// Lets a request for `path` with `headers` through, or says why not.
    pub async fn check(&self, headers: &HeaderMap, verb: &str, path: &str) -> Result<(), Refusal> {
        if !needs_token(path) {
            return Ok(());
        }
        let token = bearer_token(headers)?;
        let user = self.user(token).await?;
        let key = decision_key(token, verb, path);
        let decided = self
            .decisions
            .try_get_with(key, async {
                let spec = access_review(&user, verb, path);
                let status = self
                    .call("SubjectAccessReview", token, self.reviews.access(spec))
                    .await?;
                let decision = access_of(status.as_ref(), &user, verb, path);
                match &decision {
                    Err(refusal) if !refusal.cacheable() => return Err(refusal.clone()),
                    Err(refusal) => info!(%refusal, "HTTP request refused"),
                    Ok(()) => debug!(user = ?user.username, verb, path, "HTTP request allowed"),
                }
                Ok(decision)
            })
            .await;
        decided.map_err(|e| Refusal::clone(&e))?
    }

    async fn user(&self, token: &str) -> Result<Arc<UserInfo>, Refusal> {
        let answer = self
            .users
            .try_get_with(token_hash(token), async {
                let status = self
                    .call("TokenReview", token, self.reviews.token(token))
                    .await?;
                match user_of(status.as_ref()) {
                    Err(refusal) if !refusal.cacheable() => Err(refusal),
                    Err(refusal) => {
                        debug!(%refusal, "HTTP request with a token the TokenReview refused");
                        Ok(Err(refusal))
                    }
                    Ok(user) => Ok(Ok(Arc::new(user))),
                }
            })
            .await;
        answer.map_err(|e| Refusal::clone(&e))?
    }

    /// Runs one review in a slot, within [`REVIEW_WAIT`]; a failure is `Unavailable`.
    async fn call<T>(
        &self,
        what: &str,
        token: &str,
        review: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, Refusal> {
        let unavailable = |why: String| {
            let refusal = Refusal::Unavailable(redact(&format!("the {what} {why}"), token));
            warn!(%refusal, "HTTP request not checked");
            refusal
        };
        let _permit = match tokio::time::timeout(REVIEW_WAIT, self.in_flight.acquire()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) | Err(_) => {
                return Err(unavailable(format!(
                    "waited {REVIEW_WAIT:?} for one of {REVIEWS_IN_FLIGHT} slots"
                )));
            }
        };
        match tokio::time::timeout(REVIEW_WAIT, review).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(unavailable(format!("failed: {e}"))),
            Err(_) => Err(unavailable(format!("got no answer within {REVIEW_WAIT:?}"))),
        }
    }
}

async fn require_token<R: Reviews>(
    State(gate): State<Arc<Gate<R>>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let verb = request.method().as_str().to_ascii_lowercase();
    match gate.check(request.headers(), &verb, &path).await {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    }
}

/// `router` with every route but [`OPEN_PATHS`] behind `gate` (paths no route matches
/// stay 404).
pub fn protect<R: Reviews>(router: Router, gate: Arc<Gate<R>>) -> Router {
    router.route_layer(axum::middleware::from_fn_with_state(
        gate,
        require_token::<R>,
    ))
}

/// The HTTP router as `run` serves it: behind a [`Gate`] asking `client`'s API server,
/// unless `args` turn the check off.
pub fn guard(router: Router, client: kube::Client, args: &HttpAuthArgs) -> Router {
    if args.enabled {
        protect(
            router,
            Arc::new(Gate::new(KubeReviews::new(client), args.cache_ttl)),
        )
    } else {
        warn!(
            "--http-auth=false: /metrics, /report and /fleet answer anyone who reaches the HTTP port"
        );
        router
    }
}

#[cfg(test)]
mod tests;
