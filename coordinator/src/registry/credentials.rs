//! Registry credentials: Kubernetes `imagePullSecrets` (`.dockerconfigjson`,
//! `.dockercfg`), a mounted Docker `config.json`, and configured registries (hostname
//! glob to a mounted secret), each a username and password, an identity token (OAuth2
//! refresh token) or a bearer token, looked up for an image the way kubelet's
//! `credentialprovider` keyring does:
//!
//! - keys lose their scheme; `/v1/` and `/v2/` path prefixes mean "the host"
//!   (`https://index.docker.io/v1/` is the key `index.docker.io`);
//! - a key matches an image when the ports are equal, the host has as many
//!   `.`-separated parts and each part matches as a glob (`*`, `?`), and the key's path
//!   is a prefix of the image's repository path;
//! - more specific keys come first (keys sorted in reverse);
//! - with no match, a Docker Hub image takes the `index.docker.io` entry.
//!
//! Passwords and tokens never reach `Debug` or a log line.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use warmroll_proto::image::ImageRef;
use wildmatch::WildMatch;

use super::error::RegistryError;

const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";
const DOCKERCFG_KEY: &str = ".dockercfg";
const DOCKER_CONFIG_FILE: &str = "config.json";
const TOKEN_KEY: &str = "token";
const USERNAME_KEY: &str = "username";
const PASSWORD_KEY: &str = "password";
const DEFAULT_REGISTRY_HOST: &str = "index.docker.io";

/// What a credential proves itself with.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum AuthSecret {
    /// A password (or a personal access token used as one): Basic auth, or the token
    /// server's GET with Basic credentials.
    Password(String),
    /// Docker's `identitytoken`: an OAuth2 refresh token the token server trades for an
    /// access token (`grant_type=refresh_token`).
    IdentityToken(String),
    /// Docker's `registrytoken` (and a token without a username): sent as
    /// `Authorization: Bearer` as it is.
    RegistryToken(String),
}

/// Credentials for one registry: a username and password, an identity (refresh) token,
/// or a bearer token. `Debug` redacts the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    username: String,
    secret: AuthSecret,
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            username: username.into(),
            secret: AuthSecret::Password(password.into()),
        }
    }

    /// An identity token (OAuth2 refresh token); `username` may be empty.
    pub fn identity_token(username: impl Into<String>, token: impl Into<String>) -> Self {
        Credentials {
            username: username.into(),
            secret: AuthSecret::IdentityToken(token.into()),
        }
    }

    /// A bearer token sent to the registry as it is.
    pub fn registry_token(token: impl Into<String>) -> Self {
        Credentials {
            username: String::new(),
            secret: AuthSecret::RegistryToken(token.into()),
        }
    }

    /// The username; empty for a bearer token (and possibly an identity token).
    pub fn username(&self) -> &str {
        &self.username
    }

    pub(crate) fn secret(&self) -> &AuthSecret {
        &self.secret
    }

    /// What kind of credential this is, for messages: never the secret.
    pub(crate) fn describe(&self) -> String {
        match &self.secret {
            AuthSecret::Password(_) => format!("user {:?}", self.username),
            AuthSecret::IdentityToken(_) if self.username.is_empty() => {
                "an identity token".to_owned()
            }
            AuthSecret::IdentityToken(_) => {
                format!("an identity token of user {:?}", self.username)
            }
            AuthSecret::RegistryToken(_) => "a registry token".to_owned(),
        }
    }

    /// The form a warm order carries to the node's runtime (CRI `AuthConfig`): a
    /// password as Basic, an identity token as such (containerd trades it at the token
    /// server), a bearer token as CRI's `registry_token`.
    pub fn to_wire(&self) -> warmroll_proto::fleet::Credentials {
        use warmroll_proto::fleet::Credentials as Wire;
        match &self.secret {
            AuthSecret::Password(password) => Wire::Basic {
                username: self.username.clone(),
                password: password.clone(),
            },
            AuthSecret::IdentityToken(token) => Wire::IdentityToken(token.clone()),
            AuthSecret::RegistryToken(token) => Wire::Token(token.clone()),
        }
    }

    /// Which of the credentials matching an image a warm order carries: the first that
    /// the node's runtime can pull with. containerd (1.6, 1.7) ignores CRI's
    /// `registry_token`, so a bearer token is sent only when nothing else matches.
    pub fn for_warm_order<'a>(found: &[&'a Credentials]) -> Option<&'a Credentials> {
        found
            .iter()
            .find(|c| !matches!(c.secret, AuthSecret::RegistryToken(_)))
            .or(found.first())
            .copied()
    }

    /// A stable identity for cache keys that reveals nothing of the secret.
    pub(crate) fn identity(&self) -> String {
        let (kind, secret) = match &self.secret {
            AuthSecret::Password(s) => ("password", s),
            AuthSecret::IdentityToken(s) => ("identity-token", s),
            AuthSecret::RegistryToken(s) => ("registry-token", s),
        };
        let mut hash = Sha256::new();
        hash.update(kind.as_bytes());
        hash.update([0]);
        hash.update(self.username.as_bytes());
        hash.update([0]);
        hash.update(secret.as_bytes());
        let hex = hex::encode(hash.finalize());
        format!(
            "{}:{kind}:{}",
            self.username,
            hex.get(..16).unwrap_or_default()
        )
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.secret {
            AuthSecret::Password(_) => "password",
            AuthSecret::IdentityToken(_) => "identity token",
            AuthSecret::RegistryToken(_) => "registry token",
        };
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field(kind, &"<redacted>")
            .finish()
    }
}

#[derive(Clone, Debug)]
struct KeyringEntry {
    /// Schemeless `host[:port][/path]`, the host possibly with globs.
    key: String,
    credentials: Credentials,
    origin: String,
}

/// Credentials indexed by registry key, looked up as kubelet does.
#[derive(Clone, Debug, Default)]
pub struct Keyring {
    entries: Vec<KeyringEntry>,
}

#[derive(Deserialize)]
struct DockerConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, DockerConfigEntry>,
}

#[derive(Deserialize)]
struct DockerConfigEntry {
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

impl DockerConfigEntry {
    /// A `registrytoken` (bearer as is) wins, then an `identitytoken` (with the user of
    /// `auth`/`username`, as `docker login` stores it), then kubelet's rule: a non-empty
    /// `auth` (base64 `user:password`) wins over the fields.
    fn credentials(&self) -> Result<Option<Credentials>, String> {
        let non_empty = |v: &Option<String>| v.clone().filter(|t| !t.is_empty());
        if let Some(token) = non_empty(&self.registrytoken) {
            return Ok(Some(Credentials::registry_token(token)));
        }
        let basic = self.basic()?;
        if let Some(token) = non_empty(&self.identitytoken) {
            let user = basic
                .map(|(user, _)| user)
                .or_else(|| non_empty(&self.username))
                .unwrap_or_default();
            return Ok(Some(Credentials::identity_token(user, token)));
        }
        Ok(basic.map(|(user, password)| Credentials::new(user, password)))
    }

    fn basic(&self) -> Result<Option<(String, String)>, String> {
        if let Some(auth) = self.auth.as_deref().filter(|a| !a.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| "\"auth\" is not base64".to_owned())?;
            let decoded =
                String::from_utf8(decoded).map_err(|_| "\"auth\" is not UTF-8".to_owned())?;
            let (user, password) = decoded
                .split_once(':')
                .ok_or_else(|| "\"auth\" is not user:password".to_owned())?;
            return Ok(Some((user.to_owned(), password.to_owned())));
        }
        match (&self.username, &self.password) {
            (Some(user), Some(password)) if !user.is_empty() => {
                Ok(Some((user.clone(), password.clone())))
            }
            // An entry with only an email carries nothing we use.
            _ => Ok(None),
        }
    }
}

impl Keyring {
    pub fn new() -> Self {
        Keyring::default()
    }

    /// Adds credentials under a registry key (`https://host/v1/`, `host:port/path`,
    /// `*.example.com`). `origin` says where they came from, for error messages.
    pub fn add(&mut self, key: &str, credentials: Credentials, origin: &str) {
        self.entries.push(KeyringEntry {
            key: normalise_key(key),
            credentials,
            origin: origin.to_owned(),
        });
        // Reverse order puts `quay.io/coreos` before `quay.io` (kubelet's ordering);
        // the sort is stable, so entries under one key keep their order.
        self.entries.sort_by(|a, b| b.key.cmp(&a.key));
    }

    /// Adds the `auths` of a Docker `config.json` / `.dockerconfigjson`.
    pub fn add_docker_config_json(
        &mut self,
        origin: &str,
        json: &[u8],
    ) -> Result<(), RegistryError> {
        let file: DockerConfigFile =
            serde_json::from_slice(json).map_err(|e| credentials_error(origin, e))?;
        self.add_entries(origin, file.auths)
    }

    /// Adds a legacy `.dockercfg` (a bare key-to-entry map).
    pub fn add_dockercfg(&mut self, origin: &str, json: &[u8]) -> Result<(), RegistryError> {
        let entries: BTreeMap<String, DockerConfigEntry> =
            serde_json::from_slice(json).map_err(|e| credentials_error(origin, e))?;
        self.add_entries(origin, entries)
    }

    fn add_entries(
        &mut self,
        origin: &str,
        entries: BTreeMap<String, DockerConfigEntry>,
    ) -> Result<(), RegistryError> {
        for (key, entry) in entries {
            let credentials = entry
                .credentials()
                .map_err(|reason| credentials_error(origin, format!("entry {key:?}: {reason}")))?;
            if let Some(credentials) = credentials {
                self.add(&key, credentials, origin);
            }
        }
        Ok(())
    }

    /// Adds an `imagePullSecret` (data `.dockerconfigjson` or `.dockercfg`, as kubelet
    /// reads them regardless of the secret's type).
    pub fn add_pull_secret(&mut self, secret: &Secret) -> Result<(), RegistryError> {
        let origin = secret_name(secret);
        let data = secret.data.as_ref();
        if let Some(json) = data.and_then(|d| d.get(DOCKER_CONFIG_JSON_KEY)) {
            self.add_docker_config_json(&origin, &json.0)
        } else if let Some(cfg) = data.and_then(|d| d.get(DOCKERCFG_KEY)) {
            self.add_dockercfg(&origin, &cfg.0)
        } else {
            Err(credentials_error(
                &origin,
                format!("has neither {DOCKER_CONFIG_JSON_KEY} nor {DOCKERCFG_KEY}"),
            ))
        }
    }

    /// Adds a configured registry (`registry.registries[]`): the credentials its secret
    /// holds are used for hosts matching `host_glob`. `data` is the secret's keys, by
    /// what they hold:
    /// - `.dockerconfigjson`, `.dockercfg` or `config.json`: every entry of that Docker
    ///   config (a pull secret, krar's generic Secret);
    /// - `token_key` (default `token`), with `username` from the secret or `username`:
    ///   kube-autorollout's Opaque secret. With a username the token is a password (a
    ///   personal access token, traded at the token server); without, a bearer token
    ///   sent as it is;
    /// - `username` and `password`: a `kubernetes.io/basic-auth` secret.
    pub fn add_registry_secret(
        &mut self,
        host_glob: &str,
        origin: &str,
        data: &BTreeMap<String, Vec<u8>>,
        token_key: Option<&str>,
        username: Option<&str>,
    ) -> Result<(), RegistryError> {
        let text = |key: &str| {
            data.get(key)
                .map(|v| {
                    String::from_utf8(v.clone())
                        .map(|t| t.trim_end_matches(['\n', '\r']).to_owned())
                        .map_err(|_| credentials_error(origin, format!("{key} is not UTF-8")))
                })
                .transpose()
        };
        let mut inner = Keyring::new();
        if let Some(json) = data
            .get(DOCKER_CONFIG_JSON_KEY)
            .or_else(|| data.get(DOCKER_CONFIG_FILE))
        {
            inner.add_docker_config_json(origin, json)?;
        } else if let Some(cfg) = data.get(DOCKERCFG_KEY) {
            inner.add_dockercfg(origin, cfg)?;
        } else if let Some(token) = text(token_key.unwrap_or(TOKEN_KEY))? {
            let user = match username {
                Some(user) => Some(user.to_owned()),
                None => text(USERNAME_KEY)?,
            };
            let credentials = match user.filter(|u| !u.is_empty()) {
                Some(user) => Credentials::new(user, token),
                None => Credentials::registry_token(token),
            };
            inner.add(host_glob, credentials, origin);
        } else if let (Some(user), Some(password)) = (text(USERNAME_KEY)?, text(PASSWORD_KEY)?) {
            inner.add(host_glob, Credentials::new(user, password), origin);
        } else {
            let expected = format!(
                "{DOCKER_CONFIG_JSON_KEY}, {DOCKERCFG_KEY}, {DOCKER_CONFIG_FILE}, {}, or {USERNAME_KEY} and {PASSWORD_KEY}",
                token_key.unwrap_or(TOKEN_KEY)
            );
            return Err(credentials_error(
                origin,
                format!("holds none of the keys {expected}"),
            ));
        }
        for entry in inner.entries {
            self.add(host_glob, entry.credentials, origin);
        }
        Ok(())
    }

    /// [`Keyring::add_registry_secret`] for a Secret mounted as a directory (one file per
    /// key; kubelet's `..data` entries are skipped).
    pub fn add_registry_dir(
        &mut self,
        host_glob: &str,
        dir: &Path,
        token_key: Option<&str>,
        username: Option<&str>,
    ) -> Result<(), RegistryError> {
        let origin = format!("secret directory {}", dir.display());
        let mut data = BTreeMap::new();
        let entries = std::fs::read_dir(dir).map_err(|e| credentials_error(&origin, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| credentials_error(&origin, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with("..") || !path.is_file() {
                continue;
            }
            let bytes = std::fs::read(&path)
                .map_err(|e| credentials_error(&origin, format!("{name}: {e}")))?;
            data.insert(name, bytes);
        }
        self.add_registry_secret(host_glob, &origin, &data, token_key, username)
    }

    /// Reads a Docker `config.json`: `path` is the file, or a directory holding
    /// `config.json` (what `DOCKER_CONFIG` names).
    pub fn add_docker_config_path(&mut self, path: &Path) -> Result<(), RegistryError> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_owned()
        };
        let origin = file.display().to_string();
        let json = std::fs::read(&file).map_err(|e| credentials_error(&origin, e))?;
        self.add_docker_config_json(&origin, &json)
    }

    /// Reads the Docker config of the process's home when present: `file` missing is no
    /// credentials (`Ok(false)`), unreadable or malformed an error naming it.
    pub fn add_docker_config_if_present(&mut self, file: &Path) -> Result<bool, RegistryError> {
        let origin = file.display().to_string();
        match std::fs::read(file) {
            Ok(json) => self.add_docker_config_json(&origin, &json).map(|()| true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(credentials_error(&origin, e)),
        }
    }

    /// The credentials to try for `image`, most specific first; empty means anonymous.
    pub fn lookup(&self, image: &ImageRef) -> Vec<&Credentials> {
        self.matches(image).into_iter().map(|(c, _)| c).collect()
    }

    /// [`Keyring::lookup`] with where each credential came from (for messages).
    pub(crate) fn matches(&self, image: &ImageRef) -> Vec<(&Credentials, &str)> {
        let target = key_target(image);
        fn pick(e: &KeyringEntry) -> (&Credentials, &str) {
            (&e.credentials, e.origin.as_str())
        }
        let matched: Vec<_> = self
            .entries
            .iter()
            .filter(|e| key_matches(&e.key, &target))
            .map(pick)
            .collect();
        if !matched.is_empty() || !is_default_registry(image) {
            return matched;
        }
        self.entries
            .iter()
            .filter(|e| e.key == DEFAULT_REGISTRY_HOST)
            .map(pick)
            .collect()
    }
}

/// The Docker config docker, skopeo and krar read when none is named:
/// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`; `None` without either
/// variable.
pub fn default_docker_config(env: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let set = |name: &str| env(name).filter(|v| !v.is_empty());
    if let Some(dir) = set("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join(DOCKER_CONFIG_FILE));
    }
    set("HOME").map(|home| PathBuf::from(home).join(".docker").join(DOCKER_CONFIG_FILE))
}

fn credentials_error(origin: &str, reason: impl fmt::Display) -> RegistryError {
    RegistryError::Credentials {
        origin: origin.to_owned(),
        reason: reason.to_string(),
    }
}

fn secret_name(secret: &Secret) -> String {
    format!(
        "secret {}/{}",
        secret.metadata.namespace.as_deref().unwrap_or_default(),
        secret.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Whether a registry key or glob (`*.corp.io`, `reg:5000/team`) covers `image`, as a
/// keyring entry under it would.
pub(crate) fn pattern_matches(pattern: &str, image: &ImageRef) -> bool {
    key_matches(&normalise_key(pattern), &key_target(image))
}

/// What keys are matched against: `registry/repository`.
fn key_target(image: &ImageRef) -> String {
    format!("{}/{}", image.registry(), image.repository())
}

fn is_default_registry(image: &ImageRef) -> bool {
    image.registry() == warmroll_proto::image::DOCKER_HUB
}

/// kubelet's `BasicDockerKeyring.Add`: scheme stripped; `/v1/`, `/v2/` mean the host.
fn normalise_key(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let (host, path) = split_host_path(key);
    let path = if path.starts_with("/v1/") || path.starts_with("/v2/") {
        path.get(3..).unwrap_or_default()
    } else {
        path
    };
    if path.is_empty() || path == "/" {
        host.to_owned()
    } else {
        format!("{host}{path}")
    }
}

/// kubelet's `URLsMatch` on schemeless `host[:port][/path]` strings: the ports equal,
/// the key's path a prefix of the target's, and the hosts with as many `.`-separated
/// labels, each matching as a glob (`*` any run within the label, `?` one character,
/// ASCII case ignored). The globs come from pull secrets anyone who may write a Secret
/// controls, and are matched in the engine's loop: `wildmatch` matches without
/// backtracking past the last `*`, so a label costs at most its length times the glob's.
fn key_matches(key: &str, target: &str) -> bool {
    let (key_host, key_path) = split_host_path(key);
    let (target_host, target_path) = split_host_path(target);
    let (key_host, key_port) = split_port(key_host);
    let (target_host, target_port) = split_port(target_host);
    if key_port != target_port || !target_path.starts_with(key_path) {
        return false;
    }
    let key_parts: Vec<&str> = key_host.split('.').collect();
    let target_parts: Vec<&str> = target_host.split('.').collect();
    key_parts.len() == target_parts.len()
        && key_parts
            .iter()
            .zip(&target_parts)
            .all(|(glob, part)| WildMatch::new_case_insensitive(glob).matches(part))
}

fn split_host_path(s: &str) -> (&str, &str) {
    match s.find('/') {
        Some(i) => s.split_at(i),
        None => (s, ""),
    }
}

fn split_port(host: &str) -> (&str, &str) {
    if host.starts_with('[') {
        // [IPv6]:port
        return match host.rfind("]:") {
            Some(i) => (
                host.get(..=i).unwrap_or(host),
                host.get(i + 2..).unwrap_or_default(),
            ),
            None => (host, ""),
        };
    }
    host.rsplit_once(':').unwrap_or((host, ""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn image(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap()
    }

    fn users(keyring: &Keyring, img: &str) -> Vec<String> {
        keyring
            .lookup(&image(img))
            .iter()
            .map(|c| c.username().to_owned())
            .collect()
    }

    fn secret(key: &str, value: &str, type_: Option<&str>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("pull".into()),
                namespace: Some("apps".into()),
                ..Default::default()
            },
            type_: type_.map(str::to_owned),
            data: Some(BTreeMap::from([(
                key.to_owned(),
                ByteString(value.as_bytes().to_vec()),
            )])),
            ..Default::default()
        }
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn keys_are_normalised_like_kubelet() {
        assert_eq!(
            normalise_key("https://index.docker.io/v1/"),
            "index.docker.io"
        );
        assert_eq!(normalise_key("http://reg:5000/v2/"), "reg:5000");
        assert_eq!(normalise_key("reg.io"), "reg.io");
        assert_eq!(normalise_key("reg.io/team"), "reg.io/team");
        assert_eq!(
            normalise_key("https://reg.io/v2/team/app"),
            "reg.io/team/app"
        );
    }

    #[test]
    fn matching_by_host_glob_port_and_path_prefix() {
        assert!(key_matches("reg.io", "reg.io/a/b"));
        assert!(key_matches("*.reg.io", "eu.reg.io/a"));
        assert!(!key_matches("*.reg.io", "reg.io/a"));
        assert!(!key_matches("*.reg.io", "a.b.reg.io/a"));
        assert!(key_matches("reg?.io", "reg1.io/a"));
        assert!(key_matches("reg.io/team", "reg.io/team/app"));
        assert!(!key_matches("reg.io/team", "reg.io/other/app"));
        assert!(key_matches("localhost:5000", "localhost:5000/app"));
        assert!(!key_matches("localhost:5000", "localhost:5001/app"));
        assert!(!key_matches("localhost", "localhost:5000/app"));
        assert!(key_matches("REG.io", "reg.io/app"));
        assert!(key_matches("r*g*.i?", "registry.io/app"));
        assert!(key_matches("*", "localhost/app"));
        assert!(!key_matches("reg?.io", "reg.io/app"), "? is one character");
        assert!(
            !key_matches("*.io", "reg.io:5000/app"),
            "the port must match"
        );
        assert!(key_matches("*.io:5000", "reg.io:5000/app"));
    }

    #[test]
    fn globs_match_in_linear_time() {
        // 30 stars against a 255-character label: the recursive matcher this replaced
        // took exponential time here.
        let glob = format!("{}b", "a*".repeat(30));
        let host = "a".repeat(255);
        let started = std::time::Instant::now();
        for _ in 0..100 {
            assert!(!key_matches(&glob, &format!("{host}/app")));
            assert!(key_matches(&glob, &format!("{host}b/app")));
        }
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_millis(500),
            "200 matches took {took:?}"
        );
        // The same glob in a keyring entry, looked up as the engine does (an image name
        // is at most 255 characters in all).
        let mut k = Keyring::new();
        k.add(&format!("{glob}.io"), Credentials::new("u", "p"), "test");
        let started = std::time::Instant::now();
        let long = "a".repeat(240);
        assert!(k.lookup(&image(&format!("{long}.io/app"))).is_empty());
        assert_eq!(users(&k, &format!("{long}b.io/app")), ["u"]);
        assert!(started.elapsed() < std::time::Duration::from_millis(100));
    }

    #[test]
    fn more_specific_keys_first_and_docker_hub_default() {
        let mut k = Keyring::new();
        k.add("quay.io", Credentials::new("broad", "p1"), "test");
        k.add("quay.io/coreos", Credentials::new("narrow", "p2"), "test");
        k.add(
            "https://index.docker.io/v1/",
            Credentials::new("hub", "p3"),
            "test",
        );
        assert_eq!(users(&k, "quay.io/coreos/etcd"), ["narrow", "broad"]);
        assert_eq!(users(&k, "quay.io/other/x"), ["broad"]);
        assert_eq!(users(&k, "nginx"), ["hub"]);
        assert_eq!(users(&k, "docker.io/org/app:v1"), ["hub"]);
        assert!(users(&k, "ghcr.io/org/app").is_empty());
    }

    #[test]
    fn docker_config_json_and_dockercfg() {
        let json = format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{}"}},
               "reg.io:5000":{{"username":"u2","password":"p2"}},
               "only-email.io":{{"email":"x@y"}}}}, "credsStore":"desktop"}}"#,
            b64("u1:pa:ss")
        );
        let mut k = Keyring::new();
        k.add_docker_config_json("config.json", json.as_bytes())
            .unwrap();
        let c = k.lookup(&image("nginx"));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].username(), "u1");
        assert_eq!(c[0], &Credentials::new("u1", "pa:ss"));
        assert_eq!(users(&k, "reg.io:5000/app"), ["u2"]);
        assert!(users(&k, "only-email.io/app").is_empty());

        let cfg = format!(r#"{{"reg.io":{{"auth":"{}","email":"e"}}}}"#, b64("old:pw"));
        let mut k = Keyring::new();
        k.add_dockercfg("legacy", cfg.as_bytes()).unwrap();
        assert_eq!(users(&k, "reg.io/app"), ["old"]);
    }

    #[test]
    fn bad_credentials_are_named() {
        let mut k = Keyring::new();
        let err = k
            .add_docker_config_json("cfg.json", b"not json")
            .unwrap_err();
        assert!(err.to_string().contains("cfg.json"), "{err}");
        let err = k
            .add_docker_config_json("cfg.json", br#"{"auths":{"r.io":{"auth":"!!"}}}"#)
            .unwrap_err();
        assert!(err.to_string().contains("r.io"), "{err}");
        let err = k.add_pull_secret(&secret("other", "{}", None)).unwrap_err();
        assert!(err.to_string().contains("secret apps/pull"), "{err}");
    }

    #[test]
    fn pull_secrets_and_configured_registries() {
        let json = format!(r#"{{"auths":{{"reg.io":{{"auth":"{}"}}}}}}"#, b64("ps:pw"));
        let mut k = Keyring::new();
        k.add_pull_secret(&secret(
            DOCKER_CONFIG_JSON_KEY,
            &json,
            Some("kubernetes.io/dockerconfigjson"),
        ))
        .unwrap();
        assert_eq!(users(&k, "reg.io/app"), ["ps"]);
        let matches = k.matches(&image("reg.io/app"));
        assert_eq!(matches.len(), 1);
        assert_eq!(matches[0].1, "secret apps/pull");

        let data = |pairs: &[(&str, &str)]| -> BTreeMap<String, Vec<u8>> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
                .collect()
        };
        let mut k = Keyring::new();
        let basic = data(&[("username", "bu"), ("password", "bp")]);
        k.add_registry_secret("*.corp.io", "basic", &basic, None, None)
            .unwrap();
        let docker = data(&[(".dockerconfigjson", &json)]);
        k.add_registry_secret("other.io", "docker", &docker, None, None)
            .unwrap();
        let krar = data(&[("config.json", &json)]);
        k.add_registry_secret("krar.io", "krar", &krar, None, None)
            .unwrap();
        // kube-autorollout's Opaque secret: a token, with a username or without.
        let pat = data(&[("username", "octo\n"), ("token", "ghp_x\n")]);
        k.add_registry_secret("ghcr.io", "pat", &pat, None, None)
            .unwrap();
        let bearer = data(&[("IDENTITY_TOKEN", "jfrog-tok")]);
        k.add_registry_secret("*.jfrog.io", "jfrog", &bearer, Some("IDENTITY_TOKEN"), None)
            .unwrap();
        assert_eq!(users(&k, "eu.corp.io/app"), ["bu"]);
        assert_eq!(users(&k, "other.io/app"), ["ps"]);
        assert_eq!(users(&k, "krar.io/app"), ["ps"]);
        assert!(users(&k, "reg.io/app").is_empty());
        let ghcr = k.lookup(&image("ghcr.io/org/app"));
        assert_eq!(ghcr[0], &Credentials::new("octo", "ghp_x"));
        let jfrog = k.lookup(&image("acme.jfrog.io/team/app"));
        assert_eq!(jfrog[0], &Credentials::registry_token("jfrog-tok"));

        let err = k
            .add_registry_secret(
                "x.io",
                "secret ns/empty",
                &data(&[("other", "v")]),
                None,
                None,
            )
            .unwrap_err();
        assert!(err.to_string().contains("secret ns/empty"), "{err}");
        assert!(err.to_string().contains("token"), "{err}");
    }

    #[test]
    fn registry_secret_directories_skip_kubelets_entries() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "t0k\n").unwrap();
        std::fs::create_dir(dir.path().join("..2026_12_07")).unwrap();
        std::fs::write(dir.path().join("..data"), "ignored").unwrap();
        let mut k = Keyring::new();
        k.add_registry_dir("reg.io", dir.path(), None, Some("robot"))
            .unwrap();
        assert_eq!(
            k.lookup(&image("reg.io/app"))[0],
            &Credentials::new("robot", "t0k")
        );
        let err = k
            .add_registry_dir("reg.io", &dir.path().join("missing"), None, None)
            .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn identity_and_registry_tokens_in_docker_configs() {
        let json = format!(
            r#"{{"auths":{{
               "id.io":{{"auth":"{}","identitytoken":"refresh-1"}},
               "bare-id.io":{{"identitytoken":"refresh-2"}},
               "reg.io":{{"registrytoken":"bearer-3","auth":"{}"}}}}}}"#,
            b64("alice:"),
            b64("bob:pw")
        );
        let mut k = Keyring::new();
        k.add_docker_config_json("config.json", json.as_bytes())
            .unwrap();
        assert_eq!(
            k.lookup(&image("id.io/app"))[0],
            &Credentials::identity_token("alice", "refresh-1")
        );
        assert_eq!(
            k.lookup(&image("bare-id.io/app"))[0],
            &Credentials::identity_token("", "refresh-2")
        );
        assert_eq!(
            k.lookup(&image("reg.io/app"))[0],
            &Credentials::registry_token("bearer-3")
        );
        use warmroll_proto::fleet::Credentials as Wire;
        assert_eq!(
            Credentials::identity_token("alice", "refresh-1").to_wire(),
            Wire::IdentityToken("refresh-1".into())
        );
        assert_eq!(
            Credentials::registry_token("bearer-3").to_wire(),
            Wire::Token("bearer-3".into())
        );
        assert_eq!(
            Credentials::new("bob", "pw").to_wire(),
            Wire::Basic {
                username: "bob".into(),
                password: "pw".into()
            }
        );
        for c in [
            Credentials::identity_token("alice", "refresh-1"),
            Credentials::registry_token("bearer-3"),
        ] {
            for text in [format!("{c:?}"), c.identity(), c.describe()] {
                assert!(
                    !text.contains("refresh-1") && !text.contains("bearer-3"),
                    "{text}"
                );
            }
        }
        assert_ne!(
            Credentials::registry_token("same").identity(),
            Credentials::new("", "same").identity()
        );
        let (bearer, basic) = (Credentials::registry_token("b"), Credentials::new("u", "p"));
        assert_eq!(
            Credentials::for_warm_order(&[&bearer, &basic]),
            Some(&basic)
        );
        assert_eq!(Credentials::for_warm_order(&[&bearer]), Some(&bearer));
        assert_eq!(Credentials::for_warm_order(&[]), None);
    }

    #[test]
    fn the_default_docker_config_is_dockers() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert_eq!(
            default_docker_config(env(&[("DOCKER_CONFIG", "/cfg"), ("HOME", "/home/u")])),
            Some(PathBuf::from("/cfg/config.json"))
        );
        assert_eq!(
            default_docker_config(env(&[("DOCKER_CONFIG", ""), ("HOME", "/home/u")])),
            Some(PathBuf::from("/home/u/.docker/config.json"))
        );
        assert_eq!(default_docker_config(env(&[])), None);

        let dir = tempfile::tempdir().unwrap();
        let mut k = Keyring::new();
        let file = dir.path().join("config.json");
        assert!(!k.add_docker_config_if_present(&file).unwrap());
        std::fs::write(
            &file,
            r#"{"auths":{"reg.io":{"username":"u","password":"p"}}}"#,
        )
        .unwrap();
        assert!(k.add_docker_config_if_present(&file).unwrap());
        assert_eq!(users(&k, "reg.io/app"), ["u"]);
        // A directory where the file should be is unreadable: named, not skipped.
        let err = k.add_docker_config_if_present(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn debug_redacts_passwords() {
        let c = Credentials::new("alice", "s3cret-pw");
        let mut k = Keyring::new();
        k.add("reg.io", c.clone(), "test");
        for text in [format!("{c:?}"), format!("{k:?}"), c.identity()] {
            assert!(!text.contains("s3cret-pw"), "{text}");
        }
        assert!(format!("{c:?}").contains("alice"));
        assert_ne!(c.identity(), Credentials::new("alice", "other").identity());
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_key_against_any_target_is_no_panic(key in ".{0,80}", target in ".{0,80}") {
            let _ = key_matches(&key, &target);
        }

        #[test]
        fn keys_match_their_own_host_and_stars_stay_within_a_label(
            labels in prop::collection::vec("[a-z0-9-]{1,20}", 1..5),
            port in proptest::option::of(1..65535u16),
            path in "(/[a-z0-9]{1,8}){0,3}",
        ) {
            let port = port.map(|p| format!(":{p}")).unwrap_or_default();
            let host = labels.join(".");
            let target = format!("{host}{port}{path}/app");
            let upper = format!("{}{port}{path}", host.to_uppercase());
            prop_assert!(key_matches(&upper, &target));
            let stars = format!("{}{port}", vec!["*"; labels.len()].join("."));
            prop_assert!(key_matches(&stars, &target));
            // One label more: no match, as in kubelet.
            let more_stars = format!("*.{stars}");
            prop_assert!(!key_matches(&more_stars, &target));
            let more = format!("x.{host}{port}");
            prop_assert!(!key_matches(&more, &target));
        }
    }
}
