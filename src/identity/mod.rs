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
    /// The business ID in the subject's CN, when it holds one (as Tax Administration
    /// certificates do).
    pub organisation: Option<crate::business_id::BusinessId>,
}

impl CertInfo {
    /// Whole days from `now` until notAfter (negative once expired).
    pub fn days_left(&self, now: SystemTime) -> i64 {
        (self.not_after - unix(now)).div_euclid(86_400)
    }

    /// The certificate in the words error messages use: subject and serial.
    pub fn who(&self) -> String {
        format!("subject {}, serial {}", self.subject, self.serial)
    }

    /// Whether `now` falls inside the validity window.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        let t = unix(now);
        self.not_before <= t && t <= self.not_after
    }
}

/// "1 day", "2 days".
pub fn days_text(n: i64) -> String {
    if n.abs() == 1 {
        format!("{n} day")
    } else {
        format!("{n} days")
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

/// Where a certificate stands against the Tax Administration's renewal rules: renewable from
/// 60 days before expiry (the warning threshold), urgent from 14 (critical).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalState {
    /// More days left than the warning threshold.
    Ok,
    /// Inside the renewal window: renewal is possible now.
    RenewalOpen,
    /// Fewer days left than the critical threshold.
    Critical,
    /// Past notAfter.
    Expired,
}

impl RenewalState {
    /// `ok`, `renewal_open`, `critical`, `expired`.
    pub fn as_str(self) -> &'static str {
        match self {
            RenewalState::Ok => "ok",
            RenewalState::RenewalOpen => "renewal_open",
            RenewalState::Critical => "critical",
            RenewalState::Expired => "expired",
        }
    }

    /// 0-3, for the metric.
    pub fn level(self) -> i64 {
        self as i64
    }
}

/// The renewal thresholds, in days before notAfter.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// Renewal possible from here (Vero: 60).
    pub warning_days: u32,
    /// Urgent from here.
    pub critical_days: u32,
}

impl CertInfo {
    /// The certificate's renewal state at `now`.
    pub fn renewal_state(&self, now: SystemTime, t: Thresholds) -> RenewalState {
        let left = self.not_after - unix(now);
        if left < 0 {
            RenewalState::Expired
        } else if left <= i64::from(t.critical_days) * 86_400 {
            RenewalState::Critical
        } else if left <= i64::from(t.warning_days) * 86_400 {
            RenewalState::RenewalOpen
        } else {
            RenewalState::Ok
        }
    }

    /// Logs where the certificate stands when renewal is due: a warning inside the renewal
    /// window, an error from the critical threshold on. Called at every load and daily.
    pub fn log_renewal(&self, now: SystemTime, t: Thresholds) {
        let days = self.days_left(now);
        let until = rfc3339(self.not_after);
        match self.renewal_state(now, t) {
            RenewalState::Ok => {}
            RenewalState::RenewalOpen => tracing::warn!(
                subject = %self.subject, days_left = days, not_after = %until,
                "the client certificate expires on {until} ({} left): it can be renewed now through the \
                 Tax Administration's certificate service (from 60 days before expiry); a renewed production \
                 certificate works at Vero API from the day after it is issued",
                days_text(days)
            ),
            RenewalState::Critical => tracing::error!(
                subject = %self.subject, days_left = days, not_after = %until,
                "the client certificate expires on {until}, in {}: renew it now; an expired certificate \
                 cannot be renewed and stops the integration",
                days_text(days)
            ),
            RenewalState::Expired => tracing::error!(
                subject = %self.subject, not_after = %until,
                "the client certificate expired on {until}: request a new one with new transfer IDs"
            ),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn info(days: i64) -> CertInfo {
        let now = unix(SystemTime::now());
        CertInfo {
            subject: "CN=x".into(),
            issuer: "CN=y".into(),
            serial: "01".into(),
            not_before: now - 86_400,
            not_after: now + days * 86_400,
            fingerprint_sha256: String::new(),
            client_auth_allowed: None,
            chain_len: 0,
            organisation: None,
        }
    }

    #[test]
    fn renewal_states_follow_the_thresholds() {
        let t = Thresholds {
            warning_days: 60,
            critical_days: 14,
        };
        let now = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(info(100).renewal_state(now, t), RenewalState::Ok);
        assert_eq!(info(60).renewal_state(now, t), RenewalState::RenewalOpen);
        assert_eq!(info(30).renewal_state(now, t), RenewalState::RenewalOpen);
        assert_eq!(info(14).renewal_state(now, t), RenewalState::Critical);
        assert_eq!(info(-1).renewal_state(now, t), RenewalState::Expired);
    }
}
