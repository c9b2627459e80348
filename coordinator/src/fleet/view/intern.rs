//! Compact storage of the fleet's inventories. Replicas of one pod template on many
//! nodes share everything but their container id, pod name and uid, and one image is
//! reported identically by every node that holds it; so the view keeps that shared part
//! once, behind an `Arc`, found through an interner. Unused entries are swept when an
//! interner shard has doubled since its last sweep (amortised O(1)).

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Arc, Mutex};

use warmroll_proto::fleet::{Container, NodeImage, PodRef};
use warmroll_proto::image::Digest;

const SHARDS: usize = 16;
const SWEEP_FLOOR: usize = 1024;

struct Shard<T> {
    set: HashSet<Arc<T>>,
    live_after_sweep: usize,
}

/// Hands out one shared `Arc` per distinct value.
pub(super) struct Interner<T> {
    shards: Box<[Mutex<Shard<T>>; SHARDS]>,
    hasher: RandomState,
}

impl<T: Hash + Eq> Interner<T> {
    pub(super) fn new() -> Self {
        Interner {
            shards: Box::new(std::array::from_fn(|_| {
                Mutex::new(Shard {
                    set: HashSet::new(),
                    live_after_sweep: 0,
                })
            })),
            hasher: RandomState::new(),
        }
    }

    pub(super) fn intern(&self, value: T) -> Arc<T> {
        // Truncating the hash is fine: it only spreads values over shards.
        let index = self.hasher.hash_one(&value) as usize % SHARDS;
        #[allow(clippy::indexing_slicing)] // index < SHARDS, the array's length
        let mut shard = self.shards[index].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = shard.set.get(&value) {
            return shared.clone();
        }
        if shard.set.len() >= (shard.live_after_sweep * 2).max(SWEEP_FLOOR) {
            shard.set.retain(|v| Arc::strong_count(v) > 1);
            shard.live_after_sweep = shard.set.len();
        }
        let shared = Arc::new(value);
        shard.set.insert(shared.clone());
        shared
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).set.len())
            .sum()
    }
}

/// What the containers of one pod template share.
#[derive(PartialEq, Eq, Hash)]
pub(super) struct Shape {
    namespace: String,
    labels: BTreeMap<String, String>,
    name: String,
    image: String,
    image_id: String,
    digest: Option<Digest>,
}

/// A container as the view stores it (its id is the map key).
pub(super) struct StoredContainer {
    pod_name: Box<str>,
    pod_uid: Box<str>,
    shape: Arc<Shape>,
}

/// A node image, hashable (the proto type is not).
#[derive(PartialEq, Eq)]
pub(super) struct SharedImage(pub(super) NodeImage);

impl Hash for SharedImage {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let image = &self.0;
        image.id.hash(state);
        image.repo_tags.hash(state);
        image.repo_digests.hash(state);
        image.size.hash(state);
    }
}

/// The interners of one fleet view.
pub(super) struct Store {
    shapes: Interner<Shape>,
    images: Interner<SharedImage>,
}

impl Store {
    pub(super) fn new() -> Self {
        Store {
            shapes: Interner::new(),
            images: Interner::new(),
        }
    }

    /// Splits a container into its key (the id) and its stored form.
    pub(super) fn container(&self, c: Container) -> (Box<str>, StoredContainer) {
        let shape = self.shapes.intern(Shape {
            namespace: c.pod.namespace,
            labels: c.pod_labels,
            name: c.name,
            image: c.image,
            image_id: c.image_id,
            digest: c.digest,
        });
        (
            c.id.into_boxed_str(),
            StoredContainer {
                pod_name: c.pod.name.into_boxed_str(),
                pod_uid: c.pod.uid.into_boxed_str(),
                shape,
            },
        )
    }

    pub(super) fn image(&self, image: NodeImage) -> (Box<str>, Arc<SharedImage>) {
        let id = image.id.clone().into_boxed_str();
        (id, self.images.intern(SharedImage(image)))
    }
}

impl StoredContainer {
    pub(super) fn namespace(&self) -> &str {
        &self.shape.namespace
    }

    /// The container again, as the agent reported it.
    pub(super) fn to_container(&self, id: &str) -> Container {
        let shape = &*self.shape;
        Container {
            id: id.to_owned(),
            pod: PodRef {
                namespace: shape.namespace.clone(),
                name: self.pod_name.to_string(),
                uid: self.pod_uid.to_string(),
            },
            pod_labels: shape.labels.clone(),
            name: shape.name.clone(),
            image: shape.image.clone(),
            image_id: shape.image_id.clone(),
            digest: shape.digest.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(id: &str, pod: &str, image: &str) -> Container {
        Container {
            id: id.into(),
            pod: PodRef {
                namespace: "ns".into(),
                name: pod.into(),
                uid: format!("uid-{pod}"),
            },
            pod_labels: BTreeMap::from([("app".into(), "web".into())]),
            name: "app".into(),
            image: image.into(),
            image_id: "sha256:cfg".into(),
            digest: None,
        }
    }

    #[test]
    fn replicas_share_one_shape_and_come_back_unchanged() {
        let store = Store::new();
        let a = container("c1", "web-1", "web:1");
        let b = container("c2", "web-2", "web:1");
        let (ida, sa) = store.container(a.clone());
        let (idb, sb) = store.container(b.clone());
        assert!(Arc::ptr_eq(&sa.shape, &sb.shape));
        assert_eq!(sa.to_container(&ida), a);
        assert_eq!(sb.to_container(&idb), b);
        let (_, sc) = store.container(container("c3", "web-3", "web:2"));
        assert!(!Arc::ptr_eq(&sa.shape, &sc.shape));
    }

    #[test]
    fn unused_values_are_swept_as_the_interner_grows() {
        let interner = Interner::new();
        let kept = interner.intern("kept".to_string());
        for i in 0..(SWEEP_FLOOR * SHARDS * 4) {
            drop(interner.intern(format!("transient-{i}")));
        }
        assert!(
            interner.len() <= SWEEP_FLOOR * SHARDS * 2 + 1,
            "{} entries",
            interner.len()
        );
        assert!(Arc::ptr_eq(&kept, &interner.intern("kept".to_string())));
    }
}
