//! Egress through an HTTP proxy: upstream connections tunnel with CONNECT through an in-process
//! proxy, the mTLS handshake running end to end inside; refusals and an unreachable proxy become
//! the proxy's own answers; `--egress-proxy`, `HTTPS_PROXY` and `NO_PROXY` decide the route.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vero_proxy::upstream::egress::{
    no_proxy_matches, read_credentials, read_head, resolve, Egress, HeadError, ProxyAddr, ProxyEnv,
    Route,
};

// ---------------------------------------------------------------------------------------------
// An in-process CONNECT proxy that records what it was asked.

/// One CONNECT request as the test proxy received it.
#[derive(Debug, Clone)]
struct Connect {
    method: String,
    target: String,
    host: Option<String>,
    authorization: Option<String>,
    /// The first byte sent through the tunnel (0x16 opens a TLS handshake record).
    first_byte: Option<u8>,
}

/// How the test proxy behaves.
#[derive(Clone, Default)]
struct ProxySpec {
    /// Answer every CONNECT with this status and reason instead of opening the tunnel.
    refuse: Option<(u16, &'static str)>,
    /// Require these `user:password` credentials (407 otherwise).
    credentials: Option<&'static str>,
    /// The `Proxy-Authenticate` value of a 407 (default `Basic realm="corp"`).
    challenge: Option<&'static str>,
    /// Open every tunnel to this address, whatever the request names (the proxy's own DNS).
    route_to: Option<SocketAddr>,
}

struct ConnectProxy {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Connect>>>,
}

impl ConnectProxy {
    async fn start(spec: ProxySpec) -> ConnectProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, spec.clone(), record.clone()));
            }
        });
        ConnectProxy { addr, seen }
    }

    fn seen(&self) -> Vec<Connect> {
        self.seen.lock().unwrap().clone()
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn serve(mut client: TcpStream, spec: ProxySpec, seen: Arc<Mutex<Vec<Connect>>>) {
    let mut buf = Vec::new();
    let end = loop {
        let mut chunk = [0u8; 1024];
        let n = client.read(&mut chunk).await.unwrap_or(0);
        if n == 0 || buf.len() > 16 * 1024 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(&buf[..end]).unwrap();
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    let mut connect = Connect {
        method: req.method.unwrap().to_owned(),
        target: req.path.unwrap().to_owned(),
        host: header("host"),
        authorization: header("proxy-authorization"),
        first_byte: None,
    };
    let wanted = spec.credentials.map(basic);
    if wanted.is_some() && connect.authorization != wanted {
        seen.lock().unwrap().push(connect);
        let challenge = spec.challenge.unwrap_or("Basic realm=\"corp\"");
        let answer = format!(
            "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: {challenge}\r\n\
             Content-Length: 0\r\n\r\n"
        );
        let _ = client.write_all(answer.as_bytes()).await;
        return;
    }
    if let Some((code, reason)) = spec.refuse {
        seen.lock().unwrap().push(connect);
        let answer = format!("HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\n\r\n");
        let _ = client.write_all(answer.as_bytes()).await;
        return;
    }
    let upstream = match spec.route_to {
        Some(a) => TcpStream::connect(a).await,
        None => TcpStream::connect(connect.target.as_str()).await,
    };
    let Ok(mut upstream) = upstream else {
        seen.lock().unwrap().push(connect);
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
        return;
    };
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .unwrap();
    upstream.write_all(&buf[end..]).await.unwrap();
    let mut first = [0u8; 1];
    if client.read_exact(&mut first).await.is_ok() {
        connect.first_byte = Some(first[0]);
        upstream.write_all(&first).await.unwrap();
    }
    seen.lock().unwrap().push(connect);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

fn basic(user_password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_password)
    )
}

fn message(a: &Answer) -> String {
    a.json()["message"].as_str().unwrap().to_owned()
}

async fn proxy_with(pki: &Pki, upstream: &str, extra: &[&str]) -> SocketAddr {
    let running = start_proxy(proxy_args(pki, upstream, extra)).await;
    let vero_proxy::server::BoundAddr::Tcp(addr) = running.listen else {
        panic!()
    };
    // The proxy keeps running for the rest of the test.
    std::mem::forget(running);
    addr
}

// ---------------------------------------------------------------------------------------------
// Through the running proxy.

#[tokio::test]
async fn requests_tunnel_through_the_proxy_and_the_upstream_still_sees_our_certificate() {
    let h1: &[&[u8]] = &[b"http/1.1"];
    let both: &[&[u8]] = &[b"h2", b"http/1.1"];
    for alpn in [both, h1] {
        let egress = ConnectProxy::start(ProxySpec::default()).await;
        let spec = UpstreamSpec {
            alpn,
            ..Default::default()
        };
        let s = Setup::with(spec, &["--egress-proxy", &egress.url()]).await;
        for _ in 0..3 {
            let a = s.get("/hello").await;
            assert_eq!(a.status, 200, "{:?}", a.body);
        }
        let last = s.lab.last();
        assert!(
            last.seen
                .client_subject
                .as_deref()
                .is_some_and(|c| c.contains("CN=1234567-1")),
            "{:?}",
            last.seen
        );
        assert_eq!(last.seen.sni.as_deref(), Some("localhost"));
        let seen = egress.seen();
        assert!(!seen.is_empty(), "no connection went through the proxy");
        let target = format!("localhost:{}", s.upstream.addr.port());
        for c in &seen {
            assert_eq!(c.method, "CONNECT");
            assert_eq!(c.target, target);
            assert_eq!(c.host.as_deref(), Some(target.as_str()));
            assert_eq!(c.authorization, None);
            // The proxy only ever saw TLS: the handshake runs end to end inside the tunnel.
            assert_eq!(c.first_byte, Some(0x16), "{c:?}");
        }
    }
}

#[tokio::test]
async fn the_upstream_name_is_resolved_by_the_proxy_not_here() {
    let pki = Pki::new();
    let lab = Arc::new(Lab::default());
    let spec = UpstreamSpec {
        names: &["api.vero.test"],
        ..Default::default()
    };
    let up = start_upstream(&pki.ca, &pki.ca, spec, lab.clone()).await;
    let egress = ConnectProxy::start(ProxySpec {
        route_to: Some(up.addr),
        ..Default::default()
    })
    .await;
    let url = format!("https://api.vero.test:{}", up.addr.port());
    let addr = proxy_with(&pki, &url, &["--egress-proxy", &egress.url()]).await;
    let a = send(addr, get("/x")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(lab.last().seen.sni.as_deref(), Some("api.vero.test"));
    assert_eq!(
        egress.seen()[0].target,
        format!("api.vero.test:{}", up.addr.port())
    );
}

/// The proxy going through `egress` with a credentials file holding `contents`; the file's path,
/// and its directory, to keep until the test ends.
async fn through_with_credentials(
    egress: &ConnectProxy,
    contents: &str,
) -> (Setup, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy-credentials");
    std::fs::write(&file, contents).unwrap();
    let file = file.display().to_string();
    let s = Setup::new(&[
        "--egress-proxy",
        &egress.url(),
        "--egress-proxy-credentials-file",
        &file,
    ])
    .await;
    (s, file, dir)
}

#[tokio::test]
async fn credentials_from_the_file_go_to_the_proxy_as_basic() {
    let egress = ConnectProxy::start(ProxySpec {
        credentials: Some("payroll:s3cr3t:with colons"),
        ..Default::default()
    })
    .await;
    let (s, _file, _dir) = through_with_credentials(&egress, "payroll:s3cr3t:with colons\n").await;
    let a = s.get("/hello").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = egress.seen();
    assert_eq!(
        seen.last().unwrap().authorization.as_deref(),
        Some(basic("payroll:s3cr3t:with colons").as_str())
    );
    assert!(s.lab.last().seen.client_subject.is_some());
}

#[tokio::test]
async fn a_407_is_egress_proxy_refused_naming_the_status_and_the_credentials_file() {
    let egress = ConnectProxy::start(ProxySpec {
        credentials: Some("payroll:right"),
        ..Default::default()
    })
    .await;
    let proxy = egress.addr.to_string();

    // No credentials at all.
    let s = Setup::new(&["--egress-proxy", &egress.url()]).await;
    let a = s.get("/hello").await;
    assert_eq!(a.status, 502, "{:?}", a.body);
    assert_eq!(a.error_code(), "egress_proxy_refused");
    let msg = message(&a);
    for part in [
        "407 Proxy Authentication Required",
        "missing",
        "--egress-proxy-credentials-file",
        proxy.as_str(),
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg}");
    }
    assert!(s.lab.received().is_empty());

    // Wrong credentials: the message names the file, never its content.
    let (s, file, _dir) = through_with_credentials(&egress, "payroll:wrong\n").await;
    let a = s.get("/hello").await;
    assert_eq!(a.error_code(), "egress_proxy_refused");
    let msg = message(&a);
    assert!(
        msg.contains("407") && msg.contains("wrong") && msg.contains(&file),
        "{msg}"
    );
    assert!(!msg.contains("payroll:wrong"), "{msg}");
    assert!(s.lab.received().is_empty());
}

#[tokio::test]
async fn a_407_asking_for_another_scheme_says_only_basic_is_sent() {
    let egress = ConnectProxy::start(ProxySpec {
        credentials: Some("payroll:right"),
        challenge: Some("Negotiate"),
        ..Default::default()
    })
    .await;
    let s = Setup::new(&["--egress-proxy", &egress.url()]).await;
    let a = s.get("/hello").await;
    assert_eq!(a.error_code(), "egress_proxy_refused");
    let msg = message(&a);
    assert!(msg.contains("Negotiate") && msg.contains("Basic"), "{msg}");
}

#[tokio::test]
async fn a_proxy_refusing_the_tunnel_is_named_with_its_status_and_reason() {
    let egress = ConnectProxy::start(ProxySpec {
        refuse: Some((403, "Forbidden by policy")),
        ..Default::default()
    })
    .await;
    let s = Setup::new(&["--egress-proxy", &egress.url()]).await;
    let a = s.get("/hello").await;
    assert_eq!(a.status, 502, "{:?}", a.body);
    assert_eq!(a.error_code(), "egress_proxy_refused");
    let msg = message(&a);
    let target = format!("localhost:{}", s.upstream.addr.port());
    for part in [
        "403 Forbidden by policy",
        egress.addr.to_string().as_str(),
        "--egress-proxy",
        target.as_str(),
    ] {
        assert!(msg.contains(part), "{part:?} not in {msg}");
    }
    assert!(s.lab.received().is_empty());
}

#[tokio::test]
async fn an_unreachable_proxy_is_upstream_unreachable_naming_the_proxy() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = closed.local_addr().unwrap();
    drop(closed);
    let s = Setup::new(&["--egress-proxy", &format!("http://{proxy}")]).await;
    let a = s.get("/hello").await;
    assert_eq!(a.status, 502, "{:?}", a.body);
    assert_eq!(a.error_code(), "upstream_unreachable");
    let msg = message(&a);
    assert!(
        msg.contains(&format!("egress proxy {proxy}")),
        "the proxy is not named: {msg}"
    );
    assert!(s.lab.received().is_empty());
}

#[tokio::test]
async fn unusable_egress_settings_are_refused_at_start() {
    use clap::Parser;
    let pki = Pki::new();
    let missing = pki.path("no-such-credentials").display().to_string();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--egress-proxy", "https://proxy.corp:3128"],
            &["--egress-proxy", "only http://", "https://"],
        ),
        (
            &["--egress-proxy", "socks5://proxy.corp:1080"],
            &["only http://", "socks5://"],
        ),
        (
            &["--egress-proxy", "http://payroll:hunter2@proxy.corp:3128"],
            &[
                "must not carry credentials",
                "--egress-proxy-credentials-file",
            ],
        ),
        (
            &["--egress-proxy", "http://proxy.corp:3128/some/path"],
            &["without a path"],
        ),
        (
            &[
                "--egress-proxy",
                "http://proxy.corp:3128",
                "--egress-proxy-credentials-file",
                &missing,
            ],
            &[&missing, "--egress-proxy-credentials-file"],
        ),
    ];
    for (extra, wanted) in cases {
        let args = proxy_args(&pki, "https://localhost:1", extra);
        let cli = vero_proxy::cli::Cli::try_parse_from(args).unwrap();
        let cfg = vero_proxy::config::Config::from_args(&cli.run).unwrap();
        let Err(e) = vero_proxy::app::start(cfg).await else {
            panic!("{extra:?} was accepted");
        };
        let msg = format!("{e:#}");
        for w in *wanted {
            assert!(msg.contains(w), "{extra:?}: {w:?} not in {msg}");
        }
        assert!(!msg.contains("hunter2"), "{msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// The spawned binary with HTTPS_PROXY / NO_PROXY in its environment.

/// The binary serving with `env` set on it, its stderr collected; killed on drop.
struct Spawned {
    child: Child,
    listen: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn spawn_with_env(args: &[String], env: &[(&str, &str)]) -> Spawned {
    let mut cmd = process::clean_command(process::BIN);
    // The proxy variables too, in either case: these tests set the egress proxy explicitly.
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy().to_ascii_uppercase();
        if n == "HTTPS_PROXY" || n == "NO_PROXY" {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().copied())
        .env("VERO_PROXY_LOG", "debug")
        .env("NO_COLOR", "1")
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let lines = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            lines.lock().unwrap().push(line);
        }
    });
    let listen = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let found = log.lock().unwrap().iter().find_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("listen="))
                    .and_then(|a| a.parse().ok())
            });
            if let Some(a) = found {
                return a;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("did not start: {:?}", log.lock().unwrap()));
    Spawned { child, listen, log }
}

#[tokio::test]
async fn https_proxy_is_honoured_with_its_credentials_and_logged_without_them() {
    let pki = Pki::new();
    let lab = Arc::new(Lab::default());
    let spec = UpstreamSpec {
        names: &["api.vero.test"],
        ..Default::default()
    };
    let up = start_upstream(&pki.ca, &pki.ca, spec, lab.clone()).await;
    let egress = ConnectProxy::start(ProxySpec {
        credentials: Some("payroll:p@ss word"),
        route_to: Some(up.addr),
        ..Default::default()
    })
    .await;
    let url = format!("https://api.vero.test:{}", up.addr.port());
    let https_proxy = format!("http://payroll:p%40ss%20word@{}", egress.addr);
    let args = proxy_args(&pki, &url, &[]);

    let p = spawn_with_env(&args, &[("HTTPS_PROXY", &https_proxy)]).await;
    let a = send(p.listen, get("/via-env")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(lab.last().target, "/via-env");
    assert_eq!(
        egress.seen().last().unwrap().authorization.as_deref(),
        Some(basic("payroll:p@ss word").as_str())
    );
    let log = p.log.lock().unwrap().join("\n");
    let line = log
        .lines()
        .find(|l| l.contains("tunnel through an HTTP proxy"))
        .unwrap_or_else(|| panic!("the egress is not logged: {log}"));
    assert!(line.contains(&egress.addr.to_string()), "{line}");
    for secret in ["p@ss", "p%40ss", &basic("payroll:p@ss word")[6..]] {
        assert!(!log.contains(secret), "{secret:?} in the log: {log}");
    }
}

#[tokio::test]
async fn no_proxy_naming_the_upstream_bypasses_https_proxy() {
    let pki = Pki::new();
    let egress = ConnectProxy::start(ProxySpec::default()).await;
    let url = "https://api.vero.test:443";
    let args = proxy_args(&pki, url, &["--connect-timeout", "5s"]);
    let env = [
        ("HTTPS_PROXY", egress.url()),
        ("NO_PROXY", "localhost,.vero.test".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let p = spawn_with_env(&args, &env).await;
    // Direct: api.vero.test does not resolve here, so it fails, and never at the proxy.
    let a = send(p.listen, get("/x")).await;
    assert_eq!(a.status, 502, "{:?}", a.body);
    assert!(egress.seen().is_empty(), "{:?}", egress.seen());
    let log = p.log.lock().unwrap().join("\n");
    assert!(log.contains("NO_PROXY excludes api.vero.test"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// The route, decided from the flag and the environment (pure functions).

fn env(https: Option<&str>, no: Option<&str>) -> ProxyEnv {
    ProxyEnv::from_lookup(|name| match name {
        "HTTPS_PROXY" => https.map(str::to_owned),
        "NO_PROXY" => no.map(str::to_owned),
        _ => None,
    })
}

fn via(route: Route) -> ProxyAddr {
    match route {
        Route::Proxy(a) => a,
        Route::Direct(why) => panic!("direct: {why}"),
    }
}

fn route(flag: Option<&str>, env: &ProxyEnv, host: &str) -> Route {
    resolve(flag, env, host, 443).unwrap()
}

#[test]
fn https_proxy_is_used_unless_no_proxy_names_the_upstream() {
    let a = via(route(
        None,
        &env(Some("http://proxy.corp:3128"), None),
        "api.vero.fi",
    ));
    assert_eq!(
        (a.host.as_str(), a.port, a.source),
        ("proxy.corp", 3128, "HTTPS_PROXY")
    );
    // The route to api.vero.fi through proxy.corp with NO_PROXY set to `no`.
    let with_no_proxy = |no| {
        route(
            None,
            &env(Some("http://proxy.corp:3128"), Some(no)),
            "api.vero.fi",
        )
    };
    for no in [
        "vero.fi",
        ".vero.fi",
        "*.vero.fi",
        "*",
        "localhost, api.vero.fi ,10.0.0.1",
        "API.VERO.FI",
        "api.vero.fi:443",
        "vero.fi.",
    ] {
        let r = with_no_proxy(no);
        assert!(
            matches!(r, Route::Direct(_)),
            "NO_PROXY={no:?} did not exclude: {r:?}"
        );
    }
    for no in [
        "ero.fi",
        "i.vero.fi",
        "other.fi",
        "api.vero.fi:8443",
        ",",
        "api.vero",
    ] {
        let r = with_no_proxy(no);
        assert!(
            matches!(r, Route::Proxy(_)),
            "NO_PROXY={no:?} excluded: {r:?}"
        );
    }
}

#[test]
fn no_proxy_entries_match_ip_literals_and_ports() {
    assert!(no_proxy_matches("10.1.2.3", "10.1.2.3", 443));
    assert!(!no_proxy_matches("10.1.2.3", "110.1.2.3", 443));
    assert!(no_proxy_matches("2001:db8::1", "2001:db8::1", 443));
    assert!(no_proxy_matches("[2001:db8::1]:443", "2001:db8::1", 443));
    assert!(!no_proxy_matches("[2001:db8::1]:8443", "2001:db8::1", 443));
    assert!(!no_proxy_matches("", "api.vero.fi", 443));
}

#[test]
fn the_environment_is_read_upper_case_first_and_empty_means_unset() {
    let e = ProxyEnv::from_lookup(|n| (n == "https_proxy").then(|| "http://lower:1".to_owned()));
    assert_eq!(
        e.https_proxy,
        Some(("https_proxy", "http://lower:1".to_owned()))
    );
    let e = ProxyEnv::from_lookup(|n| match n {
        "HTTPS_PROXY" => Some("http://upper:1".into()),
        "https_proxy" => Some("http://lower:1".into()),
        "no_proxy" => Some(".corp".into()),
        _ => None,
    });
    assert_eq!(
        e.https_proxy,
        Some(("HTTPS_PROXY", "http://upper:1".to_owned()))
    );
    assert_eq!(e.no_proxy.as_deref(), Some(".corp"));
    let e = ProxyEnv::from_lookup(|n| match n {
        "HTTPS_PROXY" | "NO_PROXY" => Some(" ".into()),
        _ => None,
    });
    assert_eq!(e, ProxyEnv::default());
    assert!(matches!(route(None, &e, "api.vero.fi"), Route::Direct(_)));
}

#[test]
fn the_flag_wins_over_https_proxy_and_no_proxy() {
    let e = env(Some("http://from-env:3128"), Some("*"));
    for host in ["api.vero.fi", "localhost"] {
        let a = via(route(Some("http://from-flag:8080"), &e, host));
        assert_eq!(
            (a.host.as_str(), a.port, a.source),
            ("from-flag", 8080, "--egress-proxy")
        );
    }
    // An empty flag (a blank line in an env file) is no flag.
    let a = via(route(
        Some(""),
        &env(Some("http://from-env:3128"), None),
        "api.vero.fi",
    ));
    assert_eq!(a.host, "from-env");
}

#[test]
fn a_loopback_upstream_never_goes_through_https_proxy() {
    let e = env(Some("http://proxy.corp:3128"), None);
    for host in ["localhost", "127.0.0.1", "::1", "vero.localhost"] {
        assert!(matches!(route(None, &e, host), Route::Direct(_)), "{host}");
    }
}

#[test]
fn proxy_urls_are_parsed_like_curl_does() {
    let e = ProxyEnv::default();
    for (url, host, port) in [
        ("http://proxy.corp:3128", "proxy.corp", 3128),
        ("proxy.corp:3128", "proxy.corp", 3128),
        (" HTTP://proxy.corp:3128/ ", "proxy.corp", 3128),
        ("http://proxy.corp", "proxy.corp", 80),
        ("http://[2001:db8::1]:3128", "2001:db8::1", 3128),
        ("http://10.0.0.8:8080", "10.0.0.8", 8080),
    ] {
        let a = via(route(Some(url), &e, "api.vero.fi"));
        assert_eq!((a.host.as_str(), a.port), (host, port), "{url}");
    }
}

#[test]
fn bad_proxy_urls_are_refused_naming_where_they_came_from() {
    let refused = |flag: Option<&str>, https: Option<&str>| {
        resolve(flag, &env(https, None), "api.vero.fi", 443)
            .unwrap_err()
            .0
    };
    let m = refused(Some("https://proxy.corp:3128"), None);
    assert!(
        m.contains("--egress-proxy") && m.contains("only http://"),
        "{m}"
    );
    let m = refused(None, Some("https://proxy.corp:3128"));
    assert!(
        m.contains("HTTPS_PROXY") && m.contains("only http://"),
        "{m}"
    );
    for (url, part) in [
        ("http://proxy.corp:99999", "not a port number"),
        ("http://proxy.corp:0", "not a port number"),
        ("http://proxy corp:3128", "not a proxy address"),
        ("http://:3128", "no host"),
        ("http://proxy.corp:3128/x", "without a path"),
    ] {
        let m = refused(Some(url), None);
        assert!(m.contains(part), "{url}: {m}");
    }
    let m = refused(Some("http://payroll:hunter2@proxy.corp:3128"), None);
    assert!(m.contains("--egress-proxy-credentials-file"), "{m}");
    assert!(!m.contains("hunter2"), "{m}");
    let m = refused(None, Some("http://payroll:%zz@proxy.corp:3128"));
    assert!(m.contains("percent-encoded") && !m.contains("%zz"), "{m}");
}

#[test]
fn the_credentials_file_gives_its_first_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("creds");
    for content in ["payroll:pw\n", "payroll:pw", "payroll:pw\r\nsecond line\n"] {
        std::fs::write(&file, content).unwrap();
        assert_eq!(
            read_credentials(&file).unwrap().as_str(),
            "payroll:pw",
            "{content:?}"
        );
    }
    for (content, part) in [
        ("", "is empty"),
        ("\nuser:pw\n", "is empty"),
        ("no-colon\n", "user:password"),
    ] {
        std::fs::write(&file, content).unwrap();
        let m = read_credentials(&file).unwrap_err().0;
        assert!(
            m.contains(part) && m.contains(&file.display().to_string()),
            "{content:?}: {m}"
        );
    }
    let m = read_credentials(&dir.path().join("absent")).unwrap_err().0;
    assert!(
        m.contains("absent") && m.contains("--egress-proxy-credentials-file"),
        "{m}"
    );
}

#[test]
fn debug_output_never_shows_credentials() {
    let url = "http://payroll:hunter2@proxy.corp:3128";
    let addr = via(route(None, &env(Some(url), None), "api.vero.fi"));
    assert!(!format!("{addr:?}").contains("hunter2"));
    let e = Egress::new(addr, None).unwrap();
    assert!(e.has_credentials());
    let shown = format!("{e:?}");
    assert!(shown.contains("proxy.corp:3128"), "{shown}");
    assert!(
        !shown.contains("hunter2") && !shown.contains(&basic("payroll:hunter2")[6..]),
        "{shown}"
    );
}

// ---------------------------------------------------------------------------------------------
// The proxy's answer head.

async fn head_of(chunks: &[&[u8]]) -> Result<vero_proxy::upstream::egress::Head, HeadError> {
    let (mut w, mut r) = tokio::io::duplex(64 * 1024);
    let chunks: Vec<Vec<u8>> = chunks.iter().map(|c| c.to_vec()).collect();
    tokio::spawn(async move {
        for c in chunks {
            w.write_all(&c).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    read_head(&mut r).await
}

#[tokio::test]
async fn answer_heads_are_read_across_reads_and_bounded() {
    let h = head_of(&[
        b"HTTP/1.1 200 Conn",
        b"ection established\r\nVia: x\r\n",
        b"\r\n",
    ])
    .await
    .unwrap();
    assert_eq!(
        (h.code, h.reason.as_str(), h.extra),
        (200, "Connection established", 0)
    );

    let h = head_of(&[b"HTTP/1.0 407 Auth\r\nProxy-Authenticate: NTLM\r\nproxy-authenticate: Basic realm=\"x\"\r\n\r\nbody"])
        .await
        .unwrap();
    assert_eq!(h.code, 407);
    assert_eq!(h.auth_schemes, ["NTLM", "Basic"]);
    assert_eq!(h.extra, 4);

    let big = format!("HTTP/1.1 200 OK\r\nX-Pad: {}\r\n\r\n", "a".repeat(9000));
    assert!(
        matches!(head_of(&[big.as_bytes()]).await, Err(HeadError::Invalid(m)) if m.contains("8192"))
    );
    assert!(matches!(
        head_of(&[b"SSH-2.0-OpenSSH\r\n\r\n"]).await,
        Err(HeadError::Invalid(_))
    ));
    assert!(matches!(head_of(&[]).await, Err(HeadError::Io(m)) if m.contains("without answering")));
    assert!(
        matches!(head_of(&[b"HTTP/1.1 200"]).await, Err(HeadError::Io(m)) if m.contains("middle"))
    );
}
