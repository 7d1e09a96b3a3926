//! The new key pair and its CSR, and the files they end up in. RSA keys are generated with the
//! `rsa` crate (ring cannot generate RSA keys); everything else (CSR signing, TLS) stays on ring.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, DnType, KeyPair, PKCS_RSA_SHA256};
use rsa::pkcs8::EncodePrivateKey;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

use crate::business_id::BusinessId;

/// The only key size the certificate service accepts.
pub const RSA_BITS: usize = 2048;
/// The key file's name in an output directory (what `run --identity-dir` reads).
pub const KEY_FILE: &str = "key.pem";
/// The certificate file's name in an output directory.
pub const CERT_FILE: &str = "cert.pem";

/// Why a key, CSR or file could not be made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Key generation or encoding failed.
    #[error("could not generate the RSA key: {0}")]
    Generate(String),
    /// The CSR could not be made.
    #[error("could not make the certificate signing request: {0}")]
    Csr(String),
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A key file that is not a PKCS#8 RSA key.
    #[error("{path} is not an unencrypted PKCS#8 RSA key: {reason}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// A new RSA 2048 key pair, PKCS#8.
pub struct NewKey {
    pkcs8: Zeroizing<Vec<u8>>,
}

impl NewKey {
    /// Generates a fresh key (takes a moment: RSA prime search).
    pub fn generate() -> Result<NewKey, KeyError> {
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, RSA_BITS)
            .map_err(|e| KeyError::Generate(e.to_string()))?;
        let der = key
            .to_pkcs8_der()
            .map_err(|e| KeyError::Generate(e.to_string()))?;
        Ok(NewKey {
            pkcs8: Zeroizing::new(der.as_bytes().to_vec()),
        })
    }

    /// Reads a key written earlier by [`write_key`] (to resume a retrieval).
    pub fn read(path: &Path) -> Result<NewKey, KeyError> {
        let pem = std::fs::read(path).map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|e| KeyError::BadKey {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let key = NewKey {
            pkcs8: Zeroizing::new(der.secret_pkcs8_der().to_vec()),
        };
        key.key_pair().map_err(|e| KeyError::BadKey {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(key)
    }

    fn key_pair(&self) -> Result<KeyPair, rcgen::Error> {
        KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(self.pkcs8.as_slice()),
            &PKCS_RSA_SHA256,
        )
    }

    /// The SubjectPublicKeyInfo, DER: what the issued certificate must carry.
    pub fn public_key_der(&self) -> Result<Vec<u8>, KeyError> {
        use rcgen::PublicKeyData;
        Ok(self
            .key_pair()
            .map_err(|e| KeyError::Csr(e.to_string()))?
            .subject_public_key_info())
    }

    /// The key as PEM (PKCS#8).
    pub fn pem(&self) -> Zeroizing<String> {
        Zeroizing::new(pem_block("PRIVATE KEY", &self.pkcs8))
    }

    /// A PKCS#10 CSR signed with this key: CN = business ID, O = organisation (if given), C = FI.
    pub fn csr(
        &self,
        business_id: &BusinessId,
        organisation: Option<&str>,
    ) -> Result<Vec<u8>, KeyError> {
        let csr_err = |e: rcgen::Error| KeyError::Csr(e.to_string());
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(csr_err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, business_id.as_str());
        if let Some(o) = organisation {
            params.distinguished_name.push(DnType::OrganizationName, o);
        }
        params.distinguished_name.push(DnType::CountryName, "FI");
        let csr = params
            .serialize_request(&self.key_pair().map_err(csr_err)?)
            .map_err(csr_err)?;
        Ok(csr.der().to_vec())
    }
}

/// PEM text of one DER block.
pub fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(chunk));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// The SubjectPublicKeyInfo of a DER certificate.
pub fn certificate_public_key(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(der)
        .ok()
        .map(|(_, c)| c.public_key().raw.to_vec())
}

/// Writes `contents` to `dir/name` atomically (a temporary file in `dir`, then a rename), with
/// `mode` on Unix.
pub fn write_atomic(
    dir: &Path,
    name: &str,
    contents: &[u8],
    mode: u32,
) -> Result<PathBuf, KeyError> {
    let path = dir.join(name);
    let io = |source| KeyError::Io {
        path: path.clone(),
        source,
    };
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let result = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)?;
    Ok(path)
}

/// Writes the key as `key.pem` (mode 0600).
pub fn write_key(dir: &Path, key: &NewKey) -> Result<PathBuf, KeyError> {
    write_atomic(dir, KEY_FILE, key.pem().as_bytes(), 0o600)
}

/// Writes `cert.pem`: the leaf, then the chain.
pub fn write_chain(dir: &Path, chain: &[CertificateDer<'_>]) -> Result<PathBuf, KeyError> {
    let pem: String = chain.iter().map(|c| pem_block("CERTIFICATE", c)).collect();
    write_atomic(dir, CERT_FILE, pem.as_bytes(), 0o644)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn key_csr_and_files() {
        let key = NewKey::generate().unwrap();
        let id: BusinessId = "0245437-2".parse().unwrap();
        let csr = key.csr(&id, Some("Testi Oy")).unwrap();
        use rcgen::PublicKeyData;
        let parsed = rcgen::CertificateSigningRequestParams::from_der(&csr.clone().into()).unwrap();
        assert_eq!(
            parsed.public_key.der_bytes(),
            key.key_pair().unwrap().der_bytes()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = write_key(dir.path(), &key).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        let again = NewKey::read(&path).unwrap();
        assert_eq!(
            again.public_key_der().unwrap(),
            key.public_key_der().unwrap()
        );
    }
}
