//! The Tax Administration's public certificate authorities: which environment issued a
//! certificate, the chains that complete a leaf, and the chains that sign the certificate
//! service's responses. Embedded as data (see the source notes beside each PEM).
//!
//! Per environment there is one root, one intermediate under it, and two issuing CAs under the
//! intermediate:
//!
//! ```text
//! production: Verohallinto Root CA v1 <- Verohallinto Intermediate CA v1
//!                 <- Data Providers Issuing CA v1   (organisations' client certificates)
//!                 <- IR Services Issuing CA v1      (the certificate service's signing certificates)
//! test:       Verohallinto Root Test CA v1 <- Verohallinto Intermediate Test CA v1
//!                 <- Data Providers Test Issuing CA v1
//!                 <- IR Services Test Issuing CA v1
//! ```
//!
//! All eight certificates are present in the source (`src/vero_ca/README.md`: repository,
//! path, commit, subject, serial, notAfter and SHA-256 of each); the unit tests check that every
//! one parses and that each chain verifies up to its self-signed root.

use clap::ValueEnum;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A Tax Administration environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// The customer test environment (`pkiws-testi.vero.fi`, `apitest.vero.fi`).
    Test,
    /// Production (`pkiws.vero.fi`, `api.vero.fi`).
    Production,
}

impl Environment {
    /// The value the certificate service expects in `Environment`.
    pub fn service_value(self) -> &'static str {
        match self {
            Environment::Test => "TEST",
            Environment::Production => "PRODUCTION",
        }
    }

    /// `test` or `production`.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Test => "test",
            Environment::Production => "production",
        }
    }
}

impl std::fmt::Display for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an issuing CA issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CaRole {
    /// Organisations' client certificates for Vero API and the Incomes Register.
    DataProviders,
    /// The certificate service's own signing certificates.
    IrServices,
}

/// One of the Tax Administration's issuing CAs, embedded.
#[derive(Debug)]
pub struct IssuingCa {
    /// The environment it belongs to.
    pub environment: Environment,
    /// What it issues.
    pub role: CaRole,
    /// Its common name, e.g. "Data Providers Test Issuing CA v1".
    pub name: &'static str,
    pem: &'static str,
}

impl IssuingCa {
    /// The CA certificate.
    pub fn der(&self) -> CertificateDer<'static> {
        der_of(self.pem)
    }
}

const PRODUCTION_ROOT: &str = include_str!("vero_ca/production-root.pem");
const PRODUCTION_INTERMEDIATE: &str = include_str!("vero_ca/production-intermediate.pem");
const TEST_ROOT: &str = include_str!("vero_ca/test-root.pem");
const TEST_INTERMEDIATE: &str = include_str!("vero_ca/test-intermediate.pem");

/// The four issuing CAs.
pub static ISSUING_CAS: [IssuingCa; 4] = [
    IssuingCa {
        environment: Environment::Production,
        role: CaRole::DataProviders,
        name: "Data Providers Issuing CA v1",
        pem: include_str!("vero_ca/production-providers-issuing.pem"),
    },
    IssuingCa {
        environment: Environment::Test,
        role: CaRole::DataProviders,
        name: "Data Providers Test Issuing CA v1",
        pem: include_str!("vero_ca/test-providers-issuing.pem"),
    },
    IssuingCa {
        environment: Environment::Production,
        role: CaRole::IrServices,
        name: "IR Services Issuing CA v1",
        pem: include_str!("vero_ca/production-services-issuing.pem"),
    },
    IssuingCa {
        environment: Environment::Test,
        role: CaRole::IrServices,
        name: "IR Services Test Issuing CA v1",
        pem: include_str!("vero_ca/test-services-issuing.pem"),
    },
];

/// The embedded PEMs are fixed data that the unit tests parse; a failure here cannot happen
/// at run time without failing `cargo test` first, so an empty certificate is an acceptable
/// (never-taken) fallback instead of a panic.
fn der_of(pem: &'static str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap_or_else(|_| CertificateDer::from(vec![]))
}

fn root(env: Environment) -> CertificateDer<'static> {
    der_of(match env {
        Environment::Production => PRODUCTION_ROOT,
        Environment::Test => TEST_ROOT,
    })
}

fn intermediate(env: Environment) -> CertificateDer<'static> {
    der_of(match env {
        Environment::Production => PRODUCTION_INTERMEDIATE,
        Environment::Test => TEST_INTERMEDIATE,
    })
}

fn issuing(env: Environment, role: CaRole) -> Option<&'static IssuingCa> {
    ISSUING_CAS
        .iter()
        .find(|c| c.environment == env && c.role == role)
}

/// The trust anchors for verifying the certificate service's response signatures in `env`:
/// the environment's root alone. The signing certificate comes from the signature's
/// `KeyInfo`; the chain between it and the root ("IR Services [Test ]Issuing CA v1", then
/// "Verohallinto Intermediate [Test ]CA v1") is embedded too, in [`service_intermediates`],
/// because the service is not documented to send it: pass both to the verifier.
pub fn service_signers(env: Environment) -> Vec<CertificateDer<'static>> {
    vec![root(env)]
}

/// The intermediates between the certificate service's signing certificate and
/// [`service_signers`]' root: the IR Services issuing CA, then the Verohallinto intermediate.
pub fn service_intermediates(env: Environment) -> Vec<CertificateDer<'static>> {
    issuing(env, CaRole::IrServices)
        .map(IssuingCa::der)
        .into_iter()
        .chain(std::iter::once(intermediate(env)))
        .collect()
}

/// The leaf followed by its issuing CA and the intermediate (not the root) when a Data
/// Providers issuing CA signed it (the signature is checked, not just the name); else the leaf
/// alone. The certificate service returns the leaf alone; Vero API's need for the chain is
/// undocumented, so sending it is the safe choice.
pub fn complete_chain(leaf: &CertificateDer<'_>) -> Vec<CertificateDer<'static>> {
    let mut chain = vec![leaf.clone().into_owned()];
    if let Some(ca) = issuing_ca(leaf.as_ref()).filter(|c| c.role == CaRole::DataProviders) {
        chain.push(ca.der());
        chain.push(intermediate(ca.environment));
    }
    chain
}

/// Which Tax Administration environment issued this DER certificate, signature-checked
/// against the embedded issuing CAs; `None` for anything else (or for bytes that do not parse).
pub fn environment_of(der: &[u8]) -> Option<Environment> {
    issuing_ca(der).map(|c| c.environment)
}

/// Which Tax Administration issuing CA an issuer name (`CN=..., O=...` as displayed) names,
/// judged by the name alone: for a report of a certificate that is not at hand (a /status), and
/// as the fallback of a warning. Prefer [`environment_of`], which checks the signature.
pub fn by_issuer_name(issuer: &str) -> Option<(Environment, &'static str)> {
    ISSUING_CAS
        .iter()
        .find(|ca| {
            issuer
                .split(',')
                .any(|part| part.trim() == format!("CN={}", ca.name))
        })
        .map(|ca| (ca.environment, ca.name))
}

/// Which embedded CA certificate these DER bytes are, if any: its environment and common
/// name. For telling a person that a chain file holds the Tax Administration's own CAs.
pub fn embedded_ca(der: &[u8]) -> Option<(Environment, &'static str)> {
    let others = [
        (
            Environment::Production,
            "Verohallinto Root CA v1",
            PRODUCTION_ROOT,
        ),
        (
            Environment::Production,
            "Verohallinto Intermediate CA v1",
            PRODUCTION_INTERMEDIATE,
        ),
        (Environment::Test, "Verohallinto Root Test CA v1", TEST_ROOT),
        (
            Environment::Test,
            "Verohallinto Intermediate Test CA v1",
            TEST_INTERMEDIATE,
        ),
    ];
    others
        .into_iter()
        .chain(ISSUING_CAS.iter().map(|c| (c.environment, c.name, c.pem)))
        .find(|(_, _, pem)| der_of(pem).as_ref() == der)
        .map(|(env, name, _)| (env, name))
}

/// The embedded issuing CA whose key signed this DER certificate and whose name is its issuer.
pub fn issuing_ca(der: &[u8]) -> Option<&'static IssuingCa> {
    let cas: Vec<CertificateDer<'static>> = ISSUING_CAS.iter().map(IssuingCa::der).collect();
    signer_among(der, &cas).and_then(|i| ISSUING_CAS.get(i))
}

/// The index of the candidate CA that signed this DER certificate.
fn signer_among(der: &[u8], candidates: &[CertificateDer<'_>]) -> Option<usize> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    candidates.iter().position(|ca| signed_by(&cert, ca))
}

/// Whether `issuer_der` is named as the issuer of `cert_der` and its key made the signature:
/// one link of a chain, checked.
pub fn issued_by(cert_der: &[u8], issuer_der: &[u8]) -> bool {
    X509Certificate::from_der(cert_der).is_ok_and(|(_, cert)| signed_by(&cert, issuer_der))
}

/// Whether `issuer_der` is named as `cert`'s issuer and its key made `cert`'s signature.
fn signed_by(cert: &X509Certificate<'_>, issuer_der: &[u8]) -> bool {
    let Ok((_, issuer)) = X509Certificate::from_der(issuer_der) else {
        return false;
    };
    issuer.subject().as_raw() == cert.issuer().as_raw()
        && cert.verify_signature(Some(issuer.public_key())).is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const ENVS: [Environment; 2] = [Environment::Production, Environment::Test];

    fn parse<'a>(der: &'a CertificateDer<'_>) -> X509Certificate<'a> {
        X509Certificate::from_der(der.as_ref()).expect("parses").1
    }

    fn cn(der: &CertificateDer<'_>) -> String {
        let c = parse(der);
        let name = c.subject().iter_common_name().next().unwrap();
        name.as_str().unwrap().to_string()
    }

    #[test]
    fn every_embedded_pem_is_one_certificate_with_the_expected_name() {
        let all = [
            (PRODUCTION_ROOT, "Verohallinto Root CA v1"),
            (PRODUCTION_INTERMEDIATE, "Verohallinto Intermediate CA v1"),
            (TEST_ROOT, "Verohallinto Root Test CA v1"),
            (TEST_INTERMEDIATE, "Verohallinto Intermediate Test CA v1"),
        ];
        for (pem, name) in all
            .into_iter()
            .chain(ISSUING_CAS.iter().map(|c| (c.pem, c.name)))
        {
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            assert_eq!(certs.len(), 1, "{name}");
            assert_eq!(cn(&certs[0]), name);
            assert_eq!(der_of(pem), certs[0]);
        }
    }

    #[test]
    fn chains_verify_up_to_their_self_signed_roots() {
        for env in ENVS {
            let root = root(env);
            let inter = intermediate(env);
            assert!(signed_by(&parse(&root), &root), "{env} root self-signed");
            assert!(signed_by(&parse(&inter), &root), "{env} intermediate");
            for role in [CaRole::DataProviders, CaRole::IrServices] {
                let ca = issuing(env, role).unwrap().der();
                assert!(signed_by(&parse(&ca), &inter), "{env} {role:?}");
                // The other environment's intermediate did not sign it.
                let other = if env == Environment::Test {
                    Environment::Production
                } else {
                    Environment::Test
                };
                assert!(!signed_by(&parse(&ca), &intermediate(other)));
            }
        }
    }

    #[test]
    fn service_signers_and_intermediates_form_the_ir_services_chain() {
        for env in ENVS {
            let roots = service_signers(env);
            assert_eq!(roots.len(), 1);
            let inter = service_intermediates(env);
            assert_eq!(inter.len(), 2);
            assert!(cn(&inter[0]).starts_with("IR Services"));
            assert!(signed_by(&parse(&inter[0]), &inter[1]));
            assert!(signed_by(&parse(&inter[1]), &roots[0]));
        }
    }

    #[test]
    fn issuing_cas_classify_under_their_intermediates() {
        // A leaf of the real CAs cannot be made in a test; the issuing CAs themselves are
        // certificates signed by a known key, so the same check is exercised on them.
        for env in ENVS {
            let inter = intermediate(env);
            for role in [CaRole::DataProviders, CaRole::IrServices] {
                let ca = issuing(env, role).unwrap().der();
                assert!(signed_by(&parse(&ca), &inter));
            }
        }
        // The intermediates and roots are not issued by an issuing CA.
        for env in ENVS {
            assert_eq!(environment_of(intermediate(env).as_ref()), None);
            assert_eq!(environment_of(root(env).as_ref()), None);
        }
    }

    fn forged_leaf() -> CertificateDer<'static> {
        use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair};
        // A CA with the test Data Providers CA's exact name, but its own key.
        let real = ISSUING_CAS[1].der();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Data Providers Test Issuing CA v1");
        ca.distinguished_name
            .push(DnType::OrganizationName, "Verohallinto");
        ca.distinguished_name.push(
            DnType::CountryName,
            rcgen::DnValue::PrintableString("FI".try_into().unwrap()),
        );
        let issuer = Issuer::new(ca, ca_key);
        let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
        leaf.distinguished_name
            .push(DnType::CommonName, "1234567-8");
        let cert = leaf
            .signed_by(&KeyPair::generate().unwrap(), &issuer)
            .unwrap();
        let der = cert.der().clone();
        // Same name, byte for byte: only the signature can tell them apart.
        assert_eq!(
            parse(&der).issuer().as_raw(),
            parse(&real).subject().as_raw()
        );
        der
    }

    #[test]
    fn the_signature_check_finds_the_ca_that_signed() {
        let pki = crate::demo::pki::TestPki::new("Some CA").unwrap();
        let other = crate::demo::pki::TestPki::new("Some CA").unwrap();
        let leaf = pki.client("1234567-8", "Oy").unwrap();
        let leaf = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        let ca = CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap();
        let decoy = CertificateDer::from_pem_slice(other.ca_pem.as_bytes()).unwrap();
        assert_eq!(
            signer_among(leaf.as_ref(), &[decoy.clone(), ca.clone()]),
            Some(1)
        );
        assert_eq!(signer_among(leaf.as_ref(), &[decoy]), None);
    }

    #[test]
    fn a_certificate_the_tax_administration_did_not_sign_is_unknown() {
        let leaf = forged_leaf();
        assert_eq!(environment_of(leaf.as_ref()), None);
        assert!(issuing_ca(leaf.as_ref()).is_none());
        assert_eq!(complete_chain(&leaf), vec![leaf.clone()]);
        assert_eq!(environment_of(b"not a certificate"), None);
        assert_eq!(embedded_ca(leaf.as_ref()), None);
    }

    #[test]
    fn embedded_ca_recognises_each_copy() {
        assert_eq!(
            embedded_ca(root(Environment::Test).as_ref()),
            Some((Environment::Test, "Verohallinto Root Test CA v1"))
        );
        for ca in &ISSUING_CAS {
            assert_eq!(
                embedded_ca(ca.der().as_ref()),
                Some((ca.environment, ca.name))
            );
        }
    }
}
