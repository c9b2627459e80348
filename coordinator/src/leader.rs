//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it: the holder
//! renews the Lease every retry period; a candidate takes it over when the holder field is
//! empty (released) or when the Lease record has not changed for a whole lease duration
//! *as measured on the candidate's own clock* (so clock skew between replicas does not
//! matter). Writes carry the `resourceVersion` they read, so two candidates cannot both
//! win. The leader steps down when it could not renew for the renew deadline, and
//! releases the Lease (clears the holder) on shutdown so a successor takes over at once.
//!
//! [`observe`] and [`decide`] are the pure decisions; [`elect`] is the loop, over a
//! [`LeaseStore`] ([`KubeLeases`] in production).

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, instrument, warn};

/// Errors of the Lease API calls (the loop logs them and retries).
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("reading Lease {lease}: {source}")]
    Read { lease: String, source: kube::Error },
    #[error("creating Lease {lease}: {source}")]
    Create { lease: String, source: kube::Error },
    #[error("updating Lease {lease}: {source}")]
    Update { lease: String, source: kube::Error },
}

/// Which Lease, who we are, and how long a holder's claim lasts.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    pub lease_duration: Duration,
}

impl LeaseConfig {
    /// How often the Lease is read and renewed: 2/15 of the duration (2 s for 15 s), at
    /// least 50 ms.
    pub fn retry_period(&self) -> Duration {
        (self.lease_duration * 2 / 15).max(Duration::from_millis(50))
    }

    /// A leader that could not renew for this long steps down: 2/3 of the duration
    /// (10 s for 15 s), well before a candidate may take over.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }
}

/// What a candidate knows about the Lease: its record, and when (on our clock) the record
/// last changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub holder: Option<String>,
    pub renew_time: Option<jiff::Timestamp>,
    pub transitions: i32,
    pub lease_duration: Duration,
    pub changed_at: Instant,
}

/// Folds a fresh read of the Lease into the previous observation: the change time moves
/// only when the holder or its renew time changed.
pub fn observe(previous: Option<&Observation>, spec: &LeaseSpec, now: Instant) -> Observation {
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let renew_time = spec.renew_time.as_ref().map(|t| t.0);
    let lease_duration = Duration::from_secs(
        spec.lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(0),
    );
    let changed_at = match previous {
        Some(p) if p.holder == holder && p.renew_time == renew_time => p.changed_at,
        _ => now,
    };
    Observation {
        holder,
        renew_time,
        transitions: spec.lease_transitions.unwrap_or(0),
        lease_duration,
        changed_at,
    }
}

/// What to do with the Lease now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// There is no Lease: create it, holding it.
    Create,
    /// Free or expired: take it over.
    Acquire,
    /// Ours: renew it.
    Renew,
    /// Someone else holds it and their claim is live.
    Wait,
}

/// The decision on the Lease as observed (`None`: it does not exist).
pub fn decide(lease: Option<&Observation>, identity: &str, now: Instant) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    match lease.holder.as_deref() {
        Some(holder) if holder == identity => Decision::Renew,
        None => Decision::Acquire,
        Some(_) if now.saturating_duration_since(lease.changed_at) >= lease.lease_duration => {
            Decision::Acquire
        }
        Some(_) => Decision::Wait,
    }
}

/// A write's outcome: done, or someone else wrote first (409).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Done,
    Conflict,
}

/// The Lease I/O.
pub trait LeaseStore: Send + Sync {
    fn get(&self) -> impl Future<Output = Result<Option<Lease>, LeaderError>> + Send;
    fn create(&self, lease: &Lease) -> impl Future<Output = Result<Written, LeaderError>> + Send;
    /// Replaces the Lease; `lease.metadata.resource_version` is the precondition.
    fn replace(&self, lease: &Lease) -> impl Future<Output = Result<Written, LeaderError>> + Send;
}

/// The Lease in the Kubernetes API.
pub struct KubeLeases {
    api: Api<Lease>,
    name: String,
    /// `namespace/name`, for error messages.
    label: String,
}

impl KubeLeases {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        KubeLeases {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            label: format!("{namespace}/{name}"),
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 409)
}

impl LeaseStore for KubeLeases {
    async fn get(&self) -> Result<Option<Lease>, LeaderError> {
        self.api
            .get_opt(&self.name)
            .await
            .map_err(|source| LeaderError::Read {
                lease: self.label.clone(),
                source,
            })
    }

    async fn create(&self, lease: &Lease) -> Result<Written, LeaderError> {
        match self.api.create(&PostParams::default(), lease).await {
            Ok(_) => Ok(Written::Done),
            Err(e) if is_conflict(&e) => Ok(Written::Conflict),
            Err(source) => Err(LeaderError::Create {
                lease: self.label.clone(),
                source,
            }),
        }
    }

    async fn replace(&self, lease: &Lease) -> Result<Written, LeaderError> {
        match self
            .api
            .replace(&self.name, &PostParams::default(), lease)
            .await
        {
            Ok(_) => Ok(Written::Done),
            Err(e) if is_conflict(&e) => Ok(Written::Conflict),
            Err(source) => Err(LeaderError::Update {
                lease: self.label.clone(),
                source,
            }),
        }
    }
}

fn now_micro() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

/// The Lease as a new holder writes it.
fn claimed(config: &LeaseConfig, base: Option<Lease>, transitions: i32) -> Lease {
    let mut lease = base.unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(config.namespace.clone()),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    let now = now_micro();
    let mut spec = lease.spec.take().unwrap_or_default();
    spec.holder_identity = Some(config.identity.clone());
    spec.lease_duration_seconds = Some(config.duration_seconds());
    spec.acquire_time = Some(now.clone());
    spec.renew_time = Some(now);
    spec.lease_transitions = Some(transitions);
    lease.spec = Some(spec);
    lease
}

/// Runs the election until `shutdown` completes, publishing on `leader` whether this
/// replica holds the Lease; then releases the Lease if held. Errors of single calls are
/// logged and retried.
#[instrument(skip_all, fields(lease = %format!("{}/{}", config.namespace, config.name), identity = %config.identity))]
pub async fn elect<S: LeaseStore>(
    store: S,
    config: LeaseConfig,
    leader: watch::Sender<bool>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut observed: Option<Observation> = None;
    // When this replica last wrote the Lease successfully as its holder.
    let mut renewed_at: Option<Instant> = None;
    loop {
        let round = async {
            let now = Instant::now();
            match step(&store, &config, &mut observed, now).await {
                Ok(true) => renewed_at = Some(now),
                Ok(false) => {
                    if renewed_at.take().is_some() {
                        warn!("another replica holds the Lease now");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "leader election call failed");
                    if let Some(at) = renewed_at
                        && now.saturating_duration_since(at) >= config.renew_deadline()
                    {
                        warn!(
                            deadline = ?config.renew_deadline(),
                            "could not renew the Lease within the renew deadline; stepping down"
                        );
                        renewed_at = None;
                    }
                }
            }
            let leading = renewed_at.is_some();
            leader.send_if_modified(|l| {
                let changed = *l != leading;
                if changed {
                    info!(leading, "leadership changed");
                }
                *l = leading;
                changed
            });
        };
        tokio::select! {
            () = &mut shutdown => break,
            () = round => {}
        }
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(config.retry_period()) => {}
        }
    }
    let was_leading = *leader.borrow();
    leader.send_replace(false);
    if was_leading {
        release(&store, &config).await;
    }
}

/// One round: read, decide, write. `Ok(true)` when this replica holds the Lease after it.
async fn step<S: LeaseStore>(
    store: &S,
    config: &LeaseConfig,
    observed: &mut Option<Observation>,
    now: Instant,
) -> Result<bool, LeaderError> {
    let current = store.get().await?;
    *observed = current.as_ref().map(|lease| {
        let spec = lease.spec.clone().unwrap_or_default();
        observe(observed.as_ref(), &spec, now)
    });
    let decision = decide(observed.as_ref(), &config.identity, now);
    debug!(?decision, holder = ?observed.as_ref().and_then(|o| o.holder.clone()), "lease round");
    let written = match decision {
        Decision::Wait => return Ok(false),
        Decision::Create => store.create(&claimed(config, None, 0)).await?,
        Decision::Acquire => {
            let transitions = observed
                .as_ref()
                .map_or(0, |o| o.transitions.saturating_add(1));
            store
                .replace(&claimed(config, current, transitions))
                .await?
        }
        Decision::Renew => {
            let mut lease = current.unwrap_or_default();
            let mut spec = lease.spec.take().unwrap_or_default();
            spec.renew_time = Some(now_micro());
            spec.lease_duration_seconds = Some(config.duration_seconds());
            lease.spec = Some(spec);
            store.replace(&lease).await?
        }
    };
    if written == Written::Conflict {
        debug!(?decision, "lost a write race on the Lease");
    } else if decision != Decision::Renew {
        info!(?decision, "acquired the Lease");
    }
    Ok(written == Written::Done)
}

/// Clears the holder (if it is still us) so a successor need not wait for expiry.
async fn release<S: LeaseStore>(store: &S, config: &LeaseConfig) {
    let lease = match store.get().await {
        Ok(Some(lease)) => lease,
        Ok(None) => return,
        Err(e) => {
            warn!(error = %e, "could not release the Lease; it expires on its own");
            return;
        }
    };
    let mut lease = lease;
    let mut spec = lease.spec.take().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = Some(now_micro());
    spec.lease_duration_seconds = Some(1);
    lease.spec = Some(spec);
    match store.replace(&lease).await {
        Ok(Written::Done) => info!("released the Lease"),
        Ok(Written::Conflict) => debug!("the Lease changed before the release"),
        Err(e) => warn!(error = %e, "could not release the Lease; it expires on its own"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn spec(holder: Option<&str>, renew_secs: i64, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            renew_time: Some(MicroTime(
                jiff::Timestamp::from_second(1_700_000_000 + renew_secs).unwrap(),
            )),
            lease_duration_seconds: Some(duration),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn absent_free_and_own_leases_are_taken() {
        let now = Instant::now();
        assert_eq!(decide(None, "me", now), Decision::Create);
        let free = observe(None, &spec(None, 0, 15), now);
        assert_eq!(decide(Some(&free), "me", now), Decision::Acquire);
        let empty = observe(None, &spec(Some(""), 0, 15), now);
        assert_eq!(decide(Some(&empty), "me", now), Decision::Acquire);
        let mine = observe(None, &spec(Some("me"), 0, 15), now);
        assert_eq!(decide(Some(&mine), "me", now), Decision::Renew);
    }

    #[tokio::test(start_paused = true)]
    async fn another_holder_is_waited_for_until_its_record_stops_changing_for_a_duration() {
        let start = Instant::now();
        let first = observe(None, &spec(Some("other"), 0, 15), start);
        assert_eq!(decide(Some(&first), "me", start), Decision::Wait);

        // The holder renews after 10 s: the clock restarts.
        tokio::time::advance(Duration::from_secs(10)).await;
        let renewed = observe(Some(&first), &spec(Some("other"), 10, 15), Instant::now());
        assert_eq!(renewed.changed_at, Instant::now());
        tokio::time::advance(Duration::from_secs(14)).await;
        let same = observe(Some(&renewed), &spec(Some("other"), 10, 15), Instant::now());
        assert_eq!(same.changed_at, renewed.changed_at);
        assert_eq!(decide(Some(&same), "me", Instant::now()), Decision::Wait);

        // 15 s without a change: expired.
        tokio::time::advance(Duration::from_secs(1)).await;
        let still = observe(Some(&same), &spec(Some("other"), 10, 15), Instant::now());
        assert_eq!(
            decide(Some(&still), "me", Instant::now()),
            Decision::Acquire
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_skewed_renew_time_far_in_the_past_is_not_taken_as_expired() {
        // The holder's clock is an hour behind ours: only our own observation counts.
        let now = Instant::now();
        let lease = observe(None, &spec(Some("other"), -3600, 15), now);
        assert_eq!(decide(Some(&lease), "me", now), Decision::Wait);
    }

    #[test]
    fn timings_follow_the_lease_duration() {
        let config = LeaseConfig {
            namespace: "ns".into(),
            name: "l".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(15),
        };
        assert_eq!(config.retry_period(), Duration::from_secs(2));
        assert_eq!(config.renew_deadline(), Duration::from_secs(10));
        assert_eq!(config.duration_seconds(), 15);
    }

    /// An in-memory Lease with resourceVersion preconditions, and a switch to fail calls.
    #[derive(Clone, Default)]
    struct Memory {
        lease: Arc<Mutex<Option<Lease>>>,
        down: Arc<Mutex<bool>>,
    }

    fn api_down() -> kube::Error {
        kube::Error::Service("the API is down".into())
    }

    impl Memory {
        fn holder(&self) -> Option<String> {
            self.lease
                .lock()
                .unwrap()
                .as_ref()
                .and_then(|l| l.spec.as_ref()?.holder_identity.clone())
        }
    }

    impl LeaseStore for Memory {
        async fn get(&self) -> Result<Option<Lease>, LeaderError> {
            if *self.down.lock().unwrap() {
                return Err(LeaderError::Read {
                    lease: "l".into(),
                    source: api_down(),
                });
            }
            Ok(self.lease.lock().unwrap().clone())
        }

        async fn create(&self, lease: &Lease) -> Result<Written, LeaderError> {
            let mut current = self.lease.lock().unwrap();
            if current.is_some() {
                return Ok(Written::Conflict);
            }
            let mut lease = lease.clone();
            lease.metadata.resource_version = Some("1".into());
            *current = Some(lease);
            Ok(Written::Done)
        }

        async fn replace(&self, lease: &Lease) -> Result<Written, LeaderError> {
            if *self.down.lock().unwrap() {
                return Err(LeaderError::Update {
                    lease: "l".into(),
                    source: api_down(),
                });
            }
            let mut current = self.lease.lock().unwrap();
            let version = current
                .as_ref()
                .and_then(|l| l.metadata.resource_version.clone());
            if version != lease.metadata.resource_version {
                return Ok(Written::Conflict);
            }
            let next: u64 = version.unwrap().parse::<u64>().unwrap() + 1;
            let mut lease = lease.clone();
            lease.metadata.resource_version = Some(next.to_string());
            *current = Some(lease);
            Ok(Written::Done)
        }
    }

    fn config(identity: &str) -> LeaseConfig {
        LeaseConfig {
            namespace: "ns".into(),
            name: "l".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
        }
    }

    struct Running {
        leader: watch::Receiver<bool>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(store: &Memory, identity: &str) -> Running {
        let (tx, leader) = watch::channel(false);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(elect(store.clone(), config(identity), tx, async move {
            let _ = stopped.await;
        }));
        Running {
            leader,
            stop: Some(stop),
            task,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_crashed_leader_is_replaced_after_the_lease_duration() {
        let store = Memory::default();
        let mut a = start(&store, "a");
        a.leader.wait_for(|l| *l).await.unwrap();
        let mut b = start(&store, "b");
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(*a.leader.borrow() && !*b.leader.borrow());
        assert_eq!(store.holder().as_deref(), Some("a"));

        // a dies without releasing.
        a.task.abort();
        let crashed = Instant::now();
        b.leader.wait_for(|l| *l).await.unwrap();
        let took = crashed.elapsed();
        assert!(
            took >= Duration::from_secs(13)
                && took <= Duration::from_secs(15) + config("b").retry_period(),
            "took over after {took:?}"
        );
        assert_eq!(store.holder().as_deref(), Some("b"));
        drop(b.stop.take());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopping_leader_releases_and_the_other_takes_over_at_once() {
        let store = Memory::default();
        let mut a = start(&store, "a");
        a.leader.wait_for(|l| *l).await.unwrap();
        let mut b = start(&store, "b");
        tokio::time::sleep(Duration::from_secs(5)).await;
        let _ = a.stop.take().unwrap().send(());
        a.task.await.unwrap();
        assert!(!*a.leader.borrow());
        let released = Instant::now();
        b.leader.wait_for(|l| *l).await.unwrap();
        assert!(released.elapsed() <= config("b").retry_period());
        let transitions = store
            .lease
            .lock()
            .unwrap()
            .as_ref()
            .and_then(|l| l.spec.as_ref()?.lease_transitions);
        assert_eq!(transitions, Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_renew_steps_down_by_the_renew_deadline() {
        let store = Memory::default();
        let mut a = start(&store, "a");
        a.leader.wait_for(|l| *l).await.unwrap();
        *store.down.lock().unwrap() = true;
        let down = Instant::now();
        a.leader.wait_for(|l| !*l).await.unwrap();
        let took = down.elapsed();
        assert!(
            took >= Duration::from_secs(8)
                && took <= Duration::from_secs(10) + config("a").retry_period(),
            "stepped down after {took:?}"
        );
        // Back up: it reacquires its own (still unexpired-by-record) Lease.
        *store.down.lock().unwrap() = false;
        a.leader.wait_for(|l| *l).await.unwrap();
        drop(a.stop.take());
    }
}
