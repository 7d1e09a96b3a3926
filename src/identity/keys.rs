//! Private keys from PEM: PKCS#8, PKCS#1 (RSA), SEC1 (EC), and encrypted PKCS#8 (PBES2 as OpenSSL
//! 1.1+ writes it, PBES1 with 3DES/SHA-1 as OpenSSL 1.0 wrote it).

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use zeroize::Zeroizing;

use super::load::IdentityError;

const ENCRYPTED_BEGIN: &str = "-----BEGIN ENCRYPTED PRIVATE KEY-----";
const ENCRYPTED_END: &str = "-----END ENCRYPTED PRIVATE KEY-----";

/// The private key in `pem` (read from `path`); `password` opens an encrypted PKCS#8 key and
/// names the file it came from.
pub fn parse_key(
    path: &Path,
    pem: &[u8],
    password: Option<(&Path, &str)>,
) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let text = String::from_utf8_lossy(pem);
    if text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(IdentityError::TraditionalEncryptedKey {
            path: path.to_path_buf(),
        });
    }
    if let Some(start) = text.find(ENCRYPTED_BEGIN) {
        let Some((password_file, password)) = password else {
            return Err(IdentityError::KeyNeedsPassword {
                path: path.to_path_buf(),
            });
        };
        let end = text[start..]
            .find(ENCRYPTED_END)
            .map(|e| start + e + ENCRYPTED_END.len())
            .ok_or_else(|| malformed(path, "the ENCRYPTED PRIVATE KEY block has no END line"))?;
        let (_, der) = pkcs8::der::pem::decode_vec(text[start..end].as_bytes())
            .map_err(|e| malformed(path, &format!("bad PEM in the encrypted key: {e}")))?;
        let der = Zeroizing::new(der);
        let info = pkcs8::EncryptedPrivateKeyInfoRef::try_from(der.as_slice())
            .map_err(|e| malformed(path, &format!("not an encrypted PKCS#8 key: {e}")))?;
        let plain = info.decrypt(password.as_bytes()).map_err(|e| match e {
            pkcs8::Error::EncryptedPrivateKey(pkcs8::pkcs5::Error::DecryptFailed) => IdentityError::WrongPassword {
                path: path.to_path_buf(),
                password_file: password_file.to_path_buf(),
            },
            other => IdentityError::UnusableKey {
                path: path.to_path_buf(),
                reason: format!("cannot decrypt it ({other}); supported: PBES2 (AES, PBKDF2 or scrypt) and PBES1 with 3DES"),
            },
        })?;
        return Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            plain.as_bytes().to_vec(),
        )));
    }
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => IdentityError::NoKey {
            path: path.to_path_buf(),
        },
        other => malformed(path, &format!("bad PEM key: {other}")),
    })
}

fn malformed(path: &Path, reason: &str) -> IdentityError {
    IdentityError::Malformed {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}
