//! A local stand-in for Vero API: an HTTPS server that requires a client certificate from a
//! given CA and tells what it received. It is not Vero API; the demo and the tests use it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::pki::Pair;

/// A response body the stand-in can send: small or streamed.
pub type StandInBody = BoxBody<Bytes, std::io::Error>;

/// What the stand-in saw of the TLS connection a request came on.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// Client certificate subject.
    pub client_subject: Option<String>,
    /// Client certificate serial, colon-separated hex.
    pub client_serial: Option<String>,
    /// Certificates the client sent (leaf included).
    pub client_chain_len: usize,
    /// SNI the client sent.
    pub sni: Option<String>,
    /// ALPN protocol agreed.
    pub alpn: Option<String>,
    /// Which TLS connection (counting from 1) carried the request.
    pub connection: u64,
}

/// Answers requests; gets what was seen of the connection.
pub type Handler = Arc<dyn Fn(Seen, Request<Incoming>) -> Reply + Send + Sync>;

/// The future a handler returns.
pub type Reply = std::pin::Pin<Box<dyn std::future::Future<Output = Response<StandInBody>> + Send>>;

/// A running stand-in.
pub struct StandIn {
    /// Where it listens.
    pub addr: SocketAddr,
    /// TLS handshakes completed.
    pub handshakes: Arc<AtomicU64>,
    stop: CancellationToken,
    generation: Arc<std::sync::Mutex<CancellationToken>>,
}

impl StandIn {
    /// Closes every open connection at once (without a TLS close_notify), as a server that
    /// restarts or times out idle connections would. New connections are served as before.
    pub fn drop_connections(&self) {
        if let Ok(mut g) = self.generation.lock() {
            g.cancel();
            *g = self.stop.child_token();
        }
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A small body.
pub fn full(b: impl Into<Bytes>) -> StandInBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A TLS server config that presents `server` and requires client certificates issued by one
/// of `client_cas` (PEM). `alpn` lists the protocols offered, most preferred first.
pub fn server_config(
    server: &Pair,
    client_cas: &[&str],
    alpn: &[&[u8]],
) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for pem in client_cas {
        for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(c?)?;
        }
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let chain = CertificateDer::pem_slice_iter(server.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes())?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Starts serving on `127.0.0.1:0`.
pub async fn start(cfg: Arc<ServerConfig>, handler: Handler) -> std::io::Result<StandIn> {
    start_on(TcpListener::bind("127.0.0.1:0").await?, cfg, handler)
}

/// Starts serving on a bound listener.
pub fn start_on(
    listener: TcpListener,
    cfg: Arc<ServerConfig>,
    handler: Handler,
) -> std::io::Result<StandIn> {
    start_closing_after(listener, cfg, handler, usize::MAX)
}

/// Starts serving, closing each connection gracefully after `max_requests` requests, as nginx
/// does (`keepalive_requests`); over HTTP/2 that is a GOAWAY, and streams the client opens
/// after it are refused unprocessed.
pub fn start_closing_after(
    listener: TcpListener,
    cfg: Arc<ServerConfig>,
    handler: Handler,
    max_requests: usize,
) -> std::io::Result<StandIn> {
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let handshakes = Arc::new(AtomicU64::new(0));
    let acceptor = TlsAcceptor::from(cfg);
    let generation = Arc::new(std::sync::Mutex::new(stop.child_token()));
    let (stop2, count, gen2) = (stop.clone(), handshakes.clone(), generation.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                a = listener.accept() => match a { Ok(x) => x, Err(_) => continue },
                _ = stop2.cancelled() => return,
            };
            let Ok(stop) = gen2.lock().map(|g| g.clone()) else {
                return;
            };
            let (acceptor, handler, count) = (acceptor.clone(), handler.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                let seen = seen_of(tls.get_ref().1, n);
                let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let enough = Arc::new(tokio::sync::Notify::new());
                let (served2, enough2) = (served.clone(), enough.clone());
                let svc = service_fn(move |req| {
                    if served2.fetch_add(1, Ordering::SeqCst) + 1 == max_requests {
                        enough2.notify_one();
                    }
                    let fut = handler(seen.clone(), req);
                    async move { Ok::<_, std::convert::Infallible>(fut.await) }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(tls), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = stop.cancelled() => return,
                    _ = enough.notified() => conn.as_mut().graceful_shutdown(),
                }
                tokio::select! {
                    _ = conn => {},
                    _ = stop.cancelled() => {},
                }
            });
        }
    });
    Ok(StandIn {
        generation,
        addr,
        handshakes,
        stop,
    })
}

fn seen_of(conn: &rustls::ServerConnection, n: u64) -> Seen {
    let leaf = conn.peer_certificates().and_then(|c| c.first());
    let parsed = leaf.and_then(|c| X509Certificate::from_der(c.as_ref()).ok().map(|(_, x)| x));
    Seen {
        client_subject: parsed.as_ref().map(|c| c.subject().to_string()),
        client_serial: parsed.as_ref().map(|c| c.raw_serial_as_string()),
        client_chain_len: conn.peer_certificates().map_or(0, |c| c.len()),
        sni: conn.server_name().map(str::to_owned),
        alpn: conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        connection: n,
    }
}

/// A handler that answers with JSON describing what arrived: client certificate, SNI, method,
/// path, headers, and the body's length and SHA-256.
pub fn echo() -> Handler {
    Arc::new(|seen, req| {
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
            let mut len = 0u64;
            let mut body = body;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            hash.update(d);
                            len += d.len() as u64;
                        }
                    }
                    Err(_) => break,
                }
            }
            let headers: Vec<(String, String)> = parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect();
            let out = serde_json::json!({
                "stand_in": "local stand-in upstream started by vero-proxy; this is not Vero API",
                "client_certificate": {"subject": seen.client_subject, "serial": seen.client_serial},
                "sni": seen.sni,
                "alpn": seen.alpn,
                "method": parts.method.as_str(),
                "path": parts.uri.path(),
                "query": parts.uri.query(),
                "headers": headers,
                "body_bytes": len,
                "body_sha256": crate::identity::load::hex(hash.finish().as_ref()),
            });
            let mut resp = Response::new(full(
                serde_json::to_string_pretty(&out).unwrap_or_default() + "\n",
            ));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        })
    })
}
