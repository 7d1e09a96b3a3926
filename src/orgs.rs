//! Organisations: the identities in service and which one a request uses. Either the single
//! identity of `--cert`/`--identity-dir`/`--pkcs12`, or with `--identities-dir DIR` one identity
//! per business ID (a subdirectory named `1234567-1/` each), chosen by the request header
//! `Vero-Proxy-Organisation` or by the per-identity socket the request came in on.
//!
//! The directory is kept in step while serving: a subdirectory added is loaded, one replaced is
//! reloaded with the same zero-loss swap as a single identity, one removed is retired (requests
//! in flight finish on it). Each organisation has its own `Upstream` (TLS config, session cache,
//! pool), so a swap of one never touches the connections of another. Pools hold no connection
//! until first used and close idle connections after `--upstream-idle-timeout`, so a thousand
//! loaded identities cost memory only for those in use.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::HeaderValue;
use rustls::crypto::CryptoProvider;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::business_id::BusinessId;
use crate::error::ProxyError;
use crate::identity::{self, Identity, IdentitySource, Password, Thresholds};
use crate::metrics::Metrics;
use crate::reload::{log_identity, Outcome, Reloader};
use crate::staged::{Staged, StagingParts};
use crate::upstream::limit::Limiter;
use crate::upstream::{SharedUpstream, UpstreamFactory};

/// The request header that names the organisation (removed before forwarding).
pub const ORG_HEADER: &str = "vero-proxy-organisation";

/// One identity in service.
pub struct Org {
    /// The business ID, with `--identities-dir` (the subdirectory's name).
    pub id: Option<BusinessId>,
    /// Its identity, TLS config and pool; swapped whole on reload.
    pub upstream: SharedUpstream,
    /// Loads its files again.
    pub reloader: Arc<Reloader>,
    /// Its own cap (`--max-upstream-concurrency-per-organisation`), under the global one.
    pub limiter: Option<Arc<Limiter>>,
    /// Its next identity, staged for activation (and auto-renewal).
    pub staged: Option<Arc<Staged>>,
    /// Stops its background tasks when it is retired.
    stop: CancellationToken,
}

impl Drop for Org {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Org {
    /// The organisation this identity is for: the directory's name, else the business ID in
    /// the certificate's CN.
    pub fn organisation(&self) -> Option<BusinessId> {
        self.id
            .or_else(|| self.upstream.load().identity.info.organisation)
    }
}

/// How a request picks its organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// By the `Vero-Proxy-Organisation` header (optional with one identity).
    Header,
    /// Always this organisation: the request came in on its own socket.
    Fixed(BusinessId),
}

/// What every organisation's identity is built with.
pub struct OrgParts {
    /// Makes `Upstream`s.
    pub factory: UpstreamFactory,
    /// The TLS provider keys are loaded with.
    pub provider: Arc<CryptoProvider>,
    /// The global concurrency cap.
    pub global: Arc<Limiter>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Renewal warning thresholds.
    pub thresholds: Thresholds,
    /// `--max-upstream-concurrency-per-organisation`, when below the global cap.
    pub per_org_cap: Option<usize>,
    /// Queue settings for the per-organisation cap.
    pub queue: (usize, Duration),
    /// `VERO_PROXY_PKCS12_PASSWORD`, for PKCS#12 files without a password file beside them.
    pub pkcs12_password_env: Option<Password>,
    /// Staged activation settings.
    pub staging: StagingParts,
}

/// A subdirectory that did not load: its files' hash then (tried again when it changes) and why.
type Skipped = (Option<[u8; 32]>, String);

enum Kind {
    Single(Arc<Org>),
    Dir {
        root: PathBuf,
        map: ArcSwap<BTreeMap<BusinessId, Arc<Org>>>,
        /// Subdirectories that did not load, by name, with the content hash they had then: they
        /// are tried again (and reported again) only when their files change.
        failed: Mutex<HashMap<String, Skipped>>,
    },
}

/// The identities in service.
pub struct Orgs {
    kind: Kind,
    parts: OrgParts,
    /// Ticks after every sync of the set (organisations added, reloaded or retired).
    changed: watch::Sender<u64>,
    syncing: tokio::sync::Mutex<()>,
}

/// What a sync of the directory did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Organisations loaded for the first time.
    pub added: Vec<BusinessId>,
    /// Organisations with a new identity in service.
    pub reloaded: Vec<BusinessId>,
    /// Organisations retired (their directory is gone).
    pub retired: Vec<BusinessId>,
    /// Subdirectories that did not load, with why.
    pub failed: Vec<(String, String)>,
}

impl Orgs {
    /// The single identity of `--cert`, `--identity-dir` or `--pkcs12`, already loaded.
    pub fn single(
        ident: Identity,
        source: IdentitySource,
        parts: OrgParts,
    ) -> anyhow::Result<Self> {
        let next = parts.staging.cfg.next.clone();
        let org = build_org(&parts, None, ident, source, next)?;
        Ok(Orgs {
            kind: Kind::Single(Arc::new(org)),
            parts,
            changed: watch::Sender::new(0),
            syncing: Default::default(),
        })
    }

    /// Every identity in `root`'s subdirectories. Those that do not load are reported and
    /// skipped; the directory itself must be readable.
    pub async fn from_dir(root: PathBuf, parts: OrgParts) -> anyhow::Result<(Self, SyncReport)> {
        std::fs::read_dir(&root).map_err(|e| {
            anyhow::anyhow!(
                "cannot read --identities-dir {}: {e}; it should hold one subdirectory per business ID",
                root.display()
            )
        })?;
        let orgs = Orgs {
            kind: Kind::Dir {
                root,
                map: ArcSwap::from_pointee(BTreeMap::new()),
                failed: Default::default(),
            },
            parts,
            changed: watch::Sender::new(0),
            syncing: Default::default(),
        };
        let report = orgs.sync_all("start", false).await;
        Ok((orgs, report))
    }

    /// Whether identities come from `--identities-dir`.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir { .. })
    }

    /// The directory of `--identities-dir`.
    pub fn root(&self) -> Option<&Path> {
        match &self.kind {
            Kind::Dir { root, .. } => Some(root),
            Kind::Single(_) => None,
        }
    }

    /// Every organisation in service, in business ID order (the single identity alone).
    pub fn all(&self) -> Vec<Arc<Org>> {
        match &self.kind {
            Kind::Single(org) => vec![org.clone()],
            Kind::Dir { map, .. } => map.load().values().cloned().collect(),
        }
    }

    /// How many identities are in service.
    pub fn len(&self) -> usize {
        match &self.kind {
            Kind::Single(_) => 1,
            Kind::Dir { map, .. } => map.load().len(),
        }
    }

    /// Whether no identity is in service.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The one organisation when exactly one is in service.
    pub fn only(&self) -> Option<Arc<Org>> {
        match &self.kind {
            Kind::Single(org) => Some(org.clone()),
            Kind::Dir { map, .. } => {
                let m = map.load();
                (m.len() == 1).then(|| m.values().next().cloned()).flatten()
            }
        }
    }

    /// The organisation with this business ID.
    pub fn get(&self, id: &BusinessId) -> Option<Arc<Org>> {
        match &self.kind {
            Kind::Single(org) => (org.organisation().as_ref() == Some(id)).then(|| org.clone()),
            Kind::Dir { map, .. } => map.load().get(id).cloned(),
        }
    }

    /// Ticks after every sync of the set (organisations added, reloaded or retired).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The organisation a request is for (`header`: every Vero-Proxy-Organisation value).
    pub fn select<'a>(
        &self,
        route: Route,
        header: impl IntoIterator<Item = &'a HeaderValue>,
    ) -> Result<Arc<Org>, ProxyError> {
        if let Route::Fixed(id) = route {
            return self.get(&id).ok_or_else(|| {
                ProxyError::OrganisationUnknown(format!(
                    "the identity of {id} is no longer loaded; this socket serves only {id}"
                ))
            });
        }
        let mut values = header.into_iter();
        let first = values.next();
        if values.next().is_some() {
            return Err(ProxyError::OrganisationRequired(
                "the request names the organisation more than once: send one \
                 Vero-Proxy-Organisation header"
                    .into(),
            ));
        }
        let Some(value) = first else {
            if self.is_empty() {
                return Err(ProxyError::OrganisationUnknown(
                    "no identity is loaded: every one was skipped, or none was added yet".into(),
                ));
            }
            return self.only().ok_or_else(|| {
                ProxyError::OrganisationRequired(format!(
                    "this proxy holds {} identities: name the organisation in the header \
                     Vero-Proxy-Organisation: <business ID>",
                    self.len()
                ))
            });
        };
        let text = value.to_str().unwrap_or("").trim();
        let id: BusinessId = text.parse().map_err(|e| {
            ProxyError::OrganisationUnknown(format!("header Vero-Proxy-Organisation: {e}"))
        })?;
        if let Some(org) = self.get(&id) {
            return Ok(org);
        }
        Err(ProxyError::OrganisationUnknown(match &self.kind {
            Kind::Single(org) => match org.organisation() {
                Some(own) => format!(
                    "header Vero-Proxy-Organisation names {id}, but this proxy holds the identity of {own} only"
                ),
                None => format!(
                    "header Vero-Proxy-Organisation names {id}, but this proxy's one certificate ({}) \
                     names no business ID; leave the header out",
                    org.upstream.load().identity.info.subject
                ),
            },
            Kind::Dir { failed, .. } => {
                match failed.lock().ok().and_then(|f| f.get(id.as_str()).map(|(_, why)| why.clone())) {
                    Some(why) => format!(
                        "the identity of {id} (header Vero-Proxy-Organisation) was not loaded: {why}"
                    ),
                    None => format!(
                        "no identity is loaded for {id} (header Vero-Proxy-Organisation); its \
                         directory needs cert.pem and key.pem"
                    ),
                }
            }
        }))
    }

    /// Reads every identity again: the single one, or the whole directory (adding, reloading
    /// and retiring). `reload_all` reloads loaded organisations even when polling would see no
    /// change (SIGHUP, POST /reload).
    pub async fn reload_all(&self, trigger: &str) -> SyncReport {
        match &self.kind {
            Kind::Single(org) => {
                let mut report = SyncReport::default();
                if let Some(st) = &org.staged {
                    st.poke();
                }
                match org.reloader.reload(trigger).await {
                    Outcome::Failed(e) => report.failed.push((org.reloader.source().describe(), e)),
                    Outcome::Reloaded => report.reloaded.extend(org.organisation()),
                    Outcome::Unchanged => {}
                }
                report
            }
            Kind::Dir { .. } => self.sync_all(trigger, true).await,
        }
    }

    /// Polling: reloads what changed on disk, adds and retires subdirectories.
    pub async fn poll_as(&self, trigger: &str) -> SyncReport {
        match &self.kind {
            Kind::Single(org) => {
                let mut report = SyncReport::default();
                if org.reloader.files_changed() {
                    if let Outcome::Reloaded = org.reloader.reload(trigger).await {
                        report.reloaded.extend(org.organisation());
                    }
                }
                report
            }
            Kind::Dir { .. } => self.sync_all(trigger, false).await,
        }
    }

    /// Brings one subdirectory (by name) in step: load, reload or retire it.
    pub async fn sync_one(&self, name: &str, trigger: &str) -> SyncReport {
        let _one_at_a_time = self.syncing.lock().await;
        let mut report = SyncReport::default();
        self.sync_name(name, trigger, true, &mut report).await;
        self.changed.send_modify(|n| *n += 1);
        report
    }

    async fn sync_all(&self, trigger: &str, force: bool) -> SyncReport {
        let _one_at_a_time = self.syncing.lock().await;
        let mut report = SyncReport::default();
        let Kind::Dir { root, map, .. } = &self.kind else {
            return report;
        };
        let mut names: Vec<String> = subdirectories(root);
        for id in map.load().keys() {
            let n = id.to_string();
            if !names.contains(&n) {
                names.push(n);
            }
        }
        // First loads run on every core: a thousand identities at start-up.
        let fresh: Vec<String> = names
            .iter()
            .filter(|n| {
                n.parse::<BusinessId>()
                    .is_ok_and(|id| !map.load().contains_key(&id))
            })
            .cloned()
            .collect();
        self.load_new(&fresh, trigger, &mut report).await;
        for name in names.iter().filter(|n| !fresh.contains(n)) {
            self.sync_name(name, trigger, force, &mut report).await;
        }
        self.changed.send_modify(|n| *n += 1);
        report
    }

    /// Loads subdirectories not in service yet, in parallel, and adds those that load.
    async fn load_new(&self, names: &[String], trigger: &str, report: &mut SyncReport) {
        let Kind::Dir { root, failed, .. } = &self.kind else {
            return;
        };
        let todo: Vec<(String, IdentitySource, Option<[u8; 32]>)> = {
            let known = failed.lock().map(|f| f.clone()).unwrap_or_default();
            names
                .iter()
                .filter_map(|n| {
                    let source = self.source_in(&root.join(n));
                    let hash = identity::load::content_hash(&source);
                    // Failed before and unchanged since: not again, and not reported again.
                    match known.get(n) {
                        Some((h, _)) if *h == hash => None,
                        _ => Some((n.clone(), source, hash)),
                    }
                })
                .collect()
        };
        if todo.is_empty() {
            return;
        }
        let provider = self.parts.provider.clone();
        let loaded = tokio::task::spawn_blocking(move || load_parallel(todo, &provider))
            .await
            .unwrap_or_default();
        for (name, source, hash, result) in loaded {
            let id: BusinessId = match name.parse() {
                Ok(id) => id,
                Err(_) => continue,
            };
            let next = IdentitySource::Dir {
                dir: root.join(&name).join("next"),
                key_password: None,
            };
            let result = result.and_then(|ident| {
                crate::reload::check_organisation(Some(id), &ident).map(|()| ident)
            });
            match result.and_then(|ident| {
                build_org(&self.parts, Some(id), ident, source, Some(next))
                    .map_err(|e| e.to_string())
            }) {
                Ok(org) => {
                    let span = tracing::info_span!("identity", organisation = %id);
                    span.in_scope(|| {
                        let up = org.upstream.load();
                        log_identity(&up.identity, "identity loaded");
                        up.identity
                            .info
                            .log_renewal(SystemTime::now(), self.parts.thresholds);
                    });
                    self.insert(id, Arc::new(org));
                    if let Ok(mut f) = failed.lock() {
                        f.remove(&name);
                    }
                    report.added.push(id);
                }
                Err(e) => {
                    tracing::error!(organisation = %id, %trigger, "identity skipped: {e}");
                    if let Ok(mut f) = failed.lock() {
                        f.insert(name.clone(), (hash, e.clone()));
                    }
                    report.failed.push((name, e));
                }
            }
        }
    }

    async fn sync_name(&self, name: &str, trigger: &str, force: bool, report: &mut SyncReport) {
        let Kind::Dir { root, map, failed } = &self.kind else {
            return;
        };
        let id: BusinessId = match name.parse() {
            Ok(id) => id,
            Err(e) => {
                let seen = failed.lock().map(|f| f.contains_key(name)).unwrap_or(true);
                if !seen {
                    tracing::warn!(
                        dir = %root.join(name).display(),
                        "skipped: the subdirectories of --identities-dir are named by business ID ({e})"
                    );
                    if let Ok(mut f) = failed.lock() {
                        f.insert(name.to_owned(), (None, e.to_string()));
                    }
                }
                report.failed.push((name.to_owned(), e.to_string()));
                return;
            }
        };
        let dir = root.join(name);
        let present = dir.is_dir();
        let current = map.load().get(&id).cloned();
        match (current, present) {
            (Some(_), false) => {
                self.retire(&id, trigger);
                report.retired.push(id);
            }
            (Some(org), true) => {
                if let Some(st) = &org.staged {
                    st.poke();
                }
                if !force && !org.reloader.files_changed() {
                    return;
                }
                match org.reloader.reload(trigger).await {
                    Outcome::Reloaded => report.reloaded.push(id),
                    Outcome::Unchanged => {}
                    Outcome::Failed(e) => report.failed.push((name.to_owned(), e)),
                }
            }
            (None, true) => self.load_new(&[name.to_owned()], trigger, report).await,
            (None, false) => {
                if let Ok(mut f) = failed.lock() {
                    f.remove(name);
                }
            }
        }
    }

    fn insert(&self, id: BusinessId, org: Arc<Org>) {
        if let Kind::Dir { map, .. } = &self.kind {
            map.rcu(|m| {
                let mut m = BTreeMap::clone(m);
                m.insert(id, org.clone());
                m
            });
        }
    }

    fn retire(&self, id: &BusinessId, trigger: &str) {
        if let Kind::Dir { map, .. } = &self.kind {
            map.rcu(|m| {
                let mut m = BTreeMap::clone(m);
                m.remove(id);
                m
            });
            tracing::info!(organisation = %id, %trigger, "identity retired: its directory is gone; requests in flight finish");
        }
    }

    fn source_in(&self, dir: &Path) -> IdentitySource {
        source_in(dir, self.parts.pkcs12_password_env.as_ref())
    }

    /// Logs the renewal state of every identity (at load and daily).
    pub fn log_renewal(&self) {
        let now = SystemTime::now();
        for org in self.all() {
            let span = org.reloader.span();
            span.in_scope(|| {
                org.upstream
                    .load()
                    .identity
                    .info
                    .log_renewal(now, self.parts.thresholds)
            });
        }
    }

    /// Replaces every organisation's pool with a fresh one (`--upstream-max-connection-age`).
    pub async fn refresh_pools(&self) {
        for org in self.all() {
            org.reloader
                .refresh_pool()
                .instrument(org.reloader.span())
                .await;
        }
    }

    /// The renewal thresholds.
    pub fn thresholds(&self) -> Thresholds {
        self.parts.thresholds
    }
}

/// Where a subdirectory's identity is: cert.pem + key.pem or tls.crt + tls.key, else one
/// PKCS#12 file (`*.p12`, `*.pfx`) with its password in `password` beside it (or in
/// `VERO_PROXY_PKCS12_PASSWORD`).
pub fn source_in(dir: &Path, env_password: Option<&Password>) -> IdentitySource {
    let pkcs12 = if identity::source::DIR_PAIRS
        .iter()
        .any(|(c, _)| dir.join(c).exists())
    {
        None
    } else {
        std::fs::read_dir(dir).ok().and_then(|entries| {
            entries.flatten().map(|e| e.path()).find(|p| {
                p.extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("p12") || x.eq_ignore_ascii_case("pfx"))
            })
        })
    };
    match pkcs12 {
        Some(path) => {
            let file = dir.join("password");
            let password = match (env_password, file.exists()) {
                (Some(env), false) => env.clone(),
                _ => Password::File(file),
            };
            IdentitySource::Pkcs12 { path, password }
        }
        None => IdentitySource::Dir {
            dir: dir.to_path_buf(),
            key_password: None,
        },
    }
}

/// Names of the subdirectories of `root` that may hold an identity (hidden ones, such as a
/// Kubernetes volume's `..data`, left out).
pub fn subdirectories(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

type Loaded = (
    String,
    IdentitySource,
    Option<[u8; 32]>,
    Result<Identity, String>,
);

/// Loads identities on every core.
fn load_parallel(
    todo: Vec<(String, IdentitySource, Option<[u8; 32]>)>,
    provider: &CryptoProvider,
) -> Vec<Loaded> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(todo.len().max(1));
    let chunk = todo.len().div_ceil(threads).max(1);
    let now = SystemTime::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = todo
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|(name, source, hash)| {
                            let r =
                                identity::load(source, provider, now).map_err(|e| e.to_string());
                            (name.clone(), source.clone(), *hash, r)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

fn build_org(
    parts: &OrgParts,
    id: Option<BusinessId>,
    ident: Identity,
    source: IdentitySource,
    next: Option<IdentitySource>,
) -> anyhow::Result<Org> {
    let upstream: SharedUpstream =
        Arc::new(ArcSwap::from_pointee(parts.factory.build(Arc::new(ident))?));
    let limiter = parts
        .per_org_cap
        .map(|cap| Arc::new(Limiter::new(cap, parts.queue.0, parts.queue.1)));
    let mut reloader = Reloader::new(
        source,
        upstream.clone(),
        parts.factory.clone(),
        parts.provider.clone(),
        limiter.clone().unwrap_or_else(|| parts.global.clone()),
        parts.metrics.clone(),
        parts.thresholds,
    );
    if let Some(id) = id {
        reloader = reloader.for_organisation(id);
    }
    let reloader = Arc::new(reloader);
    let stop = parts.staging.stop.child_token();
    let staged = next.map(|next| {
        Staged::spawn(
            next,
            id,
            upstream.clone(),
            reloader.clone(),
            parts.factory.clone(),
            parts.staging.clone(),
            stop.clone(),
        )
    });
    Ok(Org {
        id,
        upstream,
        reloader,
        limiter,
        staged,
        stop,
    })
}
