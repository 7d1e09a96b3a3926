//! Where the identity comes from: PEM files, a directory holding a pair, or a PKCS#12 file.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// A password for a PKCS#12 file or an encrypted key.
#[derive(Clone)]
pub enum Password {
    /// Read from this file at every load (first line; trailing CR/LF not part of it).
    File(PathBuf),
    /// From `VERO_PROXY_PKCS12_PASSWORD`, fixed for the process's life.
    Env(Zeroizing<String>),
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Password::File(p) => write!(f, "File({})", p.display()),
            Password::Env(_) => f.write_str("Env(..)"),
        }
    }
}

/// The identity's source files.
#[derive(Debug, Clone)]
pub enum IdentitySource {
    /// Certificate PEM (chain after the leaf), key PEM (or `None`: in the certificate file).
    Pem {
        /// Certificate file.
        cert: PathBuf,
        /// Key file.
        key: Option<PathBuf>,
        /// Password of an encrypted PKCS#8 key.
        key_password: Option<PathBuf>,
    },
    /// A directory with `cert.pem` + `key.pem` or `tls.crt` + `tls.key` (a Kubernetes TLS Secret).
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Password of an encrypted PKCS#8 key.
        key_password: Option<PathBuf>,
    },
    /// A PKCS#12 / PFX file.
    Pkcs12 {
        /// The file.
        path: PathBuf,
        /// Its password.
        password: Password,
    },
}

/// The pairs an identity directory may hold, in the order they are looked for.
pub const DIR_PAIRS: [(&str, &str); 2] = [("cert.pem", "key.pem"), ("tls.crt", "tls.key")];

impl IdentitySource {
    /// Every file a load reads (for a directory, the directory itself), for watching.
    pub fn paths(&self) -> Vec<PathBuf> {
        match self {
            IdentitySource::Pem {
                cert,
                key,
                key_password,
            } => [Some(cert), key.as_ref(), key_password.as_ref()]
                .into_iter()
                .flatten()
                .cloned()
                .collect(),
            IdentitySource::Dir { dir, key_password } => {
                let mut v = vec![dir.join(DIR_PAIRS[0].0)];
                v.extend(key_password.iter().cloned());
                v
            }
            IdentitySource::Pkcs12 { path, password } => {
                let mut v = vec![path.clone()];
                if let Password::File(p) = password {
                    v.push(p.clone());
                }
                v
            }
        }
    }

    /// The directories to watch: each file's parent (editors and Kubernetes replace files by
    /// renaming into the directory, so watching the file itself would miss the change).
    pub fn watch_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut push = |d: PathBuf| {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        };
        if let IdentitySource::Dir { dir, .. } = self {
            push(dir.clone());
        }
        for p in self.paths() {
            push(parent(&p));
        }
        dirs
    }

    /// A short description for logs and status.
    pub fn describe(&self) -> String {
        match self {
            IdentitySource::Pem {
                cert,
                key: Some(key),
                ..
            } => format!("{} + {}", cert.display(), key.display()),
            IdentitySource::Pem {
                cert, key: None, ..
            } => cert.display().to_string(),
            IdentitySource::Dir { dir, .. } => format!("{}/", dir.display()),
            IdentitySource::Pkcs12 { path, .. } => path.display().to_string(),
        }
    }
}

fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Reads a password file: its first line, without the trailing newline or carriage return.
pub fn read_password_file(path: &Path) -> std::io::Result<Zeroizing<String>> {
    let raw = Zeroizing::new(std::fs::read_to_string(path)?);
    let first = raw.split('\n').next().unwrap_or("");
    Ok(Zeroizing::new(
        first.strip_suffix('\r').unwrap_or(first).to_string(),
    ))
}
