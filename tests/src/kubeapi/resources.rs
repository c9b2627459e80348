//! The resource types the stand-in serves, and how each behaves on write (status
//! subresource, generation rule, field selectors). One table, like the API server's
//! registry wiring, so adding a type is one entry.

use serde_json::{Map, Value};

/// When `metadata.generation` moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generation {
    /// Not maintained (Secrets, Leases, Events, Nodes).
    None,
    /// 1 on create, +1 when `spec` changes.
    Spec,
    /// Deployments: +1 when `spec` *or* `metadata.annotations` change (annotations are
    /// copied to ReplicaSets).
    SpecAndAnnotations,
}

/// How the served JSON relates to the stored JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// Served as stored.
    Native,
    /// events.k8s.io/v1 over the core/v1 Event storage (renamed fields).
    EventsV1,
}

#[derive(Debug)]
pub struct ResourceType {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    /// Storage bucket; two types share one when they are views of the same objects.
    pub storage: &'static str,
    pub status_subresource: bool,
    pub generation: Generation,
    /// Field selector labels beyond `metadata.name`/`metadata.namespace`, with the value
    /// used when the field is absent.
    pub field_labels: &'static [(&'static str, &'static str)],
    pub view: View,
    /// A delete answers with the object rather than a `Status` (pods).
    pub return_deleted_object: bool,
    /// Only `create` is served and nothing is stored (TokenReview, SubjectAccessReview).
    pub create_only: bool,
    /// What happens to a `status` sent with a create.
    pub status_on_create: StatusOnCreate,
}

/// The API server's `PrepareForCreate` treatment of `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusOnCreate {
    /// Kept (types without a status subresource; Nodes, whose kubelet sends it).
    Keep,
    /// Reset to `{}` (workloads).
    Empty,
    /// Reset to `{"phase": "Pending"}` (Pods).
    PodPending,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `deployments.apps`, as in error messages.
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// The served form of a stored object.
    pub fn to_view(&self, mut stored: Value) -> Value {
        if let Some(obj) = stored.as_object_mut() {
            if self.view == View::EventsV1 {
                rename_fields(obj, EVENTS_V1_RENAMES.iter().map(|(core, v1)| (*core, *v1)));
            }
            obj.insert("apiVersion".into(), Value::String(self.api_version()));
            obj.insert("kind".into(), Value::String(self.kind.to_string()));
        }
        stored
    }

    /// The stored form of a served object: the primary type's apiVersion and kind.
    pub fn to_storage(&self, mut served: Value) -> Value {
        if let Some(obj) = served.as_object_mut() {
            if self.view == View::EventsV1 {
                rename_fields(obj, EVENTS_V1_RENAMES.iter().map(|(core, v1)| (*v1, *core)));
                obj.insert("apiVersion".into(), Value::String("v1".into()));
            } else {
                obj.insert("apiVersion".into(), Value::String(self.api_version()));
            }
            obj.insert("kind".into(), Value::String(self.kind.to_string()));
        }
        served
    }
}

fn rename_fields<'a>(
    obj: &mut Map<String, Value>,
    pairs: impl Iterator<Item = (&'a str, &'a str)>,
) {
    for (from, to) in pairs {
        if let Some(value) = obj.remove(from) {
            obj.insert(to.to_string(), value);
        }
    }
}

/// core/v1 Event field -> events.k8s.io/v1 field (the API server's conversion).
const EVENTS_V1_RENAMES: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
    ("reportingComponent", "reportingController"),
];

const POD_FIELDS: &[(&str, &str)] = &[
    ("spec.nodeName", ""),
    ("spec.restartPolicy", ""),
    ("spec.schedulerName", ""),
    ("spec.serviceAccountName", ""),
    ("spec.hostNetwork", "false"),
    ("status.phase", ""),
    ("status.podIP", ""),
    ("status.nominatedNodeName", ""),
];

const EVENT_FIELDS: &[(&str, &str)] = &[
    ("involvedObject.kind", ""),
    ("involvedObject.namespace", ""),
    ("involvedObject.name", ""),
    ("involvedObject.uid", ""),
    ("involvedObject.apiVersion", ""),
    ("involvedObject.resourceVersion", ""),
    ("involvedObject.fieldPath", ""),
    ("reason", ""),
    ("reportingComponent", ""),
    ("source", ""),
    ("type", ""),
];

const fn workload(
    kind: &'static str,
    plural: &'static str,
    generation: Generation,
) -> ResourceType {
    ResourceType {
        group: "apps",
        version: "v1",
        kind,
        plural,
        namespaced: true,
        storage: plural,
        status_subresource: true,
        generation,
        field_labels: &[],
        view: View::Native,
        return_deleted_object: false,
        create_only: false,
        status_on_create: StatusOnCreate::Empty,
    }
}

const fn plain(
    group: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
) -> ResourceType {
    ResourceType {
        group,
        version: "v1",
        kind,
        plural,
        namespaced,
        storage: plural,
        status_subresource: false,
        generation: Generation::None,
        field_labels: &[],
        view: View::Native,
        return_deleted_object: false,
        create_only: false,
        status_on_create: StatusOnCreate::Keep,
    }
}

pub static RESOURCES: &[ResourceType] = &[
    workload("Deployment", "deployments", Generation::SpecAndAnnotations),
    workload("StatefulSet", "statefulsets", Generation::Spec),
    workload("DaemonSet", "daemonsets", Generation::Spec),
    ResourceType {
        status_subresource: true,
        generation: Generation::Spec,
        field_labels: POD_FIELDS,
        return_deleted_object: true,
        status_on_create: StatusOnCreate::PodPending,
        ..plain("", "Pod", "pods", true)
    },
    ResourceType {
        status_subresource: true,
        field_labels: &[("spec.unschedulable", "false")],
        ..plain("", "Node", "nodes", false)
    },
    ResourceType {
        field_labels: &[("type", "")],
        ..plain("", "Secret", "secrets", true)
    },
    plain("", "ServiceAccount", "serviceaccounts", true),
    ResourceType {
        field_labels: EVENT_FIELDS,
        ..plain("", "Event", "events", true)
    },
    ResourceType {
        view: View::EventsV1,
        ..plain("events.k8s.io", "Event", "events", true)
    },
    plain("coordination.k8s.io", "Lease", "leases", true),
    ResourceType {
        create_only: true,
        ..plain(
            "authentication.k8s.io",
            "TokenReview",
            "tokenreviews",
            false,
        )
    },
    ResourceType {
        create_only: true,
        ..plain(
            "authorization.k8s.io",
            "SubjectAccessReview",
            "subjectaccessreviews",
            false,
        )
    },
];

/// The served type for a group, version and plural.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|rt| rt.group == group && rt.version == version && rt.plural == plural)
}

/// The served type for a k8s-openapi type.
pub fn for_type<K: k8s_openapi::Resource>() -> Option<&'static ResourceType> {
    find(K::GROUP, K::VERSION, K::URL_PATH_SEGMENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_v1_view_renames_core_fields_both_ways() {
        let rt = find("events.k8s.io", "v1", "events").unwrap();
        let stored = json!({"apiVersion": "v1", "kind": "Event", "message": "pulled",
            "involvedObject": {"name": "web"}, "reason": "Pulled"});
        let served = rt.to_view(stored.clone());
        assert_eq!(served["apiVersion"], "events.k8s.io/v1");
        assert_eq!(served["note"], "pulled");
        assert_eq!(served["regarding"]["name"], "web");
        assert!(served.get("message").is_none());
        assert_eq!(rt.to_storage(served), stored);
    }

    #[test]
    fn typed_lookup_matches_k8s_openapi_paths() {
        use k8s_openapi::api::{apps::v1::Deployment, coordination::v1::Lease, core::v1::Pod};
        assert_eq!(for_type::<Deployment>().unwrap().kind, "Deployment");
        assert_eq!(for_type::<Pod>().unwrap().storage, "pods");
        assert_eq!(
            for_type::<Lease>().unwrap().api_version(),
            "coordination.k8s.io/v1"
        );
    }
}
