//! What makes the proxy load its identity again: file-system events in the files' directories
//! (debounced), SIGHUP, and polling as a safety net for mounts where events never arrive.
//! `POST /reload` on the admin listener calls the reloader directly.

use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::reload::Reloader;

/// Starts every trigger; they stop when `stop` is cancelled. `debounce` is the quiet time after
/// the last file event; `poll` of zero turns polling off.
pub fn spawn(reloader: Arc<Reloader>, debounce: Duration, poll: Duration, stop: CancellationToken) {
    match file_events(&reloader) {
        Ok((watcher, rx)) => {
            tokio::spawn(on_events(reloader.clone(), rx, debounce, watcher, stop.clone()));
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
            tokio::spawn(on_sighup(reloader.clone(), hup, stop.clone()));
        }
        Err(e) => tracing::warn!(
            "cannot listen for SIGHUP ({e}); file events, polling and POST /reload still reload"
        ),
    }
    if !poll.is_zero() {
        tokio::spawn(on_poll(reloader, poll, stop));
    }
}

type Events = (notify::RecommendedWatcher, mpsc::UnboundedReceiver<()>);

fn file_events(reloader: &Reloader) -> anyhow::Result<Events> {
    let (tx, rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match res {
            // Our own reads show up as access events; only changes matter.
            Ok(ev) if matters(&ev.kind) => {
                let _ = tx.send(());
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "file watch error; polling still checks the identity files")
            }
        }
    })?;
    for dir in reloader.source().watch_dirs() {
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
    }
    Ok((watcher, rx))
}

fn matters(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

async fn on_events(
    reloader: Arc<Reloader>,
    mut rx: mpsc::UnboundedReceiver<()>,
    debounce: Duration,
    watcher: notify::RecommendedWatcher,
    stop: CancellationToken,
) {
    // The watcher lives as long as this task.
    let _watcher = watcher;
    loop {
        tokio::select! {
            got = rx.recv() => if got.is_none() { return },
            _ = stop.cancelled() => return,
        }
        // A burst (cert and key written moments apart, a symlink swap) becomes one reload.
        loop {
            tokio::select! {
                got = rx.recv() => if got.is_none() { return },
                _ = tokio::time::sleep(debounce) => break,
                _ = stop.cancelled() => return,
            }
        }
        reloader.reload("file change").await;
    }
}

async fn on_sighup(
    reloader: Arc<Reloader>,
    mut hup: tokio::signal::unix::Signal,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = hup.recv() => { reloader.reload("SIGHUP").await; }
            _ = stop.cancelled() => return,
        }
    }
}

async fn on_poll(reloader: Arc<Reloader>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = stop.cancelled() => return,
        }
        if reloader.files_changed() {
            reloader.reload("poll").await;
        }
    }
}
