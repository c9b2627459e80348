//! Registry resolution: a tag to its current digest, authenticated, multi-arch correct
//! and polite.
//!
//! ## What one resolution costs
//! One `HEAD /v2/<repo>/manifests/<tag>` (Accept: OCI index, Docker manifest list, OCI
//! manifest, Docker v2 manifest). The `Docker-Content-Digest` header is the answer and
//! `Content-Type` says whether it is an index. An index is fetched once by digest
//! (`GET .../manifests/<digest>`) and kept for good: it is content-addressed. Only when
//! a registry sends no `Docker-Content-Digest` is the manifest fetched by tag and its
//! body hashed. Concurrent and repeated resolutions of one reference (with one set of
//! credentials) share one request per [`ResolverConfig::min_interval`]
//! (single-flight plus cache). Every cache is bounded ([`ResolverConfig`]).
//!
//! ## Why the requests are thin reqwest calls, not oci-client's
//! `oci-client`'s manifest types parse indexes here. Its calls do not fit:
//! `fetch_manifest_digest` hides the status and headers (on a `429` it silently
//! retries with a GET, doubling the load on a registry that asked us to slow down, and
//! `Retry-After` is lost), returns no media type (so an index could not be told from a
//! single manifest without a second request), and `pull_manifest_raw` and the token
//! flow (`Client::auth`) read bodies without a size bound. So the token flow (the
//! `/v2/` challenge, the token server asked with anonymous, Basic or identity-token
//! credentials, Basic without a token server), the HEAD and the GET are single reqwest
//! requests whose bodies are read bounded (manifests by
//! [`ResolverConfig::max_manifest_bytes`], token answers by 1 MiB). The `Authorization`
//! is cached until the token expires, at most an hour; a `401` refreshes it once.
//!
//! ## Politeness
//! Per registry host: a token bucket, `429` + `Retry-After` honoured (the host is not
//! asked again before then, callers get [`RegistryError::RateLimited`] at once), and
//! exponential backoff with jitter after 5xx answers and network failures. Host state
//! sits behind its own short-held lock, never across an await, so a failing registry
//! does not slow the others; [`Resolver::health`] reports it.

mod cache;
mod credentials;
mod error;
mod manifest;
pub(crate) mod polite;
#[cfg(test)]
pub(crate) mod strategies;
mod transport;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, HeaderMap};
use tokio::time::Instant;
use warmroll_proto::image::{Digest, DigestAlgorithm, ImageRef, Tracking};

pub use credentials::{Credentials, Keyring, default_docker_config};
pub use error::RegistryError;
pub use manifest::{Child, Resolution, Resolved, digest_matches};
pub use polite::{HostHealth, Politeness};

use manifest::{ParsedManifest, is_index_media_type, is_known_media_type, media_type_of};
use polite::HostState;
use transport::{Layout, Transport, TransportConfig, bad_response, read_bounded};

const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// Resolver settings.
#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// Registry hosts (`host[:port]`, as in the API host) reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Extra trusted CA bundles (PEM), on top of the system roots.
    pub ca_bundles_pem: Vec<Vec<u8>>,
    /// Registry keys or globs (as credential keys) whose manifests not found at
    /// `host/repository` are tried in JFrog Artifactory's repository-path form.
    pub artifactory_fallback: Vec<String>,
    pub connect_timeout: Duration,
    /// Limit for a whole request (headers and body).
    pub request_timeout: Duration,
    /// A resolution is reused this long: at most one request per reference per interval.
    pub min_interval: Duration,
    /// Manifests larger than this are refused.
    pub max_manifest_bytes: u64,
    /// Index and manifest cache size (entries).
    pub manifest_cache_entries: u64,
    /// Resolutions kept (entries), and as many authorizations.
    pub resolution_cache_entries: u64,
    /// Registry hosts whose pacing and health are kept.
    pub max_hosts: u64,
    pub politeness: Politeness,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            insecure_registries: Vec::new(),
            ca_bundles_pem: Vec::new(),
            artifactory_fallback: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            min_interval: Duration::from_secs(30),
            // containerd's limit for manifests.
            max_manifest_bytes: 4 * 1024 * 1024,
            manifest_cache_entries: 4096,
            resolution_cache_entries: 10_000,
            max_hosts: 1024,
            politeness: Politeness::default(),
        }
    }
}

type FlightKey = (String, Vec<String>);

/// Resolves image references at their registries. Cheap to clone; share one per
/// coordinator.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    config: ResolverConfig,
    transport: Transport,
    keyring: Keyring,
    flights: moka::future::Cache<FlightKey, Result<Resolved, RegistryError>>,
    manifests: moka::sync::Cache<Digest, ParsedManifest>,
    hosts: moka::sync::Cache<String, Arc<Mutex<HostState>>>,
    requests: Family<Vec<(String, String)>, Counter>,
}

impl Resolver {
    /// A resolver using `keyring` (configured registries, the Docker config) for every
    /// image, after the pull secrets passed to [`Resolver::resolve`].
    pub fn new(config: ResolverConfig, keyring: Keyring) -> Result<Self, RegistryError> {
        let transport = Transport::new(&TransportConfig {
            insecure: &config.insecure_registries,
            ca_bundles_pem: &config.ca_bundles_pem,
            connect_timeout: config.connect_timeout,
            request_timeout: config.request_timeout,
            auth_cache_entries: config.resolution_cache_entries,
        })?;
        Ok(Resolver {
            inner: Arc::new(Inner {
                flights: cache::resolutions(config.min_interval, config.resolution_cache_entries),
                manifests: cache::manifests(config.manifest_cache_entries),
                hosts: cache::hosts(config.max_hosts),
                config,
                transport,
                keyring,
                requests: Family::default(),
            }),
        })
    }

    /// Registers `warmroll_registry_requests_total{host, outcome}`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "warmroll_registry_requests",
            "Requests to container registries by host and outcome",
            self.inner.requests.clone(),
        );
    }

    /// Health of every registry host asked in the last hour, sorted by host.
    pub fn health(&self) -> Vec<HostHealth> {
        let now = Instant::now();
        let mut health: Vec<HostHealth> = self
            .inner
            .hosts
            .iter()
            .map(|(host, state)| {
                let state = state.lock().unwrap_or_else(PoisonError::into_inner);
                state.health(&host, &self.inner.config.politeness, now)
            })
            .collect();
        health.sort_by(|a, b| a.host.cmp(&b.host));
        health
    }

    /// Resolves `image`: a pinned reference at once, a tag at its registry with the
    /// credentials `pull_secrets` has for it (then the resolver's own keyring; none
    /// means anonymous). Matching credentials are tried in order while the registry
    /// refuses them.
    #[tracing::instrument(skip_all, fields(image = %image))]
    pub async fn resolve(
        &self,
        image: &ImageRef,
        pull_secrets: &Keyring,
    ) -> Result<Resolution, RegistryError> {
        let tag = match image.tracking() {
            Tracking::Pinned(digest) => {
                return Ok(Resolution::Pinned {
                    image: image.clone(),
                    digest: digest.clone(),
                });
            }
            Tracking::Tag(tag) => tag.to_owned(),
        };
        let mut candidates: Vec<(Credentials, String)> = pull_secrets
            .matches(image)
            .into_iter()
            .chain(self.inner.keyring.matches(image))
            .map(|(c, origin)| (c.clone(), origin.to_owned()))
            .collect();
        candidates.dedup_by(|a, b| a.0 == b.0);
        let key: FlightKey = (
            image.to_string(),
            candidates.iter().map(|(c, _)| c.identity()).collect(),
        );
        let resolved = self
            .inner
            .flights
            .get_with(key, self.fetch_with_candidates(image, &tag, &candidates))
            .await?;
        Ok(Resolution::Tag(resolved))
    }

    async fn fetch_with_candidates(
        &self,
        image: &ImageRef,
        tag: &str,
        candidates: &[(Credentials, String)],
    ) -> Result<Resolved, RegistryError> {
        if candidates.is_empty() {
            return self.fetch(image, tag, None, "no credentials matched").await;
        }
        let mut last = None;
        for (credentials, origin) in candidates {
            let used = format!("credentials of {} from {origin}", credentials.describe());
            match self.fetch(image, tag, Some(credentials), &used).await {
                Err(e @ RegistryError::Auth { .. }) => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Auth {
            registry: image.api_host().to_owned(),
            image: image.to_string(),
            reason: "no credentials to try".to_owned(),
        }))
    }

    /// The tag at the registry; not found (or refused) there, in Artifactory's
    /// repository-path form when the registry is configured for that fallback.
    async fn fetch(
        &self,
        image: &ImageRef,
        tag: &str,
        credentials: Option<&Credentials>,
        used: &str,
    ) -> Result<Resolved, RegistryError> {
        let standard = self
            .fetch_at(image, tag, credentials, used, Layout::Standard)
            .await;
        let fallback = self
            .inner
            .config
            .artifactory_fallback
            .iter()
            .any(|pattern| credentials::pattern_matches(pattern, image));
        match standard {
            // Not found, or refused as Artifactory refuses unknown paths (a 401 is where
            // kube-autorollout falls back).
            Err(e @ (RegistryError::NotFound { .. } | RegistryError::Auth { .. })) if fallback => {
                tracing::debug!(error = %e, "trying Artifactory's repository-path form");
                match self
                    .fetch_at(image, tag, credentials, used, Layout::ArtifactoryPath)
                    .await
                {
                    // Not there either: the first answer says more.
                    Err(RegistryError::NotFound { .. }) => Err(e),
                    other => other,
                }
            }
            other => other,
        }
    }

    async fn fetch_at(
        &self,
        image: &ImageRef,
        tag: &str,
        credentials: Option<&Credentials>,
        used: &str,
        layout: Layout,
    ) -> Result<Resolved, RegistryError> {
        let head = self
            .exchange(Method::HEAD, image, tag, credentials, used, layout)
            .await?;
        let header_media_type = content_type(head.headers());
        let header_digest = head
            .headers()
            .get(DOCKER_CONTENT_DIGEST)
            .map(|v| {
                v.to_str()
                    .map_err(|_| "Docker-Content-Digest is not text".to_owned())
                    .and_then(|s| Digest::parse(s.trim()).map_err(|e| e.to_string()))
            })
            .transpose()
            .map_err(|reason| bad_response(image, reason))?;
        let (digest, parsed) = match header_digest {
            Some(digest) => {
                let parsed = match header_media_type {
                    Some(m) if is_known_media_type(&m) && !is_index_media_type(&m) => {
                        ParsedManifest {
                            media_type: m,
                            children: Arc::from([]),
                        }
                    }
                    _ => {
                        self.manifest_by_digest(image, &digest, credentials, used, layout)
                            .await?
                    }
                };
                (digest, parsed)
            }
            None => {
                tracing::debug!(
                    "no Docker-Content-Digest on HEAD; fetching the manifest to hash it"
                );
                let get = self
                    .exchange(Method::GET, image, tag, credentials, used, layout)
                    .await?;
                let media_type = content_type(get.headers());
                let body = self.read_manifest(image, get).await?;
                let digest = manifest::sha256_of(&body).map_err(|r| bad_response(image, r))?;
                let parsed = manifest::parse_manifest(&body, media_type.as_deref())
                    .map_err(|r| bad_response(image, r))?;
                self.inner.manifests.insert(digest.clone(), parsed.clone());
                (digest, parsed)
            }
        };
        tracing::debug!(%digest, media_type = %parsed.media_type, children = parsed.children.len(), "resolved");
        Ok(Resolved {
            image: image.clone(),
            digest,
            media_type: parsed.media_type,
            children: parsed.children,
        })
    }

    /// A manifest by digest: from the content-addressed cache, or one GET, verified
    /// against the digest.
    async fn manifest_by_digest(
        &self,
        image: &ImageRef,
        digest: &Digest,
        credentials: Option<&Credentials>,
        used: &str,
        layout: Layout,
    ) -> Result<ParsedManifest, RegistryError> {
        if let Some(parsed) = self.inner.manifests.get(digest) {
            return Ok(parsed);
        }
        let get = self
            .exchange(
                Method::GET,
                image,
                &digest.to_string(),
                credentials,
                used,
                layout,
            )
            .await?;
        let media_type = content_type(get.headers());
        let body = self.read_manifest(image, get).await?;
        let actual = match digest.algorithm() {
            DigestAlgorithm::Sha256 => manifest::sha256_of(&body),
            DigestAlgorithm::Sha512 => manifest::sha512_of(&body),
        }
        .map_err(|r| bad_response(image, r))?;
        if actual != *digest {
            return Err(bad_response(
                image,
                format!("manifest {digest} has content hashing to {actual}"),
            ));
        }
        let parsed = manifest::parse_manifest(&body, media_type.as_deref())
            .map_err(|r| bad_response(image, r))?;
        self.inner.manifests.insert(digest.clone(), parsed.clone());
        Ok(parsed)
    }

    async fn read_manifest(
        &self,
        image: &ImageRef,
        response: reqwest::Response,
    ) -> Result<Vec<u8>, RegistryError> {
        let limit = self.inner.config.max_manifest_bytes;
        read_bounded(image, response, limit, "manifest").await
    }

    fn host_state(&self, host: &str) -> Arc<Mutex<HostState>> {
        self.inner.hosts.get_with_by_ref(host, || {
            Arc::new(Mutex::new(HostState::new(
                &self.inner.config.politeness,
                Instant::now(),
            )))
        })
    }

    /// Waits for the host's token bucket, or fails at once while it is rate-limited or
    /// backing off.
    async fn admit(&self, state: &Mutex<HostState>, host: &str) -> Result<(), RegistryError> {
        loop {
            let wait = {
                let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
                state.admit(host, Instant::now())?
            };
            match wait {
                None => return Ok(()),
                Some(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    fn count(&self, host: &str, outcome: &str) {
        self.inner
            .requests
            .get_or_create(&vec![
                ("host".to_owned(), host.to_owned()),
                ("outcome".to_owned(), outcome.to_owned()),
            ])
            .inc();
    }

    /// One request with pacing, auth (a 401 refreshes the token once), status
    /// classification and host bookkeeping.
    async fn exchange(
        &self,
        method: Method,
        image: &ImageRef,
        reference: &str,
        credentials: Option<&Credentials>,
        used: &str,
        layout: Layout,
    ) -> Result<reqwest::Response, RegistryError> {
        let host = image.api_host();
        let state = self.host_state(host);
        let politeness = &self.inner.config.politeness;
        let mut refreshed = false;
        loop {
            self.admit(&state, host).await?;
            let auth = self
                .inner
                .transport
                .authorization(image, credentials, refreshed)
                .await
                .inspect_err(|e| self.note_failure(&state, e))?;
            tracing::debug!(%method, registry = host, reference, "registry request");
            let result = self
                .inner
                .transport
                .send(method.clone(), image, reference, &auth, layout)
                .await;
            let now = Instant::now();
            let response = match result {
                Ok(response) => response,
                Err(e) => {
                    self.count(host, e.kind());
                    self.note_failure(&state, &e);
                    return Err(e);
                }
            };
            let status = response.status().as_u16();
            if status == 401 && !refreshed {
                self.count(host, "auth");
                tracing::debug!(registry = host, "401: refreshing authorization once");
                refreshed = true;
                continue;
            }
            if status == 429 {
                let retry_after = polite::retry_after(response.headers(), SystemTime::now())
                    .unwrap_or(politeness.default_retry_after);
                let error = state
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .rate_limited(host, now, retry_after);
                self.count(host, error.kind());
                tracing::warn!(registry = host, ?retry_after, "registry rate-limited us");
                return Err(error);
            }
            let outcome = classify(status, image, used);
            self.count(host, outcome.as_ref().map_or_else(|e| e.kind(), |()| "ok"));
            match &outcome {
                Ok(()) => state.lock().unwrap_or_else(PoisonError::into_inner).record(
                    Ok(()),
                    politeness,
                    now,
                    0.0,
                ),
                Err(e) => self.note_failure(&state, e),
            }
            return outcome.map(|()| response);
        }
    }

    fn note_failure(&self, state: &Mutex<HostState>, error: &RegistryError) {
        tracing::warn!(error = %error, "registry request failed");
        let jitter: f64 = rand::random();
        state.lock().unwrap_or_else(PoisonError::into_inner).record(
            Err(error),
            &self.inner.config.politeness,
            Instant::now(),
            jitter,
        );
    }
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| media_type_of(v).to_owned())
        .filter(|m| !m.is_empty())
}

/// What a manifest response status means (429 is handled before, with its header).
fn classify(status: u16, image: &ImageRef, used: &str) -> Result<(), RegistryError> {
    let registry = image.api_host().to_owned();
    match status {
        200..=299 => Ok(()),
        401 => Err(RegistryError::Auth {
            registry,
            image: image.to_string(),
            reason: format!("registry answered 401 Unauthorized ({used})"),
        }),
        403 => Err(RegistryError::Auth {
            registry,
            image: image.to_string(),
            reason: format!("registry answered 403 Forbidden ({used})"),
        }),
        404 => Err(RegistryError::NotFound {
            registry,
            image: image.to_string(),
        }),
        500..=599 => Err(RegistryError::Server {
            registry,
            image: image.to_string(),
            status,
        }),
        other => Err(RegistryError::BadResponse {
            registry,
            image: image.to_string(),
            reason: format!("unexpected HTTP status {other}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_reasons() {
        let image = ImageRef::parse("reg.io/app:v1").unwrap();
        let kind = |s| {
            classify(s, &image, "no credentials matched")
                .err()
                .map(|e| e.kind())
        };
        assert_eq!(kind(200), None);
        assert_eq!(kind(401), Some("auth"));
        assert_eq!(kind(403), Some("auth"));
        assert_eq!(kind(404), Some("not_found"));
        assert_eq!(kind(502), Some("server_error"));
        assert_eq!(kind(302), Some("bad_response"));
        let err = classify(401, &image, "no credentials matched").unwrap_err();
        assert!(err.to_string().contains("reg.io"), "{err}");
        assert!(err.to_string().contains("no credentials matched"), "{err}");
        assert!(!err.is_registry_failure());
        assert!(classify(503, &image, "").unwrap_err().is_registry_failure());
    }

    #[tokio::test]
    async fn pinned_references_need_no_request() {
        let resolver = Resolver::new(ResolverConfig::default(), Keyring::new()).unwrap();
        let digest = format!("sha256:{}", "a".repeat(64));
        let image = ImageRef::parse(&format!("unreachable.invalid/app@{digest}")).unwrap();
        let resolution = resolver.resolve(&image, &Keyring::new()).await.unwrap();
        assert_eq!(
            resolution,
            Resolution::Pinned {
                image: image.clone(),
                digest: Digest::parse(&digest).unwrap()
            }
        );
        assert!(resolver.health().is_empty(), "no registry was asked");
    }

    #[test]
    fn bad_ca_bundles_are_refused() {
        let config = ResolverConfig {
            ca_bundles_pem: vec![b"not a certificate".to_vec()],
            ..ResolverConfig::default()
        };
        let err = Resolver::new(config, Keyring::new()).err().unwrap();
        assert_eq!(err.kind(), "client");
    }
}
