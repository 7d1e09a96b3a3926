//! PKCS#12 / PFX files: modern (AES-256, PBKDF2) and legacy (3DES or RC2-40 with a SHA-1 MAC, as
//! Windows and OpenSSL 1.x export them), read by the p12-keystore crate.

use std::path::Path;

use p12_keystore::{KeyStore, Pkcs12ImportPolicy};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::load::IdentityError;

/// The certificate chain (leaf first) and key inside a PKCS#12 file.
pub fn open(
    path: &Path,
    data: &[u8],
    password: &str,
    password_origin: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), IdentityError> {
    let store =
        KeyStore::from_pkcs12(data, password, Pkcs12ImportPolicy::Strict).map_err(|e| match e {
            p12_keystore::error::Error::MacError(_) => IdentityError::WrongPkcs12Password {
                path: path.to_path_buf(),
                origin: password_origin.to_string(),
            },
            other => IdentityError::Malformed {
                path: path.to_path_buf(),
                reason: format!("not a PKCS#12 file this proxy can read ({other})"),
            },
        })?;
    let (_, chain) = store
        .private_key_chain()
        .ok_or_else(|| IdentityError::Malformed {
            path: path.to_path_buf(),
            reason: "the PKCS#12 file holds no private key with its certificate".into(),
        })?;
    let certs = chain
        .certs()
        .iter()
        .map(|c| CertificateDer::from(c.as_der().to_vec()))
        .collect::<Vec<_>>();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(chain.key().as_der().to_vec()));
    Ok((certs, key))
}
