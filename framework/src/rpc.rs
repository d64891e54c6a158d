//! Request/response on top of an endpoint, with Mercury-style bulk handles.
//!
//! A call is one message: a 16-byte RPC header followed by the request; the
//! reply likewise. A message of up to 256 bytes in all that can go at once
//! is built on the stack and posted as one inline request (its bytes copied
//! into the request, counted as `inline`, as `Endpoint::try_send_slice`
//! does); a larger one goes as a header chunk and the request's own chunks
//! (vectored, never concatenated, zero-copy when registered). Handlers get
//! the request as zero-copy `Bytes` (a slice of the receive slot) and reply
//! with a [`Msg`]: one `Bytes` (`Ok(req.into())`, no allocation) or several
//! chunks. A reply nobody waits for any more (its call timed out) is
//! dropped when it arrives. Bulk data does not travel in messages: the request
//! names a [`RemoteRegion`] of the client's, and the server pulls it
//! ([`BulkCtx::pull`], an RDMA READ into its own registered memory) or
//! pushes into it ([`BulkCtx::push`], an RDMA WRITE), so the server decides
//! when its memory is used.
//!
//! RPC header: `kind u8 (1 request, 2 reply, 3 error) | pad u8 | method u16 | pad u32 | call id u64`.

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes};

use crate::endpoint::{Endpoint, EndpointError, Recv};
use crate::mem::{Arena, ArenaConfig, HugePages, SlotMut};
use crate::proto::{Msg, SendError};
use crate::util::{IdMap, IdSet};
use crate::verbs::{RemoteRegion, WcStatus};

const RPC_HDR: usize = 16;
/// RPC messages up to this size (header included) are built on the stack
/// and sent inline when they can go at once.
const SMALL_FRAME: usize = 256;
const REQUEST: u8 = 1;
const REPLY: u8 = 2;
const ERROR: u8 = 3;

/// The RPC header: kind, a zero byte, method, four zero bytes, call id.
fn put_header(w: &mut impl BufMut, kind: u8, method: u16, call: u64) {
    w.put_u8(kind);
    w.put_u8(0);
    w.put_u16_le(method);
    w.put_u32_le(0);
    w.put_u64_le(call);
}

/// Errors of RPC calls.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RpcError {
    /// No reply within the timeout. The call may still run on the server;
    /// its reply, if it comes later, is dropped (its receive slot goes back
    /// to the endpoint at once).
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The server has no handler for the method.
    #[error("no handler for method {0}")]
    NoSuchMethod(u16),
    /// The handler returned an error message.
    #[error("handler failed: {0}")]
    Handler(String),
    /// A malformed RPC message.
    #[error("malformed RPC message: {0}")]
    Malformed(String),
    /// Sending failed.
    #[error(transparent)]
    Send(#[from] SendError),
    /// The endpoint failed or the peer closed.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    Closed,
}

/// What a handler returns: the reply (one `Bytes`, or several chunks:
/// `Ok(req.into())`, `Ok(vec![a, b].into())`), or an error message. A reply
/// of one chunk costs no allocation.
pub type Reply = Result<Msg, String>;

type Handler = Box<dyn FnMut(&mut BulkCtx<'_>, Bytes) -> Reply + Send>;

/// Lets a handler move bulk data with one-sided operations while it runs.
pub struct BulkCtx<'a> {
    ep: &'a mut Endpoint,
    scratch: &'a Arena,
}

impl BulkCtx<'_> {
    /// Pull the client's `remote` region into one of the server's bulk
    /// buffers (RDMA READ); see [`BulkCtx::pull_into`] to choose the slot.
    pub fn pull(&mut self, remote: RemoteRegion) -> Result<SlotMut, RpcError> {
        let dest = self
            .scratch
            .alloc()
            .ok_or_else(|| RpcError::Handler("no bulk buffer free".into()))?;
        self.pull_into(remote, dest)
    }

    /// Pull the client's `remote` region into `dest`, a slot of the
    /// handler's own (RDMA READ): e.g. a store's arena, so the bytes land
    /// where they are kept, with no copy after the device's. Returns the
    /// slot filled to the region's length; `dest` is dropped (home to its
    /// arena) if the pull fails.
    pub fn pull_into(&mut self, remote: RemoteRegion, dest: SlotMut) -> Result<SlotMut, RpcError> {
        if remote.len as usize > dest.capacity() {
            return Err(RpcError::Handler(format!(
                "bulk of {} bytes exceeds the destination slot of {}",
                remote.len,
                dest.capacity()
            )));
        }
        Ok(block_on_ep(self.ep.read(remote, dest))?)
    }

    /// Push `data` into the client's `remote` region (RDMA WRITE).
    pub fn push(&mut self, data: impl Into<Msg>, remote: RemoteRegion) -> Result<(), RpcError> {
        match block_on_ep(self.ep.write(data, remote))? {
            WcStatus::Success => Ok(()),
            st => Err(RpcError::Handler(format!("bulk push failed: {st}"))),
        }
    }
}

/// Drive a future that only needs the endpoint's own progress (its waker
/// wakes this thread).
fn block_on_ep<F: std::future::Future>(f: F) -> F::Output {
    let waker = crate::util::thread_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park_timeout(Duration::from_millis(1));
    }
}

/// An RPC peer: client, server or both over one endpoint.
pub struct Rpc {
    ep: Endpoint,
    handlers: IdMap<u16, Handler>,
    /// The first reply not yet collected: a caller that waits for each
    /// call in turn finds it here, without a map's insert and removal.
    ready: Option<(u64, Result<Bytes, RpcError>)>,
    /// The other replies not yet collected.
    replies: IdMap<u64, Result<Bytes, RpcError>>,
    /// Calls whose wait timed out: their replies are dropped on arrival.
    abandoned: IdSet<u64>,
    next_call: u64,
    hdrs: Arena,
    bulk: Arena,
    spill_after: usize,
}

impl std::fmt::Debug for Rpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rpc")
            .field("endpoint", &self.ep)
            .field("methods", &self.handlers.len())
            .finish()
    }
}

impl Rpc {
    /// RPC over `ep`; the server side pulls bulk data into buffers of
    /// `bulk_size` bytes (four of them).
    pub fn new(ep: Endpoint, bulk_size: usize) -> Result<Rpc, EndpointError> {
        let hdrs = ep.pd().arena(ArenaConfig {
            huge_pages: HugePages::Never,
            ..ArenaConfig::new(64, 1024)
        })?;
        let bulk = ep.pd().arena(ArenaConfig {
            huge_pages: HugePages::Never,
            ..ArenaConfig::new(bulk_size.max(4096), 4)
        })?;
        let spill_after = (ep.recv_slots() / 2).max(1);
        Ok(Rpc {
            spill_after,
            ep,
            handlers: IdMap::default(),
            ready: None,
            replies: IdMap::default(),
            abandoned: IdSet::default(),
            next_call: 1,
            hdrs,
            bulk,
        })
    }

    /// The endpoint (e.g. to expose memory for bulk transfers).
    pub fn endpoint(&mut self) -> &mut Endpoint {
        &mut self.ep
    }

    /// Register `handler` for `method`.
    pub fn handle(
        &mut self,
        method: u16,
        handler: impl FnMut(&mut BulkCtx<'_>, Bytes) -> Reply + Send + 'static,
    ) {
        self.handlers.insert(method, Box::new(handler));
    }

    fn header(&self, kind: u8, method: u16, call: u64) -> Result<Bytes, RpcError> {
        let mut s = self
            .hdrs
            .alloc()
            .ok_or_else(|| RpcError::Handler("no RPC header slot free".into()))?;
        put_header(&mut s, kind, method, call);
        Ok(s.freeze())
    }

    /// Start a call without waiting; returns its id for [`Rpc::poll_reply`].
    pub fn start_call(&mut self, method: u16, request: impl Into<Msg>) -> Result<u64, RpcError> {
        let call = self.next_call;
        self.next_call += 1;
        self.send_framed(REQUEST, method, call, request.into())?;
        Ok(call)
    }

    /// Send one RPC message: its header, then `body`. A small one goes at
    /// once as one inline request built on the stack (no header slot, no
    /// gather of two chunks); a larger one, or one that cannot go at once,
    /// as the header slot and `body`'s own chunks (zero-copy when registered).
    fn send_framed(&mut self, kind: u8, method: u16, call: u64, body: Msg) -> Result<(), RpcError> {
        let len = RPC_HDR + body.len() as usize;
        if len <= SMALL_FRAME && len <= self.ep.inline_limit() {
            let mut buf = [0u8; SMALL_FRAME];
            put_header(&mut &mut buf[..RPC_HDR], kind, method, call);
            body.copy_to(&mut buf[RPC_HDR..len]);
            if self.ep.try_send_slice(&buf[..len])?.is_some() {
                return Ok(());
            }
        }
        let hdr = self.header(kind, method, call)?;
        let msg = match body {
            Msg::One(b) => Msg::Two([hdr, b]),
            Msg::Two([a, b]) => Msg::Many(vec![hdr, a, b]),
            Msg::Many(v) => {
                let mut chunks = Vec::with_capacity(1 + v.len());
                chunks.push(hdr);
                chunks.extend(v);
                Msg::Many(chunks)
            }
        };
        self.ep.try_send(msg)?;
        Ok(())
    }

    /// Make progress: serve requests, collect replies. Returns true if a
    /// message (a request or a reply) was handled. One poll when nothing
    /// is there (`Endpoint::try_recv` makes the endpoint's progress).
    pub fn progress(&mut self) -> Result<bool, RpcError> {
        let mut did = false;
        loop {
            match self.ep.try_recv()? {
                None => break,
                Some(Recv::Eos) => {
                    if did {
                        break;
                    }
                    return Err(RpcError::Closed);
                }
                Some(Recv::Message(m)) => {
                    did = true;
                    self.dispatch(m)?;
                }
            }
        }
        Ok(did)
    }

    fn dispatch(&mut self, mut m: Bytes) -> Result<(), RpcError> {
        let Some(h) = m.get(..RPC_HDR) else {
            return Err(RpcError::Malformed(format!("{}-byte message", m.len())));
        };
        // Read in place, then stepped over (no second handle on the slot).
        let kind = h[0];
        let method = u16::from_le_bytes([h[2], h[3]]);
        let call = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        m.advance(RPC_HDR);
        match kind {
            REQUEST => {
                let reply = match self.handlers.get_mut(&method) {
                    Some(f) => {
                        let mut ctx = BulkCtx {
                            ep: &mut self.ep,
                            scratch: &self.bulk,
                        };
                        f(&mut ctx, m)
                    }
                    None => Err(format!("no handler for method {method}")),
                };
                let (kind, body) = match reply {
                    Ok(body) => (REPLY, body),
                    Err(e) => (ERROR, Msg::One(Bytes::from(e.into_bytes()))),
                };
                self.send_framed(kind, method, call, body)?;
            }
            REPLY | ERROR if call == 0 || call >= self.next_call => {
                return Err(RpcError::Malformed(format!(
                    "a reply to call {call}, which was never made"
                )));
            }
            REPLY | ERROR if !self.abandoned.is_empty() && self.abandoned.remove(&call) => {
                // The reply to a call that timed out: dropped, its slot home.
            }
            REPLY => {
                // Replies nobody collected yet hold receive slots; past half of
                // them, keep copies instead so the server can go on replying
                // (counted as `spill`).
                let m =
                    if self.replies.len() + usize::from(self.ready.is_some()) >= self.spill_after {
                        self.ep
                            .pd()
                            .stats()
                            .add(crate::stats::CopyReason::Spill, m.len() as u64);
                        Bytes::copy_from_slice(&m)
                    } else {
                        m
                    };
                self.keep_reply(call, Ok(m));
            }
            ERROR => {
                let text = String::from_utf8_lossy(&m).into_owned();
                let err = if text.starts_with("no handler for method") {
                    RpcError::NoSuchMethod(method)
                } else {
                    RpcError::Handler(text)
                };
                self.keep_reply(call, Err(err));
            }
            k => return Err(RpcError::Malformed(format!("RPC kind {k}"))),
        }
        Ok(())
    }

    fn keep_reply(&mut self, call: u64, r: Result<Bytes, RpcError>) {
        if self.ready.is_none() {
            self.ready = Some((call, r));
        } else {
            self.replies.insert(call, r);
        }
    }

    /// The reply to `call`, if it arrived.
    pub fn poll_reply(&mut self, call: u64) -> Option<Result<Bytes, RpcError>> {
        match self.ready.take() {
            Some((c, r)) if c == call => Some(r),
            other => {
                self.ready = other;
                self.replies.remove(&call)
            }
        }
    }

    /// Call `method` and wait up to `timeout` for the reply (blocking, spinning
    /// first, then sleeping on the transport's readiness).
    pub fn call(
        &mut self,
        method: u16,
        request: impl Into<Msg>,
        timeout: Duration,
    ) -> Result<Bytes, RpcError> {
        let call = self.start_call(method, request)?;
        self.wait_reply(call, timeout)
    }

    /// Wait for the reply to a started call.
    pub fn wait_reply(&mut self, call: u64, timeout: Duration) -> Result<Bytes, RpcError> {
        // A reply that arrives within the first polls (a call's round trip
        // on a fast transport) costs no clock read: each costs ~20-40 ns
        // on these VMs, several times an empty poll.
        for _ in 0..crate::endpoint::CLOCKLESS_POLLS {
            self.progress()?;
            if let Some(r) = self.poll_reply(call) {
                return r;
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            self.progress()?;
            if let Some(r) = self.poll_reply(call) {
                return r;
            }
            if Instant::now() >= deadline {
                // Nobody will collect the reply: drop it when it comes,
                // instead of holding its receive slot for good.
                self.abandoned.insert(call);
                return Err(RpcError::Timeout(timeout));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let before = self.ep.received_count();
            match self.ep.wait(left.min(Duration::from_millis(10)), |e| {
                e.received_count() > before || e.failure().is_some() || e.is_eos()
            }) {
                Ok(()) | Err(EndpointError::Timeout(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Serve requests until the peer closes or `timeout` passes without traffic.
    pub fn serve(&mut self, idle_timeout: Duration) -> Result<(), RpcError> {
        // The clock is read every 64 turns only (it can cost more than a
        // turn); the idle time is measured from the last check that saw
        // traffic since the one before.
        let mut last = Instant::now();
        let (mut turns, mut active) = (0u32, false);
        loop {
            match self.progress() {
                Ok(true) => active = true,
                Ok(false) => {}
                Err(RpcError::Closed) => {
                    // The peer is done: close our side too, and wait until it went out.
                    self.ep.try_close()?;
                    return self
                        .ep
                        .wait(idle_timeout, |e| e.close_delivered())
                        .map_err(RpcError::from);
                }
                Err(e) => return Err(e),
            }
            turns = turns.wrapping_add(1);
            if turns % 64 == 0 {
                let now = Instant::now();
                if std::mem::take(&mut active) {
                    last = now;
                } else if now.duration_since(last) > idle_timeout {
                    return Err(RpcError::Timeout(idle_timeout));
                }
            }
        }
    }
}
