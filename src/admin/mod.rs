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
use crate::reload::Reloader;
use crate::upstream::limit::Limiter;
use crate::upstream::SharedUpstream;

/// What the admin endpoints report on.
pub struct AdminState {
    /// The identity in service.
    pub upstream: SharedUpstream,
    /// True while the main listener accepts.
    pub accepting: AtomicBool,
    /// True from the shutdown signal on: readiness fails at once.
    pub draining: AtomicBool,
    /// Loads the identity again on `POST /reload`.
    pub reloader: Arc<Reloader>,
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
    let up = state.upstream.load();
    let info = &up.identity.info;
    let mut reasons = Vec::new();
    if !info.is_valid_at(SystemTime::now()) {
        reasons.push(format!(
            "the client certificate is outside its validity ({} to {})",
            rfc3339(info.not_before),
            rfc3339(info.not_after)
        ));
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
    let up = state.upstream.load();
    let info = &up.identity.info;
    m.not_after.set(info.not_after);
    m.not_before.set(info.not_before);
    m.renewal_state.set(
        info.renewal_state(SystemTime::now(), state.thresholds)
            .level(),
    );
    m.upstream_in_flight.set(state.limiter.in_flight() as i64);
    m.upstream_queue_depth.set(state.limiter.queued() as i64);
    m.upstream_connections.set(up.connections.open() as i64);
    m.encode()
}

async fn reload(state: &AdminState) -> Response<ProxyBody> {
    let outcome = state.reloader.reload("POST /reload").await;
    let info = &state.upstream.load().identity.info;
    let mut body = serde_json::json!({
        "result": outcome.as_str(),
        "identity": {"subject": info.subject, "serial": info.serial, "not_after": rfc3339(info.not_after)},
    });
    let code = match &outcome {
        crate::reload::Outcome::Failed(msg) => {
            body["error"] = serde_json::Value::String(msg.clone());
            StatusCode::UNPROCESSABLE_ENTITY
        }
        _ => StatusCode::OK,
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
