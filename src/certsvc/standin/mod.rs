//! A local stand-in for the Tax Administration's certificate service, for tests and the demo:
//! an HTTPS server on 127.0.0.1 that checks request shapes, transfer IDs (single use) and
//! renewal signatures, issues certificates from its own test CA, answers `RetrievalId` and
//! then the `Certificate` after a set number of polls, signs every answer, and records what it
//! received. It is not the real service: its error codes and texts are its own.

mod ca;
mod rules;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use rcgen::{ExtendedKeyUsagePurpose, KeyPair};
use roxmltree::Document;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use time::{Duration, OffsetDateTime};

use super::answer::{self, ErrorInfo};
use super::dsig;
use super::keys::NewKey;
use super::xml::{self, Operation, NS};
use crate::demo::pki::Pair;
use crate::demo::standin::{self as server, full, Handler, StandIn, StandInBody};
use ca::{Ca, Signer};
use rules::{fields_in_order, operate, State};

/// What the stand-in received: one entry per request.
#[derive(Debug, Clone)]
pub struct Received {
    /// The `SOAPAction` header, quotes removed.
    pub soap_action: String,
    /// The operation, if the body named one.
    pub operation: Option<Operation>,
    /// The whole request body.
    pub body: String,
    /// Its `Content-Type`.
    pub content_type: String,
}

/// How the stand-in behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Transfer ID -> transfer password, each usable once.
    pub transfers: Vec<(String, String)>,
    /// GetCertificate answers "not ready" this many times per retrieval before the certificate.
    pub polls_before_ready: u32,
    /// Validity of issued certificates.
    pub validity: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            transfers: Vec::new(),
            polls_before_ready: 1,
            validity: Duration::days(730),
        }
    }
}

struct Inner {
    issuing: Ca,
    signer: Signer,
    stranger: Signer,
    state: Mutex<State>,
}

/// A running stand-in certificate service.
pub struct CertService {
    /// `https://127.0.0.1:PORT/2017/10/CertificateServices`: give it as `--service-url`.
    pub url: String,
    /// The CA of its TLS certificate (PEM): give it as `--service-ca-file`.
    pub tls_ca_pem: String,
    /// The root its answers' signing certificate chains to (PEM): `--service-signer-ca`.
    pub signer_root_pem: String,
    /// The CA that issues client certificates (PEM): it also checks renewal signatures.
    pub issuing_ca_pem: String,
    inner: Arc<Inner>,
    _server: StandIn,
}

impl CertService {
    /// Starts the stand-in on 127.0.0.1 with its own CAs.
    pub async fn start(settings: Settings) -> anyhow::Result<CertService> {
        let tls_pki =
            crate::demo::pki::TestPki::new("vero-proxy stand-in certificate service TLS CA")?;
        let server_pair: Pair = tls_pki.server(&["127.0.0.1", "localhost"])?;
        let signer_root = Ca::new("Stand-in IR Services Test Root")?;
        let stranger_root = Ca::new("Someone else's root")?;
        let issuing = Ca::new("Stand-in Data Providers Test Issuing CA")?;
        let signer = Signer::new(&signer_root, "Stand-in certificate service signer")?;
        let stranger = Signer::new(&stranger_root, "Stand-in certificate service signer")?;
        let inner = Arc::new(Inner {
            issuing,
            signer,
            stranger,
            state: Mutex::new(State {
                settings,
                used: Vec::new(),
                pending: HashMap::new(),
                received: Vec::new(),
                fail_with: None,
                tamper: false,
                untrusted_signer: false,
            }),
        });
        let cfg = server_config(&server_pair)?;
        let inner2 = inner.clone();
        let handler: Handler = Arc::new(move |_seen, req| {
            let inner = inner2.clone();
            Box::pin(async move { serve(inner, req).await })
        });
        let server = server::start(cfg, handler).await?;
        Ok(CertService {
            url: format!(
                "https://127.0.0.1:{}/2017/10/CertificateServices",
                server.addr.port()
            ),
            tls_ca_pem: tls_pki.ca_pem.clone(),
            signer_root_pem: signer_root.pem(),
            issuing_ca_pem: inner.issuing.pem(),
            inner,
            _server: server,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner)
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state().received.clone()
    }

    /// Answer every following request with this ErrorInfo (None: behave again).
    pub fn fail_with(&self, error: Option<ErrorInfo>) {
        self.state().fail_with = error;
    }

    /// Alter every following answer after signing it (the signature no longer matches).
    pub fn tamper_answers(&self, on: bool) {
        self.state().tamper = on;
    }

    /// Sign every following answer with a certificate under a root the client does not trust.
    pub fn sign_untrusted(&self, on: bool) {
        self.state().untrusted_signer = on;
    }

    /// Adds a transfer ID and password (usable once).
    pub fn add_transfer(&self, id: &str, password: &str) {
        self.state()
            .settings
            .transfers
            .push((id.into(), password.into()));
    }

    /// A client certificate from the stand-in's issuing CA with an RSA key, valid in the given
    /// window: the "current" identity for renewal tests.
    pub fn issue_current(
        &self,
        business_id: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> anyhow::Result<Pair> {
        let key = NewKey::generate()?;
        let kp = KeyPair::from_pkcs8_pem_and_sign_algo(&key.pem(), &rcgen::PKCS_RSA_SHA256)?;
        let der = self.inner.issuing.issue(
            &kp,
            business_id,
            Some("Stand-in Oy"),
            not_before,
            not_after,
            Some(ExtendedKeyUsagePurpose::ClientAuth),
        )?;
        Ok(Pair {
            cert_pem: super::keys::pem_block("CERTIFICATE", &der),
            key_pem: key.pem().to_string(),
        })
    }

    /// Processes one request body as the server would (for tests of the stand-in itself):
    /// returns the HTTP status and the answer body.
    pub fn handle(&self, soap_action: &str, body: &str) -> (u16, String) {
        let (status, text) = respond(&self.inner, soap_action, "text/xml; charset=utf-8", body);
        (status.as_u16(), text)
    }
}

fn lock(inner: &Inner) -> MutexGuard<'_, State> {
    // A panic while holding the lock leaves data that is still consistent enough for a test
    // server; keep serving.
    inner.state.lock().unwrap_or_else(|p| p.into_inner())
}

fn server_config(pair: &Pair) -> anyhow::Result<Arc<ServerConfig>> {
    let chain =
        CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes())?;
    let mut cfg = ServerConfig::builder_with_provider(crate::upstream::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

async fn serve(inner: Arc<Inner>, req: Request<Incoming>) -> Response<StandInBody> {
    let action = header(&req, "soapaction");
    let ctype = header(&req, "content-type");
    let body = match req.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    let (status, text) = respond(&inner, &action, &ctype, &body);
    let mut resp = Response::new(full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/xml; charset=utf-8"),
    );
    resp
}

fn header(req: &Request<Incoming>, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// A client error: the request is malformed (a SOAP fault, HTTP 500 as SOAP 1.1 has it).
fn client_fault(msg: impl Into<String>) -> (StatusCode, String) {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        xml::fault("Client", &msg.into()),
    )
}

fn respond(
    inner: &Inner,
    soap_action: &str,
    content_type: &str,
    body: &str,
) -> (StatusCode, String) {
    let action = soap_action.trim().trim_matches('"').to_string();
    let operation = Document::parse(body).ok().and_then(|d| {
        answer::body_element(&d)
            .ok()
            .filter(|e| e.tag_name().namespace() == Some(NS))
            .and_then(|e| Operation::from_request_element(e.tag_name().name()))
    });
    let mut st = lock(inner);
    st.received.push(Received {
        soap_action: action.clone(),
        operation,
        body: body.to_string(),
        content_type: content_type.to_string(),
    });
    if !content_type.to_ascii_lowercase().starts_with("text/xml") {
        return client_fault(format!(
            "Content-Type must be text/xml, not {content_type:?}"
        ));
    }
    let doc = match Document::parse(body) {
        Ok(d) => d,
        Err(e) => return client_fault(format!("not XML: {e}")),
    };
    let el = match answer::body_element(&doc) {
        Ok(e) => e,
        Err(e) => return client_fault(e.to_string()),
    };
    let Some(op) = operation else {
        return client_fault(format!(
            "unknown request element {{{}}}{}",
            el.tag_name().namespace().unwrap_or(""),
            el.tag_name().name()
        ));
    };
    if action != op.soap_action() {
        return client_fault(format!(
            "SOAPAction {action:?} does not match {}",
            op.request_element()
        ));
    }
    let fields = match fields_in_order(el, op) {
        Ok(f) => f,
        Err(e) => return client_fault(e),
    };
    let outcome = match st.fail_with.clone() {
        Some(e) => Err(vec![e]),
        None => operate(inner, &mut st, &doc, el, op, &fields),
    };
    let (rid, cert, errors) = match outcome {
        Ok((rid, cert)) => (rid, cert, Vec::new()),
        Err(errors) => (None, None, errors),
    };
    let element = xml::response_unsigned(op, rid.as_deref(), cert.as_deref(), &errors);
    let signer = if st.untrusted_signer {
        &inner.stranger
    } else {
        &inner.signer
    };
    let signed = match dsig::sign_enveloped(
        &element,
        signer.key.as_ref(),
        std::slice::from_ref(&signer.cert),
    ) {
        Ok(s) => s,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                xml::fault("Server", &e.to_string()),
            )
        }
    };
    let mut answer = xml::envelope(&signed);
    if st.tamper {
        answer = answer.replacen("<Status>", "<Status> ", 1);
    }
    (StatusCode::OK, answer)
}
