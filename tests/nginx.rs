//! Against an mTLS server that no code of ours wrote: nginx with `ssl_verify_client on`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::load::Load;
use common::*;
use http::Request;
use http_body_util::Full;

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_nginx(pki: &Pki) -> (Nginx, u16) {
    start_nginx_with(pki, "").await
}

/// nginx with `extra` directives in its server block.
async fn start_nginx_with(pki: &Pki, extra: &str) -> (Nginx, u16) {
    let dir = pki.dir.path();
    let server = pki.ca.server(&["localhost"]).unwrap();
    std::fs::write(dir.join("server.pem"), &server.cert_pem).unwrap();
    std::fs::write(dir.join("server.key"), &server.key_pem).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let d = dir.display();
    let conf = format!(
        r#"daemon off; master_process off; worker_processes 1;
error_log {d}/error.log; pid {d}/nginx.pid;
events {{}}
http {{
  access_log off;
  client_body_temp_path {d}/t1; proxy_temp_path {d}/t2; fastcgi_temp_path {d}/t3;
  uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;
  server {{
    listen 127.0.0.1:{port} ssl http2;
    ssl_certificate {d}/server.pem; ssl_certificate_key {d}/server.key;
    ssl_client_certificate {d}/ca.pem; ssl_verify_client on;
    {extra}
    location / {{
      default_type application/json;
      return 200 '{{"dn":"$ssl_client_s_dn","uri":"$request_uri","host":"$http_host","via":"$http_via","key":"$http_vero_softwarekey","proto":"$server_protocol","sni":"$ssl_server_name"}}';
    }}
  }}
}}
"#
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new("nginx")
        .args(["-p", &d.to_string(), "-c", &conf_path.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("nginx is not installed (apt-get install nginx-light)");
    let nginx = Nginx(child);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nginx did not start: {:?}",
            std::fs::read_to_string(dir.join("error.log"))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (nginx, port)
}

#[tokio::test]
#[ignore = "needs nginx"]
async fn nginx_sees_our_certificate_path_and_headers_over_h1_and_h2() {
    let pki = Pki::new();
    let (_nginx, port) = start_nginx(&pki).await;
    for (protocol, expect) in [("http1", "HTTP/1.1"), ("auto", "HTTP/2.0")] {
        let args = proxy_args(
            &pki,
            &format!("https://localhost:{port}"),
            &[
                "--upstream-protocol",
                protocol,
                "--add-header",
                "Vero-SoftwareKey: k-123",
            ],
        );
        let proxy = start_proxy(args).await;
        let addr = tcp_addr(&proxy);
        let req = Request::get("/Customer/IDs/ValidateTaxNumber/v1?taxNumber=FI%2012&x=%C3%A4")
            .header("host", "localhost:8080")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let a = send(addr, req).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        let j = a.json();
        assert_eq!(j["proto"], expect);
        assert!(j["dn"].as_str().unwrap().contains("CN=1234567-1"), "{j}");
        assert_eq!(
            j["uri"],
            "/Customer/IDs/ValidateTaxNumber/v1?taxNumber=FI%2012&x=%C3%A4"
        );
        assert_eq!(j["host"], format!("localhost:{port}"));
        assert_eq!(j["sni"], "localhost");
        assert_eq!(j["via"], "1.1 vero-proxy");
        assert_eq!(j["key"], "k-123");
        proxy.shutdown().await;
    }
}

#[tokio::test]
#[ignore = "needs nginx"]
async fn nginx_refusing_a_foreign_certificate_is_passed_through() {
    let pki = Pki::new();
    let (_nginx, port) = start_nginx(&pki).await;
    // A client certificate from another CA: nginx finishes the handshake and answers 400 itself.
    let other = vero_proxy::demo::pki::TestPki::new("other CA").unwrap();
    let pair = other.client("7654321-0", "Muu Oy").unwrap();
    std::fs::write(&pki.cert, &pair.cert_pem).unwrap();
    std::fs::write(&pki.key, &pair.key_pem).unwrap();
    let proxy = start_proxy(proxy_args(&pki, &format!("https://localhost:{port}"), &[])).await;
    let addr = tcp_addr(&proxy);
    let a = send(addr, get("/x")).await;
    assert_eq!(a.status, 400);
    assert!(!a.headers.contains_key("x-vero-proxy-error"));
}

#[tokio::test]
#[ignore = "needs nginx"]
async fn nginx_closing_http2_connections_every_200_requests_fails_nothing() {
    // keepalive_requests makes nginx send GOAWAY; streams the proxy opened after it are refused
    // unprocessed and must be sent again, not answered 502.
    let pki = Pki::new();
    let (_nginx, port) = start_nginx_with(&pki, "keepalive_requests 200;").await;
    let proxy = start_proxy(proxy_args(&pki, &format!("https://localhost:{port}"), &[])).await;
    let addr = tcp_addr(&proxy);
    let load = Load::counted(addr, 64, 50, |i, j| {
        Request::post(format!("/x?n={i}-{j}"))
            .header("host", "localhost")
            .body(Full::new(Bytes::from_static(b"{\"a\":1}")))
            .unwrap()
    });
    let (served, bad) = load.join().await;
    assert!(
        bad.is_empty(),
        "{} of 3200 failed, first: {:?}",
        bad.len(),
        bad.first()
    );
    assert_eq!(served, 3200);
}
