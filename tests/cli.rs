//! The real `vero-proxy` binary as a process: start-up refusals on bad input, the Unix socket
//! listener, SIGTERM draining, the TLS-on-the-plain-port hint, and the resident memory of the
//! spawned process while large bodies stream through it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::process::{refused, Proc};
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use vero_proxy::demo::standin::StandIn;

/// How long a refused start may take before the test calls it a hang.
const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// `proxy_args` without argv0, with `--listen` set to `listen`.
fn args_listening_on(pki: &Pki, upstream: &str, listen: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = proxy_args(pki, upstream, extra).split_off(1);
    let i = v.iter().position(|a| a == "--listen").unwrap();
    v[i + 1] = listen.to_owned();
    v
}

/// An upstream that is never contacted: these processes stop before any request.
const NOWHERE: &str = "https://localhost:9";

#[tokio::test]
async fn missing_upstream_is_named() {
    let pki = Pki::new();
    let cert = pki.cert.display().to_string();
    let key = pki.key.display().to_string();
    let log = refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--cert",
            &cert,
            "--key",
            &key,
        ],
        &[],
    )
    .await;
    assert!(log.contains("--upstream"), "{log}");
}

#[tokio::test]
async fn missing_certificate_file_is_named() {
    let mut pki = Pki::new();
    pki.cert = pki.path("no-such-client.pem");
    let log = refused(&proxy_args(&pki, NOWHERE, &[])[1..], &[]).await;
    assert!(log.contains(&pki.cert.display().to_string()), "{log}");
}

#[tokio::test]
async fn key_of_another_pair_is_refused() {
    let mut pki = Pki::new();
    let other = pki.ca.client("7654321-0", "Muu Oy").unwrap();
    pki.key = pki.path("other.key");
    std::fs::write(&pki.key, &other.key_pem).unwrap();
    let log = refused(&proxy_args(&pki, NOWHERE, &[])[1..], &[]).await;
    assert!(log.contains("does not match"), "{log}");
}

/// A PKI whose client certificate is valid only from `not_before` to `not_after`.
fn pki_valid(not_before: time::OffsetDateTime, not_after: time::OffsetDateTime) -> Pki {
    let pki = Pki::new();
    let pair = pki
        .ca
        .client_valid(
            "1234567-1",
            "Testi Oy",
            not_before,
            not_after,
            rcgen::KeyPair::generate().unwrap(),
        )
        .unwrap();
    std::fs::write(&pki.cert, &pair.cert_pem).unwrap();
    std::fs::write(&pki.key, &pair.key_pem).unwrap();
    pki
}

#[tokio::test]
async fn expired_certificate_is_refused_with_its_date() {
    let now = time::OffsetDateTime::now_utc();
    let not_after = now - time::Duration::days(30);
    let pki = pki_valid(now - time::Duration::days(400), not_after);
    let log = refused(&proxy_args(&pki, NOWHERE, &[])[1..], &[]).await;
    assert!(log.contains("expired"), "{log}");
    assert!(log.contains(&not_after.date().to_string()), "{log}");
}

#[tokio::test]
async fn not_yet_valid_certificate_is_refused_with_its_date() {
    let now = time::OffsetDateTime::now_utc();
    let not_before = now + time::Duration::days(10);
    let pki = pki_valid(not_before, now + time::Duration::days(400));
    let log = refused(&proxy_args(&pki, NOWHERE, &[])[1..], &[]).await;
    assert!(log.contains("not valid until"), "{log}");
    assert!(log.contains(&not_before.date().to_string()), "{log}");
}

#[tokio::test]
async fn non_loopback_listen_needs_allow_remote_clients() {
    let pki = Pki::new();
    let log = refused(&args_listening_on(&pki, NOWHERE, "0.0.0.0:0", &[]), &[]).await;
    assert!(log.contains("--allow-remote-clients"), "{log}");

    let mut p = Proc::spawn(&args_listening_on(
        &pki,
        NOWHERE,
        "0.0.0.0:0",
        &["--allow-remote-clients"],
    ));
    let listen = p.serving().await;
    assert!(listen.starts_with("0.0.0.0:"), "{listen}");
    p.terminate().await;
    let status = p.wait_exit(EXIT_WITHIN).await;
    assert_eq!(status.code(), Some(0), "{}", p.stderr());
}

#[tokio::test]
async fn malformed_add_header_is_refused() {
    let pki = Pki::new();
    let log = refused(
        &proxy_args(&pki, NOWHERE, &["--add-header", "Vero-SoftwareKey"])[1..],
        &[],
    )
    .await;
    assert!(log.contains("--add-header"), "{log}");
    // The refusal does not echo what might be a secret.
    assert!(!log.contains("Vero-SoftwareKey"), "{log}");
}

#[tokio::test]
async fn port_in_use_is_refused() {
    let pki = Pki::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let log = refused(&args_listening_on(&pki, NOWHERE, &addr, &[]), &[]).await;
    assert!(log.contains(&format!("cannot listen on {addr}")), "{log}");
}

#[tokio::test]
async fn plain_http_upstream_is_refused() {
    let pki = Pki::new();
    let log = refused(&proxy_args(&pki, "http://localhost:9", &[])[1..], &[]).await;
    assert!(log.contains("--upstream"), "{log}");
    assert!(log.contains("https://"), "{log}");
}

/// A recording upstream with the binary in front of it, listening on `listen`.
struct Spawned {
    _pki: Pki,
    lab: Arc<Lab>,
    _upstream: StandIn,
    proc: Proc,
    listen: String,
}

impl Spawned {
    async fn start(listen: &str, extra: &[&str]) -> Spawned {
        Self::start_env(listen, extra, &[]).await
    }

    async fn start_env(listen: &str, extra: &[&str], env: &[(&str, &str)]) -> Spawned {
        let pki = Pki::new();
        let lab = Arc::new(Lab::default());
        let upstream = start_upstream(&pki.ca, &pki.ca, UpstreamSpec::default(), lab.clone()).await;
        let url = format!("https://localhost:{}", upstream.addr.port());
        let mut proc = Proc::spawn_env(&args_listening_on(&pki, &url, listen, extra), env);
        let listen = proc.serving().await;
        Spawned {
            _pki: pki,
            lab,
            _upstream: upstream,
            proc,
            listen,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.listen.parse().unwrap()
    }
}

#[tokio::test]
async fn on_one_cpu_the_single_threaded_scheduler_serves_concurrent_clients() {
    // What a sidecar limited to one CPU, or a pinned process, runs with.
    let mut s = Spawned::start_env("127.0.0.1:0", &[], &[("TOKIO_WORKER_THREADS", "1")]).await;
    let addr = s.addr();
    let clients = (0..8).map(|i| {
        tokio::spawn(async move {
            for j in 0..10 {
                let answer = send(addr, get(&format!("/c{i}/{j}"))).await;
                assert_eq!(answer.status, 200);
            }
        })
    });
    for c in clients.collect::<Vec<_>>() {
        c.await.unwrap();
    }
    let received = s.lab.received();
    assert_eq!(received.len(), 80);
    assert!(received.iter().all(|r| r
        .seen
        .client_subject
        .as_deref()
        .is_some_and(|c| c.contains("1234567-1"))));
    s.proc.terminate().await;
    let status = s.proc.wait_exit(EXIT_WITHIN).await;
    assert_eq!(status.code(), Some(0), "{}", s.proc.stderr());
}

#[tokio::test]
async fn a_request_whose_application_leaves_before_the_answer_still_gets_an_access_line() {
    let mut s = Spawned::start("127.0.0.1:0", &[]).await;
    leave_before_the_answer(s.addr(), &s.lab, "/block?secret=1").await;
    let line = s
        .proc
        .wait_line("went away before the answer", Duration::from_secs(10))
        .await;
    assert!(line.contains("status=499"), "{line}");
    assert!(line.contains("path=/block"), "{line}");
    assert!(!line.contains("secret"), "{line}");
    s.lab.gate.add_permits(1);
    s.proc.terminate().await;
    let status = s.proc.wait_exit(EXIT_WITHIN).await;
    assert_eq!(status.code(), Some(0), "{}", s.proc.stderr());
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn socket_dir() -> tempfile::TempDir {
    // Short, under /tmp: socket paths are limited to about 100 bytes.
    tempfile::Builder::new()
        .prefix("vero-cli")
        .tempdir_in("/tmp")
        .unwrap()
}

#[tokio::test]
async fn unix_socket_is_0660_forwards_with_the_certificate_and_is_removed_at_exit() {
    let dir = socket_dir();
    let sock = dir.path().join("p.sock");
    let mut s = Spawned::start(&format!("unix:{}", sock.display()), &[]).await;
    assert_eq!(s.listen, format!("unix:{}", sock.display()));
    assert_eq!(mode_of(&sock), 0o660);

    let stream = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = timeout(
        Duration::from_secs(30),
        tx.send_request(get("/Customer/x/v1?over=unix")),
    )
    .await
    .expect("no answer over the socket within 30 s")
    .unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    drop(tx);
    let r = s.lab.last();
    assert_eq!(r.target, "/Customer/x/v1?over=unix");
    assert_eq!(
        r.seen.client_subject.as_deref(),
        Some("CN=1234567-1, O=Testi Oy, C=FI")
    );

    s.proc.terminate().await;
    let status = s.proc.wait_exit(EXIT_WITHIN).await;
    assert_eq!(status.code(), Some(0), "{}", s.proc.stderr());
    assert!(!sock.exists(), "the socket file was left behind");
}

#[tokio::test]
async fn listen_mode_sets_the_socket_permissions() {
    let dir = socket_dir();
    let sock = dir.path().join("p.sock");
    let mut s = Spawned::start(
        &format!("unix:{}", sock.display()),
        &["--listen-mode", "0600"],
    )
    .await;
    assert_eq!(mode_of(&sock), 0o600);
    s.proc.terminate().await;
    let status = s.proc.wait_exit(EXIT_WITHIN).await;
    assert_eq!(status.code(), Some(0), "{}", s.proc.stderr());
    assert!(!sock.exists(), "the socket file was left behind");
}

/// Whether a new connection to `addr` is refused, or closed without an answer.
async fn turned_away(addr: SocketAddr) -> bool {
    let Ok(mut tcp) = TcpStream::connect(addr).await else {
        return true;
    };
    let ask = b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if tcp.write_all(ask).await.is_err() {
        return true;
    }
    let mut buf = [0u8; 64];
    match timeout(Duration::from_secs(5), tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

#[tokio::test]
async fn sigterm_stops_accepting_lets_the_request_in_flight_finish_and_exits_0() {
    let mut s = Spawned::start("127.0.0.1:0", &[]).await;
    let addr = s.addr();
    let in_flight = tokio::spawn(send(addr, get("/block")));
    s.lab.wait_blocked(1).await;

    s.proc.terminate().await;
    s.proc.wait_line("draining", Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !turned_away(addr).await {
        assert!(
            Instant::now() < deadline,
            "a new connection was still served after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        s.proc.child.try_wait().unwrap().is_none(),
        "exited with a request in flight:\n{}",
        s.proc.stderr()
    );

    s.lab.gate.add_permits(1);
    let answer = timeout(Duration::from_secs(30), in_flight)
        .await
        .expect("the request in flight was not answered")
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.json()["released"], true);
    let status = s.proc.wait_exit(EXIT_WITHIN).await;
    assert_eq!(status.code(), Some(0), "{}", s.proc.stderr());
}

#[tokio::test]
async fn tls_spoken_to_the_plain_port_is_logged_with_a_hint() {
    let pki = Pki::new();
    let mut p = Proc::spawn(&args_listening_on(&pki, NOWHERE, "127.0.0.1:0", &[]));
    let addr: SocketAddr = p.serving().await.parse().unwrap();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // The start of a TLS record carrying a ClientHello: handshake (0x16), TLS 1.0 record version.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x03,
    ];
    hello.extend_from_slice(&[0u8; 32]);
    tcp.write_all(&hello).await.unwrap();
    let line = p.wait_line("plain HTTP", Duration::from_secs(10)).await;
    assert!(line.contains("WARN"), "{line}");
    // And the connection is closed rather than left hanging.
    let mut buf = [0u8; 16];
    let read = timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("the connection stayed open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

/// SHA-256 of `n` bytes of `x`, the filler the recording upstream and `stream_bytes` use.
fn sha256_of_filler(n: u64) -> String {
    let chunk = vec![b'x'; 64 * 1024];
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut left = n;
    while left > 0 {
        let take = left.min(chunk.len() as u64) as usize;
        ctx.update(&chunk[..take]);
        left -= take as u64;
    }
    vero_proxy::identity::load::hex(ctx.finish().as_ref())
}

/// The peak resident set (VmHWM) of `pid`, in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}

/// Sends `req` on a new HTTP/1.1 connection and streams the answer's body through SHA-256.
async fn stream_through<B>(addr: SocketAddr, req: Request<B>) -> (StatusCode, u64, String)
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = tx.send_request(req).await.unwrap();
    let status = resp.status();
    let mut body = resp.into_body();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            ctx.update(d);
            len += d.len() as u64;
        }
    }
    (
        status,
        len,
        vero_proxy::identity::load::hex(ctx.finish().as_ref()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_while_large_bodies_stream_through_the_binary() {
    const DOWN: u64 = 512 << 20;
    const UP: u64 = 128 << 20;
    const LIMIT_KIB: u64 = 48 << 10;
    let s = Spawned::start("127.0.0.1:0", &[]).await;
    let addr = s.addr();
    let pid = s.proc.pid();
    let at_start = vm_hwm_kib(pid);

    let (status, len, sha) = timeout(
        Duration::from_secs(300),
        stream_through(
            addr,
            Request::get(format!("/bytes/{DOWN}"))
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        ),
    )
    .await
    .expect("the 512 MiB download took over 300 s");
    assert_eq!(status, 200);
    assert_eq!(len, DOWN);
    assert_eq!(sha, sha256_of_filler(DOWN));
    let after_download = vm_hwm_kib(pid);

    let (status, _, _) = timeout(
        Duration::from_secs(300),
        stream_through(
            addr,
            Request::post("/upload")
                .header("host", "localhost")
                .body(stream_bytes(UP))
                .unwrap(),
        ),
    )
    .await
    .expect("the 128 MiB upload took over 300 s");
    assert_eq!(status, 200);
    let r = s.lab.last();
    assert_eq!((r.method.as_str(), r.target.as_str()), ("POST", "/upload"));
    assert_eq!(r.body_len, UP);
    assert_eq!(r.body_sha256, sha256_of_filler(UP));
    let after_upload = vm_hwm_kib(pid);

    println!(
        "vero-proxy VmHWM: {at_start} KiB at start, {after_download} KiB after {} MiB down, \
         {after_upload} KiB after {} MiB up (limit {LIMIT_KIB} KiB)",
        DOWN >> 20,
        UP >> 20
    );
    assert!(
        after_upload < LIMIT_KIB,
        "peak RSS of the proxy was {after_upload} KiB, over {LIMIT_KIB} KiB"
    );
}

#[tokio::test]
async fn logs_never_carry_queries_header_values_bodies_or_keys() {
    let pki = Pki::new();
    let lab = Arc::new(Lab::default());
    let upstream = start_upstream(&pki.ca, &pki.ca, UpstreamSpec::default(), lab.clone()).await;
    let added = pki.path("software-key");
    std::fs::write(&added, "ADDEDSECRET\n").unwrap();
    let header = format!("Vero-SoftwareKey: @{}", added.display());
    let url = format!("https://localhost:{}", upstream.addr.port());
    let args = args_listening_on(&pki, &url, "127.0.0.1:0", &["--add-header", &header]);
    // Debug level: the libraries' own logs must not leak either.
    let mut proc = Proc::spawn_logging(&args, "debug");
    let addr: SocketAddr = proc.serving().await.parse().unwrap();
    let req = Request::post("/Customer/IDs/v1?hetu=010101-123N&ytunnus=QUERYSECRET")
        .header("host", "localhost")
        .header("authorization", "Bearer AUTHSECRET")
        .header("cookie", "session=COOKIESECRET")
        .header("x-app-header", "HEADERSECRET")
        .body(Full::new(Bytes::from_static(b"{\"hetu\":\"BODYSECRET\"}")))
        .unwrap();
    assert_eq!(send(addr, req).await.status, 200);
    let refused = Request::get("/Customer/IDs/v1?hetu=REFUSEDSECRET")
        .header("host", "localhost")
        .header("origin", "https://evil.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(addr, refused).await.status, 403);
    assert_eq!(lab.last().headers["vero-softwarekey"], "ADDEDSECRET");
    proc.terminate().await;
    assert!(proc.wait_exit(Duration::from_secs(30)).await.success());
    let log = proc.stderr();
    assert!(log.contains("/Customer/IDs/v1"), "no access line:\n{log}");
    let key_line = pki.client.key_pem.lines().nth(1).unwrap();
    for secret in [
        "010101-123N",
        "QUERYSECRET",
        "REFUSEDSECRET",
        "AUTHSECRET",
        "COOKIESECRET",
        "HEADERSECRET",
        "BODYSECRET",
        "ADDEDSECRET",
        "PRIVATE KEY",
        key_line,
    ] {
        assert!(
            !log.contains(secret),
            "{secret} appeared in the log:\n{log}"
        );
    }
}
