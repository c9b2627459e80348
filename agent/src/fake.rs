//! A scripted in-memory CRI for unit tests of the inventory and warm-up logic.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use k8s_cri::v1::{
    AuthConfig, Container, ContainerStatus, FilesystemIdentifier, FilesystemUsage, Image,
    PodSandbox, VersionResponse,
};

use crate::cri::{Cri, CriError, EventStream};

#[derive(Default)]
pub struct State {
    pub sandboxes: Vec<PodSandbox>,
    pub containers: Vec<Container>,
    pub statuses: HashMap<String, ContainerStatus>,
    /// Images on the node.
    pub images: Vec<Image>,
    /// What the "registry" serves: tag name -> image (with its repo digests).
    pub registry: HashMap<String, Image>,
    /// Errors the next pulls return, in order.
    pub pull_failures: VecDeque<CriError>,
    /// Errors the next `list_running_containers` calls return.
    pub list_failures: VecDeque<CriError>,
    pub pull_delay: Duration,
    pub fs_mountpoint: String,
    pub last_auth: Option<AuthConfig>,
}

#[derive(Default)]
pub struct FakeCri {
    pub state: Mutex<State>,
    pub pulls: AtomicUsize,
    pub status_calls: AtomicUsize,
    pub active_pulls: AtomicUsize,
    pub max_active_pulls: AtomicUsize,
}

impl FakeCri {
    pub fn with(f: impl FnOnce(&mut State)) -> Self {
        let fake = FakeCri::default();
        f(&mut fake.state.lock().unwrap());
        fake
    }

    pub fn edit(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap());
    }
}

fn unavailable(op: &'static str) -> CriError {
    CriError::Call {
        op,
        code: tonic::Code::Unavailable,
        message: "connection refused".into(),
    }
}

impl Cri for FakeCri {
    async fn version(&self) -> Result<VersionResponse, CriError> {
        Ok(VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "fake".into(),
            runtime_version: "1".into(),
            runtime_api_version: "v1".into(),
        })
    }

    async fn list_pod_sandboxes(&self) -> Result<Vec<PodSandbox>, CriError> {
        Ok(self.state.lock().unwrap().sandboxes.clone())
    }

    async fn list_running_containers(&self) -> Result<Vec<Container>, CriError> {
        let mut s = self.state.lock().unwrap();
        if let Some(e) = s.list_failures.pop_front() {
            return Err(e);
        }
        Ok(s.containers.clone())
    }

    async fn running_container(&self, id: &str) -> Result<Option<Container>, CriError> {
        let mut s = self.state.lock().unwrap();
        if let Some(e) = s.list_failures.pop_front() {
            return Err(e);
        }
        Ok(s.containers.iter().find(|c| c.id == id).cloned())
    }

    async fn container_status(&self, id: &str) -> Result<ContainerStatus, CriError> {
        self.status_calls.fetch_add(1, Ordering::SeqCst);
        self.state
            .lock()
            .unwrap()
            .statuses
            .get(id)
            .cloned()
            .ok_or(CriError::Call {
                op: "ContainerStatus",
                code: tonic::Code::NotFound,
                message: format!("container {id} not found"),
            })
    }

    async fn list_images(&self) -> Result<Vec<Image>, CriError> {
        Ok(self.state.lock().unwrap().images.clone())
    }

    async fn image_status(&self, image: &str) -> Result<Option<Image>, CriError> {
        let s = self.state.lock().unwrap();
        Ok(s.images
            .iter()
            .find(|i| i.id == image || i.repo_tags.iter().any(|t| t == image))
            .cloned())
    }

    async fn pull_image(&self, image: &str, auth: Option<AuthConfig>) -> Result<String, CriError> {
        self.pulls.fetch_add(1, Ordering::SeqCst);
        let now = self.active_pulls.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active_pulls.fetch_max(now, Ordering::SeqCst);
        let delay = self.state.lock().unwrap().pull_delay;
        tokio::time::sleep(delay).await;
        self.active_pulls.fetch_sub(1, Ordering::SeqCst);
        let mut s = self.state.lock().unwrap();
        s.last_auth = auth;
        if let Some(e) = s.pull_failures.pop_front() {
            return Err(e);
        }
        let Some(found) = s.registry.get(image).cloned() else {
            return Err(CriError::Call {
                op: "PullImage",
                code: tonic::Code::Unknown,
                message: format!("failed to resolve reference \"{image}\": {image}: not found"),
            });
        };
        for i in &mut s.images {
            i.repo_tags.retain(|t| t != image);
        }
        match s.images.iter_mut().find(|i| i.id == found.id) {
            Some(existing) => existing.repo_tags.push(image.to_string()),
            None => s.images.push(found.clone()),
        }
        Ok(found.id)
    }

    async fn image_fs_info(&self) -> Result<Vec<FilesystemUsage>, CriError> {
        let s = self.state.lock().unwrap();
        Ok(vec![FilesystemUsage {
            fs_id: Some(FilesystemIdentifier {
                mountpoint: s.fs_mountpoint.clone(),
            }),
            ..Default::default()
        }])
    }

    async fn container_events(&self) -> Result<EventStream, CriError> {
        Err(CriError::Call {
            op: "GetContainerEvents",
            code: tonic::Code::Unimplemented,
            message: "unknown method GetContainerEvents".into(),
        })
    }
}

/// A transient failure as a killed runtime produces it.
pub fn runtime_gone() -> CriError {
    unavailable("PullImage")
}
