//! A small, bounded pool of upstream connections.
//!
//! Why not hyper-util's legacy client: its pool has no cap on connections, and while handshakes
//! are slow it keeps opening more (hundreds per identity swap). Here every connection, connecting
//! or open, holds a place of one `ConnLimit` shared by all pools, so the upstream never sees more
//! than `--max-upstream-concurrency` connections from us, even across a swap.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::conn::{Conn, Sender};
use super::limit::{ConnLimit, ConnSlot};
use super::tls::{classify_tls, AlertProbe, TlsFailure};
use crate::body::RequestBody;
use crate::cli::UpstreamProtocol;
use crate::config::UpstreamTarget;
use crate::error::ProxyError;

/// Everything a pool needs to open connections.
pub struct PoolSettings {
    /// Where to connect.
    pub target: UpstreamTarget,
    /// TLS client config presenting the identity.
    pub tls: Arc<rustls::ClientConfig>,
    /// ALPN policy.
    pub protocol: UpstreamProtocol,
    /// Shared cap on connections (connecting included), across pools.
    pub conn_limit: Arc<ConnLimit>,
    /// TCP connect + TLS handshake limit.
    pub connect_timeout: Duration,
    /// Idle connections close after this.
    pub idle_timeout: Duration,
    /// Our identity in words, for refusal messages.
    pub who: String,
    /// The HTTP proxy connections tunnel through with CONNECT, if any.
    pub egress: Option<Arc<super::egress::Egress>>,
}

/// Largest read buffer of an HTTP/1.1 upstream connection.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

/// HTTP/2 flow-control windows: how much the upstream may send ahead of what the applications
/// have taken. hyper's defaults (2 MiB a stream, 5 MiB the connection) let 1 MiB answers on 64
/// streams hold 25-31 MiB of peak RSS (bench/compare.sh); with these, 21-23 MiB and a lower
/// p99, while still allowing 100 MB/s a connection (25 MB/s a stream) at a 10 ms round trip.
const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;

/// Counters for tests and the benchmark.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// TLS handshakes completed.
    pub handshakes: AtomicU64,
}

struct Idle {
    sender: http1::SendRequest<RequestBody>,
    failure: TlsFailure,
    since: Instant,
}

struct State {
    idle: Vec<Idle>,
    /// An HTTP/2 connection is being made: others wait for it rather than each making one.
    h2_connecting: bool,
    h2: Option<(http2::SendRequest<RequestBody>, TlsFailure)>,
}

/// The pool's shared state; `Conn` and `Return` hold a weak reference to it.
pub(super) struct Inner {
    settings: PoolSettings,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    state: Mutex<State>,
    retired: AtomicBool,
    stats: PoolStats,
    /// Woken whenever a connection is parked idle (or an HTTP/2 connect ends).
    parked: tokio::sync::Notify,
    /// The upstream answered the last connect with HTTP/2.
    speaks_h2: AtomicBool,
    /// `Host` for HTTP/1.1 requests: the upstream's authority, made once.
    pub(super) host_header: http::HeaderValue,
}

/// What a request gets when it asks for a connection.
enum Checkout {
    Ready(Conn),
    WaitForH2,
    /// Make a connection; `claimed_h2`: the one new HTTP/2 connection, which others wait for.
    Connect {
        claimed_h2: bool,
    },
}

/// A pool of connections for one identity. Cheap to share: clone the `Arc` around it.
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    /// A pool that opens connections on demand; starts its idle reaper.
    pub fn new(settings: PoolSettings) -> Result<Pool, ProxyError> {
        let server_name = ServerName::try_from(settings.target.host.clone()).map_err(|_| {
            ProxyError::UpstreamUnreachable(format!(
                "{:?} is not a valid TLS server name",
                settings.target.host
            ))
        })?;
        let host_header =
            http::HeaderValue::from_str(settings.target.authority.as_str()).map_err(|_| {
                ProxyError::UpstreamUnreachable(format!(
                    "{} cannot be a Host header",
                    settings.target.authority
                ))
            })?;
        let inner = Arc::new(Inner {
            connector: TlsConnector::from(settings.tls.clone()),
            settings,
            server_name,
            state: Mutex::new(State {
                idle: Vec::new(),
                h2_connecting: false,
                h2: None,
            }),
            retired: AtomicBool::new(false),
            stats: PoolStats::default(),
            parked: tokio::sync::Notify::new(),
            speaks_h2: AtomicBool::new(false),
            host_header,
        });
        let weak = Arc::downgrade(&inner);
        let every = (inner.settings.idle_timeout / 2).max(Duration::from_millis(500));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                if pool.retired.load(Ordering::Relaxed) {
                    return;
                }
                pool.reap();
            }
        });
        Ok(Pool { inner })
    }

    /// A connection for one request: an idle one when there is one, else a new one.
    /// While every connection permit is taken, it also watches for a connection coming back
    /// idle: otherwise a request could wait for a permit while an idle connection sat unused.
    pub async fn checkout(&self) -> Result<Conn, ProxyError> {
        let wait = async {
            loop {
                let parked = self.inner.parked.notified();
                tokio::pin!(parked);
                // Registered before looking, so a connection parked in between is not missed.
                parked.as_mut().enable();
                let claimed_h2 = match self.inner.take_idle_or_claim_h2() {
                    Checkout::Ready(conn) => return Ok(Err(conn)),
                    Checkout::WaitForH2 => {
                        parked.await;
                        continue;
                    }
                    Checkout::Connect { claimed_h2 } => claimed_h2,
                };
                tokio::select! {
                    slot = self.inner.settings.conn_limit.acquire() => {
                        return slot.map(Ok).ok_or(ProxyError::ShuttingDown);
                    }
                    _ = parked => {
                        // Looking again: a claim kept meanwhile would have everyone (this
                        // request too) wait for a connection nobody is making.
                        if claimed_h2 {
                            self.inner.unclaim_h2();
                        }
                    }
                }
            }
        };
        match self.wait_for_slot(wait).await {
            Ok(Err(idle)) => Ok(idle),
            Ok(Ok(slot)) => self.connect_detached(slot).await,
            Err(e) => {
                self.inner.end_h2_connect();
                Err(e)
            }
        }
    }

    /// A new connection, never a pooled one (for the retry after a stale pooled connection).
    pub async fn connect(&self) -> Result<Conn, ProxyError> {
        let limit = &self.inner.settings.conn_limit;
        let slot = self
            .wait_for_slot(async { limit.acquire().await.ok_or(ProxyError::ShuttingDown) })
            .await?;
        self.connect_detached(slot).await
    }

    /// Makes a connection in a task of its own, so that a handshake under way is finished even
    /// when the request that asked for it goes away (its application disconnected): the new
    /// connection is parked for the next request instead of thrown away half made. (When many
    /// applications stop at once, throwing them away turns into a storm of handshakes later.)
    /// Also keeps the handshake's large state out of every request's future.
    async fn connect_detached(&self, slot: ConnSlot) -> Result<Conn, ProxyError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let made = Inner::connect_with(&inner, slot).await;
            if let Err(Ok(conn)) = tx.send(made) {
                conn.park();
            }
        });
        rx.await.unwrap_or(Err(ProxyError::ShuttingDown))
    }

    async fn wait_for_slot<T>(
        &self,
        wait: impl std::future::Future<Output = Result<T, ProxyError>>,
    ) -> Result<T, ProxyError> {
        let limit = self.inner.settings.connect_timeout;
        tokio::time::timeout(limit, wait).await.map_err(|_| {
            ProxyError::UpstreamBusy(format!(
                "no upstream connection became free within {limit:?}; all are in use (--max-upstream-concurrency)"
            ))
        })?
    }

    /// Opens up to `n` connections ahead of demand, in parallel, and parks them idle; returns
    /// how many opened. Takes only free connection permits, so warming never pushes past the
    /// cap. The first connection tells the protocol: one HTTP/2 connection serves everyone.
    pub async fn warm(&self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        match self.warm_one().await {
            None => return 0,
            Some(false) => return 1,
            Some(true) => {}
        }
        let mut set = tokio::task::JoinSet::new();
        for _ in 1..n {
            let pool = Pool {
                inner: self.inner.clone(),
            };
            set.spawn(async move { pool.warm_one().await.is_some() });
        }
        let mut opened = 1;
        while let Some(r) = set.join_next().await {
            opened += usize::from(r.unwrap_or(false));
        }
        opened
    }

    /// One warm connection: `Some(true)` for HTTP/1.1 (parked idle), `Some(false)` for HTTP/2.
    async fn warm_one(&self) -> Option<bool> {
        let slot = self.inner.settings.conn_limit.try_acquire()?;
        match Inner::connect_with(&self.inner, slot).await {
            Ok(Conn {
                sender: Sender::H1(tx),
                failure,
                ..
            }) => {
                Inner::checkin(&self.inner, tx, failure);
                Some(true)
            }
            Ok(Conn {
                sender: Sender::H2(_),
                ..
            }) => Some(false),
            Err(_) => None,
        }
    }

    /// Takes the pool out of service: idle connections close now, busy ones after their request.
    pub fn retire(&self) {
        self.inner.retired.store(true, Ordering::Relaxed);
        if let Ok(mut st) = self.inner.state.lock() {
            st.idle.clear();
            st.h2 = None;
        }
    }

    /// Counters.
    pub fn stats(&self) -> &PoolStats {
        &self.inner.stats
    }

    /// Idle HTTP/1.1 connections right now.
    pub fn idle_count(&self) -> usize {
        self.inner.state.lock().map(|s| s.idle.len()).unwrap_or(0)
    }

    /// Waits until at least `n` HTTP/1.1 connections are idle.
    pub async fn idle_at_least(&self, n: usize) {
        super::limit::until(&self.inner.parked, || self.idle_count() >= n).await;
    }
}

impl Inner {
    /// An idle connection; else, for an HTTP/2 upstream, either the right to make the one new
    /// connection or word to wait for whoever is making it.
    fn take_idle_or_claim_h2(self: &Arc<Self>) -> Checkout {
        if let Some(conn) = self.take_idle() {
            return Checkout::Ready(conn);
        }
        let unclaimed = Checkout::Connect { claimed_h2: false };
        if !self.speaks_h2.load(Ordering::Relaxed) {
            return unclaimed;
        }
        let Ok(mut st) = self.state.lock() else {
            return unclaimed;
        };
        if st.h2_connecting {
            Checkout::WaitForH2
        } else {
            st.h2_connecting = true;
            Checkout::Connect { claimed_h2: true }
        }
    }

    /// Gives up a claim to make the HTTP/2 connection before making it.
    fn unclaim_h2(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.h2_connecting = false;
        }
    }

    fn end_h2_connect(&self) {
        self.unclaim_h2();
        self.parked.notify_waiters();
    }

    /// Stops handing out an HTTP/2 connection the server is closing (after a GOAWAY).
    pub(super) fn forget_h2(&self, failure: &TlsFailure) {
        if let Ok(mut st) = self.state.lock() {
            if st.h2.as_ref().is_some_and(|(_, f)| Arc::ptr_eq(f, failure)) {
                st.h2 = None;
            }
        }
    }

    fn take_idle(self: &Arc<Self>) -> Option<Conn> {
        let mut st = self.state.lock().ok()?;
        if let Some((h2, failure)) = &st.h2 {
            if !h2.is_closed() && h2.is_ready() {
                return Some(Conn {
                    sender: Sender::H2(h2.clone()),
                    failure: failure.clone(),
                    reused: true,
                    pool: Arc::downgrade(self),
                });
            }
            st.h2 = None;
        }
        let deadline = self.settings.idle_timeout;
        // Most recently used first: it is the least likely to have been closed by the server.
        while let Some(idle) = st.idle.pop() {
            // Parked the moment its response ended; `send` waits for it to be ready.
            if idle.since.elapsed() < deadline && !idle.sender.is_closed() {
                return Some(Conn {
                    sender: Sender::H1(idle.sender),
                    failure: idle.failure,
                    reused: true,
                    pool: Arc::downgrade(self),
                });
            }
        }
        None
    }

    pub(super) fn checkin(
        self: &Arc<Self>,
        sender: http1::SendRequest<RequestBody>,
        failure: TlsFailure,
    ) {
        if self.retired.load(Ordering::Relaxed) || sender.is_closed() {
            return;
        }
        if let Ok(mut st) = self.state.lock() {
            st.idle.push(Idle {
                sender,
                failure,
                since: Instant::now(),
            });
        }
        self.parked.notify_waiters();
    }

    fn reap(&self) {
        let deadline = self.settings.idle_timeout;
        if let Ok(mut st) = self.state.lock() {
            st.idle
                .retain(|i| i.since.elapsed() < deadline && !i.sender.is_closed());
            if st.h2.as_ref().is_some_and(|(h, _)| h.is_closed()) {
                st.h2 = None;
            }
        }
    }

    /// TCP + TLS + HTTP handshake on a connection place already taken; then wakes whoever
    /// waits for an HTTP/2 connection.
    async fn connect_with(self: &Arc<Self>, permit: ConnSlot) -> Result<Conn, ProxyError> {
        let made = self.connect_inner(permit).await;
        self.end_h2_connect();
        made
    }

    async fn connect_inner(self: &Arc<Self>, permit: ConnSlot) -> Result<Conn, ProxyError> {
        let s = &self.settings;
        let target = format!("{}:{}", s.target.host, s.target.port);
        let work = async {
            let tcp = match &s.egress {
                Some(egress) => egress.tunnel(&s.target.host, s.target.port).await?,
                None => tcp_connect(&s.target.host, s.target.port).await?,
            };
            let tls = self
                .connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| classify_tls(&e, &target, &s.who))?;
            Ok::<_, ProxyError>((permit, tls))
        };
        let (permit, tls) = tokio::time::timeout(s.connect_timeout, work)
            .await
            .map_err(|_| {
                let via = s
                    .egress
                    .as_ref()
                    .map(|e| format!(" through the egress proxy {}", e.proxy()))
                    .unwrap_or_default();
                ProxyError::UpstreamUnreachable(format!(
                    "could not connect to {target}{via} within {:?} (--connect-timeout)",
                    s.connect_timeout
                ))
            })??;
        self.stats.handshakes.fetch_add(1, Ordering::Relaxed);
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        self.speaks_h2.store(h2, Ordering::Relaxed);
        if s.protocol == UpstreamProtocol::Http2 && !h2 {
            return Err(ProxyError::UpstreamUnreachable(format!(
                "{target} did not agree to HTTP/2 (--upstream-protocol http2); use auto or http1"
            )));
        }
        let probe = AlertProbe::new(tls);
        let failure = probe.failure();
        let io = TokioIo::new(probe);
        let pool = Arc::downgrade(self);
        if h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW)
                .handshake::<_, RequestBody>(io)
                .await
                .map_err(|e| {
                    ProxyError::UpstreamUnreachable(format!("HTTP/2 with {target} failed: {e}"))
                })?;
            spawn_conn(conn, permit);
            if let Ok(mut st) = self.state.lock() {
                if !self.retired.load(Ordering::Relaxed)
                    && st.h2.as_ref().is_none_or(|(h, _)| h.is_closed())
                {
                    st.h2 = Some((sender.clone(), failure.clone()));
                }
            }
            Ok(Conn {
                sender: Sender::H2(sender),
                failure,
                reused: false,
                pool,
            })
        } else {
            // hyper's read buffer grows to 400 KiB per connection by default; with 1 MiB answers on
            // 64 connections that alone is 25 MiB. 64 KiB reads keep memory flat at no
            // measurable cost in throughput.
            let (sender, conn) = http1::Builder::new()
                .max_buf_size(UPSTREAM_READ_BUFFER)
                .handshake::<_, RequestBody>(io)
                .await
                .map_err(|e| {
                    ProxyError::UpstreamUnreachable(format!("HTTP/1.1 with {target} failed: {e}"))
                })?;
            spawn_conn(conn, permit);
            Ok(Conn {
                sender: Sender::H1(sender),
                failure,
                reused: false,
                pool,
            })
        }
    }
}

fn spawn_conn<F>(conn: F, permit: ConnSlot)
where
    F: std::future::Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
        drop(permit);
    });
}

/// A TCP connection to `host:port`, trying each address it resolves to.
pub(super) async fn tcp_connect(host: &str, port: u16) -> Result<TcpStream, ProxyError> {
    let addrs: Vec<_> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| ProxyError::UpstreamUnreachable(format!("cannot resolve {host}: {e}")))?
        .collect();
    let mut last = None;
    for addr in &addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some((addr, e)),
        }
    }
    Err(ProxyError::UpstreamUnreachable(match last {
        Some((addr, e)) => format!("cannot connect to {host}:{port} ({addr}): {e}"),
        None => format!("{host} resolved to no address"),
    }))
}
