//! The HTTP port's authentication end to end: the router `run` serves (health, metrics,
//! the fleet summary, the engine's `/report` and registry webhook) behind the gate, on a
//! real socket, against the KubeApi stand-in's TokenReview and SubjectAccessReview; and
//! `warmroll-coordinator report` getting in with a kubeconfig.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount as ServiceAccountObject;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use warmroll_coordinator::config::Config;
use warmroll_coordinator::engine::{Engine, fetch_report, spawn};
use warmroll_coordinator::fleet::FleetView;
use warmroll_coordinator::http::auth::{HttpAuthArgs, guard};
use warmroll_coordinator::http::reader::from_kubeconfig;
use warmroll_coordinator::http::{Health, register_metrics, router};
use warmroll_coordinator::run::{Context, ServiceAccount};
use warmroll_tests::kubeapi::{KubeApi, RecordedRequest};

const PROMETHEUS: &str = "system:serviceaccount:monitoring:prometheus";
const PROMETHEUS_TOKEN: &str = "prometheus-token-7f3a";
const INTRUDER: &str = "system:serviceaccount:default:default";
const INTRUDER_TOKEN: &str = "intruder-token-91c2";
const READER_PATHS: [&str; 4] = ["/metrics", "/report", "/fleet", "/fleet/*"];
const WEBHOOK_SECRET: &str = "webhook-secret-0b7e";

/// The coordinator's HTTP port as `run` builds it, served on loopback.
struct Port {
    api: KubeApi,
    url: String,
    server: JoinHandle<()>,
    _engine: Engine,
    _stop: watch::Sender<bool>,
    _leader: watch::Sender<bool>,
    _dir: TempDir,
}

impl Drop for Port {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Port {
    async fn start(auth: bool) -> Port {
        let api = KubeApi::start().await.unwrap();
        let groups = vec![
            "system:serviceaccounts".to_string(),
            "system:authenticated".to_string(),
        ];
        api.register_token(
            PROMETHEUS_TOKEN,
            PROMETHEUS,
            groups.clone(),
            BTreeMap::new(),
            Vec::new(),
        );
        api.register_token(
            INTRUDER_TOKEN,
            INTRUDER,
            groups,
            BTreeMap::new(),
            Vec::new(),
        );
        api.grant_non_resource_urls(PROMETHEUS, &["get"], &READER_PATHS);

        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("webhook-secret");
        std::fs::write(&secret, WEBHOOK_SECRET).unwrap();
        let config = Config::parse(
            &format!("webhook:\n  secretFile: {}\n", secret.display()),
            "test config",
        )
        .unwrap();
        let fleet = FleetView::new(Duration::from_secs(60));
        let (leader_tx, leader) = watch::channel(true);
        let (stop, shutdown) = watch::channel(false);
        let mut metrics = Registry::default();
        register_metrics(&mut metrics, fleet.clone(), leader.clone());
        let context = Context {
            client: api.client(),
            fleet: fleet.clone(),
            leader: leader.clone(),
            shutdown,
        };
        let engine = spawn(context, config, &mut metrics).unwrap();
        let routes = router(
            Health {
                leader,
                serving: Arc::new(AtomicBool::new(true)),
                watches: engine.watches.clone(),
                tasks: Default::default(),
            },
            Arc::new(metrics),
            fleet,
        )
        .merge(engine.router.clone());
        let routes = guard(
            routes,
            api.client(),
            &HttpAuthArgs {
                enabled: auth,
                cache_ttl: Duration::from_secs(60),
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, routes).await.unwrap();
        });
        Port {
            api,
            url,
            server,
            _engine: engine,
            _stop: stop,
            _leader: leader_tx,
            _dir: dir,
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, String, Option<String>) {
        let mut request = reqwest::Client::new().get(format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let challenge = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, response.text().await.unwrap(), challenge)
    }

    async fn webhook(&self, secret: &str) -> (u16, String) {
        let body = json!({"events": [{"action": "push", "target": {"repository": "app", "tag": "latest"}}]});
        let response = reqwest::Client::new()
            .post(format!("{}/webhooks/registry", self.url))
            .bearer_auth(secret)
            .header(
                "content-type",
                "application/vnd.docker.distribution.events.v1+json",
            )
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// The reviews the gate sent, by kind.
    fn reviews(&self, plural: &str) -> Vec<RecordedRequest> {
        self.api
            .requests()
            .into_iter()
            .filter(|r| r.path.ends_with(plural))
            .collect()
    }

    /// Waits until `/report` answers 200 to `token` (the engine's first cycle).
    async fn wait_report(&self, token: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body, _) = self.get("/report", Some(token)).await;
            if status == 200 {
                return serde_json::from_str(&body).unwrap();
            }
            assert_eq!(status, 503, "before the first cycle: {body}");
            assert!(Instant::now() < deadline, "no report within 30 s: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

const INVENTORY: [&str; 4] = ["/report", "/fleet", "/fleet/nodes/node-x", "/metrics"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_needs_an_allowed_token_while_probes_and_the_webhook_stay_open() {
    let port = Port::start(true).await;

    // No token: 401 with a Bearer challenge, and nothing asked of the API server.
    for path in INVENTORY {
        let (status, body, challenge) = port.get(path, None).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(
            body.contains("needs a Kubernetes bearer token"),
            "{path}: {body}"
        );
        assert_eq!(challenge.as_deref(), Some("Bearer realm=\"warmroll\""));
    }
    assert!(port.reviews("tokenreviews").is_empty());

    // A token the API server does not know: 401.
    let (status, body, _) = port.get("/report", Some("forged-token")).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("invalid bearer token"), "{body}");

    // A valid token of an account RBAC does not let read: 403, naming it and the path.
    for path in INVENTORY {
        let (status, body, _) = port.get(path, Some(INTRUDER_TOKEN)).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(
            body.contains(&format!("user \"{INTRUDER}\" cannot get path \"{path}\"")),
            "{path}: {body}"
        );
        assert!(!body.contains(INTRUDER_TOKEN), "{body}");
    }

    // Prometheus, allowed: the inventory answers.
    let report = port.wait_report(PROMETHEUS_TOKEN).await;
    assert_eq!(report["summary"]["workloads"], 0, "{report}");
    let (status, metrics, _) = port.get("/metrics", Some(PROMETHEUS_TOKEN)).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("warmroll_leader 1"), "{metrics}");
    let (status, fleet, _) = port.get("/fleet", Some(PROMETHEUS_TOKEN)).await;
    assert_eq!(
        (
            status,
            serde_json::from_str::<Value>(&fleet).unwrap()["nodes"].clone()
        ),
        (200, json!(0))
    );
    let (status, body, _) = port
        .get("/fleet/nodes/node-x", Some(PROMETHEUS_TOKEN))
        .await;
    assert_eq!(
        status, 404,
        "allowed, and the node is not in the view: {body}"
    );

    // The reviews carried the user as the TokenReview named it, and the path as asked.
    let asked: Vec<Value> = port
        .reviews("subjectaccessreviews")
        .iter()
        .filter_map(RecordedRequest::json)
        .map(|r| r["spec"].clone())
        .filter(|spec| spec["user"] == PROMETHEUS)
        .collect();
    assert!(
        asked.iter().any(|spec| spec["nonResourceAttributes"]
            == json!({"verb": "get", "path": "/fleet/nodes/node-x"})
            && spec["groups"] == json!(["system:serviceaccounts", "system:authenticated"])),
        "{asked:#?}"
    );

    // Cached: more requests of both accounts ask nothing more of the API server.
    let (token_reviews, access_reviews) = (
        port.reviews("tokenreviews").len(),
        port.reviews("subjectaccessreviews").len(),
    );
    for _ in 0..3 {
        for path in INVENTORY {
            port.get(path, Some(PROMETHEUS_TOKEN)).await;
            port.get(path, Some(INTRUDER_TOKEN)).await;
        }
    }
    assert_eq!(port.reviews("tokenreviews").len(), token_reviews);
    assert_eq!(port.reviews("subjectaccessreviews").len(), access_reviews);

    // Probes and the webhook need no Kubernetes token; unknown paths stay 404.
    assert_eq!(port.get("/healthz", None).await.0, 200);
    assert_eq!(port.get("/readyz", None).await.0, 200);
    let (status, body) = port.webhook(WEBHOOK_SECRET).await;
    assert_eq!(status, 202, "the webhook's own secret lets it in: {body}");
    let (status, body) = port.webhook("wrong-secret").await;
    assert_eq!(status, 401, "{body}");
    assert!(
        !body.contains("Kubernetes"),
        "the webhook's own refusal: {body}"
    );
    assert_eq!(port.get("/nope", None).await.0, 404);
    // The webhook's Bearer secret never went to a TokenReview.
    let reviewed: Vec<String> = port
        .reviews("tokenreviews")
        .iter()
        .filter_map(RecordedRequest::json)
        .map(|r| r["spec"]["token"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        !reviewed.iter().any(|t| t.contains("secret")),
        "{}",
        reviewed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_off_switch_leaves_the_port_open_and_asks_nothing() {
    let port = Port::start(false).await;
    for path in ["/fleet", "/metrics", "/healthz"] {
        let (status, body, _) = port.get(path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    assert_eq!(port.get("/fleet/nodes/node-x", None).await.0, 404);
    let report = port.wait_report("ignored-token").await;
    assert_eq!(report["summary"]["workloads"], 0);
    assert!(port.reviews("tokenreviews").is_empty());
    assert!(port.reviews("subjectaccessreviews").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_review_is_a_503_without_the_token_and_is_asked_again() {
    let port = Port::start(true).await;
    port.api.fail_path("/apis/authentication.k8s.io/");
    let (status, body, _) = port.get("/metrics", Some(PROMETHEUS_TOKEN)).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("cannot check the token: the TokenReview failed"),
        "{body}"
    );
    assert!(!body.contains(PROMETHEUS_TOKEN), "{body}");
    port.api.heal_paths();
    port.api.fail_path("/apis/authorization.k8s.io/");
    let (status, body, _) = port.get("/metrics", Some(PROMETHEUS_TOKEN)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("the SubjectAccessReview failed"), "{body}");
    port.api.heal_paths();
    assert_eq!(port.get("/metrics", Some(PROMETHEUS_TOKEN)).await.0, 200);
}

fn reader_account(port: &Port, name: &str) -> ServiceAccount {
    port.api
        .insert(
            &serde_json::from_value::<ServiceAccountObject>(
                json!({"metadata": {"name": name, "namespace": "warmroll"}}),
            )
            .unwrap(),
        )
        .unwrap();
    ServiceAccount {
        namespace: "warmroll".into(),
        name: name.into(),
    }
}

/// `warmroll-coordinator report` as an operator runs it, with the stand-in's kubeconfig.
fn report_command(port: &Port, env: &[(&str, &str)]) -> std::process::Output {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_warmroll-coordinator"));
    command
        .args(["report", "--url", &port.url])
        .env("KUBECONFIG", port.api.kubeconfig_path())
        .env_remove("WARMROLL_TOKEN")
        .env_remove("WARMROLL_READER_SERVICE_ACCOUNT");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_command_presents_a_reader_token_its_kubeconfig_or_the_given_one() {
    let port = Port::start(true).await;
    let reader = reader_account(&port, "warmroll-reader");
    let reader_user = "system:serviceaccount:warmroll:warmroll-reader";
    port.api
        .grant_non_resource_urls(reader_user, &["get"], &READER_PATHS);
    port.wait_report(PROMETHEUS_TOKEN).await;

    // The default: a 10-minute token of the reader account, minted with the kubeconfig.
    let output = report_command(&port, &[]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("0 workloads, 0 containers"), "{stdout}");
    let minted: Vec<Value> = port
        .api
        .writes()
        .iter()
        .filter(|r| r.path == "/api/v1/namespaces/warmroll/serviceaccounts/warmroll-reader/token")
        .filter_map(RecordedRequest::json)
        .collect();
    assert_eq!(minted.len(), 1, "one TokenRequest");
    assert_eq!(minted[0]["spec"]["expirationSeconds"], 600);
    assert!(
        port.reviews("subjectaccessreviews")
            .iter()
            .filter_map(RecordedRequest::json)
            .any(|r| r["spec"]["user"] == reader_user),
        "the coordinator checked the reader account"
    );

    // --token (here through WARMROLL_TOKEN) wins; refused, the error says what was sent.
    let output = report_command(&port, &[("WARMROLL_TOKEN", INTRUDER_TOKEN)]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("answered 403"), "{stderr}");
    assert!(
        stderr.contains("presented the token of --token"),
        "{stderr}"
    );
    assert!(!stderr.contains(INTRUDER_TOKEN), "{stderr}");

    // No such reader account (404): the kubeconfig's own bearer token, whose user (the
    // stand-in's admin, a system:masters member) may read.
    let credential = from_kubeconfig(
        port.api.config(),
        &ServiceAccount {
            namespace: "warmroll".into(),
            name: "absent".into(),
        },
    )
    .await
    .unwrap();
    assert!(
        credential
            .source()
            .starts_with("your kubeconfig's own bearer token"),
        "{}",
        credential.source()
    );
    let report = fetch_report(&port.url, &credential).await.unwrap();
    assert_eq!(report.summary.workloads, 0);

    // A minted token works as well through the library call.
    let credential = from_kubeconfig(port.api.config(), &reader).await.unwrap();
    assert!(
        credential
            .source()
            .contains("ServiceAccount warmroll:warmroll-reader")
    );
    fetch_report(&port.url, &credential).await.unwrap();
}
