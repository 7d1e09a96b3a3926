//! The certificate lifecycle against the in-process stand-in certificate service: first
//! retrieval and renewal through the binary and the library, refusals, tampered and untrusted
//! answers, and the stand-in's own checks of renewal signatures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use roxmltree::Document;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use vero_proxy::certsvc::answer;
use vero_proxy::certsvc::client::ServiceError;
use vero_proxy::certsvc::dsig::{self, DsigError, SignerTrust};
use vero_proxy::certsvc::standin::{CertService, Settings};
use vero_proxy::certsvc::xml::{self, Customer, Operation};
use vero_proxy::certsvc::{self, FlowError, PollSchedule, Service, Transfer};
use vero_proxy::identity::{self, IdentitySource};
use vero_proxy::vero_ca::Environment;

const ID: &str = "0245437-2";

struct Lab {
    svc: CertService,
    dir: tempfile::TempDir,
}

impl Lab {
    async fn new(polls_before_ready: u32) -> Lab {
        let svc = CertService::start(Settings {
            transfers: vec![("T1".into(), "pw1".into()), ("T2".into(), "pw2".into())],
            polls_before_ready,
            ..Settings::default()
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tls-ca.pem"), &svc.tls_ca_pem).unwrap();
        std::fs::write(dir.path().join("signer-ca.pem"), &svc.signer_root_pem).unwrap();
        Lab { svc, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The flags that point the binary at the stand-in.
    fn service_flags(&self, out: &str) -> Vec<String> {
        [
            "--environment",
            "test",
            "--customer-id",
            ID,
            "--out",
            self.path(out).to_str().unwrap(),
            "--service-url",
            &self.svc.url,
            "--service-ca-file",
            self.path("tls-ca.pem").to_str().unwrap(),
            "--service-signer-ca",
            self.path("signer-ca.pem").to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// A library client with a fast poll schedule.
    fn client(&self, deadline: Duration) -> Service {
        let tls_ca = CertificateDer::from_pem_slice(self.svc.tls_ca_pem.as_bytes()).unwrap();
        let signer = CertificateDer::from_pem_slice(self.svc.signer_root_pem.as_bytes()).unwrap();
        Service::new(
            Environment::Test,
            Some(&self.svc.url),
            &[tls_ca],
            SignerTrust::roots(vec![signer]),
            PollSchedule {
                first: Duration::from_millis(5),
                max: Duration::from_millis(20),
                deadline,
            },
        )
        .unwrap()
    }

    /// A current identity from the stand-in's CA, valid until `days_left` from now.
    fn current(&self, name: &str, not_before_days: i64, days_left: i64) -> PathBuf {
        let now = OffsetDateTime::now_utc();
        let pair = self
            .svc
            .issue_current(
                ID,
                now + time::Duration::days(not_before_days),
                now + time::Duration::days(days_left),
            )
            .unwrap();
        let d = self.path(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("cert.pem"), pair.cert_pem).unwrap();
        std::fs::write(d.join("key.pem"), pair.key_pem).unwrap();
        d
    }
}

fn customer() -> Customer {
    Customer {
        environment: Environment::Test,
        customer_id: ID.into(),
        customer_name: Some("Testi Oy".into()),
    }
}

fn transfer(id: &str, pw: &str) -> Transfer {
    Transfer {
        id: id.into(),
        password: zeroize::Zeroizing::new(pw.into()),
    }
}

/// Runs the binary; (success, stdout, stderr).
async fn vero(args: &[String], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd =
        tokio::process::Command::from(common::process::clean_command(common::process::BIN));
    cmd.envs(env.iter().copied())
        .args(args)
        .stdin(std::process::Stdio::null());
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("vero-proxy did not finish within 60 s")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn args(first: &[&str], rest: Vec<String>) -> Vec<String> {
    first.iter().map(|s| s.to_string()).chain(rest).collect()
}

/// Loads `dir` as `run --identity-dir` would: the certificate must match the key.
fn load_dir(dir: &Path) -> identity::Identity {
    identity::load(
        &IdentitySource::Dir {
            dir: dir.to_path_buf(),
            key_password: None,
        },
        &vero_proxy::upstream::tls::provider(),
        SystemTime::now(),
    )
    .unwrap()
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn first_retrieval_through_the_binary() {
    let lab = Lab::new(1).await;
    std::fs::write(lab.path("pw"), "pw1\n").unwrap();
    let a = args(
        &[
            "cert",
            "request",
            "--customer-name",
            "Testi Oy",
            "--transfer-id",
            "T1",
        ],
        [
            lab.service_flags("out"),
            vec![
                "--transfer-password-file".into(),
                lab.path("pw").to_str().unwrap().into(),
            ],
        ]
        .concat(),
    );
    let (ok, stdout, stderr) = vero(&a, &[]).await;
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("--identity-dir"), "{stdout}");
    #[cfg(unix)]
    assert_eq!(mode(&lab.path("out/key.pem")), 0o600);
    let id = load_dir(&lab.path("out"));
    assert!(
        id.info.subject.contains(&format!("CN={ID}")),
        "{}",
        id.info.subject
    );
    let check = args(
        &["check", "--upstream", "test", "--identity-dir"],
        vec![lab.path("out").to_str().unwrap().into()],
    );
    // What the proxy itself says of the new directory.
    let (ok, stdout, stderr) = vero(&check, &[]).await;
    assert!(ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("the key matches the certificate"),
        "{stdout}"
    );

    let got = lab.svc.received();
    let ops: Vec<_> = got
        .iter()
        .map(|r| (r.operation, r.soap_action.as_str()))
        .collect();
    assert_eq!(
        ops,
        [
            (Some(Operation::SignNew), "signNewCertificate"),
            (Some(Operation::Get), "getCertificate"),
            (Some(Operation::Get), "getCertificate"),
        ]
    );
    assert!(got[0].content_type.starts_with("text/xml"));
    assert!(got[0]
        .body
        .contains("<TransferPassword>pw1</TransferPassword>"));
    assert!(got[0]
        .body
        .contains("<CustomerName>Testi Oy</CustomerName>"));
}

#[tokio::test]
async fn password_from_the_environment_and_refusal_shown_verbatim() {
    let lab = Lab::new(0).await;
    let a = args(
        &["cert", "request", "--transfer-id", "T1"],
        lab.service_flags("out"),
    );
    let (ok, _, stderr) = vero(&a, &[("VERO_PROXY_TRANSFER_PASSWORD", "wrong")]).await;
    assert!(!ok);
    assert!(
        stderr.contains("TRANSFER_INVALID: Invalid transfer ID or transfer password."),
        "{stderr}"
    );
    // Refused before anything was accepted: no key left behind, a retry needs no --force.
    assert!(!lab.path("out/key.pem").exists());
    let (ok, _, stderr) = vero(&a, &[("VERO_PROXY_TRANSFER_PASSWORD", "pw1")]).await;
    assert!(ok, "{stderr}");
    // No password source at all, and no terminal: a clear refusal, not a hang.
    let a = args(
        &["cert", "request", "--transfer-id", "T2"],
        lab.service_flags("out2"),
    );
    let (ok, _, stderr) = vero(&a, &[]).await;
    assert!(!ok);
    assert!(stderr.contains("VERO_PROXY_TRANSFER_PASSWORD"), "{stderr}");
}

#[tokio::test]
async fn by_default_answers_must_be_signed_under_the_tax_administrations_roots() {
    let lab = Lab::new(0).await;
    let mut flags = lab.service_flags("out");
    let at = flags
        .iter()
        .position(|f| f == "--service-signer-ca")
        .unwrap();
    flags.drain(at..at + 2);
    let a = args(&["cert", "request", "--transfer-id", "T1"], flags);
    let (ok, _, stderr) = vero(&a, &[("VERO_PROXY_TRANSFER_PASSWORD", "pw1")]).await;
    assert!(!ok);
    assert!(
        stderr.contains("answer was rejected") && stderr.contains("not trusted"),
        "{stderr}"
    );
    assert!(!lab.path("out/cert.pem").exists());
}

#[tokio::test]
async fn first_retrieval_through_the_library_and_transfer_ids_are_single_use() {
    let lab = Lab::new(3).await;
    let svc = lab.client(Duration::from_secs(20));
    let out = lab.path("a");
    certsvc::flow::prepare_out(&out, false).unwrap();
    let issued = certsvc::request(&svc, &customer(), &transfer("T1", "pw1"), &out, "-")
        .await
        .unwrap();
    assert_eq!(issued.cert_path, out.join("cert.pem"));
    load_dir(&out);
    assert_eq!(lab.svc.received().len(), 1 + 4);
    // The same output directory is refused now.
    assert!(certsvc::flow::prepare_out(&out, false).is_err());

    let out = lab.path("b");
    certsvc::flow::prepare_out(&out, false).unwrap();
    let e = certsvc::request(&svc, &customer(), &transfer("T1", "pw1"), &out, "-")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("TRANSFER_USED"), "{e}");
}

#[tokio::test]
async fn a_failure_the_stand_in_is_told_to_give_reaches_the_user_verbatim() {
    let lab = Lab::new(0).await;
    lab.svc.fail_with(Some(answer::ErrorInfo {
        code: "E123".into(),
        message: "Palvelu ei ole käytettävissä & <huolto>".into(),
    }));
    let out = lab.path("out");
    certsvc::flow::prepare_out(&out, false).unwrap();
    let e = certsvc::request(
        &lab.client(Duration::from_secs(5)),
        &customer(),
        &transfer("T1", "pw1"),
        &out,
        "-",
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string()
            .ends_with("Status FAIL; E123: Palvelu ei ole käytettävissä & <huolto>"),
        "{e}"
    );
    // Nothing was accepted, so the transfer IDs still work once the service behaves.
    lab.svc.fail_with(None);
    certsvc::request(
        &lab.client(Duration::from_secs(5)),
        &customer(),
        &transfer("T1", "pw1"),
        &out,
        "-",
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn accepted_then_not_ready_says_the_transfer_ids_are_used_and_resumes() {
    let lab = Lab::new(50).await;
    let out = lab.path("out");
    certsvc::flow::prepare_out(&out, false).unwrap();
    let hint = "vero-proxy cert request --retrieval-id {retrieval_id}";
    let e = certsvc::request(
        &lab.client(Duration::from_millis(30)),
        &customer(),
        &transfer("T1", "pw1"),
        &out,
        hint,
    )
    .await
    .unwrap_err();
    let FlowError::Accepted {
        retrieval_id,
        key_path,
        ..
    } = &e
    else {
        panic!("{e}");
    };
    let text = e.to_string();
    assert!(text.contains("used up"), "{text}");
    assert!(text.contains(retrieval_id.as_str()), "{text}");
    assert!(
        text.contains(&format!("--retrieval-id {retrieval_id}")),
        "{text}"
    );
    assert!(text.contains(key_path.to_str().unwrap()), "{text}");
    assert!(key_path.exists());
    assert!(!out.join("cert.pem").exists());

    // Finished with another key in --out: the service's certificate is for the key it was
    // sent, so nothing is written and the key file is named.
    let kept = std::fs::read(key_path).unwrap();
    let another = certsvc::keys::NewKey::generate().unwrap();
    std::fs::write(key_path, another.pem().as_bytes()).unwrap();
    let e = certsvc::resume(
        &lab.client(Duration::from_secs(20)),
        &customer(),
        retrieval_id,
        &out,
        hint,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, FlowError::Accepted { source, .. } if matches!(**source, FlowError::WrongKey(_))),
        "{e}"
    );
    assert!(e.to_string().contains("is not for the new key in"), "{e}");
    assert!(!out.join("cert.pem").exists());
    std::fs::write(key_path, kept).unwrap();

    let issued = certsvc::resume(
        &lab.client(Duration::from_secs(20)),
        &customer(),
        retrieval_id,
        &out,
        hint,
    )
    .await
    .unwrap();
    assert_eq!(&issued.retrieval_id, retrieval_id);
    load_dir(&out);
}

#[tokio::test]
async fn tampered_and_untrusted_answers_are_rejected() {
    let lab = Lab::new(0).await;
    let svc = lab.client(Duration::from_secs(20));
    lab.svc.tamper_answers(true);
    let out = lab.path("t");
    certsvc::flow::prepare_out(&out, false).unwrap();
    let e = certsvc::request(&svc, &customer(), &transfer("T1", "pw1"), &out, "-")
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            FlowError::Unconfirmed {
                source: ServiceError::Signature(DsigError::DigestMismatch),
                ..
            }
        ),
        "{e}"
    );
    assert!(!out.join("cert.pem").exists());
    assert!(e.to_string().contains("--force"), "{e}");

    lab.svc.tamper_answers(false);
    lab.svc.sign_untrusted(true);
    let out = lab.path("u");
    certsvc::flow::prepare_out(&out, false).unwrap();
    let e = certsvc::request(&svc, &customer(), &transfer("T2", "pw2"), &out, "-")
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            FlowError::Unconfirmed {
                source: ServiceError::Signature(DsigError::Untrusted { .. }),
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn renewal_in_the_window_through_the_binary_leaves_the_current_pair_alone() {
    let lab = Lab::new(1).await;
    let cur = lab.current("current", -700, 30);
    let before = (
        std::fs::read(cur.join("cert.pem")).unwrap(),
        std::fs::read(cur.join("key.pem")).unwrap(),
    );
    let a = args(
        &["cert", "renew", "--identity-dir", cur.to_str().unwrap()],
        lab.service_flags("next"),
    );
    let (ok, stdout, stderr) = vero(&a, &[]).await;
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("daily fetch"), "{stdout}");
    let next = load_dir(&lab.path("next"));
    let old = load_dir(&cur);
    assert_ne!(next.info.serial, old.info.serial);
    assert!(next.info.not_after > old.info.not_after);
    assert_eq!(std::fs::read(cur.join("cert.pem")).unwrap(), before.0);
    assert_eq!(std::fs::read(cur.join("key.pem")).unwrap(), before.1);
    let renew = &lab.svc.received()[0];
    assert_eq!(renew.soap_action, "renewCertificate");
    assert!(renew.body.contains("<ds:Signature"));

    // --out must not be the directory of the certificate in service.
    let a = args(
        &[
            "cert",
            "renew",
            "--identity-dir",
            cur.to_str().unwrap(),
            "--force",
        ],
        lab.service_flags("current"),
    );
    let (ok, _, stderr) = vero(&a, &[]).await;
    assert!(!ok);
    assert!(stderr.contains("staging directory"), "{stderr}");
}

#[tokio::test]
async fn renewal_too_early_names_the_date_and_expired_says_request_anew() {
    let lab = Lab::new(0).await;
    let cur = lab.current("early", -10, 200);
    let opens = OffsetDateTime::now_utc() + time::Duration::days(140);
    let a = args(
        &["cert", "renew", "--identity-dir", cur.to_str().unwrap()],
        lab.service_flags("n1"),
    );
    let (ok, _, stderr) = vero(&a, &[]).await;
    assert!(!ok);
    let date = format!(
        "{:04}-{:02}-{:02}",
        opens.year(),
        u8::from(opens.month()),
        opens.day()
    );
    assert!(stderr.contains(&date), "expected {date} in: {stderr}");

    let cur = lab.current("expired", -800, -1);
    let a = args(
        &["cert", "renew", "--identity-dir", cur.to_str().unwrap()],
        lab.service_flags("n2"),
    );
    let (ok, _, stderr) = vero(&a, &[]).await;
    assert!(!ok);
    assert!(
        stderr.contains("an expired certificate cannot be renewed: request a new one with new transfer IDs (cert request)"),
        "{stderr}"
    );
    assert!(
        lab.svc.received().is_empty(),
        "nothing may reach the service"
    );
}

#[tokio::test]
async fn renewal_through_the_library() {
    let lab = Lab::new(2).await;
    let cur = lab.current("current", -700, 10);
    let current = load_dir(&cur);
    let from_cert = certsvc::customer_of(Environment::Test, &current, None).unwrap();
    assert_eq!(from_cert.customer_id, ID);
    let out = lab.path("next");
    certsvc::flow::prepare_out(&out, false).unwrap();
    let issued = certsvc::renew(
        &lab.client(Duration::from_secs(20)),
        &customer(),
        &current,
        &out,
        SystemTime::now(),
        "-",
    )
    .await
    .unwrap();
    assert_eq!(issued.key_path, out.join("key.pem"));
    load_dir(&out);

    // Another organisation's business ID: refused here, before anything is sent.
    let sent = lab.svc.received().len();
    let other = Customer {
        customer_id: "1572860-0".into(),
        ..customer()
    };
    let out = lab.path("other");
    certsvc::flow::prepare_out(&out, false).unwrap();
    let e = certsvc::renew(
        &lab.client(Duration::from_secs(20)),
        &other,
        &current,
        &out,
        SystemTime::now(),
        "-",
    )
    .await
    .unwrap_err();
    assert!(matches!(e, FlowError::NotRenewable(_)), "{e}");
    assert_eq!(lab.svc.received().len(), sent);
}

/// Reads the stand-in's answer, checking its signature, and returns its Result text.
fn answer_of(svc: &CertService, op: Operation, body: &str) -> String {
    let doc = Document::parse(body).unwrap();
    let el = answer::body_element(&doc).unwrap();
    let root = CertificateDer::from_pem_slice(svc.signer_root_pem.as_bytes()).unwrap();
    dsig::verify_enveloped(&doc, el, &SignerTrust::roots(vec![root]), UnixTime::now()).unwrap();
    answer::read_answer(el, op).unwrap().result.to_string()
}

#[tokio::test]
async fn the_stand_in_rejects_missing_bad_and_foreign_renewal_signatures() {
    let lab = Lab::new(0).await;
    let cur = load_dir(&lab.current("current", -700, 30));
    let key = certsvc::keys::NewKey::generate().unwrap();
    let csr = key.csr(&ID.parse().unwrap(), None).unwrap();
    let unsigned = xml::renew_request_unsigned(&customer(), &csr).unwrap();
    let sign = |id: &identity::Identity| {
        dsig::sign_enveloped(
            &unsigned,
            id.certified_key.key.as_ref(),
            &id.certified_key.cert[..1],
        )
        .unwrap()
    };

    let (status, body) = lab
        .svc
        .handle("renewCertificate", &xml::envelope(&unsigned));
    assert_eq!(status, 200);
    let r = answer_of(&lab.svc, Operation::Renew, &body);
    assert!(
        r.contains("SIGNATURE_INVALID") && r.contains("no XML signature"),
        "{r}"
    );

    let altered = sign(&cur).replace("<Environment>TEST<", "<Environment>PRODUCTION<");
    let (_, body) = lab.svc.handle("renewCertificate", &xml::envelope(&altered));
    let r = answer_of(&lab.svc, Operation::Renew, &body);
    assert!(
        r.contains("SIGNATURE_INVALID") && r.contains("digest mismatch"),
        "{r}"
    );

    // Signed with a certificate the stand-in's CA never issued.
    let foreign_dir = lab.path("foreign");
    std::fs::create_dir_all(&foreign_dir).unwrap();
    let other = CertService::start(Settings::default()).await.unwrap();
    let now = OffsetDateTime::now_utc();
    let pair = other
        .issue_current(
            ID,
            now - time::Duration::days(700),
            now + time::Duration::days(30),
        )
        .unwrap();
    std::fs::write(foreign_dir.join("cert.pem"), pair.cert_pem).unwrap();
    std::fs::write(foreign_dir.join("key.pem"), pair.key_pem).unwrap();
    let (_, body) = lab.svc.handle(
        "renewCertificate",
        &xml::envelope(&sign(&load_dir(&foreign_dir))),
    );
    let r = answer_of(&lab.svc, Operation::Renew, &body);
    assert!(r.contains("SIGNATURE_INVALID"), "{r}");

    // Too early for the service too (the client refuses before sending; the stand-in must as well).
    let early = load_dir(&lab.current("early", -10, 200));
    let (_, body) = lab
        .svc
        .handle("renewCertificate", &xml::envelope(&sign(&early)));
    let r = answer_of(&lab.svc, Operation::Renew, &body);
    assert!(r.contains("RENEW_TOO_EARLY"), "{r}");

    // Signed with the customer's own current certificate, but naming another business ID.
    let another = Customer {
        customer_id: "1572860-0".into(),
        ..customer()
    };
    let theirs = dsig::sign_enveloped(
        &xml::renew_request_unsigned(&another, &csr).unwrap(),
        cur.certified_key.key.as_ref(),
        &cur.certified_key.cert[..1],
    )
    .unwrap();
    let (_, body) = lab.svc.handle("renewCertificate", &xml::envelope(&theirs));
    let r = answer_of(&lab.svc, Operation::Renew, &body);
    assert!(r.contains("CUSTOMER_MISMATCH"), "{r}");

    // A good one is accepted.
    let (_, body) = lab
        .svc
        .handle("renewCertificate", &xml::envelope(&sign(&cur)));
    assert_eq!(answer_of(&lab.svc, Operation::Renew, &body), "Status OK");

    // A SOAPAction that does not match the element is a fault.
    let (status, body) = lab
        .svc
        .handle("getCertificate", &xml::envelope(&sign(&cur)));
    assert_eq!(status, 500);
    assert!(body.contains("SOAPAction"), "{body}");
}

/// Runs xmlsec1 with `args`; (success, stderr).
fn xmlsec1(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("xmlsec1")
        .args(args)
        .output()
        .expect("xmlsec1 is not installed (Debian package xmlsec1)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
#[ignore = "needs xmlsec1"]
async fn signatures_interoperate_with_xmlsec1() {
    let lab = Lab::new(0).await;
    let cur_dir = lab.current("signer", -1, 30);
    let cur = load_dir(&cur_dir);
    let root = lab.path("root.pem");
    std::fs::write(&root, &lab.svc.issuing_ca_pem).unwrap();

    // Ours, checked by xmlsec1 (the request element as its own document, as it was signed).
    let key = certsvc::keys::NewKey::generate().unwrap();
    let csr = key.csr(&ID.parse().unwrap(), Some("Testi & Oy")).unwrap();
    let odd_name = Customer {
        customer_name: Some("Testi & \"Oy\" <Ab>\r".into()),
        ..customer()
    };
    let unsigned = xml::renew_request_unsigned(&odd_name, &csr).unwrap();
    let signed = dsig::sign_enveloped(
        &unsigned,
        cur.certified_key.key.as_ref(),
        &cur.certified_key.cert[..1],
    )
    .unwrap();
    std::fs::write(lab.path("ours.xml"), &signed).unwrap();
    let ours = lab.path("ours.xml");
    let (ok, err) = xmlsec1(&[
        "--verify",
        "--trusted-pem",
        root.to_str().unwrap(),
        ours.to_str().unwrap(),
    ]);
    assert!(ok, "xmlsec1 refused our signature: {err}");
    std::fs::write(&ours, signed.replace(">TEST<", ">PRODUCTION<")).unwrap();
    let (ok, _) = xmlsec1(&[
        "--verify",
        "--trusted-pem",
        root.to_str().unwrap(),
        ours.to_str().unwrap(),
    ]);
    assert!(!ok, "xmlsec1 accepted an altered document");

    // xmlsec1's, checked by us: a response element signed from a template.
    let template = xml::response_unsigned(Operation::SignNew, Some("abc123"), None, &[]).replace(
        "</cs:SignNewCertificateResponse>",
        concat!(
            r#"<ds:Signature xmlns:ds="http://www.w3.org/2000/09/xmldsig#"><ds:SignedInfo>"#,
            r#"<ds:CanonicalizationMethod Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/>"#,
            r#"<ds:SignatureMethod Algorithm="http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"/>"#,
            r#"<ds:Reference URI=""><ds:Transforms>"#,
            r#"<ds:Transform Algorithm="http://www.w3.org/2000/09/xmldsig#enveloped-signature"/>"#,
            r#"<ds:Transform Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/></ds:Transforms>"#,
            r#"<ds:DigestMethod Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"/>"#,
            r#"<ds:DigestValue/></ds:Reference></ds:SignedInfo><ds:SignatureValue/>"#,
            r#"<ds:KeyInfo><ds:X509Data><ds:X509Certificate/></ds:X509Data></ds:KeyInfo>"#,
            r#"</ds:Signature></cs:SignNewCertificateResponse>"#
        ),
    );
    let tpl = lab.path("template.xml");
    std::fs::write(&tpl, template).unwrap();
    let keycert = format!(
        "{},{}",
        cur_dir.join("key.pem").display(),
        cur_dir.join("cert.pem").display()
    );
    let theirs = lab.path("theirs.xml");
    // xmlsec1 signs the template in `tpl` with the current key; the signed document's text.
    let sign_with_xmlsec1 = || {
        let (ok, err) = xmlsec1(&[
            "--sign",
            "--privkey-pem",
            &keycert,
            "--output",
            theirs.to_str().unwrap(),
            tpl.to_str().unwrap(),
        ]);
        assert!(ok, "xmlsec1 --sign failed: {err}");
        std::fs::read_to_string(&theirs).unwrap()
    };
    let text = sign_with_xmlsec1();
    let envelope = xml::envelope(
        text.trim_start_matches(|c| c != '>')
            .trim_start_matches('>')
            .trim(),
    );
    let doc = Document::parse(&envelope).unwrap();
    let el = answer::body_element(&doc).unwrap();
    let ca = CertificateDer::from_pem_slice(lab.svc.issuing_ca_pem.as_bytes()).unwrap();
    let signer = dsig::verify_enveloped(&doc, el, &SignerTrust::roots(vec![ca]), UnixTime::now())
        .unwrap_or_else(|e| panic!("xmlsec1's signature refused: {e}\n{text}"));
    assert!(signer.subject.contains(ID));
    assert_eq!(
        answer::read_answer(el, Operation::SignNew)
            .unwrap()
            .retrieval_id
            .as_deref(),
        Some("abc123")
    );

    // Inclusive c14n with only the enveloped transform, as some SOAP stacks sign: checked on
    // the document xmlsec1 signed (inclusive c14n depends on the namespaces in scope).
    let inclusive = std::fs::read_to_string(&tpl)
        .unwrap()
        .replace(
            r#"<ds:CanonicalizationMethod Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/>"#,
            r#"<ds:CanonicalizationMethod Algorithm="http://www.w3.org/TR/2001/REC-xml-c14n-20010315"/>"#,
        )
        .replace(
            r#"<ds:Transform Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/>"#,
            "",
        );
    std::fs::write(&tpl, inclusive).unwrap();
    let text = sign_with_xmlsec1();
    assert!(text.contains("REC-xml-c14n-20010315"));
    let doc = Document::parse(&text).unwrap();
    let ca = CertificateDer::from_pem_slice(lab.svc.issuing_ca_pem.as_bytes()).unwrap();
    dsig::verify_enveloped(
        &doc,
        doc.root_element(),
        &SignerTrust::roots(vec![ca]),
        UnixTime::now(),
    )
    .unwrap_or_else(|e| panic!("xmlsec1's inclusive signature refused: {e}\n{text}"));
}

#[tokio::test]
async fn renewal_per_organisation_into_its_next_directory_and_if_due_for_a_daily_job() {
    let lab = Lab::new(0).await;
    let service_only = |flags: Vec<String>| -> Vec<String> {
        // The service flags without --customer-id and --out (both come from the organisation).
        let mut out = Vec::new();
        let mut it = flags.into_iter();
        while let Some(f) = it.next() {
            if f == "--customer-id" || f == "--out" {
                it.next();
            } else {
                out.push(f);
            }
        }
        out
    };
    // Far from expiry: --if-due does nothing and sends nothing.
    let early = lab.current("early", -10, 200);
    let a = args(
        &[
            "cert",
            "renew",
            "--if-due",
            "--identity-dir",
            early.to_str().unwrap(),
        ],
        lab.service_flags("early-next"),
    );
    let (ok, stdout, stderr) = vero(&a, &[]).await;
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("nothing to do yet"), "{stdout}");
    assert!(lab.svc.received().is_empty());

    // One organisation of an --identities-dir, 30 days left: renewed into ID/next/.
    let root = lab.path("identities");
    let cur = lab.current(&format!("identities/{ID}"), -700, 30);
    let renew = |extra: &[&str]| {
        let mut first = vec![
            "cert",
            "renew",
            "--identities-dir",
            root.to_str().unwrap(),
            "--organisation",
            ID,
        ];
        first.extend_from_slice(extra);
        args(&first, service_only(lab.service_flags("unused")))
    };
    let (ok, stdout, stderr) = vero(&renew(&["--if-due"]), &[]).await;
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    let next = load_dir(&cur.join("next"));
    assert!(next.info.not_after > load_dir(&cur).info.not_after);
    let calls = lab.svc.received().len();
    assert_eq!(lab.svc.received()[0].soap_action, "renewCertificate");

    // The next day's job finds it staged and does nothing.
    let (ok, stdout, _) = vero(&renew(&["--if-due"]), &[]).await;
    assert!(ok);
    assert!(stdout.contains("already staged"), "{stdout}");
    assert_eq!(lab.svc.received().len(), calls);

    // Mistakes are named.
    let (ok, _, stderr) = vero(
        &args(
            &["cert", "renew", "--identities-dir", root.to_str().unwrap()],
            service_only(lab.service_flags("x")),
        ),
        &[],
    )
    .await;
    assert!(!ok && stderr.contains("--organisation"), "{stderr}");
    let (ok, _, stderr) = vero(
        &args(
            &[
                "cert",
                "renew",
                "--identities-dir",
                root.to_str().unwrap(),
                "--organisation",
                "1000000-4",
            ],
            service_only(lab.service_flags("x")),
        ),
        &[],
    )
    .await;
    assert!(!ok && stderr.contains("1000000-4"), "{stderr}");
}

#[tokio::test]
async fn an_unreachable_service_says_nothing_was_sent_and_keeps_no_key() {
    let lab = Lab::new(0).await;
    let a = args(
        &["cert", "request", "--transfer-id", "T1"],
        lab.service_flags("unreachable")
            .into_iter()
            .map(|f| {
                if f == lab.svc.url {
                    "https://127.0.0.1:1/2017/10/CertificateServices".to_string()
                } else {
                    f
                }
            })
            .collect(),
    );
    let (ok, _, stderr) = vero(&a, &[("VERO_PROXY_TRANSFER_PASSWORD", "pw1")]).await;
    assert!(!ok);
    assert!(stderr.contains("nothing was sent"), "{stderr}");
    assert!(!stderr.contains("transfer IDs are used up"), "{stderr}");
    assert!(!lab.path("unreachable").join("key.pem").exists());
}

/// A CONNECT-only HTTP proxy on loopback that records each tunnel's target and opens it.
async fn connect_relay() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let line = String::from_utf8_lossy(&head)
                    .lines()
                    .next()
                    .unwrap()
                    .to_owned();
                let target = line.split(' ').nth(1).unwrap().to_owned();
                record.lock().unwrap().push(line);
                let mut up = tokio::net::TcpStream::connect(target.as_str())
                    .await
                    .unwrap();
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            });
        }
    });
    (url, seen)
}

#[tokio::test]
async fn the_certificate_service_is_reached_through_the_egress_proxy() {
    let lab = Lab::new(0).await;
    let (proxy, seen) = connect_relay().await;
    let service = lab.svc.url.parse::<http::Uri>().unwrap();
    let target = format!(
        "{}:{}",
        service.host().unwrap(),
        service.port_u16().unwrap()
    );
    let a = args(
        &[
            "cert",
            "request",
            "--transfer-id",
            "T1",
            "--egress-proxy",
            &proxy,
        ],
        lab.service_flags("out"),
    );
    let (ok, stdout, stderr) = vero(&a, &[("VERO_PROXY_TRANSFER_PASSWORD", "pw1")]).await;
    assert!(ok, "stdout: {stdout}\nstderr: {stderr}");
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "nothing went through the egress proxy");
    assert!(
        seen.iter()
            .all(|l| *l == format!("CONNECT {target} HTTP/1.1")),
        "{seen:?}"
    );
    load_dir(&lab.path("out"));
}
