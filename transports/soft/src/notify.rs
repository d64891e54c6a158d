//! Completion notification (`ibv_req_notify_cq`) and the RNR timer.
//!
//! A queue pair's [`Notify`] holds the waker of whoever armed it. Producers
//! of completions check one flag (`armed`) after publishing (and releasing
//! the send mutex they published under); only when it is set do they take
//! the (otherwise unused) mutex and wake.
//!
//! The RNR timer is the one background thread of the crate, and only for the
//! slow path, like rxe's `rnr_nak_timer`: when a SEND has waited for a
//! receive for its RNR delay, the timer retries it (executing it, if a
//! receive is there now, or counting the retry and rescheduling, or failing
//! it with `RnrRetryExcErr`), so a waiting request makes progress even when
//! nobody polls. The thread starts on first use and exits as soon as nothing
//! is scheduled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, Weak};
use std::task::Waker;
use std::time::{Duration, Instant};

/// The waker of a queue pair's completion queue.
#[derive(Default)]
pub(crate) struct Notify {
    armed: AtomicBool,
    /// The owner has a SEND waiting for a receive (RNR): whoever posts a
    /// receive for it retries it at once instead of leaving it to the timer.
    pub(crate) rnr_waiting: AtomicBool,
    waker: Mutex<Option<Waker>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Notify {
    /// Store `waker` and set the flag. The caller then takes the send mutex
    /// its completions are produced under once, and re-checks for them.
    pub(crate) fn arm(&self, waker: &Waker) {
        {
            let mut slot = lock(&self.waker);
            match &mut *slot {
                Some(w) if w.will_wake(waker) => {}
                s => *s = Some(waker.clone()),
            }
        }
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Wake the armed waker, once. Producers call this after publishing
    /// completions and releasing the send mutex they did it under; when
    /// nobody armed it costs one load.
    #[inline]
    pub(crate) fn wake_if_armed(&self) {
        if self.armed.load(Ordering::Relaxed) {
            self.wake();
        }
    }

    /// Wake the armed waker, if any, once: a read-modify-write of the flag
    /// whatever its value (for a producer that holds no send mutex).
    pub(crate) fn wake(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            let w = lock(&self.waker).take();
            if let Some(w) = w {
                w.wake();
            }
        }
    }
}

/// Delay before RNR retry `n` (0 for the first retry): 20 µs, growing
/// fourfold per retry, at most 10 ms.
pub(crate) fn rnr_delay(n: u32) -> Duration {
    let us = 20u64.saturating_mul(4u64.saturating_pow(n));
    Duration::from_micros(us.min(10_000))
}

/// Something the RNR timer retries when its delay is over.
pub(crate) trait Retry: Send + Sync {
    /// Retry the waiting request (runs on the timer thread).
    fn retry(&self);
}

struct Timer {
    entries: Vec<(Instant, Weak<dyn Retry>)>,
    running: bool,
}

static TIMER: Mutex<Timer> = Mutex::new(Timer {
    entries: Vec::new(),
    running: false,
});
static TIMER_CV: Condvar = Condvar::new();

/// Call `target.retry()` at `deadline` (or earlier if already scheduled
/// earlier), unless the target is gone by then.
pub(crate) fn retry_at(deadline: Instant, target: Weak<dyn Retry>) {
    let mut t = lock(&TIMER);
    match t.entries.iter_mut().find(|e| Weak::ptr_eq(&e.1, &target)) {
        Some(e) => e.0 = e.0.min(deadline),
        None => t.entries.push((deadline, target)),
    }
    if t.running {
        TIMER_CV.notify_one();
        return;
    }
    t.running = true;
    let spawned = std::thread::Builder::new()
        .name("zcmsg-soft-rnr".into())
        .spawn(run_timer);
    if spawned.is_err() {
        // No thread: the waiting requests are retried by their owner's next
        // post_send or poll_cq, or by the peer posting a receive.
        t.running = false;
        t.entries.clear();
    }
}

fn run_timer() {
    let mut t = lock(&TIMER);
    loop {
        if t.entries.is_empty() {
            t.running = false;
            return;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        let mut i = 0;
        while i < t.entries.len() {
            if t.entries[i].0 <= now {
                due.push(t.entries.swap_remove(i).1);
            } else {
                i += 1;
            }
        }
        if !due.is_empty() {
            drop(t);
            for target in due {
                if let Some(target) = target.upgrade() {
                    // A panic must not take the timer down with it (every
                    // later RNR retry would then wait for its owner).
                    let _ =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target.retry()));
                }
            }
            t = lock(&TIMER);
            continue;
        }
        let next = t.entries.iter().map(|e| e.0).min().unwrap_or(now);
        t = TIMER_CV
            .wait_timeout(t, next.saturating_duration_since(now))
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn wakes_only_when_armed_and_only_once() {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        let w = Waker::from(c.clone());
        let n = Notify::default();
        n.wake_if_armed();
        assert_eq!(c.0.load(Ordering::SeqCst), 0);
        n.arm(&w);
        n.wake_if_armed();
        n.wake_if_armed();
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
    }

    struct Retried(AtomicUsize);
    impl Retry for Retried {
        fn retry(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn timer_retries_after_the_deadline_unless_the_target_is_gone() {
        let r = Arc::new(Retried(AtomicUsize::new(0)));
        let gone = Arc::new(Retried(AtomicUsize::new(0)));
        let target: Arc<dyn Retry> = r.clone();
        let gone_target: Arc<dyn Retry> = gone.clone();
        retry_at(
            Instant::now() + Duration::from_millis(2),
            Arc::downgrade(&target),
        );
        retry_at(
            Instant::now() + Duration::from_millis(1),
            Arc::downgrade(&gone_target),
        );
        drop(gone_target);
        drop(gone);
        // Hang protection only.
        for _ in 0..30_000 {
            if r.0.load(Ordering::SeqCst) > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(r.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn rnr_delays_grow_and_are_capped() {
        assert_eq!(rnr_delay(0), Duration::from_micros(20));
        assert_eq!(rnr_delay(1), Duration::from_micros(80));
        assert!(rnr_delay(3) > rnr_delay(2));
        assert_eq!(rnr_delay(40), Duration::from_millis(10));
    }
}
