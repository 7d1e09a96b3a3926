//! One access line and one set of metric updates per request, written when the answer has
//! ended (so bytes and the whole duration are known). Never the query string, never header
//! values, never bodies: queries to Vero API can carry personal identity codes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Request};

use crate::error::ProxyError;
use crate::metrics::{ByteCount, Metrics, Reason};

/// What is known about one request until its answer ends.
pub struct Exchange {
    /// The request id (the application's `x-request-id` when usable, else ours), as the
    /// header value it is sent in.
    pub id: HeaderValue,
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
    /// Request body bytes sent upstream, when the body was read whole.
    pub request_bytes: u64,
    /// The count of a streamed request body, as it passes (none for bodies read whole, so
    /// most requests need no shared counter).
    pub streamed: Option<ByteCount>,
    metrics: Arc<Metrics>,
    /// Written: `failed` or `finished` was called.
    written: bool,
}

/// The status logged for a request whose application went away before its answer (nginx's
/// convention; no answer was sent, so no real status exists).
pub const CLIENT_WENT_AWAY: u16 = 499;

/// Makes request ids: a random per-process prefix and a counter.
pub struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let mut seed = [0u8; 4];
        // An id prefix that differs between restarts; a fixed one is still unique per process.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
        RequestIds {
            prefix: u32::from_be_bytes(seed),
            next: AtomicU64::new(1),
        }
    }
}

impl RequestIds {
    /// `{prefix:08x}-{counter:x}`, written straight into the header value it is sent in.
    pub fn next(&self) -> HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 8 + 1 + 16];
        for (i, b) in buf[..8].iter_mut().enumerate() {
            *b = HEX[((self.prefix >> (28 - 4 * i)) & 0xf) as usize];
        }
        buf[8] = b'-';
        let digits = (16 - n.leading_zeros() as usize / 4).max(1);
        for i in 0..digits {
            buf[9 + i] = HEX[((n >> (4 * (digits - 1 - i))) & 0xf) as usize];
        }
        // Hex digits and '-' are always a valid header value.
        HeaderValue::from_bytes(&buf[..9 + digits]).unwrap_or(HeaderValue::from_static("invalid"))
    }
}

/// The application's `x-request-id`, when it is a sane token (1-128 visible characters of
/// `A-Za-z0-9._:-`); anything else is replaced, so it cannot carry odd bytes into logs. The
/// value itself is kept (a cheap clone), so a kept id costs no copy.
pub fn request_id_of<B>(req: &Request<B>) -> Option<HeaderValue> {
    let v = req.headers().get(&X_REQUEST_ID)?;
    let b = v.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    ok.then(|| v.clone())
}

/// The request id header, sent upstream and back to the application.
pub static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// An id as text: ids are checked or made of hex digits and '-', so always visible ASCII.
pub fn id_str(id: &HeaderValue) -> &str {
    id.to_str().unwrap_or("invalid")
}

/// One access line of `$x` (an `Exchange`) at `$level`: the fields every line carries, with
/// `{ ... }` (each field followed by a comma) between status and the identity, then the message.
macro_rules! access_line {
    ($level:ident, $x:expr, $status:expr, { $($field:tt)* } $(, $($msg:tt)+)?) => {
        tracing::$level!(
            target: "access",
            request_id = %id_str(&$x.id),
            method = %$x.method,
            path = %$x.uri.path(),
            status = $status,
            $($field)*
            serial = $x.identity.as_ref().map(|i| i.info.serial.as_str()),
            organisation = $x.organisation.as_ref().map(|o| o.as_str()),
            $($($msg)+)?
        )
    };
}

impl Exchange {
    /// Starts the record of a request.
    pub fn new<B>(id: HeaderValue, req: &Request<B>, metrics: Arc<Metrics>) -> Exchange {
        Exchange {
            id,
            method: req.method().clone(),
            uri: req.uri().clone(),
            started: Instant::now(),
            upstream_ms: None,
            identity: None,
            organisation: None,
            request_bytes: 0,
            streamed: None,
            metrics,
            written: false,
        }
    }

    fn ms(&self) -> f64 {
        (self.started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0
    }

    /// The proxy answered itself.
    pub fn failed(mut self, e: &ProxyError) {
        self.written = true;
        let status = e.status().as_u16();
        self.metrics
            .record(&self.method, status, self.started.elapsed().as_secs_f64());
        self.metrics
            .upstream_errors
            .get_or_create(&Reason { reason: e.code() })
            .inc();
        access_line!(warn, self, status, {
            error = e.code(),
            ms = self.ms(),
            upstream_ms = self.upstream_ms,
        }, "{e}");
    }

    /// The upstream's answer has ended (`complete`), or was cut off.
    pub fn finished(mut self, status: u16, response_bytes: u64, complete: bool) {
        self.written = true;
        let request_bytes = self.request_bytes
            + self
                .streamed
                .as_ref()
                .map_or(0, |c| c.load(Ordering::Relaxed));
        self.metrics
            .record(&self.method, status, self.started.elapsed().as_secs_f64());
        self.metrics.request_bytes.inc_by(request_bytes);
        self.metrics.response_bytes.inc_by(response_bytes);
        if complete {
            access_line!(info, self, status, {
                request_bytes,
                response_bytes,
                ms = self.ms(),
                upstream_ms = self.upstream_ms,
            });
        } else {
            access_line!(warn, self, status, {
                request_bytes,
                response_bytes,
                ms = self.ms(),
                upstream_ms = self.upstream_ms,
            }, "the answer was cut off before its end (the application went away or the upstream failed mid-body)");
        }
    }
}

impl Drop for Exchange {
    /// Neither failed nor finished: the request's future was dropped before the upstream's
    /// answer came, because the application closed its connection. Still one access line.
    fn drop(&mut self) {
        if self.written {
            return;
        }
        self.metrics.record(
            &self.method,
            CLIENT_WENT_AWAY,
            self.started.elapsed().as_secs_f64(),
        );
        access_line!(warn, self, CLIENT_WENT_AWAY, { ms = self.ms(), },
            "the application went away before the answer came; nothing was sent back to it");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_prefix_and_counter_in_hex() {
        for (prefix, n) in [
            (0u32, 0u64),
            (0xdead_beef, 1),
            (0x0a, 15),
            (7, 16),
            (u32::MAX, u64::MAX),
        ] {
            let ids = RequestIds {
                prefix,
                next: AtomicU64::new(n),
            };
            assert_eq!(ids.next().to_str().unwrap(), format!("{prefix:08x}-{n:x}"));
        }
    }
}
