//! Where a pod template may run: the scheduler's hard node constraints (`nodeSelector`,
//! required node affinity, taints and tolerations, cordons) checked against the facts of
//! one node. With `warm.targets: schedulable` the engine warms every node a Deployment's
//! or StatefulSet's new pods may land on, not only the nodes its old pods run on.
//!
//! Resource fit, pod (anti-)affinity and topology spread are not considered: they change
//! with every pod placed, so a node they would refuse is warmed anyway (a spare pull,
//! never a cold start).
//!
//! Parsed at the edge from the API types into these checked types; the rules follow the
//! scheduler's `NodeAffinity`, `TaintToleration` and `NodeUnschedulable` plugins.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, PodSpec, Taint as K8sTaint,
    Toleration as K8sToleration,
};

/// The taint a cordoned node carries (and that the scheduler checks `unschedulable` by).
const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

/// A pod template's hard node constraints.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placement {
    /// `nodeSelector`: every label must be present with this value.
    pub node_selector: BTreeMap<String, String>,
    /// Required node affinity's terms, ORed; `None` when the template has none.
    pub terms: Option<Vec<NodeTerm>>,
    pub tolerations: Vec<Toleration>,
}

/// One node selector term: its label and field requirements, ANDed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeTerm {
    pub labels: Vec<Requirement>,
    /// `matchFields`: the API allows only `metadata.name`.
    pub fields: Vec<Requirement>,
}

/// `key operator values`.
#[derive(Debug, Clone, PartialEq)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Gt,
    Lt,
    /// An operator the API would have refused: matches nothing.
    Unknown,
}

/// A toleration; an empty key with `Exists` tolerates every taint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Toleration {
    pub key: String,
    /// `Exists`, else `Equal` (the default).
    pub exists: bool,
    pub value: String,
    /// Empty: every effect.
    pub effect: String,
}

/// A node taint.
#[derive(Debug, Clone, PartialEq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: String,
}

/// What placement needs of a node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFacts {
    pub labels: BTreeMap<String, String>,
    /// Only the taints that keep pods off (`NoSchedule`, `NoExecute`).
    pub taints: Vec<Taint>,
    /// Cordoned (`spec.unschedulable`).
    pub unschedulable: bool,
}

impl Placement {
    pub fn from_pod_spec(spec: &PodSpec) -> Placement {
        let terms = spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .map(|s| {
                s.node_selector_terms
                    .iter()
                    .map(NodeTerm::from_k8s)
                    .collect()
            });
        Placement {
            node_selector: spec.node_selector.clone().unwrap_or_default(),
            terms,
            tolerations: spec
                .tolerations
                .iter()
                .flatten()
                .map(Toleration::from_k8s)
                .collect(),
        }
    }

    /// Whether a pod of this template may be scheduled on the node `name`.
    pub fn admits(&self, name: &str, node: &NodeFacts) -> bool {
        let selected = self
            .node_selector
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v));
        // Terms are ORed; no term (or only empty terms) matches no node.
        let affine = self
            .terms
            .as_ref()
            .is_none_or(|terms| terms.iter().any(|t| t.matches(name, &node.labels)));
        let cordon_ok = !node.unschedulable
            || self.tolerates(&Taint {
                key: UNSCHEDULABLE_TAINT.to_owned(),
                value: String::new(),
                effect: "NoSchedule".to_owned(),
            });
        selected && affine && cordon_ok && node.taints.iter().all(|t| self.tolerates(t))
    }

    fn tolerates(&self, taint: &Taint) -> bool {
        self.tolerations.iter().any(|t| t.tolerates(taint))
    }
}

impl NodeTerm {
    fn from_k8s(term: &NodeSelectorTerm) -> NodeTerm {
        let requirements = |list: &Option<Vec<NodeSelectorRequirement>>| {
            list.iter()
                .flatten()
                .map(Requirement::from_k8s)
                .collect::<Vec<_>>()
        };
        NodeTerm {
            labels: requirements(&term.match_expressions),
            fields: requirements(&term.match_fields),
        }
    }

    /// An empty term matches no node (as the scheduler has it).
    fn matches(&self, name: &str, labels: &BTreeMap<String, String>) -> bool {
        if self.labels.is_empty() && self.fields.is_empty() {
            return false;
        }
        if !self.labels.iter().all(|r| r.matches(labels)) {
            return false;
        }
        // The node's fields, built only for a term that names some.
        self.fields.is_empty() || {
            let fields = BTreeMap::from([("metadata.name".to_owned(), name.to_owned())]);
            self.fields.iter().all(|r| r.matches(&fields))
        }
    }
}

impl Requirement {
    fn from_k8s(r: &NodeSelectorRequirement) -> Requirement {
        let operator = match r.operator.as_str() {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            "Gt" => Operator::Gt,
            "Lt" => Operator::Lt,
            _ => Operator::Unknown,
        };
        Requirement {
            key: r.key.clone(),
            operator,
            values: r.values.clone().unwrap_or_default(),
        }
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        // Gt and Lt compare a label holding an integer with exactly one integer value.
        let compare = |want: std::cmp::Ordering| {
            let (Some(value), [bound]) = (value, self.values.as_slice()) else {
                return false;
            };
            match (value.parse::<i64>(), bound.parse::<i64>()) {
                (Ok(v), Ok(b)) => v.cmp(&b) == want,
                _ => false,
            }
        };
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
            Operator::Gt => compare(std::cmp::Ordering::Greater),
            Operator::Lt => compare(std::cmp::Ordering::Less),
            Operator::Unknown => false,
        }
    }
}

impl Toleration {
    fn from_k8s(t: &K8sToleration) -> Toleration {
        Toleration {
            key: t.key.clone().unwrap_or_default(),
            exists: t.operator.as_deref() == Some("Exists"),
            value: t.value.clone().unwrap_or_default(),
            effect: t.effect.clone().unwrap_or_default(),
        }
    }

    fn tolerates(&self, taint: &Taint) -> bool {
        if !self.effect.is_empty() && self.effect != taint.effect {
            return false;
        }
        if self.key.is_empty() {
            // An empty key tolerates everything, with `Exists` only.
            return self.exists;
        }
        self.key == taint.key && (self.exists || self.value == taint.value)
    }
}

impl NodeFacts {
    pub fn from_node(node: &Node) -> NodeFacts {
        let spec = node.spec.as_ref();
        NodeFacts {
            labels: node.metadata.labels.clone().unwrap_or_default(),
            taints: spec
                .and_then(|s| s.taints.as_ref())
                .into_iter()
                .flatten()
                .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
                .map(|t: &K8sTaint| Taint {
                    key: t.key.clone(),
                    value: t.value.clone().unwrap_or_default(),
                    effect: t.effect.clone(),
                })
                .collect(),
            unschedulable: spec.and_then(|s| s.unschedulable) == Some(true),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn mk_node(
        labels: &[(&str, &str)],
        taints: serde_json::Value,
        unschedulable: bool,
    ) -> NodeFacts {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n", "labels": labels},
            "spec": {"taints": taints, "unschedulable": unschedulable},
        }))
        .unwrap();
        NodeFacts::from_node(&node)
    }

    fn mk_placement(spec: serde_json::Value) -> Placement {
        let mut spec = spec;
        spec["containers"] = json!([{"name": "main", "image": "app:latest"}]);
        Placement::from_pod_spec(&serde_json::from_value(spec).unwrap())
    }

    fn plain() -> NodeFacts {
        mk_node(&[("zone", "a")], json!([]), false)
    }

    #[test]
    fn no_constraints_admit_every_untainted_node() {
        let p = mk_placement(json!({}));
        assert!(p.admits("n", &plain()));
        assert!(p.admits("n", &NodeFacts::default()));
    }

    #[test]
    fn node_selector_needs_every_label() {
        let p = mk_placement(json!({"nodeSelector": {"zone": "a", "disk": "ssd"}}));
        assert!(!p.admits("n", &plain()));
        assert!(p.admits(
            "n",
            &mk_node(&[("zone", "a"), ("disk", "ssd")], json!([]), false)
        ));
        assert!(!p.admits(
            "n",
            &mk_node(&[("zone", "b"), ("disk", "ssd")], json!([]), false)
        ));
    }

    #[test]
    fn required_affinity_terms_are_ored_and_their_requirements_anded() {
        let p = mk_placement(json!({"affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [
                    {"key": "zone", "operator": "In", "values": ["a", "b"]},
                    {"key": "gpu", "operator": "DoesNotExist"},
                ]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["special"]}]},
            ]}
        }}}));
        assert!(p.admits("n", &plain()));
        assert!(!p.admits(
            "n",
            &mk_node(&[("zone", "a"), ("gpu", "1")], json!([]), false)
        ));
        assert!(!p.admits("n", &mk_node(&[("zone", "c")], json!([]), false)));
        // The second term, by node name.
        assert!(p.admits("special", &mk_node(&[("zone", "c")], json!([]), false)));
    }

    #[test]
    fn empty_terms_match_no_node_and_odd_operators_never_match() {
        let none = mk_placement(json!({"affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{}]}
        }}}));
        assert!(!none.admits("n", &plain()));
        let odd = mk_placement(json!({"affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "Near", "values": ["a"]}]}
            ]}
        }}}));
        assert!(!odd.admits("n", &plain()));
        // Preferred affinity is not a constraint.
        let preferred = mk_placement(json!({"affinity": {"nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z"]}]}}
            ]
        }}}));
        assert!(preferred.admits("n", &plain()));
    }

    #[test]
    fn gt_and_lt_compare_integers_only() {
        let gt = |v: &str| {
            mk_placement(json!({"affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "cores", "operator": "Gt", "values": [v]}]}
                ]}
            }}}))
        };
        let node = mk_node(&[("cores", "8")], json!([]), false);
        assert!(gt("4").admits("n", &node));
        assert!(!gt("8").admits("n", &node));
        assert!(!gt("four").admits("n", &node));
        assert!(!gt("4").admits("n", &mk_node(&[("cores", "many")], json!([]), false)));
        let lt = mk_placement(json!({"affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "cores", "operator": "Lt", "values": ["16"]}]}
            ]}
        }}}));
        assert!(lt.admits("n", &node));
        assert!(!lt.admits("n", &plain()));
    }

    #[test]
    fn taints_keep_pods_off_unless_tolerated() {
        let tainted = mk_node(
            &[],
            json!([
                {"key": "dedicated", "value": "db", "effect": "NoSchedule"},
                {"key": "soft", "effect": "PreferNoSchedule"},
            ]),
            false,
        );
        assert_eq!(tainted.taints.len(), 1, "PreferNoSchedule is no constraint");
        assert!(!mk_placement(json!({})).admits("n", &tainted));
        let equal = |value: &str, effect: &str| {
            mk_placement(json!({"tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": value, "effect": effect}
            ]}))
        };
        assert!(equal("db", "NoSchedule").admits("n", &tainted));
        assert!(equal("db", "").admits("n", &tainted));
        assert!(!equal("web", "NoSchedule").admits("n", &tainted));
        assert!(!equal("db", "NoExecute").admits("n", &tainted));
        let exists =
            mk_placement(json!({"tolerations": [{"key": "dedicated", "operator": "Exists"}]}));
        assert!(exists.admits("n", &tainted));
        let everything = mk_placement(json!({"tolerations": [{"operator": "Exists"}]}));
        assert!(everything.admits("n", &tainted));
        // An empty key with Equal tolerates nothing.
        let empty_equal = mk_placement(json!({"tolerations": [{"operator": "Equal"}]}));
        assert!(!empty_equal.admits("n", &tainted));
    }

    #[test]
    fn a_cordoned_node_takes_only_pods_that_tolerate_the_cordon() {
        let cordoned = mk_node(&[], json!([]), true);
        assert!(!mk_placement(json!({})).admits("n", &cordoned));
        let tolerant = mk_placement(json!({"tolerations": [
            {"key": UNSCHEDULABLE_TAINT, "operator": "Exists", "effect": "NoSchedule"}
        ]}));
        assert!(tolerant.admits("n", &cordoned));
    }
}
