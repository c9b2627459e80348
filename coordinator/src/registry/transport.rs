//! HTTP to one registry: TLS (system roots plus configured CA bundles), plain HTTP
//! only for hosts configured insecure, timeouts, bounded bodies, and the
//! `Authorization` header from the distribution token flow, cached until the token
//! expires (at most [`MAX_TOKEN_LIFETIME`]).
//!
//! The token flow is run here rather than by oci-client: its `Client::auth` reads the
//! token server's answer, and its error bodies, without a size bound.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use warmroll_proto::image::ImageRef;

use super::cache::{self, Expiring};
use super::credentials::{AuthSecret, Credentials};
use super::error::RegistryError;
use super::manifest::ACCEPT;

/// How long a bearer token without `expires_in` or a JWT `exp` is used: the Docker token
/// spec's default `expires_in`.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// The longest a bearer token is used, whatever its `expires_in` or JWT `exp` claims (a
/// token server may say 2^63 seconds, or the year 9999): a token is fetched again at
/// least hourly, and no answer can push a deadline past what the clock holds.
pub(crate) const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// How long "no auth needed" / "basic auth" is remembered (a 401 re-learns sooner).
const NON_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Tokens are renewed this long before they expire.
const TOKEN_MARGIN: Duration = Duration::from_secs(5);
/// The largest token server answer read. A token is a few KiB (a JWT, perhaps with its
/// signing certificate); a bigger answer is a broken or hostile server, refused before
/// it fills memory, as manifests past [`super::ResolverConfig::max_manifest_bytes`] are.
pub(crate) const MAX_TOKEN_ANSWER_BYTES: u64 = 1024 * 1024;
const USER_AGENT: &str = concat!("warmroll-coordinator/", env!("CARGO_PKG_VERSION"));

#[derive(Clone)]
pub(crate) enum AuthHeader {
    Anonymous,
    Basic(Credentials),
    Bearer(String),
}

impl fmt::Debug for AuthHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthHeader::Anonymous => write!(f, "Anonymous"),
            AuthHeader::Basic(c) => write!(f, "Basic({})", c.username()),
            AuthHeader::Bearer(_) => write!(f, "Bearer(<redacted>)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct AuthKey {
    host: String,
    repository: String,
    identity: String,
}

/// Settings of the HTTP transport.
pub(crate) struct TransportConfig<'a> {
    pub insecure: &'a [String],
    pub ca_bundles_pem: &'a [Vec<u8>],
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub auth_cache_entries: u64,
}

pub(crate) struct Transport {
    http: reqwest::Client,
    insecure: Vec<String>,
    auth: moka::sync::Cache<AuthKey, Expiring<AuthHeader>>,
}

/// What the token server is asked with.
#[derive(Clone, Copy)]
enum Grant<'a> {
    Anonymous,
    /// A password: `GET <realm>` with Basic auth.
    Password(&'a Credentials, &'a str),
    /// An identity token: OAuth2's `POST <realm>` with `grant_type=refresh_token`.
    Refresh(&'a Credentials, &'a str),
}

impl Grant<'_> {
    /// For messages: never the secret.
    fn describe(self) -> &'static str {
        match self {
            Grant::Anonymous => "anonymous access",
            Grant::Password(..) => "the password",
            Grant::Refresh(..) => "the identity token",
        }
    }
}

impl Transport {
    pub(crate) fn new(config: &TransportConfig<'_>) -> Result<Self, RegistryError> {
        // reqwest is built without a default crypto provider; a second install fails
        // harmlessly when one is already there.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client_error = |reason: String| RegistryError::Client { reason };

        let mut roots = Vec::new();
        for bundle in config.ca_bundles_pem {
            let certs = reqwest::Certificate::from_pem_bundle(bundle)
                .map_err(|e| client_error(format!("bad CA certificate: {e}")))?;
            if certs.is_empty() {
                return Err(client_error(
                    "a CA bundle holds no PEM certificate".to_owned(),
                ));
            }
            roots.extend(certs);
        }
        let http = reqwest::Client::builder()
            .tls_certs_merge(roots)
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .user_agent(USER_AGENT)
            .build()
            .map_err(|e| client_error(error_chain(&e)))?;
        Ok(Transport {
            http,
            insecure: config.insecure.to_vec(),
            auth: cache::expiring(config.auth_cache_entries),
        })
    }

    fn scheme(&self, host: &str) -> &'static str {
        if self.insecure.iter().any(|h| h == host) {
            "http"
        } else {
            "https"
        }
    }

    /// The `Authorization` to use for `image`, from the cache or a fresh run of the
    /// token flow (`/v2/` challenge, then Bearer token or Basic).
    pub(crate) async fn authorization(
        &self,
        image: &ImageRef,
        credentials: Option<&Credentials>,
        refresh: bool,
    ) -> Result<AuthHeader, RegistryError> {
        let key = AuthKey {
            host: image.api_host().to_owned(),
            repository: image.repository().to_owned(),
            identity: credentials.map_or_else(|| "anonymous".to_owned(), Credentials::identity),
        };
        if !refresh && let Some(cached) = self.auth.get(&key) {
            return Ok(cached.value);
        }
        let grant = match credentials.map(|c| (c, c.secret())) {
            // Sent as it is: nothing to learn or cache.
            Some((_, AuthSecret::RegistryToken(token))) => {
                return Ok(AuthHeader::Bearer(token.clone()));
            }
            Some((c, AuthSecret::IdentityToken(token))) => Grant::Refresh(c, token),
            Some((c, AuthSecret::Password(password))) => Grant::Password(c, password),
            None => Grant::Anonymous,
        };
        let (header, lifetime) = self.token_flow(image, grant).await?;
        tracing::debug!(registry = image.api_host(), auth = ?header, ?lifetime, "registry authorization");
        self.auth.insert(
            key,
            Expiring {
                value: header.clone(),
                lifetime,
            },
        );
        Ok(header)
    }

    /// The distribution token flow, as docker and containerd run it: `GET /v2/`; a
    /// `Bearer` challenge names the token server, asked for a pull token of the
    /// repository (see [`Grant`]). Without a bearer challenge the registry takes the
    /// credentials as Basic auth (an identity token as the password of its user:
    /// Artifactory takes them so), or needs none.
    async fn token_flow(
        &self,
        image: &ImageRef,
        grant: Grant<'_>,
    ) -> Result<(AuthHeader, Duration), RegistryError> {
        let host = image.api_host();
        let ping = self
            .http
            .get(format!("{}://{host}/v2/", self.scheme(host)))
            .send()
            .await
            .map_err(|e| network_error(image, &e))?;
        let challenge = ping
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_bearer_challenge);
        let Some(challenge) = challenge else {
            let header = without_token_server(image, grant, ping.status().is_success())?;
            return Ok((header, NON_TOKEN_LIFETIME));
        };
        let response = self
            .token_request(image, &challenge, grant)?
            .send()
            .await
            .map_err(|e| network_error(image, &e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(auth_error(
                image,
                format!(
                    "the token server refused {} (HTTP {})",
                    grant.describe(),
                    status.as_u16()
                ),
            ));
        }
        let body = read_bounded(
            image,
            response,
            MAX_TOKEN_ANSWER_BYTES,
            "token server answer",
        )
        .await?;
        let (token, lifetime) = parse_token_answer(&body, SystemTime::now()).map_err(|reason| {
            bad_response(
                image,
                format!("token server sent no usable token: {reason}"),
            )
        })?;
        Ok((AuthHeader::Bearer(token), lifetime))
    }

    /// The request for a pull token of `image`'s repository at the challenge's realm: a
    /// `GET` with `scope` and `service` (Basic auth with a password), or for an identity
    /// token OAuth2's form `POST` (`grant_type=refresh_token`, as docker and containerd
    /// send it).
    fn token_request(
        &self,
        image: &ImageRef,
        challenge: &BearerChallenge,
        grant: Grant<'_>,
    ) -> Result<reqwest::RequestBuilder, RegistryError> {
        let mut realm = reqwest::Url::parse(&challenge.realm).map_err(|e| {
            bad_response(
                image,
                format!(
                    "the token server's realm {:?} is not a URL: {e}",
                    truncate(&challenge.realm, 100)
                ),
            )
        })?;
        let scope = format!("repository:{}:pull", image.repository());
        if let Grant::Refresh(_, refresh_token) = grant {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "refresh_token")
                .append_pair("client_id", "warmroll")
                .append_pair("scope", &scope)
                .append_pair("refresh_token", refresh_token);
            if let Some(service) = &challenge.service {
                form.append_pair("service", service);
            }
            return Ok(self
                .http
                .post(realm)
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(form.finish()));
        }
        {
            let mut query = realm.query_pairs_mut();
            query.append_pair("scope", &scope);
            if let Some(service) = &challenge.service {
                query.append_pair("service", service);
            }
        }
        let request = self.http.get(realm);
        Ok(match grant {
            Grant::Password(c, password) => request.basic_auth(c.username(), Some(password)),
            Grant::Anonymous | Grant::Refresh(..) => request,
        })
    }

    /// One manifest request (`reference` is a tag or a digest).
    pub(crate) async fn send(
        &self,
        method: Method,
        image: &ImageRef,
        reference: &str,
        auth: &AuthHeader,
        layout: Layout,
    ) -> Result<reqwest::Response, RegistryError> {
        let host = image.api_host();
        let url = format!(
            "{}://{host}{}",
            self.scheme(host),
            manifest_path(image.repository(), reference, layout)
        );
        let request = self
            .http
            .request(method, &url)
            .header(reqwest::header::ACCEPT, ACCEPT.join(", "));
        let request = match auth {
            AuthHeader::Anonymous => request,
            AuthHeader::Basic(c) => match c.secret() {
                AuthSecret::Password(p) | AuthSecret::IdentityToken(p) => {
                    request.basic_auth(c.username(), Some(p))
                }
                AuthSecret::RegistryToken(t) => request.bearer_auth(t),
            },
            AuthHeader::Bearer(token) => request.bearer_auth(token),
        };
        request.send().await.map_err(|e| network_error(image, &e))
    }
}

/// Where a registry serves manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// The distribution API: `/v2/<repository>/manifests/<reference>`.
    Standard,
    /// JFrog Artifactory's repository-path method, as kube-autorollout's
    /// `enableJfrogArtifactoryFallback` asks it: the repository's first path segment is
    /// the Artifactory repository key,
    /// `/artifactory/api/docker/<key>/v2/<repository>/manifests/<reference>`.
    ArtifactoryPath,
}

pub(crate) fn manifest_path(repository: &str, reference: &str, layout: Layout) -> String {
    match layout {
        Layout::Standard => format!("/v2/{repository}/manifests/{reference}"),
        Layout::ArtifactoryPath => {
            let key = repository.split('/').next().unwrap_or(repository);
            format!("/artifactory/api/docker/{key}/v2/{repository}/manifests/{reference}")
        }
    }
}

/// How long to use a bearer token: until the sooner of the answer's `expires_in` and
/// the token's JWT `exp`, or the spec's default without either; less a margin, and at
/// most [`MAX_TOKEN_LIFETIME`].
pub(crate) fn token_lifetime(token: &str, expires_in: Option<u64>, now: SystemTime) -> Duration {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let until_exp = jwt_exp(token).map(|exp| Duration::from_secs(exp).saturating_sub(since_epoch));
    let valid_for = match (expires_in.map(Duration::from_secs), until_exp) {
        (Some(a), Some(b)) => a.min(b),
        (Some(d), None) | (None, Some(d)) => d,
        (None, None) => DEFAULT_TOKEN_LIFETIME,
    };
    valid_for
        .saturating_sub(TOKEN_MARGIN)
        .min(MAX_TOKEN_LIFETIME)
}

/// A JWT's `exp` claim (seconds since the epoch), read without checking the signature:
/// only to know when to fetch a new token.
fn jwt_exp(token: &str) -> Option<u64> {
    token
        .split('.')
        .nth(1)
        .and_then(|payload| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload.trim_end_matches('='))
                .ok()
        })
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
        .and_then(|claims| claims.get("exp").and_then(serde_json::Value::as_u64))
}

/// The `Authorization` for a registry whose `/v2/` names no token server: the
/// credentials as Basic auth, or none. An identity token goes as the password of its
/// user; a registry that answered `/v2/` without asking for anything needs none.
fn without_token_server(
    image: &ImageRef,
    grant: Grant<'_>,
    ping_ok: bool,
) -> Result<AuthHeader, RegistryError> {
    match grant {
        Grant::Anonymous => Ok(AuthHeader::Anonymous),
        Grant::Password(c, _) => Ok(AuthHeader::Basic(c.clone())),
        Grant::Refresh(..) if ping_ok => Ok(AuthHeader::Anonymous),
        Grant::Refresh(c, _) if c.username().is_empty() => Err(auth_error(
            image,
            "the registry names no token server to trade the identity token at, and the \
             credential has no username for Basic auth"
                .to_owned(),
        )),
        Grant::Refresh(c, token) => Ok(AuthHeader::Basic(Credentials::new(c.username(), token))),
    }
}

/// A token server's answer: the token (OAuth2's `access_token`, else the Docker token
/// spec's `token`) and how long to use it ([`token_lifetime`]). Errors are reasons.
pub(crate) fn parse_token_answer(
    body: &[u8],
    now: SystemTime,
) -> Result<(String, Duration), String> {
    let answer: TokenAnswer = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let expires_in = answer
        .expires_in
        .as_ref()
        .and_then(serde_json::Value::as_u64);
    let token = answer
        .access_token
        .or(answer.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| "no access_token or token".to_owned())?;
    let lifetime = token_lifetime(&token, expires_in, now);
    Ok((token, lifetime))
}

/// A token server's answer (Docker token spec: `token`, OAuth2: `access_token`).
#[derive(serde::Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    /// Seconds; anything but a non-negative integer (a string, `-1`, `1e30`) is taken
    /// as absent rather than failing the token.
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) struct BearerChallenge {
    pub realm: String,
    pub service: Option<String>,
}

/// `Bearer realm="https://r/token",service="reg",scope="..."` (RFC 6750 §3); `None`
/// for another scheme or without a realm.
pub(crate) fn parse_bearer_challenge(header: &str) -> Option<BearerChallenge> {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut realm = None;
    let mut service = None;
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=')?;
        let name = name.trim().trim_start_matches(',').trim();
        let after = after.trim_start();
        let (value, tail) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"')?;
                (
                    quoted.get(..end)?.to_owned(),
                    quoted.get(end + 1..).unwrap_or_default(),
                )
            }
            None => match after.find(',') {
                Some(end) => (
                    after.get(..end)?.trim().to_owned(),
                    after.get(end..).unwrap_or_default(),
                ),
                None => (after.trim().to_owned(), ""),
            },
        };
        match name.to_ascii_lowercase().as_str() {
            "realm" => realm = Some(value),
            "service" => service = Some(value),
            _ => {}
        }
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Some(BearerChallenge {
        realm: realm.filter(|r| !r.is_empty())?,
        service,
    })
}

/// A reqwest error with its causes ("connection refused", "certificate unknown").
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// A response body of at most `limit` bytes (`what` names it in the error): refused at
/// once by its `Content-Length`, else as soon as the bytes read pass the limit.
pub(crate) async fn read_bounded(
    image: &ImageRef,
    mut response: reqwest::Response,
    limit: u64,
    what: &str,
) -> Result<Vec<u8>, RegistryError> {
    let too_big = |size: String| {
        bad_response(
            image,
            format!("{what} of {size} bytes exceeds the {limit}-byte limit"),
        )
    };
    if let Some(length) = response.content_length().filter(|&l| l > limit) {
        return Err(too_big(length.to_string()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| network_error(image, &e))?
    {
        let size = u64::try_from(body.len().saturating_add(chunk.len())).unwrap_or(u64::MAX);
        if size > limit {
            return Err(too_big("more than that".to_owned()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

pub(crate) fn bad_response(image: &ImageRef, reason: impl Into<String>) -> RegistryError {
    RegistryError::BadResponse {
        registry: image.api_host().to_owned(),
        image: image.to_string(),
        reason: truncate(&reason.into(), 300),
    }
}

fn auth_error(image: &ImageRef, reason: String) -> RegistryError {
    RegistryError::Auth {
        registry: image.api_host().to_owned(),
        image: image.to_string(),
        reason,
    }
}

pub(crate) fn network_error(image: &ImageRef, error: &reqwest::Error) -> RegistryError {
    let reason = if error.is_timeout() {
        format!("timed out: {}", error_chain(error))
    } else {
        error_chain(error)
    };
    RegistryError::Network {
        registry: image.api_host().to_owned(),
        image: image.to_string(),
        reason,
    }
}

pub(crate) fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", text.get(..i).unwrap_or_default()),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", enc(r#"{"alg":"none"}"#), enc(claims))
    }

    #[test]
    fn token_lifetime_from_expires_in_jwt_exp_or_default() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let secs = Duration::from_secs;
        let default = DEFAULT_TOKEN_LIFETIME - TOKEN_MARGIN;
        assert_eq!(
            token_lifetime(&jwt(r#"{"exp":1000300}"#), None, now),
            secs(295)
        );
        assert_eq!(
            token_lifetime(&jwt(r#"{"exp":999000}"#), None, now),
            Duration::ZERO
        );
        assert_eq!(token_lifetime(&jwt(r#"{"sub":"x"}"#), None, now), default);
        assert_eq!(token_lifetime("opaque-token", None, now), default);
        assert_eq!(token_lifetime("a.!!!.c", None, now), default);
        assert_eq!(token_lifetime("opaque-token", Some(120), now), secs(115));
        // The sooner of expires_in and exp.
        assert_eq!(
            token_lifetime(&jwt(r#"{"exp":1000300}"#), Some(120), now),
            secs(115)
        );
        assert_eq!(
            token_lifetime(&jwt(r#"{"exp":1000100}"#), Some(600), now),
            secs(95)
        );
    }

    #[test]
    fn token_lifetimes_are_capped() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        for (token, expires_in) in [
            ("opaque".to_owned(), Some(1 << 63)),
            ("opaque".to_owned(), Some(u64::MAX)),
            (jwt(r#"{"exp":253402300799}"#), None),
            (jwt(&format!(r#"{{"exp":{}}}"#, u64::MAX)), Some(u64::MAX)),
        ] {
            assert_eq!(token_lifetime(&token, expires_in, now), MAX_TOKEN_LIFETIME);
        }
        // A clock before the epoch is no panic either.
        let before = UNIX_EPOCH - Duration::from_secs(10);
        assert_eq!(
            token_lifetime("opaque", Some(1 << 63), before),
            MAX_TOKEN_LIFETIME
        );
    }

    #[test]
    fn token_answers_parse() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let parse = |body: &str| parse_token_answer(body.as_bytes(), now);
        assert_eq!(
            parse(r#"{"token":"t1","expires_in":120}"#),
            Ok(("t1".to_owned(), Duration::from_secs(115)))
        );
        assert_eq!(
            parse(r#"{"token":"t1","access_token":"a1"}"#),
            Ok(("a1".to_owned(), DEFAULT_TOKEN_LIFETIME - TOKEN_MARGIN))
        );
        // Absurd or malformed lifetimes: capped, or taken as absent.
        for expires_in in ["9223372036854775808", "18446744073709551615"] {
            let body = format!(r#"{{"token":"t","expires_in":{expires_in}}}"#);
            assert_eq!(parse(&body), Ok(("t".to_owned(), MAX_TOKEN_LIFETIME)));
        }
        for expires_in in ["-1", "1e30", "\"soon\"", "null", "[]"] {
            let body = format!(r#"{{"token":"t","expires_in":{expires_in}}}"#);
            assert_eq!(
                parse(&body),
                Ok(("t".to_owned(), DEFAULT_TOKEN_LIFETIME - TOKEN_MARGIN)),
                "{expires_in}"
            );
        }
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"token":""}"#,
            r#"{"token":5}"#,
            "<html>",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn registries_without_a_token_server() {
        let image = ImageRef::parse("reg.io/app:v1").unwrap();
        let password = Credentials::new("u", "pw");
        let identity = Credentials::identity_token("u", "refresh");
        let bare = Credentials::identity_token("", "refresh");
        let header = |grant, ok| format!("{:?}", without_token_server(&image, grant, ok));
        assert_eq!(header(Grant::Anonymous, false), "Ok(Anonymous)");
        assert_eq!(
            header(Grant::Password(&password, "pw"), true),
            "Ok(Basic(u))"
        );
        assert_eq!(
            header(Grant::Refresh(&identity, "refresh"), true),
            "Ok(Anonymous)"
        );
        assert_eq!(
            header(Grant::Refresh(&identity, "refresh"), false),
            "Ok(Basic(u))"
        );
        let err =
            without_token_server(&image, Grant::Refresh(&bare, "refresh"), false).unwrap_err();
        assert!(err.to_string().contains("no username"), "{err}");
        assert!(!err.to_string().contains("refresh"), "{err}");
    }

    #[test]
    fn auth_header_debug_hides_secrets() {
        let basic = AuthHeader::Basic(Credentials::new("alice", "pw-123"));
        let bearer = AuthHeader::Bearer("tok-456".into());
        let text = format!("{basic:?} {bearer:?}");
        assert!(
            !text.contains("pw-123") && !text.contains("tok-456"),
            "{text}"
        );
    }

    #[test]
    fn artifactory_repository_path_form() {
        assert_eq!(
            manifest_path("docker-local/team/app", "main", Layout::ArtifactoryPath),
            "/artifactory/api/docker/docker-local/v2/docker-local/team/app/manifests/main"
        );
        assert_eq!(
            manifest_path("app", "v1", Layout::ArtifactoryPath),
            "/artifactory/api/docker/app/v2/app/manifests/v1"
        );
        assert_eq!(
            manifest_path("team/app", "v1", Layout::Standard),
            "/v2/team/app/manifests/v1"
        );
    }

    #[test]
    fn bearer_challenges_parse() {
        assert_eq!(
            parse_bearer_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull,push""#
            ),
            Some(BearerChallenge {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into())
            })
        );
        assert_eq!(
            parse_bearer_challenge("bearer realm=https://r/t, scope=x"),
            Some(BearerChallenge {
                realm: "https://r/t".into(),
                service: None
            })
        );
        assert_eq!(parse_bearer_challenge(r#"Basic realm="x""#), None);
        assert_eq!(parse_bearer_challenge(r#"Bearer service="s""#), None);
        assert_eq!(
            parse_bearer_challenge(r#"Bearer realm="unterminated"#),
            None
        );
    }

    #[test]
    fn truncation_is_char_safe() {
        assert_eq!(truncate("ééé", 2), "éé…");
        assert_eq!(truncate("ab", 5), "ab");
    }

    use crate::registry::strategies::{json_value, with_any_fields};
    use proptest::prelude::*;

    /// A clock anywhere from before the epoch to the year 9999.
    fn any_now() -> impl Strategy<Value = SystemTime> {
        prop_oneof![
            (0..=253_402_300_799_u64).prop_map(|s| UNIX_EPOCH + Duration::from_secs(s)),
            (0..=1_u64 << 31).prop_map(|s| UNIX_EPOCH - Duration::from_secs(s)),
        ]
    }

    /// Opaque tokens and JWTs whose claims (`exp` above all) are any JSON.
    fn any_token() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,40}",
            json_value().prop_map(|exp| jwt(&serde_json::json!({ "exp": exp }).to_string())),
            json_value().prop_map(|claims| jwt(&claims.to_string())),
        ]
    }

    proptest! {
        #[test]
        fn any_token_answer_bytes_are_no_panic(body in any::<Vec<u8>>(), now in any_now()) {
            if let Ok((_, lifetime)) = parse_token_answer(&body, now) {
                prop_assert!(lifetime <= MAX_TOKEN_LIFETIME);
            }
        }

        #[test]
        fn token_answers_with_any_field_values_stay_within_the_cap(
            answer in any_token().prop_flat_map(|token| with_any_fields(
                serde_json::json!({ "token": token, "expires_in": 300 }),
                &["token", "access_token", "expires_in", "issued_at"],
            )),
            now in any_now(),
        ) {
            let body = serde_json::to_vec(&answer).unwrap();
            if let Ok((token, lifetime)) = parse_token_answer(&body, now) {
                prop_assert!(!token.is_empty());
                prop_assert!(lifetime <= MAX_TOKEN_LIFETIME);
            }
        }

        #[test]
        fn token_lifetimes_stay_within_the_cap(
            token in any_token(),
            expires_in in any::<Option<u64>>(),
            now in any_now(),
        ) {
            prop_assert!(token_lifetime(&token, expires_in, now) <= MAX_TOKEN_LIFETIME);
        }

        #[test]
        fn any_www_authenticate_is_no_panic(header in any::<String>()) {
            if let Some(challenge) = parse_bearer_challenge(&header) {
                prop_assert!(!challenge.realm.is_empty());
            }
        }

        #[test]
        fn bearer_challenges_give_back_their_realm_and_service(
            realm in "[^\"]{1,40}",
            service in "[^\"]{0,20}",
            scope in "[^\"]{0,20}",
        ) {
            let header = format!(r#"Bearer realm="{realm}",service="{service}",scope="{scope}""#);
            prop_assert_eq!(
                parse_bearer_challenge(&header),
                Some(BearerChallenge { realm, service: Some(service) })
            );
        }
    }
}
