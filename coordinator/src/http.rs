//! The coordinator's HTTP endpoints: `/healthz`, `/readyz`, `/metrics` and the fleet
//! view's debug summary (`/fleet`, `/fleet/nodes/{node}`). The policy engine merges its
//! own routes (`/report`, webhooks) into the same server.
//!
//! - [`auth`]: the bearer-token check (TokenReview + SubjectAccessReview) in front of
//!   every path but the probes and the webhook.
//! - [`reader`]: how `report` and `approve` present a token to it.

pub mod auth;
pub mod reader;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;
use warmroll_proto::fleet::NodeName;

use crate::engine::WatchHealth;
use crate::fleet::{FleetCounts, FleetView, NodeInfo};

/// What the health endpoints look at.
#[derive(Clone)]
pub struct Health {
    /// This replica holds the Lease.
    pub leader: watch::Receiver<bool>,
    /// The fleet server is accepting connections.
    pub serving: Arc<AtomicBool>,
    /// Workload watches the API server forbids: the engine cannot start.
    pub watches: WatchHealth,
    /// A long-lived task that ended (the process is stopping because of it).
    pub tasks: crate::supervise::Ended,
}

impl Health {
    fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AppState {
    health: Health,
    metrics: Arc<Registry>,
    fleet: FleetView,
}

/// The router: health, metrics and the fleet summary. `metrics` is the finished registry.
pub fn router(health: Health, metrics: Arc<Registry>, fleet: FleetView) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/fleet", get(fleet_summary))
        .route("/fleet/nodes/{node}", get(fleet_node))
        .with_state(AppState {
            health,
            metrics,
            fleet,
        })
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    if let Some(ended) = s.health.tasks.get() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{ended}\n"));
    }
    if s.health.serving() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the fleet server is not running\n".to_owned(),
        )
    }
}

/// Ready when this replica leads, its fleet server runs and the API server allows
/// every workload watch: the Service then sends agents only to a working leader.
async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if let Some(ended) = s.health.tasks.get() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{ended}\n"));
    }
    let forbidden = s.health.watches.forbidden();
    match (*s.health.leader.borrow(), s.health.serving()) {
        (false, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not the leader (another replica holds the Lease)\n".to_owned(),
        ),
        (true, false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the fleet server is not running\n".to_owned(),
        ),
        (true, true) if !forbidden.is_empty() => {
            (StatusCode::SERVICE_UNAVAILABLE, forbidden_text(&forbidden))
        }
        (true, true) => (StatusCode::OK, "ready\n".to_owned()),
    }
}

fn forbidden_text(forbidden: &[(String, String)]) -> String {
    let mut text = String::from("the API server forbids workload watches (RBAC):\n");
    for (what, message) in forbidden {
        text.push_str(&format!("  {what}: {message}\n"));
    }
    text
}

async fn metrics_text(State(s): State<AppState>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &s.metrics) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed\n",
        )
            .into_response(),
    }
}

async fn fleet_summary(State(s): State<AppState>) -> Json<FleetCounts> {
    Json(s.fleet.counts())
}

/// One node's entry, without pod labels or credentials.
#[derive(Debug, Serialize)]
struct NodeSummary {
    node: String,
    platform: String,
    runtime: String,
    agent_version: String,
    connected: bool,
    node_verified: bool,
    inventory_current: bool,
    sequence: Option<u64>,
    containers: Vec<ContainerSummary>,
    images: usize,
    warm_orders: usize,
}

#[derive(Debug, Serialize)]
struct ContainerSummary {
    id: String,
    pod: String,
    name: String,
    image: String,
    digest: Option<String>,
}

fn summary(info: NodeInfo) -> NodeSummary {
    NodeSummary {
        node: info.hello.node.to_string(),
        platform: info.hello.platform.to_string(),
        runtime: format!("{} {}", info.hello.runtime.name, info.hello.runtime.version),
        agent_version: info.hello.agent_version,
        connected: info.connected,
        node_verified: info.node_verified,
        inventory_current: info.inventory_current,
        sequence: info.sequence,
        containers: info
            .containers
            .into_iter()
            .map(|c| ContainerSummary {
                id: c.id,
                pod: format!("{}/{}", c.pod.namespace, c.pod.name),
                name: c.name,
                image: c.image,
                digest: c.digest.map(|d| d.to_string()),
            })
            .collect(),
        images: info.images.len(),
        warm_orders: info.warms.len(),
    }
}

async fn fleet_node(State(s): State<AppState>, Path(node): Path<String>) -> Response {
    let Ok(name) = NodeName::parse(&node) else {
        return (StatusCode::BAD_REQUEST, "not a valid node name\n").into_response();
    };
    match s.fleet.node(&name) {
        Some(info) => Json(summary(info)).into_response(),
        None => (StatusCode::NOT_FOUND, "no such node in the fleet view\n").into_response(),
    }
}

/// Registers the fleet gauges, read from the view at every scrape:
/// `warmroll_agents_connected`, `warmroll_fleet_nodes`, `warmroll_fleet_containers`,
/// `warmroll_leader` (1 while this replica holds the Lease), and the warm-up progress
/// per image ([`FleetView::warm_progress_collector`]).
pub fn register_metrics(registry: &mut Registry, fleet: FleetView, leader: watch::Receiver<bool>) {
    registry.register_collector(Box::new(fleet.warm_progress_collector()));
    registry.register_collector(Box::new(FleetCollector { fleet, leader }));
}

struct FleetCollector {
    fleet: FleetView,
    leader: watch::Receiver<bool>,
}

impl std::fmt::Debug for FleetCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetCollector")
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: usize,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
    let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
    gauge.encode(metric)
}

impl Collector for FleetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = self.fleet.counts();
        gauge(
            &mut encoder,
            "warmroll_agents_connected",
            "Agents with an open session",
            counts.connected,
        )?;
        gauge(
            &mut encoder,
            "warmroll_fleet_nodes",
            "Nodes in the fleet view (connected or within the grace period)",
            counts.nodes,
        )?;
        gauge(
            &mut encoder,
            "warmroll_fleet_containers",
            "Containers reported by the agents of the nodes in the fleet view",
            counts.containers,
        )?;
        gauge(
            &mut encoder,
            "warmroll_leader",
            "1 while this replica holds the leader Lease",
            usize::from(*self.leader.borrow()),
        )
    }
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /healthz, /readyz, /metrics and /fleet");
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;

    async fn get_text(router: &Router, path: &str) -> (StatusCode, String) {
        let response = router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn ready_only_when_leading_and_serving_and_metrics_count_the_fleet() {
        let (leader_tx, leader) = watch::channel(false);
        let serving = Arc::new(AtomicBool::new(false));
        let fleet = FleetView::new(std::time::Duration::from_secs(60));
        let watches = WatchHealth::default();
        let mut registry = Registry::default();
        register_metrics(&mut registry, fleet.clone(), leader.clone());
        watches.register(&mut registry);
        let router = router(
            Health {
                leader,
                serving: serving.clone(),
                watches: watches.clone(),
                tasks: crate::supervise::Ended::default(),
            },
            Arc::new(registry),
            fleet,
        );
        assert_eq!(
            get_text(&router, "/healthz").await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        serving.store(true, Ordering::Relaxed);
        assert_eq!(get_text(&router, "/healthz").await.0, StatusCode::OK);
        let (status, body) = get_text(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("not the leader"), "{body}");
        leader_tx.send_replace(true);
        assert_eq!(get_text(&router, "/readyz").await.0, StatusCode::OK);

        // A watch RBAC forbids: not ready, and the answer names it.
        watches.forbid(
            "Deployment labelled warmroll.io/policy in all namespaces",
            "deployments.apps is forbidden",
        );
        let (status, body) = get_text(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("Deployment labelled warmroll.io/policy in all namespaces: deployments.apps is forbidden"),
            "{body}"
        );
        let (_, metrics) = get_text(&router, "/metrics").await;
        assert!(
            metrics.contains("warmroll_forbidden_watches 1"),
            "{metrics}"
        );
        watches.allow("Deployment labelled warmroll.io/policy in all namespaces");
        assert_eq!(get_text(&router, "/readyz").await.0, StatusCode::OK);

        let (status, metrics) = get_text(&router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(metrics.contains("warmroll_agents_connected 0"), "{metrics}");
        assert!(metrics.contains("warmroll_leader 1"), "{metrics}");
        let (status, fleet) = get_text(&router, "/fleet").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&fleet).unwrap(),
            serde_json::json!({"nodes": 0, "connected": 0, "ready": 0, "containers": 0})
        );
        assert_eq!(
            get_text(&router, "/fleet/nodes/node-a").await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            get_text(&router, "/fleet/nodes/Bad_Name").await.0,
            StatusCode::BAD_REQUEST
        );
    }
}
