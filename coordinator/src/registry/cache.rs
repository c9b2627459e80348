//! The resolver's caches, all bounded `moka` caches: resolutions (single-flight plus a
//! short cache, so one reference costs one request per interval however many workloads
//! ask), parsed manifests by digest, authorizations until their token expires, and each
//! registry host's pacing. Each holds at most a set number of entries (the least
//! recently used go first), so no stream of distinct images, credentials or hosts from
//! workloads and pull secrets grows the coordinator's memory.

use std::hash::Hash;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::policy::EvictionPolicy;
use warmroll_proto::image::Digest;

use super::manifest::ParsedManifest;

/// The longest a resolution is reused, whatever `min_interval` says (moka refuses a
/// time to live past 1000 years).
const MAX_FRESH_FOR: Duration = Duration::from_secs(24 * 3600);
/// A registry host nobody asked for this long is forgotten (its health report too).
/// Longer than any wait it can impose (Retry-After and backoff are capped below it).
const HOST_IDLE: Duration = Duration::from_secs(3600);

/// Resolutions by key. Callers of one key share one fetch: moka's `get_with` runs one
/// init per key and a caller arriving meanwhile waits for it and takes its result; a
/// later caller takes the cached result for `fresh_for`, then fetches again. Different
/// keys never wait for each other.
pub(crate) fn resolutions<K, V>(fresh_for: Duration, capacity: u64) -> moka::future::Cache<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    moka::future::Cache::builder()
        .max_capacity(capacity)
        .time_to_live(fresh_for.min(MAX_FRESH_FOR))
        .eviction_policy(EvictionPolicy::lru())
        .build()
}

/// Parsed manifests by digest. Content-addressed, so entries never go stale.
pub(crate) fn manifests(capacity: u64) -> moka::sync::Cache<Digest, ParsedManifest> {
    moka::sync::Cache::builder()
        .max_capacity(capacity)
        .eviction_policy(EvictionPolicy::lru())
        .build()
}

/// Per-host state by host, forgotten after [`HOST_IDLE`] without a request.
pub(crate) fn hosts<V>(capacity: u64) -> moka::sync::Cache<String, V>
where
    V: Clone + Send + Sync + 'static,
{
    moka::sync::Cache::builder()
        .max_capacity(capacity)
        .time_to_idle(HOST_IDLE)
        .eviction_policy(EvictionPolicy::lru())
        .build()
}

/// A value kept for its own lifetime (an authorization until its token expires).
#[derive(Debug, Clone)]
pub(crate) struct Expiring<V> {
    pub value: V,
    pub lifetime: Duration,
}

struct ByLifetime;

impl<K, V> Expiry<K, Expiring<V>> for ByLifetime {
    fn expire_after_create(&self, _: &K, value: &Expiring<V>, _: Instant) -> Option<Duration> {
        Some(value.lifetime)
    }

    fn expire_after_update(
        &self,
        _: &K,
        value: &Expiring<V>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.lifetime)
    }
}

/// Values by key, each gone after its own [`Expiring::lifetime`].
pub(crate) fn expiring<K, V>(capacity: u64) -> moka::sync::Cache<K, Expiring<V>>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    moka::sync::Cache::builder()
        .max_capacity(capacity)
        .expire_after(ByLifetime)
        .eviction_policy(EvictionPolicy::lru())
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type Flights = moka::future::Cache<&'static str, usize>;

    async fn counted(flights: &Flights, key: &'static str, calls: &AtomicUsize) -> usize {
        flights
            .get_with(key, async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                calls.fetch_add(1, Ordering::SeqCst) + 1
            })
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_fetch() {
        // Even with nothing kept: callers that arrive during the fetch share it.
        for fresh_for in [Duration::from_secs(60), Duration::ZERO] {
            let flights = resolutions(fresh_for, 100);
            let calls = AtomicUsize::new(0);
            let results =
                futures::future::join_all((0..100).map(|_| counted(&flights, "a", &calls))).await;
            assert_eq!(calls.load(Ordering::SeqCst), 1);
            assert!(results.iter().all(|&r| r == 1));
        }
    }

    // moka keeps its own clock: expiry is tested in real time.
    #[tokio::test]
    async fn resolutions_expire_after_the_interval() {
        let flights = resolutions(Duration::from_millis(300), 100);
        let calls = AtomicUsize::new(0);
        assert_eq!(counted(&flights, "a", &calls).await, 1);
        assert_eq!(counted(&flights, "a", &calls).await, 1, "still fresh");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            counted(&flights, "a", &calls).await,
            2,
            "expired: fetched again"
        );
        assert_eq!(
            counted(&flights, "b", &calls).await,
            3,
            "other key, own fetch"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keys_do_not_wait_for_each_other() {
        let flights: moka::future::Cache<&str, u8> = resolutions(Duration::ZERO, 10);
        let slow = flights.get_with("slow", async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            1
        });
        let fast = flights.get_with("fast", async { 2 });
        tokio::select! {
            _ = slow => panic!("the slow key finished first"),
            v = fast => assert_eq!(v, 2),
        }
    }

    #[tokio::test]
    async fn resolutions_are_bounded() {
        let flights = resolutions(Duration::from_secs(60), 2);
        let calls = AtomicUsize::new(0);
        for key in ["a", "b", "c", "d"] {
            counted(&flights, key, &calls).await;
        }
        flights.run_pending_tasks().await;
        assert!(flights.entry_count() <= 2, "{}", flights.entry_count());
        assert_eq!(
            counted(&flights, "d", &calls).await,
            4,
            "the newest is kept"
        );
    }

    #[test]
    fn manifest_cache_is_bounded() {
        let cache = manifests(2);
        let manifest = ParsedManifest {
            media_type: "m".into(),
            children: Arc::from([]),
        };
        let digests: Vec<Digest> = ["a", "b", "c"]
            .iter()
            .map(|c| Digest::sha256_hex(&c.repeat(64)).unwrap())
            .collect();
        for d in &digests {
            cache.insert(d.clone(), manifest.clone());
            cache.run_pending_tasks();
        }
        assert!(cache.get(&digests[0]).is_none());
        assert_eq!(cache.get(&digests[2]), Some(manifest));
    }

    #[test]
    fn expiring_entries_live_their_own_lifetime() {
        let cache = expiring::<&str, u8>(10);
        let short = Duration::from_millis(200);
        cache.insert(
            "short",
            Expiring {
                value: 1,
                lifetime: short,
            },
        );
        cache.insert(
            "long",
            Expiring {
                value: 2,
                lifetime: Duration::from_secs(60),
            },
        );
        cache.insert(
            "none",
            Expiring {
                value: 3,
                lifetime: Duration::ZERO,
            },
        );
        assert_eq!(cache.get("short").map(|e| e.value), Some(1));
        assert!(cache.get("none").is_none(), "a zero lifetime is not kept");
        std::thread::sleep(Duration::from_millis(300));
        assert!(cache.get("short").is_none());
        assert_eq!(cache.get("long").map(|e| e.value), Some(2));
        // A renewed entry lives its new lifetime.
        cache.insert(
            "long",
            Expiring {
                value: 4,
                lifetime: short,
            },
        );
        std::thread::sleep(Duration::from_millis(300));
        assert!(cache.get("long").is_none());
    }

    #[test]
    fn hosts_are_bounded() {
        let cache = hosts::<u8>(2);
        for (i, host) in ["a.io", "b.io", "c.io"].into_iter().enumerate() {
            cache.get_with_by_ref(host, || u8::try_from(i).unwrap());
            cache.run_pending_tasks();
        }
        assert!(cache.entry_count() <= 2);
        assert_eq!(cache.get("c.io"), Some(2));
    }
}
