//! The run mode's session reports a warm-up's pull progress to the coordinator: a stand-in
//! coordinator (the generated `Fleet` server) orders a large image through a throttled
//! registry and receives `WarmProgress` messages, then the result.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use warmroll_agent::containerd::{ContainerdApi, ContentStore, EventSource};
use warmroll_agent::cri;
use warmroll_agent::inventory::{self, Intervals};
use warmroll_agent::metrics::{Health, Metrics};
use warmroll_agent::session::{self, SessionArgs};
use warmroll_agent::warm::{WarmConfig, Warmer};
use warmroll_proto::fleet::{
    AgentMessage, CoordinatorMessage, NodeName, OrderId, PROTOCOL_VERSION, WarmOrder, WarmOutcome,
    Welcome,
};
use warmroll_proto::image::{Digest, ImageRef};
use warmroll_proto::v1;
use warmroll_proto::v1::fleet_server::{Fleet, FleetServer};
use warmroll_tests::containerd::{Containerd, Runtime};
use warmroll_tests::image::ImageBuilder;
use warmroll_tests::registry::{Registry, RegistryOptions};

type Outbound = mpsc::Sender<Result<v1::CoordinatorMessage, Status>>;

/// A coordinator stand-in: hands each session's outbound sender and inbound messages to
/// the test.
#[derive(Clone)]
struct StandIn {
    sessions: mpsc::Sender<(Outbound, Streaming<v1::AgentMessage>)>,
}

#[tonic::async_trait]
impl Fleet for StandIn {
    type SessionStream = ReceiverStream<Result<v1::CoordinatorMessage, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let welcome = CoordinatorMessage::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            heartbeat_interval: Duration::from_secs(30),
            inventory_interval: Duration::from_secs(10),
        });
        tx.send(Ok(welcome.into())).await.unwrap();
        let _ = self.sessions.send((tx, request.into_inner())).await;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn the_session_reports_pull_progress_then_the_result(runtime: Runtime) {
    let registry = Registry::start(RegistryOptions::plain()).await.unwrap();
    let containerd = Containerd::start_with_registry_on(runtime, &registry)
        .await
        .unwrap();
    let big = ImageBuilder::new(&registry)
        .unwrap()
        .push_random("big/session", "v1", 40 << 20)
        .await
        .unwrap();
    registry.set_bandwidth(Some(10 << 20));

    // The coordinator stand-in, plain HTTP/2 on loopback.
    let (sessions_tx, mut sessions) = mpsc::channel(4);
    let stand_in = StandIn {
        sessions: sessions_tx,
    };
    let listener = warmroll_tests::scratch::bind_loopback().unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(FleetServer::new(stand_in))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    // The agent, as `run` assembles it.
    let dir = warmroll_tests::scratch::temp_dir("agent-session").unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "agent-token").unwrap();
    let metrics = Metrics::new();
    let health = Arc::new(Health::default());
    let (client, version) =
        cri::connect(Some(containerd.socket()), metrics.clone(), health.clone())
            .await
            .unwrap();
    let api = ContainerdApi::detect(client.socket(), &version)
        .await
        .map(Arc::new)
        .expect("containerd's API");
    let client = Arc::new(client);
    let (inv_tx, inv_rx) = mpsc::channel(16);
    let inventory = tokio::spawn(inventory::run(
        client.clone(),
        Some(api.clone() as Arc<dyn EventSource>),
        Intervals {
            poll: Duration::from_secs(10),
            resync: Duration::from_secs(60),
        },
        metrics.clone(),
        health,
        inv_tx,
    ));
    let warmer = Warmer::new(
        client,
        Some(api as Arc<dyn ContentStore>),
        WarmConfig {
            max_concurrent_pulls: 2,
            min_free_disk: 0,
            flush_after_pull: true,
        },
        metrics,
    );
    let args = SessionArgs {
        coordinator_url: format!("http://{addr}"),
        ca_file: None,
        token_file,
        node_name: NodeName::parse("node-a").unwrap(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(session::run(
        args,
        session::runtime(&version),
        warmer,
        inv_rx,
        async move {
            let _ = stopped.await;
        },
    ));

    let (out, mut inbound) = tokio::time::timeout(Duration::from_secs(30), sessions.recv())
        .await
        .expect("the agent opens a session")
        .unwrap();
    let mut next = async || {
        let m = tokio::time::timeout(Duration::from_secs(60), inbound.message())
            .await
            .expect("a message from the agent")
            .unwrap()
            .expect("the session stays open");
        AgentMessage::try_from(m).unwrap()
    };
    assert!(matches!(next().await, AgentMessage::Hello(_)));
    let order = OrderId::parse("order-1").unwrap();
    out.send(Ok(CoordinatorMessage::WarmOrder(WarmOrder {
        id: order.clone(),
        image: ImageRef::parse(&big.reference).unwrap(),
        expected: Some(Digest::parse(&big.manifest_digest).unwrap()),
        credentials: None,
        timeout: Duration::from_secs(120),
    })
    .into()))
        .await
        .unwrap();
    let ordered = Instant::now();
    let mut progress = Vec::new();
    let outcome = loop {
        match next().await {
            AgentMessage::WarmProgress(p) => {
                assert_eq!(p.order, order);
                progress.push((p.bytes_done, p.bytes_total));
            }
            AgentMessage::WarmResult(r) => {
                assert_eq!(r.order, order);
                break r.outcome;
            }
            _ => {}
        }
    };
    let took = ordered.elapsed();
    println!(
        "{} progress messages in {took:?}: {progress:?}",
        progress.len()
    );
    assert!(
        matches!(
            outcome,
            WarmOutcome::Succeeded {
                downloaded: true,
                ..
            }
        ),
        "{outcome:?}"
    );
    assert!(progress.len() >= 2, "{progress:?}");
    assert!(
        progress.iter().all(|(_, total)| *total == Some(big.size)),
        "{progress:?}"
    );
    assert!(
        progress.windows(2).all(|w| w[0].0 < w[1].0),
        "only changes are sent: {progress:?}"
    );
    assert_eq!(progress.last().unwrap().0, big.size, "ends at 100 %");
    // About one a second (sampling is once a second), never a flood.
    assert!(
        progress.len() as u64 <= took.as_secs() + 2,
        "{} messages in {took:?}",
        progress.len()
    );

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), agent)
        .await
        .unwrap()
        .unwrap();
    inventory.abort();
    server.abort();
}

warmroll_tests::on_each_runtime!(; local_pull: the_session_reports_pull_progress_then_the_result);
