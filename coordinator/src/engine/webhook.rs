//! `POST /webhooks/registry`: registry push notifications (CNCF distribution's
//! notification envelope, Docker Hub, Harbor, Quay, GitHub Packages, Azure Container
//! Registry and JFrog Artifactory payloads) that make the engine re-resolve the pushed
//! tag at once. The shared secret comes as `Authorization: Bearer <secret>`
//! (distribution's `endpoints[].headers`, Harbor's auth header, ACR's and Artifactory's
//! custom headers), an `X-Warmroll-Secret` header, a `?secret=` query parameter (Docker
//! Hub and Quay cannot set headers), or as the key of GitHub's `X-Hub-Signature-256`
//! HMAC of the body. The secret must not be empty: an empty file stops start-up, and an
//! empty secret presented never matches.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, Mac as _};
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq as _;
use tracing::{info, warn};

use super::{EngineError, Shared};

/// The shared secret in `path`, without surrounding whitespace (a trailing newline). An
/// empty or whitespace-only file is an error naming it: with an empty secret, an empty
/// `?secret=` or an HMAC made with an empty key would pass.
pub(crate) fn read_secret(path: &Path) -> Result<String, EngineError> {
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::ReadWebhookSecret {
        path: path.to_owned(),
        source,
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(EngineError::EmptyWebhookSecret {
            path: path.to_owned(),
        });
    }
    Ok(secret.to_owned())
}

/// The pushed tags a payload names, as `repository:tag` (Docker Hub's official images
/// under `library/`). Events that are not pushes of a tag are skipped. The payload's
/// form is told by its keys: distribution's `events`, Docker Hub's `push_data`,
/// Harbor's `event_data`, Quay's `updated_tags`, GitHub's `registry_package`, Azure
/// Container Registry's top-level `action`/`target`, JFrog Artifactory's
/// `domain`/`event_type`.
pub fn pushed_tags(body: &[u8]) -> Result<Vec<String>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let has = |key: &str| value.get(key).is_some();
    if has("events") {
        let envelope: Envelope =
            serde_json::from_value(value).map_err(|e| format!("bad notification envelope: {e}"))?;
        return Ok(envelope
            .events
            .into_iter()
            .filter_map(Event::pushed)
            .collect());
    }
    if has("push_data") {
        let hub: DockerHub =
            serde_json::from_value(value).map_err(|e| format!("bad Docker Hub payload: {e}"))?;
        let repo = if hub.repository.repo_name.contains('/') {
            hub.repository.repo_name
        } else {
            format!("library/{}", hub.repository.repo_name)
        };
        return Ok(vec![format!("{repo}:{}", hub.push_data.tag)]);
    }
    if has("event_data") {
        let harbor: Harbor =
            serde_json::from_value(value).map_err(|e| format!("bad Harbor payload: {e}"))?;
        return Ok(harbor.pushed());
    }
    if has("updated_tags") {
        let quay: Quay =
            serde_json::from_value(value).map_err(|e| format!("bad Quay payload: {e}"))?;
        return Ok(quay.pushed());
    }
    if has("registry_package") {
        let github: GitHub = serde_json::from_value(value)
            .map_err(|e| format!("bad GitHub registry_package payload: {e}"))?;
        return Ok(github.pushed().into_iter().collect());
    }
    if has("action") && has("target") {
        let event: Event = serde_json::from_value(value)
            .map_err(|e| format!("bad Azure Container Registry payload: {e}"))?;
        return Ok(event.pushed().into_iter().collect());
    }
    if has("domain") && has("event_type") {
        let jfrog: JFrog = serde_json::from_value(value)
            .map_err(|e| format!("bad JFrog Artifactory payload: {e}"))?;
        return Ok(jfrog.pushed());
    }
    Err(
        "not a push notification warmroll reads (distribution events, Docker Hub, Harbor, \
         Quay, GitHub registry_package, Azure Container Registry, JFrog Artifactory)"
            .into(),
    )
}

/// distribution's notification envelope.
#[derive(Deserialize)]
struct Envelope {
    events: Vec<Event>,
}

/// One distribution event; Azure Container Registry posts one such event alone.
#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    action: String,
    target: EventTarget,
}

#[derive(Deserialize)]
struct EventTarget {
    repository: String,
    #[serde(default)]
    tag: Option<String>,
}

impl Event {
    fn pushed(self) -> Option<String> {
        if self.action != "push" {
            return None;
        }
        let tag = self.target.tag.filter(|t| !t.is_empty())?;
        Some(format!("{}:{tag}", self.target.repository))
    }
}

#[derive(Deserialize)]
struct DockerHub {
    push_data: HubPush,
    repository: HubRepository,
}

#[derive(Deserialize)]
struct HubPush {
    tag: String,
}

#[derive(Deserialize)]
struct HubRepository {
    repo_name: String,
}

/// Harbor's default payload (`PUSH_ARTIFACT` names the pushed tags in `resources`).
#[derive(Deserialize)]
struct Harbor {
    #[serde(rename = "type")]
    kind: String,
    event_data: HarborData,
}

#[derive(Deserialize)]
struct HarborData {
    #[serde(default)]
    resources: Vec<HarborResource>,
    repository: HarborRepository,
}

#[derive(Deserialize)]
struct HarborResource {
    #[serde(default)]
    tag: Option<String>,
}

#[derive(Deserialize)]
struct HarborRepository {
    repo_full_name: String,
}

impl Harbor {
    fn pushed(self) -> Vec<String> {
        if self.kind != "PUSH_ARTIFACT" {
            return Vec::new();
        }
        let repo = self.event_data.repository.repo_full_name;
        self.event_data
            .resources
            .into_iter()
            .filter_map(|r| r.tag.filter(|t| !t.is_empty()))
            .map(|tag| format!("{repo}:{tag}"))
            .collect()
    }
}

/// Quay's repository push notification: `updated_tags` is a list of tags (a map of tag
/// to image id in older Quay releases).
#[derive(Deserialize)]
struct Quay {
    repository: String,
    updated_tags: QuayTags,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum QuayTags {
    List(Vec<String>),
    Map(BTreeMap<String, serde_json::Value>),
}

impl Quay {
    fn pushed(self) -> Vec<String> {
        let tags: Vec<String> = match self.updated_tags {
            QuayTags::List(tags) => tags,
            QuayTags::Map(tags) => tags.into_keys().collect(),
        };
        tags.into_iter()
            .filter(|t| !t.is_empty())
            .map(|tag| format!("{}:{tag}", self.repository))
            .collect()
    }
}

/// GitHub's `registry_package` event: a container package version published or updated,
/// its tag in `container_metadata.tag.name`, its image in `package_url`
/// (`ghcr.io/owner/name:tag`).
#[derive(Deserialize)]
struct GitHub {
    action: String,
    registry_package: GitHubPackage,
}

#[derive(Deserialize)]
struct GitHubPackage {
    name: String,
    #[serde(default)]
    package_type: String,
    #[serde(default)]
    ecosystem: String,
    owner: GitHubOwner,
    package_version: Option<GitHubVersion>,
}

#[derive(Deserialize)]
struct GitHubOwner {
    login: String,
}

#[derive(Deserialize)]
struct GitHubVersion {
    #[serde(default)]
    package_url: String,
    container_metadata: Option<GitHubContainer>,
}

#[derive(Deserialize)]
struct GitHubContainer {
    tag: Option<GitHubTag>,
}

#[derive(Deserialize)]
struct GitHubTag {
    #[serde(default)]
    name: String,
}

impl GitHub {
    fn pushed(self) -> Option<String> {
        if !matches!(self.action.as_str(), "published" | "updated") {
            return None;
        }
        let package = self.registry_package;
        let container = ["container", "docker"].iter().any(|k| {
            package.package_type.eq_ignore_ascii_case(k)
                || package.ecosystem.eq_ignore_ascii_case(k)
        });
        if !container {
            return None;
        }
        let version = package.package_version?;
        let tag = version.container_metadata?.tag?.name;
        if tag.is_empty() {
            return None;
        }
        // `ghcr.io/owner/name:tag` without host and tag; else owner/name.
        let from_url = version
            .package_url
            .split_once('/')
            .map(|(_, path)| path.split('@').next().unwrap_or(path))
            .map(|path| path.rsplit_once(':').map_or(path, |(repo, _)| repo))
            .filter(|repo| !repo.is_empty())
            .map(str::to_owned);
        let repo = from_url.unwrap_or_else(|| format!("{}/{}", package.owner.login, package.name));
        // GHCR names are lower-case in image references.
        Some(format!("{}:{tag}", repo.to_ascii_lowercase()))
    }
}

/// JFrog Artifactory's webhook (`domain: docker`, `event_type: pushed`). Its image may be
/// referenced with the repository key as the first path component (the repository-path
/// method) or without it (subdomain and port methods): both are announced.
#[derive(Deserialize)]
struct JFrog {
    domain: String,
    event_type: String,
    data: Option<JFrogData>,
}

#[derive(Deserialize)]
struct JFrogData {
    #[serde(default)]
    repo_key: String,
    image_name: String,
    tag: String,
}

impl JFrog {
    fn pushed(self) -> Vec<String> {
        let Some(data) = self
            .data
            .filter(|_| self.domain == "docker" && self.event_type == "pushed")
        else {
            return Vec::new();
        };
        if data.tag.is_empty() || data.image_name.is_empty() {
            return Vec::new();
        }
        let mut tags = vec![format!("{}:{}", data.image_name, data.tag)];
        if !data.repo_key.is_empty() {
            tags.push(format!(
                "{}/{}:{}",
                data.repo_key, data.image_name, data.tag
            ));
        }
        tags
    }
}

/// Whether the request carries the secret (compared in constant time), or GitHub's
/// `X-Hub-Signature-256` of the body made with it (verified in constant time). An empty
/// secret, configured or presented, matches nothing.
fn authorised(
    secret: &str,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: &[u8],
) -> bool {
    if secret.is_empty() {
        return false;
    }
    let signature = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("sha256="))
        .and_then(|hex| hex::decode(hex).ok());
    if let Some(signature) = signature
        && let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
    {
        mac.update(body);
        if mac.verify_slice(&signature).is_ok() {
            return true;
        }
    }
    let offered = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| {
            headers
                .get("x-warmroll-secret")
                .and_then(|v| v.to_str().ok())
        })
        .or_else(|| query.get("secret").map(String::as_str))
        .map(str::trim);
    offered.is_some_and(|o| !o.is_empty() && bool::from(o.as_bytes().ct_eq(secret.as_bytes())))
}

pub(crate) async fn handler(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let Some(secret) = shared.webhook_secret.as_deref() else {
        return (StatusCode::NOT_FOUND, "webhook not configured\n".into());
    };
    if !authorised(secret, &headers, &query, &body) {
        warn!("registry webhook: missing or wrong secret");
        return (StatusCode::UNAUTHORIZED, "missing or wrong secret\n".into());
    }
    match pushed_tags(&body) {
        Ok(tags) => {
            info!(tags = ?tags, "registry webhook: re-resolving pushed tags");
            let count = tags.len();
            shared.push_notified(tags);
            (StatusCode::ACCEPTED, format!("{count} pushed tags\n"))
        }
        Err(reason) => {
            warn!(reason = %reason, "registry webhook: unreadable payload");
            (StatusCode::BAD_REQUEST, format!("{reason}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distribution_envelope() {
        let body = br#"{"events":[
          {"id":"1","timestamp":"2024-01-01T00:00:00Z","action":"push",
           "target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aa","repository":"team/app","url":"http://reg:5000/v2/team/app/manifests/sha256:aa","tag":"latest"},
           "request":{"host":"reg:5000","method":"PUT"}},
          {"action":"push","target":{"repository":"team/app","digest":"sha256:bb"}},
          {"action":"pull","target":{"repository":"team/app","tag":"v1"}}
        ]}"#;
        assert_eq!(pushed_tags(body).unwrap(), ["team/app:latest"]);
    }

    #[test]
    fn docker_hub_payload() {
        let body =
            br#"{"callback_url":"https://x","push_data":{"pushed_at":1,"pusher":"me","tag":"main"},
          "repository":{"repo_name":"org/app","name":"app","namespace":"org"}}"#;
        assert_eq!(pushed_tags(body).unwrap(), ["org/app:main"]);
        let official = br#"{"push_data":{"tag":"1.25"},"repository":{"repo_name":"nginx"}}"#;
        assert_eq!(pushed_tags(official).unwrap(), ["library/nginx:1.25"]);
    }

    /// A vendor's documented example payload (`coordinator/tests/fixtures/webhooks`).
    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/tests/fixtures/webhooks/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn edited(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut value: serde_json::Value = serde_json::from_slice(&fixture(name)).unwrap();
        edit(&mut value);
        serde_json::to_vec(&value).unwrap()
    }

    #[test]
    fn harbor_push_artifact() {
        let body = fixture("harbor-push-artifact.json");
        assert_eq!(pushed_tags(&body).unwrap(), ["test-webhook/debian:latest"]);
        // Other event types and digest-only pushes name no tag.
        let pull = edited("harbor-push-artifact.json", |v| {
            v["type"] = "PULL_ARTIFACT".into()
        });
        assert!(pushed_tags(&pull).unwrap().is_empty());
        let untagged = edited("harbor-push-artifact.json", |v| {
            v["event_data"]["resources"][0]["tag"] = "".into();
        });
        assert!(pushed_tags(&untagged).unwrap().is_empty());
        let broken = edited("harbor-push-artifact.json", |v| {
            v["event_data"]["repository"] = serde_json::json!({});
        });
        assert!(pushed_tags(&broken).unwrap_err().contains("Harbor"));
    }

    #[test]
    fn quay_repository_push_lists_and_maps_of_tags() {
        let body = fixture("quay-repository-push.json");
        assert_eq!(pushed_tags(&body).unwrap(), ["dgangaia/test:latest"]);
        let legacy = fixture("quay-repository-push-legacy.json");
        assert_eq!(pushed_tags(&legacy).unwrap(), ["devtable/ubuntu:latest"]);
        let two = edited("quay-repository-push.json", |v| {
            v["updated_tags"] = serde_json::json!(["latest", "v2"]);
        });
        assert_eq!(
            pushed_tags(&two).unwrap(),
            ["dgangaia/test:latest", "dgangaia/test:v2"]
        );
    }

    #[test]
    fn github_registry_package() {
        // The documented example publishes by digest only (its tag name is empty).
        let body = fixture("github-registry-package-published.json");
        assert!(pushed_tags(&body).unwrap().is_empty());
        let tag = |v: &mut serde_json::Value, tag: &str| {
            let version = &mut v["registry_package"]["package_version"];
            version["container_metadata"]["tag"]["name"] = tag.into();
            version["package_url"] = format!("ghcr.io/Codertocat/hello-world:{tag}").into();
        };
        let tagged = edited("github-registry-package-published.json", |v| {
            tag(v, "nightly")
        });
        assert_eq!(
            pushed_tags(&tagged).unwrap(),
            ["codertocat/hello-world:nightly"]
        );
        let updated = edited("github-registry-package-published.json", |v| {
            tag(v, "main");
            v["action"] = "updated".into();
        });
        assert_eq!(
            pushed_tags(&updated).unwrap(),
            ["codertocat/hello-world:main"]
        );
        // A package URL by digest names the same repository.
        let by_digest = edited("github-registry-package-published.json", |v| {
            tag(v, "main");
            v["registry_package"]["package_version"]["package_url"] =
                "ghcr.io/Codertocat/hello-world@sha256:3da1996a".into();
        });
        assert_eq!(
            pushed_tags(&by_digest).unwrap(),
            ["codertocat/hello-world:main"]
        );
        // Without a package URL: owner/name.
        let no_url = edited("github-registry-package-published.json", |v| {
            tag(v, "main");
            v["registry_package"]["package_version"]["package_url"] = "".into();
        });
        assert_eq!(
            pushed_tags(&no_url).unwrap(),
            ["codertocat/hello-world-npm:main"]
        );
        let npm = edited("github-registry-package-published.json", |v| {
            tag(v, "main");
            v["registry_package"]["ecosystem"] = "npm".into();
        });
        assert!(pushed_tags(&npm).unwrap().is_empty());
        let other_action = edited("github-registry-package-published.json", |v| {
            tag(v, "main");
            v["action"] = "deleted".into();
        });
        assert!(pushed_tags(&other_action).unwrap().is_empty());
    }

    #[test]
    fn azure_container_registry_push() {
        let body = fixture("acr-push.json");
        assert_eq!(pushed_tags(&body).unwrap(), ["hello-world:v1"]);
        // ACR's ping (sent by `az acr webhook ping`) names nothing.
        let ping = edited("acr-push.json", |v| v["action"] = "ping".into());
        assert!(pushed_tags(&ping).unwrap().is_empty());
        let broken = edited("acr-push.json", |v| v["target"] = serde_json::json!({}));
        assert!(pushed_tags(&broken).unwrap_err().contains("Azure"));
    }

    #[test]
    fn jfrog_docker_pushed() {
        let body = fixture("jfrog-docker-pushed.json");
        assert_eq!(
            pushed_tags(&body).unwrap(),
            [
                "library/ubuntu:latest",
                "docker-remote-cache/library/ubuntu:latest"
            ]
        );
        let deleted = edited("jfrog-docker-pushed.json", |v| {
            v["event_type"] = "deleted".into()
        });
        assert!(pushed_tags(&deleted).unwrap().is_empty());
        let artifact = edited("jfrog-docker-pushed.json", |v| {
            v["domain"] = "artifact".into()
        });
        assert!(pushed_tags(&artifact).unwrap().is_empty());
    }

    /// GitHub's `X-Hub-Signature-256` value for `body` signed with `key`.
    fn github_signature(key: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn github_signatures_verify() {
        // GitHub's "Validating webhook deliveries" example.
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-hub-signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
                .parse()
                .unwrap(),
        );
        let none = HashMap::new();
        let secret = "It's a Secret to Everybody";
        assert!(authorised(secret, &headers, &none, b"Hello, World!"));
        assert!(!authorised(secret, &headers, &none, b"Hello, World?"));
        assert!(!authorised("other", &headers, &none, b"Hello, World!"));
        // Upper-case hex is the same signature; a signature that is not hex is none.
        let upper = "sha256=757107EA0EB2509FC211221CCE984B8A37570B6D7586C22C46F4379C8B043E17";
        headers.insert("x-hub-signature-256", upper.parse().unwrap());
        assert!(authorised(secret, &headers, &none, b"Hello, World!"));
        headers.insert("x-hub-signature-256", "sha256=zz".parse().unwrap());
        assert!(!authorised(secret, &headers, &none, b"Hello, World!"));
    }

    /// The route as registries call it: each vendor's payload with the secret as that
    /// vendor can present it.
    #[tokio::test]
    async fn the_route_takes_each_vendors_secret_form() {
        use std::sync::{Mutex, RwLock};

        let mut registry = prometheus_client::registry::Registry::default();
        let shared = Arc::new(Shared {
            report: RwLock::new(None),
            pushed: Mutex::new(Vec::new()),
            nudge: tokio::sync::Notify::new(),
            webhook_secret: Some("s3cret".into()),
            metrics: super::super::metrics::EngineMetrics::register(&mut registry),
            notifier: super::super::notify::Notifier::start(&[], &mut registry).unwrap(),
        });
        let post = |headers: &[(&str, String)], query: &[(&str, &str)], body: Vec<u8>| {
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                map.insert(
                    axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            let query = query
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            handler(State(shared.clone()), Query(query), map, Bytes::from(body))
        };
        let taken =
            || -> Vec<String> { shared.take_pushed().into_iter().map(|(t, _)| t).collect() };

        // GitHub signs the body with the secret.
        let github = edited("github-registry-package-published.json", |v| {
            let version = &mut v["registry_package"]["package_version"];
            version["container_metadata"]["tag"]["name"] = "nightly".into();
            version["package_url"] = "ghcr.io/Codertocat/hello-world:nightly".into();
        });
        let signature = github_signature(b"s3cret", &github);
        let (status, _) = post(&[("x-hub-signature-256", signature)], &[], github.clone()).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(taken(), ["codertocat/hello-world:nightly"]);
        let forged = github_signature(b"guess", &github);
        let (status, _) = post(&[("x-hub-signature-256", forged)], &[], github).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(taken().is_empty());

        // Harbor's auth header, ACR's and Artifactory's custom headers.
        for (name, tags) in [
            (
                "harbor-push-artifact.json",
                vec!["test-webhook/debian:latest"],
            ),
            ("acr-push.json", vec!["hello-world:v1"]),
            (
                "jfrog-docker-pushed.json",
                vec![
                    "library/ubuntu:latest",
                    "docker-remote-cache/library/ubuntu:latest",
                ],
            ),
        ] {
            let bearer = [("authorization", "Bearer s3cret".to_owned())];
            let (status, text) = post(&bearer, &[], fixture(name)).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{name}: {text}");
            assert_eq!(taken(), tags, "{name}");
            let (status, _) = post(&[], &[], fixture(name)).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{name} without the secret"
            );
        }
        // Quay cannot set headers: the query parameter.
        let (status, _) = post(
            &[],
            &[("secret", "s3cret")],
            fixture("quay-repository-push.json"),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(taken(), ["dgangaia/test:latest"]);
        let (status, _) = post(
            &[],
            &[("secret", "nope")],
            fixture("quay-repository-push.json"),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn bad_payloads_say_why() {
        assert!(pushed_tags(b"nope").unwrap_err().contains("not JSON"));
        assert!(
            pushed_tags(b"{}")
                .unwrap_err()
                .contains("not a push notification")
        );
        assert!(
            pushed_tags(br#"{"events":[{"x":1}]}"#)
                .unwrap_err()
                .contains("envelope")
        );
    }

    #[test]
    fn secret_checks() {
        let mut headers = HeaderMap::new();
        let none = HashMap::new();
        assert!(!authorised("s3", &headers, &none, b""));
        headers.insert("authorization", "Bearer s3".parse().unwrap());
        assert!(authorised("s3", &headers, &none, b""));
        assert!(!authorised("s4", &headers, &none, b""));
        let query: HashMap<String, String> = [("secret".to_owned(), "s4".to_owned())].into();
        assert!(authorised("s4", &HeaderMap::new(), &query, b""));
        let mut headers = HeaderMap::new();
        headers.insert("x-warmroll-secret", "s5".parse().unwrap());
        assert!(authorised("s5", &headers, &none, b""));
        assert!(
            !authorised("s5x", &headers, &none, b""),
            "a prefix is no match"
        );
    }

    #[test]
    fn empty_secrets_match_nothing() {
        let none = HashMap::new();
        let empty_query: HashMap<String, String> = [("secret".to_owned(), String::new())].into();
        let blank_query: HashMap<String, String> = [("secret".to_owned(), "  ".to_owned())].into();
        let mut empty_bearer = HeaderMap::new();
        empty_bearer.insert("authorization", "Bearer ".parse().unwrap());
        let mut empty_header = HeaderMap::new();
        empty_header.insert("x-warmroll-secret", "".parse().unwrap());
        for secret in ["s3cret", ""] {
            assert!(!authorised(secret, &HeaderMap::new(), &empty_query, b""));
            assert!(!authorised(secret, &HeaderMap::new(), &blank_query, b""));
            assert!(!authorised(secret, &empty_bearer, &none, b""));
            assert!(!authorised(secret, &empty_header, &none, b""));
        }
        // A configured empty secret: not even an HMAC made with the empty key passes.
        let mut signed = HeaderMap::new();
        signed.insert(
            "x-hub-signature-256",
            github_signature(b"", b"{}").parse().unwrap(),
        );
        assert!(!authorised("", &signed, &none, b"{}"));
    }

    #[test]
    fn empty_secret_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("webhook-secret");
        for blank in ["", "\n", "  \t\r\n"] {
            std::fs::write(&file, blank).unwrap();
            let err = read_secret(&file).unwrap_err();
            assert!(
                matches!(err, EngineError::EmptyWebhookSecret { .. }),
                "{err}"
            );
            assert!(
                err.to_string().contains(&file.display().to_string()),
                "{err}"
            );
        }
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(read_secret(&file).unwrap(), "s3cret");
        let missing = dir.path().join("missing");
        let err = read_secret(&missing).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    use crate::registry::strategies::{json_value, with_any_fields};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_payload_is_no_panic(body in any::<Vec<u8>>()) {
            let _ = pushed_tags(&body);
        }

        #[test]
        fn payloads_with_any_field_values_are_no_panic(
            payload in prop_oneof![
                json_value(),
                with_any_fields(
                    serde_json::json!({"events": [{"action": "push", "target": {"repository": "a", "tag": "b"}}]}),
                    &["events"],
                ),
                with_any_fields(
                    serde_json::json!({"push_data": {"tag": "t"}, "repository": {"repo_name": "r"}}),
                    &["push_data", "repository"],
                ),
                with_any_fields(
                    serde_json::json!({"type": "PUSH_ARTIFACT", "event_data": {}}),
                    &["type", "event_data"],
                ),
                with_any_fields(
                    serde_json::json!({"repository": "r", "updated_tags": []}),
                    &["repository", "updated_tags"],
                ),
                with_any_fields(
                    serde_json::json!({"action": "published", "registry_package": {}}),
                    &["action", "registry_package"],
                ),
                with_any_fields(
                    serde_json::json!({"domain": "docker", "event_type": "pushed", "data": {}}),
                    &["domain", "event_type", "data"],
                ),
            ],
        ) {
            let _ = pushed_tags(&serde_json::to_vec(&payload).unwrap());
        }

        #[test]
        fn no_presented_secret_but_the_secret_passes(
            offered in ".{0,40}",
            secret in "[!-~]{1,40}",
        ) {
            let query: HashMap<String, String> = [("secret".to_owned(), offered.clone())].into();
            prop_assert_eq!(
                authorised(&secret, &HeaderMap::new(), &query, b""),
                offered.trim() == secret
            );
        }
    }
}
