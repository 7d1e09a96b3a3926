//! The forwarding core against a real mTLS upstream: what the upstream receives, and what the
//! application gets back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

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
