//! What the sandbox saw happen to each pod, with monotonic timestamps: the raw material
//! of the rollout benchmark (per-pod not-ready time, when each pod came up on a digest).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// The workload a pod belongs to (its controller owner reference).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    /// `Deployment`, `StatefulSet` or `DaemonSet`.
    pub kind: String,
    pub name: String,
}

/// One pod's life as the sandbox saw it.
#[derive(Clone, Debug)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub owner: Option<Owner>,
    /// The template revision the pod was made from (its hash label).
    pub revision: Option<String>,
    /// When the controller created it (or kubelet first saw it).
    pub created: Instant,
    /// When kubelet reported it Ready.
    pub ready: Option<Instant>,
    /// The `imageID`s (`host/repo@sha256:…`) its containers ran when it became ready.
    pub image_ids: Vec<String>,
    /// When its deletion was asked for (by a controller or anyone else), i.e. when it
    /// stopped counting as available.
    pub deleted: Option<Instant>,
    /// When its kubelet had stopped it and removed it from the API for good.
    pub gone: Option<Instant>,
}

/// A pod that became ready running an image digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyOn {
    pub namespace: String,
    pub pod: String,
    pub node: String,
    pub at: Instant,
}

/// The time one workload "slot" (a node for a DaemonSet, an ordinal for a StatefulSet,
/// one of the replicas for a Deployment) went without a ready pod during a rollout:
/// from the old pod's deletion to its replacement's readiness (zero when the
/// replacement was ready first, as with a surging Deployment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReadyGap {
    /// The node (DaemonSet), the pod name (StatefulSet) or empty (Deployment).
    pub slot: String,
    pub old_pod: String,
    /// The replacement; `None` while there is none yet.
    pub new_pod: Option<String>,
    pub from: Instant,
    /// When the old pod was gone (stopped and removed from the API).
    pub old_gone: Option<Instant>,
    /// When the replacement was created.
    pub new_created: Option<Instant>,
    /// When the replacement became ready; `None` while it is not.
    pub to: Option<Instant>,
}

/// Where one slot's not-ready time went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GapParts {
    /// From the deletion until the old pod was gone (its kubelet stopping it).
    pub teardown: Duration,
    /// From then until the replacement was created (the controller reacting).
    pub replace: Duration,
    /// From the creation until the replacement was ready (the kubelet starting it).
    pub start: Duration,
}

impl NotReadyGap {
    /// `None` while the slot is still without a ready pod.
    pub fn duration(&self) -> Option<Duration> {
        self.to.map(|to| to.saturating_duration_since(self.from))
    }

    /// The gap split at the old pod's end and the replacement's creation, when the
    /// replacement was created after the old pod was gone (a DaemonSet node, a
    /// StatefulSet ordinal, a Recreate Deployment); `None` otherwise.
    pub fn parts(&self) -> Option<GapParts> {
        let (gone, created, to) = (self.old_gone?, self.new_created?, self.to?);
        if gone < self.from || created < gone || to < created {
            return None;
        }
        Some(GapParts {
            teardown: gone - self.from,
            replace: created - gone,
            start: to - created,
        })
    }
}

/// The records, by uid, in the order they were first seen.
#[derive(Debug, Default)]
pub struct Timeline {
    records: Vec<PodRecord>,
    index: HashMap<String, usize>,
}

/// A pod's identity for [`Timeline::seen`].
pub struct Seen<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub node: &'a str,
    pub owner: Option<Owner>,
    pub revision: Option<String>,
}

impl Timeline {
    /// Records a pod the first time it is seen (later calls change nothing).
    pub fn seen(&mut self, pod: Seen<'_>, at: Instant) {
        if self.index.contains_key(pod.uid) {
            return;
        }
        self.index.insert(pod.uid.to_string(), self.records.len());
        self.records.push(PodRecord {
            namespace: pod.namespace.to_string(),
            name: pod.name.to_string(),
            uid: pod.uid.to_string(),
            node: pod.node.to_string(),
            owner: pod.owner,
            revision: pod.revision,
            created: at,
            ready: None,
            image_ids: Vec::new(),
            deleted: None,
            gone: None,
        });
    }

    fn get_mut(&mut self, uid: &str) -> Option<&mut PodRecord> {
        let i = *self.index.get(uid)?;
        self.records.get_mut(i)
    }

    /// The first readiness of a pod (a later one, after a restart, is not a rollout).
    pub fn ready(&mut self, uid: &str, image_ids: Vec<String>, at: Instant) {
        if let Some(record) = self.get_mut(uid)
            && record.ready.is_none()
        {
            record.ready = Some(at);
            record.image_ids = image_ids;
        }
    }

    pub fn deleted(&mut self, uid: &str, at: Instant) {
        if let Some(record) = self.get_mut(uid)
            && record.deleted.is_none()
        {
            record.deleted = Some(at);
        }
    }

    pub fn gone(&mut self, uid: &str, at: Instant) {
        if let Some(record) = self.get_mut(uid)
            && record.gone.is_none()
        {
            record.gone = Some(at);
        }
    }

    pub fn records(&self) -> Vec<PodRecord> {
        self.records.clone()
    }
}

/// The pods that became ready running `digest` (`sha256:…`), earliest first.
pub fn ready_on(records: &[PodRecord], digest: &str) -> Vec<ReadyOn> {
    let suffix = format!("@{digest}");
    let mut list: Vec<ReadyOn> = records
        .iter()
        .filter(|r| r.image_ids.iter().any(|id| id.ends_with(&suffix)))
        .filter_map(|r| {
            Some(ReadyOn {
                namespace: r.namespace.clone(),
                pod: r.name.clone(),
                node: r.node.clone(),
                at: r.ready?,
            })
        })
        .collect();
    list.sort_by_key(|r| r.at);
    list
}

/// The not-ready gaps of the workload `owner` in `namespace` for the pods deleted at or
/// after `since`: per slot, the deleted pods in deletion order are paired with the pods
/// created at or after `since` in readiness order.
pub fn not_ready_gaps(
    records: &[PodRecord],
    namespace: &str,
    owner: &Owner,
    since: Instant,
) -> Vec<NotReadyGap> {
    let slot_of = |r: &PodRecord| match owner.kind.as_str() {
        "DaemonSet" => r.node.clone(),
        "StatefulSet" => r.name.clone(),
        _ => String::new(),
    };
    let mine = records
        .iter()
        .filter(|r| r.namespace == namespace && r.owner.as_ref() == Some(owner));
    let mut slots: BTreeMap<String, (Vec<&PodRecord>, Vec<&PodRecord>)> = BTreeMap::new();
    for r in mine {
        if r.deleted.is_some_and(|d| d >= since) {
            slots.entry(slot_of(r)).or_default().0.push(r);
        }
        if r.created >= since {
            slots.entry(slot_of(r)).or_default().1.push(r);
        }
    }
    let mut gaps = Vec::new();
    for (slot, (mut old, mut new)) in slots {
        old.sort_by_key(|r| r.deleted);
        // Ready ones by readiness, then the ones not ready yet.
        new.sort_by_key(|r| (r.ready.is_none(), r.ready, r.created));
        let mut new = new.into_iter();
        for o in old {
            let Some(from) = o.deleted else { continue };
            let replacement = new.next();
            gaps.push(NotReadyGap {
                slot: slot.clone(),
                old_pod: o.name.clone(),
                new_pod: replacement.map(|r| r.name.clone()),
                from,
                old_gone: o.gone,
                new_created: replacement.map(|r| r.created),
                to: replacement
                    .and_then(|r| r.ready)
                    .map(|ready| ready.max(from)),
            });
        }
    }
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(kind: &str) -> Owner {
        Owner {
            kind: kind.into(),
            name: "w".into(),
        }
    }

    fn record(name: &str, node: &str, kind: &str, created: Instant) -> PodRecord {
        PodRecord {
            namespace: "ns".into(),
            name: name.into(),
            uid: name.into(),
            node: node.into(),
            owner: Some(owner(kind)),
            revision: None,
            created,
            ready: None,
            image_ids: Vec::new(),
            deleted: None,
            gone: None,
        }
    }

    #[test]
    fn daemonset_gaps_pair_by_node() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut a = record("a", "n1", "DaemonSet", t0);
        a.deleted = Some(s(10));
        a.gone = Some(s(11));
        let mut b = record("b", "n2", "DaemonSet", t0);
        b.deleted = Some(s(20));
        let mut a2 = record("a2", "n1", "DaemonSet", s(12));
        a2.ready = Some(s(13));
        let b2 = record("b2", "n2", "DaemonSet", s(20));
        let gaps = not_ready_gaps(&[a, b, a2, b2], "ns", &owner("DaemonSet"), s(5));
        assert_eq!(gaps.len(), 2);
        assert_eq!(gaps[0].slot, "n1");
        assert_eq!(gaps[0].duration(), Some(Duration::from_secs(3)));
        assert_eq!(
            gaps[0].parts(),
            Some(GapParts {
                teardown: Duration::from_secs(1),
                replace: Duration::from_secs(1),
                start: Duration::from_secs(1),
            })
        );
        assert_eq!(gaps[1].new_pod.as_deref(), Some("b2"));
        assert_eq!(gaps[1].duration(), None);
        assert_eq!(gaps[1].parts(), None);
    }

    #[test]
    fn surging_deployment_gaps_are_zero() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut old = record("old", "n1", "Deployment", t0);
        old.deleted = Some(s(12));
        old.gone = Some(s(13));
        let mut new = record("new", "n2", "Deployment", s(10));
        new.ready = Some(s(11));
        let gaps = not_ready_gaps(&[old, new], "ns", &owner("Deployment"), s(5));
        assert_eq!(gaps[0].duration(), Some(Duration::ZERO));
        // The replacement came before the old pod went: no parts.
        assert_eq!(gaps[0].parts(), None);
        // Other workloads and earlier deletions are not counted.
        assert!(not_ready_gaps(&[], "ns", &owner("Deployment"), s(5)).is_empty());
    }

    #[test]
    fn timeline_keeps_first_readiness_and_ready_on_matches_digests() {
        let t0 = Instant::now();
        let mut timeline = Timeline::default();
        let seen = |uid| Seen {
            namespace: "ns",
            name: uid,
            uid,
            node: "n1",
            owner: None,
            revision: None,
        };
        timeline.seen(seen("p1"), t0);
        timeline.seen(seen("p2"), t0);
        timeline.ready(
            "p1",
            vec!["r/app@sha256:aa".into()],
            t0 + Duration::from_secs(2),
        );
        timeline.ready(
            "p1",
            vec!["r/app@sha256:bb".into()],
            t0 + Duration::from_secs(3),
        );
        timeline.ready(
            "p2",
            vec!["r/app@sha256:aa".into()],
            t0 + Duration::from_secs(1),
        );
        timeline.deleted("p2", t0 + Duration::from_secs(4));
        let records = timeline.records();
        let on = ready_on(&records, "sha256:aa");
        assert_eq!(
            on.iter().map(|r| r.pod.as_str()).collect::<Vec<_>>(),
            ["p2", "p1"]
        );
        assert!(ready_on(&records, "sha256:bb").is_empty());
        assert_eq!(records[1].deleted, Some(t0 + Duration::from_secs(4)));
    }
}
