//! Reliable-connected queue pairs, executed in the poster's thread.
//!
//! A work request runs synchronously inside `post_send` (or, when it had to
//! wait for a receive, inside whichever call retries it), the way rxe runs
//! requests in the sender's context: the executing thread translates both
//! sides' addresses, copies, and writes the peer's receive completion
//! straight into the peer's receive ring. The peer polls that ring without a
//! lock; the send queue sits behind a mutex of its own queue pair that its
//! owner takes on every post. Other threads take it rarely: to execute a
//! request waiting for a receive (RNR), and, without executing anything, to
//! wait for an execution in progress to end (deregistration, the peer
//! entering the error state or being dropped, the peer arming its waker).

use std::any::Any;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError, Weak};
use std::task::Waker;
use std::time::Instant;

use crossbeam_utils::CachePadded;
use zcmsg::{
    Access, Armed, DeviceCaps, Opcode, PostError, QpCaps, QpConfig, QpState, QueuePair,
    RecvRequest, SendErrorHold, SendFlags, Sge, Transport, TransportError, WcOpcode, WcStatus,
    WorkCompletion, WorkRequest,
};

use crate::device::{Count, Exec, SoftDevice, TableCache};
use crate::dma::{self, AtomicOp, Seg};
use crate::mr::{KeyKind, MrTable, Xlat};
use crate::notify::{self, Notify, Retry};
use crate::ring::{CompRing, RecvRing, SlotArray};
use crate::srq::SrqInner;

/// The queue pair is in the error state.
const ERROR: u32 = 1;
/// Its owner disconnected it or dropped it.
const DISCONNECTED: u32 = 2;
/// Its peer disconnected or was dropped.
const PEER_GONE: u32 = 4;

static NEXT_QPN: AtomicU32 = AtomicU32::new(0x11);

/// Where a queue pair's receives come from.
pub(crate) enum RecvSide {
    /// Its own receive queue, which also holds the receive completions.
    Ring(RecvRing),
    /// A shared receive queue, and the ring of completed slot indices.
    Srq { srq: Arc<SrqInner>, comp: CompRing },
}

/// A queue pair's shared state: what its peer, the RNR timer and the
/// device's quiescence see.
pub(crate) struct QpCore {
    qpn: u32,
    dev: Arc<SoftDevice>,
    flags: CachePadded<AtomicU32>,
    exec: Arc<Exec>,
    notify: CachePadded<Notify>,
    recv: RecvSide,
    /// The send queue and everything needed to execute it. Its owner's
    /// thread takes this mutex on every post (never contended in the common
    /// case). Another thread executes with it only while a request of ours
    /// waits for a receive (RNR): the peer posting a receive, an SRQ post, or
    /// the RNR timer then executes the waiting requests itself. Others take
    /// it once, executing nothing, to wait for an execution in progress
    /// ([`QpCore::quiesce`]): a deregistration, the peer in error or being
    /// dropped; the peer arming its waker only tries it.
    send: Mutex<SendSide>,
    me: Weak<QpCore>,
    peer: OnceLock<Weak<QpCore>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A receive taken by a requester.
#[derive(Clone, Copy, Debug)]
enum RecvRef {
    Ring(u64),
    Srq(u32),
}

impl QpCore {
    fn new(
        dev: &Arc<SoftDevice>,
        caps: &QpCaps,
        srq: Option<Arc<SrqInner>>,
        ring: Option<RecvRing>,
        send: SendSide,
    ) -> Arc<QpCore> {
        let recv = match (srq, ring) {
            (Some(srq), _) => RecvSide::Srq {
                comp: CompRing::new(srq.depth as usize),
                srq,
            },
            (None, Some(ring)) => RecvSide::Ring(ring),
            (None, None) => RecvSide::Ring(RecvRing::new(caps.max_recv_wr, caps.max_recv_sge)),
        };
        Arc::new_cyclic(|me| QpCore {
            qpn: NEXT_QPN.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff,
            dev: dev.clone(),
            flags: CachePadded::new(AtomicU32::new(0)),
            exec: Arc::new(Exec::default()),
            notify: CachePadded::new(Notify::default()),
            recv,
            send: Mutex::new(send),
            me: me.clone(),
            peer: OnceLock::new(),
        })
    }

    /// Drop kept region tables that are out of date (after a deregistration).
    pub(crate) fn drop_stale_tables(&self) {
        let mut guard = lock(&self.send);
        let s = &mut *guard;
        s.own_table.forget_if_stale(&self.dev);
        if let Some(d) = &s.peer_dev {
            s.peer_table.forget_if_stale(d);
        }
    }

    /// Wait for an execution of this queue pair's requests in progress to
    /// end. Every execution runs under the send mutex, so taking it once is
    /// enough; whatever the caller wrote before (an error flag, a new region
    /// table) is visible to every execution that starts later.
    pub(crate) fn quiesce(&self) {
        drop(lock(&self.send));
    }

    #[inline]
    fn is_error(&self) -> bool {
        self.flags.load(Ordering::Acquire) & ERROR != 0
    }

    /// Take the next posted receive, as the requester (consumer) of this
    /// queue pair's receive side; `rx` is the consumer's cursor.
    #[inline]
    fn take_recv(&self, rx: &mut PeerRecv) -> Option<RecvRef> {
        match &self.recv {
            RecvSide::Ring(r) => {
                let c = rx.consume;
                if c >= rx.post_seen {
                    rx.post_seen = r.post.load(Ordering::Acquire);
                    if c >= rx.post_seen {
                        return None;
                    }
                }
                Some(RecvRef::Ring(c))
            }
            RecvSide::Srq { srq, .. } => srq.posted.pop().map(RecvRef::Srq),
        }
    }

    /// Make the receives consumed through `rx` visible to this queue pair's
    /// owner: one `Release` store per post list, not one per message, so
    /// the index's cache line crosses cores once per batch. Called before the
    /// consumer's execution ends (the owner's quiescence waits for it).
    #[inline]
    fn publish_consumed(&self, rx: &mut PeerRecv) {
        if rx.consume != rx.published {
            if let RecvSide::Ring(r) = &self.recv {
                r.consume.store(rx.consume, Ordering::Release);
            }
            rx.published = rx.consume;
        }
    }

    fn recv_slot(&self, r: RecvRef) -> (&SlotArray, usize) {
        match (&self.recv, r) {
            (RecvSide::Ring(ring), RecvRef::Ring(c)) => (&ring.slots, ring.slot(c)),
            (RecvSide::Srq { srq, .. }, RecvRef::Srq(i)) => (&srq.slots, i as usize),
            // A reference is only ever made by `take_recv` of the same side.
            (RecvSide::Ring(ring), RecvRef::Srq(_)) => (&ring.slots, 0),
            (RecvSide::Srq { srq, .. }, RecvRef::Ring(_)) => (&srq.slots, 0),
        }
    }

    /// Complete a taken receive; it reaches the owner with the next
    /// [`QpCore::publish_consumed`] (own receive queue) or at once (SRQ).
    fn finish_recv(
        &self,
        r: RecvRef,
        rx: &mut PeerRecv,
        status: WcStatus,
        with_imm_write: bool,
        byte_len: u32,
        imm: Option<u32>,
    ) {
        match (&self.recv, r) {
            (RecvSide::Ring(ring), RecvRef::Ring(c)) => {
                ring.slots
                    .complete(ring.slot(c), Some(c), status, with_imm_write, byte_len, imm);
                rx.consume = c + 1;
            }
            (RecvSide::Srq { srq, comp }, RecvRef::Srq(i)) => {
                srq.slots
                    .complete(i as usize, None, status, with_imm_write, byte_len, imm);
                comp.push(i);
            }
            _ => debug_assert!(false, "receive reference of the other kind"),
        }
    }
}

/// The requester's cursor into its peer's receive ring (it is the ring's
/// only consumer while the peer is not in the error state).
#[derive(Clone, Copy, Debug, Default)]
struct PeerRecv {
    /// The peer's `post` index as last loaded.
    post_seen: u64,
    /// Next receive to consume.
    consume: u64,
    /// `consume` as last stored into the ring.
    published: u64,
}

/// A send-queue entry kept until its completion is polled.
#[derive(Clone, Copy, Debug)]
struct SendSlot {
    wr_id: u64,
    opcode: Opcode,
    signaled: bool,
    inline: bool,
    imm: u32,
    remote_addr: u64,
    rkey: u32,
    compare_add: u64,
    swap: u64,
    nsge: u32,
    len: u64,
    /// The completion to report, once executed (None: executed silently).
    wc: Option<(WcStatus, u32)>,
}

impl SendSlot {
    const EMPTY: SendSlot = SendSlot {
        wr_id: 0,
        opcode: Opcode::Send,
        signaled: false,
        inline: false,
        imm: 0,
        remote_addr: 0,
        rkey: 0,
        compare_add: 0,
        swap: 0,
        nsge: 0,
        len: 0,
        wc: None,
    };
}

/// The send queue: `[tail, exec)` executed and awaiting `poll_cq`,
/// `[exec, head)` waiting to execute (behind an RNR wait), all preallocated.
struct SendQueue {
    depth: u64,
    slots: Vec<SendSlot>,
    sges: Vec<Sge>,
    inline: Vec<u8>,
    max_sge: usize,
    max_inline: usize,
    head: u64,
    exec: u64,
    tail: u64,
}

/// One work request as the executor sees it, from the caller's list or from
/// a send-queue slot.
struct WrView<'a> {
    opcode: Opcode,
    imm: u32,
    remote_addr: u64,
    rkey: u32,
    compare_add: u64,
    swap: u64,
    len: u64,
    sges: &'a [Sge],
    /// The inline payload: the copy made at post time (a queued request),
    /// or the caller's slice ([`QueuePair::post_inline`], during the post).
    staged: Option<&'a [u8]>,
}

impl<'a> WrView<'a> {
    fn of(wr: &'a WorkRequest<'a>, len: u64, staged: Option<&'a [u8]>) -> WrView<'a> {
        WrView {
            opcode: wr.opcode,
            imm: wr.imm_data,
            remote_addr: wr.remote_addr,
            rkey: wr.rkey,
            compare_add: wr.compare_add,
            swap: wr.swap,
            len,
            sges: wr.sg_list,
            staged,
        }
    }
}

impl SendQueue {
    fn new(depth: u32, max_sge: u32, max_inline: u32) -> SendQueue {
        let d = depth as usize;
        SendQueue {
            depth: u64::from(depth),
            slots: vec![SendSlot::EMPTY; d],
            sges: vec![Sge::default(); d * max_sge as usize],
            inline: vec![0u8; d * max_inline as usize],
            max_sge: max_sge as usize,
            max_inline: max_inline as usize,
            head: 0,
            exec: 0,
            tail: 0,
        }
    }

    #[inline]
    fn idx(&self, seq: u64) -> usize {
        (seq % self.depth) as usize
    }

    #[inline]
    fn full(&self) -> bool {
        self.head - self.tail >= self.depth
    }

    #[inline]
    fn has_pending(&self) -> bool {
        self.exec < self.head
    }

    /// Executed requests wait to be polled (some may be silent).
    #[inline]
    fn has_completions(&self) -> bool {
        self.tail < self.exec
    }

    /// Nothing posted is outstanding.
    #[inline]
    fn is_idle(&self) -> bool {
        self.tail == self.head
    }

    /// Queue a completion for a request that executed (or flushed) at post
    /// time. Only when nothing is pending, so completions stay in order.
    fn push_done(&mut self, wr_id: u64, opcode: Opcode, status: WcStatus, byte_len: u32) {
        debug_assert!(!self.has_pending() && !self.full());
        let i = self.idx(self.head);
        self.slots[i] = SendSlot {
            wr_id,
            opcode,
            wc: Some((status, byte_len)),
            ..SendSlot::EMPTY
        };
        self.head += 1;
        self.exec += 1;
    }

    /// The pending request at `seq`.
    fn view(&self, seq: u64) -> WrView<'_> {
        let i = self.idx(seq);
        let s = &self.slots[i];
        WrView {
            opcode: s.opcode,
            imm: s.imm,
            remote_addr: s.remote_addr,
            rkey: s.rkey,
            compare_add: s.compare_add,
            swap: s.swap,
            len: s.len,
            sges: &self.sges[i * self.max_sge..][..s.nsge as usize],
            staged: s
                .inline
                .then(|| &self.inline[i * self.max_inline..][..s.len as usize]),
        }
    }

    /// The pending request at `exec` finished with `status`.
    fn complete_exec(&mut self, status: WcStatus, byte_len: u32) {
        let i = self.idx(self.exec);
        let s = &mut self.slots[i];
        s.wc = if status != WcStatus::Success {
            Some((status, 0))
        } else if s.signaled {
            Some((status, byte_len))
        } else {
            None
        };
        self.exec += 1;
    }

    /// Complete every pending request: the first with `first`, the rest flushed.
    fn flush_pending(&mut self, first: WcStatus) {
        let mut status = first;
        while self.exec < self.head {
            let i = self.idx(self.exec);
            self.slots[i].wc = Some((status, 0));
            status = WcStatus::WrFlushErr;
            self.exec += 1;
        }
    }

    /// Move executed completions into `wc`; silent ones just free their slot.
    fn drain(&mut self, wc: &mut [WorkCompletion], qp_num: u32) -> usize {
        let mut n = 0;
        while self.tail < self.exec {
            let s = &self.slots[self.idx(self.tail)];
            if let Some((status, byte_len)) = s.wc {
                if n == wc.len() {
                    break;
                }
                wc[n] = WorkCompletion {
                    wr_id: s.wr_id,
                    status,
                    opcode: WcOpcode::for_send(s.opcode),
                    byte_len,
                    imm_data: None,
                    qp_num,
                };
                n += 1;
            }
            self.tail += 1;
        }
        n
    }
}

/// Receiver-not-ready state of the request at the head of the send queue.
#[derive(Clone, Copy, Debug)]
struct Rnr {
    /// Retries that failed so far.
    used: u32,
    /// When the next retry is due (earlier attempts are free).
    deadline: Instant,
}

/// What executing one request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Finished, with the requester's status and byte count.
    Done(WcStatus, u32),
    /// The peer has no receive posted: wait and retry.
    Rnr,
}

/// Why a receive's SGEs could not take a message.
enum Scatter {
    /// They are shorter than the message.
    Short,
    /// A used SGE names a bad key, lacks LOCAL_WRITE, or lies out of bounds.
    Prot,
}

/// Run `f` out of line: the error paths of the hot post loop (their
/// `format!`s) stay out of its code.
#[cold]
#[inline(never)]
fn cold<T>(f: impl FnOnce() -> T) -> T {
    f()
}

/// Everything one execution needs, borrowed from the queue pair.
struct Exe<'a> {
    peer: &'a QpCore,
    counters: &'a crate::device::Counters,
    own_t: &'a MrTable,
    peer_t: &'a MrTable,
    src: &'a mut Vec<Seg>,
    dst: &'a mut Vec<Seg>,
    rx: &'a mut PeerRecv,
    wake_peer: &'a mut bool,
}

impl Exe<'_> {
    /// The responder's queue pair goes to the error state (rxe's class A/C
    /// responder errors); its owner flushes its receives on its next call.
    fn fail_peer(&mut self) {
        self.peer.flags.fetch_or(ERROR, Ordering::SeqCst);
        *self.wake_peer = true;
    }
}

/// `len` (> 0) bytes at `addr` under the local key `lkey`, translated with
/// the right `need`, as a segment.
#[inline(always)]
fn local_seg(t: &MrTable, lkey: u32, addr: u64, len: u64, need: Access) -> Option<Seg> {
    t.translate(lkey, KeyKind::Local, need, addr, len)
        .map(|addr| Seg {
            addr,
            len: len as usize,
        })
}

/// Translate the source of a SEND or WRITE into `out`. Zero-length SGEs are
/// skipped (never checked, like rxe). INLINE requests are checked like any
/// other: the device never reads an address its region table does not cover.
#[inline]
fn gather_src(t: &MrTable, v: &WrView<'_>, out: &mut Vec<Seg>) -> bool {
    out.clear();
    if let Some(buf) = v.staged {
        if !buf.is_empty() {
            out.push(Seg::of(buf));
        }
        return true;
    }
    for s in v.sges {
        if s.length() == 0 {
            continue;
        }
        match local_seg(t, s.lkey(), s.addr(), s.length().into(), Access::LOCAL_READ) {
            Some(seg) => out.push(seg),
            None => return false,
        }
    }
    true
}

/// The source SGEs of a SEND when they hold at most one non-empty segment
/// (the common shape), translated without the scratch list: `Ok(None)` for
/// no bytes, `Ok(Some(seg))`, `Err(())` when they do not translate
/// (LocProtErr, as [`gather_src`]) or hold more than one non-empty SGE (use
/// [`gather_src`]).
///
/// `x` is a translation kept across a run of requests: the table is
/// searched only when the key changes.
#[inline(always)]
fn src_one<'t>(t: &'t MrTable, x: &mut Xlat<'t>, sges: &[Sge]) -> Result<Option<Seg>, ()> {
    let mut found = None;
    for s in sges {
        if s.length() == 0 {
            continue;
        }
        if found.is_some() {
            return Err(());
        }
        found = Some(s);
    }
    let Some(s) = found else {
        return Ok(None);
    };
    kept_seg(
        t,
        x,
        s.lkey(),
        s.addr(),
        s.length().into(),
        Access::LOCAL_READ,
    )
    .map(Some)
    .ok_or(())
}

/// [`local_seg`] through `x`, a translation kept across a run of requests
/// (looked up again only when `lkey` is not the one it holds; the default
/// holds no key and grants nothing).
#[inline(always)]
fn kept_seg<'t>(
    t: &'t MrTable,
    x: &mut Xlat<'t>,
    lkey: u32,
    addr: u64,
    len: u64,
    need: Access,
) -> Option<Seg> {
    if x.lkey() != lkey {
        *x = t.local(lkey)?;
    }
    x.range(need, addr, len).map(|addr| Seg {
        addr,
        len: len as usize,
    })
}

/// [`scatter`] into a receive of one SGE, without the scratch list:
/// `Ok(None)` when no bytes land.
/// `x` as in [`src_one`].
#[inline]
fn scatter_one<'t>(
    t: &'t MrTable,
    x: &mut Xlat<'t>,
    g: Sge,
    need: u64,
) -> Result<Option<Seg>, Scatter> {
    if u64::from(g.length()) < need {
        return Err(Scatter::Short);
    }
    if need == 0 {
        return Ok(None);
    }
    kept_seg(t, x, g.lkey(), g.addr(), need, Access::LOCAL_WRITE)
        .map(Some)
        .ok_or(Scatter::Prot)
}

/// Translate the part of `sges` that `need` bytes land in, for writing.
/// Like rxe, only SGEs that receive data are checked, and only the range used.
fn scatter<I: Iterator<Item = Sge> + Clone>(
    t: &MrTable,
    sges: I,
    need: u64,
    out: &mut Vec<Seg>,
) -> Result<(), Scatter> {
    out.clear();
    let room: u64 = sges.clone().map(|s| u64::from(s.length())).sum();
    if room < need {
        return Err(Scatter::Short);
    }
    let mut left = need;
    for s in sges {
        if left == 0 {
            break;
        }
        if s.length() == 0 {
            continue;
        }
        let take = left.min(u64::from(s.length()));
        out.push(local_seg(t, s.lkey(), s.addr(), take, Access::LOCAL_WRITE).ok_or(Scatter::Prot)?);
        left -= take;
    }
    Ok(())
}

/// Execute one request; see the status table in the crate docs for the
/// order of checks and who reports what.
fn execute(x: &mut Exe<'_>, v: &WrView<'_>) -> Outcome {
    use Outcome::Done;
    // Validated at post time against max_msg_sz (a u32), or 8 for atomics.
    let len32 = u32::try_from(v.len).unwrap_or(u32::MAX);
    match v.opcode {
        Opcode::Send | Opcode::SendWithImm => {
            if !gather_src(x.own_t, v, x.src) {
                return Done(WcStatus::LocProtErr, 0);
            }
            if x.peer.is_error() {
                return Done(WcStatus::RetryExcErr, 0);
            }
            let Some(r) = x.peer.take_recv(x.rx) else {
                return Outcome::Rnr;
            };
            let (slots, i) = x.peer.recv_slot(r);
            let scatter_into = |t: &MrTable, dst: &mut Vec<Seg>| match slots.single_sge(i) {
                Some(g) => scatter(t, std::iter::once(g), v.len, dst),
                None => scatter(t, slots.sges(i), v.len, dst),
            };
            let mut scattered = scatter_into(x.peer_t, x.dst);
            // The receive may have been posted after this execution loaded
            // the peer's table, in memory registered since: a registration is
            // complete when `register` returns, so look at the table again.
            // (Loading a newer snapshot mid-execution is fine: the execution
            // holds its send mutex, and deregistration waits for it.)
            let _fresh;
            if let Err(Scatter::Prot) = scattered {
                let t = x.peer.dev.table.load();
                scattered = scatter_into(&t, x.dst);
                _fresh = t;
            }
            match scattered {
                Ok(()) => {}
                Err(Scatter::Short) => {
                    x.peer
                        .finish_recv(r, x.rx, WcStatus::LocLenErr, false, 0, None);
                    x.fail_peer();
                    return Done(WcStatus::RemInvReqErr, 0);
                }
                Err(Scatter::Prot) => {
                    x.peer
                        .finish_recv(r, x.rx, WcStatus::LocProtErr, false, 0, None);
                    x.fail_peer();
                    return Done(WcStatus::RemOpErr, 0);
                }
            }
            // SAFETY: `dst` was translated just now through the peer's table
            // snapshot `peer_t`, or `_fresh`, still held (live registrations
            // with LOCAL_WRITE, in bounds), `src` through `own_t` or is the
            // staged payload; `own_t` and `peer_t` are held by the caller for
            // the whole call, under the send mutex deregistration takes
            // before it returns, so it waits for us.
            unsafe { dma::copy_segs(x.dst, x.src) };
            let imm = (v.opcode == Opcode::SendWithImm).then_some(v.imm);
            x.peer
                .finish_recv(r, x.rx, WcStatus::Success, false, len32, imm);
            *x.wake_peer = true;
            x.counters.count(Count::Send(v.len));
            Done(WcStatus::Success, len32)
        }
        Opcode::RdmaWrite | Opcode::RdmaWriteWithImm => {
            if !gather_src(x.own_t, v, x.src) {
                return Done(WcStatus::LocProtErr, 0);
            }
            if x.peer.is_error() {
                return Done(WcStatus::RetryExcErr, 0);
            }
            let r = if v.opcode == Opcode::RdmaWriteWithImm {
                match x.peer.take_recv(x.rx) {
                    Some(r) => Some(r),
                    None => return Outcome::Rnr,
                }
            } else {
                None
            };
            if v.len > 0 {
                let Some(addr) = x.peer_t.translate(
                    v.rkey,
                    KeyKind::Remote,
                    Access::REMOTE_WRITE,
                    v.remote_addr,
                    v.len,
                ) else {
                    if let Some(r) = r {
                        x.peer
                            .finish_recv(r, x.rx, WcStatus::RemAccessErr, true, 0, None);
                    }
                    x.fail_peer();
                    return Done(WcStatus::RemAccessErr, 0);
                };
                let remote = Seg {
                    addr,
                    len: v.len as usize,
                };
                // SAFETY: as for SEND: `remote` is in bounds of a live
                // registration with REMOTE_WRITE in the held snapshot
                // `peer_t`, `src` as above.
                unsafe { dma::copy_segs(&[remote], x.src) };
            }
            if let Some(r) = r {
                x.peer
                    .finish_recv(r, x.rx, WcStatus::Success, true, len32, Some(v.imm));
                *x.wake_peer = true;
            }
            x.counters.count(Count::Write(v.len));
            Done(WcStatus::Success, len32)
        }
        Opcode::RdmaRead => {
            if x.peer.is_error() {
                return Done(WcStatus::RetryExcErr, 0);
            }
            let mut remote = Seg::default();
            if v.len > 0 {
                let Some(addr) = x.peer_t.translate(
                    v.rkey,
                    KeyKind::Remote,
                    Access::REMOTE_READ,
                    v.remote_addr,
                    v.len,
                ) else {
                    x.fail_peer();
                    return Done(WcStatus::RemAccessErr, 0);
                };
                remote = Seg {
                    addr,
                    len: v.len as usize,
                };
            }
            // The response lands locally: rxe checks the local SGEs only now.
            if scatter(x.own_t, v.sges.iter().copied(), v.len, x.dst).is_err() {
                return Done(WcStatus::LocProtErr, 0);
            }
            if v.len > 0 {
                // SAFETY: `dst` translated through the held snapshot `own_t`
                // with LOCAL_WRITE, `remote` through `peer_t` with
                // REMOTE_READ, both in bounds and kept alive for the call.
                unsafe { dma::copy_segs(x.dst, &[remote]) };
            }
            x.counters.count(Count::Read(v.len));
            Done(WcStatus::Success, len32)
        }
        Opcode::AtomicCmpAndSwp | Opcode::AtomicFetchAndAdd => {
            if x.peer.is_error() {
                return Done(WcStatus::RetryExcErr, 0);
            }
            let Some(addr) = x.peer_t.translate(
                v.rkey,
                KeyKind::Remote,
                Access::REMOTE_ATOMIC,
                v.remote_addr,
                8,
            ) else {
                x.fail_peer();
                return Done(WcStatus::RemAccessErr, 0);
            };
            if addr % 8 != 0 {
                // Refused at post time already (the address is the CPU address).
                x.fail_peer();
                return Done(WcStatus::RemInvReqErr, 0);
            }
            let op = if v.opcode == Opcode::AtomicCmpAndSwp {
                AtomicOp::CmpSwp {
                    compare: v.compare_add,
                    swap: v.swap,
                }
            } else {
                AtomicOp::FetchAdd(v.compare_add)
            };
            // SAFETY: `addr` is 8-byte aligned (checked above) and its 8
            // bytes lie in a live registration with REMOTE_ATOMIC in the held
            // snapshot `peer_t`.
            let old = unsafe { dma::atomic(addr, op) };
            x.counters.count(Count::Atomic);
            // Like rxe, the original value lands locally after the remote
            // operation: a bad local buffer fails here, the remote word is
            // already changed.
            if scatter(x.own_t, v.sges.iter().copied(), 8, x.dst).is_err() {
                return Done(WcStatus::LocProtErr, 0);
            }
            let bytes = old.to_ne_bytes();
            // SAFETY: `dst` holds 8 bytes translated through the held
            // snapshot `own_t` with LOCAL_WRITE; the source is a local array.
            unsafe { dma::copy_segs(x.dst, &[Seg::of(&bytes)]) };
            Done(WcStatus::Success, 8)
        }
        // Refused at post time (`BadOpcode`).
        _ => Done(WcStatus::LocQpOpErr, 0),
    }
}

/// The device limits `post_send` checks, copied at creation.
#[derive(Clone, Copy, Debug)]
struct Limits {
    max_msg_sz: u32,
    max_sge_rd: u32,
    atomics: bool,
}

impl Limits {
    fn of(c: &DeviceCaps) -> Limits {
        Limits {
            max_msg_sz: c.max_msg_sz,
            max_sge_rd: c.max_sge_rd,
            atomics: c.atomics,
        }
    }
}

/// Wakes owed once the send side's lock is released.
#[derive(Clone, Copy, Debug, Default)]
#[must_use]
struct Wakes {
    /// Completions or an error state were produced for the peer.
    peer: bool,
    /// Completions were produced for the owner (by a helper thread).
    me: bool,
}

impl Wakes {
    /// Wake whoever is armed. Call after releasing the send-side lock the
    /// completions were produced under (a waker may run arbitrary code).
    /// No fence: an armer takes that lock between setting its flag and
    /// re-checking (see `SoftQp::arm`), so either this load sees the flag
    /// or the re-check sees the completions.
    #[inline]
    fn fire(self, core: &QpCore, peer: &QpCore) {
        if self.peer {
            peer.notify.wake_if_armed();
        }
        if self.me {
            core.notify.wake_if_armed();
        }
    }
}

/// A queue pair's send side: the send queue and what executing it needs.
/// Lives in the core behind a mutex (see [`QpCore::send`]).
pub(crate) struct SendSide {
    caps: QpCaps,
    limits: Limits,
    rnr_retry: u8,
    /// The peer's device when it is another one. Its region table is
    /// loaded through this copy, not through the peer's core, whose
    /// `dev` pointer shares a cache line with the peer's send mutex: reading
    /// it on every post moved that line between the cores twice a message.
    peer_dev: Option<Arc<SoftDevice>>,
    sq: SendQueue,
    /// The error state was entered and the send queue flushed.
    error: bool,
    rnr: Option<Rnr>,
    rnr_flag: bool,
    src: Vec<Seg>,
    dst: Vec<Seg>,
    /// Our cursor into the peer's receive ring (we consume it).
    peer_rx: PeerRecv,
    wakes: Wakes,
    /// Our device's region table, and the peer's if it is another device.
    own_table: TableCache,
    peer_table: TableCache,
}

impl SendSide {
    fn new(
        caps: QpCaps,
        dev: &DeviceCaps,
        rnr_retry: u8,
        peer_dev: Option<Arc<SoftDevice>>,
        peer_recv_sge: u32,
    ) -> Self {
        let src_cap = (caps.max_send_sge as usize).max(1);
        let dst_cap = src_cap.max(peer_recv_sge as usize);
        SendSide {
            caps,
            limits: Limits::of(dev),
            rnr_retry,
            peer_dev,
            sq: SendQueue::new(caps.max_send_wr, caps.max_send_sge, caps.max_inline_data),
            error: false,
            rnr: None,
            rnr_flag: false,
            src: Vec::with_capacity(src_cap),
            dst: Vec::with_capacity(dst_cap),
            peer_rx: PeerRecv::default(),
            wakes: Wakes::default(),
            own_table: TableCache::default(),
            peer_table: TableCache::default(),
        }
    }

    fn take_wakes(&mut self) -> Wakes {
        std::mem::take(&mut self.wakes)
    }

    /// Notice an error state set from outside (responder error, disconnect).
    #[inline]
    fn check_state(&mut self, core: &QpCore) {
        if !self.error {
            let f = core.flags.load(Ordering::Acquire);
            if f & ERROR != 0 {
                self.enter_error(core, f & PEER_GONE != 0);
            }
        }
    }

    /// Move to the error state: pending requests complete, the first with
    /// RetryExcErr if the peer vanished under it, the rest flushed. Receives
    /// are flushed by `poll_cq` once the peer has quiesced.
    fn enter_error(&mut self, core: &QpCore, peer_gone: bool) {
        if self.error {
            return;
        }
        self.error = true;
        core.flags.fetch_or(ERROR, Ordering::SeqCst);
        let first = if peer_gone {
            WcStatus::RetryExcErr
        } else {
            WcStatus::WrFlushErr
        };
        if self.sq.has_pending() {
            self.wakes.me = true;
        }
        self.sq.flush_pending(first);
        self.rnr = None;
        self.sync_rnr_flag(core);
    }

    fn sync_rnr_flag(&mut self, core: &QpCore) {
        let waiting = self.rnr.is_some();
        if waiting != self.rnr_flag {
            self.rnr_flag = waiting;
            core.notify.rnr_waiting.store(waiting, Ordering::Relaxed);
        }
    }

    /// The request at the head of the send queue met an empty receive queue.
    fn on_rnr(&mut self, core: &QpCore, peer: &QpCore) {
        let now = Instant::now();
        let (exhausted, schedule) = match &mut self.rnr {
            None => {
                core.exec.counters.count(Count::RnrNak);
                if self.rnr_retry == 0 {
                    (true, None)
                } else {
                    let deadline = now + notify::rnr_delay(0);
                    self.rnr = Some(Rnr { used: 0, deadline });
                    (false, Some(deadline))
                }
            }
            Some(r) if now >= r.deadline => {
                core.exec.counters.count(Count::RnrNak);
                r.used += 1;
                if self.rnr_retry < 7 && r.used >= u32::from(self.rnr_retry) {
                    (true, None)
                } else {
                    r.deadline = now + notify::rnr_delay(r.used);
                    (false, Some(r.deadline))
                }
            }
            // An early attempt (a receive might have been posted): free.
            Some(_) => (false, None),
        };
        if exhausted {
            self.rnr = None;
            self.sq.complete_exec(WcStatus::RnrRetryExcErr, 0);
            self.wakes.me = true;
            self.enter_error(core, false);
        } else {
            // The timer retries even if nobody polls; whoever posts to the
            // peer's shared receive queue retries us at once.
            let me: Weak<dyn Retry> = core.me.clone();
            if let Some(deadline) = schedule {
                notify::retry_at(deadline, me.clone());
            }
            if let RecvSide::Srq { srq, .. } = &peer.recv {
                srq.add_waiter(me);
            }
        }
        self.sync_rnr_flag(core);
    }

    /// Run `f` with both region tables loaded (under the send mutex, which
    /// is what makes it an execution deregistration waits for).
    fn with_tables<R>(
        &mut self,
        core: &QpCore,
        peer: &QpCore,
        f: impl FnOnce(&mut SendSide, &MrTable, &MrTable) -> R,
    ) -> R {
        // Taken out for the call (moves, no reference counting) so that `f`
        // can have the rest of `self`.
        let mut own_c = std::mem::take(&mut self.own_table);
        let mut peer_c = std::mem::take(&mut self.peer_table);
        let own_t: &MrTable = own_c.get(&core.dev);
        let peer_t: &MrTable = match &self.peer_dev {
            None => own_t,
            Some(d) => peer_c.get(d),
        };
        let r = f(self, own_t, peer_t);
        self.own_table = own_c;
        self.peer_table = peer_c;
        peer.publish_consumed(&mut self.peer_rx);
        r
    }

    /// Execute pending requests in order until one has to wait.
    fn progress(&mut self, core: &QpCore, peer: &QpCore, own_t: &MrTable, peer_t: &MrTable) {
        while self.sq.has_pending() && !self.error {
            let out = {
                let view = self.sq.view(self.sq.exec);
                let mut x = Exe {
                    peer,
                    counters: &core.exec.counters,
                    own_t,
                    peer_t,
                    src: &mut self.src,
                    dst: &mut self.dst,
                    rx: &mut self.peer_rx,
                    wake_peer: &mut self.wakes.peer,
                };
                execute(&mut x, &view)
            };
            match out {
                Outcome::Done(status, n) => {
                    self.rnr = None;
                    self.sq.complete_exec(status, n);
                    self.wakes.me = true;
                    if status != WcStatus::Success {
                        self.enter_error(core, false);
                    }
                }
                Outcome::Rnr => {
                    self.on_rnr(core, peer);
                    break;
                }
            }
        }
        self.sync_rnr_flag(core);
    }

    /// Retry waiting requests if any (a helper's entry point).
    fn retry_pending(&mut self, core: &QpCore, peer: &QpCore) {
        self.check_state(core);
        if self.sq.has_pending() && !self.error {
            self.with_tables(core, peer, |s, own_t, peer_t| {
                s.progress(core, peer, own_t, peer_t)
            });
        }
    }

    /// Queue `wr` to execute later, copying what the caller may reuse.
    fn stage(
        &mut self,
        core: &QpCore,
        wr: &WorkRequest<'_>,
        len: u64,
        own_t: &MrTable,
        staged: Option<&[u8]>,
    ) {
        let i = self.sq.idx(self.sq.head);
        // The caller may reuse an INLINE request's buffers once post_send
        // returns: copy now. SGEs that do not translate are kept as SGEs
        // instead, and fail with LocProtErr when the request executes.
        let inline = wr.flags.contains(SendFlags::INLINE)
            && gather_src(own_t, &WrView::of(wr, len, staged), &mut self.src);
        if inline {
            let mi = self.sq.max_inline;
            let dst = Seg::of_mut(&mut self.sq.inline[i * mi..][..len as usize]);
            // SAFETY: `dst` is this queue pair's own staging buffer; `src`
            // segments are in bounds of live registrations of the held
            // snapshot `own_t`.
            unsafe { dma::copy_segs(&[dst], &self.src) };
            core.exec.counters.count(Count::InlineStaged(len));
        } else {
            let ms = self.sq.max_sge;
            self.sq.sges[i * ms..][..wr.sg_list.len()].copy_from_slice(wr.sg_list);
        }
        self.sq.slots[i] = SendSlot {
            wr_id: wr.wr_id,
            opcode: wr.opcode,
            signaled: wr.flags.contains(SendFlags::SIGNALED),
            inline,
            imm: wr.imm_data,
            remote_addr: wr.remote_addr,
            rkey: wr.rkey,
            compare_add: wr.compare_add,
            swap: wr.swap,
            nsge: if inline { 0 } else { wr.sg_list.len() as u32 },
            len,
            wc: None,
        };
        self.sq.head += 1;
    }

    /// Checks hardware makes at post time; returns the message length.
    #[inline(always)]
    fn validate(&self, wr: &WorkRequest<'_>) -> Result<u64, TransportError> {
        let dev = &self.limits;
        let op = wr.opcode;
        let max_sge = match op {
            Opcode::Send | Opcode::SendWithImm | Opcode::RdmaWrite | Opcode::RdmaWriteWithImm => {
                self.caps.max_send_sge
            }
            Opcode::RdmaRead => self.caps.max_send_sge.min(dev.max_sge_rd),
            Opcode::AtomicCmpAndSwp | Opcode::AtomicFetchAndAdd if dev.atomics => {
                self.caps.max_send_sge
            }
            _ => return Err(cold(|| TransportError::BadOpcode(op))),
        };
        if wr.sg_list.len() > max_sge as usize {
            return Err(cold(|| TransportError::TooManySges {
                got: wr.sg_list.len(),
                max: max_sge,
            }));
        }
        let len = wr.byte_len();
        if op.is_atomic() {
            if len < 8 {
                return Err(cold(|| {
                    TransportError::InvalidArgument(format!(
                        "an atomic needs 8 local bytes for the original value, got {len}"
                    ))
                }));
            }
            if wr.remote_addr % 8 != 0 {
                return Err(cold(|| {
                    TransportError::InvalidArgument(format!(
                        "atomic remote address {:#x} is not 8-byte aligned",
                        wr.remote_addr
                    ))
                }));
            }
        } else if len > u64::from(dev.max_msg_sz) {
            return Err(cold(|| TransportError::MessageTooLarge {
                got: len,
                max: dev.max_msg_sz,
            }));
        }
        if wr.flags.contains(SendFlags::INLINE) {
            if !matches!(
                op,
                Opcode::Send | Opcode::SendWithImm | Opcode::RdmaWrite | Opcode::RdmaWriteWithImm
            ) {
                return Err(cold(|| {
                    TransportError::InvalidArgument(format!(
                        "INLINE is only for SEND and RDMA WRITE, not {op:?}"
                    ))
                }));
            }
            if len > u64::from(self.caps.max_inline_data) {
                return Err(cold(|| TransportError::InlineTooLarge {
                    got: len,
                    max: self.caps.max_inline_data,
                }));
            }
            for s in wr.sg_list.iter().filter(|s| s.length() > 0) {
                let end = s.addr().checked_add(u64::from(s.length()));
                if s.addr() == 0 || end.is_none_or(|e| e > usize::MAX as u64) {
                    return Err(cold(|| {
                        TransportError::InvalidArgument(format!(
                            "inline SGE at {:#x} (+{}) is null or wraps",
                            s.addr(),
                            s.length()
                        ))
                    }));
                }
            }
        }
        Ok(len)
    }

    /// The common case of a post list, as straight-line code: SENDs of at
    /// most one non-empty source segment, each into a one-SGE receive of
    /// the peer's own receive queue, every check passing, with nothing
    /// waiting in our send queue and no error state. Returns how many
    /// requests from the start of `wrs` it executed; it stops, having
    /// changed nothing for it, at the first request of any other shape (an
    /// SRQ receive included: taking one consumes it) or that fails a check
    /// or meets an empty receive queue, and the general path then runs
    /// that one from the start and reports what fails (a refusal at post
    /// time included).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn send_run(
        &mut self,
        core: &QpCore,
        peer: &QpCore,
        ring: &RecvRing,
        own_t: &MrTable,
        peer_t: &MrTable,
        wrs: &[WorkRequest<'_>],
        staged: Option<&[u8]>,
    ) -> usize {
        let mut rx = self.peer_rx;
        let mut k = 0;
        let mut bytes = 0u64;
        // The run's requests usually name one source region and land in
        // one receive region: each is looked up once.
        let (mut src_x, mut dst_x) = (Xlat::default(), Xlat::default());
        while let Some(wr) = wrs.get(k) {
            if !matches!(wr.opcode, Opcode::Send | Opcode::SendWithImm) {
                break;
            }
            let Ok(len) = self.validate(wr) else {
                break;
            };
            if self.sq.full() || peer.is_error() {
                break;
            }
            // A slice (`post_slice`, one request without SGEs) is its own
            // source; SGEs translate through our table.
            let (len, src) = match staged {
                Some(d) => (d.len() as u64, (!d.is_empty()).then(|| Seg::of(d))),
                None => match src_one(own_t, &mut src_x, wr.sg_list) {
                    Ok(src) => (len, src),
                    Err(()) => break,
                },
            };
            let Some(RecvRef::Ring(c)) = peer.take_recv(&mut rx) else {
                break;
            };
            let i = ring.slot(c);
            let Some(g) = ring.slots.single_sge(i) else {
                break;
            };
            let Ok(dst) = scatter_one(peer_t, &mut dst_x, g, len) else {
                break;
            };
            if let (Some(d), Some(s)) = (dst, src) {
                // SAFETY: `d` was translated just now through the peer's
                // table snapshot `peer_t` (a live registration with
                // LOCAL_WRITE, in bounds), `s` through `own_t` or is the
                // caller's slice, borrowed for the call; both snapshots
                // are held by the caller for the call, under the send
                // mutex deregistration takes, so it waits for us.
                unsafe { dma::copy_segs(&[d], &[s]) };
            }
            // Validated against max_msg_sz, a u32.
            let len32 = len as u32;
            let imm = (wr.opcode == Opcode::SendWithImm).then_some(wr.imm_data);
            ring.slots
                .complete(i, Some(c), WcStatus::Success, false, len32, imm);
            rx.consume = c + 1;
            bytes += len;
            if wr.flags.contains(SendFlags::SIGNALED) {
                self.sq
                    .push_done(wr.wr_id, wr.opcode, WcStatus::Success, len32);
            }
            k += 1;
        }
        self.peer_rx = rx;
        if k > 0 {
            if rx.consume < rx.post_seen {
                ring.slots.touch(ring.slot(rx.consume));
            }
            self.wakes.peer = true;
            core.exec.counters.count_sends(k as u64, bytes);
        }
        k
    }

    /// The body of `post_send`, under the send mutex.
    fn post(
        &mut self,
        core: &QpCore,
        peer: &QpCore,
        own_t: &MrTable,
        peer_t: &MrTable,
        wrs: &[WorkRequest<'_>],
    ) -> Result<(), PostError> {
        if self.sq.has_pending() && !self.error {
            self.progress(core, peer, own_t, peer_t);
        }
        let mut i = 0;
        while let Some(wr) = wrs.get(i) {
            // Runs of the common SEND go straight through; the general
            // path below takes one request of any other shape, then the
            // next run starts.
            if !self.error && !self.sq.has_pending() {
                if let RecvSide::Ring(ring) = &peer.recv {
                    let n = self.send_run(core, peer, ring, own_t, peer_t, &wrs[i..], None);
                    if n > 0 {
                        i += n;
                        continue;
                    }
                }
            }
            self.post_one(core, peer, own_t, peer_t, i, wr, None)?;
            i += 1;
        }
        Ok(())
    }

    /// [`QueuePair::post_inline`]'s body: `wr` is the request without
    /// SGEs, `data` its payload, copied now like an INLINE request's.
    fn post_slice(
        &mut self,
        core: &QpCore,
        peer: &QpCore,
        own_t: &MrTable,
        peer_t: &MrTable,
        wr: &WorkRequest<'_>,
        data: &[u8],
    ) -> Result<(), PostError> {
        if data.len() > self.caps.max_inline_data as usize {
            return Err(PostError::at(
                0,
                cold(|| TransportError::InlineTooLarge {
                    got: data.len() as u64,
                    max: self.caps.max_inline_data,
                }),
            ));
        }
        if self.sq.has_pending() && !self.error {
            self.progress(core, peer, own_t, peer_t);
        }
        if !self.error && !self.sq.has_pending() {
            if let RecvSide::Ring(ring) = &peer.recv {
                let wrs = std::slice::from_ref(wr);
                if self.send_run(core, peer, ring, own_t, peer_t, wrs, Some(data)) == 1 {
                    return Ok(());
                }
            }
        }
        self.post_one(core, peer, own_t, peer_t, 0, wr, Some(data))
    }

    /// Post one request through the general path (`i` is its index in the
    /// caller's list, for a refusal).
    #[allow(clippy::too_many_arguments)]
    fn post_one(
        &mut self,
        core: &QpCore,
        peer: &QpCore,
        own_t: &MrTable,
        peer_t: &MrTable,
        i: usize,
        wr: &WorkRequest<'_>,
        staged: Option<&[u8]>,
    ) -> Result<(), PostError> {
        let len = self.validate(wr).map_err(|e| PostError::at(i, e))?;
        // (A slice's request has no SGEs: its length is the slice's,
        // checked by `post_slice`.)
        let len = staged.map_or(len, |d| d.len() as u64);
        if self.sq.full() {
            return Err(PostError::at(
                i,
                TransportError::QueueFull {
                    depth: self.caps.max_send_wr,
                },
            ));
        }
        if self.error {
            // Verbs: posting to a queue pair in error succeeds and the
            // request completes flushed.
            self.sq
                .push_done(wr.wr_id, wr.opcode, WcStatus::WrFlushErr, 0);
            return Ok(());
        }
        if self.sq.has_pending() {
            // RC order: behind a waiting request, wait too.
            self.stage(core, wr, len, own_t, staged);
            return Ok(());
        }
        let out = {
            let view = WrView::of(wr, len, staged);
            let mut x = Exe {
                peer,
                counters: &core.exec.counters,
                own_t,
                peer_t,
                src: &mut self.src,
                dst: &mut self.dst,
                rx: &mut self.peer_rx,
                wake_peer: &mut self.wakes.peer,
            };
            execute(&mut x, &view)
        };
        match out {
            Outcome::Done(WcStatus::Success, n) => {
                if wr.flags.contains(SendFlags::SIGNALED) {
                    self.sq.push_done(wr.wr_id, wr.opcode, WcStatus::Success, n);
                }
            }
            Outcome::Done(status, _) => {
                self.sq.push_done(wr.wr_id, wr.opcode, status, 0);
                self.enter_error(core, false);
            }
            Outcome::Rnr => {
                self.stage(core, wr, len, own_t, staged);
                self.on_rnr(core, peer);
            }
        }
        Ok(())
    }
}

/// Retry `core`'s waiting requests from another thread: the peer posting a
/// receive, an SRQ post, or the RNR timer (rxe's `rnr_nak_timer`).
pub(crate) fn help(core: &QpCore, peer: &QpCore) {
    let wakes = {
        let mut s = lock(&core.send);
        s.retry_pending(core, peer);
        s.take_wakes()
    };
    wakes.fire(core, peer);
}

impl Retry for QpCore {
    fn retry(&self) {
        if let Some(peer) = self.peer.get().and_then(Weak::upgrade) {
            help(self, &peer);
        }
    }
}

/// The receive side's private state, driven by the owner's thread.
struct Local {
    caps: QpCaps,
    /// Next own receive to report.
    rq_poll: u64,
    /// Cached `consume` index of the own receive ring (room checks).
    rq_consume_seen: u64,
    /// The peer's executions that may touch our receive side have drained.
    peer_quiesced: bool,
    disconnected: bool,
    /// The send queue held nothing at our last look (only the owner adds
    /// to an empty send queue, so `poll_cq` may skip its lock).
    sq_idle: bool,
    /// Send completions from the first error on, held until the receive
    /// side's completions before them are taken (see `QueuePair::poll_cq`).
    /// Boxed when first needed: this struct's hot fields stay in the queue
    /// pair's first line.
    held: Option<Box<SendErrorHold>>,
}

impl Local {
    /// Receive completions (or, in error, flushes) are waiting.
    fn recv_ready(&self, core: &QpCore) -> bool {
        match &core.recv {
            RecvSide::Ring(r) => {
                r.slots.is_done_seqcst(r.slot(self.rq_poll), self.rq_poll)
                    || (core.flags.load(Ordering::SeqCst) & ERROR != 0
                        && self.rq_poll < r.post.load(Ordering::Relaxed))
            }
            RecvSide::Srq { comp, .. } => !comp.is_empty(),
        }
    }

    /// In the error state: the completions the peer's last execution
    /// produced, then every other posted receive flushed.
    #[cold]
    #[inline(never)]
    fn drain_recv_in_error(
        &mut self,
        core: &QpCore,
        peer: &QpCore,
        r: &RecvRing,
        wc: &mut [WorkCompletion],
    ) -> usize {
        let mut n = 0;
        if !self.peer_quiesced {
            // Our ERROR flag is set (SeqCst): once the execution of the
            // peer's requests in progress ends, nobody consumes our
            // receives again.
            peer.quiesce();
            self.peer_quiesced = true;
        }
        let consume = r.consume.load(Ordering::Acquire);
        while n < wc.len() && self.rq_poll < consume {
            wc[n] = r.slots.completion(r.slot(self.rq_poll), core.qpn);
            self.rq_poll += 1;
            n += 1;
        }
        // Then a send error held for them, before the flushes.
        if let Some(h) = &mut self.held {
            n += h.release(&mut wc[n..]);
        }
        let post = r.post.load(Ordering::Relaxed);
        while n < wc.len() && !self.holding() && self.rq_poll < post {
            let i = r.slot(self.rq_poll);
            // Written as flushed and read back, so every entry is written
            // once a lap even in error (a stale entry stays one lap old:
            // see `ring::Cqe`).
            r.slots
                .complete(i, Some(self.rq_poll), WcStatus::WrFlushErr, false, 0, None);
            wc[n] = r.slots.completion(i, core.qpn);
            self.rq_poll += 1;
            n += 1;
        }
        // We are the consumer now.
        if self.rq_poll > consume {
            r.consume.store(self.rq_poll, Ordering::Release);
        }
        n
    }

    /// In the error state, the send completions `got` just drained go
    /// through `held` ([`SendErrorHold::hold_from_error`]). Returns how
    /// many of `got` are reported now.
    #[cold]
    #[inline(never)]
    fn hold_send_errors(&mut self, got: &[WorkCompletion]) -> usize {
        self.held
            .get_or_insert_with(Box::default)
            .hold_from_error(got)
    }

    /// Send completions are held.
    fn holding(&self) -> bool {
        self.held.as_ref().is_some_and(|h| !h.is_empty())
    }

    /// Move receive completions (and, in error, flushes) into `wc`.
    #[inline]
    fn drain_recv(&mut self, core: &QpCore, peer: &QpCore, wc: &mut [WorkCompletion]) -> usize {
        let mut n = 0;
        match &core.recv {
            RecvSide::Ring(r) => {
                // Each completed slot says so itself: the poller reads the
                // line the requester wrote, not a shared index first.
                while n < wc.len() {
                    let i = r.slot(self.rq_poll);
                    let Some(c) = r.slots.poll(i, self.rq_poll, core.qpn) else {
                        break;
                    };
                    wc[n] = c;
                    self.rq_poll += 1;
                    n += 1;
                }
                if n < wc.len() && core.flags.load(Ordering::SeqCst) & ERROR != 0 {
                    n += self.drain_recv_in_error(core, peer, r, &mut wc[n..]);
                }
            }
            RecvSide::Srq { srq, comp } => {
                while n < wc.len() {
                    let Some(i) = comp.pop() else { break };
                    wc[n] = srq.slots.completion(i as usize, core.qpn);
                    // Each index is in exactly one place: never fails.
                    let _ = srq.free.push(i);
                    n += 1;
                }
                // (A shared queue's receives are not flushed with ours.)
                if let Some(h) = &mut self.held {
                    n += h.release(&mut wc[n..]);
                }
            }
        }
        n
    }
}

/// A reliable-connected queue pair of the soft device, with its completion
/// queue. `Send`, not `Sync`: one thread drives it at a time (`&mut self`).
///
/// Work requests execute in the calling thread during `post_send`. A
/// request that meets an empty receive queue (RNR) waits in the send queue,
/// with everything posted after it, and is retried by this queue pair's next
/// `post_send` or `poll_cq`, by the peer posting a receive, or by the RNR
/// timer, whichever comes first; nobody needs to poll for it to progress.
/// Get one from [`SoftDevice::pair`], [`SoftDevice::connect_pair`] or
/// `listen`/`connect`; downcast a `dyn QueuePair` with `as_any()`.
// 128 bytes (a line and the buddy the adjacent-line prefetcher pulls with
// it): the two ends of a pair are allocated one after the other, 64 bytes
// apart, and each owner writes its receive cursor on every poll.
#[repr(align(128))]
pub struct SoftQp {
    core: Arc<QpCore>,
    peer: Arc<QpCore>,
    l: Local,
}

impl std::fmt::Debug for SoftQp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftQp")
            .field("qp_num", &self.core.qpn)
            .field("peer", &self.peer.qpn)
            .field("state", &self.state())
            .field("pending", &self.pending_sends())
            .finish()
    }
}

impl SoftQp {
    /// A post to the send queue: `f` runs under the send side's lock with
    /// both region tables at hand; the peer is woken afterwards if it
    /// needs to be.
    #[inline]
    fn posting(
        &mut self,
        f: impl FnOnce(&mut SendSide, &QpCore, &QpCore, &MrTable, &MrTable) -> Result<(), PostError>,
    ) -> Result<(), PostError> {
        let SoftQp { core, peer, l } = self;
        let (res, wakes) = {
            let mut s = lock(&core.send);
            s.check_state(core);
            let res = s.with_tables(core, peer, |s, own_t, peer_t| {
                f(s, core, peer, own_t, peer_t)
            });
            l.sq_idle = s.sq.is_idle();
            // Our own completions need no wake-up: we are the one polling.
            let mut w = s.take_wakes();
            w.me = false;
            (res, w)
        };
        wakes.fire(core, peer);
        res
    }

    pub(crate) fn create_pair(
        a_dev: &Arc<SoftDevice>,
        config_a: &QpConfig,
        b_dev: &Arc<SoftDevice>,
        config_b: &QpConfig,
    ) -> Result<(SoftQp, SoftQp), TransportError> {
        for c in [config_a, config_b] {
            if c.rnr_retry > 7 || c.retry_count > 7 {
                return Err(TransportError::InvalidArgument(format!(
                    "rnr_retry {} and retry_count {} must be at most 7",
                    c.rnr_retry, c.retry_count
                )));
            }
        }
        let (caps_a, srq_a) = a_dev.qp_caps(config_a)?;
        let (caps_b, srq_b) = b_dev.qp_caps(config_b)?;
        let same = Arc::ptr_eq(a_dev, b_dev);
        let send_a = SendSide::new(
            caps_a,
            a_dev.caps(),
            config_a.rnr_retry,
            (!same).then(|| b_dev.clone()),
            caps_b.max_recv_sge,
        );
        let send_b = SendSide::new(
            caps_b,
            b_dev.caps(),
            config_b.rnr_retry,
            (!same).then(|| a_dev.clone()),
            caps_a.max_recv_sge,
        );
        // Two own receive queues share their completion lines.
        let (ring_a, ring_b) = match (&srq_a, &srq_b) {
            (None, None) => {
                let (ra, rb) = RecvRing::pair(
                    (caps_a.max_recv_wr, caps_a.max_recv_sge),
                    (caps_b.max_recv_wr, caps_b.max_recv_sge),
                );
                (Some(ra), Some(rb))
            }
            _ => (None, None),
        };
        let a = QpCore::new(a_dev, &caps_a, srq_a, ring_a, send_a);
        let b = QpCore::new(b_dev, &caps_b, srq_b, ring_b, send_b);
        let _ = a.peer.set(Arc::downgrade(&b));
        let _ = b.peer.set(Arc::downgrade(&a));
        a_dev.add_exec(&a.exec, Arc::downgrade(&a), true);
        b_dev.add_exec(&b.exec, Arc::downgrade(&b), true);
        if !same {
            // Each side's requests also touch the other device's memory.
            b_dev.add_exec(&a.exec, Arc::downgrade(&a), false);
            a_dev.add_exec(&b.exec, Arc::downgrade(&b), false);
        }
        let qa = SoftQp::new(a.clone(), b.clone(), caps_a);
        let qb = SoftQp::new(b, a, caps_b);
        Ok((qa, qb))
    }

    fn new(core: Arc<QpCore>, peer: Arc<QpCore>, caps: QpCaps) -> SoftQp {
        SoftQp {
            l: Local {
                caps,
                rq_poll: 0,
                rq_consume_seen: 0,
                peer_quiesced: false,
                disconnected: false,
                sq_idle: true,
                held: None,
            },
            core,
            peer,
        }
    }

    /// The device this queue pair belongs to.
    pub fn device(&self) -> &Arc<SoftDevice> {
        &self.core.dev
    }

    /// The peer's queue pair number.
    pub fn peer_qp_num(&self) -> u32 {
        self.peer.qpn
    }

    /// Send-queue requests posted and not yet executed (waiting behind a
    /// receiver-not-ready retry).
    pub fn pending_sends(&self) -> usize {
        let s = lock(&self.core.send);
        (s.sq.head - s.sq.exec) as usize
    }

    /// True if the request at the head of the send queue is waiting for the
    /// peer to post a receive.
    pub fn rnr_waiting(&self) -> bool {
        lock(&self.core.send).rnr.is_some()
    }
}

impl SoftQp {
    /// Send completions (and retries of waiting requests), under the send
    /// queue's lock: kept out of `poll_cq` so that its common path (nothing
    /// outstanding on the send side) stays a small function.
    ///
    /// A send error is held, with everything after it, until the receive
    /// side's completions before it are taken (see `QueuePair::poll_cq`);
    /// it always comes with the error state, so the receive side's error
    /// path releases it, before its flushes.
    #[inline(never)]
    fn poll_send(&mut self, wc: &mut [WorkCompletion]) -> usize {
        let SoftQp { core, peer, l } = self;
        let (n, wakes) = {
            let mut s = lock(&core.send);
            s.retry_pending(core, peer);
            let n = s.sq.drain(wc, core.qpn);
            l.sq_idle = s.sq.is_idle();
            let mut w = s.take_wakes();
            w.me = false;
            (n, w)
        };
        wakes.fire(core, peer);
        // (The lock orders the flag: it was set before the error was written.)
        if core.flags.load(Ordering::Relaxed) & ERROR != 0 {
            return l.hold_send_errors(&wc[..n]);
        }
        n
    }
}

impl QueuePair for SoftQp {
    fn qp_num(&self) -> u32 {
        self.core.qpn
    }

    fn caps(&self) -> QpCaps {
        self.l.caps
    }

    fn state(&self) -> QpState {
        if self.core.flags.load(Ordering::Acquire) & ERROR != 0 {
            QpState::Error
        } else {
            QpState::ReadyToSend
        }
    }

    fn post_send(&mut self, wrs: &[WorkRequest<'_>]) -> Result<(), PostError> {
        self.posting(|s, core, peer, own_t, peer_t| s.post(core, peer, own_t, peer_t, wrs))
    }

    fn post_inline(
        &mut self,
        wr_id: u64,
        flags: SendFlags,
        imm: Option<u32>,
        data: &[u8],
    ) -> Result<(), PostError> {
        let wr = WorkRequest {
            opcode: if imm.is_some() {
                Opcode::SendWithImm
            } else {
                Opcode::Send
            },
            imm_data: imm.unwrap_or(0),
            ..WorkRequest::send(wr_id, &[]).with_flags(flags | SendFlags::INLINE)
        };
        self.posting(|s, core, peer, own_t, peer_t| {
            s.post_slice(core, peer, own_t, peer_t, &wr, data)
        })
    }

    fn post_recv(&mut self, wrs: &[RecvRequest<'_>]) -> Result<(), PostError> {
        let SoftQp { core, peer, l } = self;
        let RecvSide::Ring(r) = &core.recv else {
            return Err(PostError::at(
                0,
                TransportError::InvalidArgument(
                    "the queue pair receives through a shared receive queue".into(),
                ),
            ));
        };
        let mut post = r.post.load(Ordering::Relaxed);
        // Every receive polled was consumed, even if the requester has not
        // published its `consume` index yet (it does so at the end of its
        // post list; the completions themselves are visible slot by slot).
        l.rq_consume_seen = l.rq_consume_seen.max(l.rq_poll);
        let mut res = Ok(());
        for (i, wr) in wrs.iter().enumerate() {
            if wr.sg_list.len() > l.caps.max_recv_sge as usize {
                res = Err(PostError::at(
                    i,
                    TransportError::TooManySges {
                        got: wr.sg_list.len(),
                        max: l.caps.max_recv_sge,
                    },
                ));
                break;
            }
            if post - l.rq_consume_seen >= r.depth {
                l.rq_consume_seen = r.consume.load(Ordering::Acquire);
            }
            if post - l.rq_consume_seen >= r.depth || post - l.rq_poll >= r.capacity() {
                res = Err(PostError::at(
                    i,
                    TransportError::QueueFull {
                        depth: l.caps.max_recv_wr,
                    },
                ));
                break;
            }
            r.slots.write(r.slot(post), wr);
            post += 1;
        }
        r.post.store(post, Ordering::Release);
        // A request of the peer waiting for a receive runs now, here: the
        // peer need not poll, nor wait for its RNR timer.
        if peer.notify.rnr_waiting.load(Ordering::Relaxed) {
            help(peer, core);
        }
        res
    }

    fn poll_cq(&mut self, wc: &mut [WorkCompletion]) -> usize {
        let mut n = 0;
        if !self.l.sq_idle {
            n = self.poll_send(wc);
        }
        if n < wc.len() {
            let SoftQp { core, peer, l } = self;
            n += l.drain_recv(core, peer, &mut wc[n..]);
        }
        n
    }

    fn arm(&mut self, waker: &Waker) -> Armed {
        if self.l.holding() {
            return Armed::Ready;
        }
        let SoftQp { core, peer, l } = self;
        // Our own completions: a helper may have produced some (or the
        // peer's disconnect may have failed a request of ours waiting for a
        // receive) while we did not post or poll.
        let own_ready = |l: &mut Local| {
            if l.sq_idle {
                return false;
            }
            let (ready, mut w) = {
                let mut s = lock(&core.send);
                s.check_state(core);
                l.sq_idle = s.sq.is_idle();
                (s.sq.has_completions(), s.take_wakes())
            };
            // Our own wake-up is ours to drop: we are about to look.
            w.me = false;
            w.fire(core, peer);
            ready
        };
        if l.recv_ready(core) || own_ready(l) {
            return Armed::Ready;
        }
        core.notify.arm(waker);
        // Completions for us are produced under a send mutex: the peer's
        // for receives, ours for a helper's send completions (`own_ready`
        // takes that one). A producer reads our flag after releasing the
        // mutex, with no fence; taking it once here means the producer
        // either finished before (the re-check sees its completions) or
        // starts after (it sees the flag). Only tried: if the peer is
        // posting right now, say ready rather than wait for its post list
        // (the caller polls again; a failed try orders nothing).
        match peer.send.try_lock() {
            Ok(_) | Err(TryLockError::Poisoned(_)) => {}
            Err(TryLockError::WouldBlock) => return Armed::Ready,
        }
        if l.recv_ready(core) || own_ready(l) {
            return Armed::Ready;
        }
        Armed::Armed
    }

    fn disconnect(&mut self) {
        let SoftQp { core, peer, l } = self;
        if l.disconnected {
            return;
        }
        l.disconnected = true;
        core.flags.fetch_or(ERROR | DISCONNECTED, Ordering::SeqCst);
        peer.flags.fetch_or(ERROR | PEER_GONE, Ordering::SeqCst);
        // Set under no send mutex: the flag and the wake-up are both
        // read-modify-writes (`SeqCst`), so an armer's `SeqCst` flag store
        // and re-check cannot miss both.
        peer.notify.wake();
        {
            let mut s = lock(&core.send);
            s.check_state(core);
            l.sq_idle = s.sq.is_idle();
            let _ = s.take_wakes();
        }
        core.notify.wake_if_armed();
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for SoftQp {
    fn drop(&mut self) {
        self.disconnect();
        let SoftQp { core, peer, l } = self;
        if !l.peer_quiesced {
            peer.quiesce();
            l.peer_quiesced = true;
        }
        {
            // The core may outlive us (the peer holds it): the region tables
            // it kept go now, so that they keep no region's memory alive.
            let mut s = lock(&core.send);
            s.own_table = TableCache::default();
            s.peer_table = TableCache::default();
        }
        if let RecvSide::Srq { srq, comp } = &core.recv {
            // Receives consumed for us and never polled go back to the SRQ.
            while let Some(i) = comp.pop() {
                let _ = srq.free.push(i);
            }
        }
        core.dev.remove_exec(&core.exec);
        if !Arc::ptr_eq(&core.dev, &peer.dev) {
            peer.dev.remove_exec(&core.exec);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owners_state_fits_the_queue_pairs_first_line() {
        // `poll_cq` reads the core and peer pointers and reads and writes
        // the receive cursor on every call: all in one line. A 40-byte
        // field added to `Local` once moved the cursor into the second,
        // and the endpoint ping-pong read 1.08x slower (session 14).
        let end = std::mem::offset_of!(SoftQp, l) + std::mem::size_of::<Local>();
        assert!(end <= 64, "a queue pair's own state ends at byte {end}");
        assert!(std::mem::offset_of!(SoftQp, core) < 64);
        assert!(std::mem::offset_of!(SoftQp, peer) < 64);
    }
}
