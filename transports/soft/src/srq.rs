//! Shared receive queues.
//!
//! A fixed array of receive slots and two bounded MPMC queues of slot
//! indices: `free` and `posted`. Posting (any thread) takes a free index,
//! fills the slot and queues it on `posted`; a peer's poster executing a SEND
//! pops a posted index, fills in the completion and hands the index to the
//! receiving queue pair's completion ring; that queue pair's `poll_cq` reads
//! the completion and returns the index to `free`. So `max_wr` bounds posted
//! receives plus completions not yet polled, and nothing is allocated after
//! creation.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crossbeam_queue::ArrayQueue;
use zcmsg::{PostError, RecvRequest, SharedRecvQueue, TransportError};

use crate::notify::Retry;
use crate::ring::SlotArray;

pub(crate) struct SrqInner {
    pub(crate) device_id: u64,
    pub(crate) slots: SlotArray,
    pub(crate) depth: u32,
    pub(crate) free: ArrayQueue<u32>,
    pub(crate) posted: ArrayQueue<u32>,
    /// Senders waiting (RNR) for a receive of this queue.
    waiters: Mutex<Vec<Weak<dyn Retry>>>,
    has_waiters: AtomicBool,
}

impl SrqInner {
    /// Retry `w` when the next receive is posted.
    pub(crate) fn add_waiter(&self, w: Weak<dyn Retry>) {
        let mut list = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if !list.iter().any(|x| Weak::ptr_eq(x, &w)) {
            list.push(w);
        }
        self.has_waiters.store(true, Ordering::Release);
    }

    /// Retry every waiting sender (each re-registers if it still waits).
    fn wake_waiters(&self) {
        let list = {
            let mut list = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            self.has_waiters.store(false, Ordering::Relaxed);
            std::mem::take(&mut *list)
        };
        for w in list {
            if let Some(t) = w.upgrade() {
                t.retry();
            }
        }
    }
}

/// A shared receive queue of a [`crate::SoftDevice`].
///
/// `Send + Sync`: [`SharedRecvQueue::post_recv`] may be called from any
/// number of threads at once (lock-free bounded queues). Queue pairs created
/// with it in [`zcmsg::QpConfig::srq`] must belong to the same device.
pub struct SoftSrq {
    pub(crate) inner: Arc<SrqInner>,
}

impl std::fmt::Debug for SoftSrq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftSrq")
            .field("max_wr", &self.inner.depth)
            .field("max_sge", &self.inner.slots.max_sge())
            .field("posted", &self.inner.posted.len())
            .finish()
    }
}

impl SoftSrq {
    pub(crate) fn new(device_id: u64, max_wr: u32, max_sge: u32) -> SoftSrq {
        let free = ArrayQueue::new(max_wr as usize);
        for i in 0..max_wr {
            let _ = free.push(i);
        }
        SoftSrq {
            inner: Arc::new(SrqInner {
                device_id,
                slots: SlotArray::new(max_wr as usize, max_sge as usize),
                depth: max_wr,
                free,
                posted: ArrayQueue::new(max_wr as usize),
                waiters: Mutex::new(Vec::new()),
                has_waiters: AtomicBool::new(false),
            }),
        }
    }

    /// Depth the queue was created with.
    pub fn max_wr(&self) -> u32 {
        self.inner.depth
    }

    /// Receives posted and not yet consumed by a SEND.
    pub fn posted(&self) -> usize {
        self.inner.posted.len()
    }
}

impl SharedRecvQueue for SoftSrq {
    fn post_recv(&self, wrs: &[RecvRequest<'_>]) -> Result<(), PostError> {
        let s = &self.inner;
        for (i, wr) in wrs.iter().enumerate() {
            if wr.sg_list.len() > s.slots.max_sge() {
                return Err(PostError::at(
                    i,
                    TransportError::TooManySges {
                        got: wr.sg_list.len(),
                        max: s.slots.max_sge() as u32,
                    },
                ));
            }
            let Some(idx) = s.free.pop() else {
                return Err(PostError::at(
                    i,
                    TransportError::QueueFull { depth: s.depth },
                ));
            };
            s.slots.write(idx as usize, wr);
            // Each index is in exactly one place, so this never fails.
            let _ = s.posted.push(idx);
        }
        // Senders waiting for a receive run now, here (they need not poll).
        if !wrs.is_empty() && s.has_waiters.load(Ordering::Acquire) {
            s.wake_waiters();
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
