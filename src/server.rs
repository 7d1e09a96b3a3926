//! Listeners and the accept loop: client connection limits, the plain-HTTP port spoken to with
//! TLS, graceful shutdown (stop accepting, let requests in flight finish, then exit).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ListenAddr};
use crate::orgs::Route;
use crate::proxy::Proxy;

/// A bound main listener.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket, with its path (removed at shutdown) and the inode of its file.
    Unix(UnixListener, PathBuf, Option<u64>),
}

/// The address a listener actually got (port 0 resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BoundAddr {
    /// TCP.
    Tcp(SocketAddr),
    /// Unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for BoundAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BoundAddr::Tcp(a) => write!(f, "{a}"),
            BoundAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Binds the main listener, refusing with a message that says what to change.
pub fn bind(addr: &ListenAddr, mode: u32) -> anyhow::Result<Listener> {
    match addr {
        ListenAddr::Tcp(a) => {
            let std = std::net::TcpListener::bind(a)
                .map_err(|e| bind_error(&addr.to_string(), "--listen", e))?;
            std.set_nonblocking(true)?;
            Ok(Listener::Tcp(TcpListener::from_std(std)?))
        }
        ListenAddr::Unix(path) => {
            use std::os::unix::fs::{FileTypeExt, PermissionsExt};
            // A socket left behind by a process that died is replaced; any other file is not.
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if meta.file_type().is_socket() {
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        anyhow::bail!(
                            "cannot listen on unix:{}: another process is serving it",
                            path.display()
                        );
                    }
                    std::fs::remove_file(path)?;
                } else {
                    anyhow::bail!(
                        "cannot listen on unix:{}: a file that is not a socket is in the way",
                        path.display()
                    );
                }
            }
            let l = UnixListener::bind(path)
                .map_err(|e| bind_error(&addr.to_string(), "--listen", e))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
                anyhow::anyhow!("cannot set mode {mode:o} on {}: {e}", path.display())
            })?;
            let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(path)?);
            Ok(Listener::Unix(l, path.clone(), Some(inode)))
        }
    }
}

/// A bind failure in words: which flag to change.
pub fn bind_error(addr: &str, flag: &str, e: std::io::Error) -> anyhow::Error {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!(" (another process already listens there; pick another with {flag})")
        }
        std::io::ErrorKind::PermissionDenied => {
            " (permission denied: ports below 1024 need privileges)".to_string()
        }
        std::io::ErrorKind::AddrNotAvailable => " (this machine has no such address)".to_string(),
        _ => String::new(),
    };
    anyhow::anyhow!("cannot listen on {addr}: {e}{hint}")
}

/// Removes the socket file at `path` if it is still the one with `inode` (not one bound since).
pub fn remove_socket(path: &std::path::Path, inode: Option<u64>) {
    use std::os::unix::fs::MetadataExt;
    let same = match (std::fs::symlink_metadata(path), inode) {
        (Ok(m), Some(ino)) => m.ino() == ino,
        (Ok(_), None) => true,
        (Err(_), _) => false,
    };
    if same {
        let _ = std::fs::remove_file(path);
    }
}

impl Listener {
    /// The inode of a Unix socket's file, recorded at bind.
    pub fn inode(&self) -> Option<u64> {
        match self {
            Listener::Tcp(_) => None,
            Listener::Unix(_, _, ino) => *ino,
        }
    }

    /// The address actually bound.
    pub fn bound(&self) -> std::io::Result<BoundAddr> {
        Ok(match self {
            Listener::Tcp(l) => BoundAddr::Tcp(l.local_addr()?),
            Listener::Unix(_, p, _) => BoundAddr::Unix(p.clone()),
        })
    }
}

/// Settings of the client side of the proxy.
#[derive(Clone)]
pub struct ClientLimits {
    /// Request head deadline.
    pub header_timeout: Duration,
    /// Request head size limit.
    pub max_header_bytes: usize,
    /// Connections served at once.
    pub max_connections: usize,
}

impl ClientLimits {
    /// From the config.
    pub fn from_config(cfg: &Config) -> Self {
        ClientLimits {
            header_timeout: cfg.client_header_timeout,
            max_header_bytes: cfg.max_request_header_bytes,
            max_connections: cfg.max_client_connections,
        }
    }
}

/// Accepts until `shutdown` is cancelled, then returns the handle that drains the connections.
pub async fn accept_loop(
    listener: Listener,
    proxy: Arc<Proxy>,
    route: Route,
    limits: ClientLimits,
    shutdown: CancellationToken,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let (mut last_warning, mut failures) = (None, 0u64);
    loop {
        // Past the limit, stop accepting: new connections wait in the kernel's backlog.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => break },
            _ = shutdown.cancelled() => break,
        };
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: say so at most once a second (with how
                // often it happened meanwhile), and back off instead of spinning.
                failures += 1;
                if last_warning
                    .is_none_or(|t: std::time::Instant| t.elapsed() >= Duration::from_secs(1))
                {
                    tracing::warn!(error = %e, failures, "accept failed; new connections wait until resources free up");
                    last_warning = Some(std::time::Instant::now());
                    failures = 0;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let proxy = proxy.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let _counted = Connected::new(&proxy.metrics);
            match stream {
                Accepted::Tcp(s) => {
                    if spoke_tls(&s, header_timeout).await {
                        tracing::warn!(%peer, "a client spoke TLS to this port, which speaks plain HTTP: point it at http://, not https://");
                        return;
                    }
                    serve(s, proxy, route, builder, watcher).await
                }
                Accepted::Unix(s) => serve(s, proxy, route, builder, watcher).await,
            }
        });
    }
    if let Listener::Unix(_, path, _) = &listener {
        remove_socket(path, listener.inode());
    }
    graceful
}

enum Accepted {
    Tcp(TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(l: &Listener) -> std::io::Result<(Accepted, String)> {
    match l {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Accepted::Tcp(s), peer.to_string()))
        }
        Listener::Unix(l, _, _) => {
            let (s, _) = l.accept().await?;
            Ok((Accepted::Unix(s), "unix".into()))
        }
    }
}

/// Whether the first byte is a TLS handshake record (0x16), the mark of an app configured with
/// https:// for this plain port. Waits no longer than the header timeout.
async fn spoke_tls(s: &TcpStream, within: Duration) -> bool {
    let mut first = [0u8; 1];
    matches!(tokio::time::timeout(within, s.peek(&mut first)).await, Ok(Ok(1)) if first[0] == 0x16)
}

async fn serve<S>(
    stream: S,
    proxy: Arc<Proxy>,
    route: Route,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: hyper::Request<Incoming>| {
        let proxy = proxy.clone();
        async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, route).await) }
    });
    let conn = builder
        .serve_connection(TokioIo::new(stream), svc)
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// Counts an application connection for as long as it is open.
struct Connected(prometheus_client::metrics::gauge::Gauge);

impl Connected {
    fn new(m: &crate::metrics::Metrics) -> Self {
        m.client_connections.inc();
        Connected(m.client_connections.clone())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.dec();
    }
}
