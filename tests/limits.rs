//! Limits and lifecycle: the upstream concurrency cap and its queue, client-side limits,
//! stale pooled connections, added headers, and draining at shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn the_upstream_never_sees_more_than_the_cap() {
    let h1: &[&[u8]] = &[b"http/1.1"];
    let s = Setup::with(
        UpstreamSpec {
            alpn: h1,
            ..Default::default()
        },
        &["--max-upstream-concurrency", "3"],
    )
    .await;
    let addr = s.addr;
    let tasks: Vec<_> = (0..20)
        .map(|_| tokio::spawn(async move { send(addr, get("/block")).await }))
        .collect();
    s.lab.wait_blocked(3).await;
    // Let them through one at a time; each release lets exactly one more in.
    for n in 4..=20 {
        s.lab.gate.add_permits(1);
        s.lab.wait_blocked(n).await;
        assert!(s.lab.active.load(Ordering::SeqCst) <= 3);
    }
    s.lab.gate.add_permits(3);
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 200);
    }
    assert_eq!(s.lab.max_active.load(Ordering::SeqCst), 3);
    assert!(
        s.upstream.handshakes.load(Ordering::SeqCst) <= 3,
        "more connections than the cap"
    );
}

#[tokio::test]
async fn a_full_queue_answers_503_with_retry_after() {
    let s = Setup::new(&[
        "--max-upstream-concurrency",
        "1",
        "--upstream-queue-timeout",
        "200ms",
    ])
    .await;
    let addr = s.addr;
    let first = tokio::spawn(async move { send(addr, get("/block")).await });
    s.lab.wait_blocked(1).await;
    let a = s.get("/x").await;
    assert_eq!(
        (a.status.as_u16(), a.error_code().as_str()),
        (503, "upstream_busy")
    );
    assert_eq!(a.headers["retry-after"], "1");
    s.lab.gate.add_permits(1);
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(s.get("/x").await.status, 200);

    let s = Setup::new(&[
        "--max-upstream-concurrency",
        "1",
        "--upstream-queue-size",
        "0",
    ])
    .await;
    let addr = s.addr;
    let first = tokio::spawn(async move { send(addr, get("/block")).await });
    s.lab.wait_blocked(1).await;
    let a = s.get("/x").await;
    assert_eq!(a.error_code(), "upstream_busy");
    assert!(a.json()["message"]
        .as_str()
        .unwrap()
        .contains("--upstream-queue-size"));
    s.lab.gate.add_permits(1);
    assert_eq!(first.await.unwrap().status, 200);
}

#[tokio::test]
async fn a_thousand_clients_at_once_are_all_answered_under_the_cap() {
    rlimit::increase_nofile_limit(8192).unwrap();
    let s = Setup::new(&["--max-upstream-concurrency", "50"]).await;
    let addr = s.addr;
    let tasks: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(async move { send(addr, get("/block")).await }))
        .collect();
    s.lab.wait_blocked(50).await;
    s.lab.gate.add_permits(1000);
    let mut ok = 0;
    for t in tasks {
        ok += (t.await.unwrap().status == 200) as usize;
    }
    assert_eq!(ok, 1000);
    assert_eq!(s.lab.received().len(), 1000);
    assert!(s.lab.max_active.load(Ordering::SeqCst) <= 50);
}

#[tokio::test]
async fn slow_request_headers_are_cut_off() {
    let s = Setup::new(&["--client-header-timeout", "300ms"]).await;
    let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: local")
        .await
        .unwrap();
    let mut buf = Vec::new();
    // The proxy closes the connection (maybe after a 408); it must not wait forever.
    let r = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "connection still open after the header timeout");
    assert!(s.lab.received().is_empty());
}

#[tokio::test]
async fn oversized_request_headers_are_refused() {
    let s = Setup::new(&["--max-request-header-bytes", "16384"]).await;
    let big = "a".repeat(20_000);
    let a = s
        .send(
            Request::get("/x")
                .header("host", "localhost")
                .header("x-big", big)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, 431);
    assert!(s.lab.received().is_empty());
    let fits = "a".repeat(8_000);
    let a = s
        .send(
            Request::get("/x")
                .header("host", "localhost")
                .header("x-big", fits)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn connections_the_upstream_closed_while_idle_are_not_used_again() {
    let h1: &[&[u8]] = &[b"http/1.1"];
    let s = Setup::with(
        UpstreamSpec {
            alpn: h1,
            ..Default::default()
        },
        &[],
    )
    .await;
    for _ in 0..5 {
        assert_eq!(s.get("/x").await.status, 200);
        s.upstream.drop_connections();
    }
    assert_eq!(s.lab.received().len(), 5);
}

#[tokio::test]
async fn a_request_the_upstream_received_is_never_replayed() {
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
        assert_eq!(s.get("/x").await.status, 200);
        let addr = s.addr;
        let req = Request::post("/block")
            .header("host", "localhost")
            .body(Full::new(Bytes::from_static(b"pay")))
            .unwrap();
        let pending = tokio::spawn(async move { send(addr, req).await });
        s.lab.wait_blocked(1).await;
        // The upstream has the request and goes away without answering.
        s.upstream.drop_connections();
        let a = pending.await.unwrap();
        assert_eq!(
            (a.status.as_u16(), a.error_code().as_str()),
            (502, "upstream_unreachable")
        );
        let posts = s
            .lab
            .received()
            .iter()
            .filter(|r| r.method == "POST")
            .count();
        assert_eq!(posts, 1, "the request was sent again");
    }
}

#[tokio::test]
async fn added_headers_are_set_and_file_values_follow_the_file() {
    let pki = Pki::new();
    let key_file = pki.path("software-key");
    std::fs::write(&key_file, "key-one\r\n").unwrap();
    let lab = std::sync::Arc::new(Lab::default());
    let up = start_upstream(&pki.ca, &pki.ca, UpstreamSpec::default(), lab.clone()).await;
    let sw = format!("Vero-SoftwareKey: @{}", key_file.display());
    let args = proxy_args(
        &pki,
        &format!("https://localhost:{}", up.addr.port()),
        &[
            "--add-header",
            &sw,
            "--add-header",
            "User-Agent: payroll/1.0",
        ],
    );
    let proxy = start_proxy(args).await;
    let addr = tcp_addr(&proxy);
    let req = Request::get("/x")
        .header("host", "localhost")
        .header("user-agent", "app")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(addr, req).await.status, 200);
    let r = lab.last();
    assert_eq!(r.headers["vero-softwarekey"], "key-one");
    assert_eq!(
        r.headers.get_all("user-agent").iter().collect::<Vec<_>>(),
        ["payroll/1.0"]
    );

    // A rotated key file is picked up without a restart.
    let tmp = pki.path("software-key.new");
    std::fs::write(&tmp, "key-two\n").unwrap();
    std::fs::rename(&tmp, &key_file).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(send(addr, get("/x")).await.status, 200);
        if lab.last().headers["vero-softwarekey"] == "key-two" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new key was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish_and_stops_accepting() {
    let s = Setup::new(&[]).await;
    let addr = s.addr;
    let in_flight = tokio::spawn(async move { send(addr, get("/block")).await });
    s.lab.wait_blocked(1).await;
    let Setup {
        proxy,
        lab,
        upstream: _up,
        ..
    } = s;
    proxy.begin_shutdown();
    // New connections are refused once the accept loop has stopped.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still accepting after shutdown began"
        );
        tokio::task::yield_now().await;
    }
    lab.gate.add_permits(1);
    let a = in_flight.await.unwrap();
    assert_eq!(a.status, 200);
    tokio::time::timeout(Duration::from_secs(10), proxy.wait())
        .await
        .expect("drain did not finish");
}

#[tokio::test]
async fn the_pool_is_replaced_after_the_max_connection_age() {
    let s = Setup::new(&["--upstream-max-connection-age", "300ms"]).await;
    assert_eq!(s.get("/x").await.status, 200);
    let first = std::sync::Arc::as_ptr(&s.proxy.in_service().unwrap());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while std::sync::Arc::as_ptr(&s.proxy.in_service().unwrap()) == first {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pool was never replaced"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.get("/x").await.status, 200);
    let conns: std::collections::HashSet<_> =
        s.lab.received().iter().map(|r| r.seen.connection).collect();
    assert_eq!(
        conns.len(),
        2,
        "the second request should use a connection of the new pool"
    );
}

#[tokio::test]
async fn a_replaced_pool_is_warm_so_a_burst_on_it_is_no_handshake_storm() {
    // Each replacement (--upstream-max-connection-age) makes the new pool's connection before
    // it goes into service. A cold pool did not yet know that the upstream speaks HTTP/2, so
    // requests arriving together on it each opened a connection of their own (bench/compare.sh
    // saw 63 handshakes at once and twice the memory, every five minutes).
    let s = Setup::new(&["--upstream-max-connection-age", "1s"]).await;
    assert_eq!(s.get("/x").await.status, 200);
    let in_service = || std::sync::Arc::as_ptr(&s.proxy.in_service().unwrap());
    for _ in 0..5 {
        let old = in_service();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while in_service() == old {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the pool was never replaced"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (pool, before) = (in_service(), s.upstream.handshakes.load(Ordering::SeqCst));
        let addr = s.addr;
        let burst: Vec<_> = (0..32)
            .map(|_| tokio::spawn(async move { send(addr, get("/x")).await.status }))
            .collect();
        for t in burst {
            assert_eq!(t.await.unwrap(), 200);
        }
        if in_service() != pool {
            continue; // replaced again during the burst: measure on the next pool
        }
        // The next pool may be warming already (one handshake); a cold pool would take 32.
        let made = s.upstream.handshakes.load(Ordering::SeqCst) - before;
        assert!(
            made <= 1,
            "32 requests on a replaced pool made {made} connections"
        );
        return;
    }
    panic!("every burst straddled a pool replacement");
}

#[tokio::test]
async fn http2_connections_the_upstream_closes_are_replaced_without_a_storm() {
    // The upstream closes each HTTP/2 connection gracefully (GOAWAY) after 20 requests. Requests
    // arriving meanwhile wait for the one new connection instead of each opening their own.
    // (Refused streams and their replay are tested against nginx in tests/nginx.rs.)
    let pki = Pki::new();
    let lab = std::sync::Arc::new(Lab::default());
    let server = pki.ca.server(&["localhost"]).unwrap();
    let cfg =
        vero_proxy::demo::standin::server_config(&server, &[&pki.ca.ca_pem], &[b"h2"]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up =
        vero_proxy::demo::standin::start_closing_after(listener, cfg, lab_handler(lab.clone()), 20)
            .unwrap();
    let proxy = start_proxy_to(&pki, up.addr.port(), &[]).await;
    let addr = tcp_addr(&proxy);
    let mut tasks = Vec::new();
    for i in 0..32 {
        tasks.push(tokio::spawn(async move {
            let mut bad = Vec::new();
            for j in 0..25 {
                let body = format!("{{\"n\":{}}}", i * 100 + j);
                let req = Request::post("/x")
                    .header("host", "localhost")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let a = send(addr, req).await;
                if a.status != 200 {
                    bad.push(String::from_utf8_lossy(&a.body).into_owned());
                }
            }
            bad
        }));
    }
    let mut bad = Vec::new();
    for t in tasks {
        bad.extend(t.await.unwrap());
    }
    let handshakes = up.handshakes.load(Ordering::SeqCst);
    println!(
        "800 requests, GOAWAY every 20: {} failed, {handshakes} handshakes",
        bad.len()
    );
    assert!(
        bad.is_empty(),
        "{} failed, first: {:?}",
        bad.len(),
        bad.first()
    );
    // Each request went upstream once: nothing was replayed that the upstream had processed.
    assert_eq!(lab.received().len(), 800);
    // One connection per 20 requests, give or take: not one per waiting request.
    assert!(
        handshakes <= 800 / 20 * 2,
        "{handshakes} handshakes for 800 requests"
    );
}
