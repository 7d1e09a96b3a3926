//! The request service: refuse what must not pass, rewrite URI and headers, forward under the
//! concurrency cap, and turn every failure into the proxy's JSON answer.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;
use tokio_util::sync::CancellationToken;

use crate::access::{id_str, request_id_of, Exchange, RequestIds, X_REQUEST_ID};
use crate::body::{ProxyBody, RequestBody, UpstreamBody};
use crate::config::UpstreamTarget;
use crate::error::{find_tls_error, ProxyError};
use crate::gate::Gate;
use crate::identity::rfc3339;
use crate::metrics::{ByteCount, Metrics};
use crate::orgs::{Orgs, Route, ORG_HEADER};
use crate::upstream::conn::{Return, SendError};
use crate::upstream::limit::{Limiter, Places};
use crate::upstream::{tls, Upstream};

/// The organisation header as a name made once (a `&str` key is parsed on every lookup).
static ORG_HEADER_NAME: HeaderName = HeaderName::from_static(ORG_HEADER);

/// Headers set on every forwarded request (`--add-header`), swapped when a value file changes.
pub type AddedHeaders = Arc<ArcSwap<Vec<(HeaderName, HeaderValue)>>>;

/// The forwarding service shared by every client connection.
pub struct Proxy {
    /// The identities in service, by organisation.
    pub orgs: Arc<Orgs>,
    /// Concurrency cap towards the upstream.
    pub limiter: Arc<Limiter>,
    /// Which requests may pass.
    pub gate: Gate,
    /// Where requests go.
    pub target: UpstreamTarget,
    /// Headers the proxy adds.
    pub added_headers: AddedHeaders,
    /// Time allowed for response headers.
    pub response_timeout: Duration,
    /// Cancelled when the proxy starts draining.
    pub shutdown: CancellationToken,
    /// Counters and histograms.
    pub metrics: Arc<Metrics>,
    /// Request ids for requests that bring none.
    pub ids: RequestIds,
}

/// Whether a header is hop-by-hop (RFC 9110 section 7.6.1) and never forwarded as is.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop_index(name).is_some()
}

/// The hop-by-hop headers of RFC 9110 section 7.6.1, plus the old `Proxy-Connection`.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// `TE`'s index in `HOP_BY_HOP`.
const TE: usize = 5;

/// Where a name is in `HOP_BY_HOP` (a match on the text: cheaper than comparing names).
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "proxy-authenticate" => Some(3),
        "proxy-authorization" => Some(4),
        "te" => Some(5),
        "transfer-encoding" => Some(6),
        "upgrade" => Some(7),
        _ => None,
    }
}

/// Which of the names the proxy looks at a request carries, found in one pass over its header
/// names: looking up or removing a name the message does not carry still hashes it, and most
/// requests carry only `Host` of these.
#[derive(Default)]
struct Names {
    /// By `HOP_BY_HOP` index.
    hop: [bool; HOP_BY_HOP.len()],
    host: bool,
    organisation: bool,
    expect: bool,
    via: bool,
    request_id: bool,
    /// `Origin` or `Sec-Fetch-Site`: what a web browser adds.
    browser: bool,
}

impl Names {
    fn of(headers: &HeaderMap) -> Names {
        let mut n = Names::default();
        for name in headers.keys() {
            match name.as_str() {
                "host" => n.host = true,
                ORG_HEADER => n.organisation = true,
                "expect" => n.expect = true,
                "via" => n.via = true,
                "x-request-id" => n.request_id = true,
                "origin" | "sec-fetch-site" => n.browser = true,
                _ => {
                    if let Some(i) = hop_by_hop_index(name) {
                        n.hop[i] = true;
                    }
                }
            }
        }
        n
    }
}

/// Removes hop-by-hop headers, including those named in `Connection`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = [false; HOP_BY_HOP.len()];
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present[i] = true;
        }
    }
    strip_present(headers, present);
}

/// `strip_hop_by_hop` once the hop-by-hop names the message carries are known: each removal
/// hashes its name, so only what is there is removed (most messages carry none, or only
/// `Connection`).
fn strip_present(headers: &mut HeaderMap, present: [bool; HOP_BY_HOP.len()]) {
    if !present.contains(&true) {
        return;
    }
    // Names that `Connection` lists and the message carries. `keep-alive`, the usual one, is
    // removed below with the other hop-by-hop names, so it is not looked up by text here.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| !n.eq_ignore_ascii_case("keep-alive") && headers.contains_key(*n))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for (n, there) in HOP_BY_HOP.iter().zip(present) {
        if there {
            headers.remove(n);
        }
    }
}

impl Proxy {
    /// Serves one request from an application, for the organisation `route` picks.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        route: Route,
    ) -> Response<ProxyBody> {
        let names = Names::of(req.headers());
        let id = names
            .request_id
            .then(|| request_id_of(&req))
            .flatten()
            .unwrap_or_else(|| self.ids.next());
        let mut log = Some(Exchange::new(id.clone(), &req, self.metrics.clone()));
        let mut resp = match self.forward(req, names, route, &mut log).await {
            Ok(resp) => resp,
            Err(e) => {
                if let Some(log) = log.take() {
                    log.failed(&e);
                }
                e.to_response(id_str(&id)).map(ProxyBody::full)
            }
        };
        resp.headers_mut().insert(&X_REQUEST_ID, id);
        resp
    }

    /// Forwards; on success the answer's body carries `log` to the end of the answer.
    async fn forward(
        &self,
        req: Request<Incoming>,
        names: Names,
        route: Route,
        log: &mut Option<Exchange>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if self.shutdown.is_cancelled() {
            return Err(ProxyError::ShuttingDown);
        }
        if req.method() == Method::CONNECT {
            return Err(ProxyError::ConnectNotSupported);
        }
        self.gate.check(&req, &self.target, names.browser)?;
        let org = self.orgs.select(
            route,
            names
                .organisation
                .then(|| req.headers().get_all(&ORG_HEADER_NAME))
                .into_iter()
                .flatten(),
        )?;
        if let Some(l) = log.as_mut() {
            l.organisation = org.organisation();
        }

        let (mut head, body) = self.rewrite(req, &names).into_parts();
        if let Some(l) = log.as_ref() {
            head.headers.insert(&X_REQUEST_ID, l.id.clone());
        }
        let head = Head {
            method: head.method,
            uri: head.uri,
            headers: head.headers,
        };
        // Read before taking a place under the cap, so a slow client never holds one.
        let body = read_small_body(body).await?;
        if let Some(l) = log.as_mut() {
            match &body {
                RequestBody::Full(b) => l.request_bytes = b.as_ref().map_or(0, |b| b.len() as u64),
                RequestBody::Stream(_, counted) => l.streamed = Some(counted.clone()),
            }
        }
        let permit = Places::acquire(&self.limiter, org.limiter.as_deref()).await?;
        // The snapshot is taken once the request may go: one that waited in the queue across
        // an identity swap goes out with the new identity, not on a retired pool.
        let upstream: Arc<Upstream> = org.upstream.load_full();
        let now = crate::identity::unix(SystemTime::now());
        if now > upstream.identity.info.not_after {
            return Err(ProxyError::ClientCertificateExpired(format!(
                "the client certificate in service ({}) expired on {}; install a renewed certificate",
                upstream.identity.info.subject,
                rfc3339(upstream.identity.info.not_after)
            )));
        }
        if let Some(l) = log.as_mut() {
            l.identity = Some(upstream.identity.clone());
        }
        let sent_at = Instant::now();
        let sent =
            tokio::time::timeout(self.response_timeout, self.exchange(&upstream, head, body))
                .await
                .map_err(|_| ProxyError::UpstreamTimeout(self.response_timeout))??;

        let (resp, conn_return) = sent;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.version = Version::HTTP_11;
        let status = parts.status.as_u16();
        let Some(mut log) = log.take() else {
            return Err(ProxyError::UpstreamUnreachable(
                "internal: request record missing".into(),
            ));
        };
        log.upstream_ms = Some((sent_at.elapsed().as_secs_f64() * 10_000.0).round() / 10.0);
        let body = UpstreamBody::new(
            body,
            permit,
            conn_return,
            (log, status),
            self.response_timeout,
        );
        Ok(Response::from_parts(
            parts,
            ProxyBody::Upstream(Box::new(body)),
        ))
    }

    /// Sends the request, again when it provably did not reach the upstream: once after a
    /// pooled connection the server had closed before anything was sent, and up to
    /// `REFUSED_RETRIES` times after an HTTP/2 stream the server refused unprocessed (graceful
    /// GOAWAY, REFUSED_STREAM), when the body was kept.
    async fn exchange(
        &self,
        upstream: &Upstream,
        head: Head,
        body: RequestBody,
    ) -> Result<(Response<Incoming>, Option<Return>), ProxyError> {
        let who = || upstream.identity.info.who();
        // Only HTTP/2 refuses streams unprocessed; the copy for a replay is made on such a
        // connection only, so HTTP/1.1 requests do not pay for it.
        let mut backup: Option<(Head, bytes::Bytes)> = None;
        let mut req = head.into_request(body);
        let (mut fresh_connection, mut refusals) = (false, 0);
        // A stale HTTP/1.1 connection is followed by a new one of the request's own; a stale
        // HTTP/2 one (already forgotten by the pool) by the pool's next shared one, so the
        // requests it failed together do not each make a connection.
        let mut own_connection = false;
        loop {
            let conn = if own_connection {
                upstream.pool.connect().await?
            } else {
                upstream.pool.checkout().await?
            };
            let reused = conn.reused;
            let h2 = conn.is_h2();
            if backup.is_none() && h2 {
                if let RequestBody::Full(Some(b)) = req.body() {
                    backup = Some((Head::of(&req), b.clone()));
                }
            }
            match conn.send(req, &self.target.authority).await {
                Ok(ok) => return Ok(ok),
                Err(SendError {
                    request: Some(unsent),
                    error,
                    tls: None,
                    ..
                }) if reused && !fresh_connection => {
                    tracing::debug!(error = %error, "pooled connection was closed; retrying on a new one");
                    req = unsent;
                    fresh_connection = true;
                    own_connection = !h2;
                }
                Err(e) if e.refused_unprocessed && refusals < REFUSED_RETRIES => {
                    let Some((head, bytes)) = backup.clone() else {
                        return Err(self.classify(
                            e,
                            &who(),
                            "and its body was too large to keep for a second try",
                        ));
                    };
                    refusals += 1;
                    tracing::debug!(error = %e.error, refusals, "the upstream refused the stream unprocessed; sending it again");
                    req = head.into_request(RequestBody::Full(Some(bytes)));
                    (fresh_connection, own_connection) = (false, false);
                }
                Err(e) => return Err(self.classify(e, &who(), "on every try")),
            }
        }
    }

    /// The request as it goes upstream: base path + path and query byte for byte, hop-by-hop
    /// headers removed, `Via` added, configured headers set.
    fn rewrite(&self, req: Request<Incoming>, names: &Names) -> Request<Incoming> {
        let (mut parts, body) = req.into_parts();
        let wants_trailers = names.hop[TE]
            && parts
                .headers
                .get_all(header::TE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| {
                    v.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
                });
        // Removals and lookups below still cope with a name `Connection` listed and took away.
        strip_present(&mut parts.headers, names.hop);
        if names.host {
            parts.headers.remove(header::HOST);
        }
        // Meant for the proxy: which identity to use.
        if names.organisation {
            parts.headers.remove(&ORG_HEADER_NAME);
        }
        // hyper's server already answered the application's Expect: 100-continue.
        if names.expect {
            parts.headers.remove(header::EXPECT);
        }
        if wants_trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        let prev = names.via.then(|| parts.headers.get(header::VIA)).flatten();
        let via = match prev.and_then(|v| v.to_str().ok()) {
            Some(prev) => HeaderValue::from_str(&format!("{prev}, 1.1 vero-proxy"))
                .unwrap_or(HeaderValue::from_static("1.1 vero-proxy")),
            None => HeaderValue::from_static("1.1 vero-proxy"),
        };
        parts.headers.insert(header::VIA, via);
        for (name, value) in self.added_headers.load().iter() {
            parts.headers.insert(name.clone(), value.clone());
        }
        let origin_form = parts.uri.scheme().is_none() && parts.uri.path().starts_with('/');
        if origin_form && self.target.base_path.is_empty() {
            // The common case: the path and query go up exactly as they came.
            return Request::from_parts(parts, body);
        }
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let pq = if pq.starts_with('/') {
            pq.to_owned()
        } else {
            format!("/{pq}")
        };
        let full = format!("{}{}", self.target.base_path, pq);
        // Both parts come from URIs that already parsed, so their join parses too.
        if let Ok(uri) = full.parse() {
            parts.uri = uri;
        }
        Request::from_parts(parts, body)
    }

    fn classify(&self, failed: SendError, who: &str, refused_why: &str) -> ProxyError {
        let target = format!("{}:{}", self.target.host, self.target.port);
        let err = failed.error;
        // The connection's own record comes first: HTTP/2 errors do not carry their cause.
        if let Some(tls_err) = failed.tls.as_ref().or_else(|| find_tls_error(&err)) {
            return tls::answer_for(tls_err, &target, who);
        }
        if failed.refused_unprocessed {
            return ProxyError::UpstreamUnreachable(format!(
                "{target} closed the HTTP/2 connection (GOAWAY) before processing this request, \
                 {refused_why}"
            ));
        }
        if err.is_incomplete_message() || err.is_canceled() {
            return ProxyError::UpstreamUnreachable(format!(
                "{target} closed the connection before answering"
            ));
        }
        ProxyError::UpstreamUnreachable(format!("exchange with {target} failed: {err}"))
    }
}

/// Request head, kept apart from the body so a refused request can be rebuilt.
#[derive(Clone)]
struct Head {
    method: Method,
    uri: http::Uri,
    headers: HeaderMap,
}

impl Head {
    fn of<B>(req: &Request<B>) -> Head {
        Head {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
        }
    }

    fn into_request(self, body: RequestBody) -> Request<RequestBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.headers_mut() = self.headers;
        req
    }
}

/// Bodies up to this size (Vero API's JSON requests are far smaller) are read whole first, so
/// a request refused unprocessed can be sent again.
const KEPT_BODY_MAX: u64 = 64 * 1024;

/// How often a request refused unprocessed by an HTTP/2 server is sent again.
const REFUSED_RETRIES: u32 = 3;

async fn read_small_body(body: Incoming) -> Result<RequestBody, ProxyError> {
    use http_body::Body as _;
    match body.size_hint().exact() {
        // No body at all (GET and friends): nothing to read.
        Some(0) => Ok(RequestBody::Full(Some(Bytes::new()))),
        Some(n) if n <= KEPT_BODY_MAX => {
            let collected = http_body_util::BodyExt::collect(body).await.map_err(|e| {
                ProxyError::ClientBodyIncomplete(format!(
                    "the request body ended early ({e}); nothing was sent upstream"
                ))
            })?;
            Ok(RequestBody::Full(Some(collected.to_bytes())))
        }
        _ => Ok(RequestBody::Stream(body, ByteCount::default())),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("close, x-secret, keep-alive"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        let mut none = HeaderMap::new();
        none.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut none);
        assert_eq!(none.len(), 1);
        for (i, n) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(n), Some(i));
        }
        assert_eq!(HOP_BY_HOP[TE], header::TE);
    }
}
