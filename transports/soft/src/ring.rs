//! Receive queues and completion rings, preallocated and lock-free.
//!
//! Every field is an atomic accessed with `Relaxed` ordering (plain loads
//! and stores on x86); the ring's `post` index and each completion's tag
//! word, published with `Release`/`Acquire`, hand an entry from one side to
//! the other. No `unsafe`.
//!
//! A queue pair's own receive queue, [`RecvRing`], is a single-producer
//! single-consumer ring: the owner posts receives (producer) and the peer's
//! poster, executing a SEND or WRITE_WITH_IMM, consumes them and writes the
//! completion into the completion entry of the same sequence number, its tag
//! word last; the owner polls that tag, so receive completions never need a
//! second queue and can never overflow. The ring holds twice the receive
//! depth, so `max_recv_wr` receives can be posted while as many completions
//! wait to be polled. The `consume` index is published once per post list
//! for the owner's room checks and the error path.
//!
//! Entries are compact, the way NICs lay out their queues: a receive work
//! request (its first SGE, its SGE count and `wr_id`) is 32 bytes, two to a
//! cache line; a completion (tag, byte count, status, immediate) is 16
//! bytes, four to a line. A stream of SENDs therefore moves half a line of
//! requests and a quarter line of completions between the cores per
//! message, where one line per receive holding both moved two (the request
//! to the poster, the completion back); `zcperf send-bw` measures the
//! difference. The `wr_id` stays in the request entry, which only its owner
//! reads back (at poll time).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crossbeam_utils::CachePadded;
use zcmsg::{RecvRequest, Sge, WcOpcode, WcStatus, WorkCompletion};

/// Receive-side statuses a completion can carry.
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

/// One receive work request as the poster reads it: its first SGE and how
/// many it has (the rest beside, in [`SlotArray`]'s `more`), and its
/// `wr_id`. 32 bytes, two to a cache line.
#[derive(Default)]
#[repr(C, align(32))]
struct Wqe {
    sge0: SgeCell,
    wr_id: AtomicU64,
    nsge: AtomicU32,
}

/// One receive completion: 16 bytes, four to a cache line.
#[derive(Default)]
#[repr(C, align(16))]
struct Cqe {
    /// `(seq + 1) as u32` in the high half once the receive posted with
    /// sequence number `seq` in this entry has completed (own receive
    /// queues; SRQ entries report through their completion ring and leave
    /// it 0), the byte count in the low half. Stored last, with `Release`.
    tag_len: AtomicU64,
    /// The immediate data in the low half; status code | opcode << 8 |
    /// has_imm << 16 in the high half.
    imm_meta: AtomicU64,
}

/// The tag of sequence number `seq` (see [`Cqe::tag_len`]). A stale entry
/// holds the tag of `seq` minus a multiple of the ring's capacity (far
/// below 2^32), so it never matches.
#[inline]
fn tag(seq: u64) -> u32 {
    seq.wrapping_add(1) as u32
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

/// Preallocated receive entries with room for `max_sge` SGEs each (the
/// first in the request entry itself, the rest beside), and their
/// completion entries.
pub(crate) struct SlotArray {
    wqes: Box<[Wqe]>,
    cqes: Box<[Cqe]>,
    more: Box<[SgeCell]>,
    max_sge: usize,
}

impl SlotArray {
    pub(crate) fn new(n: usize, max_sge: usize) -> SlotArray {
        SlotArray {
            wqes: (0..n).map(|_| Wqe::default()).collect(),
            cqes: (0..n).map(|_| Cqe::default()).collect(),
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

    /// Fill entry `i` with a receive (the caller checked `sg_list.len() <= max_sge`).
    #[inline]
    pub(crate) fn write(&self, i: usize, wr: &RecvRequest<'_>) {
        let s = &self.wqes[i];
        s.wr_id.store(wr.wr_id, Ordering::Relaxed);
        s.nsge.store(wr.sg_list.len() as u32, Ordering::Relaxed);
        match wr.sg_list {
            [] => {}
            // The common case, in the entry itself only.
            [g] => s.sge0.set(g),
            [first, rest @ ..] => {
                s.sge0.set(first);
                for (c, g) in self.more(i, rest.len()).iter().zip(rest) {
                    c.set(g);
                }
            }
        }
    }

    /// The SGEs of the receive in entry `i`.
    pub(crate) fn sges(&self, i: usize) -> impl Iterator<Item = Sge> + Clone + '_ {
        let s = &self.wqes[i];
        let n = s.nsge.load(Ordering::Relaxed) as usize;
        let first = (n > 0).then(|| s.sge0.get());
        first
            .into_iter()
            .chain(self.more(i, n.saturating_sub(1)).iter().map(SgeCell::get))
    }

    /// The receive in entry `i` has exactly one SGE: that SGE (the common
    /// case, read from the entry itself without the general iterator).
    #[inline]
    pub(crate) fn single_sge(&self, i: usize) -> Option<Sge> {
        let s = &self.wqes[i];
        (s.nsge.load(Ordering::Relaxed) == 1).then(|| s.sge0.get())
    }

    /// Load the request entry `i` (its first SGE) into this core's cache
    /// ahead of its use: the peer's poster calls it for the next posted
    /// receive once it has completed one, so the line the owner wrote when
    /// posting crosses cores while the poster waits, not on the next
    /// message's critical path. A plain load (its value unused), not a
    /// prefetch hint: no `unsafe`, and the poster has nothing to do until
    /// the next message anyway.
    #[inline]
    pub(crate) fn touch(&self, i: usize) {
        std::hint::black_box(self.wqes[i].sge0.addr.load(Ordering::Relaxed));
    }

    pub(crate) fn wr_id(&self, i: usize) -> u64 {
        self.wqes[i].wr_id.load(Ordering::Relaxed)
    }

    /// Record the completion of the receive in entry `i`; `seq` is its
    /// sequence number in an own receive ring (tags the entry done), `None`
    /// for an SRQ entry (its completion ring says it is done).
    #[inline]
    pub(crate) fn complete(
        &self,
        i: usize,
        seq: Option<u64>,
        status: WcStatus,
        with_imm_write: bool,
        byte_len: u32,
        imm: Option<u32>,
    ) {
        let c = &self.cqes[i];
        let mut meta = status_code(status);
        if with_imm_write {
            meta |= WITH_IMM_OPCODE;
        }
        if imm.is_some() {
            meta |= HAS_IMM;
        }
        let imm = imm.unwrap_or(0);
        c.imm_meta
            .store(u64::from(imm) | (u64::from(meta) << 32), Ordering::Relaxed);
        let t = seq.map_or(0, tag);
        // Pairs with the `Acquire` in `is_done`: the completion's fields
        // and the message's bytes are visible before the entry reads done.
        c.tag_len.store(
            u64::from(byte_len) | (u64::from(t) << 32),
            Ordering::Release,
        );
    }

    /// The receive of sequence number `seq` in entry `i` has completed.
    #[inline]
    pub(crate) fn is_done(&self, i: usize, seq: u64) -> bool {
        (self.cqes[i].tag_len.load(Ordering::Acquire) >> 32) as u32 == tag(seq)
    }

    /// As [`SlotArray::is_done`], for the re-check after arming a waker
    /// (`SoftQp::arm`, after it tried the peer's send mutex).
    pub(crate) fn is_done_seqcst(&self, i: usize, seq: u64) -> bool {
        (self.cqes[i].tag_len.load(Ordering::SeqCst) >> 32) as u32 == tag(seq)
    }

    /// The completion recorded in entry `i`.
    #[inline]
    pub(crate) fn completion(&self, i: usize, qp_num: u32) -> WorkCompletion {
        let c = &self.cqes[i];
        let tl = c.tag_len.load(Ordering::Relaxed);
        let im = c.imm_meta.load(Ordering::Relaxed);
        let meta = (im >> 32) as u32;
        // Codes come from `status_code`, so always in range.
        let status = STATUSES
            .get((meta & 0xff) as usize)
            .copied()
            .unwrap_or(WcStatus::GeneralErr);
        WorkCompletion {
            wr_id: self.wr_id(i),
            status,
            opcode: if meta & WITH_IMM_OPCODE != 0 {
                WcOpcode::RecvRdmaWithImm
            } else {
                WcOpcode::Recv
            },
            byte_len: if status.is_ok() { tl as u32 } else { 0 },
            imm_data: (meta & HAS_IMM != 0).then_some(im as u32),
            qp_num,
        }
    }

    /// A flush completion for the receive in entry `i`.
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
    fn entries_are_compact_and_never_straddle_a_line() {
        // Two requests and four completions to a cache line (the point of
        // the layout: fewer lines cross cores per message).
        assert_eq!(std::mem::size_of::<Wqe>(), 32);
        assert_eq!(std::mem::align_of::<Wqe>(), 32);
        assert_eq!(std::mem::size_of::<Cqe>(), 16);
        assert_eq!(std::mem::align_of::<Cqe>(), 16);
    }

    #[test]
    fn a_completion_is_done_only_for_its_own_sequence_number() {
        let r = RecvRing::new(4, 1);
        let cap = r.capacity();
        let sg = [Sge::new(0x1000, 64, 8)];
        // Every sequence number of the ring in order, as the poster
        // completes them, across the 32-bit wrap of the tag.
        let start = u64::from(u32::MAX) - 3 * cap;
        let laps = (start..start + 6 * cap).chain(0..2 * cap);
        for seq in laps {
            let i = r.slot(seq);
            r.slots.write(
                i,
                &RecvRequest {
                    wr_id: seq,
                    sg_list: &sg,
                },
            );
            assert!(!r.slots.is_done(i, seq), "seq {seq} done before completing");
            r.slots
                .complete(i, Some(seq), WcStatus::Success, false, 64, None);
            assert!(r.slots.is_done(i, seq), "seq {seq} not done");
            // The same entry one lap earlier or later is another receive.
            assert!(!r.slots.is_done(i, seq + cap));
            assert!(!r.slots.is_done(i, seq.wrapping_sub(cap)));
            let wc = r.slots.completion(i, 9);
            assert_eq!((wc.wr_id, wc.byte_len, wc.imm_data), (seq, 64, None));
        }
        // An SRQ completion (no sequence number; its completion ring says
        // it is done) still carries its fields.
        r.slots
            .complete(1, None, WcStatus::Success, true, 8, Some(3));
        let wc = r.slots.completion(1, 9);
        assert_eq!(
            (wc.opcode, wc.byte_len, wc.imm_data),
            (WcOpcode::RecvRdmaWithImm, 8, Some(3))
        );
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
