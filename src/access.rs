//! One access line and one set of metric updates per request, written when the answer has
//! ended (so bytes and the whole duration are known). Never the query string, never header
//! values, never bodies: queries to Vero API can carry personal identity codes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Request};

use crate::error::ProxyError;
use crate::metrics::{ByteCount, Metrics, Reason};

/// What is known about one request until its answer ends.
pub struct Exchange {
    /// The request id (the application's `x-request-id` when usable, else ours).
    pub id: String,
    method: Method,
    /// The request's URI (a cheap clone); only its path is ever logged.
    uri: http::Uri,
    started: Instant,
    /// Time from sending upstream to the upstream's response headers.
    pub upstream_ms: Option<f64>,
    /// The identity the request went out with (its serial is logged).
    pub identity: Option<Arc<crate::identity::Identity>>,
    /// The organisation the request was for (with several identities, or a CN business ID).
    pub organisation: Option<crate::business_id::BusinessId>,
    /// Request body bytes sent upstream.
    pub request_bytes: ByteCount,
    metrics: Arc<Metrics>,
}

/// The application's `x-request-id`, when it is a sane token (1-128 visible characters of
/// `A-Za-z0-9._:-`); anything else is replaced, so it cannot carry odd bytes into logs.
pub fn request_id_of<B>(req: &Request<B>) -> Option<String> {
    let v = req.headers().get("x-request-id")?.to_str().ok()?;
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    ok.then(|| v.to_owned())
}

/// The id as a header value (always valid: ids are checked or made of hex and '-').
pub fn id_header(id: &str) -> HeaderValue {
    HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("invalid"))
}

impl Exchange {
    /// Starts the record of a request.
    pub fn new<B>(id: String, req: &Request<B>, metrics: Arc<Metrics>) -> Exchange {
        Exchange {
            id,
            method: req.method().clone(),
            uri: req.uri().clone(),
            started: Instant::now(),
            upstream_ms: None,
            identity: None,
            organisation: None,
            request_bytes: ByteCount::default(),
            metrics,
        }
    }

    fn ms(&self) -> f64 {
        (self.started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0
    }

    /// The proxy answered itself.
    pub fn failed(self, e: &ProxyError) {
        let status = e.status().as_u16();
        self.metrics
            .record(&self.method, status, self.started.elapsed().as_secs_f64());
        self.metrics
            .upstream_errors
            .get_or_create(&Reason { reason: e.code() })
            .inc();
        tracing::warn!(
            target: "access",
            request_id = %self.id,
            method = %self.method,
            path = %self.uri.path(),
            status,
            error = e.code(),
            ms = self.ms(),
            upstream_ms = self.upstream_ms,
            serial = self.identity.as_ref().map(|i| i.info.serial.as_str()),
            organisation = self.organisation.as_ref().map(|o| o.as_str()),
            "{e}"
        );
    }

    /// The upstream's answer has ended (`complete`), or was cut off.
    pub fn finished(self, status: u16, response_bytes: u64, complete: bool) {
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        self.metrics
            .record(&self.method, status, self.started.elapsed().as_secs_f64());
        self.metrics.request_bytes.inc_by(request_bytes);
        self.metrics.response_bytes.inc_by(response_bytes);
        let fields = (&self.id, &self.method, self.uri.path());
        if complete {
            tracing::info!(
                target: "access",
                request_id = %fields.0, method = %fields.1, path = %fields.2, status,
                request_bytes, response_bytes, ms = self.ms(), upstream_ms = self.upstream_ms,
                serial = self.identity.as_ref().map(|i| i.info.serial.as_str()),
                organisation = self.organisation.as_ref().map(|o| o.as_str())
            );
        } else {
            tracing::warn!(
                target: "access",
                request_id = %fields.0, method = %fields.1, path = %fields.2, status,
                request_bytes, response_bytes, ms = self.ms(), upstream_ms = self.upstream_ms,
                serial = self.identity.as_ref().map(|i| i.info.serial.as_str()),
                organisation = self.organisation.as_ref().map(|o| o.as_str()),
                "the answer was cut off before its end (the application went away or the upstream failed mid-body)"
            );
        }
    }
}
