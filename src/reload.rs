//! Putting a new identity into service: load it (a pure function of the files), build a whole
//! new `Upstream` for it, warm its pool, swap the pointer, retire the old pool. A load that fails
//! is retried briefly, then rejected: the identity in service stays.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;

use tracing::Instrument;

use crate::business_id::BusinessId;
use crate::identity::{self, rfc3339, Identity, IdentitySource, Thresholds};
use crate::metrics::{Metrics, ReloadResult};
use crate::upstream::limit::Limiter;
use crate::upstream::{self, SharedUpstream, Upstream, UpstreamFactory};

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new identity is in service.
    Reloaded,
    /// The files hold the identity already in service.
    Unchanged,
    /// The files could not be loaded; the message says why. The old identity stays.
    Failed(String),
}

impl Outcome {
    /// `reloaded`, `unchanged` or `failed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Reloaded => "reloaded",
            Outcome::Unchanged => "unchanged",
            Outcome::Failed(_) => "failed",
        }
    }
}

/// Counters and the last outcome, for the admin endpoints.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Reloads that put a new identity in service.
    pub reloaded: AtomicU64,
    /// Reloads that found nothing new.
    pub unchanged: AtomicU64,
    /// Reloads rejected.
    pub failed: AtomicU64,
    /// Time, trigger and outcome of the last reload.
    pub last: Mutex<Option<(SystemTime, String, Outcome)>>,
}

/// Loads and swaps identities. One reload runs at a time.
pub struct Reloader {
    source: IdentitySource,
    shared: SharedUpstream,
    factory: UpstreamFactory,
    provider: Arc<CryptoProvider>,
    limiter: Arc<Limiter>,
    running: tokio::sync::Mutex<()>,
    /// Counters.
    pub stats: ReloadStats,
    done: tokio::sync::watch::Sender<u64>,
    metrics: Arc<Metrics>,
    thresholds: Thresholds,
    organisation: Option<BusinessId>,
    /// A staged identity put into service: it is used instead of the files while it expires
    /// later than they do (until the files are promoted to it, or renewed again).
    preferred: arc_swap::ArcSwapOption<Identity>,
    /// Content hash of the files as last loaded, for the poll to compare with: the identity in
    /// service may be an activated staged one, whose hash the files never have.
    files_hash: Mutex<[u8; 32]>,
}

/// Pauses between attempts at a pair that does not load (a cert written before its key).
const RETRIES: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
];

impl Reloader {
    /// A reloader for `source`, swapping into `shared`.
    pub fn new(
        source: IdentitySource,
        shared: SharedUpstream,
        factory: UpstreamFactory,
        provider: Arc<CryptoProvider>,
        limiter: Arc<Limiter>,
        metrics: Arc<Metrics>,
        thresholds: Thresholds,
    ) -> Self {
        let files_hash = shared.load().identity.content_hash;
        Reloader {
            source,
            shared,
            factory,
            provider,
            limiter,
            running: Default::default(),
            stats: Default::default(),
            done: tokio::sync::watch::Sender::new(0),
            metrics,
            thresholds,
            organisation: None,
            preferred: Default::default(),
            files_hash: Mutex::new(files_hash),
        }
    }

    /// The same reloader, for the identity of `organisation` (named in its log lines).
    pub fn for_organisation(mut self, organisation: BusinessId) -> Self {
        self.organisation = Some(organisation);
        self
    }

    /// The organisation whose identity this reloader keeps, with `--identities-dir`.
    pub fn organisation(&self) -> Option<BusinessId> {
        self.organisation
    }

    /// A span naming the organisation, for every log line about its identity.
    pub fn span(&self) -> tracing::Span {
        match &self.organisation {
            Some(id) => tracing::info_span!("identity", organisation = %id),
            None => tracing::Span::none(),
        }
    }

    /// Ticks once per finished reload, whatever its outcome (for tests and status pages to
    /// wait on instead of guessing how long a reload takes).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.done.subscribe()
    }

    /// The identity source.
    pub fn source(&self) -> &IdentitySource {
        &self.source
    }

    /// Whether the files differ from what they held at the last load (for the poll trigger).
    pub fn files_changed(&self) -> bool {
        let last = self.files_hash.lock().map(|h| *h).ok();
        identity::load::content_hash(&self.source).is_some_and(|h| Some(h) != last)
    }

    /// Reads the files again and puts a new identity in service if they hold one.
    pub async fn reload(&self, trigger: &str) -> Outcome {
        let _one_at_a_time = self.running.lock().await;
        let outcome = self.reload_once(trigger).instrument(self.span()).await;
        let counter = match &outcome {
            Outcome::Reloaded => &self.stats.reloaded,
            Outcome::Unchanged => &self.stats.unchanged,
            Outcome::Failed(_) => &self.stats.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .reloads
            .get_or_create(&ReloadResult {
                result: outcome.as_str(),
            })
            .inc();
        if let Ok(mut last) = self.stats.last.lock() {
            *last = Some((SystemTime::now(), trigger.to_string(), outcome.clone()));
        }
        self.done.send_modify(|n| *n += 1);
        outcome
    }

    /// Puts a staged identity into service with the same swap as a reload, and keeps it there
    /// while it expires later than the identity in the files.
    pub async fn activate(&self, next: Arc<Identity>, why: &str) -> Outcome {
        self.preferred.store(Some(next));
        self.reload(&format!("next identity activated: {why}"))
            .await
    }

    /// Whether a staged identity is in service instead of the files.
    pub fn has_preferred(&self) -> bool {
        self.preferred.load().is_some()
    }

    /// Goes back to the identity in the files (the staged one was removed).
    pub async fn deactivate(&self, why: &str) -> Outcome {
        if self.preferred.swap(None).is_none() {
            return Outcome::Unchanged;
        }
        self.reload(&format!("next identity withdrawn: {why}"))
            .await
    }

    /// Replaces the pool with a fresh one for the same identity (so DNS is looked up again and
    /// no connection lives forever), under the same lock as reloads so neither undoes the other.
    pub async fn refresh_pool(&self) {
        let _one_at_a_time = self.running.lock().await;
        let current = self.shared.load_full();
        match self.factory.refresh(&current) {
            Ok(next) => {
                let warmed = self.warm(&next).await;
                upstream::swap(&self.shared, next);
                tracing::debug!(
                    warmed,
                    "upstream pool replaced (--upstream-max-connection-age)"
                );
            }
            Err(e) => tracing::warn!(error = %e, "could not replace the upstream pool"),
        }
    }

    /// Opens a new pool's connections before it goes into service, so a swap is not a
    /// handshake storm: as many as the old pool has requests in flight, and one at least. That
    /// one also tells the new pool whether the upstream speaks HTTP/2; a cold pool does not know,
    /// so a burst of requests on it would each open a connection of their own. Bounded by free
    /// connection permits and the connect timeout; returns how many opened.
    async fn warm(&self, next: &Upstream) -> usize {
        let want = self.limiter.in_flight().max(1);
        tokio::time::timeout(self.factory.connect_timeout(), next.pool.warm(want))
            .await
            .unwrap_or(0)
    }

    async fn reload_once(&self, trigger: &str) -> Outcome {
        let mut attempt = 0;
        let ident = loop {
            match identity::load(&self.source, &self.provider, SystemTime::now()) {
                Ok(ident) => break ident,
                Err(e) if attempt < RETRIES.len() => {
                    tracing::debug!(error = %e, "identity does not load yet; trying again");
                    tokio::time::sleep(RETRIES[attempt]).await;
                    attempt += 1;
                }
                Err(e) => {
                    let current = &self.shared.load().identity.info;
                    tracing::error!(
                        %trigger,
                        in_service = %current.subject,
                        in_service_not_after = %rfc3339(current.not_after),
                        "identity reload rejected, the identity in service stays: {e}"
                    );
                    return Outcome::Failed(e.to_string());
                }
            }
        };
        if let Ok(mut h) = self.files_hash.lock() {
            *h = ident.content_hash;
        }
        if let Err(e) = check_organisation(self.organisation, &ident) {
            tracing::error!(%trigger, "identity reload rejected, the identity in service stays: {e}");
            return Outcome::Failed(e);
        }
        let ident = match self.preferred.load_full() {
            Some(p) if p.info.not_after > ident.info.not_after => p,
            _ => Arc::new(ident),
        };
        let current = self.shared.load_full();
        if ident.content_hash == current.identity.content_hash {
            tracing::debug!(%trigger, "identity files unchanged");
            return Outcome::Unchanged;
        }
        let next = match self.factory.build(ident) {
            Ok(n) => n,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let warmed = self.warm(&next).await;
        log_identity(&next.identity, "identity reloaded");
        next.identity
            .info
            .log_renewal(SystemTime::now(), self.thresholds);
        tracing::info!(%trigger, warmed, "new identity in service; connections of the old one retire");
        upstream::swap(&self.shared, next);
        Outcome::Reloaded
    }
}

/// With `--identities-dir`, an identity serves only the organisation its certificate names: a
/// directory named for one business ID holding another's certificate would make every request
/// of the first go out as the second.
pub fn check_organisation(
    organisation: Option<BusinessId>,
    ident: &Identity,
) -> Result<(), String> {
    let Some(dir) = organisation else {
        return Ok(());
    };
    match ident.info.organisation {
        Some(cn) if cn == dir => Ok(()),
        Some(cn) => Err(format!(
            "the certificate ({}) is not {dir}'s but {cn}'s: requests for {dir} must never go out \
             as another organisation",
            ident.info.subject
        )),
        None => Err(format!(
            "the certificate ({}) names no business ID in its CN, so it cannot be told to be {dir}'s",
            ident.info.subject
        )),
    }
}

/// Logs what an identity is, and what is wrong with it.
pub fn log_identity(id: &Identity, what: &str) {
    let i = &id.info;
    tracing::info!(
        subject = %i.subject,
        issuer = %i.issuer,
        serial = %i.serial,
        not_after = %rfc3339(i.not_after),
        days_left = i.days_left(SystemTime::now()),
        sha256 = %i.fingerprint_sha256,
        chain = i.chain_len,
        source = %id.source,
        "{what}"
    );
    if i.client_auth_allowed == Some(false) {
        tracing::warn!(subject = %i.subject, "the certificate's extended key usage does not allow TLS client authentication; the upstream may refuse it");
    }
    for w in &id.warnings {
        tracing::warn!("{w}");
    }
}
