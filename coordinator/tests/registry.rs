//! Registry resolution against the real CNCF registry from the test bed, counting the
//! requests it receives.
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
use warmroll_coordinator::registry::{
    Keyring, RegistryError, Resolution, Resolved, Resolver, ResolverConfig, digest_matches,
};
use warmroll_proto::image::{Digest, ImageRef};
use warmroll_tests::image::{ImageBuilder, Pushed};
use warmroll_tests::registry::{Fault, FaultRule, Registry, RegistryOptions};

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
