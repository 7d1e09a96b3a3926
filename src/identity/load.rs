//! Source files -> validated [`Identity`]: read, decode, check the key against the certificate,
//! check the validity window. A function of the files' contents and the clock it is given.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use ring::digest::{digest, Context, SHA256};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use super::source::{read_password_file, IdentitySource, Password, DIR_PAIRS};
use super::{keys, permissions, pkcs12, rfc3339, CertInfo, Identity};

/// Why an identity could not be loaded; each message names the file and says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file could not be read.
    #[error("cannot read {path}: {err}")]
    Read {
        /// File.
        path: PathBuf,
        /// OS error (in the message, not a separate cause, so it is not printed twice).
        err: std::io::Error,
    },
    /// An identity directory that does not exist.
    #[error("{dir} does not exist (or cannot be read); it should hold cert.pem + key.pem or tls.crt + tls.key")]
    NoDir {
        /// Directory.
        dir: PathBuf,
    },
    /// An identity directory without a known pair.
    #[error("{dir} holds neither cert.pem + key.pem nor tls.crt + tls.key")]
    NoPairInDir {
        /// Directory.
        dir: PathBuf,
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
    /// An encrypted PKCS#8 key without a password.
    #[error("the private key in {path} is encrypted: give its password in a file with --key-password-file")]
    KeyNeedsPassword {
        /// File.
        path: PathBuf,
    },
    /// An OpenSSL "traditional" encrypted key.
    #[error("the private key in {path} uses OpenSSL's old encryption (Proc-Type: 4,ENCRYPTED), which is not supported; convert it once with `openssl pkcs8 -topk8 -v2 aes-256-cbc -in {path} -out key.p8.pem` and use --key key.p8.pem --key-password-file")]
    TraditionalEncryptedKey {
        /// File.
        path: PathBuf,
    },
    /// Wrong password for an encrypted key.
    #[error("cannot decrypt the private key in {path}: the password in {password_file} is wrong")]
    WrongPassword {
        /// Key file.
        path: PathBuf,
        /// Password file.
        password_file: PathBuf,
    },
    /// Wrong password for a PKCS#12 file.
    #[error("cannot open {path}: the password ({origin}) is wrong")]
    WrongPkcs12Password {
        /// PKCS#12 file.
        path: PathBuf,
        /// Where the password came from.
        origin: String,
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
    #[error("the certificate in {path} expired on {not_after}; an expired Vero certificate cannot be renewed: request a new one (new transfer IDs from the certificate service) and point the proxy at it")]
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

/// What was read from the sources, before validation.
struct Material {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: PathBuf,
    key_path: PathBuf,
    hash: [u8; 32],
}

/// Reads and validates the identity, as of `now`.
pub fn load(
    source: &IdentitySource,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<Identity, IdentityError> {
    let m = read_material(source)?;
    let signing_key =
        provider
            .key_provider
            .load_private_key(m.key)
            .map_err(|e| IdentityError::UnusableKey {
                path: m.key_path.clone(),
                reason: e.to_string(),
            })?;
    let certified = CertifiedKey::new(m.chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(IdentityError::Mismatch {
                cert: m.cert_path,
                key: m.key_path,
            })
        }
        Err(e) => {
            return Err(IdentityError::Malformed {
                path: m.cert_path,
                reason: e.to_string(),
            })
        }
    }
    let info = describe(&m.cert_path, &certified.cert)?;
    let t = super::unix(now);
    if t > info.not_after {
        return Err(IdentityError::Expired {
            path: m.cert_path,
            not_after: rfc3339(info.not_after),
        });
    }
    if t < info.not_before {
        return Err(IdentityError::NotYetValid {
            path: m.cert_path,
            not_before: rfc3339(info.not_before),
        });
    }
    let warnings = permissions::check(&m.key_path).into_iter().collect();
    Ok(Identity {
        certified_key: Arc::new(certified),
        info,
        content_hash: m.hash,
        source: source.describe(),
        warnings,
    })
}

/// SHA-256 over every file a load of `source` would read; `None` when one cannot be read.
/// The poll trigger compares it with the identity in service.
pub fn content_hash(source: &IdentitySource) -> Option<[u8; 32]> {
    read_material_hash(source).ok()
}

fn read(path: &Path) -> Result<Zeroizing<Vec<u8>>, IdentityError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|err| IdentityError::Read {
            path: path.to_path_buf(),
            err,
        })
}

fn password(p: &Path) -> Result<Zeroizing<String>, IdentityError> {
    read_password_file(p).map_err(|err| IdentityError::Read {
        path: p.to_path_buf(),
        err,
    })
}

/// The certificate and key files a PEM or directory source names right now.
fn pem_paths(
    source: &IdentitySource,
) -> Result<(PathBuf, Option<PathBuf>, Option<PathBuf>), IdentityError> {
    match source {
        IdentitySource::Pem {
            cert,
            key,
            key_password,
        } => Ok((cert.clone(), key.clone(), key_password.clone())),
        IdentitySource::Dir { dir, key_password } => DIR_PAIRS
            .iter()
            .map(|(c, k)| (dir.join(c), dir.join(k)))
            .find(|(c, k)| c.exists() && k.exists())
            .map(|(c, k)| (c, Some(k), key_password.clone()))
            .ok_or_else(|| {
                if dir.is_dir() {
                    IdentityError::NoPairInDir { dir: dir.clone() }
                } else {
                    IdentityError::NoDir { dir: dir.clone() }
                }
            }),
        IdentitySource::Pkcs12 { .. } => Err(IdentityError::NoPairInDir {
            dir: PathBuf::new(),
        }),
    }
}

fn hash_of(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn read_material_hash(source: &IdentitySource) -> Result<[u8; 32], IdentityError> {
    Ok(match source {
        IdentitySource::Pkcs12 { path, .. } => hash_of(&[&read(path)?]),
        _ => {
            let (cert, key, _) = pem_paths(source)?;
            let key_bytes = match &key {
                Some(k) => read(k)?,
                None => Zeroizing::new(Vec::new()),
            };
            hash_of(&[&read(&cert)?, &key_bytes])
        }
    })
}

fn read_material(source: &IdentitySource) -> Result<Material, IdentityError> {
    match source {
        IdentitySource::Pkcs12 { path, password: pw } => {
            let data = read(path)?;
            let (secret, origin) = match pw {
                Password::File(f) => (password(f)?, format!("from {}", f.display())),
                Password::Env(s) => (s.clone(), "from VERO_PROXY_PKCS12_PASSWORD".to_string()),
            };
            let (chain, key) = pkcs12::open(path, &data, &secret, &origin)?;
            if chain.is_empty() {
                return Err(IdentityError::NoCertificate { path: path.clone() });
            }
            Ok(Material {
                chain,
                key,
                cert_path: path.clone(),
                key_path: path.clone(),
                hash: hash_of(&[&data]),
            })
        }
        _ => {
            let (cert_path, key_path, key_password) = pem_paths(source)?;
            let cert_pem = read(&cert_path)?;
            let (key_path, key_pem) = match key_path {
                Some(p) => {
                    let pem = read(&p)?;
                    (p, pem)
                }
                None => (cert_path.clone(), cert_pem.clone()),
            };
            if cert_pem.first() == Some(&0x30) {
                return Err(IdentityError::Malformed {
                    path: cert_path,
                    reason: "this is a binary (DER or PKCS#12) file, not PEM: give a .p12/.pfx with --pkcs12, \
                             or convert a DER certificate with `openssl x509 -inform der -in FILE -out cert.pem`"
                        .into(),
                });
            }
            let chain = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| IdentityError::Malformed {
                    path: cert_path.clone(),
                    reason: format!(
                        "is not a valid PEM file ({e}); check that it was copied whole"
                    ),
                })?;
            if chain.is_empty() {
                return Err(IdentityError::NoCertificate { path: cert_path });
            }
            let secret = key_password.as_deref().map(password).transpose()?;
            let pw = key_password
                .as_deref()
                .zip(secret.as_ref().map(|s| s.as_str()));
            let key = keys::parse_key(&key_path, &key_pem, pw)?;
            let hash = if key_path == cert_path {
                hash_of(&[&cert_pem, &[]])
            } else {
                hash_of(&[&cert_pem, &key_pem])
            };
            Ok(Material {
                chain,
                key,
                cert_path,
                key_path,
                hash,
            })
        }
    }
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
    // Tax Administration certificates name the organisation by its business ID in the CN.
    let organisation = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .and_then(|cn| cn.trim().parse().ok());
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        fingerprint_sha256: hex(fingerprint.as_ref()),
        client_auth_allowed,
        chain_len: chain.len() - 1,
        organisation,
    })
}

/// Lower-case hex without separators.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
