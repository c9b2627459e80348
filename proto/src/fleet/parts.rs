//! Snapshots in parts.
//!
//! A node's whole inventory can be tens of KiB. gRPC stacks keep, for the life of a
//! stream, a receive buffer as large as the largest message (and HTTP/2 frame) seen, so
//! one large snapshot per session would cost the coordinator that much memory per agent
//! for as long as the agent stays connected. The agent therefore sends its snapshot in
//! parts of at most [`SNAPSHOT_PART_BYTES`] (one container or image larger than that
//! makes a part of its own), and the coordinator puts them together with a
//! [`SnapshotAssembly`] before applying the snapshot as one.

use super::{ProtocolError, Snapshot};
use crate::v1;

/// The size a snapshot part stays within (encoded), unless a single entry is larger:
/// one container or two images (see [`crate::codec`] for why so small).
pub const SNAPSHOT_PART_BYTES: usize = 512;

/// The most containers plus images one snapshot may carry over all its parts: far above
/// any node (a few hundred pods), low enough that a misbehaving agent cannot make the
/// coordinator hold an unbounded partial snapshot.
pub const MAX_SNAPSHOT_ENTRIES: usize = 100_000;

/// One received part of a snapshot: `more` says further parts follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPart {
    pub snapshot: Snapshot,
    pub more: bool,
}

/// Splits a snapshot into parts whose encoded size stays within `max_part_bytes` (an
/// entry larger than that gets a part of its own). Every part carries the snapshot's
/// sequence; all but the last have `more` set. An empty snapshot is one empty part.
pub fn split_snapshot(
    snapshot: v1::InventorySnapshot,
    max_part_bytes: usize,
) -> Vec<v1::InventorySnapshot> {
    let mut parts = Parts {
        sequence: snapshot.sequence,
        max_bytes: max_part_bytes,
        done: Vec::new(),
        current: empty_part(snapshot.sequence),
        current_bytes: 0,
    };
    for container in snapshot.containers {
        parts.room_for(&container).containers.push(container);
    }
    for image in snapshot.images {
        parts.room_for(&image).images.push(image);
    }
    let mut done = parts.done;
    let mut last = parts.current;
    last.more = false;
    done.push(last);
    done
}

fn empty_part(sequence: u64) -> v1::InventorySnapshot {
    v1::InventorySnapshot {
        sequence,
        containers: Vec::new(),
        images: Vec::new(),
        more: true,
    }
}

/// The parts made so far and the one being filled.
struct Parts {
    sequence: u64,
    max_bytes: usize,
    done: Vec<v1::InventorySnapshot>,
    current: v1::InventorySnapshot,
    current_bytes: usize,
}

impl Parts {
    /// The part `entry` goes into: the current one, or a new one when it would overflow.
    fn room_for(&mut self, entry: &impl prost::Message) -> &mut v1::InventorySnapshot {
        // The entry's share of its part: its bytes plus the field tag and length prefix.
        let len = entry.encoded_len();
        let bytes = len + 1 + prost::length_delimiter_len(len);
        if self.current_bytes > 0 && self.current_bytes.saturating_add(bytes) > self.max_bytes {
            let full = std::mem::replace(&mut self.current, empty_part(self.sequence));
            self.done.push(full);
            self.current_bytes = 0;
        }
        self.current_bytes += bytes;
        &mut self.current
    }
}

/// Puts a snapshot's parts back together (the coordinator keeps one per session).
#[derive(Debug, Default)]
pub struct SnapshotAssembly {
    pending: Option<Snapshot>,
}

impl SnapshotAssembly {
    /// Whether parts have arrived whose snapshot is not complete yet.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Takes one part; returns the whole snapshot when this was its last part. A part
    /// whose sequence differs from the earlier parts', or parts adding up to more than
    /// [`MAX_SNAPSHOT_ENTRIES`], break the protocol.
    pub fn push(&mut self, part: SnapshotPart) -> Result<Option<Snapshot>, ProtocolError> {
        let SnapshotPart { snapshot, more } = part;
        let whole = match self.pending.take() {
            None => snapshot,
            Some(mut pending) => {
                if pending.sequence != snapshot.sequence {
                    return Err(ProtocolError::invalid(
                        "snapshot.sequence",
                        format!(
                            "a part of snapshot {} arrived before snapshot {} was complete",
                            snapshot.sequence, pending.sequence
                        ),
                    ));
                }
                pending.containers.extend(snapshot.containers);
                pending.images.extend(snapshot.images);
                pending
            }
        };
        let entries = whole.containers.len() + whole.images.len();
        if entries > MAX_SNAPSHOT_ENTRIES {
            return Err(ProtocolError::invalid(
                "snapshot",
                format!("more than {MAX_SNAPSHOT_ENTRIES} containers and images"),
            ));
        }
        if more {
            self.pending = Some(whole);
            Ok(None)
        } else {
            Ok(Some(whole))
        }
    }
}
