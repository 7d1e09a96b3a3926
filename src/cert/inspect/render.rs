//! [`Inspected`] as an aligned report for a person, or as JSON for a script.

use std::fmt::Write;

use serde_json::{json, Value};

use super::facts::{CertFacts, Inspected};
use crate::identity::{rfc3339, Thresholds};

const RED: &str = "\x1b[31m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

/// The report: one block per input, one aligned line per fact.
pub fn text(all: &[Inspected], now: i64, t: Thresholds, color: bool) -> String {
    let paint = |code: &str, s: &str| {
        if color {
            format!("{code}{s}{RESET}")
        } else {
            s.to_string()
        }
    };
    let mut out = String::new();
    for (n, i) in all.iter().enumerate() {
        if n > 0 {
            out.push('\n');
        }
        let _ = writeln!(out, "{}", paint(BOLD, &format!("{} ({})", i.input, i.kind)));
        let mut line = |label: &str, value: &str| {
            let _ = writeln!(out, "  {label:<14}{value}");
        };
        for c in &i.certs {
            if c.role == "chain" {
                continue;
            }
            if c.role == "next" {
                line("next identity", "staged, not yet in service:");
            }
            cert_lines(&mut line, c, now, t);
        }
        if i.kind != "status" && !i.certs.is_empty() {
            let chain: Vec<&CertFacts> = i.certs.iter().filter(|c| c.role == "chain").collect();
            match (chain.is_empty(), i.certs.first().and_then(|c| c.tax_ca)) {
                (true, Some((_, name))) => line(
                    "chain sent",
                    &format!(
                        "the leaf alone; sending \"{name}\" after it is the safe choice \
                         (whether Vero API needs it is undocumented)"
                    ),
                ),
                (true, None) => line("chain sent", "the leaf alone (no CA certificate after it)"),
                _ => {}
            }
            for (k, c) in chain.iter().enumerate() {
                let label = if k == 0 { "chain sent" } else { "" };
                let signed = match c.signed_previous {
                    Some(true) => "issued the one before",
                    _ => "did NOT issue the one before",
                };
                let tax = match c.embedded.or(c.tax_ca) {
                    Some((env, _)) => format!("Tax Administration {env} CA; "),
                    None => String::new(),
                };
                line(
                    label,
                    &format!(
                        "{}. {} ({tax}until {}; {signed})",
                        k + 1,
                        c.info.subject,
                        date(c.info.not_after)
                    ),
                );
            }
        }
        for k in &i.keys {
            let verdict = match (k.matches, &k.error) {
                (Some(true), _) => format!("the key in {} matches", k.source),
                (Some(false), _) => paint(RED, &format!("the key in {} does NOT match", k.source)),
                (None, Some(e)) => paint(RED, e),
                (None, None) => format!("the key in {} could not be checked", k.source),
            };
            line("key match", &verdict);
        }
        for note in &i.notes {
            line("note", note);
        }
        if i.problems.is_empty() {
            line("result", "ok");
        }
        for p in &i.problems {
            line("result", &paint(RED, &format!("problem: {p}")));
        }
    }
    out
}

fn cert_lines(line: &mut impl FnMut(&str, &str), c: &CertFacts, now: i64, t: Thresholds) {
    let info = &c.info;
    if let Some(org) = &c.organisation {
        line("organisation", org);
    }
    line("subject", &info.subject);
    line("issuer", &info.issuer);
    line("issued by", &c.tax_ca_text());
    line("serial", &info.serial);
    line("valid from", &rfc3339(info.not_before));
    line(
        "valid until",
        &format!(
            "{} ({} left)",
            rfc3339(info.not_after),
            crate::identity::days_text((info.not_after - now).div_euclid(86_400))
        ),
    );
    line("renewal", &c.renewal_text(now, t));
    line("sha256", &info.fingerprint_sha256);
    if let Some((alg, bits)) = &c.key {
        line("key", &format!("{alg}, {bits} bits"));
    }
    if info.client_auth_allowed == Some(false) {
        line(
            "usage",
            "its extended key usage does not allow TLS client authentication",
        );
    }
}

fn date(ts: i64) -> String {
    rfc3339(ts).chars().take(10).collect()
}

/// The JSON form: `{"ok": bool, "inputs": [{"input", "kind", "error", "certificates": [...],
/// "keys": [...], "notes", "problems"}]}`.
pub fn json(all: &[Inspected], now: i64, t: Thresholds, ok: bool) -> Value {
    let inputs: Vec<Value> = all
        .iter()
        .map(|i| {
            json!({
                "input": i.input,
                "kind": i.kind,
                "error": i.error,
                "certificates": i.certs.iter().map(|c| cert_json(c, now, t)).collect::<Vec<_>>(),
                "keys": i.keys.iter().map(|k| json!({
                    "source": k.source,
                    "matches": k.matches,
                    "error": k.error,
                })).collect::<Vec<_>>(),
                "notes": i.notes,
                "problems": i.problems,
            })
        })
        .collect();
    json!({ "ok": ok, "inputs": inputs })
}

fn cert_json(c: &CertFacts, now: i64, t: Thresholds) -> Value {
    let info = &c.info;
    json!({
        "role": c.role,
        "organisation": c.organisation,
        "subject": info.subject,
        "issuer": info.issuer,
        "tax_administration": {
            "environment": c.tax_ca.map(|(env, _)| env),
            "ca": c.tax_ca.map(|(_, name)| name),
            "checked_by": c.tax_ca_checked_by,
        },
        "serial": info.serial,
        "not_before": rfc3339(info.not_before),
        "not_after": rfc3339(info.not_after),
        "days_left": (info.not_after - now).div_euclid(86_400),
        "renewal": {
            "state": c.state(now, t),
            "window_opens": rfc3339(info.not_after - i64::from(t.warning_days) * 86_400),
            "text": c.renewal_text(now, t),
        },
        "fingerprint_sha256": info.fingerprint_sha256,
        "key_type": c.key.as_ref().map(|(alg, _)| alg),
        "key_bits": c.key.as_ref().map(|(_, bits)| bits),
        "client_auth_allowed": info.client_auth_allowed,
        "issued_previous": c.signed_previous,
        "is_ca": c.is_ca,
        "tax_administration_ca_certificate": c.embedded.map(|(env, name)| json!({"environment": env, "name": name})),
    })
}
