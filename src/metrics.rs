//! Prometheus metrics (prometheus-client): counted on the data path, and the values that are
//! state (identity times, queue, in flight) read at scrape time.

use std::sync::atomic::AtomicU64;
use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of `vero_proxy_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Standard method name, or `other`.
    pub method: &'static str,
    /// `2xx`, `4xx` ...
    pub status_class: &'static str,
}

/// Labels with a reason or result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// The proxy's error code.
    pub reason: &'static str,
}

/// Labels of `vero_proxy_identity_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadResult {
    /// `reloaded`, `unchanged` or `failed`.
    pub result: &'static str,
}

/// Label of the per-identity metrics: the organisation's business ID (empty for a single
/// identity whose certificate names none).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OrgLabel {
    /// Business ID.
    pub organisation: String,
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by method and status class.
    pub requests: Family<RequestLabels, Counter>,
    /// Time from request head to the end of the answer.
    pub duration: Histogram,
    /// The proxy's own failures, by error code.
    pub upstream_errors: Family<Reason, Counter>,
    /// Application connections open now.
    pub client_connections: Gauge,
    /// Request body bytes sent upstream.
    pub request_bytes: Counter,
    /// Response body bytes sent to applications.
    pub response_bytes: Counter,
    /// Identity reloads, by result.
    pub reloads: Family<ReloadResult, Counter>,
    /// Requests in flight upstream (set at scrape).
    pub upstream_in_flight: Gauge,
    /// Requests waiting for a place (set at scrape).
    pub upstream_queue_depth: Gauge,
    /// Upstream connections open (set at scrape).
    pub upstream_connections: Gauge,
    /// notAfter of each certificate in service, Unix seconds (set at scrape).
    pub not_after: Family<OrgLabel, Gauge>,
    /// notBefore of the certificate in service, Unix seconds (set at scrape).
    pub not_before: Family<OrgLabel, Gauge>,
    /// 0 ok, 1 renewal window open, 2 critical, 3 expired (set at scrape).
    pub renewal_state: Family<OrgLabel, Gauge>,
    /// Staged next identity: 0 none, 1 waiting, 2 active, 3 rejected (set at scrape).
    pub next_identity_state: Family<OrgLabel, Gauge>,
    /// Automatic renewals, by result.
    pub renewals: Family<ReloadResult, Counter>,
    /// The `requests` counter of each (method, status class), taken from the family at first
    /// use: `get_or_create` hashes the labels under a lock, on every request otherwise. A series
    /// still appears only once counted.
    request_counters: [OnceLock<Counter>; METHOD_LABELS.len() * STATUS_CLASSES.len()],
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            requests: Family::default(),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            upstream_errors: Family::default(),
            client_connections: Gauge::default(),
            request_bytes: Counter::default(),
            response_bytes: Counter::default(),
            reloads: Family::default(),
            upstream_in_flight: Gauge::default(),
            upstream_queue_depth: Gauge::default(),
            upstream_connections: Gauge::default(),
            not_after: Family::default(),
            not_before: Family::default(),
            renewal_state: Family::default(),
            next_identity_state: Family::default(),
            renewals: Family::default(),
            request_counters: std::array::from_fn(|_| OnceLock::new()),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "vero_proxy_requests",
            "Requests answered, by method and status class",
            m.requests.clone(),
        );
        r.register(
            "vero_proxy_request_duration_seconds",
            "Time from request head to the end of the answer",
            m.duration.clone(),
        );
        r.register(
            "vero_proxy_upstream_errors",
            "The proxy's own failures, by error code",
            m.upstream_errors.clone(),
        );
        r.register(
            "vero_proxy_client_connections",
            "Application connections open",
            m.client_connections.clone(),
        );
        r.register(
            "vero_proxy_request_bytes",
            "Request body bytes sent upstream",
            m.request_bytes.clone(),
        );
        r.register(
            "vero_proxy_response_bytes",
            "Response body bytes sent to applications",
            m.response_bytes.clone(),
        );
        r.register(
            "vero_proxy_identity_reloads",
            "Identity reloads, by result",
            m.reloads.clone(),
        );
        r.register(
            "vero_proxy_upstream_in_flight",
            "Requests in flight to the upstream",
            m.upstream_in_flight.clone(),
        );
        r.register(
            "vero_proxy_upstream_queue_depth",
            "Requests waiting for a place under the concurrency cap",
            m.upstream_queue_depth.clone(),
        );
        r.register(
            "vero_proxy_upstream_connections",
            "Upstream connections open or connecting",
            m.upstream_connections.clone(),
        );
        r.register(
            "vero_proxy_identity_not_after_timestamp_seconds",
            "notAfter of the client certificate in service",
            m.not_after.clone(),
        );
        r.register(
            "vero_proxy_identity_not_before_timestamp_seconds",
            "notBefore of the client certificate in service",
            m.not_before.clone(),
        );
        r.register(
            "vero_proxy_identity_renewal_state",
            "0 ok, 1 renewal window open, 2 critical (few days left), 3 expired",
            m.renewal_state.clone(),
        );
        r.register(
            "vero_proxy_next_identity_state",
            "Staged next identity: 0 none, 1 waiting, 2 active, 3 rejected",
            m.next_identity_state.clone(),
        );
        r.register(
            "vero_proxy_renewals",
            "Automatic certificate renewals through the certificate service, by result",
            m.renewals.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts one answered request.
    pub fn record(&self, method: &http::Method, status: u16, seconds: f64) {
        let (m, c) = (method_index(method), status_index(status));
        self.request_counters[m * STATUS_CLASSES.len() + c]
            .get_or_init(|| {
                self.requests
                    .get_or_create(&RequestLabels {
                        method: METHOD_LABELS[m],
                        status_class: STATUS_CLASSES[c],
                    })
                    .clone()
            })
            .inc();
        self.duration.observe(seconds);
    }
}

/// Method labels: the standard methods by name, anything else `other` (unbounded label values
/// would let any client grow the metrics without limit).
const METHOD_LABELS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "other",
];

/// Status class labels.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn method_index(m: &http::Method) -> usize {
    METHOD_LABELS[..METHOD_LABELS.len() - 1]
        .iter()
        .position(|l| *l == m.as_str())
        .unwrap_or(METHOD_LABELS.len() - 1)
}

/// The method as a label.
pub fn method_label(m: &http::Method) -> &'static str {
    METHOD_LABELS[method_index(m)]
}

fn status_index(s: u16) -> usize {
    match s / 100 {
        1..=4 => usize::from(s / 100 - 1),
        _ => 4,
    }
}

/// A byte counter shared between a body and whoever reports on it.
pub type ByteCount = std::sync::Arc<AtomicU64>;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_method_and_status_class() {
        let m = Metrics::new();
        m.record(&http::Method::GET, 200, 0.01);
        m.record(&http::Method::GET, 204, 0.01);
        m.record(&http::Method::from_bytes(b"PURGE").unwrap(), 503, 0.01);
        m.record(&http::Method::POST, 99, 0.01);
        let text = m.encode();
        assert!(text.contains(r#"vero_proxy_requests_total{method="GET",status_class="2xx"} 2"#));
        assert!(text.contains(r#"vero_proxy_requests_total{method="other",status_class="5xx"} 1"#));
        assert!(text.contains(r#"vero_proxy_requests_total{method="POST",status_class="5xx"} 1"#));
        assert!(!text.contains(r#"status_class="4xx""#));
        assert_eq!(method_label(&http::Method::TRACE), "TRACE");
    }
}
