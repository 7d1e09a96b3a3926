//! The HTTPS client of the certificate service: one POST per call over rustls (ring), the
//! server always verified, every answer's XML signature checked before it is read, and the
//! GetCertificate polling schedule.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use roxmltree::Document;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::answer::{self, Answer, ParseError, ServiceResult};
use super::dsig::{self, DsigError, SignerTrust};
use super::xml::{self, Customer, Operation};
use crate::vero_ca::Environment;

/// The production certificate service.
pub const PRODUCTION_URL: &str = "https://pkiws.vero.fi/2017/10/CertificateServices";
/// The customer test environment's certificate service.
pub const TEST_URL: &str = "https://pkiws-testi.vero.fi/2017/10/CertificateServices";
/// How long one call may take, connection included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_ANSWER: usize = 1 << 20;

/// The service URL for an environment.
pub fn default_url(env: Environment) -> &'static str {
    match env {
        Environment::Test => TEST_URL,
        Environment::Production => PRODUCTION_URL,
    }
}

/// A failed call to the certificate service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Settings that cannot work.
    #[error("{0}")]
    Config(String),
    /// No connection: nothing was sent.
    #[error("cannot reach the certificate service at {url}: {reason}; nothing was sent")]
    Unreachable {
        /// The service URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The request was sent (or may have been), and no answer came.
    #[error("no answer from the certificate service at {url}: {reason}")]
    Connect {
        /// The service URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// No answer in time.
    #[error("the certificate service at {url} did not answer within {secs} s")]
    Timeout {
        /// The service URL.
        url: String,
        /// The limit.
        secs: u64,
    },
    /// An HTTP status without a SOAP answer.
    #[error("the certificate service answered HTTP {status}: {body}")]
    Http {
        /// The status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// A SOAP fault or a malformed answer.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The answer's signature is missing, wrong or untrusted: nothing in it is used.
    #[error("the certificate service's answer was rejected: {0}")]
    Signature(#[from] DsigError),
    /// The service said no: its ErrorInfo, verbatim.
    #[error("the certificate service refused the request: {0}")]
    Refused(ServiceResult),
    /// GetCertificate did not give the certificate before the deadline.
    #[error("the certificate was not ready after {waited:?}{}", last.as_ref().map(|r| format!(" (last answer: {r})")).unwrap_or_default())]
    NotReady {
        /// How long it was polled.
        waited: Duration,
        /// The last answer, if any.
        last: Option<ServiceResult>,
    },
}

/// When GetCertificate is asked again: first after `first`, doubling up to `max`, until
/// `deadline` has passed since the first try.
#[derive(Debug, Clone, Copy)]
pub struct PollSchedule {
    /// The first wait.
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
    /// How long to keep trying.
    pub deadline: Duration,
}

impl PollSchedule {
    /// The waits between tries: `first`, doubling, capped at `max` (the deadline is the
    /// caller's to apply).
    pub fn waits(&self) -> impl Iterator<Item = Duration> {
        let max = self.max;
        std::iter::successors(Some(self.first.min(max)), move |w| Some((*w * 2).min(max)))
    }
}

impl Default for PollSchedule {
    fn default() -> Self {
        PollSchedule {
            first: Duration::from_secs(1),
            max: Duration::from_secs(30),
            deadline: Duration::from_secs(600),
        }
    }
}

/// A configured connection to the certificate service.
#[derive(Clone)]
pub struct Service {
    /// Where requests go.
    pub url: Uri,
    /// Which environment the requests name.
    pub environment: Environment,
    tls: Arc<ClientConfig>,
    /// What the answers' signing certificates must chain to.
    pub signers: SignerTrust,
    /// GetCertificate polling.
    pub poll: PollSchedule,
    /// The HTTP proxy connections tunnel through, when one is used.
    egress: Option<Arc<crate::upstream::egress::Egress>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("url", &self.url)
            .field("environment", &self.environment)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// A client for `url` (or the environment's service), trusting the system roots plus
    /// `extra_roots` for the server, and `signers` for the answers' signatures.
    pub fn new(
        environment: Environment,
        url: Option<&str>,
        extra_roots: &[CertificateDer<'static>],
        signers: SignerTrust,
        poll: PollSchedule,
    ) -> Result<Service, ServiceError> {
        let raw = url.unwrap_or(default_url(environment));
        let url: Uri = raw.parse().map_err(|e| {
            ServiceError::Config(format!("--service-url {raw:?} is not a URL: {e}"))
        })?;
        if url.scheme_str() != Some("https") || url.host().is_none() {
            return Err(ServiceError::Config(format!(
                "--service-url {raw:?} must be an https:// URL: the transfer password and the \
                 certificate travel over it"
            )));
        }
        if signers.roots.is_empty() {
            return Err(ServiceError::Config(
                "no certificates to check the certificate service's signatures with".into(),
            ));
        }
        let mut roots = RootCertStore::empty();
        for c in rustls_native_certs::load_native_certs().certs {
            // A system store may hold a certificate webpki cannot parse; skip it as curl does.
            let _ = roots.add(c);
        }
        for c in extra_roots {
            roots.add(c.clone()).map_err(|e| {
                ServiceError::Config(format!(
                    "--service-ca-file: a certificate cannot be used as a trust anchor: {e}"
                ))
            })?;
        }
        if roots.is_empty() {
            return Err(ServiceError::Config(
                "no trust anchors for the certificate service's TLS certificate: the system store is \
                 empty (install ca-certificates) and no --service-ca-file was given"
                    .into(),
            ));
        }
        let tls = ClientConfig::builder_with_provider(crate::upstream::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ServiceError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Service {
            url,
            environment,
            tls: Arc::new(tls),
            signers,
            poll,
            egress: None,
        })
    }

    /// Connects through `egress` (an HTTP proxy, with CONNECT) instead of directly.
    pub fn with_egress(mut self, egress: Option<Arc<crate::upstream::egress::Egress>>) -> Service {
        self.egress = egress;
        self
    }

    /// How connections to the service leave this machine: `--egress-proxy` (`flags`), else
    /// `HTTPS_PROXY` unless `NO_PROXY` names the service, as for the upstream.
    pub fn route_by(
        self,
        flags: &crate::upstream::EgressFlags<'_>,
        env: &crate::upstream::egress::ProxyEnv,
    ) -> Result<Service, ServiceError> {
        let host = self.url.host().unwrap_or_default();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = self.url.port_u16().unwrap_or(443);
        let egress = crate::upstream::egress_for(flags, env, &host, port, "certificate service")
            .map_err(|e| ServiceError::Config(e.0))?;
        Ok(self.with_egress(egress))
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> ServiceError {
        ServiceError::Unreachable {
            url: self.url.to_string(),
            reason: reason.to_string(),
        }
    }

    fn connect_err(&self, reason: impl std::fmt::Display) -> ServiceError {
        ServiceError::Connect {
            url: self.url.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Sends one request element and returns the verified answer (whatever its Status).
    pub async fn call(&self, op: Operation, element: &str) -> Result<Answer, ServiceError> {
        let body = tokio::time::timeout(REQUEST_TIMEOUT, self.post(op, xml::envelope(element)))
            .await
            .map_err(|_| ServiceError::Timeout {
                url: self.url.to_string(),
                secs: REQUEST_TIMEOUT.as_secs(),
            })??;
        self.read(op, &body.1, body.0)
    }

    fn read(&self, op: Operation, body: &str, status: u16) -> Result<Answer, ServiceError> {
        let doc = match Document::parse(body) {
            Ok(d) => d,
            Err(_) if status != 200 => {
                return Err(ServiceError::Http {
                    status,
                    body: body.chars().take(300).collect(),
                });
            }
            Err(e) => return Err(ParseError::NotXml(e.to_string()).into()),
        };
        let el = answer::body_element(&doc)?;
        dsig::verify_enveloped(&doc, el, &self.signers, UnixTime::now())?;
        Ok(answer::read_answer(el, op)?)
    }

    async fn post(&self, op: Operation, envelope: String) -> Result<(u16, String), ServiceError> {
        let host = self.url.host().unwrap_or_default().to_string();
        let port = self.url.port_u16().unwrap_or(443);
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tcp = match &self.egress {
            Some(e) => e
                .tunnel(&bare, port)
                .await
                .map_err(|e| self.unreachable(e))?,
            None => TcpStream::connect((bare.as_str(), port))
                .await
                .map_err(|e| self.unreachable(e))?,
        };
        let name = ServerName::try_from(bare.clone()).map_err(|e| self.unreachable(e))?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| self.unreachable(format!("TLS: {e}")))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.unreachable(e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let authority = match self.url.port_u16() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let path = self.url.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let req = Request::post(path)
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "text/xml; charset=utf-8")
            .header("SOAPAction", format!("\"{}\"", op.soap_action()))
            .body(Full::new(Bytes::from(envelope)))
            .map_err(|e| self.connect_err(e))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| self.connect_err(e))?;
        let status = resp.status().as_u16();
        let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| self.connect_err(format!("reading the answer: {e}")))?
            .to_bytes();
        let text = String::from_utf8(bytes.to_vec())
            .map_err(|_| ServiceError::from(ParseError::NotXml("not UTF-8".into())))?;
        Ok((status, text))
    }

    /// Asks for the certificate of `retrieval_id` until it comes, on the poll schedule. Any
    /// answer without a certificate, and any network failure, means "not ready yet"; a bad
    /// signature ends the polling at once.
    pub async fn poll_certificate(
        &self,
        customer: &Customer,
        retrieval_id: &str,
    ) -> Result<CertificateDer<'static>, ServiceError> {
        let element = xml::get_request(customer, retrieval_id)
            .map_err(|e| ServiceError::Config(e.to_string()))?;
        let start = Instant::now();
        let mut waits = self.poll.waits();
        let mut last = None;
        loop {
            match self.call(Operation::Get, &element).await {
                Ok(Answer {
                    certificate: Some(der),
                    result,
                    ..
                }) if result.ok => return Ok(CertificateDer::from(der)),
                Ok(a) => {
                    tracing::info!(answer = %a.result, "certificate not ready yet");
                    last = Some(a.result);
                }
                Err(e @ ServiceError::Signature(_)) => return Err(e),
                Err(e) => tracing::warn!(error = %e, "GetCertificate failed; trying again"),
            }
            let waited = start.elapsed();
            let wait = waits.next().unwrap_or(self.poll.max);
            if waited + wait > self.poll.deadline {
                return Err(ServiceError::NotReady { waited, last });
            }
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_after_one_second_doubling_up_to_thirty() {
        let secs: Vec<u64> = PollSchedule::default()
            .waits()
            .take(8)
            .map(|d| d.as_secs())
            .collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(PollSchedule::default().deadline, Duration::from_secs(600));
    }

    #[test]
    fn only_https_urls_and_the_default_ones() {
        let roots = SignerTrust::roots(vec![CertificateDer::from(vec![1, 2, 3])]);
        let plain = Service::new(
            Environment::Test,
            Some("http://127.0.0.1:1/x"),
            &[],
            roots.clone(),
            PollSchedule::default(),
        );
        assert!(matches!(plain, Err(ServiceError::Config(m)) if m.contains("https://")));
        assert_eq!(
            default_url(Environment::Production),
            "https://pkiws.vero.fi/2017/10/CertificateServices"
        );
        assert_eq!(
            default_url(Environment::Test),
            "https://pkiws-testi.vero.fi/2017/10/CertificateServices"
        );
    }
}
