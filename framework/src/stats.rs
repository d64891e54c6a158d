//! Copy accounting: every byte the framework copies, by reason.
//!
//! "Zero-copy" is a number you can print: a send of registered `Bytes` leaves
//! every counter at zero; a send of a `Vec` under the `Bounce` policy adds its
//! length to `bounce`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Why the framework copied bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CopyReason {
    /// Unregistered memory copied into a registered slot.
    Bounce,
    /// Payload copied into the work request by an inline send.
    Inline,
    /// Small chunks merged into one slot to fit `max_send_sge`.
    Coalesce,
    /// Received messages copied out of their receive slots because the
    /// application held more of them than the connection has slots (e.g. RPC
    /// replies nobody has collected yet), so the peer can keep sending.
    Spill,
    /// Received messages copied into the caller's buffer
    /// (`Endpoint::try_recv_into`), their receive slot reposted at once.
    CopyOut,
}

impl CopyReason {
    /// Index of its byte counter in [`Counts`] (its op counter is the next).
    fn at(self) -> usize {
        match self {
            CopyReason::Bounce => 0,
            CopyReason::Inline => 2,
            CopyReason::Coalesce => 4,
            CopyReason::Spill => 6,
            CopyReason::CopyOut => 10,
        }
    }
}

/// Index of the handoff byte counter in [`Counts`].
const HANDOFF: usize = 8;

/// Counters in one set: bytes and operations for each reason and for
/// handoffs.
const N: usize = 12;

/// One set of counters: bytes and operations per reason (the handoffs' at
/// [`HANDOFF`]).
#[derive(Debug, Default)]
struct Counts([AtomicU64; N]);

impl Counts {
    fn read(&self, into: &mut [u64; N]) {
        for (t, c) in into.iter_mut().zip(&self.0) {
            *t += c.load(Ordering::Relaxed);
        }
    }
}

/// Live counters, shared by a protection domain and its endpoints.
///
/// Whoever copies counts: the builders and the RPC layer with an atomic
/// add here; each connection into a shard of its own that only it
/// writes (a load and a store, no read-modify-write, and no cache line
/// shared with other connections' threads: a message's count costs what a
/// plain counter does). [`CopyStats::snapshot`] adds them all up; a shard
/// folds its counts in here when its connection goes.
#[derive(Debug, Default)]
pub struct CopyStats {
    direct: Counts,
    shards: Mutex<Vec<Arc<Counts>>>,
}

impl CopyStats {
    /// Count one copy of `bytes` for `reason`.
    #[inline]
    pub fn add(&self, reason: CopyReason, bytes: u64) {
        self.direct.0[reason.at()].fetch_add(bytes, Ordering::Relaxed);
        self.direct.0[reason.at() + 1].fetch_add(1, Ordering::Relaxed);
    }

    /// Count one in-process handoff of `bytes` (no copy).
    #[inline]
    pub fn add_handoff(&self, bytes: u64) {
        self.direct.0[HANDOFF].fetch_add(bytes, Ordering::Relaxed);
        self.direct.0[HANDOFF + 1].fetch_add(1, Ordering::Relaxed);
    }

    /// Read all counters (every live shard's included).
    pub fn snapshot(&self) -> CopySnapshot {
        let mut t = [0u64; N];
        let shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        self.direct.read(&mut t);
        for s in shards.iter() {
            s.read(&mut t);
        }
        CopySnapshot {
            bounce_bytes: t[0],
            bounce_ops: t[1],
            inline_bytes: t[2],
            inline_ops: t[3],
            coalesce_bytes: t[4],
            coalesce_ops: t[5],
            spill_bytes: t[6],
            spill_ops: t[7],
            handoff_bytes: t[8],
            handoff_ops: t[9],
            copy_out_bytes: t[10],
            copy_out_ops: t[11],
        }
    }

    /// A shard of these counters for one writer (see [`CopyShard`]).
    pub(crate) fn shard(self: &Arc<Self>) -> CopyShard {
        let counts = Arc::new(Counts::default());
        self.shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(counts.clone());
        CopyShard {
            stats: self.clone(),
            counts,
        }
    }
}

/// Counters of one connection, summed into its [`CopyStats`] by
/// `snapshot`. Written by its owner only (`&mut self`), so an add is a
/// load and a store.
#[derive(Debug)]
pub(crate) struct CopyShard {
    stats: Arc<CopyStats>,
    counts: Arc<Counts>,
}

impl CopyShard {
    #[inline]
    fn bump(&mut self, i: usize, n: u64) {
        let c = &self.counts.0[i];
        c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// Count one copy of `bytes` for `reason`.
    #[inline]
    pub(crate) fn add(&mut self, reason: CopyReason, bytes: u64) {
        self.bump(reason.at(), bytes);
        self.bump(reason.at() + 1, 1);
    }

    /// Count one in-process handoff of `bytes`.
    #[inline]
    pub(crate) fn add_handoff(&mut self, bytes: u64) {
        self.bump(HANDOFF, bytes);
        self.bump(HANDOFF + 1, 1);
    }
}

impl Drop for CopyShard {
    fn drop(&mut self) {
        // Fold in and leave under the lock `snapshot` takes, so no reading
        // counts this shard twice or not at all.
        let mut shards = self.stats.shards.lock().unwrap_or_else(|p| p.into_inner());
        for (d, c) in self.stats.direct.0.iter().zip(&self.counts.0) {
            d.fetch_add(c.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        shards.retain(|s| !Arc::ptr_eq(s, &self.counts));
    }
}

/// A point-in-time reading of [`CopyStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopySnapshot {
    /// Bytes bounced.
    pub bounce_bytes: u64,
    /// Bounce copies.
    pub bounce_ops: u64,
    /// Bytes sent inline.
    pub inline_bytes: u64,
    /// Inline sends.
    pub inline_ops: u64,
    /// Bytes coalesced.
    pub coalesce_bytes: u64,
    /// Coalescing copies.
    pub coalesce_ops: u64,
    /// Bytes spilled out of receive slots.
    pub spill_bytes: u64,
    /// Spill copies.
    pub spill_ops: u64,
    /// Bytes handed to an in-process peer as the sender's own `Bytes` (not
    /// copied at all, by the framework or the device; not in `total_bytes`).
    pub handoff_bytes: u64,
    /// Messages handed over in process.
    pub handoff_ops: u64,
    /// Bytes of received messages copied into the caller's buffer.
    pub copy_out_bytes: u64,
    /// Messages received by copy.
    pub copy_out_ops: u64,
}

impl CopySnapshot {
    /// Every byte the framework copied, whatever the reason.
    pub fn total_bytes(&self) -> u64 {
        self.bounce_bytes
            + self.inline_bytes
            + self.coalesce_bytes
            + self.spill_bytes
            + self.copy_out_bytes
    }

    /// The difference `self - earlier`, counter by counter.
    pub fn since(&self, earlier: &CopySnapshot) -> CopySnapshot {
        CopySnapshot {
            bounce_bytes: self.bounce_bytes - earlier.bounce_bytes,
            bounce_ops: self.bounce_ops - earlier.bounce_ops,
            inline_bytes: self.inline_bytes - earlier.inline_bytes,
            inline_ops: self.inline_ops - earlier.inline_ops,
            coalesce_bytes: self.coalesce_bytes - earlier.coalesce_bytes,
            coalesce_ops: self.coalesce_ops - earlier.coalesce_ops,
            spill_bytes: self.spill_bytes - earlier.spill_bytes,
            spill_ops: self.spill_ops - earlier.spill_ops,
            handoff_bytes: self.handoff_bytes - earlier.handoff_bytes,
            handoff_ops: self.handoff_ops - earlier.handoff_ops,
            copy_out_bytes: self.copy_out_bytes - earlier.copy_out_bytes,
            copy_out_ops: self.copy_out_ops - earlier.copy_out_ops,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_add_up_direct_counts_live_shards_and_dropped_ones() {
        let stats = Arc::new(CopyStats::default());
        stats.add(CopyReason::Bounce, 100);
        let mut a = stats.shard();
        let mut b = stats.shard();
        a.add(CopyReason::Inline, 64);
        a.add(CopyReason::Inline, 36);
        b.add(CopyReason::Coalesce, 1000);
        b.add_handoff(7);
        let s = stats.snapshot();
        assert_eq!((s.bounce_bytes, s.bounce_ops), (100, 1));
        assert_eq!((s.inline_bytes, s.inline_ops), (100, 2));
        assert_eq!((s.coalesce_bytes, s.coalesce_ops), (1000, 1));
        assert_eq!((s.handoff_bytes, s.handoff_ops), (7, 1));
        assert_eq!(s.total_bytes(), 1200);
        // A shard's counts outlive it.
        drop(b);
        assert_eq!(stats.snapshot(), s);
        assert_eq!(stats.shards.lock().unwrap().len(), 1);
        a.add(CopyReason::Spill, 5);
        drop(a);
        let t = stats.snapshot();
        assert_eq!((t.spill_bytes, t.spill_ops), (5, 1));
        assert_eq!(t.since(&s).total_bytes(), 5);
        assert!(stats.shards.lock().unwrap().is_empty());
    }

    #[test]
    fn shards_on_many_threads_lose_no_count() {
        let stats = Arc::new(CopyStats::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let mut sh = stats.shard();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        sh.add(CopyReason::Inline, 3);
                    }
                    // Half of them leave before the reading, half after.
                    sh
                })
            })
            .collect();
        let mut shards: Vec<CopyShard> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let kept = shards.split_off(2);
        drop(shards);
        let s = stats.snapshot();
        assert_eq!((s.inline_bytes, s.inline_ops), (120_000, 40_000));
        drop(kept);
        assert_eq!(stats.snapshot(), s);
    }
}
