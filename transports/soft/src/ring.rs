//! Receive queues and completion rings, preallocated and lock-free.
//!
//! Every field of a slot is an atomic accessed with `Relaxed` ordering (plain
//! loads and stores on x86); the ring's `post` index and each slot's `done`
//! word, published with `Release`/`Acquire`, hand a slot from one side to the
//! other. No `unsafe`.
//!
//! A queue pair's own receive queue, [`RecvRing`], is a single-producer
//! single-consumer ring: the owner posts receives (producer) and the peer's
//! poster, executing a SEND or WRITE_WITH_IMM, consumes them and writes the
//! completion into the same slot (one cache line, with the receive's first
//! SGE), marking it done last; the owner polls that mark, so a completion
//! costs the poller one line crossing cores, and only then reuses the slot.
//! The `consume` index is published once per post list for the owner's room
//! checks and the error path. Receive completions therefore never need a
//! second ring and can never overflow. The ring holds twice the receive
//! depth, so `max_recv_wr` receives can be posted while as many completions
//! wait to be polled.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use zcmsg::{RecvRequest, Sge, WcOpcode, WcStatus, WorkCompletion};

/// Receive-side statuses a slot can carry.
const STATUSES: [WcStatus; 10] = [
    WcStatus::Success,
    WcStatus::LocLenErr,
    WcStatus::LocProtErr,
    WcStatus::WrFlushErr,
    WcStatus::RemAccessErr,
    WcStatus::RemInvReqErr,
    WcStatus::RemOpErr,
    WcStatus::LocAccessErr,
    WcStatus::LocQpOpErr,
    WcStatus::GeneralErr,
];

fn status_code(s: WcStatus) -> u32 {
    STATUSES
        .iter()
        .position(|x| *x == s)
        .unwrap_or(STATUSES.len() - 1) as u32
}

const HAS_IMM: u32 = 1 << 16;
const WITH_IMM_OPCODE: u32 = 1 << 8;

/// One receive work request with its first SGE and, once consumed, its
/// completion: one cache line, so the requester reads one line to take a
/// receive and writes the same line to complete it, and the owner polls that
/// line (its `done` word) instead of a shared index.
#[derive(Default)]
#[repr(align(64))]
struct Slot {
    /// `seq + 1` once the receive posted with sequence number `seq` in this
    /// slot has completed (own receive queues; SRQ slots report through
    /// their completion ring instead). Stored last, with `Release`.
    done: AtomicU64,
    wr_id: AtomicU64,
    sge0: SgeCell,
    nsge: AtomicU32,
    /// status code | opcode << 8 | has_imm << 16
    meta: AtomicU32,
    byte_len: AtomicU32,
    imm: AtomicU32,
}

#[derive(Default)]
struct SgeCell {
    addr: AtomicU64,
    /// length | lkey << 32
    len_key: AtomicU64,
}

impl SgeCell {
    #[inline]
    fn set(&self, g: &Sge) {
        self.addr.store(g.addr(), Ordering::Relaxed);
        self.len_key.store(
            u64::from(g.length()) | (u64::from(g.lkey()) << 32),
            Ordering::Relaxed,
        );
    }

    #[inline]
    fn get(&self) -> Sge {
        let lk = self.len_key.load(Ordering::Relaxed);
        Sge::new(
            self.addr.load(Ordering::Relaxed),
            lk as u32,
            (lk >> 32) as u32,
        )
    }
}

/// Preallocated receive slots with room for `max_sge` SGEs each (the first
/// in the slot itself, the rest beside).
pub(crate) struct SlotArray {
    slots: Box<[Slot]>,
    more: Box<[SgeCell]>,
    max_sge: usize,
}

impl SlotArray {
    pub(crate) fn new(n: usize, max_sge: usize) -> SlotArray {
        SlotArray {
            slots: (0..n).map(|_| Slot::default()).collect(),
            more: (0..n * max_sge.saturating_sub(1))
                .map(|_| SgeCell::default())
                .collect(),
            max_sge,
        }
    }

    pub(crate) fn max_sge(&self) -> usize {
        self.max_sge
    }

    fn more(&self, i: usize, n: usize) -> &[SgeCell] {
        let per = self.max_sge.saturating_sub(1);
        &self.more[i * per..][..n]
    }

    /// Fill slot `i` with a receive (the caller checked `sg_list.len() <= max_sge`).
    pub(crate) fn write(&self, i: usize, wr: &RecvRequest<'_>) {
        let s = &self.slots[i];
        s.wr_id.store(wr.wr_id, Ordering::Relaxed);
        s.nsge.store(wr.sg_list.len() as u32, Ordering::Relaxed);
        match wr.sg_list {
            [] => {}
            // The common case, in the slot's own line only.
            [g] => s.sge0.set(g),
            [first, rest @ ..] => {
                s.sge0.set(first);
                for (c, g) in self.more(i, rest.len()).iter().zip(rest) {
                    c.set(g);
                }
            }
        }
    }

    /// The SGEs of the receive in slot `i`.
    pub(crate) fn sges(&self, i: usize) -> impl Iterator<Item = Sge> + Clone + '_ {
        let s = &self.slots[i];
        let n = s.nsge.load(Ordering::Relaxed) as usize;
        let first = (n > 0).then(|| s.sge0.get());
        first
            .into_iter()
            .chain(self.more(i, n.saturating_sub(1)).iter().map(SgeCell::get))
    }

    /// The receive in slot `i` has exactly one SGE: that SGE (the common
    /// case, read from the slot's own line without the general iterator).
    #[inline]
    pub(crate) fn single_sge(&self, i: usize) -> Option<Sge> {
        let s = &self.slots[i];
        (s.nsge.load(Ordering::Relaxed) == 1).then(|| s.sge0.get())
    }

    pub(crate) fn wr_id(&self, i: usize) -> u64 {
        self.slots[i].wr_id.load(Ordering::Relaxed)
    }

    /// Record the completion of the receive in slot `i`; `seq` is its
    /// sequence number in an own receive ring (marks the slot done), `None`
    /// for an SRQ slot.
    pub(crate) fn complete(
        &self,
        i: usize,
        seq: Option<u64>,
        status: WcStatus,
        with_imm_write: bool,
        byte_len: u32,
        imm: Option<u32>,
    ) {
        let s = &self.slots[i];
        let mut meta = status_code(status);
        if with_imm_write {
            meta |= WITH_IMM_OPCODE;
        }
        if let Some(v) = imm {
            meta |= HAS_IMM;
            s.imm.store(v, Ordering::Relaxed);
        }
        s.byte_len.store(byte_len, Ordering::Relaxed);
        s.meta.store(meta, Ordering::Relaxed);
        if let Some(seq) = seq {
            // Pairs with the `Acquire` in `is_done`: the completion's fields
            // and the message's bytes are visible before the slot reads done.
            s.done.store(seq + 1, Ordering::Release);
        }
    }

    /// The receive of sequence number `seq` in slot `i` has completed.
    #[inline]
    pub(crate) fn is_done(&self, i: usize, seq: u64) -> bool {
        self.slots[i].done.load(Ordering::Acquire) == seq + 1
    }

    /// As [`SlotArray::is_done`], as a `SeqCst` load: the re-check after
    /// arming a waker (pairs with the poster's fence before it looks at the
    /// waker).
    pub(crate) fn is_done_seqcst(&self, i: usize, seq: u64) -> bool {
        self.slots[i].done.load(Ordering::SeqCst) == seq + 1
    }

    /// The completion recorded in slot `i`.
    pub(crate) fn completion(&self, i: usize, qp_num: u32) -> WorkCompletion {
        let s = &self.slots[i];
        let meta = s.meta.load(Ordering::Relaxed);
        // Codes come from `status_code`, so always in range.
        let status = STATUSES
            .get((meta & 0xff) as usize)
            .copied()
            .unwrap_or(WcStatus::GeneralErr);
        WorkCompletion {
            wr_id: s.wr_id.load(Ordering::Relaxed),
            status,
            opcode: if meta & WITH_IMM_OPCODE != 0 {
                WcOpcode::RecvRdmaWithImm
            } else {
                WcOpcode::Recv
            },
            byte_len: if status.is_ok() {
                s.byte_len.load(Ordering::Relaxed)
            } else {
                0
            },
            imm_data: (meta & HAS_IMM != 0).then(|| s.imm.load(Ordering::Relaxed)),
            qp_num,
        }
    }

    /// A flush completion for the receive in slot `i`.
    pub(crate) fn flushed(&self, i: usize, qp_num: u32) -> WorkCompletion {
        WorkCompletion {
            wr_id: self.wr_id(i),
            status: WcStatus::WrFlushErr,
            opcode: WcOpcode::Recv,
            byte_len: 0,
            imm_data: None,
            qp_num,
        }
    }
}

/// A queue pair's own receive queue (see the module docs).
pub(crate) struct RecvRing {
    pub(crate) slots: SlotArray,
    mask: u64,
    /// `max_recv_wr`: most receives posted and not yet consumed.
    pub(crate) depth: u64,
    /// Next slot to post; written by the owner only.
    pub(crate) post: CachePadded<AtomicU64>,
    /// Next slot to consume; written by the consumer only (the peer's poster,
    /// or the owner once the queue pair is in error and the peer quiesced).
    pub(crate) consume: CachePadded<AtomicU64>,
}

impl RecvRing {
    pub(crate) fn new(depth: u32, max_sge: u32) -> RecvRing {
        let cap = (2 * depth as usize).max(1).next_power_of_two();
        RecvRing {
            slots: SlotArray::new(cap, max_sge as usize),
            mask: cap as u64 - 1,
            depth: u64::from(depth),
            post: CachePadded::new(AtomicU64::new(0)),
            consume: CachePadded::new(AtomicU64::new(0)),
        }
    }

    /// Slots in the ring.
    pub(crate) fn capacity(&self) -> u64 {
        self.mask + 1
    }

    /// The slot of sequence number `seq`.
    #[inline]
    pub(crate) fn slot(&self, seq: u64) -> usize {
        (seq & self.mask) as usize
    }
}

/// A single-producer single-consumer ring of SRQ slot indices: the receive
/// completions of a queue pair that receives through a shared receive queue.
/// Sized to the SRQ's depth, which bounds the indices in flight, so it never
/// overflows.
pub(crate) struct CompRing {
    buf: Box<[AtomicU32]>,
    mask: u64,
    head: CachePadded<AtomicU64>,
    tail: CachePadded<AtomicU64>,
}

impl CompRing {
    pub(crate) fn new(cap: usize) -> CompRing {
        let cap = cap.max(1).next_power_of_two();
        CompRing {
            buf: (0..cap).map(|_| AtomicU32::new(0)).collect(),
            mask: cap as u64 - 1,
            head: CachePadded::new(AtomicU64::new(0)),
            tail: CachePadded::new(AtomicU64::new(0)),
        }
    }

    /// Producer side. Never full by construction (see the type docs).
    pub(crate) fn push(&self, v: u32) {
        let h = self.head.load(Ordering::Relaxed);
        debug_assert!(h - self.tail.load(Ordering::Acquire) <= self.mask);
        self.buf[(h & self.mask) as usize].store(v, Ordering::Relaxed);
        self.head.store(h + 1, Ordering::Release);
    }

    /// Consumer side.
    pub(crate) fn pop(&self) -> Option<u32> {
        let t = self.tail.load(Ordering::Relaxed);
        if t == self.head.load(Ordering::Acquire) {
            return None;
        }
        let v = self.buf[(t & self.mask) as usize].load(Ordering::Relaxed);
        self.tail.store(t + 1, Ordering::Release);
        Some(v)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.tail.load(Ordering::Relaxed) == self.head.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_round_trip_requests_and_completions() {
        let a = SlotArray::new(4, 3);
        let sg = [Sge::new(0x1000, 64, 8), Sge::new(0x2000, 32, 10)];
        a.write(
            2,
            &RecvRequest {
                wr_id: 99,
                sg_list: &sg,
            },
        );
        assert_eq!(a.sges(2).collect::<Vec<_>>(), sg.to_vec());
        assert!(!a.is_done(2, 6));
        a.complete(2, Some(6), WcStatus::Success, true, 77, Some(5));
        assert!(a.is_done(2, 6) && !a.is_done(2, 2));
        let wc = a.completion(2, 3);
        assert_eq!(
            (
                wc.wr_id,
                wc.status,
                wc.opcode,
                wc.byte_len,
                wc.imm_data,
                wc.qp_num
            ),
            (
                99,
                WcStatus::Success,
                WcOpcode::RecvRdmaWithImm,
                77,
                Some(5),
                3
            )
        );
        a.complete(2, None, WcStatus::LocLenErr, false, 0, None);
        let wc = a.completion(2, 3);
        assert_eq!(
            (wc.status, wc.opcode, wc.imm_data),
            (WcStatus::LocLenErr, WcOpcode::Recv, None)
        );
        assert_eq!(a.flushed(2, 3).status, WcStatus::WrFlushErr);
    }

    #[test]
    fn ring_capacity_is_twice_the_depth() {
        assert_eq!(RecvRing::new(256, 1).capacity(), 512);
        assert_eq!(RecvRing::new(3, 1).capacity(), 8);
        assert_eq!(RecvRing::new(0, 1).capacity(), 1);
    }

    #[test]
    fn comp_ring_is_fifo() {
        let r = CompRing::new(3);
        assert!(r.is_empty());
        for round in 0..5 {
            for v in 0..4 {
                r.push(round * 10 + v);
            }
            for v in 0..4 {
                assert_eq!(r.pop(), Some(round * 10 + v));
            }
            assert_eq!(r.pop(), None);
        }
    }
}
