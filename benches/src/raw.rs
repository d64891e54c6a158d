//! Device-level benchmarks over the `Transport` trait: the same code measures
//! every transport. Two queue pairs are connected through `listen`/`connect`
//! (server side in its own thread), each driven by one busy-polling thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BufMut;
use zcmsg::{
    Access, Arena, ArenaConfig, Opcode, Pd, QpConfig, QueuePair, RecvRequest, SendFlags, SlotMut,
    Transport, WcStatus, WorkCompletion, WorkRequest,
};

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

struct Side {
    _pd: Pd,
    qp: Box<dyn QueuePair>,
    arena: Arena,
    recv: Vec<Option<SlotMut>>,
    wc: [WorkCompletion; 32],
}

fn qp_config(p: &Params) -> QpConfig {
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

/// Connect two sides, the server through `listen` at `addr` in a thread.
fn connect(
    a: Arc<dyn Transport>,
    b: Arc<dyn Transport>,
    addr: &str,
    p: &Params,
) -> Result<(Side, Side), String> {
    let cfg = qp_config(p);
    let mut listener = b
        .listen(addr, &cfg)
        .map_err(|e| format!("listen {addr}: {e}"))?;
    let at = listener.local_addr();
    let acc = std::thread::spawn(move || listener.accept(Duration::from_secs(20)));
    let qa = a
        .connect(&at, &cfg, b"zcperf")
        .map_err(|e| format!("connect {at}: {e}"))?;
    let (qb, _) = acc
        .join()
        .map_err(|_| "accept thread panicked".to_string())?
        .map_err(|e| format!("accept: {e}"))?;
    let mk = |t: Arc<dyn Transport>, qp: Box<dyn QueuePair>| -> Result<Side, String> {
        let pd = Pd::new(t);
        let slots = (p.rx_depth + p.tx_depth + 4) as usize;
        let arena = pd
            .arena(ArenaConfig::new(p.size.max(64), slots))
            .map_err(|e| format!("arena: {e}"))?;
        Ok(Side {
            _pd: pd,
            qp,
            arena,
            recv: Vec::new(),
            wc: [WorkCompletion::EMPTY; 32],
        })
    };
    Ok((mk(a, qa)?, mk(b, qb)?))
}

impl Side {
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

    fn repost(&mut self, id: u64) -> Result<(), String> {
        let slot = self.recv[id as usize].as_ref().ok_or("unknown receive")?;
        let sge = [slot.sge()];
        self.qp
            .post_recv(&[RecvRequest {
                wr_id: id,
                sg_list: &sge,
            }])
            .map_err(|e| e.to_string())
    }

    /// The SGEs of the receive slots, by receive id, built once: a stream
    /// reposts from them (perftest builds its receive requests once too).
    fn recv_sges(&self) -> Vec<[zcmsg::Sge; 1]> {
        self.recv
            .iter()
            .map(|s| [s.as_ref().map_or_else(zcmsg::Sge::default, SlotMut::sge)])
            .collect()
    }

    fn send_slot(&self, size: usize, fill: u8) -> Result<SlotMut, String> {
        let mut s = self.arena.alloc().ok_or("out of send slots")?;
        s.put_bytes(fill, size);
        Ok(s)
    }
}

fn check(wc: &WorkCompletion) -> Result<(), String> {
    if wc.status != WcStatus::Success {
        return Err(format!("completion {} failed: {}", wc.wr_id, wc.status));
    }
    Ok(())
}

/// SEND ping-pong: one-way latency per iteration.
pub fn send_lat(
    a: Arc<dyn Transport>,
    b: Arc<dyn Transport>,
    addr: &str,
    p: &Params,
) -> Result<Latency, String> {
    let (mut cli, mut srv) = connect(a, b, addr, p)?;
    cli.post_receives(p.rx_depth.min(16))?;
    srv.post_receives(p.rx_depth.min(16))?;
    let size = p.size;
    let iters = p.iters;
    let inline = p.inline && size as u32 <= cli.qp.caps().max_inline_data;
    let server = std::thread::spawn(move || -> Result<u64, String> {
        let msg = srv.send_slot(size, 0x5a)?;
        let sge = [msg.sge_filled()];
        let mut flags = SendFlags::NONE;
        if inline {
            flags |= SendFlags::INLINE;
        }
        let mut got = 0u64;
        let mut checksum = 0u64;
        let mut sent = 0u64;
        while got < iters {
            let n = srv.qp.poll_cq(&mut srv.wc);
            for i in 0..n {
                let wc = srv.wc[i];
                check(&wc)?;
                if wc.opcode.is_recv() {
                    got += 1;
                    // The reply first: reading the request and reposting
                    // its receive (15 others stay posted) are off the
                    // critical path, as a latency-minded echo orders them.
                    sent += 1;
                    let f = if sent % 64 == 0 {
                        flags | SendFlags::SIGNALED
                    } else {
                        flags
                    };
                    srv.qp
                        .post_send(&[WorkRequest::send(sent, &sge).with_flags(f)])
                        .map_err(|e| e.to_string())?;
                    if size > 0 {
                        let s = srv.recv[wc.wr_id as usize].as_mut().unwrap();
                        s.set_len(wc.byte_len as usize);
                        checksum += u64::from(s.as_slice()[0]);
                    }
                    srv.repost(wc.wr_id)?;
                }
            }
        }
        // Drain the last signaled sends so nothing is in flight at teardown.
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(200) {
            srv.qp.poll_cq(&mut srv.wc);
        }
        Ok(checksum)
    });
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
        if size > 0 {
            let s = cli.recv[wc.wr_id as usize].as_mut().unwrap();
            s.set_len(wc.byte_len as usize);
            // Every byte checked, with one `memcmp` (a byte loop is ~4
            // instructions a byte, which under full emulation is time
            // perftest does not spend).
            if s.as_slice() != &echo[..] {
                return Err("echo corrupted".into());
            }
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
    let checksum = server.join().map_err(|_| "server panicked")??;
    if size > 0 && checksum != 0xa5 * iters {
        return Err("server saw corrupted data".into());
    }
    if echoed != iters {
        return Err("lost echoes".into());
    }
    Ok(Latency {
        samples: clk.into_samples(),
    })
}

/// One-directional SEND (or RDMA WRITE) stream: messages per second at the sender,
/// counted until every message is acknowledged by its completion.
pub fn stream_bw(
    a: Arc<dyn Transport>,
    b: Arc<dyn Transport>,
    addr: &str,
    p: &Params,
    op: Opcode,
) -> Result<Bandwidth, String> {
    let (mut cli, mut srv) = connect(a, b, addr, p)?;
    let size = p.size;
    let iters = p.iters;
    let batch = p.post_list.max(1) as u64;
    let window = if op == Opcode::RdmaWrite {
        Some(
            srv._pd
                .window(size.max(1), Access::REMOTE_WRITE)
                .map_err(|e| e.to_string())?,
        )
    } else {
        srv.post_receives(p.rx_depth)?;
        None
    };
    let remote = window.as_ref().map(|w| w.remote());
    // The passive side of a WRITE stream must stay alive (not moved into a
    // closure that is never run) until the end.
    let mut keep_srv = None;
    // In-process flow control for the SEND stream: the sender never has more
    // SENDs in flight than the receiver has receives posted (as credits do in
    // the endpoints), so the device never takes the receiver-not-ready path.
    let reposted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reposted_srv = reposted.clone();
    let server = if op != Opcode::Send {
        keep_srv = Some(srv);
        None
    } else {
        Some(std::thread::spawn(move || -> Result<u64, String> {
            let mut got = 0u64;
            let mut bad = 0u64;
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut spins = 0u64;
            let sges = srv.recv_sges();
            let mut wrs: Vec<RecvRequest<'_>> = Vec::with_capacity(srv.wc.len());
            while got < iters {
                let n = srv.qp.poll_cq(&mut srv.wc);
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
                    reposted_srv.store(got, std::sync::atomic::Ordering::Release);
                }
                spins += 1;
                if spins % CLOCK_EVERY == 0 && Instant::now() > deadline {
                    return Err(format!("receiver got {got} of {iters} in 120 s"));
                }
            }
            Ok(bad)
        }))
    };
    let msg = cli.send_slot(size, 0x33)?;
    let sge = [msg.sge_filled()];
    let inline = p.inline && size as u32 <= cli.qp.caps().max_inline_data && op == Opcode::Send;
    let mut wrs: Vec<WorkRequest<'_>> = Vec::with_capacity(batch as usize);
    let max_batches_in_flight = (u64::from(p.tx_depth) / batch).max(1);
    let (mut posted, mut done_batches, mut posted_batches) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(120);
    let mut spins = 0u64;
    while done_batches * batch < iters {
        while posted < iters
            && posted_batches - done_batches < max_batches_in_flight
            && (op != Opcode::Send
                || posted + batch
                    <= reposted.load(std::sync::atomic::Ordering::Acquire) + u64::from(p.rx_depth))
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
                // The receiver's own failure is usually the cause: say it.
                drop(cli);
                if let Some(Ok(Err(r))) = server.map(|s| s.join()) {
                    all += &format!("; the receiver: {r}");
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
    if let Some(s) = server {
        let bad = s.join().map_err(|_| "receiver panicked")??;
        if bad > 0 {
            return Err(format!("{bad} messages arrived corrupted"));
        }
    }
    drop(keep_srv.take());
    if let Some(w) = window {
        let r = w.revoke();
        if r.as_slice().iter().any(|&b| b != 0x33) {
            return Err("RDMA WRITE target does not hold the written bytes".into());
        }
    }
    Ok(Bandwidth {
        msgs: iters,
        bytes: iters * size as u64,
        elapsed,
    })
}
