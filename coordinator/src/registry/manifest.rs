//! What a tag resolves to, and the pure parsing of manifests and indexes.

use std::sync::Arc;

use oci_client::manifest::{
    IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE, OciImageIndex,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use warmroll_proto::image::{Digest, ImageRef, Platform};

/// The `Accept` list of a manifest request: multi-arch indexes first, then
/// single-platform manifests.
pub(crate) const ACCEPT: [&str; 4] = [
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
];

const REFERENCE_TYPE_ANNOTATION: &str = "vnd.docker.reference.type";
const ATTESTATION: &str = "attestation-manifest";
const UNKNOWN: &str = "unknown";

/// One platform's manifest inside a multi-arch index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Child {
    pub platform: Platform,
    pub digest: Digest,
    pub media_type: String,
}

/// A tag's current target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resolved {
    /// The normalised reference that was resolved.
    pub image: ImageRef,
    /// The digest the tag points to (an index digest for multi-arch images).
    pub digest: Digest,
    /// The manifest's media type, as the registry announced it.
    pub media_type: String,
    /// Per-platform children when `digest` is an index (attestations left out);
    /// empty for a single-platform manifest.
    #[serde(serialize_with = "serialize_children")]
    pub children: Arc<[Child]>,
}

fn serialize_children<S: serde::Serializer>(
    children: &Arc<[Child]>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(children.iter())
}

impl Resolved {
    pub fn is_index(&self) -> bool {
        is_index_media_type(&self.media_type)
    }
}

/// The outcome of resolving a reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resolution {
    /// The reference names a digest: nothing to track, no request made.
    Pinned { image: ImageRef, digest: Digest },
    /// The tag's current target.
    Tag(Resolved),
}

/// Whether a container running `running` is in sync with the tag's current target:
/// it runs the index itself or one of the index's per-platform children.
pub fn digest_matches(running: &Digest, resolved: &Resolved) -> bool {
    *running == resolved.digest || resolved.children.iter().any(|c| c.digest == *running)
}

pub(crate) fn is_index_media_type(media_type: &str) -> bool {
    media_type == OCI_IMAGE_INDEX_MEDIA_TYPE || media_type == IMAGE_MANIFEST_LIST_MEDIA_TYPE
}

fn is_image_media_type(media_type: &str) -> bool {
    media_type == OCI_IMAGE_MEDIA_TYPE || media_type == IMAGE_MANIFEST_MEDIA_TYPE
}

/// The media type of a `Content-Type` header value, without parameters.
pub(crate) fn media_type_of(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or_default().trim()
}

/// Whether a media type from a HEAD answers the question "index or not" without a GET.
pub(crate) fn is_known_media_type(media_type: &str) -> bool {
    is_index_media_type(media_type) || is_image_media_type(media_type)
}

/// `sha256:` of a manifest body, for registries that send no `Docker-Content-Digest`.
pub(crate) fn sha256_of(body: &[u8]) -> Result<Digest, String> {
    Digest::sha256_hex(&hex::encode(Sha256::digest(body))).map_err(|e| e.to_string())
}

/// `sha512:` of a manifest body, to check content fetched by a sha512 digest.
pub(crate) fn sha512_of(body: &[u8]) -> Result<Digest, String> {
    let hex = hex::encode(sha2::Sha512::digest(body));
    Digest::parse(&format!("sha512:{hex}")).map_err(|e| e.to_string())
}

/// A parsed manifest body: its media type and, for an index, its children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedManifest {
    pub media_type: String,
    pub children: Arc<[Child]>,
}

/// Parses a manifest body. `header_media_type` is the response's `Content-Type`; the
/// body's own `mediaType` wins when present. Errors are reasons for a bad response.
pub(crate) fn parse_manifest(
    body: &[u8],
    header_media_type: Option<&str>,
) -> Result<ParsedManifest, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("manifest is not JSON: {e}"))?;
    let object = value
        .as_object()
        .ok_or_else(|| "manifest is not a JSON object".to_owned())?;
    let schema = object.get("schemaVersion").and_then(|v| v.as_i64());
    if schema != Some(2) {
        return Err(format!(
            "unsupported manifest schemaVersion {}",
            object
                .get("schemaVersion")
                .map_or_else(|| "(missing)".to_owned(), |v| v.to_string())
        ));
    }
    let body_media_type = object.get("mediaType").and_then(|v| v.as_str());
    let media_type = match (body_media_type, header_media_type) {
        (Some(m), _) => m.to_owned(),
        (None, Some(h)) if is_known_media_type(h) => h.to_owned(),
        // OCI allows an index without mediaType: tell by shape.
        (None, _) if object.contains_key("manifests") => OCI_IMAGE_INDEX_MEDIA_TYPE.to_owned(),
        (None, _) if object.contains_key("layers") => OCI_IMAGE_MEDIA_TYPE.to_owned(),
        (None, _) => return Err("cannot tell the manifest's type (no mediaType)".to_owned()),
    };
    if !is_known_media_type(&media_type) {
        return Err(format!("unsupported manifest media type {media_type:?}"));
    }
    let children = if is_index_media_type(&media_type) {
        let index: OciImageIndex =
            serde_json::from_value(value).map_err(|e| format!("malformed image index: {e}"))?;
        index_children(&index)?
    } else {
        Arc::from([])
    };
    Ok(ParsedManifest {
        media_type,
        children,
    })
}

/// The runnable per-platform entries of an index: attestation manifests
/// (`vnd.docker.reference.type: attestation-manifest`, platform `unknown/unknown`) and
/// entries without a platform are left out.
fn index_children(index: &OciImageIndex) -> Result<Arc<[Child]>, String> {
    let mut children = Vec::new();
    for entry in &index.manifests {
        let attestation = entry
            .annotations
            .as_ref()
            .and_then(|a| a.get(REFERENCE_TYPE_ANNOTATION))
            .is_some_and(|t| t == ATTESTATION);
        let Some(platform) = entry.platform.as_ref() else {
            continue;
        };
        let os = platform.os.to_string();
        let architecture = platform.architecture.to_string();
        if attestation || os == UNKNOWN || architecture == UNKNOWN {
            continue;
        }
        let digest = Digest::parse(&entry.digest)
            .map_err(|e| format!("index entry for {os}/{architecture}: {e}"))?;
        children.push(Child {
            platform: Platform {
                os,
                architecture,
                variant: platform.variant.clone().filter(|v| !v.is_empty()),
            },
            digest,
            media_type: entry.media_type.clone(),
        });
    }
    Ok(children.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
    const I: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn index_json() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_IMAGE_INDEX_MEDIA_TYPE}","manifests":[
              {{"mediaType":"{OCI_IMAGE_MEDIA_TYPE}","digest":"{A}","size":1,
                "platform":{{"os":"linux","architecture":"amd64"}}}},
              {{"mediaType":"{OCI_IMAGE_MEDIA_TYPE}","digest":"{B}","size":1,
                "platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
              {{"mediaType":"{OCI_IMAGE_MEDIA_TYPE}","digest":"{C}","size":1,
                "platform":{{"os":"unknown","architecture":"unknown"}},
                "annotations":{{"vnd.docker.reference.type":"attestation-manifest",
                                "vnd.docker.reference.digest":"{A}"}}}}
            ]}}"#
        )
    }

    fn d(s: &str) -> Digest {
        Digest::parse(s).unwrap()
    }

    #[test]
    fn index_children_leave_out_attestations() {
        let parsed = parse_manifest(index_json().as_bytes(), None).unwrap();
        assert_eq!(parsed.media_type, OCI_IMAGE_INDEX_MEDIA_TYPE);
        let platforms: Vec<String> = parsed
            .children
            .iter()
            .map(|c| c.platform.to_string())
            .collect();
        assert_eq!(platforms, ["linux/amd64", "linux/arm64/v8"]);
        assert_eq!(parsed.children[0].digest, d(A));
    }

    #[test]
    fn attestation_annotation_alone_excludes_an_entry() {
        let json = format!(
            r#"{{"schemaVersion":2,"manifests":[
              {{"mediaType":"{OCI_IMAGE_MEDIA_TYPE}","digest":"{A}","size":1,
                "platform":{{"os":"linux","architecture":"amd64"}},
                "annotations":{{"vnd.docker.reference.type":"attestation-manifest"}}}},
              {{"mediaType":"{OCI_IMAGE_MEDIA_TYPE}","digest":"{B}","size":1}}
            ]}}"#
        );
        let parsed = parse_manifest(json.as_bytes(), None).unwrap();
        assert_eq!(
            parsed.media_type, OCI_IMAGE_INDEX_MEDIA_TYPE,
            "told by shape"
        );
        assert!(parsed.children.is_empty());
    }

    #[test]
    fn docker_manifest_list_and_single_manifests() {
        let list = index_json().replace(OCI_IMAGE_INDEX_MEDIA_TYPE, IMAGE_MANIFEST_LIST_MEDIA_TYPE);
        let parsed = parse_manifest(list.as_bytes(), None).unwrap();
        assert_eq!(parsed.children.len(), 2);

        let single = r#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        let parsed = parse_manifest(single.as_bytes(), Some(IMAGE_MANIFEST_MEDIA_TYPE)).unwrap();
        assert_eq!(parsed.media_type, IMAGE_MANIFEST_MEDIA_TYPE);
        assert!(parsed.children.is_empty());
        let parsed = parse_manifest(single.as_bytes(), None).unwrap();
        assert_eq!(parsed.media_type, OCI_IMAGE_MEDIA_TYPE);
    }

    #[test]
    fn bad_manifests_give_reasons() {
        let cases: [(&[u8], &str); 6] = [
            (b"<html>nope</html>", "not JSON"),
            (b"[1,2]", "not a JSON object"),
            (br#"{"schemaVersion":1}"#, "schemaVersion 1"),
            (br#"{"schemaVersion":2}"#, "cannot tell"),
            (br#"{"schemaVersion":2,"mediaType":"text/plain"}"#, "unsupported manifest media type"),
            (
                br#"{"schemaVersion":2,"manifests":[{"mediaType":"x","digest":"sha256:zz","size":1,"platform":{"os":"linux","architecture":"amd64"}}]}"#,
                "linux/amd64",
            ),
        ];
        for (body, want) in cases {
            let err = parse_manifest(body, None).unwrap_err();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }

    #[test]
    fn digest_matching_accepts_index_and_children() {
        let parsed = parse_manifest(index_json().as_bytes(), None).unwrap();
        let resolved = Resolved {
            image: ImageRef::parse("reg.io/app:v1").unwrap(),
            digest: d(I),
            media_type: parsed.media_type,
            children: parsed.children,
        };
        assert!(resolved.is_index());
        assert!(digest_matches(&d(I), &resolved));
        assert!(digest_matches(&d(A), &resolved));
        assert!(digest_matches(&d(B), &resolved));
        assert!(
            !digest_matches(&d(C), &resolved),
            "attestations are not runnable"
        );
    }

    #[test]
    fn content_type_and_hashing() {
        assert_eq!(
            media_type_of("application/json; charset=utf-8"),
            "application/json"
        );
        assert_eq!(
            sha256_of(b"").unwrap().to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    use crate::registry::strategies::{json_value, with_any_fields};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_manifest_bytes_are_no_panic(
            body in any::<Vec<u8>>(),
            content_type in proptest::option::of(".{0,40}"),
        ) {
            let _ = parse_manifest(&body, content_type.as_deref());
        }

        #[test]
        fn any_json_manifest_is_no_panic(value in json_value()) {
            let _ = parse_manifest(&serde_json::to_vec(&value).unwrap(), None);
        }

        #[test]
        fn indexes_with_any_field_values_keep_only_their_platform_entries(
            entries in prop::collection::vec(with_any_fields(
                serde_json::json!({
                    "mediaType": OCI_IMAGE_MEDIA_TYPE,
                    "digest": A,
                    "size": 1,
                    "platform": {"os": "linux", "architecture": "amd64"},
                }),
                &["mediaType", "digest", "size", "platform", "annotations"],
            ), 0..6),
            index in with_any_fields(
                serde_json::json!({"schemaVersion": 2, "mediaType": OCI_IMAGE_INDEX_MEDIA_TYPE}),
                &["schemaVersion", "mediaType"],
            ),
        ) {
            let mut index = index;
            index["manifests"] = serde_json::Value::from(entries.clone());
            let body = serde_json::to_vec(&index).unwrap();
            if let Ok(parsed) = parse_manifest(&body, None) {
                prop_assert!(parsed.children.len() <= entries.len());
            }
        }
    }
}
