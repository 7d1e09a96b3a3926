//! What makes the proxy load its identity again: file-system events in the files' directories
//! (debounced), SIGHUP, and polling as a safety net for mounts where events never arrive.
//! `POST /reload` on the admin listener calls the reloader directly.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::orgs::Orgs;

/// Starts every trigger; they stop when `stop` is cancelled. `debounce` is the quiet time after
/// the last file event; `poll` of zero turns polling off.
pub fn spawn(orgs: Arc<Orgs>, debounce: Duration, poll: Duration, stop: CancellationToken) {
    match file_events(&orgs) {
        Ok((watcher, rx)) => {
            tokio::spawn(on_events(orgs.clone(), rx, debounce, watcher, stop.clone()));
        }
        // Out of inotify instances, or a file system without events: still serve, and say
        // what still reloads.
        Err(e) => tracing::warn!(
            "file events for the identity are unavailable ({e}); it is reloaded by polling every {poll:?} \
             (--reload-interval; 0 means never), SIGHUP and POST /reload"
        ),
    }
    // Registered now, not inside the task: a SIGHUP sent right after start-up must not be lost.
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(hup) => {
            tokio::spawn(on_sighup(orgs.clone(), hup, stop.clone()));
        }
        Err(e) => tracing::warn!(
            "cannot listen for SIGHUP ({e}); file events, polling and POST /reload still reload"
        ),
    }
    if !poll.is_zero() {
        tokio::spawn(on_poll(orgs, poll, stop));
    }
}

/// What changed: one subdirectory of `--identities-dir` (by name), or anything else (the single
/// identity's files, the directory itself, a Kubernetes volume's `..data` swap).
type Changed = Option<String>;

type Events = (notify::RecommendedWatcher, mpsc::UnboundedReceiver<Changed>);

fn file_events(orgs: &Orgs) -> anyhow::Result<Events> {
    let (tx, rx) = mpsc::unbounded_channel::<Changed>();
    let root = orgs.root().map(Path::to_path_buf);
    let classify = root.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match res {
            // Our own reads show up as access events; only changes matter.
            Ok(ev) if matters(&ev.kind) => {
                for changed in which(classify.as_deref(), &ev.paths) {
                    let _ = tx.send(changed);
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "file watch error; polling still checks the identity files")
            }
        }
    })?;
    match &root {
        Some(root) => watcher
            .watch(root, RecursiveMode::Recursive)
            .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", root.display()))?,
        None => {
            for org in orgs.all() {
                let dirs = org.reloader.source().watch_dirs();
                for dir in &dirs {
                    watcher
                        .watch(dir, RecursiveMode::NonRecursive)
                        .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
                }
                // A next identity's directory may not exist yet: its parent then; and if that
                // cannot be watched either, the staged identity is still looked at on its
                // interval, and the current identity's events are not lost over it.
                for d in org.staged.iter().flat_map(|s| s.source.watch_dirs()) {
                    let d = if d.is_dir() {
                        d
                    } else {
                        d.parent().map(Path::to_path_buf).unwrap_or(d)
                    };
                    if dirs.contains(&d) {
                        continue;
                    }
                    if let Err(e) = watcher.watch(&d, RecursiveMode::NonRecursive) {
                        tracing::warn!(
                            "cannot watch {} for the next identity ({e}); it is looked at every \
                             --activation-check-interval",
                            d.display()
                        );
                    }
                }
            }
        }
    }
    Ok((watcher, rx))
}

/// The subdirectories (of `root`) an event's paths are in; `None` for a path elsewhere.
fn which(root: Option<&Path>, paths: &[std::path::PathBuf]) -> Vec<Changed> {
    let Some(root) = root else {
        return vec![None];
    };
    let mut out: Vec<Changed> = paths
        .iter()
        .map(|p| {
            let first = p.strip_prefix(root).ok()?.components().next()?;
            let name = first.as_os_str().to_str()?;
            (!name.starts_with('.')).then(|| name.to_owned())
        })
        .collect();
    if out.is_empty() {
        out.push(None);
    }
    out
}

fn matters(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

async fn on_events(
    orgs: Arc<Orgs>,
    mut rx: mpsc::UnboundedReceiver<Changed>,
    debounce: Duration,
    watcher: notify::RecommendedWatcher,
    stop: CancellationToken,
) {
    // The watcher lives as long as this task.
    let _watcher = watcher;
    loop {
        let mut burst: BTreeSet<Changed> = BTreeSet::new();
        tokio::select! {
            got = rx.recv() => match got { Some(c) => { burst.insert(c); } None => return },
            _ = stop.cancelled() => return,
        }
        // A burst (cert and key written moments apart, a symlink swap) becomes one reload.
        loop {
            tokio::select! {
                got = rx.recv() => match got { Some(c) => { burst.insert(c); } None => return },
                _ = tokio::time::sleep(debounce) => break,
                _ = stop.cancelled() => return,
            }
        }
        if burst.contains(&None) {
            if orgs.is_dir() {
                orgs.poll_as("file change").await;
            } else {
                orgs.reload_all("file change").await;
            }
        } else {
            for name in burst.into_iter().flatten() {
                orgs.sync_one(&name, "file change").await;
            }
        }
    }
}

async fn on_sighup(orgs: Arc<Orgs>, mut hup: tokio::signal::unix::Signal, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = hup.recv() => { orgs.reload_all("SIGHUP").await; }
            _ = stop.cancelled() => return,
        }
    }
}

async fn on_poll(orgs: Arc<Orgs>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = stop.cancelled() => return,
        }
        orgs.poll_as("poll").await;
    }
}
