//! `--listen-per-identity unix:/run/vero-proxy/{id}.sock`: one Unix socket per organisation,
//! whose requests always use that organisation's identity. Sockets follow the identities:
//! opened when one is loaded, closed and removed when it is retired.

use std::collections::HashMap;
use std::sync::Arc;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::business_id::BusinessId;
use crate::config::{ListenAddr, PerIdentityListen};
use crate::orgs::Route;
use crate::proxy::Proxy;
use crate::server::{self, ClientLimits};

/// Fails at start when the sockets' directory does not exist, rather than at the first identity.
pub fn check_dir(per: &PerIdentityListen) -> anyhow::Result<()> {
    let sample = std::path::Path::new(&per.template);
    match sample.parent() {
        Some(dir) if dir.is_dir() => Ok(()),
        Some(dir) => anyhow::bail!(
            "--listen-per-identity unix:{}: the directory {} does not exist (under systemd, \
             RuntimeDirectory=vero-proxy makes /run/vero-proxy)",
            per.template,
            dir.display()
        ),
        None => anyhow::bail!("--listen-per-identity unix:{}: no directory", per.template),
    }
}

struct Open {
    stop: CancellationToken,
    task: JoinHandle<GracefulShutdown>,
}

/// Keeps one socket per organisation in service until `shutdown`; then returns a future that
/// drains every socket's connections.
pub async fn serve(
    per: PerIdentityListen,
    proxy: Arc<Proxy>,
    limits: ClientLimits,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> {
    let mut changed = proxy.orgs.subscribe();
    let mut open: HashMap<BusinessId, Open> = HashMap::new();
    let mut closing: Vec<JoinHandle<GracefulShutdown>> = Vec::new();
    loop {
        let wanted: Vec<BusinessId> = proxy.orgs.all().iter().filter_map(|o| o.id).collect();
        open.retain(|id, o| {
            let keep = wanted.contains(id);
            if !keep {
                tracing::info!(organisation = %id, "closing its socket: the identity was retired");
                o.stop.cancel();
            }
            keep
        });
        for id in wanted {
            if open.contains_key(&id) {
                continue;
            }
            match bind(&per, &id) {
                Ok(listener) => {
                    let stop = shutdown.child_token();
                    let task = tokio::spawn(server::accept_loop(
                        listener,
                        proxy.clone(),
                        Route::Fixed(id),
                        limits.clone(),
                        stop.clone(),
                    ));
                    open.insert(id, Open { stop, task });
                }
                Err(e) => {
                    tracing::error!(organisation = %id, "{e:#}; its requests can still use the main listener with the header")
                }
            }
        }
        tokio::select! {
            c = changed.changed() => if c.is_err() { break },
            _ = shutdown.cancelled() => break,
        }
        // Sockets of retired identities drain in the background.
        closing.retain(|t| !t.is_finished());
    }
    closing.extend(open.into_values().map(|o| o.task));
    async move {
        for task in closing {
            if let Ok(graceful) = task.await {
                graceful.shutdown().await;
            }
        }
    }
}

fn bind(per: &PerIdentityListen, id: &BusinessId) -> anyhow::Result<server::Listener> {
    let path = per.path_for(id);
    let listener = server::bind(&ListenAddr::Unix(path.clone()), per.mode)?;
    if let Some(gid) = per.gid {
        std::os::unix::fs::chown(&path, None, Some(gid)).map_err(|e| {
            anyhow::anyhow!(
                "cannot give {} to group {gid} (--listen-per-identity-group): {e}",
                path.display()
            )
        })?;
    }
    tracing::info!(organisation = %id, socket = %path.display(), "listening for this organisation only");
    Ok(listener)
}
