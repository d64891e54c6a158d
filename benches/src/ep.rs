//! Endpoint-level benchmarks: the same measurements as `raw`, through the
//! messaging layer (framing, credits, zero-copy receive), so the framework's
//! overhead is a ratio against the raw device in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use zcmsg::{ArenaConfig, Endpoint, EndpointConfig, Pd, Recv, RecvInto, Transport};

fn pair(
    a: Arc<dyn Transport>,
    b: Arc<dyn Transport>,
    addr: &str,
    cfg: &EndpointConfig,
) -> Result<(Endpoint, Endpoint), String> {
    let pd_b = Pd::new(b.clone());
    let mut l = b.listen(addr, &cfg.qp).map_err(|e| e.to_string())?;
    let at = l.local_addr();
    let c = cfg.clone();
    let t =
        std::thread::spawn(move || Endpoint::accept(&pd_b, &mut *l, &c).map_err(|e| e.to_string()));
    let ea = Endpoint::connect(&Pd::new(a), &at, cfg).map_err(|e| e.to_string())?;
    let eb = t.join().map_err(|_| "accept panicked")??;
    Ok((ea, eb))
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

/// How the endpoint ping-pong moves its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PingPongPath {
    /// `try_send` of `Bytes`, `try_recv` of zero-copy `Bytes` (the echo
    /// sends back the very `Bytes` it received).
    Bytes,
    /// `try_send_slice` from a buffer, `try_recv_into` a buffer: the copy
    /// path for small messages (no allocation, the receive slot reposted
    /// at once), as UCX's tagged send and receive of a user buffer work.
    Copy,
}

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

/// One-way latency samples (ns) of `size`-byte endpoint ping-pong, taken
/// as in `raw` ([`crate::report::RttClock`]), each echo checked byte for
/// byte.
pub fn ping_pong(
    a: Arc<dyn Transport>,
    b: Arc<dyn Transport>,
    addr: &str,
    size: usize,
    iters: u64,
    path: PingPongPath,
) -> Result<Vec<u64>, String> {
    let cfg = EndpointConfig::default();
    let (mut cli, mut srv) = pair(a, b, addr, &cfg)?;
    let limit = Duration::from_secs(10);
    let server = std::thread::spawn(move || -> Result<(), String> {
        let mut buf = vec![0u8; size];
        for _ in 0..iters {
            match path {
                PingPongPath::Bytes => {
                    let m = spin_recv(&mut srv, limit)?;
                    srv.try_send(m).map_err(|e| e.to_string())?;
                }
                PingPongPath::Copy => {
                    let n = spin_recv_into(&mut srv, &mut buf, limit)?;
                    send_slice(&mut srv, &buf[..n], limit)?;
                }
            }
        }
        // Let the last echo's completion arrive before teardown.
        srv.wait(Duration::from_millis(200), |_| false).ok();
        Ok(())
    });
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
        }
    }
    if last_bytes.is_some_and(|m| m != msg) || last_len.is_some_and(|n| buf[..n] != msg[..]) {
        corrupted()?;
    }
    server.join().map_err(|_| "server panicked")??;
    Ok(clk.into_samples())
}

/// Messages per second (and bytes per second) of a one-way stream of
/// `size`-byte messages, measured at the receiver; `handoff` turns the
/// in-process fast path on.
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
    let (mut tx, mut rx) = pair(a, b, addr, &cfg)?;
    let arena = tx
        .pd()
        .arena(ArenaConfig::new(size.max(64), 4))
        .map_err(|e| e.to_string())?;
    let mut s = arena.alloc().ok_or("slot")?;
    s.put_bytes(0x33, size);
    let msg = s.freeze();
    let before = tx.copies();
    let sender = std::thread::spawn(move || -> Result<zcmsg::CopySnapshot, String> {
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
        tx.wait(Duration::from_secs(60), |e| {
            e.received_count() > 0 || e.failure().is_some()
        })
        .ok();
        Ok(tx.copies().since(&before))
    });
    let start = Instant::now();
    let mut got = 0u64;
    while got < count {
        let m = spin_recv(&mut rx, Duration::from_secs(30))?;
        if m.len() != size || (size > 0 && m[size - 1] != 0x33) {
            return Err("corrupted message".into());
        }
        got += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    rx.try_send(Bytes::from_static(b"done"))
        .map_err(|e| e.to_string())?;
    rx.wait(Duration::from_millis(200), |_| false).ok();
    let copies = sender.join().map_err(|_| "sender panicked")??;
    Ok((
        count as f64 / secs,
        count as f64 * size as f64 / secs,
        copies,
    ))
}
