//! Every registry credential form, through the configuration as a user writes it
//! (`resolver_for`), against the test bed's real registry with token auth or basic auth;
//! the warm order carrying it reaches only the node that pulls, whose containerd pulls
//! with it; and a kube-autorollout configuration translated as the README says.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod support;

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use support::{FleetBed, LogCapture};
use warmroll_coordinator::config::Config;
use warmroll_coordinator::engine::resolver_for;
use warmroll_coordinator::fleet::WarmRequest;
use warmroll_coordinator::registry::{Credentials, Keyring, RegistryError, Resolution};
use warmroll_proto::fleet::{NodeName, WarmOutcome};
use warmroll_proto::image::ImageRef;
use warmroll_tests::image::{ImageBuilder, Pushed};
use warmroll_tests::registry::{Fault, FaultRule, Registry, RegistryOptions};

const USER: &str = "ci";
const TOKEN_PASSWORD: &str = "s3cret-token-pw";
const BASIC_PASSWORD: &str = "s3cret-basic-pw";

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A Docker config with one entry for `host`.
fn docker_config(host: &str, entry: serde_json::Value) -> String {
    serde_json::json!({ "auths": { host: entry } }).to_string()
}

/// A bearer token for pulling `pushed` from the token server, as a CI job would hand
/// one out (Docker config `registrytoken`, kube-autorollout's token without username).
/// A token-auth and a basic-auth registry, each holding `repository:main`.
struct TwoRegistries {
    token: Registry,
    basic: Registry,
    on_token: Pushed,
    on_basic: Pushed,
}

async fn two_registries(repository: &str) -> TwoRegistries {
    let token = Registry::start(RegistryOptions::plain().token(USER, TOKEN_PASSWORD))
        .await
        .unwrap();
    let basic = Registry::start(RegistryOptions::plain().basic(USER, BASIC_PASSWORD))
        .await
        .unwrap();
    let push = |registry: &Registry| {
        let images = ImageBuilder::new(registry).unwrap();
        async move { images.push(repository, "main").await.unwrap() }
    };
    let on_token = push(&token).await;
    let on_basic = push(&basic).await;
    TwoRegistries {
        token,
        basic,
        on_token,
        on_basic,
    }
}

async fn bearer_for(registry: &Registry, pushed: &Pushed) -> String {
    let client = oci_client::Client::try_from(registry.oci_client_config()).unwrap();
    let reference: Reference = pushed.reference.parse().unwrap();
    client
        .auth(
            &reference,
            &RegistryAuth::Basic(USER.into(), TOKEN_PASSWORD.into()),
            RegistryOperation::Pull,
        )
        .await
        .unwrap()
        .expect("a token registry hands out a bearer token")
}

/// A Secret's keys as kubelet mounts them: one file per key.
fn secret_dir(root: &Path, name: &str, keys: &[(&str, &str)]) -> String {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for (key, value) in keys {
        std::fs::write(dir.join(key), value).unwrap();
    }
    dir.display().to_string()
}

async fn resolve(config: &str, image: &ImageRef) -> Result<Resolution, RegistryError> {
    let config = Config::parse(config, "test config").unwrap();
    let (resolver, _keyring) = resolver_for(&config).unwrap();
    resolver.resolve(image, &Keyring::new()).await
}

fn digest_of(resolution: Resolution) -> String {
    match resolution {
        Resolution::Tag(resolved) => resolved.digest.to_string(),
        Resolution::Pinned { image, .. } => panic!("{image} resolved as pinned"),
    }
}

#[tokio::test]
async fn every_credential_form_resolves_at_token_and_basic_registries() {
    let logs = LogCapture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let TwoRegistries {
        token,
        basic,
        on_token,
        on_basic,
    } = two_registries("private/app").await;
    let (t, b) = (token.host(), basic.host());
    let identity = token.identity_token().unwrap().to_owned();
    let bearer = bearer_for(&token, &on_token).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let head = format!("registry:\n  insecureRegistries: [\"{t}\", \"{b}\"]\n");

    // Docker config files (registry.dockerConfig) with an identity token and a
    // registry token.
    let identity_cfg = root.join("identity.json");
    let json = docker_config(
        t,
        serde_json::json!({"auth": b64(&format!("{USER}:")), "identitytoken": identity}),
    );
    std::fs::write(&identity_cfg, json).unwrap();
    let registry_cfg = root.join("registry.json");
    std::fs::write(
        &registry_cfg,
        docker_config(t, serde_json::json!({ "registrytoken": bearer })),
    )
    .unwrap();
    // kube-autorollout's Opaque secrets, a Docker config secret and basic auth, as
    // mounted Secrets (registry.registries).
    let opaque_bearer = secret_dir(root, "opaque-bearer", &[("IDENTITY_TOKEN", &bearer)]);
    let opaque_pat = secret_dir(
        root,
        "opaque-pat",
        &[("username", USER), ("token", BASIC_PASSWORD)],
    );
    let opaque_pat_token = secret_dir(root, "opaque-pat-token", &[("token", TOKEN_PASSWORD)]);
    let docker_secret = secret_dir(
        root,
        "docker-secret",
        &[(
            ".dockerconfigjson",
            &docker_config(t, serde_json::json!({ "identitytoken": identity })),
        )],
    );
    let basic_auth = secret_dir(
        root,
        "basic-auth",
        &[("username", USER), ("password", BASIC_PASSWORD)],
    );

    let cases: Vec<(&str, String, &Pushed)> = vec![
        (
            "dockerConfig identitytoken",
            format!("  dockerConfig: {}\n", identity_cfg.display()),
            &on_token,
        ),
        (
            "dockerConfig registrytoken",
            format!("  dockerConfig: {}\n", registry_cfg.display()),
            &on_token,
        ),
        (
            "credentials token (bearer)",
            format!("  credentials:\n    - registry: \"{t}\"\n      token: \"{bearer}\"\n"),
            &on_token,
        ),
        (
            "credentials identityToken",
            format!(
                "  credentials:\n    - registry: \"{t}\"\n      identityToken: \"{identity}\"\n"
            ),
            &on_token,
        ),
        (
            "credentials username + token (basic)",
            format!(
                "  credentials:\n    - registry: \"{b}\"\n      username: {USER}\n      token: \"{BASIC_PASSWORD}\"\n"
            ),
            &on_basic,
        ),
        (
            "registries Opaque token without username (bearer)",
            format!(
                "  registries:\n    - hostnamePattern: \"{t}\"\n      secretDir: {opaque_bearer}\n      tokenKey: IDENTITY_TOKEN\n"
            ),
            &on_token,
        ),
        (
            "registries Opaque username + token (basic)",
            format!(
                "  registries:\n    - hostnamePattern: \"{b}\"\n      secretDir: {opaque_pat}\n"
            ),
            &on_basic,
        ),
        (
            "registries Opaque token + configured username (token flow)",
            format!(
                "  registries:\n    - hostnamePattern: \"{t}\"\n      secretDir: {opaque_pat_token}\n      username: {USER}\n"
            ),
            &on_token,
        ),
        (
            "registries dockerconfigjson identitytoken",
            format!(
                "  registries:\n    - hostnamePattern: \"{t}\"\n      secretDir: {docker_secret}\n"
            ),
            &on_token,
        ),
        (
            "registries basic-auth secret",
            format!(
                "  registries:\n    - hostnamePattern: \"{b}\"\n      secretDir: {basic_auth}\n"
            ),
            &on_basic,
        ),
    ];
    for (form, registry, pushed) in &cases {
        let image = ImageRef::parse(&pushed.reference).unwrap();
        let config = format!("{head}{registry}");
        let resolution = resolve(&config, &image)
            .await
            .unwrap_or_else(|e| panic!("{form}: {e}"));
        assert_eq!(digest_of(resolution), pushed.manifest_digest, "{form}");
    }
    assert!(
        token
            .requests()
            .iter()
            .any(|r| r.method == "POST" && r.path == "/token"),
        "the identity token was traded at the token server"
    );

    // Wrong tokens are refused, named by registry, and shown nowhere.
    let image = ImageRef::parse(&on_token.reference).unwrap();
    for wrong in [
        format!(
            "  credentials:\n    - registry: \"{t}\"\n      identityToken: wrong-refresh-4711\n"
        ),
        format!("  credentials:\n    - registry: \"{t}\"\n      token: wrong-bearer-4711\n"),
    ] {
        let err = resolve(&format!("{head}{wrong}"), &image)
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Auth { .. }), "{err}");
        assert!(err.to_string().contains(t), "{err}");
        assert!(!format!("{err} {err:?}").contains("4711"), "{err}");
    }

    let logged = logs.text();
    assert!(!logged.is_empty(), "no log line was captured");
    for secret in [
        identity.as_str(),
        bearer.as_str(),
        TOKEN_PASSWORD,
        BASIC_PASSWORD,
        "wrong-refresh-4711",
        "wrong-bearer-4711",
    ] {
        assert!(!logged.contains(secret), "a secret reached the logs");
    }
}

/// The configured credentials' warm order to node-0: containerd there pulls with them,
/// node-1 gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_and_basic_credentials_reach_only_the_pulling_node_which_pulls_with_them() {
    let bed = FleetBed::start(2).await.unwrap();
    let TwoRegistries {
        token,
        basic,
        on_token,
        on_basic,
    } = two_registries("team/app").await;
    for node in &bed.nodes {
        node.containerd.trust_registry(&token).unwrap();
        node.containerd.trust_registry(&basic).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let identity = token.identity_token().unwrap();
    let docker_secret = secret_dir(
        dir.path(),
        "ghcr",
        &[(
            ".dockerconfigjson",
            &docker_config(
                token.host(),
                serde_json::json!({ "identitytoken": identity }),
            ),
        )],
    );
    let opaque = secret_dir(
        dir.path(),
        "jfrog",
        &[("username", USER), ("TOKEN", BASIC_PASSWORD)],
    );
    let config = Config::parse(
        &format!(
            "registry:\n  insecureRegistries: [\"{t}\", \"{b}\"]\n  registries:\n    - hostnamePattern: \"{t}\"\n      secretDir: {docker_secret}\n    - hostnamePattern: \"{b}\"\n      secretDir: {opaque}\n      tokenKey: TOKEN\n",
            t = token.host(),
            b = basic.host()
        ),
        "test config",
    )
    .unwrap();
    let (resolver, keyring) = resolver_for(&config).unwrap();
    let view = bed.view().unwrap();
    let node0 = NodeName::parse("node-0").unwrap();
    bed.wait_until("node-0 connected", |v| {
        v.node(&node0).is_some_and(|n| n.connected)
    })
    .await
    .unwrap();

    let trades = || {
        token
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path == "/token" && r.status == 200)
            .count()
    };
    let mut traded_by_node = 0;
    for pushed in [&on_token, &on_basic] {
        let image = ImageRef::parse(&pushed.reference).unwrap();
        let resolved = digest_of(resolver.resolve(&image, &Keyring::new()).await.unwrap());
        assert_eq!(resolved, pushed.manifest_digest);
        let before = trades();
        // The engine's choice (Actor::warm): the first matching credential, as the
        // runtime takes it.
        let found = keyring.lookup(&image);
        let credentials = Credentials::for_warm_order(&found).map(Credentials::to_wire);
        assert!(credentials.is_some(), "{image}: no credential matched");
        let mut ticket = view
            .send_order(
                &node0,
                WarmRequest {
                    image: image.clone(),
                    expected: Some(warmroll_proto::image::Digest::parse(&resolved).unwrap()),
                    credentials,
                    timeout: Duration::from_secs(60),
                },
            )
            .unwrap();
        match ticket.finished().await.unwrap() {
            WarmOutcome::Succeeded { digest, .. } => {
                assert_eq!(digest.map(|d| d.to_string()), Some(resolved.clone()));
            }
            failed => panic!("{image}: {failed:?}"),
        }
        let held = bed.nodes[0]
            .containerd
            .image_status(&pushed.reference)
            .await
            .unwrap();
        assert!(held.is_some(), "node-0 pulled {image}");
        let other = bed.nodes[1]
            .containerd
            .image_status(&pushed.reference)
            .await
            .unwrap();
        assert!(other.is_none(), "node-1 got no order for {image}");
        traded_by_node += trades() - before;
    }
    // node-0's containerd traded the identity token itself (OAuth2 refresh_token grant).
    assert!(
        traded_by_node >= 1,
        "containerd never traded the identity token"
    );

    // A bearer token alone resolves, and its warm order carries it as CRI's
    // registry_token, which containerd ignores: the node's pull is refused, said as an
    // auth failure that shows no token.
    let other_tag = ImageBuilder::new(&token)
        .unwrap()
        .push("team/app", "bearer")
        .await
        .unwrap();
    let bearer = bearer_for(&token, &other_tag).await;
    let config = Config::parse(
        &format!(
            "registry:\n  insecureRegistries: [\"{t}\"]\n  credentials:\n    - registry: \"{t}\"\n      token: \"{bearer}\"\n",
            t = token.host()
        ),
        "test config",
    )
    .unwrap();
    let (resolver, keyring) = resolver_for(&config).unwrap();
    let image = ImageRef::parse(&other_tag.reference).unwrap();
    let resolved = digest_of(resolver.resolve(&image, &Keyring::new()).await.unwrap());
    assert_eq!(resolved, other_tag.manifest_digest);
    let credentials =
        Credentials::for_warm_order(&keyring.lookup(&image)).map(Credentials::to_wire);
    assert_eq!(
        credentials,
        Some(warmroll_proto::fleet::Credentials::Token(bearer.clone()))
    );
    let mut ticket = view
        .send_order(
            &node0,
            WarmRequest {
                image: image.clone(),
                expected: None,
                credentials,
                timeout: Duration::from_secs(60),
            },
        )
        .unwrap();
    match ticket.finished().await.unwrap() {
        WarmOutcome::Failed { kind, message, .. } => {
            assert_eq!(kind, warmroll_proto::fleet::FailureKind::Auth, "{message}");
            assert!(!message.contains(&bearer), "{message}");
        }
        succeeded => panic!("containerd pulled with a registry token: {succeeded:?}"),
    }
}

/// A kube-autorollout configuration (as its chart's values) and its translation by the
/// README's table resolve the same images: a personal access token with a username
/// (Opaque secret, `secret.key`), an ImagePullSecret, and with
/// `enableJfrogArtifactoryFallback` an image found only in Artifactory's
/// repository-path form.
#[tokio::test]
async fn a_translated_kube_autorollout_configuration_resolves_the_same_images() {
    let TwoRegistries {
        token,
        basic,
        on_token,
        on_basic,
    } = two_registries("team/app").await;
    let (t, b) = (token.host(), basic.host());
    // Artifactory's repository-path form only: the test bed serves
    // /artifactory/api/docker/<key>/v2/<name>/… from this repository.
    let artifactory_only = ImageBuilder::new(&basic)
        .unwrap()
        .push(
            "artifactory/api/docker/docker-local/v2/docker-local/app",
            "main",
        )
        .await
        .unwrap();
    let artifactory_image = ImageRef::parse(&format!("{b}/docker-local/app:main")).unwrap();

    // kube-autorollout's values:
    //   config:
    //     registries:
    //       - hostnamePattern: "<b>"
    //         username: ci
    //         secret: {type: Opaque, name: jfrog-creds, key: PAT}
    //       - hostnamePattern: "<t>"
    //         secret: {type: ImagePullSecret, name: token-creds, mountPath: /etc/…}
    //     featureFlags:
    //       enableJfrogArtifactoryFallback: true
    // The same Secrets, mounted as the chart mounts them.
    let dir = tempfile::tempdir().unwrap();
    let jfrog = secret_dir(dir.path(), "jfrog-creds", &[("PAT", BASIC_PASSWORD)]);
    let pull = secret_dir(
        dir.path(),
        "token-creds",
        &[(
            ".dockerconfigjson",
            &docker_config(
                t,
                serde_json::json!({"auth": b64(&format!("{USER}:{TOKEN_PASSWORD}"))}),
            ),
        )],
    );
    // The README's translation (what the chart renders from
    // coordinator.registryAuth.registries).
    let translated = |fallback: bool| {
        format!(
            "registry:\n  insecureRegistries: [\"{t}\", \"{b}\"]\n  registries:\n    - hostnamePattern: \"{b}\"\n      secretDir: {jfrog}\n      tokenKey: PAT\n      username: {USER}\n      artifactoryFallback: {fallback}\n    - hostnamePattern: \"{t}\"\n      secretDir: {pull}\n"
        )
    };
    for (image, want) in [
        (
            ImageRef::parse(&on_basic.reference).unwrap(),
            &on_basic.manifest_digest,
        ),
        (
            ImageRef::parse(&on_token.reference).unwrap(),
            &on_token.manifest_digest,
        ),
        (artifactory_image.clone(), &artifactory_only.manifest_digest),
    ] {
        let resolution = resolve(&translated(true), &image)
            .await
            .unwrap_or_else(|e| panic!("{image}: {e}"));
        assert_eq!(&digest_of(resolution), want, "{image}");
    }
    assert!(
        basic.requests().iter().any(|r| r.path
            == "/artifactory/api/docker/docker-local/v2/docker-local/app/manifests/main"
            && r.status == 200),
        "the fallback asked the repository-path form"
    );

    // An Artifactory that refuses the plain path (401, where kube-autorollout falls
    // back) is asked in the repository-path form too.
    basic.inject(FaultRule::new(Fault::Status(401)).path("/v2/docker-local/app/manifests/main"));
    let resolution = resolve(&translated(true), &artifactory_image)
        .await
        .unwrap();
    assert_eq!(digest_of(resolution), artifactory_only.manifest_digest);
    basic.clear_faults();

    // Without the fallback the Artifactory image is not found: the fallback found it.
    let err = resolve(&translated(false), &artifactory_image)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
}

/// A registry entry's own CA (from its Secret or ConfigMap, mounted as a file) makes its
/// TLS registry trusted; without it the same entry fails on the certificate.
#[tokio::test]
async fn a_registry_entry_brings_its_own_ca() {
    let registry = Registry::start(RegistryOptions::plain().tls().token(USER, TOKEN_PASSWORD))
        .await
        .unwrap();
    let pushed = ImageBuilder::new(&registry)
        .unwrap()
        .push("team/app", "main")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = secret_dir(
        dir.path(),
        "creds",
        &[(
            ".dockerconfigjson",
            &docker_config(
                registry.host(),
                serde_json::json!({ "identitytoken": registry.identity_token().unwrap() }),
            ),
        )],
    );
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, registry.ca_pem().unwrap()).unwrap();
    let entry = format!(
        "registry:\n  registries:\n    - hostnamePattern: \"{}\"\n      secretDir: {secret}\n",
        registry.host()
    );
    let image = ImageRef::parse(&pushed.reference).unwrap();
    let with_ca = format!("{entry}      caFile: {}\n", ca.display());
    let resolution = resolve(&with_ca, &image).await.unwrap();
    assert_eq!(digest_of(resolution), pushed.manifest_digest);

    let err = resolve(&entry, &image).await.unwrap_err();
    assert!(
        matches!(err, RegistryError::Network { .. }),
        "untrusted certificate: {err}"
    );
    assert!(err.to_string().contains(registry.host()), "{err}");
}
