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

use std::collections::BTreeMap;
use std::io::Write;
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
    /// The content of `/build-id` in this image.
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
        self.push_image(&reference, repo, tag, "amd64", layers, build_id)
            .await
    }

    /// Pushes a new build as a multi-arch index with linux/amd64 and linux/arm64
    /// children under `repo:tag`. Both children share the build id; the arm64 child
    /// carries the same x86-64 busybox (it exists to be listed and resolved, not run).
    pub async fn push_index(&self, repo: &str, tag: &str) -> Result<PushedIndex> {
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
                .push_config_and_build_manifest(&reference, arch, &layers)
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
        })
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
            "amd64",
            vec![base, build, random],
            build_id,
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

    /// Pushes the config for `arch` and returns its digest and the manifest bytes.
    async fn push_config_and_build_manifest(
        &self,
        reference: &Reference,
        arch: &str,
        layers: &[PushedLayer],
    ) -> Result<(String, Vec<u8>)> {
        let config = serde_json::to_vec(&json!({
            "architecture": arch,
            "os": "linux",
            "config": {
                "Entrypoint": ENTRYPOINT,
                "Env": ["PATH=/bin"],
                "WorkingDir": "/",
            },
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
        arch: &str,
        layers: Vec<PushedLayer>,
        build_id: String,
    ) -> Result<Pushed> {
        let (config_digest, manifest) = self
            .push_config_and_build_manifest(reference, arch, &layers)
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
