//! Device-level benchmarks over the `Transport` trait: the same code measures
//! every transport. Each test has a server half and a client half, connected
//! through `listen`/`connect` and the exchange of [`crate::wire`]; each half
//! is driven by one busy-polling thread, in this process (the server in a
//! thread: [`in_process`]) or in two (`zcperf --server` and `zcperf HOST`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BufMut;
use zcmsg::{
    Access, Arena, ArenaConfig, Listener, Opcode, Pd, QpConfig, QueuePair, RecvRequest,
    RemoteRegion, SendFlags, SlotMut, Transport, WcStatus, WorkCompletion, WorkRequest,
};

use crate::wire::{Ctrl, Hello, TestKind, CTRL_LEN, CTRL_WAIT, HELLO_LEN};

/// Busy-wait loops read the clock for their deadline once per this many
/// polls: a clock read costs ~40 ns on these VMs, as much as a poll.
pub const CLOCK_EVERY: u64 = 256;

/// The time limit of one busy wait, checked every [`CLOCK_EVERY`] spins:
/// it reads the clock for the first time after that many, so a wait that
/// ends sooner (every wait of a healthy run) reads no clock at all.
pub struct Patience {
    spins: u64,
    since: Option<Instant>,
    limit: Duration,
}

impl Patience {
    /// A wait that may last about `limit`.
    #[inline]
    pub fn new(limit: Duration) -> Patience {
        Patience {
            spins: 0,
            since: None,
            limit,
        }
    }

    /// One more spin: true once the wait has lasted longer than its limit.
    #[inline]
    pub fn spun_out(&mut self) -> bool {
        self.spins += 1;
        if self.spins % CLOCK_EVERY != 0 {
            return false;
        }
        let now = Instant::now();
        match self.since {
            None => {
                self.since = Some(now);
                false
            }
            Some(s) => now.duration_since(s) > self.limit,
        }
    }
}

/// How to run one test.
#[derive(Clone, Debug)]
pub struct Params {
    /// Message size.
    pub size: usize,
    /// Iterations (messages).
    pub iters: u64,
    /// Send queue depth / most requests in flight.
    pub tx_depth: u32,
    /// Receives kept posted.
    pub rx_depth: u32,
    /// Requests per post list (one doorbell) and per signaled completion.
    pub post_list: u32,
    /// Use inline sends up to the queue pair's limit.
    pub inline: bool,
}

/// Bytes of receive buffers a SEND stream's receiver posts at most: `-r`
/// is cut to fit (keeping at least 16), since 512 receives of 8 MiB would
/// pin 4 GiB on each side.
pub const RECV_BUDGET: usize = 256 << 20;

impl Params {
    /// Receives a SEND stream's receiver posts: `rx_depth`, cut to
    /// [`RECV_BUDGET`].
    pub fn stream_recvs(&self) -> u32 {
        let fit = (RECV_BUDGET / self.size.max(1)).max(16);
        self.rx_depth.min(u32::try_from(fit).unwrap_or(u32::MAX))
    }
}

/// Per-iteration one-way latencies in nanoseconds, taken by
/// [`crate::report::RttClock`] (RTT/2, the timer's own cost subtracted).
pub struct Latency {
    /// Samples.
    pub samples: Vec<u64>,
}

/// A throughput run.
pub struct Bandwidth {
    /// Messages moved.
    pub msgs: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Wall time at the measuring side.
    pub elapsed: Duration,
}

/// One side of a run: its queue pair, an arena for its messages, receives
/// and control messages, and the receive slots by receive id.
pub(crate) struct Side {
    pub(crate) pd: Pd,
    pub(crate) qp: Box<dyn QueuePair>,
    arena: Arena,
    recv: Vec<Option<SlotMut>>,
    ctrl_tx: SlotMut,
    pub(crate) wc: [WorkCompletion; 32],
}

/// The receive id of nothing, and the request id of a control SEND (the
/// tests' loops skip its completion like any other unsignaled-for-them
/// send).
const CTRL_TX: u64 = u64::MAX;

/// The queue pair the raw tests ask for: `p`'s depths and inlining.
pub fn qp_config(p: &Params) -> QpConfig {
    QpConfig {
        max_send_wr: p.tx_depth,
        max_recv_wr: p.rx_depth,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: if p.inline { 256 } else { 0 },
        rnr_retry: 7,
        ..QpConfig::default()
    }
}

/// Run a test's two halves in this process: `serve` in a thread on a
/// listener at `addr` of `b`, the client (`client`, handed the address to
/// connect to) here. Both halves' failures are reported.
pub fn in_process<T>(
    b: &Arc<dyn Transport>,
    addr: &str,
    cfg: &QpConfig,
    serve: impl FnOnce(&mut dyn Listener) -> Result<Served, String> + Send + 'static,
    client: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, String> {
    let mut listener = b
        .listen(addr, cfg)
        .map_err(|e| format!("listen {addr}: {e}"))?;
    let at = listener.local_addr();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(serve(&mut *listener)));
    let c = client(&at);
    // A failed client may leave the server waiting for it (in `accept`,
    // say): its verdict is awaited for a while, not for the server's
    // whole bound.
    let verdict = match c {
        Ok(_) => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        Err(_) => rx.recv_timeout(Duration::from_secs(5)),
    };
    let s = verdict.unwrap_or_else(|e| match e {
        RecvTimeoutError::Timeout => Err("still waiting 5 s after the client failed".into()),
        RecvTimeoutError::Disconnected => Err("the server panicked".into()),
    });
    match (c, s) {
        (Ok(t), Ok(_)) => Ok(t),
        (Err(c), Ok(_)) => Err(c),
        (Ok(_), Err(s)) => Err(format!("the server: {s}")),
        (Err(c), Err(s)) => Err(format!("{c}; the server: {s}")),
    }
}

/// What a server half ran, for its report.
#[derive(Clone, Debug)]
pub struct Served {
    /// The client's request.
    pub hello: Hello,
    /// For the endpoint stream, which the server measures: the messages
    /// received and the nanoseconds they took.
    pub measured: Option<(u64, u64)>,
}

/// The client's half of connecting: connect with `hello` as private data,
/// post two receives for the server's control messages and `recvs` for the
/// test, and wait for the answer: the server's window for the WRITE tests.
pub(crate) fn connect_client(
    t: Arc<dyn Transport>,
    at: &str,
    cfg: &QpConfig,
    hello: Hello,
    recvs: u32,
) -> Result<(Side, Option<RemoteRegion>), String> {
    let qp = t
        .connect(at, cfg, &Ctrl::Hello(hello).encode()[..HELLO_LEN])
        .map_err(|e| format!("connect {at}: {e}"))?;
    crate::wire::connected(&*qp)?;
    // One receive for the server's `Ready`, one for its closing `Done`.
    let mut side = Side::new(t, qp, hello.size as usize, recvs + 3)?;
    side.post_receives(2 + recvs)?;
    match side.wait_ctrl()? {
        Ctrl::Ready(w) => Ok((side, w)),
        Ctrl::Refuse(why) => Err(format!("the server refused: {why}")),
        other => Err(format!("the server answered {other:?}, not ready")),
    }
}

/// The server's half of connecting: accept one client, read its request
/// and refuse it (telling the client why) unless it asks for `want`.
/// Posts `recvs(hello)` receives; the caller sets up the rest and sends
/// [`Ctrl::Ready`] with [`Side::send_ctrl`].
pub(crate) fn accept_client(
    t: Arc<dyn Transport>,
    l: &mut dyn Listener,
    want: TestKind,
    recvs: impl Fn(&Hello) -> u32,
    extra_slots: u32,
) -> Result<(Side, Hello), String> {
    let (qp, private) = l
        .accept(Duration::from_secs(120))
        .map_err(|e| format!("accept: {e}"))?;
    crate::wire::connected(&*qp)?;
    let max = u64::from(t.caps().max_msg_sz);
    let hello = Ctrl::decode(&private).and_then(|c| match c {
        Ctrl::Hello(h) => match crate::wire::refusal(&h, want, max) {
            Some(why) => Err(why),
            None => Ok(h),
        },
        other => Err(format!("the client opened with {other:?}, not a hello")),
    });
    match hello {
        Ok(h) => {
            let n = recvs(&h);
            let mut side = Side::new(t, qp, h.size as usize, n + extra_slots + 1)?;
            side.post_receives(n)?;
            Ok((side, h))
        }
        Err(why) => {
            let mut side = Side::new(t, qp, 0, 1)?;
            let told = side
                .send_ctrl(&Ctrl::Refuse(why.clone()))
                .and_then(|()| side.wait_sent(CTRL_WAIT, false));
            Err(match told {
                Ok(()) => format!("refused the client: {why}"),
                Err(e) => format!("refused the client: {why} (and could not tell it: {e})"),
            })
        }
    }
}

impl Side {
    /// `slots` message slots of `size` bytes (at least a control message's),
    /// and one for control messages.
    fn new(
        t: Arc<dyn Transport>,
        qp: Box<dyn QueuePair>,
        size: usize,
        slots: u32,
    ) -> Result<Side, String> {
        let pd = Pd::new(t);
        let arena = pd
            .arena(ArenaConfig::new(size.max(CTRL_LEN), slots as usize + 1))
            .map_err(|e| format!("arena: {e}"))?;
        let ctrl_tx = arena.alloc().ok_or("no slot for control messages")?;
        Ok(Side {
            pd,
            qp,
            arena,
            recv: Vec::new(),
            ctrl_tx,
            wc: [WorkCompletion::EMPTY; 32],
        })
    }

    fn post_receives(&mut self, n: u32) -> Result<(), String> {
        for _ in 0..n {
            let slot = self.arena.alloc().ok_or("out of receive slots")?;
            let sge = [slot.sge()];
            let id = self.recv.len() as u64;
            self.qp
                .post_recv(&[RecvRequest {
                    wr_id: id,
                    sg_list: &sge,
                }])
                .map_err(|e| e.to_string())?;
            self.recv.push(Some(slot));
        }
        Ok(())
    }

    pub(crate) fn repost(&mut self, id: u64) -> Result<(), String> {
        let slot = self.recv[id as usize].as_ref().ok_or("unknown receive")?;
        let sge = [slot.sge()];
        self.qp
            .post_recv(&[RecvRequest {
                wr_id: id,
                sg_list: &sge,
            }])
            .map_err(|e| e.to_string())
    }

    /// The bytes receive `id` received.
    pub(crate) fn received(&mut self, wc: &WorkCompletion) -> &[u8] {
        let s = self.recv[wc.wr_id as usize]
            .as_mut()
            .expect("posted receive");
        s.set_len(wc.byte_len as usize);
        s.as_slice()
    }

    /// Send a control message (signaled, request id [`CTRL_TX`]).
    pub(crate) fn send_ctrl(&mut self, c: &Ctrl) -> Result<(), String> {
        self.ctrl_tx.set_len(CTRL_LEN);
        self.ctrl_tx.as_mut_slice().copy_from_slice(&c.encode());
        let sge = [self.ctrl_tx.sge_filled()];
        self.qp
            .post_send(&[WorkRequest::send(CTRL_TX, &sge).with_flags(SendFlags::SIGNALED)])
            .map_err(|e| format!("sending {c:?}: {e}"))
    }

    /// Wait until the control SEND has completed (every other completion
    /// on the way is checked and dropped: use it where no test traffic
    /// can be in flight). With `flush_ok`, a flushed completion ends the
    /// wait too: the peer had what it needed and left.
    pub(crate) fn wait_sent(&mut self, limit: Duration, flush_ok: bool) -> Result<(), String> {
        let mut wait = Patience::new(limit);
        loop {
            let n = self.qp.poll_cq(&mut self.wc);
            for wc in &self.wc[..n] {
                if flush_ok && wc.status == WcStatus::WrFlushErr {
                    return Ok(());
                }
                let ours = wc.wr_id == CTRL_TX && !wc.opcode.is_recv();
                if ours && wc.status != WcStatus::Success {
                    return Err(format!("the control message failed: {}", wc.status));
                }
                check(wc)?;
                if ours {
                    return Ok(());
                }
            }
            if wait.spun_out() {
                return Err("a control message was not acknowledged".into());
            }
        }
    }

    /// The next control message the peer sends: the next receive
    /// completion, after the test's traffic (send completions on the way
    /// are checked and dropped).
    ///
    /// A flushed completion on the way is not a failure by itself: a
    /// client leaves once its `Done` is acknowledged, and the server's own
    /// last sends (whose data the client has seen) may then be flushed
    /// before their acknowledgements were processed, and be polled before
    /// the `Done` (the send and receive queues complete independently). It
    /// fails the wait only if no control message follows.
    pub(crate) fn wait_ctrl(&mut self) -> Result<Ctrl, String> {
        let mut wait = Patience::new(CTRL_WAIT);
        let mut flushed = None;
        loop {
            let n = self.qp.poll_cq(&mut self.wc[..1]);
            if n == 1 {
                let wc = self.wc[0];
                if wc.status == WcStatus::WrFlushErr {
                    flushed.get_or_insert(wc.wr_id);
                    continue;
                }
                check(&wc)?;
                if wc.opcode.is_recv() {
                    return Ctrl::decode(self.received(&wc));
                }
            } else if wait.spun_out() {
                return Err(format!(
                    "no control message from the peer within {} s{}",
                    CTRL_WAIT.as_secs(),
                    flushed.map_or(String::new(), |id| format!(
                        " (completion {id} was flushed: the connection failed)"
                    ))
                ));
            }
        }
    }

    /// The client's end of a run: [`Ctrl::Done`], and the server's
    /// answer (see [`Side::await_done`]); then the client may leave.
    pub(crate) fn finish(&mut self) -> Result<(), String> {
        self.send_ctrl(&Ctrl::Done(0))?;
        match self.wait_ctrl()? {
            Ctrl::Done(_) => Ok(()),
            other => Err(format!("the server ended with {other:?}")),
        }
    }

    /// The server's end of a run: the client's [`Ctrl::Done`], answered
    /// with one of ours, which the client waits for before it leaves: so
    /// the client never tears the connection down while the server's last
    /// sends are unacknowledged here, and the answer is out before the
    /// server's queue pair goes. Its completion is awaited, or its flush
    /// (the client had it and left first).
    pub(crate) fn await_done(&mut self) -> Result<(), String> {
        match self.wait_ctrl()? {
            Ctrl::Done(_) => {}
            other => return Err(format!("the client ended with {other:?}")),
        }
        self.send_ctrl(&Ctrl::Done(0))?;
        self.wait_sent(CTRL_WAIT, true)
    }

    /// The SGEs of the receive slots, by receive id, built once: a stream
    /// reposts from them (perftest builds its receive requests once too).
    fn recv_sges(&self) -> Vec<[zcmsg::Sge; 1]> {
        self.recv
            .iter()
            .map(|s| [s.as_ref().map_or_else(zcmsg::Sge::default, SlotMut::sge)])
            .collect()
    }

    pub(crate) fn send_slot(&self, size: usize, fill: u8) -> Result<SlotMut, String> {
        let mut s = self.arena.alloc().ok_or("out of send slots")?;
        s.put_bytes(fill, size);
        Ok(s)
    }
}

pub(crate) fn check(wc: &WorkCompletion) -> Result<(), String> {
    if wc.status != WcStatus::Success {
        return Err(format!("completion {} failed: {}", wc.wr_id, wc.status));
    }
    Ok(())
}

/// The request a client of `test` sends for `p`.
pub fn hello(test: TestKind, p: &Params) -> Hello {
    Hello {
        test,
        size: p.size as u64,
        iters: p.iters,
        post_list: p.post_list,
        path: crate::wire::PingPongPath::Bytes,
    }
}

/// `p` with the run's size, iterations and post list taken from the
/// client's request (the queue depths and inlining stay the server's own).
pub fn adopt(p: &Params, h: &Hello) -> Params {
    Params {
        size: h.size as usize,
        iters: h.iters,
        post_list: h.post_list,
        ..p.clone()
    }
}

/// Receives each side of the ping-pongs keeps posted.
const PP_RECVS: u32 = 16;

/// SEND ping-pong in this process: one-way latency per iteration.
pub fn send_lat(
    a: Arc<dyn Transport>,
    b: Arc<dyn Transport>,
    addr: &str,
    p: &Params,
) -> Result<Latency, String> {
    let sp = p.clone();
    in_process(
        &b.clone(),
        addr,
        &qp_config(p),
        move |l| send_lat_server(b, l, &sp),
        |at| send_lat_client(a, at, p),
    )
}

/// The server of the SEND ping-pong: answers every request with a SEND of
/// the same size, and checks what it received.
pub fn send_lat_server(
    t: Arc<dyn Transport>,
    l: &mut dyn Listener,
    p: &Params,
) -> Result<Served, String> {
    let (mut srv, hello) = accept_client(t, l, TestKind::SendLat, |_| PP_RECVS, 1)?;
    let p = adopt(p, &hello);
    let (size, iters) = (p.size, p.iters);
    let inline = p.inline && size as u32 <= srv.qp.caps().max_inline_data;
    let msg = srv.send_slot(size, 0x5a)?;
    let sge = [msg.sge_filled()];
    let mut flags = SendFlags::NONE;
    if inline {
        flags |= SendFlags::INLINE;
    }
    srv.send_ctrl(&Ctrl::Ready(None))?;
    let request = vec![0xa5u8; size];
    let mut got = 0u64;
    let mut corrupted = 0u64;
    let mut sent = 0u64;
    let mut wait = Patience::new(Duration::from_secs(10));
    while got < iters {
        let n = srv.qp.poll_cq(&mut srv.wc);
        for i in 0..n {
            let wc = srv.wc[i];
            check(&wc)?;
            if wc.opcode.is_recv() {
                got += 1;
                // The reply first: reading the request and reposting its
                // receive (15 others stay posted) are off the critical
                // path, as a latency-minded echo orders them.
                sent += 1;
                let f = if sent % 64 == 0 {
                    flags | SendFlags::SIGNALED
                } else {
                    flags
                };
                srv.qp
                    .post_send(&[WorkRequest::send(sent, &sge).with_flags(f)])
                    .map_err(|e| e.to_string())?;
                if srv.received(&wc) != &request[..] {
                    corrupted += 1;
                }
                srv.repost(wc.wr_id)?;
                wait = Patience::new(Duration::from_secs(10));
            }
        }
        if n == 0 && wait.spun_out() {
            return Err(format!("no request {got} of {iters} within 10 s"));
        }
    }
    if corrupted > 0 {
        return Err(format!("{corrupted} of {iters} requests arrived corrupted"));
    }
    srv.await_done()?;
    Ok(Served {
        hello,
        measured: None,
    })
}

/// The client of the SEND ping-pong: one-way latency per iteration, each
/// echo checked byte for byte.
pub fn send_lat_client(t: Arc<dyn Transport>, at: &str, p: &Params) -> Result<Latency, String> {
    let (mut cli, _) = connect_client(t, at, &qp_config(p), hello(TestKind::SendLat, p), PP_RECVS)?;
    let size = p.size;
    let iters = p.iters;
    let inline = p.inline && size as u32 <= cli.qp.caps().max_inline_data;
    let msg = cli.send_slot(size, 0xa5)?;
    let sge = [msg.sge_filled()];
    let mut flags = SendFlags::NONE;
    if inline {
        flags |= SendFlags::INLINE;
    }
    let echo = vec![0x5au8; size];
    let mut echoed = 0u64;
    // The echo of the previous iteration: checked and its receive reposted
    // after the next SEND is posted, off the critical path (the server
    // orders its side the same way).
    let mut last_echo: Option<WorkCompletion> = None;
    let mut take_echo = |cli: &mut Side, wc: WorkCompletion| -> Result<(), String> {
        // Every byte checked, with one `memcmp` (a byte loop is ~4
        // instructions a byte, which under full emulation is time perftest
        // does not spend).
        if cli.received(&wc) != &echo[..] {
            return Err("echo corrupted".into());
        }
        echoed += 1;
        cli.repost(wc.wr_id)
    };
    let mut clk = crate::report::RttClock::start(iters);
    for it in 0..iters {
        let f = if (it + 1) % 64 == 0 {
            flags | SendFlags::SIGNALED
        } else {
            flags
        };
        cli.qp
            .post_send(&[WorkRequest::send(it, &sge).with_flags(f)])
            .map_err(|e| e.to_string())?;
        if let Some(wc) = last_echo.take() {
            take_echo(&mut cli, wc)?;
        }
        let mut wait = Patience::new(Duration::from_secs(10));
        'wait: loop {
            let n = cli.qp.poll_cq(&mut cli.wc);
            for i in 0..n {
                let wc = cli.wc[i];
                check(&wc)?;
                if wc.opcode.is_recv() {
                    clk.lap();
                    last_echo = Some(wc);
                    break 'wait;
                }
            }
            if wait.spun_out() {
                return Err(format!("no echo for iteration {it} within 10 s"));
            }
        }
    }
    if let Some(wc) = last_echo.take() {
        take_echo(&mut cli, wc)?;
    }
    if echoed != iters {
        return Err("lost echoes".into());
    }
    cli.finish()?;
    Ok(Latency {
        samples: clk.into_samples(),
    })
}

/// The in-process flow control of a SEND stream: how many messages the
/// receiver has taken and reposted the receive of, so that the sender
/// never has more in flight than there are receives and the device never
/// takes the receiver-not-ready path. Between processes there is none:
/// the stream relies on RNR retries, as perftest's `ib_send_bw` does.
pub type Reposted = Arc<AtomicU64>;

/// One-directional SEND (or RDMA WRITE) stream in this process: messages
/// per second at the sender, counted until every message is acknowledged
/// by its completion.
pub fn stream_bw(
    a: Arc<dyn Transport>,
    b: Arc<dyn Transport>,
    addr: &str,
    p: &Params,
    op: Opcode,
) -> Result<Bandwidth, String> {
    let flow: Reposted = Arc::default();
    let (sp, sflow) = (p.clone(), flow.clone());
    in_process(
        &b.clone(),
        addr,
        &qp_config(p),
        move |l| stream_server(b, l, &sp, op, Some(sflow)),
        |at| stream_client(a, at, p, op, Some(flow)),
    )
}

fn stream_test(op: Opcode) -> TestKind {
    if op == Opcode::RdmaWrite {
        TestKind::WriteBw
    } else {
        TestKind::SendBw
    }
}

/// The passive side of a stream: for SENDs, keeps `rx_depth` receives
/// posted and checks every message; for RDMA WRITEs, exposes a window and
/// checks what it holds once the client is done.
pub fn stream_server(
    t: Arc<dyn Transport>,
    l: &mut dyn Listener,
    p: &Params,
    op: Opcode,
    flow: Option<Reposted>,
) -> Result<Served, String> {
    let test = stream_test(op);
    // A WRITE stream posts one receive: for the client's `Done`.
    let (mut srv, hello) = accept_client(
        t,
        l,
        test,
        |h| {
            if op == Opcode::Send {
                adopt(p, h).stream_recvs()
            } else {
                1
            }
        },
        0,
    )?;
    let p = adopt(p, &hello);
    let (size, iters) = (p.size, p.iters);
    if op == Opcode::RdmaWrite {
        let window = srv
            .pd
            .window(size.max(1), Access::REMOTE_WRITE)
            .map_err(|e| e.to_string())?;
        srv.send_ctrl(&Ctrl::Ready(Some(window.remote())))?;
        srv.await_done()?;
        let r = window.revoke();
        if r.as_slice()[..size].iter().any(|&b| b != 0x33) {
            return Err("RDMA WRITE target does not hold the written bytes".into());
        }
        return Ok(Served {
            hello,
            measured: None,
        });
    }
    srv.send_ctrl(&Ctrl::Ready(None))?;
    let mut got = 0u64;
    let mut bad = 0u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut spins = 0u64;
    let sges = srv.recv_sges();
    let mut wrs: Vec<RecvRequest<'_>> = Vec::with_capacity(srv.wc.len());
    let start = Instant::now();
    while got < iters {
        // Never more completions than messages to come: the client's
        // `Done` may follow the last one closely.
        let room = (iters - got).min(srv.wc.len() as u64) as usize;
        let n = srv.qp.poll_cq(&mut srv.wc[..room]);
        wrs.clear();
        for i in 0..n {
            let wc = srv.wc[i];
            check(&wc)?;
            if wc.opcode.is_recv() {
                got += 1;
                let s = srv.recv[wc.wr_id as usize].as_mut().unwrap();
                s.set_len(wc.byte_len as usize);
                if s.len() != size || s.as_slice().first().is_some_and(|&b| b != 0x33) {
                    bad += 1;
                }
                wrs.push(RecvRequest {
                    wr_id: wc.wr_id,
                    sg_list: &sges[wc.wr_id as usize],
                });
            }
        }
        // One post list for everything this poll returned.
        if !wrs.is_empty() {
            srv.qp.post_recv(&wrs).map_err(|e| e.to_string())?;
            if let Some(f) = &flow {
                f.store(got, Ordering::Release);
            }
        }
        spins += 1;
        if spins % CLOCK_EVERY == 0 && Instant::now() > deadline {
            return Err(format!("receiver got {got} of {iters} in 120 s"));
        }
    }
    let nanos = start.elapsed().as_nanos() as u64;
    if bad > 0 {
        return Err(format!("{bad} messages arrived corrupted"));
    }
    srv.await_done()?;
    Ok(Served {
        hello,
        measured: Some((got, nanos)),
    })
}

/// The active side of a stream: posts lists of `post_list` requests, one
/// signaled, at most `tx_depth` in flight (and, in this process, no more
/// SENDs than the receiver has receives: `flow`).
pub fn stream_client(
    t: Arc<dyn Transport>,
    at: &str,
    p: &Params,
    op: Opcode,
    flow: Option<Reposted>,
) -> Result<Bandwidth, String> {
    let (mut cli, remote) = connect_client(t, at, &qp_config(p), hello(stream_test(op), p), 0)?;
    if op == Opcode::RdmaWrite && remote.is_none_or(|r| r.len < p.size as u64) {
        return Err(format!(
            "the server's window {remote:?} cannot take {} bytes",
            p.size
        ));
    }
    let size = p.size;
    let iters = p.iters;
    let batch = p.post_list.max(1) as u64;
    let msg = cli.send_slot(size, 0x33)?;
    let sge = [msg.sge_filled()];
    let inline = p.inline && size as u32 <= cli.qp.caps().max_inline_data && op == Opcode::Send;
    let mut wrs: Vec<WorkRequest<'_>> = Vec::with_capacity(batch as usize);
    let max_batches_in_flight = (u64::from(p.tx_depth) / batch).max(1);
    let (mut posted, mut done_batches, mut posted_batches) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(120);
    let mut spins = 0u64;
    let room = |posted: u64| match &flow {
        Some(f) if op == Opcode::Send => {
            posted + batch <= f.load(Ordering::Acquire) + u64::from(p.stream_recvs())
        }
        _ => true,
    };
    while done_batches * batch < iters {
        while posted < iters
            && posted_batches - done_batches < max_batches_in_flight
            && room(posted)
        {
            wrs.clear();
            let n = batch.min(iters - posted);
            for k in 0..n {
                let mut f = if k + 1 == n {
                    SendFlags::SIGNALED
                } else {
                    SendFlags::NONE
                };
                if inline {
                    f |= SendFlags::INLINE;
                }
                let wr = match (op, remote) {
                    (Opcode::RdmaWrite, Some(r)) => {
                        WorkRequest::one_sided(posted + k, Opcode::RdmaWrite, &sge, r.addr, r.rkey)
                    }
                    _ => WorkRequest::send(posted + k, &sge),
                };
                wrs.push(wr.with_flags(f));
            }
            cli.qp.post_send(&wrs).map_err(|e| e.to_string())?;
            posted += n;
            posted_batches += 1;
        }
        let n = cli.qp.poll_cq(&mut cli.wc);
        for i in 0..n {
            if let Err(e) = check(&cli.wc[i]) {
                // Report every completion of the failure, not just the first flush.
                let mut all = format!("{e}; completions:");
                for w in &cli.wc[..n] {
                    all += &format!(" [{} {:?} {}]", w.wr_id, w.opcode, w.status);
                }
                return Err(all);
            }
            done_batches += 1;
        }
        if posted == iters && done_batches == posted_batches {
            break;
        }
        spins += 1;
        if spins % CLOCK_EVERY == 0 && Instant::now() > deadline {
            return Err("sender stalled".into());
        }
    }
    let elapsed = start.elapsed();
    cli.finish()?;
    Ok(Bandwidth {
        msgs: iters,
        bytes: iters * size as u64,
        elapsed,
    })
}
