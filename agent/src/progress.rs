//! Pull progress from containerd's content store: while a warm-up runs, bytes done and
//! bytes total of the image's layers.
//!
//! With the expected digest known, the [`Tracker`] reads the manifest (or the index, then
//! this node's child manifest) from the content store once it is there, and counts each
//! layer as its committed size, or the offset of its active ingest (CRI pulls name ingests
//! `…layer-sha256:<hex>`), or nothing yet: the total is exact from the first sample on.
//! Without a digest it follows the manifest whose ingest it sees, and until then sums the
//! layer ingests it has seen (the total then grows as layers start).

use std::collections::{BTreeMap, HashSet};

use serde::Deserialize;
use tracing::debug;
use warmroll_proto::image::Digest;

use crate::containerd::{ContainerdError, ContentStore, Ingest};

/// Bytes of the image's layers on the node so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullProgress {
    pub done: u64,
    /// `None` while unknown.
    pub total: Option<u64>,
}

impl PullProgress {
    /// Whole percent, when the total is known (and not zero).
    pub fn percent(&self) -> Option<u64> {
        let total = self.total.filter(|t| *t > 0)?;
        Some(self.done.min(total).saturating_mul(100) / total)
    }
}

/// A layer of the manifest being pulled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub digest: String,
    pub size: u64,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<DescriptorPlatform>,
}

#[derive(Deserialize)]
struct DescriptorPlatform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct ManifestOrIndex {
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// What a manifest-or-index blob holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Manifest(Vec<Layer>),
    /// The digest of the child for the wanted platform, if there is one.
    Index(Option<String>),
}

/// Parse an image manifest or index (pure). `os`/`arch`/`variant` choose an index's
/// child the way the runtime does (a child without variant matches any variant).
pub fn parse_manifest(
    bytes: &[u8],
    os: &str,
    arch: &str,
    variant: Option<&str>,
) -> Result<Parsed, String> {
    let m: ManifestOrIndex =
        serde_json::from_slice(bytes).map_err(|e| format!("not a manifest or index: {e}"))?;
    if let Some(children) = m.manifests {
        let matches = |d: &&Descriptor| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == os && p.architecture == arch)
        };
        let exact = children.iter().filter(matches).find(|d| {
            let v = d.platform.as_ref().and_then(|p| p.variant.as_deref());
            v.is_none() || v == variant
        });
        let child = exact.or_else(|| children.iter().find(matches));
        return Ok(Parsed::Index(child.map(|d| d.digest.clone())));
    }
    match m.layers {
        Some(layers) => Ok(Parsed::Manifest(
            layers
                .into_iter()
                .map(|d| Layer {
                    digest: d.digest,
                    size: d.size,
                })
                .collect(),
        )),
        None => Err("neither layers nor manifests".into()),
    }
}

/// The ingest of `digest`, if one is active (refs end with the digest).
fn ingest_of<'a>(ingests: &'a [Ingest], digest: &str) -> Option<&'a Ingest> {
    ingests.iter().find(|i| i.reference.ends_with(digest))
}

/// Progress of known layers (pure): committed layers count whole, ingesting ones their
/// offset, the rest nothing.
pub fn layer_progress(
    layers: &[Layer],
    committed: &HashSet<String>,
    ingests: &[Ingest],
) -> PullProgress {
    let mut done = 0u64;
    let mut total = 0u64;
    for l in layers {
        total = total.saturating_add(l.size);
        let part = if committed.contains(&l.digest) {
            l.size
        } else {
            ingest_of(ingests, &l.digest).map_or(0, |i| i.offset.min(l.size))
        };
        done = done.saturating_add(part);
    }
    PullProgress {
        done,
        total: Some(total),
    }
}

/// The manifest or index digest named by an ingest ref (`…manifest-sha256:<hex>` or
/// `…index-sha256:<hex>`), if it is one.
pub fn root_of_ingest(reference: &str) -> Option<String> {
    ["manifest-", "index-"].iter().find_map(|kind| {
        let (_, rest) = reference.rsplit_once(kind)?;
        Digest::parse(rest).ok().map(|d| d.to_string())
    })
}

/// Follows one pull's progress through the content store.
#[derive(Debug)]
pub struct Tracker {
    /// The manifest or index to follow, when known.
    root: Option<String>,
    os: String,
    arch: String,
    variant: Option<String>,
    layers: Option<Vec<Layer>>,
    committed: HashSet<String>,
    /// Without known layers: the layer ingests seen (ref -> (offset, total)).
    seen: BTreeMap<String, (u64, u64)>,
}

impl Tracker {
    /// A tracker for a pull whose tag should resolve to `expected` (when known), on a
    /// node of the given platform.
    pub fn new(expected: Option<&Digest>, os: &str, arch: &str, variant: Option<&str>) -> Self {
        Tracker {
            root: expected.map(ToString::to_string),
            os: os.to_owned(),
            arch: arch.to_owned(),
            variant: variant.map(str::to_owned),
            layers: None,
            committed: HashSet::new(),
            seen: BTreeMap::new(),
        }
    }

    /// Reads the manifest (through an index if needed) once the store holds it.
    async fn resolve_layers(&mut self, store: &dyn ContentStore) -> Result<(), ContainerdError> {
        // An index, then its child: two steps at most.
        for _ in 0..2 {
            let Some(root) = self.root.clone() else {
                return Ok(());
            };
            let Some(bytes) = store.read_small_blob(&root).await? else {
                return Ok(());
            };
            match parse_manifest(&bytes, &self.os, &self.arch, self.variant.as_deref()) {
                Ok(Parsed::Manifest(layers)) => {
                    self.layers = Some(layers);
                    return Ok(());
                }
                Ok(Parsed::Index(Some(child))) => self.root = Some(child),
                Ok(Parsed::Index(None)) | Err(_) => {
                    debug!(digest = %root, "no manifest for this platform; progress from ingests");
                    self.root = None;
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// One sample of the pull's progress; `None` while nothing is known yet.
    pub async fn sample(
        &mut self,
        store: &dyn ContentStore,
    ) -> Result<Option<PullProgress>, ContainerdError> {
        let ingests = store.ingests().await?;
        if self.layers.is_none() {
            if self.root.is_none() {
                self.root = ingests.iter().find_map(|i| root_of_ingest(&i.reference));
            }
            self.resolve_layers(store).await?;
        }
        let Some(layers) = &self.layers else {
            return Ok(self.sum_of_ingests(&ingests, false));
        };
        for l in layers {
            if self.committed.contains(&l.digest) || ingest_of(&ingests, &l.digest).is_some() {
                continue;
            }
            if store.blob_size(&l.digest).await?.is_some() {
                self.committed.insert(l.digest.clone());
            }
        }
        Ok(Some(layer_progress(layers, &self.committed, &ingests)))
    }

    /// The last word after the pull succeeded: every layer is on the node.
    pub async fn finish(
        &mut self,
        store: &dyn ContentStore,
    ) -> Result<Option<PullProgress>, ContainerdError> {
        if self.layers.is_none() {
            self.resolve_layers(store).await?;
        }
        match &self.layers {
            Some(layers) => {
                let total = layers.iter().fold(0u64, |t, l| t.saturating_add(l.size));
                Ok(Some(PullProgress {
                    done: total,
                    total: Some(total),
                }))
            }
            None => Ok(self.sum_of_ingests(&[], true)),
        }
    }

    /// Sum of the layer ingests seen: an ingest that is gone is done.
    fn sum_of_ingests(&mut self, ingests: &[Ingest], all_done: bool) -> Option<PullProgress> {
        for i in ingests.iter().filter(|i| i.reference.contains("layer-")) {
            self.seen.insert(i.reference.clone(), (i.offset, i.total));
        }
        if self.seen.is_empty() {
            return None;
        }
        let mut done = 0u64;
        let mut total = 0u64;
        for (reference, (offset, size)) in &self.seen {
            total = total.saturating_add(*size);
            let active = !all_done && ingests.iter().any(|i| &i.reference == reference);
            done = done.saturating_add(if active { (*offset).min(*size) } else { *size });
        }
        Some(PullProgress {
            done,
            total: Some(total),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

    fn ingest(reference: &str, offset: u64, total: u64) -> Ingest {
        Ingest {
            reference: reference.into(),
            offset,
            total,
        }
    }

    #[test]
    fn manifests_give_layers_and_indexes_the_platform_child() {
        let manifest = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{C}","size":9}},
               "layers":[{{"digest":"{A}","size":100}},{{"digest":"{B}","size":50}}]}}"#
        );
        assert_eq!(
            parse_manifest(manifest.as_bytes(), "linux", "amd64", None),
            Ok(Parsed::Manifest(vec![
                Layer {
                    digest: A.into(),
                    size: 100
                },
                Layer {
                    digest: B.into(),
                    size: 50
                }
            ]))
        );
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[
               {{"digest":"{A}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
               {{"digest":"{B}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        let pick = |arch, variant| parse_manifest(index.as_bytes(), "linux", arch, variant);
        assert_eq!(pick("amd64", None), Ok(Parsed::Index(Some(B.into()))));
        assert_eq!(pick("arm64", Some("v8")), Ok(Parsed::Index(Some(A.into()))));
        assert_eq!(pick("arm64", Some("v9")), Ok(Parsed::Index(Some(A.into()))));
        assert_eq!(pick("s390x", None), Ok(Parsed::Index(None)));
        assert!(parse_manifest(b"{}", "linux", "amd64", None).is_err());
        assert!(parse_manifest(b"<html>", "linux", "amd64", None).is_err());
    }

    #[test]
    fn layers_count_whole_when_committed_and_by_offset_while_ingesting() {
        let layers = [
            Layer {
                digest: A.into(),
                size: 100,
            },
            Layer {
                digest: B.into(),
                size: 50,
            },
            Layer {
                digest: C.into(),
                size: 10,
            },
        ];
        let committed: HashSet<String> = [A.to_string()].into();
        let ingests = [
            ingest(&format!("k8s.io/1/layer-{B}"), 20, 50),
            ingest("k8s.io/1/layer-sha256:dddd", 7, 9),
        ];
        let p = layer_progress(&layers, &committed, &ingests);
        assert_eq!(
            p,
            PullProgress {
                done: 120,
                total: Some(160)
            }
        );
        assert_eq!(p.percent(), Some(75));
        // An offset beyond the descriptor's size is capped.
        let p = layer_progress(
            &layers,
            &committed,
            &[ingest(&format!("layer-{B}"), 999, 50)],
        );
        assert_eq!(p.done, 150);
        assert_eq!(
            PullProgress {
                done: 5,
                total: Some(0)
            }
            .percent(),
            None
        );
    }

    #[test]
    fn manifest_and_index_ingests_name_the_root() {
        assert_eq!(
            root_of_ingest(&format!("manifest-{A}")),
            Some(A.to_string())
        );
        assert_eq!(
            root_of_ingest(&format!("k8s.io/3/index-{B}")),
            Some(B.to_string())
        );
        assert_eq!(root_of_ingest(&format!("layer-{A}")), None);
        assert_eq!(root_of_ingest("manifest-sha256:short"), None);
    }

    /// A content store scripted by the test.
    #[derive(Default)]
    struct Store {
        ingests: std::sync::Mutex<Vec<Ingest>>,
        blobs: std::sync::Mutex<BTreeMap<String, Vec<u8>>>,
    }

    impl ContentStore for Store {
        fn ingests(&self) -> futures::future::BoxFuture<'_, Result<Vec<Ingest>, ContainerdError>> {
            let v = self.ingests.lock().unwrap().clone();
            Box::pin(async move { Ok(v) })
        }
        fn blob_size<'a>(
            &'a self,
            digest: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Option<u64>, ContainerdError>> {
            let v = self
                .blobs
                .lock()
                .unwrap()
                .get(digest)
                .map(|b| b.len() as u64);
            Box::pin(async move { Ok(v) })
        }
        fn read_small_blob<'a>(
            &'a self,
            digest: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Option<Vec<u8>>, ContainerdError>> {
            let v = self.blobs.lock().unwrap().get(digest).cloned();
            Box::pin(async move { Ok(v) })
        }
    }

    #[tokio::test]
    async fn the_tracker_follows_the_expected_manifest_to_completion() {
        let store = Store::default();
        let manifest =
            format!(r#"{{"layers":[{{"digest":"{A}","size":4}},{{"digest":"{B}","size":6}}]}}"#);
        let root = Digest::parse(C).unwrap();
        let mut t = Tracker::new(Some(&root), "linux", "amd64", None);
        assert_eq!(
            t.sample(&store).await.unwrap(),
            None,
            "manifest not there yet"
        );
        store
            .blobs
            .lock()
            .unwrap()
            .insert(C.into(), manifest.into_bytes());
        store.blobs.lock().unwrap().insert(A.into(), vec![0; 4]);
        *store.ingests.lock().unwrap() = vec![ingest(&format!("layer-{B}"), 3, 6)];
        assert_eq!(
            t.sample(&store).await.unwrap(),
            Some(PullProgress {
                done: 7,
                total: Some(10)
            })
        );
        assert_eq!(
            t.finish(&store).await.unwrap(),
            Some(PullProgress {
                done: 10,
                total: Some(10)
            })
        );
    }

    #[tokio::test]
    async fn without_a_digest_the_tracker_sums_the_layer_ingests_it_saw() {
        let store = Store::default();
        let mut t = Tracker::new(None, "linux", "amd64", None);
        assert_eq!(t.sample(&store).await.unwrap(), None);
        *store.ingests.lock().unwrap() = vec![
            ingest(&format!("layer-{A}"), 1, 4),
            ingest(&format!("layer-{B}"), 2, 6),
        ];
        assert_eq!(
            t.sample(&store).await.unwrap(),
            Some(PullProgress {
                done: 3,
                total: Some(10)
            })
        );
        *store.ingests.lock().unwrap() = vec![ingest(&format!("layer-{B}"), 5, 6)];
        assert_eq!(
            t.sample(&store).await.unwrap(),
            Some(PullProgress {
                done: 9,
                total: Some(10)
            }),
            "a finished ingest counts whole"
        );
        assert_eq!(
            t.finish(&store).await.unwrap(),
            Some(PullProgress {
                done: 10,
                total: Some(10)
            })
        );
    }
}
