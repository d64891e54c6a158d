//! The `Transport` trait: the one boundary between the framework and devices.
//!
//! A transport is a device opened with one protection domain. It registers
//! memory, creates reliable-connected queue pairs by listening and connecting,
//! and each queue pair posts work requests and polls its completion queue.
//! Three very different devices sit behind it without special cases: the
//! in-process software device (CPU addresses, its own region table), real
//! verbs (IOVAs, rdma_cm) and TCP over io_uring.
//!
//! # Ownership
//! The memory behind every SGE handed to `post_send`/`post_recv` must stay
//! alive and untouched by the application until the request's completion (or
//! its flush) is polled. The framework guarantees this by keeping the owners
//! (`Bytes`, slots) of every posted request in a slab indexed by `wr_id`.
//! A transport never frees or unmaps memory: it only holds an
//! `Arc<dyn RegionMemory>` per registration, so even a request naming a
//! stale key can only fail, never touch freed memory.
//!
//! # Threads
//! A [`Transport`] is `Send + Sync` and may be shared. A [`QueuePair`] is
//! `Send`; its posting and polling take `&mut self`, so one thread drives it at
//! a time and transports need no lock between a queue pair's producer and
//! consumer. A [`SharedRecvQueue`] is posted to through `&self` from any thread.

use std::any::Any;
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use crate::error::TransportError;
use crate::sge::AddressSpace;
use crate::verbs::{Access, RecvRequest, SendFlags, WcStatus, WorkCompletion, WorkRequest};

/// Memory a device may read and write through raw addresses.
///
/// # Safety
/// Implementors promise that `as_ptr()..as_ptr()+len()` is one allocation of
/// initialized bytes that stays valid (not freed, not unmapped, not moved) for
/// as long as the implementing value is alive, and that Rust code touches those
/// bytes only in ways compatible with a device writing them concurrently
/// (i.e. never through a `&`/`&mut` reference to bytes the device may be
/// writing at the same time).
pub unsafe trait RegionMemory: Send + Sync + 'static {
    /// Start of the memory.
    fn as_ptr(&self) -> *mut u8;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// True if the region is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a device can do (`ibv_device_attr` and `ibv_port_attr`, reduced).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCaps {
    /// Device name (`rxe0`, `soft0`, ...).
    pub name: String,
    /// How SGE addresses are expressed for this device.
    pub address_space: AddressSpace,
    /// Most SGEs in one send-queue request.
    pub max_send_sge: u32,
    /// Most SGEs in one receive request.
    pub max_recv_sge: u32,
    /// Most SGEs in one RDMA READ.
    pub max_sge_rd: u32,
    /// Largest message (SEND, or one WRITE/READ request) in bytes.
    pub max_msg_sz: u32,
    /// Largest inline payload a queue pair can be created with.
    pub max_inline_data: u32,
    /// Deepest send or receive queue.
    pub max_qp_wr: u32,
    /// Largest single registration.
    pub max_mr_size: u64,
    /// Atomics supported.
    pub atomics: bool,
    /// Shared receive queues supported.
    pub srq: bool,
    /// The device supports implicit on-demand paging (one key for the whole address space).
    pub implicit_odp: bool,
    /// Remote writes land by DMA from outside this process's Rust code (a
    /// NIC, or the kernel for rxe), so an exposed window may be watched
    /// with atomic loads while a peer writes it ([`crate::Window::load_byte`]).
    /// False for the in-process software device, whose writes are plain
    /// Rust copies: watching them would be a data race.
    pub dma_remote_writes: bool,
}

/// A registration's keys, as the device reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Registration {
    /// Local key, for SGEs.
    pub lkey: u32,
    /// Remote key, meaningful when the registration allows remote access.
    pub rkey: u32,
    /// The device address of the first byte: equal to the CPU address in
    /// `AddressSpace::Cpu`; chosen by the device (or the caller) otherwise.
    pub iova: u64,
}

/// Parameters of a reliable-connected queue pair.
#[derive(Clone)]
pub struct QpConfig {
    /// Send queue depth.
    pub max_send_wr: u32,
    /// Receive queue depth (ignored with `srq`).
    pub max_recv_wr: u32,
    /// SGEs per send request.
    pub max_send_sge: u32,
    /// SGEs per receive request.
    pub max_recv_sge: u32,
    /// Inline payload limit requested; the queue pair may grant less, see [`QpCaps`].
    pub max_inline_data: u32,
    /// Receive through this shared receive queue instead of the queue pair's own.
    pub srq: Option<Arc<dyn SharedRecvQueue>>,
    /// Receiver-not-ready retries before `RnrRetryExcErr` (7 means "infinite" in verbs).
    pub rnr_retry: u8,
    /// Transport retries before `RetryExcErr`. Keep it at 6 or below: the
    /// verbs encoding holds 0-7 and Soft-RoCE (rxe) takes 7 as unlimited,
    /// as the spec does for `rnr_retry`, so a peer that vanished mid-request
    /// is then found only by the heartbeat.
    pub retry_count: u8,
    /// Local ACK timeout exponent: 4.096 µs * 2^timeout (verbs encoding); 0 = transport default.
    pub ack_timeout: u8,
    /// How long `connect`/`accept` wait.
    pub connect_timeout: Duration,
}

impl Default for QpConfig {
    fn default() -> Self {
        QpConfig {
            max_send_wr: 256,
            max_recv_wr: 256,
            max_send_sge: 4,
            max_recv_sge: 1,
            max_inline_data: 64,
            srq: None,
            rnr_retry: 6,
            retry_count: 6,
            ack_timeout: 14,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl std::fmt::Debug for QpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QpConfig")
            .field("max_send_wr", &self.max_send_wr)
            .field("max_recv_wr", &self.max_recv_wr)
            .field("max_send_sge", &self.max_send_sge)
            .field("max_recv_sge", &self.max_recv_sge)
            .field("max_inline_data", &self.max_inline_data)
            .field("srq", &self.srq.is_some())
            .field("rnr_retry", &self.rnr_retry)
            .field("retry_count", &self.retry_count)
            .field("ack_timeout", &self.ack_timeout)
            .finish()
    }
}

/// What a queue pair was actually created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpCaps {
    /// Send queue depth.
    pub max_send_wr: u32,
    /// Receive queue depth (0 with a shared receive queue).
    pub max_recv_wr: u32,
    /// SGEs per send request.
    pub max_send_sge: u32,
    /// SGEs per receive request.
    pub max_recv_sge: u32,
    /// Inline payload limit granted.
    pub max_inline_data: u32,
}

/// Queue pair states that matter to users (`ibv_qp_state`, reduced).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QpState {
    /// Connected: ready to send and receive.
    ReadyToSend,
    /// In error: every outstanding request is flushed with `WrFlushErr`.
    Error,
}

/// Whether arming a notification found completions already waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Armed {
    /// Completions are already there: poll instead of sleeping.
    Ready,
    /// The waker will be woken once when the next completion arrives.
    Armed,
}

/// A device with its protection domain.
pub trait Transport: Send + Sync + 'static {
    /// What the device can do.
    fn caps(&self) -> &DeviceCaps;

    /// Register `mem` with `access`, exactly once per arena. The transport keeps
    /// `mem` alive until [`Transport::deregister`] for the returned `lkey`.
    fn register(
        &self,
        mem: Arc<dyn RegionMemory>,
        access: Access,
    ) -> Result<Registration, TransportError>;

    /// Register the range `[offset, offset + len)` of `mem` on its own, e.g. to
    /// expose only that range to a peer. Keys differ from any other registration.
    fn register_range(
        &self,
        mem: Arc<dyn RegionMemory>,
        offset: usize,
        len: usize,
        access: Access,
    ) -> Result<Registration, TransportError>;

    /// End a registration. Requests still naming its keys fail with protection
    /// or access errors; no memory is touched after this returns.
    fn deregister(&self, lkey: u32) -> Result<(), TransportError>;

    /// Create a shared receive queue.
    fn create_srq(
        &self,
        max_wr: u32,
        max_sge: u32,
    ) -> Result<Arc<dyn SharedRecvQueue>, TransportError>;

    /// Listen for connections at `addr` (a name for the software device,
    /// `ip:port` for the network transports).
    fn listen(&self, addr: &str, config: &QpConfig) -> Result<Box<dyn Listener>, TransportError>;

    /// Connect to a listener at `addr`, handing it `private_data` (at most 56 bytes).
    fn connect(
        &self,
        addr: &str,
        config: &QpConfig,
        private_data: &[u8],
    ) -> Result<Box<dyn QueuePair>, TransportError>;
}

/// Accepts incoming connections.
pub trait Listener: Send {
    /// The address peers connect to (with the port filled in when 0 was asked).
    fn local_addr(&self) -> String;
    /// Wait up to `timeout` for one connection; returns the queue pair and the
    /// private data the peer connected with. A connection whose handshake
    /// fails before it is established is dropped, and the wait goes on for
    /// the next one (a connector on a lossy wire may give up and retry).
    fn accept(
        &mut self,
        timeout: Duration,
    ) -> Result<(Box<dyn QueuePair>, Vec<u8>), TransportError>;
}

/// A reliable-connected queue pair with its completion queue.
pub trait QueuePair: Send {
    /// The local queue pair number.
    fn qp_num(&self) -> u32;
    /// What the queue pair was created with.
    fn caps(&self) -> QpCaps;
    /// Current state.
    fn state(&self) -> QpState;
    /// Post a list of send-queue requests with one doorbell. On error, the
    /// requests before `PostError::index` were posted and the rest were not.
    fn post_send(&mut self, wrs: &[WorkRequest<'_>]) -> Result<(), crate::error::PostError>;
    /// Post one SEND whose payload is `data`, copied into the request at
    /// post time (an INLINE request, `IBV_SEND_INLINE`): `data` may be any
    /// memory, registered or not, and may be reused as soon as this
    /// returns, since the device never reads it afterwards. With `imm`, a
    /// SEND_WITH_IMM. INLINE is implied; `flags` adds SIGNALED (or
    /// SOLICITED, FENCE). Checked and completed like the same request
    /// through [`QueuePair::post_send`]: longer than
    /// [`QpCaps::max_inline_data`] or with the send queue full, it is
    /// refused at post time and nothing is posted.
    ///
    /// This is how a small message goes out from a caller's buffer with
    /// one copy (the device's) instead of a copy into registered memory
    /// first: UCX's short active messages work the same way. (An INLINE
    /// request built with [`QueuePair::post_send`] names registered memory
    /// in its SGEs, which are checked against their keys like any other.)
    fn post_inline(
        &mut self,
        wr_id: u64,
        flags: SendFlags,
        imm: Option<u32>,
        data: &[u8],
    ) -> Result<(), crate::error::PostError>;
    /// Post a list of receives with one doorbell (an error if the queue pair uses
    /// a shared receive queue).
    fn post_recv(&mut self, wrs: &[RecvRequest<'_>]) -> Result<(), crate::error::PostError>;
    /// Move up to `wc.len()` completions (send and receive side) into `wc`;
    /// returns how many. Never blocks.
    ///
    /// Each side's completions come in their queue's order. Between the
    /// sides, one rule: a send-side error comes after every receive that
    /// completed before it, and before the receive side's flushes (a
    /// transport with a queue for each side holds it back with
    /// [`SendErrorHold`]). The endpoint judges a failed request by what it
    /// has received, and a flushed receive ends the connection: a peer
    /// that closes after our Close reached it may leave before
    /// acknowledging ours, and that Close is flushed while the peer's own
    /// Close waits on the receive side, with our flushed receives behind
    /// it.
    fn poll_cq(&mut self, wc: &mut [WorkCompletion]) -> usize;
    /// Ask to be woken when the next completion arrives (`ibv_req_notify_cq`).
    fn arm(&mut self, waker: &Waker) -> Armed;
    /// Move to the error state, flushing outstanding requests; the peer sees
    /// its own requests fail or flush. Idempotent.
    fn disconnect(&mut self);
    /// Downcast support for transport-specific extensions.
    fn as_any(&self) -> &dyn Any;
}

/// Send-side completions held back from the first error on, so that a
/// transport reports a send error after every receive that completed
/// before it and before the receive side's own flushes (the rule of
/// [`QueuePair::poll_cq`]). Errors are rare; holding costs nothing until
/// one comes. A transport that polls a queue for each side uses it like
/// this (the soft device, whose receive side knows where its flushes
/// begin, calls [`SendErrorHold::release`] there instead of
/// [`SendErrorHold::after_recv`]):
///
/// ```
/// use zcmsg::{SendErrorHold, WcStatus, WorkCompletion};
///
/// let wc = |wr_id, status| WorkCompletion { wr_id, status, ..WorkCompletion::EMPTY };
/// let mut hold = SendErrorHold::default();
/// let mut out = [WorkCompletion::EMPTY; 8];
/// // One poll. The send side (polled only while nothing is held) gave a
/// // success and the flush of a request the peer never acknowledged...
/// out[0] = wc(1, WcStatus::Success);
/// out[1] = wc(2, WcStatus::WrFlushErr);
/// let a = hold.hold_from_error(&out[..2]);
/// assert_eq!(a, 1);
/// // ...and the receive side, polled after it, the peer's last message,
/// // which had completed before, then the flush of a posted receive.
/// out[a] = wc(100, WcStatus::Success);
/// out[a + 1] = wc(101, WcStatus::WrFlushErr);
/// let n = hold.after_recv(&mut out, a, a + 2);
/// let ids: Vec<u64> = out[..n].iter().map(|c| c.wr_id).collect();
/// assert_eq!(ids, [1, 100, 2, 101]);
/// assert!(hold.is_empty() && !hold.is_releasing());
/// ```
#[derive(Debug, Default)]
pub struct SendErrorHold {
    held: std::collections::VecDeque<WorkCompletion>,
    /// The receive side's successes are all reported: what is held goes
    /// out before anything else.
    releasing: bool,
}

impl SendErrorHold {
    /// True if nothing is held: the send side may be polled (while
    /// something is, it is left alone, so that its order is kept).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// True if what is held is due: report it (with
    /// [`SendErrorHold::release`]) before polling either side.
    #[inline]
    pub fn is_releasing(&self) -> bool {
        self.releasing
    }

    /// `got` was just polled from the send side: hold its completions from
    /// the first error on, or all of them if something is held already (a
    /// send side polled while holding, so that its order is kept). Returns
    /// how many come first, to report now.
    #[inline]
    pub fn hold_from_error(&mut self, got: &[WorkCompletion]) -> usize {
        let k = if self.held.is_empty() {
            match got.iter().position(|c| c.status != WcStatus::Success) {
                Some(k) => k,
                None => return got.len(),
            }
        } else {
            0
        };
        self.held.extend(&got[k..]);
        k
    }

    /// Move as many held completions as fit into `out`, in order; returns
    /// how many. Once nothing is held, nothing is due either.
    #[inline]
    pub fn release(&mut self, out: &mut [WorkCompletion]) -> usize {
        let n = self.held.len().min(out.len());
        for (o, c) in out.iter_mut().zip(self.held.drain(..n)) {
            *o = c;
        }
        if self.held.is_empty() {
            self.releasing = false;
        }
        n
    }

    /// For a transport with a queue for each side: `out[..filled]` is this
    /// poll's report, `out[recv..filled]` what the receive side, polled
    /// last, gave. With something held: once the receive side gives an
    /// error (its flushes begin) or less than its room (it is empty), the
    /// held completions follow its successes, and its errors follow them
    /// (held too if the room is short); until then all stays held. Returns
    /// the report's new length.
    #[inline]
    pub fn after_recv(&mut self, out: &mut [WorkCompletion], recv: usize, filled: usize) -> usize {
        if self.held.is_empty() {
            return filled;
        }
        let k = match out[recv..filled]
            .iter()
            .position(|c| c.status != WcStatus::Success)
        {
            Some(k) => recv + k,
            None if filled < out.len() => filled,
            None => return filled,
        };
        self.held.extend(&out[k..filled]);
        self.releasing = true;
        k + self.release(&mut out[k..])
    }
}

/// A shared receive queue (`ibv_srq`).
pub trait SharedRecvQueue: Send + Sync {
    /// Post receives; callable from any thread.
    fn post_recv(&self, wrs: &[RecvRequest<'_>]) -> Result<(), crate::error::PostError>;
    /// Downcast support for the transport that created it.
    fn as_any(&self) -> &dyn Any;
}

/// Block the calling thread until `qp` has a completion or `timeout` passes,
/// spinning for `spin` first (waking a sleeping vCPU costs ~30 µs here).
/// Returns how many completions were polled into `wc`.
pub fn wait_poll(
    qp: &mut dyn QueuePair,
    wc: &mut [WorkCompletion],
    spin: Duration,
    timeout: Duration,
) -> usize {
    let start = std::time::Instant::now();
    loop {
        let n = qp.poll_cq(wc);
        if n > 0 {
            return n;
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return 0;
        }
        if elapsed < spin {
            std::hint::spin_loop();
            continue;
        }
        let waker = crate::util::thread_waker();
        if qp.arm(&waker) == Armed::Armed {
            std::thread::park_timeout((timeout - elapsed).min(Duration::from_millis(50)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wc(wr_id: u64, status: WcStatus) -> WorkCompletion {
        WorkCompletion {
            wr_id,
            status,
            ..WorkCompletion::EMPTY
        }
    }

    fn ids(out: &[WorkCompletion]) -> Vec<u64> {
        out.iter().map(|c| c.wr_id).collect()
    }

    #[test]
    fn a_held_error_waits_while_the_receive_side_fills_the_room() {
        let mut hold = SendErrorHold::default();
        let mut out = [WorkCompletion::EMPTY; 2];
        out[0] = wc(7, WcStatus::WrFlushErr);
        assert_eq!(hold.hold_from_error(&out[..1]), 0);
        // The receive side filled all the room with successes: it may hold
        // more that completed before the error, so nothing is released.
        out[0] = wc(100, WcStatus::Success);
        out[1] = wc(101, WcStatus::Success);
        assert_eq!(hold.after_recv(&mut out, 0, 2), 2);
        assert!(!hold.is_empty() && !hold.is_releasing());
        // Next poll it gives less than its room: empty, the error follows.
        out[0] = wc(102, WcStatus::Success);
        let n = hold.after_recv(&mut out, 0, 1);
        assert_eq!(ids(&out[..n]), [102, 7]);
        assert!(hold.is_empty() && !hold.is_releasing());
    }

    #[test]
    fn receive_flushes_follow_the_held_error_across_short_rooms() {
        let mut hold = SendErrorHold::default();
        let mut out = [WorkCompletion::EMPTY; 3];
        out[0] = wc(1, WcStatus::Success);
        out[1] = wc(2, WcStatus::RetryExcErr);
        out[2] = wc(3, WcStatus::WrFlushErr);
        assert_eq!(hold.hold_from_error(&out), 1);
        // One receive success, then flushes: with room for one more only,
        // the first held goes now, the rest (send flush, receive flushes)
        // stay due, in order.
        out[1] = wc(100, WcStatus::Success);
        out[2] = wc(101, WcStatus::WrFlushErr);
        let n = hold.after_recv(&mut out, 1, 3);
        assert_eq!(ids(&out[..n]), [1, 100, 2]);
        assert!(hold.is_releasing());
        let n = hold.release(&mut out);
        assert_eq!(ids(&out[..n]), [3, 101]);
        assert!(hold.is_empty() && !hold.is_releasing());
    }

    #[test]
    fn while_holding_every_send_completion_is_held_in_order() {
        let mut hold = SendErrorHold::default();
        assert_eq!(hold.hold_from_error(&[wc(5, WcStatus::WrFlushErr)]), 0);
        // A success after the error too: it cannot come before it.
        assert_eq!(
            hold.hold_from_error(&[wc(6, WcStatus::Success), wc(7, WcStatus::WrFlushErr)]),
            0
        );
        let mut out = [WorkCompletion::EMPTY; 4];
        let n = hold.release(&mut out);
        assert_eq!(ids(&out[..n]), [5, 6, 7]);
    }
}
