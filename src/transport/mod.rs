//! The transport layer under all three front ends: accepting TCP connections, the TLS handshake,
//! per-listener connection limits, and carrying a byte-stream protocol over a WebSocket.
//!
//! `http`, `mqtt` and `amqp` use this module; it uses none of them. A front end hands
//! [`accept_loop`] the function that serves one TLS stream, and the HTTPS front end hands
//! [`websocket::bridge`] the [`StreamService`] that serves an upgraded WebSocket's bytes, so the
//! front ends never call each other.

pub mod websocket;

use crate::tls::ClientCertInfo;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

/// How long a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the bytes of one connection that arrived some other way than a TLS listener (an
/// upgraded WebSocket): the stream, the TLS client certificate it came with, and a label for logs.
pub type StreamService = Arc<
    dyn Fn(
            tokio::io::DuplexStream,
            Option<ClientCertInfo>,
        ) -> Pin<Box<dyn Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// Most connections each listener holds open at once. Past the limit a listener stops accepting
/// (new clients wait in the kernel's backlog) until a connection closes, so that one kind of
/// client can never use up the file descriptors the others need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub https: usize,
    pub mqtt: usize,
    pub amqp: usize,
}

/// File descriptors kept back for everything that is not a client connection (the store, the
/// certificates, the log, outgoing sockets).
const RESERVED_FDS: u64 = 256;

impl ConnectionLimits {
    /// Limits that fit the process's file-descriptor limit (raised to its hard limit first):
    /// HTTPS clients are service apps, a handful each, so the HTTPS listener gets an eighth
    /// (at most 1,024); MQTT and AMQP devices share the rest.
    pub fn for_this_process() -> Self {
        Self::for_fd_limit(raise_fd_limit())
    }

    /// Limits for `fds` file descriptors.
    pub fn for_fd_limit(fds: u64) -> Self {
        let budget = fds.saturating_sub(RESERVED_FDS).max(64) as usize;
        let https = (budget / 8).clamp(16, 1024);
        let devices = (budget - https.min(budget)) / 2;
        Self {
            https,
            mqtt: devices.max(16),
            amqp: devices.max(16),
        }
    }

    /// The same limit on every listener (the `--max-connections` flag).
    pub fn each(n: usize) -> Self {
        Self {
            https: n,
            mqtt: n,
            amqp: n,
        }
    }
}

/// Raises the soft limit on open files to the hard limit, as servers do, and returns the limit
/// now in force.
fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit; assuming 1024");
            1024
        }
    }
}

/// One listener's settings for [`accept_loop`].
#[derive(Debug, Clone, Copy)]
pub struct ListenerOptions {
    /// Names the listener in logs (`https`, `mqtt`, `amqp`).
    pub name: &'static str,
    pub max_connections: usize,
}

/// Accepts connections on `listener` until `shutdown` resolves. Each connection gets its own
/// task, which sets TCP_NODELAY, runs the TLS handshake under [`HANDSHAKE_TIMEOUT`] and then
/// calls `handle`; a slow or silent client never holds up the accept loop. At most
/// `max_connections` connections are open at once.
///
/// Every connection task runs in a `connection` span (listener, peer, and the identity once the
/// front end records it), so that anything it logs, a panic included ([`log_panics`]), says
/// whose connection it was.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    options: ListenerOptions,
    shutdown: impl Future<Output = ()>,
    handle: F,
) where
    F: Fn(TlsStream<TcpStream>, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let what = options.name;
    let slots = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let mut episode = Episode::default();
    let mut at_limit = false;
    tokio::pin!(shutdown);
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => {
                if at_limit {
                    at_limit = false;
                    tracing::info!(listener = what, "below the connection limit again");
                }
                p
            }
            Err(_) => {
                if !at_limit {
                    at_limit = true;
                    tracing::warn!(
                        listener = what,
                        limit = options.max_connections,
                        "connection limit reached; not accepting until a connection closes"
                    );
                }
                tokio::select! {
                    p = slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    episode.ended(what);
                    a
                }
                Err(e) => {
                    // Out of file descriptors, usually: back off instead of spinning, and say
                    // so once per episode rather than every attempt.
                    episode.failed(what, &e);
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                        () = &mut shutdown => break,
                    }
                }
            },
            () = &mut shutdown => break,
        };
        let (acceptor, handle) = (acceptor.clone(), handle.clone());
        let span = tracing::info_span!(
            "connection",
            listener = what,
            %peer,
            identity = tracing::field::Empty
        );
        tokio::spawn(
            async move {
                let _permit = permit;
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => handle(tls, peer).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            }
            .instrument(span),
        );
    }
}

/// Records the identity a connection authenticated as on its `connection` span.
pub fn record_identity(identity: &impl std::fmt::Display) {
    tracing::Span::current().record("identity", tracing::field::display(identity));
}

/// A run of failed accepts, reported once when it starts and once when it ends.
#[derive(Default)]
struct Episode {
    failures: u64,
}

impl Episode {
    fn failed(&mut self, what: &str, e: &std::io::Error) {
        if self.failures == 0 {
            tracing::error!(
                listener = what,
                error = %e,
                "accept failed; retrying every 50 ms without logging each attempt"
            );
        }
        self.failures += 1;
    }

    fn ended(&mut self, what: &str) {
        if self.failures > 0 {
            tracing::warn!(
                listener = what,
                failed_attempts = self.failures,
                "accepting connections again"
            );
            self.failures = 0;
        }
    }
}

/// Routes panics to the log as errors, inside the span of the task that panicked (so a
/// connection's panic names its listener, peer and identity), instead of the default message on
/// stderr. Tokio contains a panic to its task: the connection ends, the process goes on.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(%location, %message, "a task panicked; its connection is closed");
    }));
}

/// `tokio::spawn` for a connection's helper tasks (an AMQP connection's sessions and links):
/// the task stays in the connection's span, so its logs and panics name the connection.
pub fn spawn<F>(task: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(task.in_current_span())
}
