//! Reliable-connected queue pairs: posting, polling, arming, errors.

use std::any::Any;
use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Waker;

use zcmsg::{
    Armed, Opcode, PostError, QpCaps, QpConfig, QpState, QueuePair, RecvRequest, SendErrorHold,
    SendFlags, TransportError, WcStatus, WorkCompletion, WorkRequest,
};

use crate::device::Core;
use crate::notify::QpShared;
use crate::srq::VerbsSrq;
use crate::sys::{self, CmId, Cq, PostFail, QpCap, RawWc, RecvList, SendList};

/// How many raw completions one `ibv_poll_cq` call moves at most.
const POLL_BATCH: usize = 32;

/// The GID a connection uses, as read back from the queue pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GidInfo {
    /// Port number.
    pub port: u8,
    /// Index in the port's GID table (`ah_attr.grh.sgid_index`).
    pub index: u8,
    /// The GID, formatted as an IPv6 address.
    pub gid: std::net::Ipv6Addr,
    /// Its type as sysfs names it (`"RoCE v2"`, `"IB/RoCE v1"`), if readable.
    pub kind: Option<String>,
}

impl GidInfo {
    /// True for a RoCE v2 GID (RoCE over UDP/IP).
    pub fn is_roce_v2(&self) -> bool {
        self.kind.as_deref().is_some_and(|k| k.trim() == "RoCE v2")
    }
}

/// Read `/sys/class/infiniband/<dev>/ports/<port>/gid_attrs/types/<index>`.
pub(crate) fn gid_type(dev: &str, port: u8, index: u32) -> Option<String> {
    std::fs::read_to_string(format!(
        "/sys/class/infiniband/{dev}/ports/{port}/gid_attrs/types/{index}"
    ))
    .ok()
    .map(|s| s.trim().to_owned())
}

/// A connected RC queue pair on an RDMA device, with its own send and
/// receive completion queues reporting to the device's completion channel.
pub struct VerbsQp {
    // Drop order: the id (QP, then the rdma_cm id) before the CQs it uses.
    id: CmId,
    send_cq: Arc<Cq>,
    recv_cq: Arc<Cq>,
    shared: Arc<QpShared>,
    key: u64,
    caps: QpCaps,
    qp_num: u32,
    srq: bool,
    max_sge_rd: u32,
    max_msg_sz: u32,
    atomics: bool,
    send_scratch: SendList,
    recv_scratch: RecvList,
    /// The registration the last INLINE request named, with the table
    /// generation it was read at: (generation, lkey, region). While the
    /// generation is current it is the table's own entry, and an INLINE
    /// post of that key needs neither the table nor its hash lookup. A
    /// stale one is replaced at the next INLINE post that reads the table;
    /// until then (or the queue pair's drop) it keeps its region's memory
    /// mapped, never usable: its generation no longer matches.
    inline_hint: Option<(u64, u32, sys::Region)>,
    /// wr_ids of posted send requests whose completion has not been polled,
    /// in post order: a request holds its slot until then (providers may
    /// accept more than the granted depth; this keeps to it, and so the
    /// completion queue can never overflow).
    sq: VecDeque<u64>,
    /// Signaled requests posted whose completion was not polled yet: while
    /// there are none, `poll_cq` looks at the send CQ only every
    /// [`SEND_CQ_EVERY`]th call (see `poll_both`).
    signaled_out: u32,
    /// `poll_cq` calls since the send CQ was last looked at.
    send_cq_skipped: u32,
    /// Receives posted and not yet completed (own receive queue).
    rq: u32,
    /// The shared receive queue's count of outstanding receives.
    srq_outstanding: Option<Arc<std::sync::atomic::AtomicU32>>,
    wc_buf: Vec<RawWc>,
    pending: VecDeque<WorkCompletion>,
    /// Send completions from the first error on, held back until the
    /// receive CQ's successes before them are taken (see `poll_both`);
    /// boxed when an error first comes, so the polling fields keep their
    /// places.
    held: Option<Box<SendErrorHold>>,
    errored: Cell<bool>,
    /// The QP was (re)moved to the error state by us after the error was
    /// seen, so that everything posted until then is flushed (rxe does not
    /// flush receives posted to a QP already in error on its own).
    kicked: Cell<bool>,
    disconnected: Cell<bool>,
    gid: Option<GidInfo>,
    core: Arc<Core>,
}

impl std::fmt::Debug for VerbsQp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsQp")
            .field("device", &self.core.name())
            .field("qp_num", &self.qp_num)
            .field("caps", &self.caps)
            .field("gid", &self.gid)
            .finish()
    }
}

fn invalid(msg: impl Into<String>) -> TransportError {
    TransportError::InvalidArgument(msg.into())
}

impl VerbsQp {
    /// Create the CQs and the QP on `id` (bound to `core`'s device).
    pub(crate) fn build(
        core: &Arc<Core>,
        mut id: CmId,
        cfg: &QpConfig,
    ) -> Result<VerbsQp, TransportError> {
        let dev = &core.caps;
        if cfg.max_send_wr == 0 {
            return Err(invalid("max_send_wr must be at least 1"));
        }
        if cfg.max_send_wr > dev.max_qp_wr || cfg.max_recv_wr > dev.max_qp_wr {
            return Err(invalid(format!(
                "queue depths {}/{} exceed the device's max_qp_wr {}",
                cfg.max_send_wr, cfg.max_recv_wr, dev.max_qp_wr
            )));
        }
        if cfg.max_send_sge > dev.max_send_sge || cfg.max_recv_sge > dev.max_recv_sge {
            return Err(invalid(format!(
                "SGE limits {}/{} exceed the device's {}/{}",
                cfg.max_send_sge, cfg.max_recv_sge, dev.max_send_sge, dev.max_recv_sge
            )));
        }
        let srq = match &cfg.srq {
            None => None,
            Some(s) => {
                let v = s.as_any().downcast_ref::<VerbsSrq>().ok_or_else(|| {
                    invalid("the shared receive queue was not created by a verbs device")
                })?;
                if !Arc::ptr_eq(v.raw().pd(), &core.pd) {
                    return Err(invalid(
                        "the shared receive queue belongs to another device (protection domain)",
                    ));
                }
                Some((v.raw().clone(), v.outstanding()))
            }
        };
        let (srq, srq_outstanding) = match srq {
            Some((s, o)) => (Some(s), Some(o)),
            None => (None, None),
        };
        let (key, shared) = core.dispatch.insert();
        let guard = KeyGuard { core, key };
        let max_cqe = core.attr.max_cqe.max(1);
        // Each CQ holds twice its queue's depth; the depths enforced below
        // never exceed that, so a CQ cannot overflow.
        let send_cqe = cfg.max_send_wr.saturating_mul(2).clamp(1, max_cqe);
        let send_cq = Cq::create(
            &core.ctx,
            send_cqe,
            crate::notify::cq_context(key, 0),
            Some(&core.comp),
        )?;
        let recv_depth = srq.as_ref().map_or(cfg.max_recv_wr, |s| s.max_wr());
        let recv_cqe = recv_depth.saturating_mul(2).clamp(1, max_cqe);
        let recv_cq = Cq::create(
            &core.ctx,
            recv_cqe,
            crate::notify::cq_context(key, 1),
            Some(&core.comp),
        )?;
        let want = QpCap {
            max_send_wr: cfg.max_send_wr,
            max_recv_wr: cfg.max_recv_wr,
            max_send_sge: cfg.max_send_sge.max(1),
            max_recv_sge: cfg.max_recv_sge.max(1),
            max_inline_data: cfg.max_inline_data.min(dev.max_inline_data),
        };
        let has_srq = srq.is_some();
        let got = id
            .create_qp(
                &core.pd,
                send_cq.clone(),
                recv_cq.clone(),
                srq,
                want,
                key as usize,
            )
            .map_err(|e| match e {
                libc::EINVAL => invalid(format!(
                    "the device refused a queue pair with {want:?} (EINVAL)"
                )),
                libc::ENOMEM => TransportError::io(
                    format!("creating a queue pair with {want:?}"),
                    sys::os_err(e),
                ),
                _ => TransportError::io("rdma_create_qp", sys::os_err(e)),
            })?;
        if cfg.ack_timeout != 0 {
            if let Err(e) = id.set_ack_timeout(cfg.ack_timeout) {
                tracing::warn!(
                    "rdma_set_option(ACK_TIMEOUT={}) failed: {}; the kernel default applies",
                    cfg.ack_timeout,
                    sys::os_err(e)
                );
            }
        }
        std::mem::forget(guard);
        let caps = QpCaps {
            max_send_wr: got.max_send_wr.max(cfg.max_send_wr).min(send_cqe),
            max_recv_wr: if has_srq {
                0
            } else {
                got.max_recv_wr.max(cfg.max_recv_wr).min(recv_cqe)
            },
            max_send_sge: got.max_send_sge.max(want.max_send_sge),
            max_recv_sge: if has_srq {
                0
            } else {
                got.max_recv_sge.max(want.max_recv_sge)
            },
            max_inline_data: got.max_inline_data.max(want.max_inline_data),
        };
        let qp_num = id.qp_num();
        Ok(VerbsQp {
            id,
            send_cq,
            recv_cq,
            shared,
            key,
            caps,
            qp_num,
            srq: has_srq,
            max_sge_rd: dev.max_sge_rd,
            max_msg_sz: dev.max_msg_sz,
            atomics: dev.atomics,
            send_scratch: SendList::with_capacity(64),
            recv_scratch: RecvList::with_capacity(64),
            inline_hint: None,
            sq: VecDeque::with_capacity(caps.max_send_wr as usize),
            signaled_out: 0,
            send_cq_skipped: 0,
            rq: 0,
            srq_outstanding,
            wc_buf: vec![sys::empty_wc(); POLL_BATCH],
            pending: VecDeque::with_capacity(2 * POLL_BATCH),
            held: None,
            errored: Cell::new(false),
            kicked: Cell::new(false),
            disconnected: Cell::new(false),
            gid: None,
            core: core.clone(),
        })
    }

    pub(crate) fn id_mut(&mut self) -> &mut CmId {
        &mut self.id
    }

    pub(crate) fn key(&self) -> u64 {
        self.key
    }

    /// After the connection is established: read back which GID the queue
    /// pair uses, log it, and check it is RoCE v2 on Ethernet.
    pub(crate) fn inspect_gid(&mut self, role: &str) -> Result<(), TransportError> {
        let port = self.id.port_num().max(1);
        let Some((_, index)) = self.id.query_state() else {
            tracing::warn!("ibv_query_qp failed; cannot tell which GID the connection uses");
            return Ok(());
        };
        let raw = self
            .core
            .ctx
            .query_gid(port, u32::from(index))
            .unwrap_or_else(|| self.id.sgid());
        let info = GidInfo {
            port,
            index,
            gid: std::net::Ipv6Addr::from(raw),
            kind: gid_type(self.core.name(), port, u32::from(index)),
        };
        let ethernet = self.core.port.link_layer == 2;
        tracing::info!(
            device = self.core.name(),
            role,
            qp_num = self.qp_num,
            port,
            gid_index = index,
            gid = %info.gid,
            gid_type = info.kind.as_deref().unwrap_or("unknown"),
            "connection established"
        );
        if ethernet && !info.is_roce_v2() {
            let msg = format!(
                "connection on {} uses GID index {index} ({}), which is {} and not RoCE v2: RoCE v1 is not routable and lacks ECN; check the source address/interface and `cma_roce_mode`",
                self.core.name(),
                info.gid,
                info.kind.as_deref().unwrap_or("of unknown type")
            );
            if self.core.cfg.require_roce_v2 {
                return Err(TransportError::InvalidArgument(format!(
                    "{msg} (VerbsConfig::require_roce_v2 is set)"
                )));
            }
            tracing::warn!("{msg}");
        }
        self.gid = Some(info);
        Ok(())
    }

    /// The GID the connection uses (RoCE: its index, value and type).
    pub fn gid(&self) -> Option<&GidInfo> {
        self.gid.as_ref()
    }

    /// Move to the error state once (rdma_disconnect; the QP is flushed and
    /// the peer told).
    fn enter_error(&self) {
        if self.disconnected.replace(true) {
            return;
        }
        self.errored.set(true);
        self.kicked.set(true);
        if let Err(e) = self.id.disconnect() {
            tracing::debug!(
                "rdma_disconnect: {}; moving the QP to error directly",
                sys::os_err(e)
            );
            if let Err(e) = self.id.modify_to_error() {
                tracing::warn!("ibv_modify_qp(ERR) failed: {}", sys::os_err(e));
            }
        }
    }

    #[inline]
    fn check_peer(&self) {
        if self.shared.peer_gone.load(Ordering::Acquire) && !self.disconnected.get() {
            tracing::debug!(qp_num = self.qp_num, "peer disconnected: flushing");
            self.enter_error();
        }
    }

    /// The QP is known to be in the error state: move it there once more
    /// ourselves, so that every request posted until now is flushed (an
    /// ERR -> ERR transition is legal; rxe needs it to flush receives that
    /// were posted after the QP failed).
    fn note_error(&self) {
        self.errored.set(true);
        if !self.kicked.replace(true) {
            if let Err(e) = self.id.modify_to_error() {
                tracing::debug!("ibv_modify_qp(ERR) after an error: {}", sys::os_err(e));
            }
        }
    }

    /// Before a post: act on a peer's disconnect.
    #[inline]
    fn before_post(&self) {
        self.check_peer();
    }

    /// After a post: requests posted to a QP known to be in the error state
    /// are flushed like any outstanding request. rxe flushes such sends by
    /// itself but not such receives, so move the QP to the error state
    /// again, which makes it flush both.
    #[inline]
    fn after_post(&self) {
        if self.errored.get() || self.disconnected.get() {
            if let Err(e) = self.id.modify_to_error() {
                tracing::debug!(
                    "ibv_modify_qp(ERR) after posting in the error state: {}",
                    sys::os_err(e)
                );
            }
        }
    }

    /// The refusal of a receive with more SGEs than the queue pair grants.
    fn too_many_recv_sges(&self, wr: &RecvRequest<'_>) -> TransportError {
        TransportError::TooManySges {
            got: wr.sg_list.len(),
            max: self.caps.max_recv_sge,
        }
    }

    /// The refusal of a receive beyond the receive queue's depth.
    fn recv_queue_full(&self) -> TransportError {
        TransportError::QueueFull {
            depth: self.caps.max_recv_wr,
        }
    }

    /// [`QueuePair::post_recv`] of one request (not through an SRQ): the
    /// list path's checks and accounting in straight-line code.
    #[inline]
    fn post_recv_one(&mut self, wr: &RecvRequest<'_>) -> Result<(), PostError> {
        self.before_post();
        if wr.sg_list.len() > self.caps.max_recv_sge as usize {
            return Err(PostError::at(0, self.too_many_recv_sges(wr)));
        }
        if self.rq >= self.caps.max_recv_wr {
            return Err(PostError::at(0, self.recv_queue_full()));
        }
        match self.id.post_recv_one(wr) {
            Ok(()) => {
                self.rq += 1;
                self.after_post();
                Ok(())
            }
            Err(code) => Err(PostError::at(0, self.post_error(code, false))),
        }
    }

    /// [`QueuePair::post_send`] of one request that is not INLINE or is
    /// INLINE from one non-empty SGE: the list path's checks and accounting
    /// in straight-line code.
    #[inline]
    fn post_send_one(&mut self, wr: &WorkRequest<'_>) -> Result<(), PostError> {
        self.before_post();
        // The common shapes pass the short check; anything else (or
        // anything it refuses) gets the full one, which says why.
        if !self.plainly_valid(wr) {
            if let Some((_, e)) = self.validate(std::slice::from_ref(wr)) {
                return Err(PostError::at(0, e));
            }
        }
        if let Some(e) = self.send_queue_full() {
            return Err(e);
        }
        let r = match wr.sg_list {
            [sge] if wr.flags.contains(SendFlags::INLINE) => {
                let key = sge.lkey();
                let gen = self.core.regions_gen.load(Ordering::Acquire);
                match current_hint(&self.inline_hint, gen, key) {
                    Some(region) => self
                        .id
                        .post_send_one(&mut self.send_scratch, wr, Some(region)),
                    None => {
                        let table = self.core.regions.load();
                        let region = table.get(&key);
                        let r = self.id.post_send_one(&mut self.send_scratch, wr, region);
                        // Kept for the next post, tagged with the generation
                        // read before the table.
                        self.inline_hint = region.map(|r| (gen, key, r.clone()));
                        r
                    }
                }
            }
            _ => self.id.post_send_one(&mut self.send_scratch, wr, None),
        };
        self.posted_one(wr.wr_id, wr.flags, r)
    }

    /// The refusal of one more send request when the send queue is full.
    #[inline]
    fn send_queue_full(&self) -> Option<PostError> {
        (self.sq.len() >= self.caps.max_send_wr as usize).then(|| {
            PostError::at(
                0,
                TransportError::QueueFull {
                    depth: self.caps.max_send_wr,
                },
            )
        })
    }

    /// Account for one send request the provider took (`r`), which holds
    /// its slot until its completion is polled; or say why it did not.
    #[inline]
    fn posted_one(
        &mut self,
        wr_id: u64,
        flags: SendFlags,
        r: Result<(), PostFail>,
    ) -> Result<(), PostError> {
        match r {
            Ok(()) => {
                self.sq.push_back(wr_id);
                if flags.contains(SendFlags::SIGNALED) {
                    self.signaled_out += 1;
                }
                self.after_post();
                Ok(())
            }
            Err(f) => Err(self.send_failure(f)),
        }
    }

    /// True if `wr` is a SEND or RDMA WRITE (with or without immediate)
    /// that [`VerbsQp::validate`] would pass: within the SGE limit, and
    /// within the inline limit if INLINE, and within the message size. A
    /// false answer only means "ask `validate`".
    #[inline(always)]
    fn plainly_valid(&self, wr: &WorkRequest<'_>) -> bool {
        let len = match wr.sg_list {
            [] => 0,
            [s] => u64::from(s.length()),
            _ => return false,
        };
        matches!(
            wr.opcode,
            Opcode::Send | Opcode::SendWithImm | Opcode::RdmaWrite | Opcode::RdmaWriteWithImm
        ) && wr.sg_list.len() <= self.caps.max_send_sge as usize
            && len <= u64::from(self.max_msg_sz)
            && (!wr.flags.contains(SendFlags::INLINE)
                || len <= u64::from(self.caps.max_inline_data))
    }

    /// Account for send requests the provider took: each holds its slot
    /// until its completion is polled.
    #[inline]
    fn note_posted(&mut self, posted: &[WorkRequest<'_>]) {
        if posted.is_empty() {
            return;
        }
        self.sq.extend(posted.iter().map(|w| w.wr_id));
        let signaled = posted
            .iter()
            .filter(|w| w.flags.contains(SendFlags::SIGNALED))
            .count();
        self.signaled_out += signaled as u32;
        self.after_post();
    }

    /// The error of a send post that stopped at `f`.
    #[cold]
    fn send_failure(&self, f: PostFail) -> PostError {
        match f {
            PostFail::Provider { index, code } => PostError::at(index, self.post_error(code, true)),
            PostFail::Inline { index } => PostError::at(
                index,
                invalid(format!(
                    "request {index} is INLINE and one of its SGEs is not inside the registration its lkey names (inline data must be registered memory)"
                )),
            ),
        }
    }

    /// The first request that must not be posted, and why.
    fn validate(&self, wrs: &[WorkRequest<'_>]) -> Option<(usize, TransportError)> {
        for (i, wr) in wrs.iter().enumerate() {
            let known = matches!(
                wr.opcode,
                Opcode::Send
                    | Opcode::SendWithImm
                    | Opcode::RdmaWrite
                    | Opcode::RdmaWriteWithImm
                    | Opcode::RdmaRead
                    | Opcode::AtomicCmpAndSwp
                    | Opcode::AtomicFetchAndAdd
            );
            if !known || (wr.opcode.is_atomic() && !self.atomics) {
                return Some((i, TransportError::BadOpcode(wr.opcode)));
            }
            let n = wr.sg_list.len();
            if n > self.caps.max_send_sge as usize {
                return Some((
                    i,
                    TransportError::TooManySges {
                        got: n,
                        max: self.caps.max_send_sge,
                    },
                ));
            }
            if wr.opcode == Opcode::RdmaRead && n > self.max_sge_rd as usize {
                return Some((
                    i,
                    TransportError::TooManySges {
                        got: n,
                        max: self.max_sge_rd,
                    },
                ));
            }
            let len = wr.byte_len();
            if wr.flags.contains(SendFlags::INLINE) {
                if matches!(wr.opcode, Opcode::RdmaRead) || wr.opcode.is_atomic() {
                    return Some((i, invalid(format!("{:?} cannot be sent inline", wr.opcode))));
                }
                if len > u64::from(self.caps.max_inline_data) {
                    return Some((
                        i,
                        TransportError::InlineTooLarge {
                            got: len,
                            max: self.caps.max_inline_data,
                        },
                    ));
                }
            }
            if len > u64::from(self.max_msg_sz) {
                return Some((
                    i,
                    TransportError::MessageTooLarge {
                        got: len,
                        max: self.max_msg_sz,
                    },
                ));
            }
        }
        None
    }

    fn post_error(&self, code: i32, send: bool) -> TransportError {
        match code {
            libc::ENOMEM => TransportError::QueueFull {
                depth: if send {
                    self.caps.max_send_wr
                } else {
                    self.caps.max_recv_wr
                },
            },
            libc::EINVAL if self.state() == QpState::Error => TransportError::QpError,
            libc::EINVAL => invalid(format!(
                "the provider refused the {} request (EINVAL)",
                if send { "send" } else { "receive" }
            )),
            _ => TransportError::io(
                if send {
                    "ibv_post_send"
                } else {
                    "ibv_post_recv"
                },
                sys::os_err(code),
            ),
        }
    }

    /// Poll `cq` into `out`, converting; returns how many. Inlined into
    /// `poll_cq`: a busy-poll loop calls it once per turn, and under full
    /// emulation each call and return (an indirect jump to look up) cost
    /// more than the checks around the provider's poll.
    #[inline(always)]
    fn poll_one(
        cq: &Cq,
        buf: &mut [RawWc],
        out: &mut [WorkCompletion],
        recv: bool,
        errored: &Cell<bool>,
    ) -> usize {
        let mut n = 0;
        while n < out.len() {
            let want = (out.len() - n).min(buf.len());
            let got = cq.poll(&mut buf[..want]);
            convert(&buf[..got], &mut out[n..n + got], recv, errored);
            n += got;
            if got < want {
                break;
            }
        }
        n
    }

    /// A send-queue completion was polled: free the slots of the requests it
    /// covers (RC completes in order; an unsignaled request is covered by the
    /// next completion).
    #[inline]
    fn retire_sends(&mut self, done: &[WorkCompletion]) {
        // Each completion is a signaled request's, or an unsignaled one's
        // error or flush (which the count never held): saturate.
        self.signaled_out = self.signaled_out.saturating_sub(done.len() as u32);
        for c in done {
            while let Some(id) = self.sq.pop_front() {
                if id == c.wr_id {
                    break;
                }
            }
        }
    }

    #[inline]
    fn retire_recvs(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        match &self.srq_outstanding {
            Some(o) => {
                o.fetch_sub(n as u32, Ordering::AcqRel);
            }
            None => self.rq = self.rq.saturating_sub(n as u32),
        }
    }

    /// Poll both CQs into `out`, with accounting; returns how many.
    ///
    /// The send CQ can only hold something if a signaled request is
    /// outstanding, or if an unsignaled one failed (or was flushed): while no
    /// signaled request is outstanding it is polled every
    /// [`SEND_CQ_EVERY`]th call only, which halves the cost of a busy-poll
    /// loop waiting for receives, and bounds how late such an error shows.
    /// `all` polls it regardless (before sleeping, and in the error state).
    ///
    /// A send error is reported after every receive that completed before
    /// it and before the receive CQ's flushes. The two CQs have no order
    /// between them, and the endpoint judges a failed send by what it has
    /// received: a peer that closed after our Close reached it may tear its
    /// queue pair down before rxe sent the Close's acknowledgement (rxe
    /// writes the receive's completion first), so our Close is flushed
    /// while the peer's own Close, which completed earlier, still waits in
    /// the receive CQ; seen before it, the flush fails a connection whose
    /// close had succeeded, and so does a flushed receive seen before the
    /// Close's flush. So the send completions from the first error on are
    /// held ([`SendErrorHold`]) until a poll finds the receive CQ empty or
    /// flushing (everything it completed before the error was written is
    /// then taken), and the send CQ is left alone while they are held.
    #[inline(always)]
    fn poll_both(&mut self, out: &mut [WorkCompletion], all: bool) -> usize {
        if self.held.is_some() {
            return self.poll_holding(out);
        }
        let mut a = 0;
        if !self.sq.is_empty() && (all || !self.skip_send_cq()) {
            self.send_cq_skipped = 0;
            a = Self::poll_one(&self.send_cq, &mut self.wc_buf, out, false, &self.errored);
            self.retire_sends(&out[..a]);
            if a > 0 && self.errored.get() {
                return self.hold_send_errors(out, a);
            }
        }
        a + self.poll_recv_cq(&mut out[a..])
    }

    /// The receive CQ into `out`, with accounting.
    #[inline(always)]
    fn poll_recv_cq(&mut self, out: &mut [WorkCompletion]) -> usize {
        let b = Self::poll_one(&self.recv_cq, &mut self.wc_buf, out, true, &self.errored);
        self.retire_recvs(b);
        b
    }

    /// `out[..a]` came from the send CQ, in the error state: hold it from
    /// its first error on, then poll the receive CQ (see `poll_both`).
    #[cold]
    #[inline(never)]
    fn hold_send_errors(&mut self, out: &mut [WorkCompletion], a: usize) -> usize {
        let mut h = Box::<SendErrorHold>::default();
        let a = h.hold_from_error(&out[..a]);
        if !h.is_empty() {
            self.held = Some(h);
        }
        let b = self.poll_recv_cq(&mut out[a..]);
        self.release_held(out, a, a + b)
    }

    /// `poll_both` while send completions are held: those due first, else
    /// the receive CQ alone (the send CQ waits behind them).
    #[cold]
    #[inline(never)]
    fn poll_holding(&mut self, out: &mut [WorkCompletion]) -> usize {
        if let Some(h) = self.held.as_mut().filter(|h| h.is_releasing()) {
            let n = h.release(out);
            if h.is_empty() {
                self.held = None;
            }
            return n;
        }
        let b = self.poll_recv_cq(out);
        self.release_held(out, 0, b)
    }

    /// [`SendErrorHold::after_recv`] on what is held, if anything; drops
    /// the hold once it is empty.
    fn release_held(&mut self, out: &mut [WorkCompletion], recv: usize, filled: usize) -> usize {
        let Some(h) = self.held.as_mut() else {
            return filled;
        };
        let n = h.after_recv(out, recv, filled);
        if h.is_empty() {
            self.held = None;
        }
        n
    }

    /// True if this poll may leave the send CQ alone (the skip counted);
    /// false if it must look (nothing counted). The one rule for both
    /// `poll_cq`'s short turn and [`Self::poll_both`].
    #[inline(always)]
    fn skip_send_cq(&mut self) -> bool {
        if self.sq.is_empty() {
            return true;
        }
        if self.signaled_out > 0 || self.errored.get() || self.send_cq_skipped + 1 >= SEND_CQ_EVERY
        {
            return false;
        }
        self.send_cq_skipped += 1;
        true
    }

    /// The short turn of `poll_cq` found `got` receive completions in
    /// `wc_buf` (it asked for `want`): convert them, poll on if the CQ may
    /// hold more than the buffer took, and account for them.
    #[inline(never)]
    fn took_recvs(&mut self, wc: &mut [WorkCompletion], got: usize, want: usize) -> usize {
        convert(&self.wc_buf[..got], &mut wc[..got], true, &self.errored);
        let mut n = got;
        if got == want && n < wc.len() {
            n += Self::poll_one(
                &self.recv_cq,
                &mut self.wc_buf,
                &mut wc[n..],
                true,
                &self.errored,
            );
        }
        self.retire_recvs(n);
        n
    }

    /// `poll_cq` in full: completions `arm` held back, the peer's
    /// disconnect, both CQs.
    #[inline(never)]
    fn poll_cq_full(&mut self, wc: &mut [WorkCompletion]) -> usize {
        let mut n = 0;
        if !self.pending.is_empty() {
            n = self.take_pending(wc);
        }
        self.check_peer();
        n + self.poll_both(&mut wc[n..], false)
    }

    /// Move completions `arm` polled early into `wc`; returns how many.
    #[inline(never)]
    fn take_pending(&mut self, wc: &mut [WorkCompletion]) -> usize {
        let mut n = 0;
        while n < wc.len() {
            match self.pending.pop_front() {
                Some(c) => {
                    wc[n] = c;
                    n += 1;
                }
                None => break,
            }
        }
        n
    }

    /// Poll both CQs into the pending buffer; returns how many were added.
    fn poll_into_pending(&mut self) -> usize {
        let mut tmp = [WorkCompletion::EMPTY; POLL_BATCH];
        let n = self.poll_both(&mut tmp, true);
        self.pending.extend(&tmp[..n]);
        n
    }
}

/// The kept INLINE hint's region, if it is the registration table's current
/// entry for `key` (its generation is `gen`, the table's now).
#[inline]
fn current_hint(
    hint: &Option<(u64, u32, sys::Region)>,
    gen: u64,
    key: u32,
) -> Option<&sys::Region> {
    hint.as_ref()
        .filter(|h| h.0 == gen && h.1 == key)
        .map(|h| &h.2)
}

/// Convert polled completions into `out` (as long as `raw`); an error
/// marks the queue pair `errored` and is logged (a flush quietly).
#[inline(always)]
fn convert(raw: &[RawWc], out: &mut [WorkCompletion], recv: bool, errored: &Cell<bool>) {
    for (o, raw) in out.iter_mut().zip(raw) {
        *o = sys::completion(raw, recv);
        if o.status != WcStatus::Success {
            errored.set(true);
            if o.status != WcStatus::WrFlushErr {
                tracing::debug!(
                    wr_id = o.wr_id,
                    status = %sys::wc_status_str(raw.status),
                    vendor_err = raw.vendor_err,
                    "error completion"
                );
            }
        }
    }
}

/// While no signaled send is outstanding, `poll_cq` looks at the send CQ
/// once in this many calls (for the errors of unsignaled requests).
const SEND_CQ_EVERY: u32 = 16;

struct KeyGuard<'a> {
    core: &'a Arc<Core>,
    key: u64,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        self.core.dispatch.remove(self.key);
    }
}

impl QueuePair for VerbsQp {
    fn qp_num(&self) -> u32 {
        self.qp_num
    }

    fn caps(&self) -> QpCaps {
        self.caps
    }

    fn state(&self) -> QpState {
        self.check_peer();
        if self.errored.get() || self.disconnected.get() {
            return QpState::Error;
        }
        match self.id.query_state() {
            Some((s, _))
                if s == rdma_mummy_sys::ibv_qp_state::IBV_QPS_ERR
                    || s == rdma_mummy_sys::ibv_qp_state::IBV_QPS_SQE =>
            {
                self.note_error();
                QpState::Error
            }
            _ => QpState::ReadyToSend,
        }
    }

    fn post_send(&mut self, wrs: &[WorkRequest<'_>]) -> Result<(), PostError> {
        match wrs {
            [] => return Ok(()),
            // One request, not INLINE or INLINE from one non-empty SGE: the
            // latency path, without the list's passes.
            [wr] if !wr.flags.contains(SendFlags::INLINE)
                || matches!(wr.sg_list, [s] if s.length() > 0) =>
            {
                return self.post_send_one(wr)
            }
            _ => {}
        }
        self.before_post();
        let mut stop = self.validate(wrs);
        let free = (self.caps.max_send_wr as usize).saturating_sub(self.sq.len());
        if free < stop.as_ref().map_or(wrs.len(), |(i, _)| *i) {
            stop = Some((
                free,
                TransportError::QueueFull {
                    depth: self.caps.max_send_wr,
                },
            ));
        }
        let k = stop.as_ref().map_or(wrs.len(), |(i, _)| *i);
        if k > 0 {
            // INLINE requests are checked against (and translated through)
            // the registration table, which the guard keeps alive for the
            // post; or, when every INLINE SGE names the key of the kept
            // hint and the table has not changed since it was read, the
            // hint alone (its region keeps the memory alive).
            let mut regions = None;
            let mut hint = None;
            // The keys of the INLINE SGEs that carry bytes (empty ones need
            // no lookup).
            let mut keys = wrs[..k]
                .iter()
                .filter(|w| w.flags.contains(SendFlags::INLINE))
                .flat_map(|w| w.sg_list.iter())
                .filter(|s| s.length() > 0)
                .map(|s| s.lkey());
            if let Some(first) = keys.next() {
                let gen = self.core.regions_gen.load(Ordering::Acquire);
                hint = current_hint(&self.inline_hint, gen, first).map(|r| (first, r));
                if hint.is_none() || !keys.all(|key| key == first) {
                    let table = self.core.regions.load();
                    // Keep the first key's entry for the next post, tagged
                    // with the generation read before the table.
                    let next = table.get(&first).map(|r| (gen, first, r.clone()));
                    regions = Some((table, next));
                }
            }
            let r = self.id.post_send(
                &mut self.send_scratch,
                &wrs[..k],
                hint,
                regions.as_ref().map(|(t, _)| &***t),
            );
            if let Some((_, next)) = regions {
                self.inline_hint = next;
            }
            let posted = match r {
                Ok(()) => k,
                Err(PostFail::Provider { index, .. }) | Err(PostFail::Inline { index }) => index,
            };
            self.note_posted(&wrs[..posted]);
            if let Err(f) = r {
                return Err(self.send_failure(f));
            }
        }
        match stop {
            Some((i, e)) => Err(PostError::at(i, e)),
            None => Ok(()),
        }
    }

    fn post_inline(
        &mut self,
        wr_id: u64,
        flags: SendFlags,
        imm: Option<u32>,
        data: &[u8],
    ) -> Result<(), PostError> {
        self.before_post();
        if data.len() > self.caps.max_inline_data as usize {
            return Err(PostError::at(
                0,
                TransportError::InlineTooLarge {
                    got: data.len() as u64,
                    max: self.caps.max_inline_data,
                },
            ));
        }
        if let Some(e) = self.send_queue_full() {
            return Err(e);
        }
        let r = self
            .id
            .post_inline(&mut self.send_scratch, wr_id, flags, imm, data);
        self.posted_one(wr_id, flags, r)
    }

    fn post_recv(&mut self, wrs: &[RecvRequest<'_>]) -> Result<(), PostError> {
        if self.srq {
            return Err(PostError::at(
                0,
                invalid("this queue pair receives through a shared receive queue: post there"),
            ));
        }
        if let [wr] = wrs {
            return self.post_recv_one(wr);
        }
        if wrs.is_empty() {
            return Ok(());
        }
        self.before_post();
        let mut stop = wrs
            .iter()
            .position(|w| w.sg_list.len() > self.caps.max_recv_sge as usize)
            .map(|i| (i, self.too_many_recv_sges(&wrs[i])));
        let free = self.caps.max_recv_wr.saturating_sub(self.rq) as usize;
        if free < stop.as_ref().map_or(wrs.len(), |(i, _)| *i) {
            stop = Some((free, self.recv_queue_full()));
        }
        let k = stop.as_ref().map_or(wrs.len(), |(i, _)| *i);
        if k > 0 {
            let r = self.id.post_recv(&mut self.recv_scratch, &wrs[..k]);
            let posted = match &r {
                Ok(()) => k,
                Err((i, _)) => *i,
            };
            self.rq += posted as u32;
            if posted > 0 {
                self.after_post();
            }
            if let Err((i, code)) = r {
                return Err(PostError::at(i, self.post_error(code, false)));
            }
        }
        match stop {
            Some((i, e)) => Err(PostError::at(i, e)),
            None => Ok(()),
        }
    }

    #[inline]
    fn poll_cq(&mut self, wc: &mut [WorkCompletion]) -> usize {
        // A busy-poll loop's turn, kept short (its length is how late a
        // completion is seen on average): with nothing held back by `arm`,
        // the peer not gone and the send CQ not due, one provider poll of
        // the receive CQ, and the conversion only when it found something.
        if self.pending.is_empty()
            && !self.shared.peer_gone.load(Ordering::Acquire)
            && self.skip_send_cq()
        {
            let want = wc.len().min(self.wc_buf.len());
            let got = self.recv_cq.poll(&mut self.wc_buf[..want]);
            if got == 0 {
                return 0;
            }
            return self.took_recvs(wc, got, want);
        }
        self.poll_cq_full(wc)
    }

    fn arm(&mut self, waker: &Waker) -> Armed {
        if !self.pending.is_empty() || self.held.is_some() {
            return Armed::Ready;
        }
        *self.shared.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(waker.clone());
        if self.shared.peer_gone.load(Ordering::Acquire) && !self.disconnected.get() {
            return Armed::Ready;
        }
        // A CQ stays armed until its event fires (the event thread clears
        // the flag), so re-arming one that is armed would only cost a call.
        for (i, cq) in [&self.send_cq, &self.recv_cq].into_iter().enumerate() {
            if self.shared.armed[i].swap(true, Ordering::SeqCst) {
                continue;
            }
            if let Err(e) = cq.req_notify() {
                self.shared.armed[i].store(false, Ordering::SeqCst);
                tracing::warn!("ibv_req_notify_cq failed: {}", sys::os_err(e));
                return Armed::Ready;
            }
        }
        // A completion that arrived before the CQs were armed raises no
        // event: poll once more so it is not missed.
        if self.poll_into_pending() > 0 {
            Armed::Ready
        } else {
            Armed::Armed
        }
    }

    fn disconnect(&mut self) {
        self.enter_error();
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for VerbsQp {
    fn drop(&mut self) {
        self.core.dispatch.remove(self.key);
        if !self.disconnected.get() {
            self.disconnected.set(true);
            // Tell the peer; failing (never connected, already gone) is fine.
            let _ = self.id.disconnect();
        }
    }
}
