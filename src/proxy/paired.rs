//! Two futures driven by one task, each polled only when its own waker fired.
//!
//! A client connection and its own upstream connection live in one task (see `upstream.rs`).
//! Polled together the plain way (`select!`), every wake-up of either side polls both: the
//! client side's HTTP machinery and the shutdown watcher run when only the upstream answered,
//! and the other way round. Worse, each side wakes the other through the shared task waker
//! (the request handed to the upstream connection, the response handed back), so the task
//! runs again just to find the work already done. Here each side gets a waker of its own
//! that records which side it belongs to, and while this future is polling, wake-ups it causes
//! itself are taken in the same poll instead of scheduling the task again.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use pin_project_lite::pin_project;

const FIRST: u8 = 1;
const SECOND: u8 = 2;

/// Rounds of polling per task poll before yielding: bounds the work one poll does when a side
/// keeps waking itself (a cooperative-scheduling yield, hyper's own yield after a busy loop).
const ROUNDS: usize = 4;

pin_project! {
    /// Completes when `first` does; `second` is polled alongside and never completes it.
    pub struct Paired<A, B> {
        #[pin]
        first: A,
        #[pin]
        second: B,
        shared: Arc<Shared>,
        first_waker: Waker,
        second_waker: Waker,
    }
}

struct Shared {
    /// Which sides were woken since they were last polled.
    woken: AtomicU8,
    /// Set while `Paired::poll` runs: a wake-up then only marks its side.
    polling: AtomicBool,
    /// The task's own waker.
    task: AtomicWaker,
}

struct Side {
    bit: u8,
    shared: Arc<Shared>,
}

impl Wake for Side {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.shared.woken.fetch_or(self.bit, Ordering::SeqCst);
        if !self.shared.polling.load(Ordering::SeqCst) {
            self.shared.task.wake();
        }
    }
}

/// Drives `first` to completion with `second` polled alongside, each when it was woken.
pub fn paired<A: Future, B: Future<Output = ()>>(first: A, second: B) -> Paired<A, B> {
    let shared = Arc::new(Shared {
        woken: AtomicU8::new(FIRST | SECOND),
        polling: AtomicBool::new(false),
        task: AtomicWaker::new(),
    });
    let side = |bit| {
        Waker::from(Arc::new(Side {
            bit,
            shared: shared.clone(),
        }))
    };
    Paired {
        first,
        second,
        first_waker: side(FIRST),
        second_waker: side(SECOND),
        shared,
    }
}

impl<A: Future, B: Future<Output = ()>> Future for Paired<A, B> {
    type Output = A::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<A::Output> {
        let mut this = self.project();
        let shared = &**this.shared;
        shared.task.register(cx.waker());
        shared.polling.store(true, Ordering::SeqCst);
        for _ in 0..ROUNDS {
            let woken = shared.woken.swap(0, Ordering::SeqCst);
            if woken == 0 {
                break;
            }
            if woken & FIRST != 0 {
                let mut first_cx = Context::from_waker(this.first_waker);
                if let Poll::Ready(out) = this.first.as_mut().poll(&mut first_cx) {
                    shared.polling.store(false, Ordering::SeqCst);
                    return Poll::Ready(out);
                }
            }
            if woken & SECOND != 0 {
                let mut second_cx = Context::from_waker(this.second_waker);
                // Its completion means nothing more is coming from it; `first` decides.
                let _ = this.second.as_mut().poll(&mut second_cx);
            }
        }
        shared.polling.store(false, Ordering::SeqCst);
        // Woken during the last round, or after it: run again (a wake-up that came in while
        // `polling` was still set did not schedule the task itself).
        if shared.woken.load(Ordering::SeqCst) != 0 {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// What a probe saw, shared with the test: its polls, whether it may finish, its waker.
    #[derive(Default)]
    struct Handle {
        polls: AtomicUsize,
        ready: AtomicBool,
        waker: std::sync::Mutex<Option<Waker>>,
    }

    impl Handle {
        fn polls(&self) -> usize {
            self.polls.load(Ordering::SeqCst)
        }
        fn wake(&self) {
            let waker = self.waker.lock().expect("lock").clone();
            waker.expect("polled once").wake();
        }
    }

    /// Counts its polls; pending until `ready` is set and its waker called.
    struct Probe(Arc<Handle>);

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.polls.fetch_add(1, Ordering::SeqCst);
            *self.0.waker.lock().expect("lock") = Some(cx.waker().clone());
            if self.0.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    fn probe() -> (Probe, Arc<Handle>) {
        let handle = Arc::new(Handle::default());
        (Probe(Arc::clone(&handle)), handle)
    }

    #[tokio::test]
    async fn each_side_is_polled_only_when_its_own_waker_fired() {
        let (a, ha) = probe();
        let (b, hb) = probe();
        let task = tokio::spawn(paired(a, b));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            (ha.polls(), hb.polls()),
            (1, 1),
            "both sides polled once at the start"
        );

        hb.wake();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!((ha.polls(), hb.polls()), (1, 2), "only the woken side ran");

        ha.wake();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!((ha.polls(), hb.polls()), (2, 2));

        ha.ready.store(true, Ordering::SeqCst);
        ha.wake();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("completes when the first side does")
            .expect("no panic");
        assert_eq!(
            hb.polls(),
            2,
            "the second side is not polled for the first's wake-up"
        );
    }

    /// The second side hands work to the first by waking it while being polled: taken in the
    /// same poll, and the first side's completion ends the pair.
    #[tokio::test]
    async fn a_wake_up_caused_while_polling_is_handled_in_the_same_poll() {
        let (a, ha) = probe();
        let first = Arc::clone(&ha);
        let (go, mut went) = tokio::sync::mpsc::unbounded_channel::<()>();
        let second = async move {
            while went.recv().await.is_some() {
                first.ready.store(true, Ordering::SeqCst);
                first.wake();
            }
        };
        let task = tokio::spawn(paired(a, second));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(ha.polls(), 1);
        go.send(()).expect("send");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("completes")
            .expect("no panic");
        assert_eq!(
            ha.polls(),
            2,
            "one more poll of the first side, no spurious ones"
        );
    }

    /// A side that wakes itself on every poll (a cooperative yield) must not keep the pair
    /// polling forever inside one task poll: other tasks still run.
    #[tokio::test(flavor = "current_thread")]
    async fn a_side_that_keeps_waking_itself_still_lets_other_tasks_run() {
        let spins = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&spins);
        let busy = std::future::poll_fn(move |cx| {
            counted.fetch_add(1, Ordering::SeqCst);
            cx.waker().wake_by_ref();
            Poll::<()>::Pending
        });
        let (b, _hb) = probe();
        let task = tokio::spawn(paired(busy, b));
        // This task only gets the thread if the pair yields.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            spins.load(Ordering::SeqCst) > ROUNDS,
            "the busy side keeps being polled"
        );
        task.abort();
    }
}
