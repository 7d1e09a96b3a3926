//! PEM files -> [`Identity`]: parse, check the key against the certificate, check validity.
//! A pure function of the files' contents and the clock it is given.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use ring::digest::{digest, SHA256};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{rfc3339, CertInfo, Identity};
use crate::config::IdentityFiles;

/// Why an identity could not be loaded; each message names the file and says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// No `CERTIFICATE` block in the certificate file.
    #[error("{path} holds no PEM certificate (expected a -----BEGIN CERTIFICATE----- block)")]
    NoCertificate {
        /// File.
        path: PathBuf,
    },
    /// No private key where one was expected.
    #[error("{path} holds no PEM private key (expected PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY); pass the key file with --key")]
    NoKey {
        /// File.
        path: PathBuf,
    },
    /// The key is password-protected.
    #[error("{path} holds an encrypted private key, which this version cannot open; decrypt it with `openssl pkey -in {path} -out key.pem` and keep the result readable only by the proxy's user")]
    EncryptedKey {
        /// File.
        path: PathBuf,
    },
    /// A PEM block or certificate could not be parsed.
    #[error("{path}: {reason}")]
    Malformed {
        /// File.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The key is of a kind the TLS library cannot sign with.
    #[error("the private key in {path} cannot be used: {reason}")]
    UnusableKey {
        /// File.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// Key and certificate belong to different key pairs.
    #[error("the private key in {key} does not match the certificate in {cert}: they are from different key pairs")]
    Mismatch {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: PathBuf,
    },
    /// Past notAfter.
    #[error("the certificate in {path} expired on {not_after}: renew it (Vero certificates can be renewed from 60 days before expiry) or request a new one")]
    Expired {
        /// File.
        path: PathBuf,
        /// RFC 3339 time.
        not_after: String,
    },
    /// Before notBefore.
    #[error(
        "the certificate in {path} is not valid until {not_before}; check this machine's clock"
    )]
    NotYetValid {
        /// File.
        path: PathBuf,
        /// RFC 3339 time.
        not_before: String,
    },
}

/// Reads and validates the identity named by `files`, as of `now`.
pub fn load(
    files: &IdentityFiles,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<Identity, IdentityError> {
    let cert_pem = read(&files.cert)?;
    let (key_path, key_pem) = match &files.key {
        Some(p) => (p.clone(), read(p)?),
        None => (files.cert.clone(), cert_pem.clone()),
    };
    let mut hasher = ring::digest::Context::new(&SHA256);
    hasher.update(&cert_pem);
    hasher.update(&key_pem);
    let mut content_hash = [0u8; 32];
    content_hash.copy_from_slice(hasher.finish().as_ref());

    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Malformed {
            path: files.cert.clone(),
            reason: format!("bad PEM: {e}"),
        })?;
    if chain.is_empty() {
        return Err(IdentityError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key = parse_key(&key_path, &key_pem)?;
    let signing_key =
        provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| IdentityError::UnusableKey {
                path: key_path.clone(),
                reason: e.to_string(),
            })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(IdentityError::Mismatch {
                cert: files.cert.clone(),
                key: key_path,
            })
        }
        Err(e) => {
            return Err(IdentityError::Malformed {
                path: files.cert.clone(),
                reason: e.to_string(),
            })
        }
    }
    let info = describe(&files.cert, &certified.cert)?;
    let t = super::unix(now);
    if t > info.not_after {
        return Err(IdentityError::Expired {
            path: files.cert.clone(),
            not_after: rfc3339(info.not_after),
        });
    }
    if t < info.not_before {
        return Err(IdentityError::NotYetValid {
            path: files.cert.clone(),
            not_before: rfc3339(info.not_before),
        });
    }
    Ok(Identity {
        certified_key: Arc::new(certified),
        info,
        content_hash,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let text = String::from_utf8_lossy(pem);
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || text.contains("Proc-Type: 4,ENCRYPTED")
    {
        return Err(IdentityError::EncryptedKey {
            path: path.to_path_buf(),
        });
    }
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => IdentityError::NoKey {
            path: path.to_path_buf(),
        },
        other => IdentityError::Malformed {
            path: path.to_path_buf(),
            reason: format!("bad PEM key: {other}"),
        },
    })
}

/// Reads the facts about the leaf (first) certificate of a chain.
pub fn describe(path: &Path, chain: &[CertificateDer<'_>]) -> Result<CertInfo, IdentityError> {
    let leaf = chain.first().ok_or_else(|| IdentityError::NoCertificate {
        path: path.to_path_buf(),
    })?;
    let (_, cert) =
        X509Certificate::from_der(leaf.as_ref()).map_err(|e| IdentityError::Malformed {
            path: path.to_path_buf(),
            reason: format!("the first certificate cannot be parsed: {e}"),
        })?;
    let client_auth_allowed = match cert.extended_key_usage() {
        Ok(Some(eku)) => Some(eku.value.any || eku.value.client_auth),
        _ => None,
    };
    let fingerprint = digest(&SHA256, leaf.as_ref());
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        fingerprint_sha256: hex(fingerprint.as_ref()),
        client_auth_allowed,
        chain_len: chain.len() - 1,
    })
}

/// Lower-case hex without separators.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
