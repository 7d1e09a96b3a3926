//! Every certificate format organisations hold: each is loaded, presented upstream, and its
//! failures are explained.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use time::{Duration, OffsetDateTime};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(fixture(name)).unwrap()
}

/// A certificate for the public key in a plain PKCS#8 fixture, issued by the test CA.
fn cert_for(pki: &Pki, plain_key_fixture: &str, cn: &str) -> String {
    let key = rcgen::KeyPair::from_pem(&fixture_text(plain_key_fixture)).unwrap();
    let now = OffsetDateTime::now_utc();
    pki.ca
        .client_valid(
            cn,
            "Muoto Oy",
            now - Duration::days(1),
            now + Duration::days(700),
            key,
        )
        .unwrap()
        .cert_pem
}

/// Starts the proxy with `identity_args` (instead of --cert/--key) against an upstream that
/// accepts client certificates from `client_cas` (empty: the test CA).
async fn serve(
    pki: &Pki,
    client_cas: Vec<String>,
    identity_args: &[&str],
) -> (
    Arc<Lab>,
    std::net::SocketAddr,
    vero_proxy::demo::standin::StandIn,
    vero_proxy::app::Running,
) {
    let (lab, up) = upstream_accepting(pki, client_cas).await;
    let proxy = start_proxy(identity_only_args(
        pki,
        &format!("https://localhost:{}", up.addr.port()),
        identity_args,
    ))
    .await;
    let addr = tcp_addr(&proxy);
    (lab, addr, up, proxy)
}

/// `proxy_args` with the --cert/--key pair replaced by `identity_args`.
fn identity_only_args(pki: &Pki, upstream: &str, identity_args: &[&str]) -> Vec<String> {
    let mut v = proxy_args(pki, upstream, &[]);
    for flag in ["--cert", "--key"] {
        let i = v.iter().position(|a| a == flag).unwrap();
        v.drain(i..i + 2);
    }
    v.extend(identity_args.iter().map(|s| s.to_string()));
    v
}

/// What starting the proxy says, when it refuses.
async fn refusal(pki: &Pki, identity_args: &[&str]) -> String {
    use clap::Parser;
    let args = identity_only_args(pki, "https://localhost:9", identity_args);
    let cli = vero_proxy::cli::Cli::try_parse_from(args).unwrap();
    let cfg = match vero_proxy::config::Config::from_args(&cli.run) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
    match vero_proxy::app::start(cfg).await {
        Ok(_) => panic!("the proxy started with {identity_args:?}"),
        Err(e) => format!("{e:#}"),
    }
}

async fn subject_seen(addr: std::net::SocketAddr, lab: &Lab) -> String {
    let a = send(addr, get("/x")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    lab.last().seen.client_subject.unwrap()
}

#[tokio::test]
async fn pem_keys_in_every_encoding_are_presented() {
    let cases = [
        ("rsa.pkcs8.pem", "rsa.pkcs8.pem", None),
        ("rsa.pkcs8.pem", "rsa.pkcs1.pem", None),
        ("ec.pkcs8.pem", "ec.pkcs8.pem", None),
        ("ec.pkcs8.pem", "ec.sec1.pem", None),
        ("rsa.pkcs8.pem", "rsa.pbes2.pem", Some("fixture-pass\n")),
        (
            "rsa.pkcs8.pem",
            "rsa.pbes1-3des.pem",
            Some("fixture-pass\r\n"),
        ),
    ];
    for (i, (plain, key_file, password)) in cases.into_iter().enumerate() {
        let pki = Pki::new();
        let cn = format!("100000{i}-0");
        let cert = pki.path("c.pem");
        std::fs::write(&cert, cert_for(&pki, plain, &cn)).unwrap();
        let mut args = vec![
            "--cert".to_string(),
            cert.display().to_string(),
            "--key".into(),
            fixture(key_file).display().to_string(),
        ];
        if let Some(pw) = password {
            let f = pki.path("pw");
            std::fs::write(&f, pw).unwrap();
            args.extend(["--key-password-file".into(), f.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (lab, addr, _up, _proxy) = serve(&pki, vec![], &args).await;
        assert!(
            subject_seen(addr, &lab)
                .await
                .starts_with(&format!("CN={cn},")),
            "{key_file}"
        );
    }
}

#[tokio::test]
async fn encrypted_key_problems_are_explained() {
    let pki = Pki::new();
    let cert = pki.path("c.pem");
    std::fs::write(&cert, cert_for(&pki, "rsa.pkcs8.pem", "1000000-0")).unwrap();
    let c = cert.display().to_string();
    let enc = fixture("rsa.pbes2.pem").display().to_string();
    let msg = refusal(&pki, &["--cert", &c, "--key", &enc]).await;
    assert!(
        msg.contains("encrypted") && msg.contains("--key-password-file"),
        "{msg}"
    );

    let wrong = pki.path("wrong-pw");
    std::fs::write(&wrong, "not-it\n").unwrap();
    let w = wrong.display().to_string();
    let msg = refusal(
        &pki,
        &["--cert", &c, "--key", &enc, "--key-password-file", &w],
    )
    .await;
    assert!(msg.contains("wrong") && msg.contains(&w), "{msg}");

    let des = fixture("rsa.pbes1-3des.pem").display().to_string();
    let msg = refusal(
        &pki,
        &["--cert", &c, "--key", &des, "--key-password-file", &w],
    )
    .await;
    assert!(msg.contains("wrong") && msg.contains(&w), "{msg}");

    let trad = fixture("rsa.traditional-enc.pem").display().to_string();
    let msg = refusal(&pki, &["--cert", &c, "--key", &trad]).await;
    assert!(msg.contains("openssl pkcs8 -topk8"), "{msg}");
}

#[tokio::test]
async fn pkcs12_modern_and_legacy_files_load_with_their_chain() {
    for file in ["modern.p12", "legacy-rc2.p12", "legacy-3des.p12"] {
        let pki = Pki::new();
        let pw = pki.path("p12-pw");
        std::fs::write(&pw, "fixture-pass\r\n").unwrap();
        let (p12, pwf) = (
            fixture(file).display().to_string(),
            pw.display().to_string(),
        );
        let (lab, addr, _up, _proxy) = serve(
            &pki,
            vec![fixture_text("p12-ca.pem")],
            &["--pkcs12", &p12, "--pkcs12-password-file", &pwf],
        )
        .await;
        assert_eq!(
            subject_seen(addr, &lab).await,
            "CN=7654321-9, O=Fixture Oy, C=FI",
            "{file}"
        );
        assert_eq!(
            lab.last().seen.client_chain_len,
            2,
            "{file}: the CA in the file was not sent"
        );
    }
}

#[tokio::test]
async fn pkcs12_password_from_the_environment_and_a_wrong_one() {
    use clap::Parser;
    let pki = Pki::new();
    let lab = Arc::new(Lab::default());
    let spec = UpstreamSpec {
        client_cas: vec![fixture_text("p12-ca.pem")],
        ..Default::default()
    };
    let up = start_upstream(&pki.ca, &pki.ca, spec, lab.clone()).await;
    let p12 = fixture("legacy-rc2.p12").display().to_string();
    let args = identity_only_args(
        &pki,
        &format!("https://localhost:{}", up.addr.port()),
        &["--pkcs12", &p12],
    );
    let mut run = vero_proxy::cli::Cli::try_parse_from(args).unwrap().run;
    // What main reads from VERO_PROXY_PKCS12_PASSWORD, passed explicitly (set_var races).
    run.pkcs12_password_env = Some(zeroize::Zeroizing::new("fixture-pass".to_string()));
    let proxy = vero_proxy::app::start(vero_proxy::config::Config::from_args(&run).unwrap())
        .await
        .unwrap();
    let addr = tcp_addr(&proxy);
    assert!(subject_seen(addr, &lab).await.contains("7654321-9"));

    let wrong = pki.path("pw");
    std::fs::write(&wrong, "guess\n").unwrap();
    let msg = refusal(
        &pki,
        &[
            "--pkcs12",
            &p12,
            "--pkcs12-password-file",
            &wrong.display().to_string(),
        ],
    )
    .await;
    assert!(
        msg.contains("password") && msg.contains("wrong") && msg.contains("legacy-rc2.p12"),
        "{msg}"
    );
}

#[tokio::test]
async fn identity_dir_takes_either_pair_and_names_them_when_missing() {
    for (cert_name, key_name) in [("cert.pem", "key.pem"), ("tls.crt", "tls.key")] {
        let pki = Pki::new();
        let dir = pki.path("secret");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(cert_name), &pki.client.cert_pem).unwrap();
        std::fs::write(dir.join(key_name), &pki.client.key_pem).unwrap();
        let (lab, addr, _up, _proxy) = serve(
            &pki,
            vec![],
            &["--identity-dir", &dir.display().to_string()],
        )
        .await;
        assert!(subject_seen(addr, &lab).await.starts_with("CN=1234567-1"));
    }
    let pki = Pki::new();
    let empty = pki.path("empty");
    std::fs::create_dir(&empty).unwrap();
    let msg = refusal(&pki, &["--identity-dir", &empty.display().to_string()]).await;
    assert!(
        msg.contains("cert.pem + key.pem")
            && msg.contains("tls.crt + tls.key")
            && msg.contains("empty"),
        "{msg}"
    );
}

#[tokio::test]
async fn one_pem_with_both_and_the_chain_after_the_leaf_is_sent() {
    let pki = Pki::new();
    let both = pki.path("both.pem");
    std::fs::write(
        &both,
        format!(
            "{}{}{}",
            pki.client.cert_pem, pki.ca.ca_pem, pki.client.key_pem
        ),
    )
    .unwrap();
    let (lab, addr, _up, _proxy) =
        serve(&pki, vec![], &["--cert", &both.display().to_string()]).await;
    assert!(subject_seen(addr, &lab).await.starts_with("CN=1234567-1"));
    assert_eq!(lab.last().seen.client_chain_len, 2);
}

#[test]
fn key_permissions_warn_like_ssh() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    std::fs::write(&key, "x").unwrap();
    let set = |mode| std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
    set(0o600);
    assert_eq!(vero_proxy::identity::permissions::check(&key), None);
    set(0o644);
    assert!(vero_proxy::identity::permissions::check(&key)
        .unwrap()
        .contains("every user"));
    // Group-readable by the process's own group (a Kubernetes Secret with fsGroup): fine.
    set(0o640);
    assert_eq!(vero_proxy::identity::permissions::check(&key), None);
    // Group-readable by a group the process is not in: a warning.
    if std::process::Command::new("chgrp")
        .arg("54321")
        .arg(&key)
        .status()
        .is_ok_and(|s| s.success())
    {
        assert!(vero_proxy::identity::permissions::check(&key)
            .unwrap()
            .contains("group 54321"));
    }
}

#[tokio::test]
async fn an_identity_that_expires_in_service_is_answered_503_and_not_ready() {
    let pki = Pki::new();
    let now = OffsetDateTime::now_utc();
    let short = pki
        .ca
        .client_valid(
            "1234567-1",
            "Lyhyt Oy",
            now - Duration::days(1),
            now + Duration::seconds(2),
            rcgen::KeyPair::generate().unwrap(),
        )
        .unwrap();
    std::fs::write(&pki.cert, &short.cert_pem).unwrap();
    std::fs::write(&pki.key, &short.key_pem).unwrap();
    let lab = Arc::new(Lab::default());
    let up = start_upstream(&pki.ca, &pki.ca, UpstreamSpec::default(), lab.clone()).await;
    let proxy = start_proxy_to(&pki, up.addr.port(), &[]).await;
    let addr = tcp_addr(&proxy);
    assert_eq!(send(proxy.admin, get("/readyz")).await.status, 200);

    // Certificate times have one-second precision: wait until it has certainly expired.
    let expiry = std::time::SystemTime::from(now + Duration::seconds(3));
    tokio::time::sleep(
        expiry
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
    .await;
    let a = send(addr, get("/x")).await;
    assert_eq!(
        (a.status.as_u16(), a.error_code().as_str()),
        (503, "client_certificate_expired")
    );
    assert!(
        a.json()["message"].as_str().unwrap().contains("expired on"),
        "{:?}",
        a.body
    );
    assert_eq!(send(proxy.admin, get("/readyz")).await.status, 503);
    assert_eq!(lab.received().len(), 0);
}
