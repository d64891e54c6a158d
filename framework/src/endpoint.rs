//! Endpoints: the protocol core driven over a queue pair.
//!
//! An [`Endpoint`] owns one connection: its queue pair, its registered
//! receive slots and the sans-IO [`Connection`]. It is driven by whoever holds
//! it (`&mut self`): no lock, no background thread. Three ways to wait:
//! - busy polling: call [`Endpoint::progress`] in a loop (lowest latency);
//! - blocking: [`Endpoint::recv_timeout`] / [`Endpoint::wait`] spin briefly, then
//!   sleep on the transport's readiness hook (`QueuePair::arm`);
//! - async: [`Endpoint::send`], [`Endpoint::recv`], [`Endpoint::close`] are
//!   runtime-agnostic futures that arm the queue pair with the task's waker
//!   (and a coarse timer for heartbeats), tested under tokio.
//!
//! Liveness is driven by progress: heartbeats go out from `progress` (and
//! every wait), so an endpoint nobody drives for longer than the peer's
//! `heartbeat_timeout` looks dead to the peer. Raise the timeout for
//! applications that compute for long stretches between calls.
//!
//! Receive is zero-copy: [`Endpoint::try_recv`] returns `Bytes` pointing into
//! the registered receive slot; dropping it (on any thread) returns the slot,
//! which the progress loop reposts and turns into a credit for the peer.
//! Small messages read once can take the copy path instead:
//! [`Endpoint::try_send_slice`] and [`Endpoint::try_recv_into`] work on the
//! caller's buffers, with no `Bytes` and so no allocation per message. Or
//! they can be read where they arrived: [`Endpoint::try_recv_slot`] hands
//! over the receive slot itself ([`Received`]), with no copy and no
//! allocation, and [`Endpoint::recycle`] posts it again.

use std::collections::{HashMap, HashSet};
use std::future::poll_fn;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::TransportError;
use crate::mem::{Pd, SlotMut};
use crate::proto::{
    ConnError, Connection, Event, InlineNow, Limits, Msg, Outcome, Payload, ProtoConfig, Received,
    SendError, SendNow,
};
use crate::stats::CopySnapshot;
use crate::transport::{Armed, Listener, QpConfig, QueuePair};
use crate::verbs::{RecvRequest, RemoteRegion, WcStatus, WorkCompletion, WorkRequest};

/// Settings of an endpoint.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// Protocol settings.
    pub proto: ProtoConfig,
    /// Queue pair settings.
    pub qp: QpConfig,
    /// Spin this long before sleeping in blocking waits.
    pub spin: Duration,
    /// How long `connect`/`accept` wait for the peer's handshake.
    pub handshake_timeout: Duration,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        let proto = ProtoConfig::default();
        EndpointConfig {
            qp: QpConfig {
                max_send_wr: 256,
                max_recv_wr: proto.recv_slots + proto.reserve,
                max_send_sge: 8,
                max_recv_sge: 1,
                max_inline_data: 128,
                rnr_retry: 7,
                ..QpConfig::default()
            },
            proto,
            spin: Duration::from_micros(50),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Errors of endpoint setup and receive.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Memory for the endpoint could not be set up.
    #[error(transparent)]
    Mem(#[from] crate::error::MemError),
    /// The connection failed.
    #[error("connection failed: {0}")]
    Conn(ConnError),
    /// No handshake within the timeout.
    #[error("no handshake from the peer within {0:?}")]
    HandshakeTimeout(Duration),
    /// A wait ran out.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The next message does not fit the buffer given; it stays first in
    /// line (take it with a larger buffer or as `Bytes`).
    #[error("the next message is {need} bytes, the buffer holds {have}")]
    BufferTooSmall {
        /// The message's length.
        need: usize,
        /// The buffer's length.
        have: usize,
    },
}

/// What a receive found.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    /// A message.
    Message(Bytes),
    /// The peer closed: nothing more will come.
    Eos,
}

/// What [`Endpoint::try_recv_into`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum RecvInto {
    /// A message of this many bytes, now at the start of the buffer.
    Message(usize),
    /// The peer closed: nothing more will come.
    Eos,
}

/// What [`Endpoint::try_recv_slot`] found.
#[derive(Debug)]
pub enum RecvSlot {
    /// A message, owning its receive slot: read it in place, then give it
    /// back with [`Endpoint::recycle`].
    Message(Received),
    /// The peer closed: nothing more will come.
    Eos,
}

/// An idle `progress` call (nothing polled) reads the clock only every this
/// many calls in a row (see `Endpoint::progress`).
const IDLE_CLOCK_EVERY: u32 = 16;

/// `recv_timeout` polls this many times before it reads the clock to start
/// its deadline: a message that arrives within them (a ping-pong's answer,
/// ~1 µs of polls on the soft device) costs no clock read.
pub(crate) const CLOCKLESS_POLLS: u32 = 64;

/// A connected messaging endpoint.
pub struct Endpoint {
    pd: Pd,
    qp: Box<dyn QueuePair>,
    conn: Connection,
    wc: Vec<WorkCompletion>,
    awaited: HashSet<u64>,
    outcomes: HashMap<u64, Outcome>,
    ops: HashMap<u64, (WcStatus, Option<SlotMut>)>,
    eos: bool,
    failed: Option<ConnError>,
    next_tick: Instant,
    tick_every: Duration,
    spin: Duration,
    recv_slots: usize,
    /// The clock at the last `progress`.
    now: Instant,
    /// The last `progress` returned a message before its posts and timers
    /// (see `progress_inner`): the next one runs them.
    deferred: bool,
    /// The clock `progress` reads: the timers need milliseconds, not the
    /// precise clock's price per busy-poll iteration.
    clock: crate::util::CoarseClock,
    /// `progress` calls in a row that polled nothing since the clock was
    /// last read (see `progress_inner`).
    idle_polls: u32,
    /// Buffers for the work requests of one flush, kept across calls.
    wr_buf: Vec<WorkRequest<'static>>,
    rr_buf: Vec<RecvRequest<'static>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("qp_num", &self.qp.qp_num())
            .field("open", &self.conn.is_open())
            .field("eos", &self.eos)
            .field("failed", &self.failed)
            .finish()
    }
}

impl Endpoint {
    /// Connect to a listener at `addr` and complete the handshake.
    pub fn connect(pd: &Pd, addr: &str, cfg: &EndpointConfig) -> Result<Endpoint, EndpointError> {
        let qp = pd.transport().connect(addr, &cfg.qp, b"zcmsg\x01")?;
        Self::establish(pd, qp, cfg)
    }

    /// Accept one connection from `listener` and complete the handshake.
    pub fn accept(
        pd: &Pd,
        listener: &mut dyn Listener,
        cfg: &EndpointConfig,
    ) -> Result<Endpoint, EndpointError> {
        let (qp, _private) = listener.accept(cfg.qp.connect_timeout)?;
        Self::establish(pd, qp, cfg)
    }

    /// Start the protocol on an already connected queue pair and wait for the handshake.
    pub fn establish(
        pd: &Pd,
        qp: Box<dyn QueuePair>,
        cfg: &EndpointConfig,
    ) -> Result<Endpoint, EndpointError> {
        let mut ep = Self::start(pd, qp, cfg)?;
        let deadline = Instant::now() + cfg.handshake_timeout;
        while !ep.conn.is_open() {
            ep.progress();
            if let Some(e) = &ep.failed {
                return Err(failed_error(e));
            }
            if Instant::now() > deadline {
                return Err(EndpointError::HandshakeTimeout(cfg.handshake_timeout));
            }
            ep.sleep_briefly(Instant::now());
        }
        Ok(ep)
    }

    /// Start the protocol without waiting for the handshake (it completes in `progress`).
    pub fn start(
        pd: &Pd,
        qp: Box<dyn QueuePair>,
        cfg: &EndpointConfig,
    ) -> Result<Endpoint, EndpointError> {
        let caps = pd.caps();
        let q = qp.caps();
        let lim = Limits {
            max_send_wr: q.max_send_wr,
            max_send_sge: q.max_send_sge,
            max_sge_rd: caps.max_sge_rd.min(q.max_send_sge),
            max_msg_sz: caps.max_msg_sz,
            max_inline_data: q.max_inline_data,
        };
        let mut proto = cfg.proto.clone();
        proto.slot_size = proto.slot_size.min(caps.max_msg_sz as usize);
        let now = Instant::now();
        let mut conn = Connection::new(pd.clone(), proto.clone(), lim, now)?;
        // Only `send`'s tracked outcomes are awaited.
        conn.set_report_untracked(false);
        let tick_every = (proto.heartbeat_interval / 4).max(Duration::from_millis(1));
        let mut ep = Endpoint {
            pd: pd.clone(),
            qp,
            conn,
            wc: vec![WorkCompletion::EMPTY; 64],
            awaited: HashSet::new(),
            outcomes: HashMap::new(),
            ops: HashMap::new(),
            eos: false,
            failed: None,
            next_tick: now + tick_every,
            tick_every,
            spin: cfg.spin,
            recv_slots: proto.recv_slots as usize,
            now,
            deferred: false,
            clock: crate::util::CoarseClock::new(),
            idle_polls: 0,
            wr_buf: Vec::with_capacity(q.max_send_wr as usize),
            rr_buf: Vec::with_capacity((proto.recv_slots + proto.reserve) as usize),
        };
        ep.flush(now);
        Ok(ep)
    }

    /// The protection domain.
    pub fn pd(&self) -> &Pd {
        &self.pd
    }

    /// Copies the framework made for everything built against this endpoint's PD.
    pub fn copies(&self) -> CopySnapshot {
        self.pd.stats().snapshot()
    }

    /// Largest message sent eagerly; larger ones go by rendezvous.
    pub fn eager_limit(&self) -> usize {
        self.conn.eager_limit()
    }

    /// Largest message that goes at once as one inline request, copied at
    /// post time: the most [`Endpoint::try_send_slice`] takes, and what
    /// `try_send` sends without holding the caller's `Bytes`.
    pub fn inline_limit(&self) -> usize {
        self.conn.inline_limit()
    }

    /// Receive slots for data messages: at most this many received messages
    /// can be held by the application before the peer has to wait.
    pub fn recv_slots(&self) -> usize {
        self.recv_slots
    }

    /// Messages received so far.
    pub fn received_count(&self) -> u64 {
        self.conn.delivered_count()
    }

    /// Do all work that is ready: poll completions, run timers, post. Returns
    /// true if anything happened. Never blocks.
    ///
    /// The timers (heartbeats, idle credit returns) run at millisecond
    /// granularity off a coarse clock, which a call that polled nothing
    /// reads only every 16th time in a row (and always after the
    /// endpoint's own waits slept): a busy-poll loop pays for no clock, and
    /// a caller that polls slowly by its own sleeps sees its timers late by
    /// at most 16 of its calls.
    pub fn progress(&mut self) -> bool {
        self.progress_inner(false)
    }

    /// [`Endpoint::progress`]; with `for_message`, a call whose completions
    /// made a message ready returns it to the caller before the rest of
    /// the work (reposting receives, credit updates, timers, events), so
    /// that work is not on the message's latency path: it runs in the next
    /// call, which never defers again (so a receiver that always finds a
    /// message still reposts at least every other call).
    #[inline(always)]
    fn progress_inner(&mut self, for_message: bool) -> bool {
        let mut n = self.qp.poll_cq(&mut self.wc);
        if n == 0 {
            // A busy-poll loop's empty turn, kept short (its length is how
            // late a message is seen on average): no deferred work, the
            // cached clock still in use and short of the next tick, nothing
            // to post and no event, so the rest would do nothing.
            if !self.deferred
                && self.idle_polls < IDLE_CLOCK_EVERY
                && self.now < self.next_tick
                && !self.conn.has_work()
                && !self.conn.has_events()
            {
                self.idle_polls += 1;
                return false;
            }
            return self.progress_rest(false);
        }
        loop {
            for i in 0..n {
                let wc = self.wc[i];
                self.conn.on_completion(&wc);
            }
            if n < self.wc.len() {
                break;
            }
            n = self.qp.poll_cq(&mut self.wc);
            if n == 0 {
                break;
            }
        }
        if for_message && !self.deferred && self.conn.messages_ready() > 0 {
            self.deferred = true;
            return true;
        }
        self.progress_rest(true)
    }

    /// The rest of [`Endpoint::progress_inner`] after its polls (`did`:
    /// they found completions): timers, posts, events.
    #[inline(never)]
    fn progress_rest(&mut self, mut did: bool) -> bool {
        self.deferred = false;
        // The coarse clock (a vDSO call, not the clock hardware) is read by
        // a call that polled something, by every IDLE_CLOCK_EVERY-th idle
        // call in a row, and by the first call after a sleep: in a
        // busy-poll loop its read was the largest cost of an empty call,
        // and the timers need milliseconds. Timers and posts share it.
        let now = if did || self.idle_polls >= IDLE_CLOCK_EVERY {
            self.idle_polls = 0;
            let now = self.clock.now();
            self.now = now;
            now
        } else {
            self.idle_polls += 1;
            self.now
        };
        if now >= self.next_tick {
            self.conn.on_tick(now);
            self.next_tick = now + self.tick_every;
        }
        // Idle: no call into the protocol's transmit at all.
        if self.conn.has_work() {
            did |= self.flush(now);
        }
        did |= self.drain_events();
        did
    }

    /// Post what the protocol has ready, one doorbell per queue. The work
    /// requests are built in buffers kept across calls (no allocation, and
    /// no initialisation of more entries than are posted).
    fn flush(&mut self, now: Instant) -> bool {
        let Endpoint {
            conn,
            qp,
            wr_buf,
            rr_buf,
            ..
        } = self;
        let tx = conn.transmit(now);
        if tx.is_empty() {
            return false;
        }
        let mut result = Ok(());
        let mut rrs: Vec<RecvRequest<'_>> = crate::util::recycle(std::mem::take(rr_buf));
        rrs.extend(tx.recvs.iter().map(|r| RecvRequest {
            wr_id: r.wr_id,
            sg_list: std::slice::from_ref(&r.sge),
        }));
        if !rrs.is_empty() {
            if let Err(e) = qp.post_recv(&rrs) {
                result = Err(e.to_string());
            }
        }
        *rr_buf = crate::util::recycle(rrs);
        if result.is_ok() && !tx.sends.is_empty() {
            let mut wrs: Vec<WorkRequest<'_>> = crate::util::recycle(std::mem::take(wr_buf));
            wrs.extend(tx.sends.iter().map(|s| {
                WorkRequest::one_sided(
                    s.wr_id,
                    s.opcode,
                    &tx.sges[s.sge_start as usize..(s.sge_start + s.sge_count) as usize],
                    s.remote_addr,
                    s.rkey,
                )
                .with_flags(s.flags)
                .with_imm(s.imm)
            }));
            if let Err(e) = qp.post_send(&wrs) {
                result = Err(e.to_string());
            }
            *wr_buf = crate::util::recycle(wrs);
        }
        if let Err(e) = result {
            self.conn.fail(ConnError::Post(e), Outcome::Unknown);
        }
        true
    }

    fn drain_events(&mut self) -> bool {
        let mut did = false;
        while let Some(ev) = self.conn.poll_event() {
            did = true;
            match ev {
                Event::Connected => {}
                Event::Sent { id, outcome } => {
                    if !self.awaited.is_empty() && self.awaited.remove(&id) {
                        self.outcomes.insert(id, outcome);
                    }
                }
                Event::OpDone { id, status, data } => {
                    self.ops.insert(id, (status, data));
                }
                Event::PeerClosed => self.eos = true,
                Event::Failed(e) => {
                    tracing::debug!("endpoint failed: {e}");
                    self.failed = Some(e);
                }
            }
        }
        did
    }

    /// Queue a message without waiting; returns its id. Its outcome is not
    /// tracked (use [`Endpoint::send`] to learn it).
    pub fn try_send(&mut self, msg: impl Into<Msg>) -> Result<u64, SendError> {
        if let Some(e) = &self.failed {
            return Err(send_failed(e));
        }
        let msg = msg.into();
        // The time of the last progress is close enough for the protocol's
        // idle bookkeeping (heartbeats are due after hundreds of ms).
        let now = self.now;
        // A small message with nothing queued before it goes at once as one
        // inline request, without the general transmit path.
        if let Some(id) = self.send_at_once(&msg, now)? {
            return Ok(id);
        }
        let id = self.conn.send(msg)?;
        self.flush(now);
        Ok(id)
    }

    /// Send `data` at once as one inline request, copied at post time,
    /// without a `Bytes`: `Ok(Some(id))` once posted, `Ok(None)` if it
    /// cannot go at once (longer than the inline limit allows, no credit
    /// or send-queue room, or messages queued before it), and then nothing
    /// is queued: send it with [`Endpoint::try_send`], or again after
    /// progress. The copy is counted as `inline`, as `try_send`'s is. The
    /// sending half of [`Endpoint::try_recv_into`]'s small-message path.
    pub fn try_send_slice(&mut self, data: &[u8]) -> Result<Option<u64>, SendError> {
        if let Some(e) = &self.failed {
            return Err(send_failed(e));
        }
        self.send_at_once(data, self.now)
    }

    /// Post `msg` at once as one inline request if it can go now (see
    /// [`Connection::send_now`]): from its own bytes when they are one
    /// slice and its header fits the immediate, else through the staging
    /// slot. Returns its id, or `None` if it cannot go now.
    #[inline]
    fn send_at_once<P: Payload + ?Sized>(
        &mut self,
        msg: &P,
        now: Instant,
    ) -> Result<Option<u64>, SendError> {
        if let Some((fast, bytes)) = self.conn.send_now_inline(msg, false, now)? {
            self.post_inline(fast, bytes);
            return Ok(Some(fast.id));
        }
        Ok(match self.conn.send_now(msg, false, now)? {
            Some(fast) => {
                self.post_now(fast);
                Some(fast.id)
            }
            None => None,
        })
    }

    /// Post a message [`Connection::send_now_inline`] accounted for, from
    /// its own bytes.
    #[inline(always)]
    fn post_inline(&mut self, s: InlineNow, data: &[u8]) {
        if let Err(e) = self.qp.post_inline(s.wr_id, s.flags, Some(s.imm), data) {
            self.conn
                .fail(ConnError::Post(e.to_string()), Outcome::Unknown);
        }
    }

    #[inline]
    fn post_now(&mut self, s: SendNow) {
        let sge = [s.sge];
        let wr = s.work_request(&sge);
        if let Err(e) = self.qp.post_send(std::slice::from_ref(&wr)) {
            self.conn
                .fail(ConnError::Post(e.to_string()), Outcome::Unknown);
        }
    }

    /// Queue a message without ringing the doorbell: everything queued goes
    /// out as one post list (one doorbell, one signaled completion) with the
    /// next [`Endpoint::try_send`], [`Endpoint::flush_sends`],
    /// [`Endpoint::progress`] or wait. Use it to send a burst at the device's
    /// message rate; use `try_send` for the lowest latency of one message.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use zcmsg::{Endpoint, SendError};
    ///
    /// /// Sixteen messages, one doorbell.
    /// fn burst(ep: &mut Endpoint, msgs: &[Bytes]) -> Result<(), SendError> {
    ///     for m in msgs {
    ///         ep.queue(m.clone())?;
    ///     }
    ///     ep.flush_sends();
    ///     Ok(())
    /// }
    /// ```
    pub fn queue(&mut self, msg: impl Into<Msg>) -> Result<u64, SendError> {
        if let Some(e) = &self.failed {
            return Err(send_failed(e));
        }
        self.conn.send(msg)
    }

    /// Post what [`Endpoint::queue`] left queued (as far as credits and the
    /// send queue allow; the rest follows with progress). Returns true if
    /// anything was posted.
    pub fn flush_sends(&mut self) -> bool {
        self.flush(self.now)
    }

    /// Take a received message if one is there (after making progress).
    /// `Ok(None)`: nothing yet. `Ok(Some(Recv::Eos))`: the peer closed.
    pub fn try_recv(&mut self) -> Result<Option<Recv>, EndpointError> {
        if self.conn.messages_ready() == 0 {
            self.progress_inner(true);
        }
        if let Some(b) = self.conn.poll_message() {
            return Ok(Some(Recv::Message(b)));
        }
        if self.eos {
            return Ok(Some(Recv::Eos));
        }
        if let Some(e) = &self.failed {
            return Err(failed_error(e));
        }
        Ok(None)
    }

    /// Receive the next message by copying it into `buf`, without making
    /// it `Bytes`: a small message that filled a receive slot of its own
    /// (one sent at once, see [`Endpoint::try_send`]) costs no allocation,
    /// and its slot goes straight back to the receive queue. For small,
    /// latency-bound messages read once, the way a tagged receive into the
    /// caller's buffer works in UCX; [`Endpoint::try_recv`] hands every
    /// message over without a copy. Counted as `copy_out`. A message longer
    /// than `buf` is refused with [`EndpointError::BufferTooSmall`] and
    /// stays first in line. Busy-polls once, as `try_recv` does.
    ///
    /// ```
    /// use zcmsg::{Endpoint, RecvInto};
    ///
    /// /// Echo one small message through a stack buffer: no allocation.
    /// fn echo_one(ep: &mut Endpoint) -> Result<bool, Box<dyn std::error::Error>> {
    ///     let mut buf = [0u8; 128];
    ///     match ep.try_recv_into(&mut buf)? {
    ///         // Goes at once if it fits the inline limit and credits allow.
    ///         Some(RecvInto::Message(n)) => Ok(ep.try_send_slice(&buf[..n])?.is_some()),
    ///         Some(RecvInto::Eos) | None => Ok(false),
    ///     }
    /// }
    /// ```
    pub fn try_recv_into(&mut self, buf: &mut [u8]) -> Result<Option<RecvInto>, EndpointError> {
        if self.conn.messages_ready() == 0 {
            self.progress_inner(true);
        }
        // (An empty poll, the busy-poll loop's usual case, does not call
        // into the copy.)
        if self.conn.messages_ready() > 0 {
            match self.conn.poll_message_into(buf) {
                Ok(Some(n)) => return Ok(Some(RecvInto::Message(n))),
                Ok(None) => {}
                Err(need) => {
                    return Err(EndpointError::BufferTooSmall {
                        need,
                        have: buf.len(),
                    })
                }
            }
        }
        if self.eos {
            return Ok(Some(RecvInto::Eos));
        }
        if let Some(e) = &self.failed {
            return Err(failed_error(e));
        }
        Ok(None)
    }

    /// Take the next message where it arrived, owning its receive slot: no
    /// copy and no allocation (a small message sent at once fills a slot of
    /// its own). Read it in place (it derefs to `[u8]`), then give it back
    /// with [`Endpoint::recycle`], and its slot is posted again as it is;
    /// or keep it with [`Received::into_bytes`]. Between the two receive
    /// paths above: zero-copy like [`Endpoint::try_recv`], without its
    /// `Bytes` (an allocation, and the slot's trip home through the
    /// arena); no copy, unlike [`Endpoint::try_recv_into`]. Busy-polls
    /// once, as `try_recv` does. A held message holds its slot, as a held
    /// `Bytes` does: the endpoint reposts a fresh one meanwhile.
    ///
    /// ```
    /// use zcmsg::{Endpoint, RecvSlot};
    ///
    /// /// Echo one message from where it arrived: no copy before the
    /// /// send's own, no allocation.
    /// fn echo_one(ep: &mut Endpoint) -> Result<bool, Box<dyn std::error::Error>> {
    ///     match ep.try_recv_slot()? {
    ///         Some(RecvSlot::Message(m)) => {
    ///             let sent = ep.try_send_slice(&m)?.is_some();
    ///             ep.recycle(m);
    ///             Ok(sent)
    ///         }
    ///         Some(RecvSlot::Eos) | None => Ok(false),
    ///     }
    /// }
    /// ```
    pub fn try_recv_slot(&mut self) -> Result<Option<RecvSlot>, EndpointError> {
        if self.conn.messages_ready() == 0 {
            self.progress_inner(true);
        }
        if let Some(m) = self.conn.poll_message_owned() {
            return Ok(Some(RecvSlot::Message(m)));
        }
        if self.eos {
            return Ok(Some(RecvSlot::Eos));
        }
        if let Some(e) = &self.failed {
            return Err(failed_error(e));
        }
        Ok(None)
    }

    /// Give back a message [`Endpoint::try_recv_slot`] returned: its slot
    /// is posted again as it is, before any fresh slot, with no atomic
    /// operation and no allocation. A message of another endpoint, or one
    /// held as `Bytes` (see [`Received`]), is dropped instead (its slot
    /// goes home to its own arena).
    #[inline]
    pub fn recycle(&mut self, msg: Received) {
        self.conn.recycle_recv(msg);
    }

    /// Block up to `timeout` for a message: spin first, then sleep on the
    /// transport's readiness hook.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Recv, EndpointError> {
        // A message that is there or arrives within the first polls costs
        // no clock read (~20-40 ns each on these VMs, more in a guest).
        for _ in 0..CLOCKLESS_POLLS {
            if let Some(r) = self.try_recv()? {
                return Ok(r);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = self.try_recv()? {
                return Ok(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(EndpointError::Timeout(timeout));
            }
            if now + self.spin < deadline {
                self.spin_or_sleep(deadline);
            }
        }
    }

    /// Make progress until `done(self)` or `timeout`.
    pub fn wait(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&mut Endpoint) -> bool,
    ) -> Result<(), EndpointError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.progress();
            if done(self) {
                return Ok(());
            }
            if let Some(e) = &self.failed {
                return Err(failed_error(e));
            }
            if Instant::now() >= deadline {
                return Err(EndpointError::Timeout(timeout));
            }
            self.spin_or_sleep(deadline);
        }
    }

    fn spin_or_sleep(&mut self, deadline: Instant) {
        // The precise clock is read every 16 spins only: it can cost far
        // more than a progress call (the HPET in a guest with an unstable
        // TSC). No PAUSE between polls: polling is the wait (as in perftest
        // and UCX), a PAUSE costs ~40 ns on recent x86 cores, and under
        // QEMU's TCG it leaves the translated code for the main loop.
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if self.progress() {
                return;
            }
            spins = spins.wrapping_add(1);
            if spins % 16 == 0 && start.elapsed() >= self.spin {
                break;
            }
        }
        let waker = crate::util::thread_waker();
        if self.qp.arm(&waker) == Armed::Armed {
            let until = deadline.min(self.next_tick);
            std::thread::park_timeout(until.saturating_duration_since(Instant::now()));
            self.idle_polls = IDLE_CLOCK_EVERY;
        }
    }

    fn sleep_briefly(&mut self, now: Instant) {
        self.spin_or_sleep(now + Duration::from_millis(5));
    }

    /// Send a message and wait (asynchronously) for its outcome.
    pub async fn send(&mut self, msg: impl Into<Msg>) -> Result<Outcome, SendError> {
        if let Some(e) = &self.failed {
            return Err(send_failed(e));
        }
        let id = self.conn.send_tracked(msg)?;
        self.awaited.insert(id);
        self.flush(self.now);
        let out = poll_fn(|cx| {
            self.progress();
            if let Some(o) = self.outcomes.remove(&id) {
                return Poll::Ready(o);
            }
            self.park_task(cx);
            Poll::Pending
        })
        .await;
        Ok(out)
    }

    /// Receive the next message asynchronously; `Ok(None)` at end of stream.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, EndpointError> {
        poll_fn(|cx| match self.try_recv() {
            Ok(Some(Recv::Message(b))) => Poll::Ready(Ok(Some(b))),
            Ok(Some(Recv::Eos)) => Poll::Ready(Ok(None)),
            Err(e) => Poll::Ready(Err(e)),
            Ok(None) => {
                self.park_task(cx);
                Poll::Pending
            }
        })
        .await
    }

    /// Graceful close: everything sent before goes first, then the peer sees
    /// end-of-stream. Waits until our close was delivered. A second close or a
    /// send after close is a typed error.
    pub async fn close(&mut self) -> Result<(), SendError> {
        self.conn.close()?;
        self.flush(self.now);
        poll_fn(|cx| {
            self.progress();
            if self.conn.close_done() {
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = &self.failed {
                return Poll::Ready(Err(send_failed(e)));
            }
            self.park_task(cx);
            Poll::Pending
        })
        .await
    }

    /// Close without waiting (the close goes out with later progress).
    pub fn try_close(&mut self) -> Result<(), SendError> {
        self.conn.close()?;
        self.flush(self.now);
        Ok(())
    }

    /// One-sided RDMA WRITE of `chunks` into the peer's `remote` region; waits
    /// for completion.
    pub async fn write(
        &mut self,
        chunks: impl Into<Msg>,
        remote: RemoteRegion,
    ) -> Result<WcStatus, SendError> {
        let id = self.conn.write(chunks, remote)?;
        self.flush(self.now);
        let (status, _) = self.wait_op(id).await;
        Ok(status)
    }

    /// One-sided RDMA READ of the peer's `remote` region into `dest`; returns
    /// the slot with its length set.
    pub async fn read(
        &mut self,
        remote: RemoteRegion,
        dest: SlotMut,
    ) -> Result<SlotMut, SendError> {
        let len = remote.len as usize;
        let id = self.conn.read(remote, dest)?;
        self.flush(self.now);
        match self.wait_op(id).await {
            (WcStatus::Success, Some(mut s)) => {
                s.set_len(len);
                Ok(s)
            }
            (st, _) => Err(SendError::Failed(ConnError::Completion(st))),
        }
    }

    async fn wait_op(&mut self, id: u64) -> (WcStatus, Option<SlotMut>) {
        poll_fn(|cx| {
            self.progress();
            if let Some(r) = self.ops.remove(&id) {
                return Poll::Ready(r);
            }
            self.park_task(cx);
            Poll::Pending
        })
        .await
    }

    /// Register the task's waker: with the queue pair for completions and with
    /// the coarse timer for heartbeats.
    fn park_task(&mut self, cx: &mut std::task::Context<'_>) {
        // The task may sleep long: its next progress reads the clock.
        self.idle_polls = IDLE_CLOCK_EVERY;
        match self.qp.arm(cx.waker()) {
            Armed::Ready => cx.waker().wake_by_ref(),
            Armed::Armed => crate::util::wake_at(cx.waker().clone(), self.next_tick),
        }
    }

    /// The queue pair (e.g. to read its state).
    pub fn qp(&self) -> &dyn QueuePair {
        &*self.qp
    }

    /// The failure, if the connection failed.
    pub fn failure(&self) -> Option<&ConnError> {
        self.failed.as_ref()
    }

    /// True once the peer closed and everything it sent was received.
    pub fn is_eos(&self) -> bool {
        self.eos && self.conn.messages_ready() == 0
    }

    /// True once our own close went out and everything before it was
    /// delivered. When the peer closed first it may tear its queue pair
    /// down as soon as it has our Close: a Close that then fails for want
    /// of an acknowledgement still counts (see [`Connection::close_done`]),
    /// while the endpoint reports the failure too.
    ///
    /// [`Connection::close_done`]: crate::proto::Connection::close_done
    pub fn close_delivered(&self) -> bool {
        self.conn.close_done()
    }

    /// Receives currently posted (diagnostics).
    pub fn posted_receives(&self) -> u32 {
        self.conn.posted_receives()
    }

    /// Data credits toward the peer (diagnostics).
    pub fn credits(&self) -> i64 {
        self.conn.credits()
    }

    /// Messages sent packed in bundles so far (see `ProtoConfig::bundle`).
    pub fn bundled_count(&self) -> u64 {
        self.conn.bundled_count()
    }
}

/// A failed endpoint's error, built in one place and out of line: the
/// receive and send paths only test that there is none (the clone, a match
/// over every variant, was a jump table at the top of each, an indirect
/// jump that full emulation pays for on every call).
#[cold]
#[inline(never)]
fn failed_error(e: &ConnError) -> EndpointError {
    EndpointError::Conn(e.clone())
}

/// [`failed_error`] for the send calls.
#[cold]
#[inline(never)]
fn send_failed(e: &ConnError) -> SendError {
    SendError::Failed(e.clone())
}
