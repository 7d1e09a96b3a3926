//! The stand-in's certificate authorities and its response signer.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::SigningKey;
use time::{Duration, OffsetDateTime};

use crate::certsvc::keys::NewKey;

pub(super) struct Ca {
    pub(super) issuer: Issuer<'static, KeyPair>,
    pub(super) der: CertificateDer<'static>,
}

impl Ca {
    pub(super) fn new(name: &str) -> Result<Ca, rcgen::Error> {
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

    pub(super) fn pem(&self) -> String {
        crate::certsvc::keys::pem_block("CERTIFICATE", &self.der)
    }

    /// A certificate for `public_key` with the Vero subject shape.
    pub(super) fn issue(
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
pub(super) struct Signer {
    pub(super) key: Arc<dyn SigningKey>,
    pub(super) cert: CertificateDer<'static>,
}

impl Signer {
    pub(super) fn new(ca: &Ca, cn: &str) -> anyhow::Result<Signer> {
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
