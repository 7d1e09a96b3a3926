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
    inode: Option<u64>,
    stop: CancellationToken,
    task: JoinHandle<GracefulShutdown>,
}

/// The sockets of the identities loaded at start, bound before the proxy says it is serving.
pub fn bind_initial(
    per: &PerIdentityListen,
    orgs: &crate::orgs::Orgs,
) -> HashMap<BusinessId, server::Listener> {
    let mut out = HashMap::new();
    for id in orgs.all().iter().filter_map(|o| o.id) {
        match bind(per, &id) {
            Ok(l) => {
                out.insert(id, l);
            }
            Err(e) => {
                tracing::error!(organisation = %id, "{e:#}; its requests can still use the main listener with the header")
            }
        }
    }
    out
}

/// Keeps one socket per organisation in service until `shutdown`, starting from `initial`;
/// then returns a future that drains every socket's connections. `synced` ticks after every
/// round of opening and closing sockets.
pub async fn serve(
    per: PerIdentityListen,
    proxy: Arc<Proxy>,
    limits: ClientLimits,
    shutdown: CancellationToken,
    initial: HashMap<BusinessId, server::Listener>,
    synced: tokio::sync::watch::Sender<u64>,
) -> impl std::future::Future<Output = ()> {
    let mut changed = proxy.orgs.subscribe();
    let mut open: HashMap<BusinessId, Open> = HashMap::new();
    let mut closing: Vec<JoinHandle<GracefulShutdown>> = Vec::new();
    let start = |listener: server::Listener, id: BusinessId| {
        let inode = listener.inode();
        let stop = shutdown.child_token();
        let task = tokio::spawn(server::accept_loop(
            listener,
            proxy.clone(),
            Route::Fixed(id),
            limits.clone(),
            stop.clone(),
        ));
        Open { inode, stop, task }
    };
    for (id, listener) in initial {
        open.insert(id, start(listener, id));
    }
    loop {
        let wanted: Vec<BusinessId> = proxy.orgs.all().iter().filter_map(|o| o.id).collect();
        let retired: Vec<BusinessId> = open
            .keys()
            .filter(|id| !wanted.contains(id))
            .copied()
            .collect();
        for id in retired {
            if let Some(o) = open.remove(&id) {
                tracing::info!(organisation = %id, "closing its socket: the identity was retired");
                o.stop.cancel();
                // Gone at once, so no new app connects to it; the accept loop leaves a newer
                // socket at the same path alone.
                server::remove_socket(&per.path_for(&id), o.inode);
                closing.push(o.task);
            }
        }
        for id in wanted {
            if open.contains_key(&id) {
                continue;
            }
            match bind(&per, &id) {
                Ok(listener) => {
                    open.insert(id, start(listener, id));
                }
                Err(e) => {
                    tracing::error!(organisation = %id, "{e:#}; its requests can still use the main listener with the header")
                }
            }
        }
        synced.send_modify(|n| *n += 1);
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
