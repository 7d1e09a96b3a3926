//! `vero-proxy cert inspect`: the facts, the renewal window, key checks, every input kind, the
//! exit status, and a running proxy's /status, all through the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::process::Proc;
use common::*;
use serde_json::Value;
use time::{Duration, OffsetDateTime};
use vero_proxy::demo::pki::TestPki;

/// What one run of `cert inspect` did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Asserts that the output holds `text`, showing the output when it does not.
    #[track_caller]
    fn shows(&self, text: &str) {
        assert!(self.stdout.contains(text), "{}", self.stdout);
    }

    /// Asserts the exit status, then that the output holds `text`.
    #[track_caller]
    fn says(&self, code: i32, text: &str) {
        assert_eq!(self.code, code, "{}", self.stdout);
        self.shows(text);
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("--json output is not JSON ({e}):\n{}", self.stdout))
    }
}

/// Runs `vero-proxy cert inspect ARGS` with a clean VERO_PROXY_* environment plus `env`.
async fn inspect(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd =
        tokio::process::Command::from(common::process::clean_command(common::process::BIN));
    cmd.arg("cert")
        .arg("inspect")
        .args(args)
        .envs(env.iter().copied());
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
        .await
        .expect("cert inspect did not finish")
        .unwrap();
    let run = Run {
        code: out.status.code().expect("exited by a signal"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !run.stderr.contains("panicked") && !run.stdout.contains("panicked"),
        "{}{}",
        run.stdout,
        run.stderr
    );
    run
}

/// A client certificate valid from `from` days until `days` days (and an hour) from now, written
/// as `NAME.pem` + `NAME.key` in `dir`; returns the certificate's path.
fn client_for(pki: &TestPki, dir: &Path, name: &str, from: i64, days: i64) -> PathBuf {
    let now = OffsetDateTime::now_utc();
    let pair = pki
        .client_valid(
            "1234567-8",
            "Testi Oy",
            now + Duration::days(from),
            now + Duration::days(days) + Duration::hours(1),
            rcgen::KeyPair::generate().unwrap(),
        )
        .unwrap();
    let cert = dir.join(format!("{name}.pem"));
    std::fs::write(&cert, &pair.cert_pem).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), &pair.key_pem).unwrap();
    cert
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn leaf(input: &Value) -> &Value {
    &input["certificates"][0]
}

#[tokio::test]
async fn days_left_and_the_renewal_window_for_certificates_valid_30_and_200_days() {
    let pki = TestPki::new("inspect CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let soon = client_for(&pki, dir.path(), "soon", -1, 30);
    let later = client_for(&pki, dir.path(), "later", -1, 200);
    let run = inspect(&["--json", &s(&soon), &s(&later)], &[]).await;
    assert_eq!(run.code, 0, "{}", run.stdout);
    let j = run.json();
    assert_eq!(j["ok"], true);

    let soon = leaf(&j["inputs"][0]);
    assert_eq!(soon["days_left"], 30, "{soon}");
    assert_eq!(soon["renewal"]["state"], "renewal_open");
    assert!(
        soon["renewal"]["text"]
            .as_str()
            .unwrap()
            .starts_with("open since "),
        "{soon}"
    );
    assert_eq!(soon["subject"], "CN=1234567-8, O=Testi Oy, C=FI");
    assert_eq!(soon["key_type"], "EC P-256");
    assert_eq!(soon["tax_administration"]["environment"], Value::Null);

    let later = leaf(&j["inputs"][1]);
    assert_eq!(later["days_left"], 200, "{later}");
    assert_eq!(later["renewal"]["state"], "ok");
    let text = later["renewal"]["text"].as_str().unwrap();
    assert!(
        text.starts_with("not yet open: opens ") && text.contains("(in 140 days)"),
        "{text}"
    );
    // The window opens 60 days before notAfter.
    let opens =
        humantime::parse_rfc3339(later["renewal"]["window_opens"].as_str().unwrap()).unwrap();
    let not_after = humantime::parse_rfc3339(later["not_after"].as_str().unwrap()).unwrap();
    assert_eq!(
        not_after.duration_since(opens).unwrap().as_secs(),
        60 * 86_400
    );
}

#[tokio::test]
async fn fail_within_makes_an_open_window_exit_1_and_closing_soon_is_named() {
    let pki = TestPki::new("inspect CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let soon = client_for(&pki, dir.path(), "soon", -1, 30);
    let later = client_for(&pki, dir.path(), "later", -1, 200);
    let critical = client_for(&pki, dir.path(), "critical", -1, 10);

    assert_eq!(
        inspect(&["--fail-within", "60", &s(&later)], &[])
            .await
            .code,
        0
    );
    let run = inspect(&["--fail-within", "60", &s(&soon)], &[]).await;
    run.says(1, "within 60 days (--fail-within)");

    let run = inspect(&[&s(&critical)], &[]).await;
    run.says(0, "closing soon: 10 days left");
}

#[tokio::test]
async fn expired_and_not_yet_valid_certificates_exit_1_with_the_reason() {
    let pki = TestPki::new("inspect CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let expired = client_for(&pki, dir.path(), "expired", -400, -3);
    let future = client_for(&pki, dir.path(), "future", 5, 700);

    let run = inspect(&[&s(&expired)], &[]).await;
    run.says(1, "renewal       expired on ");
    run.shows("new transfer IDs");
    run.shows("problem: leaf certificate CN=1234567-8");

    let run = inspect(&["--json", &s(&future)], &[]).await;
    assert_eq!(run.code, 1);
    let j = run.json();
    assert_eq!(j["ok"], false);
    assert_eq!(leaf(&j["inputs"][0])["renewal"]["state"], "not_yet_valid");
    assert!(
        j["inputs"][0]["problems"][0]
            .as_str()
            .unwrap()
            .contains("is not valid until"),
        "{j}"
    );
}

#[tokio::test]
async fn a_matching_key_passes_and_the_key_of_another_pair_fails() {
    let pki = TestPki::new("inspect CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mine = client_for(&pki, dir.path(), "mine", -1, 300);
    client_for(&pki, dir.path(), "other", -1, 300);
    let my_key = s(&dir.path().join("mine.key"));
    let other_key = s(&dir.path().join("other.key"));

    let run = inspect(&["--key", &my_key, &s(&mine)], &[]).await;
    run.says(0, &format!("the key in {my_key} matches"));

    let run = inspect(&["--json", "--key", &other_key, &s(&mine)], &[]).await;
    assert_eq!(run.code, 1, "{}", run.stdout);
    let j = run.json();
    assert_eq!(j["inputs"][0]["keys"][0]["matches"], false);
    assert!(
        j["inputs"][0]["problems"][0]
            .as_str()
            .unwrap()
            .contains(&format!("the private key in {other_key} does not match")),
        "{j}"
    );

    // A PEM holding the certificate and its key is checked without --key.
    let both = dir.path().join("both.pem");
    let text = std::fs::read_to_string(&mine).unwrap() + &std::fs::read_to_string(&my_key).unwrap();
    std::fs::write(&both, text).unwrap();
    let j = inspect(&["--json", &s(&both)], &[]).await.json();
    assert_eq!(j["inputs"][0]["keys"][0]["matches"], true, "{j}");
}

fn fixture(name: &str) -> String {
    s(&Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name))
}

#[tokio::test]
async fn pkcs12_opens_with_a_password_file_or_the_environment_and_names_a_wrong_one() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "fixture-pass\n").unwrap();
    for file in ["modern.p12", "legacy-rc2.p12"] {
        let run = inspect(
            &["--json", "--pkcs12-password-file", &s(&pw), &fixture(file)],
            &[],
        )
        .await;
        assert_eq!(run.code, 0, "{file}: {}", run.stdout);
        let j = run.json();
        let input = &j["inputs"][0];
        assert_eq!(input["kind"], "pkcs12");
        assert_eq!(leaf(input)["subject"], "CN=7654321-9, O=Fixture Oy, C=FI");
        assert_eq!(leaf(input)["key_bits"], 2048);
        assert_eq!(
            input["certificates"][1]["subject"],
            "CN=vero-proxy fixture CA"
        );
        assert_eq!(input["certificates"][1]["issued_previous"], true);
        assert_eq!(input["keys"][0]["matches"], true, "{input}");
    }

    let run = inspect(
        &[&fixture("modern.p12")],
        &[("VERO_PROXY_PKCS12_PASSWORD", "fixture-pass")],
    )
    .await;
    run.says(0, "CN=7654321-9");

    std::fs::write(&pw, "wrong\n").unwrap();
    let run = inspect(
        &["--pkcs12-password-file", &s(&pw), &fixture("modern.p12")],
        &[],
    )
    .await;
    assert_eq!(run.code, 1);
    assert!(
        run.stdout.contains("modern.p12")
            && run.stdout.contains("password")
            && run.stdout.contains("wrong"),
        "{}",
        run.stdout
    );

    let run = inspect(&[&fixture("modern.p12")], &[]).await;
    assert_eq!(run.code, 1);
    run.shows("--pkcs12-password-file");
}

#[tokio::test]
async fn an_identity_directory_as_a_kubernetes_secret_mounts_it() {
    let pki = TestPki::new("inspect CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = client_for(&pki, dir.path(), "c", -1, 300);
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    let chain = std::fs::read_to_string(&cert).unwrap() + &pki.ca_pem;
    std::fs::write(secret.join("tls.crt"), chain).unwrap();
    std::fs::copy(dir.path().join("c.key"), secret.join("tls.key")).unwrap();
    let run = inspect(&[&s(&secret)], &[]).await;
    run.says(0, "(identity-dir)");
    run.shows("tls.key matches");
    assert!(
        run.stdout.contains("chain sent    1. CN=inspect CA")
            && run.stdout.contains("issued the one before"),
        "{}",
        run.stdout
    );

    // A CA that did not issue the leaf, sent after it: said so.
    let stranger = TestPki::new("another CA").unwrap();
    let chain = std::fs::read_to_string(&cert).unwrap() + &stranger.ca_pem;
    std::fs::write(secret.join("tls.crt"), chain).unwrap();
    let run = inspect(&[&s(&secret)], &[]).await;
    assert!(
        run.stdout.contains("did NOT issue the one before")
            && run
                .stdout
                .contains("the chain is out of order or belongs to another certificate"),
        "{}",
        run.stdout
    );

    // The other pair's key in the directory: a mismatch, named.
    client_for(&pki, dir.path(), "d", -1, 300);
    std::fs::copy(dir.path().join("d.key"), secret.join("tls.key")).unwrap();
    let run = inspect(&[&s(&secret)], &[]).await;
    run.says(1, "tls.key does NOT match");
}

#[tokio::test]
async fn a_directory_of_identity_directories_shows_each_organisation() {
    let pki = TestPki::new("inspect CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (org, days) in [("1234567-1", 300), ("7654321-9", 30)] {
        let sub = dir.path().join(org);
        std::fs::create_dir(&sub).unwrap();
        client_for(&pki, &sub, "cert", -1, days);
        std::fs::rename(sub.join("cert.key"), sub.join("key.pem")).unwrap();
    }
    let run = inspect(&["--json", &s(dir.path())], &[]).await;
    assert_eq!(run.code, 0, "{}", run.stdout);
    let j = run.json();
    let inputs = j["inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), 2, "{j}");
    assert!(inputs[0]["input"].as_str().unwrap().ends_with("1234567-1"));
    assert_eq!(leaf(&inputs[1])["days_left"], 30);
    assert_eq!(inputs[1]["keys"][0]["matches"], true);
}

#[tokio::test]
async fn standard_input_is_read_for_a_dash() {
    use tokio::io::AsyncWriteExt;
    let pki = TestPki::new("inspect CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = client_for(&pki, dir.path(), "c", -1, 300);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_vero-proxy"))
        .args(["cert", "inspect", "--json", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(&std::fs::read(&cert).unwrap())
        .await
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        leaf(&j["inputs"][0])["subject"],
        "CN=1234567-8, O=Testi Oy, C=FI"
    );
}

#[tokio::test]
async fn garbage_and_missing_inputs_are_named_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(PathBuf, &[u8], &str)> = vec![
        (
            dir.path().join("notes.txt"),
            b"hello, not a certificate\n",
            "is not a certificate",
        ),
        (
            dir.path().join("blob.bin"),
            &[0x30, 0x82, 0x01, 0x00, 0xde, 0xad],
            "binary but not a DER certificate",
        ),
        (
            dir.path().join("cut.pem"),
            b"-----BEGIN CERTIFICATE-----\nMIIB!!!!\n-----END CERTIFICATE-----\n",
            "is not a valid PEM file",
        ),
        (
            dir.path().join("keyonly.pem"),
            std::fs::read(fixture("rsa.pkcs8.pem")).unwrap().leak(),
            "holds no PEM certificate",
        ),
        (dir.path().join("empty.pem"), b"", "is not a certificate"),
    ];
    for (path, content, expected) in &cases {
        std::fs::write(path, content).unwrap();
        let run = inspect(&[&s(path)], &[]).await;
        assert_eq!(run.code, 1, "{}: {}", path.display(), run.stdout);
        assert!(
            run.stdout.contains(&s(path)) && run.stdout.contains(expected),
            "{}: {}",
            path.display(),
            run.stdout
        );
    }
    let missing = s(&dir.path().join("missing.pem"));
    let run = inspect(&["--json", &missing], &[]).await;
    assert_eq!(run.code, 1);
    let err = run.json()["inputs"][0]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        err.contains(&missing) && err.contains("No such file"),
        "{err}"
    );

    // Endless input is cut short, not read to the end.
    let run = inspect(&["/dev/zero"], &[]).await;
    assert_eq!(run.code, 1);
    run.shows("/dev/zero is larger than 4 MiB");

    // An empty directory is neither pair.
    let run = inspect(&[&s(dir.path())], &[]).await;
    assert_eq!(run.code, 1);
    run.shows("neither cert.pem + key.pem nor tls.crt + tls.key");
}

#[tokio::test]
async fn the_report_is_aligned_and_plain_in_a_pipe() {
    let pki = TestPki::new("inspect CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = client_for(&pki, dir.path(), "c", -1, 300);
    let run = inspect(&[&s(&cert)], &[]).await;
    assert!(
        !run.stdout.contains('\x1b'),
        "colour in a pipe:\n{}",
        run.stdout
    );
    let lines: Vec<&str> = run.stdout.lines().skip(1).collect();
    for label in [
        "subject",
        "issuer",
        "issued by",
        "serial",
        "valid from",
        "valid until",
        "renewal",
        "sha256",
        "key",
        "chain sent",
        "result",
    ] {
        let line = lines
            .iter()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label} line:\n{}", run.stdout));
        // Values start in one column.
        assert!(
            line.len() > 16 && line.as_bytes()[15] == b' ' && line.as_bytes()[16] != b' ',
            "{line:?}"
        );
    }
    run.shows("not a Tax Administration certificate");
}

#[tokio::test]
async fn the_tax_administrations_own_ca_certificates_are_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/vero_ca");
    let chain = std::fs::read_to_string(ca_dir.join("test-providers-issuing.pem")).unwrap()
        + &std::fs::read_to_string(ca_dir.join("test-intermediate.pem")).unwrap();
    let file = dir.path().join("chain.pem");
    std::fs::write(&file, chain).unwrap();
    let j = inspect(&["--json", &s(&file)], &[]).await.json();
    let certs = &j["inputs"][0]["certificates"];
    assert_eq!(
        certs[0]["tax_administration_ca_certificate"]["name"],
        "Data Providers Test Issuing CA v1"
    );
    assert_eq!(certs[0]["is_ca"], true);
    assert_eq!(certs[1]["issued_previous"], true);
    assert_eq!(
        certs[1]["tax_administration_ca_certificate"]["environment"],
        "test"
    );
}

#[tokio::test]
async fn a_running_proxys_status_shows_the_identity_in_service() {
    let pki = Pki::new();
    let lab = Arc::new(Lab::default());
    let upstream = start_upstream(&pki.ca, &pki.ca, UpstreamSpec::default(), lab).await;
    let url = format!("https://localhost:{}", upstream.addr.port());
    let mut proxy = Proc::spawn(&proxy_args(&pki, &url, &[])[1..]);
    let (_, admin) = proxy.serving_addrs().await;

    let status_url = format!("http://{admin}/status");
    let run = inspect(&["--json", &status_url, &s(&pki.cert)], &[]).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let j = run.json();
    let (from_status, from_file) = (&j["inputs"][0], &j["inputs"][1]);
    assert_eq!(from_status["kind"], "status");
    for field in [
        "subject",
        "issuer",
        "serial",
        "fingerprint_sha256",
        "not_before",
        "not_after",
        "days_left",
    ] {
        assert_eq!(leaf(from_status)[field], leaf(from_file)[field], "{field}");
    }
    assert_eq!(
        leaf(from_status)["subject"],
        "CN=1234567-1, O=Testi Oy, C=FI"
    );
    assert_eq!(
        leaf(from_status)["tax_administration"]["checked_by"],
        "name"
    );
    assert!(
        from_status["notes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n.as_str().unwrap().contains(&s(&pki.cert))),
        "{from_status}"
    );

    // The bare admin address works too, in the human report.
    let run = inspect(&[&format!("http://{admin}")], &[]).await;
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert!(
        run.stdout.contains("(status)") && run.stdout.contains("CN=1234567-1"),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn status_urls_must_be_loopback_http_and_a_silent_port_is_named() {
    let run = inspect(&["http://192.0.2.1:9901/status"], &[]).await;
    assert_eq!(run.code, 1);
    run.shows("not a loopback address");
    let run = inspect(&["https://127.0.0.1:9901/status"], &[]).await;
    assert_eq!(run.code, 1);
    run.shows("only http://");

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = format!("http://127.0.0.1:{port}/status");
    let run = inspect(&[&url], &[]).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stdout.contains(&url) && run.stdout.contains("cannot connect"),
        "{}",
        run.stdout
    );
}
