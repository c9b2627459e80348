//! The Helm chart (`charts/warmroll`), rendered by the real `helm` binary with the default
//! values and with every option set in `charts/warmroll/ci/*.yaml`:
//! - `helm lint --strict` and `helm template` pass;
//! - every rendered object parses into its `k8s-openapi` type, field for field (a typo or
//!   a misplaced key fails the round trip);
//! - the security settings the chart promises, and RBAC without wildcards or Secret writes;
//! - the rendered arguments and environment are accepted by the binaries' own clap
//!   definitions, and the rendered ConfigMap is a valid coordinator configuration.
//!
//! `scripts/test` installs Helm; without it these tests fail, naming what is missing.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{CommandFactory, Parser};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde_json::Value;

const RELEASE: &str = "wr";
const NAMESPACE: &str = "warmroll-system";

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/warmroll")
}

/// `WARMROLL_HELM`, else `helm` on PATH.
fn helm() -> Command {
    let bin = std::env::var_os("WARMROLL_HELM").unwrap_or_else(|| "helm".into());
    let probe = Command::new(&bin).arg("version").arg("--short").output();
    match probe {
        Ok(out) if out.status.success() => Command::new(bin),
        _ => panic!(
            "helm is not installed (looked for {bin:?}); scripts/test installs it \
             (scripts/deps.sh ensure_helm), or set WARMROLL_HELM"
        ),
    }
}

/// The default values (None) and every documented option set.
fn value_sets() -> Vec<Option<PathBuf>> {
    let mut sets: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))
        .expect("charts/warmroll/ci")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    sets.sort();
    assert!(
        sets.len() >= 5,
        "expected the option sets in charts/warmroll/ci"
    );
    std::iter::once(None)
        .chain(sets.into_iter().map(Some))
        .collect()
}

fn name(values: &Option<PathBuf>) -> String {
    values
        .as_ref()
        .map_or("defaults".to_owned(), |p| p.display().to_string())
}

fn template_with(values: &Option<PathBuf>, set: &[&str]) -> Result<String, String> {
    template_as(RELEASE, NAMESPACE, values, set)
}

/// `helm template` of release `release` in `namespace`.
fn template_as(
    release: &str,
    namespace: &str,
    values: &Option<PathBuf>,
    set: &[&str],
) -> Result<String, String> {
    let mut cmd = helm();
    cmd.args(["template", release])
        .arg(chart_dir())
        .args(["--namespace", namespace]);
    if let Some(v) = values {
        cmd.arg("--values").arg(v);
    }
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("run helm template");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The rendered objects, by kind and name.
struct Rendered {
    objects: Vec<Value>,
}

impl Rendered {
    fn of(values: &Option<PathBuf>) -> Rendered {
        let text = template_with(values, &[])
            .unwrap_or_else(|e| panic!("helm template ({}): {e}", name(values)));
        Rendered::parse(&text, &name(values))
    }

    /// The default values with `set`.
    fn with(set: &[&str]) -> Rendered {
        let text = template_with(&None, set)
            .unwrap_or_else(|e| panic!("helm template --set {set:?}: {e}"));
        Rendered::parse(&text, &format!("--set {set:?}"))
    }

    fn parse(text: &str, what: &str) -> Rendered {
        let docs: Vec<Option<Value>> = serde_saphyr::from_multiple(text)
            .unwrap_or_else(|e| panic!("rendered YAML ({what}): {e}"));
        Rendered {
            objects: docs.into_iter().flatten().collect(),
        }
    }

    fn named(&self, kind: &str, name: &str) -> Option<&Value> {
        self.all(kind)
            .into_iter()
            .find(|o| o["metadata"]["name"] == name)
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn typed<T: DeserializeOwned>(&self, kind: &str) -> Vec<T> {
        self.all(kind)
            .into_iter()
            .map(|o| serde_json::from_value(o.clone()).unwrap())
            .collect()
    }

    fn one<T: DeserializeOwned>(&self, kind: &str) -> T {
        let mut all = self.typed::<T>(kind);
        assert_eq!(all.len(), 1, "exactly one {kind}");
        all.remove(0)
    }
}

/// Deserialises into `T` and back; the result must equal what was rendered, so a key
/// the type does not know (a typo, a misplaced field) fails.
fn round_trip<T: DeserializeOwned + serde::Serialize>(object: &Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(object.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if &back == object {
        Ok(())
    } else {
        Err(format!(
            "round trip changed the object:\nrendered: {object:#}\ntyped:    {back:#}"
        ))
    }
}

#[test]
fn lint_passes_with_every_value_set() {
    for values in value_sets() {
        let mut cmd = helm();
        cmd.args(["lint", "--strict", "--namespace", NAMESPACE])
            .arg(chart_dir());
        if let Some(v) = &values {
            cmd.arg("--values").arg(v);
        }
        let out = cmd.output().expect("run helm lint");
        assert!(
            out.status.success(),
            "helm lint ({}): {}{}",
            name(&values),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_rendered_object_parses_into_its_type() {
    for values in value_sets() {
        let rendered = Rendered::of(&values);
        assert!(!rendered.objects.is_empty());
        for object in &rendered.objects {
            let api_version = object["apiVersion"].as_str().unwrap_or_default();
            let kind = object["kind"].as_str().unwrap_or_default();
            let checked = match (api_version, kind) {
                ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(object),
                ("apps/v1", "Deployment") => round_trip::<Deployment>(object),
                ("v1", "Service") => round_trip::<Service>(object),
                ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(object),
                ("v1", "ConfigMap") => round_trip::<ConfigMap>(object),
                ("v1", "Secret") => round_trip::<Secret>(object),
                ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(object),
                ("networking.k8s.io/v1", "NetworkPolicy") => round_trip::<NetworkPolicy>(object),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    round_trip::<ClusterRole>(object)
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    round_trip::<ClusterRoleBinding>(object)
                }
                ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(object),
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                    round_trip::<RoleBinding>(object)
                }
                // CRDs k8s-openapi has no type for: the fields the chart relies on.
                ("cert-manager.io/v1", "Certificate") => {
                    assert!(object["spec"]["secretName"].is_string());
                    assert!(object["spec"]["issuerRef"]["name"].is_string());
                    Ok(())
                }
                ("monitoring.coreos.com/v1", "ServiceMonitor") => {
                    assert_eq!(object["spec"]["endpoints"][0]["path"], "/metrics");
                    assert_eq!(object["spec"]["endpoints"][0]["scheme"], "http");
                    Ok(())
                }
                other => Err(format!("unexpected object {other:?}")),
            };
            if let Err(e) = checked {
                panic!("{} ({}): {e}", kind, name(&values));
            }
        }
    }
}

fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    pod.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("container {name}"))
}

fn assert_locked_down(c: &Container, what: &str) {
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(
        sc.read_only_root_filesystem,
        Some(true),
        "{what}: read-only root"
    );
    assert_eq!(
        sc.allow_privilege_escalation,
        Some(false),
        "{what}: no escalation"
    );
    assert_eq!(sc.privileged, Some(false), "{what}: not privileged");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(
        caps.drop.as_deref(),
        Some(&["ALL".to_owned()][..]),
        "{what}: drops ALL"
    );
    assert!(caps.add.is_none(), "{what}: adds no capability");
    let resources = c.resources.as_ref().expect("resources");
    assert!(
        resources.requests.is_some() && resources.limits.is_some(),
        "{what}: requests and limits"
    );
}

#[test]
fn agent_daemonset_is_locked_down_and_reaches_the_runtime() {
    for values in value_sets() {
        let rendered = Rendered::of(&values);
        let ds: DaemonSet = rendered.one("DaemonSet");
        let pod = ds.spec.template.spec.unwrap();
        let agent = container(&pod, "agent");
        assert_locked_down(agent, "agent");

        // The CRI socket, by hostPath of type Socket, at the path the agent is told.
        let socket = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "cri-socket")
            .and_then(|v| v.host_path.clone())
            .expect("cri-socket hostPath");
        assert_eq!(socket.type_.as_deref(), Some("Socket"));
        assert!(
            agent
                .args
                .iter()
                .flatten()
                .any(|a| *a == format!("--cri-socket={}", socket.path)),
            "agent is given the socket path"
        );
        // No other host path than the socket and the read-only image filesystem.
        for v in pod.volumes.iter().flatten() {
            if let Some(hp) = &v.host_path {
                let mount = agent
                    .volume_mounts
                    .iter()
                    .flatten()
                    .find(|m| m.name == v.name)
                    .expect("mounted");
                assert!(
                    v.name == "cri-socket" || mount.read_only == Some(true),
                    "host path {} is read-only",
                    hp.path
                );
            }
        }

        // NODE_NAME from the downward API.
        let node = agent
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "NODE_NAME")
            .expect("NODE_NAME");
        let field = node.value_from.as_ref().and_then(|f| f.field_ref.as_ref());
        assert_eq!(field.map(|f| f.field_path.as_str()), Some("spec.nodeName"));

        // A projected token for the warmroll audience, and no API token.
        assert_eq!(pod.automount_service_account_token, Some(false));
        let token = pod
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| v.projected.as_ref())
            .flat_map(|p| p.sources.iter().flatten())
            .find_map(|s| s.service_account_token.as_ref())
            .expect("projected token");
        assert_eq!(token.audience.as_deref(), Some("warmroll"));

        assert!(pod.priority_class_name.is_some(), "priorityClassName");
        if values.is_none() {
            let tolerations = pod.tolerations.unwrap_or_default();
            assert!(
                tolerations
                    .iter()
                    .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
                "tolerates every taint by default"
            );
        }
    }
}

#[test]
fn coordinator_is_non_root_replicated_and_guarded() {
    for values in value_sets() {
        let rendered = Rendered::of(&values);
        let deploy: Deployment = rendered.one("Deployment");
        let spec = deploy.spec;
        // Only the leader is Ready: a rolling update could never finish (shown on the
        // real cluster, where helm upgrade restarts the coordinators).
        assert_eq!(
            spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
            Some("Recreate"),
            "{}",
            name(&values)
        );
        let pod = spec.template.spec.clone().unwrap();
        let psc = pod.security_context.as_ref().expect("pod securityContext");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_ne!(psc.run_as_user, Some(0));
        assert_locked_down(container(&pod, "coordinator"), "coordinator");

        let service: Service = rendered.one("Service");
        let ports: Vec<String> = service
            .spec
            .unwrap()
            .ports
            .unwrap()
            .into_iter()
            .filter_map(|p| p.name)
            .collect();
        assert_eq!(ports, ["grpc", "http"]);

        if values.is_none() {
            assert_eq!(spec.replicas, Some(2), "two replicas by default");
            let pdb: PodDisruptionBudget = rendered.one("PodDisruptionBudget");
            assert!(pdb.spec.unwrap().max_unavailable.is_some());
        }
    }
}

fn rules(rendered: &Rendered) -> Vec<(String, PolicyRule)> {
    let mut all = Vec::new();
    for role in rendered.typed::<ClusterRole>("ClusterRole") {
        let name = format!("ClusterRole {}", role.metadata.name.unwrap());
        all.extend(role.rules.into_iter().flatten().map(|r| (name.clone(), r)));
    }
    for role in rendered.typed::<Role>("Role") {
        let name = format!("Role {}", role.metadata.name.unwrap());
        all.extend(role.rules.into_iter().flatten().map(|r| (name.clone(), r)));
    }
    all
}

#[test]
fn rbac_has_no_wildcards_and_never_writes_secrets() {
    for values in value_sets() {
        let rendered = Rendered::of(&values);
        let all = rules(&rendered);
        // ci/own-rbac-values.yaml brings its own (rbac.create=false): nothing to check.
        if name(&values).contains("own-rbac") {
            assert!(all.is_empty(), "rbac.create=false renders no rules");
            continue;
        }
        assert!(!all.is_empty());
        for (role, rule) in &all {
            let fields = [
                &rule.verbs,
                rule.resources.as_ref().unwrap_or(&Vec::new()),
                rule.api_groups.as_ref().unwrap_or(&Vec::new()),
            ]
            .map(|v| v.iter().any(|s| s.contains('*')));
            assert!(!fields.contains(&true), "{role}: wildcard in {rule:?}");
            // The one path pattern: the reader's /fleet/* (one node's summary).
            for url in rule.non_resource_urls.iter().flatten() {
                assert!(
                    !url.contains('*') || url == "/fleet/*",
                    "{role}: wildcard URL in {rule:?}"
                );
            }
            let resources = rule.resources.clone().unwrap_or_default();
            if resources.iter().any(|r| r == "secrets") {
                assert!(
                    rule.verbs
                        .iter()
                        .all(|v| ["get", "list", "watch"].contains(&v.as_str())),
                    "{role}: write access to secrets: {rule:?}"
                );
            }
        }
        let grants = |resource: &str, verb: &str| {
            all.iter().any(|(_, r)| {
                r.resources.iter().flatten().any(|x| x == resource)
                    && r.verbs.iter().any(|v| v == verb)
            })
        };
        assert!(grants("tokenreviews", "create"));
        // SubjectAccessReviews for the HTTP port's token check, only while it is on.
        assert_eq!(
            grants("subjectaccessreviews", "create"),
            !name(&values).contains("open-http"),
            "{}",
            name(&values)
        );
        assert!(grants("nodes", "watch"));
        assert!(grants("leases", "update"));
        assert!(grants("deployments", "patch"));
        assert!(grants("daemonsets", "watch"));
        assert!(!grants("pods", "watch"), "no Pod watch");
        // Secrets are readable only when asked for.
        let reads_secrets = grants("secrets", "get");
        let asked = values.as_ref().is_some_and(|v| {
            std::fs::read_to_string(v)
                .unwrap()
                .contains("readSecrets: true")
        });
        assert_eq!(reads_secrets, asked, "secret access ({})", name(&values));

        // The Lease is only in the release namespace.
        for role in rendered.typed::<Role>("Role") {
            if role
                .rules
                .iter()
                .flatten()
                .any(|r| r.resources.iter().flatten().any(|x| x == "leases"))
            {
                assert_eq!(role.metadata.namespace.as_deref(), Some(NAMESPACE));
            }
        }
    }
}

#[test]
fn namespaced_rbac_makes_one_role_per_namespace() {
    let set = Some(chart_dir().join("ci/namespaced-rbac-values.yaml"));
    let rendered = Rendered::of(&set);
    // Cluster-wide: only token and access reviews, reading Nodes (schedulable warm
    // targets) and the reader's non-resource URLs.
    assert!(rendered.all("ClusterRole").iter().all(|r| {
        r["rules"].as_array().unwrap().iter().all(|rule| {
            rule["resources"] == serde_json::json!(["tokenreviews"])
                || rule["resources"] == serde_json::json!(["subjectaccessreviews"])
                || (rule["resources"] == serde_json::json!(["nodes"])
                    && rule["verbs"] == serde_json::json!(["list", "watch"]))
                || (rule["nonResourceURLs"].is_array()
                    && rule["verbs"] == serde_json::json!(["get"]))
        })
    }));
    let namespaces: Vec<String> = rendered
        .typed::<Role>("Role")
        .into_iter()
        .filter(|r| {
            r.rules
                .iter()
                .flatten()
                .any(|x| x.resources.iter().flatten().any(|y| y == "deployments"))
        })
        .filter_map(|r| r.metadata.namespace)
        .collect();
    assert_eq!(namespaces, ["shop", "payments"]);
    // The coordinator watches those namespaces only: cluster-wide lists are forbidden.
    let watched = |rendered: &Rendered| {
        let cm: ConfigMap = rendered.one("ConfigMap");
        let data = cm.data.unwrap();
        warmroll_coordinator::config::Config::parse(&data["config.yaml"], "rendered ConfigMap")
            .unwrap()
            .namespaces
    };
    assert_eq!(watched(&rendered), ["payments", "shop"]);
    assert!(
        watched(&Rendered::of(&None)).is_empty(),
        "cluster scope watches all"
    );
}

/// A rendered env var's value (downward API fields get a plausible value).
fn env_value(e: &k8s_openapi::api::core::v1::EnvVar) -> String {
    if let Some(v) = &e.value {
        return v.clone();
    }
    let field = e
        .value_from
        .as_ref()
        .and_then(|f| f.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    match field {
        Some("spec.nodeName") => "node-1".into(),
        Some("metadata.name") => "wr-warmroll-coordinator-7d9f-abcde".into(),
        Some("metadata.namespace") => NAMESPACE.into(),
        other => panic!("{}: unexpected valueFrom {other:?}", e.name),
    }
}

/// The container's args, plus its environment turned into the flags that read it (every
/// rendered variable must be one the CLI reads).
fn command_line(cmd: &clap::Command, program: &str, c: &Container) -> Vec<String> {
    let args: Vec<String> = c.args.clone().unwrap_or_default();
    let subcommand = args.first().cloned().unwrap_or_default();
    let sub = cmd
        .find_subcommand(&subcommand)
        .unwrap_or_else(|| panic!("{program}: no subcommand {subcommand:?}"));
    let mut line = vec![program.to_owned()];
    line.extend(args.iter().cloned());
    for e in c.env.iter().flatten() {
        let flag = cmd
            .get_arguments()
            .chain(sub.get_arguments())
            .find(|a| a.get_env().is_some_and(|n| n == e.name.as_str()))
            .unwrap_or_else(|| panic!("{program} {subcommand}: no flag reads env {}", e.name));
        let long = flag.get_long().expect("long flag");
        let already = args.iter().any(|a| a.starts_with(&format!("--{long}=")));
        if !already {
            line.push(format!("--{long}={}", env_value(e)));
        }
    }
    line
}

#[test]
fn rendered_command_lines_are_accepted_by_the_binaries() {
    for values in value_sets() {
        let rendered = Rendered::of(&values);
        let deploy: Deployment = rendered.one("Deployment");
        let pod = deploy.spec.template.spec.unwrap();
        let line = command_line(
            &warmroll_coordinator::cli::Cli::command(),
            "warmroll-coordinator",
            container(&pod, "coordinator"),
        );
        if let Err(e) = warmroll_coordinator::cli::Cli::try_parse_from(&line) {
            panic!("coordinator rejects {line:?} ({}): {e}", name(&values));
        }

        let ds: DaemonSet = rendered.one("DaemonSet");
        let pod = ds.spec.template.spec.unwrap();
        let line = command_line(
            &warmroll_agent::cli::Cli::command(),
            "warmroll-agent",
            container(&pod, "agent"),
        );
        if let Err(e) = warmroll_agent::cli::Cli::try_parse_from(&line) {
            panic!("agent rejects {line:?} ({}): {e}", name(&values));
        }
    }
}

#[test]
fn rendered_configmap_is_a_valid_coordinator_configuration() {
    for values in value_sets() {
        let rendered = Rendered::of(&values);
        let cm: ConfigMap = rendered.one("ConfigMap");
        let data: BTreeMap<String, String> = cm.data.unwrap();
        let text = data.get("config.yaml").expect("config.yaml");
        if let Err(e) = warmroll_coordinator::config::Config::parse(text, "rendered ConfigMap") {
            panic!("{}: {e}\n{text}", name(&values));
        }
    }
}

#[test]
fn tls_comes_from_the_chosen_source() {
    // generate: a Secret with a certificate, its key and the CA agents trust.
    let rendered = Rendered::of(&None);
    let secret: Secret = rendered.one("Secret");
    let data = secret.data.unwrap();
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        let pem = String::from_utf8(data.get(key).expect(key).0.clone()).unwrap();
        assert!(pem.starts_with("-----BEGIN "), "{key} is PEM");
    }

    // secret: nothing generated; both programs mount the user's Secret.
    let rendered = Rendered::of(&Some(chart_dir().join("ci/tls-secret-values.yaml")));
    assert!(rendered.all("Secret").is_empty());
    let text = serde_json::to_string(&rendered.objects).unwrap();
    assert_eq!(
        text.matches("\"secretName\":\"my-warmroll-tls\"").count(),
        2
    );

    // certManager: a Certificate for the Service's names.
    let rendered = Rendered::of(&Some(chart_dir().join("ci/cert-manager-values.yaml")));
    let cert = rendered.all("Certificate");
    assert_eq!(cert.len(), 1);
    let names = cert[0]["spec"]["dnsNames"].as_array().unwrap();
    assert!(names.contains(&Value::from(format!(
        "{RELEASE}-warmroll-coordinator.{NAMESPACE}.svc"
    ))));
}

#[test]
fn bad_values_fail_with_a_message_naming_them() {
    let err = template_with(&None, &["rbac.scope=namespaced"]).unwrap_err();
    assert!(err.contains("rbac.namespaces"), "{err}");
    let err = template_with(&None, &["tls.mode=secret"]).unwrap_err();
    assert!(err.contains("tls.secretName"), "{err}");
    let err = template_with(&None, &["tls.mode=acme"]).unwrap_err();
    assert!(err.contains("tls.mode"), "{err}");
}

#[test]
fn own_rbac_credentials_keys_ca_secrets_and_extra_volumes() {
    let set = Some(chart_dir().join("ci/own-rbac-values.yaml"));
    let rendered = Rendered::of(&set);
    for kind in ["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"] {
        assert!(
            rendered.all(kind).is_empty(),
            "rbac.create=false renders no {kind}"
        );
    }
    assert_eq!(
        rendered.all("ServiceAccount").len(),
        3,
        "the ServiceAccounts stay (agent, coordinator, reader)"
    );

    let deploy: Deployment = rendered.one("Deployment");
    let pod = deploy.spec.template.spec.unwrap();
    let volume = |name: &str| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("volume {name}"))
            .clone()
    };
    let docker = volume("docker-config").secret.unwrap();
    assert_eq!(docker.items.unwrap()[0].key, "config.json");
    assert_eq!(
        volume("registry-ca-secret")
            .secret
            .unwrap()
            .secret_name
            .as_deref(),
        Some("registry-cas")
    );
    assert!(volume("extra-credentials").secret.is_some());
    let mounts = container(&pod, "coordinator")
        .volume_mounts
        .clone()
        .unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m.name == "extra-credentials" && m.mount_path == "/etc/extra-credentials")
    );

    let cm: ConfigMap = rendered.one("ConfigMap");
    let data = cm.data.unwrap();
    let config =
        warmroll_coordinator::config::Config::parse(&data["config.yaml"], "rendered ConfigMap")
            .unwrap();
    assert_eq!(
        config.registry.ca_files,
        [PathBuf::from("/etc/warmroll/registry-ca-secret/ca.crt")]
    );

    let ds: DaemonSet = rendered.one("DaemonSet");
    let agent = ds.spec.template.spec.unwrap();
    assert!(
        agent
            .volumes
            .iter()
            .flatten()
            .any(|v| v.name == "node-certs")
    );
    assert!(
        container(&agent, "agent")
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "node-certs")
    );
}

#[test]
fn registries_by_hostname_pattern_mount_their_secrets_and_cas() {
    let set = Some(chart_dir().join("ci/kube-autorollout-values.yaml"));
    let rendered = Rendered::of(&set);
    let deploy: Deployment = rendered.one("Deployment");
    let pod = deploy.spec.template.spec.unwrap();
    let volume = |name: &str| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("volume {name}"))
            .clone()
    };
    assert_eq!(
        volume("registry-0").secret.unwrap().secret_name.as_deref(),
        Some("ghcr-io-registry-creds")
    );
    let ca = volume("registry-2-ca").secret.unwrap();
    assert_eq!(ca.secret_name.as_deref(), Some("custom-ca-01-secret"));
    assert_eq!(ca.items.as_ref().unwrap()[0].key, "ca-01.crt");
    assert_eq!(ca.items.unwrap()[0].path, "ca.crt");
    let ca = volume("registry-3-ca").config_map.unwrap();
    assert_eq!(ca.name, "corp-ca");
    assert_eq!(ca.items.unwrap()[0].key, "ca.crt");
    let mounts = container(&pod, "coordinator")
        .volume_mounts
        .clone()
        .unwrap();
    for (name, path) in [
        ("registry-0", "/etc/warmroll/registries/0"),
        ("registry-3", "/etc/warmroll/registries/3"),
        ("registry-3-ca", "/etc/warmroll/registries/3-ca"),
    ] {
        assert!(
            mounts
                .iter()
                .any(|m| m.name == name && m.mount_path == path && m.read_only == Some(true)),
            "{name} at {path}: {mounts:?}"
        );
    }

    let cm: ConfigMap = rendered.one("ConfigMap");
    let data = cm.data.unwrap();
    let config =
        warmroll_coordinator::config::Config::parse(&data["config.yaml"], "rendered ConfigMap")
            .unwrap();
    assert_eq!(config.policy_label, "kube-autorollout/enabled");
    let registries = &config.registry.registries;
    assert_eq!(registries.len(), 4);
    assert_eq!(registries[2].hostname_pattern, "*.artifactory.example.com");
    assert_eq!(
        registries[2].secret_dir.as_deref(),
        Some(std::path::Path::new("/etc/warmroll/registries/2"))
    );
    assert_eq!(registries[2].token_key.as_deref(), Some("IDENTITY_TOKEN"));
    assert_eq!(registries[2].username.as_deref(), Some("ci-bot"));
    assert_eq!(
        registries[2].ca_file.as_deref(),
        Some(std::path::Path::new("/etc/warmroll/registries/2-ca/ca.crt"))
    );
    assert!(!registries[2].artifactory_fallback);
    assert!(registries[3].artifactory_fallback);
    assert_eq!(registries[0].ca_file, None);

    let err =
        template_with(&None, &["coordinator.registryAuth.registries[0].secret=s"]).unwrap_err();
    assert!(err.contains("hostnamePattern is required"), "{err}");
}

/// The coordinator's container args.
fn coordinator_args(rendered: &Rendered) -> Vec<String> {
    let deploy: Deployment = rendered.one("Deployment");
    let pod = deploy.spec.template.spec.unwrap();
    container(&pod, "coordinator")
        .args
        .clone()
        .unwrap_or_default()
}

/// The ServiceMonitor's one endpoint.
fn monitor_endpoint(rendered: &Rendered) -> Value {
    let monitors = rendered.all("ServiceMonitor");
    assert_eq!(monitors.len(), 1);
    monitors[0]["spec"]["endpoints"][0].clone()
}

#[test]
fn http_auth_grants_the_readers_and_the_service_monitor_presents_a_token() {
    const READER: &str = "wr-warmroll-reader";
    // Default: on, with the reader ClusterRole bound to the chart's reader account.
    let rendered = Rendered::of(&None);
    let args = coordinator_args(&rendered);
    assert!(args.contains(&"--http-auth=true".to_owned()), "{args:?}");
    assert!(
        args.contains(&"--http-auth-cache-ttl=30s".to_owned()),
        "{args:?}"
    );
    let role: ClusterRole =
        serde_json::from_value(rendered.named("ClusterRole", READER).unwrap().clone()).unwrap();
    let rules = role.rules.unwrap();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].non_resource_urls.as_deref().unwrap(),
        ["/metrics", "/report", "/fleet", "/fleet/*"]
    );
    assert_eq!(rules[0].verbs, ["get"]);
    assert!(rules[0].resources.is_none() && rules[0].api_groups.is_none());
    let subjects = |rendered: &Rendered| {
        let binding: ClusterRoleBinding = serde_json::from_value(
            rendered
                .named("ClusterRoleBinding", READER)
                .expect("reader binding")
                .clone(),
        )
        .unwrap();
        assert_eq!(binding.role_ref.name, READER);
        binding
            .subjects
            .unwrap()
            .into_iter()
            .map(|s| {
                assert_eq!(s.kind, "ServiceAccount");
                format!("{}/{}", s.namespace.unwrap(), s.name)
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(subjects(&rendered), [format!("{NAMESPACE}/{READER}")]);
    let account: ServiceAccount =
        serde_json::from_value(rendered.named("ServiceAccount", READER).unwrap().clone()).unwrap();
    assert_eq!(account.automount_service_account_token, Some(false));
    assert!(rendered.all("ServiceMonitor").is_empty(), "off by default");

    // Prometheus named as a reader; its ServiceMonitor presents its own token over the
    // port's scheme.
    let rendered = Rendered::of(&Some(chart_dir().join("ci/monitoring-values.yaml")));
    assert_eq!(
        subjects(&rendered),
        [
            format!("{NAMESPACE}/{READER}"),
            "monitoring/prometheus-k8s".to_owned()
        ]
    );
    let endpoint = monitor_endpoint(&rendered);
    assert_eq!(endpoint["scheme"], "http");
    assert_eq!(
        endpoint["bearerTokenFile"],
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    );
    assert!(endpoint.get("authorization").is_none());

    // A token Secret instead of the file: prometheus-operator's `authorization`.
    let rendered = Rendered::with(&[
        "serviceMonitor.enabled=true",
        "serviceMonitor.tokenSecret.name=prometheus-reader-token",
    ]);
    let endpoint = monitor_endpoint(&rendered);
    assert_eq!(
        endpoint["authorization"],
        serde_json::json!({"type": "Bearer", "credentials": {"name": "prometheus-reader-token", "key": "token"}})
    );
    assert!(endpoint.get("bearerTokenFile").is_none());

    // Off: the port is open, nothing to grant or present.
    let rendered = Rendered::of(&Some(chart_dir().join("ci/open-http-values.yaml")));
    assert!(coordinator_args(&rendered).contains(&"--http-auth=false".to_owned()));
    assert!(rendered.named("ClusterRole", READER).is_none());
    assert!(rendered.named("ClusterRoleBinding", READER).is_none());
    assert!(rendered.named("ServiceAccount", READER).is_none());
    let endpoint = monitor_endpoint(&rendered);
    assert!(endpoint.get("bearerTokenFile").is_none() && endpoint.get("authorization").is_none());
    assert_eq!(endpoint["scheme"], "http");
    assert_eq!(
        rendered.all("NetworkPolicy").len(),
        1,
        "the NetworkPolicy stays"
    );

    let err =
        template_with(&None, &["coordinator.httpAuth.readers[0].name=prometheus"]).unwrap_err();
    assert!(
        err.contains("coordinator.httpAuth.readers[].namespace"),
        "{err}"
    );
}

#[test]
fn the_report_commands_default_reader_is_the_charts_when_installed_as_warmroll() {
    let text = template_as("warmroll", "warmroll", &None, &[]).unwrap();
    let rendered = Rendered::parse(&text, "release warmroll");
    let readers: Vec<String> = rendered
        .typed::<ServiceAccount>("ServiceAccount")
        .into_iter()
        .filter(|a| {
            a.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l["app.kubernetes.io/component"] == "reader")
        })
        .map(|a| {
            format!(
                "{}:{}",
                a.metadata.namespace.unwrap(),
                a.metadata.name.unwrap()
            )
        })
        .collect();
    let cli =
        warmroll_coordinator::cli::Cli::try_parse_from(["warmroll-coordinator", "report"]).unwrap();
    let warmroll_coordinator::cli::Command::Report(args) = cli.command else {
        panic!("not report")
    };
    let default = &args.coordinator.reader_service_account;
    assert_eq!(readers, [format!("{}:{}", default.namespace, default.name)]);
}
