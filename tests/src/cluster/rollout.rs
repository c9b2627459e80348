//! `kubectl rollout status`, as pure functions over a workload's spec and status: how a
//! test (or the benchmark) reads "mid-rollout" and "converged" the way a person would.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};

/// What `kubectl rollout status` would print, and whether it would stop waiting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutStatus {
    pub done: bool,
    pub message: String,
}

fn waiting(message: String) -> RolloutStatus {
    RolloutStatus {
        done: false,
        message,
    }
}

fn done(message: String) -> RolloutStatus {
    RolloutStatus {
        done: true,
        message,
    }
}

/// kubectl's `DeploymentStatusViewer`.
pub fn deployment_rollout(d: &Deployment) -> RolloutStatus {
    let name = d.metadata.name.as_deref().unwrap_or_default();
    let generation = d.metadata.generation.unwrap_or(0);
    let status = d.status.clone().unwrap_or_default();
    if generation > status.observed_generation.unwrap_or(0) {
        return waiting("Waiting for deployment spec update to be observed...".into());
    }
    let progress_deadline_exceeded = status.conditions.iter().flatten().any(|c| {
        c.type_.as_deref() == Some("Progressing")
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    if progress_deadline_exceeded {
        return waiting(format!(
            "deployment {name:?} exceeded its progress deadline"
        ));
    }
    let updated = status.updated_replicas.unwrap_or(0);
    let replicas = status.replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    // The API server defaults `replicas` to 1.
    let wanted = d.spec.replicas.unwrap_or(1);
    if updated < wanted {
        return waiting(format!(
            "Waiting for deployment {name:?} rollout to finish: {updated} out of {wanted} new replicas have been updated..."
        ));
    }
    if replicas > updated {
        return waiting(format!(
            "Waiting for deployment {name:?} rollout to finish: {} old replicas are pending termination...",
            replicas - updated
        ));
    }
    if available < updated {
        return waiting(format!(
            "Waiting for deployment {name:?} rollout to finish: {available} of {updated} updated replicas are available..."
        ));
    }
    done(format!("deployment {name:?} successfully rolled out"))
}

/// kubectl's `StatefulSetStatusViewer` (RollingUpdate without partition).
pub fn statefulset_rollout(s: &StatefulSet) -> RolloutStatus {
    let status = s.status.clone().unwrap_or_default();
    let observed = status.observed_generation.unwrap_or(0);
    if observed == 0 || s.metadata.generation.unwrap_or(0) > observed {
        return waiting("Waiting for statefulset spec update to be observed...".into());
    }
    let wanted = s.spec.replicas.unwrap_or(1);
    if status.ready_replicas.unwrap_or(0) < wanted {
        return waiting(format!(
            "Waiting for {} pods to be ready...",
            wanted - status.ready_replicas.unwrap_or(0)
        ));
    }
    let update = status.update_revision.unwrap_or_default();
    if Some(&update) != status.current_revision.as_ref() {
        return waiting(format!(
            "waiting for statefulset rolling update to complete {} pods at revision {update}...",
            status.updated_replicas.unwrap_or(0)
        ));
    }
    done(format!(
        "statefulset rolling update complete {} pods at revision {update}...",
        status.current_replicas.unwrap_or(0)
    ))
}

/// kubectl's `DaemonSetStatusViewer`.
pub fn daemonset_rollout(d: &DaemonSet) -> RolloutStatus {
    let name = d.metadata.name.as_deref().unwrap_or_default();
    let status = d.status.clone().unwrap_or_default();
    if d.metadata.generation.unwrap_or(0) > status.observed_generation.unwrap_or(0) {
        return waiting("Waiting for daemon set spec update to be observed...".into());
    }
    let desired = status.desired_number_scheduled;
    let updated = status.updated_number_scheduled.unwrap_or(0);
    if updated < desired {
        return waiting(format!(
            "Waiting for daemon set {name:?} rollout to finish: {updated} out of {desired} new pods have been updated..."
        ));
    }
    let available = status.number_available.unwrap_or(0);
    if available < desired {
        return waiting(format!(
            "Waiting for daemon set {name:?} rollout to finish: {available} of {desired} updated pods are available..."
        ));
    }
    done(format!("daemon set {name:?} successfully rolled out"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{
        DaemonSetStatus, DeploymentSpec, DeploymentStatus, StatefulSetSpec, StatefulSetStatus,
    };

    fn deployment(generation: i64, status: DeploymentStatus) -> Deployment {
        let mut d = Deployment::default();
        d.metadata.name = Some("web".into());
        d.metadata.generation = Some(generation);
        d.spec = DeploymentSpec {
            replicas: Some(3),
            ..Default::default()
        };
        d.status = Some(status);
        d
    }

    #[test]
    fn deployment_reads_like_kubectl() {
        let mid = deployment(
            2,
            DeploymentStatus {
                observed_generation: Some(2),
                replicas: Some(4),
                updated_replicas: Some(1),
                available_replicas: Some(3),
                ..Default::default()
            },
        );
        let status = deployment_rollout(&mid);
        assert!(!status.done);
        assert!(
            status.message.contains("1 out of 3 new replicas"),
            "{status:?}"
        );
        let unobserved = deployment(
            3,
            DeploymentStatus {
                observed_generation: Some(2),
                ..Default::default()
            },
        );
        assert!(deployment_rollout(&unobserved).message.contains("observed"));
        let old_left = deployment(
            2,
            DeploymentStatus {
                observed_generation: Some(2),
                replicas: Some(4),
                updated_replicas: Some(3),
                available_replicas: Some(4),
                ..Default::default()
            },
        );
        assert!(
            deployment_rollout(&old_left)
                .message
                .contains("1 old replicas")
        );
        let converged = deployment(
            2,
            DeploymentStatus {
                observed_generation: Some(2),
                replicas: Some(3),
                updated_replicas: Some(3),
                available_replicas: Some(3),
                ..Default::default()
            },
        );
        assert!(deployment_rollout(&converged).done);
    }

    #[test]
    fn statefulset_waits_for_the_current_revision_to_catch_up() {
        let mut s = StatefulSet::default();
        s.metadata.generation = Some(2);
        s.spec = StatefulSetSpec {
            replicas: Some(2),
            ..Default::default()
        };
        s.status = Some(StatefulSetStatus {
            observed_generation: Some(2),
            replicas: 2,
            ready_replicas: Some(2),
            updated_replicas: Some(1),
            current_replicas: Some(1),
            current_revision: Some("db-a".into()),
            update_revision: Some("db-b".into()),
            ..Default::default()
        });
        assert!(!statefulset_rollout(&s).done);
        if let Some(status) = s.status.as_mut() {
            status.current_revision = Some("db-b".into());
        }
        assert!(statefulset_rollout(&s).done);
    }

    #[test]
    fn daemonset_counts_updated_then_available() {
        let mut d = DaemonSet::default();
        d.metadata.generation = Some(1);
        d.status = Some(DaemonSetStatus {
            observed_generation: Some(1),
            desired_number_scheduled: 2,
            updated_number_scheduled: Some(2),
            number_available: Some(1),
            ..Default::default()
        });
        let status = daemonset_rollout(&d);
        assert!(status.message.contains("1 of 2 updated pods"), "{status:?}");
        if let Some(status) = d.status.as_mut() {
            status.number_available = Some(2);
        }
        assert!(daemonset_rollout(&d).done);
    }
}
