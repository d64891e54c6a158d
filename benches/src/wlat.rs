//! RDMA WRITE ping-pong latency, like `ib_write_lat`, over the `Transport`
//! trait. Each side writes `size` bytes into the other's window. Where the
//! device's remote writes are DMA (`DeviceCaps::dma_remote_writes`: verbs),
//! each side watches the last byte of its own window with
//! `Window::load_byte`, as `ib_write_lat` does: plain RDMA WRITEs, no
//! completion on the target. Elsewhere (the in-process device, whose writes
//! are Rust copies that an atomic read would race with) each WRITE carries
//! an immediate, which consumes a posted receive, and each side learns of
//! the peer's write from that completion. Both sides live in this process,
//! so they know each other's window without an exchange.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BufMut;
use zcmsg::{
    Access, ArenaConfig, Opcode, Pd, QpConfig, QueuePair, RecvRequest, RemoteRegion, SendFlags,
    Transport, WcStatus, Window, WorkCompletion, WorkRequest,
};

use crate::raw::{Latency, Params};

struct End {
    pd: Pd,
    qp: Box<dyn QueuePair>,
}

fn check(wc: &WorkCompletion) -> Result<(), String> {
    if wc.status != WcStatus::Success {
        return Err(format!("completion {} failed: {}", wc.wr_id, wc.status));
    }
    Ok(())
}

/// One-way latency samples (RTT/2) of `p.size`-byte RDMA WRITE ping-pong.
pub fn write_lat(
    a: Arc<dyn Transport>,
    b: Arc<dyn Transport>,
    addr: &str,
    p: &Params,
) -> Result<Latency, String> {
    let cfg = QpConfig {
        max_send_wr: p.tx_depth,
        max_recv_wr: 64,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: if p.inline { 256 } else { 0 },
        rnr_retry: 7,
        ..QpConfig::default()
    };
    let mut l = b
        .listen(addr, &cfg)
        .map_err(|e| format!("listen {addr}: {e}"))?;
    let at = l.local_addr();
    let acc = std::thread::spawn(move || l.accept(Duration::from_secs(20)));
    let qa = a
        .connect(&at, &cfg, b"zcperf-wlat")
        .map_err(|e| format!("connect {at}: {e}"))?;
    let (qb, _) = acc
        .join()
        .map_err(|_| "accept thread panicked".to_string())?
        .map_err(|e| format!("accept: {e}"))?;
    let cli = End {
        pd: Pd::new(a),
        qp: qa,
    };
    let srv = End {
        pd: Pd::new(b),
        qp: qb,
    };
    let size = p.size.max(1);
    let win_cli = cli
        .pd
        .window(size, Access::REMOTE_WRITE)
        .map_err(|e| e.to_string())?;
    let win_srv = srv
        .pd
        .window(size, Access::REMOTE_WRITE)
        .map_err(|e| e.to_string())?;
    let (to_srv, to_cli) = (win_srv.remote(), win_cli.remote());
    let iters = p.iters;
    let inline = p.inline && size as u32 <= cli.qp.caps().max_inline_data;
    let watch = win_cli.load_byte(size - 1).is_some() && win_srv.load_byte(size - 1).is_some();
    let server = std::thread::spawn(move || -> Result<Window, String> {
        let mut srv = srv;
        let w = watch.then_some(&win_srv);
        pong(&mut srv, size, iters, inline, to_cli, w, 0x5a, false)?;
        Ok(win_srv)
    });
    let mut cli = cli;
    let w = watch.then_some(&win_cli);
    let samples = pong(&mut cli, size, iters, inline, to_srv, w, 0xa5, true)?;
    let win_srv = server.join().map_err(|_| "server panicked")??;
    // Each window holds what the other side wrote last (the flag byte
    // carries the last iteration's mark when watched).
    let holds = |w: Window, fill: u8| {
        let r = w.revoke();
        let b = r.as_slice();
        let body_ok = b[..size - 1].iter().all(|&x| x == fill);
        let last = b[size - 1];
        body_ok
            && if watch {
                last == mark(iters - 1)
            } else {
                last == fill
            }
    };
    if !holds(win_cli, 0x5a) {
        return Err("the client's window does not hold the server's bytes".into());
    }
    if !holds(win_srv, 0xa5) {
        return Err("the server's window does not hold the client's bytes".into());
    }
    Ok(Latency { samples })
}

/// The flag byte of iteration `it`: never 0 (a fresh window) and never the
/// previous iteration's.
fn mark(it: u64) -> u8 {
    (it % 255) as u8 + 1
}

/// One side of the ping-pong: the client writes first and times each round
/// trip; the server answers every write it is told of: by the last byte of
/// its window (`watch`) or by a WRITE_WITH_IMM's receive completion.
#[allow(clippy::too_many_arguments)]
fn pong(
    e: &mut End,
    size: usize,
    iters: u64,
    inline: bool,
    remote: RemoteRegion,
    watch: Option<&Window>,
    fill: u8,
    client: bool,
) -> Result<Vec<u64>, String> {
    const RECVS: u64 = 16;
    let arena =
        e.pd.arena(ArenaConfig::new(size.max(64), RECVS as usize + 1))
            .map_err(|x| x.to_string())?;
    let mut src = arena.alloc().ok_or("no slot")?;
    src.put_bytes(fill, size);
    let sge = [src.sge_filled()];
    let opcode = if watch.is_some() {
        Opcode::RdmaWrite
    } else {
        Opcode::RdmaWriteWithImm
    };
    let recv_slots: Vec<_> = (0..RECVS).filter_map(|_| arena.alloc()).collect();
    for (i, s) in recv_slots.iter().enumerate() {
        e.qp.post_recv(&[RecvRequest {
            wr_id: i as u64,
            sg_list: &[s.sge()],
        }])
        .map_err(|x| x.to_string())?;
    }
    let mut flags = SendFlags::NONE;
    if inline {
        flags |= SendFlags::INLINE;
    }
    let mut wc = [WorkCompletion::EMPTY; 16];
    // The client times each round trip as the other latency tests do.
    let mut clk = client.then(|| crate::report::RttClock::start(iters));
    let write = |e: &mut End, src: &mut zcmsg::SlotMut, it: u64| -> Result<(), String> {
        let f = if (it + 1) % 64 == 0 {
            flags | SendFlags::SIGNALED
        } else {
            flags
        };
        if watch.is_some() {
            // The peer watches this byte. Our previous WRITE is done with
            // the buffer: the peer answered it.
            src.as_mut_slice()[size - 1] = mark(it);
        }
        let wr = WorkRequest::one_sided(it, opcode, &sge, remote.addr, remote.rkey)
            .with_imm(it as u32)
            .with_flags(f);
        e.qp.post_send(&[wr]).map_err(|x| x.to_string())
    };
    // A used receive goes back after our next WRITE, off the critical path
    // (the others stay posted), as the SEND ping-pong orders it.
    let mut repost = None;
    let repost_after_write = |e: &mut End, id: &mut Option<u64>| -> Result<(), String> {
        match id.take() {
            Some(id) => {
                e.qp.post_recv(&[RecvRequest {
                    wr_id: id,
                    sg_list: &[recv_slots[id as usize].sge()],
                }])
                .map_err(|x| x.to_string())
            }
            None => Ok(()),
        }
    };
    // Watching the flag byte, only the signaled WRITEs complete: they are
    // retired after our next WRITE is posted, off the critical path (as
    // ib_write_lat polls its CQ only for the signaled ones).
    let retire = |e: &mut End, wc: &mut [WorkCompletion]| -> Result<(), String> {
        if watch.is_some() {
            let n = e.qp.poll_cq(wc);
            for w in &wc[..n] {
                check(w)?;
            }
        }
        Ok(())
    };
    for it in 0..iters {
        if client {
            write(e, &mut src, it)?;
            retire(e, &mut wc)?;
            repost_after_write(e, &mut repost)?;
        }
        let mut wait = crate::raw::Patience::new(Duration::from_secs(10));
        if let Some(w) = watch {
            while w.load_byte(size - 1) != Some(mark(it)) {
                // No PAUSE between polls, as in ib_write_lat.
                if wait.spun_out() {
                    return Err(format!("no write for iteration {it} within 10 s"));
                }
            }
        }
        'wait: loop {
            if watch.is_some() {
                break 'wait;
            }
            let n = e.qp.poll_cq(&mut wc);
            for w in &wc[..n] {
                check(w)?;
                if w.opcode.is_recv() {
                    if w.imm_data != Some(it as u32) {
                        return Err(format!("iteration {it}: immediate {:?}", w.imm_data));
                    }
                    repost = Some(w.wr_id);
                    break 'wait;
                }
            }
            if wait.spun_out() {
                return Err(format!("no write for iteration {it} within 10 s"));
            }
        }
        match clk.as_mut() {
            Some(c) => c.lap(),
            None => {
                write(e, &mut src, it)?;
                retire(e, &mut wc)?;
            }
        }
        if !client {
            repost_after_write(e, &mut repost)?;
        }
    }
    // Let the last signaled writes complete before teardown.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(200) {
        e.qp.poll_cq(&mut wc);
    }
    Ok(clk
        .map(crate::report::RttClock::into_samples)
        .unwrap_or_default())
}
