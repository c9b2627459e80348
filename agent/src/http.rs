//! The agent's HTTP endpoints: `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tracing::info;

use crate::metrics::{Health, Metrics};

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Arc<Health>,
    /// `/healthz` fails when the runtime has not answered for this long.
    stale_after: Duration,
}

/// The router; `stale_after` is how long the runtime may stay silent before `/healthz`
/// reports it (a few inventory intervals).
pub fn router(metrics: Metrics, health: Arc<Health>, stale_after: Duration) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState {
            metrics,
            health,
            stale_after,
        })
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.cri_reachable_within(s.stale_after) {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the container runtime has not answered recently\n",
        )
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.inventory_ready() && s.health.cri_reachable_within(s.stale_after) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no current inventory yet\n",
        )
    }
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// Serve the router on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, router: Router) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    info!(addr = ?addr, "serving /healthz, /readyz and /metrics");
    axum::serve(listener, router).await
}
