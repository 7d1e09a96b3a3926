//! Private keys from PEM: PKCS#8, PKCS#1 (RSA), SEC1 (EC), and encrypted PKCS#8 (PBES2 as OpenSSL
//! 1.1+ writes it; PBE-SHA1-3DES as OpenSSL 1.0's `-topk8` wrote it, which uses PKCS#12's
//! password-based encryption rather than PKCS#5's).

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
        let wrong = || IdentityError::WrongPassword {
            path: path.to_path_buf(),
            password_file: password_file.to_path_buf(),
        };
        if let Some(plain) = pkcs12_pbe::decrypt(&der, password) {
            let plain = plain.map_err(|_| wrong())?;
            return Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                plain.to_vec(),
            )));
        }
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

/// PKCS#8 keys encrypted with PKCS#12's PBE-SHA1-3DES: the PKCS#12 key derivation (pkcs12
/// crate) with SHA-1, then 3DES-CBC (des, cbc crates).
mod pkcs12_pbe {
    use cbc::cipher::{block_padding::Pkcs7, BlockModeDecrypt, KeyIvInit};
    use pkcs8::der::Decode;
    use zeroize::Zeroizing;

    /// `None` when `der` is not encrypted this way; `Some(Err)` when the password is wrong.
    pub fn decrypt(der: &[u8], password: &str) -> Option<Result<Zeroizing<Vec<u8>>, ()>> {
        let info = pkcs12::pbe_params::EncryptedPrivateKeyInfo::from_der(der).ok()?;
        if info.encryption_algorithm.oid != pkcs12::PKCS_12_PBE_WITH_SHAAND3_KEY_TRIPLE_DES_CBC {
            return None;
        }
        let params: pkcs12::pbe_params::Pkcs12PbeParams = info
            .encryption_algorithm
            .parameters
            .as_ref()?
            .decode_as()
            .ok()?;
        Some(run(&params, info.encrypted_data.as_bytes(), password))
    }

    fn run(
        p: &pkcs12::pbe_params::Pkcs12PbeParams,
        data: &[u8],
        password: &str,
    ) -> Result<Zeroizing<Vec<u8>>, ()> {
        use pkcs12::kdf::{derive_key_utf8, Pkcs12KeyType};
        let salt = p.salt.as_bytes();
        let key = Zeroizing::new(
            derive_key_utf8::<sha1::Sha1>(
                password,
                salt,
                Pkcs12KeyType::EncryptionKey,
                p.iterations,
                24,
            )
            .map_err(|_| ())?,
        );
        let iv = derive_key_utf8::<sha1::Sha1>(password, salt, Pkcs12KeyType::Iv, p.iterations, 8)
            .map_err(|_| ())?;
        let cipher = cbc::Decryptor::<des::TdesEde3>::new_from_slices(&key, &iv).map_err(|_| ())?;
        let plain = Zeroizing::new(cipher.decrypt_padded_vec::<Pkcs7>(data).map_err(|_| ())?);
        // A wrong password can still unpad by chance; what comes out must be a PKCS#8 key.
        pkcs8::PrivateKeyInfoRef::try_from(plain.as_slice()).map_err(|_| ())?;
        Ok(plain)
    }
}
