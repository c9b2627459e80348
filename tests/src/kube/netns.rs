//! The cluster's own network namespace: every cluster process and pod lives in it, with
//! private addresses that never touch the host's network. A holder process keeps it
//! alive; [`NetNs::command`] starts a program inside it; TCP relays carry the host's
//! connections in (to the API server) and the cluster's out (to the test registry on
//! the host's loopback).
//!
//! The relays open their sockets inside the namespace from one thread that joined it
//! (`setns` changes only the calling thread); a socket keeps the namespace it was made
//! in, so the tokio tasks that serve them run anywhere.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::daemon::Daemon;

const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
const HOLDER_TIMEOUT: Duration = Duration::from_secs(10);

/// Socket work done inside the namespace by the thread that joined it.
enum Job {
    Listen(SocketAddr, oneshot::Sender<io::Result<StdListener>>),
    Connect(SocketAddr, oneshot::Sender<io::Result<StdStream>>),
}

/// The namespace, its holder process and its relays (stopped on drop).
pub struct NetNs {
    holder: Daemon,
    path: String,
    jobs: mpsc::Sender<Job>,
    relays: Mutex<JoinSet<()>>,
    /// Target → its relay's host address.
    relayed: Mutex<HashMap<SocketAddr, SocketAddr>>,
}

impl NetNs {
    /// Starts the holder (`unshare --net`, named after `dir` so leftovers can be found)
    /// and the socket thread. The namespace has only a loopback interface, down:
    /// [`Self::run`] a setup script next.
    pub fn create(dir: &Path) -> Result<NetNs> {
        let mut command = Command::new("unshare");
        command
            .args([
                "--net",
                "--",
                "bash",
                "-c",
                r#"exec -a "$0" sleep infinity"#,
            ])
            .arg(dir.join("netns-holder"));
        let mut holder = Daemon::spawn("netns holder", command, &dir.join("netns-holder.log"))?;
        let pid = holder
            .pid()
            .ok_or_else(|| anyhow!("the netns holder has no pid"))?;
        let path = format!("/proc/{pid}/ns/net");
        let own = std::fs::read_link("/proc/self/ns/net").context("reading /proc/self/ns/net")?;
        let deadline = Instant::now() + HOLDER_TIMEOUT;
        while std::fs::read_link(&path).ok().as_ref() == Some(&own) || !Path::new(&path).exists() {
            holder.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "`unshare --net` did not enter a new network namespace within {HOLDER_TIMEOUT:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        let (jobs, receiver) = mpsc::channel();
        std::thread::Builder::new()
            .name("netns-sockets".into())
            .spawn(move || serve_jobs(file, receiver))
            .context("starting the netns socket thread")?;
        Ok(NetNs {
            holder,
            path,
            jobs,
            relays: Mutex::new(JoinSet::new()),
            relayed: Mutex::new(HashMap::new()),
        })
    }

    /// `program` run inside the namespace (through `nsenter --net`), in the host's
    /// mount namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.path))
            .arg("--")
            .arg(program);
        command
    }

    /// The `--net=` argument for `nsenter`.
    pub fn nsenter_arg(&self) -> String {
        format!("--net={}", self.path)
    }

    /// Runs a shell script inside the namespace and fails with its output if it fails.
    pub fn run(&self, what: &str, script: &str) -> Result<()> {
        let output = self
            .command("sh")
            .args(["-euc", script])
            .output()
            .with_context(|| format!("{what}: running nsenter"))?;
        if !output.status.success() {
            bail!(
                "{what} failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    async fn job<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<io::Result<T>>) -> Job,
    ) -> io::Result<T> {
        dispatch(&self.jobs, job).await
    }

    /// A host loopback port whose connections are carried to `target` inside the
    /// namespace; one per target, however often it is asked for (tests poll through it).
    pub async fn relay_in(&self, target: SocketAddr) -> Result<SocketAddr> {
        if let Some(local) = self.relayed().get(&target) {
            return Ok(*local);
        }
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a loopback relay port")?;
        let local = listener.local_addr().context("reading the relay address")?;
        let jobs = self.jobs.clone();
        self.relays().spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let jobs = jobs.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = dispatch(&jobs, |tx| Job::Connect(target, tx)).await else {
                        return;
                    };
                    let _ = pipe(inbound, outbound).await;
                });
            }
        });
        self.relayed().insert(target, local);
        Ok(local)
    }

    /// Listens on `listen` inside the namespace and carries each connection to `target`
    /// on the host.
    pub async fn relay_out(&self, listen: SocketAddr, target: SocketAddr) -> Result<()> {
        let listener = self
            .job(|tx| Job::Listen(listen, tx))
            .await
            .with_context(|| format!("listening on {listen} in the cluster network"))?;
        listener
            .set_nonblocking(true)
            .context("making the relay listener non-blocking")?;
        let listener = TcpListener::from_std(listener).context("registering the relay listener")?;
        self.relays().spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut { inbound }, &mut { outbound })
                            .await;
                    }
                });
            }
        });
        Ok(())
    }

    /// Stops the relays and the holder; the namespace goes when its last process and
    /// socket are gone.
    pub fn stop(&mut self) -> Result<()> {
        self.relays().abort_all();
        self.holder.stop()
    }
}

impl NetNs {
    fn relays(&self) -> std::sync::MutexGuard<'_, JoinSet<()>> {
        self.relays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn relayed(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, SocketAddr>> {
        self.relayed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

async fn dispatch<T>(
    jobs: &mpsc::Sender<Job>,
    job: impl FnOnce(oneshot::Sender<io::Result<T>>) -> Job,
) -> io::Result<T> {
    let (tx, rx) = oneshot::channel();
    jobs.send(job(tx))
        .map_err(|_| io::Error::other("the netns socket thread has ended"))?;
    rx.await
        .map_err(|_| io::Error::other("the netns socket thread dropped a job"))?
}

async fn pipe(inbound: TcpStream, outbound: StdStream) -> io::Result<()> {
    outbound.set_nonblocking(true)?;
    let mut outbound = TcpStream::from_std(outbound)?;
    let mut inbound = inbound;
    tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await?;
    Ok(())
}

fn serve_jobs(netns: File, jobs: mpsc::Receiver<Job>) {
    let joined = setns(&netns, CloneFlags::CLONE_NEWNET);
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Listen(addr, reply) => {
                let _ = reply.send(match joined {
                    Ok(()) => StdListener::bind(addr),
                    Err(e) => Err(io::Error::other(format!("setns: {e}"))),
                });
            }
            Job::Connect(addr, reply) => {
                let _ = reply.send(match joined {
                    Ok(()) => StdStream::connect_timeout(&addr, DIAL_TIMEOUT),
                    Err(e) => Err(io::Error::other(format!("setns: {e}"))),
                });
            }
        }
    }
}
