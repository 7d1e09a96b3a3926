//! Files and directories -> [`Inspected`]: PEM (a chain, possibly with its key), DER, PKCS#12
//! (through the identity loader's reader), identity directories. Every failure names the file.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::facts::{CertFacts, Inspected, KeyCheck};
use super::Options;
use crate::identity::source::{read_password_file, DIR_PAIRS};
use crate::identity::{keys, pkcs12, IdentityError};

/// The inputs a path stands for: itself, or for a directory of identity directories (the
/// proxy's `--identities-dir`, one subdirectory per business ID) each subdirectory with a pair.
pub fn expand(input: &str) -> Vec<String> {
    let path = Path::new(input);
    let has_pair = |d: &Path| {
        DIR_PAIRS
            .iter()
            .any(|(c, k)| d.join(c).exists() && d.join(k).exists())
    };
    if !path.is_dir() || has_pair(path) {
        return vec![input.to_string()];
    }
    let mut subdirs: Vec<String> = std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir() && has_pair(p))
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    subdirs.sort();
    if subdirs.is_empty() {
        vec![input.to_string()]
    } else {
        subdirs
    }
}

/// More than any certificate chain or PKCS#12 file: a larger input is the wrong file (or
/// /dev/zero), not something to read to its end.
const MAX_INPUT: u64 = 4 << 20;

/// Reads one file or directory; `-` is standard input.
pub fn inspect(input: &str, opts: &Options) -> Inspected {
    let path = Path::new(input);
    let (kind, read) = if input == "-" {
        match read_capped(std::io::stdin().lock(), "standard input") {
            Ok(bytes) => file(Path::new("standard input"), &bytes, opts),
            Err(e) => ("file", Err(e)),
        }
    } else if path.is_dir() {
        ("identity-dir", dir(path, opts))
    } else {
        match std::fs::File::open(path) {
            Ok(f) => match read_capped(f, input) {
                Ok(bytes) => file(path, &bytes, opts),
                Err(e) => ("file", Err(e)),
            },
            Err(e) => ("file", Err(format!("cannot read {input}: {e}"))),
        }
    };
    let (chain, own_key) = match read {
        Ok(r) => r,
        Err(e) => return Inspected::failed(input, kind, e),
    };
    let mut out = Inspected {
        input: input.to_string(),
        kind,
        ..Default::default()
    };
    match describe_chain(input, &chain) {
        Ok(certs) => out.certs = certs,
        Err(e) => return Inspected::failed(input, kind, e),
    }
    if out.certs.iter().any(|c| c.signed_previous == Some(false)) {
        out.notes.push(
            "a certificate in the chain did not issue the one before it: the chain is out of order \
             or belongs to another certificate"
                .into(),
        );
    }
    let Some(leaf) = chain.first() else {
        return out;
    };
    if let Some((source, key)) = own_key {
        out.keys.push(check_key(leaf, source, key));
    }
    if let Some(key_path) = &opts.key {
        let source = key_path.display().to_string();
        out.keys.push(match read_key(key_path, opts) {
            Ok(Some(key)) => check_key(leaf, source, Ok(key)),
            Ok(None) => KeyCheck {
                source: source.clone(),
                matches: None,
                error: Some(format!("{source} holds no PEM private key")),
            },
            Err(e) => KeyCheck {
                source,
                matches: None,
                error: Some(e),
            },
        });
    }
    out
}

fn read_capped(from: impl std::io::Read, name: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    from.take(MAX_INPUT + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {name}: {e}"))?;
    if bytes.len() as u64 > MAX_INPUT {
        return Err(format!(
            "{name} is larger than {} MiB: not a certificate file",
            MAX_INPUT >> 20
        ));
    }
    Ok(bytes)
}

/// A key read from the input itself: where it came from, and the key or why it is unusable.
type OwnKey = Option<(String, Result<PrivateKeyDer<'static>, String>)>;
type Read = Result<(Vec<CertificateDer<'static>>, OwnKey), String>;

fn dir(path: &Path, opts: &Options) -> Read {
    let Some((cert, key)) = DIR_PAIRS
        .iter()
        .map(|(c, k)| (path.join(c), path.join(k)))
        .find(|(c, k)| c.exists() && k.exists())
    else {
        return Err(IdentityError::NoPairInDir {
            dir: path.to_path_buf(),
        }
        .to_string());
    };
    let bytes = std::fs::read(&cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
    let chain = pem_chain(&cert, &bytes)?;
    let key_source = key.display().to_string();
    let key = read_key(&key, opts)
        .and_then(|k| k.ok_or(format!("{key_source} holds no PEM private key")));
    Ok((chain, Some((key_source, key))))
}

fn file(path: &Path, bytes: &[u8], opts: &Options) -> (&'static str, Read) {
    let name = path.display().to_string();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if ext == "p12" || ext == "pfx" {
        return ("pkcs12", open_pkcs12(path, bytes, opts));
    }
    if bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        let read = pem_chain(path, bytes).map(|chain| {
            let has_key = String::from_utf8_lossy(bytes).contains("PRIVATE KEY-----");
            let key = has_key.then(|| {
                let key = parse_key(path, bytes, opts)
                    .and_then(|k| k.ok_or(format!("{name} holds no usable private key")));
                (name.clone(), key)
            });
            (chain, key)
        });
        return ("pem", read);
    }
    if bytes.first() == Some(&0x30) {
        if let Ok((rest, _)) = X509Certificate::from_der(bytes) {
            if rest.is_empty() {
                return (
                    "der",
                    Ok((vec![CertificateDer::from(bytes.to_vec())], None)),
                );
            }
        }
        if opts.pkcs12_password.is_some() {
            return ("pkcs12", open_pkcs12(path, bytes, opts));
        }
        return (
            "file",
            Err(format!(
                "{name} is binary but not a DER certificate; if it is a PKCS#12 file, give its password \
                 with --pkcs12-password-file or VERO_PROXY_PKCS12_PASSWORD"
            )),
        );
    }
    (
        "file",
        Err(format!(
            "{name} is not a certificate: no -----BEGIN CERTIFICATE----- block, not DER, not PKCS#12"
        )),
    )
}

fn pem_chain(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "{} is not a valid PEM file ({e}); check that it was copied whole",
                path.display()
            )
        })?;
    if chain.is_empty() {
        return Err(IdentityError::NoCertificate {
            path: path.to_path_buf(),
        }
        .to_string());
    }
    Ok(chain)
}

fn open_pkcs12(path: &Path, bytes: &[u8], opts: &Options) -> Read {
    if let Some(e) = &opts.pkcs12_password_error {
        return Err(e.clone());
    }
    let Some((password, origin)) = &opts.pkcs12_password else {
        return Err(format!(
            "{} is a PKCS#12 file: give its password with --pkcs12-password-file or VERO_PROXY_PKCS12_PASSWORD",
            path.display()
        ));
    };
    let (chain, key) = pkcs12::open(path, bytes, password, origin).map_err(|e| e.to_string())?;
    if chain.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok((chain, Some((path.display().to_string(), Ok(key)))))
}

/// A key from a PEM file: `Ok(None)` when the file holds none.
fn read_key(path: &Path, opts: &Options) -> Result<Option<PrivateKeyDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_key(path, &bytes, opts)
}

fn parse_key(
    path: &Path,
    bytes: &[u8],
    opts: &Options,
) -> Result<Option<PrivateKeyDer<'static>>, String> {
    let password = match &opts.key_password_file {
        Some(p) => Some((
            p.as_path(),
            read_password_file(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?,
        )),
        None => None,
    };
    let pw = password.as_ref().map(|(p, s)| (*p, s.as_str()));
    match keys::parse_key(path, bytes, pw) {
        Ok(k) => Ok(Some(k)),
        Err(IdentityError::NoKey { .. }) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// The same check the identity loader makes: rustls compares the key's public half with the
/// certificate's.
fn check_key(
    leaf: &CertificateDer<'_>,
    source: String,
    key: Result<PrivateKeyDer<'static>, String>,
) -> KeyCheck {
    let unusable = |source: String, error: String| KeyCheck {
        source,
        matches: None,
        error: Some(error),
    };
    let key = match key {
        Ok(k) => k,
        Err(e) => return unusable(source, e),
    };
    let provider = crate::upstream::tls::provider();
    let signing = match provider.key_provider.load_private_key(key) {
        Ok(s) => s,
        Err(e) => {
            let error = format!("the private key in {source} cannot be used: {e}");
            return unusable(source, error);
        }
    };
    let matches = match CertifiedKey::new(vec![leaf.clone().into_owned()], signing).keys_match() {
        Ok(()) => Some(true),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => Some(false),
        Err(_) => None,
    };
    let error = matches
        .is_none()
        .then(|| format!("cannot tell whether the key in {source} matches the certificate"));
    KeyCheck {
        source,
        matches,
        error,
    }
}

/// Facts about every certificate, each chain certificate checked as the issuer of the one
/// before it.
fn describe_chain(input: &str, chain: &[CertificateDer<'_>]) -> Result<Vec<CertFacts>, String> {
    let mut out = Vec::with_capacity(chain.len());
    for i in 0..chain.len() {
        let role = if i == 0 { "leaf" } else { "chain" };
        let mut facts = CertFacts::of(input, &chain[i..], role)?;
        if i > 0 {
            facts.signed_previous = Some(crate::vero_ca::issued_by(&chain[i - 1], &chain[i]));
        }
        out.push(facts);
    }
    Ok(out)
}
