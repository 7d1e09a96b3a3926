//! Staged activation: a next identity (a renewed certificate) waits beside the current one and
//! the running proxy puts it into service, with the same zero-loss swap as a reload, once it is
//! safe: when a probe made with it is accepted (a completed handshake and a status other than
//! 401/403 on `--probe-path`), or `--activation-delay` after its notBefore (Vero API fetches
//! renewed production certificates once a day), and in any case `--activation-margin` before the
//! current certificate expires. Until then the current certificate keeps serving.
//!
//! With `--auto-renew`, the same task renews the certificate through the Tax Administration's
//! certificate service when the renewal window opens, writing the new pair where the next
//! identity is read from; activation then takes over.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::body::RequestBody;
use crate::business_id::BusinessId;
use crate::certsvc;
use crate::config::{Staging, UpstreamTarget};
use crate::identity::{self, rfc3339, unix, Identity, IdentitySource};
use crate::proxy::AddedHeaders;
use crate::reload::Reloader;
use crate::upstream::{tls, SharedUpstream, UpstreamFactory};

/// Where a staged identity stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No next identity is staged.
    None,
    /// Staged, not in service yet.
    Waiting,
    /// In service.
    Active,
    /// Its files do not load, or it is older than the identity in service.
    Rejected,
}

impl Phase {
    /// For the metric: 0 none, 1 waiting, 2 active, 3 rejected.
    pub fn level(self) -> i64 {
        match self {
            Phase::None => 0,
            Phase::Waiting => 1,
            Phase::Active => 2,
            Phase::Rejected => 3,
        }
    }
}

/// What `/status` shows of the staged identity.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StagedState {
    /// Where it stands.
    pub phase: Phase,
    /// Why (in words).
    pub reason: String,
    /// Its subject, when it loads.
    pub subject: Option<String>,
    /// Its issuer.
    pub issuer: Option<String>,
    /// Its serial.
    pub serial: Option<String>,
    /// Its SHA-256 fingerprint.
    pub fingerprint_sha256: Option<String>,
    /// Its validity.
    pub not_before: Option<String>,
    /// Its validity.
    pub not_after: Option<String>,
    /// When it goes into service at the latest (while waiting).
    pub activates_by: Option<String>,
    /// When it was last looked at.
    pub checked_at: Option<String>,
    /// Automatic renewal: the last attempt's outcome, when there was one.
    pub renewal: Option<RenewalAttempt>,
}

/// One automatic renewal attempt.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RenewalAttempt {
    /// When.
    pub at: String,
    /// `ok` or `failed`.
    pub result: &'static str,
    /// What happened (the service's ErrorInfo verbatim on failure).
    pub message: String,
    /// When the next attempt is due after a failure.
    pub retry_at: Option<String>,
}

impl Default for StagedState {
    fn default() -> Self {
        StagedState {
            phase: Phase::None,
            reason: "no next identity is staged".into(),
            subject: None,
            issuer: None,
            serial: None,
            fingerprint_sha256: None,
            not_before: None,
            not_after: None,
            activates_by: None,
            checked_at: None,
            renewal: None,
        }
    }
}

/// With `--auto-renew`, at start: the directory renewed pairs go into must be a directory this
/// process can write (made if missing), or the first renewal, weeks later, would fail.
pub fn check_writable(dir: &std::path::Path, what: &str) -> anyhow::Result<()> {
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!("--auto-renew: {what} {} is not a directory", dir.display());
    }
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| {
            anyhow::anyhow!("--auto-renew: cannot make {what} {}: {e}", dir.display())
        })?;
    }
    let probe = dir.join(".vero-proxy-write-test");
    std::fs::write(&probe, b"").map_err(|e| {
        anyhow::anyhow!(
            "--auto-renew: {what} {} is not writable ({e}); renewed pairs are written there \
             (under systemd: StateDirectory=, e.g. /var/lib/vero-proxy/next)",
            dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// What every staged identity is checked with.
#[derive(Clone)]
pub struct StagingParts {
    /// The flags.
    pub cfg: Staging,
    /// Headers sent with the probe.
    pub added: AddedHeaders,
    /// Where the probe goes.
    pub target: UpstreamTarget,
    /// Connection timeout (bounds the probe's handshake).
    pub connect_timeout: Duration,
    /// Cancelled at shutdown.
    pub stop: CancellationToken,
    /// Renewal counters.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// A next identity for one identity in service.
pub struct Staged {
    /// Where the next identity is read from.
    pub source: IdentitySource,
    organisation: Option<BusinessId>,
    upstream: SharedUpstream,
    reloader: Arc<Reloader>,
    factory: UpstreamFactory,
    parts: StagingParts,
    state: Mutex<StagedState>,
    poke: Notify,
    stop: CancellationToken,
    looked: tokio::sync::watch::Sender<u64>,
    /// Automatic renewal: when the next attempt may run, the pause after a failure, and a
    /// retrieval the service accepted but that did not finish (resumed, never requested anew).
    renew_retry: Mutex<RenewRetry>,
}

#[derive(Default)]
struct RenewRetry {
    not_before: i64,
    pause: u64,
    accepted: Option<String>,
}

/// First pause after a failed automatic renewal; it doubles up to `RENEW_PAUSE_MAX`.
const RENEW_PAUSE_FIRST: u64 = 60;
const RENEW_PAUSE_MAX: u64 = 6 * 3600;

impl Staged {
    /// Starts watching `source` for the identity `reloader` keeps; stops with `stop`.
    pub fn spawn(
        source: IdentitySource,
        organisation: Option<BusinessId>,
        upstream: SharedUpstream,
        reloader: Arc<Reloader>,
        factory: UpstreamFactory,
        parts: StagingParts,
        stop: CancellationToken,
    ) -> Arc<Staged> {
        let staged = Arc::new(Staged {
            source,
            organisation,
            upstream,
            reloader,
            factory,
            parts,
            state: Mutex::new(StagedState::default()),
            poke: Notify::new(),
            stop,
            looked: tokio::sync::watch::Sender::new(0),
            renew_retry: Mutex::default(),
        });
        tokio::spawn(staged.clone().run());
        staged
    }

    /// Looks again now (a file event in its directory, POST /reload).
    pub fn poke(&self) {
        self.poke.notify_one();
    }

    /// Ticks after every look (for tests and tools to wait on instead of guessing).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.looked.subscribe()
    }

    /// Where it stands.
    pub fn state(&self) -> StagedState {
        self.state.lock().map(|s| s.clone()).unwrap_or_default()
    }

    async fn run(self: Arc<Self>) {
        loop {
            // Boxed: while it sleeps, each of a thousand organisations' tasks then holds only its
            // small loop, not the state of a renewal or a probe (several KiB each).
            Box::pin(self.renew_if_due()).await;
            Box::pin(self.evaluate()).await;
            self.looked.send_modify(|n| *n += 1);
            // Wake for a renewal retry when it is due, not only on the check interval.
            let mut pause = self.parts.cfg.check_interval;
            if self.parts.cfg.auto_renew.is_some() {
                if let Ok(r) = self.renew_retry.lock() {
                    let left = r.not_before - unix(SystemTime::now());
                    if left > 0 {
                        pause = pause.min(Duration::from_secs(left as u64));
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {},
                _ = self.poke.notified() => {},
                _ = self.stop.cancelled() => return,
                _ = self.parts.stop.cancelled() => return,
            }
        }
    }

    fn set(
        &self,
        phase: Phase,
        reason: String,
        next: Option<&Identity>,
        activates_by: Option<i64>,
    ) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        let changed = st.phase != phase || st.reason != reason;
        st.phase = phase;
        st.reason = reason.clone();
        st.subject = next.map(|n| n.info.subject.clone());
        st.issuer = next.map(|n| n.info.issuer.clone());
        st.serial = next.map(|n| n.info.serial.clone());
        st.fingerprint_sha256 = next.map(|n| n.info.fingerprint_sha256.clone());
        st.not_before = next.map(|n| rfc3339(n.info.not_before));
        st.not_after = next.map(|n| rfc3339(n.info.not_after));
        st.activates_by = activates_by.map(rfc3339);
        st.checked_at = Some(rfc3339(unix(SystemTime::now())));
        drop(st);
        if changed {
            let org = self.organisation.map(|o| o.to_string());
            match phase {
                Phase::Rejected => {
                    tracing::warn!(organisation = org, source = %self.source.describe(), "next identity not used: {reason}")
                }
                Phase::None => tracing::debug!(organisation = org, "{reason}"),
                _ => {
                    tracing::info!(organisation = org, source = %self.source.describe(), "next identity: {reason}")
                }
            }
        }
    }

    /// One look: load the next identity and decide whether it goes into service now.
    pub async fn evaluate(&self) {
        if identity::load::content_hash(&self.source).is_none() {
            // Removed after it went into service: back to the identity in the files (the way to
            // undo an activation; also what promotion into the files ends with, harmlessly).
            if self.reloader.has_preferred() {
                let outcome = self.reloader.deactivate("its files were removed").await;
                tracing::warn!(organisation = self.organisation.map(|o| o.to_string()), result = outcome.as_str(), "the staged identity in service was removed; the identity in the files serves again");
            }
            self.set(Phase::None, "no next identity is staged".into(), None, None);
            return;
        }
        let now = SystemTime::now();
        let next = match identity::load(&self.source, &tls::provider(), now) {
            Ok(n) => Arc::new(n),
            Err(e) => {
                self.set(Phase::Rejected, e.to_string(), None, None);
                return;
            }
        };
        let current = self.upstream.load_full();
        let cur = &current.identity.info;
        if let Some(why) = self.other_organisation(&next, cur) {
            self.set(Phase::Rejected, why, Some(&next), None);
            return;
        }
        if next.info.fingerprint_sha256 == cur.fingerprint_sha256 {
            self.set(Phase::Active, "in service".into(), Some(&next), None);
            return;
        }
        if next.info.not_after <= cur.not_after {
            self.set(
                Phase::Rejected,
                format!(
                    "it expires on {}, not later than the identity in service ({}); it is left alone",
                    rfc3339(next.info.not_after),
                    rfc3339(cur.not_after)
                ),
                Some(&next),
                None,
            );
            return;
        }
        let t = unix(now);
        let by_delay = next.info.not_before + self.parts.cfg.activation_delay.as_secs() as i64;
        let by_margin = cur.not_after - self.parts.cfg.activation_margin.as_secs() as i64;
        let activates_by = by_delay.min(by_margin);
        let why = if t >= by_margin {
            Some(format!(
                "the identity in service expires on {}: less than --activation-margin left",
                rfc3339(cur.not_after)
            ))
        } else if t >= by_delay {
            Some(format!(
                "--activation-delay has passed since its notBefore ({})",
                rfc3339(next.info.not_before)
            ))
        } else {
            match self.probe(next.clone()).await {
                Ok(status) => Some(format!(
                    "a probe with it (GET {}) was accepted ({status})",
                    self.parts.cfg.probe_path
                )),
                Err(not_yet) => {
                    self.set(
                        Phase::Waiting,
                        format!(
                            "staged, not in service yet: {not_yet}; tried again every {}, in service by {} at the latest",
                            humantime::format_duration(self.parts.cfg.check_interval),
                            rfc3339(activates_by)
                        ),
                        Some(&next),
                        Some(activates_by),
                    );
                    return;
                }
            }
        };
        let why = why.unwrap_or_default();
        let serial = next.info.serial.clone();
        match self.reloader.activate(next.clone(), &why).await {
            crate::reload::Outcome::Failed(e) => self.set(
                Phase::Waiting,
                format!("activation failed: {e}"),
                Some(&next),
                Some(activates_by),
            ),
            _ => {
                tracing::info!(organisation = self.organisation.map(|o| o.to_string()), %serial, "next identity put into service: {why}");
                self.set(
                    Phase::Active,
                    format!("in service: {why}"),
                    Some(&next),
                    None,
                )
            }
        }
    }

    /// With `--auto-renew`: renews the identity in service through the certificate service
    /// when it is inside `--renew-days-before` and nothing newer is staged, writing the new pair
    /// where the next identity is read from. Failures are logged with the service's words,
    /// counted, shown in /status, and tried again after a pause that doubles up to 6 hours.
    async fn renew_if_due(&self) {
        let Some(ar) = &self.parts.cfg.auto_renew else {
            return;
        };
        let now = SystemTime::now();
        let t = unix(now);
        let current = self.upstream.load_full();
        let cur = current.identity.clone();
        if t < cur.info.not_after - i64::from(ar.days_before) * 86_400 {
            return;
        }
        if let Ok(next) = identity::load(&self.source, &tls::provider(), now) {
            if next.info.not_after > cur.info.not_after {
                return;
            }
        }
        let resume = match self.renew_retry.lock() {
            Ok(r) if t < r.not_before => return,
            Ok(r) => r.accepted.clone(),
            Err(_) => return,
        };
        let IdentitySource::Dir { dir: out, .. } = &self.source else {
            self.renewal_done(
                Err(
                    "--auto-renew writes into a next identity directory (--next-identity-dir)"
                        .into(),
                ),
                None,
            );
            return;
        };
        let result = async {
            let svc = self.renewal_service(ar)?;
            let customer = certsvc::customer_of(ar.environment, &cur, None)
                .map_err(|e| (e.to_string(), None))?;
            let hint = format!(
                "vero-proxy cert renew --environment {} --customer-id {} --out {} --retrieval-id {{retrieval_id}}",
                ar.environment, customer.customer_id, out.display()
            );
            let issued = match &resume {
                Some(rid) => certsvc::resume(&svc, &customer, rid, out, &hint).await,
                None => {
                    certsvc::renewable(&cur, now).map_err(|e| (e.to_string(), None))?;
                    // Leftovers of an earlier attempt the service refused are not worth keeping.
                    certsvc::flow::prepare_out(out, true).map_err(|e| (e.to_string(), None))?;
                    tracing::info!(organisation = self.organisation.map(|o| o.to_string()), service = %svc.url, "renewing the client certificate through the certificate service (--auto-renew)");
                    certsvc::renew(&svc, &customer, &cur, out, now, &hint).await
                }
            };
            issued.map_err(|e| {
                let accepted = match &e {
                    certsvc::FlowError::Accepted { retrieval_id, .. } => Some(retrieval_id.clone()),
                    _ => None,
                };
                (e.to_string(), accepted)
            })
        }
        .await;
        match result {
            Ok(issued) => self.renewal_done(
                Ok(format!(
                    "renewed: {} written (RetrievalId {}); it goes into service once Vero API accepts it",
                    issued.cert_path.display(),
                    issued.retrieval_id
                )),
                None,
            ),
            Err((e, accepted)) => self.renewal_done(Err(e), accepted.or(resume)),
        }
    }

    fn renewal_service(
        &self,
        ar: &crate::config::AutoRenew,
    ) -> Result<certsvc::Service, (String, Option<String>)> {
        let fail = |e: String| (e, None);
        let extra = match &ar.service_ca_file {
            Some(p) => crate::upstream::tls::read_pem_certs(p, "--renew-service-ca-file")
                .map_err(|e| fail(e.to_string()))?,
            None => Vec::new(),
        };
        let signers = match &ar.service_signer_ca {
            Some(p) => certsvc::dsig::SignerTrust::roots(
                crate::upstream::tls::read_pem_certs(p, "--renew-service-signer-ca")
                    .map_err(|e| fail(e.to_string()))?,
            ),
            None => certsvc::dsig::SignerTrust::embedded(ar.environment),
        };
        let flags = crate::upstream::EgressFlags {
            proxy: ar.egress_proxy.as_deref(),
            credentials_file: ar.egress_proxy_credentials_file.as_deref(),
        };
        let env = crate::upstream::egress::ProxyEnv::from_process();
        certsvc::Service::new(
            ar.environment,
            ar.service_url.as_deref(),
            &extra,
            signers,
            certsvc::PollSchedule::default(),
        )
        .and_then(|s| s.route_by(&flags, &env))
        .map_err(|e| fail(e.to_string()))
    }

    /// Records an automatic renewal's outcome: logs, metric, /status, and the pause on failure.
    fn renewal_done(&self, outcome: Result<String, String>, accepted: Option<String>) {
        // One log record, one line.
        let outcome = outcome
            .map(|m| m.replace('\n', " "))
            .map_err(|m| m.replace('\n', " "));
        let now = unix(SystemTime::now());
        let org = self.organisation.map(|o| o.to_string());
        let (result, message, retry_at) = match outcome {
            Ok(msg) => {
                tracing::info!(organisation = org, "{msg}");
                if let Ok(mut r) = self.renew_retry.lock() {
                    *r = RenewRetry::default();
                }
                ("ok", msg, None)
            }
            Err(msg) => {
                let pause = match self.renew_retry.lock() {
                    Ok(mut r) => {
                        r.pause = (r.pause * 2).clamp(RENEW_PAUSE_FIRST, RENEW_PAUSE_MAX);
                        r.not_before = now + r.pause as i64;
                        r.accepted = accepted;
                        r.pause
                    }
                    Err(_) => RENEW_PAUSE_FIRST,
                };
                tracing::error!(
                    organisation = org,
                    retry_in_seconds = pause,
                    "automatic renewal failed: {msg}"
                );
                ("failed", msg, Some(rfc3339(now + pause as i64)))
            }
        };
        self.parts
            .metrics
            .renewals
            .get_or_create(&crate::metrics::ReloadResult { result })
            .inc();
        if let Ok(mut st) = self.state.lock() {
            st.renewal = Some(RenewalAttempt {
                at: rfc3339(now),
                result,
                message,
                retry_at,
            });
        }
    }

    /// Why `next` is not a renewal of the identity in service: another organisation's
    /// certificate must never take its place.
    fn other_organisation(
        &self,
        next: &Identity,
        cur: &crate::identity::CertInfo,
    ) -> Option<String> {
        match self.organisation.or(cur.organisation) {
            // The same rule as for the files of an organisation's directory.
            Some(want) => crate::reload::check_organisation(Some(want), next).err(),
            None if next.info.subject != cur.subject => Some(format!(
                "its subject ({}) differs from the identity in service ({}); a renewal keeps it",
                next.info.subject, cur.subject
            )),
            None => None,
        }
    }

    /// A handshake and one GET with `next`: Ok(status) when Vero API accepts it, else why not.
    async fn probe(&self, next: Arc<Identity>) -> Result<u16, String> {
        let up = self
            .factory
            .build(next)
            .map_err(|e| format!("the probe could not be prepared ({e})"))?;
        let conn = match tokio::time::timeout(self.parts.connect_timeout, up.pool.checkout()).await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(format!("the probe's handshake failed ({e})")),
            Err(_) => return Err("the probe's handshake timed out".into()),
        };
        let target = format!(
            "{}{}",
            self.parts.target.base_path, self.parts.cfg.probe_path
        );
        let mut req = Request::get(target.as_str())
            .body(RequestBody::Full(Some(Bytes::new())))
            .map_err(|e| format!("--probe-path: {e}"))?;
        for (name, value) in self.parts.added.load().iter() {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        let sent = tokio::time::timeout(
            self.parts.connect_timeout,
            conn.send(req, &self.parts.target.authority),
        )
        .await
        .map_err(|_| "the probe got no answer in time".to_string())?;
        match sent {
            Ok((resp, _)) => match resp.status().as_u16() {
                // 400/495/496: how nginx-style front ends answer a refused client certificate.
                s @ (400 | 401 | 403 | 495 | 496) => Err(format!(
                    "a probe with it (GET {}) was answered {s}: Vero API does not accept it yet",
                    self.parts.cfg.probe_path
                )),
                s if s >= 500 => Err(format!(
                    "a probe with it (GET {}) was answered {s}, which proves nothing either way",
                    self.parts.cfg.probe_path
                )),
                s => Ok(s),
            },
            Err(e) => Err(
                match e
                    .tls
                    .as_ref()
                    .or_else(|| crate::error::find_tls_error(&e.error))
                {
                    Some(t) => format!("the upstream refused it in the handshake ({t})"),
                    None => format!("the probe failed ({})", e.error),
                },
            ),
        }
    }
}
