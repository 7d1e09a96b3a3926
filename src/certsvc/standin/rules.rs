//! What the stand-in checks and does for each operation: the schema's element order and
//! lengths, transfer IDs, renewal signatures and the 60-day window, issuing and polling.

use std::collections::HashMap;

use rcgen::{CertificateSigningRequestParams, ExtendedKeyUsagePurpose};
use roxmltree::{Document, Node};
use rustls::pki_types::{CertificateDer, UnixTime};
use time::{Duration, OffsetDateTime};

use super::{Inner, Received, Settings};
use crate::certsvc::answer::{child_elements, text_of, ErrorInfo};
use crate::certsvc::dsig;
use crate::certsvc::xml::Operation;

pub(super) struct Pending {
    pub(super) csr: Vec<u8>,
    pub(super) customer_id: String,
    pub(super) customer_name: Option<String>,
    pub(super) polls: u32,
    pub(super) issued: Option<CertificateDer<'static>>,
}

pub(super) struct State {
    pub(super) settings: Settings,
    pub(super) used: Vec<String>,
    pub(super) pending: HashMap<String, Pending>,
    pub(super) received: Vec<Received>,
    pub(super) fail_with: Option<ErrorInfo>,
    pub(super) tamper: bool,
    pub(super) untrusted_signer: bool,
}

fn err(code: &str, message: &str) -> Vec<ErrorInfo> {
    vec![ErrorInfo {
        code: code.into(),
        message: message.into(),
    }]
}

pub(super) type Fields = HashMap<&'static str, String>;

/// Checks the children against the schema (order, namespace, required, lengths).
pub(super) fn fields_in_order(el: Node, op: Operation) -> Result<Fields, String> {
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

pub(super) type Outcome = Result<(Option<String>, Option<Vec<u8>>), Vec<ErrorInfo>>;

pub(super) fn operate(
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
            accept(st, f)
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
            if info.organisation.map(|o| o.to_string()) != Some(get("CustomerId")) {
                return Err(err(
                    "CUSTOMER_MISMATCH",
                    "The signing certificate is not the customer's.",
                ));
            }
            let now = crate::identity::unix(std::time::SystemTime::now());
            if now < crate::certsvc::flow::renewal_opens(&info) {
                return Err(err(
                    "RENEW_TOO_EARLY",
                    "The certificate can be renewed only during the last 60 days of its validity.",
                ));
            }
            accept(st, f)
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

/// SignNew or Renew once its own checks pass: the CSR checked and a retrieval opened.
fn accept(st: &mut State, f: &Fields) -> Outcome {
    let csr = check_csr(f.get("CertificateRequest").map_or("", String::as_str))?;
    let customer_id = f.get("CustomerId").cloned().unwrap_or_default();
    let id = new_retrieval(st, csr, customer_id, f.get("CustomerName").cloned());
    Ok((Some(id), None))
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
