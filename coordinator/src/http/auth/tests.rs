use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::*;

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.prometheus.sig";

fn headers(authorization: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(value) = authorization {
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
    }
    headers
}

fn user(name: &str) -> UserInfo {
    UserInfo {
        username: Some(name.into()),
        uid: Some("uid-1".into()),
        groups: Some(vec![
            "system:serviceaccounts".into(),
            "system:authenticated".into(),
        ]),
        extra: Some(BTreeMap::from([(
            "authentication.kubernetes.io/pod-name".into(),
            vec!["prometheus-0".into()],
        )])),
    }
}

fn authenticated(name: &str) -> TokenReviewStatus {
    TokenReviewStatus {
        authenticated: Some(true),
        user: Some(user(name)),
        audiences: Some(vec!["https://kubernetes.default.svc".into()]),
        error: None,
    }
}

#[test]
fn only_the_probes_and_the_webhook_are_open() {
    for open in ["/healthz", "/readyz", "/webhooks/registry"] {
        assert!(!needs_token(open), "{open}");
    }
    for closed in [
        "/metrics",
        "/report",
        "/fleet",
        "/fleet/nodes/node-a",
        "/healthz/",
        "/readyz/x",
        "/anything-added-later",
    ] {
        assert!(needs_token(closed), "{closed}");
    }
}

#[test]
fn the_bearer_token_is_read_from_the_authorization_header() {
    assert_eq!(
        bearer_token(&headers(Some(&format!("Bearer {TOKEN}")))),
        Ok(TOKEN)
    );
    assert_eq!(
        bearer_token(&headers(Some(&format!("bearer  {TOKEN} ")))),
        Ok(TOKEN)
    );
    assert_eq!(bearer_token(&headers(None)), Err(Refusal::NoToken));
    for bad in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", TOKEN] {
        assert!(
            matches!(
                bearer_token(&headers(Some(bad))),
                Err(Refusal::NotBearer(_))
            ),
            "{bad}"
        );
    }
    let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
    assert!(matches!(
        bearer_token(&headers(Some(&long))),
        Err(Refusal::NotBearer(_))
    ));
}

#[test]
fn a_token_review_names_the_user_or_says_why_not() {
    let prometheus = "system:serviceaccount:monitoring:prometheus";
    assert_eq!(
        user_of(Some(&authenticated(prometheus))).unwrap(),
        user(prometheus)
    );
    let refused = TokenReviewStatus {
        authenticated: Some(false),
        error: Some("token has expired".into()),
        ..Default::default()
    };
    assert_eq!(
        user_of(Some(&refused)),
        Err(Refusal::Unauthenticated("token has expired".into()))
    );
    assert_eq!(
        user_of(Some(&TokenReviewStatus::default())),
        Err(Refusal::Unauthenticated("not authenticated".into()))
    );
    let nameless = TokenReviewStatus {
        authenticated: Some(true),
        user: Some(UserInfo::default()),
        ..Default::default()
    };
    assert!(matches!(
        user_of(Some(&nameless)),
        Err(Refusal::Unauthenticated(_))
    ));
    // A review without status is the API's failure, not the token's.
    assert!(matches!(user_of(None), Err(Refusal::Unavailable(_))));
}

#[test]
fn the_access_review_asks_for_the_path_as_a_non_resource_url_with_the_whole_user() {
    let who = user("alice");
    let spec = access_review(&who, "get", "/fleet/nodes/node-a");
    assert_eq!(spec.user.as_deref(), Some("alice"));
    assert_eq!(spec.uid.as_deref(), Some("uid-1"));
    assert_eq!(spec.groups, who.groups);
    assert_eq!(spec.extra, who.extra);
    assert!(spec.resource_attributes.is_none());
    let attributes = spec.non_resource_attributes.unwrap();
    assert_eq!(attributes.path.as_deref(), Some("/fleet/nodes/node-a"));
    assert_eq!(attributes.verb.as_deref(), Some("get"));
}

#[test]
fn an_access_review_allows_or_refuses_naming_user_verb_and_path() {
    let who = user("alice");
    let allowed = SubjectAccessReviewStatus {
        allowed: true,
        ..Default::default()
    };
    assert_eq!(access_of(Some(&allowed), &who, "get", "/report"), Ok(()));
    let denied = SubjectAccessReviewStatus {
        allowed: false,
        reason: Some("no RBAC policy matched".into()),
        evaluation_error: Some("webhook timed out".into()),
        ..Default::default()
    };
    let refusal = access_of(Some(&denied), &who, "get", "/report").unwrap_err();
    let Refusal::Forbidden(forbidden) = &refusal else {
        panic!("{refusal:?}")
    };
    assert_eq!(forbidden.user, "alice");
    assert_eq!(
        forbidden.reason,
        "no RBAC policy matched; webhook timed out"
    );
    let text = refusal.to_string();
    assert!(
        text.starts_with("user \"alice\" cannot get path \"/report\""),
        "{text}"
    );
    assert_eq!(refusal.status(), StatusCode::FORBIDDEN);
    assert!(matches!(
        access_of(None, &who, "get", "/report"),
        Err(Refusal::Unavailable(_))
    ));
}

#[test]
fn refusals_answer_401_with_a_challenge_403_or_503_and_only_decisions_are_cached() {
    let unauthorized = Refusal::NoToken.into_response();
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        unauthorized.headers()[header::WWW_AUTHENTICATE],
        "Bearer realm=\"warmroll\""
    );
    assert_eq!(
        Refusal::Unauthenticated("expired".into()).status(),
        StatusCode::UNAUTHORIZED
    );
    let unavailable = Refusal::Unavailable("x".into());
    assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!unavailable.cacheable());
    assert!(Refusal::Unauthenticated("expired".into()).cacheable());
}

#[test]
fn tokens_are_redacted_and_decision_keys_differ_by_token_verb_and_path() {
    assert_eq!(
        redact(&format!("invalid token {TOKEN} (x)"), TOKEN),
        "invalid token <token> (x)"
    );
    assert_eq!(redact("x", ""), "x");
    let key = decision_key(TOKEN, "get", "/report");
    assert_eq!(key, decision_key(TOKEN, "get", "/report"));
    assert_ne!(key, decision_key(TOKEN, "get", "/fleet"));
    assert_ne!(key, decision_key(TOKEN, "head", "/report"));
    assert_ne!(key, decision_key("other", "get", "/report"));
    // The separator keeps "ab"+"c" apart from "a"+"bc".
    assert_ne!(decision_key("t", "ab", "/c"), decision_key("t", "a", "b/c"));
}

/// Reviews answered from a table, counting the calls; `fail` makes every call an API
/// error whose message quotes the token.
#[derive(Default)]
struct FakeReviews {
    users: Mutex<BTreeMap<String, String>>,
    allowed: Mutex<Vec<(String, String)>>,
    fail: AtomicBool,
    token_reviews: AtomicUsize,
    access_reviews: AtomicUsize,
}

impl FakeReviews {
    fn with(token: &str, user: &str, allowed_paths: &[&str]) -> Self {
        let fake = FakeReviews::default();
        fake.users.lock().unwrap().insert(token.into(), user.into());
        fake.allowed.lock().unwrap().extend(
            allowed_paths
                .iter()
                .map(|p| (user.to_owned(), (*p).to_owned())),
        );
        fake
    }
}

impl Reviews for Arc<FakeReviews> {
    async fn token(&self, token: &str) -> Result<Option<TokenReviewStatus>, kube::Error> {
        self.token_reviews.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        if self.fail.load(Ordering::SeqCst) {
            return Err(kube::Error::Api(
                kube::core::Status::failure(&format!("etcd is down ({token})"), "InternalError")
                    .with_code(500)
                    .boxed(),
            ));
        }
        Ok(Some(match self.users.lock().unwrap().get(token) {
            Some(name) => authenticated(name),
            None => TokenReviewStatus {
                error: Some("invalid bearer token".into()),
                ..Default::default()
            },
        }))
    }

    async fn access(
        &self,
        spec: SubjectAccessReviewSpec,
    ) -> Result<Option<SubjectAccessReviewStatus>, kube::Error> {
        self.access_reviews.fetch_add(1, Ordering::SeqCst);
        let path = spec
            .non_resource_attributes
            .and_then(|a| a.path)
            .unwrap_or_default();
        let user = spec.user.unwrap_or_default();
        let allowed = self.allowed.lock().unwrap().contains(&(user, path));
        Ok(Some(SubjectAccessReviewStatus {
            allowed,
            ..Default::default()
        }))
    }
}

fn counts(fake: &FakeReviews) -> (usize, usize) {
    (
        fake.token_reviews.load(Ordering::SeqCst),
        fake.access_reviews.load(Ordering::SeqCst),
    )
}

#[tokio::test]
async fn answers_are_cached_by_token_and_path_and_concurrent_requests_share_one_review() {
    let fake = Arc::new(FakeReviews::with(TOKEN, "prometheus", &["/metrics"]));
    let gate = Gate::new(fake.clone(), Duration::from_secs(60));
    let with_token = headers(Some(&format!("Bearer {TOKEN}")));

    let checks = (0..8).map(|_| gate.check(&with_token, "get", "/metrics"));
    for result in futures::future::join_all(checks).await {
        assert_eq!(result, Ok(()));
    }
    assert_eq!(counts(&fake), (1, 1), "eight requests, one review each");
    assert_eq!(gate.check(&with_token, "get", "/metrics").await, Ok(()));
    assert_eq!(counts(&fake), (1, 1), "cached");

    // Another path: the user is known, the decision is asked for (and refused, cached).
    let refused = gate.check(&with_token, "get", "/report").await.unwrap_err();
    assert!(matches!(refused, Refusal::Forbidden(_)), "{refused:?}");
    assert_eq!(
        gate.check(&with_token, "get", "/report").await,
        Err(refused)
    );
    assert_eq!(counts(&fake), (1, 2));

    // An unknown token: refused, and the refusal is cached too.
    let stranger = headers(Some("Bearer not-a-token"));
    let refused = gate.check(&stranger, "get", "/metrics").await.unwrap_err();
    assert_eq!(
        refused,
        Refusal::Unauthenticated("invalid bearer token".into())
    );
    assert_eq!(gate.check(&stranger, "get", "/metrics").await, Err(refused));
    assert_eq!(counts(&fake), (2, 2));

    // No token, or an open path: no review at all.
    assert_eq!(
        gate.check(&headers(None), "get", "/metrics").await,
        Err(Refusal::NoToken)
    );
    assert_eq!(gate.check(&headers(None), "get", "/healthz").await, Ok(()));
    assert_eq!(counts(&fake), (2, 2));
}

#[tokio::test]
async fn a_failed_review_is_503_without_the_token_and_is_not_cached() {
    let fake = Arc::new(FakeReviews::with(TOKEN, "prometheus", &["/metrics"]));
    fake.fail.store(true, Ordering::SeqCst);
    let gate = Gate::new(fake.clone(), Duration::from_secs(60));
    let with_token = headers(Some(&format!("Bearer {TOKEN}")));
    let refusal = gate
        .check(&with_token, "get", "/metrics")
        .await
        .unwrap_err();
    assert_eq!(refusal.status(), StatusCode::SERVICE_UNAVAILABLE);
    let text = refusal.to_string();
    assert!(text.contains("the TokenReview failed"), "{text}");
    assert!(text.contains("etcd is down (<token>)"), "{text}");
    assert!(!text.contains(TOKEN), "{text}");

    fake.fail.store(false, Ordering::SeqCst);
    assert_eq!(gate.check(&with_token, "get", "/metrics").await, Ok(()));
    assert_eq!(counts(&fake), (2, 1), "the failure was asked again");
}

#[tokio::test]
async fn answers_expire_after_the_ttl() {
    let fake = Arc::new(FakeReviews::with(TOKEN, "prometheus", &["/metrics"]));
    let gate = Gate::new(fake.clone(), Duration::from_millis(200));
    let with_token = headers(Some(&format!("Bearer {TOKEN}")));
    assert_eq!(gate.check(&with_token, "get", "/metrics").await, Ok(()));
    assert_eq!(gate.check(&with_token, "get", "/metrics").await, Ok(()));
    assert_eq!(counts(&fake), (1, 1));
    // RBAC changed meanwhile: seen once the answers expire.
    fake.allowed.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(matches!(
        gate.check(&with_token, "get", "/metrics").await,
        Err(Refusal::Forbidden(_))
    ));
    assert_eq!(counts(&fake), (2, 2));
}

#[test]
fn http_auth_is_on_by_default_and_turned_off_by_flag_or_env_words() {
    use clap::Parser as _;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        auth: HttpAuthArgs,
    }
    let cli = Cli::try_parse_from(["x"]).unwrap();
    assert!(cli.auth.enabled);
    assert_eq!(cli.auth.cache_ttl, Duration::from_secs(30));
    for off in ["--http-auth=false", "--http-auth=no", "--http-auth=0"] {
        assert!(
            !Cli::try_parse_from(["x", off]).unwrap().auth.enabled,
            "{off}"
        );
    }
    let cli = Cli::try_parse_from(["x", "--http-auth-cache-ttl", "5s"]).unwrap();
    assert_eq!(cli.auth.cache_ttl, Duration::from_secs(5));
    assert!(Cli::try_parse_from(["x", "--http-auth=maybe"]).is_err());
}
