//! XML-DSig as the certificate service uses it: one enveloped signature over the whole request
//! or response element (`URI=""`), exclusive canonicalization, RSA-SHA256, SHA-256 digest, the
//! signer's certificate in `KeyInfo`. Canonicalization is the `xml-sec` crate's (pure Rust, over
//! roxmltree); digests and RSA are ring's; the signer's chain is checked with webpki.

use base64::Engine;
use roxmltree::{Document, Node};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::sign::SigningKey;
use rustls::SignatureScheme;
use xml_sec::c14n::{canonicalize, C14nAlgorithm, C14nMode};

use super::answer::child_elements;

/// The XML-DSig namespace.
pub const DS_NS: &str = "http://www.w3.org/2000/09/xmldsig#";
/// Exclusive canonicalization (without comments).
pub const EXC_C14N: &str = "http://www.w3.org/2001/10/xml-exc-c14n#";
/// The enveloped-signature transform.
pub const ENVELOPED: &str = "http://www.w3.org/2000/09/xmldsig#enveloped-signature";
/// RSA PKCS#1 v1.5 with SHA-256.
pub const RSA_SHA256: &str = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256";
/// SHA-256 digest.
pub const SHA256: &str = "http://www.w3.org/2001/04/xmlenc#sha256";

/// Why a signature could not be made or is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DsigError {
    /// The XML could not be parsed or canonicalized.
    #[error("XML signature: cannot read the XML: {0}")]
    Xml(String),
    /// No signature where one must be.
    #[error("the message carries no XML signature")]
    Missing,
    /// A signature of a shape this product does not accept.
    #[error("XML signature not accepted: {0}")]
    Unsupported(String),
    /// The digest of the signed element does not match: the content was changed.
    #[error("XML signature does not match the content (digest mismatch): the message was altered")]
    DigestMismatch,
    /// The signature value is wrong for the certificate in KeyInfo.
    #[error("XML signature value is invalid for the signing certificate")]
    BadSignature,
    /// The signing certificate does not chain to a trusted root.
    #[error("the XML signature's certificate ({subject}) is not trusted: {reason}")]
    Untrusted {
        /// Subject of the signing certificate.
        subject: String,
        /// What webpki said.
        reason: String,
    },
    /// The key cannot make RSA-SHA256 signatures.
    #[error("the signing key cannot make RSA-SHA256 signatures (the certificate service needs an RSA key)")]
    KeyNotRsa,
}

fn xml_err(e: impl std::fmt::Display) -> DsigError {
    DsigError::Xml(e.to_string())
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

fn exc_c14n() -> C14nAlgorithm {
    C14nAlgorithm::new(C14nMode::Exclusive1_0, false)
}

/// Exclusive canonical form of `top`'s subtree, leaving out the subtree of `without`.
fn c14n_subtree(
    doc: &Document,
    top: Node,
    without: Option<Node>,
    algo: &C14nAlgorithm,
) -> Result<Vec<u8>, DsigError> {
    let inside = |n: Node| {
        n.ancestors().any(|a| a == top) && !without.is_some_and(|w| n.ancestors().any(|a| a == w))
    };
    let mut out = Vec::new();
    canonicalize(doc, Some(&inside), algo, &mut out).map_err(xml_err)?;
    Ok(out)
}

fn sha256(data: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

/// Signs `element_xml` (one element, the whole text) with an enveloped signature appended as
/// its last child, made with `key`; `chain[0]` goes into `KeyInfo` (and the rest after it).
pub fn sign_enveloped(
    element_xml: &str,
    key: &dyn SigningKey,
    chain: &[CertificateDer<'_>],
) -> Result<String, DsigError> {
    let doc = Document::parse(element_xml).map_err(xml_err)?;
    let root = doc.root_element();
    let digest = sha256(&c14n_subtree(&doc, root, None, &exc_c14n())?);
    let signed_info = format!(
        concat!(
            r#"<ds:SignedInfo xmlns:ds="{ds}">"#,
            r#"<ds:CanonicalizationMethod Algorithm="{c14n}"></ds:CanonicalizationMethod>"#,
            r#"<ds:SignatureMethod Algorithm="{rsa}"></ds:SignatureMethod>"#,
            r#"<ds:Reference URI=""><ds:Transforms>"#,
            r#"<ds:Transform Algorithm="{env}"></ds:Transform>"#,
            r#"<ds:Transform Algorithm="{c14n}"></ds:Transform>"#,
            r#"</ds:Transforms><ds:DigestMethod Algorithm="{sha}"></ds:DigestMethod>"#,
            r#"<ds:DigestValue>{digest}</ds:DigestValue></ds:Reference></ds:SignedInfo>"#
        ),
        ds = DS_NS,
        c14n = EXC_C14N,
        rsa = RSA_SHA256,
        env = ENVELOPED,
        sha = SHA256,
        digest = b64().encode(digest),
    );
    let si_doc = Document::parse(&signed_info).map_err(xml_err)?;
    let canonical_si = c14n_subtree(&si_doc, si_doc.root_element(), None, &exc_c14n())?;
    let signer = key
        .choose_scheme(&[SignatureScheme::RSA_PKCS1_SHA256])
        .ok_or(DsigError::KeyNotRsa)?;
    let value = signer
        .sign(&canonical_si)
        .map_err(|e| DsigError::Unsupported(format!("signing failed: {e}")))?;
    let certs: String = chain
        .iter()
        .map(|c| {
            format!(
                "<ds:X509Certificate>{}</ds:X509Certificate>",
                b64().encode(c)
            )
        })
        .collect();
    // The canonical SignedInfo is put in as is: it declares ds itself, as its canonical form does.
    let signature = format!(
        r#"<ds:Signature xmlns:ds="{DS_NS}">{}<ds:SignatureValue>{}</ds:SignatureValue><ds:KeyInfo><ds:X509Data>{certs}</ds:X509Data></ds:KeyInfo></ds:Signature>"#,
        String::from_utf8_lossy(&canonical_si),
        b64().encode(value),
    );
    let close = element_xml
        .rfind("</")
        .ok_or_else(|| DsigError::Xml("the element has no end tag".into()))?;
    Ok(format!(
        "{}{signature}{}",
        &element_xml[..close],
        &element_xml[close..]
    ))
}

/// Who signed a verified element.
#[derive(Debug, Clone)]
pub struct Signer {
    /// The signing certificate.
    pub certificate: CertificateDer<'static>,
    /// Its subject, for messages.
    pub subject: String,
}

/// What a signing certificate must chain to: trust anchors, and CAs that may stand between
/// them and the signer when KeyInfo carries the signer alone.
#[derive(Debug, Clone, Default)]
pub struct SignerTrust {
    /// Trust anchors (roots, or any CA trusted as one).
    pub roots: Vec<CertificateDer<'static>>,
    /// Intermediates, not trusted by themselves.
    pub intermediates: Vec<CertificateDer<'static>>,
}

impl SignerTrust {
    /// Trust in these anchors alone.
    pub fn roots(roots: Vec<CertificateDer<'static>>) -> SignerTrust {
        SignerTrust {
            roots,
            intermediates: Vec::new(),
        }
    }

    /// The Tax Administration's embedded chains for the certificate service in `env`.
    pub fn embedded(env: crate::vero_ca::Environment) -> SignerTrust {
        SignerTrust {
            roots: crate::vero_ca::service_signers(env),
            intermediates: crate::vero_ca::service_intermediates(env),
        }
    }
}

/// The EKU policy for XML signing certificates: there is no standard purpose for them, so any
/// (or none) is accepted; the chain to the given roots is what grants trust.
struct AnyPurpose;

impl webpki::ExtendedKeyUsageValidator for AnyPurpose {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        for purpose in iter {
            purpose?;
        }
        Ok(())
    }
}

fn ds<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Vec<Node<'a, 'i>> {
    child_elements(n)
        .filter(|c| c.tag_name().namespace() == Some(DS_NS) && c.tag_name().name() == name)
        .collect()
}

fn one<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Result<Node<'a, 'i>, DsigError> {
    let v = ds(n, name);
    match v.as_slice() {
        [x] => Ok(*x),
        [] => Err(DsigError::Unsupported(format!("no {name}"))),
        _ => Err(DsigError::Unsupported(format!("more than one {name}"))),
    }
}

fn algorithm<'a>(n: Node<'a, '_>) -> &'a str {
    n.attribute("Algorithm").unwrap_or("")
}

/// Canonical XML 1.0 (inclusive, without comments): accepted in answers, never sent.
pub const C14N_10: &str = "http://www.w3.org/TR/2001/REC-xml-c14n-20010315";

/// The canonicalization a Transform or CanonicalizationMethod names: exclusive (with its
/// InclusiveNamespaces prefix list) or inclusive 1.0, both without comments (the service's
/// exact choice for its answers is not documented); anything else is refused.
fn c14n_from(n: Node) -> Result<C14nAlgorithm, DsigError> {
    match algorithm(n) {
        EXC_C14N => {
            let prefixes = child_elements(n)
                .find(|c| c.tag_name().name() == "InclusiveNamespaces")
                .and_then(|c| c.attribute("PrefixList"));
            Ok(match prefixes {
                Some(p) => exc_c14n().with_prefix_list(p),
                None => exc_c14n(),
            })
        }
        C14N_10 => Ok(C14nAlgorithm::new(C14nMode::Inclusive1_0, false)),
        other => Err(DsigError::Unsupported(format!(
            "canonicalization {other:?} (exclusive or inclusive c14n without comments is accepted)"
        ))),
    }
}

fn text_b64(n: Node) -> Result<Vec<u8>, DsigError> {
    let t: String = n
        .children()
        .filter(|c| c.is_text())
        .filter_map(|c| c.text())
        .flat_map(|t| t.chars())
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    b64()
        .decode(t.as_bytes())
        .map_err(|e| DsigError::Unsupported(format!("{} is not base64: {e}", n.tag_name().name())))
}

/// Verifies the enveloped signature that is a direct child of `element`, and returns who made
/// it. The signature must reference `element` itself (`URI=""`, or `#id` naming `element`), so
/// the element the caller then reads is the one that was signed. The signing certificate must
/// chain to one of `trust`'s roots at `now`, through KeyInfo's other certificates or `trust`'s
/// intermediates.
pub fn verify_enveloped(
    doc: &Document,
    element: Node,
    trust: &SignerTrust,
    now: UnixTime,
) -> Result<Signer, DsigError> {
    let sigs = ds(element, "Signature");
    let sig = match sigs.as_slice() {
        [] => return Err(DsigError::Missing),
        [s] => *s,
        _ => return Err(DsigError::Unsupported("more than one Signature".into())),
    };
    let signed_info = one(sig, "SignedInfo")?;
    let si_c14n = c14n_from(one(signed_info, "CanonicalizationMethod")?)?;
    if algorithm(one(signed_info, "SignatureMethod")?) != RSA_SHA256 {
        return Err(DsigError::Unsupported(
            "signature method (only RSA-SHA256 is accepted)".into(),
        ));
    }
    let reference = one(signed_info, "Reference")?;
    match reference.attribute("URI") {
        Some("") => {}
        Some(uri) if uri.starts_with('#') => {
            let id = &uri[1..];
            let named: Vec<Node> = doc
                .descendants()
                .filter(|n| {
                    ["Id", "ID", "id"]
                        .iter()
                        .any(|a| n.attribute(*a) == Some(id))
                })
                .collect();
            if named.as_slice() != [element] {
                return Err(DsigError::Unsupported(format!(
                    "the signature references {uri}, not the {} element",
                    element.tag_name().name()
                )));
            }
        }
        other => {
            return Err(DsigError::Unsupported(format!(
                "reference URI {other:?} (the whole element must be signed)"
            )))
        }
    }
    let transforms: Vec<Node> = match ds(reference, "Transforms").as_slice() {
        [t] => ds(*t, "Transform"),
        _ => return Err(DsigError::Unsupported("no Transforms".into())),
    };
    let (enveloped, rest) = transforms
        .split_first()
        .ok_or_else(|| DsigError::Unsupported("no Transform".into()))?;
    if algorithm(*enveloped) != ENVELOPED {
        return Err(DsigError::Unsupported(
            "the first transform must be enveloped-signature".into(),
        ));
    }
    let ref_c14n = match rest {
        [c] => c14n_from(*c)?,
        // Without a canonicalization transform the node set becomes octets by inclusive
        // c14n 1.0 (XML-DSig 4.3.3.2).
        [] => C14nAlgorithm::new(C14nMode::Inclusive1_0, false),
        _ => {
            return Err(DsigError::Unsupported(
                "transforms must be enveloped-signature, then at most one canonicalization".into(),
            ))
        }
    };
    if algorithm(one(reference, "DigestMethod")?) != SHA256 {
        return Err(DsigError::Unsupported(
            "digest method (only SHA-256 is accepted)".into(),
        ));
    }
    let expected = text_b64(one(reference, "DigestValue")?)?;
    let actual = sha256(&c14n_subtree(doc, element, Some(sig), &ref_c14n)?);
    // Both digests are of public data: a plain comparison leaks nothing.
    if expected != actual {
        return Err(DsigError::DigestMismatch);
    }

    let x509_data = one(one(sig, "KeyInfo")?, "X509Data")?;
    let certs = ds(x509_data, "X509Certificate")
        .into_iter()
        .map(|n| text_b64(n).map(CertificateDer::from))
        .collect::<Result<Vec<_>, _>>()?;
    let (leaf, intermediates) = certs
        .split_first()
        .ok_or_else(|| DsigError::Unsupported("no X509Certificate in KeyInfo".into()))?;
    let subject = subject_of(leaf);
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| DsigError::Untrusted {
        subject: subject.clone(),
        reason: e.to_string(),
    })?;
    let canonical_si = c14n_subtree(doc, signed_info, None, &si_c14n)?;
    let value = text_b64(one(sig, "SignatureValue")?)?;
    ee.verify_signature(
        webpki::ring::RSA_PKCS1_2048_8192_SHA256,
        &canonical_si,
        &value,
    )
    .map_err(|_| DsigError::BadSignature)?;
    let anchors = trust
        .roots
        .iter()
        .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
        .collect::<Vec<_>>();
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .cloned()
        .chain(trust.intermediates.iter().cloned())
        .collect();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &intermediates,
        now,
        AnyPurpose,
        None,
        None,
    )
    .map_err(|e| DsigError::Untrusted {
        subject: subject.clone(),
        reason: e.to_string(),
    })?;
    Ok(Signer {
        certificate: leaf.clone().into_owned(),
        subject,
    })
}

/// The subject of a DER certificate, RFC 4514 style, or a placeholder.
pub fn subject_of(der: &[u8]) -> String {
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(der)
        .map(|(_, c)| c.subject().to_string())
        .unwrap_or_else(|_| "(unreadable certificate)".into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::certsvc::keys::NewKey;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use rustls::pki_types::PrivateKeyDer;

    struct Fixture {
        root: CertificateDer<'static>,
        leaf: CertificateDer<'static>,
        key: std::sync::Arc<dyn SigningKey>,
    }

    fn fixture() -> Fixture {
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "Test root");
        let root = p.self_signed(&ca_key).unwrap().der().clone();
        let issuer = Issuer::new(p, ca_key);
        let key = NewKey::generate().unwrap();
        let kp =
            KeyPair::from_pkcs8_pem_and_sign_algo(&key.pem(), &rcgen::PKCS_RSA_SHA256).unwrap();
        let mut lp = CertificateParams::new(Vec::<String>::new()).unwrap();
        lp.distinguished_name.push(DnType::CommonName, "Signer");
        let leaf = lp.signed_by(&kp, &issuer).unwrap().der().clone();
        let der = {
            use rustls::pki_types::pem::PemObject;
            PrivateKeyDer::from_pem_slice(key.pem().as_bytes()).unwrap()
        };
        let key = crate::upstream::tls::provider()
            .key_provider
            .load_private_key(der)
            .unwrap();
        Fixture { root, leaf, key }
    }

    const EL: &str = r#"<cs:RenewCertificateRequest xmlns:cs="urn:x"><Environment>TEST</Environment><CustomerId>0245437-2</CustomerId></cs:RenewCertificateRequest>"#;

    fn verify(xml: &str, roots: &[CertificateDer<'static>]) -> Result<Signer, DsigError> {
        let doc = Document::parse(xml).unwrap();
        let el = crate::certsvc::answer::body_element(&doc).unwrap_or(doc.root_element());
        verify_enveloped(
            &doc,
            el,
            &SignerTrust::roots(roots.to_vec()),
            UnixTime::now(),
        )
    }

    #[test]
    fn round_trip_standalone_and_in_an_envelope() {
        let f = fixture();
        let signed = sign_enveloped(EL, f.key.as_ref(), std::slice::from_ref(&f.leaf)).unwrap();
        assert!(signed.ends_with("</ds:Signature></cs:RenewCertificateRequest>"));
        let s = verify(&signed, std::slice::from_ref(&f.root)).unwrap();
        assert_eq!(s.subject, "CN=Signer");
        // The envelope's own namespace is not visibly used in the element: same digest.
        let env = crate::certsvc::xml::envelope(&signed);
        verify(&env, std::slice::from_ref(&f.root)).unwrap();
    }

    #[test]
    fn tampering_and_strangers_are_rejected() {
        let f = fixture();
        let signed = sign_enveloped(EL, f.key.as_ref(), std::slice::from_ref(&f.leaf)).unwrap();
        let changed = signed.replace("0245437-2", "1572860-0");
        assert_eq!(
            verify(&changed, std::slice::from_ref(&f.root)).unwrap_err(),
            DsigError::DigestMismatch
        );
        // Change SignedInfo (the digest text) without touching the content.
        let pos = signed.find("<ds:DigestValue>").unwrap() + "<ds:DigestValue>".len();
        let mut bad = signed.clone();
        bad.replace_range(pos..pos + 4, "AAAA");
        assert!(matches!(
            verify(&bad, std::slice::from_ref(&f.root)).unwrap_err(),
            DsigError::DigestMismatch | DsigError::BadSignature
        ));
        let other = fixture();
        assert!(matches!(
            verify(&signed, std::slice::from_ref(&other.root)).unwrap_err(),
            DsigError::Untrusted { .. }
        ));
        assert_eq!(
            verify(EL, std::slice::from_ref(&f.root)).unwrap_err(),
            DsigError::Missing
        );
    }

    #[test]
    fn a_reference_to_another_element_is_refused() {
        let f = fixture();
        let signed = sign_enveloped(EL, f.key.as_ref(), std::slice::from_ref(&f.leaf)).unwrap();
        let wrapped = signed.replace(r#"URI="""#, r##"URI="#other""##);
        assert!(matches!(
            verify(&wrapped, std::slice::from_ref(&f.root)).unwrap_err(),
            DsigError::Unsupported(_)
        ));
    }
}
