//! KubeApi against an unmodified kube-rs client and kube-runtime: every answer checked
//! here is what the real API server gives (codes, reasons, resourceVersion and
//! generation rules, watch semantics).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    apps::v1::{Deployment, StatefulSet},
    authentication::v1::{TokenRequest, TokenReview},
    authorization::v1::SubjectAccessReview,
    coordination::v1::Lease,
    core::v1::{Event as CoreEvent, Node, ObjectReference, Pod, PodStatus, Secret, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        events::{Event as RecorderEvent, EventType, Recorder, Reporter},
        reflector, watcher,
    },
};
use serde_json::{Value, json};
use warmroll_tests::kubeapi::{ADMIN_USER, API_AUDIENCE, KubeApi, KubeApiOptions};

fn from_json<K: serde::de::DeserializeOwned>(v: Value) -> K {
    serde_json::from_value(v).unwrap()
}

fn deployment(name: &str, labels: Value) -> Deployment {
    from_json(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [
                    {"name": "app", "image": "reg.example/app:main"},
                    {"name": "side", "image": "reg.example/side:main"}
                ]}
            }
        },
        "status": {"replicas": 3}
    }))
}

fn pod(namespace: &str, name: &str, labels: Value, node: &str) -> Pod {
    from_json(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "reg.example/app:main"}]}
    }))
}

fn secret(name: &str) -> Secret {
    from_json(json!({"metadata": {"name": name}, "stringData": {"k": "v"}}))
}

fn api_error(err: kube::Error) -> Box<kube::core::Status> {
    match err {
        kube::Error::Api(status) => status,
        other => panic!("expected an API error Status, got {other:?}"),
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rv<K: kube::Resource>(obj: &K) -> u64 {
    obj.meta()
        .resource_version
        .as_deref()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn create_get_and_list_over_https_with_system_fields() {
    let kube_api = KubeApi::start().await.unwrap();
    assert!(kube_api.url().starts_with("https://127.0.0.1:"));
    let deployments: Api<Deployment> = Api::namespaced(kube_api.client(), "apps");

    let created = deployments
        .create(
            &PostParams::default(),
            &deployment("web", json!({"app": "web"})),
        )
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(
        created
            .metadata
            .uid
            .as_deref()
            .is_some_and(|u| u.len() == 36)
    );
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.metadata.namespace.as_deref(), Some("apps"));
    // Status is the controller's: a create resets it.
    assert_eq!(created.status.clone().unwrap().replicas, None);

    let fetched = deployments.get("web").await.unwrap();
    assert_eq!(
        fetched.metadata.resource_version,
        created.metadata.resource_version
    );

    let other: Api<Deployment> = Api::namespaced(kube_api.client(), "other");
    let second = other
        .create(&PostParams::default(), &deployment("db", json!({})))
        .await
        .unwrap();
    assert!(
        rv(&second) > rv(&created),
        "resourceVersion is one global counter"
    );

    let in_apps = deployments.list(&ListParams::default()).await.unwrap();
    assert_eq!(in_apps.items.len(), 1);
    let all = Api::<Deployment>::all(kube_api.client())
        .list(&ListParams::default())
        .await
        .unwrap();
    let names: Vec<_> = all
        .items
        .iter()
        .map(|d| d.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["web", "db"], "listed by namespace, then name");
    assert_eq!(
        all.metadata.resource_version,
        second.metadata.resource_version
    );

    // The same objects through the typed store helper.
    let stored: Deployment = kube_api.get("apps", "web").unwrap().unwrap();
    assert_eq!(stored.metadata.uid, created.metadata.uid);
    assert!(
        kube_api
            .get::<Deployment>("apps", "nope")
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn errors_are_status_objects_with_real_reasons_and_codes() {
    let kube_api = KubeApi::start().await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(kube_api.client(), "default");

    let missing = api_error(deployments.get("ghost").await.unwrap_err());
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, "deployments.apps \"ghost\" not found");
    assert_eq!(missing.details.as_ref().unwrap().group, "apps");

    deployments
        .create(&PostParams::default(), &deployment("web", json!({})))
        .await
        .unwrap();
    let dup = api_error(
        deployments
            .create(&PostParams::default(), &deployment("web", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!((dup.code, dup.reason.as_str()), (409, "AlreadyExists"));

    let nameless = api_error(
        deployments
            .create(
                &PostParams::default(),
                &from_json(json!({"metadata": {}, "spec": {"selector": {}, "template": {}}})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!((nameless.code, nameless.reason.as_str()), (422, "Invalid"));
    assert_eq!(nameless.details.unwrap().causes[0].field, "metadata.name");

    let bad_label = api_error(
        deployments
            .create(
                &PostParams::default(),
                &deployment("x", json!({"bad key": "v"})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(bad_label.code, 422);

    let generated = deployments
        .create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": {"generateName": "web-"}, "spec": {"selector": {}, "template": {}}
            })),
        )
        .await
        .unwrap();
    let name = generated.metadata.name.unwrap();
    assert!(name.starts_with("web-") && name.len() == 9, "{name}");

    let bad_selector = api_error(
        deployments
            .list(&ListParams::default().labels("app in ("))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (bad_selector.code, bad_selector.reason.as_str()),
        (400, "BadRequest")
    );
    let bad_field = api_error(
        deployments
            .list(&ListParams::default().fields("spec.replicas=1"))
            .await
            .unwrap_err(),
    );
    assert_eq!(bad_field.code, 400);

    // Unknown tokens get 401 and are recorded without a user.
    let mut config = kube_api.config();
    config.auth_info.token = Some("not-a-token".to_string().into());
    let stranger: Api<Deployment> = Api::namespaced(Client::try_from(config).unwrap(), "default");
    let denied = api_error(stranger.get("web").await.unwrap_err());
    assert_eq!((denied.code, denied.reason.as_str()), (401, "Unauthorized"));
    assert_eq!(kube_api.requests().last().unwrap().user, None);
}

/// RBAC for a user whose grants are Roles only: its cluster-wide lists and watches of
/// the forbidden resources get the API server's 403 Status (core resources without a
/// group in `details`); its namespaced requests and other users' are untouched, and
/// allowing it again works at once.
#[tokio::test]
async fn cluster_wide_lists_and_watches_are_forbidden_for_one_user_as_rbac_does() {
    let kube_api = KubeApi::start().await.unwrap();
    let user = "system:serviceaccount:warmroll:warmroll-coordinator";
    let client = kube_api
        .client_as(user, &["system:serviceaccounts"])
        .unwrap();
    kube_api
        .insert(&deployment("web", json!({"app": "web"})))
        .unwrap();
    kube_api.forbid_cluster_scope(user, "apps", "deployments");
    kube_api.forbid_cluster_scope(user, "", "nodes");

    let all: Api<Deployment> = Api::all(client.clone());
    let list = api_error(all.list(&ListParams::default()).await.unwrap_err());
    assert_eq!((list.code, list.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        list.status,
        Some(kube::core::response::StatusSummary::Failure)
    );
    assert_eq!(
        list.message,
        "deployments.apps is forbidden: User \"system:serviceaccount:warmroll:warmroll-coordinator\" cannot list resource \"deployments\" in API group \"apps\" at the cluster scope"
    );
    let details = list.details.unwrap();
    assert_eq!(
        (details.group.as_str(), details.kind.as_str()),
        ("apps", "deployments")
    );
    let watch = match all.watch(&WatchParams::default(), "0").await {
        Err(e) => api_error(e),
        Ok(_) => panic!("a forbidden watch was accepted"),
    };
    assert_eq!(watch.code, 403);
    assert!(
        watch
            .message
            .contains("cannot watch resource \"deployments\""),
        "{}",
        watch.message
    );
    let nodes = api_error(
        Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await
            .unwrap_err(),
    );
    assert!(
        nodes
            .message
            .starts_with("nodes is forbidden: User \"system:serviceaccount:warmroll:warmroll-coordinator\" cannot list resource \"nodes\" in API group \"\" at the cluster scope"),
        "{}",
        nodes.message
    );
    let details = nodes.details.unwrap();
    assert_eq!(
        (details.group.as_str(), details.kind.as_str()),
        ("", "nodes")
    );

    // A Role's namespace, other resources and other users still work.
    let in_default: Api<Deployment> = Api::namespaced(client.clone(), "default");
    assert_eq!(
        in_default
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    Api::<StatefulSet>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    Api::<Deployment>::all(kube_api.client())
        .list(&ListParams::default())
        .await
        .unwrap();

    kube_api.allow_cluster_scope();
    assert_eq!(
        all.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}

#[tokio::test]
async fn label_and_field_selectors_filter_like_the_api_server() {
    let kube_api = KubeApi::start().await.unwrap();
    for (ns, name, labels, node) in [
        (
            "a",
            "web-1",
            json!({"app": "web", "tier": "front"}),
            "node-1",
        ),
        (
            "a",
            "web-2",
            json!({"app": "web", "tier": "back"}),
            "node-2",
        ),
        ("b", "db-1", json!({"app": "db"}), "node-1"),
        ("b", "plain", json!({}), "node-2"),
    ] {
        kube_api.insert(&pod(ns, name, labels, node)).unwrap();
    }
    let all: Api<Pod> = Api::all(kube_api.client());
    let names = |lp: ListParams| {
        let all = all.clone();
        async move {
            let list = all.list(&lp).await.unwrap();
            list.items
                .into_iter()
                .map(|p| p.metadata.name.unwrap())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        names(ListParams::default().labels("app=web")).await,
        ["web-1", "web-2"]
    );
    assert_eq!(
        names(ListParams::default().labels("app==web,tier!=back")).await,
        ["web-1"]
    );
    assert_eq!(
        names(ListParams::default().labels("tier!=back")).await,
        ["web-1", "db-1", "plain"]
    );
    assert_eq!(
        names(ListParams::default().labels("app in (db, cache)")).await,
        ["db-1"]
    );
    assert_eq!(
        names(ListParams::default().labels("app notin (web)")).await,
        ["db-1", "plain"]
    );
    assert_eq!(
        names(ListParams::default().labels("tier")).await,
        ["web-1", "web-2"]
    );
    assert_eq!(names(ListParams::default().labels("!app")).await, ["plain"]);
    assert_eq!(
        names(ListParams::default().fields("metadata.name=db-1")).await,
        ["db-1"]
    );
    assert_eq!(
        names(ListParams::default().fields("metadata.namespace=a")).await,
        ["web-1", "web-2"]
    );
    assert_eq!(
        names(ListParams::default().fields("spec.nodeName=node-1")).await,
        ["web-1", "db-1"]
    );
    assert_eq!(
        names(
            ListParams::default()
                .fields("spec.nodeName=node-2")
                .labels("app")
        )
        .await,
        ["web-2"]
    );
    let in_b: Api<Pod> = Api::namespaced(kube_api.client(), "b");
    assert_eq!(
        in_b.list(&ListParams::default().labels("app"))
            .await
            .unwrap()
            .items
            .len(),
        1
    );
}

#[tokio::test]
async fn limit_and_continue_page_through_a_consistent_snapshot() {
    let kube_api = KubeApi::start().await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(kube_api.client(), "default");
    for name in ["s1", "s2", "s3", "s4", "s5"] {
        secrets
            .create(&PostParams::default(), &secret(name))
            .await
            .unwrap();
    }
    let first = secrets.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    assert_eq!(first.metadata.remaining_item_count, Some(3));
    let token = first.metadata.continue_.clone().unwrap();

    // Changes after the first page do not show in later pages: they read the same
    // resourceVersion, as from etcd.
    secrets
        .create(&PostParams::default(), &secret("s6"))
        .await
        .unwrap();
    secrets
        .delete("s4", &DeleteParams::default())
        .await
        .unwrap();

    let second = secrets
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    let third = secrets
        .list(
            &ListParams::default()
                .limit(2)
                .continue_token(second.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    let names: Vec<_> = [&first, &second, &third]
        .iter()
        .flat_map(|page| page.items.iter().map(|s| s.metadata.name.clone().unwrap()))
        .collect();
    assert_eq!(names, ["s1", "s2", "s3", "s4", "s5"]);
    assert_eq!(third.metadata.continue_, None);
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );
    // stringData was folded into data.
    assert_eq!(first.items[0].data.as_ref().unwrap()["k"].0, b"v");

    // A continue token older than the retained history is 410 Expired.
    kube_api.compact();
    let expired = api_error(
        secrets
            .list(&ListParams::default().continue_token(&token))
            .await
            .unwrap_err(),
    );
    assert_eq!((expired.code, expired.reason.as_str()), (410, "Expired"));
}

#[tokio::test]
async fn stale_resource_versions_conflict_on_update_and_patch() {
    let kube_api = KubeApi::start().await.unwrap();
    let leases: Api<Lease> = Api::namespaced(kube_api.client(), "default");
    let lease: Lease =
        from_json(json!({"metadata": {"name": "leader"}, "spec": {"holderIdentity": "a"}}));
    let v1 = leases.create(&PostParams::default(), &lease).await.unwrap();

    let mut taken = v1.clone();
    taken.spec.as_mut().unwrap().holder_identity = Some("b".into());
    let v2 = leases
        .replace("leader", &PostParams::default(), &taken)
        .await
        .unwrap();
    assert!(rv(&v2) > rv(&v1));

    let mut stale = v1.clone();
    stale.spec.as_mut().unwrap().holder_identity = Some("c".into());
    let conflict = api_error(
        leases
            .replace("leader", &PostParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
    assert!(
        conflict.message.contains("the object has been modified"),
        "{}",
        conflict.message
    );

    let stale_patch = json!({"metadata": {"resourceVersion": v1.metadata.resource_version}, "spec": {"holderIdentity": "c"}});
    let conflict = api_error(
        leases
            .patch(
                "leader",
                &PatchParams::default(),
                &Patch::Merge(&stale_patch),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(conflict.code, 409);
    assert_eq!(
        leases
            .get("leader")
            .await
            .unwrap()
            .spec
            .unwrap()
            .holder_identity
            .as_deref(),
        Some("b")
    );

    // Without a resourceVersion, an update is unconditional.
    stale.metadata.resource_version = None;
    let v3 = leases
        .replace("leader", &PostParams::default(), &stale)
        .await
        .unwrap();
    assert_eq!(v3.spec.unwrap().holder_identity.as_deref(), Some("c"));
}

#[tokio::test]
async fn patch_types_merge_strategic_json_and_apply_is_415() {
    let kube_api = KubeApi::start().await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(kube_api.client(), "default");
    deployments
        .create(
            &PostParams::default(),
            &deployment("web", json!({"app": "web"})),
        )
        .await
        .unwrap();
    let pp = PatchParams::default();

    let merged = deployments
        .patch(
            "web",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"team": "x", "app": null}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        merged.metadata.labels.unwrap(),
        BTreeMap::from([("team".into(), "x".into())])
    );

    // Strategic merge: containers merge by name, the other container stays.
    let strategic = deployments
        .patch(
            "web",
            &pp,
            &Patch::Strategic(json!({"spec": {"template": {
                "metadata": {"annotations": {"warmroll.io/restartedAt": "now"}},
                "spec": {"containers": [{"name": "side", "image": "reg.example/side@sha256:abc"}]}
            }}})),
        )
        .await
        .unwrap();
    let template = strategic.spec.template;
    let containers = template.spec.unwrap().containers;
    assert_eq!(containers.len(), 2);
    assert_eq!(containers[0].image.as_deref(), Some("reg.example/app:main"));
    assert_eq!(
        containers[1].image.as_deref(),
        Some("reg.example/side@sha256:abc")
    );
    assert_eq!(
        template.metadata.unwrap().annotations.unwrap()["warmroll.io/restartedAt"],
        "now"
    );

    // A merge patch replaces the list instead.
    let replaced = deployments
        .patch("web", &pp, &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [{"name": "only", "image": "i"}]}}}})))
        .await
        .unwrap();
    assert_eq!(replaced.spec.template.spec.unwrap().containers.len(), 1);

    let ops: json_patch::Patch = from_json(json!([
        {"op": "test", "path": "/spec/template/spec/containers/0/name", "value": "only"},
        {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "j"}
    ]));
    let patched = deployments
        .patch("web", &pp, &Patch::Json::<()>(ops))
        .await
        .unwrap();
    assert_eq!(
        patched.spec.template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some("j")
    );

    let failing: json_patch::Patch =
        from_json(json!([{"op": "test", "path": "/metadata/name", "value": "other"}]));
    let invalid = api_error(
        deployments
            .patch("web", &pp, &Patch::Json::<()>(failing))
            .await
            .unwrap_err(),
    );
    assert_eq!(invalid.code, 422);

    let apply = api_error(
        deployments
            .patch(
                "web",
                &PatchParams::apply("warmroll"),
                &Patch::Apply(json!({"apiVersion": "apps/v1", "kind": "Deployment"})),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (apply.code, apply.reason.as_str()),
        (415, "UnsupportedMediaType")
    );

    let missing = api_error(
        deployments
            .patch("ghost", &pp, &Patch::Merge(json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!(missing.code, 404);

    // What was written is on record, with its content type.
    let types: Vec<_> = kube_api
        .writes()
        .iter()
        .filter(|r| r.method == http::Method::PATCH)
        .map(|r| r.content_type.clone().unwrap())
        .collect();
    assert_eq!(types[0], "application/merge-patch+json");
    assert_eq!(types[1], "application/strategic-merge-patch+json");
    assert_eq!(types[3], "application/json-patch+json");
    assert_eq!(types[5], "application/apply-patch+yaml");
    let strategic_write = kube_api
        .writes()
        .into_iter()
        .find(|r| r.content_type.as_deref() == Some("application/strategic-merge-patch+json"));
    assert_eq!(
        strategic_write.unwrap().json().unwrap()["spec"]["template"]["spec"]["containers"][0]["name"],
        "side"
    );
    assert!(
        kube_api
            .writes()
            .iter()
            .all(|r| r.user.as_deref() == Some(ADMIN_USER))
    );
    kube_api.reset_requests();
    assert!(kube_api.requests().is_empty());
}

#[tokio::test]
async fn generation_follows_the_api_server_rules() {
    let kube_api = KubeApi::start().await.unwrap();
    let client = kube_api.client();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let pp = PatchParams::default();
    let d = deployments
        .create(&PostParams::default(), &deployment("web", json!({})))
        .await
        .unwrap();
    assert_eq!(d.metadata.generation, Some(1));

    let labelled = deployments
        .patch(
            "web",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap();
    assert_eq!(labelled.metadata.generation, Some(1), "labels are not spec");
    // Deployments also bump on annotation changes (they are copied to ReplicaSets).
    let annotated = deployments
        .patch(
            "web",
            &pp,
            &Patch::Merge(
                json!({"metadata": {"annotations": {"warmroll.io/rolled-to": "sha256:1"}}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(annotated.metadata.generation, Some(2));
    let scaled = deployments
        .patch("web", &pp, &Patch::Merge(json!({"spec": {"replicas": 4}})))
        .await
        .unwrap();
    assert_eq!(scaled.metadata.generation, Some(3));

    // A patch that changes nothing writes nothing.
    let same = deployments
        .patch("web", &pp, &Patch::Merge(json!({"spec": {"replicas": 4}})))
        .await
        .unwrap();
    assert_eq!(
        same.metadata.resource_version,
        scaled.metadata.resource_version
    );

    // The status subresource writes only status and never bumps generation.
    let status = deployments
        .patch_status(
            "web",
            &pp,
            &Patch::Merge(json!({"status": {"observedGeneration": 3, "replicas": 4}, "spec": {"replicas": 9}})),
        )
        .await
        .unwrap();
    assert_eq!(status.metadata.generation, Some(3));
    assert_eq!(status.spec.replicas, Some(4));
    assert_eq!(status.status.as_ref().unwrap().observed_generation, Some(3));
    // ... and a main-resource update leaves status alone.
    let mut update = deployments.get("web").await.unwrap();
    update.status.as_mut().unwrap().replicas = Some(100);
    let updated = deployments
        .replace("web", &PostParams::default(), &update)
        .await
        .unwrap();
    assert_eq!(updated.status.unwrap().replicas, Some(4));

    let sets: Api<StatefulSet> = Api::namespaced(client, "default");
    sets.create(&PostParams::default(), &from_json(json!({
        "metadata": {"name": "db"}, "spec": {"serviceName": "db", "selector": {}, "template": {}}
    })))
    .await
    .unwrap();
    let annotated = sets
        .patch(
            "db",
            &pp,
            &Patch::Merge(json!({"metadata": {"annotations": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        annotated.metadata.generation,
        Some(1),
        "StatefulSets bump on spec only"
    );
    let changed = sets
        .patch("db", &pp, &Patch::Merge(json!({"spec": {"replicas": 2}})))
        .await
        .unwrap();
    assert_eq!(changed.metadata.generation, Some(2));
}

#[tokio::test]
async fn status_helpers_and_subresources_for_pods_and_nodes() {
    let kube_api = KubeApi::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(kube_api.client(), "default");
    let created = pods
        .create(
            &PostParams::default(),
            &pod("default", "p", json!({}), "n1"),
        )
        .await
        .unwrap();
    assert_eq!(
        created.status.clone().unwrap().phase.as_deref(),
        Some("Pending")
    );
    assert_eq!(created.metadata.generation, Some(1));

    let status: PodStatus = from_json(json!({"phase": "Running", "containerStatuses": [{
        "name": "app", "image": "reg.example/app:main", "imageID": "reg.example/app@sha256:aa",
        "ready": true, "restartCount": 0
    }]}));
    let running = kube_api.set_pod_status("default", "p", status).unwrap();
    assert_eq!(running.status.unwrap().phase.as_deref(), Some("Running"));
    let fetched = pods.get_status("p").await.unwrap();
    assert_eq!(
        fetched.status.clone().unwrap().container_statuses.unwrap()[0].image_id,
        "reg.example/app@sha256:aa"
    );
    assert!(rv(&fetched) > rv(&created));

    // Nodes are cluster-scoped and keep the status their kubelet creates them with.
    let nodes: Api<Node> = Api::all(kube_api.client());
    let node: Node = from_json(
        json!({"metadata": {"name": "n1", "labels": {"kubernetes.io/arch": "amd64"}},
        "status": {"nodeInfo": {"architecture": "amd64", "bootID": "", "containerRuntimeVersion": "containerd://1.6",
        "kernelVersion": "", "kubeProxyVersion": "", "kubeletVersion": "", "machineID": "", "operatingSystem": "linux",
        "osImage": "", "systemUUID": ""}}}),
    );
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let listed = nodes
        .list(&ListParams::default().labels("kubernetes.io/arch=amd64"))
        .await
        .unwrap();
    assert_eq!(
        listed.items[0]
            .status
            .as_ref()
            .unwrap()
            .node_info
            .as_ref()
            .unwrap()
            .architecture,
        "amd64"
    );
    assert_eq!(listed.items[0].metadata.namespace, None);
}

#[tokio::test]
async fn delete_answers_like_the_api_server_and_honours_finalizers() {
    let kube_api = KubeApi::start().await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(kube_api.client(), "default");
    let d = deployments
        .create(&PostParams::default(), &deployment("web", json!({})))
        .await
        .unwrap();
    let answer = deployments
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    let status = answer.right().expect("deployments answer a Status");
    assert_eq!(status.details.unwrap().uid, d.metadata.uid.unwrap());
    assert_eq!(
        api_error(
            deployments
                .delete("web", &DeleteParams::default())
                .await
                .unwrap_err()
        )
        .code,
        404
    );

    let pods: Api<Pod> = Api::namespaced(kube_api.client(), "default");
    pods.create(
        &PostParams::default(),
        &pod("default", "p", json!({}), "n1"),
    )
    .await
    .unwrap();
    let answer = pods.delete("p", &DeleteParams::default()).await.unwrap();
    assert_eq!(
        answer
            .left()
            .expect("pods answer the pod")
            .metadata
            .name
            .as_deref(),
        Some("p")
    );

    let secrets: Api<Secret> = Api::namespaced(kube_api.client(), "default");
    let mut guarded = secret("guarded");
    guarded.metadata.finalizers = Some(vec!["warmroll.io/keep".into()]);
    secrets
        .create(&PostParams::default(), &guarded)
        .await
        .unwrap();
    let pending = secrets
        .delete("guarded", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .unwrap();
    assert!(pending.metadata.deletion_timestamp.is_some());
    assert!(
        secrets.get("guarded").await.is_ok(),
        "kept until its finalizers are gone"
    );
    secrets
        .patch(
            "guarded",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    assert_eq!(
        api_error(secrets.get("guarded").await.unwrap_err()).code,
        404
    );
}

#[tokio::test]
async fn watch_from_a_resource_version_streams_changes_in_order() {
    let kube_api = KubeApi::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(kube_api.client(), "default");
    kube_api
        .insert(&pod("default", "before", json!({"app": "web"}), "n1"))
        .unwrap();
    let list = pods.list(&ListParams::default()).await.unwrap();
    let from = list.metadata.resource_version.unwrap();

    let mut stream = pods
        .watch(&WatchParams::default().labels("app=web").timeout(10), &from)
        .await
        .unwrap()
        .boxed();
    pods.create(
        &PostParams::default(),
        &pod("default", "p", json!({"app": "web"}), "n1"),
    )
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("default", "other", json!({"app": "db"}), "n1"),
    )
    .await
    .unwrap();
    pods.patch(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"a": "b"}}})),
    )
    .await
    .unwrap();
    // Leaving the selection is a DELETED event for this watch.
    pods.patch(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "gone"}}})),
    )
    .await
    .unwrap();
    let deleted = pods
        .delete("before", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .unwrap();

    let mut seen = Vec::new();
    while seen.len() < 4 {
        match stream.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(p) => seen.push(("ADDED", p.metadata.name.unwrap())),
            WatchEvent::Modified(p) => seen.push(("MODIFIED", p.metadata.name.unwrap())),
            WatchEvent::Deleted(p) => seen.push(("DELETED", p.metadata.name.unwrap())),
            WatchEvent::Bookmark(_) => {}
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        }
    }
    let expected = [
        ("ADDED", "p"),
        ("MODIFIED", "p"),
        ("DELETED", "p"),
        ("DELETED", "before"),
    ];
    assert_eq!(seen, expected.map(|(t, n)| (t, n.to_string())));
    assert!(rv(&deleted) > rv(&list.items[0]));
}

#[tokio::test]
async fn watch_from_an_expired_resource_version_gets_410_expired() {
    let kube_api = KubeApi::start_with(KubeApiOptions {
        history_limit: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let secrets: Api<Secret> = Api::namespaced(kube_api.client(), "default");
    let first = secrets
        .create(&PostParams::default(), &secret("s0"))
        .await
        .unwrap();
    // Within the history: the watch replays what came after.
    let mut ok = secrets
        .watch(&WatchParams::default(), &rv(&first).to_string())
        .await
        .unwrap()
        .boxed();
    secrets
        .create(&PostParams::default(), &secret("s1"))
        .await
        .unwrap();
    assert!(
        matches!(ok.try_next().await.unwrap(), Some(WatchEvent::Added(s)) if s.metadata.name.as_deref() == Some("s1"))
    );

    for i in 2..6 {
        secrets
            .create(&PostParams::default(), &secret(&format!("s{i}")))
            .await
            .unwrap();
    }
    let mut expired = secrets
        .watch(&WatchParams::default(), &rv(&first).to_string())
        .await
        .unwrap()
        .boxed();
    match expired.try_next().await.unwrap() {
        Some(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert!(
                status.message.starts_with("too old resource version"),
                "{}",
                status.message
            );
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        expired.try_next().await.unwrap().is_none(),
        "the stream ends after the error"
    );
}

#[tokio::test]
async fn bookmarks_carry_the_resume_point_and_watches_end_at_their_timeout() {
    let kube_api = KubeApi::start_with(KubeApiOptions {
        bookmark_interval: Duration::from_millis(200),
        ..Default::default()
    })
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(kube_api.client(), "default");
    let secrets: Api<Secret> = Api::namespaced(kube_api.client(), "default");
    let from = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let started = Instant::now();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(2), &from)
        .await
        .unwrap()
        .boxed();
    // A write to another type moves the global resourceVersion; the pods watch's next
    // bookmark lets a client resume past it.
    let elsewhere = secrets
        .create(&PostParams::default(), &secret("s"))
        .await
        .unwrap();
    loop {
        match stream.try_next().await.unwrap() {
            Some(WatchEvent::Bookmark(b))
                if b.metadata.resource_version.parse::<u64>().unwrap() >= rv(&elsewhere) =>
            {
                assert_eq!(b.types.kind, "Pod");
                break;
            }
            Some(WatchEvent::Bookmark(_)) => {}
            other => panic!("expected only bookmarks, got {other:?}"),
        }
    }
    while let Some(event) = stream.try_next().await.unwrap() {
        assert!(matches!(event, WatchEvent::Bookmark(_)), "{event:?}");
    }
    let lasted = started.elapsed();
    assert!(
        lasted >= Duration::from_secs(2) && lasted < Duration::from_secs(5),
        "{lasted:?}"
    );
}

#[tokio::test]
async fn kube_runtime_reflector_follows_adds_updates_and_deletes() {
    let kube_api = KubeApi::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(kube_api.client(), "default");
    kube_api
        .insert(&pod("default", "seeded", json!({"app": "web"}), "n1"))
        .unwrap();

    let (reader, writer) = reflector::store::<Pod>();
    let config = watcher::Config::default().labels("app=web");
    let mut applied = reflector(writer, watcher(pods.clone(), config))
        .applied_objects()
        .boxed();
    let driver = tokio::spawn(async move { while applied.next().await.is_some() {} });

    let names = || {
        let mut names: Vec<_> = reader
            .state()
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        names.sort();
        names
    };
    eventually("the initial list", || names() == ["seeded"]).await;
    pods.create(
        &PostParams::default(),
        &pod("default", "p2", json!({"app": "web"}), "n2"),
    )
    .await
    .unwrap();
    eventually("the added pod", || names() == ["p2", "seeded"]).await;
    kube_api
        .set_pod_status("default", "p2", from_json(json!({"phase": "Running"})))
        .unwrap();
    eventually("the status update", || {
        reader
            .state()
            .iter()
            .any(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
    })
    .await;
    pods.delete("seeded", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the deletion", || names() == ["p2"]).await;
    // kube-runtime's default list asks for pages of 500 from resourceVersion 0, then
    // watches with bookmarks from the list's resourceVersion.
    let watch_query = kube_api
        .requests()
        .into_iter()
        .filter_map(|r| r.query)
        .find(|q| q.contains("watch=true"))
        .unwrap();
    assert!(
        watch_query.contains("allowWatchBookmarks=true"),
        "{watch_query}"
    );
    driver.abort();
}

#[tokio::test]
async fn kube_runtime_watcher_relists_after_410_and_handles_streaming_lists() {
    let kube_api = KubeApi::start().await.unwrap();
    let pods: Api<Pod> = Api::namespaced(kube_api.client(), "default");
    let secrets: Api<Secret> = Api::namespaced(kube_api.client(), "default");
    kube_api
        .insert(&pod("default", "a", json!({}), "n1"))
        .unwrap();

    // Watches end after a second; the restart from a compacted resourceVersion gets 410
    // and the watcher starts over with a fresh list.
    let mut events = watcher(pods.clone(), watcher::Config::default().timeout(1)).boxed();
    let mut inits = 0;
    let mut saw_410 = false;
    let mut applied_b = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut wrote = false;
    while !(saw_410 && inits >= 2 && applied_b) {
        assert!(
            Instant::now() < deadline,
            "inits={inits} saw_410={saw_410} applied_b={applied_b}"
        );
        match tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .unwrap()
            .unwrap()
        {
            Ok(watcher::Event::Init) => inits += 1,
            Ok(watcher::Event::InitDone) if !wrote => {
                wrote = true;
                // Move the global resourceVersion on elsewhere, then drop the history.
                secrets
                    .create(&PostParams::default(), &secret("elsewhere"))
                    .await
                    .unwrap();
                kube_api.compact();
                kube_api
                    .insert(&pod("default", "b", json!({}), "n1"))
                    .unwrap();
                kube_api.compact();
            }
            Ok(watcher::Event::InitApply(p) | watcher::Event::Apply(p)) => {
                applied_b |= p.metadata.name.as_deref() == Some("b");
            }
            Err(watcher::Error::WatchError(status)) => {
                assert_eq!(status.code, 410);
                saw_410 = true;
            }
            Ok(_) => {}
            Err(e) => panic!("unexpected watcher error {e:?}"),
        }
    }

    // The streaming-list strategy: sendInitialEvents and the initial-events-end bookmark.
    let mut streaming = watcher(pods, watcher::Config::default().streaming_lists()).boxed();
    let mut initial = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), streaming.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            watcher::Event::InitApply(p) => initial.push(p.metadata.name.unwrap()),
            watcher::Event::InitDone => break,
            _ => {}
        }
    }
    initial.sort();
    assert_eq!(initial, ["a", "b"]);
    assert!(kube_api.requests().iter().any(|r| {
        r.query
            .as_deref()
            .is_some_and(|q| q.contains("sendInitialEvents=true"))
    }));
}

#[tokio::test]
async fn token_reviews_answer_for_registered_tokens() {
    let kube_api = KubeApi::start().await.unwrap();
    let extra = BTreeMap::from([(
        "authentication.kubernetes.io/node-name".to_string(),
        vec!["node-1".to_string()],
    )]);
    kube_api.register_token(
        "agent-token",
        "system:serviceaccount:warmroll:agent",
        vec!["system:serviceaccounts".into()],
        extra,
        vec!["warmroll-coordinator".into()],
    );
    let reviews: Api<TokenReview> = Api::all(kube_api.client());
    let review = |token: &str, audience: &str| {
        let reviews = reviews.clone();
        let body: TokenReview =
            from_json(json!({"spec": {"token": token, "audiences": [audience]}}));
        async move {
            reviews
                .create(&PostParams::default(), &body)
                .await
                .unwrap()
                .status
                .unwrap()
        }
    };

    let ok = review("agent-token", "warmroll-coordinator").await;
    assert_eq!(ok.authenticated, Some(true));
    let user = ok.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:warmroll:agent")
    );
    assert_eq!(
        user.extra.unwrap()["authentication.kubernetes.io/node-name"],
        ["node-1"]
    );
    assert_eq!(ok.audiences.unwrap(), ["warmroll-coordinator"]);

    let wrong_audience = review("agent-token", "someone-else").await;
    assert_ne!(wrong_audience.authenticated, Some(true));
    assert!(wrong_audience.error.is_some());
    let unknown = review("forged", "warmroll-coordinator").await;
    assert_ne!(unknown.authenticated, Some(true));

    let recorded = kube_api.writes().pop().unwrap();
    assert!(recorded.json().unwrap()["spec"]["token"] == "forged");
    assert!(
        !format!("{recorded:?}").contains("forged"),
        "tokens stay out of Debug output"
    );

    // TokenReview is create-only.
    assert_eq!(api_error(reviews.get("x").await.unwrap_err()).code, 405);

    // A token with the API server's audience also authenticates API calls.
    kube_api.register_token(
        "node-token",
        "system:node:n1",
        vec![],
        BTreeMap::new(),
        vec![API_AUDIENCE.into()],
    );
    let mut config = kube_api.config();
    config.auth_info.token = Some("node-token".to_string().into());
    let as_node: Api<Pod> = Api::namespaced(Client::try_from(config).unwrap(), "default");
    as_node.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        kube_api.requests().last().unwrap().user.as_deref(),
        Some("system:node:n1")
    );
}

#[tokio::test]
async fn subject_access_reviews_answer_from_non_resource_grants_and_token_requests_mint_tokens() {
    let kube_api = KubeApi::start().await.unwrap();
    kube_api.grant_non_resource_urls("readers", &["get"], &["/metrics", "/fleet/*"]);
    let reviews: Api<SubjectAccessReview> = Api::all(kube_api.client());
    let may = |user: &str, groups: &[&str], path: &str| {
        let reviews = reviews.clone();
        let body: SubjectAccessReview = from_json(json!({"spec": {
            "user": user, "groups": groups,
            "nonResourceAttributes": {"verb": "get", "path": path},
        }}));
        async move {
            reviews
                .create(&PostParams::default(), &body)
                .await
                .unwrap()
                .status
                .unwrap()
                .allowed
        }
    };
    assert!(may("prometheus", &["readers"], "/metrics").await);
    assert!(may("prometheus", &["readers"], "/fleet/nodes/a").await);
    assert!(!may("prometheus", &["readers"], "/report").await);
    assert!(!may("stranger", &[], "/metrics").await);
    assert!(may(ADMIN_USER, &["system:masters"], "/report").await);
    assert_eq!(api_error(reviews.get("x").await.unwrap_err()).code, 405);

    // TokenRequest: the account must exist; its token then authenticates as it.
    let accounts: Api<ServiceAccount> = Api::namespaced(kube_api.client(), "warmroll");
    let request: TokenRequest =
        from_json(json!({"spec": {"audiences": [], "expirationSeconds": 600}}));
    let missing = accounts
        .create_token_request("reader", &PostParams::default(), &request)
        .await
        .unwrap_err();
    assert_eq!(api_error(missing).code, 404);
    kube_api
        .insert(&from_json::<ServiceAccount>(
            json!({"metadata": {"name": "reader", "namespace": "warmroll"}}),
        ))
        .unwrap();
    let minted = accounts
        .create_token_request("reader", &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap();
    assert!(minted.expiration_timestamp.unwrap().0 > jiff::Timestamp::now());
    let review: TokenReview = from_json(json!({"spec": {"token": minted.token.unwrap()}}));
    let status = Api::<TokenReview>::all(kube_api.client())
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .unwrap();
    assert_eq!(status.authenticated, Some(true));
    let user = status.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:warmroll:reader")
    );
    assert!(
        user.groups
            .unwrap()
            .contains(&"system:serviceaccounts:warmroll".to_string())
    );
    let short: TokenRequest =
        from_json(json!({"spec": {"audiences": [], "expirationSeconds": 60}}));
    let err = accounts
        .create_token_request("reader", &PostParams::default(), &short)
        .await
        .unwrap_err();
    assert_eq!(api_error(err).code, 400);

    // A failing path answers 500 until healed.
    kube_api.fail_path("/apis/authorization.k8s.io/");
    let body: SubjectAccessReview = from_json(json!({"spec": {
        "user": "u", "nonResourceAttributes": {"verb": "get", "path": "/metrics"},
    }}));
    let err = reviews
        .create(&PostParams::default(), &body)
        .await
        .unwrap_err();
    assert_eq!(api_error(err).code, 500);
    kube_api.heal_paths();
    reviews.create(&PostParams::default(), &body).await.unwrap();
}

#[tokio::test]
async fn kube_recorder_events_land_in_the_shared_event_store() {
    let kube_api = KubeApi::start().await.unwrap();
    let recorder = Recorder::new(
        kube_api.client(),
        Reporter {
            controller: "warmroll-coordinator".into(),
            instance: None,
        },
    );
    let regarding = ObjectReference {
        api_version: Some("apps/v1".into()),
        kind: Some("Deployment".into()),
        name: Some("web".into()),
        namespace: Some("shop".into()),
        ..Default::default()
    };
    let event = RecorderEvent {
        type_: EventType::Normal,
        reason: "Rolled".into(),
        note: Some("rolled to sha256:1".into()),
        action: "Roll".into(),
        secondary: None,
    };
    recorder.publish(&event, &regarding).await.unwrap();
    // Published as events.k8s.io/v1, read back as core/v1, like the real API server.
    let core: Api<CoreEvent> = Api::namespaced(kube_api.client(), "shop");
    let listed = core
        .list(&ListParams::default().fields("involvedObject.name=web"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(
        listed.items[0].message.as_deref(),
        Some("rolled to sha256:1")
    );
    assert_eq!(
        listed.items[0].reporting_component.as_deref(),
        Some("warmroll-coordinator")
    );
    let write = kube_api.writes().pop().unwrap();
    assert_eq!(write.path, "/apis/events.k8s.io/v1/namespaces/shop/events");
}

#[tokio::test]
async fn plain_http_mode_and_the_kubeconfig_file_work_for_another_process() {
    let kube_api = KubeApi::start_with(KubeApiOptions {
        tls: false,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(kube_api.url().starts_with("http://127.0.0.1:"));
    assert!(kube_api.ca_pem().is_none());
    // What a separate process does with KUBECONFIG=<path>.
    let kubeconfig = Kubeconfig::read_from(kube_api.kubeconfig_path()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).unwrap();
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
    let secrets: Api<Secret> = Api::default_namespaced(client);
    secrets
        .create(&PostParams::default(), &secret("s"))
        .await
        .unwrap();
    assert!(kube_api.get::<Secret>("default", "s").unwrap().is_some());

    let https = KubeApi::start().await.unwrap();
    let text = std::fs::read_to_string(https.kubeconfig_path()).unwrap();
    assert!(text.contains("certificate-authority-data"));
    assert!(https.ca_pem().unwrap().contains("BEGIN CERTIFICATE"));
}
