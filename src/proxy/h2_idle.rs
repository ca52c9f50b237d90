//! The idle bound of an HTTP/2 client connection. An HTTP/1 connection waiting for its next
//! request head is closed after the header read timeout (hyper's timer); hyper sets no bound on
//! an HTTP/2 one waiting for its next stream, or for a preface that never comes, which would let
//! a client hold sockets (and `max_connections` slots) for ever. Here a connection with no
//! request open for that same time is told to go away (GOAWAY, which lets a well-behaved client
//! finish and reconnect), and dropped if it is still idle one period later: hyper cannot shut
//! down gracefully a connection whose client never sent its preface, and the h2 crate waits for
//! a PING answer that a hostile client need not send.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};

/// The requests open on one HTTP/2 connection. Only its own worker thread touches it.
#[derive(Default)]
pub struct Streams {
    open: AtomicUsize,
    /// Requests ever opened: a window in which it did not move saw none start.
    opened: AtomicU64,
}

impl Streams {
    /// Counts a request as open until the guard (or the body holding it) is dropped.
    pub fn open(self: &Arc<Self>) -> Open {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.opened.fetch_add(1, Ordering::Relaxed);
        Open(self.clone())
    }

    /// Returns once no request has been open for a whole `limit`: between one and two of it
    /// after the last one ended (it looks once per `limit`).
    pub async fn idle(&self, limit: Duration) {
        loop {
            let idle_from = (self.open.load(Ordering::Relaxed) == 0)
                .then(|| self.opened.load(Ordering::Relaxed));
            tokio::time::sleep(limit).await;
            if idle_from.is_some_and(|seen| {
                self.open.load(Ordering::Relaxed) == 0
                    && self.opened.load(Ordering::Relaxed) == seen
            }) {
                return;
            }
        }
    }
}

/// One open request of a `Streams`.
pub struct Open(Arc<Streams>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted as open until it is finished or dropped
/// (a long export is a request in progress, not an idle connection).
pub struct Tracked<B> {
    body: B,
    _open: Open,
}

impl<B> Tracked<B> {
    pub fn new(body: B, open: Open) -> Tracked<B> {
        Tracked { body, _open: open }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_a_whole_period_without_an_open_or_a_new_request() {
        let limit = Duration::from_secs(10);
        let streams = Arc::new(Streams::default());
        let started = tokio::time::Instant::now();
        streams.idle(limit).await;
        assert_eq!(started.elapsed(), limit, "idle from the start");

        // Open across two periods, then closed: a full quiet period after that one.
        let open = streams.open();
        let started = tokio::time::Instant::now();
        let closer = async {
            tokio::time::sleep(Duration::from_secs(15)).await;
            drop(open);
        };
        tokio::join!(streams.idle(limit), closer);
        assert_eq!(started.elapsed(), Duration::from_secs(30));

        // A request that starts and ends within a period keeps the connection for one more.
        let started = tokio::time::Instant::now();
        let brief = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(streams.open());
        };
        tokio::join!(streams.idle(limit), brief);
        assert_eq!(started.elapsed(), Duration::from_secs(20));
    }
}
