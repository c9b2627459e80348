//! Registry credentials: Kubernetes `imagePullSecrets` (`.dockerconfigjson`,
//! `.dockercfg`), a mounted Docker `config.json`, and configured registries (hostname
//! glob to a secret), looked up for an image the way kubelet's `credentialprovider`
//! keyring does:
//!
//! - keys lose their scheme; `/v1/` and `/v2/` path prefixes mean "the host"
//!   (`https://index.docker.io/v1/` is the key `index.docker.io`);
//! - a key matches an image when the ports are equal, the host has as many
//!   `.`-separated parts and each part matches as a glob (`*`, `?`), and the key's path
//!   is a prefix of the image's repository path;
//! - more specific keys come first (keys sorted in reverse);
//! - with no match, a Docker Hub image takes the `index.docker.io` entry.
//!
//! Passwords never reach `Debug` or a log line.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use warmroll_proto::image::ImageRef;

use super::error::RegistryError;

const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";
const DOCKERCFG_KEY: &str = ".dockercfg";
const BASIC_AUTH_TYPE: &str = "kubernetes.io/basic-auth";
const DEFAULT_REGISTRY_HOST: &str = "index.docker.io";

/// A username and password for one registry. `Debug` redacts the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    username: String,
    password: String,
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    pub(crate) fn password(&self) -> &str {
        &self.password
    }

    /// A stable identity for cache keys that reveals nothing of the password.
    pub(crate) fn identity(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(self.username.as_bytes());
        hash.update([0]);
        hash.update(self.password.as_bytes());
        let hex = hex::encode(hash.finalize());
        format!("{}:{}", self.username, hex.get(..16).unwrap_or_default())
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
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
}

impl DockerConfigEntry {
    /// kubelet: a non-empty `auth` (base64 `user:password`) wins over the fields.
    fn credentials(&self) -> Result<Option<Credentials>, String> {
        if let Some(auth) = self.auth.as_deref().filter(|a| !a.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| "\"auth\" is not base64".to_owned())?;
            let decoded =
                String::from_utf8(decoded).map_err(|_| "\"auth\" is not UTF-8".to_owned())?;
            let (user, password) = decoded
                .split_once(':')
                .ok_or_else(|| "\"auth\" is not user:password".to_owned())?;
            return Ok(Some(Credentials::new(user, password)));
        }
        match (&self.username, &self.password) {
            (Some(user), Some(password)) if !user.is_empty() => {
                Ok(Some(Credentials::new(user.clone(), password.clone())))
            }
            // An entry with only an email or identity token carries nothing we use.
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

    /// Adds a configured registry: every credential in `secret` (a basic-auth secret,
    /// or a Docker config secret) is used for hosts matching `host_glob`.
    pub fn add_registry_secret(
        &mut self,
        host_glob: &str,
        secret: &Secret,
    ) -> Result<(), RegistryError> {
        let origin = secret_name(secret);
        if secret.type_.as_deref() == Some(BASIC_AUTH_TYPE) {
            let field = |name: &str| {
                secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(name))
                    .map(|v| String::from_utf8(v.0.clone()))
                    .transpose()
                    .map_err(|_| credentials_error(&origin, format!("{name} is not UTF-8")))?
                    .ok_or_else(|| credentials_error(&origin, format!("has no {name}")))
            };
            let credentials = Credentials::new(field("username")?, field("password")?);
            self.add(host_glob, credentials, &origin);
            return Ok(());
        }
        let mut inner = Keyring::new();
        inner.add_pull_secret(secret)?;
        for entry in inner.entries {
            self.add(host_glob, entry.credentials, &origin);
        }
        Ok(())
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

    /// The credentials to try for `image`, most specific first; empty means anonymous.
    pub fn lookup(&self, image: &ImageRef) -> Vec<&Credentials> {
        self.matches(image).into_iter().map(|(c, _)| c).collect()
    }

    /// [`Keyring::lookup`] with where each credential came from (for messages).
    pub(crate) fn matches(&self, image: &ImageRef) -> Vec<(&Credentials, &str)> {
        let target = format!("{}/{}", image.registry(), image.repository());
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

fn is_default_registry(image: &ImageRef) -> bool {
    image.registry() == warmroll_proto::image::DOCKER_HUB
}

/// kubelet's `BasicDockerKeyring.Add`: scheme stripped; `/v1/`, `/v2/` mean the host.
fn normalise_key(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let (host, path) = match key.find('/') {
        Some(i) => key.split_at(i),
        None => (key, ""),
    };
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

/// kubelet's `URLsMatch` on schemeless `host[:port][/path]` strings.
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
            .all(|(glob, part)| glob_match(glob.as_bytes(), part.as_bytes()))
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

/// `filepath.Match` for one host label: `*` any run, `?` one character.
fn glob_match(glob: &[u8], text: &[u8]) -> bool {
    match glob.split_first() {
        None => text.is_empty(),
        Some((b'*', rest)) => {
            (0..=text.len()).any(|i| text.get(i..).is_some_and(|t| glob_match(rest, t)))
        }
        Some((b'?', rest)) => text.split_first().is_some_and(|(_, t)| glob_match(rest, t)),
        Some((c, rest)) => text
            .split_first()
            .is_some_and(|(t, tail)| t.eq_ignore_ascii_case(c) && glob_match(rest, tail)),
    }
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
        assert_eq!(c[0].password(), "pa:ss");
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

        let mut basic = secret("username", "bu", Some(BASIC_AUTH_TYPE));
        basic
            .data
            .as_mut()
            .unwrap()
            .insert("password".into(), ByteString(b"bp".to_vec()));
        let mut k = Keyring::new();
        k.add_registry_secret("*.corp.io", &basic).unwrap();
        k.add_registry_secret("other.io", &secret(DOCKER_CONFIG_JSON_KEY, &json, None))
            .unwrap();
        assert_eq!(users(&k, "eu.corp.io/app"), ["bu"]);
        assert_eq!(users(&k, "other.io/app"), ["ps"]);
        assert!(users(&k, "reg.io/app").is_empty());
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
}
