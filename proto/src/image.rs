//! Image references, digests and platforms, checked and normalised the way the container
//! runtime (containerd / the Docker `reference` package) does it.
//!
//! - `nginx` is `docker.io/library/nginx:latest`; `index.docker.io` is `docker.io`; the
//!   Docker Hub API is served by `registry-1.docker.io` ([`ImageRef::api_host`]).
//! - The first path component is a registry when it contains `.` or `:`, is `localhost`,
//!   or has an upper-case letter; otherwise the whole name is a Docker Hub repository.
//! - Registry ports and nested repository paths are kept; the repository must be lower
//!   case; tags are `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`; the whole name is at most 255
//!   characters; a bare 64-hex-character name is refused (it is an image id, not a name).
//! - A reference with a digest is *pinned*: there is nothing to track
//!   ([`Tracking::Pinned`]). A reference with neither tag nor digest gets `:latest`.
//!
//! Everything here is pure: no I/O.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Docker Hub's name in normalised references.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
/// Docker Hub's legacy name (and the usual `config.json` key host), normalised to
/// [`DOCKER_HUB`].
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
const OFFICIAL_PREFIX: &str = "library/";
const DEFAULT_TAG: &str = "latest";
const NAME_TOTAL_MAX: usize = 255;
const TAG_MAX: usize = 128;

/// Why an image reference, digest or platform string was refused. Every variant names
/// the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// The string is not an image reference.
    #[error("invalid image reference {input:?}: {reason}")]
    ParseReference { input: String, reason: String },
    /// The string is not a supported content digest.
    #[error("invalid digest {input:?}: {reason}")]
    ParseDigest { input: String, reason: String },
    /// The string is not an `os/architecture[/variant]` platform.
    #[error("invalid platform {input:?}: {reason}")]
    ParsePlatform { input: String, reason: String },
}

fn reference_error(input: &str, reason: impl Into<String>) -> ImageError {
    ImageError::ParseReference {
        input: input.to_owned(),
        reason: reason.into(),
    }
}

/// The digest algorithms warmroll accepts (the ones registries and runtimes use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestAlgorithm {
    Sha256,
    Sha512,
}

impl DigestAlgorithm {
    /// The algorithm's name as written in a digest.
    pub fn as_str(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "sha256",
            DigestAlgorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            DigestAlgorithm::Sha256 => 64,
            DigestAlgorithm::Sha512 => 128,
        }
    }
}

/// A content digest `algorithm:hex` (sha256 or sha512, lower-case hex of the right
/// length), as the OCI spec and `go-digest` validate it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: DigestAlgorithm,
    hex: String,
}

impl Digest {
    /// Parses and validates `algorithm:hex`.
    pub fn parse(input: &str) -> Result<Self, ImageError> {
        let err = |reason: &str| ImageError::ParseDigest {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let (algorithm, hex) = input
            .split_once(':')
            .ok_or_else(|| err("expected algorithm:hex"))?;
        let algorithm = match algorithm {
            "sha256" => DigestAlgorithm::Sha256,
            "sha512" => DigestAlgorithm::Sha512,
            "" => return Err(err("missing algorithm")),
            _ => return Err(err("unsupported algorithm (sha256 and sha512 are)")),
        };
        if hex.len() != algorithm.hex_len() {
            return Err(ImageError::ParseDigest {
                input: input.to_owned(),
                reason: format!(
                    "{} needs {} hex characters, got {}",
                    algorithm.as_str(),
                    algorithm.hex_len(),
                    hex.len()
                ),
            });
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(err("hex part must be lower-case hexadecimal"));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }

    /// The sha256 digest of `hex_lower`, a 64-character lower-case hex string (for
    /// example a freshly computed hash).
    pub fn sha256_hex(hex_lower: &str) -> Result<Self, ImageError> {
        Digest::parse(&format!("sha256:{hex_lower}"))
    }

    pub fn algorithm(&self) -> DigestAlgorithm {
        self.algorithm
    }

    /// The hex-encoded hash, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What a reference asks the runtime to run: the current target of a tag (something to
/// track) or a fixed digest (pinned: nothing to track).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking<'a> {
    Tag(&'a str),
    Pinned(&'a Digest),
}

/// A normalised image reference: `registry/repository[:tag][@digest]`.
///
/// `Display` (and serde) give the fully normalised form, e.g.
/// `docker.io/library/nginx:latest`; parsing that form gives back an equal value.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl ImageRef {
    /// Parses and normalises a reference as the container runtime does.
    pub fn parse(input: &str) -> Result<Self, ImageError> {
        if input.is_empty() {
            return Err(reference_error(input, "empty reference"));
        }
        if input.trim() != input {
            return Err(reference_error(input, "leading or trailing whitespace"));
        }
        // Split off the digest, then the tag (the last ':' after the last '/').
        let (rest, digest) = match input.split_once('@') {
            Some((rest, digest)) => {
                let digest = Digest::parse(digest).map_err(|e| match e {
                    ImageError::ParseDigest { reason, .. } => {
                        reference_error(input, format!("bad digest: {reason}"))
                    }
                    other => other,
                })?;
                (rest, Some(digest))
            }
            None => (input, None),
        };
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest.get(last_slash..).and_then(|tail| tail.rfind(':')) {
            Some(colon) => {
                let at = last_slash + colon;
                let name = rest.get(..at).unwrap_or_default();
                let tag = rest.get(at + 1..).unwrap_or_default();
                validate_tag(input, tag)?;
                (name, Some(tag.to_owned()))
            }
            None => (rest, None),
        };
        if name.is_empty() {
            return Err(reference_error(input, "missing repository name"));
        }
        if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(reference_error(
                input,
                "a 64-character hexadecimal string is an image id, not a name",
            ));
        }

        let (registry, path) = split_registry(name);
        validate_registry(input, registry)?;
        validate_path(input, path)?;
        let registry = if registry == DOCKER_HUB_LEGACY {
            DOCKER_HUB
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("{OFFICIAL_PREFIX}{path}")
        } else {
            path.to_owned()
        };
        if registry.len() + 1 + repository.len() > NAME_TOTAL_MAX {
            return Err(reference_error(
                input,
                format!("name longer than {NAME_TOTAL_MAX} characters"),
            ));
        }
        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            (tag, _) => tag,
        };
        Ok(ImageRef {
            registry: registry.to_owned(),
            repository,
            tag,
            digest,
        })
    }

    /// The registry as written in normalised references (`docker.io`, `ghcr.io`,
    /// `localhost:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The `host[:port]` that serves the registry API (`registry-1.docker.io` for
    /// Docker Hub, the registry itself otherwise).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API_HOST
        } else {
            &self.registry
        }
    }

    /// The repository path within the registry (`library/nginx`, `org/team/app`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag; `latest` when the input had neither tag nor digest, `None` for a
    /// reference by digest only.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest of a pinned reference.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// Whether the reference is pinned to a digest (nothing to track).
    pub fn is_pinned(&self) -> bool {
        self.digest.is_some()
    }

    /// A pinned reference's digest, or the tag to track. A reference with both
    /// (`nginx:1.25@sha256:…`) is pinned: the runtime runs the digest.
    pub fn tracking(&self) -> Tracking<'_> {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => Tracking::Pinned(digest),
            (None, Some(tag)) => Tracking::Tag(tag),
            // parse() always sets a tag when there is no digest.
            (None, None) => Tracking::Tag(DEFAULT_TAG),
        }
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The same repository pinned to `digest` (no tag): what pulling by digest uses.
    pub fn with_digest(&self, digest: Digest) -> ImageRef {
        ImageRef {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageRef({self})")
    }
}

impl FromStr for ImageRef {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageRef::parse(s)
    }
}

impl Serialize for ImageRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ImageRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ImageRef::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `docker/distribution`'s `splitDockerDomain`: the first component is a registry when
/// it looks like a host (has `.` or `:`, is `localhost`, or is not all lower case).
fn split_registry(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.to_lowercase() != first =>
        {
            (first, rest)
        }
        _ => (DOCKER_HUB, name),
    }
}

fn validate_tag(input: &str, tag: &str) -> Result<(), ImageError> {
    let mut bytes = tag.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !first_ok {
        return Err(reference_error(
            input,
            "tag must start with a letter, digit or '_'",
        ));
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
        return Err(reference_error(
            input,
            "tag may contain only letters, digits, '_', '.' and '-'",
        ));
    }
    if tag.len() > TAG_MAX {
        return Err(reference_error(
            input,
            format!("tag longer than {TAG_MAX} characters"),
        ));
    }
    Ok(())
}

fn validate_registry(input: &str, registry: &str) -> Result<(), ImageError> {
    let (host, port) = if let Some(bracketed) = registry.strip_prefix('[') {
        // [IPv6]:port
        let (addr, after) = bracketed
            .split_once(']')
            .ok_or_else(|| reference_error(input, "unclosed '[' in registry host"))?;
        if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return Err(reference_error(input, "bad IPv6 registry address"));
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| {
                reference_error(input, "unexpected characters after IPv6 registry address")
            })?),
        };
        (None, port)
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        let ok = !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !ok {
            return Err(reference_error(
                input,
                format!("invalid registry host {host:?}"),
            ));
        }
    }
    if let Some(port) = port
        && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(reference_error(
            input,
            format!("invalid registry port {port:?}"),
        ));
    }
    Ok(())
}

/// `path-component := [a-z0-9]+ (separator [a-z0-9]+)*`, `separator := [_.] | __ | -+`.
fn validate_path(input: &str, path: &str) -> Result<(), ImageError> {
    if path.is_empty() {
        return Err(reference_error(input, "missing repository name"));
    }
    if path.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(reference_error(input, "repository name must be lower case"));
    }
    for component in path.split('/') {
        if !valid_path_component(component) {
            return Err(reference_error(
                input,
                format!("invalid repository path component {component:?}"),
            ));
        }
    }
    Ok(())
}

fn valid_path_component(component: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = component.as_bytes();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    // Every run of non-alphanumerics must be one separator: ".", "_", "__" or "-"+.
    let mut run = String::new();
    for &b in bytes {
        if alnum(b) {
            if !run.is_empty() {
                let ok = matches!(run.as_str(), "." | "_" | "__") || run.bytes().all(|c| c == b'-');
                if !ok {
                    return false;
                }
                run.clear();
            }
        } else if matches!(b, b'.' | b'_' | b'-') {
            run.push(char::from(b));
        } else {
            return false;
        }
    }
    true
}

/// An image platform: `os/architecture[/variant]` as in OCI image indexes
/// (`linux/amd64`, `linux/arm/v7`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/architecture[/variant]`.
    pub fn parse(input: &str) -> Result<Self, ImageError> {
        let err = |reason: &str| ImageError::ParsePlatform {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let mut parts = input.split('/');
        let os = parts.next().unwrap_or_default();
        let architecture = parts
            .next()
            .ok_or_else(|| err("expected os/architecture[/variant]"))?;
        let variant = parts.next();
        if parts.next().is_some() {
            return Err(err("too many '/'-separated parts"));
        }
        let valid = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        };
        if !valid(os) || !valid(architecture) || variant.is_some_and(|v| !valid(v)) {
            return Err(err(
                "each part must be non-empty letters, digits, '_', '.' or '-'",
            ));
        }
        Ok(Platform {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: variant.map(str::to_owned),
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Platform::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HEX64: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn norm(s: &str) -> String {
        ImageRef::parse(s).unwrap().to_string()
    }

    #[test]
    fn normalises_like_the_runtime() {
        let cases = [
            ("nginx", "docker.io/library/nginx:latest"),
            ("nginx:1.25", "docker.io/library/nginx:1.25"),
            ("library/nginx", "docker.io/library/nginx:latest"),
            ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
            ("docker.io/nginx", "docker.io/library/nginx:latest"),
            ("index.docker.io/nginx", "docker.io/library/nginx:latest"),
            ("index.docker.io/org/app:v1", "docker.io/org/app:v1"),
            ("ghcr.io/org/app:main", "ghcr.io/org/app:main"),
            ("ghcr.io/app", "ghcr.io/app:latest"),
            ("localhost/app", "localhost/app:latest"),
            (
                "localhost:5000/team/sub/app:v2",
                "localhost:5000/team/sub/app:v2",
            ),
            ("127.0.0.1:5000/app", "127.0.0.1:5000/app:latest"),
            ("[::1]:5000/app:x", "[::1]:5000/app:x"),
            ("Registry/app", "Registry/app:latest"),
            ("a/b/c", "docker.io/a/b/c:latest"),
            (
                "my-app__x.y--z:Tag_1.0-rc",
                "docker.io/library/my-app__x.y--z:Tag_1.0-rc",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input), want, "input {input}");
        }
    }

    #[test]
    fn accessors() {
        let r = ImageRef::parse("nginx").unwrap();
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.repository(), "library/nginx");
        assert_eq!(r.tag(), Some("latest"));
        assert_eq!(r.digest(), None);
        assert!(!r.is_pinned());
        assert_eq!(r.tracking(), Tracking::Tag("latest"));
        assert_eq!(r.name(), "docker.io/library/nginx");

        let r = ImageRef::parse("localhost:5000/a/b:v1").unwrap();
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.api_host(), "localhost:5000");
        assert_eq!(r.repository(), "a/b");
        assert_eq!(r.tag(), Some("v1"));
    }

    #[test]
    fn digest_references_are_pinned() {
        let d = format!("sha256:{HEX64}");
        let r = ImageRef::parse(&format!("nginx@{d}")).unwrap();
        assert!(r.is_pinned());
        assert_eq!(r.tag(), None);
        assert_eq!(r.to_string(), format!("docker.io/library/nginx@{d}"));
        assert_eq!(r.tracking(), Tracking::Pinned(&Digest::parse(&d).unwrap()));

        let r = ImageRef::parse(&format!("ghcr.io/a/b:1.2@{d}")).unwrap();
        assert!(r.is_pinned());
        assert_eq!(r.tag(), Some("1.2"));
        assert_eq!(r.to_string(), format!("ghcr.io/a/b:1.2@{d}"));

        let tagged = ImageRef::parse("ghcr.io/a/b:1.2").unwrap();
        let pinned = tagged.with_digest(Digest::parse(&d).unwrap());
        assert_eq!(pinned.to_string(), format!("ghcr.io/a/b@{d}"));
    }

    #[test]
    fn refuses_malformed_references_naming_them() {
        let bad = [
            "",
            " nginx",
            "NGINX",
            "docker.io/Library/nginx",
            "nginx:",
            "nginx:-tag",
            "nginx:t@g",
            "nginx@sha256:abc",
            "nginx@md5:0123456789abcdef0123456789abcdef",
            "nginx@",
            "a//b",
            "/nginx",
            "nginx/",
            "ngi nx",
            "-nginx",
            "nginx-",
            "a.._b",
            "host:port/app",
            "host:/app",
            "bad_host.com/app",
            "[zz]:5000/app",
            "[::1/app",
            HEX64,
        ];
        for input in bad {
            let err = ImageRef::parse(input).unwrap_err();
            assert!(
                err.to_string().contains(&format!("{input:?}")),
                "error for {input:?} must name it: {err}"
            );
        }
        let long_tag = format!("nginx:{}", "a".repeat(129));
        assert!(ImageRef::parse(&long_tag).is_err());
        assert!(ImageRef::parse(&format!("nginx:{}", "a".repeat(128))).is_ok());
        let long_name = format!("example.com/{}", "a".repeat(250));
        assert!(ImageRef::parse(&long_name).is_err());
    }

    #[test]
    fn digests_are_validated() {
        let d = Digest::parse(&format!("sha256:{HEX64}")).unwrap();
        assert_eq!(d.algorithm(), DigestAlgorithm::Sha256);
        assert_eq!(d.hex(), HEX64);
        assert_eq!(d.to_string(), format!("sha256:{HEX64}"));
        assert_eq!(Digest::sha256_hex(HEX64).unwrap(), d);
        let d512 = Digest::parse(&format!("sha512:{HEX64}{HEX64}")).unwrap();
        assert_eq!(d512.algorithm(), DigestAlgorithm::Sha512);

        for bad in [
            "sha256",
            "sha256:",
            ":abc",
            &format!("sha256:{}", HEX64.to_uppercase()),
            &format!("sha256:{HEX64}0"),
            &format!("sha512:{HEX64}"),
            &format!("md5:{HEX64}"),
            &format!("sha256:{}g", &HEX64[1..]),
        ] {
            let err = Digest::parse(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn serde_uses_the_normalised_string() {
        let r: ImageRef = serde_json::from_str("\"nginx\"").unwrap();
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            "\"docker.io/library/nginx:latest\""
        );
        assert!(serde_json::from_str::<ImageRef>("\"NGINX\"").is_err());
        let d: Digest = serde_json::from_str(&format!("\"sha256:{HEX64}\"")).unwrap();
        assert_eq!(d.hex(), HEX64);
        let p: Platform = serde_json::from_str(r#"{"os":"linux","architecture":"amd64"}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"os":"linux","architecture":"amd64"}"#
        );
    }

    #[test]
    fn platforms() {
        let p = Platform::parse("linux/arm/v7").unwrap();
        assert_eq!(p.os, "linux");
        assert_eq!(p.architecture, "arm");
        assert_eq!(p.variant.as_deref(), Some("v7"));
        assert_eq!(p.to_string(), "linux/arm/v7");
        assert_eq!(
            Platform::parse("linux/amd64").unwrap().to_string(),
            "linux/amd64"
        );
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            let err = Platform::parse(bad).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    fn component() -> impl Strategy<Value = String> {
        "[a-z0-9]{1,6}(([._]|__|-{1,2})[a-z0-9]{1,6}){0,2}"
    }

    fn reference() -> impl Strategy<Value = String> {
        (
            prop::option::of(prop_oneof![
                Just("localhost".to_owned()),
                "[a-z0-9]{1,8}\\.[a-z]{2,5}",
                "[a-z0-9]{1,8}\\.[a-z]{2,5}:[0-9]{2,5}",
            ]),
            // Without a registry, a first component with '.' would be read as one.
            "[a-z0-9]{1,6}((_|__|-{1,2})[a-z0-9]{1,6}){0,2}",
            prop::collection::vec(component(), 0..3),
            prop::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}"),
            prop::option::of("[0-9a-f]{64}"),
        )
            .prop_map(|(registry, first, path, tag, digest)| {
                let mut s = String::new();
                if let Some(r) = registry {
                    s.push_str(&r);
                    s.push('/');
                }
                s.push_str(&first);
                for component in path {
                    s.push('/');
                    s.push_str(&component);
                }
                if let Some(t) = tag {
                    s.push(':');
                    s.push_str(&t);
                }
                if let Some(d) = digest {
                    s.push_str("@sha256:");
                    s.push_str(&d);
                }
                s
            })
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_strings(s in "\\PC*") {
            let _ = ImageRef::parse(&s);
            let _ = Digest::parse(&s);
            let _ = Platform::parse(&s);
        }

        #[test]
        fn never_panics_on_reference_like_strings(s in "[a-zA-Z0-9:/@._\\-\\[\\]]{0,80}") {
            if let Ok(r) = ImageRef::parse(&s) {
                // Anything accepted normalises to a fixed point.
                let again = ImageRef::parse(&r.to_string()).unwrap();
                prop_assert_eq!(&again, &r);
                prop_assert_eq!(again.to_string(), r.to_string());
            }
        }

        #[test]
        fn valid_references_round_trip(s in reference()) {
            let r = ImageRef::parse(&s).unwrap();
            let normal = r.to_string();
            let again = ImageRef::parse(&normal).unwrap();
            prop_assert_eq!(&again, &r);
            prop_assert_eq!(again.to_string(), normal.clone());
            prop_assert!(normal.starts_with(r.registry()));
            prop_assert_eq!(r.is_pinned(), s.contains('@'));
            prop_assert!(r.tag().is_some() || r.is_pinned());
        }
    }
}
