//! The response body type the server sends: either the upstream's body streamed through, or a
//! small body of the proxy's own.

use std::pin::Pin;
use std::task::{Context, Poll};

use crate::upstream::limit::Places;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::access::Exchange;
use crate::metrics::ByteCount;
use crate::upstream::conn::Return;

/// A response body.
pub enum ProxyBody {
    /// Streamed from the upstream.
    Upstream(Box<UpstreamBody>),
    /// The proxy's own (error answers, admin pages).
    Full(Option<Bytes>),
}

impl ProxyBody {
    /// A complete body.
    pub fn full(b: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(b.into()))
    }
}

/// An HTTP/1.1 answer the application stopped reading is read to its end in the background
/// when at most this much of it is left, so its connection goes back to the pool instead of
/// being closed. Closing costs a new TCP and TLS handshake later, on the upstream's side too,
/// and when many applications go away at once (a batch job stopped, a load test's end), as
/// many handshakes queue at the upstream together.
const DRAIN_MAX_BYTES: u64 = 1 << 20;
/// How long such an answer may take to arrive: longer, and a new connection is cheaper.
pub(crate) const DRAIN_MAX_TIME: std::time::Duration = std::time::Duration::from_secs(1);

/// The upstream's response body, holding the request's place under the concurrency cap and
/// its connection until the last frame has passed.
pub struct UpstreamBody {
    /// `None` only once handed to a background drain.
    inner: Option<Incoming>,
    held: Option<Held>,
    log: Option<(Exchange, u16)>,
    bytes: u64,
    idle_limit: std::time::Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    progressed: bool,
}

struct Held {
    _permit: Places,
    conn: Option<Return>,
}

impl UpstreamBody {
    /// Wraps an upstream body.
    pub fn new(
        inner: Incoming,
        permit: Places,
        conn: Option<Return>,
        log: (Exchange, u16),
        idle_limit: std::time::Duration,
    ) -> Self {
        let held = Some(Held {
            _permit: permit,
            conn,
        });
        let mut body = UpstreamBody {
            inner: Some(inner),
            held,
            log: Some(log),
            bytes: 0,
            idle_limit,
            stalled: None,
            progressed: false,
        };
        if body.is_end_stream() {
            body.release(true);
        }
        body
    }

    /// Dropped before its end. The application's request is over (its place under the cap is
    /// given back, the access line written as cut); a short rest of an HTTP/1.1 answer is read
    /// and thrown away so the connection can serve again.
    fn abandon(&mut self) {
        let conn = self.held.as_mut().and_then(|h| h.conn.take());
        self.release(false);
        if let (Some(conn), Some(body), Ok(rt)) = (
            conn,
            self.inner.take(),
            tokio::runtime::Handle::try_current(),
        ) {
            rt.spawn(read_off(body, conn));
        }
    }

    /// Lets go of the place and, when the body ended cleanly, gives the connection back.
    fn release(&mut self, clean: bool) {
        if let Some(held) = self.held.take() {
            if let (true, Some(conn)) = (clean, held.conn) {
                conn.give_back();
            }
        }
        if let Some((log, status)) = self.log.take() {
            log.finished(status, self.bytes, clean);
        }
    }
}

/// Reads an abandoned answer to its end and gives its connection back; drops it (closing the
/// connection) when the answer is longer or slower than the limits.
pub(crate) async fn read_off(mut body: Incoming, conn: Return) {
    use http_body_util::BodyExt;
    if body
        .size_hint()
        .upper()
        .is_some_and(|left| left > DRAIN_MAX_BYTES)
    {
        return;
    }
    let read = async {
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            n += frame.ok()?.data_ref().map_or(0, |d| d.len() as u64);
            if n > DRAIN_MAX_BYTES {
                return None;
            }
        }
        Some(())
    };
    if let Ok(Some(())) = tokio::time::timeout(DRAIN_MAX_TIME, read).await {
        conn.give_back();
    }
}

/// A body error: the upstream's, or the proxy's own idle deadline.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx).map_err(BodyError::from);
        let polled = match polled {
            Poll::Ready(ready) => {
                self.progressed = true;
                Poll::Ready(ready)
            }
            // An upstream that sends its headers and then nothing would hold the application
            // and a place under the cap forever: no progress within the response timeout
            // ends the body with an error, so the application sees it cut, not complete. One
            // timer per body, looked at only when it fires (not reset on every frame), so a
            // stall is cut after one to two response timeouts.
            Poll::Pending => {
                let this = &mut *self;
                let limit = this.idle_limit;
                let timer = this
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                loop {
                    match std::future::Future::poll(timer.as_mut(), cx) {
                        Poll::Pending => break Poll::Pending,
                        Poll::Ready(()) if this.progressed => {
                            this.progressed = false;
                            timer.as_mut().reset(tokio::time::Instant::now() + limit);
                        }
                        Poll::Ready(()) => {
                            break Poll::Ready(Some(Err(BodyError::from(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("the upstream sent nothing for {limit:?} in the middle of its answer"),
                            )))))
                        }
                    }
                }
            }
        };
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            self.bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
        }
        match &polled {
            Poll::Ready(None) => self.release(true),
            Poll::Ready(Some(Err(_))) => self.release(false),
            Poll::Ready(Some(Ok(_))) if self.is_end_stream() => self.release(true),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Dropped before its end: the application went away, or the server cut it off.
        if self.held.is_some() {
            self.abandon();
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Upstream(b) => Pin::new(b.as_mut()).poll_frame(cx),
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(b) => b.is_end_stream(),
            ProxyBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(b) => b.size_hint(),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

/// A request body on its way upstream: small bodies are read whole first, so a request that an
/// HTTP/2 server refused unprocessed (GOAWAY, REFUSED_STREAM) can be sent again; larger or
/// chunked ones stream through and are never replayed.
pub enum RequestBody {
    /// Read whole (possibly empty); `None` once sent.
    Full(Option<Bytes>),
    /// Streamed from the application; the count of bytes passed on.
    Stream(Incoming, ByteCount),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Full(b) => Poll::Ready(
                b.take()
                    .filter(|d| !d.is_empty())
                    .map(|d| Ok(Frame::data(d))),
            ),
            RequestBody::Stream(b, count) => {
                let polled = Pin::new(b).poll_frame(cx);
                if let Poll::Ready(Some(Ok(f))) = &polled {
                    let n = f.data_ref().map_or(0, |d| d.len() as u64);
                    count.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Full(b) => b.as_ref().is_none_or(|d| d.is_empty()),
            RequestBody::Stream(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
            RequestBody::Stream(b, _) => b.size_hint(),
        }
    }
}
