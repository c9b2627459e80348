//! The sandbox's workloads: a Deployment and a DaemonSet on a mutable tag, labelled
//! with the sandbox's policy.

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

/// The namespace the sandbox's workloads run in.
pub const NAMESPACE: &str = "default";
/// The label that puts a workload under a warmroll policy.
pub const POLICY_LABEL: &str = "warmroll.io/policy";
/// The policy the sandbox's workloads follow.
pub const POLICY: &str = "sandbox";

/// The two kinds the sandbox rolls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Deployment,
    DaemonSet,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Deployment => "Deployment",
            Kind::DaemonSet => "DaemonSet",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A labelled workload running one container `app` on `image`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub kind: Kind,
    pub name: String,
    pub image: String,
    /// Deployments only; a DaemonSet has one pod per node.
    pub replicas: usize,
}

impl Workload {
    pub fn deployment(name: &str, image: &str, replicas: usize) -> Self {
        Workload {
            kind: Kind::Deployment,
            name: name.to_owned(),
            image: image.to_owned(),
            replicas,
        }
    }

    pub fn daemonset(name: &str, image: &str) -> Self {
        Workload {
            kind: Kind::DaemonSet,
            name: name.to_owned(),
            image: image.to_owned(),
            replicas: 0,
        }
    }

    /// How many pods it runs in a cluster of `nodes` nodes.
    pub fn pods(&self, nodes: usize) -> usize {
        match self.kind {
            Kind::Deployment => self.replicas,
            Kind::DaemonSet => nodes,
        }
    }

    /// The object as the API takes it.
    pub fn manifest(&self) -> Value {
        let mut spec = json!({
            "selector": {"matchLabels": {"app": self.name}},
            "template": {
                "metadata": {"labels": {"app": self.name}},
                "spec": {"containers": [{"name": "app", "image": self.image}]}
            }
        });
        if self.kind == Kind::Deployment
            && let Some(spec) = spec.as_object_mut()
        {
            spec.insert("replicas".into(), json!(self.replicas));
        }
        json!({
            "apiVersion": "apps/v1",
            "kind": self.kind.as_str(),
            "metadata": {
                "name": self.name,
                "namespace": NAMESPACE,
                "labels": {POLICY_LABEL: POLICY, "app": self.name}
            },
            "spec": spec
        })
    }

    /// Creates it.
    pub async fn create(&self, client: &kube::Client) -> Result<()> {
        let what = format!("creating {} {}", self.kind, self.name);
        match self.kind {
            Kind::Deployment => {
                let object: Deployment =
                    serde_json::from_value(self.manifest()).context(what.clone())?;
                Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
                    .create(&PostParams::default(), &object)
                    .await
                    .context(what)?;
            }
            Kind::DaemonSet => {
                let object: DaemonSet =
                    serde_json::from_value(self.manifest()).context(what.clone())?;
                Api::<DaemonSet>::namespaced(client.clone(), NAMESPACE)
                    .create(&PostParams::default(), &object)
                    .await
                    .context(what)?;
            }
        }
        Ok(())
    }

    /// The pod-template annotations as the API has them now.
    pub fn template_annotations(
        &self,
        api: &warmroll_tests::kubeapi::KubeApi,
    ) -> Result<std::collections::BTreeMap<String, String>> {
        let template = match self.kind {
            Kind::Deployment => api
                .get::<Deployment>(NAMESPACE, &self.name)?
                .map(|d| d.spec.template),
            Kind::DaemonSet => api
                .get::<DaemonSet>(NAMESPACE, &self.name)?
                .map(|d| d.spec.template),
        };
        Ok(template
            .and_then(|t| t.metadata)
            .and_then(|m| m.annotations)
            .unwrap_or_default())
    }

    /// The workload's own annotations as the API has them now.
    pub fn annotations(
        &self,
        api: &warmroll_tests::kubeapi::KubeApi,
    ) -> Result<std::collections::BTreeMap<String, String>> {
        let metadata = match self.kind {
            Kind::Deployment => api
                .get::<Deployment>(NAMESPACE, &self.name)?
                .map(|d| d.metadata),
            Kind::DaemonSet => api
                .get::<DaemonSet>(NAMESPACE, &self.name)?
                .map(|d| d.metadata),
        };
        Ok(metadata.and_then(|m| m.annotations).unwrap_or_default())
    }

    /// Waits until `kubectl rollout status` would say it is done.
    pub async fn wait_rolled_out(
        &self,
        cluster: &warmroll_tests::cluster::Cluster,
        timeout: std::time::Duration,
    ) -> Result<()> {
        match self.kind {
            Kind::Deployment => {
                cluster
                    .wait_rolled_out::<Deployment>(NAMESPACE, &self.name, timeout)
                    .await?;
            }
            Kind::DaemonSet => {
                cluster
                    .wait_rolled_out::<DaemonSet>(NAMESPACE, &self.name, timeout)
                    .await?;
            }
        }
        Ok(())
    }

    /// The API path of the object (for telling its writes apart).
    pub fn path(&self) -> String {
        let plural = match self.kind {
            Kind::Deployment => "deployments",
            Kind::DaemonSet => "daemonsets",
        };
        format!(
            "/apis/apps/v1/namespaces/{NAMESPACE}/{plural}/{}",
            self.name
        )
    }
}
