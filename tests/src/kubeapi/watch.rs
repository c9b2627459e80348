//! One watch stream: newline-delimited `{"type": ..., "object": ...}` events, bookmarks,
//! and the end of the stream at `timeoutSeconds`.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::{sync::broadcast, time::Instant};

use super::{
    resources::ResourceType,
    store::{EventType, Key, Selection, StoredEvent, WatchStart},
};

/// The watch query parameters that shape the stream.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub bookmarks: bool,
    /// `sendInitialEvents=true`: end the initial ADDED events with a bookmark annotated
    /// `k8s.io/initial-events-end`.
    pub initial_events_end: bool,
    pub timeout: Option<Duration>,
    pub bookmark_interval: Duration,
}

pub struct WatchSession {
    rt: &'static ResourceType,
    selection: Selection,
    queue: VecDeque<Value>,
    receiver: broadcast::Receiver<Arc<StoredEvent>>,
    /// The newest resourceVersion this stream has passed (safe to resume from).
    last_rv: u64,
    options: WatchOptions,
    next_bookmark: Instant,
    deadline: Option<Instant>,
    done: bool,
}

impl WatchSession {
    pub fn new(
        rt: &'static ResourceType,
        selection: Selection,
        start: WatchStart,
        options: WatchOptions,
    ) -> Self {
        let mut session = Self {
            rt,
            selection,
            queue: VecDeque::new(),
            receiver: start.receiver,
            last_rv: start.start_rv,
            next_bookmark: Instant::now() + options.bookmark_interval,
            deadline: options.timeout.map(|t| Instant::now() + t),
            options,
            done: false,
        };
        for (key, obj) in &start.initial {
            if session.selection.matches(rt, key, obj) {
                session.queue.push_back(session.event("ADDED", obj));
            }
        }
        if session.options.initial_events_end && session.options.bookmarks {
            let bookmark = session.bookmark(true);
            session.queue.push_back(bookmark);
        }
        for event in &start.backlog {
            session.translate(event);
        }
        session
    }

    fn event(&self, kind: &str, obj: &Value) -> Value {
        json!({"type": kind, "object": self.rt.to_view(obj.clone())})
    }

    fn bookmark(&self, initial_end: bool) -> Value {
        let mut metadata = json!({"resourceVersion": self.last_rv.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        json!({"type": "BOOKMARK", "object": {
            "kind": self.rt.kind,
            "apiVersion": self.rt.api_version(),
            "metadata": metadata,
        }})
    }

    /// Queues what this stream sees of a change: selection transitions become ADDED or
    /// DELETED, as in the API server's watch cache.
    fn translate(&mut self, event: &StoredEvent) {
        if event.key.storage != self.rt.storage {
            return;
        }
        let matches = |key: &Key, obj: &Value| self.selection.matches(self.rt, key, obj);
        let now = matches(&event.key, &event.object);
        let before = event.prev.as_ref().is_some_and(|p| matches(&event.key, p));
        let kind = match event.kind {
            EventType::Added if now => "ADDED",
            EventType::Modified if now && before => "MODIFIED",
            EventType::Modified if now => "ADDED",
            EventType::Modified if before => "DELETED",
            EventType::Deleted if now || before => "DELETED",
            _ => return,
        };
        let line = self.event(kind, &event.object);
        self.queue.push_back(line);
    }

    /// The next line of the stream, or `None` when it ends.
    pub async fn next_line(&mut self) -> Option<Bytes> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                let mut line = event.to_string().into_bytes();
                line.push(b'\n');
                return Some(Bytes::from(line));
            }
            if self.done {
                return None;
            }
            let deadline = self.deadline;
            tokio::select! {
                received = self.receiver.recv() => match received {
                    Ok(event) => {
                        self.last_rv = self.last_rv.max(event.rv);
                        self.translate(&event);
                    }
                    // A watcher that fell behind is closed; the client resumes from its
                    // last resourceVersion.
                    Err(_) => self.done = true,
                },
                () = tokio::time::sleep_until(self.next_bookmark), if self.options.bookmarks => {
                    self.next_bookmark += self.options.bookmark_interval;
                    let bookmark = self.bookmark(false);
                    self.queue.push_back(bookmark);
                }
                () = sleep_until_opt(deadline), if deadline.is_some() => self.done = true,
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
