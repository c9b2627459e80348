//! The workload controllers' decisions as pure functions: given a workload's wanted
//! shape and the pods it owns, which pods to create and which to delete in this sync,
//! and the status the controller then reports. No ReplicaSets or ControllerRevisions:
//! a pod's revision is the template hash in its labels.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// A pod a workload owns, as its controller sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub uid: String,
    pub node: Option<String>,
    /// The template revision the pod was made from.
    pub revision: String,
    pub ready: bool,
    /// Being deleted (`deletionTimestamp` set): it still exists, and runs until kubelet
    /// has stopped it.
    pub terminating: bool,
}

impl Member {
    /// The StatefulSet ordinal of a pod named `<set>-<ordinal>`.
    pub fn ordinal(&self, set: &str) -> Option<i32> {
        self.name
            .strip_prefix(set)?
            .strip_prefix('-')?
            .parse()
            .ok()
            .filter(|o| *o >= 0)
    }
}

/// One step of a sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A pod from the current template: on `node` (DaemonSets), with `ordinal`
    /// (StatefulSets), else wherever the scheduler puts it.
    Create {
        node: Option<String>,
        ordinal: Option<i32>,
    },
    Delete {
        name: String,
        uid: String,
    },
}

impl Action {
    fn delete(member: &Member) -> Self {
        Self::Delete {
            name: member.name.clone(),
            uid: member.uid.clone(),
        }
    }
}

/// A Deployment's strategy with its bounds resolved against the replica count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeploymentStrategy {
    Recreate,
    RollingUpdate {
        max_surge: i32,
        max_unavailable: i32,
    },
}

impl DeploymentStrategy {
    /// From `spec.strategy` (default RollingUpdate 25 %/25 %): surge rounds up,
    /// unavailable rounds down, and both zero means one unavailable, as the Deployment
    /// controller resolves them.
    pub fn resolve(
        type_: Option<&str>,
        max_surge: Option<&IntOrString>,
        max_unavailable: Option<&IntOrString>,
        replicas: i32,
    ) -> Self {
        if type_ == Some("Recreate") {
            return Self::Recreate;
        }
        let quarter = IntOrString::String("25%".into());
        let max_surge = scaled(max_surge.unwrap_or(&quarter), replicas, true);
        let mut max_unavailable = scaled(max_unavailable.unwrap_or(&quarter), replicas, false);
        if max_surge == 0 && max_unavailable == 0 {
            max_unavailable = 1;
        }
        Self::RollingUpdate {
            max_surge,
            max_unavailable,
        }
    }
}

/// An int-or-percent bound against `total` (a malformed percentage counts as 0).
pub fn scaled(value: &IntOrString, total: i32, round_up: bool) -> i32 {
    match value {
        IntOrString::Int(n) => (*n).max(0),
        IntOrString::String(s) => {
            let percent: i64 = s
                .strip_suffix('%')
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(0);
            let product = percent.max(0) * i64::from(total.max(0));
            let n = if round_up {
                (product + 99) / 100
            } else {
                product / 100
            };
            i32::try_from(n).unwrap_or(i32::MAX)
        }
    }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Not-ready pods first, so a scale-down removes the ones serving nothing.
fn unready_first<'a>(members: impl Iterator<Item = &'a Member>) -> Vec<&'a Member> {
    let mut list: Vec<&Member> = members.collect();
    list.sort_by_key(|m| m.ready);
    list
}

/// One Deployment sync: the Deployment controller's rolling (surge then scale down old
/// pods as availability allows, unhealthy old pods first) or recreate (all old pods go,
/// then the new ones come) logic over single pods.
pub fn plan_deployment(
    replicas: i32,
    strategy: DeploymentStrategy,
    revision: &str,
    members: &[Member],
) -> Vec<Action> {
    let replicas = replicas.max(0);
    let terminating = members.iter().any(|m| m.terminating);
    let members: Vec<Member> = members.iter().filter(|m| !m.terminating).cloned().collect();
    let members = members.as_slice();
    let (new, old): (Vec<&Member>, Vec<&Member>) =
        members.iter().partition(|m| m.revision == revision);
    let mut actions = Vec::new();
    let new_count = count(new.len());
    match strategy {
        DeploymentStrategy::Recreate => {
            if !old.is_empty() {
                return old.into_iter().map(Action::delete).collect();
            }
            // New pods come once the old ones are gone, not just going.
            if !terminating {
                scale_new(&mut actions, replicas, new_count, replicas, &new);
            }
        }
        DeploymentStrategy::RollingUpdate {
            max_surge,
            max_unavailable,
        } => {
            let total = count(members.len());
            let room = (replicas + max_surge - total).max(0);
            let created = scale_new(&mut actions, replicas, new_count, room, &new);
            let min_available = replicas - max_unavailable;
            let new_unavailable = count(new.iter().filter(|m| !m.ready).count()) + created;
            // Old pods that serve nothing go first, as far as the surge budget allows...
            let mut max_scaled_down = total + created - min_available - new_unavailable;
            for m in old.iter().filter(|m| !m.ready) {
                if max_scaled_down <= 0 {
                    break;
                }
                actions.push(Action::delete(m));
                max_scaled_down -= 1;
            }
            // ...then ready old pods, as far as availability allows.
            let available = count(members.iter().filter(|m| m.ready).count());
            let mut scale_down = available - min_available;
            for m in old.iter().filter(|m| m.ready) {
                if scale_down <= 0 {
                    break;
                }
                actions.push(Action::delete(m));
                scale_down -= 1;
            }
        }
    }
    actions
}

/// Creates up to `min(replicas - new, room)` new pods, or deletes new pods beyond
/// `replicas`; returns how many it created.
fn scale_new(
    actions: &mut Vec<Action>,
    replicas: i32,
    new_count: i32,
    room: i32,
    new: &[&Member],
) -> i32 {
    if new_count > replicas {
        let excess = usize::try_from(new_count - replicas).unwrap_or(0);
        let doomed = unready_first(new.iter().copied());
        actions.extend(doomed.into_iter().take(excess).map(Action::delete));
        return 0;
    }
    let create = (replicas - new_count).min(room).max(0);
    for _ in 0..create {
        actions.push(Action::Create {
            node: None,
            ordinal: None,
        });
    }
    create
}

/// One StatefulSet sync (OrderedReady, RollingUpdate): create the lowest missing ordinal
/// once every lower one is ready; remove ordinals beyond `replicas` highest first; then
/// replace the highest-ordinal pod not at `revision` once all pods are ready. One pod at
/// a time throughout.
pub fn plan_statefulset(
    set: &str,
    replicas: i32,
    rolling: bool,
    revision: &str,
    members: &[Member],
) -> Vec<Action> {
    let mut by_ordinal = BTreeMap::new();
    let mut strays = Vec::new();
    for m in members {
        match m.ordinal(set) {
            Some(o) => {
                by_ordinal.insert(o, m);
            }
            None => strays.push(m),
        }
    }
    if !strays.is_empty() {
        return strays
            .into_iter()
            .filter(|m| !m.terminating)
            .map(Action::delete)
            .collect();
    }
    // A terminating pod holds its ordinal (and name) until it is gone.
    for ordinal in 0..replicas.max(0) {
        match by_ordinal.get(&ordinal) {
            None => {
                return vec![Action::Create {
                    node: None,
                    ordinal: Some(ordinal),
                }];
            }
            Some(m) if !m.ready || m.terminating => return Vec::new(),
            Some(_) => {}
        }
    }
    if let Some((_, m)) = by_ordinal.range(replicas.max(0)..).next_back() {
        if m.terminating {
            return Vec::new();
        }
        return vec![Action::delete(m)];
    }
    if rolling {
        for ordinal in (0..replicas.max(0)).rev() {
            if let Some(m) = by_ordinal.get(&ordinal)
                && m.revision != revision
            {
                return vec![Action::delete(m)];
            }
        }
    }
    Vec::new()
}

/// One DaemonSet sync (RollingUpdate without surge, or OnDelete): one pod per node;
/// pods on unknown nodes and duplicates go; an old pod that is not ready goes at once;
/// ready old pods are deleted (and recreated on the next sync) while fewer than
/// `max_unavailable` nodes lack a ready pod.
pub fn plan_daemonset(
    nodes: &[String],
    rolling: bool,
    max_unavailable: i32,
    revision: &str,
    members: &[Member],
) -> Vec<Action> {
    let mut actions = Vec::new();
    let mut by_node: BTreeMap<&str, Vec<&Member>> = BTreeMap::new();
    let mut going: BTreeMap<&str, usize> = BTreeMap::new();
    for m in members {
        match m.node.as_deref().filter(|n| nodes.iter().any(|k| k == n)) {
            Some(node) if m.terminating => *going.entry(node).or_default() += 1,
            Some(node) => by_node.entry(node).or_default().push(m),
            None if m.terminating => {}
            None => actions.push(Action::delete(m)),
        }
    }
    let mut unavailable = 0;
    let mut old_ready = Vec::new();
    for node in nodes {
        let mut pods = by_node.remove(node.as_str()).unwrap_or_default();
        // Keep the best one: at the revision, then ready.
        pods.sort_by_key(|m| (m.revision != revision, !m.ready));
        let mut pods = pods.into_iter();
        let Some(keep) = pods.next() else {
            // The new pod comes once the old one is gone, not just going.
            if !going.contains_key(node.as_str()) {
                actions.push(Action::Create {
                    node: Some(node.clone()),
                    ordinal: None,
                });
            }
            unavailable += 1;
            continue;
        };
        actions.extend(pods.map(Action::delete));
        if !keep.ready {
            unavailable += 1;
        }
        if rolling && keep.revision != revision {
            if keep.ready {
                old_ready.push(keep);
            } else {
                actions.push(Action::delete(keep));
            }
        }
    }
    for m in old_ready {
        if unavailable >= max_unavailable.max(1) {
            break;
        }
        actions.push(Action::delete(m));
        unavailable += 1;
    }
    actions
}

/// The members that count after `actions`: deleted and terminating pods gone, created
/// pods present, not ready.
pub fn after(members: &[Member], actions: &[Action], revision: &str) -> Vec<Member> {
    let mut result: Vec<Member> = members
        .iter()
        .filter(|m| !m.terminating)
        .filter(|m| {
            !actions
                .iter()
                .any(|a| matches!(a, Action::Delete { uid, .. } if *uid == m.uid))
        })
        .cloned()
        .collect();
    for action in actions {
        if let Action::Create { node, .. } = action {
            result.push(Member {
                name: String::new(),
                uid: String::new(),
                node: node.clone(),
                revision: revision.to_string(),
                ready: false,
                terminating: false,
            });
        }
    }
    result
}

/// The node for a new pod of a workload: fewest pods of that workload, then fewest
/// pods overall, then by name (the default scheduler's spreading, in short).
pub fn pick_node<'a>(
    nodes: &'a [String],
    workload_pods: &BTreeMap<String, usize>,
    all_pods: &BTreeMap<String, usize>,
) -> Option<&'a String> {
    nodes.iter().min_by_key(|n| {
        (
            workload_pods.get(*n).copied().unwrap_or(0),
            all_pods.get(*n).copied().unwrap_or(0),
            n.as_str(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, revision: &str, ready: bool) -> Member {
        Member {
            name: name.into(),
            uid: format!("uid-{name}"),
            node: None,
            revision: revision.into(),
            ready,
            terminating: false,
        }
    }

    fn going(mut m: Member) -> Member {
        m.terminating = true;
        m
    }

    fn on(mut m: Member, node: &str) -> Member {
        m.node = Some(node.into());
        m
    }

    fn creates(actions: &[Action]) -> usize {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Create { .. }))
            .count()
    }

    fn deleted(actions: &[Action]) -> Vec<&str> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Delete { name, .. } => Some(name.as_str()),
                Action::Create { .. } => None,
            })
            .collect()
    }

    #[test]
    fn strategy_bounds_resolve_like_the_deployment_controller() {
        assert_eq!(
            DeploymentStrategy::resolve(None, None, None, 3),
            DeploymentStrategy::RollingUpdate {
                max_surge: 1,
                max_unavailable: 0
            }
        );
        assert_eq!(
            DeploymentStrategy::resolve(
                Some("RollingUpdate"),
                Some(&IntOrString::Int(0)),
                Some(&IntOrString::String("0%".into())),
                3
            ),
            DeploymentStrategy::RollingUpdate {
                max_surge: 0,
                max_unavailable: 1
            }
        );
        assert_eq!(
            DeploymentStrategy::resolve(Some("Recreate"), None, None, 3),
            DeploymentStrategy::Recreate
        );
        assert_eq!(scaled(&IntOrString::String("50%".into()), 3, true), 2);
        assert_eq!(scaled(&IntOrString::String("50%".into()), 3, false), 1);
        assert_eq!(scaled(&IntOrString::String("bad".into()), 3, true), 0);
    }

    #[test]
    fn deployment_scales_up_from_nothing() {
        let actions = plan_deployment(
            3,
            DeploymentStrategy::resolve(None, None, None, 3),
            "b",
            &[],
        );
        assert_eq!(creates(&actions), 3);
    }

    #[test]
    fn rolling_update_surges_then_replaces_one_old_pod_per_ready_new_pod() {
        let strategy = DeploymentStrategy::RollingUpdate {
            max_surge: 1,
            max_unavailable: 0,
        };
        let old = [
            pod("a1", "a", true),
            pod("a2", "a", true),
            pod("a3", "a", true),
        ];
        let first = plan_deployment(3, strategy, "b", &old);
        assert_eq!((creates(&first), deleted(&first)), (1, vec![]));

        let mut state = old.to_vec();
        state.push(pod("b1", "b", false));
        let waiting = plan_deployment(3, strategy, "b", &state);
        assert!(waiting.is_empty(), "{waiting:?}");

        state.last_mut().unwrap().ready = true;
        let next = plan_deployment(3, strategy, "b", &state);
        assert_eq!((creates(&next), deleted(&next)), (0, vec!["a1"]));
    }

    #[test]
    fn rolling_update_without_surge_deletes_first_and_prefers_unready_old_pods() {
        let strategy = DeploymentStrategy::RollingUpdate {
            max_surge: 0,
            max_unavailable: 1,
        };
        let old = [
            pod("a1", "a", true),
            pod("a2", "a", false),
            pod("a3", "a", true),
        ];
        let actions = plan_deployment(3, strategy, "b", &old);
        assert_eq!(deleted(&actions), vec!["a2"]);
        assert_eq!(creates(&actions), 0);
    }

    #[test]
    fn recreate_deletes_every_old_pod_before_creating() {
        let old = [pod("a1", "a", true), pod("a2", "a", true)];
        let actions = plan_deployment(2, DeploymentStrategy::Recreate, "b", &old);
        assert_eq!(deleted(&actions), vec!["a1", "a2"]);
        assert_eq!(creates(&actions), 0);
        let actions = plan_deployment(2, DeploymentStrategy::Recreate, "b", &[]);
        assert_eq!(creates(&actions), 2);
    }

    #[test]
    fn converged_deployment_does_nothing_and_extra_pods_go() {
        let strategy = DeploymentStrategy::resolve(None, None, None, 2);
        let state = [pod("b1", "b", true), pod("b2", "b", true)];
        assert!(plan_deployment(2, strategy, "b", &state).is_empty());
        let actions = plan_deployment(
            1,
            strategy,
            "b",
            &[pod("b1", "b", true), pod("b2", "b", false)],
        );
        assert_eq!(deleted(&actions), vec!["b2"]);
    }

    #[test]
    fn statefulset_creates_in_order_and_waits_for_readiness() {
        assert_eq!(
            plan_statefulset("db", 3, true, "r2", &[]),
            vec![Action::Create {
                node: None,
                ordinal: Some(0)
            }]
        );
        assert!(plan_statefulset("db", 3, true, "r2", &[pod("db-0", "r2", false)]).is_empty());
        assert_eq!(
            plan_statefulset("db", 3, true, "r2", &[pod("db-0", "r2", true)]),
            vec![Action::Create {
                node: None,
                ordinal: Some(1)
            }]
        );
    }

    #[test]
    fn statefulset_replaces_the_highest_outdated_ordinal_one_at_a_time() {
        let state = [
            pod("db-0", "r1", true),
            pod("db-1", "r1", true),
            pod("db-2", "r2", true),
        ];
        assert_eq!(
            deleted(&plan_statefulset("db", 3, true, "r2", &state)),
            vec!["db-1"]
        );
        assert!(plan_statefulset("db", 3, false, "r2", &state).is_empty());
        // db-2 recreated but not ready yet: nothing else moves.
        let state = [
            pod("db-0", "r1", true),
            pod("db-1", "r2", false),
            pod("db-2", "r2", true),
        ];
        assert!(plan_statefulset("db", 3, true, "r2", &state).is_empty());
        // Scale down: highest first.
        let state = [
            pod("db-0", "r2", true),
            pod("db-1", "r2", true),
            pod("db-10", "r2", true),
        ];
        assert_eq!(
            deleted(&plan_statefulset("db", 1, true, "r2", &state)),
            vec!["db-10"]
        );
    }

    #[test]
    fn daemonset_rolls_one_node_at_a_time_delete_then_create() {
        let nodes = vec!["n1".to_string(), "n2".to_string()];
        let state = [
            on(pod("d-a", "a", true), "n1"),
            on(pod("d-b", "a", true), "n2"),
        ];
        let actions = plan_daemonset(&nodes, true, 1, "b", &state);
        assert_eq!(deleted(&actions), vec!["d-a"]);
        assert_eq!(creates(&actions), 0);

        let state = [on(pod("d-b", "a", true), "n2")];
        let actions = plan_daemonset(&nodes, true, 1, "b", &state);
        assert_eq!(
            actions,
            vec![Action::Create {
                node: Some("n1".into()),
                ordinal: None
            }]
        );

        let state = [
            on(pod("d-c", "b", false), "n1"),
            on(pod("d-b", "a", true), "n2"),
        ];
        assert!(plan_daemonset(&nodes, true, 1, "b", &state).is_empty());
        assert!(
            plan_daemonset(
                &nodes,
                false,
                1,
                "b",
                &[
                    on(pod("d-c", "b", true), "n1"),
                    on(pod("d-b", "a", true), "n2")
                ]
            )
            .is_empty()
        );
    }

    #[test]
    fn daemonset_removes_strays_duplicates_and_unready_old_pods() {
        let nodes = vec!["n1".to_string()];
        let state = [
            on(pod("gone", "b", true), "n9"),
            on(pod("d-old", "a", true), "n1"),
            on(pod("d-new", "b", true), "n1"),
        ];
        let actions = plan_daemonset(&nodes, true, 1, "b", &state);
        assert_eq!(deleted(&actions), vec!["gone", "d-old"]);
        let state = [on(pod("d-old", "a", false), "n1")];
        assert_eq!(
            deleted(&plan_daemonset(&nodes, true, 1, "b", &state)),
            vec!["d-old"]
        );
    }

    #[test]
    fn terminating_pods_hold_back_recreate_ordinals_and_daemon_nodes() {
        let going_old = [going(pod("a1", "a", true))];
        assert!(plan_deployment(2, DeploymentStrategy::Recreate, "b", &going_old).is_empty());
        let rolling = DeploymentStrategy::RollingUpdate {
            max_surge: 1,
            max_unavailable: 0,
        };
        // RollingUpdate does not wait for them; they do not count.
        assert_eq!(creates(&plan_deployment(1, rolling, "b", &going_old)), 1);

        let state = [pod("db-0", "r2", true), going(pod("db-1", "r1", true))];
        assert!(plan_statefulset("db", 2, true, "r2", &state).is_empty());

        let nodes = vec!["n1".to_string()];
        let state = [on(going(pod("d-a", "a", true)), "n1")];
        assert!(plan_daemonset(&nodes, true, 1, "b", &state).is_empty());
        assert!(after(&state, &[], "b").is_empty());
    }

    #[test]
    fn after_applies_deletes_and_creates() {
        let state = [pod("a1", "a", true), pod("a2", "a", true)];
        let actions = [
            Action::delete(&state[0]),
            Action::Create {
                node: None,
                ordinal: None,
            },
        ];
        let next = after(&state, &actions, "b");
        assert_eq!(next.len(), 2);
        assert_eq!(next[0].name, "a2");
        assert_eq!((next[1].revision.as_str(), next[1].ready), ("b", false));
    }

    #[test]
    fn scheduler_spreads_the_workload_first() {
        let nodes = vec!["n1".to_string(), "n2".to_string()];
        let workload = BTreeMap::from([("n1".to_string(), 1)]);
        let all = BTreeMap::from([("n2".to_string(), 5)]);
        assert_eq!(pick_node(&nodes, &workload, &all), Some(&nodes[1]));
        assert_eq!(pick_node(&nodes, &BTreeMap::new(), &all), Some(&nodes[0]));
        assert_eq!(pick_node(&[], &workload, &all), None);
    }
}
