//! `report --once` against the sandbox cluster (real containerd nodes whose kubelets
//! write the pods' `imageID`) and the real registry: drift after a new build under the
//! tag, multi-arch in sync, pinned, targets and namespace scope, one bad reference and
//! one unreachable registry hurting nothing else, and not one API write.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use serde_json::json;
use warmroll_coordinator::config::Config;
use warmroll_coordinator::drift::State;
use warmroll_coordinator::engine::{report_once, resolver_for};
use warmroll_coordinator::fleet::auth::service_account_user;
use warmroll_tests::cluster::{Cluster, ClusterOptions};
use warmroll_tests::image::ImageBuilder;
use warmroll_tests::kubeapi::KubeApi;
use warmroll_tests::registry::{Registry, RegistryOptions};

fn deployment(ns: &str, name: &str, policy: Option<&str>, image: &str) -> Deployment {
    let mut labels = json!({"app": name});
    if let Some(p) = policy {
        labels["warmroll.io/policy"] = json!(p);
    }
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "main", "image": image, "imagePullPolicy": "Always"}]}
            }
        }
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn report_once_sees_drift_pinned_multi_arch_scope_and_errors_without_writing() {
    warmroll_tests::tls::install_crypto_provider();
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let images = ImageBuilder::new(&registry).unwrap();
    let first = images.push("app", "latest").await.unwrap();
    let multi = images.push_index("multi", "multi").await.unwrap();
    let cluster = Cluster::start(ClusterOptions::nodes(1), &registry)
        .await
        .unwrap();
    let host = registry.host();

    let config = Config::parse(
        &format!(
            r#"
registry:
  insecureRegistries: ["{host}", "127.0.0.1:1"]
policies:
  watch:
    mode: report
    namespaces: [shop]
    targets: [shop/Deployment/unlabelled]
"#
        ),
        "test",
    )
    .unwrap();
    let api = cluster.api();
    for d in [
        deployment("shop", "web", Some("watch"), &first.reference),
        deployment("shop", "multi", Some("watch"), &multi.reference),
        deployment("shop", "pinned", Some("watch"), &first.pinned()),
        deployment("shop", "unlabelled", None, &first.reference),
        deployment("shop", "broken", Some("watch"), &format!("{host}/Bad::ref")),
        deployment("shop", "down", Some("watch"), "127.0.0.1:1/gone:latest"),
        deployment("elsewhere", "web", Some("watch"), &first.reference),
        deployment("shop", "other-policy", Some("nope"), &first.reference),
    ] {
        api.insert(&d).unwrap();
    }
    for name in ["web", "multi", "pinned", "unlabelled"] {
        cluster
            .wait_rolled_out::<Deployment>("shop", name, Duration::from_secs(60))
            .await
            .unwrap();
    }

    let (resolver, _) = resolver_for(&config).unwrap();
    let writes_before = cluster.foreign_writes().len();
    let report = report_once(&cluster.client(), &config, &resolver)
        .await
        .unwrap();
    let names: Vec<&str> = report.workloads.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(
        names,
        ["broken", "down", "multi", "pinned", "unlabelled", "web"],
        "namespace scope, the explicit target, and the unknown policy value: {report:#?}"
    );
    assert_eq!(report.state_of("shop", "web", "main"), Some(&State::InSync));
    assert_eq!(
        report.state_of("shop", "multi", "main"),
        Some(&State::InSync),
        "a pod on the amd64 child of the index is in sync"
    );
    assert_eq!(
        report.state_of("shop", "pinned", "main"),
        Some(&State::Pinned)
    );
    assert_eq!(
        report.state_of("shop", "unlabelled", "main"),
        Some(&State::InSync)
    );
    match report.state_of("shop", "broken", "main") {
        Some(State::Error(reason)) => assert!(reason.contains("bad image reference"), "{reason}"),
        other => panic!("broken: {other:?}"),
    }
    match report.state_of("shop", "down", "main") {
        Some(State::Error(reason)) => assert!(reason.contains("127.0.0.1:1"), "{reason}"),
        other => panic!("down: {other:?}"),
    }
    let web = report.workloads.iter().find(|w| w.name == "web").unwrap();
    let running = &web.containers[0].running;
    assert_eq!(running.len(), 1);
    assert_eq!(
        running[0].digest.as_ref().unwrap().to_string(),
        first.manifest_digest
    );
    assert_eq!((running[0].pods, running[0].nodes), (1, 1));

    // A new build under the tag: drift for both workloads on it, nothing else moves.
    let second = images.push("app", "latest").await.unwrap();
    // `report --once` is one process per report: a fresh resolver (no cached answer).
    let (resolver, _) = resolver_for(&config).unwrap();
    let report = report_once(&cluster.client(), &config, &resolver)
        .await
        .unwrap();
    assert_eq!(report.state_of("shop", "web", "main"), Some(&State::Drift));
    assert_eq!(
        report.state_of("shop", "unlabelled", "main"),
        Some(&State::Drift)
    );
    let web = report.workloads.iter().find(|w| w.name == "web").unwrap();
    assert_eq!(
        web.containers[0]
            .registry_digest
            .as_ref()
            .unwrap()
            .to_string(),
        second.manifest_digest
    );
    assert_eq!(
        report.state_of("shop", "multi", "main"),
        Some(&State::InSync)
    );
    assert_eq!(
        report.state_of("shop", "pinned", "main"),
        Some(&State::Pinned)
    );
    assert_eq!(report.count("error"), 2);
    assert_eq!(report.count("drift"), 2);
    let table = report.table();
    assert!(table.contains("6 workloads, 6 containers"), "{table}");

    assert_eq!(
        cluster.foreign_writes().len(),
        writes_before,
        "report --once writes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_secrets_of_the_workload_resolve_its_private_tags() {
    use base64::Engine as _;
    use k8s_openapi::api::core::v1::Secret;
    use warmroll_tests::kubeapi::KubeApi;

    warmroll_tests::tls::install_crypto_provider();
    let registry = Registry::start(RegistryOptions::plain().basic("puller", "s3cret"))
        .await
        .unwrap();
    let builder = ImageBuilder::new(&registry).unwrap();
    let pushed = builder.push("private", "latest").await.unwrap();
    let other = builder.push("other", "latest").await.unwrap();
    let third = builder.push("third", "latest").await.unwrap();
    let fourth = builder.push("fourth", "latest").await.unwrap();
    let api = KubeApi::start().await.unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode("puller:s3cret");
    let dockerconfig = json!({"auths": {registry.host(): {"auth": auth}}}).to_string();
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"namespace": "shop", "name": "regcred"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(dockerconfig)}
    }))
    .unwrap();
    api.insert(&secret).unwrap();
    // A ServiceAccount's imagePullSecrets reach its pods through admission, not the
    // template: the coordinator reads them from the account.
    let account: k8s_openapi::api::core::v1::ServiceAccount = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"namespace": "shop", "name": "builder"},
        "imagePullSecrets": [{"name": "regcred"}],
    }))
    .unwrap();
    api.insert(&account).unwrap();
    // One tag is resolved once for every workload on it: each private repository here
    // has one workload.
    for (name, secrets, image) in [
        ("with-secret", vec!["regcred"], &pushed),
        ("without", vec![], &other),
        ("missing-secret", vec!["ghost"], &third),
        ("via-account", vec![], &fourth),
    ] {
        let mut d = deployment("shop", name, Some("watch"), &image.reference);
        let spec = d.spec.template.spec.as_mut().unwrap();
        if name == "via-account" {
            spec.service_account_name = Some("builder".into());
        }
        spec.image_pull_secrets = Some(
            secrets
                .iter()
                .map(|s| k8s_openapi::api::core::v1::LocalObjectReference { name: (*s).into() })
                .collect(),
        );
        api.insert(&d).unwrap();
    }
    let config = Config::parse(
        &format!(
            "registry:\n  insecureRegistries: [\"{}\"]\npolicies:\n  watch:\n    mode: report\n",
            registry.host()
        ),
        "test",
    )
    .unwrap();
    let (resolver, _) = resolver_for(&config).unwrap();
    let report = report_once(&api.client(), &config, &resolver)
        .await
        .unwrap();
    let with = report
        .workloads
        .iter()
        .find(|w| w.name == "with-secret")
        .unwrap();
    assert_eq!(
        with.containers[0]
            .registry_digest
            .as_ref()
            .map(ToString::to_string),
        Some(pushed.manifest_digest.clone()),
        "{report:#?}"
    );
    for name in ["with-secret", "via-account"] {
        assert_eq!(
            report.state_of("shop", name, "main"),
            Some(&State::InSync),
            "{name}"
        );
    }
    for name in ["without", "missing-secret"] {
        match report.state_of("shop", name, "main") {
            Some(State::Error(reason)) => assert!(reason.contains("auth"), "{name}: {reason}"),
            other => panic!("{name}: {other:?}"),
        }
    }
    assert!(
        api.writes().is_empty(),
        "report --once writes nothing: {:?}",
        api.writes()
    );
}

/// With Roles only (the stand-in answers the coordinator's cluster-wide Deployment
/// lists with the real API server's 403), `report --once` over the configured
/// `namespaces` lists each of them and works; without them its error names the
/// cluster-wide list and the 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_once_lists_each_configured_namespace_when_cluster_lists_are_forbidden() {
    warmroll_tests::tls::install_crypto_provider();
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let first = ImageBuilder::new(&registry)
        .unwrap()
        .push("app", "latest")
        .await
        .unwrap();
    let api = KubeApi::start().await.unwrap();
    for d in [
        deployment("shop", "web", Some("watch"), &first.reference),
        deployment("blog", "web", Some("watch"), &first.reference),
        deployment("elsewhere", "web", Some("watch"), &first.reference),
    ] {
        api.insert(&d).unwrap();
    }
    let coordinator = service_account_user("warmroll", "warmroll-coordinator");
    api.forbid_cluster_scope(&coordinator, "apps", "deployments");
    let client = api.client_as(&coordinator, &[]).unwrap();
    let host = registry.host();
    let config = |namespaces: &str| {
        Config::parse(
            &format!(
                "{namespaces}registry:\n  insecureRegistries: [\"{host}\"]\npolicies:\n  watch:\n    mode: report\n    kinds: [Deployment]\n"
            ),
            "test",
        )
        .unwrap()
    };
    let scoped = config("namespaces: [shop, blog]\n");
    let (resolver, _) = resolver_for(&scoped).unwrap();
    let report = report_once(&client, &scoped, &resolver).await.unwrap();
    let mut seen: Vec<&str> = report
        .workloads
        .iter()
        .map(|w| w.namespace.as_str())
        .collect();
    seen.sort();
    assert_eq!(seen, ["blog", "shop"]);

    let everywhere = config("");
    let error = report_once(&client, &everywhere, &resolver)
        .await
        .unwrap_err();
    let text = format!("{error}");
    assert!(
        text.contains("Deployments labelled warmroll.io/policy in all namespaces"),
        "{text}"
    );
    assert!(text.contains("at the cluster scope"), "{text}");
}

/// krar's `KRAR_REGISTRY_CREDS=user:pass` as a configured credential, kept in the
/// environment (`${ENV}` in the file): the private tag resolves, and the configured
/// credentials reach the resolver without a pull secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_credentials_from_the_environment_resolve_private_tags() {
    warmroll_tests::tls::install_crypto_provider();
    let registry = Registry::start(RegistryOptions::plain().basic("puller", "s3cret"))
        .await
        .unwrap();
    let pushed = ImageBuilder::new(&registry)
        .unwrap()
        .push("private", "latest")
        .await
        .unwrap();
    let api = KubeApi::start().await.unwrap();
    api.insert(&deployment("shop", "web", Some("watch"), &pushed.reference))
        .unwrap();
    let host = registry.host();
    let text = format!(
        "registry:\n  insecureRegistries: [\"{host}\"]\n  credentials:\n    - registry: \"{host}\"\n      userPass: \"${{KRAR_REGISTRY_CREDS}}\"\npolicies:\n  watch:\n    mode: report\n"
    );
    let env = |name: &str| (name == "KRAR_REGISTRY_CREDS").then(|| "puller:s3cret".to_owned());
    let expanded = warmroll_coordinator::config::expand_env(&text, "test", env).unwrap();
    let config = Config::parse(&expanded, "test").unwrap();
    let (resolver, _) = resolver_for(&config).unwrap();
    let report = report_once(&api.client(), &config, &resolver)
        .await
        .unwrap();
    assert_eq!(
        report.state_of("shop", "web", "main"),
        Some(&State::InSync),
        "{report:#?}"
    );
}
