//! `--config FILE` with the real binary: the file's settings take effect, flags beat the
//! environment and the environment beats the file, and a wrong file is refused naming the key
//! and the file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use std::sync::Arc;

use common::process::{refused, Proc};
use common::*;
use http::StatusCode;

/// Writes `vero-proxy.toml` in the PKI's directory: the identity of `pki`, `upstream`, and
/// `extra` lines. Returns its path.
fn write_config(pki: &Pki, upstream: &str, extra: &str) -> PathBuf {
    let path = pki.path("vero-proxy.toml");
    let text = format!(
        "upstream = {upstream:?}\ncert = {:?}\nkey = {:?}\nca-file = {:?}\n{extra}\n",
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
        pki.ca_file.display().to_string(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An upstream never contacted: these processes stop, or are stopped, before any request.
const NOWHERE: &str = "https://localhost:9";

#[tokio::test]
async fn the_files_settings_reach_the_upstream() {
    let pki = Pki::new();
    let lab = Arc::new(Lab::default());
    let upstream = start_upstream(&pki.ca, &pki.ca, UpstreamSpec::default(), lab.clone()).await;
    let url = format!("https://localhost:{}", upstream.addr.port());
    let file = write_config(
        &pki,
        &url,
        r#"
        listen = "127.0.0.1:0"
        admin-listen = "127.0.0.1:0"
        add-header = ["Vero-SoftwareKey: from-the-file", "X-Second: 2"]
        upstream-protocol = "http1"
        "#,
    );
    let mut p = Proc::spawn_env(&["--config", s(&file)], &[]);
    let (listen, admin) = p.serving_addrs().await;
    // The defaults are 127.0.0.1:8080 and 127.0.0.1:9901: port 0 can only come from the file.
    assert_ne!(listen, "127.0.0.1:8080");
    assert_ne!(admin, "127.0.0.1:9901");

    let answer = send(listen.parse().unwrap(), get("/x")).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", p.stderr());
    let seen = lab.last();
    assert_eq!(seen.headers["vero-softwarekey"], "from-the-file");
    assert_eq!(seen.headers["x-second"], "2");
    assert_eq!(seen.version, http::Version::HTTP_11);
}

#[tokio::test]
async fn flags_beat_the_environment_and_the_environment_beats_the_file() {
    let pki = Pki::new();
    let file = write_config(
        &pki,
        NOWHERE,
        "listen = \"127.0.0.1:0\"\nadmin-listen = \"127.0.0.1:0\"",
    );
    // Short, under /tmp: socket paths are limited to about 100 bytes.
    let dir = tempfile::Builder::new()
        .prefix("vero-cfg")
        .tempdir_in("/tmp")
        .unwrap();
    let env_sock = format!("unix:{}", dir.path().join("env.sock").display());
    let flag_sock = format!("unix:{}", dir.path().join("flag.sock").display());

    // The file named by VERO_PROXY_CONFIG; its listen loses to VERO_PROXY_LISTEN.
    let mut p = Proc::spawn_env(
        &["run"],
        &[
            ("VERO_PROXY_CONFIG", s(&file)),
            ("VERO_PROXY_LISTEN", &env_sock),
        ],
    );
    let (listen, admin) = p.serving_addrs().await;
    assert_eq!(listen, env_sock);
    assert_ne!(
        admin, "127.0.0.1:9901",
        "the file's admin-listen was not used"
    );
    drop(p);

    // A flag beats both.
    let mut p = Proc::spawn_env(
        &["--config", s(&file), "--listen", &flag_sock],
        &[("VERO_PROXY_LISTEN", &env_sock)],
    );
    let (listen, _) = p.serving_addrs().await;
    assert_eq!(listen, flag_sock);
}

#[tokio::test]
async fn a_remote_listen_from_the_file_is_refused_naming_the_flag_key_and_file() {
    let pki = Pki::new();
    let file = write_config(
        &pki,
        NOWHERE,
        "listen = \"0.0.0.0:1\"\nadmin-listen = \"127.0.0.1:0\"",
    );
    let log = refused(&["--config", s(&file)], &[]).await;
    assert!(log.contains("--allow-remote-clients"), "{log}");
    assert!(
        log.contains(&format!("key \"listen\" in {}", file.display())),
        "{log}"
    );

    // A boolean in the file: allowed, it serves.
    let file = write_config(
        &pki,
        NOWHERE,
        "listen = \"0.0.0.0:0\"\nadmin-listen = \"127.0.0.1:0\"\nallow-remote-clients = true",
    );
    let mut p = Proc::spawn_env(&["run", "--config", s(&file)], &[]);
    let (listen, _) = p.serving_addrs().await;
    assert!(listen.starts_with("0.0.0.0:"), "{listen}");
    drop(p);

    // The environment's false beats the file's true.
    let log = refused(
        &["--config", s(&file)],
        &[("VERO_PROXY_ALLOW_REMOTE_CLIENTS", "false")],
    )
    .await;
    assert!(log.contains("--allow-remote-clients"), "{log}");
}

#[tokio::test]
async fn a_wrong_file_is_refused_naming_the_key_and_the_file() {
    let pki = Pki::new();
    for (extra, needles) in [
        (
            "max-upstream-concurency = 50",
            &[
                "unknown key \"max-upstream-concurency\"",
                "did you mean max-upstream-concurrency?",
            ][..],
        ),
        (
            "max-upstream-concurrency = \"fifty\"",
            &["key \"max-upstream-concurrency\"", "not a valid value"][..],
        ),
        (
            "upstream-protocol = \"http3\"",
            &["key \"upstream-protocol\"", "auto, http1, http2"][..],
        ),
        (
            "allow-remote-admin = \"yes\"",
            &["key \"allow-remote-admin\" takes true or false"][..],
        ),
        ("config = \"other.toml\"", &["\"config\" cannot be set"][..]),
        ("help = true", &["unknown key \"help\""][..]),
        ("listen = ", &["not valid TOML"][..]),
    ] {
        let file = write_config(&pki, NOWHERE, extra);
        let log = refused(&["--config", s(&file)], &[]).await;
        assert!(log.contains(&file.display().to_string()), "{extra}: {log}");
        for needle in needles {
            assert!(log.contains(needle), "{extra}: no {needle:?} in {log}");
        }
    }

    // A password has no key, and the refusal does not repeat it.
    let file = write_config(&pki, NOWHERE, "pkcs12-password = \"hunter2-secret\"");
    let log = refused(&["run", "--config", s(&file)], &[]).await;
    assert!(log.contains("unknown key \"pkcs12-password\""), "{log}");
    assert!(!log.contains("hunter2-secret"), "{log}");

    let missing = pki.path("no-such.toml");
    let log = refused::<&str>(&[], &[("VERO_PROXY_CONFIG", s(&missing))]).await;
    assert!(log.contains(&missing.display().to_string()), "{log}");
}
