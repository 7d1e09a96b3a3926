//! Staged activation of a next identity: it waits while Vero API refuses it (403 on the probe),
//! goes into service once accepted, or when the current certificate nears expiry, with zero
//! failed requests meanwhile; an older next identity is left alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::load::Load;
use common::*;
use time::OffsetDateTime;
use vero_proxy::demo::pki::Pair;
use vero_proxy::demo::standin::{self, Handler};
use vero_proxy::staged::{Phase, Staged};

/// An upstream that records like the lab, and answers `/probe` with 403 to the certificate
/// whose serial is in `refused` (Vero API before its daily fetch of a renewed certificate).
struct Rig {
    pki: Pki,
    next_dir: PathBuf,
    lab: Arc<Lab>,
    refused: Arc<Mutex<Option<String>>>,
    _upstream: standin::StandIn,
    proxy: vero_proxy::app::Running,
    addr: std::net::SocketAddr,
}

fn serial_of(pair: &Pair) -> String {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pair.cert_pem.as_bytes()).unwrap();
    vero_proxy::identity::load::describe(Path::new("x"), &[der])
        .unwrap()
        .serial
}

/// Serials as the upstream reports them (colon-separated hex, lower case).
fn colon_hex(serial: &str) -> String {
    serial.to_ascii_lowercase()
}

fn write_pair(dir: &Path, pair: &Pair) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, text) in [("key.pem", &pair.key_pem), ("cert.pem", &pair.cert_pem)] {
        let tmp = dir.join(format!(".{name}.new"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

impl Rig {
    /// A proxy whose current certificate has `days_left` (None: the test PKI's, two years).
    async fn new(days_left: Option<i64>, extra: &[&str]) -> Rig {
        let mut pki = Pki::new();
        if let Some(days) = days_left {
            let c = client_for_days(&pki.ca, "1234567-1", -700, days);
            std::fs::write(&pki.cert, &c.cert_pem).unwrap();
            std::fs::write(&pki.key, &c.key_pem).unwrap();
            pki.client = c;
        }
        let next_dir = pki.path("next");
        std::fs::create_dir_all(&next_dir).unwrap();
        let lab = Arc::new(Lab::default());
        let refused: Arc<Mutex<Option<String>>> = Arc::default();
        let inner = lab_handler(lab.clone());
        let refused_by = refused.clone();
        let handler: Handler = Arc::new(move |seen: standin::Seen, req| {
            let refuse = req.uri().path() == "/probe"
                && refused_by
                    .lock()
                    .unwrap()
                    .as_deref()
                    .map(colon_hex)
                    .as_deref()
                    == seen
                        .client_serial
                        .as_deref()
                        .map(str::to_ascii_lowercase)
                        .as_deref();
            if refuse {
                return Box::pin(async {
                    let mut r = http::Response::new(standin::full(Bytes::from_static(
                        b"{\"error\":\"certificate not known yet\"}",
                    )));
                    *r.status_mut() = http::StatusCode::FORBIDDEN;
                    r
                });
            }
            inner(seen, req)
        });
        let server = pki.ca.server(&["localhost"]).unwrap();
        let cfg =
            standin::server_config(&server, &[&pki.ca.ca_pem], &[b"h2", b"http/1.1"]).unwrap();
        let upstream = standin::start(cfg, handler).await.unwrap();
        let url = format!("https://localhost:{}", upstream.addr.port());
        let mut flags = vec!["--next-identity-dir", next_dir.to_str().unwrap()];
        if !extra.contains(&"--probe-path") {
            flags.extend_from_slice(&["--probe-path", "/probe"]);
        }
        flags.extend_from_slice(&[
            "--activation-check-interval",
            "50ms",
            "--reload-debounce",
            "20ms",
        ]);
        flags.extend_from_slice(extra);
        let proxy = start_proxy(proxy_args(&pki, &url, &flags)).await;
        let addr = tcp_addr(&proxy);
        Rig {
            pki,
            next_dir,
            lab,
            refused,
            _upstream: upstream,
            proxy,
            addr,
        }
    }

    fn staged(&self) -> Arc<Staged> {
        self.proxy.orgs.only().unwrap().staged.clone().unwrap()
    }

    async fn wait_phase(&self, phase: Phase, containing: &str) -> String {
        wait_phase(&self.staged(), phase, containing).await.reason
    }

    fn serial_in_service(&self) -> String {
        let org = self.proxy.orgs.only().unwrap();
        let up = org.upstream.load();
        up.identity.info.serial.clone()
    }
}

/// A renewed certificate as the service issues it: valid from now, for two years.
fn renewed(pki: &Pki) -> Pair {
    let now = OffsetDateTime::now_utc();
    pki.ca
        .client_valid(
            "1234567-1",
            "Testi Oy",
            now - time::Duration::minutes(1),
            now + time::Duration::days(730),
            rcgen::KeyPair::generate().unwrap(),
        )
        .unwrap()
}

/// Waits until the staged identity is in `phase` with a reason containing `containing`.
async fn wait_phase(
    staged: &Arc<Staged>,
    phase: Phase,
    containing: &str,
) -> vero_proxy::staged::StagedState {
    let mut rx = staged.subscribe();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let st = staged.state();
            if st.phase == phase && st.reason.contains(containing) {
                return st;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never {phase:?} with {containing:?}: {:?}", staged.state()))
}

/// Stops the load: no request of it failed, and the last request went out with `serial`; the
/// count served.
async fn finish_on(lab: &Lab, load: Load, serial: &str) -> u64 {
    let (served, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} of {served} failed: {failures:?}",
        failures.len()
    );
    let last = lab.received().last().cloned().unwrap();
    assert_eq!(
        last.seen.client_serial.unwrap().to_ascii_lowercase(),
        colon_hex(serial)
    );
    served
}

#[tokio::test]
async fn a_staged_identity_waits_while_refused_then_goes_into_service_without_a_failed_request() {
    let rig = Rig::new(Some(50), &[]).await;
    let current = serial_of(&rig.pki.client);
    rig.wait_phase(Phase::None, "no next identity").await;
    let load = Load::start(rig.addr, 4, |_, _| get("/x"));
    load.progress(100).await;

    let next = renewed(&rig.pki);
    *rig.refused.lock().unwrap() = Some(serial_of(&next));
    write_pair(&rig.next_dir, &next);
    let why = rig.wait_phase(Phase::Waiting, "403").await;
    assert!(why.contains("does not accept it yet"), "{why}");
    load.progress(100).await;
    assert_eq!(rig.serial_in_service(), current, "activated while refused");

    // Vero API has fetched it: the probe passes and the next look puts it into service.
    *rig.refused.lock().unwrap() = None;
    let why = rig.wait_phase(Phase::Active, "in service").await;
    assert!(why.contains("accepted"), "{why}");
    assert_eq!(rig.serial_in_service(), serial_of(&next));
    load.progress(200).await;
    finish_on(&rig.lab, load, &serial_of(&next)).await;

    // A reload of the (unchanged) current files keeps the newer identity in service.
    rig.proxy.orgs.reload_all("test").await;
    assert_eq!(rig.serial_in_service(), serial_of(&next));
    let status = vero_proxy::admin::status::of(&rig.proxy.admin_state);
    assert_eq!(status["identity"]["next"]["phase"], "active", "{status}");
}

#[tokio::test]
async fn near_expiry_the_staged_identity_goes_into_service_even_while_refused() {
    let rig = Rig::new(Some(3), &["--activation-margin", "7d"]).await;
    assert_eq!(rig.serial_in_service(), serial_of(&rig.pki.client));

    let next = renewed(&rig.pki);
    *rig.refused.lock().unwrap() = Some(serial_of(&next));
    write_pair(&rig.next_dir, &next);
    let why = rig.wait_phase(Phase::Active, "activation-margin").await;
    assert!(why.contains("in service"), "{why}");
    assert_eq!(rig.serial_in_service(), serial_of(&next));
}

#[tokio::test]
async fn an_older_or_broken_next_identity_is_left_alone() {
    let rig = Rig::new(None, &[]).await;
    let current = serial_of(&rig.pki.client);
    let older = client_for_days(&rig.pki.ca, "1234567-1", -10, 100);
    write_pair(&rig.next_dir, &older);
    let why = rig.wait_phase(Phase::Rejected, "not later than").await;
    assert!(why.contains("left alone"), "{why}");
    std::fs::write(rig.next_dir.join("key.pem"), "not a key").unwrap();
    rig.wait_phase(Phase::Rejected, "key").await;
    assert_eq!(rig.serial_in_service(), current);
    let a = send(rig.addr, get("/x")).await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn after_the_activation_delay_the_staged_identity_goes_into_service_even_while_refused() {
    // Its notBefore was a minute ago; a 30 s delay has passed.
    let rig = Rig::new(Some(300), &["--activation-delay", "30s"]).await;
    let next = renewed(&rig.pki);
    *rig.refused.lock().unwrap() = Some(serial_of(&next));
    write_pair(&rig.next_dir, &next);
    let why = rig.wait_phase(Phase::Active, "activation-delay").await;
    assert!(why.contains("in service"), "{why}");
    assert_eq!(rig.serial_in_service(), serial_of(&next));
}

/// A proxy with --auto-renew against a stand-in certificate service, and an upstream (Vero
/// API) that accepts the service's certificates but refuses a renewed one on /probe until
/// `fetched`. The current certificate has 30 days left.
struct AutoRig {
    svc: vero_proxy::certsvc::standin::CertService,
    _pki: Pki,
    lab: Arc<Lab>,
    fetched: Arc<AtomicBool>,
    _upstream: standin::StandIn,
    proxy: vero_proxy::app::Running,
    addr: std::net::SocketAddr,
    current_serial: String,
    next_dir: PathBuf,
}

async fn auto_rig(fail: Option<vero_proxy::certsvc::answer::ErrorInfo>) -> AutoRig {
    use vero_proxy::certsvc::standin::{CertService, Settings};
    const ID: &str = "0245437-2";
    let svc = CertService::start(Settings::default()).await.unwrap();
    let pki = Pki::new();
    let now = OffsetDateTime::now_utc();
    let current = svc
        .issue_current(
            ID,
            now - time::Duration::days(700),
            now + time::Duration::days(30),
        )
        .unwrap();
    std::fs::write(&pki.cert, &current.cert_pem).unwrap();
    std::fs::write(&pki.key, &current.key_pem).unwrap();
    for (name, pem) in [
        ("tls-ca.pem", &svc.tls_ca_pem),
        ("signer-ca.pem", &svc.signer_root_pem),
    ] {
        std::fs::write(pki.path(name), pem).unwrap();
    }
    let current_serial = serial_of(&current);

    // Vero API: accepts client certificates of the service's issuing CA; refuses the renewed one
    // on /probe until `fetched` (its daily fetch from the certificate service).
    let lab = Arc::new(Lab::default());
    let fetched = Arc::new(AtomicBool::new(false));
    let inner = lab_handler(lab.clone());
    let (fetched_by, current_by) = (fetched.clone(), colon_hex(&current_serial));
    let handler: Handler = Arc::new(move |seen: standin::Seen, req| {
        let renewed =
            seen.client_serial.as_deref().map(str::to_ascii_lowercase) != Some(current_by.clone());
        if req.uri().path() == "/probe" && renewed && !fetched_by.load(Ordering::SeqCst) {
            return Box::pin(async {
                let mut r = http::Response::new(standin::full(Bytes::from_static(b"{}")));
                *r.status_mut() = http::StatusCode::FORBIDDEN;
                r
            });
        }
        inner(seen, req)
    });
    let server = pki.ca.server(&["localhost"]).unwrap();
    let cfg =
        standin::server_config(&server, &[&svc.issuing_ca_pem], &[b"h2", b"http/1.1"]).unwrap();
    let upstream = standin::start(cfg, handler).await.unwrap();
    let url = format!("https://localhost:{}", upstream.addr.port());
    let next_dir = pki.path("state/next");
    let (tls_ca, signer_ca) = (pki.path("tls-ca.pem"), pki.path("signer-ca.pem"));
    let flags = [
        "--next-identity-dir",
        next_dir.to_str().unwrap(),
        "--probe-path",
        "/probe",
        "--activation-check-interval",
        "50ms",
        "--auto-renew",
        "--renew-days-before",
        "60",
        "--renew-environment",
        "test",
        "--renew-service-url",
        &svc.url,
        "--renew-service-ca-file",
        tls_ca.to_str().unwrap(),
        "--renew-service-signer-ca",
        signer_ca.to_str().unwrap(),
    ];
    svc.fail_with(fail);
    let proxy = start_proxy(proxy_args(&pki, &url, &flags)).await;
    let addr = tcp_addr(&proxy);
    AutoRig {
        svc,
        _pki: pki,
        lab,
        fetched,
        _upstream: upstream,
        proxy,
        addr,
        current_serial,
        next_dir,
    }
}

impl AutoRig {
    /// Renewal requests the stand-in certificate service has received.
    fn renewals(&self) -> usize {
        self.svc
            .received()
            .iter()
            .filter(|r| r.soap_action == "renewCertificate")
            .count()
    }

    async fn wait(&self, phase: Phase, containing: &str) -> vero_proxy::staged::StagedState {
        let staged = self.proxy.orgs.only().unwrap().staged.clone().unwrap();
        wait_phase(&staged, phase, containing).await
    }
}

/// The whole renewal, automatic: the proxy renews through the (stand-in) certificate service
/// when the window opens, stages the new pair, waits while Vero API refuses it, and puts it into
/// service once accepted, while applications keep sending requests: none fails.
#[tokio::test]
async fn auto_renewal_then_staged_activation_under_traffic_loses_nothing() {
    let rig = auto_rig(None).await;
    let load = Load::start(rig.addr, 4, |_, _| get("/x"));
    load.progress(50).await;

    let waiting = rig.wait(Phase::Waiting, "403").await;
    let renewal = waiting.renewal.clone().expect("no renewal recorded");
    assert_eq!(renewal.result, "ok", "{renewal:?}");
    let renewed_serial = waiting.serial.clone().unwrap();
    assert_ne!(renewed_serial, rig.current_serial);
    let ops: Vec<String> = rig
        .svc
        .received()
        .iter()
        .map(|r| r.soap_action.clone())
        .collect();
    assert_eq!(
        ops.first().map(String::as_str),
        Some("renewCertificate"),
        "{ops:?}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(rig.next_dir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    load.progress(100).await;
    assert_eq!(
        rig.proxy.in_service().unwrap().identity.info.serial,
        rig.current_serial,
        "activated while Vero API refused it"
    );

    rig.fetched.store(true, Ordering::SeqCst);
    rig.wait(Phase::Active, "accepted").await;
    assert_eq!(
        rig.proxy.in_service().unwrap().identity.info.serial,
        renewed_serial
    );
    load.progress(100).await;
    let served = finish_on(&rig.lab, load, &renewed_serial).await;
    // Renewed once, not again now that a newer identity is in service.
    assert_eq!(rig.renewals(), 1);
    let metrics = send(rig.proxy.admin, get("/metrics")).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("vero_proxy_renewals_total{result=\"ok\"} 1"),
        "{text}"
    );
    println!("{served} requests served during renewal and activation, 0 failed");
}

#[tokio::test]
async fn a_failed_auto_renewal_shows_the_services_words_and_keeps_serving() {
    let rig = auto_rig(Some(vero_proxy::certsvc::answer::ErrorInfo {
        code: "RENEWAL_DENIED".into(),
        message: "Renewal is not allowed for this customer.".into(),
    }))
    .await;
    let staged = rig.proxy.orgs.only().unwrap().staged.clone().unwrap();
    let mut rx = staged.subscribe();
    let attempt = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(r) = staged.state().renewal {
                return r;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("no renewal attempt recorded");
    assert_eq!(attempt.result, "failed");
    assert!(
        attempt
            .message
            .contains("Renewal is not allowed for this customer."),
        "{attempt:?}"
    );
    assert!(attempt.retry_at.is_some());
    // Nothing staged, the current identity serves on.
    assert_eq!(staged.state().phase, Phase::None);
    assert!(
        !rig.next_dir.join("key.pem").exists(),
        "a refused renewal's key was left behind"
    );
    let a = send(rig.addr, get("/x")).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        rig.proxy.in_service().unwrap().identity.info.serial,
        rig.current_serial
    );
    let status = vero_proxy::admin::status::of(&rig.proxy.admin_state);
    assert_eq!(
        status["identity"]["next"]["renewal"]["result"], "failed",
        "{status}"
    );
    let metrics = send(rig.proxy.admin, get("/metrics")).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("vero_proxy_renewals_total{result=\"failed\"} 1"),
        "{text}"
    );
    // Not tried again before the pause is over.
    rx.changed().await.unwrap();
    rx.changed().await.unwrap();
    assert_eq!(rig.renewals(), 1);
}

#[tokio::test]
async fn another_organisations_certificate_is_never_activated() {
    let rig = Rig::new(Some(300), &["--activation-delay", "30s"]).await;
    let current = rig.serial_in_service();
    // Newer, accepted by the upstream, past the activation delay: but CN 0245458-3, not 1234567-1.
    let other = client_for_days(&rig.pki.ca, "0245458-3", 0, 800);
    write_pair(&rig.next_dir, &other);
    let why = rig.wait_phase(Phase::Rejected, "not 1234567-1's").await;
    assert!(why.contains("0245458-3"), "{why}");
    assert_eq!(rig.serial_in_service(), current);
}

#[tokio::test]
async fn a_probe_answered_400_or_500_is_not_acceptance() {
    let rig = Rig::new(Some(300), &["--probe-path", "/status/400"]).await;
    let next = renewed(&rig.pki);
    write_pair(&rig.next_dir, &next);
    rig.wait_phase(Phase::Waiting, "answered 400").await;
    let rig = Rig::new(Some(300), &["--probe-path", "/status/503"]).await;
    let next = renewed(&rig.pki);
    write_pair(&rig.next_dir, &next);
    rig.wait_phase(Phase::Waiting, "proves nothing").await;
    assert_ne!(rig.serial_in_service(), serial_of(&next));
}

#[tokio::test]
async fn removing_an_activated_next_identity_goes_back_to_the_files() {
    let rig = Rig::new(Some(300), &["--activation-delay", "30s"]).await;
    let current = rig.serial_in_service();
    let next = renewed(&rig.pki);
    write_pair(&rig.next_dir, &next);
    rig.wait_phase(Phase::Active, "in service").await;
    assert_eq!(rig.serial_in_service(), serial_of(&next));
    for f in ["cert.pem", "key.pem"] {
        std::fs::remove_file(rig.next_dir.join(f)).unwrap();
    }
    rig.wait_phase(Phase::None, "no next identity").await;
    assert_eq!(rig.serial_in_service(), current);
    assert_eq!(send(rig.addr, get("/x")).await.status, 200);
}

#[tokio::test]
async fn auto_renew_without_a_writable_directory_refuses_to_start() {
    use clap::Parser;
    let pki = Pki::new();
    let not_a_dir = pki.ca_file.to_str().unwrap().to_owned();
    let args = proxy_args(
        &pki,
        "https://localhost:1",
        &[
            "--next-identity-dir",
            &not_a_dir,
            "--auto-renew",
            "--renew-environment",
            "test",
        ],
    );
    let cli = vero_proxy::cli::Cli::try_parse_from(args).unwrap();
    let cfg = vero_proxy::config::Config::from_args(&cli.run).unwrap();
    let err = match vero_proxy::app::start(cfg).await {
        Ok(_) => panic!("started with an unusable --next-identity-dir"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("not a directory") && err.contains(&not_a_dir),
        "{err}"
    );
}

#[tokio::test]
async fn polling_after_an_activation_reloads_nothing() {
    let rig = Rig::new(Some(300), &["--activation-delay", "30s"]).await;
    let next = renewed(&rig.pki);
    write_pair(&rig.next_dir, &next);
    rig.wait_phase(Phase::Active, "in service").await;
    let reloader = rig.proxy.reloader().unwrap();
    let count = |r: &vero_proxy::reload::Reloader| {
        (
            r.stats.reloaded.load(Ordering::SeqCst),
            r.stats.unchanged.load(Ordering::SeqCst),
        )
    };
    let before = count(&reloader);
    // The files have not changed since they were last loaded: a poll has nothing to do.
    for _ in 0..10 {
        rig.proxy.orgs.poll_as("poll").await;
    }
    assert_eq!(count(&reloader), before);
    assert_eq!(rig.serial_in_service(), serial_of(&next));
}
