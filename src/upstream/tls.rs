//! Identity + trust anchors -> rustls `ClientConfig`, and the TCP+TLS connect with its failures
//! sorted into the answers a person can act on.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::cli::UpstreamProtocol;
use crate::error::{describe_untrusted, find_tls_error, ProxyError};
use crate::identity::Identity;

/// The one crypto provider in the process: ring (see the README for why).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file given with `flag` (named in the errors); at least one.
pub fn read_pem_certs(path: &Path, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("cannot read {flag} {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{flag} {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{flag} {} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The system's trust anchors plus those in `ca_file`.
pub fn trust_anchors(ca_file: Option<&Path>) -> anyhow::Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        // A system store may hold a certificate webpki cannot parse; skipping it is what
        // browsers and curl do too.
        let _ = roots.add(cert);
    }
    let system = roots.len();
    if let Some(path) = ca_file {
        for c in read_pem_certs(path, "--ca-file")? {
            roots.add(c).map_err(|e| {
                anyhow::anyhow!(
                    "--ca-file {}: a certificate cannot be used as a trust anchor: {e}",
                    path.display()
                )
            })?;
        }
    }
    if roots.is_empty() {
        anyhow::bail!(
            "no trust anchors: the system certificate store is empty or missing (install ca-certificates) \
             and no --ca-file was given"
        );
    }
    tracing::debug!(system, total = roots.len(), "trust anchors loaded");
    Ok(Arc::new(roots))
}

/// A client config that presents `identity`. Each identity gets its own config, and so its own
/// session cache: a ticket issued to one certificate is never offered with another.
pub fn client_config(
    identity: &Identity,
    roots: Arc<RootCertStore>,
    protocol: UpstreamProtocol,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let resolver = Arc::new(rustls::sign::SingleCertAndKey::from(
        identity.certified_key.clone(),
    ));
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_client_cert_resolver(resolver);
    cfg.alpn_protocols = match protocol {
        UpstreamProtocol::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        UpstreamProtocol::Http1 => vec![b"http/1.1".to_vec()],
        UpstreamProtocol::Http2 => vec![b"h2".to_vec()],
    };
    Ok(Arc::new(cfg))
}

/// Sorts a TLS-level failure into the proxy's answers. `who` describes our identity for the
/// message when the upstream refused it.
pub fn classify_tls(err: &io::Error, target: &str, who: &str) -> ProxyError {
    match find_tls_error(err) {
        Some(tls) => answer_for(tls, target, who),
        None => ProxyError::UpstreamUnreachable(format!("connection to {target} failed: {err}")),
    }
}

/// The proxy's answer for a TLS failure with `target`, wherever it surfaced (handshake, first
/// read, HTTP/2 connection): an untrusted server, a refused client certificate, or other.
pub fn answer_for(err: &rustls::Error, target: &str, who: &str) -> ProxyError {
    match err {
        rustls::Error::InvalidCertificate(c) => ProxyError::UpstreamCertificateUntrusted(format!(
            "{} ({target})",
            describe_untrusted(c)
        )),
        rustls::Error::AlertReceived(alert) => client_cert_rejected(alert, target, who),
        other => ProxyError::UpstreamUnreachable(format!("TLS with {target} failed: {other}")),
    }
}

/// The answer for an alert that refuses our certificate (or another fatal alert).
pub fn client_cert_rejected(
    alert: &rustls::AlertDescription,
    target: &str,
    who: &str,
) -> ProxyError {
    use rustls::AlertDescription as A;
    let refusal = matches!(
        alert,
        A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::CertificateRequired
            | A::HandshakeFailure
            | A::DecryptError
    );
    if refusal {
        ProxyError::ClientCertificateRejected(format!(
            "{target} refused our client certificate (TLS alert {alert:?}); we presented {who}. \
             Is it the right environment's certificate (test certificates work only at apitest.vero.fi, \
             production ones only at api.vero.fi), still valid, and known to Vero API (new production \
             certificates work from the next day)?"
        ))
    } else if *alert == A::NoApplicationProtocol {
        ProxyError::UpstreamUnreachable(format!(
            "{target} speaks none of the HTTP versions offered (TLS alert NoApplicationProtocol); \
             with --upstream-protocol http2 the server must support HTTP/2: try auto or http1"
        ))
    } else {
        ProxyError::UpstreamUnreachable(format!(
            "{target} ended the TLS session with alert {alert:?}"
        ))
    }
}

/// Wraps the TLS stream so that a failed write looks for the server's alert before giving up.
/// Under TLS 1.3 a refused client certificate arrives as an alert after our side of the handshake
/// is done; the request's write can fail first (broken pipe) with the alert still unread.
/// It also keeps the first TLS error it sees, because HTTP/2 errors do not carry their cause.
pub struct AlertProbe<T> {
    inner: T,
    seen: TlsFailure,
}

/// The first TLS-level error seen on a connection, shared with whoever sends on it.
pub type TlsFailure = Arc<std::sync::OnceLock<rustls::Error>>;

impl<T> AlertProbe<T> {
    /// Wraps a stream.
    pub fn new(inner: T) -> Self {
        AlertProbe {
            inner,
            seen: TlsFailure::default(),
        }
    }

    /// The slot where the first TLS error on this connection is kept.
    pub fn failure(&self) -> TlsFailure {
        self.seen.clone()
    }

    fn note(&self, err: &io::Error) {
        if let Some(tls) = find_tls_error(err) {
            let _ = self.seen.set(tls.clone());
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AlertProbe<T> {
    fn probe(&mut self, cx: &mut Context<'_>, write_err: io::Error) -> io::Error {
        let mut scratch = [0u8; 256];
        let mut buf = ReadBuf::new(&mut scratch);
        match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
            Poll::Ready(Err(read_err)) if find_tls_error(&read_err).is_some() => {
                self.note(&read_err);
                read_err
            }
            _ => write_err,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AlertProbe<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &polled {
            self.note(e);
        }
        polled
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for AlertProbe<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.probe(cx, e))),
            other => other,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.probe(cx, e))),
            other => other,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.probe(cx, e))),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
