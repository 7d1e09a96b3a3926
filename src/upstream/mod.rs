//! Identity -> rustls `ClientConfig` -> bounded connection pool: one immutable [`Upstream`] per
//! identity, swapped whole when the identity or the pool is replaced.

pub mod conn;
pub mod egress;
pub mod limit;
pub mod pool;
pub mod tls;

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::RootCertStore;

use crate::config::Config;
use crate::error::ProxyError;
use crate::identity::Identity;
use egress::{Egress, EgressError, ProxyEnv, Route};
use limit::ConnLimit;
use pool::{Pool, PoolSettings};

/// One identity's way to the upstream. Requests take an `Arc` of it at their start and keep it to
/// their end, so a swap never changes a request halfway.
pub struct Upstream {
    /// The identity presented.
    pub identity: Arc<Identity>,
    /// TLS client config for that identity (its own session cache).
    pub tls: Arc<rustls::ClientConfig>,
    /// Connections made with that config.
    pub pool: Pool,
    /// The cap on upstream connections shared by every pool, and their count.
    pub connections: Arc<ConnLimit>,
}

/// What every new `Upstream` is built from, besides the identity.
#[derive(Clone)]
pub struct UpstreamFactory {
    cfg: Arc<Config>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    conn_limit: Arc<ConnLimit>,
    /// The egress proxy, decided once; an unusable setting fails the first `build`, at start.
    egress: Result<Option<Arc<Egress>>, EgressError>,
}

impl UpstreamFactory {
    /// A factory sharing one connection cap across every pool it makes. Decides the egress
    /// (from the config and `HTTPS_PROXY`/`NO_PROXY`) and logs it.
    pub fn new(cfg: Arc<Config>, roots: Arc<RootCertStore>, provider: Arc<CryptoProvider>) -> Self {
        let conn_limit = ConnLimit::new(cfg.max_upstream_concurrency);
        let env = ProxyEnv::from_process();
        let egress = decide_egress(&cfg, &env);
        UpstreamFactory {
            cfg,
            roots,
            provider,
            conn_limit,
            egress,
        }
    }

    /// The cap on connections shared by every pool this factory makes, with their count.
    pub fn connections(&self) -> Arc<ConnLimit> {
        self.conn_limit.clone()
    }

    /// Fails when the egress proxy setting cannot be used (checked once, at start).
    pub fn check(&self) -> Result<(), ProxyError> {
        match &self.egress {
            Ok(_) => Ok(()),
            Err(e) => Err(ProxyError::UpstreamUnreachable(e.0.clone())),
        }
    }

    /// The connect timeout, which also bounds how long a new pool is warmed.
    pub fn connect_timeout(&self) -> std::time::Duration {
        self.cfg.connect_timeout
    }

    /// A new `Upstream` with a new TLS config and an empty pool.
    pub fn build(&self, identity: Arc<Identity>) -> Result<Upstream, ProxyError> {
        let tls = tls::client_config(
            &identity,
            self.roots.clone(),
            self.cfg.upstream_protocol,
            self.provider.clone(),
        )
        .map_err(|e| ProxyError::UpstreamUnreachable(format!("TLS configuration failed: {e}")))?;
        self.with_tls(identity, tls)
    }

    /// A new `Upstream` for the same identity and TLS config, with a fresh pool (so DNS is
    /// looked up again and old connections retire).
    pub fn refresh(&self, current: &Upstream) -> Result<Upstream, ProxyError> {
        self.with_tls(current.identity.clone(), current.tls.clone())
    }

    fn with_tls(
        &self,
        identity: Arc<Identity>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Upstream, ProxyError> {
        let who = identity.info.who();
        let egress = self
            .egress
            .clone()
            .map_err(|e| ProxyError::UpstreamUnreachable(e.0))?;
        let pool = Pool::new(PoolSettings {
            target: self.cfg.upstream.clone(),
            tls: tls.clone(),
            protocol: self.cfg.upstream_protocol,
            conn_limit: self.conn_limit.clone(),
            connect_timeout: self.cfg.connect_timeout,
            idle_timeout: self.cfg.upstream_idle_timeout,
            who,
            egress,
        })?;
        Ok(Upstream {
            identity,
            tls,
            pool,
            connections: self.conn_limit.clone(),
        })
    }
}

/// The egress for `cfg` in this environment, with its credentials read; logs which one is used
/// (the proxy's address only, never its credentials).
fn decide_egress(cfg: &Config, env: &ProxyEnv) -> Result<Option<Arc<Egress>>, EgressError> {
    let t = &cfg.upstream;
    let flags = EgressFlags {
        proxy: cfg.egress_proxy.as_deref(),
        credentials_file: cfg.egress_proxy_credentials_file.as_deref(),
    };
    egress_for(&flags, env, &t.host, t.port, "upstream")
}

/// `--egress-proxy` and `--egress-proxy-credentials-file` as given.
#[derive(Debug, Clone, Copy, Default)]
pub struct EgressFlags<'a> {
    /// `--egress-proxy`.
    pub proxy: Option<&'a str>,
    /// `--egress-proxy-credentials-file`.
    pub credentials_file: Option<&'a std::path::Path>,
}

/// How connections to `host:port` leave this machine, given the flags and the environment
/// (`HTTPS_PROXY`, `NO_PROXY`); logs the choice for `what` ("upstream", "certificate service").
pub fn egress_for(
    flags: &EgressFlags<'_>,
    env: &ProxyEnv,
    host: &str,
    port: u16,
    what: &str,
) -> Result<Option<Arc<Egress>>, EgressError> {
    match egress::resolve(flags.proxy, env, host, port)? {
        Route::Direct(why) => {
            if flags.credentials_file.is_some() {
                tracing::warn!(
                    "--egress-proxy-credentials-file is set but no egress proxy is used for the {what} ({why})"
                );
            }
            tracing::info!("{what} connections go direct ({why})");
            Ok(None)
        }
        Route::Proxy(addr) => {
            let e = Egress::new(addr, flags.credentials_file)?;
            tracing::info!(
                egress_proxy = %e.proxy(),
                from = e.source,
                credentials = e.has_credentials(),
                "{what} connections tunnel through an HTTP proxy with CONNECT"
            );
            Ok(Some(Arc::new(e)))
        }
    }
}

/// The `Upstream` in service, swapped atomically.
pub type SharedUpstream = Arc<ArcSwap<Upstream>>;

/// Puts `next` in service and retires the pool it replaces.
pub fn swap(shared: &SharedUpstream, next: Upstream) {
    let old = shared.swap(Arc::new(next));
    old.pool.retire();
}
