//! Copy accounting: every byte the framework copies, by reason.
//!
//! "Zero-copy" is a number you can print: a send of registered `Bytes` leaves
//! every counter at zero; a send of a `Vec` under the `Bounce` policy adds its
//! length to `bounce`.

use std::sync::atomic::{AtomicU64, Ordering};

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
}

/// Live counters, shared by a protection domain and its endpoints.
#[derive(Debug, Default)]
pub struct CopyStats {
    bounce_bytes: AtomicU64,
    bounce_ops: AtomicU64,
    inline_bytes: AtomicU64,
    inline_ops: AtomicU64,
    coalesce_bytes: AtomicU64,
    coalesce_ops: AtomicU64,
    spill_bytes: AtomicU64,
    spill_ops: AtomicU64,
    handoff_bytes: AtomicU64,
    handoff_ops: AtomicU64,
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
}

impl CopySnapshot {
    /// Every byte the framework copied, whatever the reason.
    pub fn total_bytes(&self) -> u64 {
        self.bounce_bytes + self.inline_bytes + self.coalesce_bytes + self.spill_bytes
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
        }
    }
}

impl CopyStats {
    /// Count one copy of `bytes` for `reason`.
    #[inline]
    pub fn add(&self, reason: CopyReason, bytes: u64) {
        let (b, o) = match reason {
            CopyReason::Bounce => (&self.bounce_bytes, &self.bounce_ops),
            CopyReason::Inline => (&self.inline_bytes, &self.inline_ops),
            CopyReason::Coalesce => (&self.coalesce_bytes, &self.coalesce_ops),
            CopyReason::Spill => (&self.spill_bytes, &self.spill_ops),
        };
        b.fetch_add(bytes, Ordering::Relaxed);
        o.fetch_add(1, Ordering::Relaxed);
    }

    /// Count one in-process handoff of `bytes` (no copy).
    #[inline]
    pub fn add_handoff(&self, bytes: u64) {
        self.handoff_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.handoff_ops.fetch_add(1, Ordering::Relaxed);
    }

    /// Read all counters.
    pub fn snapshot(&self) -> CopySnapshot {
        CopySnapshot {
            bounce_bytes: self.bounce_bytes.load(Ordering::Relaxed),
            bounce_ops: self.bounce_ops.load(Ordering::Relaxed),
            inline_bytes: self.inline_bytes.load(Ordering::Relaxed),
            inline_ops: self.inline_ops.load(Ordering::Relaxed),
            coalesce_bytes: self.coalesce_bytes.load(Ordering::Relaxed),
            coalesce_ops: self.coalesce_ops.load(Ordering::Relaxed),
            spill_bytes: self.spill_bytes.load(Ordering::Relaxed),
            spill_ops: self.spill_ops.load(Ordering::Relaxed),
            handoff_bytes: self.handoff_bytes.load(Ordering::Relaxed),
            handoff_ops: self.handoff_ops.load(Ordering::Relaxed),
        }
    }
}
