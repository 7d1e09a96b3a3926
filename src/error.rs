//! The proxy's own failures on the data path. Each becomes one HTTP answer here and nowhere else:
//! a status, a machine-readable code, a sentence, and the request's id.

use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// Name of the header that marks an answer as the proxy's own, not Vero API's.
pub const ERROR_HEADER: &str = "x-vero-proxy-error";

/// A decision or failure of the proxy itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// DNS failure, refused or timed-out connect, reset before an answer.
    #[error("{0}")]
    UpstreamUnreachable(String),
    /// The upstream's server certificate did not verify.
    #[error("{0}")]
    UpstreamCertificateUntrusted(String),
    /// The upstream refused our client certificate.
    #[error("{0}")]
    ClientCertificateRejected(String),
    /// No response headers within the response timeout.
    #[error("the upstream sent no response headers within {0:?} (--response-timeout)")]
    UpstreamTimeout(Duration),
    /// Waited past the queue timeout, or the queue is full.
    #[error("{0}")]
    UpstreamBusy(String),
    /// The proxy is draining for shutdown.
    #[error("the proxy is shutting down; retry on another instance or after it restarts")]
    ShuttingDown,
    /// CONNECT tunnels are not offered.
    #[error(
        "CONNECT is not supported: vero-proxy forwards plain HTTP requests to its one upstream"
    )]
    ConnectNotSupported,
    /// Absolute-form request naming another authority.
    #[error("this proxy only forwards to {upstream}; the request named {requested}")]
    ForeignAuthority {
        /// What the request asked for.
        requested: String,
        /// What the proxy forwards to.
        upstream: String,
    },
    /// `Host` is not a name the proxy answers to.
    #[error("Host {0:?} is not a name this proxy answers to; use localhost or add it with --allowed-host")]
    ForbiddenHost(String),
    /// A browser's cross-site request.
    #[error("{0}")]
    CrossSiteRequest(String),
    /// The egress proxy refused to open a tunnel to the upstream.
    #[error("{0}")]
    EgressProxyRefused(String),
    /// The application's request body could not be read whole.
    #[error("{0}")]
    ClientBodyIncomplete(String),
    /// The client identity in service has expired.
    #[error("{0}")]
    ClientCertificateExpired(String),
    /// Several identities are loaded and the request did not say which organisation it is for.
    #[error("{0}")]
    OrganisationRequired(String),
    /// The request named an organisation the proxy holds no identity for.
    #[error("{0}")]
    OrganisationUnknown(String),
}

impl ProxyError {
    /// The machine-readable code, as in the JSON body and the `x-vero-proxy-error` header.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::UpstreamUnreachable(_) => "upstream_unreachable",
            ProxyError::UpstreamCertificateUntrusted(_) => "upstream_certificate_untrusted",
            ProxyError::ClientCertificateRejected(_) => "client_certificate_rejected",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::UpstreamBusy(_) => "upstream_busy",
            ProxyError::ShuttingDown => "shutting_down",
            ProxyError::ConnectNotSupported => "connect_not_supported",
            ProxyError::ForeignAuthority { .. } => "foreign_authority",
            ProxyError::ForbiddenHost(_) => "forbidden_host",
            ProxyError::CrossSiteRequest(_) => "cross_site_request",
            ProxyError::ClientCertificateExpired(_) => "client_certificate_expired",
            ProxyError::ClientBodyIncomplete(_) => "client_body_incomplete",
            ProxyError::EgressProxyRefused(_) => "egress_proxy_refused",
            ProxyError::OrganisationRequired(_) => "organisation_required",
            ProxyError::OrganisationUnknown(_) => "organisation_unknown",
        }
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::UpstreamUnreachable(_)
            | ProxyError::EgressProxyRefused(_)
            | ProxyError::UpstreamCertificateUntrusted(_)
            | ProxyError::ClientCertificateRejected(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamBusy(_)
            | ProxyError::ShuttingDown
            | ProxyError::ClientCertificateExpired(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ConnectNotSupported => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::ClientBodyIncomplete(_) | ProxyError::OrganisationRequired(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::OrganisationUnknown(_) => StatusCode::NOT_FOUND,
            ProxyError::ForeignAuthority { .. }
            | ProxyError::ForbiddenHost(_)
            | ProxyError::CrossSiteRequest(_) => StatusCode::FORBIDDEN,
        }
    }

    /// The whole answer: JSON body, content type, error header, and `Retry-After` where useful.
    pub fn to_response(&self, request_id: &str) -> Response<Bytes> {
        let body = serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
            "request_id": request_id,
        });
        // A trailing newline, so curl output does not run into the shell prompt.
        let mut resp = Response::new(Bytes::from(body.to_string() + "\n"));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        match self {
            ProxyError::UpstreamBusy(_) | ProxyError::ShuttingDown => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ProxyError::ConnectNotSupported => {
                h.insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            _ => {}
        }
        resp
    }
}

/// The first rustls error anywhere in an error's source chain. `io::Error` hides the error it
/// wraps from `source()`, so each link is also looked into with `get_ref`.
pub fn find_tls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&'a (dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(found) = find_tls_error(inner) {
                    return Some(found);
                }
            }
        }
        cur = e.source();
    }
    None
}

/// The first `io::Error` in an error's source chain.
pub fn find_io_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a std::io::Error> {
    let mut cur: Option<&'a (dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cur = e.source();
    }
    None
}

/// Why the upstream's certificate failed verification, in words a person can act on.
pub fn describe_untrusted(err: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    let why = match err {
        C::UnknownIssuer => "it was issued by a CA that is not trusted (add the CA with --ca-file if this is a private upstream)".to_string(),
        C::Expired | C::ExpiredContext { .. } => "it has expired".to_string(),
        C::NotValidYet | C::NotValidYetContext { .. } => "it is not valid yet (check this machine's clock)".to_string(),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "it is not valid for the upstream's host name (check --upstream)".to_string()
        }
        C::Revoked => "it has been revoked".to_string(),
        C::BadSignature => "its signature does not verify".to_string(),
        other => format!("{other:?}"),
    };
    format!("the upstream's server certificate was not accepted: {why}")
}
