//! Wires a validated [`Config`] into a running proxy: identity, upstream, listeners, background
//! tasks; and takes it down again on a signal.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::AdminState;
use crate::config::{AddHeader, Config, HeaderSource, IdentityConfig};
use crate::gate::Gate;
use crate::identity;
use crate::metrics::Metrics;
use crate::orgs::{OrgParts, Orgs, Route};
use crate::per_identity;
use crate::proxy::{AddedHeaders, Proxy};
use crate::reload::{log_identity, Reloader};
use crate::server::{self, BoundAddr, ClientLimits};
use crate::staged::StagingParts;
use crate::upstream::limit::Limiter;
use crate::upstream::{tls, UpstreamFactory};

/// A started proxy.
pub struct Running {
    /// Where applications connect.
    pub listen: BoundAddr,
    /// Where the admin endpoints are.
    pub admin: std::net::SocketAddr,
    /// The request service (for tests and the demo to look at).
    pub proxy: Arc<Proxy>,
    /// The identities in service.
    pub orgs: Arc<Orgs>,
    /// Ticks after the per-identity sockets have been brought in step with the identities.
    pub sockets_synced: tokio::sync::watch::Sender<u64>,
    shutdown: CancellationToken,
    /// What the admin endpoints answer from.
    pub admin_state: Arc<AdminState>,
    shutdown_delay: std::time::Duration,
    task: JoinHandle<()>,
}

impl Running {
    /// The identity and pool of the one identity in service (`None` with several).
    pub fn in_service(&self) -> Option<Arc<crate::upstream::Upstream>> {
        self.orgs.only().map(|o| o.upstream.load_full())
    }

    /// The reloader of the one identity in service (`None` with several).
    pub fn reloader(&self) -> Option<Arc<Reloader>> {
        self.orgs.only().map(|o| o.reloader.clone())
    }

    /// Starts draining: stop accepting, answer new requests with 503, let those in flight finish.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits for the drain to finish (or its deadline).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// Shuts down as on SIGTERM: /readyz fails at once, the listener keeps accepting for
    /// `--shutdown-delay` (so load balancers stop sending first), then stops, and requests in
    /// flight finish within `--shutdown-grace`.
    pub async fn shutdown(self) {
        self.admin_state.draining.store(true, Ordering::Relaxed);
        if !self.shutdown_delay.is_zero() {
            tracing::info!(delay = ?self.shutdown_delay, "not ready any more; still accepting until the delay ends");
            tokio::time::sleep(self.shutdown_delay).await;
        }
        self.begin_shutdown();
        self.wait().await;
    }
}

/// Reads the values of `--add-header` (files included).
pub fn read_added_headers(specs: &[AddHeader]) -> anyhow::Result<Vec<(HeaderName, HeaderValue)>> {
    specs
        .iter()
        .map(|h| {
            let value = match &h.value {
                HeaderSource::Literal(v) => v.clone(),
                HeaderSource::File(path) => {
                    let raw = std::fs::read_to_string(path).map_err(|e| {
                        anyhow::anyhow!("cannot read the value of --add-header {} from {}: {e}", h.name, path.display())
                    })?;
                    // Exactly one line: an empty value or a second line is a mistake that
                    // would otherwise send an empty or truncated key.
                    let mut lines: Vec<&str> = raw.lines().map(|l| l.trim_end_matches('\r')).collect();
                    while lines.last() == Some(&"") {
                        lines.pop();
                    }
                    let first = match lines.as_slice() {
                        [one] if !one.is_empty() => *one,
                        [] | [""] => anyhow::bail!("{} is empty; it should hold the value for --add-header {}", path.display(), h.name),
                        _ => anyhow::bail!(
                            "{} holds {} lines; it should hold only the value for --add-header {} on one line",
                            path.display(),
                            lines.len(),
                            h.name
                        ),
                    };
                    HeaderValue::from_str(first).map_err(|_| {
                        anyhow::anyhow!(
                            "{}: the value for --add-header {} has characters not allowed in a header",
                            path.display(),
                            h.name
                        )
                    })?
                }
            };
            Ok((h.name.clone(), value))
        })
        .collect()
}

/// Loads the identity, binds the listeners and starts serving.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let cfg = Arc::new(cfg);
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    let provider = tls::provider();
    let roots = tls::trust_anchors(cfg.ca_file.as_deref())?;
    let thresholds = identity::Thresholds {
        warning_days: cfg.renewal_warning_days,
        critical_days: cfg.renewal_critical_days,
    };
    let metrics = Arc::new(Metrics::new());
    let factory = UpstreamFactory::new(cfg.clone(), roots, provider.clone());
    factory.check()?;
    let limiter = Arc::new(Limiter::new(
        cfg.max_upstream_concurrency,
        cfg.upstream_queue_size,
        cfg.upstream_queue_timeout,
    ));
    if cfg.staging.auto_renew.is_some() {
        match (&cfg.identity, &cfg.staging.next) {
            (IdentityConfig::Dir { dir, .. }, _) => {
                crate::staged::check_writable(dir, "--identities-dir (for each ID/next/)")?
            }
            (_, Some(crate::identity::IdentitySource::Dir { dir, .. })) => {
                crate::staged::check_writable(dir, "--next-identity-dir")?
            }
            _ => anyhow::bail!("--auto-renew writes into --next-identity-dir DIR; give one"),
        }
    }
    let added: AddedHeaders =
        Arc::new(ArcSwap::from_pointee(read_added_headers(&cfg.add_headers)?));
    let background = CancellationToken::new();
    let staging = StagingParts {
        cfg: cfg.staging.clone(),
        added: added.clone(),
        target: cfg.upstream.clone(),
        connect_timeout: cfg.connect_timeout,
        stop: background.clone(),
        metrics: metrics.clone(),
    };
    let connections = factory.connections();
    let parts = OrgParts {
        factory,
        provider,
        global: limiter.clone(),
        metrics: metrics.clone(),
        thresholds,
        per_org_cap: cfg.max_upstream_concurrency_per_organisation,
        queue: (cfg.upstream_queue_size, cfg.upstream_queue_timeout),
        pkcs12_password_env: None,
        staging,
    };
    let orgs = Arc::new(match &cfg.identity {
        IdentityConfig::One(source) => {
            let ident = identity::load(source, &parts.provider, SystemTime::now())?;
            log_identity(&ident, "client identity loaded");
            ident.info.log_renewal(SystemTime::now(), thresholds);
            Orgs::single(ident, source.clone(), parts)?
        }
        IdentityConfig::Dir {
            dir,
            pkcs12_password,
        } => {
            let started = std::time::Instant::now();
            let parts = OrgParts {
                pkcs12_password_env: pkcs12_password.clone(),
                ..parts
            };
            let (orgs, report) = Orgs::from_dir(dir.clone(), parts).await?;
            tracing::info!(
                dir = %dir.display(),
                loaded = report.added.len(),
                skipped = report.failed.len(),
                ms = started.elapsed().as_millis() as u64,
                "identities loaded"
            );
            if orgs.is_empty() {
                tracing::warn!(dir = %dir.display(), "no identity loaded yet: requests get 404 organisation_unknown until one is added");
            }
            orgs
        }
    });
    let listener = server::bind(&cfg.listen, cfg.listen_mode)?;
    let listen = listener.bound()?;
    let admin_listener = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .map_err(|e| server::bind_error(&cfg.admin_listen.to_string(), "--admin-listen", e))?;
    let admin = admin_listener.local_addr()?;
    let initial_sockets = match &cfg.listen_per_identity {
        Some(per) => {
            per_identity::check_dir(per)?;
            per_identity::bind_initial(per, &orgs)
        }
        None => Default::default(),
    };
    let sockets_synced = tokio::sync::watch::Sender::new(0u64);

    let shutdown = CancellationToken::new();
    let proxy = Arc::new(Proxy {
        orgs: orgs.clone(),
        limiter: limiter.clone(),
        gate: Gate::new(&cfg.listen, &cfg.allowed_hosts),
        target: cfg.upstream.clone(),
        added_headers: added.clone(),
        response_timeout: cfg.response_timeout,
        shutdown: shutdown.clone(),
        metrics: metrics.clone(),
        ids: Default::default(),
    });
    let admin_state = Arc::new(AdminState {
        orgs: orgs.clone(),
        connections,
        accepting: true.into(),
        draining: false.into(),
        metrics,
        limiter,
        thresholds,
        started: std::time::Instant::now(),
        upstream_url: format!(
            "https://{}{}",
            cfg.upstream.authority, cfg.upstream.base_path
        ),
        listen: listen.to_string(),
    });
    identity::watch::spawn(
        orgs.clone(),
        cfg.reload_debounce,
        cfg.reload_interval,
        background.clone(),
    );
    tokio::spawn(crate::admin::serve(
        admin_listener,
        admin_state.clone(),
        background.clone(),
    ));
    tokio::spawn(refresh_pool(
        orgs.clone(),
        cfg.upstream_max_connection_age,
        background.clone(),
    ));
    tokio::spawn(daily_renewal_notice(orgs.clone(), background.clone()));
    if cfg
        .add_headers
        .iter()
        .any(|h| matches!(h.value, HeaderSource::File(_)))
    {
        tokio::spawn(refresh_headers(cfg.clone(), added, background.clone()));
    }

    tracing::info!(listen = %listen, admin = %admin, upstream = %cfg.upstream.authority, base_path = %cfg.upstream.base_path, "vero-proxy is serving");
    let limits = ClientLimits::from_config(&cfg);
    let sockets = cfg.listen_per_identity.clone().map(|per| {
        tokio::spawn(per_identity::serve(
            per,
            proxy.clone(),
            limits.clone(),
            shutdown.clone(),
            initial_sockets,
            sockets_synced.clone(),
        ))
    });
    let accept = tokio::spawn(server::accept_loop(
        listener,
        proxy.clone(),
        Route::Header,
        limits,
        shutdown.clone(),
    ));
    let grace = cfg.shutdown_grace;
    let admin_for_drain = admin_state.clone();
    let task = tokio::spawn(async move {
        let graceful = match accept.await {
            Ok(g) => g,
            Err(_) => return,
        };
        admin_state.accepting.store(false, Ordering::Relaxed);
        tracing::info!(grace = ?grace, "draining: no new connections; requests in flight may finish");
        let drain = async {
            let per_identity = async {
                if let Some(s) = sockets {
                    if let Ok(drains) = s.await {
                        drains.await;
                    }
                }
            };
            tokio::join!(graceful.shutdown(), per_identity);
        };
        if tokio::time::timeout(grace, drain).await.is_err() {
            tracing::warn!(
                "requests still in flight after --shutdown-grace {grace:?}; closing them"
            );
        }
        background.cancel();
    });
    Ok(Running {
        orgs,
        sockets_synced,
        listen,
        admin,
        proxy,
        shutdown,
        task,
        admin_state: admin_for_drain,
        shutdown_delay: cfg.shutdown_delay,
    })
}

/// Runs until SIGTERM or SIGINT, then drains and returns.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    // Handlers first: a signal that arrives while starting must drain, not kill the process.
    let signals = Signals::install()?;
    let running = start(cfg).await?;
    signals.wait().await;
    tracing::info!("shutdown signal received");
    running.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM and SIGINT handlers, installed before anything is served.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers.
    pub fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on SIGTERM or SIGINT.
    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
    }
}

/// Replaces the pools every `max_age`, through the same swap a new identity uses, so DNS changes
/// are seen and no connection lives forever.
async fn refresh_pool(orgs: Arc<Orgs>, max_age: std::time::Duration, stop: CancellationToken) {
    if max_age.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(max_age) => {},
            _ = stop.cancelled() => return,
        }
        orgs.refresh_pools().await;
    }
}

/// Re-reads `--add-header NAME: @PATH` files and swaps in changed values. A file that cannot be
/// read keeps the last good value and is reported.
async fn refresh_headers(cfg: Arc<Config>, added: AddedHeaders, stop: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = stop.cancelled() => return,
        }
        match read_added_headers(&cfg.add_headers) {
            Ok(now) => {
                last_error = None;
                if now != **added.load() {
                    added.store(Arc::new(now));
                    tracing::info!(
                        "an --add-header value file changed; new requests carry the new value"
                    );
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_ref() != Some(&msg) {
                    tracing::warn!("{msg}; keeping the last value");
                    last_error = Some(msg);
                }
            }
        }
    }
}

/// Repeats the renewal notice once a day while an identity in service is inside the renewal
/// window, so it cannot scroll out of sight.
async fn daily_renewal_notice(orgs: Arc<Orgs>, stop: CancellationToken) {
    let day = std::time::Duration::from_secs(86_400);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(day) => {},
            _ = stop.cancelled() => return,
        }
        orgs.log_renewal();
    }
}
