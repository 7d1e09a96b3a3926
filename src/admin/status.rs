//! The status report: what `/status` answers and `/` shows.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::AdminState;
use crate::identity::{rfc3339, unix, Thresholds};
use crate::orgs::Org;

/// One identity in service, as JSON.
fn identity_of(org: &Org, now: SystemTime, t: Thresholds) -> serde_json::Value {
    let up = org.upstream.load();
    let id = &up.identity;
    let info = &id.info;
    let stats = &org.reloader.stats;
    let last = stats.last.lock().ok().and_then(|l| l.clone()).map(|(at, trigger, outcome)| {
        let mut v = serde_json::json!({"at": rfc3339(unix(at)), "trigger": trigger, "result": outcome.as_str()});
        if let crate::reload::Outcome::Failed(msg) = outcome {
            v["error"] = serde_json::Value::String(msg);
        }
        v
    });
    serde_json::json!({
        "organisation": org.organisation(),
        "subject": info.subject,
        "issuer": info.issuer,
        "serial": info.serial,
        "fingerprint_sha256": info.fingerprint_sha256,
        "not_before": rfc3339(info.not_before),
        "not_after": rfc3339(info.not_after),
        "days_left": info.days_left(now),
        "renewal_state": info.renewal_state(now, t).as_str(),
        "renewal_warning_days": t.warning_days,
        "renewal_critical_days": t.critical_days,
        "chain_certificates": info.chain_len,
        "source": id.source,
        "warnings": id.warnings,
        "last_reload": last,
        "reloads": {
            "reloaded": stats.reloaded.load(Ordering::Relaxed),
            "unchanged": stats.unchanged.load(Ordering::Relaxed),
            "failed": stats.failed.load(Ordering::Relaxed),
        },
        "upstream_in_flight": org.limiter.as_ref().map(|l| l.in_flight()),
        "next": org.staged.as_ref().map(|s| s.state()),
    })
}

/// The status as JSON. `identity` is the single identity, or with several the one that expires
/// first (the one that needs attention); `identities` lists them all.
pub fn of(state: &AdminState) -> serde_json::Value {
    let now = SystemTime::now();
    let t = state.thresholds;
    let all = state.orgs.all();
    let identities: Vec<serde_json::Value> = all.iter().map(|o| identity_of(o, now, t)).collect();
    let first_to_expire = all
        .iter()
        .enumerate()
        .min_by_key(|(_, o)| o.upstream.load().identity.info.not_after)
        .map(|(i, _)| i);
    let identity = first_to_expire
        .and_then(|i| identities.get(i).cloned())
        .unwrap_or(serde_json::Value::Null);
    let ready = all
        .iter()
        .any(|o| o.upstream.load().identity.info.is_valid_at(now))
        && state.accepting.load(Ordering::Relaxed)
        && !state.draining.load(Ordering::Relaxed);
    let sum = |key: &str| -> u64 {
        identities
            .iter()
            .filter_map(|i| i["reloads"][key].as_u64())
            .sum()
    };
    let last_reload = identities
        .iter()
        .filter(|i| !i["last_reload"].is_null())
        .max_by(|a, b| {
            a["last_reload"]["at"]
                .as_str()
                .cmp(&b["last_reload"]["at"].as_str())
        })
        .map(|i| i["last_reload"].clone())
        .unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "listen": state.listen,
        "upstream": state.upstream_url,
        "ready": ready,
        "identities_dir": state.orgs.root().map(|r| r.display().to_string()),
        "identity": identity,
        "identities": identities,
        "last_reload": last_reload,
        "reloads": {
            "reloaded": sum("reloaded"),
            "unchanged": sum("unchanged"),
            "failed": sum("failed"),
        },
        "upstream_in_flight": state.limiter.in_flight(),
        "upstream_queue_depth": state.limiter.queued(),
        "upstream_connections": state.connections.open(),
    })
}
