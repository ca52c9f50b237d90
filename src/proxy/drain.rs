//! Graceful shutdown of one worker's client connections: when it begins, each connection is
//! asked to finish (hyper stops reading new requests, completes the ones in flight, then
//! closes), and the worker waits until all are gone.
//!
//! hyper-util's `GracefulShutdown` does the same by polling a watch channel's future inside
//! every poll of every connection; here a connection reads one flag per poll and hands over
//! its waker only when the waker changes.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::Waker;

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::Notify;

#[derive(Default)]
pub struct Drain {
    closing: AtomicBool,
    next_id: AtomicU64,
    /// The connections still open, with the waker that wakes each.
    open: Mutex<HashMap<u64, Option<Waker>>>,
    /// Notified when the last connection leaves after shutdown began.
    emptied: Notify,
}

impl Drain {
    /// Serves `conn` to its end, asking it to finish gracefully once `shutdown` begins.
    pub async fn watch<C: GracefulConnection>(&self, conn: C) -> C::Output {
        self.watch_until(conn, std::future::pending()).await
    }

    /// `watch`, also asking `conn` to finish gracefully once `early` completes.
    pub async fn watch_until<C, E>(&self, conn: C, early: E) -> C::Output
    where
        C: GracefulConnection,
        E: Future<Output = ()>,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.open().insert(id, None);
        let _leave = Leave { drain: self, id };
        let mut conn = pin!(conn);
        let mut early = pin!(early);
        let mut told = false;
        let mut known: Option<Waker> = None;
        std::future::poll_fn(|cx| {
            if !told {
                if !known.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    known = Some(cx.waker().clone());
                    self.open().insert(id, known.clone());
                }
                // After the waker is in place: a shutdown that begins later wakes it.
                if self.closing.load(Ordering::Acquire) || early.as_mut().poll(cx).is_ready() {
                    told = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            conn.as_mut().poll(cx)
        })
        .await
    }

    /// Asks every connection to finish and waits until none is left.
    pub async fn shutdown(&self) {
        self.closing.store(true, Ordering::Release);
        for waker in self.open().values().flatten() {
            waker.wake_by_ref();
        }
        loop {
            let mut emptied = pin!(self.emptied.notified());
            emptied.as_mut().enable();
            if self.open().is_empty() {
                return;
            }
            emptied.await;
        }
    }

    /// How many connections are open.
    #[cfg(test)]
    fn count(&self) -> usize {
        self.open().len()
    }

    fn open(&self) -> MutexGuard<'_, HashMap<u64, Option<Waker>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Takes a connection off the list however its future ends (completed or dropped).
struct Leave<'a> {
    drain: &'a Drain,
    id: u64,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut open = self.drain.open();
        open.remove(&self.id);
        if open.is_empty() && self.drain.closing.load(Ordering::Acquire) {
            self.drain.emptied.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    use http_body_util::Empty;
    use hyper::body::Bytes;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A served connection with a request in flight finishes that request after shutdown
    /// begins, then closes; shutdown returns once it has.
    #[tokio::test]
    async fn shutdown_lets_the_request_in_flight_finish_then_closes_the_connection() {
        let drain = Arc::new(Drain::default());
        let (client, server) = tokio::io::duplex(4096);
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let release = Arc::new(Mutex::new(Some(release_rx)));
        let service = service_fn(move |_req| {
            let release = release.lock().expect("lock").take();
            async move {
                if let Some(rx) = release {
                    let _ = rx.await;
                }
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
            }
        });
        let conn = http1::Builder::new().serve_connection(TokioIo::new(server), service);
        let served = tokio::spawn({
            let drain = drain.clone();
            async move { drain.watch(conn).await }
        });

        let (mut read, mut write) = tokio::io::split(client);
        write
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        while drain.count() == 0 {
            tokio::task::yield_now().await;
        }
        // Let the request reach the service, then begin shutdown with it in flight.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let shutdown = tokio::spawn({
            let drain = drain.clone();
            async move { drain.shutdown().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!shutdown.is_finished(), "shutdown waits for the request");
        release_tx.send(()).expect("release");

        let mut response = Vec::new();
        read.read_to_end(&mut response).await.expect("read");
        let text = String::from_utf8_lossy(&response);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{text}"
        );
        served.await.expect("join").expect("served cleanly");
        tokio::time::timeout(Duration::from_secs(5), shutdown)
            .await
            .expect("shutdown returns once the connection closed")
            .expect("join");
        assert_eq!(drain.count(), 0);
    }

    #[tokio::test]
    async fn shutdown_with_no_connection_returns_at_once() {
        let drain = Drain::default();
        tokio::time::timeout(Duration::from_secs(1), drain.shutdown())
            .await
            .expect("nothing to wait for");
    }
}
