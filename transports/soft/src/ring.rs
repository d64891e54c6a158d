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
//! cache line; a completion (tag, status, byte count, immediate) is one
//! 8-byte word. A stream of SENDs therefore moves half a line of requests
//! and a quarter line of completions between the cores per message, where
//! one line per receive holding both moved two (the request to the poster,
//! the completion back); `zcperf send-bw` measures the difference. The
//! `wr_id` stays in the request entry, which only its owner reads back (at
//! poll time). The two ends of a connected pair share their completion
//! lines, four entries of each to a line (see [`CqeArray`]), so that a
//! ping-pong's request and answer complete in one line.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

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

/// One receive completion: one 64-bit word, eight to a cache line, stored
/// with `Release` (the poller loads it with `Acquire`). From the top:
/// - bits 56..64: the tag, `lap + 1` (mod 256) of the receive's sequence
///   number once it has completed, where the lap is the sequence number
///   divided by the ring's size (0: never written; SRQ entries report
///   through their completion ring and leave it 0). Every entry is written
///   once a lap, before the next lap's receive in it can be posted: the
///   ring holds twice the depth, a receive is posted only after the last
///   completion of its entry was polled, and a receive flushed in the
///   error state has its entry written by its owner as it flushes. A
///   stale entry is therefore one lap old and never matches (a tag of the
///   sequence number itself would, for rings of 256 entries and more);
/// - bits 52..56: the status code; bit 51: the opcode is
///   `RECV_RDMA_WITH_IMM`; bit 50: there is immediate data; bit 49: the
///   byte count is in the ring's `big_len` array (see below);
/// - with immediate data, the immediate in bits 0..32 and the byte count in
///   bits 32..49 (below 128 KiB; a larger one goes to `big_len`, written
///   before the word); without, the byte count in bits 0..32.
#[derive(Default)]
struct Cqe(AtomicU64);

const TAG_SHIFT: u32 = 56;
const STATUS_SHIFT: u32 = 52;
const F_WITH_IMM_OPCODE: u64 = 1 << 51;
const F_HAS_IMM: u64 = 1 << 50;
const F_BIG: u64 = 1 << 49;
const IMM_LEN_SHIFT: u32 = 32;
const IMM_LEN_MAX: u32 = (1 << 17) - 1;

/// Eight completion entries: one cache line, aligned to it.
#[derive(Default)]
#[repr(C, align(64))]
struct CqeLine([Cqe; 8]);

/// The completion entries of one receive queue. The two receive queues of
/// a connected pair share their lines, interleaved by fours: a line holds
/// four consecutive entries of one side and the same four of the other. In
/// a ping-pong the request and its answer then complete in the same line,
/// which each side has just read when it writes its own entry, as the two
/// threads of the one-word floor do; with a ring each, every completion
/// went into a line only the other side held. A stream in one direction
/// still finds four of its completions to a line. A queue without a
/// partner (an SRQ's) has its lines to itself, eight entries to a line.
struct CqeArray {
    lines: Arc<[CqeLine]>,
    /// Entry `i` is word `((i & !lo) << hi) | side | (i & lo)` of the
    /// lines: `lo` 3, `hi` 1 and `side` 0 or 4 for the two ends of a pair;
    /// `lo` all ones, `hi` 0 and `side` 0 alone.
    lo: usize,
    hi: u32,
    side: usize,
}

impl CqeArray {
    /// The entries of a queue of `n` receives alone.
    fn new(n: usize) -> CqeArray {
        CqeArray {
            lines: (0..n.div_ceil(8)).map(|_| CqeLine::default()).collect(),
            lo: usize::MAX,
            hi: 0,
            side: 0,
        }
    }

    /// The entries of the two receive queues of a pair, of `a` and `b`
    /// receives.
    fn pair(a: usize, b: usize) -> (CqeArray, CqeArray) {
        let lines: Arc<[CqeLine]> = (0..a.max(b).div_ceil(4))
            .map(|_| CqeLine::default())
            .collect();
        let side = |side| CqeArray {
            lines: lines.clone(),
            lo: 3,
            hi: 1,
            side,
        };
        (side(0), side(4))
    }

    /// The word of entry `i`.
    #[inline]
    fn get(&self, i: usize) -> &AtomicU64 {
        let e = ((i & !self.lo) << self.hi) | self.side | (i & self.lo);
        &self.lines[e / 8].0[e % 8].0
    }
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
    cqes: CqeArray,
    /// The byte count of a completion with immediate data too large for
    /// its word (128 KiB and up), per entry.
    big_len: Box<[AtomicU32]>,
    more: Box<[SgeCell]>,
    max_sge: usize,
    /// log2 of the entries (a ring's are a power of two): a sequence
    /// number's lap is `seq >> lap_shift`.
    lap_shift: u32,
}

impl SlotArray {
    pub(crate) fn new(n: usize, max_sge: usize) -> SlotArray {
        SlotArray::with_cqes(n, max_sge, CqeArray::new(n))
    }

    fn with_cqes(n: usize, max_sge: usize, cqes: CqeArray) -> SlotArray {
        SlotArray {
            wqes: (0..n).map(|_| Wqe::default()).collect(),
            cqes,
            big_len: (0..n).map(|_| AtomicU32::new(0)).collect(),
            more: (0..n * max_sge.saturating_sub(1))
                .map(|_| SgeCell::default())
                .collect(),
            max_sge,
            lap_shift: n.max(1).trailing_zeros(),
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
        let mut w = u64::from(status_code(status)) << STATUS_SHIFT;
        if with_imm_write {
            w |= F_WITH_IMM_OPCODE;
        }
        match imm {
            None => w |= u64::from(byte_len),
            Some(imm) => {
                w |= F_HAS_IMM | u64::from(imm);
                if byte_len <= IMM_LEN_MAX {
                    w |= u64::from(byte_len) << IMM_LEN_SHIFT;
                } else {
                    w |= F_BIG;
                    self.big_len[i].store(byte_len, Ordering::Relaxed);
                }
            }
        }
        if let Some(seq) = seq {
            w |= u64::from(self.tag(seq)) << TAG_SHIFT;
        }
        // Pairs with the `Acquire` in `poll`: the completion (and a big
        // byte count) and the message's bytes are visible before the
        // entry reads done.
        self.cqes.get(i).store(w, Ordering::Release);
    }

    /// The tag of sequence number `seq`: its lap plus one (see [`Cqe`]).
    #[inline]
    fn tag(&self, seq: u64) -> u8 {
        ((seq >> self.lap_shift) as u8).wrapping_add(1)
    }

    /// The receive of sequence number `seq` in entry `i` has completed.
    #[cfg(test)]
    pub(crate) fn is_done(&self, i: usize, seq: u64) -> bool {
        (self.cqes.get(i).load(Ordering::Acquire) >> TAG_SHIFT) as u8 == self.tag(seq)
    }

    /// As [`SlotArray::is_done`], for the re-check after arming a waker
    /// (`SoftQp::arm`, after it tried the peer's send mutex).
    pub(crate) fn is_done_seqcst(&self, i: usize, seq: u64) -> bool {
        (self.cqes.get(i).load(Ordering::SeqCst) >> TAG_SHIFT) as u8 == self.tag(seq)
    }

    /// The completion of the receive of sequence number `seq` in entry
    /// `i`, if it has completed: [`SlotArray::is_done`] and
    /// [`SlotArray::completion`] with one load.
    #[inline]
    pub(crate) fn poll(&self, i: usize, seq: u64, qp_num: u32) -> Option<WorkCompletion> {
        let w = self.cqes.get(i).load(Ordering::Acquire);
        ((w >> TAG_SHIFT) as u8 == self.tag(seq)).then(|| self.decode(i, w, qp_num))
    }

    /// The completion recorded in entry `i` (after `is_done`, or after the
    /// SRQ's completion ring handed over `i`).
    #[inline]
    pub(crate) fn completion(&self, i: usize, qp_num: u32) -> WorkCompletion {
        self.decode(i, self.cqes.get(i).load(Ordering::Relaxed), qp_num)
    }

    /// The completion word `w` of entry `i`, decoded.
    #[inline]
    fn decode(&self, i: usize, w: u64, qp_num: u32) -> WorkCompletion {
        // Codes come from `status_code`, so always in range.
        let status = STATUSES
            .get(((w >> STATUS_SHIFT) & 0xf) as usize)
            .copied()
            .unwrap_or(WcStatus::GeneralErr);
        let (byte_len, imm_data) = if w & F_HAS_IMM == 0 {
            (w as u32, None)
        } else if w & F_BIG == 0 {
            (((w >> IMM_LEN_SHIFT) as u32) & IMM_LEN_MAX, Some(w as u32))
        } else {
            (self.big_len[i].load(Ordering::Relaxed), Some(w as u32))
        };
        WorkCompletion {
            wr_id: self.wr_id(i),
            status,
            opcode: if w & F_WITH_IMM_OPCODE != 0 {
                WcOpcode::RecvRdmaWithImm
            } else {
                WcOpcode::Recv
            },
            byte_len: if status.is_ok() { byte_len } else { 0 },
            imm_data,
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
        let cap = Self::cap(depth);
        RecvRing::with_cqes(depth, max_sge, CqeArray::new(cap))
    }

    /// The receive queues of the two ends of a connected pair, their
    /// completion entries interleaved (see [`CqeArray`]).
    pub(crate) fn pair(a: (u32, u32), b: (u32, u32)) -> (RecvRing, RecvRing) {
        let (ca, cb) = CqeArray::pair(Self::cap(a.0), Self::cap(b.0));
        (
            RecvRing::with_cqes(a.0, a.1, ca),
            RecvRing::with_cqes(b.0, b.1, cb),
        )
    }

    fn cap(depth: u32) -> usize {
        (2 * depth as usize).max(1).next_power_of_two()
    }

    fn with_cqes(depth: u32, max_sge: u32, cqes: CqeArray) -> RecvRing {
        let cap = Self::cap(depth);
        RecvRing {
            slots: SlotArray::with_cqes(cap, max_sge as usize, cqes),
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
        // A flush, as the owner writes it in the error state.
        a.complete(2, Some(6), WcStatus::WrFlushErr, false, 0, None);
        let wc = a.completion(2, 3);
        assert_eq!(
            (wc.wr_id, wc.status, wc.opcode, wc.byte_len, wc.imm_data),
            (99, WcStatus::WrFlushErr, WcOpcode::Recv, 0, None)
        );
    }

    #[test]
    fn entries_are_compact_and_never_straddle_a_line() {
        // Two requests and eight completions to a cache line (the point
        // of the layout: fewer lines cross cores per message).
        assert_eq!(std::mem::size_of::<Wqe>(), 32);
        assert_eq!(std::mem::align_of::<Wqe>(), 32);
        assert_eq!(std::mem::size_of::<Cqe>(), 8);
        assert_eq!(std::mem::size_of::<CqeLine>(), 64);
        assert_eq!(std::mem::align_of::<CqeLine>(), 64);
    }

    /// The address of entry `i`'s completion word.
    fn at(a: &SlotArray, i: usize) -> usize {
        a.cqes.get(i) as *const AtomicU64 as usize
    }

    #[test]
    fn a_pair_shares_each_completion_line_by_fours() {
        let (a, b) = RecvRing::pair((8, 1), (4, 1));
        let (a, b) = (&a.slots, &b.slots);
        let mut seen = std::collections::HashSet::new();
        for i in 0..16 {
            // Entry i of each side in the same line, four of a side to a
            // line, and no word used twice.
            assert_eq!(at(a, i) / 64, at(b, i) / 64, "entry {i}");
            assert_eq!(at(a, i) / 64, at(a, i / 4 * 4) / 64);
            assert!(seen.insert(at(a, i)) && seen.insert(at(b, i)));
        }
        // Written through one side, read back through it, and not seen
        // by the other.
        for i in 0..16 {
            a.complete(i, Some(i as u64), WcStatus::Success, false, i as u32, None);
        }
        for i in 0..8 {
            assert!(a.is_done(i, i as u64) && !b.is_done(i, i as u64));
            assert_eq!(a.completion(i, 1).byte_len, i as u32);
        }
        // Alone, eight to a line.
        let one = RecvRing::new(8, 1);
        for i in 0..8 {
            assert_eq!(at(&one.slots, i) - at(&one.slots, 0), i * 8);
        }
    }

    #[test]
    fn a_large_byte_count_with_immediate_data_is_kept_whole() {
        let a = SlotArray::new(4, 1);
        for len in [0, 1, IMM_LEN_MAX, IMM_LEN_MAX + 1, 64 << 20, u32::MAX] {
            a.complete(3, Some(3), WcStatus::Success, true, len, Some(0xdead_beef));
            let wc = a.completion(3, 1);
            assert_eq!((wc.byte_len, wc.imm_data), (len, Some(0xdead_beef)));
            a.complete(3, Some(3), WcStatus::Success, false, len, None);
            let wc = a.completion(3, 1);
            assert_eq!((wc.byte_len, wc.imm_data), (len, None));
        }
    }

    #[test]
    fn a_completion_is_done_only_for_its_own_sequence_number() {
        let r = RecvRing::new(4, 1);
        let cap = r.capacity();
        let sg = [Sge::new(0x1000, 64, 8)];
        // Every sequence number of the ring in order, as the poster
        // completes them, across the 8-bit wrap of the lap tag, and in
        // the first laps.
        let start = 250 * cap;
        let laps = (start..start + 12 * cap).chain((1 << 40) * cap..(1 << 40) * cap + 3 * cap);
        for seq in (0..3 * cap).chain(laps) {
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
