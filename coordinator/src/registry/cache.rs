//! Single-flight plus a short cache, so one reference costs one request per interval
//! however many workloads ask; and a content-addressed cache of parsed manifests.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use warmroll_proto::image::Digest;

use super::manifest::ParsedManifest;

struct Cached<V> {
    value: V,
    completed: Instant,
}

type Slot<V> = Arc<tokio::sync::Mutex<Option<Cached<V>>>>;

/// Callers of one key share one fetch: a caller that arrives while a fetch is under
/// way waits for it and takes its result; a later caller takes the cached result for
/// `fresh_for`, then fetches again. Different keys never wait for each other (each key
/// has its own async lock; the map lock is held only to find the slot).
pub(crate) struct SingleFlight<K, V> {
    slots: Mutex<HashMap<K, Slot<V>>>,
    fresh_for: Duration,
}

impl<K: Eq + Hash + Clone, V: Clone> SingleFlight<K, V> {
    pub(crate) fn new(fresh_for: Duration) -> Self {
        SingleFlight {
            slots: Mutex::new(HashMap::new()),
            fresh_for,
        }
    }

    pub(crate) async fn get_or_fetch<F, Fut>(&self, key: &K, fetch: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let arrived = Instant::now();
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            slots.entry(key.clone()).or_default().clone()
        };
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref() {
            // Finished after we arrived: we were waiting on that very fetch.
            let shared = c.completed >= arrived;
            let fresh = Instant::now() < c.completed + self.fresh_for;
            if shared || fresh {
                return c.value.clone();
            }
        }
        let value = fetch().await;
        *cached = Some(Cached {
            value: value.clone(),
            completed: Instant::now(),
        });
        value
    }
}

/// Parsed manifests by digest. Content-addressed, so entries never go stale; the
/// oldest are dropped past `capacity` to bound memory.
pub(crate) struct ManifestCache {
    inner: Mutex<(HashMap<Digest, ParsedManifest>, VecDeque<Digest>)>,
    capacity: usize,
}

impl ManifestCache {
    pub(crate) fn new(capacity: usize) -> Self {
        ManifestCache {
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
            capacity: capacity.max(1),
        }
    }

    pub(crate) fn get(&self, digest: &Digest) -> Option<ParsedManifest> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.0.get(digest).cloned()
    }

    pub(crate) fn insert(&self, digest: Digest, manifest: ParsedManifest) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let (map, order) = &mut *inner;
        if map.insert(digest.clone(), manifest).is_none() {
            order.push_back(digest);
        }
        while map.len() > self.capacity {
            match order.pop_front() {
                Some(oldest) => {
                    map.remove(&oldest);
                }
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    async fn counted(
        flight: &SingleFlight<&'static str, usize>,
        key: &'static str,
        calls: &AtomicUsize,
    ) -> usize {
        flight
            .get_or_fetch(&key, || async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                calls.fetch_add(1, Ordering::SeqCst) + 1
            })
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_fetch() {
        let flight = SingleFlight::new(Duration::from_secs(60));
        let calls = AtomicUsize::new(0);
        let results =
            futures::future::join_all((0..100).map(|_| counted(&flight, "a", &calls))).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(results.iter().all(|&r| r == 1));
    }

    #[tokio::test(start_paused = true)]
    async fn cache_expires_after_the_interval() {
        let flight = SingleFlight::new(Duration::from_secs(60));
        let calls = AtomicUsize::new(0);
        assert_eq!(counted(&flight, "a", &calls).await, 1);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(counted(&flight, "a", &calls).await, 1, "still fresh");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            counted(&flight, "a", &calls).await,
            2,
            "expired: fetched again"
        );
        assert_eq!(
            counted(&flight, "b", &calls).await,
            3,
            "other key, own fetch"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keys_do_not_wait_for_each_other() {
        let flight: SingleFlight<&str, u8> = SingleFlight::new(Duration::ZERO);
        let slow = flight.get_or_fetch(&"slow", || async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            1
        });
        let fast = flight.get_or_fetch(&"fast", || async { 2 });
        tokio::select! {
            _ = slow => panic!("the slow key finished first"),
            v = fast => assert_eq!(v, 2),
        }
    }

    #[test]
    fn manifest_cache_is_bounded() {
        let cache = ManifestCache::new(2);
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
        }
        assert!(cache.get(&digests[0]).is_none());
        assert_eq!(cache.get(&digests[2]), Some(manifest));
    }
}
