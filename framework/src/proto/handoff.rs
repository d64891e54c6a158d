//! The in-process fast path: when both ends of a connection live in one
//! process, a message can be handed over as the sender's own `Bytes` instead
//! of being copied into a receive slot by the device.
//!
//! Each connection that enables it owns an inbound queue registered in a
//! process-wide table under a token, and announces `(process nonce, token)` in
//! its handshake. A peer whose nonce matches is in the same process: it pushes
//! single-chunk messages into that queue and sends a small `Handoff` header
//! through the queue pair, which keeps message order and credits exactly as
//! for every other message. The queue is bounded by the receiver's slots, so
//! a push never waits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;

/// One connection's inbound handoff queue.
pub struct Channel {
    q: ArrayQueue<Bytes>,
    token: u64,
}

impl Channel {
    /// Push a message; gives it back if the queue is full.
    pub fn push(&self, b: Bytes) -> Result<(), Bytes> {
        self.q.push(b)
    }
    /// Pop the oldest message.
    pub fn pop(&self) -> Option<Bytes> {
        self.q.pop()
    }
    /// The token peers name this queue by.
    pub fn token(&self) -> u64 {
        self.token
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        table()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.token);
    }
}

fn table() -> &'static Mutex<HashMap<u64, Weak<Channel>>> {
    static T: OnceLock<Mutex<HashMap<u64, Weak<Channel>>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A random number fixed for this process: equal nonces mean "same process"
/// with overwhelming probability.
pub fn process_nonce() -> u64 {
    static N: OnceLock<u64> = OnceLock::new();
    *N.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.finish() | 1
    })
}

/// A new inbound queue holding up to `capacity` messages.
pub fn open(capacity: usize) -> Arc<Channel> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let token = NEXT.fetch_add(1, Ordering::Relaxed);
    let c = Arc::new(Channel {
        q: ArrayQueue::new(capacity.max(1)),
        token,
    });
    table()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(token, Arc::downgrade(&c));
    c
}

/// The queue a peer announced, if it lives in this process.
pub fn find(nonce: u64, token: u64) -> Option<Arc<Channel>> {
    if nonce != process_nonce() {
        return None;
    }
    table()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&token)
        .and_then(Weak::upgrade)
}
