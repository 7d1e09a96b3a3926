//! One upstream connection taken for one request: the HTTP version's URI form and `Host`, the
//! send, and what a failure tells about whether the request reached the upstream.

use std::future::Future;
use std::sync::Weak;
use std::time::Duration;

use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};

use super::pool::Inner;
use super::tls::TlsFailure;
use crate::body::RequestBody;

/// A request sender on one upstream connection.
pub enum Sender {
    /// HTTP/1.1: one request at a time; goes back to the pool when its response body ends.
    H1(http1::SendRequest<RequestBody>),
    /// HTTP/2: shared by all requests.
    H2(http2::SendRequest<RequestBody>),
}

/// A connection taken from the pool for one request.
pub struct Conn {
    pub(super) sender: Sender,
    pub(super) failure: TlsFailure,
    /// True when the connection had served an earlier request (it may have been closed meanwhile).
    pub reused: bool,
    pub(super) pool: Weak<Inner>,
}

/// Hands an HTTP/1.1 connection back to its pool once the response body has ended.
pub struct Return {
    pub(super) sender: http1::SendRequest<RequestBody>,
    pub(super) failure: TlsFailure,
    pub(super) pool: Weak<Inner>,
}

impl Return {
    /// Puts the connection back as idle (if its pool still exists and is in service).
    pub fn give_back(self) {
        if let Some(pool) = self.pool.upgrade() {
            Inner::checkin(&pool, self.sender, self.failure);
        }
    }
}

type Answer = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<RequestBody>>>;

/// An HTTP/1.1 request on its way and its answer to come. Dropped before the answer came (the
/// application went away), it awaits the answer in the background (for at most a second) and
/// reads a short one off, so the connection serves again: the upstream is answering anyway, and closing the
/// connection would cost a new handshake later.
struct Awaited {
    answer: Option<std::pin::Pin<Box<dyn Future<Output = Answer> + Send>>>,
    back: Option<Return>,
}

impl Awaited {
    fn poll(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Answer> {
        let Some(answer) = self.answer.as_mut() else {
            return std::task::Poll::Pending;
        };
        let got = std::task::ready!(answer.as_mut().poll(cx));
        self.answer = None;
        std::task::Poll::Ready(got)
    }
}

impl Drop for Awaited {
    fn drop(&mut self) {
        // On every request the answer has come: nothing to do, and no runtime lookup for it.
        let (Some(answer), Some(back)) = (self.answer.take(), self.back.take()) else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                // Not for long: an answer that is slow to start keeps a connection (and its
                // place under the cap) from everyone else.
                let waited = tokio::time::timeout(crate::body::DRAIN_MAX_TIME, answer).await;
                if let Ok(Ok(resp)) = waited {
                    crate::body::read_off(resp.into_body(), back).await;
                }
            });
        }
    }
}

/// A failed send; `request` is given back when nothing of it reached the connection.
pub struct SendError {
    /// What failed.
    pub error: hyper::Error,
    /// The request, when it was not sent at all and may be sent again.
    pub request: Option<Request<RequestBody>>,
    /// The TLS error seen on the connection, if any (an alert refusing our certificate).
    pub tls: Option<rustls::Error>,
    /// An HTTP/2 server refused the stream unprocessed (graceful GOAWAY beyond its last
    /// stream id, or REFUSED_STREAM): the request may be sent again, if its body was kept.
    pub refused_unprocessed: bool,
}

/// Whether an HTTP/2 failure guarantees the server did not process the request (RFC 9113
/// section 8.7): a stream beyond a graceful GOAWAY's last id, or REFUSED_STREAM.
fn refused_unprocessed(err: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away()
                    && h2.is_remote()
                    && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        cur = e.source();
    }
    false
}

/// The path and query of a URI (`/` when it has none).
fn path_and_query(uri: &Uri) -> String {
    uri.path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned())
}

/// On a connection that failed at its first request, the server's TLS alert can arrive just
/// after the failure itself surfaced (a write broke first): the connection task reads it
/// moments later. Waits briefly for it, so a refused certificate is named as such.
async fn alert_after_failure(slot: &TlsFailure) -> Option<rustls::Error> {
    for _ in 0..20 {
        if let Some(e) = slot.get() {
            return Some(e.clone());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    slot.get().cloned()
}

impl Conn {
    /// Puts a connection no request took back as idle (an HTTP/2 one is already shared).
    pub(super) fn park(self) {
        if let (Sender::H1(sender), Some(pool)) = (self.sender, self.pool.upgrade()) {
            Inner::checkin(&pool, sender, self.failure);
        }
    }

    /// Whether this is an HTTP/2 connection.
    pub fn is_h2(&self) -> bool {
        matches!(self.sender, Sender::H2(_))
    }

    /// Sends a request whose URI is `path?query`; sets the URI form and `Host` the protocol needs.
    /// For HTTP/1.1, also returns the handle that gives the connection back after the body ends.
    pub async fn send(
        self,
        req: Request<RequestBody>,
        authority: &http::uri::Authority,
    ) -> Result<(Response<Incoming>, Option<Return>), SendError> {
        let (failure, fresh) = (self.failure.clone(), !self.reused);
        let mut result = self.send_once(req, authority).await;
        if let Err(e) = &mut result {
            if e.tls.is_none() && fresh {
                e.tls = alert_after_failure(&failure).await;
            }
        }
        result
    }

    async fn send_once(
        self,
        mut req: Request<RequestBody>,
        authority: &http::uri::Authority,
    ) -> Result<(Response<Incoming>, Option<Return>), SendError> {
        match self.sender {
            Sender::H1(mut tx) => {
                *req.version_mut() = http::Version::HTTP_11;
                // Already origin-form (the usual case) stays as it is; an absolute URI (a retry of
                // a request first shaped for HTTP/2) is cut back to its path and query.
                if req.uri().scheme().is_some() {
                    let pq = path_and_query(req.uri());
                    *req.uri_mut() = Uri::try_from(pq).unwrap_or_else(|_| Uri::from_static("/"));
                }
                let host = match self.pool.upgrade() {
                    Some(pool) => Some(pool.host_header.clone()),
                    None => HeaderValue::from_str(authority.as_str()).ok(),
                };
                if let Some(host) = host {
                    req.headers_mut().insert(http::header::HOST, host);
                }
                // A parked connection may still be finishing its previous response; one the
                // server closed meanwhile fails here with the request unsent, so it can be retried.
                if let Err(error) = tx.ready().await {
                    return Err(SendError {
                        request: Some(req),
                        error,
                        tls: self.failure.get().cloned(),
                        refused_unprocessed: false,
                    });
                }
                let mut answer = Awaited {
                    answer: Some(Box::pin(tx.try_send_request(req))),
                    back: Some(Return {
                        sender: tx,
                        failure: self.failure.clone(),
                        pool: self.pool,
                    }),
                };
                let got = std::future::poll_fn(|cx| answer.poll(cx)).await;
                match got {
                    Ok(resp) => Ok((resp, answer.back.take())),
                    Err(mut e) => Err(SendError {
                        request: e.take_message(),
                        error: e.into_error(),
                        tls: self.failure.get().cloned(),
                        refused_unprocessed: false,
                    }),
                }
            }
            Sender::H2(mut tx) => {
                *req.version_mut() = http::Version::HTTP_2;
                // hyper would send Host besides :authority; some servers refuse the duplicate.
                req.headers_mut().remove(http::header::HOST);
                let uri = format!("https://{authority}{}", path_and_query(req.uri()));
                *req.uri_mut() = Uri::try_from(uri).unwrap_or_else(|_| Uri::from_static("/"));
                match tx.try_send_request(req).await {
                    Ok(resp) => Ok((resp, None)),
                    Err(mut e) => {
                        let request = e.take_message();
                        let error = e.into_error();
                        let refused = refused_unprocessed(&error);
                        // Refused, or not sent at all (the connection is closing): no request
                        // may take it again, or each would make its own new one.
                        if refused || request.is_some() {
                            if let Some(pool) = self.pool.upgrade() {
                                pool.forget_h2(&self.failure);
                            }
                        }
                        Err(SendError {
                            request,
                            error,
                            tls: self.failure.get().cloned(),
                            refused_unprocessed: refused,
                        })
                    }
                }
            }
        }
    }
}
