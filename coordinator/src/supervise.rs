//! The coordinator's long-lived tasks, watched: the policy engine (with its workload
//! watches), the fleet server, the HTTP server and the leader election each run until
//! shutdown. If one ends before that, for whatever reason (an error, a panic, a return),
//! `/readyz` says which and why, and `run` stops the process with an error so that
//! Kubernetes restarts it: a coordinator never keeps answering "ready" with a part of
//! it gone.

use std::fmt::Display;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::task::{AbortHandle, Id, JoinError, JoinHandle, JoinSet};

/// Why a supervised task ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the {task} task ended: {why}")]
pub struct TaskEnded {
    pub task: &'static str,
    pub why: String,
}

/// What health checks read: the first task that ended, if any. Clones share it.
#[derive(Debug, Clone, Default)]
pub struct Ended {
    first: Arc<Mutex<Option<TaskEnded>>>,
}

impl Ended {
    /// The first supervised task that ended, if one did.
    pub fn get(&self) -> Option<TaskEnded> {
        self.first
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, ended: &TaskEnded) {
        let mut first = self.first.lock().unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(ended.clone());
        }
    }
}

fn join_error(e: &JoinError) -> String {
    if e.is_panic() {
        "it panicked".to_owned()
    } else {
        "it was cancelled".to_owned()
    }
}

/// Aborts a task spawned elsewhere when dropped.
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs named tasks and reports the first one to end.
#[derive(Default)]
pub struct Supervisor {
    tasks: JoinSet<Result<(), String>>,
    names: Vec<(Id, &'static str)>,
    ended: Ended,
}

impl Supervisor {
    /// What `/readyz` reads.
    pub fn ended(&self) -> Ended {
        self.ended.clone()
    }

    /// Runs `task` as `name`. It should run until shutdown; an `Ok` before then is an
    /// end like any other.
    pub fn spawn<E: Display>(
        &mut self,
        name: &'static str,
        task: impl Future<Output = Result<(), E>> + Send + 'static,
    ) -> AbortHandle {
        let handle = self
            .tasks
            .spawn(async move { task.await.map_err(|e| e.to_string()) });
        self.names.push((handle.id(), name));
        handle
    }

    /// Watches a task spawned elsewhere as `name`; aborting the supervisor's tasks
    /// aborts it too.
    pub fn adopt<E: Display + Send + 'static>(
        &mut self,
        name: &'static str,
        handle: JoinHandle<Result<(), E>>,
    ) -> AbortHandle {
        let guard = AbortOnDrop(handle.abort_handle());
        self.spawn(name, async move {
            let _guard = guard;
            match handle.await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(e) => Err(join_error(&e)),
            }
        })
    }

    fn name(&self, id: Id) -> &'static str {
        self.names
            .iter()
            .find(|(task, _)| *task == id)
            .map_or("unnamed", |(_, name)| name)
    }

    /// Waits for the first task to end and says which and why (also to [`Ended`]).
    /// Pending for ever when there are no tasks.
    pub async fn first_end(&mut self) -> TaskEnded {
        let Some(joined) = self.tasks.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let ended = match joined {
            Ok((id, Ok(()))) => TaskEnded {
                task: self.name(id),
                why: "it returned before shutdown".to_owned(),
            },
            Ok((id, Err(why))) => TaskEnded {
                task: self.name(id),
                why,
            },
            Err(e) => TaskEnded {
                task: self.name(e.id()),
                why: join_error(&e),
            },
        };
        self.ended.set(&ended);
        ended
    }

    /// After shutdown began: waits for the remaining tasks, or aborts them when
    /// `within` passes first. Returns whether they all ended in time.
    pub async fn drain(&mut self, within: std::time::Duration) -> bool {
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(within, all).await.is_ok() {
            return true;
        }
        self.tasks.abort_all();
        false
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn forever() -> impl Future<Output = Result<(), String>> {
        std::future::pending()
    }

    #[tokio::test]
    async fn each_way_a_task_can_end_is_named_and_kept_for_health() {
        type Ending = fn() -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
        let cases: [(&str, Ending, &str); 3] = [
            (
                "returned",
                || Box::pin(async { Ok(()) }),
                "returned before shutdown",
            ),
            (
                "failed",
                || Box::pin(async { Err("the listener closed".to_owned()) }),
                "the listener closed",
            ),
            (
                "panicked",
                || Box::pin(async { panic!("overflow when adding duration to instant") }),
                "panicked",
            ),
        ];
        for (name, ending, why) in cases {
            let mut supervisor = Supervisor::default();
            let health = supervisor.ended();
            supervisor.spawn("engine", forever());
            supervisor.spawn("fleet server", forever());
            supervisor.spawn(name, ending());
            assert_eq!(health.get(), None);
            let ended = tokio::time::timeout(Duration::from_secs(5), supervisor.first_end())
                .await
                .unwrap();
            assert_eq!(ended.task, name);
            assert!(ended.why.contains(why), "{name}: {}", ended.why);
            assert_eq!(health.get(), Some(ended.clone()));
            assert!(
                ended
                    .to_string()
                    .starts_with(&format!("the {name} task ended"))
            );
            assert!(
                !supervisor.drain(Duration::from_millis(50)).await,
                "the others run on"
            );
        }
    }

    #[tokio::test]
    async fn an_adopted_task_is_watched_and_aborted_with_the_others() {
        let mut supervisor = Supervisor::default();
        let engine = tokio::spawn(async { Err::<(), _>("the watch of Deployments ended") });
        supervisor.adopt("policy engine", engine);
        let ended = supervisor.first_end().await;
        assert_eq!(ended.task, "policy engine");
        assert_eq!(ended.why, "the watch of Deployments ended");

        let mut supervisor = Supervisor::default();
        let running = tokio::spawn(forever());
        let abort = running.abort_handle();
        supervisor.adopt("policy engine", running);
        assert!(!supervisor.drain(Duration::from_millis(20)).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(abort.is_finished(), "aborted with its watcher");
    }

    #[tokio::test]
    async fn tasks_that_stop_on_shutdown_drain() {
        let mut supervisor = Supervisor::default();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        for name in ["engine", "leader election"] {
            let mut stopped = stopped.clone();
            supervisor.spawn(name, async move {
                let _ = stopped.wait_for(|s| *s).await;
                Ok::<(), String>(())
            });
        }
        stop.send_replace(true);
        assert!(supervisor.drain(Duration::from_secs(5)).await);
    }
}
