//! The admin listener: `/healthz` (alive), `/readyz` (an unexpired identity is loaded, the main
//! listener accepts, and the proxy is not draining), `/metrics` (Prometheus), `/status` (JSON),
//! `POST /reload`, and `/` (the status as a small HTML page). Readiness deliberately ignores
//! whether Vero API is reachable, so a Vero outage does not make Kubernetes restart every pod.
//! With `--allow-remote-admin`, remote peers get the probes and metrics only.

mod page;
pub mod status;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::ProxyBody;
use crate::identity::{rfc3339, Thresholds};
use crate::metrics::Metrics;
use crate::metrics::OrgLabel;
use crate::orgs::Orgs;
use crate::upstream::limit::Limiter;

/// What the admin endpoints report on.
pub struct AdminState {
    /// The identities in service.
    pub orgs: Arc<Orgs>,
    /// Upstream connections of every pool, retiring ones included.
    pub connections: Arc<crate::upstream::limit::ConnLimit>,
    /// True while the main listener accepts.
    pub accepting: AtomicBool,
    /// True from the shutdown signal on: readiness fails at once.
    pub draining: AtomicBool,
    /// Counters and histograms.
    pub metrics: Arc<Metrics>,
    /// The concurrency cap, for in-flight and queue figures.
    pub limiter: Arc<Limiter>,
    /// Renewal thresholds.
    pub thresholds: Thresholds,
    /// Process start.
    pub started: Instant,
    /// The upstream base URL.
    pub upstream_url: String,
    /// The main listener's address.
    pub listen: String,
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<ProxyBody> {
    respond(status, "application/json", body.to_string() + "\n")
}

fn is_local(ip: IpAddr) -> bool {
    crate::config::is_loopback(ip)
}

/// Answers one admin request (`method`, `path`) from `peer`.
pub async fn answer(
    state: &AdminState,
    method: &Method,
    path: &str,
    peer: IpAddr,
) -> Response<ProxyBody> {
    let public = matches!(path, "/healthz" | "/readyz" | "/metrics");
    if !public && !is_local(peer) {
        return json(
            StatusCode::FORBIDDEN,
            serde_json::json!({"error": "forbidden", "message": format!("{path} answers loopback peers only; remote peers may use /healthz, /readyz and /metrics")}),
        );
    }
    if path == "/reload" {
        if method != Method::POST {
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({"error": "method_not_allowed", "message": "use POST /reload"}),
            );
        }
        return reload(state).await;
    }
    if method != Method::GET && method != Method::HEAD {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "method_not_allowed"}),
        );
    }
    match path {
        "/healthz" => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        "/readyz" => readyz(state),
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics(state),
        ),
        "/status" => json(StatusCode::OK, status::of(state)),
        "/" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            page::render(&status::of(state)),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found", "endpoints": ["/", "/healthz", "/readyz", "/metrics", "/status", "POST /reload"]}),
        ),
    }
}

fn readyz(state: &AdminState) -> Response<ProxyBody> {
    let now = SystemTime::now();
    let mut reasons = Vec::new();
    let all = state.orgs.all();
    if all.is_empty() {
        reasons.push(format!(
            "no identity is loaded from {}",
            state
                .orgs
                .root()
                .map(|r| r.display().to_string())
                .unwrap_or_default()
        ));
    } else if state.orgs.is_dir() {
        // Several organisations: ready while any identity can serve; the others show in /status.
        if !all
            .iter()
            .any(|o| o.upstream.load().identity.info.is_valid_at(now))
        {
            reasons.push("every loaded client certificate is outside its validity".to_string());
        }
    } else {
        let info = &all[0].upstream.load().identity.info;
        if !info.is_valid_at(now) {
            reasons.push(format!(
                "the client certificate is outside its validity ({} to {})",
                rfc3339(info.not_before),
                rfc3339(info.not_after)
            ));
        }
    }
    if state.draining.load(Ordering::Relaxed) {
        reasons.push("the proxy is shutting down".to_string());
    } else if !state.accepting.load(Ordering::Relaxed) {
        reasons.push("the main listener is not accepting".to_string());
    }
    if reasons.is_empty() {
        json(StatusCode::OK, serde_json::json!({"status": "ready"}))
    } else {
        json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "not_ready", "reasons": reasons}),
        )
    }
}

/// Sets the values that are state rather than counts, then encodes everything.
fn metrics(state: &AdminState) -> String {
    let m = &state.metrics;
    let now = SystemTime::now();
    // Cleared first: a retired organisation's series disappear.
    m.not_after.clear();
    m.not_before.clear();
    m.renewal_state.clear();
    m.next_identity_state.clear();
    for org in state.orgs.all() {
        let up = org.upstream.load();
        let info = &up.identity.info;
        let label = OrgLabel {
            organisation: org
                .organisation()
                .map(|o| o.to_string())
                .unwrap_or_default(),
        };
        m.not_after.get_or_create(&label).set(info.not_after);
        m.not_before.get_or_create(&label).set(info.not_before);
        m.renewal_state
            .get_or_create(&label)
            .set(info.renewal_state(now, state.thresholds).level());
        if let Some(st) = &org.staged {
            m.next_identity_state
                .get_or_create(&label)
                .set(st.state().phase.level());
        }
    }
    m.upstream_in_flight.set(state.limiter.in_flight() as i64);
    m.upstream_queue_depth.set(state.limiter.queued() as i64);
    m.upstream_connections.set(state.connections.open() as i64);
    m.encode()
}

async fn reload(state: &AdminState) -> Response<ProxyBody> {
    let report = state.orgs.reload_all("POST /reload").await;
    let mut body = serde_json::json!({
        "result": if !report.failed.is_empty() { "failed" }
            else if report.added.is_empty() && report.reloaded.is_empty() && report.retired.is_empty() { "unchanged" }
            else { "reloaded" },
    });
    if let Some(org) = state.orgs.only().filter(|_| !state.orgs.is_dir()) {
        let info = &org.upstream.load().identity.info;
        body["identity"] = serde_json::json!({"subject": info.subject, "serial": info.serial, "not_after": rfc3339(info.not_after)});
    } else {
        body["added"] = serde_json::json!(report.added);
        body["reloaded"] = serde_json::json!(report.reloaded);
        body["retired"] = serde_json::json!(report.retired);
        body["identities"] = serde_json::json!(state.orgs.len());
    }
    let code = match report.failed.as_slice() {
        [] => StatusCode::OK,
        failed => {
            if state.orgs.is_dir() {
                body["failed"] = failed
                    .iter()
                    .map(|(name, e)| serde_json::json!({"directory": name, "error": e}))
                    .collect();
            } else {
                body["error"] = serde_json::Value::String(failed[0].1.clone());
            }
            StatusCode::UNPROCESSABLE_ENTITY
        }
    };
    json(code, body)
}

/// Serves the admin endpoints until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        answer(&state, req.method(), req.uri().path(), peer.ip()).await,
                    )
                }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
