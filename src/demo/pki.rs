//! A throwaway PKI made with rcgen: one CA, server certificates for the stand-in upstream, client
//! certificates for the proxy. Used by `vero-proxy demo` and by the integration tests.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// A certificate and its private key, as PEM.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Certificate PEM.
    pub cert_pem: String,
    /// Private key PEM (PKCS#8).
    pub key_pem: String,
}

/// A certificate authority that issues test certificates.
pub struct TestPki {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM: the trust anchor for what it issues.
    pub ca_pem: String,
}

impl TestPki {
    /// A new CA named `name`.
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "vero-proxy test PKI");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(TestPki {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[&str]) -> Result<Pair, rcgen::Error> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = OffsetDateTime::now_utc() - Duration::days(1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(365);
        self.issue(params, KeyPair::generate()?)
    }

    /// A client certificate like Vero's: CN = business ID, O = organisation, C = FI; valid from
    /// yesterday for two years.
    pub fn client(&self, business_id: &str, organisation: &str) -> Result<Pair, rcgen::Error> {
        let now = OffsetDateTime::now_utc();
        self.client_valid(
            business_id,
            organisation,
            now - Duration::days(1),
            now + Duration::days(730),
            KeyPair::generate()?,
        )
    }

    /// A client certificate with the given validity window and key.
    pub fn client_valid(
        &self,
        business_id: &str,
        organisation: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
        key: KeyPair,
    ) -> Result<Pair, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, business_id);
        params
            .distinguished_name
            .push(DnType::OrganizationName, organisation);
        params.distinguished_name.push(DnType::CountryName, "FI");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = not_before;
        params.not_after = not_after;
        let mut serial = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        self.issue(params, key)
    }

    fn issue(&self, params: CertificateParams, key: KeyPair) -> Result<Pair, rcgen::Error> {
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Pair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}
