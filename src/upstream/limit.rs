//! The caps towards the upstream: concurrent requests (with a bounded, time-limited queue in
//! front) and open connections (`ConnLimit`, shared by every pool, connecting included).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ProxyError;

/// At most `cap` requests in flight upstream; up to `queue_size` more wait, each at most
/// `queue_timeout`. The semaphore is fair, so waiters are served in arrival order.
pub struct Limiter {
    sem: Arc<Semaphore>,
    waiting: AtomicUsize,
    queue_size: usize,
    queue_timeout: Duration,
    cap: usize,
}

/// Decrements the waiting count however the wait ends (granted, timed out, or cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Limiter {
    /// A limiter for `cap` concurrent requests.
    pub fn new(cap: usize, queue_size: usize, queue_timeout: Duration) -> Self {
        Limiter {
            sem: Arc::new(Semaphore::new(cap)),
            waiting: AtomicUsize::new(0),
            queue_size,
            queue_timeout,
            cap,
        }
    }

    /// A place under the cap, held until the response body has ended.
    pub async fn acquire(&self) -> Result<OwnedSemaphorePermit, ProxyError> {
        self.acquire_as("--max-upstream-concurrency").await
    }

    /// The same, naming `cap_flag` when the wait fails.
    async fn acquire_as(&self, cap_flag: &str) -> Result<OwnedSemaphorePermit, ProxyError> {
        if let Ok(p) = self.sem.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.queue_size {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(ProxyError::UpstreamBusy(format!(
                "{} requests are already waiting for one of the {} upstream places ({cap_flag}, --upstream-queue-size); retry shortly",
                self.queue_size, self.cap
            )));
        }
        let _w = Waiting(&self.waiting);
        match tokio::time::timeout(self.queue_timeout, self.sem.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(ProxyError::ShuttingDown),
            Err(_) => Err(ProxyError::UpstreamBusy(format!(
                "all {} upstream places ({cap_flag}) stayed busy for {:?} (--upstream-queue-timeout); retry shortly",
                self.cap, self.queue_timeout
            ))),
        }
    }

    /// Requests in flight upstream now.
    pub fn in_flight(&self) -> usize {
        self.cap - self.sem.available_permits()
    }

    /// Requests waiting now.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// The places a request holds until its answer has ended: one under the global cap, and one
/// under its organisation's cap when there is one.
pub struct Places {
    _global: OwnedSemaphorePermit,
    _organisation: Option<OwnedSemaphorePermit>,
}

impl Places {
    /// Takes a place under the organisation's cap first (so one busy organisation waits in its
    /// own queue instead of filling the global one), then under the global cap.
    pub async fn acquire(
        global: &Limiter,
        organisation: Option<&Limiter>,
    ) -> Result<Places, ProxyError> {
        let own = match organisation {
            Some(l) => Some(
                l.acquire_as("--max-upstream-concurrency-per-organisation")
                    .await?,
            ),
            None => None,
        };
        Ok(Places {
            _global: global.acquire().await?,
            _organisation: own,
        })
    }
}

/// The cap on upstream connections, shared by every pool, with a count of those open
/// (connecting included) and the most ever open at once.
pub struct ConnLimit {
    sem: Arc<Semaphore>,
    open: AtomicUsize,
    peak: AtomicUsize,
    closed: tokio::sync::Notify,
}

/// One connection's place under the cap, held for the connection's life.
pub struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    limit: Arc<ConnLimit>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.limit.open.fetch_sub(1, Ordering::Relaxed);
        self.limit.closed.notify_waiters();
    }
}

impl ConnLimit {
    /// A cap of `max` connections.
    pub fn new(max: usize) -> Arc<ConnLimit> {
        Arc::new(ConnLimit {
            sem: Arc::new(Semaphore::new(max)),
            open: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            closed: tokio::sync::Notify::new(),
        })
    }

    pub(super) async fn acquire(self: &Arc<Self>) -> Option<ConnSlot> {
        let permit = self.sem.clone().acquire_owned().await.ok()?;
        Some(self.slot(permit))
    }

    pub(super) fn try_acquire(self: &Arc<Self>) -> Option<ConnSlot> {
        let permit = self.sem.clone().try_acquire_owned().ok()?;
        Some(self.slot(permit))
    }

    fn slot(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> ConnSlot {
        let now = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
        ConnSlot {
            _permit: permit,
            limit: self.clone(),
        }
    }

    /// Connections open or connecting now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Waits until at most `n` connections are open or connecting.
    pub async fn open_at_most(&self, n: usize) {
        until(&self.closed, || self.open() <= n).await;
    }

    /// The most connections ever open or connecting at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
}

/// Waits until `done` holds, looking again each time `changed` is notified. Registered before
/// each look, so a change in between is not missed.
pub(crate) async fn until(changed: &tokio::sync::Notify, done: impl Fn() -> bool) {
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done() {
            return;
        }
        notified.await;
    }
}
