//! The admin listener: `/healthz` (the process is alive) and `/readyz` (an unexpired identity is
//! loaded and the main listener accepts). Readiness deliberately ignores whether Vero API is
//! reachable, so a Vero outage does not make Kubernetes restart every pod.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::ProxyBody;
use crate::identity::rfc3339;
use crate::upstream::SharedUpstream;

/// What the admin endpoints report on.
pub struct AdminState {
    /// The identity in service.
    pub upstream: SharedUpstream,
    /// True while the main listener accepts.
    pub accepting: AtomicBool,
    /// Loads the identity again on `POST /reload`.
    pub reloader: Arc<crate::reload::Reloader>,
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body.to_string() + "\n"));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Answers one admin request.
pub async fn answer(state: &AdminState, req: &Request<Incoming>) -> Response<ProxyBody> {
    if req.uri().path() == "/reload" {
        if req.method() != Method::POST {
            return json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({"error": "method_not_allowed", "message": "use POST /reload"}),
            );
        }
        let outcome = state.reloader.reload("POST /reload").await;
        let info = &state.upstream.load().identity.info;
        let mut body = serde_json::json!({
            "result": outcome.as_str(),
            "identity": {"subject": info.subject, "serial": info.serial, "not_after": rfc3339(info.not_after)},
        });
        let status = match &outcome {
            crate::reload::Outcome::Failed(msg) => {
                body["error"] = serde_json::Value::String(msg.clone());
                StatusCode::UNPROCESSABLE_ENTITY
            }
            _ => StatusCode::OK,
        };
        return json(status, body);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "method_not_allowed"}),
        );
    }
    match req.uri().path() {
        "/healthz" => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
        "/readyz" => {
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
            if !state.accepting.load(Ordering::Relaxed) {
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
        _ => json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not_found", "endpoints": ["/healthz", "/readyz", "POST /reload"]}),
        ),
    }
}

/// Serves the admin endpoints until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let (stream, _) = tokio::select! {
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
                async move { Ok::<_, std::convert::Infallible>(answer(&state, &req).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
