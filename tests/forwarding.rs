//! The forwarding core against a real mTLS upstream: what the upstream receives, and what the
//! application gets back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

#[tokio::test]
async fn forwards_path_query_and_headers_and_presents_the_client_certificate() {
    let s = Setup::new(&[]).await;
    let req = Request::get("/Customer/IDs/ValidateTaxNumber/v1?taxNumber=FI%2012&x=1&x=2&empty=")
        .header("host", "localhost:8080")
        .header("x-app", "payroll")
        .header("connection", "x-private, keep-alive")
        .header("x-private", "must-not-pass")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic c2VjcmV0")
        .header("te", "trailers, gzip")
        .header("upgrade", "websocket")
        .header("trailer", "x-checksum")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = s.send(req).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let r = s.lab.last();
    assert_eq!(
        r.target,
        "/Customer/IDs/ValidateTaxNumber/v1?taxNumber=FI%2012&x=1&x=2&empty="
    );
    assert_eq!(
        r.seen.client_subject.as_deref(),
        Some("CN=1234567-1, O=Testi Oy, C=FI")
    );
    assert_eq!(r.seen.sni.as_deref(), Some("localhost"));
    assert_eq!(r.headers["x-app"], "payroll");
    assert_eq!(r.headers["via"], "1.1 vero-proxy");
    assert_eq!(r.headers["trailer"], "x-checksum");
    for gone in [
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "upgrade",
        "x-forwarded-for",
        "forwarded",
    ] {
        assert!(!r.headers.contains_key(gone), "{gone} was forwarded");
    }
    let te: Vec<_> = r.headers.get_all("te").iter().collect();
    assert!(te.is_empty() || te == ["trailers"], "{te:?}");
    // The upstream's answer comes back with its own headers, hop-by-hop ones removed.
    assert_eq!(a.headers["x-upstream-header"], "kept");
    assert!(!a.headers.contains_key("x-hop"));
}

#[tokio::test]
async fn a_via_the_application_sent_is_kept_with_ours_after_it() {
    let s = Setup::new(&[]).await;
    let req = Request::get("/v")
        .header("host", "localhost")
        .header("via", "1.0 payroll-gateway")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(s.send(req).await.status, 200);
    assert_eq!(
        s.lab.last().headers["via"],
        "1.0 payroll-gateway, 1.1 vero-proxy"
    );
}

#[tokio::test]
async fn host_is_the_upstream_authority_over_http1() {
    let s = Setup::with(
        UpstreamSpec {
            alpn: &[b"http/1.1"],
            ..Default::default()
        },
        &[],
    )
    .await;
    let a = s.get("/x").await;
    assert_eq!(a.status, 200);
    let r = s.lab.last();
    assert_eq!(r.version, http::Version::HTTP_11);
    assert_eq!(
        r.headers["host"],
        format!("localhost:{}", s.upstream.addr.port()).as_str()
    );
    assert_eq!(r.seen.alpn.as_deref(), Some("http/1.1"));
}

#[tokio::test]
async fn http2_upstream_is_used_when_offered_and_carries_no_duplicate_host() {
    let s = Setup::new(&[]).await;
    assert_eq!(s.get("/x?y=1").await.status, 200);
    let r = s.lab.last();
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(r.seen.alpn.as_deref(), Some("h2"));
    assert_eq!(r.target, "/x?y=1");
    assert!(r.headers.get_all("host").iter().count() <= 1);
    // Over HTTP/2 the authority travels as :authority; a Host beside it is what nginx refuses.
    assert_eq!(
        r.headers.get("host"),
        None,
        "a Host header went out over HTTP/2"
    );
}

#[tokio::test]
async fn upstream_protocol_http1_is_honoured_against_an_h2_server() {
    let s = Setup::new(&["--upstream-protocol", "http1"]).await;
    assert_eq!(s.get("/x").await.status, 200);
    assert_eq!(s.lab.last().seen.alpn.as_deref(), Some("http/1.1"));
}

#[tokio::test]
async fn upstream_protocol_http2_refuses_an_http1_only_server() {
    let s = Setup::with(
        UpstreamSpec {
            alpn: &[b"http/1.1"],
            ..Default::default()
        },
        &["--upstream-protocol", "http2"],
    )
    .await;
    let a = s.get("/x").await;
    assert_eq!(a.status, 502);
    assert_eq!(a.error_code(), "upstream_unreachable");
    let msg = a.json()["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("HTTP/2"), "{msg}");
}

#[tokio::test]
async fn base_path_prefixes_every_path() {
    let pki = Pki::new();
    let lab = std::sync::Arc::new(Lab::default());
    let up = start_upstream(&pki.ca, &pki.ca, UpstreamSpec::default(), lab.clone()).await;
    let proxy = start_proxy(proxy_args(
        &pki,
        &format!("https://localhost:{}/envid/Test/", up.addr.port()),
        &[],
    ))
    .await;
    let addr = tcp_addr(&proxy);
    let a = send(addr, get("/Customer/x/v1?q=%C3%A4")).await;
    assert_eq!(a.status, 200);
    assert_eq!(lab.last().target, "/envid/Test/Customer/x/v1?q=%C3%A4");
}

#[tokio::test]
async fn request_bodies_arrive_intact_with_length_or_chunked() {
    let h1: &[&[u8]] = &[b"http/1.1"];
    let h2: &[&[u8]] = &[b"h2"];
    for alpn in [h1, h2] {
        let s = Setup::with(
            UpstreamSpec {
                alpn,
                ..Default::default()
            },
            &[],
        )
        .await;
        let data: Vec<u8> = (0..(1 << 20) + 7).map(|i| (i * 31 % 251) as u8).collect();
        let a = s
            .send(
                Request::post("/upload")
                    .header("host", "localhost")
                    .body(Full::new(Bytes::from(data.clone())))
                    .unwrap(),
            )
            .await;
        assert_eq!(a.status, 200);
        let r = s.lab.last();
        assert_eq!(
            (r.body_len, r.body_sha256.as_str()),
            (data.len() as u64, sha256_hex(&data).as_str())
        );

        // Chunked, written by hand on a raw socket.
        let body = "hello, chunked world";
        let raw = format!(
            "POST /chunky HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            body.len(),
            body
        );
        let out = raw_exchange(s.addr, raw.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let r = s.lab.last();
        assert_eq!(r.body_sha256, sha256_hex(body.as_bytes()));
        assert!(
            !r.headers.contains_key("transfer-encoding") || r.version == http::Version::HTTP_11
        );
    }
}

#[tokio::test]
async fn upstream_statuses_and_bodies_pass_untouched() {
    let s = Setup::new(&[]).await;
    for code in [400u16, 401, 403, 404, 422, 429, 500, 503] {
        let a = s.get(&format!("/status/{code}")).await;
        assert_eq!(a.status.as_u16(), code);
        assert!(
            !a.headers.contains_key("x-vero-proxy-error"),
            "{code} was marked as the proxy's own"
        );
        assert_eq!(a.json()["detail"], "from upstream");
    }
}

#[tokio::test]
async fn head_204_304_and_trailers_behave() {
    let s = Setup::with(
        UpstreamSpec {
            alpn: &[b"http/1.1"],
            ..Default::default()
        },
        &[],
    )
    .await;
    let a = s
        .send(
            Request::head("/bytes/1000")
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!((a.status.as_u16(), a.body.len()), (200, 0));
    assert_eq!(a.headers["content-length"], "1000");
    assert_eq!(s.get("/nocontent").await.status, 204);
    let a = s.get("/notmodified").await;
    assert_eq!(
        (a.status.as_u16(), a.headers["etag"].to_str().unwrap()),
        (304, "\"v1\"")
    );
    let a = s
        .send(
            Request::get("/trailers")
                .header("host", "localhost")
                .header("te", "trailers")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(a.body, "hello");
    assert_eq!(
        a.trailers.expect("trailers were dropped")["x-checksum"],
        "abc123"
    );
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body() {
    let s = Setup::new(&[]).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(
        b"POST /e HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100 Continue"));
    tcp.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&rest).contains("\r\n\r\n") {
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        rest.extend_from_slice(&chunk[..n]);
    }
    assert!(String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200"));
    assert_eq!(s.lab.last().body_sha256, sha256_hex(b"hello"));
}

#[tokio::test]
async fn keep_alive_connections_are_reused() {
    let s = Setup::with(
        UpstreamSpec {
            alpn: &[b"http/1.1"],
            ..Default::default()
        },
        &[],
    )
    .await;
    for _ in 0..10 {
        assert_eq!(s.get("/x").await.status, 200);
    }
    assert_eq!(
        s.upstream
            .handshakes
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    let conns: std::collections::HashSet<_> =
        s.lab.received().iter().map(|r| r.seen.connection).collect();
    assert_eq!(conns.len(), 1);
}

/// Sends raw bytes, reads until the server closes.
pub async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tcp.read_to_end(&mut out),
    )
    .await
    .unwrap()
    .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Asks for `path` over raw TCP, reads the answer's head and a first part of its body, then
/// goes away (what an application does when it is stopped mid-download).
async fn abandon_answer(addr: std::net::SocketAddr, path: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 8192];
    while got.len() < 16 * 1024 {
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "the proxy closed before sending 16 KiB of {path}: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
}

/// Waits (at most 10 s) until a connection of the upstream in service is idle in its pool.
async fn idle_in_pool(proxy: &vero_proxy::app::Running, or_else: &str) {
    let upstream = proxy.in_service().unwrap();
    tokio::time::timeout(Duration::from_secs(10), upstream.pool.idle_at_least(1))
        .await
        .expect(or_else);
}

/// Waits (at most 10 s) until the upstream in service has no connection open.
async fn all_closed(proxy: &vero_proxy::app::Running, or_else: &str) {
    let upstream = proxy.in_service().unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        upstream.connections.open_at_most(0),
    )
    .await
    .expect(or_else);
}

fn http1_only() -> UpstreamSpec<'static> {
    UpstreamSpec {
        alpn: &[b"http/1.1"],
        ..Default::default()
    }
}

#[tokio::test]
async fn a_short_answer_the_application_abandons_is_read_off_and_its_connection_reused() {
    let s = Setup::with(http1_only(), &[]).await;
    abandon_answer(s.addr, "/bytes/524288").await;
    idle_in_pool(
        &s.proxy,
        "the abandoned answer's connection never came back to the pool",
    )
    .await;
    assert_eq!(s.get("/x").await.status, 200);
    let conns: Vec<_> = s.lab.received().iter().map(|r| r.seen.connection).collect();
    assert_eq!(
        conns,
        vec![1, 1],
        "the second request went out on a new connection"
    );
    assert_eq!(s.upstream.handshakes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_long_answer_the_application_abandons_closes_its_connection() {
    let s = Setup::with(http1_only(), &[]).await;
    // 64 MiB: far more than is worth reading for nobody.
    abandon_answer(s.addr, "/bytes/67108864").await;
    all_closed(
        &s.proxy,
        "the abandoned long answer's connection was kept open",
    )
    .await;
    assert_eq!(s.proxy.in_service().unwrap().pool.idle_count(), 0);
    assert_eq!(s.get("/x").await.status, 200);
    let conns: Vec<_> = s.lab.received().iter().map(|r| r.seen.connection).collect();
    assert_eq!(conns, vec![1, 2]);
}

#[tokio::test]
async fn a_connection_still_being_made_when_its_application_goes_away_serves_the_next_request() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::new();
    let lab = std::sync::Arc::new(Lab::default());
    let up = start_upstream(&pki.ca, &pki.ca, http1_only(), lab.clone()).await;
    // Between proxy and upstream, a relay that holds each connection until told to go on:
    // the proxy's handshake is under way, not finished, while the application leaves.
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(tokio::sync::Notify::new());
    let go_on = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let (acc, go) = (accepted.clone(), go_on.clone());
    let up_addr = up.addr;
    tokio::spawn(async move {
        while let Ok((mut from, _)) = relay.accept().await {
            acc.notify_one();
            let go = go.clone();
            tokio::spawn(async move {
                go.acquire().await.unwrap().forget();
                let mut to = tokio::net::TcpStream::connect(up_addr).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut from, &mut to).await;
            });
        }
    });
    let proxy = start_proxy_to(&pki, relay_port, &[]).await;
    let addr = tcp_addr(&proxy);

    let mut app = tokio::net::TcpStream::connect(addr).await.unwrap();
    app.write_all(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    accepted.notified().await;
    drop(app);
    go_on.add_permits(100);
    idle_in_pool(
        &proxy,
        "the connection made for a request that went away was not kept",
    )
    .await;
    let answer = send(addr, get("/y")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(up.handshakes.load(Ordering::SeqCst), 1);
    let received: Vec<_> = lab.received().iter().map(|r| r.target.clone()).collect();
    assert_eq!(
        received,
        vec!["/y".to_owned()],
        "the abandoned request was sent anyway"
    );
}

#[tokio::test]
async fn a_connection_whose_answer_is_still_coming_when_its_application_goes_away_serves_again() {
    let s = Setup::with(http1_only(), &[]).await;
    leave_before_the_answer(s.addr, &s.lab, "/block").await;
    s.lab.gate.add_permits(1);
    idle_in_pool(
        &s.proxy,
        "the connection was closed under an answer on its way",
    )
    .await;
    assert_eq!(s.get("/x").await.status, 200);
    let conns: Vec<_> = s.lab.received().iter().map(|r| r.seen.connection).collect();
    assert_eq!(conns, vec![1, 1]);
}

#[tokio::test]
async fn an_answer_that_does_not_come_after_its_application_left_does_not_hold_the_connection() {
    let s = Setup::with(http1_only(), &[]).await;
    leave_before_the_answer(s.addr, &s.lab, "/block").await;
    // The upstream never answers: the connection is given up, not kept waiting for it.
    all_closed(
        &s.proxy,
        "a connection stayed open waiting for an answer nobody wants",
    )
    .await;
    s.lab.gate.add_permits(1);
}
