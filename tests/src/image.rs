//! Builds small runnable images in-process and pushes them with `oci-client`.
//!
//! Every image has the same base layer (the static busybox from Debian's
//! `busybox-static` at `/bin/busybox`, with `/bin/sh`, `/bin/sleep`, ... symlinked to it),
//! like a real base image, and a small layer with `/build-id`, whose content differs
//! on every push: each `push*` call is a new build, so pushing twice under the same tag
//! is "a new build under a mutable tag" and moves the tag to a new digest.
//!
//! The entrypoint (`/bin/sh -c 'trap "exit 0" TERM INT; while :; do sleep 3600 & wait $!; done'`)
//! runs forever and exits at once on SIGTERM, so the image also serves as a pod
//! sandbox ("pause") image and containers stop without waiting for a kill timeout.
//!
//! [`ImageBuilder::push_binary`] makes a different kind of image: one host binary with
//! the shared libraries it links (no busybox, no shell), the way the real cluster tests
//! run warmroll's release binaries without a Docker engine (see [`crate::warmroll_image`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use futures::stream;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use rand::{RngCore, SeedableRng};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use crate::registry::Registry;

/// Where the static busybox comes from (Debian package `busybox-static`).
pub const BUSYBOX: &str = "/bin/busybox";

const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_GZIP_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const LAYER_TAR_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// Busybox applets linked in `/bin` besides `busybox` itself.
const APPLETS: &[&str] = &["sh", "sleep", "cat", "echo", "ls", "true", "false"];

const ENTRYPOINT: &[&str] = &[
    "/bin/sh",
    "-c",
    "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done",
];

/// Where [`ImageBuilder::push_binary`] puts the binary (tar paths have no leading `/`).
const BINARY_DIR: &str = "usr/local/bin";
const BINARY_PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Debian's CA bundle, copied from the host into binary images when present.
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";
/// The `nonroot` user and group of binary images (distroless's, which the chart uses).
pub const NONROOT: u32 = 65532;
const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\n\
                      nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnonroot:x:65532:\n";

/// Size of each piece of a random layer as it is generated and uploaded.
const RANDOM_CHUNK: usize = 4 * 1024 * 1024;

/// An image pushed to the test registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// `host/repo:tag` (for index children: `host/repo@sha256:...`).
    pub reference: String,
    /// `host/repo`.
    pub repository: String,
    /// `sha256:...` of the manifest as pushed.
    pub manifest_digest: String,
    /// `sha256:...` of the config: what CRI reports as the image id.
    pub config_digest: String,
    /// Total bytes of the layer blobs (what a first pull downloads, config aside).
    pub size: u64,
    /// The content of `/build-id` in this image (empty for [`ImageBuilder::push_binary`]
    /// images, which have none).
    pub build_id: String,
}

impl Pushed {
    /// `host/repo@sha256:<manifest digest>`.
    pub fn pinned(&self) -> String {
        format!("{}@{}", self.repository, self.manifest_digest)
    }
}

/// A multi-arch index pushed under a tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushedIndex {
    /// `host/repo:tag`.
    pub reference: String,
    /// `sha256:...` of the index.
    pub index_digest: String,
    /// Children by platform (`"linux/amd64"`, `"linux/arm64"`).
    pub children: BTreeMap<String, Pushed>,
    /// `sha256:...` of the attestation manifest the index lists, if any
    /// ([`ImageBuilder::push_index_with_attestation`]).
    pub attestation: Option<String>,
}

/// A runnable image of one host binary, for [`ImageBuilder::push_binary`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BinaryImage {
    /// The host binary; it lands at `/usr/local/bin/<its file name>`, the entrypoint.
    pub binary: PathBuf,
    /// The config's `User` (`uid:gid`); `None` leaves it unset: the image runs as root.
    pub user: Option<String>,
    /// The config's `Cmd`: the entrypoint's default arguments.
    pub cmd: Vec<String>,
}

/// A layer blob ready to push.
struct Layer {
    data: Bytes,
    media_type: &'static str,
    digest: String,
    diff_id: String,
}

impl Layer {
    fn gzip(tar: Vec<u8>) -> Result<Layer> {
        let diff_id = sha256(&tar);
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        gz.write_all(&tar).context("compressing layer")?;
        let data = Bytes::from(gz.finish().context("compressing layer")?);
        Ok(Layer {
            digest: sha256(&data),
            data,
            media_type: LAYER_GZIP_MEDIA_TYPE,
            diff_id,
        })
    }

    fn descriptor(&self) -> serde_json::Value {
        descriptor(self.media_type, &self.digest, self.data.len() as u64)
    }
}

/// A layer already in the registry.
struct PushedLayer {
    descriptor: serde_json::Value,
    diff_id: String,
    size: u64,
}

/// Builds and pushes images to one [`Registry`], with its CA and credentials.
pub struct ImageBuilder {
    client: Client,
    auth: RegistryAuth,
    host: String,
    base: OnceCell<Layer>,
    builds: AtomicU64,
}

impl ImageBuilder {
    pub fn new(registry: &Registry) -> Result<Self> {
        let config = registry.oci_client_config();
        let client = Client::try_from(config).context("building the oci-client client")?;
        let auth = match registry.credentials() {
            Some((user, password)) => RegistryAuth::Basic(user.to_string(), password.to_string()),
            None => RegistryAuth::Anonymous,
        };
        Ok(Self {
            client,
            auth,
            host: registry.host().to_string(),
            base: OnceCell::new(),
            builds: AtomicU64::new(0),
        })
    }

    /// Pushes a new linux/amd64 build of the busybox image under `repo:tag`.
    pub async fn push(&self, repo: &str, tag: &str) -> Result<Pushed> {
        let reference = self.reference(repo, tag)?;
        let build_id = self.next_build_id(repo, tag);
        let layers = vec![
            self.push_base(&reference).await?,
            self.push_layer(&reference, &build_id_layer(&build_id)?)
                .await?,
        ];
        self.push_image(
            &reference,
            repo,
            tag,
            ImageParts {
                arch: "amd64",
                run: &busybox_config(),
                layers,
                build_id,
            },
        )
        .await
    }

    /// Pushes a new build as a multi-arch index with linux/amd64 and linux/arm64
    /// children under `repo:tag`. Both children share the build id; the arm64 child
    /// carries the same x86-64 busybox (it exists to be listed and resolved, not run).
    pub async fn push_index(&self, repo: &str, tag: &str) -> Result<PushedIndex> {
        self.push_index_of(repo, tag, false).await
    }

    /// [`Self::push_index`] with an attestation manifest for the linux/amd64 child
    /// listed in the index too, as BuildKit pushes them (provenance on, Docker Hub's
    /// default): platform `unknown/unknown`, annotations `vnd.docker.reference.type:
    /// attestation-manifest` and `vnd.docker.reference.digest: <child>`, one in-toto
    /// layer. Nothing can run it; a runtime must never pick it as a platform.
    pub async fn push_index_with_attestation(&self, repo: &str, tag: &str) -> Result<PushedIndex> {
        self.push_index_of(repo, tag, true).await
    }

    async fn push_index_of(&self, repo: &str, tag: &str, attest: bool) -> Result<PushedIndex> {
        let reference = self.reference(repo, tag)?;
        let build_id = self.next_build_id(repo, tag);
        let base = self.push_base(&reference).await?;
        let build = self
            .push_layer(&reference, &build_id_layer(&build_id)?)
            .await?;
        let mut children = BTreeMap::new();
        let mut entries = Vec::new();
        for arch in ["amd64", "arm64"] {
            let layers = vec![
                PushedLayer {
                    descriptor: base.descriptor.clone(),
                    diff_id: base.diff_id.clone(),
                    size: base.size,
                },
                PushedLayer {
                    descriptor: build.descriptor.clone(),
                    diff_id: build.diff_id.clone(),
                    size: build.size,
                },
            ];
            let (config_digest, manifest) = self
                .push_config_and_build_manifest(&reference, arch, &busybox_config(), &layers)
                .await?;
            let manifest_digest = sha256(&manifest);
            let child_ref = self.reference_by_digest(repo, &manifest_digest)?;
            self.client
                .push_manifest_raw(
                    &child_ref,
                    manifest.clone(),
                    http::HeaderValue::from_static(MANIFEST_MEDIA_TYPE),
                )
                .await
                .with_context(|| format!("pushing the linux/{arch} manifest of {reference}"))?;
            entries.push(json!({
                "mediaType": MANIFEST_MEDIA_TYPE,
                "digest": manifest_digest,
                "size": manifest.len(),
                "platform": {"architecture": arch, "os": "linux"},
            }));
            children.insert(
                format!("linux/{arch}"),
                Pushed {
                    reference: format!("{}/{repo}@{manifest_digest}", self.host),
                    repository: format!("{}/{repo}", self.host),
                    manifest_digest,
                    config_digest,
                    size: layers.iter().map(|l| l.size).sum(),
                    build_id: build_id.clone(),
                },
            );
        }
        let attestation = match children.get("linux/amd64") {
            Some(child) if attest => {
                let (digest, entry) = self
                    .push_attestation(&reference, repo, &child.manifest_digest)
                    .await?;
                entries.push(entry);
                Some(digest)
            }
            _ => None,
        };
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": entries,
        }))?;
        let index_digest = sha256(&index);
        self.client
            .push_manifest_raw(
                &reference,
                index,
                http::HeaderValue::from_static(INDEX_MEDIA_TYPE),
            )
            .await
            .with_context(|| format!("pushing the index {reference}"))?;
        Ok(PushedIndex {
            reference: reference.whole(),
            index_digest,
            children,
            attestation,
        })
    }

    /// Pushes an in-toto provenance statement about `subject` as an attestation manifest;
    /// returns its digest and its index entry.
    async fn push_attestation(
        &self,
        reference: &Reference,
        repo: &str,
        subject: &str,
    ) -> Result<(String, serde_json::Value)> {
        const IN_TOTO: &str = "application/vnd.in-toto+json";
        const PROVENANCE: &str = "https://slsa.dev/provenance/v0.2";
        let statement = Bytes::from(serde_json::to_vec(&json!({
            "_type": "https://in-toto.io/Statement/v0.1",
            "predicateType": PROVENANCE,
            "subject": [{"name": "_", "digest": {"sha256": subject.trim_start_matches("sha256:")}}],
            "predicate": {"builder": {"id": "warmroll-tests"}},
        }))?);
        let statement_digest = sha256(&statement);
        let statement_len = statement.len() as u64;
        self.push_blob(reference, statement, &statement_digest)
            .await?;
        let config = Bytes::from(serde_json::to_vec(&json!({
            "architecture": "unknown",
            "os": "unknown",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [statement_digest]},
        }))?);
        let config_digest = sha256(&config);
        let config_len = config.len() as u64;
        self.push_blob(reference, config, &config_digest).await?;
        let mut layer = descriptor(IN_TOTO, &statement_digest, statement_len);
        if let Some(layer) = layer.as_object_mut() {
            layer.insert(
                "annotations".into(),
                json!({"in-toto.io/predicate-type": PROVENANCE}),
            );
        }
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": descriptor(CONFIG_MEDIA_TYPE, &config_digest, config_len),
            "layers": [layer],
        }))?;
        let digest = sha256(&manifest);
        let by_digest = self.reference_by_digest(repo, &digest)?;
        let len = manifest.len();
        self.client
            .push_manifest_raw(
                &by_digest,
                manifest,
                http::HeaderValue::from_static(MANIFEST_MEDIA_TYPE),
            )
            .await
            .with_context(|| format!("pushing the attestation manifest of {reference}"))?;
        let entry = json!({
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": digest,
            "size": len,
            "platform": {"architecture": "unknown", "os": "unknown"},
            "annotations": {
                "vnd.docker.reference.type": "attestation-manifest",
                "vnd.docker.reference.digest": subject,
            },
        });
        Ok((digest, entry))
    }

    /// Pushes a new linux/amd64 build with an extra uncompressed layer holding
    /// `/random.bin` of `bytes` random bytes, generated and uploaded in 4 MiB pieces
    /// (never held in memory as a whole). For large-image benchmarks.
    pub async fn push_random(&self, repo: &str, tag: &str, bytes: u64) -> Result<Pushed> {
        if bytes == 0 {
            bail!("push_random needs a size above zero");
        }
        let reference = self.reference(repo, tag)?;
        let build_id = self.next_build_id(repo, tag);
        let base = self.push_base(&reference).await?;
        let build = self
            .push_layer(&reference, &build_id_layer(&build_id)?)
            .await?;
        self.auth(&reference).await?;
        let pushed = self
            .client
            .push_blob_stream_chunked(&reference, random_tar(bytes)?)
            .await
            .with_context(|| format!("pushing a {bytes}-byte random layer to {reference}"))?;
        let random = PushedLayer {
            descriptor: descriptor(LAYER_TAR_MEDIA_TYPE, &pushed.blob_digest, pushed.size),
            diff_id: pushed.blob_digest,
            size: pushed.size,
        };
        self.push_image(
            &reference,
            repo,
            tag,
            ImageParts {
                arch: "amd64",
                run: &busybox_config(),
                layers: vec![base, build, random],
                build_id,
            },
        )
        .await
    }

    /// Pushes a one-layer image of a host binary under `repo:tag` for the host's
    /// architecture: the binary at `/usr/local/bin/<name>` (the entrypoint), every
    /// shared library `ldd` lists for it (the dynamic loader included) as a regular file
    /// at the listed path and, hard-linked, at its symlink-resolved path,
    /// `/etc/passwd` and `/etc/group` with root and `nonroot` (65532), their home dirs,
    /// `/tmp`, and the host's `/etc/ssl/certs/ca-certificates.crt` when it has one.
    ///
    /// The layer depends only on those files, so the same binary on the same host
    /// pushes the same layer and manifest every time.
    pub async fn push_binary(&self, repo: &str, tag: &str, image: &BinaryImage) -> Result<Pushed> {
        let reference = self.reference(repo, tag)?;
        let arch = host_arch()?;
        let name = binary_name(&image.binary)?;
        let binary = image.binary.clone();
        let layer = tokio::task::spawn_blocking(move || binary_layer(&binary))
            .await
            .map_err(|e| anyhow!("building the layer of {}: {e}", image.binary.display()))??;
        let mut env = vec![BINARY_PATH_ENV.to_string()];
        if layer.has_ca_bundle {
            env.push(format!("SSL_CERT_FILE=/{CA_BUNDLE}"));
        }
        let mut config = serde_json::Map::new();
        config.insert(
            "Entrypoint".into(),
            json!([format!("/{BINARY_DIR}/{name}")]),
        );
        config.insert("Cmd".into(), json!(image.cmd));
        config.insert("Env".into(), json!(env));
        config.insert("WorkingDir".into(), json!("/"));
        if let Some(user) = &image.user {
            config.insert("User".into(), json!(user));
        }
        let config = serde_json::Value::Object(config);
        let pushed = self.push_layer(&reference, &layer.layer).await?;
        self.push_image(
            &reference,
            repo,
            tag,
            ImageParts {
                arch,
                run: &config,
                layers: vec![pushed],
                build_id: String::new(),
            },
        )
        .await
    }

    fn reference(&self, repo: &str, tag: &str) -> Result<Reference> {
        let whole = format!("{}/{repo}:{tag}", self.host);
        whole
            .parse()
            .with_context(|| format!("bad image reference {whole}"))
    }

    fn reference_by_digest(&self, repo: &str, digest: &str) -> Result<Reference> {
        let whole = format!("{}/{repo}@{digest}", self.host);
        whole
            .parse()
            .with_context(|| format!("bad image reference {whole}"))
    }

    fn next_build_id(&self, repo: &str, tag: &str) -> String {
        let n = self.builds.fetch_add(1, Ordering::SeqCst);
        format!(
            "{repo}:{tag} build {n} {}",
            hex::encode(rand::random::<[u8; 8]>())
        )
    }

    async fn auth(&self, reference: &Reference) -> Result<()> {
        self.client
            .auth(reference, &self.auth, RegistryOperation::Push)
            .await
            .with_context(|| format!("authenticating to push {reference}"))?;
        Ok(())
    }

    async fn push_base(&self, reference: &Reference) -> Result<PushedLayer> {
        let base = self
            .base
            .get_or_try_init(|| async {
                tokio::task::spawn_blocking(base_layer)
                    .await
                    .map_err(|e| anyhow!("building the base layer: {e}"))?
            })
            .await?;
        self.push_layer(reference, base).await
    }

    /// Uploads a layer unless the registry already has it (HEAD first, as pushers do).
    async fn push_layer(&self, reference: &Reference, layer: &Layer) -> Result<PushedLayer> {
        self.push_blob(reference, layer.data.clone(), &layer.digest)
            .await?;
        Ok(PushedLayer {
            descriptor: layer.descriptor(),
            diff_id: layer.diff_id.clone(),
            size: layer.data.len() as u64,
        })
    }

    async fn push_blob(&self, reference: &Reference, data: Bytes, digest: &str) -> Result<()> {
        self.auth(reference).await?;
        let exists = self
            .client
            .blob_exists(reference, digest)
            .await
            .with_context(|| format!("checking blob {digest} in {reference}"))?;
        if !exists {
            self.client
                .push_blob(reference, data, digest)
                .await
                .with_context(|| format!("pushing blob {digest} to {reference}"))?;
        }
        Ok(())
    }

    /// Pushes the config for `arch` (its `config` section: `run`) and returns its digest
    /// and the manifest bytes.
    async fn push_config_and_build_manifest(
        &self,
        reference: &Reference,
        arch: &str,
        run: &serde_json::Value,
        layers: &[PushedLayer],
    ) -> Result<(String, Vec<u8>)> {
        let config = serde_json::to_vec(&json!({
            "architecture": arch,
            "os": "linux",
            "config": run,
            "rootfs": {
                "type": "layers",
                "diff_ids": layers.iter().map(|l| l.diff_id.as_str()).collect::<Vec<_>>(),
            },
        }))?;
        let config_digest = sha256(&config);
        let config_len = config.len() as u64;
        self.push_blob(reference, Bytes::from(config), &config_digest)
            .await?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": descriptor(CONFIG_MEDIA_TYPE, &config_digest, config_len),
            "layers": layers.iter().map(|l| &l.descriptor).collect::<Vec<_>>(),
        }))?;
        Ok((config_digest, manifest))
    }

    async fn push_image(
        &self,
        reference: &Reference,
        repo: &str,
        tag: &str,
        parts: ImageParts<'_>,
    ) -> Result<Pushed> {
        let ImageParts {
            arch,
            run,
            layers,
            build_id,
        } = parts;
        let (config_digest, manifest) = self
            .push_config_and_build_manifest(reference, arch, run, &layers)
            .await?;
        let manifest_digest = sha256(&manifest);
        self.client
            .push_manifest_raw(
                reference,
                manifest,
                http::HeaderValue::from_static(MANIFEST_MEDIA_TYPE),
            )
            .await
            .with_context(|| format!("pushing the manifest of {reference}"))?;
        Ok(Pushed {
            reference: format!("{}/{repo}:{tag}", self.host),
            repository: format!("{}/{repo}", self.host),
            manifest_digest,
            config_digest,
            size: layers.iter().map(|l| l.size).sum(),
            build_id,
        })
    }
}

/// What one image is made of, for [`ImageBuilder::push_image`].
struct ImageParts<'a> {
    arch: &'a str,
    /// The config's `config` section: how the image runs.
    run: &'a serde_json::Value,
    layers: Vec<PushedLayer>,
    build_id: String,
}

/// The `config` section of the busybox images.
fn busybox_config() -> serde_json::Value {
    json!({
        "Entrypoint": ENTRYPOINT,
        "Env": ["PATH=/bin"],
        "WorkingDir": "/",
    })
}

fn descriptor(media_type: &str, digest: &str, size: u64) -> serde_json::Value {
    json!({"mediaType": media_type, "digest": digest, "size": size})
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn tar_header(kind: tar::EntryType, path: &str, size: u64, mode: u32) -> Result<tar::Header> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header
        .set_path(path)
        .with_context(|| format!("tar path {path}"))?;
    header.set_size(size);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1_700_000_000);
    header.set_cksum();
    Ok(header)
}

/// `/bin/busybox` and its applet links, identical for every build.
fn base_layer() -> Result<Layer> {
    let busybox = std::fs::read(BUSYBOX).with_context(|| {
        format!("reading {BUSYBOX}: install the Debian package `busybox-static`")
    })?;
    let mut tar = tar::Builder::new(Vec::new());
    let dir = tar_header(tar::EntryType::Directory, "bin/", 0, 0o755)?;
    tar.append(&dir, std::io::empty())?;
    let file = tar_header(
        tar::EntryType::Regular,
        "bin/busybox",
        busybox.len() as u64,
        0o755,
    )?;
    tar.append(&file, busybox.as_slice())?;
    for applet in APPLETS {
        let mut link = tar_header(tar::EntryType::Symlink, &format!("bin/{applet}"), 0, 0o777)?;
        link.set_link_name("busybox")?;
        link.set_cksum();
        tar.append(&link, std::io::empty())?;
    }
    Layer::gzip(tar.into_inner()?)
}

/// `/build-id` with this build's id.
fn build_id_layer(build_id: &str) -> Result<Layer> {
    let content = format!("{build_id}\n");
    let mut tar = tar::Builder::new(Vec::new());
    let file = tar_header(
        tar::EntryType::Regular,
        "build-id",
        content.len() as u64,
        0o644,
    )?;
    tar.append(&file, content.as_bytes())?;
    Layer::gzip(tar.into_inner()?)
}

/// An uncompressed tar holding `random.bin` of `bytes` random bytes, as a stream of
/// pieces generated on demand.
fn random_tar(
    bytes: u64,
) -> Result<impl futures::Stream<Item = oci_client::errors::Result<Bytes>> + Send + 'static> {
    let header = tar_header(tar::EntryType::Regular, "random.bin", bytes, 0o644)?;
    let header: [u8; 512] = *header.as_bytes();
    let data_end = 512 + bytes;
    // Data padded to a 512-byte block, then two zero blocks end the archive.
    let total = data_end.div_ceil(512) * 512 + 1024;
    let rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
    Ok(stream::unfold(
        (0u64, rng),
        move |(offset, mut rng)| async move {
            if offset >= total {
                return None;
            }
            let len = (total - offset).min(RANDOM_CHUNK as u64);
            let mut piece = vec![0u8; len as usize];
            let end = offset + len;
            // The tar header, if this piece covers part of it.
            for (i, byte) in piece.iter_mut().enumerate() {
                let at = offset + i as u64;
                if at >= 512 {
                    break;
                }
                *byte = header.get(at as usize).copied().unwrap_or(0);
            }
            // Random data where this piece overlaps [512, data_end).
            let from = offset.max(512);
            let to = end.min(data_end);
            if from < to
                && let Some(slice) = piece.get_mut((from - offset) as usize..(to - offset) as usize)
            {
                rng.fill_bytes(slice);
            }
            Some((Ok(Bytes::from(piece)), (end, rng)))
        },
    ))
}

/// The layer of a binary image, and whether it holds the CA bundle.
struct BinaryLayer {
    layer: Layer,
    has_ca_bundle: bool,
}

/// The architecture name (OCI / Go) of this host.
fn host_arch() -> Result<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" => Ok("amd64"),
        "aarch64" => Ok("arm64"),
        other => bail!("no OCI architecture name known for host architecture {other}"),
    }
}

fn binary_name(binary: &Path) -> Result<String> {
    binary
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{} has no usable file name", binary.display()))
}

/// An absolute host path as a tar path (no leading `/`).
fn tar_path(path: &Path) -> Result<String> {
    path.to_str()
        .and_then(|p| p.strip_prefix('/'))
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("{} is not an absolute UTF-8 file path", path.display()))
}

/// The shared libraries `ldd` lists for `binary` (loader included); none when static.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(binary).output().with_context(|| {
        format!(
            "running `ldd {}` (Debian package `libc-bin`)",
            binary.display()
        )
    })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!(
            "`ldd {}` failed ({}): {stderr}{stdout}",
            binary.display(),
            output.status
        );
    }
    parse_ldd(&stdout).with_context(|| format!("`ldd {}`", binary.display()))
}

/// The absolute paths in `ldd` output; an error for a library it did not find.
fn parse_ldd(output: &str) -> Result<Vec<PathBuf>> {
    let mut libraries = Vec::new();
    for line in output.lines().map(str::trim) {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2
        // (0x...)`, `linux-vdso.so.1 (0x...)` (in the kernel, no file), `statically linked`.
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("the shared library {} was not found", name.trim());
                }
                rest.split_whitespace().next()
            }
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// The one layer of [`ImageBuilder::push_binary`] (see there), entries sorted, fixed
/// owners and mtimes: the same files give the same bytes.
fn binary_layer(binary: &Path) -> Result<BinaryLayer> {
    let name = binary_name(binary)?;
    // Regular files by tar path: (content, mode).
    let mut files: BTreeMap<String, (Vec<u8>, u32)> = BTreeMap::new();
    // Hard links by tar path: their target's tar path.
    let mut links: BTreeMap<String, String> = BTreeMap::new();
    let read =
        |path: &Path| std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    files.insert(format!("{BINARY_DIR}/{name}"), (read(binary)?, 0o755));
    for library in shared_libraries(binary)? {
        let real = std::fs::canonicalize(&library)
            .with_context(|| format!("resolving {}", library.display()))?;
        let listed = tar_path(&library)?;
        if !files.contains_key(&listed) {
            files.insert(listed.clone(), (read(&real)?, 0o755));
        }
        let resolved = tar_path(&real)?;
        if resolved != listed {
            links.entry(resolved).or_insert(listed);
        }
    }
    links.retain(|path, _| !files.contains_key(path));
    let ca_bundle = Path::new("/").join(CA_BUNDLE);
    let has_ca_bundle = ca_bundle.is_file();
    if has_ca_bundle {
        files.insert(CA_BUNDLE.to_string(), (read(&ca_bundle)?, 0o644));
    }
    files.insert("etc/passwd".into(), (PASSWD.as_bytes().to_vec(), 0o644));
    files.insert("etc/group".into(), (GROUP.as_bytes().to_vec(), 0o644));

    // Directories by tar path: (mode, owner).
    let mut dirs: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    for path in files.keys().chain(links.keys()) {
        for ancestor in Path::new(path).ancestors().skip(1) {
            if let Some(dir) = ancestor.to_str().filter(|d| !d.is_empty()) {
                dirs.insert(dir.to_string(), (0o755, 0));
            }
        }
    }
    dirs.insert("tmp".into(), (0o1777, 0));
    dirs.insert("root".into(), (0o700, 0));
    dirs.insert("home".into(), (0o755, 0));
    dirs.insert("home/nonroot".into(), (0o700, NONROOT));

    let mut tar = tar::Builder::new(Vec::new());
    for (dir, (mode, owner)) in &dirs {
        let mut header = tar_header(tar::EntryType::Directory, &format!("{dir}/"), 0, *mode)?;
        header.set_uid(u64::from(*owner));
        header.set_gid(u64::from(*owner));
        header.set_cksum();
        tar.append(&header, std::io::empty())?;
    }
    for (path, (content, mode)) in &files {
        let header = tar_header(tar::EntryType::Regular, path, content.len() as u64, *mode)?;
        tar.append(&header, content.as_slice())?;
    }
    for (path, target) in &links {
        let mut header = tar_header(tar::EntryType::Link, path, 0, 0o755)?;
        header
            .set_link_name(target)
            .with_context(|| format!("tar link {path} -> {target}"))?;
        header.set_cksum();
        tar.append(&header, std::io::empty())?;
    }
    Ok(BinaryLayer {
        layer: Layer::gzip(tar.into_inner()?)?,
        has_ca_bundle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_and_loader_paths() {
        let output = "\tlinux-vdso.so.1 (0x00007ffd1c5f2000)\n\
            \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f2c5ac53000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2c59c1e000)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f2c5ac86000)\n";
        assert_eq!(
            parse_ldd(output).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2",
            ]
            .map(PathBuf::from)
        );
        assert_eq!(
            parse_ldd("\tstatically linked\n").unwrap(),
            Vec::<PathBuf>::new()
        );
        let missing = parse_ldd("\tlibssl.so.3 => not found\n").unwrap_err();
        assert!(format!("{missing}").contains("libssl.so.3"), "{missing}");
    }

    #[test]
    fn passwd_and_group_have_root_and_nonroot() {
        assert!(PASSWD.lines().any(|l| l.starts_with("root:x:0:0:")));
        assert!(
            PASSWD
                .lines()
                .any(|l| l.starts_with("nonroot:x:65532:65532:"))
        );
        assert!(GROUP.lines().any(|l| l == "nonroot:x:65532:"));
    }
}
