//! The verbs vocabulary as plain data.
//!
//! These types mirror libibverbs (`ibv_send_wr`, `ibv_recv_wr`, `ibv_wc`,
//! `ibv_wc_status`, `ibv_access_flags`) closely enough that the verbs
//! transport translates them field by field, while carrying no pointers a
//! transport could misuse: a [`WorkRequest`] borrows its SGE list for the
//! duration of `post_send` only.

use crate::sge::Sge;

/// Work request opcodes (`ibv_wr_opcode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Opcode {
    /// Two-sided send into a posted receive.
    Send,
    /// Send carrying 32 bits of immediate data.
    SendWithImm,
    /// One-sided write into the peer's registered memory.
    RdmaWrite,
    /// One-sided write that also consumes a receive and delivers immediate data.
    RdmaWriteWithImm,
    /// One-sided read from the peer's registered memory.
    RdmaRead,
    /// 8-byte compare-and-swap on an 8-byte aligned remote address.
    AtomicCmpAndSwp,
    /// 8-byte fetch-and-add on an 8-byte aligned remote address.
    AtomicFetchAndAdd,
}

impl Opcode {
    /// True for operations that name remote memory (`remote_addr`/`rkey`).
    #[inline]
    pub fn is_one_sided(self) -> bool {
        !matches!(self, Opcode::Send | Opcode::SendWithImm)
    }
    /// True for operations that carry immediate data.
    #[inline]
    pub fn has_imm(self) -> bool {
        matches!(self, Opcode::SendWithImm | Opcode::RdmaWriteWithImm)
    }
    /// True for the two atomic operations.
    #[inline]
    pub fn is_atomic(self) -> bool {
        matches!(self, Opcode::AtomicCmpAndSwp | Opcode::AtomicFetchAndAdd)
    }
}

/// Send flags (`ibv_send_flags`), a small bit set. The bits are
/// `ibv_send_flags`' own, so a verbs transport hands them over as they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SendFlags(u8);

impl SendFlags {
    /// No flags: an unsignaled, non-inline request.
    pub const NONE: SendFlags = SendFlags(0);
    /// Wait for prior RDMA READ and atomic requests before this one (`IBV_SEND_FENCE`).
    pub const FENCE: SendFlags = SendFlags(1);
    /// Generate a completion for this request (`IBV_SEND_SIGNALED`).
    pub const SIGNALED: SendFlags = SendFlags(2);
    /// Ask the receiver to raise a solicited event (`IBV_SEND_SOLICITED`).
    pub const SOLICITED: SendFlags = SendFlags(4);
    /// Copy the payload into the work request at post time (`IBV_SEND_INLINE`),
    /// so the buffers may be reused as soon as `post_send` returns. Unlike
    /// libibverbs, zcmsg checks inline SGEs like any other (registered memory,
    /// `lkey` and bounds): a device never reads an unchecked address.
    pub const INLINE: SendFlags = SendFlags(8);

    /// True if every flag in `other` is set.
    pub const fn contains(self, other: SendFlags) -> bool {
        self.0 & other.0 == other.0
    }
    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }
}

impl std::ops::BitOr for SendFlags {
    type Output = SendFlags;
    fn bitor(self, rhs: SendFlags) -> SendFlags {
        SendFlags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for SendFlags {
    fn bitor_assign(&mut self, rhs: SendFlags) {
        self.0 |= rhs.0;
    }
}

/// Memory access rights of a registration (`ibv_access_flags`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Access(u8);

impl Access {
    /// Local read only (always granted by a registration).
    pub const LOCAL_READ: Access = Access(0);
    /// The local device may write into the region (receives, READ targets).
    pub const LOCAL_WRITE: Access = Access(1);
    /// A peer may RDMA WRITE into the region.
    pub const REMOTE_WRITE: Access = Access(2);
    /// A peer may RDMA READ from the region.
    pub const REMOTE_READ: Access = Access(4);
    /// A peer may run atomics on the region.
    pub const REMOTE_ATOMIC: Access = Access(8);

    /// True if every right in `other` is granted.
    pub const fn contains(self, other: Access) -> bool {
        self.0 & other.0 == other.0
    }
    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// True if any remote right is granted.
    pub const fn is_remote(self) -> bool {
        self.0 & (Access::REMOTE_WRITE.0 | Access::REMOTE_READ.0 | Access::REMOTE_ATOMIC.0) != 0
    }
}

impl std::ops::BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

/// A send-queue work request (`ibv_send_wr`), borrowing its SGE list.
///
/// Fields that an opcode does not use are ignored by the transport:
/// `remote_addr`/`rkey` for SENDs, `imm_data` without immediate, the atomic
/// operands outside atomics.
#[derive(Clone, Copy, Debug)]
pub struct WorkRequest<'a> {
    /// Returned unchanged in the completion.
    pub wr_id: u64,
    /// The operation.
    pub opcode: Opcode,
    /// Signaled, inline, fence, solicited.
    pub flags: SendFlags,
    /// Local memory: the payload for SEND/WRITE, the destination for READ and atomics.
    pub sg_list: &'a [Sge],
    /// Immediate data for `*_WITH_IMM`, in host order.
    pub imm_data: u32,
    /// Remote address (in the peer's address space for its registration) of one-sided operations.
    pub remote_addr: u64,
    /// Remote key of one-sided operations.
    pub rkey: u32,
    /// Compare value (CAS) or addend (FAA).
    pub compare_add: u64,
    /// Swap value (CAS).
    pub swap: u64,
}

impl<'a> WorkRequest<'a> {
    /// A signaled SEND of `sg_list`.
    #[inline]
    pub fn send(wr_id: u64, sg_list: &'a [Sge]) -> Self {
        WorkRequest {
            wr_id,
            opcode: Opcode::Send,
            flags: SendFlags::SIGNALED,
            sg_list,
            imm_data: 0,
            remote_addr: 0,
            rkey: 0,
            compare_add: 0,
            swap: 0,
        }
    }
    /// A signaled one-sided operation on `remote_addr`/`rkey`.
    #[inline]
    pub fn one_sided(
        wr_id: u64,
        opcode: Opcode,
        sg_list: &'a [Sge],
        remote_addr: u64,
        rkey: u32,
    ) -> Self {
        WorkRequest {
            opcode,
            remote_addr,
            rkey,
            ..WorkRequest::send(wr_id, sg_list)
        }
    }
    /// Replace the flags.
    #[inline]
    pub fn with_flags(mut self, flags: SendFlags) -> Self {
        self.flags = flags;
        self
    }
    /// Set immediate data.
    #[inline]
    pub fn with_imm(mut self, imm: u32) -> Self {
        self.imm_data = imm;
        self
    }
    /// Set the atomic operands.
    #[inline]
    pub fn with_atomic(mut self, compare_add: u64, swap: u64) -> Self {
        self.compare_add = compare_add;
        self.swap = swap;
        self
    }
    /// Sum of the SGE lengths.
    #[inline]
    pub fn byte_len(&self) -> u64 {
        self.sg_list.iter().map(|s| u64::from(s.length())).sum()
    }
}

/// A receive-queue work request (`ibv_recv_wr`).
#[derive(Clone, Copy, Debug)]
pub struct RecvRequest<'a> {
    /// Returned unchanged in the completion.
    pub wr_id: u64,
    /// Where an incoming SEND lands; may be empty for WRITE_WITH_IMM-only receives.
    pub sg_list: &'a [Sge],
}

/// Completion status (`ibv_wc_status`), one variant per status libibverbs defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WcStatus {
    /// The operation completed.
    Success,
    /// Local length error: e.g. a SEND longer than the receive buffer (receiver side).
    LocLenErr,
    /// Local queue pair operation error.
    LocQpOpErr,
    /// Local EE context operation error.
    LocEecOpErr,
    /// Local protection error: an SGE outside its region or without the access.
    LocProtErr,
    /// Flushed because the queue pair entered the error state.
    WrFlushErr,
    /// Memory window bind error.
    MwBindErr,
    /// Bad response from the responder.
    BadRespErr,
    /// Local access error (e.g. a local memory window or key that does not allow the access).
    LocAccessErr,
    /// Remote invalid request: e.g. the peer's receive buffer was too small (sender side).
    RemInvReqErr,
    /// Remote access error: bad rkey, out of bounds, or missing remote right.
    RemAccessErr,
    /// Remote operation error.
    RemOpErr,
    /// Transport retry counter exceeded: the peer did not answer.
    RetryExcErr,
    /// Receiver-not-ready retry counter exceeded: the peer had no receive posted.
    RnrRetryExcErr,
    /// Local RDD violation.
    LocRddViolErr,
    /// Remote invalid RD request.
    RemInvRdReqErr,
    /// Remote aborted.
    RemAbortErr,
    /// Invalid EE context number.
    InvEecnErr,
    /// Invalid EE context state.
    InvEecStateErr,
    /// Fatal error.
    FatalErr,
    /// Response timeout.
    RespTimeoutErr,
    /// General error.
    GeneralErr,
}

impl WcStatus {
    /// True for `Success`.
    #[inline]
    pub fn is_ok(self) -> bool {
        self == WcStatus::Success
    }
}

impl std::fmt::Display for WcStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            WcStatus::Success => "success",
            WcStatus::LocLenErr => "local length error",
            WcStatus::LocQpOpErr => "local QP operation error",
            WcStatus::LocEecOpErr => "local EE context operation error",
            WcStatus::LocProtErr => "local protection error",
            WcStatus::WrFlushErr => "work request flushed",
            WcStatus::MwBindErr => "memory window bind error",
            WcStatus::BadRespErr => "bad response",
            WcStatus::LocAccessErr => "local access error",
            WcStatus::RemInvReqErr => "remote invalid request",
            WcStatus::RemAccessErr => "remote access error",
            WcStatus::RemOpErr => "remote operation error",
            WcStatus::RetryExcErr => "transport retry counter exceeded",
            WcStatus::RnrRetryExcErr => "RNR retry counter exceeded",
            WcStatus::LocRddViolErr => "local RDD violation",
            WcStatus::RemInvRdReqErr => "remote invalid RD request",
            WcStatus::RemAbortErr => "remote aborted",
            WcStatus::InvEecnErr => "invalid EE context number",
            WcStatus::InvEecStateErr => "invalid EE context state",
            WcStatus::FatalErr => "fatal error",
            WcStatus::RespTimeoutErr => "response timeout",
            WcStatus::GeneralErr => "general error",
        };
        f.write_str(s)
    }
}

/// What a completion completes (`ibv_wc_opcode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WcOpcode {
    /// A SEND or SEND_WITH_IMM finished on the sender.
    Send,
    /// An RDMA WRITE (with or without immediate) finished on the requester.
    RdmaWrite,
    /// An RDMA READ finished on the requester.
    RdmaRead,
    /// A compare-and-swap finished on the requester.
    CompSwap,
    /// A fetch-and-add finished on the requester.
    FetchAdd,
    /// A receive consumed by a SEND.
    Recv,
    /// A receive consumed by an RDMA WRITE with immediate.
    RecvRdmaWithImm,
}

impl WcOpcode {
    /// True for receive-side completions.
    #[inline]
    pub fn is_recv(self) -> bool {
        matches!(self, WcOpcode::Recv | WcOpcode::RecvRdmaWithImm)
    }
    /// The completion opcode a successful send-queue request of `op` reports.
    #[inline]
    pub fn for_send(op: Opcode) -> WcOpcode {
        match op {
            Opcode::Send | Opcode::SendWithImm => WcOpcode::Send,
            Opcode::RdmaWrite | Opcode::RdmaWriteWithImm => WcOpcode::RdmaWrite,
            Opcode::RdmaRead => WcOpcode::RdmaRead,
            Opcode::AtomicCmpAndSwp => WcOpcode::CompSwap,
            Opcode::AtomicFetchAndAdd => WcOpcode::FetchAdd,
        }
    }
}

/// One completion (`ibv_wc`).
///
/// As in libibverbs, only `wr_id`, `status` and `qp_num` are meaningful when
/// `status` is not `Success`; a flushed receive still says it is a receive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkCompletion {
    /// The `wr_id` of the completed request.
    pub wr_id: u64,
    /// Success or the reason of failure.
    pub status: WcStatus,
    /// What completed.
    pub opcode: WcOpcode,
    /// Bytes received (receives) or transferred (READ).
    pub byte_len: u32,
    /// Immediate data, when the peer sent some.
    pub imm_data: Option<u32>,
    /// The local queue pair number.
    pub qp_num: u32,
}

impl WorkCompletion {
    /// An all-zero completion, handy to size `poll_cq` buffers.
    pub const EMPTY: WorkCompletion = WorkCompletion {
        wr_id: 0,
        status: WcStatus::Success,
        opcode: WcOpcode::Send,
        byte_len: 0,
        imm_data: None,
        qp_num: 0,
    };
}

impl Default for WorkCompletion {
    fn default() -> Self {
        WorkCompletion::EMPTY
    }
}

/// A peer's registered memory a one-sided operation may target: `addr` is in
/// the peer device's address space, `rkey` its remote key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RemoteRegion {
    /// Start address in the remote device's address space.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// Remote key.
    pub rkey: u32,
}

impl RemoteRegion {
    /// Encoded size on the wire.
    pub const WIRE_LEN: usize = 20;

    /// Encode as 20 little-endian bytes (addr, len, rkey).
    pub fn to_bytes(&self) -> [u8; Self::WIRE_LEN] {
        let mut out = [0u8; Self::WIRE_LEN];
        out[..8].copy_from_slice(&self.addr.to_le_bytes());
        out[8..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..].copy_from_slice(&self.rkey.to_le_bytes());
        out
    }

    /// Decode what [`RemoteRegion::to_bytes`] wrote; `None` if `b` is too short
    /// or the range wraps around the address space.
    pub fn from_bytes(b: &[u8]) -> Option<RemoteRegion> {
        let b = b.get(..Self::WIRE_LEN)?;
        let r = RemoteRegion {
            addr: u64::from_le_bytes(b[..8].try_into().ok()?),
            len: u64::from_le_bytes(b[8..16].try_into().ok()?),
            rkey: u32::from_le_bytes(b[16..].try_into().ok()?),
        };
        r.addr.checked_add(r.len)?;
        Some(r)
    }

    /// The sub-range `[offset, offset + len)`, or `None` if it does not fit.
    pub fn slice(&self, offset: u64, len: u64) -> Option<RemoteRegion> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then(|| RemoteRegion {
            addr: self.addr + offset,
            len,
            rkey: self.rkey,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_region_round_trips_and_rejects_short_or_wrapping() {
        let r = RemoteRegion {
            addr: 0x1234_5678_9abc,
            len: 4096,
            rkey: 77,
        };
        assert_eq!(RemoteRegion::from_bytes(&r.to_bytes()), Some(r));
        assert_eq!(RemoteRegion::from_bytes(&r.to_bytes()[..19]), None);
        let wrap = RemoteRegion {
            addr: u64::MAX - 1,
            len: 4,
            rkey: 1,
        };
        assert_eq!(RemoteRegion::from_bytes(&wrap.to_bytes()), None);
        assert_eq!(r.slice(4000, 96).unwrap().addr, r.addr + 4000);
        assert!(r.slice(4000, 97).is_none());
    }

    #[test]
    fn flags_compose() {
        let f = SendFlags::SIGNALED | SendFlags::INLINE;
        assert!(f.contains(SendFlags::SIGNALED));
        assert!(!f.contains(SendFlags::FENCE));
        let a = Access::LOCAL_WRITE | Access::REMOTE_READ;
        assert!(a.contains(Access::REMOTE_READ) && a.is_remote());
        assert!(!Access::LOCAL_WRITE.is_remote());
    }
}
