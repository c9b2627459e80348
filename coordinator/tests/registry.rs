//! Registry resolution against the real CNCF registry from the test bed, counting the
//! requests it receives; and registries and token servers whose answers are hostile,
//! through the test bed's fault-injecting proxy, against the engine's own resolver.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use warmroll_coordinator::config::Config;
use warmroll_coordinator::engine::resolver_for;
use warmroll_coordinator::registry::{
    Keyring, RegistryError, Resolution, Resolved, Resolver, ResolverConfig, digest_matches,
};
use warmroll_proto::image::{Digest, ImageRef};
use warmroll_tests::image::{ImageBuilder, Pushed};
use warmroll_tests::registry::{Fault, FaultRule, Registry, RegistryOptions, TokenServerAnswer};

mod support;

use support::LogCapture;

fn config_for(registries: &[&Registry]) -> ResolverConfig {
    let mut config = ResolverConfig::default();
    for r in registries {
        match r.ca_pem() {
            Some(ca) => config.ca_bundles_pem.push(ca.into_bytes()),
            None => config.insecure_registries.push(r.host().to_owned()),
        }
    }
    config.connect_timeout = Duration::from_secs(2);
    config.request_timeout = Duration::from_secs(5);
    config
}

fn pull_secret(registry: &Registry, user: &str, password: &str) -> Secret {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let json = serde_json::json!({ "auths": { registry.host(): { "auth": auth } } });
    Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("pull".into()),
            namespace: Some("default".into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(BTreeMap::from([(
            ".dockerconfigjson".to_owned(),
            ByteString(serde_json::to_vec(&json).unwrap()),
        )])),
        ..Default::default()
    }
}

fn tag(resolution: Resolution) -> Resolved {
    match resolution {
        Resolution::Tag(resolved) => resolved,
        Resolution::Pinned { image, .. } => panic!("{image} resolved as pinned"),
    }
}

/// Pushes a fresh build of `app:latest`.
async fn push_app(registry: &Registry) -> Pushed {
    ImageBuilder::new(registry)
        .unwrap()
        .push("app", "latest")
        .await
        .unwrap()
}

fn digest(s: &str) -> Digest {
    Digest::parse(s).unwrap()
}

#[tokio::test]
async fn one_head_for_a_hundred_workloads_in_one_cycle() {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let pushed = push_app(&registry).await;
    let resolver = Resolver::new(config_for(&[&registry]), Keyring::new()).unwrap();
    let image = ImageRef::parse(&pushed.reference).unwrap();
    registry.reset_requests();

    let none = Keyring::new();
    let results =
        futures::future::join_all((0..100).map(|_| resolver.resolve(&image, &none))).await;
    for r in results {
        assert_eq!(tag(r.unwrap()).digest, digest(&pushed.manifest_digest));
    }
    assert_eq!(registry.count("HEAD", "/v2/app/manifests/latest"), 1);
    assert_eq!(registry.count("GET", "/v2/app/manifests/latest"), 0);
}

#[tokio::test]
async fn unchanged_multi_arch_tag_over_ten_cycles_is_ten_heads_and_one_index_get() {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let images = ImageBuilder::new(&registry).unwrap();
    let index = images.push_index("multi", "latest").await.unwrap();
    let mut config = config_for(&[&registry]);
    config.min_interval = Duration::from_millis(50);
    let resolver = Resolver::new(config, Keyring::new()).unwrap();
    let image = ImageRef::parse(&index.reference).unwrap();
    registry.reset_requests();

    let mut last = None;
    for _ in 0..10 {
        last = Some(tag(resolver
            .resolve(&image, &Keyring::new())
            .await
            .unwrap()));
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    let resolved = last.unwrap();
    assert_eq!(resolved.digest, digest(&index.index_digest));
    assert_eq!(registry.count("HEAD", "/v2/multi/manifests/latest"), 10);
    let index_gets = registry.count(
        "GET",
        &format!("/v2/multi/manifests/{}", index.index_digest),
    );
    assert_eq!(index_gets, 1, "requests: {:?}", registry.requests());

    // A container running the amd64 child is in sync with the index ...
    let amd64 = digest(&index.children["linux/amd64"].manifest_digest);
    assert!(digest_matches(&amd64, &resolved));
    assert_eq!(resolved.children.len(), 2);
    // ... and drifts once a new build is pushed under the tag.
    images.push_index("multi", "latest").await.unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    let moved = tag(resolver.resolve(&image, &Keyring::new()).await.unwrap());
    assert_ne!(moved.digest, resolved.digest);
    assert!(!digest_matches(&amd64, &moved));
}

async fn resolves_with_pull_secret(options: RegistryOptions) {
    // Everything logged at any level, by warmroll or its HTTP stack, is kept.
    let logs = LogCapture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let registry = Registry::start(options).await.unwrap();
    let (user, password) = registry.credentials().unwrap();
    let (user, password) = (user.to_owned(), password.to_owned());
    let pushed = ImageBuilder::new(&registry)
        .unwrap()
        .push("private/app", "main")
        .await
        .unwrap();
    let resolver = Resolver::new(config_for(&[&registry]), Keyring::new()).unwrap();
    let image = ImageRef::parse(&pushed.reference).unwrap();

    let mut good = Keyring::new();
    good.add_pull_secret(&pull_secret(&registry, &user, &password))
        .unwrap();
    let resolved = tag(resolver.resolve(&image, &good).await.unwrap());
    assert_eq!(resolved.digest, digest(&pushed.manifest_digest));

    let wrong_password = "not-the-password-4711";
    let mut bad = Keyring::new();
    bad.add_pull_secret(&pull_secret(&registry, &user, wrong_password))
        .unwrap();
    let err = resolver.resolve(&image, &bad).await.unwrap_err();
    assert!(matches!(err, RegistryError::Auth { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains(registry.host()), "{message}");
    assert!(!message.contains(wrong_password), "{message}");
    assert!(!format!("{err:?}").contains(wrong_password));

    let logged = logs.text();
    assert!(!logged.is_empty(), "no log line was captured");
    for secret in [password.as_str(), wrong_password] {
        assert!(!logged.contains(secret), "a password reached the logs");
    }
}

#[tokio::test]
async fn basic_auth_registry_resolves_with_an_image_pull_secret() {
    resolves_with_pull_secret(RegistryOptions::plain().basic("ci", "s3cret-basic")).await;
}

#[tokio::test]
async fn token_auth_over_tls_resolves_with_an_image_pull_secret() {
    resolves_with_pull_secret(RegistryOptions::plain().tls().token("ci", "s3cret-token")).await;
}

#[tokio::test]
async fn tls_registry_needs_its_ca() {
    let registry = Registry::start(RegistryOptions::plain().tls())
        .await
        .unwrap();
    let pushed = push_app(&registry).await;
    let image = ImageRef::parse(&pushed.reference).unwrap();
    let trusted = Resolver::new(config_for(&[&registry]), Keyring::new()).unwrap();
    let resolved = tag(trusted.resolve(&image, &Keyring::new()).await.unwrap());
    assert_eq!(resolved.digest, digest(&pushed.manifest_digest));

    let untrusted = Resolver::new(ResolverConfig::default(), Keyring::new()).unwrap();
    let err = untrusted
        .resolve(&image, &Keyring::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains(registry.host()), "{err}");
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let pushed = push_app(&registry).await;
    let mut config = config_for(&[&registry]);
    config.min_interval = Duration::ZERO;
    let resolver = Resolver::new(config, Keyring::new()).unwrap();
    let image = ImageRef::parse(&pushed.reference).unwrap();
    registry.inject(
        FaultRule::new(Fault::TooManyRequests {
            retry_after_secs: 2,
        })
        .method("HEAD")
        .path("/v2/app/manifests/latest")
        .times(1),
    );
    registry.reset_requests();

    let err = resolver.resolve(&image, &Keyring::new()).await.unwrap_err();
    assert!(matches!(err, RegistryError::RateLimited { .. }), "{err}");
    // Asked again at once: refused locally, the registry sees nothing.
    for _ in 0..5 {
        let again = resolver.resolve(&image, &Keyring::new()).await.unwrap_err();
        assert!(
            matches!(again, RegistryError::RateLimited { .. }),
            "{again}"
        );
    }
    assert_eq!(registry.count("HEAD", "/v2/app/manifests/latest"), 1);

    tokio::time::sleep(Duration::from_millis(2100)).await;
    let resolved = tag(resolver.resolve(&image, &Keyring::new()).await.unwrap());
    assert_eq!(resolved.digest, digest(&pushed.manifest_digest));
    assert_eq!(registry.count("HEAD", "/v2/app/manifests/latest"), 2);
}

#[tokio::test]
async fn a_registry_that_is_down_does_not_delay_the_others() {
    let up = Registry::start(RegistryOptions::plain()).await.unwrap();
    let down = Registry::start(RegistryOptions::plain()).await.unwrap();
    let good = push_app(&up).await;
    let lost = push_app(&down).await;
    down.set_down(true);
    let resolver = Resolver::new(config_for(&[&up, &down]), Keyring::new()).unwrap();
    let good_ref = ImageRef::parse(&good.reference).unwrap();
    let lost_ref = ImageRef::parse(&lost.reference).unwrap();
    let none = Keyring::new();

    let started = Instant::now();
    let (ok, failed) = tokio::join!(
        async {
            let r = resolver.resolve(&good_ref, &none).await;
            (r, started.elapsed())
        },
        resolver.resolve(&lost_ref, &none)
    );
    let (ok, ok_after) = ok;
    assert_eq!(tag(ok.unwrap()).digest, digest(&good.manifest_digest));
    let err = failed.unwrap_err();
    assert!(err.to_string().contains(down.host()), "{err}");
    // The healthy registry answered without waiting for the broken one's timeout.
    assert!(ok_after < Duration::from_secs(2), "took {ok_after:?}");
}

#[tokio::test]
async fn malformed_references_and_pinned_images_make_no_request() {
    assert!(ImageRef::parse("UPPER/Case:tag").is_err());
    assert!(ImageRef::parse("app:bad tag").is_err());
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let pushed = push_app(&registry).await;
    let resolver = Resolver::new(config_for(&[&registry]), Keyring::new()).unwrap();
    registry.reset_requests();
    let pinned = ImageRef::parse(&pushed.pinned()).unwrap();
    match resolver.resolve(&pinned, &Keyring::new()).await.unwrap() {
        Resolution::Pinned { digest: d, .. } => assert_eq!(d, digest(&pushed.manifest_digest)),
        Resolution::Tag(_) => panic!("pinned reference resolved as a tag"),
    }
    assert!(registry.requests().is_empty());

    let missing = ImageRef::parse(&format!("{}/nothing:here", registry.host())).unwrap();
    let err = resolver
        .resolve(&missing, &Keyring::new())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
}

/// The engine's own resolver (`resolver_for`), for the lines of a configuration's
/// `registry:` section.
fn engine_resolver(registry_lines: &str) -> Resolver {
    let config = Config::parse(&format!("registry:\n{registry_lines}"), "test config").unwrap();
    resolver_for(&config).unwrap().0
}

fn insecure(registries: &[&Registry]) -> String {
    let hosts: Vec<String> = registries
        .iter()
        .map(|r| format!("\"{}\"", r.host()))
        .collect();
    format!("  insecureRegistries: [{}]\n", hosts.join(", "))
}

/// Whole seconds from now until `until`.
fn seconds_until(until: jiff::Timestamp) -> i64 {
    until.as_second() - jiff::Timestamp::now().as_second()
}

/// The engine's resolver asks again only after it forgets a resolution (500 ms).
const ENGINE_MIN_INTERVAL: Duration = Duration::from_millis(600);

#[tokio::test]
async fn a_retry_after_past_the_cap_blocks_that_registry_for_ten_minutes_and_no_other() {
    let logs = LogCapture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(logs.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let good = Registry::start(RegistryOptions::plain()).await.unwrap();
    let seconds = Registry::start(RegistryOptions::plain()).await.unwrap();
    let dated = Registry::start(RegistryOptions::plain()).await.unwrap();
    let on_good = push_app(&good).await;
    let on_seconds = push_app(&seconds).await;
    let on_dated = push_app(&dated).await;
    // 2^64 - 1 seconds, and the last second of the year 9999: both overflowed an
    // Instant and panicked the engine before they were capped.
    seconds.inject(
        FaultRule::new(Fault::TooManyRequests {
            retry_after_secs: u64::MAX,
        })
        .method("HEAD"),
    );
    dated.inject(
        FaultRule::new(Fault::TooManyRequestsWith {
            retry_after: "Fri, 31 Dec 9999 23:59:59 GMT".to_owned(),
        })
        .method("HEAD"),
    );
    let resolver = engine_resolver(&insecure(&[&good, &seconds, &dated]));
    let none = Keyring::new();
    let [good_ref, seconds_ref, dated_ref] =
        [&on_good, &on_seconds, &on_dated].map(|p| ImageRef::parse(&p.reference).unwrap());

    let (ok, limited, limited_by_date) = tokio::join!(
        resolver.resolve(&good_ref, &none),
        resolver.resolve(&seconds_ref, &none),
        resolver.resolve(&dated_ref, &none)
    );
    assert_eq!(tag(ok.unwrap()).digest, digest(&on_good.manifest_digest));
    for (registry, result) in [(&seconds, limited), (&dated, limited_by_date)] {
        let err = result.unwrap_err();
        let RegistryError::RateLimited {
            registry: host,
            until,
        } = &err
        else {
            panic!("not rate-limited: {err}");
        };
        assert_eq!(host, registry.host());
        let wait = seconds_until(*until);
        assert!((590..=600).contains(&wait), "{err}: asks again in {wait} s");
        assert!(err.to_string().contains(registry.host()), "{err}");
    }

    // Asked again: refused without a request until then; the good registry answers.
    tokio::time::sleep(ENGINE_MIN_INTERVAL).await;
    let again = resolver.resolve(&seconds_ref, &none).await.unwrap_err();
    assert!(
        matches!(again, RegistryError::RateLimited { .. }),
        "{again}"
    );
    assert_eq!(seconds.count("HEAD", "/v2/app/manifests/latest"), 1);
    assert_eq!(dated.count("HEAD", "/v2/app/manifests/latest"), 1);
    let resolved = tag(resolver.resolve(&good_ref, &none).await.unwrap());
    assert_eq!(resolved.digest, digest(&on_good.manifest_digest));

    let health = resolver.health();
    let of = |registry: &Registry| {
        health
            .iter()
            .find(|h| h.host == registry.host())
            .unwrap_or_else(|| panic!("no health for {}: {health:?}", registry.host()))
            .clone()
    };
    for registry in [&seconds, &dated] {
        let until = of(registry).blocked_until.expect("blocked");
        assert!((590..=600).contains(&seconds_until(until)), "{until}");
    }
    assert_eq!(of(&good).blocked_until, None);
    let logged = logs.text();
    assert!(
        logged.contains("registry rate-limited us") && logged.contains("retry_after=600s"),
        "the capped wait is logged: {logged}"
    );
}

const TOKEN_USER: &str = "ci";
const TOKEN_PASSWORD: &str = "s3cret-token-pw";

/// A token-auth registry holding `private/app:main`, a plain one holding `app:latest`,
/// and the engine's resolvers for the token registry with a password and with an
/// identity token (they ask the token server by GET and by OAuth2 POST).
struct TokenBed {
    good: Registry,
    token: Registry,
    good_ref: ImageRef,
    good_digest: Digest,
    token_ref: ImageRef,
    token_digest: Digest,
}

impl TokenBed {
    async fn start() -> TokenBed {
        let good = Registry::start(RegistryOptions::plain()).await.unwrap();
        let token = Registry::start(RegistryOptions::plain().token(TOKEN_USER, TOKEN_PASSWORD))
            .await
            .unwrap();
        let on_good = push_app(&good).await;
        let on_token = ImageBuilder::new(&token)
            .unwrap()
            .push("private/app", "main")
            .await
            .unwrap();
        TokenBed {
            good_ref: ImageRef::parse(&on_good.reference).unwrap(),
            good_digest: digest(&on_good.manifest_digest),
            token_ref: ImageRef::parse(&on_token.reference).unwrap(),
            token_digest: digest(&on_token.manifest_digest),
            good,
            token,
        }
    }

    /// Fresh resolvers (no token cached yet): with the password, with the identity token.
    fn resolvers(&self) -> [(&'static str, Resolver); 2] {
        let head = insecure(&[&self.good, &self.token]);
        let t = self.token.host();
        let identity = self.token.identity_token().unwrap();
        [
            (
                "password",
                engine_resolver(&format!(
                    "{head}  credentials:\n    - registry: \"{t}\"\n      username: {TOKEN_USER}\n      password: \"{TOKEN_PASSWORD}\"\n"
                )),
            ),
            (
                "identity token",
                engine_resolver(&format!(
                    "{head}  credentials:\n    - registry: \"{t}\"\n      identityToken: \"{identity}\"\n"
                )),
            ),
        ]
    }

    /// Resolves both images at once: the good one must resolve whatever the token
    /// registry does.
    async fn resolve_both(&self, resolver: &Resolver) -> Result<Resolved, RegistryError> {
        let none = Keyring::new();
        let (good, token) = tokio::join!(
            resolver.resolve(&self.good_ref, &none),
            resolver.resolve(&self.token_ref, &none)
        );
        assert_eq!(tag(good.unwrap()).digest, self.good_digest);
        token.map(tag)
    }

    fn token_requests(&self) -> usize {
        self.token.count("GET", "/token") + self.token.count("POST", "/token")
    }
}

#[tokio::test]
async fn token_lifetimes_past_the_cap_are_used_for_at_most_the_cap_without_a_panic() {
    let bed = TokenBed::start().await;
    // The registry takes these tokens (an exp in the year 9999 is valid to it); the
    // lifetimes overflowed an Instant and panicked the engine before they were capped.
    let year_9999 = serde_json::json!(253_402_300_799_i64);
    let cases = [
        ("expires_in 2^63", serde_json::json!(1_u64 << 63), None),
        ("expires_in 2^64-1", serde_json::json!(u64::MAX), None),
        (
            "JWT exp in the year 9999",
            serde_json::Value::Null,
            Some(year_9999.clone()),
        ),
        ("both", serde_json::json!(1_u64 << 63), Some(year_9999)),
        ("expires_in a string", serde_json::json!("forever"), None),
        ("expires_in negative", serde_json::json!(-1), None),
    ];
    for (what, expires_in, exp) in cases {
        bed.token.set_token_answer(TokenServerAnswer {
            expires_in: Some(expires_in),
            exp,
            padding: 0,
        });
        for (how, resolver) in bed.resolvers() {
            let before = bed.token_requests();
            let resolved = bed
                .resolve_both(&resolver)
                .await
                .unwrap_or_else(|e| panic!("{what}, {how}: {e}"));
            assert_eq!(resolved.digest, bed.token_digest, "{what}, {how}");
            assert_eq!(bed.token_requests(), before + 1, "{what}, {how}: one token");
            // Resolved again: the token is reused, not fetched again.
            tokio::time::sleep(ENGINE_MIN_INTERVAL).await;
            let again = bed.resolve_both(&resolver).await.unwrap();
            assert_eq!(again.digest, bed.token_digest, "{what}, {how}");
            assert_eq!(bed.token_requests(), before + 1, "{what}, {how}: cached");
        }
    }
}

#[tokio::test]
async fn tokens_the_registry_refuses_or_answers_too_big_fail_that_registry_clearly() {
    let logs = LogCapture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(logs.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let bed = TokenBed::start().await;
    let host = bed.token.host().to_owned();

    // An exp past what distribution reads (not an int64): it refuses the token.
    bed.token.set_token_answer(TokenServerAnswer {
        expires_in: None,
        exp: Some(serde_json::json!(u64::MAX)),
        padding: 0,
    });
    for (how, resolver) in bed.resolvers() {
        let err = bed.resolve_both(&resolver).await.unwrap_err();
        assert!(matches!(err, RegistryError::Auth { .. }), "{how}: {err}");
        assert!(err.to_string().contains(&host), "{how}: {err}");
    }

    // An answer of 2 MiB: refused unread past 1 MiB.
    bed.token.set_token_answer(TokenServerAnswer {
        padding: 2 * 1024 * 1024,
        ..TokenServerAnswer::default()
    });
    for (how, resolver) in bed.resolvers() {
        let err = bed.resolve_both(&resolver).await.unwrap_err();
        assert!(
            matches!(err, RegistryError::BadResponse { .. }),
            "{how}: {err}"
        );
        let message = err.to_string();
        assert!(message.contains(&host), "{how}: {message}");
        assert!(
            message.contains("token server answer") && message.contains("1048576-byte limit"),
            "{how}: {message}"
        );
    }

    let logged = logs.text();
    assert!(logged.contains("1048576-byte limit"), "logged: {logged}");
    let identity = bed.token.identity_token().unwrap();
    assert!(!logged.contains(TOKEN_PASSWORD) && !logged.contains(identity));
}
