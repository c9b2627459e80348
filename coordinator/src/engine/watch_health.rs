//! Which watches the API server refuses, for `/readyz`, the log and a metric.
//!
//! A watch RBAC forbids (HTTP 403: a Role where a ClusterRole was needed, a namespace
//! missing from `rbac.namespaces`, a ClusterRole without Nodes) never recovers by
//! itself, so it must not look like a slow start: the engine logs it as an error,
//! `/readyz` answers 503 naming it, and `warmroll_forbidden_watches` counts it, until a
//! later list or watch succeeds. The watcher keeps retrying with its backoff meanwhile.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use kube::runtime::watcher;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::{error, info, warn};

/// The forbidden watches, by what they watch (`Deployment labelled … in namespace …`),
/// with the API server's message. Cheap to clone; clones share the state.
#[derive(Clone, Default, Debug)]
pub struct WatchHealth {
    forbidden: Arc<Mutex<BTreeMap<String, String>>>,
    gauge: Gauge,
}

impl WatchHealth {
    /// Registers `warmroll_forbidden_watches`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "warmroll_forbidden_watches",
            "Watches the API server forbids (RBAC); the engine waits for them",
            self.gauge.clone(),
        );
    }

    /// Records that `what` was forbidden with `message`; true when it was not already.
    pub fn forbid(&self, what: &str, message: &str) -> bool {
        let mut map = self.lock();
        let new = map.insert(what.to_owned(), message.to_owned()).is_none();
        self.gauge.set(map.len() as i64);
        new
    }

    /// Records that `what` works (again); true when it had been forbidden.
    pub fn allow(&self, what: &str) -> bool {
        let mut map = self.lock();
        let was = map.remove(what).is_some();
        self.gauge.set(map.len() as i64);
        was
    }

    /// Notes one event of the watch of `what`: an answer allows it again, a 403 forbids
    /// it (each change logged once: an error naming `what`, the API server's message and
    /// `remedy`), any other error is a warning (the watcher retries it).
    pub(crate) fn observe<T>(&self, what: &str, event: &Result<T, watcher::Error>, remedy: &str) {
        match event {
            Ok(_) => {
                if self.allow(what) {
                    info!(watch = %what, "watch allowed now");
                }
            }
            Err(e) => match forbidden_message(e) {
                Some(message) => {
                    if self.forbid(what, message) {
                        error!(
                            watch = %what,
                            error = message,
                            "the API server forbids this watch (RBAC); the engine waits until it is allowed ({remedy})"
                        );
                    }
                }
                None => warn!(watch = %what, error = %e, "watch failed; retrying"),
            },
        }
    }

    /// The forbidden watches and their messages, sorted.
    pub fn forbidden(&self) -> Vec<(String, String)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.forbidden
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The API server's message when a watcher error is a 403 Forbidden; `None` for
/// errors that may pass (timeouts, a restarting server, a watch that expired).
pub fn forbidden_message(error: &watcher::Error) -> Option<&str> {
    let status = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status,
        watcher::Error::WatchError(status) => status,
        _ => return None,
    };
    (status.code == 403).then_some(status.message.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn status(code: u16, message: &str) -> Box<Status> {
        Box::new(Status {
            code,
            message: message.to_owned(),
            reason: if code == 403 { "Forbidden" } else { "Expired" }.to_owned(),
            ..Status::default()
        })
    }

    #[test]
    fn only_403_answers_are_forbidden() {
        let msg = "deployments.apps is forbidden: User \"system:serviceaccount:warmroll:warmroll-coordinator\" cannot list resource \"deployments\" in API group \"apps\" at the cluster scope";
        let list = watcher::Error::InitialListFailed(kube::Error::Api(status(403, msg)));
        assert_eq!(forbidden_message(&list), Some(msg));
        let watch = watcher::Error::WatchError(status(403, "no"));
        assert_eq!(forbidden_message(&watch), Some("no"));
        let expired = watcher::Error::WatchError(status(410, "too old resource version"));
        assert_eq!(forbidden_message(&expired), None);
        assert_eq!(forbidden_message(&watcher::Error::NoResourceVersion), None);
    }

    #[test]
    fn watcher_events_forbid_on_403_only_and_any_answer_allows_again() {
        let health = WatchHealth::default();
        let what = "Deployment labelled p in namespace shop";
        let forbidden: Result<(), _> = Err(watcher::Error::WatchStartFailed(kube::Error::Api(
            status(403, "no"),
        )));
        let expired: Result<(), _> = Err(watcher::Error::WatchError(status(410, "gone")));
        health.observe(what, &expired, "fix it");
        assert!(health.forbidden().is_empty(), "a 410 is not RBAC");
        health.observe(what, &forbidden, "fix it");
        assert_eq!(health.forbidden(), [(what.to_owned(), "no".to_owned())]);
        health.observe(what, &expired, "fix it");
        assert_eq!(
            health.forbidden().len(),
            1,
            "still forbidden until an answer"
        );
        health.observe(what, &Ok(()), "fix it");
        assert!(health.forbidden().is_empty());
        assert_eq!(health.gauge.get(), 0);
    }

    #[test]
    fn forbidden_watches_come_and_go_with_the_gauge() {
        let health = WatchHealth::default();
        assert!(health.forbid("Deployment labelled p in all namespaces", "forbidden"));
        assert!(!health.forbid("Deployment labelled p in all namespaces", "forbidden"));
        assert!(health.forbid("DaemonSet labelled p in all namespaces", "forbidden"));
        assert_eq!(health.gauge.get(), 2);
        assert_eq!(health.forbidden().len(), 2);
        assert!(health.allow("Deployment labelled p in all namespaces"));
        assert!(!health.allow("Deployment labelled p in all namespaces"));
        assert_eq!(health.gauge.get(), 1);
        assert_eq!(
            health.forbidden(),
            [(
                "DaemonSet labelled p in all namespaces".to_owned(),
                "forbidden".to_owned()
            )]
        );
    }
}
