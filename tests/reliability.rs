//! Reliability and hostile input: slow clients, smuggling shapes, upstreams that cut, stall or go
//! away, a thousand held connections, and running out of file descriptors. Every case ends by
//! checking that the proxy still serves a normal request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::{timeout, Instant};
use vero_proxy::demo::standin::{self, full, Handler, StandIn};

const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2"];

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// The proxy still answers a normal request on a new connection.
async fn still_serves(addr: SocketAddr) {
    let a = timeout(Duration::from_secs(30), send(addr, get("/after")))
        .await
        .expect("no answer to a normal request afterwards");
    assert_eq!(a.status, 200, "afterwards: {:?}", a.body);
}

// ---------------------------------------------------------------------------------------------
// An upstream that records whether each request body arrived whole.

/// What the recording upstream got for one request.
#[derive(Debug, Clone)]
struct Got {
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
    /// The body ended cleanly (not cut by an error or a reset).
    complete: bool,
}

#[derive(Default)]
struct Recorder {
    /// Paths whose request head arrived.
    started: Mutex<Vec<String>>,
    /// Requests whose body ended, cleanly or not.
    done: Mutex<Vec<Got>>,
    changed: Notify,
}

impl Recorder {
    fn done(&self) -> Vec<Got> {
        self.done.lock().unwrap().clone()
    }

    /// Waits (at most 20 s) until `cond` holds.
    async fn wait(&self, what: &str, cond: impl Fn(&Recorder) -> bool) {
        timeout(Duration::from_secs(20), async {
            loop {
                let changed = self.changed.notified();
                if cond(self) {
                    return;
                }
                changed.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the upstream never saw {what}"));
    }

    async fn wait_started(&self, path: &str) {
        self.wait(&format!("the head of {path}"), |r| {
            r.started.lock().unwrap().iter().any(|p| p == path)
        })
        .await
    }

    async fn wait_done(&self, path: &str) -> Got {
        self.wait(&format!("the end of {path}"), |r| {
            r.done.lock().unwrap().iter().any(|g| g.path == path)
        })
        .await;
        self.done().into_iter().find(|g| g.path == path).unwrap()
    }
}

fn recording(rec: Arc<Recorder>) -> Handler {
    Arc::new(move |_seen, req| {
        let rec = rec.clone();
        Box::pin(async move {
            let (parts, mut body) = req.into_parts();
            let path = parts.uri.path().to_owned();
            rec.started.lock().unwrap().push(path.clone());
            rec.changed.notify_waiters();
            let (mut data, mut complete) = (Vec::new(), false);
            loop {
                match body.frame().await {
                    None => {
                        complete = true;
                        break;
                    }
                    Some(Ok(f)) => data.extend_from_slice(f.data_ref().map_or(&[][..], |d| d)),
                    Some(Err(_)) => break,
                }
            }
            rec.done.lock().unwrap().push(Got {
                path,
                headers: parts.headers,
                body: data,
                complete,
            });
            rec.changed.notify_waiters();
            Response::new(full("ok"))
        })
    })
}

/// A proxy in front of the recording upstream.
struct Rig {
    _pki: Pki,
    rec: Arc<Recorder>,
    _upstream: StandIn,
    _proxy: vero_proxy::app::Running,
    addr: SocketAddr,
}

impl Rig {
    async fn new(alpn: &[&[u8]], extra: &[&str]) -> Rig {
        let pki = Pki::new();
        let rec = Arc::new(Recorder::default());
        let server = pki.ca.server(&["localhost"]).unwrap();
        let cfg = standin::server_config(&server, &[&pki.ca.ca_pem], alpn).unwrap();
        let upstream = standin::start(cfg, recording(rec.clone())).await.unwrap();
        let url = format!("https://localhost:{}", upstream.addr.port());
        let proxy = start_proxy(proxy_args(&pki, &url, extra)).await;
        let addr = tcp_addr(&proxy);
        Rig {
            _pki: pki,
            rec,
            _upstream: upstream,
            _proxy: proxy,
            addr,
        }
    }
}

/// What came back on a raw connection, and whether the proxy closed it.
struct RawOutcome {
    text: String,
    closed: bool,
}

impl RawOutcome {
    fn status(&self) -> u16 {
        self.text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
    fn responses(&self) -> usize {
        self.text.matches("HTTP/1.1 ").count()
    }
}

/// Reads until the proxy closes the connection, for at most 10 s.
async fn read_until_closed(tcp: &mut TcpStream) -> RawOutcome {
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut chunk = [0u8; 16384];
    let closed = loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => break false,
        }
    };
    RawOutcome {
        text: String::from_utf8_lossy(&buf).into_owned(),
        closed,
    }
}

/// Writes `bytes` on a new connection and reads until the proxy closes it.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> RawOutcome {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    read_until_closed(&mut tcp).await
}

// ---------------------------------------------------------------------------------------------
// Slow clients.

/// Connects and sends a request head one byte every 50 ms, never finishing it. Returns how long
/// the proxy kept the connection open (from the first byte), or panics after 20 s.
async fn trickle(addr: SocketAddr, sending: Arc<tokio::sync::Semaphore>) -> Duration {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head = b"GET /slow HTTP/1.1\r\nHost: localhost\r\nX-Slow: ";
    let start = Instant::now();
    let mut bytes = head.iter().copied().chain(std::iter::repeat(b'a'));
    let mut first = true;
    let mut buf = [0u8; 1024];
    loop {
        let b = bytes.next().unwrap();
        if tcp.write_all(&[b]).await.is_err() {
            return start.elapsed();
        }
        if first {
            sending.add_permits(1);
            first = false;
        }
        tokio::select! {
            r = tcp.read(&mut buf) => match r {
                // A 408 or nothing, then the close.
                Ok(n) if n > 0 => continue,
                _ => return start.elapsed(),
            },
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "a trickling client was never cut off"
        );
    }
}

/// Starts `n` trickling clients and returns once each has sent its first byte.
async fn start_tricklers(addr: SocketAddr, n: u32) -> Vec<tokio::task::JoinHandle<Duration>> {
    let sending = Arc::new(tokio::sync::Semaphore::new(0));
    let slow = (0..n)
        .map(|_| tokio::spawn(trickle(addr, sending.clone())))
        .collect();
    timeout(Duration::from_secs(20), sending.acquire_many(n))
        .await
        .expect("the trickling clients never started")
        .unwrap()
        .forget();
    slow
}

#[tokio::test]
async fn trickling_clients_are_cut_at_the_header_timeout_and_others_are_served_meanwhile() {
    let s = Setup::new(&["--client-header-timeout", "2s"]).await;
    let addr = s.addr;
    let slow = start_tricklers(addr, 50).await;
    // While they trickle, other clients are answered, and before any trickler was cut.
    let began = Instant::now();
    for _ in 0..20 {
        assert_eq!(s.get("/x").await.status, 200);
    }
    let served_in = began.elapsed();
    assert!(
        slow.iter().all(|t| !t.is_finished()),
        "the normal requests were not served while the slow clients were connected"
    );
    let mut cut = Vec::new();
    for t in slow {
        cut.push(t.await.unwrap());
    }
    let (min, max) = (cut.iter().min().unwrap(), cut.iter().max().unwrap());
    println!("20 requests served in {served_in:?} beside 50 tricklers; tricklers cut after {min:?}..{max:?}");
    assert!(
        *min >= Duration::from_millis(1900),
        "cut before the timeout: {min:?}"
    );
    assert!(
        *max < Duration::from_secs(7),
        "not cut at the timeout: {max:?}"
    );
    assert!(
        s.lab.received().iter().all(|r| r.target != "/slow"),
        "a trickled request reached the upstream"
    );
    still_serves(addr).await;
}

#[tokio::test]
async fn tricklers_holding_every_connection_slot_delay_others_only_until_the_timeout() {
    let s = Setup::new(&[
        "--client-header-timeout",
        "1s",
        "--max-client-connections",
        "4",
    ])
    .await;
    let addr = s.addr;
    let slow = start_tricklers(addr, 4).await;
    let began = Instant::now();
    let a = timeout(Duration::from_secs(10), s.get("/x"))
        .await
        .expect("a client starved behind slow ones");
    assert_eq!(a.status, 200);
    println!(
        "served after {:?} with every slot held by tricklers",
        began.elapsed()
    );
    for t in slow {
        t.await.unwrap();
    }
    still_serves(addr).await;
}

// ---------------------------------------------------------------------------------------------
// Oversized heads and request smuggling shapes, on raw sockets.

#[tokio::test]
async fn oversized_and_overlong_heads_get_431_and_reach_nothing() {
    // One large header is in tests/limits.rs; here: many headers, and a head over the limit
    // made of many small ones, on a raw socket, connection closed after.
    let r = Rig::new(H1, &["--max-request-header-bytes", "16384"]).await;
    let mut many = String::from("GET /many HTTP/1.1\r\nHost: localhost\r\n");
    for i in 0..200 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let out = raw(r.addr, many.as_bytes()).await;
    assert_eq!(out.status(), 431, "{}", out.text);
    assert!(out.closed);
    let mut big = String::from("GET /big HTTP/1.1\r\nHost: localhost\r\n");
    for i in 0..80 {
        big.push_str(&format!("X-H{i}: {}\r\n", "b".repeat(250)));
    }
    big.push_str("\r\n");
    let out = raw(r.addr, big.as_bytes()).await;
    assert_eq!(out.status(), 431, "{}", out.text);
    assert!(out.closed);
    assert!(r.rec.started.lock().unwrap().is_empty());
    still_serves(r.addr).await;
}

#[tokio::test]
async fn ambiguous_lengths_and_folded_headers_get_400_and_reach_nothing() {
    let r = Rig::new(H1, &[]).await;
    let cases: &[(&str, &[u8])] = &[
        (
            "two different Content-Lengths",
            b"POST /cl2 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        (
            "a Content-Length list that disagrees",
            b"POST /cl2 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5, 6\r\n\r\nhello!",
        ),
        (
            "obs-fold in an ordinary header",
            b"GET /fold HTTP/1.1\r\nHost: localhost\r\nX-Folded: a\r\n b\r\n\r\n",
        ),
        (
            "obs-fold in Content-Length",
            b"POST /fold HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n 0\r\n\r\nhello",
        ),
        (
            "whitespace before the colon",
            b"POST /ws HTTP/1.1\r\nHost: localhost\r\nContent-Length : 5\r\n\r\nhello",
        ),
        (
            "a Transfer-Encoding that does not end in chunked",
            b"POST /te HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            b"POST /te10 HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
    ];
    for (what, bytes) in cases {
        let out = raw(r.addr, bytes).await;
        assert_eq!(out.status(), 400, "{what}: {}", out.text);
        assert!(out.closed, "{what}: connection left open");
    }
    assert!(
        r.rec.started.lock().unwrap().is_empty(),
        "the upstream received {:?}",
        r.rec.started.lock().unwrap()
    );
    still_serves(r.addr).await;
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_read_as_chunked_and_the_connection_closed() {
    for alpn in [H1, H2] {
        let r = Rig::new(alpn, &[]).await;
        let smuggled = "GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let shapes = [
            "Content-Length: 3\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked\r\nContent-Length: 3",
            "Content-Length: 40\r\nTransfer-Encoding: chunked",
        ];
        for (i, shape) in shapes.iter().enumerate() {
            let msg = format!(
                "POST /both{i} HTTP/1.1\r\nHost: localhost\r\n{shape}\r\n\r\n5\r\nhello\r\n0\r\n\r\n{smuggled}"
            );
            let out = raw(r.addr, msg.as_bytes()).await;
            assert!(out.closed, "{shape}: connection kept open: {}", out.text);
            assert_eq!(out.responses(), 1, "{shape}: {}", out.text);
            match out.status() {
                400 => assert!(r.rec.done().iter().all(|g| g.path != format!("/both{i}"))),
                200 => {
                    let got = r.rec.wait_done(&format!("/both{i}")).await;
                    assert!(got.complete);
                    assert_eq!(got.body, b"hello", "{shape}");
                    assert!(
                        !got.headers.contains_key("content-length")
                            || got.headers["content-length"] == "5",
                        "{shape}: forwarded {:?}",
                        got.headers.get_all("content-length")
                    );
                    assert!(!got.headers.contains_key("transfer-encoding") || alpn == H1);
                }
                other => panic!("{shape}: {other}: {}", out.text),
            }
        }
        assert!(
            r.rec
                .started
                .lock()
                .unwrap()
                .iter()
                .all(|p| p != "/smuggled"),
            "a request hidden behind the body reached the upstream"
        );
        still_serves(r.addr).await;
    }
}

#[tokio::test]
async fn bodies_cut_or_malformed_never_reach_the_upstream_complete() {
    for alpn in [H1, H2] {
        let r = Rig::new(alpn, &[]).await;

        // A bad chunk size after a good chunk: the forwarded request is aborted.
        let mut tcp = TcpStream::connect(r.addr).await.unwrap();
        tcp.write_all(
            b"POST /badchunk HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .unwrap();
        r.rec.wait_started("/badchunk").await;
        tcp.write_all(b"zz\r\nworld\r\n0\r\n\r\n").await.unwrap();
        let out = read_until_closed(&mut tcp).await;
        assert!(out.closed, "bad chunk: connection left open: {}", out.text);
        let got = r.rec.wait_done("/badchunk").await;
        assert!(
            !got.complete,
            "{}: the upstream received a complete request: {:?}",
            String::from_utf8_lossy(alpn[0]),
            String::from_utf8_lossy(&got.body)
        );
        assert!(!out.text.starts_with("HTTP/1.1 200"), "{}", out.text);

        // A chunked body whose client goes away mid-chunk.
        let mut tcp = TcpStream::connect(r.addr).await.unwrap();
        tcp.write_all(
            b"POST /halfchunk HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n10\r\nabc",
        )
        .await
        .unwrap();
        r.rec.wait_started("/halfchunk").await;
        drop(tcp);
        assert!(!r.rec.wait_done("/halfchunk").await.complete);

        // A large body with a Content-Length (streamed) that ends early.
        let mut tcp = TcpStream::connect(r.addr).await.unwrap();
        tcp.write_all(
            b"POST /longcl HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n",
        )
        .await
        .unwrap();
        tcp.write_all(&[b'x'; 70_000]).await.unwrap();
        r.rec.wait_started("/longcl").await;
        drop(tcp);
        let got = r.rec.wait_done("/longcl").await;
        assert!(
            !got.complete,
            "{} bytes arrived as complete",
            got.body.len()
        );

        // A small body with a Content-Length (read whole first) that ends early: nothing leaves.
        let mut tcp = TcpStream::connect(r.addr).await.unwrap();
        tcp.write_all(
            b"POST /shortcl HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\nhello",
        )
        .await
        .unwrap();
        tcp.shutdown().await.unwrap();
        let out = read_until_closed(&mut tcp).await;
        assert!(out.closed);
        // The proxy has answered (or closed); a request it forwarded would have started by now
        // only if it was sent before the body was whole, which it must not be.
        still_serves(r.addr).await;
        assert!(
            r.rec
                .started
                .lock()
                .unwrap()
                .iter()
                .all(|p| p != "/shortcl"),
            "a request with an unfinished small body was sent upstream"
        );
        assert!(r
            .rec
            .done()
            .iter()
            .all(|g| g.path == "/after" || !g.complete));
    }
}

// ---------------------------------------------------------------------------------------------
// Upstreams that cut a response short.

/// How the test-local upstream ends a response it has started.
#[derive(Clone, Copy)]
enum Ending {
    /// TCP FIN without a TLS close_notify.
    Fin,
    /// TCP RST (SO_LINGER 0).
    Rst,
    /// close_notify, then FIN: a clean end.
    Clean,
}

/// A test-local HTTP/1.1 mTLS upstream that answers by path: `/cut-length/E` sends a head with
/// Content-Length 100000 and 1000 bytes; `/cut-chunked/E` one chunk and no last chunk;
/// `/cut-eof/E` a close-delimited body of 1000 bytes; each then ends the connection as `E`
/// (`fin`, `rst`, `clean`) says. Anything else gets a complete "ok" and keep-alive.
async fn start_cutting_upstream(pki: &Pki) -> SocketAddr {
    let server = pki.ca.server(&["localhost"]).unwrap();
    let cfg = standin::server_config(&server, &[&pki.ca.ca_pem], H1).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                loop {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match tls.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    let filler = vec![b'z'; 1000];
                    let (start, ending) = if let Some(e) = path.strip_prefix("/cut-length/") {
                        let mut s = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
                        s.extend_from_slice(&filler);
                        (s, e)
                    } else if let Some(e) = path.strip_prefix("/cut-chunked/") {
                        let mut s = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n"
                            .to_vec();
                        s.extend_from_slice(&filler);
                        s.extend_from_slice(b"\r\n");
                        (s, e)
                    } else if let Some(e) = path.strip_prefix("/cut-eof/") {
                        let mut s = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
                        s.extend_from_slice(&filler);
                        (s, e)
                    } else {
                        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                        if tls.write_all(ok).await.is_err() {
                            return;
                        }
                        continue;
                    };
                    let ending = match ending {
                        "fin" => Ending::Fin,
                        "rst" => Ending::Rst,
                        _ => Ending::Clean,
                    };
                    let _ = tls.write_all(&start).await;
                    let _ = tls.flush().await;
                    match ending {
                        Ending::Clean => {
                            let _ = tls.shutdown().await;
                        }
                        Ending::Rst => {
                            // Linger 0 makes the close a reset; nothing blocks on it.
                            #[allow(deprecated)]
                            let _ = tls.get_ref().0.set_linger(Some(Duration::ZERO));
                        }
                        Ending::Fin => {
                            let _ = tls.get_mut().0.shutdown().await;
                        }
                    }
                    return;
                }
            });
        }
    });
    addr
}

/// What the application got: the status, and the body's bytes or the error that cut it.
async fn fetch(addr: SocketAddr, path: &str) -> (u16, HeaderMap, Result<usize, String>) {
    fetch_full(addr, path, usize::MAX, || ()).await
}

#[tokio::test]
async fn a_response_the_upstream_cuts_short_is_cut_for_the_application_too() {
    let pki = Pki::new();
    let up = start_cutting_upstream(&pki).await;
    let proxy = start_proxy_to(&pki, up.port(), &[]).await;
    let addr = tcp_addr(&proxy);
    assert_eq!(fetch(addr, "/x").await.2, Ok(2));
    for kind in ["cut-length", "cut-chunked", "cut-eof"] {
        for ending in ["fin", "rst"] {
            let path = format!("/{kind}/{ending}");
            let (status, headers, end) = fetch(addr, &path).await;
            // The head may have gone out before the cut; the body must then fail.
            if status == 200 {
                assert!(
                    end.is_err(),
                    "{path}: a short body ({end:?}) was presented as complete; headers {headers:?}"
                );
                println!("{path}: 200, then {}", end.unwrap_err());
            } else {
                assert_eq!(status, 502, "{path}");
            }
            still_serves(addr).await;
        }
    }
    // The same ends with a TLS close_notify are complete answers: the test tells them apart.
    assert_eq!(fetch(addr, "/cut-eof/clean").await.2, Ok(1000));
    assert!(fetch(addr, "/cut-length/clean").await.2.is_err());
    still_serves(addr).await;
}

/// Tells the test-local HTTP/2 upstream when to cut the response it has started.
#[derive(Default)]
struct Cut {
    reset_stream: Notify,
    drop_connection: Notify,
}

/// A test-local HTTP/2 mTLS upstream: `/reset` and `/drop` get a head with Content-Length
/// 100000 and 1000 bytes, then, when the test says so, a RST_STREAM or the connection dropped
/// without GOAWAY; anything else gets a complete "ok".
async fn start_cutting_h2_upstream(pki: &Pki, cut: Arc<Cut>) -> SocketAddr {
    let server = pki.ca.server(&["localhost"]).unwrap();
    let cfg = standin::server_config(&server, &[&pki.ca.ca_pem], H2).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, cut) = (acceptor.clone(), cut.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                loop {
                    let (req, mut respond) = tokio::select! {
                        r = conn.accept() => match r { Some(Ok(x)) => x, _ => return },
                        // Dropping the connection: TCP closed, no GOAWAY, no close_notify.
                        _ = cut.drop_connection.notified() => return,
                    };
                    let cut = cut.clone();
                    tokio::spawn(async move {
                        let path = req.uri().path().to_owned();
                        if !path.starts_with("/reset") && !path.starts_with("/drop") {
                            let mut s = respond.send_response(Response::new(()), false).unwrap();
                            let _ = s.send_data(Bytes::from_static(b"ok"), true);
                            return;
                        }
                        // Without a length the application's answer is chunked, and only
                        // a missing last chunk can tell it the body was cut.
                        let mut head = Response::builder();
                        if !path.ends_with("-chunked") {
                            head = head.header("content-length", "100000");
                        }
                        let head = head.body(()).unwrap();
                        let mut s = respond.send_response(head, false).unwrap();
                        if path != "/drop-at-once" {
                            let _ = s.send_data(Bytes::from(vec![b'z'; 1000]), false);
                        }
                        if path.starts_with("/reset") {
                            cut.reset_stream.notified().await;
                            s.send_reset(h2::Reason::INTERNAL_ERROR);
                        } else {
                            // Held until the connection goes.
                            std::future::pending::<()>().await;
                        }
                    });
                }
            });
        }
    });
    addr
}

/// Fetches `path`; once the first `after` body bytes have arrived, runs `then`. Returns the
/// status and the body's length or the error that cut it.
async fn fetch_then(
    addr: SocketAddr,
    path: &str,
    after: usize,
    then: impl FnOnce(),
) -> (u16, Result<usize, String>) {
    let (status, _, end) = fetch_full(addr, path, after, then).await;
    (status, end)
}

/// As `fetch_then`, with the answer's headers.
async fn fetch_full(
    addr: SocketAddr,
    path: &str,
    after: usize,
    then: impl FnOnce(),
) -> (u16, HeaderMap, Result<usize, String>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = timeout(Duration::from_secs(30), tx.send_request(get(path)))
        .await
        .expect("no answer")
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let (mut n, mut then) = (0, Some(then));
    if after == 0 {
        if let Some(then) = then.take() {
            then();
        }
    }
    let end = timeout(Duration::from_secs(30), async {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len()),
                Err(e) => return Err(format!("{e} after {n} bytes")),
            }
            if n >= after {
                if let Some(then) = then.take() {
                    then();
                }
            }
        }
        Ok(n)
    })
    .await
    .expect("the body neither ended nor failed");
    (status, headers, end)
}

#[tokio::test]
async fn an_http2_upstream_that_resets_or_drops_mid_response_cuts_the_application_too() {
    let pki = Pki::new();
    let cut = Arc::new(Cut::default());
    let up = start_cutting_h2_upstream(&pki, cut.clone()).await;
    let proxy = start_proxy_to(&pki, up.port(), &[]).await;
    let addr = tcp_addr(&proxy);
    assert_eq!(fetch(addr, "/x").await.2, Ok(2));
    for path in [
        "/reset",
        "/reset-chunked",
        "/drop",
        "/drop-chunked",
        "/drop-at-once",
    ] {
        let after = if path == "/drop-at-once" { 0 } else { 1000 };
        let (status, end) = fetch_then(addr, path, after, || {
            if path.starts_with("/reset") {
                cut.reset_stream.notify_one()
            } else {
                cut.drop_connection.notify_waiters()
            }
        })
        .await;
        assert_eq!(status, 200, "{path}");
        assert!(
            end.is_err(),
            "{path}: a short body ({end:?}) passed as complete"
        );
        println!("{path}: 200, then {}", end.unwrap_err());
        still_serves(addr).await;
    }
}

/// A port nothing listens on (for now).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the recording upstream on `port`, retrying while the previous one lets go of it.
async fn upstream_on(port: u16, pki: &Pki, lab: Arc<Lab>) -> StandIn {
    let server = pki.ca.server(&["localhost", "127.0.0.1"]).unwrap();
    let cfg = standin::server_config(&server, &[&pki.ca.ca_pem], &[b"h2", b"http/1.1"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let listener = loop {
        match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => break l,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot bind {port} again: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    standin::start_on(listener, cfg, lab_handler(lab)).unwrap()
}

#[tokio::test]
async fn an_upstream_that_is_down_then_comes_back_is_used_again_without_a_restart() {
    let pki = Pki::new();
    let lab = Arc::new(Lab::default());
    let port = free_port();
    let proxy = start_proxy(proxy_args(&pki, &format!("https://localhost:{port}"), &[])).await;
    let addr = tcp_addr(&proxy);
    for _ in 0..3 {
        let a = send(addr, get("/x")).await;
        assert_eq!(
            (a.status.as_u16(), a.error_code().as_str()),
            (502, "upstream_unreachable")
        );
    }
    let up = upstream_on(port, &pki, lab.clone()).await;
    assert_eq!(send(addr, get("/x")).await.status, 200);
    // Down again, with a connection in the pool, then back.
    drop(up);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = send(addr, get("/x")).await;
        if a.status == 502 {
            assert_eq!(a.error_code(), "upstream_unreachable");
            break;
        }
        assert!(Instant::now() < deadline, "the upstream never looked down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _up = upstream_on(port, &pki, lab.clone()).await;
    assert_eq!(send(addr, get("/x")).await.status, 200);
    assert_eq!(lab.received().len(), 2);
    still_serves(addr).await;
}

// ---------------------------------------------------------------------------------------------
// Many connections, and running out of file descriptors.

#[tokio::test]
async fn a_thousand_idle_keep_alive_connections_are_held_and_then_served() {
    rlimit::increase_nofile_limit(8192).unwrap();
    let s = Setup::new(&[]).await;
    let mut senders = Vec::new();
    for _ in 0..1000 {
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        senders.push(tx);
    }
    let gauge = &s.proxy.proxy.metrics.client_connections;
    let deadline = Instant::now() + Duration::from_secs(20);
    // No event says "accepted": watch the proxy's own count.
    while gauge.get() < 1000 {
        assert!(Instant::now() < deadline, "only {} held", gauge.get());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for round in 0..2 {
        let tasks: Vec<_> = senders
            .into_iter()
            .map(|mut tx| {
                tokio::spawn(async move {
                    tx.ready().await.unwrap();
                    let resp = tx.send_request(get("/x")).await.unwrap();
                    let status = resp.status();
                    resp.into_body().collect().await.unwrap();
                    (status, tx)
                })
            })
            .collect();
        senders = Vec::new();
        for t in tasks {
            let (status, tx) = t.await.unwrap();
            assert_eq!(status, 200, "round {round}");
            senders.push(tx);
        }
        // Still held, idle, between rounds.
        assert_eq!(gauge.get(), 1000, "round {round}");
    }
    assert_eq!(s.lab.received().len(), 2000);
    drop(senders);
    still_serves(s.addr).await;
}

/// The spawned binary with a file descriptor limit, its stderr arriving line by line.
struct Limited {
    child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    log: Vec<String>,
}

impl Limited {
    fn spawn(nofile: u32, args: &[String]) -> Limited {
        let mut cmd = process::clean_command("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg(process::BIN);
        let mut child = cmd
            .args(args)
            .env("VERO_PROXY_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run prlimit (util-linux)");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Limited {
            child,
            lines,
            log: Vec::new(),
        }
    }

    async fn wait_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Ok(None) => panic!(
                    "vero-proxy exited before logging {needle:?}:\n{}",
                    self.log.join("\n")
                ),
                Err(_) => panic!("no {needle:?} within 30 s:\n{}", self.log.join("\n")),
            }
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[tokio::test]
async fn running_out_of_file_descriptors_degrades_with_errors_and_recovers() {
    let pki = Pki::new();
    let lab = Arc::new(Lab::default());
    let up = start_upstream(&pki.ca, &pki.ca, UpstreamSpec::default(), lab.clone()).await;
    let args = proxy_args(&pki, &format!("https://localhost:{}", up.addr.port()), &[]);
    let mut p = Limited::spawn(64, &args[1..]);
    let line = p.wait_line("vero-proxy is serving").await;
    let addr: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listen="))
        .unwrap_or_else(|| panic!("no listen= in {line:?}"))
        .parse()
        .unwrap();

    // The first connection is accepted before the others (the backlog is first in, first out);
    // it sends its request once descriptors have run out.
    let mut first = TcpStream::connect(addr).await.unwrap();
    first
        .write_all(b"GET /x HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let mut flood = Vec::new();
    for _ in 0..100 {
        flood.push(TcpStream::connect(addr).await.unwrap());
    }
    let err = p.wait_line("accept failed").await;
    println!("{err}");
    assert!(p.running());
    // A request that needs a new upstream connection gets the proxy's error answer, not a hang.
    first.write_all(b"\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = timeout(Duration::from_secs(20), first.read(&mut buf))
        .await
        .expect("no answer while out of descriptors")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
    println!("{}", answer.lines().next().unwrap_or(""));
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(answer.contains("upstream_unreachable"), "{answer}");
    assert!(p.running());

    // Load drops: the proxy serves again, on new connections, without a restart.
    drop(flood);
    drop(first);
    // The proxy closes the dropped connections' descriptors as it notices them, so the first
    // answers after the drop may still be 502: recovery is reached, not instant.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let a = timeout(Duration::from_secs(20), send(addr, get("/after")))
            .await
            .expect("no answer after the load dropped");
        if a.status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still failing after the load dropped: {:?}",
            a.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    still_serves(addr).await;
    assert!(p.running(), "{}", p.log.join("\n"));
    let failed = p.log.iter().filter(|l| l.contains("accept failed")).count();
    println!("{failed} accept failures logged while out of descriptors");
}
