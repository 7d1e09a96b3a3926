//! The admin listener: probes, metrics, status, the page, reload, remote peers, and draining.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in:\n{text}"))
}

#[tokio::test]
async fn metrics_count_requests_bytes_errors_and_show_the_certificate() {
    let s = Setup::new(&[]).await;
    let body = Bytes::from(vec![b'a'; 1000]);
    let req = Request::post("/x")
        .header("host", "localhost")
        .body(Full::new(body))
        .unwrap();
    assert_eq!(s.send(req).await.status, 200);
    assert_eq!(s.get("/bytes/5000").await.status, 200);
    assert_eq!(s.get("/status/429").await.status, 429);
    let refused = Request::get("/x")
        .header("host", "evil.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(s.send(refused).await.status, 403);

    let a = send(s.proxy.admin, get("/metrics")).await;
    assert_eq!(a.status, 200);
    let text = String::from_utf8(a.body.to_vec()).unwrap();
    assert_eq!(
        metric(
            &text,
            r#"vero_proxy_requests_total{method="POST",status_class="2xx"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"vero_proxy_requests_total{method="GET",status_class="2xx"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            r#"vero_proxy_requests_total{method="GET",status_class="4xx"}"#
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            r#"vero_proxy_upstream_errors_total{reason="forbidden_host"}"#
        ),
        1.0
    );
    assert_eq!(metric(&text, "vero_proxy_request_bytes_total"), 1000.0);
    assert!(metric(&text, "vero_proxy_response_bytes_total") >= 5000.0);
    assert_eq!(
        metric(&text, "vero_proxy_request_duration_seconds_count"),
        4.0
    );
    let info = &s.proxy.in_service().unwrap().identity.info;
    assert_eq!(
        metric(&text, "vero_proxy_identity_not_after_timestamp_seconds"),
        info.not_after as f64
    );
    assert_eq!(
        metric(&text, "vero_proxy_identity_not_before_timestamp_seconds"),
        info.not_before as f64
    );
    for name in [
        "vero_proxy_client_connections",
        "vero_proxy_upstream_in_flight",
        "vero_proxy_upstream_queue_depth",
        "vero_proxy_upstream_connections",
        "vero_proxy_identity_renewal_state",
    ] {
        metric(&text, name);
    }
}

#[tokio::test]
async fn status_json_and_page_show_the_identity_and_its_renewal_state() {
    let s = Setup::new(&[]).await;
    let a = send(s.proxy.admin, get("/status")).await;
    assert_eq!(a.status, 200);
    let st = a.json();
    let info = &s.proxy.in_service().unwrap().identity.info;
    assert_eq!(st["identity"]["subject"], info.subject.as_str());
    assert_eq!(st["identity"]["serial"], info.serial.as_str());
    assert_eq!(st["identity"]["renewal_state"], "ok");
    assert!(st["identity"]["days_left"].as_i64().unwrap() >= 728);
    assert_eq!(st["ready"], true);
    assert!(st["identity"]["source"]
        .as_str()
        .unwrap()
        .contains("client.pem"));
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));

    let page = send(s.proxy.admin, get("/")).await;
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    let html = String::from_utf8(page.body.to_vec()).unwrap();
    assert!(html.contains("CN=1234567-1, O=Testi Oy, C=FI"), "{html}");
    assert!(html.contains(r#"id="days-left" class="days ok""#), "{html}");
    for external in ["<script", "src=", "<link", "href=\"http", "@import", "url("] {
        assert!(
            !html.contains(external),
            "the page loads something ({external})"
        );
    }
}

#[tokio::test]
async fn the_renewal_window_colours_the_page_and_the_state() {
    let pki = Pki::new();
    let now = time::OffsetDateTime::now_utc();
    let soon = pki
        .ca
        .client_valid(
            "1234567-1",
            "Testi Oy",
            now - time::Duration::days(700),
            now + time::Duration::days(30),
            rcgen::KeyPair::generate().unwrap(),
        )
        .unwrap();
    std::fs::write(&pki.cert, &soon.cert_pem).unwrap();
    std::fs::write(&pki.key, &soon.key_pem).unwrap();
    let lab = std::sync::Arc::new(Lab::default());
    let up = start_upstream(&pki.ca, &pki.ca, UpstreamSpec::default(), lab).await;
    let proxy = start_proxy_to(&pki, up.addr.port(), &[]).await;
    let st = send(proxy.admin, get("/status")).await.json();
    assert_eq!(st["identity"]["renewal_state"], "renewal_open");
    let html = String::from_utf8(send(proxy.admin, get("/")).await.body.to_vec()).unwrap();
    assert!(html.contains(r#"class="days warn""#), "{html}");
    let text = String::from_utf8(send(proxy.admin, get("/metrics")).await.body.to_vec()).unwrap();
    assert_eq!(metric(&text, "vero_proxy_identity_renewal_state"), 1.0);

    // Configurable: with a 20-day warning threshold, 30 days left is fine.
    let proxy = start_proxy_to(
        &pki,
        up.addr.port(),
        &[
            "--renewal-warning-days",
            "20",
            "--renewal-critical-days",
            "5",
        ],
    )
    .await;
    assert_eq!(
        send(proxy.admin, get("/status")).await.json()["identity"]["renewal_state"],
        "ok"
    );
}

#[tokio::test]
async fn remote_admin_peers_get_probes_and_metrics_only() {
    // A non-loopback admin address needs the flag.
    let pki = Pki::new();
    use clap::Parser;
    let mut args = proxy_args(&pki, "https://localhost:9", &[]);
    let i = args.iter().position(|a| a == "--admin-listen").unwrap();
    args[i + 1] = "0.0.0.0:0".into();
    let run = vero_proxy::cli::Cli::try_parse_from(args.clone())
        .unwrap()
        .run;
    let e = vero_proxy::config::Config::from_args(&run).unwrap_err();
    assert!(e.to_string().contains("--allow-remote-admin"), "{e}");

    // Loopback peers get everything over the network...
    args.push("--allow-remote-admin".into());
    let lab = std::sync::Arc::new(Lab::default());
    let up = start_upstream(&pki.ca, &pki.ca, UpstreamSpec::default(), lab).await;
    let j = args.iter().position(|a| a == "--upstream").unwrap();
    args[j + 1] = format!("https://localhost:{}", up.addr.port());
    let proxy = start_proxy(args).await;
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.admin.port()));
    for p in ["/healthz", "/readyz", "/metrics", "/status", "/"] {
        assert_eq!(send(local, get(p)).await.status, 200, "{p} from loopback");
    }
    // ...and a remote peer (tests send nothing off loopback, so the peer is given directly).
    let remote: std::net::IpAddr = "10.1.2.3".parse().unwrap();
    let ask = |m: http::Method, p: &'static str| {
        let state = proxy.admin_state.clone();
        async move {
            vero_proxy::admin::answer(&state, &m, p, remote)
                .await
                .status()
        }
    };
    for p in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            ask(http::Method::GET, p).await,
            200,
            "{p} from a remote peer"
        );
    }
    for p in ["/status", "/"] {
        assert_eq!(
            ask(http::Method::GET, p).await,
            403,
            "{p} from a remote peer"
        );
    }
    assert_eq!(ask(http::Method::POST, "/reload").await, 403);
}

#[tokio::test]
async fn request_ids_are_kept_forwarded_and_returned() {
    let s = Setup::new(&[]).await;
    let with_id = |host: &str, id: &str| {
        Request::get("/x")
            .header("host", host)
            .header("x-request-id", id)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let a = s.send(with_id("localhost", "app-42.a")).await;
    assert_eq!(a.headers["x-request-id"], "app-42.a");
    assert_eq!(s.lab.last().headers["x-request-id"], "app-42.a");
    // An unusable one is replaced; errors carry the id too.
    let a = s.send(with_id("evil.example", "bad id!")).await;
    let id = a.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(id, "bad id!");
    assert_eq!(a.json()["request_id"], id.as_str());
}

#[tokio::test]
async fn shutdown_fails_readiness_first_and_keeps_accepting_for_the_delay() {
    let s = Setup::new(&["--shutdown-delay", "2s"]).await;
    let Setup {
        proxy,
        addr,
        lab: _lab,
        upstream: _up,
        pki: _pki,
    } = s;
    let admin = proxy.admin;
    let stopping = tokio::spawn(proxy.shutdown());
    // Readiness turns false at once...
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while send(admin, get("/readyz")).await.status == 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still ready after shutdown began"
        );
        tokio::task::yield_now().await;
    }
    // ...while requests are still served during the delay.
    assert_eq!(send(addr, get("/x")).await.status, 200);
    tokio::time::timeout(std::time::Duration::from_secs(15), stopping)
        .await
        .unwrap()
        .unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
