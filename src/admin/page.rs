//! The status as a small self-contained HTML page (no external assets, no script): what an
//! operator opens through `kubectl port-forward`.

use serde_json::Value;

/// HTML-escapes text (subjects and file names are not ours to trust).
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => esc(s),
        Value::Null => "&mdash;".into(),
        other => esc(&other.to_string()),
    }
}

/// Renders the page from the status JSON.
pub fn render(st: &Value) -> String {
    let id = &st["identity"];
    let state = id["renewal_state"].as_str().unwrap_or("ok");
    let (class, words) = match state {
        "renewal_open" => ("warn", "renewal window open: renew now"),
        "critical" => ("crit", "renew immediately"),
        "expired" => ("crit", "expired: request a new certificate"),
        _ => ("ok", "no action needed"),
    };
    let row = |k: &str, v: String| format!("<tr><th>{k}</th><td>{v}</td></tr>\n");
    let mut rows = String::new();
    for (k, key) in [
        ("Organisation", "organisation"),
        ("Subject", "subject"),
        ("Issuer", "issuer"),
        ("Serial", "serial"),
        ("SHA-256", "fingerprint_sha256"),
        ("Valid from", "not_before"),
        ("Valid until", "not_after"),
        ("Source", "source"),
    ] {
        rows.push_str(&row(k, text(&id[key])));
    }
    let warnings: String = id["warnings"]
        .as_array()
        .map(|w| w.iter().map(|x| format!("<li>{}</li>", text(x))).collect())
        .unwrap_or_default();
    // With several organisations: every identity, soonest expiry first.
    let mut all: Vec<&Value> = st["identities"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    all.sort_by_key(|i| i["days_left"].as_i64().unwrap_or(i64::MAX));
    let table = if all.len() > 1 {
        let body: String = all
            .iter()
            .map(|i| {
                format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                    text(&i["organisation"]),
                    text(&i["days_left"]),
                    text(&i["renewal_state"]),
                    text(&i["not_after"])
                )
            })
            .collect();
        format!(
            "<div class=\"card\"><h2>{} identities</h2><table id=\"identities\">\n<tr><th>Organisation</th><th>Days left</th><th>Renewal</th><th>Valid until</th></tr>\n{body}</table></div>\n",
            all.len()
        )
    } else {
        String::new()
    };
    let last = &st["last_reload"];
    let last = if last.is_null() {
        "none since start".to_string()
    } else {
        format!(
            "{} by {}: {}",
            text(&last["at"]),
            text(&last["trigger"]),
            text(&last["result"])
        ) + &last
            .get("error")
            .map(|e| format!(" ({})", text(e)))
            .unwrap_or_default()
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vero-proxy status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 52rem; color: #1d2733; padding: 0 1rem; }}
h1 {{ font-size: 1.4rem; }} h2 {{ font-size: 1.1rem; margin: 0 0 .5rem; }} th {{ text-align: left; padding: .2rem 1rem .2rem 0; color: #516070; font-weight: 500; vertical-align: top; }}
td {{ font-family: ui-monospace, monospace; word-break: break-all; }}
.days {{ font-size: 2.4rem; font-weight: 700; }} .ok {{ color: #1a7f37; }} .warn {{ color: #b35900; }} .crit {{ color: #c62828; }}
.card {{ border: 1px solid #d5dbe1; border-radius: 8px; padding: 1rem 1.25rem; margin: 1rem 0; }}
</style></head>
<body>
<h1>vero-proxy {version}</h1>
<div class="card"><div id="days-left" class="days {class}" data-state="{state}">{days} days left</div>
<div id="renewal-state" class="{class}">{state}: {words}</div>
<div>Renewal possible from {warn_days} days before expiry; urgent from {crit_days}.</div></div>
<div class="card"><table>
{rows}</table>{warn_list}</div>
{table}<div class="card"><table>
<tr><th>Ready</th><td id="ready">{ready}</td></tr>
<tr><th>Upstream</th><td>{upstream}</td></tr>
<tr><th>Listening on</th><td>{listen}</td></tr>
<tr><th>In flight / queued</th><td>{in_flight} / {queued}</td></tr>
<tr><th>Last reload</th><td>{last}</td></tr>
<tr><th>Uptime</th><td>{uptime} s</td></tr>
</table></div>
<p>The same as JSON: <a href="/status">/status</a> &middot; metrics: <a href="/metrics">/metrics</a></p>
</body></html>
"#,
        version = text(&st["version"]),
        days = text(&id["days_left"]),
        warn_days = text(&id["renewal_warning_days"]),
        crit_days = text(&id["renewal_critical_days"]),
        warn_list = if warnings.is_empty() {
            String::new()
        } else {
            format!("<ul class=\"warn\">{warnings}</ul>")
        },
        ready = text(&st["ready"]),
        upstream = text(&st["upstream"]),
        listen = text(&st["listen"]),
        in_flight = text(&st["upstream_in_flight"]),
        queued = text(&st["upstream_queue_depth"]),
        uptime = text(&st["uptime_seconds"]),
    )
}
