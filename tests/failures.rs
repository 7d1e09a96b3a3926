//! The proxy's own answers: every refusal and upstream failure is a JSON answer with a code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use vero_proxy::demo::pki::TestPki;

async fn proxy_to(pki: &Pki, url: &str, extra: &[&str]) -> std::net::SocketAddr {
    let running = start_proxy(proxy_args(pki, url, extra)).await;
    let vero_proxy::server::BoundAddr::Tcp(addr) = running.listen else {
        panic!()
    };
    // The proxy keeps running for the rest of the test.
    std::mem::forget(running);
    addr
}

#[tokio::test]
async fn refused_client_certificate_is_named_under_tls13_and_tls12() {
    let h1: &[&[u8]] = &[b"http/1.1"];
    let both: &[&[u8]] = &[b"h2", b"http/1.1"];
    for (tls12_only, alpn) in [(false, both), (false, h1), (true, both), (true, h1)] {
        let pki = Pki::new();
        let other = TestPki::new("some other CA").unwrap();
        let lab = Arc::new(Lab::default());
        let spec = UpstreamSpec {
            client_cas: vec![other.ca_pem.clone()],
            tls12_only,
            alpn,
            ..Default::default()
        };
        let up = start_upstream(&pki.ca, &pki.ca, spec, lab.clone()).await;
        let addr = proxy_to(&pki, &format!("https://localhost:{}", up.addr.port()), &[]).await;
        // Several times: under TLS 1.3 the refusal races with writing the request.
        for _ in 0..5 {
            let a = send(addr, get("/x")).await;
            assert_eq!(a.status, 502, "tls12_only={tls12_only}: {:?}", a.body);
            assert_eq!(
                a.error_code(),
                "client_certificate_rejected",
                "tls12_only={tls12_only}: {:?}",
                a.body
            );
            let msg = a.json()["message"].as_str().unwrap().to_owned();
            assert!(msg.contains("CN=1234567-1"), "{msg}");
        }
        assert!(lab.received().is_empty());
    }
}

#[tokio::test]
async fn untrusted_or_misnamed_upstream_certificate_is_refused() {
    let pki = Pki::new();
    let rogue = TestPki::new("rogue CA").unwrap();
    let lab = Arc::new(Lab::default());
    let up = start_upstream(&rogue, &pki.ca, UpstreamSpec::default(), lab.clone()).await;
    let addr = proxy_to(&pki, &format!("https://localhost:{}", up.addr.port()), &[]).await;
    let a = send(addr, get("/x")).await;
    assert_eq!(
        (a.status.as_u16(), a.error_code().as_str()),
        (502, "upstream_certificate_untrusted")
    );
    assert!(
        a.json()["message"]
            .as_str()
            .unwrap()
            .contains("not trusted"),
        "{:?}",
        a.body
    );

    let up = start_upstream(
        &pki.ca,
        &pki.ca,
        UpstreamSpec {
            names: &["other.example"],
            ..Default::default()
        },
        lab.clone(),
    )
    .await;
    let addr = proxy_to(&pki, &format!("https://localhost:{}", up.addr.port()), &[]).await;
    let a = send(addr, get("/x")).await;
    assert_eq!(a.error_code(), "upstream_certificate_untrusted");
    assert!(
        a.json()["message"].as_str().unwrap().contains("host name"),
        "{:?}",
        a.body
    );
    assert!(
        lab.received().is_empty(),
        "a request reached an unverified upstream"
    );
}

#[tokio::test]
async fn closed_port_and_unknown_host_are_unreachable() {
    let pki = Pki::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = proxy_to(&pki, &format!("https://127.0.0.1:{port}"), &[]).await;
    let a = send(addr, get("/x")).await;
    assert_eq!(
        (a.status.as_u16(), a.error_code().as_str()),
        (502, "upstream_unreachable")
    );

    let addr = proxy_to(
        &pki,
        "https://no-such-host.invalid",
        &["--connect-timeout", "5s"],
    )
    .await;
    let a = send(addr, get("/x")).await;
    assert_eq!(
        (a.status.as_u16(), a.error_code().as_str()),
        (502, "upstream_unreachable")
    );
    assert!(a.json()["message"]
        .as_str()
        .unwrap()
        .contains("no-such-host.invalid"));
}

#[tokio::test]
async fn silent_upstream_times_out_with_504() {
    let s = Setup::new(&["--response-timeout", "300ms"]).await;
    let a = s.get("/hang").await;
    assert_eq!(
        (a.status.as_u16(), a.error_code().as_str()),
        (504, "upstream_timeout")
    );
    // The proxy is still fine afterwards.
    assert_eq!(s.get("/x").await.status, 200);
}

#[tokio::test]
async fn connect_and_foreign_authorities_are_refused_and_nothing_leaves() {
    let s = Setup::new(&[]).await;
    let out = raw(
        s.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    assert!(out.contains("connect_not_supported"), "{out}");
    let out = raw(
        s.addr,
        b"GET http://example.com/steal HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("foreign_authority"), "{out}");
    assert!(s.lab.received().is_empty());
}

#[tokio::test]
async fn web_pages_cannot_use_the_certificate() {
    let s = Setup::new(&["--allowed-host", "payroll.internal"]).await;
    let with = |h: &[(&str, &str)]| {
        let mut b = Request::post("/x");
        for (k, v) in h {
            b = b.header(*k, *v);
        }
        b.body(Full::new(Bytes::from_static(b"{}"))).unwrap()
    };
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("host", "attacker.example:8080")], "forbidden_host"),
        (
            &[("host", "localhost"), ("sec-fetch-site", "cross-site")],
            "cross_site_request",
        ),
        (
            &[("host", "localhost"), ("origin", "https://evil.example")],
            "cross_site_request",
        ),
    ];
    for (headers, code) in cases {
        let a = s.send(with(headers)).await;
        assert_eq!(a.status, 403);
        assert_eq!(a.error_code(), *code);
    }
    assert!(s.lab.received().is_empty());
    assert_eq!(
        s.send(with(&[("host", "payroll.internal:8080")]))
            .await
            .status,
        200
    );
    assert_eq!(
        s.send(with(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://localhost:3000")
        ]))
        .await
        .status,
        200
    );
}

async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut out = vec![0u8; 8192];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out[..n]).into_owned()
}

#[tokio::test]
async fn an_upstream_that_stalls_mid_body_is_cut_not_waited_on_forever() {
    let s = Setup::new(&["--response-timeout", "500ms"]).await;
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = tx.send_request(get("/stallbody")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await
    .expect("the application is still waiting for a stalled body");
    assert!(body.is_err(), "a stalled body was presented as complete");
    // Its place under the cap is free again, and the proxy serves.
    assert_eq!(s.proxy.proxy.limiter.in_flight(), 0);
    assert_eq!(s.get("/x").await.status, 200);
}
