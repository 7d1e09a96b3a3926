//! The response body type the server sends: either the upstream's body streamed through, or a
//! small body of the proxy's own.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

use crate::upstream::pool::Return;

/// A response body.
pub enum ProxyBody {
    /// Streamed from the upstream.
    Upstream(UpstreamBody),
    /// The proxy's own (error answers, admin pages).
    Full(Option<Bytes>),
}

impl ProxyBody {
    /// A complete body.
    pub fn full(b: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(b.into()))
    }
}

/// The upstream's response body, holding the request's place under the concurrency cap and
/// its connection until the last frame has passed.
pub struct UpstreamBody {
    inner: Incoming,
    held: Option<Held>,
}

struct Held {
    _permit: OwnedSemaphorePermit,
    conn: Option<Return>,
}

impl UpstreamBody {
    /// Wraps an upstream body.
    pub fn new(inner: Incoming, permit: OwnedSemaphorePermit, conn: Option<Return>) -> Self {
        let mut body = UpstreamBody {
            inner,
            held: Some(Held {
                _permit: permit,
                conn,
            }),
        };
        if body.inner.is_end_stream() {
            body.release(true);
        }
        body
    }

    /// Lets go of the place and, when the body ended cleanly, gives the connection back.
    fn release(&mut self, clean: bool) {
        if let Some(held) = self.held.take() {
            if let (true, Some(conn)) = (clean, held.conn) {
                conn.give_back();
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(true),
            Poll::Ready(Some(Err(_))) => self.release(false),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(true),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Upstream(b) => Pin::new(b).poll_frame(cx),
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
    /// Streamed from the application.
    Stream(Incoming),
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
            RequestBody::Stream(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Full(b) => b.as_ref().is_none_or(|d| d.is_empty()),
            RequestBody::Stream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
            RequestBody::Stream(b) => b.size_hint(),
        }
    }
}
