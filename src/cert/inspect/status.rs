//! A running proxy's admin `/status` -> [`Inspected`]: the identity in service (and a staged
//! next one, when the proxy reports it). Plain HTTP to a loopback address only: the admin
//! listener answers /status only to loopback peers, and nothing here should leave the machine.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};

use super::facts::{CertFacts, Inspected};
use crate::identity::CertInfo;

const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BODY: usize = 1 << 20;

/// Whether an input names a URL rather than a file.
pub fn is_url(input: &str) -> bool {
    input.starts_with("http://") || input.starts_with("https://")
}

/// Fetches and reads `/status`.
pub async fn inspect(url: &str) -> Inspected {
    match fetch(url).await.and_then(|v| from_status(url, &v)) {
        Ok(i) => i,
        Err(e) => Inspected::failed(url, "status", e),
    }
}

async fn fetch(url: &str) -> Result<serde_json::Value, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{url} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{url}: only http:// to the proxy's admin listener on a loopback address is supported"
        ));
    }
    let host = uri.host().unwrap_or_default();
    let ip: IpAddr = match host.trim_matches(['[', ']']) {
        "localhost" => IpAddr::from([127, 0, 0, 1]),
        h => h
            .parse()
            .map_err(|_| format!("{url}: give a loopback address such as 127.0.0.1, not {host}"))?,
    };
    if !ip.is_loopback() {
        return Err(format!(
            "{url}: {ip} is not a loopback address; the admin listener serves /status to loopback \
             peers only (use kubectl port-forward or ssh -L to reach a remote proxy)"
        ));
    }
    let addr = SocketAddr::new(ip, uri.port_u16().unwrap_or(80));
    let path = match uri.path() {
        "" | "/" => "/status",
        p => p,
    };
    let body = tokio::time::timeout(TIMEOUT, get(addr, host, path))
        .await
        .map_err(|_| format!("{url}: no answer within {}s", TIMEOUT.as_secs()))?
        .map_err(|e| format!("{url}: {e}"))?;
    serde_json::from_slice(&body).map_err(|e| {
        format!("{url} did not answer with the proxy's status JSON ({e}); is it a vero-proxy admin listener?")
    })
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<Bytes, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
        format!("cannot connect to {addr}: {e} (is the proxy running, with --admin-listen {addr}?)")
    })?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("answered {status}"));
    }
    Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| format!("reading the answer: {e}"))
}

fn from_status(url: &str, v: &serde_json::Value) -> Result<Inspected, String> {
    let mut out = Inspected {
        input: url.to_string(),
        kind: "status",
        ..Default::default()
    };
    let ident = v.get("identity").filter(|i| i.is_object()).ok_or_else(|| {
        format!("{url}: the answer has no \"identity\"; is it a vero-proxy /status?")
    })?;
    let s = |o: &serde_json::Value, k: &str| o.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    // With --identities-dir the proxy lists one identity per organisation; `identity` is then
    // only the one that expires first.
    let all: Vec<&serde_json::Value> = match v.get("identities").and_then(|x| x.as_array()) {
        Some(list) if list.len() > 1 => list.iter().collect(),
        _ => vec![ident],
    };
    for id in &all {
        let mut f = facts(url, id, "leaf")?;
        f.organisation = s(id, "organisation");
        let whose = f
            .organisation
            .as_ref()
            .map(|o| format!("{o}: "))
            .unwrap_or_default();
        out.certs.push(f);
        if let Some(src) = s(id, "source") {
            out.notes
                .push(format!("{whose}identity in service loaded from {src}"));
        }
        if let Some(n) = id.get("chain_certificates").and_then(|x| x.as_u64()) {
            out.notes.push(format!(
                "{whose}chain: {n} certificate(s) sent after the leaf"
            ));
        }
    }
    // A staged next identity, per identity in service (`next`, with its phase and reason).
    for id in &all {
        if let Some(next) = id
            .get("next")
            .filter(|n| n.get("not_after").is_some_and(|t| t.is_string()))
        {
            let mut f = facts(url, next, "next")?;
            f.organisation = s(id, "organisation");
            if let (Some(phase), Some(reason)) = (s(next, "phase"), s(next, "reason")) {
                out.notes.push(format!("next identity {phase}: {reason}"));
            }
            out.certs.push(f);
        }
    }
    if let (Some(ver), Some(up)) = (s(v, "version"), s(v, "upstream")) {
        out.notes.push(format!("vero-proxy {ver}, upstream {up}"));
    }
    Ok(out)
}

fn facts(url: &str, o: &serde_json::Value, role: &'static str) -> Result<CertFacts, String> {
    let s = |k: &str| {
        o.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    let time = |k: &str| {
        humantime::parse_rfc3339(&s(k))
            .map(crate::identity::unix)
            .map_err(|e| format!("{url}: \"{k}\" is not a time ({e})"))
    };
    let issuer = s("issuer");
    let info = CertInfo {
        subject: s("subject"),
        issuer: issuer.clone(),
        serial: s("serial"),
        not_before: time("not_before")?,
        not_after: time("not_after")?,
        fingerprint_sha256: s("fingerprint_sha256"),
        client_auth_allowed: None,
        organisation: None,
        chain_len: o
            .get("chain_certificates")
            .and_then(|x| x.as_u64())
            .unwrap_or(0) as usize,
    };
    Ok(CertFacts {
        role,
        info,
        tax_ca: crate::vero_ca::by_issuer_name(&issuer),
        tax_ca_checked_by: "name",
        key: None,
        signed_previous: None,
        is_ca: false,
        embedded: None,
        organisation: None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::vero_ca::Environment;

    fn identity(org: &str, cn: &str, issuer: &str) -> serde_json::Value {
        serde_json::json!({
            "organisation": org,
            "subject": format!("CN={cn}, O=Oy, C=FI"),
            "issuer": issuer,
            "serial": "01",
            "fingerprint_sha256": "ab",
            "not_before": "2026-01-01T00:00:00Z",
            "not_after": "2028-01-01T00:00:00Z",
            "chain_certificates": 1,
            "source": format!("/ids/{org}/"),
        })
    }

    #[test]
    fn one_identity_or_one_per_organisation() {
        let test_ca = "CN=Data Providers Test Issuing CA v1, O=Verohallinto, C=FI";
        let one = identity("1234567-1", "1234567-1", test_ca);
        let v = serde_json::json!({"version": "0.1.0", "upstream": "https://x", "identity": one});
        let i = from_status("http://127.0.0.1:9901/status", &v).unwrap();
        assert_eq!(i.certs.len(), 1);
        assert_eq!(
            i.certs[0].tax_ca,
            Some((Environment::Test, "Data Providers Test Issuing CA v1"))
        );
        assert_eq!(i.certs[0].info.not_after, 1_830_297_600);

        let other = identity(
            "7654321-9",
            "7654321-9",
            "CN=Data Providers Issuing CA v1, O=Verohallinto, C=FI",
        );
        let v = serde_json::json!({"identity": one, "identities": [one, other]});
        let i = from_status("http://127.0.0.1:9901/status", &v).unwrap();
        let orgs: Vec<_> = i
            .certs
            .iter()
            .map(|c| c.organisation.clone().unwrap())
            .collect();
        assert_eq!(orgs, ["1234567-1", "7654321-9"]);
        assert_eq!(
            i.certs[1].tax_ca.map(|t| t.0),
            Some(Environment::Production)
        );
        assert!(i
            .notes
            .iter()
            .any(|n| n == "7654321-9: identity in service loaded from /ids/7654321-9/"));
    }

    #[test]
    fn an_answer_without_an_identity_is_named() {
        let e = from_status(
            "http://127.0.0.1:1/status",
            &serde_json::json!({"ok": true}),
        )
        .unwrap_err();
        assert!(
            e.contains("http://127.0.0.1:1/status") && e.contains("no \"identity\""),
            "{e}"
        );
        // A look-alike issuer name that is not exactly the CA's is not taken for it.
        assert_eq!(
            crate::vero_ca::by_issuer_name("CN=Data Providers Test Issuing CA v1 (copy), O=X"),
            None
        );
    }
}
