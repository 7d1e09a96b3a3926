//! Many organisations through one proxy (`--identities-dir`): the identity chosen per request by
//! header or per-identity socket, errors for missing and unknown organisations, the directory
//! kept in step under load, skipped broken identities, and the per-organisation cap.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::load::Load;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use vero_proxy::business_id::BusinessId;
use vero_proxy::demo::pki::Pair;

const A: &str = "1000000-4";
const B: &str = "1000001-2";
const C: &str = "1000002-0";
const D: &str = "1000003-9";

struct Rig {
    pki: Pki,
    root: PathBuf,
    lab: Arc<Lab>,
    _upstream: vero_proxy::demo::standin::StandIn,
    proxy: vero_proxy::app::Running,
    addr: std::net::SocketAddr,
}

/// Writes an identity directory for `id` (cert.pem + key.pem, renamed into place).
fn write_identity(root: &Path, id: &str, pair: &Pair) {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in [("key.pem", &pair.key_pem), ("cert.pem", &pair.cert_pem)] {
        let tmp = dir.join(format!(".{name}.new"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

fn org_args(pki: &Pki, root: &Path, upstream: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "vero-proxy",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--upstream",
        upstream,
        "--identities-dir",
        root.to_str().unwrap(),
        "--ca-file",
        pki.ca_file.to_str().unwrap(),
        "--reload-debounce",
        "20ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Waits until `done` holds, looking again at each change `rx` announces; panics naming `what`
/// after 15 s.
async fn wait_on(mut rx: tokio::sync::watch::Receiver<u64>, what: &str, done: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(15), async {
        while !done() {
            rx.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: not within 15 s"));
}

impl Rig {
    async fn new(ids: &[&str], extra: &[&str]) -> Rig {
        let pki = Pki::new();
        let root = pki.path("identities");
        std::fs::create_dir_all(&root).unwrap();
        for id in ids {
            write_identity(&root, id, &pki.ca.client(id, "Testi Oy").unwrap());
        }
        let lab = Arc::new(Lab::default());
        let upstream = start_upstream(&pki.ca, &pki.ca, UpstreamSpec::default(), lab.clone()).await;
        let url = format!("https://localhost:{}", upstream.addr.port());
        let proxy = start_proxy(org_args(&pki, &root, &url, extra)).await;
        let addr = tcp_addr(&proxy);
        Rig {
            pki,
            root,
            lab,
            _upstream: upstream,
            proxy,
            addr,
        }
    }

    /// A GET for `org` (None: no header), marked so the upstream's record can be matched.
    fn request(org: Option<&str>, path: &str) -> Request<Full<Bytes>> {
        let mut b = Request::get(path).header("host", "localhost");
        if let Some(o) = org {
            b = b.header("vero-proxy-organisation", o).header("x-want", o);
        }
        b.body(Full::new(Bytes::new())).unwrap()
    }

    async fn get_as(&self, org: Option<&str>, path: &str) -> Answer {
        send(self.addr, Self::request(org, path)).await
    }

    /// Waits until the per-identity sockets are in step and `done` holds.
    async fn wait_sockets(&self, what: &str, done: impl Fn() -> bool) {
        wait_on(self.proxy.sockets_synced.subscribe(), what, done).await;
    }

    /// Waits until the proxy has synced the directory and `done` holds.
    async fn wait_until(&self, what: &str, done: impl Fn() -> bool) {
        wait_on(self.proxy.orgs.subscribe(), what, done).await;
    }

    fn serial_in_service(&self, id: &str) -> Option<String> {
        let id: BusinessId = id.parse().unwrap();
        self.proxy
            .orgs
            .get(&id)
            .map(|o| o.upstream.load().identity.info.serial.clone())
    }
}

fn cn_of(r: &Received) -> String {
    r.seen.client_subject.clone().unwrap_or_default()
}

#[tokio::test]
async fn each_organisation_goes_out_with_its_own_certificate_and_the_header_stays_here() {
    let rig = Rig::new(&[A, B, C], &[]).await;
    for id in [A, B, C, B, A] {
        let a = rig.get_as(Some(id), "/x").await;
        assert_eq!(a.status, 200, "{:?}", a.body);
        let r = rig.lab.last();
        assert!(cn_of(&r).contains(id), "{id}: upstream saw {}", cn_of(&r));
        assert!(r.headers.get("vero-proxy-organisation").is_none());
        assert_eq!(r.headers["x-want"], id);
    }
    // Each organisation has its own pool: three identities, three connections at least.
    let conns: std::collections::HashSet<u64> = rig
        .lab
        .received()
        .iter()
        .map(|r| r.seen.connection)
        .collect();
    assert!(conns.len() >= 3, "{conns:?}");
}

#[tokio::test]
async fn missing_and_unknown_organisations_are_refused_and_nothing_is_forwarded() {
    let rig = Rig::new(&[A, B], &[]).await;
    let a = rig.get_as(None, "/x").await;
    assert_eq!(a.status, 400);
    assert_eq!(a.error_code(), "organisation_required");
    assert!(a.json()["message"]
        .as_str()
        .unwrap()
        .contains("Vero-Proxy-Organisation"));

    let a = rig.get_as(Some(D), "/x").await;
    assert_eq!(a.status, 404);
    assert_eq!(a.error_code(), "organisation_unknown");
    let msg = a.json()["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains(D) && msg.contains("Vero-Proxy-Organisation"),
        "{msg}"
    );

    for bad in ["1000000-5", "not-an-id", ""] {
        let a = rig.get_as(Some(bad), "/x").await;
        assert_eq!(a.status, 404, "{bad}");
        assert_eq!(a.error_code(), "organisation_unknown");
    }
    assert!(rig.lab.received().is_empty(), "something was forwarded");
}

#[tokio::test]
async fn with_one_identity_the_header_is_optional_and_must_match_if_given() {
    let rig = Rig::new(&[A], &[]).await;
    let a = rig.get_as(None, "/x").await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert!(cn_of(&rig.lab.last()).contains(A));
    assert_eq!(rig.get_as(Some(B), "/x").await.status, 404);

    // The single identity of --cert: its CN (1234567-1) is the organisation.
    let s = Setup::new(&[]).await;
    let named = |org: &str| {
        Request::get("/x")
            .header("host", "localhost")
            .header("vero-proxy-organisation", org)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(s.send(named("1234567-1")).await.status, 200);
    let wrong = s.send(named(A)).await;
    assert_eq!(wrong.status, 404);
    assert_eq!(wrong.error_code(), "organisation_unknown");
    assert!(s
        .lab
        .last()
        .headers
        .get("vero-proxy-organisation")
        .is_none());
}

#[tokio::test]
async fn broken_expired_and_misnamed_identities_are_skipped_with_a_report() {
    let pki = Pki::new();
    let root = pki.path("identities");
    std::fs::create_dir_all(&root).unwrap();
    write_identity(&root, A, &pki.ca.client(A, "Hyvä Oy").unwrap());
    let expired = client_for_days(&pki.ca, B, -800, -70);
    write_identity(&root, B, &expired);
    // A key that belongs to another certificate.
    let other = pki.ca.client(C, "Sekava Oy").unwrap();
    let mismatched = Pair {
        cert_pem: other.cert_pem.clone(),
        key_pem: pki.client.key_pem.clone(),
    };
    write_identity(&root, C, &mismatched);
    write_identity(&root, "1000000-5", &pki.ca.client(D, "Väärä").unwrap());
    write_identity(
        &root,
        "not-a-business-id",
        &pki.ca.client(D, "Väärä").unwrap(),
    );
    std::fs::create_dir_all(root.join(D)).unwrap(); // empty

    let lab = Arc::new(Lab::default());
    let upstream = start_upstream(&pki.ca, &pki.ca, UpstreamSpec::default(), lab.clone()).await;
    let url = format!("https://localhost:{}", upstream.addr.port());
    let proxy = start_proxy(org_args(&pki, &root, &url, &[])).await;
    let ids: Vec<String> = proxy
        .orgs
        .all()
        .iter()
        .map(|o| o.id.unwrap().to_string())
        .collect();
    assert_eq!(ids, vec![A.to_string()]);

    let status: serde_json::Value = {
        let admin = proxy.admin_state.clone();
        vero_proxy::admin::status::of(&admin)
    };
    assert_eq!(status["identities"].as_array().unwrap().len(), 1);
    assert_eq!(status["identities"][0]["organisation"], A);

    // The report names each skipped directory and why.
    let parts_report = {
        let provider = vero_proxy::upstream::tls::provider();
        let mut why = std::collections::BTreeMap::new();
        for name in [B, C, D] {
            let src = vero_proxy::orgs::source_in(&root.join(name), None);
            let e = vero_proxy::identity::load(&src, &provider, std::time::SystemTime::now())
                .err()
                .unwrap()
                .to_string();
            why.insert(name, e);
        }
        why
    };
    assert!(parts_report[B].contains("expired"), "{}", parts_report[B]);
    assert!(
        parts_report[C].contains("does not match") || parts_report[C].contains("match"),
        "{}",
        parts_report[C]
    );
    assert!(parts_report[D].contains(D), "{}", parts_report[D]);
    let addr = tcp_addr(&proxy);
    let a = send(addr, Rig::request(Some(A), "/x")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let b = send(addr, Rig::request(Some(B), "/x")).await;
    assert_eq!(b.status, 404);
    assert_eq!(lab.received().len(), 1);

    // Fixing a skipped identity puts it into service.
    write_identity(&root, B, &pki.ca.client(B, "Uusi Oy").unwrap());
    let mut rx = proxy.orgs.subscribe();
    tokio::time::timeout(Duration::from_secs(15), async {
        while proxy.orgs.get(&B.parse().unwrap()).is_none() {
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the repaired identity was not loaded");
    assert_eq!(send(addr, Rig::request(Some(B), "/x")).await.status, 200);
}

#[tokio::test]
async fn adding_replacing_and_removing_identities_under_mixed_load_loses_nothing() {
    let rig = Rig::new(&[A, B, C], &[]).await;
    // Eight keep-alive clients, the even ones for A and the odd ones for B, for the whole test.
    let load = Load::start(rig.addr, 8, |i, _| {
        Rig::request(Some(if i % 2 == 0 { A } else { B }), "/x")
    });
    load.progress(200).await;

    // Add D.
    write_identity(&rig.root, D, &rig.pki.ca.client(D, "Uusi Oy").unwrap());
    rig.wait_until("D loaded", || rig.serial_in_service(D).is_some())
        .await;
    let d = rig.get_as(Some(D), "/x").await;
    assert_eq!(d.status, 200, "{:?}", d.body);
    load.progress(200).await;

    // Replace A (the organisation under load).
    let old_a = rig.serial_in_service(A).unwrap();
    let next = rig.pki.ca.client(A, "Testi Oy").unwrap();
    write_identity(&rig.root, A, &next);
    rig.wait_until("A replaced", || {
        rig.serial_in_service(A).as_deref() != Some(&old_a)
    })
    .await;
    let new_a = rig.serial_in_service(A).unwrap();
    load.progress(200).await;

    // Remove C.
    std::fs::remove_dir_all(rig.root.join(C)).unwrap();
    rig.wait_until("C retired", || rig.serial_in_service(C).is_none())
        .await;
    let c = rig.get_as(Some(C), "/x").await;
    assert_eq!(c.status, 404);
    assert_eq!(c.error_code(), "organisation_unknown");
    load.progress(200).await;

    let (served, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // Every request went out with its own organisation's certificate, and A's new one was used.
    let received = rig.lab.received();
    for r in &received {
        if let Some(want) = r.headers.get("x-want") {
            let want = want.to_str().unwrap();
            assert!(
                cn_of(r).contains(want),
                "asked for {want}, sent {}",
                cn_of(r)
            );
        }
    }
    let serials_a: std::collections::HashSet<String> = received
        .iter()
        .filter(|r| r.headers.get("x-want").is_some_and(|w| w == A))
        .filter_map(|r| r.seen.client_serial.clone())
        .collect();
    assert!(
        serials_a.len() >= 2,
        "A's requests never used the new certificate: {serials_a:?}"
    );
    println!("{served} requests served, 0 failed; A's serial {old_a} -> {new_a}");
}

#[tokio::test]
async fn per_identity_sockets_always_use_their_identity_and_follow_the_directory() {
    let sockets = tempfile::tempdir().unwrap();
    let template = format!("unix:{}/{{id}}.sock", sockets.path().display());
    let gid = nix::unistd::getegid().as_raw().to_string();
    let rig = Rig::new(
        &[A, B],
        &[
            "--listen-per-identity",
            &template,
            "--listen-per-identity-group",
            &gid,
        ],
    )
    .await;
    let path_of = |id: &str| sockets.path().join(format!("{id}.sock"));
    assert!(
        path_of(A).exists() && path_of(B).exists(),
        "sockets not there at start"
    );
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path_of(A)).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.gid().to_string(), gid);

    // On A's socket, a header naming B is ignored: the socket decides.
    let a = send_unix(&path_of(A), Rig::request(Some(B), "/x")).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert!(cn_of(&rig.lab.last()).contains(A));
    let b = send_unix(&path_of(B), Rig::request(None, "/x")).await;
    assert_eq!(b.status, 200);
    assert!(cn_of(&rig.lab.last()).contains(B));

    // A new identity gets its socket; a retired one loses it.
    write_identity(&rig.root, C, &rig.pki.ca.client(C, "Kolmas Oy").unwrap());
    rig.wait_sockets("C's socket", || path_of(C).exists()).await;
    let c = send_unix(&path_of(C), Rig::request(None, "/x")).await;
    assert_eq!(c.status, 200);
    assert!(cn_of(&rig.lab.last()).contains(C));
    std::fs::remove_dir_all(rig.root.join(B)).unwrap();
    rig.wait_sockets("B's socket removed", || !path_of(B).exists())
        .await;
    assert!(rig.serial_in_service(B).is_none());
}

async fn send_unix(path: &Path, req: Request<Full<Bytes>>) -> Answer {
    let s = tokio::net::UnixStream::connect(path).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = tokio::time::timeout(Duration::from_secs(30), tx.send_request(req))
        .await
        .expect("no answer")
        .unwrap();
    let (parts, body) = resp.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
        trailers: None,
    }
}

#[tokio::test]
async fn one_busy_organisation_cannot_take_every_place() {
    let rig = Arc::new(
        Rig::new(
            &[A, B],
            &[
                "--max-upstream-concurrency",
                "4",
                "--max-upstream-concurrency-per-organisation",
                "2",
            ],
        )
        .await,
    );
    // Four requests of A: two reach the upstream and block there, two wait in A's own queue.
    let mut a_requests = Vec::new();
    for _ in 0..4 {
        let rig = rig.clone();
        a_requests.push(tokio::spawn(
            async move { rig.get_as(Some(A), "/block").await },
        ));
    }
    rig.lab.wait_blocked(2).await;
    let a_org = rig.proxy.orgs.get(&A.parse().unwrap()).unwrap();
    let a_limiter = a_org.limiter.clone().expect("A has its own cap");
    tokio::time::timeout(Duration::from_secs(10), async {
        while a_limiter.queued() < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("A's other two requests never queued");
    // B still gets through at once.
    let b = tokio::time::timeout(Duration::from_secs(10), rig.get_as(Some(B), "/x"))
        .await
        .expect("B was starved by A");
    assert_eq!(b.status, 200);
    assert_eq!(
        rig.lab.blocked.load(Ordering::SeqCst),
        2,
        "A went past its cap"
    );
    rig.lab.gate.add_permits(4);
    for r in a_requests {
        assert_eq!(r.await.unwrap().status, 200);
    }
}

#[tokio::test]
async fn status_and_metrics_name_every_organisation() {
    let rig = Rig::new(&[A, B], &[]).await;
    let admin = rig.proxy.admin;
    let status = send(admin, get("/status")).await.json();
    let orgs: Vec<&str> = status["identities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["organisation"].as_str().unwrap())
        .collect();
    assert_eq!(orgs, vec![A, B]);
    assert!(status["identities"][0]["days_left"].as_i64().unwrap() > 700);
    assert_eq!(status["identities"][1]["renewal_state"], "ok");
    let metrics = String::from_utf8(send(admin, get("/metrics")).await.body.to_vec()).unwrap();
    for id in [A, B] {
        assert!(
            metrics.contains(&format!(
                "vero_proxy_identity_not_after_timestamp_seconds{{organisation=\"{id}\"}}"
            )),
            "{metrics}"
        );
    }
    let page = String::from_utf8(send(admin, get("/")).await.body.to_vec()).unwrap();
    assert!(page.contains("2 identities") && page.contains(A) && page.contains(B));
}

#[tokio::test]
async fn check_reports_every_identity_in_the_directory() {
    let pki = Pki::new();
    let root = pki.path("identities");
    write_identity(&root, A, &pki.ca.client(A, "Hyvä Oy").unwrap());
    let expired = client_for_days(&pki.ca, B, -800, -1);
    write_identity(&root, B, &expired);
    let run = |dir: PathBuf| async move {
        let dir = dir.display().to_string();
        process::run_to_end(&["check", "--upstream", "test", "--identities-dir", &dir]).await
    };
    let (ok, out) = run(root.clone()).await;
    assert!(!ok, "an expired identity must fail the check:\n{out}");
    assert!(
        out.contains(&format!("{A}:")) && out.contains(&format!("{B}:")),
        "{out}"
    );
    assert!(out.contains("expired"), "{out}");
    std::fs::remove_dir_all(root.join(B)).unwrap();
    let (ok, out) = run(root.clone()).await;
    assert!(ok, "{out}");
    let (ok, out) = run(root.join("missing")).await;
    assert!(!ok && out.contains("missing"), "{out}");
}

#[tokio::test]
async fn each_organisation_takes_its_renewed_identity_from_its_next_directory() {
    // A 30 s activation delay has passed for a certificate valid from a minute ago.
    let rig = Rig::new(&[A, B], &["--activation-delay", "30s"]).await;
    let old_b = rig.serial_in_service(B).unwrap();
    let old_a = rig.serial_in_service(A).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let renewed = rig
        .pki
        .ca
        .client_valid(
            A,
            "Testi Oy",
            now - time::Duration::minutes(1),
            now + time::Duration::days(800),
            rcgen::KeyPair::generate().unwrap(),
        )
        .unwrap();
    write_identity(&rig.root.join(A), "next", &renewed);
    rig.wait_until("A's renewed identity", || {
        rig.serial_in_service(A).as_deref() != Some(old_a.as_str())
    })
    .await;
    let a = rig.get_as(Some(A), "/x").await;
    assert_eq!(a.status, 200);
    let org_a = rig.proxy.orgs.get(&A.parse().unwrap()).unwrap();
    let state = org_a.staged.as_ref().unwrap().state();
    assert_eq!(state.phase, vero_proxy::staged::Phase::Active, "{state:?}");
    assert_eq!(rig.serial_in_service(B).unwrap(), old_b, "B was touched");
}

#[tokio::test]
async fn a_directory_holding_another_organisations_certificate_is_never_used_for_it() {
    let pki = Pki::new();
    let root = pki.path("identities");
    write_identity(&root, A, &pki.ca.client(A, "Oikea Oy").unwrap());
    // B's directory holds C's certificate.
    write_identity(&root, B, &pki.ca.client(C, "Väärä Oy").unwrap());
    let lab = Arc::new(Lab::default());
    let upstream = start_upstream(&pki.ca, &pki.ca, UpstreamSpec::default(), lab.clone()).await;
    let url = format!("https://localhost:{}", upstream.addr.port());
    let proxy = start_proxy(org_args(&pki, &root, &url, &[])).await;
    let addr = tcp_addr(&proxy);
    let b = send(addr, Rig::request(Some(B), "/x")).await;
    assert_eq!(b.status, 404);
    let msg = b.json()["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("was not loaded") && msg.contains(C), "{msg}");
    assert!(
        !msg.contains(root.to_str().unwrap()),
        "the answer shows a server path: {msg}"
    );

    // At run time: A's files replaced by C's certificate are refused; A's own stays in service.
    let before = proxy.orgs.get(&A.parse().unwrap()).unwrap();
    let serial = before.upstream.load().identity.info.serial.clone();
    write_identity(&root, A, &pki.ca.client(C, "Väärä Oy").unwrap());
    let outcome = before.reloader.reload("test").await;
    assert!(
        matches!(&outcome, vero_proxy::reload::Outcome::Failed(e) if e.contains(C)),
        "{outcome:?}"
    );
    assert_eq!(before.upstream.load().identity.info.serial, serial);
    let a = send(addr, Rig::request(Some(A), "/x")).await;
    assert_eq!(a.status, 200);
    assert!(cn_of(&lab.last()).contains(A));
    assert!(lab.received().iter().all(|r| !cn_of(r).contains(C)));
}

#[tokio::test]
async fn the_organisation_header_twice_is_refused() {
    let rig = Rig::new(&[A, B], &[]).await;
    let req = Request::get("/x")
        .header("host", "localhost")
        .header("vero-proxy-organisation", A)
        .header("vero-proxy-organisation", B)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = send(rig.addr, req).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.error_code(), "organisation_required");
    assert!(rig.lab.received().is_empty());
}
