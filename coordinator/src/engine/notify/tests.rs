use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use axum::extract::State as AxumState;
use axum::http::{HeaderMap as AxumHeaders, StatusCode};
use axum::routing::post;

use reqwest::Url;
use reqwest::header::RETRY_AFTER;

use super::*;

fn digest(c: char) -> Digest {
    Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
}

fn target(c: char) -> Target {
    [("main".to_owned(), digest(c))].into()
}

fn step(phase: Phase, action: Action, state: State) -> Step {
    Step {
        phase,
        action,
        state,
        note: None,
    }
}

fn events(found: &[Transition]) -> Vec<NotifyEvent> {
    found.iter().map(|t| t.event).collect()
}

#[test]
fn a_warm_rollout_notifies_drift_warm_up_done_patched_and_converged_once_each() {
    let now = Timestamp::UNIX_EPOCH;
    let new = target('b');
    let stabilising = Phase::Stabilising {
        target: new.clone(),
        since: now,
    };
    let (found, seen) = transitions(
        None,
        &new,
        &Phase::Idle,
        &step(stabilising.clone(), Action::None, State::Drift),
    );
    assert_eq!(events(&found), [NotifyEvent::DriftFound]);
    assert_eq!(found[0].target, new);
    assert!(found[0].reason.as_deref().unwrap().contains("main"));
    assert_eq!(seen.as_ref(), Some(&new));

    let warming = Phase::Warming {
        target: new.clone(),
        started: now,
        nodes: ["node-0".to_owned()].into(),
    };
    let ordered = step(
        warming.clone(),
        Action::Warm {
            nodes: ["node-0".to_owned()].into(),
        },
        State::Warming,
    );
    let (found, seen) = transitions(seen.as_ref(), &new, &stabilising, &ordered);
    assert!(found.is_empty(), "{found:?}");
    let (found, seen) = transitions(seen.as_ref(), &new, &warming, &ordered);
    assert!(found.is_empty(), "{found:?}");

    let rolling = Phase::Rolling {
        target: new.clone(),
        patched: now,
        partial: false,
    };
    let patch = step(
        rolling.clone(),
        Action::Patch {
            reason: "warm-up done, 1/1 target nodes warm".into(),
        },
        State::Rolling,
    );
    let (found, seen) = transitions(seen.as_ref(), &new, &warming, &patch);
    assert_eq!(
        events(&found),
        [NotifyEvent::WarmUpDone, NotifyEvent::Patched]
    );
    assert!(
        found
            .iter()
            .all(|t| t.reason.as_deref() == Some("warm-up done, 1/1 target nodes warm"))
    );
    let (found, seen) = transitions(
        seen.as_ref(),
        &new,
        &rolling,
        &step(rolling.clone(), Action::None, State::Rolling),
    );
    assert!(found.is_empty(), "{found:?}");

    let (found, seen) = transitions(
        seen.as_ref(),
        &Target::new(),
        &rolling,
        &step(Phase::Idle, Action::None, State::Converged),
    );
    assert_eq!(events(&found), [NotifyEvent::Converged]);
    assert_eq!(found[0].target, new);
    assert_eq!(seen, None);
}

#[test]
fn a_failed_warm_up_notifies_warm_up_failed_and_held_or_a_partial_patch() {
    let now = Timestamp::UNIX_EPOCH;
    let new = target('c');
    let warming = Phase::Warming {
        target: new.clone(),
        started: now,
        nodes: Default::default(),
    };
    let reason = "warm-up timed out after 30s with 0/1 target nodes warm: holding";
    let held = Phase::Held {
        target: new.clone(),
        reason: reason.into(),
    };
    let hold = step(held.clone(), Action::None, State::Held(reason.into()));
    let (found, _) = transitions(Some(&new), &new, &warming, &hold);
    assert_eq!(
        events(&found),
        [NotifyEvent::WarmUpFailed, NotifyEvent::Held]
    );
    assert_eq!(found[1].reason.as_deref(), Some(reason));
    // Held stays held: nothing more.
    let (found, _) = transitions(Some(&new), &new, &held, &hold);
    assert!(found.is_empty(), "{found:?}");

    let partial = step(
        Phase::Rolling {
            target: new.clone(),
            patched: now,
            partial: true,
        },
        Action::Patch {
            reason: "rolling with a partial warm-up".into(),
        },
        State::Rolling,
    );
    let (found, _) = transitions(Some(&new), &new, &warming, &partial);
    assert_eq!(
        events(&found),
        [NotifyEvent::WarmUpFailed, NotifyEvent::Patched]
    );

    // New pods that never came up: held after the rollout, no warm-up failure.
    let rolling = Phase::Rolling {
        target: new.clone(),
        patched: now,
        partial: false,
    };
    let (found, _) = transitions(Some(&new), &new, &rolling, &hold);
    assert_eq!(events(&found), [NotifyEvent::Held]);
}

#[test]
fn a_failed_patch_or_a_dry_run_is_not_patched() {
    let now = Timestamp::UNIX_EPOCH;
    let new = target('d');
    let warming = Phase::Warming {
        target: new.clone(),
        started: now,
        nodes: Default::default(),
    };
    let failed = step(
        warming.clone(),
        Action::Patch {
            reason: "warm-up done".into(),
        },
        State::Error("patch failed: 409".into()),
    );
    let (found, _) = transitions(Some(&new), &new, &warming, &failed);
    assert!(found.is_empty(), "{found:?}");
    let dry = step(
        Phase::DryRun {
            target: new.clone(),
            would: "would patch".into(),
        },
        Action::Patch {
            reason: "warm-up done".into(),
        },
        State::Drift,
    );
    let (found, _) = transitions(Some(&new), &new, &warming, &dry);
    assert!(found.is_empty(), "{found:?}");
}

#[test]
fn drift_is_announced_once_per_digest_and_again_after_sync() {
    // report mode: the phase stays Idle, only the drift tells.
    let drifting = step(Phase::Idle, Action::None, State::Drift);
    let b = target('b');
    let (found, seen) = transitions(None, &b, &Phase::Idle, &drifting);
    assert_eq!(events(&found), [NotifyEvent::DriftFound]);
    let (found, seen) = transitions(seen.as_ref(), &b, &Phase::Idle, &drifting);
    assert!(found.is_empty());
    // A registry error for a step forgets nothing.
    let error = step(
        Phase::Idle,
        Action::None,
        State::Error("registry down".into()),
    );
    let (found, seen) = transitions(seen.as_ref(), &Target::new(), &Phase::Idle, &error);
    assert!(found.is_empty());
    assert_eq!(seen.as_ref(), Some(&b));
    let (found, seen) = transitions(seen.as_ref(), &b, &Phase::Idle, &drifting);
    assert!(found.is_empty());
    // A newer push is new drift.
    let c = target('c');
    let (found, seen) = transitions(seen.as_ref(), &c, &Phase::Idle, &drifting);
    assert_eq!(events(&found), [NotifyEvent::DriftFound]);
    // In sync forgets it: the same digest drifting again is announced again.
    let in_sync = step(Phase::Idle, Action::None, State::InSync);
    let (_, seen) = transitions(seen.as_ref(), &Target::new(), &Phase::Idle, &in_sync);
    assert_eq!(seen, None);
    let (found, _) = transitions(seen.as_ref(), &c, &Phase::Idle, &drifting);
    assert_eq!(events(&found), [NotifyEvent::DriftFound]);
}

#[test]
fn a_scheduled_restart_is_patched_without_drift() {
    let current = target('e');
    let restart = step(
        Phase::Rolling {
            target: current.clone(),
            patched: Timestamp::UNIX_EPOCH,
            partial: false,
        },
        Action::Patch {
            reason: "scheduled restart (03:00)".into(),
        },
        State::Rolling,
    );
    let (found, seen) = transitions(None, &Target::new(), &Phase::Idle, &restart);
    assert_eq!(events(&found), [NotifyEvent::Patched]);
    assert_eq!(found[0].target, current);
    assert_eq!(seen, None);
}

fn notification() -> Notification {
    Notification {
        event: NotifyEvent::Patched,
        workload: NotifiedWorkload {
            namespace: "shop".into(),
            kind: "Deployment".into(),
            name: "web".into(),
        },
        policy: "fast".into(),
        images: vec![NotifiedImage {
            container: "main".into(),
            image: "reg.example/app:latest".into(),
            digest: digest('a').to_string(),
        }],
        reason: Some("warm-up done, 2/2 target nodes warm".into()),
        time: "2026-01-02T03:04:05Z".parse().unwrap(),
    }
}

#[test]
fn json_and_slack_bodies() {
    let json = render(NotifyFormat::Json, &notification());
    assert_eq!(
        json,
        serde_json::json!({
            "event": "patched",
            "workload": {"namespace": "shop", "kind": "Deployment", "name": "web"},
            "policy": "fast",
            "images": [{"container": "main", "image": "reg.example/app:latest", "digest": digest('a').to_string()}],
            "reason": "warm-up done, 2/2 target nodes warm",
            "time": "2026-01-02T03:04:05Z"
        })
    );
    let slack = render(NotifyFormat::Slack, &notification());
    let text = slack["text"].as_str().unwrap();
    assert_eq!(
        text,
        "warmroll: shop/Deployment/web patched (policy fast): warm-up done, 2/2 target nodes warm\n• main: reg.example/app:latest → sha256:aaaaaaaaaaaa"
    );
    assert_eq!(slack.as_object().unwrap().len(), 1, "{slack}");
    let mut bare = notification();
    bare.reason = None;
    bare.event = NotifyEvent::DriftFound;
    assert!(render(NotifyFormat::Json, &bare).get("reason").is_none());
    assert!(
        render(NotifyFormat::Slack, &bare)["text"]
            .as_str()
            .unwrap()
            .starts_with("warmroll: shop/Deployment/web drift-found (policy fast)\n")
    );
}

#[test]
fn retry_decisions_and_backoff() {
    let none = HeaderMap::new();
    assert_eq!(answer(StatusCode::OK, &none), Answer::Delivered);
    assert_eq!(answer(StatusCode::NO_CONTENT, &none), Answer::Delivered);
    assert_eq!(answer(StatusCode::BAD_GATEWAY, &none), Answer::Retry(None));
    assert_eq!(
        answer(StatusCode::REQUEST_TIMEOUT, &none),
        Answer::Retry(None)
    );
    assert_eq!(answer(StatusCode::NOT_FOUND, &none), Answer::GiveUp);
    assert_eq!(answer(StatusCode::BAD_REQUEST, &none), Answer::GiveUp);
    let mut later = HeaderMap::new();
    later.insert(RETRY_AFTER, "7".parse().unwrap());
    assert_eq!(
        answer(StatusCode::TOO_MANY_REQUESTS, &later),
        Answer::Retry(Some(Duration::from_secs(7)))
    );
    later.insert(RETRY_AFTER, "100000".parse().unwrap());
    assert_eq!(
        answer(StatusCode::TOO_MANY_REQUESTS, &later),
        Answer::Retry(Some(MAX_BACKOFF))
    );
    let waits: Vec<u64> = (1..=8).map(|a| backoff(a).as_secs()).collect();
    assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
    assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
}

/// A receiver answering each request with the next status of `statuses` (the last one
/// repeats), or never when `hang`; it counts requests and keeps their bodies and headers.
#[derive(Default)]
struct Receiver {
    statuses: Vec<u16>,
    hang: bool,
    requests: AtomicUsize,
    bodies: Mutex<Vec<(AxumHeaders, String)>>,
}

async fn serve(receiver: Arc<Receiver>) -> Url {
    async fn handle(
        AxumState(r): AxumState<Arc<Receiver>>,
        headers: AxumHeaders,
        body: String,
    ) -> StatusCode {
        let n = r.requests.fetch_add(1, Ordering::SeqCst);
        r.bodies.lock().unwrap().push((headers, body));
        if r.hang {
            std::future::pending::<()>().await;
        }
        let status = r
            .statuses
            .get(n)
            .or(r.statuses.last())
            .copied()
            .unwrap_or(200);
        StatusCode::from_u16(status).unwrap()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/hook/SECRET-TOKEN",
        listener.local_addr().unwrap()
    );
    let app = axum::Router::new()
        .route("/hook/{token}", post(handle))
        .with_state(receiver);
    tokio::spawn(axum::serve(listener, app).into_future());
    url.parse().unwrap()
}

fn receiver_config(name: &str, url: Url) -> NotifyReceiver {
    let mut headers = HeaderMap::new();
    headers.insert("x-token", "header-SECRET".parse().unwrap());
    NotifyReceiver {
        name: name.into(),
        url,
        format: NotifyFormat::Json,
        events: NotifyEvent::ALL.into_iter().collect(),
        headers,
        timeout: Duration::from_secs(5),
        max_attempts: 3,
        queue_size: 10,
    }
}

fn metric(registry: &Registry, receiver: &str, result: &str) -> u64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    let needle = format!(
        "warmroll_notifications_total{{receiver=\"{receiver}\",event=\"patched\",result=\"{result}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0, |v| v.trim().parse().unwrap())
}

async fn wait_until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_server_error_is_retried_with_backoff_and_the_headers_go_along() {
    let flaky = Arc::new(Receiver {
        statuses: vec![500, 200],
        ..Receiver::default()
    });
    let refusing = Arc::new(Receiver {
        statuses: vec![404],
        ..Receiver::default()
    });
    let mut registry = Registry::default();
    let notifier = Notifier::start(
        &[
            receiver_config("flaky", serve(flaky.clone()).await),
            receiver_config("refusing", serve(refusing.clone()).await),
        ],
        &mut registry,
    )
    .unwrap();
    let started = Instant::now();
    notifier.send(notification());
    wait_until("flaky delivered", || {
        metric(&registry, "flaky", "delivered") == 1
    })
    .await;
    assert!(
        started.elapsed() >= FIRST_BACKOFF,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(flaky.requests.load(Ordering::SeqCst), 2);
    wait_until("refusing failed", || {
        metric(&registry, "refusing", "failed") == 1
    })
    .await;
    assert_eq!(
        refusing.requests.load(Ordering::SeqCst),
        1,
        "a 404 is not retried"
    );
    let bodies = flaky.bodies.lock().unwrap();
    let (headers, body) = &bodies[0];
    assert_eq!(headers["x-token"], "header-SECRET");
    assert_eq!(headers["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body, render(NotifyFormat::Json, &notification()));
}

#[tokio::test]
async fn a_hanging_receiver_holds_nobody_up_and_a_full_queue_drops() {
    let hanging = Arc::new(Receiver {
        hang: true,
        ..Receiver::default()
    });
    let fine = Arc::new(Receiver::default());
    let mut slow = receiver_config("hanging", serve(hanging.clone()).await);
    slow.queue_size = 1;
    slow.timeout = Duration::from_secs(60);
    let mut registry = Registry::default();
    let notifier = Notifier::start(
        &[slow, receiver_config("fine", serve(fine.clone()).await)],
        &mut registry,
    )
    .unwrap();
    notifier.send(notification());
    wait_until("the hanging receiver holds the first", || {
        hanging.requests.load(Ordering::SeqCst) == 1
    })
    .await;
    let started = Instant::now();
    for _ in 0..5 {
        notifier.send(notification());
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "sending waited {:?}",
        started.elapsed()
    );
    // One waits in the queue of one; four are dropped. The other receiver gets all six.
    assert_eq!(metric(&registry, "hanging", "dropped"), 4);
    wait_until("the fine receiver got all", || {
        metric(&registry, "fine", "delivered") == 6
    })
    .await;
    assert_eq!(metric(&registry, "fine", "dropped"), 0);
    assert_eq!(hanging.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_unreachable_receiver_is_logged_by_name_never_by_url() {
    use tracing_subscriber::fmt::MakeWriter;
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(capture.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url: Url = format!(
        "http://{}/hook/SECRET-TOKEN",
        listener.local_addr().unwrap()
    )
    .parse()
    .unwrap();
    drop(listener);
    let mut config = receiver_config("ops", url);
    config.max_attempts = 2;
    let mut registry = Registry::default();
    let notifier = Notifier::start(&[config], &mut registry).unwrap();
    notifier.send(notification());
    wait_until("given up", || metric(&registry, "ops", "failed") == 1).await;
    let logged = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    assert!(logged.contains("receiver=ops"), "{logged}");
    assert!(logged.contains("notification given up"), "{logged}");
    assert!(!logged.contains("SECRET"), "{logged}");
}
