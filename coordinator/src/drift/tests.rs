use super::*;
use crate::config::Config;
use crate::registry::Child;
use crate::window::RolloutWindow;
use crate::workload::builders::mk_workload;
use warmroll_proto::image::Platform;

/// A distinct digest per character.
fn d(c: char) -> Digest {
    Digest::sha256_hex(&format!("{:02x}", c as u8).repeat(32)).unwrap()
}

fn resolved(image: &str, digest: Digest, children: &[Digest]) -> Lookup {
    Lookup::Tag(Resolved {
        image: ImageRef::parse(image).unwrap(),
        digest,
        media_type: if children.is_empty() {
            "application/vnd.oci.image.manifest.v1+json".into()
        } else {
            "application/vnd.oci.image.index.v1+json".into()
        },
        children: children
            .iter()
            .map(|c| Child {
                platform: Platform::parse("linux/amd64").unwrap(),
                digest: c.clone(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            })
            .collect::<Vec<_>>()
            .into(),
    })
}

fn run(node: &str, pod: &str, container: &str, digest: Option<Digest>) -> Running {
    Running {
        node: node.into(),
        pod: pod.into(),
        container: container.into(),
        digest,
    }
}

fn policy(extra: &str) -> Policy {
    let text =
        format!("policies:\n  web:\n    mode: rollout\n    stabilizationWindow: 10s\n{extra}");
    Config::parse(&text, "t")
        .unwrap()
        .policies
        .remove("web")
        .unwrap()
}

fn tc(name: &str, image: &str) -> TemplateContainer {
    TemplateContainer {
        name: name.into(),
        image: image.into(),
        pull_policy: None,
        init: false,
    }
}

fn ts(secs: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + secs).unwrap()
}

#[test]
fn in_sync_and_drift() {
    let c = tc("app", "reg:5000/app:latest");
    let lookup = resolved("reg:5000/app:latest", d('a'), &[]);
    let running = [
        run("n1", "p1", "app", Some(d('a'))),
        run("n2", "p2", "app", Some(d('a'))),
        run("n2", "p2", "sidecar", Some(d('f'))),
    ];
    let drift = container_drift(&c, Some(&lookup), &running);
    assert_eq!(drift.state, State::InSync);
    assert_eq!(drift.registry_digest, Some(d('a')));
    assert_eq!(drift.running.len(), 1);
    assert_eq!((drift.running[0].pods, drift.running[0].nodes), (2, 2));
    assert!(drift.running[0].current);

    let running = [
        run("n1", "p1", "app", Some(d('a'))),
        run("n2", "p2", "app", Some(d('b'))),
        run("n3", "p3", "app", Some(d('b'))),
    ];
    let drift = container_drift(&c, Some(&lookup), &running);
    assert_eq!(drift.state, State::Drift);
    assert_eq!(
        drift.drifted_nodes,
        ["n2".to_owned(), "n3".to_owned()].into()
    );
    let old = drift.running.iter().find(|r| !r.current).unwrap();
    assert_eq!((old.pods, old.nodes), (2, 2));
}

#[test]
fn multi_arch_children_are_in_sync() {
    let c = tc("app", "reg:5000/app:multi");
    let lookup = resolved("reg:5000/app:multi", d('i'), &[d('1'), d('2')]);
    let running = [
        run("amd", "p1", "app", Some(d('1'))),
        run("arm", "p2", "app", Some(d('2'))),
        run("x", "p3", "app", Some(d('i'))),
    ];
    assert_eq!(
        container_drift(&c, Some(&lookup), &running).state,
        State::InSync
    );
    let running = [run("amd", "p1", "app", Some(d('3')))];
    assert_eq!(
        container_drift(&c, Some(&lookup), &running).state,
        State::Drift
    );
}

#[test]
fn unknown_digest_is_no_evidence_of_drift() {
    let c = tc("app", "reg:5000/app:latest");
    let lookup = resolved("reg:5000/app:latest", d('a'), &[]);
    let drift = container_drift(&c, Some(&lookup), &[run("n1", "p1", "app", None)]);
    assert_eq!(drift.state, State::InSync);
    assert_eq!(drift.running[0].digest, None);
}

#[test]
fn pinned_bad_reference_and_registry_errors() {
    let pinned = tc("app", &format!("reg:5000/app@{}", d('a')));
    let drift = container_drift(&pinned, None, &[run("n", "p", "app", Some(d('b')))]);
    assert_eq!(drift.state, State::Pinned);

    let bad = tc("app", "Reg:5000/UPPER::x");
    let drift = container_drift(&bad, None, &[]);
    assert!(
        matches!(&drift.state, State::Error(r) if r.contains("bad image reference")),
        "{drift:?}"
    );

    let c = tc("app", "reg:5000/app:latest");
    let drift = container_drift(&c, Some(&Lookup::Error("registry down".into())), &[]);
    assert_eq!(drift.state, State::Error("registry down".into()));
    assert_eq!(drift.state.name(), "error");
    assert_eq!(drift.state.reason(), Some("registry down"));
}

#[test]
fn tracked_containers_follow_the_policy() {
    let mut w = mk_workload("ns", "web", &[("app", "a:latest"), ("side", "b:v1")]);
    w.containers.push(TemplateContainer {
        name: "init".into(),
        image: "c:latest".into(),
        pull_policy: Some("Always".into()),
        init: true,
    });
    let names = |p: &Policy| {
        tracked_containers(&w, p)
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&policy("")), ["app", "side"]);
    assert_eq!(
        names(&policy("    initContainers: true\n")),
        ["app", "side", "init"]
    );
    assert_eq!(names(&policy("    pullPolicies: always\n")), ["app"]);
}

#[test]
fn last_rollout_round_trips_and_covers() {
    let last = LastRollout {
        containers: [("app".to_owned(), d('a'))].into(),
        time: ts(0),
        reason: "drift".into(),
        request: None,
    };
    let mut w = mk_workload("ns", "web", &[("app", "a:latest")]);
    w.annotations.insert(
        LAST_ROLLOUT_ANNOTATION.into(),
        serde_json::to_string(&last).unwrap(),
    );
    assert_eq!(LastRollout::from_workload(&w), Some(Ok(last.clone())));
    assert!(last.covers(&[("app".to_owned(), d('a'))].into()));
    assert!(!last.covers(&[("app".to_owned(), d('b'))].into()));
    assert!(!last.covers(&BTreeMap::new()));
    w.annotations
        .insert(LAST_ROLLOUT_ANNOTATION.into(), "{".into());
    assert!(matches!(LastRollout::from_workload(&w), Some(Err(_))));
}

struct Case {
    workload: Workload,
    policy: Policy,
    containers: Vec<ContainerDrift>,
    nodes: BTreeSet<String>,
}

fn drifting(extra: &str) -> Case {
    let workload = mk_workload("ns", "web", &[("app", "reg:5000/app:latest")]);
    let lookup = resolved("reg:5000/app:latest", d('n'), &[]);
    let running = [
        run("n1", "p1", "app", Some(d('o'))),
        run("n2", "p2", "app", Some(d('o'))),
    ];
    let containers = vec![container_drift(
        &workload.containers[0],
        Some(&lookup),
        &running,
    )];
    let nodes = warm_nodes(
        &workload,
        WarmTargets::Running,
        &containers,
        &running,
        |_| unreachable!("running targets ask for no schedulable nodes"),
    );
    Case {
        workload,
        policy: policy(extra),
        containers,
        nodes,
    }
}

fn gates(secs: i64) -> Gates {
    Gates {
        now: ts(secs),
        leader: true,
        slot_free: true,
        requested: None,
    }
}

impl Case {
    fn step(&self, phase: &Phase, warm: &WarmProgress, gates: &Gates) -> Step {
        self.step_with(phase, None, warm, gates)
    }
    fn step_with(
        &self,
        phase: &Phase,
        last: Option<&LastRollout>,
        warm: &WarmProgress,
        gates: &Gates,
    ) -> Step {
        let subject = Subject {
            workload: &self.workload,
            policy: &self.policy,
            containers: &self.containers,
            nodes: &self.nodes,
        };
        decide(&subject, phase, last, warm, gates)
    }
}

fn warm_on(nodes: &[&str]) -> WarmProgress {
    WarmProgress {
        warm: nodes.iter().map(|n| (*n).to_owned()).collect(),
        failed: BTreeMap::new(),
        ..WarmProgress::default()
    }
}

#[test]
fn rollout_goes_stabilise_warm_patch_converge() {
    let case = drifting("");
    let none = WarmProgress::default();
    let s1 = case.step(&Phase::Idle, &none, &gates(0));
    assert!(matches!(s1.phase, Phase::Stabilising { .. }));
    assert_eq!(s1.action, Action::None);
    assert_eq!(s1.state, State::Drift);
    // Inside the window: nothing.
    let s2 = case.step(&s1.phase, &none, &gates(5));
    assert_eq!(s2.action, Action::None);
    // After it: warm the nodes running drifted pods.
    let s3 = case.step(&s2.phase, &none, &gates(11));
    assert_eq!(
        s3.action,
        Action::Warm {
            nodes: ["n1".to_owned(), "n2".to_owned()].into()
        }
    );
    assert_eq!(s3.state, State::Warming);
    // One node warm of two: threshold 1 not reached.
    let s4 = case.step(&s3.phase, &warm_on(&["n1"]), &gates(20));
    assert_eq!(s4.action, Action::None);
    assert_eq!(s4.state, State::Warming);
    let s5 = case.step(&s4.phase, &warm_on(&["n1", "n2"]), &gates(21));
    assert!(
        matches!(&s5.action, Action::Patch { reason } if reason.contains("2/2 target nodes warm")),
        "{s5:?}"
    );
    assert!(matches!(s5.phase, Phase::Rolling { partial: false, .. }));
    assert_eq!(s5.state, State::Rolling);

    // Converged once nothing drifts any more.
    let mut done = drifting("");
    done.containers[0].state = State::InSync;
    let s6 = done.step(&s5.phase, &none, &gates(30));
    assert_eq!(s6.state, State::Converged);
    assert_eq!(s6.phase, Phase::Idle);
}

#[test]
fn a_zero_window_warms_in_the_first_step() {
    let mut case = drifting("");
    case.policy.stabilization_window = Duration::ZERO;
    let step = case.step(&Phase::Idle, &WarmProgress::default(), &gates(0));
    assert_eq!(
        step.action,
        Action::Warm {
            nodes: case.nodes.clone()
        }
    );
    assert!(matches!(step.phase, Phase::Warming { started, .. } if started == ts(0)));
}

#[test]
fn warm_up_off_patches_once_drift_is_decided_without_warm_orders() {
    let case = drifting("    warm: {enabled: false}\n");
    let none = WarmProgress::default();
    let s1 = case.step(&Phase::Idle, &none, &gates(0));
    assert_eq!(s1.action, Action::None);
    assert!(matches!(s1.phase, Phase::Stabilising { .. }));
    // Gates still hold it (the window keeps its start).
    let mut g = gates(11);
    g.slot_free = false;
    let held = case.step(&s1.phase, &none, &g);
    assert_eq!(held.action, Action::None);
    assert!(held.note.unwrap().contains("rollout slot"));
    assert!(matches!(held.phase, Phase::Stabilising { since, .. } if since == ts(0)));
    // Past the window: the patch, no warm-up in between.
    let s2 = case.step(&held.phase, &none, &gates(11));
    assert!(
        matches!(&s2.action, Action::Patch { reason } if reason.contains("warm-up off")),
        "{s2:?}"
    );
    assert!(matches!(s2.phase, Phase::Rolling { partial: false, .. }));
    assert_eq!(s2.state, State::Rolling);
    // And never again for that digest.
    let s3 = case.step(&s2.phase, &none, &gates(12));
    assert_eq!(s3.action, Action::None);
    assert_eq!(s3.state, State::Rolling);

    // With a zero window, in the very step the drift is decided.
    let mut at_once = drifting("    warm: {enabled: false}\n");
    at_once.policy.stabilization_window = Duration::ZERO;
    let step = at_once.step(&Phase::Idle, &none, &gates(0));
    assert!(matches!(step.action, Action::Patch { .. }), "{step:?}");
}

#[test]
fn a_new_target_restarts_the_window() {
    let case = drifting("");
    let phase = Phase::Warming {
        target: [("app".to_owned(), d('x'))].into(),
        started: ts(0),
        nodes: BTreeSet::new(),
    };
    let step = case.step(&phase, &WarmProgress::default(), &gates(100));
    assert!(matches!(step.phase, Phase::Stabilising { since, .. } if since == ts(100)));
}

fn warming(case: &Case) -> Phase {
    Phase::Warming {
        target: drift_target(&case.containers),
        started: ts(0),
        nodes: case.nodes.clone(),
    }
}

#[test]
fn warm_timeout_hold_says_why_and_stays_held() {
    let case = drifting("    warm: {timeout: 60s, onTimeout: hold}\n");
    let phase = warming(&case);
    let mut progress = warm_on(&["n1"]);
    assert_eq!(
        case.step(&phase, &progress, &gates(59)).action,
        Action::None
    );
    progress.failed.insert("n2".into(), "auth: denied".into());
    // Every node answered, below the threshold: hold at once.
    let step = case.step(&phase, &progress, &gates(30));
    assert_eq!(step.action, Action::None);
    let State::Held(reason) = &step.state else {
        panic!("{step:?}")
    };
    assert!(reason.contains("1/2 target nodes warm"), "{reason}");
    assert!(reason.contains("n2: auth: denied"), "{reason}");
    // Held stays held for that target.
    let again = case.step(&step.phase, &progress, &gates(500));
    assert_eq!(again.action, Action::None);
    assert!(matches!(again.state, State::Held(_)));

    let timed = case.step(&phase, &warm_on(&["n1"]), &gates(60));
    assert!(
        matches!(&timed.state, State::Held(r) if r.contains("timed out")),
        "{timed:?}"
    );
}

#[test]
fn warm_timeout_rollout_patches_and_says_partial() {
    let case = drifting("    warm: {timeout: 60s, onTimeout: rollout}\n");
    let step = case.step(&warming(&case), &warm_on(&["n1"]), &gates(61));
    let Action::Patch { reason } = &step.action else {
        panic!("{step:?}")
    };
    assert!(reason.contains("partial"), "{reason}");
    assert!(matches!(step.phase, Phase::Rolling { partial: true, .. }));
}

#[test]
fn threshold_below_one_rolls_early() {
    let case = drifting("    warm: {threshold: 0.5}\n");
    let step = case.step(&warming(&case), &warm_on(&["n2"]), &gates(5));
    assert!(matches!(step.action, Action::Patch { .. }), "{step:?}");
}

#[test]
fn safety_gates_block_the_patch() {
    let case = drifting("");
    let phase = warming(&case);
    let warm = warm_on(&["n1", "n2"]);
    let mut g = gates(10);
    g.leader = false;
    let step = case.step(&phase, &warm, &g);
    assert_eq!(step.action, Action::None);
    assert!(step.note.unwrap().contains("not the leader"));

    let mut g = gates(10);
    g.slot_free = false;
    assert!(
        case.step(&phase, &warm, &g)
            .note
            .unwrap()
            .contains("rollout slot")
    );

    let mut mid = drifting("");
    mid.workload.status.generation = 5;
    assert!(
        mid.step(&phase, &warm, &gates(10))
            .note
            .unwrap()
            .contains("mid-rollout")
    );

    let mut zero = drifting("");
    zero.workload.replicas = Some(0);
    assert!(
        zero.step(&phase, &warm, &gates(10))
            .note
            .unwrap()
            .contains("scaled to zero")
    );

    // Cooldown after an earlier rollout to another digest.
    let earlier = LastRollout {
        containers: [("app".to_owned(), d('o'))].into(),
        time: ts(0),
        reason: "drift".into(),
        request: None,
    };
    let step = case.step_with(&phase, Some(&earlier), &warm, &gates(10));
    assert!(step.note.unwrap().contains("cooldown"));
    let step = case.step_with(&phase, Some(&earlier), &warm, &gates(301));
    assert!(matches!(step.action, Action::Patch { .. }));
}

#[test]
fn never_rolls_twice_for_one_digest() {
    let case = drifting("");
    let last = LastRollout {
        containers: drift_target(&case.containers),
        time: ts(0),
        reason: "drift".into(),
        request: None,
    };
    // A restarted coordinator (phase Idle) sees the record: rolling, no action.
    let step = case.step_with(
        &Phase::Idle,
        Some(&last),
        &WarmProgress::default(),
        &gates(30),
    );
    assert_eq!(step.action, Action::None);
    assert_eq!(step.state, State::Rolling);
    // Pods never converge: held, still no action.
    let step = case.step_with(
        &Phase::Idle,
        Some(&last),
        &WarmProgress::default(),
        &gates(601),
    );
    assert_eq!(step.action, Action::None);
    assert!(matches!(step.state, State::Held(_)));
    // Deployment reports the progress deadline: held at once.
    let mut failing = drifting("");
    failing.workload.status.progress_deadline_exceeded = true;
    let step = failing.step_with(
        &Phase::Idle,
        Some(&last),
        &WarmProgress::default(),
        &gates(30),
    );
    assert!(matches!(step.state, State::Held(_)));
}

#[test]
fn a_patched_target_is_not_rolled_again_before_its_record_is_seen() {
    let case = drifting("");
    let phase = Phase::Rolling {
        target: drift_target(&case.containers),
        patched: ts(0),
        partial: false,
    };
    // The reflector has not delivered the annotation yet (no record): still rolling.
    let step = case.step(&phase, &WarmProgress::default(), &gates(5));
    assert_eq!(step.action, Action::None);
    assert_eq!(step.state, State::Rolling);
    let step = case.step(&phase, &WarmProgress::default(), &gates(601));
    assert!(matches!(step.state, State::Held(_)), "{step:?}");
    assert_eq!(step.action, Action::None);
}

#[test]
fn report_mode_only_reports() {
    let mut case = drifting("");
    case.policy.mode = Mode::Report;
    let step = case.step(&Phase::Idle, &WarmProgress::default(), &gates(1000));
    assert_eq!(step.action, Action::None);
    assert_eq!(step.state, State::Drift);
}

#[test]
fn daemon_sets_warm_every_node() {
    let mut case = drifting("");
    case.workload.key.kind = crate::workload::Kind::DaemonSet;
    let running = [
        run("n1", "p1", "app", Some(d('n'))),
        run("n2", "p2", "app", Some(d('o'))),
    ];
    let nodes = warm_nodes(
        &case.workload,
        WarmTargets::Schedulable,
        &case.containers,
        &running,
        |_| ["n3".to_owned()].into(),
    );
    assert_eq!(
        nodes,
        ["n1".to_owned(), "n2".to_owned()].into(),
        "a DaemonSet's pods are replaced where they run"
    );
}

#[test]
fn schedulable_targets_add_the_nodes_the_template_admits_while_drifting() {
    let mut case = drifting("");
    case.workload.placement.node_selector = [("pool".to_owned(), "web".to_owned())].into();
    let running = [
        run("n1", "p1", "app", Some(d('o'))),
        run("n2", "p2", "app", Some(d('o'))),
    ];
    let mut asked = None;
    let nodes = warm_nodes(
        &case.workload,
        WarmTargets::Schedulable,
        &case.containers,
        &running,
        |p| {
            asked = Some(p.clone());
            ["n2".to_owned(), "n3".to_owned()].into()
        },
    );
    assert_eq!(
        nodes,
        ["n1".to_owned(), "n2".to_owned(), "n3".to_owned()].into()
    );
    assert_eq!(asked, Some(case.workload.placement.clone()));
    // In sync: nothing to warm, and the node table is not asked.
    let synced = [run("n1", "p1", "app", Some(d('n')))];
    let lookup = resolved("reg:5000/app:latest", d('n'), &[]);
    let in_sync = vec![container_drift(
        &case.workload.containers[0],
        Some(&lookup),
        &synced,
    )];
    let nodes = warm_nodes(
        &case.workload,
        WarmTargets::Schedulable,
        &in_sync,
        &synced,
        |_| unreachable!("nothing drifts"),
    );
    assert!(nodes.is_empty());
}

#[test]
fn restart_schedule() {
    let text = "policies:\n  n:\n    mode: restart\n    schedule: '0 3 * * *'\n";
    let p = Config::parse(text, "t")
        .unwrap()
        .policies
        .remove("n")
        .unwrap();
    let after: Timestamp = "2024-01-01T02:00:00Z".parse().unwrap();
    assert_eq!(
        restart_due(&p, after, "2024-01-01T02:59:59Z".parse().unwrap()),
        None
    );
    assert_eq!(
        restart_due(&p, after, "2024-01-01T03:00:30Z".parse().unwrap()),
        Some("2024-01-01T03:00:00Z".parse().unwrap())
    );
}

fn all_warm(case: &Case) -> WarmProgress {
    WarmProgress {
        warm: case.nodes.clone(),
        ..WarmProgress::default()
    }
}

#[test]
fn approval_releases_only_the_digest_it_names() {
    let mut case = drifting("    requireApproval: true\n");
    let phase = warming(&case);
    let warm = all_warm(&case);
    // Warm, but nobody approved: waiting, the report says how to approve.
    let step = case.step(&phase, &warm, &gates(20));
    assert_eq!(step.action, Action::None);
    assert_eq!(step.phase, phase, "the warm-up stays in place");
    let State::AwaitingApproval(how) = &step.state else {
        panic!("awaiting approval expected: {step:?}");
    };
    assert!(
        how.contains(&format!("warmroll.io/approve={}", d('n'))),
        "{how}"
    );
    assert!(
        how.contains("warmroll-coordinator approve ns/Deployment/web"),
        "{how}"
    );
    // An approval of an older digest releases nothing.
    case.workload
        .annotations
        .insert(APPROVE_ANNOTATION.into(), d('o').to_string());
    let step = case.step(&phase, &warm, &gates(21));
    assert!(matches!(step.state, State::AwaitingApproval(_)), "{step:?}");
    // Naming the new digest (among others) releases the patch.
    case.workload
        .annotations
        .insert(APPROVE_ANNOTATION.into(), format!("{}, {}", d('o'), d('n')));
    let step = case.step(&phase, &warm, &gates(22));
    assert!(matches!(step.action, Action::Patch { .. }), "{step:?}");
}

#[test]
fn approval_comes_after_the_warm_up() {
    let case = drifting("    requireApproval: true\n");
    let step = case.step(&warming(&case), &warm_on(&["n1"]), &gates(20));
    assert_eq!(step.state, State::Warming);
}

#[test]
fn a_rollout_window_holds_the_patch_not_the_warm_up() {
    // ts(0) is 22:13:20 UTC; windows open every 10 minutes for one.
    let case = drifting("    window: {schedule: '*/10 * * * *', duration: 1m}\n");
    let none = WarmProgress::default();
    // Warming starts outside the window.
    let s1 = case.step(&Phase::Idle, &none, &gates(0));
    let s2 = case.step(&s1.phase, &none, &gates(11));
    assert!(matches!(s2.action, Action::Warm { .. }), "{s2:?}");
    // Warm, the window closed: wait and say when it opens.
    let warm = all_warm(&case);
    let s3 = case.step(&s2.phase, &warm, &gates(20));
    assert_eq!(s3.action, Action::None);
    let State::AwaitingWindow(why) = &s3.state else {
        panic!("awaiting the window expected: {s3:?}");
    };
    assert!(why.contains("2023-11-14 22:20:00 UTC"), "{why}");
    // 22:20:00 opens it.
    let s4 = case.step(&s3.phase, &warm, &gates(400));
    assert!(matches!(s4.action, Action::Patch { .. }), "{s4:?}");
    // 22:21:00 is closed again.
    let s5 = case.step(&s3.phase, &warm, &gates(460));
    assert!(matches!(s5.state, State::AwaitingWindow(_)), "{s5:?}");
}

#[test]
fn a_window_also_holds_an_unwarmed_patch() {
    let case = drifting(
        "    warm: {enabled: false}\n    window: {schedule: '*/10 * * * *', duration: 1m}\n",
    );
    let none = WarmProgress::default();
    let s1 = case.step(&Phase::Idle, &none, &gates(0));
    let s2 = case.step(&s1.phase, &none, &gates(11));
    assert!(matches!(s2.state, State::AwaitingWindow(_)), "{s2:?}");
    assert!(matches!(s2.phase, Phase::Stabilising { since, .. } if since == ts(0)));
    let s3 = case.step(&s2.phase, &none, &gates(401));
    assert!(matches!(s3.action, Action::Patch { .. }), "{s3:?}");
}

#[test]
fn a_rollout_request_restarts_warm_past_every_policy_gate() {
    // In sync, report mode, with approval-free defaults: nothing to do until asked.
    let workload = mk_workload("ns", "web", &[("app", "reg:5000/app:latest")]);
    let lookup = resolved("reg:5000/app:latest", d('n'), &[]);
    let running = [
        run("n1", "p1", "app", Some(d('n'))),
        run("n2", "p2", "app", Some(d('n'))),
    ];
    let mut containers = vec![container_drift(
        &workload.containers[0],
        Some(&lookup),
        &running,
    )];
    assert_eq!(containers[0].state, State::InSync);
    request_all(&mut containers, &running);
    assert!(containers[0].drifts());
    let nodes = warm_nodes(
        &workload,
        WarmTargets::Running,
        &containers,
        &running,
        |_| unreachable!(),
    );
    assert_eq!(nodes, ["n1".to_owned(), "n2".to_owned()].into());
    let mut case = Case {
        workload,
        policy: policy(""),
        containers,
        nodes,
    };
    case.policy.mode = Mode::Report;
    case.policy.window = RolloutWindow::new("0 3 1 1 *", Duration::from_secs(60), None).ok();
    case.policy.require_approval = true;
    // The same digest was rolled a moment ago (cooldown): a request still restarts.
    let last = LastRollout {
        containers: drift_target(&case.containers),
        time: ts(0),
        reason: "drift".into(),
        request: None,
    };
    let mut g = gates(5);
    g.requested = Some("2023-11-14T22:13:25Z".into());
    let none = WarmProgress::default();
    let s1 = case.step_with(&Phase::Idle, Some(&last), &none, &g);
    assert!(matches!(s1.action, Action::Warm { .. }), "{s1:?}");
    let s2 = case.step_with(&s1.phase, Some(&last), &all_warm(&case), &g);
    let Action::Patch { reason } = &s2.action else {
        panic!("patch expected: {s2:?}");
    };
    assert!(
        reason.starts_with("rollout requested (2023-11-14T22:13:25Z): warm-up done"),
        "{reason}"
    );
}

#[test]
fn a_request_is_open_until_a_rollout_served_it() {
    let mut w = mk_workload("ns", "web", &[("app", "a:latest")]);
    assert_eq!(open_request(&w, None, None), None);
    w.annotations
        .insert(ROLLOUT_REQUEST_ANNOTATION.into(), "t1".into());
    assert_eq!(open_request(&w, None, None), Some("t1".into()));
    // Served by this engine (record not back yet), or recorded on the workload.
    assert_eq!(open_request(&w, None, Some("t1")), None);
    let last = LastRollout {
        containers: BTreeMap::new(),
        time: ts(0),
        reason: "r".into(),
        request: Some("t1".into()),
    };
    assert_eq!(open_request(&w, Some(&last), None), None);
    // A new request (whatever the clocks say) is open again.
    w.annotations
        .insert(ROLLOUT_REQUEST_ANNOTATION.into(), "t0".into());
    assert_eq!(open_request(&w, Some(&last), Some("t1")), Some("t0".into()));
}

#[test]
fn with_warm_waves_the_gate_times_out_from_the_last_wave() {
    let case = drifting("    warm: {timeout: 60s, onTimeout: hold, maxParallelNodes: 1}\n");
    let phase = warming(&case);
    // n1 warm; n2 still waits for its order long after the first wave's timeout.
    let mut progress = warm_on(&["n1"]);
    progress.queued.insert("n2".into());
    progress.last_sent = Some(ts(0));
    let step = case.step(&phase, &progress, &gates(500));
    assert_eq!(step.state, State::Warming, "{step:?}");
    // n2's order went out at 500 s: the timeout counts from there.
    progress.queued.clear();
    progress.last_sent = Some(ts(500));
    assert_eq!(
        case.step(&phase, &progress, &gates(559)).state,
        State::Warming
    );
    let timed = case.step(&phase, &progress, &gates(560));
    assert!(
        matches!(&timed.state, State::Held(r) if r.contains("timed out")),
        "{timed:?}"
    );
    // Everyone warm: the gate opens whatever the clock says.
    let mut all = warm_on(&["n1", "n2"]);
    all.last_sent = Some(ts(500));
    assert!(matches!(
        case.step(&phase, &all, &gates(501)).action,
        Action::Patch { .. }
    ));
}
