//! Test helpers: a test PKI made at test time, an in-process mTLS upstream that records what it
//! received, the proxy started on 127.0.0.1:0, and a plain HTTP client to talk to it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod load;
pub mod process;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use vero_proxy::demo::pki::{Pair, TestPki};
use vero_proxy::demo::standin::{self, full, Handler, Seen, StandIn, StandInBody};

/// What the upstream received for one request.
#[derive(Debug, Clone)]
pub struct Received {
    pub seen: Seen,
    pub method: String,
    /// Path and query exactly as they arrived.
    pub target: String,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body_len: u64,
    pub body_sha256: String,
}

/// Shared state of the recording upstream.
pub struct Lab {
    pub received: Mutex<Vec<Received>>,
    pub active: AtomicUsize,
    pub max_active: AtomicUsize,
    /// Requests to /block wait here until the test adds permits.
    pub gate: Semaphore,
    /// Notified whenever a request reaches /block.
    pub arrived: Notify,
    pub blocked: AtomicUsize,
}

impl Default for Lab {
    fn default() -> Self {
        Lab {
            received: Mutex::default(),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            gate: Semaphore::new(0),
            arrived: Notify::new(),
            blocked: AtomicUsize::new(0),
        }
    }
}

impl Lab {
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
    pub fn last(&self) -> Received {
        self.received
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream received no request")
    }
    /// Waits until `n` requests are parked in /block.
    pub async fn wait_blocked(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                let notified = self.arrived.notified();
                if self.blocked.load(Ordering::SeqCst) >= n {
                    return;
                }
                notified.await;
            }
        })
        .await
        .expect("requests did not reach the upstream in time");
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    vero_proxy::identity::load::hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// A body of `n` bytes in 64 KiB chunks, made as it is sent.
pub fn stream_bytes(n: u64) -> StandInBody {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let mut left = n;
    let iter = std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let take = left.min(chunk.len() as u64) as usize;
        left -= take as u64;
        Some(Ok::<_, std::io::Error>(Frame::data(chunk.slice(..take))))
    });
    StreamBody::new(futures_lite_stream(iter)).boxed()
}

/// An iterator as a `Stream`, without pulling in a futures crate.
fn futures_lite_stream<I: Iterator + Unpin>(iter: I) -> IterStream<I> {
    IterStream(iter)
}

pub struct IterStream<I>(I);

impl<I: Iterator + Unpin> futures_core::Stream for IterStream<I> {
    type Item = I::Item;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<I::Item>> {
        std::task::Poll::Ready(self.0.next())
    }
}

fn json_response(status: u16, body: serde_json::Value) -> Response<StandInBody> {
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// The recording upstream's behaviour, chosen by path:
/// `/status/N` answers N; `/bytes/N` streams N bytes with a length; `/chunked/N` without one;
/// `/hang` never answers; `/block` waits for `Lab::gate`; `/trailers` sends a trailer;
/// `/nocontent` 204; `/notmodified` 304; anything else 200 with a small JSON body.
pub fn lab_handler(lab: Arc<Lab>) -> Handler {
    Arc::new(move |seen, req: Request<Incoming>| {
        let lab = lab.clone();
        Box::pin(async move {
            let (parts, mut body) = req.into_parts();
            let now = lab.active.fetch_add(1, Ordering::SeqCst) + 1;
            lab.max_active.fetch_max(now, Ordering::SeqCst);
            let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
            let mut len = 0u64;
            while let Some(Ok(f)) = body.frame().await {
                if let Some(d) = f.data_ref() {
                    hash.update(d);
                    len += d.len() as u64;
                }
            }
            let target = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_default();
            lab.received.lock().unwrap().push(Received {
                seen,
                method: parts.method.to_string(),
                target: target.clone(),
                version: parts.version,
                headers: parts.headers.clone(),
                body_len: len,
                body_sha256: vero_proxy::identity::load::hex(hash.finish().as_ref()),
            });
            let path = parts.uri.path().to_owned();
            let arg = |p: &str| path.strip_prefix(p).and_then(|n| n.parse::<u64>().ok());
            let resp = if let Some(code) = arg("/status/") {
                json_response(
                    code as u16,
                    serde_json::json!({"upstream_status": code, "detail": "from upstream"}),
                )
            } else if let Some(n) = arg("/bytes/") {
                let mut r = Response::new(stream_bytes(n));
                r.headers_mut().insert("content-length", n.into());
                r
            } else if let Some(n) = arg("/chunked/") {
                Response::new(stream_bytes(n))
            } else if path == "/stallbody" {
                // Headers and a first chunk, then silence.
                let mut r = Response::new(
                    StreamBody::new(Stall(Some(Bytes::from_static(b"first")))).boxed(),
                );
                r.headers_mut().insert("content-length", 1000.into());
                r
            } else if path == "/hang" {
                std::future::pending::<()>().await;
                unreachable!()
            } else if path == "/block" {
                lab.blocked.fetch_add(1, Ordering::SeqCst);
                lab.arrived.notify_waiters();
                lab.gate.acquire().await.unwrap().forget();
                json_response(200, serde_json::json!({"released": true}))
            } else if path == "/trailers" {
                let mut trailers = HeaderMap::new();
                trailers.insert("x-checksum", "abc123".parse().unwrap());
                let frames = vec![
                    Ok(Frame::data(Bytes::from_static(b"hello"))),
                    Ok(Frame::trailers(trailers)),
                ];
                let mut r =
                    Response::new(StreamBody::new(futures_lite_stream(frames.into_iter())).boxed());
                r.headers_mut()
                    .insert("trailer", "x-checksum".parse().unwrap());
                r
            } else if path == "/nocontent" {
                let mut r = Response::new(full(Bytes::new()));
                *r.status_mut() = StatusCode::NO_CONTENT;
                r
            } else if path == "/notmodified" {
                let mut r = Response::new(full(Bytes::new()));
                *r.status_mut() = StatusCode::NOT_MODIFIED;
                r.headers_mut().insert("etag", "\"v1\"".parse().unwrap());
                r
            } else {
                let mut r = json_response(200, serde_json::json!({"ok": true}));
                r.headers_mut()
                    .insert("x-upstream-header", "kept".parse().unwrap());
                r.headers_mut()
                    .insert("connection", "x-hop".parse().unwrap());
                r.headers_mut().insert("x-hop", "removed".parse().unwrap());
                r
            };
            lab.active.fetch_sub(1, Ordering::SeqCst);
            resp
        })
    })
}

/// Sends `GET target` (a `/block` path) over raw TCP to the proxy at `addr`, waits until the
/// upstream holds it, then closes the connection: an application going away before its answer.
pub async fn leave_before_the_answer(addr: SocketAddr, lab: &Lab, target: &str) {
    use tokio::io::AsyncWriteExt;
    let before = lab.blocked.load(Ordering::SeqCst);
    let mut app = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    app.write_all(req.as_bytes()).await.unwrap();
    lab.wait_blocked(before + 1).await;
    drop(app);
}

/// A test PKI with files on disk: CA, client identity, and an upstream that trusts the CA.
pub struct Pki {
    pub ca: TestPki,
    pub dir: tempfile::TempDir,
    pub client: Pair,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca_file: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let ca = TestPki::new("vero-proxy test CA").unwrap();
        let client = ca.client("1234567-1", "Testi Oy").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("client.pem");
        let key = dir.path().join("client.key");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&cert, &client.cert_pem).unwrap();
        std::fs::write(&key, &client.key_pem).unwrap();
        std::fs::write(&ca_file, &ca.ca_pem).unwrap();
        Pki {
            ca,
            dir,
            client,
            cert,
            key,
            ca_file,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// How the upstream is set up.
pub struct UpstreamSpec<'a> {
    /// Server certificate names.
    pub names: &'a [&'a str],
    /// ALPN the upstream offers.
    pub alpn: &'a [&'a [u8]],
    /// CAs whose client certificates it accepts (PEM); empty = the test PKI's CA.
    pub client_cas: Vec<String>,
    /// TLS 1.2 only when true.
    pub tls12_only: bool,
}

impl Default for UpstreamSpec<'_> {
    fn default() -> Self {
        UpstreamSpec {
            names: &["localhost", "127.0.0.1"],
            alpn: &[b"h2", b"http/1.1"],
            client_cas: vec![],
            tls12_only: false,
        }
    }
}

/// Starts an upstream with a server certificate from the test CA that accepts client certificates
/// issued by `client_cas` (empty: the test CA), recording into a new `Lab`.
pub async fn upstream_accepting(pki: &Pki, client_cas: Vec<String>) -> (Arc<Lab>, StandIn) {
    let lab = Arc::new(Lab::default());
    let spec = UpstreamSpec {
        client_cas,
        ..Default::default()
    };
    let up = start_upstream(&pki.ca, &pki.ca, spec, lab.clone()).await;
    (lab, up)
}

/// Starts a recording upstream as `spec` says, with a server certificate from `issuer`.
pub async fn start_upstream(
    issuer: &TestPki,
    trust: &TestPki,
    spec: UpstreamSpec<'_>,
    lab: Arc<Lab>,
) -> StandIn {
    let server = issuer.server(spec.names).unwrap();
    let cas: Vec<String> = if spec.client_cas.is_empty() {
        vec![trust.ca_pem.clone()]
    } else {
        spec.client_cas.clone()
    };
    let cas_ref: Vec<&str> = cas.iter().map(String::as_str).collect();
    let mut cfg = standin::server_config(&server, &cas_ref, spec.alpn).unwrap();
    if spec.tls12_only {
        let mut c = (*cfg).clone();
        c = tls12(c, &server, &cas_ref, spec.alpn);
        cfg = Arc::new(c);
    }
    standin::start(cfg, lab_handler(lab)).await.unwrap()
}

fn tls12(
    _: rustls::ServerConfig,
    server: &Pair,
    cas: &[&str],
    alpn: &[&[u8]],
) -> rustls::ServerConfig {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for pem in cas {
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(server.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

/// The proxy's `run` flags for this PKI and upstream, plus `extra`.
pub fn proxy_args(pki: &Pki, upstream: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "vero-proxy".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--admin-listen".into(),
        "127.0.0.1:0".into(),
        "--upstream".into(),
        upstream.into(),
        "--cert".into(),
        pki.cert.display().to_string(),
        "--key".into(),
        pki.key.display().to_string(),
        "--ca-file".into(),
        pki.ca_file.display().to_string(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Starts the proxy with `proxy_args` for the upstream on localhost's `port`, plus `extra`.
pub async fn start_proxy_to(pki: &Pki, port: u16, extra: &[&str]) -> vero_proxy::app::Running {
    start_proxy(proxy_args(pki, &format!("https://localhost:{port}"), extra)).await
}

/// Starts the proxy in-process with these flags.
pub async fn start_proxy(args: Vec<String>) -> vero_proxy::app::Running {
    use clap::Parser;
    let cli = vero_proxy::cli::Cli::try_parse_from(args).unwrap();
    let cfg = vero_proxy::config::Config::from_args(&cli.run).unwrap();
    vero_proxy::app::start(cfg).await.unwrap()
}

/// Everything most tests need: PKI, recording upstream, proxy in front of it.
pub struct Setup {
    pub pki: Pki,
    pub lab: Arc<Lab>,
    pub upstream: StandIn,
    pub proxy: vero_proxy::app::Running,
    pub addr: SocketAddr,
}

impl Setup {
    pub async fn new(extra: &[&str]) -> Setup {
        Self::with(UpstreamSpec::default(), extra).await
    }

    pub async fn with(spec: UpstreamSpec<'_>, extra: &[&str]) -> Setup {
        let pki = Pki::new();
        let lab = Arc::new(Lab::default());
        let upstream = start_upstream(&pki.ca, &pki.ca, spec, lab.clone()).await;
        let url = format!("https://localhost:{}", upstream.addr.port());
        let proxy = start_proxy(proxy_args(&pki, &url, extra)).await;
        let addr = tcp_addr(&proxy);
        Setup {
            pki,
            lab,
            upstream,
            proxy,
            addr,
        }
    }

    /// Sends a request to the proxy (a new connection per call) and reads the whole answer.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Answer {
        send(self.addr, req).await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(
            Request::get(path)
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
    }
}

/// A GET of `path` with `Host: localhost` and no body.
pub fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// A whole answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    /// The proxy's error code, checking the error format on the way.
    pub fn error_code(&self) -> String {
        let j = self.json();
        assert_eq!(self.headers["content-type"], "application/json");
        assert!(j["message"].as_str().is_some_and(|m| !m.is_empty()), "{j}");
        assert!(
            j["request_id"].as_str().is_some_and(|m| !m.is_empty()),
            "{j}"
        );
        let code = j["error"].as_str().unwrap().to_owned();
        assert_eq!(self.headers["x-vero-proxy-error"], code.as_str());
        code
    }
}

/// Sends one request on a new HTTP/1.1 connection to `addr`.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Answer {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = tokio::time::timeout(Duration::from_secs(60), tx.send_request(req))
        .await
        .expect("no answer within 60 s")
        .unwrap();
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

/// A body stream that yields one chunk and then never another.
pub struct Stall(pub Option<Bytes>);

impl futures_core::Stream for Stall {
    type Item = Result<Frame<Bytes>, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.0.take() {
            Some(b) => std::task::Poll::Ready(Some(Ok(Frame::data(b)))),
            None => std::task::Poll::Pending,
        }
    }
}

/// A client certificate for business ID `id`, valid from `from` to `to` (days from now, negative
/// for the past), with a fresh key.
pub fn client_for_days(ca: &TestPki, id: &str, from: i64, to: i64) -> Pair {
    let now = time::OffsetDateTime::now_utc();
    ca.client_valid(
        id,
        "Testi Oy",
        now + time::Duration::days(from),
        now + time::Duration::days(to),
        rcgen::KeyPair::generate().unwrap(),
    )
    .unwrap()
}

/// The main listener's TCP address of a proxy started by a test.
pub fn tcp_addr(proxy: &vero_proxy::app::Running) -> SocketAddr {
    match &proxy.listen {
        vero_proxy::server::BoundAddr::Tcp(a) => *a,
        other => panic!("expected TCP, got {other}"),
    }
}
