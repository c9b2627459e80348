//! The object store: JSON objects keyed by storage bucket, namespace and name, a global
//! resourceVersion counter (etcd's revision), a bounded event history for watches, and a
//! broadcast channel that carries each change to open watches.
//!
//! Objects are kept in their storage form (see `ResourceType::to_storage`). Every method
//! runs under the caller's lock and never awaits.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

use base64::Engine;
use rand::Rng;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::{
    resources::{Generation, ResourceType, StatusOnCreate},
    selectors::{FieldSelector, LabelSelector, is_dns_subdomain, validate_key, validate_value},
    status::{ApiError, FieldCause},
};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub storage: &'static str,
    pub namespace: String,
    pub name: String,
}

impl Key {
    pub fn new(rt: &ResourceType, namespace: &str, name: &str) -> Self {
        Self {
            storage: rt.storage,
            namespace: if rt.namespaced {
                namespace.to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One committed change.
#[derive(Debug)]
pub struct StoredEvent {
    pub rv: u64,
    pub key: Key,
    pub kind: EventType,
    /// The object after the change (for a deletion: its last state, at the deletion's rv).
    pub object: Value,
    /// The object before the change (`None` for an addition).
    pub prev: Option<Value>,
}

/// Which part of an object a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subresource {
    Main,
    Status,
}

/// One page of a list.
#[derive(Debug)]
pub struct ListPage {
    pub items: Vec<Value>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

/// What a list or watch selects.
#[derive(Debug, Default)]
pub struct Selection {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selection {
    pub fn matches(&self, rt: &ResourceType, key: &Key, obj: &Value) -> bool {
        self.namespace
            .as_ref()
            .is_none_or(|ns| *ns == key.namespace)
            && self.labels.matches(obj.pointer("/metadata/labels"))
            && self.fields.matches(obj, rt.field_labels)
    }
}

/// Where a list reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadAt {
    Latest,
    /// `resourceVersion=N&resourceVersionMatch=Exact`, or a continue token's snapshot.
    Exact(u64),
}

/// How a watch starts.
pub struct WatchStart {
    /// Synthetic ADDED events for the current state (watch from "" or "0").
    pub initial: Vec<(Key, Value)>,
    /// Retained events after the requested resourceVersion.
    pub backlog: Vec<Arc<StoredEvent>>,
    pub receiver: broadcast::Receiver<Arc<StoredEvent>>,
    /// The store's resourceVersion when the watch started.
    pub start_rv: u64,
}

pub struct Store {
    objects: BTreeMap<Key, Value>,
    rv: u64,
    history: VecDeque<Arc<StoredEvent>>,
    history_limit: usize,
    /// The newest resourceVersion dropped from `history`: watches from before it get 410.
    compacted: u64,
    events: broadcast::Sender<Arc<StoredEvent>>,
    /// Pods bound to a node are deleted gracefully: `deletionTimestamp` set, removed
    /// when kubelet deletes them again with a zero grace period.
    pub graceful_pods: bool,
}

impl Store {
    pub fn new(history_limit: usize) -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            objects: BTreeMap::new(),
            rv: 0,
            history: VecDeque::new(),
            history_limit,
            compacted: 0,
            events,
            graceful_pods: false,
        }
    }

    /// Forgets all history: any watch or continue token from before now gets 410.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    pub fn get(&self, rt: &ResourceType, namespace: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&Key::new(rt, namespace, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// Creates an object. `keep_status` is for test seeding; API creates reset status
    /// like the API server does.
    pub fn create(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        mut obj: Value,
        keep_status: bool,
    ) -> Result<Value, ApiError> {
        let meta = metadata_mut(&mut obj)?;
        let mut name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty() {
            match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => name = format!("{prefix}{}", random_suffix()),
                _ => {
                    return Err(ApiError::invalid(
                        rt,
                        "",
                        "metadata.name",
                        FieldCause::Required("name or generateName is required".into()),
                    ));
                }
            }
            meta.insert("name".into(), json!(name));
        }
        check_namespace(rt, meta, namespace)?;
        if meta
            .get("resourceVersion")
            .and_then(Value::as_str)
            .is_some_and(|rv| !rv.is_empty())
        {
            return Err(ApiError::internal(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let key = Key::new(rt, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(rt, &name));
        }
        meta.insert("uid".into(), json!(random_uid()));
        meta.insert("creationTimestamp".into(), json!(now()));
        meta.remove("deletionTimestamp");
        meta.remove("deletionGracePeriodSeconds");
        if rt.generation == Generation::None {
            meta.remove("generation");
        } else {
            meta.insert("generation".into(), json!(1));
        }
        if !keep_status {
            match rt.status_on_create {
                StatusOnCreate::Keep => {}
                StatusOnCreate::Empty => set_field(&mut obj, "status", json!({})),
                StatusOnCreate::PodPending => {
                    set_field(&mut obj, "status", json!({"phase": "Pending"}))
                }
            }
        }
        normalize_secret(rt, &mut obj);
        validate(rt, &name, &obj)?;
        self.rv += 1;
        set_rv(&mut obj, self.rv);
        self.objects.insert(key.clone(), obj.clone());
        self.record(EventType::Added, key, obj.clone(), None);
        Ok(obj)
    }

    /// Replaces an object (PUT), honouring a resourceVersion precondition in `new`.
    pub fn update(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        mut new: Value,
        sub: Subresource,
    ) -> Result<Value, ApiError> {
        let meta = metadata_mut(&mut new)?;
        match meta.get("name").and_then(Value::as_str) {
            None | Some("") => {
                meta.insert("name".into(), json!(name));
            }
            Some(n) if n != name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
            Some(_) => {}
        }
        check_namespace(rt, meta, namespace)?;
        let old = self.get(rt, namespace, name)?;
        self.commit_update(rt, namespace, name, old, new, sub)
    }

    /// Applies a change computed from the current object (PATCH).
    pub fn patch(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        sub: Subresource,
        change: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Value, ApiError> {
        let old = self.get(rt, namespace, name)?;
        let mut new = change(&old)?;
        let meta = metadata_mut(&mut new)?;
        if meta.get("name").and_then(Value::as_str) != Some(name) {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta.get("name").and_then(Value::as_str).unwrap_or("")
            )));
        }
        check_namespace(rt, meta, namespace)?;
        self.commit_update(rt, namespace, name, old, new, sub)
    }

    fn commit_update(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        old: Value,
        new: Value,
        sub: Subresource,
    ) -> Result<Value, ApiError> {
        let old_rv = resource_version(&old);
        let wanted_rv = new
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !wanted_rv.is_empty() && wanted_rv != old_rv.to_string() {
            return Err(ApiError::stale(rt, name));
        }
        let mut next = match sub {
            Subresource::Status => {
                let mut next = old.clone();
                match new.get("status") {
                    Some(status) => set_field(&mut next, "status", status.clone()),
                    None => {
                        if let Some(obj) = next.as_object_mut() {
                            obj.remove("status");
                        }
                    }
                }
                next
            }
            Subresource::Main => {
                let mut next = new;
                for field in [
                    "uid",
                    "creationTimestamp",
                    "generation",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                ] {
                    let kept = old.pointer(&format!("/metadata/{field}")).cloned();
                    let meta = metadata_mut(&mut next)?;
                    match kept {
                        Some(v) => meta.insert(field.into(), v),
                        None => meta.remove(field),
                    };
                }
                if rt.status_subresource {
                    match old.get("status") {
                        Some(status) => set_field(&mut next, "status", status.clone()),
                        None => {
                            if let Some(obj) = next.as_object_mut() {
                                obj.remove("status");
                            }
                        }
                    }
                }
                normalize_secret(rt, &mut next);
                let changed = |ptr: &str| old.pointer(ptr) != next.pointer(ptr);
                let bump = match rt.generation {
                    Generation::None => false,
                    Generation::Spec => changed("/spec"),
                    Generation::SpecAndAnnotations => {
                        changed("/spec") || changed("/metadata/annotations")
                    }
                };
                if bump {
                    let generation = old
                        .pointer("/metadata/generation")
                        .and_then(Value::as_i64)
                        .unwrap_or(0);
                    metadata_mut(&mut next)?.insert("generation".into(), json!(generation + 1));
                }
                next
            }
        };
        set_rv(&mut next, old_rv);
        validate(rt, name, &next)?;
        if next == old {
            return Ok(old);
        }
        self.rv += 1;
        set_rv(&mut next, self.rv);
        let key = Key::new(rt, namespace, name);
        let finalizers_done = next
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_none_or(|f| f.is_empty());
        let grace_over = next
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            == 0;
        if next.pointer("/metadata/deletionTimestamp").is_some() && finalizers_done && grace_over {
            self.objects.remove(&key);
            self.record(EventType::Deleted, key, next.clone(), Some(old));
        } else {
            self.objects.insert(key.clone(), next.clone());
            self.record(EventType::Modified, key, next.clone(), Some(old));
        }
        Ok(next)
    }

    /// Deletes an object. Returns the object and whether it is gone (false: it waits for
    /// its finalizers, with `deletionTimestamp` set).
    pub fn delete(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        options: &Value,
    ) -> Result<(Value, bool), ApiError> {
        let old = self.get(rt, namespace, name)?;
        for (field, ptr) in [
            ("UID", "/metadata/uid"),
            ("ResourceVersion", "/metadata/resourceVersion"),
        ] {
            let lower = if field == "UID" {
                "uid"
            } else {
                "resourceVersion"
            };
            if let Some(wanted) = options
                .pointer(&format!("/preconditions/{lower}"))
                .and_then(Value::as_str)
            {
                let actual = old.pointer(ptr).and_then(Value::as_str).unwrap_or("");
                if wanted != actual {
                    return Err(ApiError::conflict(
                        rt,
                        name,
                        &format!(
                            "Precondition failed: {field} in precondition: {wanted}, {field} in object meta: {actual}"
                        ),
                    ));
                }
            }
        }
        let key = Key::new(rt, namespace, name);
        if let Some(grace) = self.pod_grace_period(rt, &old, options)
            && grace > 0
        {
            let current = old
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64);
            if old.pointer("/metadata/deletionTimestamp").is_some()
                && current.is_some_and(|c| c <= grace)
            {
                return Ok((old, false));
            }
            let mut next = old.clone();
            let meta = metadata_mut(&mut next)?;
            meta.insert("deletionTimestamp".into(), json!(now_plus(grace)));
            meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
            self.rv += 1;
            set_rv(&mut next, self.rv);
            self.objects.insert(key.clone(), next.clone());
            self.record(EventType::Modified, key, next.clone(), Some(old));
            return Ok((next, false));
        }
        let has_finalizers = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if old.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok((old, false));
            }
            let mut next = old.clone();
            let meta = metadata_mut(&mut next)?;
            meta.insert("deletionTimestamp".into(), json!(now()));
            meta.insert("deletionGracePeriodSeconds".into(), json!(0));
            self.rv += 1;
            set_rv(&mut next, self.rv);
            self.objects.insert(key.clone(), next.clone());
            self.record(EventType::Modified, key, next.clone(), Some(old));
            return Ok((next, false));
        }
        self.objects.remove(&key);
        self.rv += 1;
        let mut last = old.clone();
        set_rv(&mut last, self.rv);
        self.record(EventType::Deleted, key, last.clone(), Some(old));
        Ok((last, true))
    }

    /// The grace period of a graceful pod deletion (`None`: deleted at once): the
    /// request's `gracePeriodSeconds`, else the pod's `terminationGracePeriodSeconds`,
    /// else 30 — for pods bound to a node and not finished, as the API server does.
    fn pod_grace_period(&self, rt: &ResourceType, pod: &Value, options: &Value) -> Option<i64> {
        if !self.graceful_pods || rt.kind != "Pod" {
            return None;
        }
        let bound = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        let finished = matches!(
            pod.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
        if !bound || finished {
            return None;
        }
        Some(
            options
                .get("gracePeriodSeconds")
                .and_then(Value::as_i64)
                .or_else(|| {
                    pod.pointer("/spec/terminationGracePeriodSeconds")
                        .and_then(Value::as_i64)
                })
                .unwrap_or(30)
                .max(0),
        )
    }

    /// Lists in key order (namespace, then name), one page of at most `limit` items.
    pub fn list(
        &self,
        rt: &ResourceType,
        selection: &Selection,
        limit: Option<usize>,
        continue_token: Option<&str>,
        at: ReadAt,
    ) -> Result<ListPage, ApiError> {
        let (at, start_after) = match continue_token.filter(|t| !t.is_empty()) {
            Some(token) => {
                let (rv, key) = decode_continue(token)?;
                if rv < self.compacted {
                    return Err(ApiError::gone(
                        "The provided continue parameter is too old to display a consistent list result. \
                         You can start a new list without the continue parameter.",
                    ));
                }
                (ReadAt::Exact(rv), Some(key))
            }
            None => (at, None),
        };
        let (snapshot, rv) = match at {
            ReadAt::Latest => (self.bucket(rt), self.rv),
            ReadAt::Exact(rv) => (self.bucket_at(rt, rv)?, rv),
        };
        let mut matching = snapshot
            .into_iter()
            .filter(|(key, _)| {
                start_after
                    .as_ref()
                    .is_none_or(|(ns, name)| (&key.namespace, &key.name) > (ns, name))
            })
            .filter(|(key, obj)| selection.matches(rt, key, obj));
        let items: Vec<(Key, Value)> = match limit.filter(|l| *l > 0) {
            Some(limit) => matching.by_ref().take(limit).collect(),
            None => matching.by_ref().collect(),
        };
        let remaining = matching.count();
        let continue_token = match items.last() {
            Some((key, _)) if remaining > 0 => Some(encode_continue(rv, key)),
            _ => None,
        };
        let unfiltered = selection.labels.0.is_empty() && selection.fields.0.is_empty();
        Ok(ListPage {
            items: items.into_iter().map(|(_, v)| v).collect(),
            resource_version: rv,
            continue_token,
            remaining: (remaining > 0 && unfiltered).then_some(remaining),
        })
    }

    fn bucket(&self, rt: &ResourceType) -> BTreeMap<Key, Value> {
        self.objects
            .iter()
            .filter(|(k, _)| k.storage == rt.storage)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The bucket as it was at `rv`, rebuilt by undoing the retained history after it.
    fn bucket_at(&self, rt: &ResourceType, rv: u64) -> Result<BTreeMap<Key, Value>, ApiError> {
        if rv < self.compacted {
            return Err(self.too_old(rv));
        }
        if rv > self.rv {
            return Err(ApiError::gone(format!(
                "Too large resource version: {rv}, current: {}",
                self.rv
            )));
        }
        let mut bucket = self.bucket(rt);
        for event in self.history.iter().rev().take_while(|e| e.rv > rv) {
            if event.key.storage != rt.storage {
                continue;
            }
            match &event.prev {
                Some(prev) => bucket.insert(event.key.clone(), prev.clone()),
                None => bucket.remove(&event.key),
            };
        }
        Ok(bucket)
    }

    fn too_old(&self, rv: u64) -> ApiError {
        ApiError::gone(format!(
            "too old resource version: {rv} ({})",
            self.compacted + 1
        ))
    }

    /// Starts a watch: from the current state (`from` is `None`, i.e. "" or "0") or from
    /// the events after resourceVersion `from` (410 when they are no longer retained).
    pub fn watch(&self, rt: &ResourceType, from: Option<u64>) -> Result<WatchStart, ApiError> {
        let receiver = self.events.subscribe();
        let (initial, backlog) = match from {
            None => (self.bucket(rt).into_iter().collect(), Vec::new()),
            Some(rv) if rv < self.compacted => return Err(self.too_old(rv)),
            Some(rv) => (
                Vec::new(),
                self.history
                    .iter()
                    .filter(|e| e.rv > rv && e.key.storage == rt.storage)
                    .cloned()
                    .collect(),
            ),
        };
        Ok(WatchStart {
            initial,
            backlog,
            receiver,
            start_rv: self.rv,
        })
    }

    fn record(&mut self, kind: EventType, key: Key, object: Value, prev: Option<Value>) {
        let event = Arc::new(StoredEvent {
            rv: self.rv,
            key,
            kind,
            object,
            prev,
        });
        self.history.push_back(event.clone());
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.rv;
            }
        }
        // No open watch is fine.
        let _ = self.events.send(event);
    }
}

pub fn resource_version(obj: &Value) -> u64 {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn set_rv(obj: &mut Value, rv: u64) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
    }
}

fn set_field(obj: &mut Value, field: &str, value: Value) {
    if let Some(map) = obj.as_object_mut() {
        map.insert(field.into(), value);
    }
}

fn metadata_mut(obj: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    let map = obj
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the request body must be a JSON object"))?;
    let meta = map.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    meta.as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata must be an object"))
}

fn check_namespace(
    rt: &ResourceType,
    meta: &mut Map<String, Value>,
    namespace: &str,
) -> Result<(), ApiError> {
    if !rt.namespaced {
        meta.remove("namespace");
        return Ok(());
    }
    match meta.get("namespace").and_then(Value::as_str) {
        Some(ns) if !ns.is_empty() && ns != namespace => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => {
            meta.insert("namespace".into(), json!(namespace));
            Ok(())
        }
    }
}

/// The checks of `ValidateObjectMeta` that tests are likely to trip: name and labels.
fn validate(rt: &ResourceType, name: &str, obj: &Value) -> Result<(), ApiError> {
    if !is_dns_subdomain(name) {
        return Err(ApiError::invalid(
            rt,
            name,
            "metadata.name",
            FieldCause::Invalid {
                value: name.to_string(),
                msg: "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', \
                      and must start and end with an alphanumeric character"
                    .into(),
            },
        ));
    }
    if let Some(labels) = obj.pointer("/metadata/labels").and_then(Value::as_object) {
        for (key, value) in labels {
            let value = value.as_str().unwrap_or("");
            if let Err(msg) = validate_key(key).and_then(|()| validate_value(value)) {
                return Err(ApiError::invalid(
                    rt,
                    name,
                    "metadata.labels",
                    FieldCause::Invalid {
                        value: format!("{key}={value}"),
                        msg,
                    },
                ));
            }
        }
    }
    Ok(())
}

/// Secrets: `stringData` is write-only and folded into `data` (base64).
fn normalize_secret(rt: &ResourceType, obj: &mut Value) {
    if rt.kind != "Secret" {
        return;
    }
    let Some(map) = obj.as_object_mut() else {
        return;
    };
    let Some(Value::Object(string_data)) = map.remove("stringData") else {
        return;
    };
    let data = map.entry("data").or_insert_with(|| json!({}));
    if let Some(data) = data.as_object_mut() {
        for (k, v) in string_data {
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(v.as_str().unwrap_or(""));
            data.insert(k, json!(encoded));
        }
    }
}

fn encode_continue(rv: u64, key: &Key) -> String {
    let raw = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": [key.namespace, key.name]});
    base64::engine::general_purpose::URL_SAFE.encode(raw.to_string())
}

fn decode_continue(token: &str) -> Result<(u64, (String, String)), ApiError> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token}"));
    let raw = base64::engine::general_purpose::URL_SAFE
        .decode(token)
        .map_err(|_| bad())?;
    let value: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = value.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let part = |i: usize| {
        value
            .pointer(&format!("/start/{i}"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let (Some(namespace), Some(name)) = (part(0), part(1)) else {
        return Err(bad());
    };
    Ok((rv, (namespace, name)))
}

/// [`now`] plus `seconds`.
fn now_plus(seconds: i64) -> String {
    (jiff::Timestamp::now() + jiff::SignedDuration::from_secs(seconds))
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// RFC 3339 at second precision, like `metav1.Time`.
pub fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn random_uid() -> String {
    let n: u128 = rand::random();
    let hex = format!("{n:032x}");
    let s = |a: usize, b: usize| hex.get(a..b).unwrap_or("0");
    format!(
        "{}-{}-4{}-a{}-{}",
        s(0, 8),
        s(8, 12),
        s(13, 16),
        s(17, 20),
        s(20, 32)
    )
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| {
            ALPHABET
                .get(rng.random_range(0..ALPHABET.len()))
                .copied()
                .unwrap_or(b'x') as char
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubeapi::resources::find;

    fn secrets() -> &'static ResourceType {
        find("", "v1", "secrets").unwrap()
    }

    fn secret(name: &str, value: &str) -> Value {
        json!({"metadata": {"name": name}, "data": {"k": value}})
    }

    fn names(page: &ListPage) -> Vec<(String, String)> {
        page.items
            .iter()
            .map(|o| {
                let get = |p: &str| o.pointer(p).and_then(Value::as_str).unwrap().to_string();
                (get("/metadata/name"), get("/data/k"))
            })
            .collect()
    }

    #[test]
    fn exact_reads_rebuild_the_past_from_history() {
        let mut store = Store::new(100);
        let rt = secrets();
        let a = store.create(rt, "ns", secret("a", "1"), false).unwrap();
        store
            .patch(rt, "ns", "a", Subresource::Main, |cur| {
                let mut next = cur.clone();
                next["data"]["k"] = json!("2");
                Ok(next)
            })
            .unwrap();
        store.create(rt, "ns", secret("b", "1"), false).unwrap();
        store.delete(rt, "ns", "a", &json!({})).unwrap();

        let then = store
            .list(
                rt,
                &Selection::default(),
                None,
                None,
                ReadAt::Exact(resource_version(&a)),
            )
            .unwrap();
        assert_eq!(names(&then), [("a".to_string(), "1".to_string())]);
        let now = store
            .list(rt, &Selection::default(), None, None, ReadAt::Latest)
            .unwrap();
        assert_eq!(names(&now), [("b".to_string(), "1".to_string())]);
        assert_eq!(now.resource_version, 4);
    }

    #[test]
    fn a_write_that_changes_nothing_keeps_the_resource_version_and_records_nothing() {
        let mut store = Store::new(100);
        let rt = secrets();
        let a = store.create(rt, "ns", secret("a", "1"), false).unwrap();
        let same = store
            .update(rt, "ns", "a", secret("a", "1"), Subresource::Main)
            .unwrap();
        assert_eq!(same, a);
        assert_eq!(store.watch(rt, Some(0)).unwrap().backlog.len(), 1);
    }

    #[test]
    fn graceful_pod_deletion_waits_for_a_zero_grace_delete() {
        let mut store = Store::new(100);
        store.graceful_pods = true;
        let rt = find("", "v1", "pods").unwrap();
        let bound = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1"}});
        store.create(rt, "ns", bound, false).unwrap();
        let (pod, gone) = store.delete(rt, "ns", "p", &json!({})).unwrap();
        assert!(!gone);
        assert_eq!(pod["metadata"]["deletionGracePeriodSeconds"], 30);
        assert!(pod["metadata"]["deletionTimestamp"].is_string());
        // kubelet's status writes while it stops the pod keep it.
        store
            .update(
                rt,
                "ns",
                "p",
                json!({"status": {"phase": "Running"}}),
                Subresource::Status,
            )
            .unwrap();
        assert!(store.get(rt, "ns", "p").is_ok());
        let (_, gone) = store
            .delete(rt, "ns", "p", &json!({"gracePeriodSeconds": 0}))
            .unwrap();
        assert!(gone);
        assert_eq!(store.get(rt, "ns", "p").unwrap_err().code, 404);
        // Pods bound to no node go at once.
        store
            .create(rt, "ns", json!({"metadata": {"name": "q"}}), false)
            .unwrap();
        assert!(store.delete(rt, "ns", "q", &json!({})).unwrap().1);
    }

    #[test]
    fn history_beyond_the_limit_makes_old_watches_gone() {
        let mut store = Store::new(2);
        let rt = secrets();
        for name in ["a", "b", "c"] {
            store.create(rt, "ns", secret(name, "1"), false).unwrap();
        }
        assert_eq!(store.watch(rt, Some(0)).err().unwrap().code, 410);
        let from_one = store.watch(rt, Some(1)).unwrap();
        assert_eq!(
            from_one.backlog.iter().map(|e| e.rv).collect::<Vec<_>>(),
            [2, 3]
        );
        store.compact();
        assert_eq!(store.watch(rt, Some(2)).err().unwrap().code, 410);
        assert!(store.watch(rt, Some(3)).is_ok());
    }
}
