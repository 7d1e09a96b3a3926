//! A local stand-in for the Tax Administration's certificate service, for tests and the demo:
//! an HTTPS server on 127.0.0.1 that checks request shapes, transfer IDs (single use) and
//! renewal signatures, issues certificates from its own test CA, answers `RetrievalId` and
//! then the `Certificate` after a set number of polls, signs every answer, and records what it
//! received. It is not the real service: its error codes and texts are its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use roxmltree::{Document, Node};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::sign::SigningKey;
use rustls::ServerConfig;
use time::{Duration, OffsetDateTime};

use super::dsig;
use super::keys::NewKey;
use super::xml::{self, child_elements, text_of, ErrorInfo, Operation, NS};
use crate::demo::pki::Pair;
use crate::demo::standin::{self as server, full, Handler, StandIn, StandInBody};

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

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Result<Ca, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    fn pem(&self) -> String {
        super::keys::pem_block("CERTIFICATE", &self.der)
    }

    /// A certificate for `public_key` with the Vero subject shape.
    fn issue(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        cn: &str,
        org: Option<&str>,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        eku: Option<ExtendedKeyUsagePurpose>,
    ) -> Result<CertificateDer<'static>, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(o) = org {
            params.distinguished_name.push(DnType::OrganizationName, o);
        }
        params.distinguished_name.push(DnType::CountryName, "FI");
        params.extended_key_usages = eku.into_iter().collect();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = not_before;
        params.not_after = not_after;
        let mut serial = [0u8; 12];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        Ok(params.signed_by(public_key, &self.issuer)?.der().clone())
    }
}

/// An RSA signing certificate under a CA, with its key as rustls signs with it.
struct Signer {
    key: Arc<dyn SigningKey>,
    cert: CertificateDer<'static>,
}

impl Signer {
    fn new(ca: &Ca, cn: &str) -> anyhow::Result<Signer> {
        let key = NewKey::generate()?;
        let kp = KeyPair::from_pkcs8_pem_and_sign_algo(&key.pem(), &rcgen::PKCS_RSA_SHA256)?;
        let now = OffsetDateTime::now_utc();
        let cert = ca.issue(
            &kp,
            cn,
            None,
            now - Duration::days(1),
            now + Duration::days(365),
            None,
        )?;
        let der = PrivateKeyDer::from_pem_slice(key.pem().as_bytes())?;
        let key = crate::upstream::tls::provider()
            .key_provider
            .load_private_key(der)?;
        Ok(Signer { key, cert })
    }
}

struct Pending {
    csr: Vec<u8>,
    customer_id: String,
    customer_name: Option<String>,
    polls: u32,
    issued: Option<CertificateDer<'static>>,
}

struct State {
    settings: Settings,
    used: Vec<String>,
    pending: HashMap<String, Pending>,
    received: Vec<Received>,
    fail_with: Option<ErrorInfo>,
    tamper: bool,
    untrusted_signer: bool,
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

fn err(code: &str, message: &str) -> Vec<ErrorInfo> {
    vec![ErrorInfo {
        code: code.into(),
        message: message.into(),
    }]
}

fn respond(
    inner: &Inner,
    soap_action: &str,
    content_type: &str,
    body: &str,
) -> (StatusCode, String) {
    let action = soap_action.trim().trim_matches('"').to_string();
    let operation = Document::parse(body).ok().and_then(|d| {
        xml::body_element(&d)
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
    let el = match xml::body_element(&doc) {
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

type Fields = HashMap<&'static str, String>;

/// Checks the children against the schema (order, namespace, required, lengths).
fn fields_in_order(el: Node, op: Operation) -> Result<Fields, String> {
    let spec: &[(&'static str, usize, bool)] = match op {
        Operation::SignNew => &[
            ("Environment", 10, true),
            ("CustomerId", 30, true),
            ("CustomerName", 100, false),
            ("TransferId", 32, true),
            ("TransferPassword", 16, true),
            ("CertificateRequest", usize::MAX, true),
        ],
        Operation::Get => &[
            ("Environment", 10, true),
            ("CustomerId", 30, true),
            ("CustomerName", 100, false),
            ("RetrievalId", 32, true),
        ],
        Operation::Renew => &[
            ("Environment", 10, true),
            ("CustomerId", 30, true),
            ("CustomerName", 100, false),
            ("CertificateRequest", usize::MAX, true),
        ],
    };
    let mut children = child_elements(el).peekable();
    let mut fields = Fields::new();
    for (name, max, required) in spec {
        match children.peek() {
            Some(c) if c.tag_name().name() == *name => {
                if c.tag_name().namespace().is_some() {
                    return Err(format!("{name} must carry no namespace"));
                }
                let t = text_of(*c).map_err(|e| e.to_string())?;
                if t.chars().count() > *max || t.is_empty() {
                    return Err(format!("{name} must be 1 to {max} characters"));
                }
                fields.insert(*name, t);
                children.next();
            }
            _ if *required => return Err(format!("{name} missing or out of order")),
            _ => {}
        }
    }
    if let Some(extra) = children.next() {
        let is_sig = extra.tag_name().namespace() == Some(dsig::DS_NS)
            && extra.tag_name().name() == "Signature";
        if !(op == Operation::Renew && is_sig && children.next().is_none()) {
            return Err(format!("unexpected element {}", extra.tag_name().name()));
        }
    }
    match fields.get("Environment").map(String::as_str) {
        Some("TEST") | Some("PRODUCTION") => Ok(fields),
        other => Err(format!(
            "Environment must be TEST or PRODUCTION, not {other:?}"
        )),
    }
}

type Outcome = Result<(Option<String>, Option<Vec<u8>>), Vec<ErrorInfo>>;

fn operate(
    inner: &Inner,
    st: &mut State,
    doc: &Document,
    el: Node,
    op: Operation,
    f: &Fields,
) -> Outcome {
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    match op {
        Operation::SignNew => {
            let (id, pw) = (get("TransferId"), get("TransferPassword"));
            if st.used.contains(&id) {
                return Err(err(
                    "TRANSFER_USED",
                    "The transfer ID has already been used.",
                ));
            }
            let known = st
                .settings
                .transfers
                .iter()
                .any(|(i, p)| *i == id && *p == pw);
            if !known {
                return Err(err(
                    "TRANSFER_INVALID",
                    "Invalid transfer ID or transfer password.",
                ));
            }
            st.used.push(id);
            let csr = check_csr(&get("CertificateRequest"))?;
            Ok((
                Some(new_retrieval(
                    st,
                    csr,
                    get("CustomerId"),
                    f.get("CustomerName").cloned(),
                )),
                None,
            ))
        }
        Operation::Renew => {
            let signer = match dsig::verify_enveloped(
                doc,
                el,
                &dsig::SignerTrust::roots(vec![inner.issuing.der.clone()]),
                UnixTime::now(),
            ) {
                Ok(s) => s,
                Err(dsig::DsigError::Untrusted { reason, .. }) if reason.contains("Expired") => {
                    return Err(err(
                        "CERT_EXPIRED",
                        "The certificate that signed the request has expired.",
                    ))
                }
                Err(e) => {
                    return Err(err(
                        "SIGNATURE_INVALID",
                        &format!("The request signature is not valid: {e}"),
                    ))
                }
            };
            let info = match crate::identity::load::describe(
                std::path::Path::new("request"),
                std::slice::from_ref(&signer.certificate),
            ) {
                Ok(i) => i,
                Err(e) => return Err(err("SIGNATURE_INVALID", &e.to_string())),
            };
            if !info.subject.contains(&format!("CN={}", get("CustomerId"))) {
                return Err(err(
                    "CUSTOMER_MISMATCH",
                    "The signing certificate is not the customer's.",
                ));
            }
            let now = crate::identity::unix(std::time::SystemTime::now());
            if info.not_after - now > super::flow::RENEWAL_WINDOW_DAYS * 86_400 {
                return Err(err(
                    "RENEW_TOO_EARLY",
                    "The certificate can be renewed only during the last 60 days of its validity.",
                ));
            }
            let csr = check_csr(&get("CertificateRequest"))?;
            Ok((
                Some(new_retrieval(
                    st,
                    csr,
                    get("CustomerId"),
                    f.get("CustomerName").cloned(),
                )),
                None,
            ))
        }
        Operation::Get => {
            let ready_after = st.settings.polls_before_ready;
            let validity = st.settings.validity;
            let Some(p) = st.pending.get_mut(&get("RetrievalId")) else {
                return Err(err("RETRIEVAL_UNKNOWN", "Unknown retrieval ID."));
            };
            if p.customer_id != get("CustomerId") {
                return Err(err("RETRIEVAL_UNKNOWN", "Unknown retrieval ID."));
            }
            if p.polls < ready_after {
                p.polls += 1;
                return Err(err("NOT_READY", "The certificate is not ready yet."));
            }
            if p.issued.is_none() {
                let csr = CertificateSigningRequestParams::from_der(&p.csr.clone().into())
                    .map_err(|e| err("CSR_INVALID", &e.to_string()))?;
                let now = OffsetDateTime::now_utc();
                let cert = inner
                    .issuing
                    .issue(
                        &csr.public_key,
                        &p.customer_id,
                        p.customer_name.as_deref(),
                        now - Duration::minutes(1),
                        now + validity,
                        Some(ExtendedKeyUsagePurpose::ClientAuth),
                    )
                    .map_err(|e| err("ISSUE_FAILED", &e.to_string()))?;
                p.issued = Some(cert);
            }
            Ok((None, p.issued.as_ref().map(|c| c.to_vec())))
        }
    }
}

fn new_retrieval(
    st: &mut State,
    csr: Vec<u8>,
    customer_id: String,
    customer_name: Option<String>,
) -> String {
    let mut raw = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw);
    let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    st.pending.insert(
        id.clone(),
        Pending {
            csr,
            customer_id,
            customer_name,
            polls: 0,
            issued: None,
        },
    );
    id
}

/// The CSR must parse, carry a valid self-signature and an RSA 2048 key.
fn check_csr(b64: &str) -> Result<Vec<u8>, Vec<ErrorInfo>> {
    use base64::Engine;
    use x509_parser::prelude::FromDer;
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| err("CSR_INVALID", "CertificateRequest is not base64."))?;
    CertificateSigningRequestParams::from_der(&der.clone().into()).map_err(|_| {
        err(
            "CSR_INVALID",
            "CertificateRequest is not a valid PKCS#10 request.",
        )
    })?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&der)
        .map_err(|_| {
            err(
                "CSR_INVALID",
                "CertificateRequest is not a valid PKCS#10 request.",
            )
        })?;
    match csr.certification_request_info.subject_pki.parsed() {
        Ok(x509_parser::public_key::PublicKey::RSA(k)) if k.key_size() == 2048 => Ok(der),
        _ => Err(err("CSR_KEY", "The key must be RSA 2048.")),
    }
}
