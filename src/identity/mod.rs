//! What "our certificate" is: the client certificate chain and key the proxy presents, with
//! the facts about it that operators and error messages need.

pub mod keys;
pub mod load;
pub mod permissions;
pub mod pkcs12;
pub mod source;
pub mod watch;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;

pub use load::{load, IdentityError};
pub use source::{IdentitySource, Password};

/// A loaded, validated client identity. Immutable: a reload makes a new one.
pub struct Identity {
    /// Chain and signing key as rustls presents them.
    pub certified_key: Arc<CertifiedKey>,
    /// Facts about the leaf certificate.
    pub info: CertInfo,
    /// SHA-256 over the source files' bytes, to tell a real change from a touched file.
    pub content_hash: [u8; 32],
    /// Where it was loaded from, for logs and status.
    pub source: String,
    /// Things an operator should fix (a key readable by others).
    pub warnings: Vec<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of every Debug output.
        f.debug_struct("Identity")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// Facts about the leaf certificate, for logs, status and error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject DN, RFC 4514 style.
    pub subject: String,
    /// Issuer DN.
    pub issuer: String,
    /// Serial number, colon-separated hex.
    pub serial: String,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
    /// SHA-256 of the DER certificate, hex.
    pub fingerprint_sha256: String,
    /// `Some(false)` when an extended-key-usage extension exists and does not allow client auth.
    pub client_auth_allowed: Option<bool>,
    /// Number of certificates after the leaf that are sent along.
    pub chain_len: usize,
}

impl CertInfo {
    /// Whole days from `now` until notAfter (negative once expired).
    pub fn days_left(&self, now: SystemTime) -> i64 {
        (self.not_after - unix(now)).div_euclid(86_400)
    }

    /// Whether `now` falls inside the validity window.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        let t = unix(now);
        self.not_before <= t && t <= self.not_after
    }
}

/// Seconds since the Unix epoch (negative before it).
pub fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// RFC 3339 rendering of Unix seconds, for messages and logs.
pub fn rfc3339(ts: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ts)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{ts}"))
}
