//! The PATCH flavours (pure): JSON merge patch (RFC 7386) and JSON patch (RFC 6902) via
//! the `json-patch` crate, and strategic merge patch for the fields warmroll touches.
//!
//! Strategic merge patch, as implemented here:
//! - maps merge recursively, `null` deletes a key (labels, annotations, nested specs);
//! - lists whose field name has a patch merge key in Kubernetes (`containers`,
//!   `initContainers`, `env`, `volumes`, `imagePullSecrets` by `name`, `volumeMounts` by
//!   `mountPath`, `ports` by `containerPort`, `ownerReferences` by `uid`, `conditions`
//!   and `addresses` by `type`, ...) merge element-wise by that key; `finalizers` merge
//!   as a set; every other list is replaced;
//! - directives: `$patch: replace|delete|merge` (maps and list elements),
//!   `$retainKeys`, `$deleteFromPrimitiveList/<field>`, `$setElementOrder/<field>`.
//!
//! Limits: merge keys are looked up by field name, not by the Go type at the path (right
//! for every type served here); `$setElementOrder` puts the listed elements first in the
//! given order and keeps the rest after them in their current order.

use serde_json::{Map, Value};

use super::status::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    Merge,
    Strategic,
    Json,
}

impl PatchKind {
    /// The kind named by a PATCH request's `Content-Type`; server-side apply and anything
    /// else is 415.
    pub fn from_content_type(content_type: Option<&str>) -> Result<Self, ApiError> {
        let raw = content_type.unwrap_or("");
        let media = raw.split(';').next().unwrap_or("").trim();
        match media {
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            "application/json-patch+json" => Ok(Self::Json),
            _ => Err(ApiError::unsupported_media_type(raw)),
        }
    }
}

/// Applies a patch body to an object.
pub fn apply(kind: PatchKind, original: &Value, body: &[u8]) -> Result<Value, ApiError> {
    match kind {
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            let mut doc = original.clone();
            json_patch::patch(&mut doc, &ops)
                .map_err(|e| ApiError::unprocessable(e.to_string()))?;
            Ok(doc)
        }
        PatchKind::Merge => {
            let patch = patch_object(body)?;
            let mut doc = original.clone();
            json_patch::merge(&mut doc, &patch);
            Ok(doc)
        }
        PatchKind::Strategic => {
            let patch = patch_object(body)?;
            strategic_merge(original, &patch).map_err(ApiError::bad_request)
        }
    }
}

fn patch_object(body: &[u8]) -> Result<Value, ApiError> {
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
    if patch.is_object() {
        Ok(patch)
    } else {
        Err(ApiError::bad_request("patch must be a JSON object"))
    }
}

/// The Kubernetes patch merge key of a list field, by field name.
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims"
        | "schedulingGates" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => "containerPort",
        "hostAliases" => "ip",
        "ownerReferences" => "uid",
        "conditions" | "addresses" => "type",
        _ => return None,
    })
}

/// Lists of scalars merged as sets.
fn is_primitive_merge_list(field: &str) -> bool {
    field == "finalizers"
}

const SET_ELEMENT_ORDER: &str = "$setElementOrder/";
const DELETE_FROM_PRIMITIVE_LIST: &str = "$deleteFromPrimitiveList/";

/// Applies a strategic merge patch.
pub fn strategic_merge(original: &Value, patch: &Value) -> Result<Value, String> {
    let mut doc = original.clone();
    merge_value(&mut doc, patch)?;
    Ok(doc)
}

fn merge_value(target: &mut Value, patch: &Value) -> Result<(), String> {
    match patch {
        Value::Object(patch_map) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(target_map) = target {
                merge_map(target_map, patch_map)?;
            }
        }
        other => *target = other.clone(),
    }
    Ok(())
}

fn merge_map(target: &mut Map<String, Value>, patch: &Map<String, Value>) -> Result<(), String> {
    match patch.get("$patch").map(|v| v.as_str()) {
        None | Some(Some("merge")) => {}
        Some(Some("replace")) => {
            target.clear();
            let mut rest = patch.clone();
            rest.remove("$patch");
            return merge_map(target, &rest);
        }
        Some(Some("delete")) => {
            target.clear();
            return Ok(());
        }
        Some(other) => return Err(format!("Unknown patch type: {other:?}")),
    }
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix(DELETE_FROM_PRIMITIVE_LIST) {
            let remove = value.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(items)) = target.get_mut(field) {
                items.retain(|item| !remove.contains(item));
            }
        }
    }
    for (key, value) in patch {
        if key.starts_with('$') {
            continue;
        }
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(inner)
                if inner.get("$patch").and_then(Value::as_str) == Some("delete") =>
            {
                target.remove(key);
            }
            Value::Object(_) => {
                let slot = target.entry(key.clone()).or_insert(Value::Null);
                merge_value(slot, value)?;
            }
            Value::Array(items) => {
                let current = target
                    .get(key)
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let merged = merge_list(key, current, items)?;
                target.insert(key.clone(), Value::Array(merged));
            }
            scalar => {
                target.insert(key.clone(), scalar.clone());
            }
        }
    }
    for (key, order) in patch {
        if let (Some(field), Some(order)) = (key.strip_prefix(SET_ELEMENT_ORDER), order.as_array())
            && let Some(Value::Array(items)) = target.get_mut(field)
        {
            reorder(items, order, merge_key(field));
        }
    }
    if let Some(retain) = patch.get("$retainKeys").and_then(Value::as_array) {
        target.retain(|k, _| retain.iter().any(|r| r.as_str() == Some(k)));
    }
    Ok(())
}

fn merge_list(field: &str, mut current: Vec<Value>, patch: &[Value]) -> Result<Vec<Value>, String> {
    let is_directive =
        |item: &Value, what: &str| item.get("$patch").and_then(Value::as_str) == Some(what);
    if patch.iter().any(|item| is_directive(item, "replace")) {
        return strip_all(patch.iter().filter(|item| !is_directive(item, "replace")));
    }
    if let Some(key) = merge_key(field) {
        for item in patch {
            let Some(id) = item.get(key) else {
                return Err(format!(
                    "map: {item} does not contain declared merge key: {key}"
                ));
            };
            let position = current.iter().position(|c| c.get(key) == Some(id));
            if is_directive(item, "delete") {
                current.retain(|c| c.get(key) != Some(id));
                continue;
            }
            match position.and_then(|i| current.get_mut(i)) {
                Some(existing) => merge_value(existing, item)?,
                None => {
                    let mut fresh = Value::Null;
                    merge_value(&mut fresh, item)?;
                    current.push(fresh);
                }
            }
        }
        Ok(current)
    } else if is_primitive_merge_list(field) {
        for item in patch {
            if !current.contains(item) {
                current.push(item.clone());
            }
        }
        Ok(current)
    } else {
        strip_all(patch.iter())
    }
}

/// A replaced list's elements, with directives removed from nested maps.
fn strip_all<'a>(items: impl Iterator<Item = &'a Value>) -> Result<Vec<Value>, String> {
    items
        .map(|item| {
            let mut fresh = Value::Null;
            merge_value(&mut fresh, item)?;
            Ok(fresh)
        })
        .collect()
}

fn reorder(items: &mut Vec<Value>, order: &[Value], key: Option<&str>) {
    let id = |v: &Value| match key {
        Some(k) => v.get(k).cloned(),
        None => Some(v.clone()),
    };
    let mut rest = std::mem::take(items);
    for wanted in order {
        let wanted_id = id(wanted);
        if let Some(i) = rest.iter().position(|v| id(v) == wanted_id) {
            items.push(rest.remove(i));
        }
    }
    items.append(&mut rest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Value {
        json!({
            "metadata": {"name": "p", "labels": {"app": "web", "old": "x"}, "finalizers": ["a"]},
            "spec": {"containers": [
                {"name": "app", "image": "reg/app:1", "env": [{"name": "A", "value": "1"}]},
                {"name": "side", "image": "reg/side:1"}
            ], "tolerations": [{"key": "k1"}]}
        })
    }

    #[test]
    fn strategic_merges_maps_and_deletes_nulls() {
        let out = strategic_merge(
            &pod(),
            &json!({"metadata": {"labels": {"new": "y", "old": null}}}),
        )
        .unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"app": "web", "new": "y"}));
        assert_eq!(out["spec"], pod()["spec"]);
    }

    #[test]
    fn strategic_merges_containers_by_name() {
        let patch = json!({"spec": {"containers": [{"name": "side", "image": "reg/side:2"}]}});
        let out = strategic_merge(&pod(), &patch).unwrap();
        let containers = out["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 2, "merged, not replaced: {containers:?}");
        assert_eq!(containers[0]["image"], "reg/app:1");
        assert_eq!(containers[1]["image"], "reg/side:2");
    }

    #[test]
    fn strategic_merges_nested_env_and_appends_new_elements() {
        let patch = json!({"spec": {"containers": [
            {"name": "app", "env": [{"name": "B", "value": "2"}]},
            {"name": "new", "image": "reg/new:1"}
        ]}});
        let out = strategic_merge(&pod(), &patch).unwrap();
        assert_eq!(
            out["spec"]["containers"][0]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}])
        );
        assert_eq!(out["spec"]["containers"][2]["name"], "new");
    }

    #[test]
    fn lists_without_merge_key_are_replaced() {
        let out =
            strategic_merge(&pod(), &json!({"spec": {"tolerations": [{"key": "k2"}]}})).unwrap();
        assert_eq!(out["spec"]["tolerations"], json!([{"key": "k2"}]));
    }

    #[test]
    fn directives_delete_replace_and_order() {
        let patch = json!({"spec": {
            "containers": [{"name": "side", "$patch": "delete"}]
        }, "metadata": {"labels": {"$patch": "replace", "only": "this"}}});
        let out = strategic_merge(&pod(), &patch).unwrap();
        assert_eq!(out["spec"]["containers"].as_array().unwrap().len(), 1);
        assert_eq!(out["metadata"]["labels"], json!({"only": "this"}));

        let order =
            json!({"spec": {"$setElementOrder/containers": [{"name": "side"}, {"name": "app"}]}});
        let out = strategic_merge(&pod(), &order).unwrap();
        assert_eq!(out["spec"]["containers"][0]["name"], "side");
    }

    #[test]
    fn finalizers_merge_as_a_set_and_delete_from_primitive_list() {
        let out =
            strategic_merge(&pod(), &json!({"metadata": {"finalizers": ["b", "a"]}})).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
        let out = strategic_merge(
            &pod(),
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
        )
        .unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!([]));
    }

    #[test]
    fn merge_key_missing_is_an_error() {
        assert!(
            strategic_merge(&pod(), &json!({"spec": {"containers": [{"image": "x"}]}})).is_err()
        );
    }

    #[test]
    fn content_types_select_the_patch_kind() {
        assert_eq!(
            PatchKind::from_content_type(Some("application/merge-patch+json")).unwrap(),
            PatchKind::Merge
        );
        assert_eq!(
            PatchKind::from_content_type(Some(
                "application/strategic-merge-patch+json; charset=utf-8"
            ))
            .unwrap(),
            PatchKind::Strategic
        );
        assert_eq!(
            PatchKind::from_content_type(Some("application/apply-patch+yaml"))
                .unwrap_err()
                .code,
            415
        );
    }

    #[test]
    fn json_patch_failures_are_422_and_garbage_is_400() {
        let bad_op = br#"[{"op":"test","path":"/metadata/name","value":"other"}]"#;
        assert_eq!(
            apply(PatchKind::Json, &pod(), bad_op).unwrap_err().code,
            422
        );
        assert_eq!(
            apply(PatchKind::Json, &pod(), b"{not json")
                .unwrap_err()
                .code,
            400
        );
        let ok = br#"[{"op":"replace","path":"/spec/containers/0/image","value":"reg/app:2"}]"#;
        assert_eq!(
            apply(PatchKind::Json, &pod(), ok).unwrap()["spec"]["containers"][0]["image"],
            "reg/app:2"
        );
    }

    #[test]
    fn merge_patch_replaces_lists() {
        let out = apply(
            PatchKind::Merge,
            &pod(),
            br#"{"spec":{"containers":[{"name":"only"}]}}"#,
        )
        .unwrap();
        assert_eq!(out["spec"]["containers"], json!([{"name": "only"}]));
    }
}
