//! The connection state machine, free of I/O and clocks.
//!
//! Inputs: work completions ([`Connection::on_completion`]), timer ticks
//! ([`Connection::on_tick`], with the time passed in), and application calls
//! ([`Connection::send`], [`Connection::close`], [`Connection::write`],
//! [`Connection::read`]). Outputs: work requests to post
//! ([`Connection::transmit`]), received messages in order
//! ([`Connection::poll_message`]) and events ([`Connection::poll_event`]).
//! The same core runs on every transport and under the deterministic
//! simulation in the tests.
//!
//! # Flow control
//! Each side keeps `recv_slots + reserve` receives posted and announces that
//! number in `Hello`. A sender holds one credit per receive slot the peer has
//! posted and reported; every header carries the credits its sender returns
//! (slots reposted since its last report). Data (eager and rendezvous
//! requests) is sent only while more than `reserve` credits remain; control
//! messages (credit returns, rendezvous releases, close, heartbeats) may use
//! the reserve, so two sides out of data credits still make progress. A
//! receiver that holds received messages holds their slots: at most
//! `recv_slots` messages can be held per connection, and then the sender
//! waits (back-pressure), while control traffic still flows.
//!
//! # Ordering
//! Messages are delivered in the order they were sent, across eager and
//! rendezvous: a rendezvous message's successors wait until its data is read.
//!
//! # Small messages and signaling
//! A message whose header and payload fit the queue pair's inline limit (and
//! 256 bytes) is copied next to its header and sent inline as one
//! SGE, counted as an inline copy; nothing of the application's stays
//! referenced. [`Connection::send_now`] builds such a request at once when
//! nothing is queued before it, with the header in the SEND's immediate
//! data instead of before the payload (the payload alone must then fit the
//! inline limit; see [`wire`]). A request is signaled every
//! [`ProtoConfig::signal_every`] requests, at half the send queue, and at the
//! end of any batch that holds application memory (zero-copy eager chunks),
//! closes, or carries a tracked send ([`Connection::send_tracked`]); the
//! others are retired by the next signaled completion, so an untracked small
//! message's `Sent` event may come later than its delivery.
//!
//! # Outcomes
//! Each send ends `Delivered` (eager: the peer's device acknowledged the
//! SEND into a posted receive; rendezvous: the peer read the data and
//! released it), `Failed` (known not delivered: never posted, or refused by
//! the peer with an access/length error), or `Unknown` (the connection died
//! after the request was posted, so the data may have reached the peer).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};

use super::wire::{self, Header, Kind, WireError, HDR, MAGIC, VERSION};
use crate::mem::{Arena, ArenaConfig, Exposure, HugePages, Pd, SlotMut, UnregisteredPolicy};
use crate::sge::{RwPlan, Sge};
use crate::stats::{CopyReason, CopyShard};
use crate::verbs::{Opcode, RemoteRegion, SendFlags, WcStatus, WorkCompletion, WorkRequest};

/// Protocol settings of one connection.
#[derive(Clone, Debug)]
pub struct ProtoConfig {
    /// Receive slots for data messages (the credits the peer gets).
    pub recv_slots: u32,
    /// Extra receive slots reserved for control messages.
    pub reserve: u32,
    /// Bytes per receive slot; messages up to `slot_size - 24` go eager.
    pub slot_size: usize,
    /// Largest message accepted (rendezvous above the eager limit).
    pub max_message: u64,
    /// Send a heartbeat after this long without sending anything.
    pub heartbeat_interval: Duration,
    /// Declare the peer dead after this long without receiving anything.
    pub heartbeat_timeout: Duration,
    /// Request a completion at least every this many send-queue requests.
    pub signal_every: u32,
    /// Return credits explicitly once this many are owed.
    pub credit_batch: u32,
    /// What to do with payload chunks outside registered memory.
    pub policy: UnregisteredPolicy,
    /// In-process fast path: when the peer is in this process, hand
    /// single-chunk messages over as the sender's own `Bytes` (counted as
    /// `handoff`, not copied by the device).
    pub handoff: bool,
    /// Pack small messages queued back to back (each small enough to be
    /// copied inline) into one SEND, up to [`ProtoConfig::bundle_bytes`]: one
    /// work request, one receive slot and one credit for the lot. Nothing
    /// waits to form a bundle; only messages already queued together are
    /// packed. The receiver gets each message as its own zero-copy `Bytes`.
    /// Counted as coalescing copies.
    pub bundle: bool,
    /// Largest bundle, header included (capped by the eager limit).
    pub bundle_bytes: usize,
}

impl Default for ProtoConfig {
    fn default() -> Self {
        ProtoConfig {
            recv_slots: 128,
            reserve: 8,
            slot_size: 8192 + HDR,
            max_message: 1 << 30,
            heartbeat_interval: Duration::from_millis(500),
            heartbeat_timeout: Duration::from_secs(5),
            signal_every: 16,
            credit_batch: 32,
            policy: UnregisteredPolicy::Bounce,
            handoff: false,
            bundle: true,
            bundle_bytes: 2048,
        }
    }
}

/// Limits of the queue pair and device the connection runs on.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Send queue depth.
    pub max_send_wr: u32,
    /// SGEs per send request.
    pub max_send_sge: u32,
    /// SGEs per RDMA READ.
    pub max_sge_rd: u32,
    /// Largest message per request.
    pub max_msg_sz: u32,
    /// Inline limit of the queue pair.
    pub max_inline_data: u32,
}

/// A message: one chunk or a list of chunks (sent vectored, never concatenated).
#[derive(Debug)]
pub enum Msg {
    /// One chunk.
    One(Bytes),
    /// Two chunks, e.g. a header and a body, without a `Vec` to allocate.
    Two([Bytes; 2]),
    /// Several chunks.
    Many(Vec<Bytes>),
}

impl Msg {
    fn chunks(&mut self) -> &mut [Bytes] {
        match self {
            Msg::One(b) => std::slice::from_mut(b),
            Msg::Two(p) => p,
            Msg::Many(v) => v,
        }
    }

    /// The chunks, in order.
    #[inline]
    fn parts(&self) -> &[Bytes] {
        match self {
            Msg::One(b) => std::slice::from_ref(b),
            Msg::Two(p) => p,
            Msg::Many(v) => v,
        }
    }
    /// Total bytes.
    #[inline]
    pub fn len(&self) -> u64 {
        match self {
            Msg::One(b) => b.len() as u64,
            _ => self.parts().iter().map(|b| b.len() as u64).sum(),
        }
    }
    /// True if no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copy the bytes, in order, into `out` (exactly `len()` bytes long).
    #[inline]
    pub(crate) fn copy_to(&self, out: &mut [u8]) {
        match self {
            Msg::One(b) => out.copy_from_slice(b),
            _ => {
                let mut at = 0;
                for c in self.parts() {
                    out[at..at + c.len()].copy_from_slice(c);
                    at += c.len();
                }
            }
        }
    }
}

/// What [`Connection::send_now`] copies into the request: a message's
/// chunks, or a caller's slice (`Endpoint::try_send_slice`).
pub trait Payload {
    /// Total bytes.
    fn payload_len(&self) -> u64;
    /// Copy the bytes, in order, into `out` (exactly `payload_len()` long).
    fn copy_payload(&self, out: &mut [u8]);
    /// The bytes as one slice, if they are one
    /// ([`Connection::send_now_inline`] posts them from there).
    fn contiguous(&self) -> Option<&[u8]>;
}

impl Payload for Msg {
    #[inline]
    fn payload_len(&self) -> u64 {
        self.len()
    }
    #[inline]
    fn copy_payload(&self, out: &mut [u8]) {
        self.copy_to(out)
    }
    #[inline]
    fn contiguous(&self) -> Option<&[u8]> {
        match self.parts() {
            [b] => Some(b),
            _ => None,
        }
    }
}

impl Payload for [u8] {
    #[inline]
    fn payload_len(&self) -> u64 {
        self.len() as u64
    }
    #[inline]
    fn copy_payload(&self, out: &mut [u8]) {
        out.copy_from_slice(self)
    }
    #[inline]
    fn contiguous(&self) -> Option<&[u8]> {
        Some(self)
    }
}

/// A received message that owns its receive slot, from
/// [`Connection::poll_message_owned`] (and `Endpoint::try_recv_slot`): read
/// in place (it derefs to `[u8]`), with no copy and no allocation.
///
/// Then either:
/// - give it back with `Endpoint::recycle`: the slot is posted again as it
///   is, with no atomic operation and no trip through the arena;
/// - keep it with [`Received::into_bytes`] (one allocation, as
///   `Endpoint::try_recv` makes), e.g. to pass it on or send it back;
/// - or drop it: the slot goes home to its arena, as a dropped `Bytes`'s
///   does.
///
/// A message that did not fill a receive slot of its own (one that came
/// with its header in the payload, by rendezvous, or handed over in
/// process) is held as the `Bytes` it already is.
pub struct Received(Held);

enum Held {
    Slot(SlotMut),
    Bytes(Bytes),
}

impl Received {
    /// The message as `Bytes`, without a copy: a slot is frozen (one small
    /// allocation, `Bytes::from_owner`'s); dropping the last clone returns
    /// it to its arena.
    pub fn into_bytes(self) -> Bytes {
        match self.0 {
            Held::Slot(s) => s.freeze(),
            Held::Bytes(b) => b,
        }
    }

    /// True if the message lies in a receive slot of its own (and so
    /// `Endpoint::recycle` reposts it).
    pub fn owns_slot(&self) -> bool {
        matches!(self.0, Held::Slot(_))
    }
}

impl std::ops::Deref for Received {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Held::Slot(s) => s.as_slice(),
            Held::Bytes(b) => b,
        }
    }
}

impl AsRef<[u8]> for Received {
    #[inline]
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("len", &self.len())
            .field("owns_slot", &self.owns_slot())
            .finish()
    }
}

impl From<Received> for Bytes {
    fn from(r: Received) -> Bytes {
        r.into_bytes()
    }
}

impl From<Received> for Msg {
    fn from(r: Received) -> Msg {
        Msg::One(r.into_bytes())
    }
}

/// A message delivered to the application, in order.
enum Delivered {
    /// A whole receive slot holding one message (a compact eager one),
    /// still in the receive table at `pos` (its position is not free until
    /// the message is taken): it becomes `Bytes` when taken as such, or is
    /// copied out and then reposted where it is, without leaving the table
    /// ([`Connection::poll_message_into`]).
    Slot {
        pos: u32,
        len: u32,
    },
    Bytes(Bytes),
}

impl Delivered {
    #[inline]
    fn len(&self) -> usize {
        match self {
            Delivered::Slot { len, .. } => *len as usize,
            Delivered::Bytes(b) => b.len(),
        }
    }
}

impl From<Bytes> for Msg {
    fn from(b: Bytes) -> Msg {
        Msg::One(b)
    }
}

impl From<[Bytes; 2]> for Msg {
    fn from(p: [Bytes; 2]) -> Msg {
        Msg::Two(p)
    }
}

impl From<Vec<Bytes>> for Msg {
    fn from(v: Vec<Bytes>) -> Msg {
        Msg::Many(v)
    }
}

impl From<&'static [u8]> for Msg {
    fn from(b: &'static [u8]) -> Msg {
        Msg::One(Bytes::from_static(b))
    }
}

/// How a send ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// The peer has it.
    Delivered,
    /// Known not delivered.
    Failed,
    /// The connection died after the data may have reached the peer.
    Unknown,
}

/// Why a connection failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    /// A work request completed with an error (the queue pair is in error).
    #[error("work request failed: {0}")]
    Completion(WcStatus),
    /// Nothing heard from the peer for the heartbeat timeout.
    #[error("peer silent for {0:?}: heartbeat timeout")]
    HeartbeatTimeout(Duration),
    /// The peer sent something that is not the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The transport refused a post.
    #[error("post refused: {0}")]
    Post(String),
    /// Closed locally.
    #[error("connection closed")]
    Closed,
}

/// Errors of application calls.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// `close()` was called: no more sends.
    #[error("endpoint closed")]
    Closed,
    /// `close()` was called twice.
    #[error("endpoint already closed")]
    AlreadyClosed,
    /// The message exceeds the connection's limit.
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Message bytes.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// The connection failed.
    #[error("connection failed: {0}")]
    Failed(ConnError),
    /// Building the scatter-gather list failed (e.g. unregistered memory under `Reject`).
    #[error("bad buffer: {0}")]
    Buffer(String),
}

/// What the application learns besides messages (those come from
/// [`Connection::poll_message`]).
#[derive(Debug)]
pub enum Event {
    /// The handshake finished.
    Connected,
    /// A send finished.
    Sent {
        /// The id `send` returned.
        id: u64,
        /// How.
        outcome: Outcome,
    },
    /// A one-sided write or read finished.
    OpDone {
        /// The id `write`/`read` returned.
        id: u64,
        /// Its status.
        status: WcStatus,
        /// For reads: the destination, filled.
        data: Option<SlotMut>,
    },
    /// The peer closed: no more messages will come (end of stream). Every
    /// message it sent before is already in [`Connection::poll_message`]'s queue.
    PeerClosed,
    /// The connection failed; every pending operation has been resolved.
    Failed(ConnError),
}

/// A send-queue request to post; its SGEs are `sges[sge_start..sge_start+sge_count]`
/// of [`Transmit::sges`].
#[derive(Clone, Copy, Debug)]
pub struct SendOp {
    /// Work request id.
    pub wr_id: u64,
    /// Operation.
    pub opcode: Opcode,
    /// Flags.
    pub flags: SendFlags,
    /// First SGE.
    pub sge_start: u32,
    /// SGE count.
    pub sge_count: u32,
    /// Remote address for one-sided operations.
    pub remote_addr: u64,
    /// Remote key for one-sided operations.
    pub rkey: u32,
    /// Immediate data of a `SendWithImm` (0 for the other opcodes).
    pub imm: u32,
}

/// A receive to post.
#[derive(Clone, Copy, Debug)]
pub struct RecvOp {
    /// Work request id.
    pub wr_id: u64,
    /// Where the message lands.
    pub sge: Sge,
}

/// One batch of work for the driver: post `recvs`, then `sends` (one doorbell each).
pub struct Transmit<'a> {
    /// Send-queue requests.
    pub sends: &'a [SendOp],
    /// Receives.
    pub recvs: &'a [RecvOp],
    /// SGEs the sends refer to.
    pub sges: &'a [Sge],
}

impl Transmit<'_> {
    /// True if there is nothing to post.
    pub fn is_empty(&self) -> bool {
        self.sends.is_empty() && self.recvs.is_empty()
    }
}

/// One inline SEND built by [`Connection::send_now`], to post at once.
#[derive(Clone, Copy, Debug)]
pub struct SendNow {
    /// The message's id (as [`Connection::send`] returns).
    pub id: u64,
    /// Work request id.
    pub wr_id: u64,
    /// Flags (inline; signaled as the signaling policy says).
    pub flags: SendFlags,
    /// The one SGE: the payload (and, without `imm`, the header before it)
    /// in the connection's staging slot.
    pub sge: Sge,
    /// A compact header (see [`wire`]): post a SEND_WITH_IMM
    /// carrying it. `None`: a plain SEND whose payload starts with the header.
    pub imm: Option<u32>,
}

/// One small message [`Connection::send_now_inline`] accounted for: post
/// its bytes at once with `QueuePair::post_inline` (a SEND_WITH_IMM
/// carrying the compact header `imm`), no copy before the device's.
#[derive(Clone, Copy, Debug)]
pub struct InlineNow {
    /// The message's id (as [`Connection::send`] returns).
    pub id: u64,
    /// Work request id.
    pub wr_id: u64,
    /// Flags (inline; signaled as the signaling policy says).
    pub flags: SendFlags,
    /// The compact header (see [`wire`]).
    pub imm: u32,
}

impl SendNow {
    /// The work request to post (its SGE list is `sge`, one entry).
    pub fn work_request<'a>(&self, sge: &'a [Sge; 1]) -> WorkRequest<'a> {
        let wr = WorkRequest::send(self.wr_id, sge).with_flags(self.flags);
        match self.imm {
            Some(imm) => WorkRequest {
                opcode: Opcode::SendWithImm,
                ..wr.with_imm(imm)
            },
            None => wr,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Handshake,
    Open,
    Failed,
}

enum Inflight {
    Eager {
        id: u64,
        /// Sent with `send_tracked` (or `send_now(.., true, ..)`).
        track: bool,
        _msg: Msg,
        hdr: Option<SlotMut>,
    },
    /// Messages [`Connection::send_now`] copied into their requests
    /// (inline): nothing of them is held, so retiring them drops nothing.
    /// A run of `n` requests ending at the entry's `wr_id`, one message
    /// each, ids `id..id + n` (untracked ones coalesce; a tracked one is a
    /// run of one).
    Inline {
        id: u64,
        n: u32,
        track: bool,
    },
    Rts {
        _hdr: SlotMut,
    },
    /// `n` messages in one SEND; their ids wait in `bundle_ids`.
    Bundle {
        buf: SlotMut,
        n: u32,
    },
    Control {
        hdr: Option<SlotMut>,
        kind: Kind,
    },
    Read {
        seq: u32,
        last: bool,
    },
    Op {
        id: u64,
        last: bool,
        _owners: Option<Msg>,
        dest: Option<SlotMut>,
    },
}

enum Out {
    /// `track`: the sender waits for this message's outcome, so its request
    /// is signaled even when it holds nothing of the application's.
    Data {
        id: u64,
        msg: Msg,
        track: bool,
    },
    Close,
}

struct RdvOut {
    id: u64,
    seq: u32,
    _exposures: Vec<Exposure>,
    _msg: Msg,
}

enum Incoming {
    Ready(Bytes),
    Reading {
        seq: u32,
        dest: Option<SlotMut>,
        len: usize,
    },
    Eos,
}

struct ReadJob {
    seq: u32,
    regions: Vec<RemoteRegion>,
    len: u64,
}

struct OpJob {
    id: u64,
    opcode: Opcode,
    owners: Option<Msg>,
    dest: Option<SlotMut>,
    remote: RemoteRegion,
}

/// The sans-IO protocol core of one connection.
pub struct Connection {
    cfg: ProtoConfig,
    lim: Limits,
    pd: Pd,
    /// This connection's own copy counters (summed into the protection
    /// domain's by `CopyStats::snapshot`).
    copies: CopyShard,
    state: State,
    // Receive side.
    recv_arena: Arena,
    recv_table: Vec<Option<SlotMut>>,
    free_pos: Vec<u32>,
    /// Receive slots the application gave back
    /// ([`Connection::recycle_recv`]), posted again before any fresh slot
    /// is taken from the arena. Its capacity (the slot count) is reserved
    /// up front, so keeping one never allocates.
    spare: Vec<SlotMut>,
    posted: u32,
    /// A repost is due while fewer than this many receives are posted
    /// ([`repost_below`] of the receive target).
    repost_below: u32,
    initial_posted: bool,
    owed: u32,
    expected_seq: u32,
    incoming: VecDeque<Incoming>,
    reads: VecDeque<ReadJob>,
    rdv_arenas: Vec<Arena>,
    peer_closed: bool,
    // Send side.
    /// Headers of eager and control messages (HDR, or HDR + the 16-byte
    /// handoff announcement): 64-byte slots, so the hot ones share few
    /// cache lines and pages.
    hdr_arena: Arena,
    /// Header slots whose send completed, kept for reuse by this connection
    /// (no round trip through the arena's shared free queue per message).
    hdr_free: Vec<SlotMut>,
    /// Rendezvous headers, which carry the list of exposed regions.
    rts_arena: Arena,
    /// Bundle buffers (made at the first bundle), and the ones whose send
    /// completed, kept for reuse.
    bundle_arena: Option<Arena>,
    bundle_free: Vec<SlotMut>,
    /// Ids of the messages of bundles in flight, in posting order.
    bundle_ids: VecDeque<(u64, bool)>,
    /// Report `Delivered` for untracked eager and bundled messages too.
    report_untracked: bool,
    /// Messages sent in bundles so far.
    bundled: u64,
    peer_credits: i64,
    hello_seen: bool,
    next_seq: u32,
    next_id: u64,
    next_wr: u64,
    ctrl: VecDeque<(Kind, u32)>,
    data: VecDeque<Out>,
    ops: VecDeque<OpJob>,
    inflight: VecDeque<(u64, Inflight)>,
    sq_used: u32,
    since_signal: u32,
    /// Header + payload up to this many bytes go inline, copied into the
    /// header slot (one SGE; the message's chunks are released at once).
    inline_copy: usize,
    /// Something in this batch holds memory the application may be waiting
    /// for, or awaits its outcome: signal the batch's last request.
    signal_batch: bool,
    /// The staging slot of [`Connection::send_now`]: reused by every inline
    /// request it builds, since the device copies inline data at post time.
    stage: Option<SlotMut>,
    rdv_out: VecDeque<RdvOut>,
    local_closed: bool,
    close_posted: bool,
    // Output.
    sends: Vec<SendOp>,
    recvs: Vec<RecvOp>,
    sges: Vec<Sge>,
    events: VecDeque<Event>,
    /// Messages delivered in order, zero-copy, for the application.
    messages: VecDeque<Delivered>,
    delivered: u64,
    last_sent: Instant,
    last_recv: Instant,
    /// A receive completed since the last tick (which then sets `last_recv`).
    recv_seen: bool,
    plan: RwPlan,
    scratch: Vec<Sge>,
    /// Where a received bundle's messages lie (offset, length).
    scratch_offsets: Vec<(usize, usize)>,
    /// The region table the SGE builder keeps between messages.
    sge_table: Option<crate::mem::CachedTable>,
    regions: Vec<RemoteRegion>,
    handoff_in: Option<Arc<super::handoff::Channel>>,
    handoff_out: Option<Arc<super::handoff::Channel>>,
}

const MAX_RDV_ARENAS: usize = 64;

/// Smallest eager or control header slot: the header and the handoff
/// announcement fit. Slots grow to the queue pair's inline limit (up to
/// [`MAX_INLINE_COPY`]) so a small message's payload can sit next to its header.
const HDR_SLOT: usize = 64;
const _: () = assert!(HDR + 16 <= HDR_SLOT);

/// Largest header + payload copied into a header slot for an inline send.
const MAX_INLINE_COPY: usize = 256;

/// Rendezvous headers in flight at most (more wait for a free one).
const RTS_SLOTS: usize = 64;

/// Bundles in flight at most (more messages go one by one meanwhile).
const BUNDLE_SLOTS: usize = 16;

/// Receives reposted per post list while the receive queue is over half full.
const REPOST_BATCH: u32 = 8;

/// With `target` receives to keep posted (at least 1), a repost is due
/// while fewer than this many are: while a whole batch of
/// [`REPOST_BATCH`] is free, or at most half are posted. (One compare on
/// every idle poll instead of the three the rule reads as.)
fn repost_below(target: u32) -> u32 {
    target.saturating_sub(REPOST_BATCH).max(target / 2) + 1
}

impl Connection {
    /// A connection over a queue pair with limits `lim`, its memory from `pd`.
    /// The handshake is queued at once.
    pub fn new(
        pd: Pd,
        cfg: ProtoConfig,
        lim: Limits,
        now: Instant,
    ) -> Result<Connection, crate::error::MemError> {
        let slots = (cfg.recv_slots + cfg.reserve) as usize;
        if cfg.slot_size <= 2 * HDR || cfg.recv_slots == 0 || cfg.reserve < 2 {
            return Err(crate::error::MemError::Config(
                "slot_size must exceed 48 bytes, recv_slots > 0, reserve >= 2".into(),
            ));
        }
        let recv_arena = pd.arena(ArenaConfig {
            huge_pages: HugePages::Never,
            ..ArenaConfig::new(cfg.slot_size, slots)
        })?;
        let hdr_slots = lim.max_send_wr as usize + 2;
        let inline_copy = (lim.max_inline_data as usize).min(MAX_INLINE_COPY);
        let hdr_slot = inline_copy.next_multiple_of(HDR_SLOT).max(HDR_SLOT);
        let hdr_arena = pd.arena(ArenaConfig {
            huge_pages: HugePages::Never,
            ..ArenaConfig::new(hdr_slot, hdr_slots)
        })?;
        let rts_arena = pd.arena(ArenaConfig {
            huge_pages: HugePages::Never,
            ..ArenaConfig::new(64 + wire::HDR + 4096, hdr_slots.min(RTS_SLOTS))
        })?;
        let mut c = Connection {
            recv_table: (0..slots).map(|_| None).collect(),
            free_pos: (0..slots as u32).rev().collect(),
            spare: Vec::with_capacity(slots),
            cfg,
            lim,
            copies: pd.stats_handle().shard(),
            pd,
            state: State::Handshake,
            recv_arena,
            posted: 0,
            repost_below: repost_below(slots as u32),
            initial_posted: false,
            owed: 0,
            expected_seq: 0,
            incoming: VecDeque::with_capacity(slots),
            reads: VecDeque::new(),
            rdv_arenas: Vec::new(),
            peer_closed: false,
            hdr_arena,
            hdr_free: Vec::with_capacity(hdr_slots),
            rts_arena,
            bundle_arena: None,
            bundle_free: Vec::with_capacity(BUNDLE_SLOTS),
            bundle_ids: VecDeque::with_capacity(BUNDLE_SLOTS * wire::MAX_BUNDLE as usize),
            report_untracked: true,
            bundled: 0,
            peer_credits: 0,
            hello_seen: false,
            next_seq: 0,
            next_id: 1,
            next_wr: 1,
            ctrl: VecDeque::with_capacity(64),
            data: VecDeque::with_capacity(256),
            ops: VecDeque::new(),
            inflight: VecDeque::with_capacity(hdr_slots),
            sq_used: 0,
            since_signal: 0,
            inline_copy,
            signal_batch: false,
            stage: None,
            rdv_out: VecDeque::new(),
            local_closed: false,
            close_posted: false,
            sends: Vec::with_capacity(hdr_slots),
            recvs: Vec::with_capacity(slots),
            sges: Vec::with_capacity(hdr_slots * 4),
            events: VecDeque::with_capacity(64),
            messages: VecDeque::with_capacity(slots * 4),
            delivered: 0,
            last_sent: now,
            last_recv: now,
            recv_seen: false,
            plan: RwPlan::new(),
            scratch: Vec::with_capacity(32),
            scratch_offsets: Vec::with_capacity(wire::MAX_BUNDLE as usize),
            sge_table: None,
            regions: Vec::new(),
            handoff_in: None,
            handoff_out: None,
        };
        if c.cfg.handoff {
            c.handoff_in = Some(super::handoff::open(slots));
        }
        c.ctrl.push_back((Kind::Hello, 0));
        Ok(c)
    }

    /// Largest eager payload.
    pub fn eager_limit(&self) -> usize {
        self.recv_arena.slot_size() - HDR
    }

    /// Largest message [`Connection::send_now`] sends as one inline
    /// request, its header in the immediate data (while the credits owed
    /// fit the immediate, which they do unless tens of thousands of
    /// receives went unreported).
    pub fn inline_limit(&self) -> usize {
        self.inline_copy.min(self.eager_limit())
    }

    /// True once the peer's handshake arrived.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// True after a failure.
    pub fn is_failed(&self) -> bool {
        self.state == State::Failed
    }

    /// True after the peer closed and everything it sent was delivered.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// True if nothing is queued or in flight (a closed connection is drained).
    pub fn is_idle(&self) -> bool {
        self.data.is_empty()
            && self.ctrl.is_empty()
            && self.ops.is_empty()
            && self.rdv_out.is_empty()
            && self.inflight.is_empty()
    }

    /// True once our close went out and everything before it resolved:
    /// its completion arrived, or, when the peer had closed first, it
    /// failed with every request before it delivered (the peer may leave
    /// as soon as it has our Close, before its acknowledgement reaches us).
    pub fn close_done(&self) -> bool {
        self.close_posted
            && self.rdv_out.is_empty()
            && self.data.is_empty()
            && self
                .inflight
                .iter()
                .all(|(_, f)| !matches!(f, Inflight::Eager { .. } | Inflight::Inline { .. }))
    }

    /// Data credits left (for tests and diagnostics).
    pub fn credits(&self) -> i64 {
        self.peer_credits
    }

    /// Receives currently posted.
    pub fn posted_receives(&self) -> u32 {
        self.posted
    }

    /// With `false`, an untracked message ([`Connection::send`], or
    /// [`Connection::send_now`] without `track`) that is delivered eagerly,
    /// alone or in a bundle, reports no [`Event::Sent`]: a driver that only
    /// acts on tracked outcomes saves an event per message. Failures,
    /// unknown outcomes and rendezvous releases are still reported. On by
    /// default.
    pub fn set_report_untracked(&mut self, on: bool) {
        self.report_untracked = on;
    }

    /// Queue a message; returns its id. It goes eager or by rendezvous by size.
    /// Its [`Event::Sent`] may come late: a small message that went inline
    /// holds nothing of the application's, so its request is signaled only
    /// every [`ProtoConfig::signal_every`] requests. Use
    /// [`Connection::send_tracked`] to have the outcome promptly.
    pub fn send(&mut self, msg: impl Into<Msg>) -> Result<u64, SendError> {
        self.queue_data(msg.into(), false)
    }

    /// [`Connection::send`], with the request signaled so the outcome is
    /// reported as soon as the device completes it.
    pub fn send_tracked(&mut self, msg: impl Into<Msg>) -> Result<u64, SendError> {
        self.queue_data(msg.into(), true)
    }

    /// The fast path of a small message: if it can go right now as one
    /// inline SEND (connection open, nothing queued before it, credit and
    /// send-queue room, the payload within the inline limit, no in-process
    /// handoff), build that request and return it: a SEND_WITH_IMM whose
    /// immediate is the compact header (see [`wire`]), or for
    /// an empty message a SEND with the full header. The driver
    /// must post it before anything else (if the post fails, call
    /// [`Connection::fail`]). Otherwise `Ok(None)`: queue it with
    /// [`Connection::send`]. The payload is copied into the connection's
    /// staging slot (counted as inline), so `msg` may be dropped as soon as
    /// this returns. A message that is one slice and whose header fits the
    /// immediate goes cheaper through [`Connection::send_now_inline`],
    /// which copies nothing itself.
    #[inline]
    pub fn send_now<P: Payload + ?Sized>(
        &mut self,
        msg: &P,
        track: bool,
        now: Instant,
    ) -> Result<Option<SendNow>, SendError> {
        let len = msg.payload_len();
        let Some(compact) = self.goes_now(len)? else {
            return Ok(None);
        };
        let mut stage = match self.stage.take() {
            Some(s) => s,
            None => match self.alloc_hdr() {
                Some(s) => s,
                None => return Ok(None),
            },
        };
        let (sge, imm) = if compact {
            // `fill_inline` without the header, written out: folding the
            // two into one function with an optional header cost ~37
            // instructions per send (callgrind `cost_probe N pp`).
            let credits = self.take_owed();
            let total = len as usize;
            stage.set_len(total);
            msg.copy_payload(stage.as_mut_slice());
            self.copies.add(CopyReason::Inline, total as u64);
            let imm = wire::eager_imm(self.next_seq, credits);
            (stage.sge_filled(), Some(imm))
        } else {
            let hdr = self.eager_header(len);
            (self.fill_inline(&mut stage, &hdr, msg), None)
        };
        self.stage = Some(stage);
        let (id, wr_id, flags) = self.sent_now(track, now);
        Ok(Some(SendNow {
            id,
            wr_id,
            flags,
            sge,
            imm,
        }))
    }

    /// [`Connection::send_now`] of a message that is one slice and goes
    /// with its header in the immediate: nothing is copied here; the
    /// caller posts the returned bytes with `QueuePair::post_inline`, whose
    /// copy into the request is counted as `inline` (as `send_now`'s into
    /// the staging slot is). `Ok(None)`, nothing done, when it cannot:
    /// then try [`Connection::send_now`] (a header in the payload, or
    /// chunks to gather) or [`Connection::send`].
    #[inline]
    pub fn send_now_inline<'m, P: Payload + ?Sized>(
        &mut self,
        msg: &'m P,
        track: bool,
        now: Instant,
    ) -> Result<Option<(InlineNow, &'m [u8])>, SendError> {
        let Some(data) = msg.contiguous() else {
            return Ok(None);
        };
        if self.goes_now(data.len() as u64)? != Some(true) {
            return Ok(None);
        }
        let credits = self.take_owed();
        let imm = wire::eager_imm(self.next_seq, credits);
        self.copies.add(CopyReason::Inline, data.len() as u64);
        let (id, wr_id, flags) = self.sent_now(track, now);
        Ok(Some((
            InlineNow {
                id,
                wr_id,
                flags,
                imm,
            },
            data,
        )))
    }

    /// Whether a message of `len` bytes can go at once as one inline
    /// request: `Some(true)` with its header in the immediate (compact),
    /// `Some(false)` with the header before its payload, `None` not now.
    #[inline]
    fn goes_now(&self, len: u64) -> Result<Option<bool>, SendError> {
        if self.local_closed {
            return Err(SendError::Closed);
        }
        // A non-empty message goes with its header in the immediate (a
        // zero-length SGE means 2 GiB to some devices), when the credits
        // owed fit it; then the payload alone must fit inline.
        let compact = len > 0 && self.owed <= u32::from(wire::IMM_MAX_CREDITS);
        let fits = if compact {
            len as usize <= self.inline_copy.min(self.eager_limit())
        } else {
            len as usize + HDR <= self.inline_copy
        };
        if self.state != State::Open
            || !fits
            || !self.data.is_empty()
            || !self.ctrl.is_empty()
            || self.handoff_out.is_some()
            || !self.sq_room()
            || self.peer_credits <= i64::from(self.cfg.reserve)
        {
            return Ok(None);
        }
        Ok(Some(compact))
    }

    /// The bookkeeping of a message sent at once (`track`: its outcome is
    /// reported): its id, its request's id and flags.
    #[inline]
    fn sent_now(&mut self, track: bool, now: Instant) -> (u64, u64, SendFlags) {
        let id = self.next_id;
        self.next_id += 1;
        let wr_id = self.next_wr;
        self.next_wr += 1;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.peer_credits -= 1;
        self.last_sent = now;
        let flags = self.next_signal(track) | SendFlags::INLINE;
        self.add_inline(wr_id, id, track);
        (id, wr_id, flags)
    }

    /// The header of the next eager message, `len` bytes, with the credits owed.
    fn eager_header(&mut self, len: u64) -> Header {
        Header {
            kind: Kind::Eager,
            flags: 0,
            credits: self.take_owed(),
            seq: self.next_seq,
            len,
            aux: 0,
        }
    }

    /// Header and payload into `slot` for an inline SEND (counted as an
    /// inline copy); returns its SGE.
    fn fill_inline<P: Payload + ?Sized>(
        &mut self,
        slot: &mut SlotMut,
        hdr: &Header,
        msg: &P,
    ) -> Sge {
        // The caller checked that header and payload fit `inline_copy`,
        // which the header slots are sized to: plain slice copies.
        let total = HDR + msg.payload_len() as usize;
        slot.set_len(total);
        let buf = slot.as_mut_slice();
        hdr.encode(&mut buf[..HDR]);
        msg.copy_payload(&mut buf[HDR..]);
        self.copies.add(CopyReason::Inline, total as u64);
        slot.sge_filled()
    }

    fn queue_data(&mut self, msg: Msg, track: bool) -> Result<u64, SendError> {
        if self.local_closed {
            return Err(SendError::Closed);
        }
        if let State::Failed = self.state {
            return Err(SendError::Failed(ConnError::Closed));
        }
        let len = msg.len();
        if len > self.cfg.max_message {
            return Err(SendError::TooLarge {
                len,
                max: self.cfg.max_message,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.data.push_back(Out::Data { id, msg, track });
        Ok(id)
    }

    /// Queue a one-sided RDMA WRITE of `chunks` into `remote` (lengths must match).
    pub fn write(
        &mut self,
        chunks: impl Into<Msg>,
        remote: RemoteRegion,
    ) -> Result<u64, SendError> {
        let msg = chunks.into();
        if msg.len() != remote.len {
            return Err(SendError::Buffer(format!(
                "{} bytes for a {}-byte remote region",
                msg.len(),
                remote.len
            )));
        }
        self.push_op(Opcode::RdmaWrite, Some(msg), None, remote)
    }

    /// Queue a one-sided RDMA READ of `remote` into `dest` (its first `remote.len` bytes).
    pub fn read(&mut self, remote: RemoteRegion, dest: SlotMut) -> Result<u64, SendError> {
        if remote.len > dest.capacity() as u64 {
            return Err(SendError::Buffer(format!(
                "{}-byte read into a {}-byte slot",
                remote.len,
                dest.capacity()
            )));
        }
        self.push_op(Opcode::RdmaRead, None, Some(dest), remote)
    }

    fn push_op(
        &mut self,
        opcode: Opcode,
        owners: Option<Msg>,
        dest: Option<SlotMut>,
        remote: RemoteRegion,
    ) -> Result<u64, SendError> {
        if self.state == State::Failed {
            return Err(SendError::Failed(ConnError::Closed));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.ops.push_back(OpJob {
            id,
            opcode,
            owners,
            dest,
            remote,
        });
        Ok(id)
    }

    /// Graceful close: everything queued before goes first, then the peer sees end-of-stream.
    pub fn close(&mut self) -> Result<(), SendError> {
        if self.local_closed {
            return Err(SendError::AlreadyClosed);
        }
        self.local_closed = true;
        self.data.push_back(Out::Close);
        Ok(())
    }

    /// Next event for the application.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// True if [`Connection::poll_event`] has an event to return.
    #[inline]
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Next received message, in the order the peer sent them. Zero-copy:
    /// it points into a registered receive slot (or is the sender's own
    /// `Bytes` with the in-process handoff); dropping it returns the slot.
    #[inline]
    pub fn poll_message(&mut self) -> Option<Bytes> {
        self.messages.pop_front().map(|d| match d {
            Delivered::Slot { pos, .. } => self.take_recv_slot(pos).freeze(),
            Delivered::Bytes(b) => b,
        })
    }

    /// Next received message, in order, owning its receive slot (see
    /// [`Received`]): no copy, and no allocation for a message that filled
    /// a slot of its own.
    #[inline]
    pub fn poll_message_owned(&mut self) -> Option<Received> {
        self.messages.pop_front().map(|d| match d {
            Delivered::Slot { pos, .. } => Received(Held::Slot(self.take_recv_slot(pos))),
            Delivered::Bytes(b) => Received(Held::Bytes(b)),
        })
    }

    /// Take back a message [`Connection::poll_message_owned`] returned:
    /// its slot is posted again as it is, before any fresh one. A slot of
    /// another connection's arena (or one over the slot count kept) goes
    /// home to its arena instead, and a message held as `Bytes` is dropped.
    #[inline]
    pub fn recycle_recv(&mut self, msg: Received) {
        if let Held::Slot(mut s) = msg.0 {
            if s.is_of(&self.recv_arena) && self.spare.len() < self.spare.capacity() {
                s.set_len(0);
                self.spare.push(s);
            }
        }
    }

    /// Receive slots given back with [`Connection::recycle_recv`] and not
    /// posted again yet.
    pub fn spare_slots(&self) -> usize {
        self.spare.len()
    }

    /// Take the slot of a delivered message out of the receive table; its
    /// position is free for a fresh slot.
    #[inline]
    fn take_recv_slot(&mut self, pos: u32) -> SlotMut {
        self.free_pos.push(pos);
        // A delivered message's slot stays in the table until it is taken
        // (nothing else empties a position that is not free).
        self.recv_table[pos as usize]
            .take()
            .expect("a delivered message's receive slot is in the table")
    }

    /// The next delivered message copied into `buf`: `Ok(Some(len))`,
    /// `Ok(None)` if none is waiting, or `Err(len)` if it does not fit
    /// (it stays first in line). A message that filled a receive slot of
    /// its own goes back to the receive queue at once, without becoming
    /// `Bytes` (no allocation); counted as `copy_out`.
    pub fn poll_message_into(&mut self, buf: &mut [u8]) -> Result<Option<usize>, usize> {
        let Some(len) = self.messages.front().map(Delivered::len) else {
            return Ok(None);
        };
        let Some(out) = buf.get_mut(..len) else {
            return Err(len);
        };
        match self.messages.pop_front() {
            Some(Delivered::Slot { pos, .. }) => {
                // Copied out where it lies; the slot stays in the table and
                // its position is free: the next repost posts it again.
                if let Some(s) = &mut self.recv_table[pos as usize] {
                    out.copy_from_slice(s.as_slice());
                    s.set_len(0);
                }
                self.free_pos.push(pos);
            }
            Some(Delivered::Bytes(b)) => out.copy_from_slice(&b),
            None => {}
        }
        self.copies.add(CopyReason::CopyOut, len as u64);
        Ok(Some(len))
    }

    /// Messages this side sent packed in bundles so far (see
    /// [`ProtoConfig::bundle`]).
    pub fn bundled_count(&self) -> u64 {
        self.bundled
    }

    /// Messages waiting in [`Connection::poll_message`]'s queue.
    #[inline]
    pub fn messages_ready(&self) -> usize {
        self.messages.len()
    }

    /// Messages delivered so far (taken or not).
    pub fn delivered_count(&self) -> u64 {
        self.delivered
    }

    /// Timer input.
    pub fn on_tick(&mut self, now: Instant) {
        if self.state == State::Failed {
            return;
        }
        // Receives are timed here, at tick granularity, so completion
        // handling needs no clock (the liveness timeout is hundreds of ms).
        if self.recv_seen {
            self.recv_seen = false;
            self.last_recv = now;
        }
        if now.saturating_duration_since(self.last_recv) > self.cfg.heartbeat_timeout {
            self.fail(
                ConnError::HeartbeatTimeout(self.cfg.heartbeat_timeout),
                Outcome::Unknown,
            );
            return;
        }
        if self.state == State::Open
            && now.saturating_duration_since(self.last_sent) >= self.cfg.heartbeat_interval
            && self.ctrl.is_empty()
        {
            self.ctrl.push_back((Kind::Heartbeat, 0));
        }
        // Idle: return what we owe even below the batch size.
        if self.owed > 0
            && self.ctrl.is_empty()
            && self.data.is_empty()
            && now.saturating_duration_since(self.last_sent) >= self.cfg.heartbeat_interval / 8
        {
            self.ctrl.push_back((Kind::Credit, 0));
        }
    }

    /// Completion input (it needs no clock: a receive counts for liveness
    /// at the next [`Connection::on_tick`]).
    #[inline]
    pub fn on_completion(&mut self, wc: &WorkCompletion) {
        if self.is_recv_id(wc.wr_id) {
            self.on_recv(wc);
        } else {
            self.on_send_completion(wc);
        }
    }

    fn is_recv_id(&self, wr_id: u64) -> bool {
        wr_id & RECV_BIT != 0
    }

    fn on_send_completion(&mut self, wc: &WorkCompletion) {
        if wc.status != WcStatus::Success {
            // Retire what completed before it, then fail.
            self.retire_through(wc.wr_id.wrapping_sub(1));
            // Our Close failed after the peer's: everything before it was
            // delivered (a request fails only after all before it
            // completed; no rendezvous payload still waits for the peer's
            // READ), and the peer, having closed, tore its queue pair
            // down before acknowledging ours (or the ACK was lost on the
            // way and the retries found nobody). Nothing was lost: the
            // close is done, and the connection ends failed all the same.
            if self.peer_closed
                && self.rdv_out.is_empty()
                && matches!(
                    self.inflight.front(),
                    Some((id, Inflight::Control { kind: Kind::Close, .. })) if *id == wc.wr_id
                )
            {
                self.close_posted = true;
            }
            let outcome = match wc.status {
                WcStatus::RemAccessErr
                | WcStatus::RemInvReqErr
                | WcStatus::LocLenErr
                | WcStatus::LocProtErr => Outcome::Failed,
                _ => Outcome::Unknown,
            };
            self.fail(ConnError::Completion(wc.status), outcome);
            return;
        }
        self.retire_through(wc.wr_id);
    }

    fn retire_through(&mut self, wr_id: u64) {
        while let Some((last, f)) = self.inflight.front_mut() {
            if *last > wr_id {
                // A run of inline requests may begin at or before `wr_id`
                // (a signaled request in its middle): retire its head.
                if let Inflight::Inline { id, n, track } = f {
                    let first = *last - u64::from(*n) + 1;
                    if first <= wr_id {
                        let k = (wr_id - first + 1) as u32;
                        let (head, track) = (*id, *track);
                        *id += u64::from(k);
                        *n -= k;
                        self.sq_used -= k;
                        self.report_inline(head, k, track, Outcome::Delivered);
                    }
                }
                break;
            }
            // The common entry first, apart: it holds nothing to drop.
            if let Inflight::Inline { id, n, track } = *f {
                // Forgotten: nothing to drop, so no call of the drop glue
                // (~27 instructions per entry, callgrind `cost_probe N pp`).
                if let Some(e) = self.inflight.pop_front() {
                    std::mem::forget(e);
                }
                self.sq_used -= n;
                self.report_inline(id, n, track, Outcome::Delivered);
                continue;
            }
            let Some((_, f)) = self.inflight.pop_front() else {
                break;
            };
            self.sq_used -= 1;
            match f {
                Inflight::Eager { id, track, hdr, .. } => {
                    self.recycle_hdr(hdr);
                    self.report_sent(id, track, Outcome::Delivered);
                }
                // (Inline entries were retired above.)
                Inflight::Inline { .. } | Inflight::Rts { .. } => {}
                Inflight::Bundle { mut buf, n } => {
                    buf.set_len(0);
                    self.bundle_free.push(buf);
                    self.bundle_outcomes(n, Outcome::Delivered);
                }
                Inflight::Control { kind, hdr } => {
                    self.recycle_hdr(hdr);
                    if kind == Kind::Close {
                        self.close_posted = true;
                    }
                }
                Inflight::Read { seq, last } => {
                    if last {
                        self.finish_read(seq);
                    }
                }
                Inflight::Op {
                    id, last, mut dest, ..
                } => {
                    if last {
                        self.events.push_back(Event::OpDone {
                            id,
                            status: WcStatus::Success,
                            data: dest.take(),
                        });
                    }
                }
            }
        }
    }

    /// Report the oldest bundle in flight, of `n` messages.
    fn bundle_outcomes(&mut self, n: u32, outcome: Outcome) {
        for _ in 0..n {
            if let Some((id, track)) = self.bundle_ids.pop_front() {
                self.report_sent(id, track, outcome);
            }
        }
    }

    /// The outcomes of a run of `n` inline messages, ids `id..id + n`.
    #[inline]
    fn report_inline(&mut self, id: u64, n: u32, track: bool, outcome: Outcome) {
        if track || self.report_untracked || outcome != Outcome::Delivered {
            for i in 0..u64::from(n) {
                self.events.push_back(Event::Sent {
                    id: id + i,
                    outcome,
                });
            }
        }
    }

    /// A message's outcome as a `Sent` event, unless it is an untracked
    /// delivery and those go unreported ([`Connection::set_report_untracked`]).
    fn report_sent(&mut self, id: u64, track: bool, outcome: Outcome) {
        if track || self.report_untracked || outcome != Outcome::Delivered {
            self.events.push_back(Event::Sent { id, outcome });
        }
    }

    fn finish_read(&mut self, seq: u32) {
        for e in self.incoming.iter_mut() {
            if let Incoming::Reading { seq: s, dest, len } = e {
                if *s == seq {
                    if let Some(mut d) = dest.take() {
                        d.set_len(*len);
                        *e = Incoming::Ready(d.freeze());
                    }
                    break;
                }
            }
        }
        self.ctrl.push_back((Kind::Done, seq));
        self.deliver();
    }

    fn deliver(&mut self) {
        while let Some(front) = self.incoming.front() {
            match front {
                Incoming::Reading { .. } => break,
                Incoming::Ready(_) | Incoming::Eos => {}
            }
            match self.incoming.pop_front() {
                Some(Incoming::Ready(b)) => self.push_message(Delivered::Bytes(b)),
                Some(Incoming::Eos) => {
                    self.peer_closed = true;
                    self.events.push_back(Event::PeerClosed);
                }
                _ => {}
            }
        }
    }

    fn push_message(&mut self, d: Delivered) {
        self.delivered += 1;
        self.messages.push_back(d);
    }

    /// A message that is complete on arrival: straight to the application
    /// unless a rendezvous before it is still being read.
    fn arrived(&mut self, b: Bytes) {
        if self.incoming.is_empty() {
            self.push_message(Delivered::Bytes(b));
        } else {
            self.incoming.push_back(Incoming::Ready(b));
            self.deliver();
        }
    }

    fn on_recv(&mut self, wc: &WorkCompletion) {
        let pos = (wc.wr_id & !RECV_BIT) as usize;
        let Some(slot) = self.recv_table.get_mut(pos).and_then(Option::as_mut) else {
            return;
        };
        self.posted = self.posted.saturating_sub(1);
        if wc.status != WcStatus::Success {
            // Keep flushed slots out of circulation; the connection is over.
            drop(self.take_recv_slot(pos as u32));
            self.fail(ConnError::Completion(wc.status), Outcome::Unknown);
            return;
        }
        self.recv_seen = true;
        slot.set_len((wc.byte_len as usize).min(slot.capacity()));
        if let Some(imm) = wc.imm_data {
            // Delivered from where it lies (see `Delivered::Slot`).
            return self.on_compact_eager(pos as u32, imm);
        }
        let slot = self.take_recv_slot(pos as u32);
        let hdr = match Header::decode(slot.as_slice()) {
            Ok(h) => h,
            Err(e) => return self.protocol_error(e),
        };
        self.peer_credits += i64::from(hdr.credits);
        let payload = slot.len() - HDR;
        match hdr.kind {
            Kind::Hello => {
                let version = (hdr.aux & 0xffff) as u16;
                if hdr.aux & !0xffff != MAGIC {
                    return self.protocol_error(WireError::Handshake(
                        "not a zcmsg peer (bad magic)".into(),
                    ));
                }
                if version != VERSION {
                    return self.protocol_error(WireError::Handshake(format!(
                        "peer speaks version {version}, we speak {VERSION}"
                    )));
                }
                if self.hello_seen {
                    return self.protocol_error(WireError::Handshake("second Hello".into()));
                }
                if hdr.len == 0 || hdr.len > 1 << 20 {
                    return self.protocol_error(WireError::Handshake(format!(
                        "peer offers {} receive slots",
                        hdr.len
                    )));
                }
                self.hello_seen = true;
                self.peer_credits += hdr.len as i64;
                if payload >= 16 && self.cfg.handoff {
                    let p = &slot.as_slice()[HDR..HDR + 16];
                    let nonce = u64::from_le_bytes(p[..8].try_into().unwrap_or([0; 8]));
                    let token = u64::from_le_bytes(p[8..].try_into().unwrap_or([0; 8]));
                    self.handoff_out = super::handoff::find(nonce, token);
                }
                if self.state == State::Handshake {
                    self.state = State::Open;
                    self.events.push_back(Event::Connected);
                }
            }
            _ if !self.hello_seen => {
                self.protocol_error(WireError::Handshake(format!("{:?} before Hello", hdr.kind)));
            }
            Kind::Eager => {
                if hdr.len != payload as u64 {
                    return self.protocol_error(WireError::BadLength {
                        said: hdr.len,
                        got: payload as u64,
                    });
                }
                if !self.check_seq(hdr.seq) {
                    return;
                }
                let b = slot.freeze().slice(HDR..);
                self.arrived(b);
            }
            Kind::Rts => {
                if !self.check_seq(hdr.seq) {
                    return;
                }
                if hdr.len > self.cfg.max_message || hdr.len == 0 {
                    return self
                        .protocol_error(WireError::BadRendezvous(format!("{} bytes", hdr.len)));
                }
                let mut regions = Vec::new();
                if let Err(e) =
                    wire::decode_regions(&slot.as_slice()[HDR..], hdr.aux, hdr.len, &mut regions)
                {
                    return self.protocol_error(e);
                }
                self.incoming.push_back(Incoming::Reading {
                    seq: hdr.seq,
                    dest: None,
                    len: hdr.len as usize,
                });
                self.reads.push_back(ReadJob {
                    seq: hdr.seq,
                    regions,
                    len: hdr.len,
                });
            }
            Kind::Done => match self.rdv_out.front() {
                Some(r) if r.seq == hdr.seq => {
                    if let Some(r) = self.rdv_out.pop_front() {
                        self.events.push_back(Event::Sent {
                            id: r.id,
                            outcome: Outcome::Delivered,
                        });
                    }
                }
                _ => self.protocol_error(WireError::BadRendezvous(format!(
                    "release of unknown message {}",
                    hdr.seq
                ))),
            },
            Kind::Handoff => {
                if !self.check_seq(hdr.seq) {
                    return;
                }
                let got = self.handoff_in.as_ref().and_then(|c| c.pop());
                match got {
                    Some(b) if b.len() as u64 == hdr.len => self.arrived(b),
                    _ => self.protocol_error(WireError::BadLength {
                        said: hdr.len,
                        got: 0,
                    }),
                }
            }
            Kind::Bundle => {
                if hdr.len != payload as u64 {
                    return self.protocol_error(WireError::BadLength {
                        said: hdr.len,
                        got: payload as u64,
                    });
                }
                let b = slot.freeze();
                let mut at = std::mem::take(&mut self.scratch_offsets);
                at.clear();
                let checked = wire::bundle_records(&b[HDR..], hdr.aux, |off, len| {
                    at.push((HDR + off, len));
                });
                match checked {
                    Err(e) => self.protocol_error(e),
                    Ok(()) if self.check_seq(hdr.seq) => {
                        // `check_seq` took the first; the rest follow it.
                        self.expected_seq = self.expected_seq.wrapping_add(at.len() as u32 - 1);
                        for &(off, len) in &at {
                            self.arrived(b.slice(off..off + len));
                        }
                    }
                    Ok(()) => {}
                }
                self.scratch_offsets = at;
            }
            Kind::Credit | Kind::Heartbeat => {}
            Kind::Close => {
                self.incoming.push_back(Incoming::Eos);
                self.deliver();
            }
        }
    }

    /// An eager message whose header came as immediate data: the whole
    /// slot (still in the receive table at `pos`) is the payload.
    fn on_compact_eager(&mut self, pos: u32, imm: u32) {
        let (seq, credits) = match wire::decode_eager_imm(imm) {
            Ok(h) => h,
            Err(e) => {
                drop(self.take_recv_slot(pos));
                return self.protocol_error(e);
            }
        };
        if !self.hello_seen {
            drop(self.take_recv_slot(pos));
            return self.protocol_error(WireError::Handshake("a message before Hello".into()));
        }
        self.peer_credits += i64::from(credits);
        // The low 16 bits travel; the rest is the expected number's.
        if !self.check_seq((self.expected_seq & !0xffff) | u32::from(seq)) {
            drop(self.take_recv_slot(pos));
        } else if self.incoming.is_empty() {
            // Frozen only if taken as `Bytes` (see `Delivered`).
            let len = self.recv_table[pos as usize]
                .as_ref()
                .map_or(0, SlotMut::len);
            self.push_message(Delivered::Slot {
                pos,
                len: len as u32,
            });
        } else {
            let b = self.take_recv_slot(pos).freeze();
            self.arrived(b);
        }
    }

    fn check_seq(&mut self, seq: u32) -> bool {
        if seq != self.expected_seq {
            self.protocol_error(WireError::BadRendezvous(format!(
                "message {seq} out of order, expected {}",
                self.expected_seq
            )));
            return false;
        }
        self.expected_seq = self.expected_seq.wrapping_add(1);
        true
    }

    fn protocol_error(&mut self, e: WireError) {
        tracing::warn!("peer violated the protocol: {e}");
        self.fail(ConnError::Protocol(e.to_string()), Outcome::Unknown);
    }

    /// The connection is over: resolve every pending operation.
    pub fn fail(&mut self, err: ConnError, inflight_outcome: Outcome) {
        if self.state == State::Failed {
            return;
        }
        self.state = State::Failed;
        while let Some((_, f)) = self.inflight.pop_front() {
            match f {
                Inflight::Eager { id, .. } => self.events.push_back(Event::Sent {
                    id,
                    outcome: inflight_outcome,
                }),
                Inflight::Inline { id, n, .. } => {
                    for i in 0..u64::from(n) {
                        self.events.push_back(Event::Sent {
                            id: id + i,
                            outcome: inflight_outcome,
                        });
                    }
                }
                Inflight::Bundle { n, .. } => self.bundle_outcomes(n, inflight_outcome),
                Inflight::Op { id, last: true, .. } => self.events.push_back(Event::OpDone {
                    id,
                    status: WcStatus::WrFlushErr,
                    data: None,
                }),
                _ => {}
            }
        }
        self.sq_used = 0;
        while let Some(r) = self.rdv_out.pop_front() {
            self.events.push_back(Event::Sent {
                id: r.id,
                outcome: Outcome::Unknown,
            });
        }
        while let Some(o) = self.data.pop_front() {
            if let Out::Data { id, .. } = o {
                self.events.push_back(Event::Sent {
                    id,
                    outcome: Outcome::Failed,
                });
            }
        }
        while let Some(op) = self.ops.pop_front() {
            self.events.push_back(Event::OpDone {
                id: op.id,
                status: WcStatus::WrFlushErr,
                data: None,
            });
        }
        self.ctrl.clear();
        self.reads.clear();
        self.events.push_back(Event::Failed(err));
    }

    /// Output: what to post now, receives first. The requests count as posted
    /// when this returns; if the transport refuses them, call
    /// [`Connection::fail`].
    pub fn transmit(&mut self, now: Instant) -> Transmit<'_> {
        self.sends.clear();
        self.recvs.clear();
        self.sges.clear();
        if self.state != State::Failed && !self.nothing_to_post() {
            self.fill_receives();
            self.fill_control(now);
            self.fill_reads();
            self.fill_ops();
            self.fill_data(now);
            if self.owed >= self.cfg.credit_batch && self.peer_credits > 0 && self.sq_room() {
                self.post_control(Kind::Credit, 0, now);
            }
            // Signal the last request of the batch if anything in it holds
            // the application's memory or awaits its outcome, so those come
            // back promptly at low load. A batch of inline sends and control
            // messages holds only header slots: it is retired by the next
            // signaled request (every `signal_every`, or at half the queue).
            if std::mem::take(&mut self.signal_batch) {
                if let Some(last) = self.sends.last_mut() {
                    if !last.flags.contains(SendFlags::SIGNALED) {
                        last.flags |= SendFlags::SIGNALED;
                        self.since_signal = 0;
                    }
                }
            }
        }
        Transmit {
            sends: &self.sends,
            recvs: &self.recvs,
            sges: &self.sges,
        }
    }

    /// True if [`Connection::transmit`] has something to post: callers that
    /// poll in a loop check this first and skip the call when idle.
    #[inline]
    pub fn has_work(&self) -> bool {
        self.state != State::Failed && !self.nothing_to_post()
    }

    /// True if [`Connection::transmit`] would post nothing: the check that
    /// keeps an idle progress call cheap.
    #[inline]
    fn nothing_to_post(&self) -> bool {
        self.data.is_empty()
            && self.ctrl.is_empty()
            && self.ops.is_empty()
            && self.reads.is_empty()
            && !self.repost_due()
            && self.owed < self.cfg.credit_batch
    }

    /// True if receives should be reposted now: at the start, and then in
    /// post lists of REPOST_BATCH while more than half the slots are
    /// posted (one doorbell per batch instead of per message; the peer's
    /// credits only lag by the batch and it still holds at least half of
    /// them), and below half every free slot goes back at once.
    #[inline]
    fn repost_due(&self) -> bool {
        !self.initial_posted || self.posted < self.repost_below
    }

    #[inline]
    fn sq_room(&self) -> bool {
        self.sq_used < self.lim.max_send_wr
    }

    fn fill_receives(&mut self) {
        if !self.repost_due() {
            return;
        }
        let target = self.cfg.recv_slots + self.cfg.reserve;
        while self.posted < target {
            let Some(pos) = self.free_pos.last().copied() else {
                break;
            };
            // A position whose message was copied out still holds its slot.
            let entry = &mut self.recv_table[pos as usize];
            let sge = match entry {
                Some(slot) => slot.sge(),
                None => match self.spare.pop().or_else(|| self.recv_arena.alloc()) {
                    Some(slot) => entry.insert(slot).sge(),
                    None => break,
                },
            };
            self.free_pos.pop();
            self.recvs.push(RecvOp {
                wr_id: RECV_BIT | u64::from(pos),
                sge,
            });
            self.posted += 1;
            if self.initial_posted {
                self.owed += 1;
            }
        }
        self.initial_posted = true;
    }

    /// True if [`Connection::alloc_hdr`] would return a slot.
    fn hdr_available(&self) -> bool {
        !self.hdr_free.is_empty() || self.hdr_arena.free_slots() > 0
    }

    /// A header slot: a recycled one if any, else a fresh one from the arena.
    fn alloc_hdr(&mut self) -> Option<SlotMut> {
        self.hdr_free.pop().or_else(|| self.hdr_arena.alloc())
    }

    /// Keep a header slot whose send completed (the device is done with it).
    fn recycle_hdr(&mut self, hdr: Option<SlotMut>) {
        if let Some(mut h) = hdr {
            h.set_len(0);
            self.hdr_free.push(h);
        }
    }

    #[inline]
    fn take_owed(&mut self) -> u16 {
        let c = self.owed.min(u32::from(u16::MAX));
        self.owed -= c;
        c as u16
    }

    #[inline]
    fn next_signal(&mut self, force: bool) -> SendFlags {
        self.since_signal += 1;
        if force
            || self.since_signal >= self.cfg.signal_every
            || self.sq_used + 1 >= self.lim.max_send_wr / 2
        {
            self.since_signal = 0;
            SendFlags::SIGNALED
        } else {
            SendFlags::NONE
        }
    }

    /// Queue the `i`-th work request of `self.plan` as `opcode` on `rkey`
    /// (the last one of an operation is signaled).
    fn push_plan_wr(&mut self, i: usize, opcode: Opcode, rkey: u32, last: bool, f: Inflight) {
        let sp = self.plan.spans()[i];
        let sge_start = self.sges.len() as u32;
        let range = sp.sge_start as usize..(sp.sge_start + sp.sge_count) as usize;
        self.sges.extend_from_slice(&self.plan.sges()[range]);
        let wr_id = self.next_wr;
        self.next_wr += 1;
        let flags = self.next_signal(last);
        let op = SendOp {
            wr_id,
            opcode,
            flags,
            sge_start,
            sge_count: sp.sge_count,
            remote_addr: sp.remote_addr,
            rkey,
            imm: 0,
        };
        self.push_wr(op, f);
    }

    fn push_wr(&mut self, op: SendOp, f: Inflight) {
        self.sends.push(op);
        self.add_inflight(op.wr_id, f);
    }

    /// Count an inline request of [`Connection::send_now`] (message `id`)
    /// until its completion retires it: an untracked one right after
    /// another (consecutive request and message ids) lengthens that one's
    /// run, so a stream of small sends keeps one entry per signaled
    /// request, not one per message.
    #[inline]
    fn add_inline(&mut self, wr_id: u64, id: u64, track: bool) {
        self.sq_used += 1;
        if !track {
            if let Some((
                last,
                Inflight::Inline {
                    id: first,
                    n,
                    track: false,
                },
            )) = self.inflight.back_mut()
            {
                if *last + 1 == wr_id && *first + u64::from(*n) == id {
                    *last = wr_id;
                    *n += 1;
                    return;
                }
            }
        }
        self.inflight
            .push_back((wr_id, Inflight::Inline { id, n: 1, track }));
    }

    /// Count a posted send-queue request until its completion retires it.
    #[inline]
    fn add_inflight(&mut self, wr_id: u64, f: Inflight) {
        self.inflight.push_back((wr_id, f));
        self.sq_used += 1;
    }

    fn fill_control(&mut self, now: Instant) {
        while let Some(&(kind, seq)) = self.ctrl.front() {
            let allowed = kind == Kind::Hello || self.peer_credits > 0;
            if !allowed || !self.sq_room() {
                break;
            }
            self.ctrl.pop_front();
            self.post_control(kind, seq, now);
        }
    }

    /// A header-only message: inline when the queue pair allows, else from a header slot.
    fn post_control(&mut self, kind: Kind, seq: u32, now: Instant) {
        self.post_header(kind, seq, 0, now);
    }

    /// A header-only message (Hello may carry the 16-byte handoff announcement):
    /// inline when the queue pair allows, else from a header slot.
    fn post_header(&mut self, kind: Kind, seq: u32, len: u64, now: Instant) -> bool {
        let hello = kind == Kind::Hello;
        let hdr = Header {
            kind,
            flags: 0,
            credits: if hello { 0 } else { self.take_owed() },
            seq,
            len: if hello {
                u64::from(self.cfg.recv_slots + self.cfg.reserve)
            } else {
                len
            },
            aux: if hello { MAGIC | u64::from(VERSION) } else { 0 },
        };
        let announce = self
            .handoff_in
            .as_ref()
            .filter(|_| hello)
            .map(|c| (super::handoff::process_nonce(), c.token()));
        let sge_start = self.sges.len() as u32;
        let mut flags = SendFlags::NONE;
        let Some(mut s) = self.alloc_hdr() else {
            if !kind.is_data() {
                self.ctrl.push_front((kind, seq));
            }
            return false;
        };
        s.set_len(HDR);
        hdr.encode(s.as_mut_slice());
        if let Some((nonce, token)) = announce {
            s.put_u64_le(nonce);
            s.put_u64_le(token);
        }
        if s.len() <= self.lim.max_inline_data as usize {
            flags |= SendFlags::INLINE;
            self.copies.add(CopyReason::Inline, s.len() as u64);
        }
        self.sges.push(s.sge_filled());
        flags |= self.next_signal(false);
        self.push_send_one(
            flags,
            sge_start,
            now,
            Inflight::Control { hdr: Some(s), kind },
        );
        true
    }

    /// Queue a one-SGE SEND (its SGE already at `sge_start`) that takes a
    /// credit: the next request id, the credit, the time of the last send.
    fn push_send_one(&mut self, flags: SendFlags, sge_start: u32, now: Instant, f: Inflight) {
        let wr_id = self.next_wr;
        self.next_wr += 1;
        self.peer_credits -= 1;
        self.last_sent = now;
        let op = SendOp {
            wr_id,
            opcode: Opcode::Send,
            flags,
            sge_start,
            sge_count: 1,
            remote_addr: 0,
            rkey: 0,
            imm: 0,
        };
        self.push_wr(op, f);
    }

    fn fill_reads(&mut self) {
        while let Some(job) = self.reads.front() {
            let len = job.len as usize;
            let regions = job.regions.clone();
            // Destination: a registered slot big enough, reused across messages.
            let dest = match self.rdv_dest(len) {
                Some(d) => d,
                None => break,
            };
            // Plan all READs of this message; post only if the send queue has room for all.
            let mut plans: Vec<(RemoteRegion, usize)> = Vec::with_capacity(regions.len());
            let mut off = 0usize;
            for r in &regions {
                plans.push((*r, off));
                off += r.len as usize;
            }
            let mut total_wrs = 0usize;
            for (r, off) in &plans {
                self.scratch.clear();
                self.scratch.push(dest.sge_range(*off, r.len as usize));
                match self
                    .plan
                    .build(&self.scratch, *r, self.lim.max_sge_rd, self.lim.max_msg_sz)
                {
                    Ok(n) => total_wrs += n,
                    Err(e) => {
                        let e = WireError::BadRendezvous(e.to_string());
                        return self.protocol_error(e);
                    }
                }
            }
            if self.sq_used as usize + total_wrs > self.lim.max_send_wr as usize {
                drop(dest);
                break;
            }
            let Some(job) = self.reads.pop_front() else {
                break;
            };
            let mut posted = 0usize;
            for (r, off) in &plans {
                self.scratch.clear();
                self.scratch.push(dest.sge_range(*off, r.len as usize));
                if self
                    .plan
                    .build(&self.scratch, *r, self.lim.max_sge_rd, self.lim.max_msg_sz)
                    .is_err()
                {
                    break;
                }
                for i in 0..self.plan.wr_count() {
                    posted += 1;
                    let last = posted == total_wrs;
                    let f = Inflight::Read { seq: job.seq, last };
                    self.push_plan_wr(i, Opcode::RdmaRead, r.rkey, last, f);
                }
            }
            for e in self.incoming.iter_mut() {
                if let Incoming::Reading { seq, dest: d, .. } = e {
                    if *seq == job.seq {
                        *d = Some(dest);
                        break;
                    }
                }
            }
        }
    }

    fn rdv_dest(&mut self, len: usize) -> Option<SlotMut> {
        let len = len.max(1);
        if let Some(s) = self
            .rdv_arenas
            .iter()
            .filter(|a| a.slot_size() >= len)
            .find_map(|a| a.alloc())
        {
            return Some(s);
        }
        if self.rdv_arenas.len() >= MAX_RDV_ARENAS {
            // Every destination is held by the application: wait for one to come home.
            return None;
        }
        let class = len.next_power_of_two().max(64 << 10);
        let slots = ((32usize << 20) / class).clamp(1, 8);
        match self.pd.arena(ArenaConfig {
            huge_pages: HugePages::Never,
            ..ArenaConfig::new(class, slots)
        }) {
            Ok(a) => {
                let s = a.alloc();
                self.rdv_arenas.push(a);
                s
            }
            Err(e) => {
                tracing::warn!("cannot allocate a {class}-byte rendezvous destination: {e}");
                None
            }
        }
    }

    fn fill_ops(&mut self) {
        while let Some(job) = self.ops.front_mut() {
            self.scratch.clear();
            let built = match (&mut job.owners, &job.dest) {
                (Some(m), _) => self
                    .pd
                    .builder(self.cfg.policy)
                    .list(m.chunks(), &mut self.scratch)
                    .map_err(|e| e.to_string()),
                (None, Some(d)) => {
                    self.scratch.push(d.sge_range(0, job.remote.len as usize));
                    Ok(())
                }
                _ => Err("nothing to transfer".to_string()),
            };
            let max_sge = if job.opcode == Opcode::RdmaRead {
                self.lim.max_sge_rd
            } else {
                self.lim.max_send_sge
            };
            let n = built.and_then(|_| {
                self.plan
                    .build(&self.scratch, job.remote, max_sge, self.lim.max_msg_sz)
                    .map_err(|e| e.to_string())
            });
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    let id = job.id;
                    self.ops.pop_front();
                    tracing::debug!("one-sided operation {id} refused: {e}");
                    self.events.push_back(Event::OpDone {
                        id,
                        status: WcStatus::LocProtErr,
                        data: None,
                    });
                    continue;
                }
            };
            if self.sq_used as usize + n > self.lim.max_send_wr as usize {
                break;
            }
            let Some(mut job) = self.ops.pop_front() else {
                break;
            };
            if n == 0 {
                self.events.push_back(Event::OpDone {
                    id: job.id,
                    status: WcStatus::Success,
                    data: job.dest.take(),
                });
                continue;
            }
            for i in 0..n {
                let last = i + 1 == n;
                let f = if last {
                    Inflight::Op {
                        id: job.id,
                        last,
                        _owners: job.owners.take(),
                        dest: job.dest.take(),
                    }
                } else {
                    Inflight::Op {
                        id: job.id,
                        last,
                        _owners: None,
                        dest: None,
                    }
                };
                self.push_plan_wr(i, job.opcode, job.remote.rkey, last, f);
            }
        }
    }

    fn fill_data(&mut self, now: Instant) {
        if self.state != State::Open {
            return;
        }
        while self.sq_room() && self.peer_credits > i64::from(self.cfg.reserve) {
            let Some(out) = self.data.pop_front() else {
                break;
            };
            match out {
                Out::Close => {
                    // close() waits for this completion.
                    self.signal_batch = true;
                    self.post_control(Kind::Close, 0, now);
                }
                Out::Data { id, mut msg, track } => {
                    let len = msg.len();
                    if let Some(next) = self.next_bundle_len(len) {
                        match self.post_bundle(id, msg, track, next, now) {
                            None => continue,
                            // No bundle buffer free: this one goes alone.
                            Some(m) => msg = m,
                        }
                    }
                    if let Some(ch) = self.handoff_out.clone() {
                        let single = match msg.parts() {
                            [b] => Some(b.clone()),
                            _ => None,
                        };
                        if let Some(b) = single {
                            let seq = self.next_seq;
                            if self.handoff(&ch, b, seq, len, now) {
                                self.next_seq = self.next_seq.wrapping_add(1);
                                self.signal_batch |= track;
                                // The header's completion means delivered.
                                if let Some((_, Inflight::Control { hdr, .. })) =
                                    self.inflight.pop_back()
                                {
                                    self.inflight.push_back((
                                        self.next_wr - 1,
                                        Inflight::Eager {
                                            id,
                                            track,
                                            _msg: Msg::One(Bytes::new()),
                                            hdr,
                                        },
                                    ));
                                }
                                continue;
                            }
                        }
                    }
                    let r = if len as usize <= self.eager_limit() {
                        self.post_eager(id, &mut msg, track, now)
                    } else {
                        self.post_rts(id, &mut msg, now)
                    };
                    match r {
                        Ok(true) => {}
                        Ok(false) => {
                            // No header slot free: retry later, in order.
                            self.data.push_front(Out::Data { id, msg, track });
                            break;
                        }
                        Err(e) => {
                            self.events.push_back(Event::Sent {
                                id,
                                outcome: Outcome::Failed,
                            });
                            tracing::debug!("send {id} refused: {e}");
                        }
                    }
                }
            }
        }
    }

    /// Hand `b` to the in-process peer and send its header; false if the
    /// queue or a header slot is not available (then nothing was sent).
    fn handoff(
        &mut self,
        ch: &super::handoff::Channel,
        b: Bytes,
        seq: u32,
        len: u64,
        now: Instant,
    ) -> bool {
        if !self.hdr_available() {
            return false;
        }
        if ch.push(b).is_err() {
            return false;
        }
        if !self.post_header(Kind::Handoff, seq, len, now) {
            // Checked above: a header is always available here.
            self.fail(
                ConnError::Protocol("handoff header could not be posted".into()),
                Outcome::Unknown,
            );
            return false;
        }
        self.copies.add_handoff(len);
        true
    }

    /// A message of `len` bytes may go in a bundle.
    #[inline]
    fn bundles_with(&self, len: u64) -> bool {
        self.cfg.bundle && self.handoff_out.is_none() && len as usize + HDR <= self.inline_copy
    }

    /// A message of `len` bytes and the next queued one may go in a bundle
    /// together (a bundle of one is not worth its length entry): the next one's
    /// length.
    fn next_bundle_len(&self, len: u64) -> Option<u64> {
        match self.data.front() {
            Some(Out::Data { msg, .. }) if self.bundles_with(len) => {
                let next = msg.len();
                self.bundles_with(next).then_some(next)
            }
            _ => None,
        }
    }

    fn alloc_bundle(&mut self) -> Option<SlotMut> {
        if let Some(b) = self.bundle_free.pop() {
            return Some(b);
        }
        if self.bundle_arena.is_none() {
            let size = self
                .cfg
                .bundle_bytes
                .min(self.eager_limit() + HDR)
                .min(self.lim.max_msg_sz as usize);
            if size < HDR + 2 * (wire::REC + 1) {
                return None;
            }
            match self.pd.arena(ArenaConfig {
                huge_pages: HugePages::Never,
                ..ArenaConfig::new(size, BUNDLE_SLOTS)
            }) {
                Ok(a) => self.bundle_arena = Some(a),
                Err(e) => {
                    tracing::debug!("no bundle buffers ({e}); small messages go one by one");
                    self.cfg.bundle = false;
                    return None;
                }
            }
        }
        self.bundle_arena.as_ref().and_then(Arena::alloc)
    }

    /// Pack message `id` and the small messages queued after it (the first
    /// of them `next` bytes) into one SEND. Gives the message back if no
    /// bundle buffer is free.
    fn post_bundle(
        &mut self,
        id: u64,
        msg: Msg,
        track: bool,
        next: u64,
        now: Instant,
    ) -> Option<Msg> {
        let Some(mut buf) = self.alloc_bundle() else {
            return Some(msg);
        };
        let cap = buf.capacity();
        if HDR + 2 * wire::REC + (msg.len() + next) as usize > cap {
            // Not even two fit (a bundle buffer configured small): a bundle
            // of one only adds a length entry, so this one goes alone.
            self.bundle_free.push(buf);
            return Some(msg);
        }
        buf.set_len(HDR);
        // The bytes go back to back, their lengths into the trailer once
        // the bundle is complete (see `Kind::Bundle`); `used` counts both,
        // so every fit check leaves room for the trailer.
        let mut lens = [0u32; wire::MAX_BUNDLE as usize];
        let put = |buf: &mut SlotMut, msg: &Msg| {
            let (at, len) = (buf.len(), msg.len() as usize);
            buf.set_len(at + len);
            msg.copy_to(&mut buf.as_mut_slice()[at..]);
        };
        put(&mut buf, &msg);
        lens[0] = msg.len() as u32;
        let mut used = buf.len() + wire::REC;
        drop(msg);
        self.bundle_ids.push_back((id, track));
        let mut n = 1u32;
        let mut signal = track;
        while u64::from(n) < wire::MAX_BUNDLE {
            let fits = match self.data.front() {
                Some(Out::Data { msg, .. }) => {
                    self.bundles_with(msg.len()) && used + wire::REC + msg.len() as usize <= cap
                }
                _ => false,
            };
            if !fits {
                break;
            }
            let Some(Out::Data { id, msg, track }) = self.data.pop_front() else {
                break;
            };
            put(&mut buf, &msg);
            lens[n as usize] = msg.len() as u32;
            used += wire::REC + msg.len() as usize;
            self.bundle_ids.push_back((id, track));
            signal |= track;
            n += 1;
        }
        let at = buf.len();
        buf.set_len(used);
        for (out, len) in buf.as_mut_slice()[at..]
            .chunks_exact_mut(wire::REC)
            .zip(&lens[..n as usize])
        {
            out.copy_from_slice(&len.to_le_bytes());
        }
        let h = Header {
            kind: Kind::Bundle,
            flags: 0,
            credits: self.take_owed(),
            seq: self.next_seq,
            len: (buf.len() - HDR) as u64,
            aux: u64::from(n),
        };
        h.encode(&mut buf.as_mut_slice()[..HDR]);
        self.copies
            .add(CopyReason::Coalesce, (buf.len() - HDR) as u64);
        self.signal_batch |= signal;
        let mut flags = self.next_signal(false);
        if buf.len() <= self.lim.max_inline_data as usize {
            flags |= SendFlags::INLINE;
        }
        let sge_start = self.sges.len() as u32;
        self.sges.push(buf.sge_filled());
        self.next_seq = self.next_seq.wrapping_add(n);
        self.bundled += u64::from(n);
        self.push_send_one(flags, sge_start, now, Inflight::Bundle { buf, n });
        None
    }

    fn post_eager(
        &mut self,
        id: u64,
        msg: &mut Msg,
        track: bool,
        now: Instant,
    ) -> Result<bool, SendError> {
        let len = msg.len();
        let sge_start = self.sges.len() as u32;
        let wr_id = self.next_wr;
        // Compact when it can be (as `send_now`'s): the header in the
        // immediate, the payload alone in the receive slot, which the
        // receiver then hands over as it is (`Delivered::Slot`: no `Bytes`
        // until asked for, and a slot `try_recv_into` or
        // `try_recv_slot`'s `recycle` reposts where it is).
        let compact = len > 0 && self.owed <= u32::from(wire::IMM_MAX_CREDITS);
        let inline = if compact {
            len as usize <= self.inline_copy
        } else {
            len as usize + HDR <= self.inline_copy
        };
        // A slot for the inline copy, or for the header; a compact message
        // that is not copied needs none.
        let mut hold = None;
        if inline || !compact {
            let Some(s) = self.alloc_hdr() else {
                return Ok(false);
            };
            hold = Some(s);
        }
        let mut tmp = std::mem::take(&mut self.scratch);
        tmp.clear();
        if !inline {
            // The payload's SGEs first (a header takes one SGE), so a
            // refused buffer costs nothing. The builder starts from the
            // region table kept from the last message (one generation check
            // instead of a snapshot).
            let (max, room) = if compact {
                (self.lim.max_send_sge.max(1), self.lim.max_msg_sz)
            } else {
                (
                    self.lim.max_send_sge.saturating_sub(1).max(1),
                    self.lim.max_msg_sz.saturating_sub(HDR as u32),
                )
            };
            let builder = crate::sge::SgeBuilder::with_table(
                &self.pd,
                self.cfg.policy,
                self.sge_table.take(),
            );
            let built = builder.send(msg.chunks(), max, room, &mut tmp);
            self.sge_table = builder.into_table();
            if let Err(e) = built {
                self.scratch = tmp;
                self.recycle_hdr(hold);
                return Err(SendError::Buffer(e.to_string()));
            }
        }
        let mut imm = None;
        if compact {
            let credits = self.take_owed();
            imm = Some(wire::eager_imm(self.next_seq, credits));
            match hold.as_mut() {
                Some(s) => {
                    // Copied next to nothing: the payload alone, inline.
                    s.set_len(len as usize);
                    msg.copy_to(s.as_mut_slice());
                    self.copies.add(CopyReason::Inline, len);
                    self.sges.push(s.sge_filled());
                }
                None => self.sges.extend_from_slice(&tmp),
            }
        } else {
            let h = self.eager_header(len);
            let s = hold.as_mut().expect("a header slot was taken above");
            if inline {
                // Small: the payload goes next to the header and the
                // request inline, one SGE (any memory will do: nothing
                // stays referenced once the device has the bytes). Counted
                // as inline copies.
                let sge = self.fill_inline(s, &h, msg);
                self.sges.push(sge);
            } else {
                s.set_len(HDR);
                h.encode(s.as_mut_slice());
                self.sges.push(s.sge_filled());
                self.sges.extend_from_slice(&tmp);
            }
        }
        self.scratch = tmp;
        // The application's chunks stay referenced until the completion
        // unless they were copied: then only a tracked send needs one soon.
        self.signal_batch |= track || !inline;
        let mut flags = self.next_signal(false);
        if inline {
            flags |= SendFlags::INLINE;
        }
        self.next_wr += 1;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.peer_credits -= 1;
        self.last_sent = now;
        let sge_count = self.sges.len() as u32 - sge_start;
        let op = SendOp {
            wr_id,
            opcode: if imm.is_some() {
                Opcode::SendWithImm
            } else {
                Opcode::Send
            },
            flags,
            sge_start,
            sge_count,
            remote_addr: 0,
            rkey: 0,
            imm: imm.unwrap_or(0),
        };
        // Copied chunks are released by the caller now; the others are held
        // until the completion.
        let held = if inline {
            Msg::One(Bytes::new())
        } else {
            std::mem::replace(msg, Msg::One(Bytes::new()))
        };
        self.push_wr(
            op,
            Inflight::Eager {
                id,
                track,
                _msg: held,
                hdr: hold,
            },
        );
        Ok(true)
    }

    fn post_rts(&mut self, id: u64, msg: &mut Msg, now: Instant) -> Result<bool, SendError> {
        let len = msg.len();
        let max_regions = (self.rts_arena.slot_size() - HDR) / RemoteRegion::WIRE_LEN;
        let nonempty = msg.chunks().iter().filter(|c| !c.is_empty()).count();
        if nonempty > max_regions {
            return Err(SendError::Buffer(format!(
                "{nonempty} chunks exceed the rendezvous limit of {max_regions}"
            )));
        }
        let Some(mut s) = self.rts_arena.alloc() else {
            return Ok(false);
        };
        // Expose exactly the message's chunks for reading.
        let mut exposures = Vec::with_capacity(nonempty);
        self.regions.clear();
        for c in msg.chunks().iter().filter(|c| !c.is_empty()) {
            match self.pd.expose_bytes(c) {
                Ok(e) => {
                    self.regions.push(e.remote());
                    exposures.push(e);
                }
                Err(e) => return Err(SendError::Buffer(e.to_string())),
            }
        }
        let seq = self.next_seq;
        let hdr = Header {
            kind: Kind::Rts,
            flags: 0,
            credits: self.take_owed(),
            seq,
            len,
            aux: self.regions.len() as u64,
        };
        let body = HDR + self.regions.len() * RemoteRegion::WIRE_LEN;
        s.set_len(body);
        hdr.encode(s.as_mut_slice());
        wire::encode_regions(&self.regions, &mut s.as_mut_slice()[HDR..]);
        let sge_start = self.sges.len() as u32;
        self.sges.push(s.sge_filled());
        let wr_id = self.next_wr;
        self.next_wr += 1;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.peer_credits -= 1;
        self.last_sent = now;
        let flags = self.next_signal(false);
        let op = SendOp {
            wr_id,
            opcode: Opcode::Send,
            flags,
            sge_start,
            sge_count: 1,
            remote_addr: 0,
            rkey: 0,
            imm: 0,
        };
        let owned = std::mem::replace(msg, Msg::One(Bytes::new()));
        self.rdv_out.push_back(RdvOut {
            id,
            seq,
            _exposures: exposures,
            _msg: owned,
        });
        self.push_wr(op, Inflight::Rts { _hdr: s });
        Ok(true)
    }
}

/// Receive work request ids carry this bit, so flushed receives are recognised.
pub const RECV_BIT: u64 = 1 << 63;

#[cfg(test)]
mod tests {
    use super::*;

    /// `repost_below` is the rule "posted < target and (a whole batch is
    /// free, or at most half are posted)", for every target and count.
    #[test]
    fn repost_below_is_the_batch_or_half_rule() {
        for target in 1..200u32 {
            for posted in 0..=target {
                let rule =
                    posted < target && (posted + REPOST_BATCH <= target || 2 * posted <= target);
                assert_eq!(
                    posted < repost_below(target),
                    rule,
                    "target {target}, posted {posted}"
                );
            }
        }
    }
}
