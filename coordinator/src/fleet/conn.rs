//! The fleet API's connections: a cap on how many are open at once, and a switch per
//! connection that closes it from the coordinator's side.
//!
//! An agent that stops reading its stream cannot be dropped from inside gRPC: HTTP/2
//! flow control parks the stream's writer, and the peer still answers keep-alive pings.
//! So every accepted connection carries a [`Kill`] in its connect info; the session
//! handler keeps it, and the fleet view trips it when it ends a session the agent no
//! longer reads. The next read or write on that connection then fails, which ends it
//! (and every stream on it).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures::Stream;
use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;
use tracing::warn;

/// Closes one connection from the coordinator's side. Clones share the switch.
#[derive(Debug, Clone, Default)]
pub struct Kill {
    inner: Arc<KillInner>,
}

#[derive(Debug, Default)]
struct KillInner {
    tripped: AtomicBool,
    waker: AtomicWaker,
}

impl Kill {
    /// Closes the connection: its pending and next reads and writes fail.
    pub fn trip(&self) {
        self.inner.tripped.store(true, Ordering::Release);
        self.inner.waker.wake();
    }

    fn poll_tripped(&self, cx: &mut Context<'_>) -> bool {
        self.inner.waker.register(cx.waker());
        self.inner.tripped.load(Ordering::Acquire)
    }
}

/// What a session learns about its connection (a request extension).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    pub kill: Kill,
}

/// An accepted connection: the TCP stream, its switch and its slot under the cap.
pub struct Conn {
    stream: TcpStream,
    info: ConnInfo,
    _slot: OwnedSemaphorePermit,
}

fn killed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the coordinator closed this agent's connection",
    )
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.info.kill.poll_tripped(cx) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.info.kill.poll_tripped(cx) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.info.kill.poll_tripped(cx) {
            return Poll::Ready(Err(killed()));
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// Accepts connections from `listener`, at most `max_open` open at once: past the cap a
/// new connection is closed at once (agents retry with backoff), so a flood of
/// connections costs a file descriptor for a moment, not a TLS handshake and a stream.
pub fn incoming(
    listener: TcpListener,
    max_open: usize,
) -> impl Stream<Item = io::Result<Conn>> + Send + 'static {
    let max_open = max_open.max(1);
    let slots = Arc::new(Semaphore::new(max_open));
    futures::stream::unfold((listener, slots), move |(listener, slots)| async move {
        loop {
            let (stream, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                // A failed accept (out of descriptors, a reset before accept) is not the
                // server's end; the next one may work.
                Err(e) => {
                    warn!(error = %e, "accepting a fleet API connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                warn!(%remote, max_open, "too many fleet API connections open; closing a new one");
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let conn = Conn {
                stream,
                info: ConnInfo {
                    remote: Some(remote),
                    kill: Kill::default(),
                },
                _slot: slot,
            };
            return Some((Ok(conn), (listener, slots)));
        }
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_stream::StreamExt as _;

    use super::*;

    #[tokio::test]
    async fn a_tripped_switch_ends_a_pending_read_and_the_cap_closes_extra_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = Box::pin(incoming(listener, 1));
        let _client = TcpStream::connect(addr).await.unwrap();
        let mut conn = accepted.next().await.unwrap().unwrap();
        let kill = conn.connect_info().kill;
        let read = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            conn.read(&mut buf).await
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!read.is_finished(), "nothing was sent, so the read waits");
        kill.trip();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .expect("the tripped switch wakes the read")
            .unwrap();
        assert_eq!(ended.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);

        // The first connection's slot is free again only once it is dropped: it was,
        // with the task. A second connection fits; a third (while the second is open)
        // is closed by the server.
        let _second = TcpStream::connect(addr).await.unwrap();
        let second = accepted.next().await.unwrap().unwrap();
        let mut third = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            // Polling the stream accepts the third connection and closes it.
            let next = tokio::time::timeout(std::time::Duration::from_millis(200), accepted.next());
            let _ = next.await;
            third.read(&mut buf).await
        })
        .await
        .expect("the third connection is closed");
        assert_eq!(closed.unwrap_or(0), 0, "closed without data");
        let _ = third.write_all(b"x").await;
        drop(second);
    }
}
