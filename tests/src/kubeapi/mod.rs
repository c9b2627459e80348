//! KubeApi: an in-process stand-in for the Kubernetes API server that an unmodified
//! `kube::Client` (and kube-runtime's watcher/reflector) talks to over HTTPS (a test CA)
//! or plain HTTP on loopback, through a generated kubeconfig.
//!
//! Served: apps/v1 Deployments, StatefulSets, DaemonSets (+`/status`); core/v1 Pods
//! (+`/status`), Nodes (+`/status`), Secrets, Events; events.k8s.io/v1 Events (a view of
//! the core Events); coordination.k8s.io/v1 Leases; core/v1 ServiceAccounts and their
//! `token` subresource (TokenRequest: mints a token [`KubeApi`] then authenticates);
//! authentication.k8s.io/v1 TokenReviews and authorization.k8s.io/v1
//! SubjectAccessReviews (create; non-resource URLs allowed by
//! [`KubeApi::grant_non_resource_urls`]). Verbs: get, list (label/field selectors, limit/continue,
//! `resourceVersionMatch=Exact`), watch (from a resourceVersion, bookmarks,
//! `sendInitialEvents`, 410 `Expired` past the retained history, `timeoutSeconds`),
//! create (`generateName`), update, patch (merge, strategic merge, JSON patch; server-side
//! apply is 415), delete (finalizers, preconditions), deletecollection.
//!
//! Not modelled: defaulting and most validation, admission, RBAC (every authenticated
//! user may do anything with resources, except the cluster-wide lists and watches
//! [`KubeApi::forbid_cluster_scope`] takes away from one user), graceful pod deletion
//! unless asked for
//! ([`KubeApiOptions::graceful_pod_deletion`]; else pods go at once, the answer is the pod),
//! `/scale`, managedFields, Table output, protobuf.

mod access;
mod patch;
mod resources;
mod selectors;
mod server;
mod status;
mod store;
mod tokenreview;
mod watch;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use http::Method;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::{net::TcpListener, task::JoinSet};
use tower::ServiceExt;

pub use access::SUPERUSERS;
pub use tokenreview::API_AUDIENCE;

use crate::{scratch, tls::TestCa};
use access::{Grants, NonResourceGrant};
use server::{ClusterScopeForbidden, Shared, lock};
use store::{Store, Subresource};
use tokenreview::{TokenIdentity, Tokens};

/// The user the generated kubeconfig's token authenticates as.
pub const ADMIN_USER: &str = "warmroll-testbed-admin";

/// How to run a [`KubeApi`].
#[derive(Debug, Clone)]
pub struct KubeApiOptions {
    /// HTTPS with a generated CA (default) or plain HTTP.
    pub tls: bool,
    /// Changes kept for watches; a watch from an older resourceVersion gets 410.
    pub history_limit: usize,
    /// How often an open watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
    /// Delete pods bound to a node gracefully, as the API server does: the pod stays,
    /// with `deletionTimestamp` and `deletionGracePeriodSeconds`, until it is deleted
    /// again with a zero grace period (kubelet's part: the sandbox cluster does it).
    /// Off by default: without kubelets, pods go at once.
    pub graceful_pod_deletion: bool,
}

impl Default for KubeApiOptions {
    fn default() -> Self {
        Self {
            tls: true,
            history_limit: 10_000,
            bookmark_interval: Duration::from_secs(5),
            graceful_pod_deletion: false,
        }
    }
}

/// One request the stand-in received (also unauthenticated ones). `Debug` shows the
/// body's size only: bodies carry Secrets and TokenReview tokens.
#[derive(Clone)]
pub struct RecordedRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
    /// The authenticated user, `None` when authentication failed.
    pub user: Option<String>,
}

impl std::fmt::Debug for RecordedRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordedRequest")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query)
            .field("content_type", &self.content_type)
            .field("body_len", &self.body.len())
            .field("user", &self.user)
            .finish()
    }
}

impl RecordedRequest {
    /// The body as JSON (`None` when empty or not JSON).
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// A running API server stand-in; dropping it stops the server.
pub struct KubeApi {
    shared: Arc<Shared>,
    url: String,
    ca_pem: Option<String>,
    config: kube::Config,
    client: kube::Client,
    kubeconfig_path: PathBuf,
    _dir: TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection.
        self.server.abort();
    }
}

impl KubeApi {
    /// Starts an HTTPS stand-in with default options.
    pub async fn start() -> Result<Self> {
        Self::start_with(KubeApiOptions::default()).await
    }

    pub async fn start_with(options: KubeApiOptions) -> Result<Self> {
        let std_listener = scratch::bind_loopback()?;
        std_listener
            .set_nonblocking(true)
            .context("setting listener non-blocking")?;
        let addr = std_listener
            .local_addr()
            .context("reading listener address")?;
        let listener = TcpListener::from_std(std_listener).context("adopting listener")?;

        let admin_token = format!("admin-{:032x}", rand::random::<u128>());
        let mut tokens = Tokens::default();
        tokens.insert(
            admin_token.clone(),
            TokenIdentity {
                username: ADMIN_USER.into(),
                groups: vec!["system:masters".into(), "system:authenticated".into()],
                extra: BTreeMap::new(),
                audiences: Vec::new(),
            },
        );
        let shared = Arc::new(Shared {
            store: Mutex::new({
                let mut store = Store::new(options.history_limit);
                store.graceful_pods = options.graceful_pod_deletion;
                store
            }),
            tokens: Mutex::new(tokens),
            grants: Mutex::new(Grants::default()),
            failing: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            cluster_scope_forbidden: Mutex::new(Vec::new()),
            bookmark_interval: options.bookmark_interval,
            addr,
        });

        let (acceptor, ca_pem, url) = if options.tls {
            let ca = TestCa::new()?;
            let cert = ca.issue(&["localhost", "127.0.0.1"])?;
            let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config()?);
            (
                Some(acceptor),
                Some(ca.cert_pem()),
                format!("https://{addr}"),
            )
        } else {
            (None, None, format!("http://{addr}"))
        };
        let server = tokio::spawn(serve(listener, acceptor, server::router(shared.clone())));

        let dir = scratch::temp_dir("kubeapi")?;
        let kubeconfig_path = dir.path().join("kubeconfig");
        let kubeconfig = kubeconfig_json(&url, ca_pem.as_deref(), &admin_token);
        std::fs::write(&kubeconfig_path, serde_json::to_vec_pretty(&kubeconfig)?)
            .with_context(|| format!("writing {}", kubeconfig_path.display()))?;
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&kubeconfig_path)?,
            &KubeConfigOptions::default(),
        )
        .await
        .context("loading the generated kubeconfig")?;
        crate::tls::install_crypto_provider();
        let client = kube::Client::try_from(config.clone()).context("building kube client")?;
        Ok(Self {
            shared,
            url,
            ca_pem,
            config,
            client,
            kubeconfig_path,
            _dir: dir,
            server,
        })
    }

    /// A client authenticated as [`ADMIN_USER`].
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// The client configuration (from the generated kubeconfig).
    pub fn config(&self) -> kube::Config {
        self.config.clone()
    }

    /// The generated kubeconfig, for a separate process (`KUBECONFIG=...`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// `https://127.0.0.1:<port>` (or `http://`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The CA certificate the server's certificate chains to (`None` over plain HTTP).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Issues a token shaped like a projected ServiceAccount token (a JWT whose claims
    /// carry `sub`, `aud`, `exp` an hour ahead and, when bound to `node`,
    /// `kubernetes.io.node.name`; its signature is random bytes, since only this
    /// stand-in reviews it) and makes it known as [`KubeApi::register_token`] does,
    /// with the node in the review's extras as the real API server puts it.
    pub fn issue_service_account_token(
        &self,
        username: &str,
        audiences: &[&str],
        node: Option<&str>,
    ) -> String {
        use base64::Engine as _;
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let mut claims = serde_json::json!({
            "sub": username,
            "aud": audiences,
            "exp": jiff::Timestamp::now().as_second() + 3600,
            "jti": format!("{:032x}", rand::random::<u128>()),
        });
        if let Some(node) = node {
            claims["kubernetes.io"] = serde_json::json!({"node": {"name": node}});
        }
        let token = format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256","typ":"JWT"}"#),
            b64(claims.to_string().as_bytes()),
            b64(&rand::random::<[u8; 32]>()),
        );
        let extra = node
            .map(|n| {
                BTreeMap::from([(
                    "authentication.kubernetes.io/node-name".to_owned(),
                    vec![n.to_owned()],
                )])
            })
            .unwrap_or_default();
        self.register_token(
            &token,
            username,
            vec![
                "system:serviceaccounts".into(),
                "system:authenticated".into(),
            ],
            extra,
            audiences.iter().map(|a| a.to_string()).collect(),
        );
        token
    }

    /// Makes `token` known: API calls with it authenticate as `username` when its
    /// audiences are empty or include [`API_AUDIENCE`], and TokenReviews answer for it
    /// (an empty `audiences` means [`API_AUDIENCE`]).
    pub fn register_token(
        &self,
        token: &str,
        username: &str,
        groups: Vec<String>,
        extra: BTreeMap<String, Vec<String>>,
        audiences: Vec<String>,
    ) {
        lock(&self.shared.tokens).insert(
            token.to_string(),
            TokenIdentity {
                username: username.to_string(),
                groups,
                extra,
                audiences,
            },
        );
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// The requests that were not GETs (creates, updates, patches, deletes, reviews).
    pub fn writes(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.method != Method::GET)
            .collect()
    }

    /// A client authenticated as `user` (member of `groups` and
    /// `system:authenticated`), through a token registered for it.
    pub fn client_as(&self, user: &str, groups: &[&str]) -> Result<kube::Client> {
        let token = format!("user-{:032x}", rand::random::<u128>());
        let mut groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        groups.push("system:authenticated".into());
        self.register_token(&token, user, groups, BTreeMap::new(), Vec::new());
        let mut config = self.config();
        config.auth_info =
            serde_json::from_value(json!({ "token": token })).context("building auth info")?;
        kube::Client::try_from(config).with_context(|| format!("building a client for {user}"))
    }

    /// Answers `user`'s cluster-wide lists and watches of `resource` in API `group`
    /// (`""` for core) with 403 Forbidden from now on, as the real API server does for a
    /// user whose grants are Roles only; namespaced requests and other users are
    /// unaffected. [`KubeApi::allow_cluster_scope`] undoes it.
    pub fn forbid_cluster_scope(&self, user: &str, group: &str, resource: &str) {
        lock(&self.shared.cluster_scope_forbidden).push(ClusterScopeForbidden {
            user: user.to_owned(),
            group: group.to_owned(),
            resource: resource.to_owned(),
        });
    }

    /// Allows every cluster-wide list and watch again (RBAC fixed).
    pub fn allow_cluster_scope(&self) {
        lock(&self.shared.cluster_scope_forbidden).clear();
    }

    /// Grants `verbs` on the non-resource URLs `urls` (`/fleet/*` matches by prefix) to
    /// the user or group `subject`, for SubjectAccessReviews, as an RBAC ClusterRole with
    /// `nonResourceURLs` bound to it would. Members of [`SUPERUSERS`] need no grant.
    pub fn grant_non_resource_urls(&self, subject: &str, verbs: &[&str], urls: &[&str]) {
        lock(&self.shared.grants).add(NonResourceGrant {
            subject: subject.to_owned(),
            verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
            urls: urls.iter().map(|u| (*u).to_owned()).collect(),
        });
    }

    /// Answers every authenticated request whose path starts with `prefix` with 500
    /// `InternalError` from now on (recorded first), as an API server whose storage
    /// times out; [`KubeApi::heal_paths`] undoes it.
    pub fn fail_path(&self, prefix: &str) {
        lock(&self.shared.failing).push(prefix.to_owned());
    }

    /// Answers every path normally again.
    pub fn heal_paths(&self) {
        lock(&self.shared.failing).clear();
    }

    pub fn reset_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Forgets the watch history: every open or new watch from an earlier
    /// resourceVersion, and every continue token, gets 410 Gone.
    pub fn compact(&self) {
        lock(&self.shared.store).compact();
    }

    /// Stores an object directly (not recorded as a request), keeping its `status` as a
    /// controller would have written it. Namespaced objects without a namespace go to
    /// `default`. Returns the stored object (uid, resourceVersion, generation set).
    pub fn insert<K>(&self, obj: &K) -> Result<K>
    where
        K: k8s_openapi::Resource + Serialize + DeserializeOwned,
    {
        let rt = resources::for_type::<K>()
            .ok_or_else(|| anyhow!("KubeApi does not serve {}", K::KIND))?;
        let value = rt.to_storage(serde_json::to_value(obj)?);
        let namespace = value
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        let stored = lock(&self.shared.store)
            .create(rt, &namespace, value, true)
            .map_err(|e| anyhow!("inserting {}: {}", K::KIND, e.message))?;
        Ok(serde_json::from_value(rt.to_view(stored))?)
    }

    /// The stored object (`namespace` is ignored for cluster-scoped types).
    pub fn get<K>(&self, namespace: &str, name: &str) -> Result<Option<K>>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        let rt = resources::for_type::<K>()
            .ok_or_else(|| anyhow!("KubeApi does not serve {}", K::KIND))?;
        match lock(&self.shared.store).get(rt, namespace, name) {
            Ok(obj) => Ok(Some(serde_json::from_value(rt.to_view(obj))?)),
            Err(e) if e.code == 404 => Ok(None),
            Err(e) => Err(anyhow!(e.message)),
        }
    }

    /// Writes an object's `status` as its controller (or kubelet) would: through the
    /// status subresource, bumping resourceVersion and notifying watches.
    pub fn set_status<K>(&self, namespace: &str, name: &str, status: &impl Serialize) -> Result<K>
    where
        K: k8s_openapi::Resource + DeserializeOwned,
    {
        let rt = resources::for_type::<K>()
            .ok_or_else(|| anyhow!("KubeApi does not serve {}", K::KIND))?;
        let status = json!({"status": serde_json::to_value(status)?});
        let stored = lock(&self.shared.store)
            .update(rt, namespace, name, status, Subresource::Status)
            .map_err(|e| {
                anyhow!(
                    "setting status of {} {namespace}/{name}: {}",
                    K::KIND,
                    e.message
                )
            })?;
        Ok(serde_json::from_value(rt.to_view(stored))?)
    }

    /// [`KubeApi::set_status`] for a Pod, as kubelet reports it.
    pub fn set_pod_status(&self, namespace: &str, name: &str, status: PodStatus) -> Result<Pod> {
        self.set_status::<Pod>(namespace, name, &status)
    }
}

fn kubeconfig_json(url: &str, ca_pem: Option<&str>, token: &str) -> Value {
    use base64::Engine;
    let mut cluster = json!({"server": url});
    if let Some(pem) = ca_pem {
        cluster["certificate-authority-data"] =
            json!(base64::engine::general_purpose::STANDARD.encode(pem));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "warmroll-testbed", "cluster": cluster}],
        "users": [{"name": ADMIN_USER, "user": {"token": token}}],
        "contexts": [{"name": "warmroll-testbed", "context": {
            "cluster": "warmroll-testbed", "user": ADMIN_USER, "namespace": "default"
        }}],
        "current-context": "warmroll-testbed",
    })
}

/// Accepts connections until aborted; each connection is served by hyper (HTTP/1.1 or
/// HTTP/2) and lives in a JoinSet so aborting this task closes them all.
async fn serve(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    app: axum::Router,
) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let app = app.clone();
        let acceptor = acceptor.clone();
        connections.spawn(async move {
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    app.clone().oneshot(req.map(axum::body::Body::new))
                });
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let result = match acceptor {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(tls) => {
                        builder
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                            .await
                    }
                    Err(_) => return,
                },
                None => {
                    builder
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!("kubeapi connection ended: {e}");
            }
        });
    }
}
