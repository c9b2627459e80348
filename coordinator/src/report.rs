//! The drift report: one entry per tracked workload with its containers' states, logged
//! every cycle (one line per container plus a summary), served as JSON on `/report`,
//! and printed as a table by `warmroll-coordinator report`.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::config::Mode;
use crate::drift::{ContainerDrift, State};
use crate::fleet::view::WarmBytes;
use crate::workload::Kind;

/// One cycle's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub time: Timestamp,
    /// This coordinator acts (the others only report).
    pub leader: bool,
    pub workloads: Vec<WorkloadReport>,
    pub summary: Summary,
}

/// One tracked workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadReport {
    pub namespace: String,
    pub kind: Kind,
    pub name: String,
    pub policy: String,
    pub mode: Mode,
    /// Why nothing happens, or what warmroll is doing, when worth saying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// While warming: the bytes the target nodes have pulled so far, as their agents
    /// report them (containerd only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_bytes: Option<WarmBytes>,
    pub containers: Vec<ContainerDrift>,
}

/// Counts over the report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub workloads: usize,
    pub containers: usize,
    /// Containers by state name.
    pub states: BTreeMap<String, usize>,
}

impl Report {
    pub fn new(time: Timestamp, leader: bool, mut workloads: Vec<WorkloadReport>) -> Report {
        workloads
            .sort_by(|a, b| (&a.namespace, a.kind, &a.name).cmp(&(&b.namespace, b.kind, &b.name)));
        let mut summary = Summary {
            workloads: workloads.len(),
            ..Summary::default()
        };
        for c in workloads.iter().flat_map(|w| &w.containers) {
            summary.containers += 1;
            *summary.states.entry(c.state.name().to_owned()).or_default() += 1;
        }
        Report {
            time,
            leader,
            workloads,
            summary,
        }
    }

    /// Logs one line per tracked container and a summary line.
    pub fn log(&self) {
        for w in &self.workloads {
            for c in &w.containers {
                tracing::info!(
                    target: "warmroll::report",
                    namespace = %w.namespace,
                    kind = %w.kind,
                    name = %w.name,
                    policy = %w.policy,
                    container = %c.container,
                    image = %c.image,
                    registry_digest = c.registry_digest.as_ref().map(|d| d.to_string()).unwrap_or_default(),
                    running = %running_text(c),
                    state = c.state.name(),
                    reason = c.state.reason().unwrap_or_default(),
                    progress = progress_text(w, c),
                    note = w.note.as_deref().unwrap_or_default(),
                    "container"
                );
            }
        }
        let states: Vec<String> = self
            .summary
            .states
            .iter()
            .map(|(s, n)| format!("{s}={n}"))
            .collect();
        tracing::info!(
            target: "warmroll::report",
            workloads = self.summary.workloads,
            containers = self.summary.containers,
            states = %states.join(","),
            leader = self.leader,
            "summary"
        );
    }

    /// The table `warmroll-coordinator report` prints.
    pub fn table(&self) -> String {
        let header = [
            "NAMESPACE",
            "KIND",
            "NAME",
            "CONTAINER",
            "STATE",
            "REGISTRY DIGEST",
            "RUNNING (pods/nodes)",
            "IMAGE",
        ];
        let mut rows: Vec<[String; 8]> = vec![header.map(str::to_owned)];
        for w in &self.workloads {
            for c in &w.containers {
                let state = state_text(w, c);
                rows.push([
                    w.namespace.clone(),
                    w.kind.to_string(),
                    w.name.clone(),
                    c.container.clone(),
                    state,
                    c.registry_digest
                        .as_ref()
                        .map(short)
                        .unwrap_or_else(|| "-".to_owned()),
                    running_text(c),
                    c.image.clone(),
                ]);
            }
        }
        let mut widths = [0usize; 8];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &rows {
            let cells: Vec<String> = row
                .iter()
                .zip(widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        let states: Vec<String> = self
            .summary
            .states
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect();
        out.push_str(&format!(
            "\n{} workloads, {} containers: {}\n",
            self.summary.workloads,
            self.summary.containers,
            if states.is_empty() {
                "-".to_owned()
            } else {
                states.join(", ")
            }
        ));
        for w in self.workloads.iter().filter(|w| w.note.is_some()) {
            out.push_str(&format!(
                "{}/{}/{}: {}\n",
                w.namespace,
                w.kind,
                w.name,
                w.note.as_deref().unwrap_or_default()
            ));
        }
        out
    }

    /// Containers in `state` (by name), for tests and metrics.
    pub fn count(&self, state: &str) -> usize {
        self.summary.states.get(state).copied().unwrap_or(0)
    }

    /// The state of one container, if it is in the report.
    pub fn state_of(&self, namespace: &str, name: &str, container: &str) -> Option<&State> {
        self.workloads
            .iter()
            .find(|w| w.namespace == namespace && w.name == name)?
            .containers
            .iter()
            .find(|c| c.container == container)
            .map(|c| &c.state)
    }
}

/// The warm-up's progress while a container is warming: `warming 63 %, 1.2 GiB of 1.9 GiB`.
fn progress_text(w: &WorkloadReport, c: &ContainerDrift) -> String {
    match (&c.state, w.warm_bytes) {
        (State::Warming, Some(bytes)) => bytes.to_string(),
        _ => String::new(),
    }
}

/// The table's state cell: the state, its reason, or the warm-up's progress.
fn state_text(w: &WorkloadReport, c: &ContainerDrift) -> String {
    let progress = progress_text(w, c);
    match c.state.reason() {
        _ if !progress.is_empty() => progress,
        Some(reason) => format!("{}: {reason}", c.state.name()),
        None => c.state.name().to_owned(),
    }
}

fn short(digest: &warmroll_proto::image::Digest) -> String {
    let text = digest.to_string();
    text.get(..19).map(str::to_owned).unwrap_or(text)
}

/// `sha256:abc… 2/1, sha256:def… 1/1` (pods/nodes per digest).
fn running_text(c: &ContainerDrift) -> String {
    if c.running.is_empty() {
        return "-".to_owned();
    }
    let parts: Vec<String> = c
        .running
        .iter()
        .map(|r| {
            let digest = r
                .digest
                .as_ref()
                .map(short)
                .unwrap_or_else(|| "unknown".into());
            format!("{digest} {}/{}", r.pods, r.nodes)
        })
        .collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drift::RunningDigest;
    use warmroll_proto::image::Digest;

    fn report() -> Report {
        let d = |c: &str| Digest::sha256_hex(&c.repeat(64)).unwrap();
        let container = |name: &str, state: State| ContainerDrift {
            container: name.into(),
            image: "reg/app:latest".into(),
            init: false,
            registry_digest: Some(d("a")),
            running: vec![RunningDigest {
                digest: Some(d("b")),
                pods: 2,
                nodes: 1,
                current: false,
            }],
            drifted_nodes: Default::default(),
            state,
        };
        Report::new(
            Timestamp::from_second(1_700_000_000).unwrap(),
            true,
            vec![
                WorkloadReport {
                    namespace: "shop".into(),
                    kind: Kind::Deployment,
                    name: "web".into(),
                    policy: "web".into(),
                    mode: Mode::Rollout,
                    note: Some("in cooldown".into()),
                    warm_bytes: None,
                    containers: vec![
                        container("app", State::Drift),
                        container("side", State::Held("warm-up timed out".into())),
                    ],
                },
                WorkloadReport {
                    namespace: "a".into(),
                    kind: Kind::DaemonSet,
                    name: "agent".into(),
                    policy: "web".into(),
                    mode: Mode::Report,
                    note: None,
                    warm_bytes: None,
                    containers: vec![container("x", State::InSync)],
                },
            ],
        )
    }

    #[test]
    fn summary_counts_states() {
        let r = report();
        assert_eq!(r.summary.workloads, 2);
        assert_eq!(r.summary.containers, 3);
        assert_eq!(r.count("drift"), 1);
        assert_eq!(r.count("held"), 1);
        assert_eq!(r.count("in-sync"), 1);
        assert_eq!(r.workloads[0].namespace, "a", "sorted");
        assert_eq!(r.state_of("shop", "web", "app"), Some(&State::Drift));
    }

    #[test]
    fn json_round_trips_with_state_and_reason() {
        let r = report();
        let json = serde_json::to_value(&r).unwrap();
        let side = &json["workloads"][1]["containers"][1];
        assert_eq!(side["state"]["state"], "held");
        assert_eq!(side["state"]["reason"], "warm-up timed out");
        assert_eq!(
            json["workloads"][0]["containers"][0]["state"]["state"],
            "in-sync"
        );
        assert_eq!(json["workloads"][1]["kind"], "Deployment");
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn table_has_a_row_per_container() {
        let table = report().table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE"), "{table}");
        assert!(
            lines[2].contains("shop") && lines[2].contains("drift"),
            "{table}"
        );
        assert!(table.contains("held: warm-up timed out"), "{table}");
        assert!(table.contains("sha256:bbbbbbbbbbbb 2/1"), "{table}");
        assert!(
            table.contains("2 workloads, 3 containers: 1 drift, 1 held, 1 in-sync"),
            "{table}"
        );
        assert!(
            table.contains("shop/Deployment/web: in cooldown"),
            "{table}"
        );
    }

    #[test]
    fn a_warming_container_shows_the_bytes_pulled_so_far() {
        let mut r = report();
        let web = &mut r.workloads[1];
        web.containers[0].state = State::Warming;
        web.warm_bytes = Some(WarmBytes {
            orders: 2,
            done: 1_288_490_189,
            total: 2_040_109_466,
            unknown_totals: 0,
        });
        let table = r.table();
        assert!(
            table.contains("warming 63 %, 1.2 GiB of 1.9 GiB"),
            "{table}"
        );
        // A container not warming keeps its own state.
        assert!(table.contains("held: warm-up timed out"), "{table}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["workloads"][1]["warm_bytes"]["done"], 1_288_490_189);
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }
}
