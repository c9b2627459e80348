//! Compact storage of the fleet's inventories. Replicas of one pod template on many
//! nodes share everything but their container id, pod name and uid, and one image is
//! reported identically by every node that holds it; so the view keeps that shared part
//! once, behind an `Arc`, found through an interner. Unused entries are swept when an
//! interner shard has doubled since its last sweep (amortised O(1)).

use std::borrow::Borrow;
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

/// A container as the view stores it: its id, pod name and pod uid in one allocation,
/// and the shape it shares with the other replicas. A node's containers are a set keyed
/// by id (through `Borrow<str>`), so the id is not stored twice.
pub(super) struct StoredContainer {
    /// The id, the pod name and the pod uid, back to back.
    text: Box<str>,
    id_len: usize,
    pod_name_len: usize,
    shape: Arc<Shape>,
}

impl StoredContainer {
    pub(super) fn id(&self) -> &str {
        self.text.get(..self.id_len).unwrap_or_default()
    }

    fn pod_name(&self) -> &str {
        let end = self.id_len + self.pod_name_len;
        self.text.get(self.id_len..end).unwrap_or_default()
    }

    fn pod_uid(&self) -> &str {
        let start = self.id_len + self.pod_name_len;
        self.text.get(start..).unwrap_or_default()
    }

    pub(super) fn namespace(&self) -> &str {
        &self.shape.namespace
    }

    /// The container again, as the agent reported it.
    pub(super) fn to_container(&self) -> Container {
        let shape = &*self.shape;
        Container {
            id: self.id().to_owned(),
            pod: PodRef {
                namespace: shape.namespace.clone(),
                name: self.pod_name().to_owned(),
                uid: self.pod_uid().to_owned(),
            },
            pod_labels: shape.labels.clone(),
            name: shape.name.clone(),
            image: shape.image.clone(),
            image_id: shape.image_id.clone(),
            digest: shape.digest.clone(),
        }
    }
}

// Identity is the id alone, consistently with `Borrow<str>`.
impl Borrow<str> for StoredContainer {
    fn borrow(&self) -> &str {
        self.id()
    }
}

impl Hash for StoredContainer {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id().hash(state);
    }
}

impl PartialEq for StoredContainer {
    fn eq(&self, other: &Self) -> bool {
        self.id() == other.id()
    }
}

impl Eq for StoredContainer {}

/// A node image, hashable (the proto type is not); shared by every node that has it.
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

/// One of a node's images: the shared image, in a set keyed by the image id.
pub(super) struct StoredImage(Arc<SharedImage>);

impl StoredImage {
    pub(super) fn image(&self) -> &NodeImage {
        &self.0.0
    }
}

impl Borrow<str> for StoredImage {
    fn borrow(&self) -> &str {
        &self.0.0.id
    }
}

impl Hash for StoredImage {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.0.id.hash(state);
    }
}

impl PartialEq for StoredImage {
    fn eq(&self, other: &Self) -> bool {
        self.0.0.id == other.0.0.id
    }
}

impl Eq for StoredImage {}

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

    /// A container in its stored form.
    pub(super) fn container(&self, c: Container) -> StoredContainer {
        let shape = self.shapes.intern(Shape {
            namespace: c.pod.namespace,
            labels: c.pod_labels,
            name: c.name,
            image: c.image,
            image_id: c.image_id,
            digest: c.digest,
        });
        let mut text = String::with_capacity(c.id.len() + c.pod.name.len() + c.pod.uid.len());
        text.push_str(&c.id);
        text.push_str(&c.pod.name);
        text.push_str(&c.pod.uid);
        StoredContainer {
            text: text.into_boxed_str(),
            id_len: c.id.len(),
            pod_name_len: c.pod.name.len(),
            shape,
        }
    }

    pub(super) fn image(&self, image: NodeImage) -> StoredImage {
        StoredImage(self.images.intern(SharedImage(image)))
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
        let sa = store.container(a.clone());
        let sb = store.container(b.clone());
        assert!(Arc::ptr_eq(&sa.shape, &sb.shape));
        assert_eq!(sa.to_container(), a);
        assert_eq!(sb.to_container(), b);
        assert_eq!(sa.id(), "c1");
        let sc = store.container(container("c3", "web-3", "web:2"));
        assert!(!Arc::ptr_eq(&sa.shape, &sc.shape));
        // Found by id alone.
        let set: HashSet<StoredContainer> = [sa, sb, sc].into_iter().collect();
        assert_eq!(set.get("c2").map(StoredContainer::to_container), Some(b));
        assert!(!set.contains("web-2"));
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
