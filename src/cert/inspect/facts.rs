//! What `cert inspect` found about one input, and the verdict on it.

use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::{rfc3339, CertInfo, RenewalState, Thresholds};
use crate::vero_ca::{self, Environment};

/// One input and what was found in it.
#[derive(Debug, Default)]
pub struct Inspected {
    /// The input as given (path or URL).
    pub input: String,
    /// `pem`, `der`, `pkcs12`, `identity-dir`, `status`.
    pub kind: &'static str,
    /// Certificates, leaf first, then the chain in the order it is sent.
    pub certs: Vec<CertFacts>,
    /// Key checks: the key inside the input (if any), then `--key`.
    pub keys: Vec<KeyCheck>,
    /// Facts about the input itself (the running proxy's version, the identity's source).
    pub notes: Vec<String>,
    /// Why the input could not be read; then there are no certificates.
    pub error: Option<String>,
    /// What makes the exit status 1, filled in by [`Inspected::judge`].
    pub problems: Vec<String>,
}

/// Whether a private key belongs to the input's leaf certificate.
#[derive(Debug)]
pub struct KeyCheck {
    /// Where the key came from.
    pub source: String,
    /// `Some(true)`: same key pair; `Some(false)`: another pair; `None`: could not be checked.
    pub matches: Option<bool>,
    /// Why it could not be checked.
    pub error: Option<String>,
}

/// Facts about one certificate.
#[derive(Debug)]
pub struct CertFacts {
    /// `leaf`, `chain`, or `next` (a running proxy's staged identity).
    pub role: &'static str,
    /// Subject, issuer, serial, validity, fingerprint.
    pub info: CertInfo,
    /// The Tax Administration CA that issued it, and how that was established.
    pub tax_ca: Option<(Environment, &'static str)>,
    /// `signature` (checked against the embedded CAs) or `name` (only the issuer's name was
    /// available, as in a proxy's /status).
    pub tax_ca_checked_by: &'static str,
    /// Key algorithm and size, e.g. ("RSA", 2048) or ("EC P-256", 256).
    pub key: Option<(String, usize)>,
    /// For chain certificates: whether this one signed the certificate before it.
    pub signed_previous: Option<bool>,
    /// A CA certificate (basicConstraints CA:TRUE).
    pub is_ca: bool,
    /// Which of the Tax Administration's own CA certificates this is, if it is one.
    pub embedded: Option<(Environment, &'static str)>,
}

impl CertFacts {
    /// Facts about `chain[0]`; `chain[1]`, if any, is checked as its issuer by the caller.
    pub fn of(
        path: &str,
        chain: &[CertificateDer<'_>],
        role: &'static str,
    ) -> Result<Self, String> {
        let info = crate::identity::load::describe(std::path::Path::new(path), chain)
            .map_err(|e| e.to_string())?;
        let der = chain.first().map(|c| c.as_ref()).unwrap_or_default();
        let parsed = X509Certificate::from_der(der).ok().map(|(_, c)| c);
        let tax_ca = vero_ca::issuing_ca(der).map(|ca| (ca.environment, ca.name));
        Ok(CertFacts {
            role,
            info,
            tax_ca,
            tax_ca_checked_by: "signature",
            key: parsed.as_ref().map(key_of),
            signed_previous: None,
            is_ca: parsed.as_ref().is_some_and(|c| c.is_ca()),
            embedded: vero_ca::embedded_ca(der),
        })
    }

    /// The Tax Administration environment, in words.
    pub fn tax_ca_text(&self) -> String {
        if let Some((env, name)) = self.embedded {
            return format!("this is the Tax Administration's {env} CA certificate \"{name}\"");
        }
        match self.tax_ca {
            Some((env, name)) => format!("Tax Administration {env} CA ({name})"),
            None if self.tax_ca_checked_by == "name" => {
                "not a Tax Administration certificate (judged by the issuer's name)".into()
            }
            None => "not a Tax Administration certificate".into(),
        }
    }

    /// The renewal state, with "not yet valid" before notBefore.
    pub fn state(&self, now: i64, t: Thresholds) -> &'static str {
        if now < self.info.not_before {
            "not_yet_valid"
        } else {
            self.info.renewal_state(at(now), t).as_str()
        }
    }

    /// The renewal window in words, with the date it opens or opened.
    pub fn renewal_text(&self, now: i64, t: Thresholds) -> String {
        let day = 86_400;
        let opens = self.info.not_after - i64::from(t.warning_days) * day;
        let left = self.info.days_left(at(now));
        if self.is_ca {
            return "does not apply to a CA certificate".into();
        }
        if now < self.info.not_before {
            return format!(
                "not valid yet: valid from {}; check this machine's clock",
                rfc3339(self.info.not_before)
            );
        }
        match self.info.renewal_state(at(now), t) {
            RenewalState::Ok => format!(
                "not yet open: opens {} (in {} days)",
                rfc3339(opens),
                (opens - now).div_euclid(day)
            ),
            RenewalState::RenewalOpen => format!(
                "open since {}: renew now through the certificate service",
                rfc3339(opens)
            ),
            RenewalState::Critical => format!(
                "closing soon: {left} days left (open since {}); renew now, an expired certificate cannot be renewed",
                rfc3339(opens)
            ),
            RenewalState::Expired => format!(
                "expired on {}: it cannot be renewed; request a new certificate with new transfer IDs",
                rfc3339(self.info.not_after)
            ),
        }
    }
}

fn at(unix_seconds: i64) -> std::time::SystemTime {
    let base = std::time::UNIX_EPOCH;
    let d = std::time::Duration::from_secs(unix_seconds.unsigned_abs());
    if unix_seconds >= 0 {
        base + d
    } else {
        base - d
    }
}

/// The key algorithm and its size in bits.
fn key_of(cert: &X509Certificate<'_>) -> (String, usize) {
    let spki = cert.public_key();
    let alg = spki.algorithm.algorithm.to_id_string();
    let param = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok())
        .map(|o| o.to_id_string());
    let bits = spki.parsed().map(|k| k.key_size()).unwrap_or(0);
    let name = match (alg.as_str(), param.as_deref()) {
        ("1.2.840.113549.1.1.1", _) => "RSA".to_string(),
        ("1.2.840.113549.1.1.10", _) => "RSA-PSS".to_string(),
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => "EC P-256".to_string(),
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => "EC P-384".to_string(),
        ("1.2.840.10045.2.1", Some("1.3.132.0.35")) => "EC P-521".to_string(),
        ("1.2.840.10045.2.1", other) => format!("EC {}", other.unwrap_or("(unknown curve)")),
        ("1.3.101.112", _) => return ("Ed25519".into(), 256),
        (other, _) => format!("OID {other}"),
    };
    (name, bits)
}

impl Inspected {
    /// An input that could not be read.
    pub fn failed(input: &str, kind: &'static str, error: String) -> Self {
        Inspected {
            input: input.to_string(),
            kind,
            error: Some(error),
            ..Default::default()
        }
    }

    /// Records what makes the exit status 1 (see the help of `cert inspect`).
    pub fn judge(&mut self, now: i64, fail_within: Option<u32>) {
        let mut problems = Vec::new();
        if let Some(e) = &self.error {
            problems.push(e.clone());
        }
        for c in &self.certs {
            let who = format!("{} certificate {}", c.role, c.info.subject);
            if now > c.info.not_after {
                problems.push(format!("{who} expired on {}", rfc3339(c.info.not_after)));
            } else if now < c.info.not_before {
                problems.push(format!(
                    "{who} is not valid until {}",
                    rfc3339(c.info.not_before)
                ));
            } else if let Some(days) = fail_within {
                if c.info.not_after - now <= i64::from(days) * 86_400 {
                    problems.push(format!(
                        "{who} expires on {}, within {days} days (--fail-within)",
                        rfc3339(c.info.not_after)
                    ));
                }
            }
        }
        for k in &self.keys {
            match (k.matches, &k.error) {
                (Some(false), _) => problems.push(format!(
                    "the private key in {} does not match the certificate: they are from different key pairs",
                    k.source
                )),
                (None, Some(e)) => problems.push(e.clone()),
                _ => {}
            }
        }
        self.problems = problems;
    }
}
