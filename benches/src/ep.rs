//! Endpoint-level benchmarks: the same measurements as `raw`, through the
//! messaging layer (framing, credits, zero-copy receive), so the framework's
//! overhead is a ratio against the raw device in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use zcmsg::{
    ArenaConfig, Endpoint, EndpointConfig, Listener, Pd, Received, Recv, RecvInto, RecvSlot,
    Transport,
};

use crate::raw::{in_process, Served};
use crate::wire::{Ctrl, Hello, TestKind, CTRL_WAIT};

/// The server's half of connecting: accept one client, read its request
/// (its first message) and refuse it, telling the client why, unless it
/// asks for `want`.
fn accept_client(
    t: Arc<dyn Transport>,
    l: &mut dyn Listener,
    cfg: &EndpointConfig,
    want: TestKind,
) -> Result<(Endpoint, Hello), String> {
    let pd = Pd::new(t);
    let mut ep = Endpoint::accept(&pd, l, cfg).map_err(|e| format!("accept: {e}"))?;
    crate::wire::connected(ep.qp())?;
    let first =
        spin_recv(&mut ep, CTRL_WAIT).map_err(|e| format!("the client sent no request: {e}"))?;
    let max = u64::from(pd.transport().caps().max_msg_sz);
    let hello = Ctrl::decode(&first).and_then(|c| match c {
        Ctrl::Hello(h) => match crate::wire::refusal(&h, want, max) {
            Some(why) => Err(why),
            None => Ok(h),
        },
        other => Err(format!("the client opened with {other:?}, not a hello")),
    });
    let answer = match &hello {
        Ok(_) => Ctrl::Ready(None),
        Err(why) => Ctrl::Refuse(why.clone()),
    };
    send_ctrl(&mut ep, &answer)?;
    match hello {
        Ok(h) => Ok((ep, h)),
        Err(why) => {
            // Until the client has read the refusal and closed.
            await_close(&mut ep).ok();
            Err(format!("refused the client: {why}"))
        }
    }
}

/// The client's half of connecting: connect, send `hello` and wait for the
/// server's answer.
fn connect_client(
    pd: &Pd,
    at: &str,
    cfg: &EndpointConfig,
    hello: Hello,
) -> Result<Endpoint, String> {
    let mut ep = Endpoint::connect(pd, at, cfg).map_err(|e| format!("connect {at}: {e}"))?;
    crate::wire::connected(ep.qp())?;
    send_ctrl(&mut ep, &Ctrl::Hello(hello))?;
    match recv_ctrl(&mut ep)? {
        Ctrl::Ready(_) => Ok(ep),
        Ctrl::Refuse(why) => {
            close(&mut ep).ok();
            Err(format!("the server refused: {why}"))
        }
        other => Err(format!("the server answered {other:?}, not ready")),
    }
}

fn send_ctrl(ep: &mut Endpoint, c: &Ctrl) -> Result<(), String> {
    ep.try_send(Bytes::copy_from_slice(&c.encode()))
        .map(|_| ())
        .map_err(|e| format!("sending {c:?}: {e}"))
}

fn recv_ctrl(ep: &mut Endpoint) -> Result<Ctrl, String> {
    Ctrl::decode(&spin_recv(ep, CTRL_WAIT)?)
}

/// The client's end of a run: close, and wait until the close (and all
/// before it) was delivered.
fn close(ep: &mut Endpoint) -> Result<(), String> {
    ep.try_close().map_err(|e| format!("close: {e}"))?;
    ep.wait(CTRL_WAIT, |e| e.close_delivered())
        .map_err(|e| format!("close: {e}"))
}

/// The server's end of a run: the client's close, then ours.
fn await_close(ep: &mut Endpoint) -> Result<(), String> {
    match ep.recv_timeout(CTRL_WAIT).map_err(|e| e.to_string())? {
        Recv::Eos => {}
        Recv::Message(m) => return Err(format!("{} bytes after the run", m.len())),
    }
    ep.try_close().ok();
    ep.wait(Duration::from_secs(2), |e| e.close_delivered())
        .ok();
    Ok(())
}

/// Messages per post list in the streams (the raw device's default, `-l 16`).
pub const POST_LIST: u64 = 16;

/// Busy-poll `poll` until it yields (no PAUSE between polls, as in the
/// raw device's loop), for at most `limit`.
fn spin<T>(
    limit: Duration,
    mut poll: impl FnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    let mut wait = crate::raw::Patience::new(limit);
    loop {
        if let Some(x) = poll()? {
            return Ok(x);
        }
        if wait.spun_out() {
            return Err("no message within the limit".into());
        }
    }
}

/// Busy-polling receive (the lowest-latency mode).
fn spin_recv(ep: &mut Endpoint, limit: Duration) -> Result<Bytes, String> {
    spin(limit, || {
        match ep.try_recv().map_err(|e| e.to_string())? {
            Some(Recv::Message(m)) => Ok(Some(m)),
            Some(Recv::Eos) => Err("end of stream".into()),
            None => Ok(None),
        }
    })
}

pub use crate::wire::PingPongPath;

/// Busy-polling receive into `buf` ([`Endpoint::try_recv_into`]).
fn spin_recv_into(ep: &mut Endpoint, buf: &mut [u8], limit: Duration) -> Result<usize, String> {
    spin(limit, || {
        match ep.try_recv_into(buf).map_err(|e| e.to_string())? {
            Some(RecvInto::Message(n)) => Ok(Some(n)),
            Some(RecvInto::Eos) => Err("end of stream".into()),
            None => Ok(None),
        }
    })
}

/// Busy-polling receive of a message owning its slot
/// ([`Endpoint::try_recv_slot`]).
fn spin_recv_slot(ep: &mut Endpoint, limit: Duration) -> Result<Received, String> {
    spin(limit, || {
        match ep.try_recv_slot().map_err(|e| e.to_string())? {
            Some(RecvSlot::Message(m)) => Ok(Some(m)),
            Some(RecvSlot::Eos) => Err("end of stream".into()),
            None => Ok(None),
        }
    })
}

/// [`Endpoint::try_send_slice`], progressing until it can go at once.
fn send_slice(ep: &mut Endpoint, data: &[u8], limit: Duration) -> Result<(), String> {
    let mut wait = crate::raw::Patience::new(limit);
    while ep
        .try_send_slice(data)
        .map_err(|e| e.to_string())?
        .is_none()
    {
        if data.len() > ep.inline_limit() {
            return Err(format!(
                "the copy path sends messages of at most {} bytes at once, not {}",
                ep.inline_limit(),
                data.len()
            ));
        }
        ep.progress();
        if wait.spun_out() {
            return Err("no credit to send within the limit".into());
        }
    }
    Ok(())
}

/// One-way latency samples (ns) of `size`-byte endpoint ping-pong in this
/// process, taken as in `raw` ([`crate::report::RttClock`]), each echo
/// checked byte for byte.
pub fn ping_pong(
    a: Arc<dyn Transport>,
    b: Arc<dyn Transport>,
    addr: &str,
    size: usize,
    iters: u64,
    path: PingPongPath,
) -> Result<Vec<u64>, String> {
    let cfg = EndpointConfig::default();
    in_process(
        &b.clone(),
        addr,
        &cfg.qp,
        move |l| ping_pong_server(b, l),
        |at| ping_pong_client(a, at, size, iters, path),
    )
}

/// The server of the endpoint ping-pong: echoes every message, on the path
/// the client asked for.
pub fn ping_pong_server(t: Arc<dyn Transport>, l: &mut dyn Listener) -> Result<Served, String> {
    let (mut srv, hello) = accept_client(t, l, &EndpointConfig::default(), TestKind::EpLat)?;
    let limit = Duration::from_secs(10);
    let mut buf = vec![0u8; hello.size as usize];
    for _ in 0..hello.iters {
        match hello.path {
            PingPongPath::Copy => {
                let n = spin_recv_into(&mut srv, &mut buf, limit)?;
                send_slice(&mut srv, &buf[..n], limit)?;
            }
            PingPongPath::Slot => {
                let m = spin_recv_slot(&mut srv, limit)?;
                send_slice(&mut srv, &m, limit)?;
                srv.recycle(m);
            }
            PingPongPath::Bytes => {
                let m = spin_recv(&mut srv, limit)?;
                srv.try_send(m).map_err(|e| e.to_string())?;
            }
        }
    }
    await_close(&mut srv)?;
    Ok(Served {
        hello,
        measured: None,
    })
}

/// The client of the endpoint ping-pong: one-way latency samples (ns).
pub fn ping_pong_client(
    t: Arc<dyn Transport>,
    at: &str,
    size: usize,
    iters: u64,
    path: PingPongPath,
) -> Result<Vec<u64>, String> {
    let h = Hello {
        test: TestKind::EpLat,
        size: size as u64,
        iters,
        post_list: 1,
        path,
    };
    let mut cli = connect_client(&Pd::new(t), at, &EndpointConfig::default(), h)?;
    let limit = Duration::from_secs(10);
    let arena = cli
        .pd()
        .arena(ArenaConfig::new(size.max(64), 4))
        .map_err(|e| e.to_string())?;
    let mut s = arena.alloc().ok_or("slot")?;
    s.put_bytes(0x61, size);
    let msg = s.freeze();
    let mut buf = vec![0u8; size];
    // Each echo is checked, and a `Bytes` echo dropped (its receive slot
    // going home), after the next request is out: off the critical path,
    // as a latency-minded client orders its work and as the raw device's
    // ping-pong checks its echoes.
    let mut last_bytes: Option<Bytes> = None;
    let mut last_len: Option<usize> = None;
    let mut last_slot: Option<Received> = None;
    let corrupted = || Err::<(), String>("echo corrupted".into());
    let mut clk = crate::report::RttClock::start(iters);
    for _ in 0..iters {
        match path {
            PingPongPath::Bytes => {
                cli.try_send(msg.clone()).map_err(|e| e.to_string())?;
                if last_bytes.take().is_some_and(|m| m != msg) {
                    corrupted()?;
                }
                let m = spin_recv(&mut cli, limit)?;
                clk.lap();
                last_bytes = Some(m);
            }
            PingPongPath::Copy => {
                send_slice(&mut cli, &msg, limit)?;
                if last_len.take().is_some_and(|n| buf[..n] != msg[..]) {
                    corrupted()?;
                }
                let n = spin_recv_into(&mut cli, &mut buf, limit)?;
                clk.lap();
                last_len = Some(n);
            }
            PingPongPath::Slot => {
                send_slice(&mut cli, &msg, limit)?;
                if let Some(m) = last_slot.take() {
                    if m[..] != msg[..] {
                        corrupted()?;
                    }
                    cli.recycle(m);
                }
                let m = spin_recv_slot(&mut cli, limit)?;
                clk.lap();
                last_slot = Some(m);
            }
        }
    }
    if last_bytes.is_some_and(|m| m != msg)
        || last_len.is_some_and(|n| buf[..n] != msg[..])
        || last_slot.is_some_and(|m| m[..] != msg[..])
    {
        corrupted()?;
    }
    close(&mut cli)?;
    Ok(clk.into_samples())
}

/// Messages per second (and bytes per second) of a one-way stream of
/// `size`-byte messages in this process, measured at the receiver, and the
/// sender's framework copies; `handoff` turns the in-process fast path on.
pub fn stream(
    a: Arc<dyn Transport>,
    b: Arc<dyn Transport>,
    addr: &str,
    size: usize,
    count: u64,
    handoff: bool,
) -> Result<(f64, f64, zcmsg::CopySnapshot), String> {
    let mut cfg = EndpointConfig::default();
    cfg.proto.handoff = handoff;
    let scfg = cfg.clone();
    let (copies, nanos) = in_process(
        &b.clone(),
        addr,
        &cfg.qp,
        move |l| stream_server(b, l, &scfg),
        |at| stream_client(a, at, &cfg, size, count),
    )?;
    let secs = nanos as f64 / 1e9;
    Ok((
        count as f64 / secs,
        count as f64 * size as f64 / secs,
        copies,
    ))
}

/// The receiving side of the endpoint stream: checks every message, and
/// answers the client with the nanoseconds the stream took here.
pub fn stream_server(
    t: Arc<dyn Transport>,
    l: &mut dyn Listener,
    cfg: &EndpointConfig,
) -> Result<Served, String> {
    let (mut rx, hello) = accept_client(t, l, cfg, TestKind::EpBw)?;
    let (size, count) = (hello.size as usize, hello.iters);
    let start = Instant::now();
    let mut got = 0u64;
    while got < count {
        let m = spin_recv(&mut rx, Duration::from_secs(30))?;
        if m.len() != size || (size > 0 && m[size - 1] != 0x33) {
            return Err("corrupted message".into());
        }
        got += 1;
    }
    let nanos = start.elapsed().as_nanos() as u64;
    send_ctrl(&mut rx, &Ctrl::Done(nanos))?;
    await_close(&mut rx)?;
    Ok(Served {
        hello,
        measured: Some((got, nanos)),
    })
}

/// The sending side of the endpoint stream: its framework copies, and the
/// nanoseconds the server measured.
pub fn stream_client(
    t: Arc<dyn Transport>,
    at: &str,
    cfg: &EndpointConfig,
    size: usize,
    count: u64,
) -> Result<(zcmsg::CopySnapshot, u64), String> {
    let h = Hello {
        test: TestKind::EpBw,
        size: size as u64,
        iters: count,
        post_list: POST_LIST as u32,
        path: PingPongPath::Bytes,
    };
    // The message is ready before the server's clock starts (at its
    // answer to our hello).
    let pd = Pd::new(t);
    let arena = pd
        .arena(ArenaConfig::new(size.max(64), 4))
        .map_err(|e| e.to_string())?;
    let mut s = arena.alloc().ok_or("slot")?;
    s.put_bytes(0x33, size);
    let msg = s.freeze();
    let mut tx = connect_client(&pd, at, cfg, h)?;
    let before = tx.copies();
    // Post lists of POST_LIST messages, one doorbell each, like the raw
    // device's stream (perftest -l).
    let mut queued = 0u64;
    while queued < count {
        let n = POST_LIST.min(count - queued);
        for _ in 0..n {
            tx.queue(msg.clone()).map_err(|e| e.to_string())?;
        }
        queued += n;
        tx.flush_sends();
        // Keep the queue short: progress until credits let the next list out.
        while tx.credits() <= POST_LIST as i64 && tx.failure().is_none() {
            tx.progress();
        }
    }
    let nanos = match recv_ctrl(&mut tx)? {
        Ctrl::Done(n) => n,
        other => return Err(format!("the server ended with {other:?}")),
    };
    let copies = tx.copies().since(&before);
    close(&mut tx)?;
    Ok((copies, nanos))
}
