//! Small shared helpers.

/// A clock for the protocol's timers (heartbeats, idle credit returns):
/// `Instant`s from the coarse monotonic clock (tick resolution, a few ms),
/// which costs a memory read where `Instant::now` may cost a trip to the
/// clock hardware on every busy-poll iteration. Falls back to
/// `Instant::now` where the coarse clock is unavailable.
#[derive(Clone, Debug)]
pub struct CoarseClock {
    base: std::time::Instant,
    base_coarse: Option<std::time::Duration>,
    /// The last reading and the `Instant` made of it: the coarse clock moves
    /// once per timer tick, so most reads repeat the last one and need no
    /// arithmetic.
    last: std::cell::Cell<(std::time::Duration, std::time::Instant)>,
}

impl CoarseClock {
    /// A clock that starts now.
    pub fn new() -> Self {
        let base = std::time::Instant::now();
        let base_coarse = crate::mem::sys::coarse_monotonic();
        CoarseClock {
            base,
            base_coarse,
            last: std::cell::Cell::new((base_coarse.unwrap_or_default(), base)),
        }
    }

    /// The time, to within one timer tick; never goes backwards.
    #[inline]
    pub fn now(&self) -> std::time::Instant {
        match (self.base_coarse, crate::mem::sys::coarse_monotonic()) {
            (Some(b), Some(c)) => {
                let (seen, at) = self.last.get();
                if c == seen {
                    return at;
                }
                let t = self.base + c.saturating_sub(b);
                self.last.set((c, t));
                t
            }
            _ => std::time::Instant::now(),
        }
    }
}

impl Default for CoarseClock {
    fn default() -> Self {
        Self::new()
    }
}

use std::sync::Arc;
use std::task::{Wake, Waker};
use std::thread::Thread;

struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// A waker that unparks the calling thread.
pub fn thread_waker() -> Waker {
    Waker::from(Arc::new(ThreadWaker(std::thread::current())))
}

use std::collections::BinaryHeap;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Instant;

struct Timer {
    heap: Mutex<BinaryHeap<Entry>>,
    cv: Condvar,
}

struct Entry(Instant, Waker);

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.0.cmp(&self.0) // min-heap on the deadline
    }
}

fn timer() -> &'static Timer {
    static T: OnceLock<&'static Timer> = OnceLock::new();
    T.get_or_init(|| {
        let t: &'static Timer = Box::leak(Box::new(Timer {
            heap: Mutex::new(BinaryHeap::new()),
            cv: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("zcmsg-timer".into())
            .spawn(move || loop {
                let mut h = t.heap.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                while h.peek().is_some_and(|e| e.0 <= now) {
                    if let Some(e) = h.pop() {
                        e.1.wake();
                    }
                }
                let wait = h.peek().map(|e| e.0 - now);
                match wait {
                    Some(d) => drop(t.cv.wait_timeout(h, d)),
                    None => drop(t.cv.wait(h)),
                }
            })
            .ok();
        t
    })
}

/// Wake `waker` at `when` (coarse: a shared timer thread). Async endpoints
/// use it for heartbeats and idle credit returns while no completion arrives.
pub fn wake_at(waker: Waker, when: Instant) {
    let t = timer();
    let mut h = t.heap.lock().unwrap_or_else(|p| p.into_inner());
    h.push(Entry(when, waker));
    t.cv.notify_one();
}

/// The allocation of `v`, emptied, as a `Vec` of another type with the same
/// size and alignment (in practice: the same struct with another lifetime),
/// so a buffer of borrowing values such as `WorkRequest<'a>` can be kept
/// across calls without allocating per call. The standard library's in-place
/// `collect` reuses the buffer when the layouts match (tested below).
pub(crate) fn recycle<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("the vector was emptied"))
        .collect()
}

#[cfg(test)]
mod recycle_tests {
    use crate::verbs::WorkRequest;

    #[test]
    fn recycle_keeps_the_allocation() {
        let sge = [crate::sge::Sge::default()];
        let mut v: Vec<WorkRequest<'_>> = Vec::with_capacity(64);
        v.push(WorkRequest::send(1, &sge));
        let (ptr, cap) = (v.as_ptr() as usize, v.capacity());
        let w: Vec<WorkRequest<'static>> = super::recycle(v);
        assert!(w.is_empty());
        assert_eq!(w.capacity(), cap);
        assert_eq!(w.as_ptr() as usize, ptr, "the buffer was reallocated");
    }
}

#[cfg(test)]
mod clock_tests {
    use std::time::{Duration, Instant};

    use super::CoarseClock;

    /// The coarse clock never goes backwards, follows the precise clock to
    /// within a few timer ticks, and really is the coarse one on Linux.
    #[test]
    fn coarse_clock_follows_the_precise_one() {
        assert!(
            crate::mem::sys::coarse_monotonic().is_some(),
            "CLOCK_MONOTONIC_COARSE unavailable"
        );
        let c = CoarseClock::new();
        let start = Instant::now();
        let mut last = c.now();
        while start.elapsed() < Duration::from_millis(60) {
            let t = c.now();
            assert!(t >= last, "went backwards");
            last = t;
        }
        let (coarse, precise) = (c.now(), Instant::now());
        let skew = if precise > coarse {
            precise - coarse
        } else {
            coarse - precise
        };
        assert!(skew < Duration::from_millis(25), "skew {skew:?}");
        assert!(
            c.now().duration_since(c.base) >= Duration::from_millis(40),
            "the clock did not advance with time"
        );
    }
}

/// A hasher for the integer ids of maps on a message's path (RPC call ids,
/// method numbers): one multiply by a 64-bit odd constant (Fibonacci
/// hashing) instead of SipHash's rounds, which cost ~20 ns a lookup. The ids
/// are ours, or a connected peer's, which is trusted with far more than the
/// shape of a map.
#[derive(Clone, Copy, Default)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A `HashMap` keyed by ids, hashed with [`IdHasher`].
pub(crate) type IdMap<K, V> =
    std::collections::HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;

/// A `HashSet` of ids, hashed with [`IdHasher`].
pub(crate) type IdSet<K> = std::collections::HashSet<K, std::hash::BuildHasherDefault<IdHasher>>;
