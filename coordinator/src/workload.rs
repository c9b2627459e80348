//! A kind-independent view of the workloads warmroll tracks (Deployments, StatefulSets,
//! DaemonSets): what the drift and rollout decisions need, and nothing else.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::placement::Placement;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

/// The annotation on the workload that records warmroll's last rollout.
pub const LAST_ROLLOUT_ANNOTATION: &str = "warmroll.io/last-rollout";
/// The annotation that approves a rollout (`require_approval`): the new digest(s).
pub const APPROVE_ANNOTATION: &str = "warmroll.io/approve";
/// The annotation `warmroll-coordinator rollout` sets to ask for a warm restart now.
pub const ROLLOUT_REQUEST_ANNOTATION: &str = "warmroll.io/rollout-requested";

/// A workload kind warmroll handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Deployment => "Deployment",
            Kind::StatefulSet => "StatefulSet",
            Kind::DaemonSet => "DaemonSet",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "Deployment" => Ok(Kind::Deployment),
            "StatefulSet" => Ok(Kind::StatefulSet),
            "DaemonSet" => Ok(Kind::DaemonSet),
            other => Err(format!(
                "{other:?} is not one of Deployment, StatefulSet, DaemonSet"
            )),
        }
    }
}

/// A JSON merge patch of one workload, whatever its kind.
pub async fn merge_patch(
    client: &kube::Client,
    key: &WorkloadKey,
    body: &serde_json::Value,
) -> Result<(), kube::Error> {
    use kube::Api;
    use kube::api::{Patch, PatchParams};
    let params = PatchParams::default();
    let patch = Patch::Merge(body);
    let (ns, name) = (key.namespace.as_str(), key.name.as_str());
    match key.kind {
        Kind::Deployment => Api::<Deployment>::namespaced(client.clone(), ns)
            .patch(name, &params, &patch)
            .await
            .map(drop),
        Kind::StatefulSet => Api::<StatefulSet>::namespaced(client.clone(), ns)
            .patch(name, &params, &patch)
            .await
            .map(drop),
        Kind::DaemonSet => Api::<DaemonSet>::namespaced(client.clone(), ns)
            .patch(name, &params, &patch)
            .await
            .map(drop),
    }
}

/// `namespace/Kind/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct WorkloadKey {
    pub namespace: String,
    pub kind: Kind,
    pub name: String,
}

impl WorkloadKey {
    pub fn new(namespace: &str, kind: Kind, name: &str) -> Self {
        WorkloadKey {
            namespace: namespace.to_owned(),
            kind,
            name: name.to_owned(),
        }
    }

    /// Parses `namespace/Kind/name`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(ns), Some(kind), Some(name), None) if !ns.is_empty() && !name.is_empty() => {
                Ok(WorkloadKey::new(ns, Kind::from_str(kind)?, name))
            }
            _ => Err(format!("{text:?} is not namespace/Kind/name")),
        }
    }
}

impl fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.namespace, self.kind, self.name)
    }
}

/// One container of the pod template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateContainer {
    pub name: String,
    /// The image as written in the template.
    pub image: String,
    pub pull_policy: Option<String>,
    pub init: bool,
}

/// Rollout progress as the workload's status tells it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolloutStatus {
    pub generation: i64,
    pub observed_generation: i64,
    /// Pods wanted (replicas; a DaemonSet's desired number scheduled).
    pub desired: i32,
    /// Pods that exist.
    pub current: i32,
    /// Pods on the current template.
    pub updated: i32,
    pub ready: i32,
    /// A Deployment's `Progressing` condition says its deadline passed.
    pub progress_deadline_exceeded: bool,
}

impl RolloutStatus {
    /// The controller has not finished moving pods to the latest template.
    pub fn mid_rollout(&self) -> bool {
        self.observed_generation < self.generation
            || self.updated < self.desired
            || self.current > self.updated
            || self.ready < self.desired
    }
}

/// A label selector (`matchLabels` and `matchExpressions`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub match_labels: BTreeMap<String, String>,
    pub expressions: Vec<(String, String, Vec<String>)>,
}

impl Selector {
    fn from_k8s(selector: &LabelSelector) -> Self {
        Selector {
            match_labels: selector.match_labels.clone().unwrap_or_default(),
            expressions: selector
                .match_expressions
                .iter()
                .flatten()
                .map(|e| {
                    (
                        e.key.clone(),
                        e.operator.clone(),
                        e.values.clone().unwrap_or_default(),
                    )
                })
                .collect(),
        }
    }

    /// Whether `labels` match. An empty selector matches nothing (as the workload
    /// controllers treat it).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        if self.match_labels.is_empty() && self.expressions.is_empty() {
            return false;
        }
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self
                .expressions
                .iter()
                .all(|(key, op, values)| match op.as_str() {
                    "In" => labels.get(key).is_some_and(|v| values.contains(v)),
                    "NotIn" => labels.get(key).is_none_or(|v| !values.contains(v)),
                    "Exists" => labels.contains_key(key),
                    "DoesNotExist" => !labels.contains_key(key),
                    _ => false,
                })
    }
}

/// The workload, whatever its kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub key: WorkloadKey,
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub template_annotations: BTreeMap<String, String>,
    pub selector: Selector,
    pub containers: Vec<TemplateContainer>,
    /// Names of the template's `imagePullSecrets`.
    pub pull_secrets: Vec<String>,
    /// The ServiceAccount its pods run as (`default` when the template names none):
    /// the admission plugin gives its pods that account's `imagePullSecrets` too.
    pub service_account: String,
    /// Replicas asked for (`None` for a DaemonSet).
    pub replicas: Option<i32>,
    pub status: RolloutStatus,
    /// The template's hard node constraints.
    pub placement: Placement,
}

impl Workload {
    /// The policy label's value.
    pub fn policy<'a>(&'a self, label: &str) -> Option<&'a str> {
        self.labels.get(label).map(String::as_str)
    }

    /// Scaled to zero: nothing runs, nothing to roll.
    pub fn scaled_to_zero(&self) -> bool {
        self.replicas == Some(0) || (self.key.kind == Kind::DaemonSet && self.status.desired == 0)
    }

    pub fn from_deployment(d: &Deployment) -> Workload {
        let spec = &d.spec;
        let status = d.status.clone().unwrap_or_default();
        let deadline = status.conditions.iter().flatten().any(|c| {
            c.type_.as_deref() == Some("Progressing")
                && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
        });
        let replicas = spec.replicas.unwrap_or(1);
        let rollout = RolloutStatus {
            generation: d.metadata.generation.unwrap_or(0),
            observed_generation: status.observed_generation.unwrap_or(0),
            desired: replicas,
            current: status.replicas.unwrap_or(0),
            updated: status.updated_replicas.unwrap_or(0),
            ready: status.ready_replicas.unwrap_or(0),
            progress_deadline_exceeded: deadline,
        };
        Workload::build(
            Kind::Deployment,
            &d.metadata,
            &spec.selector,
            &spec.template,
            Some(replicas),
            rollout,
        )
    }

    pub fn from_stateful_set(s: &StatefulSet) -> Workload {
        let spec = &s.spec;
        let status = s.status.clone().unwrap_or_default();
        let replicas = spec.replicas.unwrap_or(1);
        let rollout = RolloutStatus {
            generation: s.metadata.generation.unwrap_or(0),
            observed_generation: status.observed_generation.unwrap_or(0),
            desired: replicas,
            current: status.replicas,
            updated: status.updated_replicas.unwrap_or(0),
            ready: status.ready_replicas.unwrap_or(0),
            progress_deadline_exceeded: false,
        };
        Workload::build(
            Kind::StatefulSet,
            &s.metadata,
            &spec.selector,
            &spec.template,
            Some(replicas),
            rollout,
        )
    }

    pub fn from_daemon_set(d: &DaemonSet) -> Workload {
        let spec = &d.spec;
        let status = d.status.clone().unwrap_or_default();
        let rollout = RolloutStatus {
            generation: d.metadata.generation.unwrap_or(0),
            observed_generation: status.observed_generation.unwrap_or(0),
            desired: status.desired_number_scheduled,
            current: status.current_number_scheduled,
            updated: status.updated_number_scheduled.unwrap_or(0),
            ready: status.number_ready,
            progress_deadline_exceeded: false,
        };
        Workload::build(
            Kind::DaemonSet,
            &d.metadata,
            &spec.selector,
            &spec.template,
            None,
            rollout,
        )
    }

    fn build(
        kind: Kind,
        meta: &ObjectMeta,
        selector: &LabelSelector,
        template: &PodTemplateSpec,
        replicas: Option<i32>,
        status: RolloutStatus,
    ) -> Workload {
        let pod_spec = template.spec.as_ref();
        let mut containers = Vec::new();
        if let Some(spec) = pod_spec {
            for (init, list) in [
                (true, spec.init_containers.as_deref().unwrap_or_default()),
                (false, spec.containers.as_slice()),
            ] {
                containers.extend(list.iter().map(|c| TemplateContainer {
                    name: c.name.clone(),
                    image: c.image.clone().unwrap_or_default(),
                    pull_policy: c.image_pull_policy.clone(),
                    init,
                }));
            }
        }
        Workload {
            key: WorkloadKey::new(
                meta.namespace.as_deref().unwrap_or("default"),
                kind,
                meta.name.as_deref().unwrap_or_default(),
            ),
            uid: meta.uid.clone().unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            annotations: meta.annotations.clone().unwrap_or_default(),
            template_annotations: template
                .metadata
                .as_ref()
                .and_then(|m| m.annotations.clone())
                .unwrap_or_default(),
            selector: Selector::from_k8s(selector),
            containers,
            pull_secrets: pod_spec
                .and_then(|s| s.image_pull_secrets.as_ref())
                .into_iter()
                .flatten()
                .map(|r| r.name.clone())
                .collect(),
            service_account: pod_spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            replicas,
            status,
            placement: pod_spec.map(Placement::from_pod_spec).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
pub(crate) mod builders {
    //! Small builders for the decision tests.
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use k8s_openapi::api::core::v1::{Container, PodSpec};

    pub fn mk_deployment(
        ns: &str,
        name: &str,
        policy: &str,
        images: &[(&str, &str)],
    ) -> Deployment {
        let labels: BTreeMap<String, String> = [("app".to_owned(), name.to_owned())].into();
        Deployment {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                generation: Some(1),
                labels: Some(
                    [
                        ("warmroll.io/policy".to_owned(), policy.to_owned()),
                        ("app".to_owned(), name.to_owned()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: DeploymentSpec {
                replicas: Some(2),
                selector: LabelSelector {
                    match_labels: Some(labels.clone()),
                    match_expressions: None,
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        containers: images
                            .iter()
                            .map(|(n, i)| Container {
                                name: (*n).into(),
                                image: Some((*i).into()),
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            },
            status: Some(DeploymentStatus {
                observed_generation: Some(1),
                replicas: Some(2),
                updated_replicas: Some(2),
                ready_replicas: Some(2),
                ..Default::default()
            }),
        }
    }

    pub fn mk_workload(ns: &str, name: &str, images: &[(&str, &str)]) -> Workload {
        Workload::from_deployment(&mk_deployment(ns, name, "web", images))
    }
}

#[cfg(test)]
mod tests {
    use super::builders::*;
    use super::*;

    #[test]
    fn deployment_view() {
        let w = mk_workload("shop", "web", &[("app", "reg/app:latest")]);
        assert_eq!(w.key.to_string(), "shop/Deployment/web");
        assert_eq!(w.policy("warmroll.io/policy"), Some("web"));
        assert_eq!(w.containers.len(), 1);
        assert!(!w.status.mid_rollout());
        assert!(!w.scaled_to_zero());
        let labels: BTreeMap<String, String> = [("app".into(), "web".into())].into();
        assert!(w.selector.matches(&labels));
        assert!(!w.selector.matches(&BTreeMap::new()));
    }

    #[test]
    fn mid_rollout_and_scaled_to_zero() {
        let mut d = mk_deployment("a", "b", "web", &[("c", "i")]);
        d.metadata.generation = Some(2);
        assert!(Workload::from_deployment(&d).status.mid_rollout());
        let mut d = mk_deployment("a", "b", "web", &[("c", "i")]);
        d.status.as_mut().unwrap().replicas = Some(3);
        assert!(Workload::from_deployment(&d).status.mid_rollout());
        let mut d = mk_deployment("a", "b", "web", &[("c", "i")]);
        d.spec.replicas = Some(0);
        assert!(Workload::from_deployment(&d).scaled_to_zero());
    }

    #[test]
    fn keys_parse() {
        let k = WorkloadKey::parse("ns/StatefulSet/db").unwrap();
        assert_eq!(k, WorkloadKey::new("ns", Kind::StatefulSet, "db"));
        assert!(WorkloadKey::parse("ns/Pod/db").is_err());
        assert!(WorkloadKey::parse("ns/Deployment").is_err());
        assert!(WorkloadKey::parse("ns/Deployment/a/b").is_err());
    }

    #[test]
    fn selector_expressions() {
        let s = Selector {
            match_labels: BTreeMap::new(),
            expressions: vec![
                ("tier".into(), "In".into(), vec!["web".into()]),
                ("canary".into(), "DoesNotExist".into(), vec![]),
            ],
        };
        let mut labels: BTreeMap<String, String> = [("tier".into(), "web".into())].into();
        assert!(s.matches(&labels));
        labels.insert("canary".into(), "1".into());
        assert!(!s.matches(&labels));
    }
}
