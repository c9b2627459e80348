//! The CNCF registry (`/usr/bin/docker-registry`, distribution 2.8) started per test,
//! behind an in-process front proxy that is its only public endpoint.
//!
//! ```text
//!   client ──(http or https)──▶ front proxy ──(plain http, loopback)──▶ docker-registry
//!                                 │  records method/path/status of every request
//!                                 │  injects faults (429, 5xx, closed connections, down)
//!                                 │  throttles response bodies and adds latency
//!                                 └─ serves the token endpoint (`/token`) for token auth,
//!                                    its answers dressed as a test asks (absurd
//!                                    lifetimes, huge bodies: `set_token_answer`)
//! ```
//!
//! Why this arrangement:
//! - Counting and fault injection need to see every HTTP request, so the proxy must read
//!   plain HTTP. With TLS on, the proxy therefore terminates TLS with a certificate from
//!   the registry's [`TestCa`] and talks plain HTTP to the backend on a loopback port
//!   nobody else is told about. Clients see exactly what a TLS registry looks like; the
//!   registry's own `http.tls` code is not exercised (it is Go's stock TLS server).
//! - Authentication is still enforced by the real registry (`auth.htpasswd` /
//!   `auth.token`); the proxy passes `Authorization` through untouched.
//! - The registry is configured with `http.host` = the proxy's public URL, so the upload
//!   `Location` URLs it hands out point back at the proxy.
//! - The token endpoint is served by the proxy at `/token` on the same host, as GHCR
//!   does (`realm="https://ghcr.io/token"`), so token fetches are counted too.
//!
//! The registry process is spawned with `setpriv --pdeathsig KILL` from a keeper thread
//! owned by [`Registry`]: it is killed when the guard is dropped (also during a panic)
//! and, by the kernel, if the test process dies without running destructors.

mod proxy;
mod token;

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::scratch;
use crate::tls::TestCa;

pub use proxy::{Fault, FaultRule, RecordedRequest};
pub use token::TokenServerAnswer;

/// Path of the registry binary (Debian package `docker-registry`).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// The `service` name the registry announces in token challenges.
const TOKEN_SERVICE: &str = "warmroll-testbed-registry";
/// The `iss` claim of tokens the test bed issues.
const TOKEN_ISSUER: &str = "warmroll-testbed-token-issuer";

/// How clients authenticate to a test registry.
#[derive(Clone, PartialEq, Eq)]
enum Auth {
    None,
    Basic { user: String, password: String },
    Token { user: String, password: String },
}

impl fmt::Debug for Auth {
    // Passwords never reach a Debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Basic { user, .. } => write!(f, "Basic {{ user: {user:?} }}"),
            Auth::Token { user, .. } => write!(f, "Token {{ user: {user:?} }}"),
        }
    }
}

/// Which registry to start: plain HTTP or TLS, without auth, with htpasswd basic auth or
/// with token auth. Builders combine: `RegistryOptions::plain().tls().token("u", "p")`.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    tls: bool,
    auth: Auth,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self::plain()
    }
}

impl RegistryOptions {
    /// Plain HTTP, no authentication.
    pub fn plain() -> Self {
        Self {
            tls: false,
            auth: Auth::None,
        }
    }

    /// Serve HTTPS with a certificate from a CA generated for this registry
    /// ([`Registry::ca_pem`]).
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// htpasswd basic auth with one user (bcrypt entry generated at start).
    pub fn basic(mut self, user: &str, password: &str) -> Self {
        self.auth = Auth::Basic {
            user: user.to_string(),
            password: password.to_string(),
        };
        self
    }

    /// Token auth: the registry answers `401` with
    /// `WWW-Authenticate: Bearer realm="<scheme>://<host>/token",service=...,scope=...`,
    /// and the test bed's token endpoint hands out signed JWTs to this one user (GET with
    /// basic credentials, the OAuth2 POST form with `grant_type=password`, or with
    /// `grant_type=refresh_token` and [`Registry::identity_token`]).
    pub fn token(mut self, user: &str, password: &str) -> Self {
        self.auth = Auth::Token {
            user: user.to_string(),
            password: password.to_string(),
        };
        self
    }
}

/// A running registry. Dropping it stops the proxy, kills the registry process (and
/// waits for it) and removes its storage.
pub struct Registry {
    host: String,
    tls: bool,
    ca: Option<TestCa>,
    credentials: Option<(String, String)>,
    identity_token: Option<String>,
    proxy: proxy::Proxy,
    process: RegistryProcess,
    // Dropped last: the registry process must be gone before its storage is removed.
    _dir: TempDir,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("host", &self.host)
            .field("tls", &self.tls)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Starts the registry and its front proxy and waits until `/v2/` answers.
    pub async fn start(options: RegistryOptions) -> Result<Registry> {
        check_binaries()?;
        let dir = scratch::temp_dir("registry")?;
        let listener = scratch::bind_loopback()?;
        let public = listener.local_addr().context("reading proxy address")?;
        let host = public.to_string();
        let backend = scratch::free_loopback_addr()?;
        let scheme = if options.tls { "https" } else { "http" };

        let ca = if options.tls {
            Some(TestCa::new().context("generating the registry CA")?)
        } else {
            None
        };
        let server_tls = match &ca {
            Some(ca) => Some(
                ca.issue(&["localhost", "127.0.0.1"])
                    .context("issuing the registry's server certificate")?
                    .server_config()?,
            ),
            None => None,
        };

        let mut token_issuer = None;
        let mut identity_token = None;
        let auth_yaml = match &options.auth {
            Auth::None => String::new(),
            Auth::Basic { user, password } => {
                let hash = bcrypt::hash(password, 5).context("hashing htpasswd password")?;
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, format!("{user}:{hash}\n"))
                    .with_context(|| format!("writing {}", path.display()))?;
                format!(
                    "auth:\n  htpasswd:\n    realm: warmroll-testbed\n    path: {}\n",
                    path.display()
                )
            }
            Auth::Token { user, password } => {
                let issuer = token::TokenIssuer::new(
                    TOKEN_ISSUER,
                    TOKEN_SERVICE,
                    user.clone(),
                    password.clone(),
                )?;
                let bundle = dir.path().join("token-root.pem");
                std::fs::write(&bundle, issuer.root_pem())
                    .with_context(|| format!("writing {}", bundle.display()))?;
                identity_token = Some(issuer.refresh_token().to_owned());
                token_issuer = Some(issuer);
                format!(
                    "auth:\n  token:\n    realm: {scheme}://{host}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                    bundle.display()
                )
            }
        };

        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
             http:\n  addr: {backend}\n  host: {scheme}://{host}\n  secret: {secret}\n\
             {auth_yaml}",
            data = dir.path().join("data").display(),
            secret = hex::encode(rand::random::<[u8; 16]>()),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;

        let process = RegistryProcess::spawn(&config_path, &dir.path().join("registry.log"))?;
        let proxy = proxy::Proxy::start(listener, backend, server_tls, token_issuer)?;
        let registry = Registry {
            host,
            tls: options.tls,
            ca,
            credentials: match options.auth {
                Auth::None => None,
                Auth::Basic { user, password } | Auth::Token { user, password } => {
                    Some((user, password))
                }
            },
            identity_token,
            proxy,
            process,
            _dir: dir,
        };
        registry.wait_ready(backend).await?;
        Ok(registry)
    }

    async fn wait_ready(&self, backend: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.process.exit_status() {
                bail!(
                    "docker-registry exited during start-up ({status}); its log:\n{}",
                    self.process.log_tail()
                );
            }
            if proxy::backend_answers(backend).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "docker-registry did not answer /v2/ on {backend} within 20s; its log:\n{}",
                    self.process.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `127.0.0.1:<port>`, as used in image references (`{host}/app:latest`).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `"http"` or `"https"`.
    /// An oci-client configuration that reaches this registry: its protocol, and its CA
    /// when it serves TLS.
    pub fn oci_client_config(&self) -> oci_client::client::ClientConfig {
        use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
        crate::tls::install_crypto_provider();
        ClientConfig {
            protocol: if self.scheme() == "https" {
                ClientProtocol::Https
            } else {
                ClientProtocol::Http
            },
            extra_root_certificates: self
                .ca_pem()
                .map(|pem| Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: pem.into_bytes(),
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// `{scheme}://{host}`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.host)
    }

    /// The CA certificate (PEM) clients must trust, when TLS is on.
    pub fn ca_pem(&self) -> Option<String> {
        self.ca.as_ref().map(TestCa::cert_pem)
    }

    /// The CA, when TLS is on (for rustls client configs: `ca.client_config()`).
    pub fn ca(&self) -> Option<&TestCa> {
        self.ca.as_ref()
    }

    /// The one user and password, when basic or token auth is on.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// With token auth, the identity token (OAuth2 refresh token) the token endpoint
    /// takes for its user, as `docker login` stores it in `identitytoken`.
    pub fn identity_token(&self) -> Option<&str> {
        self.identity_token.as_deref()
    }

    /// Every request the proxy answered (or dropped), oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.proxy.state.requests()
    }

    /// How many requests had this method and exactly this path (no query).
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.proxy
            .state
            .requests()
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    }

    /// Forgets the recorded requests.
    pub fn reset_requests(&self) {
        self.proxy.state.reset_requests();
    }

    /// Adds a fault rule; rules are tried in the order added, the first match applies.
    pub fn inject(&self, rule: FaultRule) {
        self.proxy.state.inject(rule);
    }

    /// Removes all fault rules (the "down" switch and link shaping stay as they are).
    pub fn clear_faults(&self) {
        self.proxy.state.clear_faults();
    }

    /// While down, new connections are accepted and closed at once without an answer,
    /// and requests on open keep-alive connections are dropped (connection closed).
    pub fn set_down(&self, down: bool) {
        self.proxy.state.set_down(down);
    }

    /// Models a slow link: response bodies of all connections together flow at most at
    /// `bytes_per_sec` (None: unlimited).
    pub fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        self.proxy.state.set_bandwidth(bytes_per_sec);
    }

    /// Delay added before each request is answered.
    pub fn set_latency(&self, latency: Duration) {
        self.proxy.state.set_latency(latency);
    }

    /// How the token endpoint (token auth) dresses its answers from now on.
    pub fn set_token_answer(&self, answer: TokenServerAnswer) {
        self.proxy.state.set_token_answer(answer);
    }
}

/// Fails with an install hint when the registry or setpriv binary is missing.
fn check_binaries() -> Result<()> {
    if !Path::new(REGISTRY_BIN).exists() {
        bail!(
            "{REGISTRY_BIN} is missing: install the Debian package `docker-registry` \
             (scripts/test does this when run as root)"
        );
    }
    if !Path::new(SETPRIV_BIN).exists() {
        bail!("{SETPRIV_BIN} is missing: install the Debian package `util-linux`");
    }
    Ok(())
}

const SETPRIV_BIN: &str = "/usr/bin/setpriv";

/// The registry process, owned by a keeper thread: the thread that spawns a process with
/// `--pdeathsig` must outlive it, or the kernel kills the process when the thread ends.
struct RegistryProcess {
    stop: Option<mpsc::Sender<()>>,
    keeper: Option<JoinHandle<()>>,
    exited: Arc<Mutex<Option<ExitStatus>>>,
    log: std::path::PathBuf,
}

impl RegistryProcess {
    fn spawn(config: &Path, log: &Path) -> Result<Self> {
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let log_err = log_file
            .try_clone()
            .with_context(|| format!("duplicating {}", log.display()))?;
        let mut command = Command::new(SETPRIV_BIN);
        command
            .args(["--pdeathsig", "KILL", "--", REGISTRY_BIN, "serve"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err);

        let (spawned_tx, spawned_rx) = mpsc::channel::<std::io::Result<()>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let exited = Arc::new(Mutex::new(None));
        let exited_keeper = exited.clone();
        let keeper = std::thread::Builder::new()
            .name("registry-keeper".into())
            .spawn(move || {
                let mut child: Child = match command.spawn() {
                    Ok(child) => {
                        let _ = spawned_tx.send(Ok(()));
                        child
                    }
                    Err(e) => {
                        let _ = spawned_tx.send(Err(e));
                        return;
                    }
                };
                loop {
                    match stop_rx.recv_timeout(Duration::from_millis(100)) {
                        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                    }
                    if let Ok(Some(status)) = child.try_wait() {
                        if let Ok(mut exited) = exited_keeper.lock() {
                            *exited = Some(status);
                        }
                        return;
                    }
                }
                let _ = child.kill();
                let _ = child.wait();
            })
            .context("starting the registry keeper thread")?;
        match spawned_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = keeper.join();
                return Err(e).context(format!("spawning {REGISTRY_BIN}"));
            }
            Err(_) => bail!("the registry keeper thread ended before spawning {REGISTRY_BIN}"),
        }
        Ok(Self {
            stop: Some(stop_tx),
            keeper: Some(keeper),
            exited,
            log: log.to_path_buf(),
        })
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        self.exited.lock().ok().and_then(|e| *e)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.join();
        }
    }
}
