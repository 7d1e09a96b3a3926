//! Keep-alive clients sending requests through the proxy back to back, for tests that change
//! something under load and must lose no request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Running clients: the count of 200 answers and a line for every other answer or error.
pub struct Load {
    stop: Arc<AtomicBool>,
    served: Arc<watch::Sender<u64>>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// `clients` keep-alive connections to `addr`, client `i` sending `request(i, n)` as its
    /// `n`th request, until `finish`.
    pub fn start<F>(addr: SocketAddr, clients: usize, request: F) -> Load
    where
        F: Fn(usize, u64) -> Request<Full<Bytes>> + Send + Sync + 'static,
    {
        Self::counted(addr, clients, u64::MAX, request)
    }

    /// As `start`, each client ending by itself after `per_client` requests.
    pub fn counted<F>(addr: SocketAddr, clients: usize, per_client: u64, request: F) -> Load
    where
        F: Fn(usize, u64) -> Request<Full<Bytes>> + Send + Sync + 'static,
    {
        let request = Arc::new(request);
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(watch::Sender::new(0u64));
        let failures: Arc<Mutex<Vec<String>>> = Arc::default();
        let tasks = (0..clients)
            .map(|i| {
                let (request, stop, served, failures) = (
                    request.clone(),
                    stop.clone(),
                    served.clone(),
                    failures.clone(),
                );
                tokio::spawn(async move {
                    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                    let (mut tx, conn) =
                        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                            .await
                            .unwrap();
                    tokio::spawn(conn);
                    let fail =
                        |what: String| failures.lock().unwrap().push(format!("client {i}: {what}"));
                    for n in 0..per_client {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        // A transport error ends this client: its connection is gone.
                        if let Err(e) = tx.ready().await {
                            fail(e.to_string());
                            break;
                        }
                        let resp = match tx.send_request(request(i, n)).await {
                            Ok(r) => r,
                            Err(e) => {
                                fail(e.to_string());
                                break;
                            }
                        };
                        let status = resp.status();
                        match resp.into_body().collect().await {
                            Ok(_) if status == 200 => served.send_modify(|s| *s += 1),
                            Ok(body) => fail(format!(
                                "{status} {}",
                                String::from_utf8_lossy(&body.to_bytes())
                            )),
                            Err(e) => {
                                fail(format!("{status}, then the body failed: {e}"));
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            served,
            failures,
            tasks,
        }
    }

    /// The 200 answers so far.
    pub fn served(&self) -> u64 {
        *self.served.borrow()
    }

    /// Waits until `n` more requests have been answered 200; panics after 30 s.
    pub async fn progress(&self, n: u64) {
        let mut rx = self.served.subscribe();
        let goal = *rx.borrow_and_update() + n;
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|s| *s >= goal))
            .await
            .expect("the load stalled")
            .expect("the load's counter is held by the load itself");
    }

    /// Stops the clients; the 200 count and the failures.
    pub async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.join().await
    }

    /// Waits for counted clients to send all their requests; the 200 count and the failures.
    pub async fn join(self) -> (u64, Vec<String>) {
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (*self.served.borrow(), failures)
    }
}
