use proptest::prelude::*;
use prost::Message;

use super::*;

// ---- strategies for valid domain values ----

fn ident() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9-]{0,20}"
}

fn digest() -> impl Strategy<Value = Digest> {
    "[0-9a-f]{64}".prop_map(|hex| Digest::sha256_hex(&hex).unwrap())
}

fn image_ref() -> impl Strategy<Value = ImageRef> {
    (
        prop::option::of("[a-z0-9]{1,8}\\.example(:[0-9]{2,4})?"),
        "[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}",
        "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}",
    )
        .prop_map(|(registry, repo, tag)| {
            let text = match registry {
                Some(r) => format!("{r}/{repo}:{tag}"),
                None => format!("{repo}:{tag}"),
            };
            ImageRef::parse(&text).unwrap()
        })
}

fn node() -> impl Strategy<Value = NodeName> {
    "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\\.[a-z0-9]{1,8}){0,2}"
        .prop_map(|s| NodeName::parse(&s).unwrap())
}

fn order() -> impl Strategy<Value = OrderId> {
    "[A-Za-z0-9._-]{1,40}".prop_map(|s| OrderId::parse(&s).unwrap())
}

fn container() -> impl Strategy<Value = Container> {
    (
        ident(),
        (ident(), ident(), ident()),
        prop::collection::btree_map("[a-z./]{1,12}", ".{0,12}", 0..4),
        ident(),
        ".{0,30}",
        ".{0,30}",
        prop::option::of(digest()),
    )
        .prop_map(
            |(id, (namespace, name, uid), pod_labels, cname, image, image_id, digest)| Container {
                id,
                pod: PodRef {
                    namespace,
                    name,
                    uid,
                },
                pod_labels,
                name: cname,
                image,
                image_id,
                digest,
            },
        )
}

fn node_image() -> impl Strategy<Value = NodeImage> {
    (
        ident(),
        prop::collection::vec(".{0,20}", 0..3),
        prop::collection::vec(".{0,20}", 0..3),
        any::<u64>(),
    )
        .prop_map(|(id, repo_tags, repo_digests, size)| NodeImage {
            id,
            repo_tags,
            repo_digests,
            size,
        })
}

fn failure_kind() -> impl Strategy<Value = FailureKind> {
    prop::sample::select(vec![
        FailureKind::Auth,
        FailureKind::NotFound,
        FailureKind::DigestMismatch,
        FailureKind::Timeout,
        FailureKind::InsufficientDisk,
        FailureKind::Runtime,
        FailureKind::Cancelled,
        FailureKind::InvalidOrder,
    ])
}

fn ms() -> impl Strategy<Value = Duration> {
    (1u64..10_000_000).prop_map(Duration::from_millis)
}

fn agent_message() -> impl Strategy<Value = AgentMessage> {
    prop_oneof![
        (
            node(),
            "[a-z]{1,8}",
            "[a-z0-9]{1,8}",
            prop::option::of("v[0-9]"),
            ident(),
            ".{0,10}",
            ".{0,10}",
            any::<u32>()
        )
            .prop_map(|(node, os, architecture, variant, rt, rtv, av, pv)| {
                AgentMessage::Hello(Hello {
                    node,
                    platform: Platform {
                        os,
                        architecture,
                        variant,
                    },
                    runtime: Runtime {
                        name: rt,
                        version: rtv,
                    },
                    agent_version: av,
                    protocol_version: pv,
                })
            }),
        (
            any::<u64>(),
            prop::collection::vec(container(), 0..5),
            prop::collection::vec(node_image(), 0..3),
            any::<bool>()
        )
            .prop_map(|(sequence, containers, images, more)| {
                AgentMessage::Snapshot(SnapshotPart {
                    snapshot: Snapshot {
                        sequence,
                        containers,
                        images,
                    },
                    more,
                })
            }),
        (
            any::<u64>(),
            prop::collection::vec(container(), 0..3),
            prop::collection::vec(ident(), 0..3),
            prop::collection::vec(node_image(), 0..2),
            prop::collection::vec(ident(), 0..2)
        )
            .prop_map(
                |(sequence, upserted, removed, images_upserted, images_removed)| {
                    AgentMessage::Change(InventoryChange {
                        sequence,
                        upserted,
                        removed,
                        images_upserted,
                        images_removed,
                    })
                }
            ),
        (
            order(),
            any::<bool>(),
            prop::option::of(digest()),
            ident(),
            (0u64..10_000_000)
        )
            .prop_map(
                |(order, downloaded, digest, image_id, d)| AgentMessage::WarmResult(WarmResult {
                    order,
                    outcome: WarmOutcome::Succeeded {
                        duration: Duration::from_millis(d),
                        downloaded,
                        digest,
                        image_id
                    },
                })
            ),
        (
            order(),
            failure_kind(),
            ".{0,40}",
            prop::option::of(digest())
        )
            .prop_map(|(order, kind, message, found)| AgentMessage::WarmResult(
                WarmResult {
                    order,
                    outcome: WarmOutcome::Failed {
                        kind,
                        message,
                        found
                    },
                }
            )),
        (order(), any::<u64>(), prop::option::of(1u64..)).prop_map(
            |(order, bytes_done, bytes_total)| AgentMessage::WarmProgress(WarmProgress {
                order,
                bytes_done,
                bytes_total
            })
        ),
        Just(AgentMessage::Heartbeat),
    ]
}

fn credentials() -> impl Strategy<Value = Credentials> {
    prop_oneof![
        ("[a-z]{1,10}", ".{0,20}")
            .prop_map(|(username, password)| Credentials::Basic { username, password }),
        ".{1,40}".prop_map(Credentials::Token),
        ".{1,40}".prop_map(Credentials::IdentityToken),
    ]
}

fn coordinator_message() -> impl Strategy<Value = CoordinatorMessage> {
    prop_oneof![
        (any::<u32>(), ms(), ms()).prop_map(
            |(protocol_version, heartbeat_interval, inventory_interval)| {
                CoordinatorMessage::Welcome(Welcome {
                    protocol_version,
                    heartbeat_interval,
                    inventory_interval,
                })
            }
        ),
        (
            order(),
            image_ref(),
            prop::option::of(digest()),
            prop::option::of(credentials()),
            ms()
        )
            .prop_map(|(id, image, expected, credentials, timeout)| {
                CoordinatorMessage::WarmOrder(WarmOrder {
                    id,
                    image,
                    expected,
                    credentials,
                    timeout,
                })
            }),
        order().prop_map(CoordinatorMessage::CancelWarm),
        ".{0,40}".prop_map(|reason| CoordinatorMessage::Resync { reason }),
    ]
}

proptest! {
    #[test]
    fn agent_messages_round_trip(msg in agent_message()) {
        let wire = v1::AgentMessage::from(msg.clone());
        // Through the bytes too, as on the network.
        let decoded = v1::AgentMessage::decode(wire.encode_to_vec().as_slice()).unwrap();
        prop_assert_eq!(AgentMessage::try_from(decoded).unwrap(), msg);
    }

    #[test]
    fn coordinator_messages_round_trip(msg in coordinator_message()) {
        let wire = v1::CoordinatorMessage::from(msg.clone());
        let decoded = v1::CoordinatorMessage::decode(wire.encode_to_vec().as_slice()).unwrap();
        prop_assert_eq!(CoordinatorMessage::try_from(decoded).unwrap(), msg);
    }

    /// Arbitrary bytes either fail to decode or convert to a domain value or a
    /// `ProtocolError` naming a field; never a panic.
    #[test]
    fn arbitrary_agent_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(wire) = v1::AgentMessage::decode(bytes.as_slice())
            && let Err(e) = AgentMessage::try_from(wire)
        {
            prop_assert!(!e.field().is_empty());
        }
    }

    #[test]
    fn arbitrary_coordinator_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(wire) = v1::CoordinatorMessage::decode(bytes.as_slice())
            && let Err(e) = CoordinatorMessage::try_from(wire)
        {
            prop_assert!(!e.field().is_empty());
        }
    }

    /// Structured but arbitrary field values (not just valid ones) never panic.
    #[test]
    fn arbitrary_wire_containers_never_panic(
        id in ".{0,10}", ns in ".{0,5}", digest in ".{0,80}", labels in prop::collection::hash_map(".{0,5}", ".{0,5}", 0..3)
    ) {
        let wire = v1::AgentMessage {
            kind: Some(v1::agent_message::Kind::Snapshot(v1::InventorySnapshot {
                sequence: 1,
                containers: vec![v1::Container {
                    id,
                    pod: Some(v1::PodRef { namespace: ns, name: "p".into(), uid: "u".into() }),
                    pod_labels: labels,
                    name: "c".into(),
                    image: String::new(),
                    image_id: String::new(),
                    digest,
                }],
                images: vec![],
                more: false,
            })),
        };
        let _ = AgentMessage::try_from(wire);
    }

    #[test]
    fn arbitrary_wire_orders_never_panic(id in ".{0,10}", image in ".{0,40}", digest in ".{0,80}", timeout in any::<u64>()) {
        let wire = v1::CoordinatorMessage {
            kind: Some(v1::coordinator_message::Kind::WarmOrder(v1::WarmOrder {
                id,
                image,
                expected_digest: digest,
                credentials: None,
                timeout_ms: timeout,
            })),
        };
        let _ = CoordinatorMessage::try_from(wire);
    }
}

fn wire_container() -> v1::Container {
    v1::Container {
        id: "c1".into(),
        pod: Some(v1::PodRef {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "u".into(),
        }),
        pod_labels: Default::default(),
        name: "app".into(),
        image: "x".into(),
        image_id: "sha256:1".into(),
        digest: String::new(),
    }
}

fn snapshot_with(c: v1::Container) -> v1::AgentMessage {
    v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Snapshot(v1::InventorySnapshot {
            sequence: 1,
            containers: vec![wire_container(), c],
            images: vec![],
            more: false,
        })),
    }
}

#[test]
fn errors_name_the_offending_field() {
    let mut c = wire_container();
    c.pod.as_mut().unwrap().uid = String::new();
    let e = AgentMessage::try_from(snapshot_with(c)).unwrap_err();
    assert_eq!(e.field(), "snapshot.containers[1].pod.uid");
    assert_eq!(e.to_string(), "snapshot.containers[1].pod.uid: empty");

    let mut c = wire_container();
    c.pod = None;
    let e = AgentMessage::try_from(snapshot_with(c)).unwrap_err();
    assert_eq!(
        e,
        ProtocolError::Missing {
            field: "snapshot.containers[1].pod".into()
        }
    );

    let mut c = wire_container();
    c.digest = "sha256:nothex".into();
    let e = AgentMessage::try_from(snapshot_with(c)).unwrap_err();
    assert_eq!(e.field(), "snapshot.containers[1].digest");

    let e = AgentMessage::try_from(v1::AgentMessage { kind: None }).unwrap_err();
    assert_eq!(e.field(), "kind");

    let hello = v1::Hello {
        node_name: "Node_1".into(),
        os: "linux".into(),
        architecture: "amd64".into(),
        runtime_name: "containerd".into(),
        ..Default::default()
    };
    let e = Hello::try_from(hello).unwrap_err();
    assert_eq!(e.field(), "node_name");

    let order = v1::WarmOrder {
        id: "o1".into(),
        image: "registry.example/app:main".into(),
        timeout_ms: 0,
        ..Default::default()
    };
    let e = WarmOrder::try_from(order).unwrap_err();
    assert_eq!(e.field(), "timeout_ms");

    let result = v1::WarmResult {
        order_id: "o1".into(),
        outcome: Some(v1::warm_result::Outcome::Failed(v1::WarmFailed {
            kind: 99,
            ..Default::default()
        })),
    };
    let e = WarmResult::try_from(result).unwrap_err();
    assert_eq!(e.field(), "failed.kind");
}

#[test]
fn credentials_never_show_in_debug() {
    let basic = Credentials::Basic {
        username: "robot".into(),
        password: "hunter2".into(),
    };
    let token = Credentials::Token("s3cr3t-token".into());
    let identity = Credentials::IdentityToken("s3cr3t-refresh".into());
    assert!(!format!("{identity:?}").contains("s3cr3t-refresh"));
    assert!(!format!("{:?}", v1::Credentials::from(identity)).contains("s3cr3t-refresh"));
    let order = WarmOrder {
        id: OrderId::parse("o1").unwrap(),
        image: ImageRef::parse("registry.example/app:main").unwrap(),
        expected: None,
        credentials: Some(basic.clone()),
        timeout: Duration::from_secs(1),
    };
    let shown = format!("{order:?} {token:?}");
    assert!(shown.contains("robot"));
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(!shown.contains("s3cr3t"), "{shown}");

    let wire_basic = v1::WarmOrder::from(order);
    let wire_token = v1::Credentials::from(token);
    let shown = format!("{wire_basic:?} {wire_token:?}");
    assert!(shown.contains("robot"));
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(!shown.contains("s3cr3t"), "{shown}");
}

// ---- snapshots in parts ----

fn wire_part(sequence: u64, ids: &[&str], more: bool) -> SnapshotPart {
    SnapshotPart {
        snapshot: Snapshot {
            sequence,
            containers: ids
                .iter()
                .map(|id| {
                    Container::try_from(v1::Container {
                        id: (*id).into(),
                        ..wire_container()
                    })
                    .unwrap()
                })
                .collect(),
            images: vec![],
        },
        more,
    }
}

proptest! {
    /// Any snapshot split at any size and put back together is the same snapshot, and
    /// every part is within the size unless it holds a single larger entry.
    #[test]
    fn split_snapshots_reassemble(
        sequence in any::<u64>(),
        containers in prop::collection::vec(container(), 0..40),
        images in prop::collection::vec(node_image(), 0..40),
        max in 1usize..3000,
    ) {
        let whole = Snapshot { sequence, containers, images };
        let parts = split_snapshot(whole.clone().into(), max);
        prop_assert!(!parts.is_empty());
        let mut assembly = SnapshotAssembly::default();
        let mut done = None;
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            prop_assert_eq!(part.more, !last);
            prop_assert_eq!(part.sequence, sequence);
            let entries = part.containers.len() + part.images.len();
            let field = |len: usize| len + 1 + prost::length_delimiter_len(len);
            let body = part.containers.iter().map(|c| field(c.encoded_len())).sum::<usize>()
                + part.images.iter().map(|i| field(i.encoded_len())).sum::<usize>();
            prop_assert!(entries <= 1 || body <= max, "part {i}: {body} bytes in {entries} entries, limit {max}");
            let wire = v1::AgentMessage { kind: Some(v1::agent_message::Kind::Snapshot(part.clone())) };
            let AgentMessage::Snapshot(part) = AgentMessage::try_from(wire).unwrap() else {
                panic!("a snapshot part decoded as something else");
            };
            let out = assembly.push(part).unwrap();
            prop_assert_eq!(out.is_some(), last);
            prop_assert_eq!(assembly.is_pending(), !last);
            if let Some(out) = out {
                done = Some(out);
            }
        }
        prop_assert_eq!(done, Some(whole));
    }
}

#[test]
fn a_node_inventory_goes_in_small_parts() {
    let whole = v1::InventorySnapshot {
        sequence: 7,
        containers: (0..30)
            .map(|i| v1::Container {
                id: format!("{i:064}"),
                image: format!("registry.example.com/team-{i}/app-{i}:main"),
                image_id: format!("sha256:{i:064}"),
                digest: format!("sha256:{:064}", i + 100),
                pod_labels: [("app".to_string(), format!("app-{i}"))].into(),
                ..wire_container()
            })
            .collect(),
        images: vec![],
        more: false,
    };
    let parts = split_snapshot(whole.clone(), SNAPSHOT_PART_BYTES);
    assert!(parts.len() > 1, "30 containers should not fit one part");
    for part in &parts {
        assert!(
            part.encoded_len() <= SNAPSHOT_PART_BYTES + 16,
            "{}",
            part.encoded_len()
        );
    }
    let total: usize = parts.iter().map(|p| p.containers.len()).sum();
    assert_eq!(total, 30);
    // Small enough for one part: unchanged, `more` unset.
    let small = split_snapshot(whole.clone(), usize::MAX);
    assert_eq!(small, vec![whole]);
}

#[test]
fn snapshot_parts_must_share_a_sequence_and_stay_bounded() {
    let mut assembly = SnapshotAssembly::default();
    assert_eq!(assembly.push(wire_part(3, &["a"], true)).unwrap(), None);
    let e = assembly.push(wire_part(4, &["b"], false)).unwrap_err();
    assert_eq!(e.field(), "snapshot.sequence");
    assert!(e.to_string().contains("snapshot 3"), "{e}");

    let mut assembly = SnapshotAssembly::default();
    let ids: Vec<String> = (0..=MAX_SNAPSHOT_ENTRIES)
        .map(|i| format!("c{i}"))
        .collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (first, rest) = refs.split_at(MAX_SNAPSHOT_ENTRIES / 2);
    assert_eq!(assembly.push(wire_part(1, first, true)).unwrap(), None);
    let e = assembly.push(wire_part(1, rest, true)).unwrap_err();
    assert_eq!(e.field(), "snapshot");
}
