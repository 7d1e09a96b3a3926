//! The status report: what `/status` answers and `/` shows.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::AdminState;
use crate::identity::{rfc3339, unix};

/// The status as JSON.
pub fn of(state: &AdminState) -> serde_json::Value {
    let now = SystemTime::now();
    let up = state.upstream.load();
    let id = &up.identity;
    let info = &id.info;
    let stats = &state.reloader.stats;
    let last = stats.last.lock().ok().and_then(|l| l.clone()).map(|(at, trigger, outcome)| {
        let mut v = serde_json::json!({"at": rfc3339(unix(at)), "trigger": trigger, "result": outcome.as_str()});
        if let crate::reload::Outcome::Failed(msg) = outcome {
            v["error"] = serde_json::Value::String(msg);
        }
        v
    });
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "listen": state.listen,
        "upstream": state.upstream_url,
        "ready": info.is_valid_at(now) && state.accepting.load(Ordering::Relaxed) && !state.draining.load(Ordering::Relaxed),
        "identity": {
            "subject": info.subject,
            "issuer": info.issuer,
            "serial": info.serial,
            "fingerprint_sha256": info.fingerprint_sha256,
            "not_before": rfc3339(info.not_before),
            "not_after": rfc3339(info.not_after),
            "days_left": info.days_left(now),
            "renewal_state": info.renewal_state(now, state.thresholds).as_str(),
            "renewal_warning_days": state.thresholds.warning_days,
            "renewal_critical_days": state.thresholds.critical_days,
            "chain_certificates": info.chain_len,
            "source": id.source,
            "warnings": id.warnings,
        },
        "last_reload": last,
        "reloads": {
            "reloaded": stats.reloaded.load(Ordering::Relaxed),
            "unchanged": stats.unchanged.load(Ordering::Relaxed),
            "failed": stats.failed.load(Ordering::Relaxed),
        },
        "upstream_in_flight": state.limiter.in_flight(),
        "upstream_queue_depth": state.limiter.queued(),
        "upstream_connections": up.connections.open(),
    })
}
