//! RDMA WRITE ping-pong latency, like `ib_write_lat`, over the `Transport`
//! trait. Each side writes `size` bytes into the other's window with
//! `RDMA_WRITE_WITH_IMM`; the immediate consumes a posted receive, so each
//! side learns of the peer's write from a completion. (`ib_write_lat` polls
//! the last byte of its buffer instead; reading memory the device writes
//! while it is exposed is not something zcmsg's safe API allows, see
//! `Window`.) Both sides live in this process, so they know each other's
//! window without an exchange.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BufMut;
use zcmsg::{
    Access, ArenaConfig, Opcode, Pd, QpConfig, QueuePair, RecvRequest, RemoteRegion, SendFlags,
    Transport, WcStatus, WorkCompletion, WorkRequest,
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
    let server = std::thread::spawn(move || -> Result<(), String> {
        let mut srv = srv;
        pong(&mut srv, size, iters, inline, to_cli, 0x5a, false).map(|_| ())
    });
    let mut cli = cli;
    let samples = pong(&mut cli, size, iters, inline, to_srv, 0xa5, true)?;
    server.join().map_err(|_| "server panicked")??;
    // Each window holds what the other side wrote last.
    if win_cli.revoke().as_slice().iter().any(|&x| x != 0x5a) {
        return Err("the client's window does not hold the server's bytes".into());
    }
    if win_srv.revoke().as_slice().iter().any(|&x| x != 0xa5) {
        return Err("the server's window does not hold the client's bytes".into());
    }
    Ok(Latency { samples })
}

/// One side of the ping-pong: the client writes first and times each round
/// trip; the server answers every write it is told of.
fn pong(
    e: &mut End,
    size: usize,
    iters: u64,
    inline: bool,
    remote: RemoteRegion,
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
    let mut samples = Vec::with_capacity(if client { iters as usize } else { 0 });
    let write = |e: &mut End, it: u64| -> Result<(), String> {
        let f = if (it + 1) % 64 == 0 {
            flags | SendFlags::SIGNALED
        } else {
            flags
        };
        let wr =
            WorkRequest::one_sided(it, Opcode::RdmaWriteWithImm, &sge, remote.addr, remote.rkey)
                .with_imm(it as u32)
                .with_flags(f);
        e.qp.post_send(&[wr]).map_err(|x| x.to_string())
    };
    for it in 0..iters {
        let t0 = Instant::now();
        if client {
            write(e, it)?;
        }
        let deadline = t0 + Duration::from_secs(10);
        'wait: loop {
            let n = e.qp.poll_cq(&mut wc);
            for w in &wc[..n] {
                check(w)?;
                if w.opcode.is_recv() {
                    if w.imm_data != Some(it as u32) {
                        return Err(format!("iteration {it}: immediate {:?}", w.imm_data));
                    }
                    let s = &recv_slots[w.wr_id as usize];
                    e.qp.post_recv(&[RecvRequest {
                        wr_id: w.wr_id,
                        sg_list: &[s.sge()],
                    }])
                    .map_err(|x| x.to_string())?;
                    break 'wait;
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no write for iteration {it} within 10 s"));
            }
        }
        if client {
            samples.push(t0.elapsed().as_nanos() as u64 / 2);
        } else {
            write(e, it)?;
        }
    }
    // Let the last signaled writes complete before teardown.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(200) {
        e.qp.poll_cq(&mut wc);
    }
    Ok(samples)
}
