//! `POST /webhooks/registry`: registry push notifications (CNCF distribution's
//! notification envelope, Docker Hub's webhook payload) that make the engine re-resolve
//! the pushed tag at once. The shared secret comes as `Authorization: Bearer <secret>`
//! (distribution's `endpoints[].headers`), an `X-Warmroll-Secret` header, or a
//! `?secret=` query parameter (Docker Hub cannot set headers).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use tracing::{info, warn};

use super::Shared;

/// The pushed tags a payload names, as `repository:tag` (Docker Hub's official images
/// under `library/`). Events that are not pushes of a tag are skipped.
pub fn pushed_tags(body: &[u8]) -> Result<Vec<String>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if value.get("events").is_some() {
        let envelope: Envelope =
            serde_json::from_value(value).map_err(|e| format!("bad notification envelope: {e}"))?;
        return Ok(envelope
            .events
            .into_iter()
            .filter(|e| e.action == "push")
            .filter_map(|e| {
                let tag = e.target.tag.filter(|t| !t.is_empty())?;
                Some(format!("{}:{tag}", e.target.repository))
            })
            .collect());
    }
    if value.get("push_data").is_some() {
        let hub: DockerHub =
            serde_json::from_value(value).map_err(|e| format!("bad Docker Hub payload: {e}"))?;
        let repo = if hub.repository.repo_name.contains('/') {
            hub.repository.repo_name
        } else {
            format!("library/{}", hub.repository.repo_name)
        };
        return Ok(vec![format!("{repo}:{}", hub.push_data.tag)]);
    }
    Err("neither a distribution notification (events) nor a Docker Hub payload (push_data)".into())
}

#[derive(Deserialize)]
struct Envelope {
    events: Vec<NotificationEvent>,
}

#[derive(Deserialize)]
struct NotificationEvent {
    #[serde(default)]
    action: String,
    target: NotificationTarget,
}

#[derive(Deserialize)]
struct NotificationTarget {
    repository: String,
    #[serde(default)]
    tag: Option<String>,
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

/// Whether the request carries the secret (compared in constant time).
fn authorised(secret: &str, headers: &HeaderMap, query: &HashMap<String, String>) -> bool {
    let offered = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| {
            headers
                .get("x-warmroll-secret")
                .and_then(|v| v.to_str().ok())
        })
        .or_else(|| query.get("secret").map(String::as_str));
    offered.is_some_and(|o| constant_time_eq(o.trim().as_bytes(), secret.as_bytes()))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
    if !authorised(secret, &headers, &query) {
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

    #[test]
    fn bad_payloads_say_why() {
        assert!(pushed_tags(b"nope").unwrap_err().contains("not JSON"));
        assert!(pushed_tags(b"{}").unwrap_err().contains("neither"));
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
        assert!(!authorised("s3", &headers, &none));
        headers.insert("authorization", "Bearer s3".parse().unwrap());
        assert!(authorised("s3", &headers, &none));
        assert!(!authorised("s4", &headers, &none));
        let query: HashMap<String, String> = [("secret".to_owned(), "s4".to_owned())].into();
        assert!(authorised("s4", &HeaderMap::new(), &query));
        let mut headers = HeaderMap::new();
        headers.insert("x-warmroll-secret", "s5".parse().unwrap());
        assert!(authorised("s5", &headers, &none));
        assert!(!constant_time_eq(b"ab", b"abc"));
    }
}
