//! `vero-proxy check [--connect]`: the report and the exit code, on good and bad inputs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

/// Runs `vero-proxy check` with the run flags of `proxy_args` plus `extra`; (success, stdout).
async fn check(pki: &Pki, upstream: &str, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["check".to_string()];
    args.extend(proxy_args(pki, upstream, extra).into_iter().skip(1));
    process::run_to_end(&args).await
}

#[tokio::test]
async fn a_good_identity_passes_and_is_described() {
    let pki = Pki::new();
    let (ok, out) = check(&pki, "test", &[]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("key matches the certificate") && out.contains("CN=1234567-1"),
        "{out}"
    );
    assert!(out.contains("days left"), "{out}");
}

#[tokio::test]
async fn bad_inputs_fail_with_the_reason() {
    let pki = Pki::new();
    std::fs::write(&pki.key, TestKeyOfAnotherPair::pem()).unwrap();
    let (ok, out) = check(&pki, "test", &[]).await;
    assert!(!ok);
    assert!(
        out.contains("error") && out.contains("does not match"),
        "{out}"
    );

    let (ok, out) = check(&pki, "http://api.vero.fi", &[]).await;
    assert!(!ok);
    assert!(
        out.contains("configuration") && out.contains("https://"),
        "{out}"
    );
}

struct TestKeyOfAnotherPair;
impl TestKeyOfAnotherPair {
    fn pem() -> String {
        rcgen::KeyPair::generate().unwrap().serialize_pem()
    }
}

#[tokio::test]
async fn a_test_certificate_pointed_at_production_is_flagged() {
    let mut pki = Pki::new();
    // A CA named like the Tax Administration's test issuer.
    let test_ca = vero_proxy::demo::pki::TestPki::new("Data Providers Test Issuing CA v1").unwrap();
    let pair = test_ca.client("1234567-1", "Testi Oy").unwrap();
    std::fs::write(&pki.cert, &pair.cert_pem).unwrap();
    std::fs::write(&pki.key, &pair.key_pem).unwrap();
    pki.client = pair;
    let (_, out) = check(&pki, "production", &[]).await;
    assert!(
        out.contains("a test certificate is pointed at the production API"),
        "{out}"
    );
    let (_, out) = check(&pki, "test", &[]).await;
    assert!(!out.contains("is pointed at"), "{out}");
}

#[tokio::test]
async fn connect_reports_an_accepted_certificate() {
    let pki = Pki::new();
    let (lab, up) = upstream_accepting(&pki, vec![]).await;
    let url = format!("https://localhost:{}", up.addr.port());
    let (ok, out) = check(
        &pki,
        &url,
        &[
            "--connect",
            "--probe-path",
            "/probe",
            "--add-header",
            "Vero-SoftwareKey: k1",
        ],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains("TLS handshake") && out.contains("certificate was accepted"),
        "{out}"
    );
    let r = lab.last();
    assert_eq!(r.target, "/probe");
    assert_eq!(r.headers["vero-softwarekey"], "k1");
}

#[tokio::test]
async fn connect_explains_401_403_and_a_refused_certificate() {
    let pki = Pki::new();
    let (_lab, up) = upstream_accepting(&pki, vec![]).await;
    let url = format!("https://localhost:{}", up.addr.port());
    let (ok, out) = check(&pki, &url, &["--connect", "--probe-path", "/status/401"]).await;
    assert!(!ok);
    assert!(
        out.contains("software key") && out.contains("from upstream"),
        "{out}"
    );
    let (ok, out) = check(&pki, &url, &["--connect", "--probe-path", "/status/403"]).await;
    assert!(!ok);
    assert!(
        out.contains("production access") && out.contains("once a day"),
        "{out}"
    );

    let other = vero_proxy::demo::pki::TestPki::new("other CA").unwrap();
    let (_lab, refusing) = upstream_accepting(&pki, vec![other.ca_pem.clone()]).await;
    let url = format!("https://localhost:{}", refusing.addr.port());
    let (ok, out) = check(&pki, &url, &["--connect"]).await;
    assert!(!ok);
    assert!(out.contains("refused our client certificate"), "{out}");
}
