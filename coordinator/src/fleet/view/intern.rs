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

/// A container as the view stores it: its id, pod name and pod uid in one allocation,
/// and the shape it shares with the other replicas. A node's containers are an
/// [`IdSet`] keyed by the id inside, so the id is not stored twice.
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

impl Keyed for StoredContainer {
    fn key(&self) -> &str {
        self.id()
    }
}

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

/// One of a node's images: the shared image, in an [`IdSet`] keyed by the image id.
pub(super) struct StoredImage(Arc<SharedImage>);

impl StoredImage {
    pub(super) fn image(&self) -> &NodeImage {
        &self.0.0
    }
}

impl Keyed for StoredImage {
    fn key(&self) -> &str {
        &self.0.0.id
    }
}

/// What an [`IdSet`] finds its entries by.
pub(super) trait Keyed {
    fn key(&self) -> &str;
}

/// A node's containers or images, sorted by id in one exactly-sized allocation: at a
/// node's few dozen entries a binary search costs nothing, while a hash table's spare
/// buckets would cost about a kilobyte per node.
pub(super) struct IdSet<T>(Vec<T>);

impl<T> Default for IdSet<T> {
    fn default() -> Self {
        IdSet(Vec::new())
    }
}

impl<T: Keyed> FromIterator<T> for IdSet<T> {
    /// The first of several entries with one id is kept.
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut entries: Vec<T> = iter.into_iter().collect();
        entries.sort_by(|a, b| a.key().cmp(b.key()));
        entries.dedup_by(|later, earlier| later.key() == earlier.key());
        entries.shrink_to_fit();
        IdSet(entries)
    }
}

impl<T: Keyed> IdSet<T> {
    fn position(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|e| e.key().cmp(key))
    }

    pub(super) fn get(&self, key: &str) -> Option<&T> {
        self.position(key).ok().and_then(|i| self.0.get(i))
    }

    pub(super) fn remove(&mut self, key: &str) {
        if let Ok(i) = self.position(key) {
            self.0.remove(i);
        }
    }

    /// Adds the entry, or replaces the one with its id.
    pub(super) fn upsert(&mut self, entry: T) {
        match self.position(entry.key()) {
            Ok(i) => {
                if let Some(slot) = self.0.get_mut(i) {
                    *slot = entry;
                }
            }
            Err(i) => self.0.insert(i, entry),
        }
    }

    /// Gives back the room growth left over (after a batch of changes).
    pub(super) fn shrink(&mut self) {
        self.0.shrink_to_fit();
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter()
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
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
        let mut set: IdSet<StoredContainer> = [sc, sb, sa].into_iter().collect();
        assert_eq!(set.get("c2").map(StoredContainer::to_container), Some(b));
        assert!(set.get("web-2").is_none());
        let ids = |set: &IdSet<StoredContainer>| -> Vec<String> {
            set.iter().map(|c| c.id().to_owned()).collect()
        };
        assert_eq!(ids(&set), ["c1", "c2", "c3"]);
        set.upsert(store.container(container("c0", "web-0", "web:1")));
        set.upsert(store.container(container("c2", "web-9", "web:1")));
        set.remove("c1");
        set.remove("absent");
        set.shrink();
        assert_eq!(ids(&set), ["c0", "c2", "c3"]);
        assert_eq!(set.get("c2").unwrap().pod_name(), "web-9");
        assert_eq!(set.len(), 3);
        let dup: IdSet<StoredContainer> = [
            store.container(container("c1", "first", "web:1")),
            store.container(container("c1", "second", "web:1")),
        ]
        .into_iter()
        .collect();
        assert_eq!(dup.len(), 1);
        assert_eq!(dup.get("c1").unwrap().pod_name(), "first");
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
