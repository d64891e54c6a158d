//! RDMA WRITE ping-pong latency, like `ib_write_lat`, over the `Transport`
//! trait. Each side writes `size` bytes into the other's window. Where the
//! device's remote writes are DMA (`DeviceCaps::dma_remote_writes`: verbs),
//! each side watches the last byte of its own window with
//! `Window::load_byte`, as `ib_write_lat` does: plain RDMA WRITEs, no
//! completion on the target. Elsewhere (the in-process device, whose writes
//! are Rust copies that an atomic read would race with) each WRITE carries
//! an immediate, which consumes a posted receive, and each side learns of
//! the peer's write from that completion. The server's window comes in its
//! [`Ctrl::Ready`], the client's in a `Ready` of its own (see
//! [`crate::wire`]), so the two sides may live in two processes.

use std::sync::Arc;
use std::time::Duration;

use zcmsg::{
    Access, Listener, Opcode, QpConfig, RemoteRegion, SendFlags, Transport, Window, WorkCompletion,
    WorkRequest,
};

use crate::raw::{
    accept_client, adopt, check, connect_client, hello, in_process, Latency, Params, Served, Side,
};
use crate::wire::{Ctrl, TestKind, CTRL_WAIT};

/// The queue pair the WRITE ping-pong asks for.
pub fn qp_config(p: &Params) -> QpConfig {
    QpConfig {
        max_send_wr: p.tx_depth,
        max_recv_wr: 64,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: if p.inline { 256 } else { 0 },
        rnr_retry: 7,
        ..QpConfig::default()
    }
}

/// Receives each side keeps posted (consumed by WRITE_WITH_IMM only).
const RECVS: u32 = 16;

/// One-way latency samples (RTT/2) of `p.size`-byte RDMA WRITE ping-pong in
/// this process.
pub fn write_lat(
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
        move |l| write_lat_server(b, l, &sp),
        |at| write_lat_client(a, at, p),
    )
}

/// Whether both sides watch their window's last byte (the device's remote
/// writes are DMA) rather than take a WRITE_WITH_IMM's receive completion.
fn watches(w: &Window, size: usize) -> bool {
    w.load_byte(size - 1).is_some()
}

/// The server of the WRITE ping-pong: exposes its window (sent in
/// [`Ctrl::Ready`]), learns the client's, answers every write with one.
pub fn write_lat_server(
    t: Arc<dyn Transport>,
    l: &mut dyn Listener,
    p: &Params,
) -> Result<Served, String> {
    let (mut srv, hello) = accept_client(t, l, TestKind::WriteLat, |_| RECVS, 1)?;
    let p = adopt(p, &hello);
    let size = p.size.max(1);
    let win = srv
        .pd
        .window(size, Access::REMOTE_WRITE)
        .map_err(|e| e.to_string())?;
    srv.send_ctrl(&Ctrl::Ready(Some(win.remote())))?;
    // The client answers with its own window (in receive 0, reposted).
    let to_cli = match srv.wait_ctrl()? {
        Ctrl::Ready(Some(w)) if w.len >= size as u64 => w,
        other => return Err(format!("the client sent {other:?}, not its window")),
    };
    srv.repost(0)?;
    let watched = watches(&win, size);
    pong(&mut srv, &p, to_cli, watched.then_some(&win), 0x5a, false)?;
    srv.await_done()?;
    if !holds(win, size, 0xa5, watched, p.iters) {
        return Err("the server's window does not hold the client's bytes".into());
    }
    Ok(Served {
        hello,
        measured: None,
    })
}

/// The client of the WRITE ping-pong: writes first and times each round
/// trip.
pub fn write_lat_client(t: Arc<dyn Transport>, at: &str, p: &Params) -> Result<Latency, String> {
    let h = hello(TestKind::WriteLat, p);
    let (mut cli, to_srv) = connect_client(t, at, &qp_config(p), h, RECVS)?;
    let size = p.size.max(1);
    let to_srv = match to_srv {
        Some(w) if w.len >= size as u64 => w,
        other => {
            return Err(format!(
                "the server's window {other:?} cannot take {size} bytes"
            ))
        }
    };
    let win = cli
        .pd
        .window(size, Access::REMOTE_WRITE)
        .map_err(|e| e.to_string())?;
    cli.send_ctrl(&Ctrl::Ready(Some(win.remote())))?;
    cli.wait_sent(CTRL_WAIT, false)?;
    let watched = watches(&win, size);
    let samples = pong(&mut cli, p, to_srv, watched.then_some(&win), 0xa5, true)?;
    cli.finish()?;
    // The window holds what the server wrote last (the flag byte carries
    // the last iteration's mark when watched).
    if !holds(win, size, 0x5a, watched, p.iters) {
        return Err("the client's window does not hold the server's bytes".into());
    }
    Ok(Latency { samples })
}

/// Whether `w` holds `size - 1` bytes of `fill` and the last iteration's
/// mark (watched) or `fill` as its last byte.
fn holds(w: Window, size: usize, fill: u8, watched: bool, iters: u64) -> bool {
    let r = w.revoke();
    let b = r.as_slice();
    b[..size - 1].iter().all(|&x| x == fill)
        && b[size - 1] == if watched { mark(iters - 1) } else { fill }
}

/// The flag byte of iteration `it`: never 0 (a fresh window) and never the
/// previous iteration's.
fn mark(it: u64) -> u8 {
    (it % 255) as u8 + 1
}

/// One side of the ping-pong: the client writes first and times each round
/// trip; the server answers every write it is told of: by the last byte of
/// its window (`watch`) or by a WRITE_WITH_IMM's receive completion.
fn pong(
    e: &mut Side,
    p: &Params,
    remote: RemoteRegion,
    watch: Option<&Window>,
    fill: u8,
    client: bool,
) -> Result<Vec<u64>, String> {
    let (size, iters) = (p.size.max(1), p.iters);
    let inline = p.inline && size as u32 <= e.qp.caps().max_inline_data;
    let mut src = e.send_slot(size, fill)?;
    let sge = [src.sge_filled()];
    let opcode = if watch.is_some() {
        Opcode::RdmaWrite
    } else {
        Opcode::RdmaWriteWithImm
    };
    let mut flags = SendFlags::NONE;
    if inline {
        flags |= SendFlags::INLINE;
    }
    let mut wc = [WorkCompletion::EMPTY; 16];
    // The client times each round trip as the other latency tests do.
    let mut clk = client.then(|| crate::report::RttClock::start(iters));
    let write = |e: &mut Side, src: &mut zcmsg::SlotMut, it: u64| -> Result<(), String> {
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
    let repost_after_write = |e: &mut Side, id: &mut Option<u64>| -> Result<(), String> {
        match id.take() {
            Some(id) => e.repost(id),
            None => Ok(()),
        }
    };
    // Watching the flag byte, only the signaled WRITEs complete: they are
    // retired after our next WRITE is posted, off the critical path (as
    // ib_write_lat polls its CQ only for the signaled ones).
    let retire = |e: &mut Side, wc: &mut [WorkCompletion]| -> Result<(), String> {
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
                // Not after the last: the client may see it, finish and
                // leave before this poll, flushing what is unacknowledged
                // here (the server's wait for `Done` sorts that out).
                if it + 1 < iters {
                    retire(e, &mut wc)?;
                }
            }
        }
        if !client {
            repost_after_write(e, &mut repost)?;
        }
    }
    // The last signaled writes complete before the client's `Done` does
    // (a send queue completes in order): nothing is left in flight.
    Ok(clk
        .map(crate::report::RttClock::into_samples)
        .unwrap_or_default())
}
