//! The HTTP/1 header-read timer (`proxy.header_read_timeout`), made cheap for the request path.
//!
//! hyper starts this timer each time it waits for a request head and drops it once the head is
//! in, so on a keep-alive connection it is made and dropped once per request. With tokio's
//! timer that is a boxed `Sleep` filed into and taken out of the runtime's timer wheel, plus the
//! wheel's own work whenever the worker parks. Replacing it saved 640 instructions on a refused
//! request (4 %) and 1,040 on a forwarded one (3 %) (callgrind, `benches/RESULTS.md`).
//!
//! A slowloris guard needs no such precision. Here a waiting head costs a slot in a per-worker
//! list, and one sweep per tick (an eighth of the timeout, at most a second) wakes the heads
//! that are overdue. hyper reads the time (`Timer::now`) before each head to set its deadline;
//! this timer answers with the time of its last sweep plus one tick, never earlier than the
//! true time while the sweep keeps its pace, so a request reads no clock for it (−1 clock read
//! of ~25 ns per request). A head is given between the timeout and the timeout plus two ticks.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;

/// One proxy worker's header-read timer, handed to hyper's HTTP/1 builder.
#[derive(Clone)]
pub(super) struct HeadTimer {
    shared: Arc<Shared>,
}

struct Shared {
    waiting: Mutex<Slab<Waiting>>,
    tick: Duration,
    /// What `now` answers, as nanoseconds since `epoch`: the last sweep's time plus a tick.
    coarse: AtomicU64,
    epoch: Instant,
}

/// A head being waited for.
struct Waiting {
    deadline: Instant,
    waker: Waker,
    overdue: bool,
}

impl HeadTimer {
    /// A timer for heads given `timeout`; `sweep` must run on the worker for it to fire.
    pub fn new(timeout: Duration) -> HeadTimer {
        let tick = (timeout / 8).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let shared = Shared {
            waiting: Mutex::new(Slab::new()),
            tick,
            coarse: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        shared.set_coarse(shared.epoch);
        HeadTimer {
            shared: Arc::new(shared),
        }
    }

    /// Wakes the overdue heads' connections, once per tick, for as long as the worker runs.
    ///
    /// Its own timer also keeps one on the worker's runtime that is always due within a second.
    /// tokio's timer wakes its driver through an eventfd whenever a new timer is due earlier
    /// than every timer it knew of when it last parked; with nothing due sooner than the
    /// requests' own timeouts (10 s and up), a request that started one (`Dedicated::within`)
    /// after the worker had parked paid an eventfd write and an extra `epoll_wait` (0.15 per
    /// request at 128 connections).
    pub async fn sweep(self) {
        let mut ticks = tokio::time::interval(self.shared.tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let now = Instant::now();
            self.shared.set_coarse(now);
            let mut waiting = self.shared.lock();
            for (_, head) in waiting.iter_mut() {
                if !head.overdue && head.deadline <= now {
                    head.overdue = true;
                    head.waker.wake_by_ref();
                }
            }
        }
    }
}

impl Shared {
    /// Makes `now` answer `at` plus one tick.
    fn set_coarse(&self, at: Instant) {
        let nanos = (at + self.tick)
            .saturating_duration_since(self.epoch)
            .as_nanos();
        self.coarse
            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn coarse(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.coarse.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slab<Waiting>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    /// The last sweep's time plus one tick: no clock read (see the module notes).
    fn now(&self) -> Instant {
        self.shared.coarse()
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(HeadSleep {
            shared: self.shared.clone(),
            deadline,
            slot: None,
        })
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<HeadSleep>() {
            Some(mut own) => own.as_mut().set_deadline(new_deadline),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

/// hyper's handle on one wait for a head. Files itself in the worker's list when first polled
/// (a head already in the buffer never waits) and leaves it when dropped.
struct HeadSleep {
    shared: Arc<Shared>,
    deadline: Instant,
    slot: Option<usize>,
}

impl HeadSleep {
    fn set_deadline(self: Pin<&mut Self>, deadline: Instant) {
        let this = self.get_mut();
        this.deadline = deadline;
        if let Some(slot) = this.slot {
            if let Some(head) = this.shared.lock().get_mut(slot) {
                head.deadline = deadline;
                head.overdue = false;
            }
        }
    }
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let mut waiting = this.shared.lock();
        match this.slot.and_then(|slot| waiting.get_mut(slot)) {
            Some(head) if head.overdue => Poll::Ready(()),
            Some(head) => {
                if !head.waker.will_wake(cx.waker()) {
                    head.waker = cx.waker().clone();
                }
                Poll::Pending
            }
            None => {
                this.slot = Some(waiting.insert(Waiting {
                    deadline: this.deadline,
                    waker: cx.waker().clone(),
                    overdue: false,
                }));
                Poll::Pending
            }
        }
    }
}

impl hyper::rt::Sleep for HeadSleep {}

impl Drop for HeadSleep {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            self.shared.lock().try_remove(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    fn poll(sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>) -> Poll<()> {
        sleep.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test]
    async fn a_wait_ends_after_its_deadline_and_a_dropped_one_leaves_the_list() {
        let timer = HeadTimer::new(Duration::from_millis(240));
        assert_eq!(timer.shared.tick, Duration::from_millis(30));
        tokio::spawn(timer.clone().sweep());
        let started = Instant::now();
        timer.sleep(Duration::from_millis(240)).await;
        let waited = started.elapsed();
        // Never early; the upper bound leaves room for a loaded machine.
        assert!(
            waited >= Duration::from_millis(240) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        assert_eq!(timer.shared.lock().len(), 0);

        // A head that arrives in time: the wait is dropped and its slot freed.
        let mut early = timer.sleep(Duration::from_secs(5));
        assert!(poll(&mut early).is_pending());
        assert_eq!(timer.shared.lock().len(), 1);
        drop(early);
        assert_eq!(timer.shared.lock().len(), 0);
    }

    #[tokio::test]
    async fn now_reads_no_clock_yet_is_never_behind_it_and_at_most_two_ticks_ahead() {
        let timer = HeadTimer::new(Duration::from_secs(8));
        let tick = timer.shared.tick;
        assert_eq!(tick, Duration::from_secs(1));
        // Before the first sweep, and across sweeps (the interval's first tick is at once).
        assert!(timer.now() >= Instant::now());
        tokio::spawn(timer.clone().sweep());
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let coarse = timer.now();
            let real = Instant::now();
            assert!(coarse >= real, "{:?} behind", real - coarse);
            assert!(coarse <= real + 2 * tick, "{:?} ahead", coarse - real);
        }
        // It moves with the sweep only: two reads between sweeps agree.
        assert_eq!(timer.now(), timer.now());
    }

    #[tokio::test]
    async fn reset_moves_a_filed_wait_and_re_arms_it() {
        let timer = HeadTimer::new(Duration::from_millis(80));
        assert_eq!(timer.shared.tick, Duration::from_millis(10));
        tokio::spawn(timer.clone().sweep());
        let mut sleep = timer.sleep(Duration::from_millis(80));
        assert!(poll(&mut sleep).is_pending());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(poll(&mut sleep).is_ready());

        let started = Instant::now();
        timer.reset(&mut sleep, started + Duration::from_millis(200));
        assert!(poll(&mut sleep).is_pending(), "re-armed");
        sleep.await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        assert_eq!(timer.shared.lock().len(), 0);
    }
}
