//! Many queue pairs, large transfers split by `RwPlan`, and many SGEs.

use std::collections::HashSet;

use super::prelude::*;

/// 64 queue pairs between two devices (one listener, private data matching
/// each accepted queue pair to its connector), traffic both ways on every one,
/// interleaved: each message lands on its own queue pair, in order, intact.
pub fn many_queue_pairs(h: &Harness) {
    let n = 64usize;
    let (a, b) = (h.host(), h.host());
    let mut cfg = h.qp_config();
    cfg.max_send_wr = 16.min(h.caps().max_qp_wr);
    cfg.max_recv_wr = 16.min(h.caps().max_qp_wr);
    cfg.rnr_retry = 7;
    let mut eps = h.connect(&a, &b, n, &cfg, &cfg);
    let qa_nums: HashSet<u32> = eps.iter().map(|(x, _)| x.qp_num()).collect();
    let qb_nums: HashSet<u32> = eps.iter().map(|(_, y)| y.qp_num()).collect();
    assert_eq!(
        qa_nums.len(),
        n,
        "queue pair numbers on one device must be distinct"
    );
    assert_eq!(
        qb_nums.len(),
        n,
        "queue pair numbers on one device must be distinct"
    );
    for (x, y) in &eps {
        assert_eq!(
            x.state(),
            QpState::ReadyToSend,
            "connected queue pair state"
        );
        assert_eq!(y.state(), QpState::ReadyToSend, "accepted queue pair state");
    }
    let (ab, ba) = (8usize, 4usize);
    let len = |i: usize, k: usize| 16 + (i * 7 + k * 13) % 200;
    let (sa, rb) = (a.arena(256, n * ab), b.arena(256, n * ab));
    let (sb, ra) = (b.arena(256, n * ba), a.arena(256, n * ba));
    let mut b_recvs = Vec::new();
    let mut a_recvs = Vec::new();
    for (x, y) in eps.iter_mut() {
        b_recvs.push(post_recvs(y, &rb, 0, ab));
        a_recvs.push(post_recvs(x, &ra, 0, ba));
    }
    let mut keep = Vec::new();
    for k in 0..ab {
        for (i, (x, y)) in eps.iter_mut().enumerate() {
            let s = slot_with(&sa, &message(1000 + i as u64, k as u64, len(i, k)));
            x.post_send(&[WorkRequest::send(k as u64, &[s.sge_filled()])]);
            keep.push(s);
            if k < ba {
                let s = slot_with(&sb, &message(2000 + i as u64, k as u64, len(i, k)));
                y.post_send(&[WorkRequest::send(k as u64, &[s.sge_filled()])]);
                keep.push(s);
            }
        }
    }
    for (i, (x, y)) in eps.iter_mut().enumerate() {
        let what = format!("queue pair #{i}");
        // b#i: ab receives and ba send completions, interleaved.
        let (sends, recvs) = split(y, ba, ab, &what);
        for (k, wc) in recvs.iter().enumerate() {
            expect_ok(wc, k as u64, WcOpcode::Recv, &what);
            assert_eq!(
                wc.qp_num,
                y.qp_num(),
                "{what}: completion on the right queue pair"
            );
            check_message(
                &b_recvs[i][k].as_slice()[..len(i, k)],
                1000 + i as u64,
                k as u64,
                len(i, k),
                &what,
            );
        }
        for (k, wc) in sends.iter().enumerate() {
            expect_ok(wc, k as u64, WcOpcode::Send, &what);
        }
        // a#i: ab send completions and ba receives.
        let (sends, recvs) = split(x, ab, ba, &what);
        for (k, wc) in recvs.iter().enumerate() {
            expect_ok(wc, k as u64, WcOpcode::Recv, &what);
            assert_eq!(
                wc.qp_num,
                x.qp_num(),
                "{what}: completion on the right queue pair"
            );
            check_message(
                &a_recvs[i][k].as_slice()[..len(i, k)],
                2000 + i as u64,
                k as u64,
                len(i, k),
                &what,
            );
        }
        for (k, wc) in sends.iter().enumerate() {
            expect_ok(wc, k as u64, WcOpcode::Send, &what);
        }
    }
    for (x, y) in eps.iter_mut() {
        x.expect_idle(Duration::ZERO, "nothing more");
        y.expect_idle(Duration::ZERO, "nothing more");
    }
    drop(keep);
}

/// `n_send` send-side and `n_recv` receive-side completions of `ep`, each
/// list in arrival order.
fn split(
    ep: &mut Endpoint,
    n_send: usize,
    n_recv: usize,
    what: &str,
) -> (Vec<WorkCompletion>, Vec<WorkCompletion>) {
    let (mut sends, mut recvs) = (Vec::new(), Vec::new());
    for wc in ep.take(n_send + n_recv, what) {
        if wc.opcode.is_recv() {
            recvs.push(wc);
        } else {
            sends.push(wc);
        }
    }
    assert_eq!(
        (sends.len(), recvs.len()),
        (n_send, n_recv),
        "{what}: send and receive completions: {sends:?} {recvs:?}"
    );
    (sends, recvs)
}

/// Post `wrs` in batches no longer than the send queue, signaling the last of
/// each batch, and wait for each batch's completion.
fn post_batched(ep: &mut Endpoint, wrs: &mut [WorkRequest<'_>], op: WcOpcode, what: &str) {
    let depth = (ep.caps().max_send_wr as usize).max(1);
    for batch in wrs.chunks_mut(depth) {
        let last = batch.len() - 1;
        batch[last].flags = SendFlags::SIGNALED;
        let id = batch[last].wr_id;
        ep.post_send(batch);
        let wc = ep.next(what);
        expect_ok(&wc, id, op, what);
    }
    ep.expect_idle(Duration::ZERO, "only the signaled requests complete");
}

const LARGE: usize = 64 << 20;

/// 64 MiB by RDMA WRITE from one 64 MiB arena slot into a 64 MiB window,
/// split by `RwPlan` at the device's `max_msg_sz` (more than one request
/// when that is under 64 MiB); the window matches byte for byte.
pub fn large_rdma_write(h: &Harness) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let max_msg = p.a.caps().max_msg_sz;
    let arena = p.a.arena_with(ArenaConfig::new(LARGE, 1));
    let mut src = arena.alloc().expect("the one slot");
    src.set_len(LARGE);
    fill_pattern(src.as_mut_slice(), 0x1a29e);
    let win = p.b.window(LARGE, Access::REMOTE_WRITE);
    let mut plan = RwPlan::new();
    let n = plan
        .build(
            &[src.sge_filled()],
            win.remote(),
            p.qa.caps().max_send_sge,
            max_msg,
        )
        .unwrap_or_else(|e| panic!("planning a 64 MiB WRITE: {e}"));
    check_plan(&plan, n, max_msg);
    let mut wrs = Vec::new();
    plan.work_requests(Opcode::RdmaWrite, 0, &mut wrs);
    post_batched(
        &mut p.qa,
        &mut wrs,
        WcOpcode::RdmaWrite,
        "64 MiB RDMA WRITE",
    );
    drop(wrs);
    check_bytes(
        win.revoke().as_slice(),
        src.as_slice(),
        "64 MiB window after the WRITE",
    );
}

fn check_plan(plan: &RwPlan, n: usize, max_msg: u32) {
    assert_eq!(n, plan.wr_count());
    if (max_msg as usize) < LARGE {
        assert!(n > 1, "a 64 MiB transfer with max_msg_sz {max_msg} must be split, the plan has {n} request(s)");
    }
    let total: u64 = plan.spans().iter().map(|s| u64::from(s.len)).sum();
    assert_eq!(total, LARGE as u64, "the plan covers every byte");
    assert!(
        plan.spans().iter().all(|s| s.len <= max_msg),
        "no request over max_msg_sz"
    );
}

/// 64 MiB by RDMA READ from a peer's remote-read arena slot into a local
/// 64 MiB slot, split by `RwPlan` at `max_msg_sz` and `max_sge_rd`.
pub fn large_rdma_read(h: &Harness) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let max_msg = p.a.caps().max_msg_sz;
    let src_arena = p.b.arena_with(ArenaConfig {
        access: Access::REMOTE_READ,
        ..ArenaConfig::new(LARGE, 1)
    });
    let mut s = src_arena.alloc().expect("the one slot");
    s.set_len(LARGE);
    fill_pattern(s.as_mut_slice(), 0x1a29d);
    let src = s.freeze();
    let remote = remote_of(&src_arena, &src);
    let arena = p.a.arena_with(ArenaConfig::new(LARGE, 1));
    let mut dst = arena.alloc().expect("the one slot");
    let max_sge = p.qa.caps().max_send_sge.min(p.a.caps().max_sge_rd);
    let mut plan = RwPlan::new();
    let n = plan
        .build(&[dst.sge()], remote, max_sge, max_msg)
        .unwrap_or_else(|e| panic!("planning a 64 MiB READ: {e}"));
    check_plan(&plan, n, max_msg);
    let mut wrs = Vec::new();
    plan.work_requests(Opcode::RdmaRead, 0, &mut wrs);
    post_batched(&mut p.qa, &mut wrs, WcOpcode::RdmaRead, "64 MiB RDMA READ");
    drop(wrs);
    dst.set_len(LARGE);
    check_bytes(dst.as_slice(), &src, "64 MiB read into the local slot");
}

/// Pieces of different lengths from slots of three arenas, one SGE each.
struct Pieces {
    _arenas: Vec<Arena>,
    slots: Vec<SlotMut>,
    bytes: Vec<u8>,
}

fn pieces(host: &Host, n: usize, seed: u64) -> Pieces {
    let arenas = vec![host.arena(64, n), host.arena(256, n), host.arena(4096, n)];
    let mut slots = Vec::new();
    let mut bytes = Vec::new();
    for i in 0..n {
        let len = 1 + (i * 37) % 60;
        let data = pattern(seed + i as u64, len);
        bytes.extend_from_slice(&data);
        slots.push(slot_with(&arenas[i % 3], &data));
    }
    Pieces {
        _arenas: arenas,
        slots,
        bytes,
    }
}

/// A SEND gathering `max_send_sge` SGEs (as the queue pair granted, up to 64)
/// from slots of three arenas into one receive: concatenated byte for byte.
pub fn send_gather_max_sges(h: &Harness) {
    let mut cfg = h.qp_config();
    cfg.max_send_sge = h.caps().max_send_sge.min(64);
    let mut p = h.connected_pair(&cfg, &h.qp_config());
    let n = (p.qa.caps().max_send_sge as usize).min(64);
    assert!(
        n >= cfg.max_send_sge as usize,
        "granted max_send_sge {n} < requested {}",
        cfg.max_send_sge
    );
    let src = pieces(&p.a, n, 600);
    let sges: Vec<Sge> = src.slots.iter().map(|s| s.sge_filled()).collect();
    let rb = p.b.arena(64 << 10, 1);
    let recv = post_recvs(&mut p.qb, &rb, 0, 1);
    p.qa.post_send(&[WorkRequest::send(1, &sges)]);
    expect_ok(
        &p.qa.next("gathering SEND"),
        1,
        WcOpcode::Send,
        &format!("SEND of {n} SGEs"),
    );
    let wc = p.qb.next("receive of a gathered SEND");
    expect_ok(&wc, 0, WcOpcode::Recv, "receiver");
    let total = src.bytes.len();
    assert_eq!(
        wc.byte_len as usize, total,
        "byte_len of a SEND of {n} SGEs"
    );
    check_bytes(
        &recv[0].as_slice()[..total],
        &src.bytes,
        &format!("SEND gathered from {n} SGEs"),
    );
    check_filled(
        &recv[0].as_slice()[total..],
        0xEE,
        "receive buffer past the message",
    );
}

/// A receive scattered over several SGEs (from two arenas, at offsets inside
/// their slots): a message filling most of them, then a short one touching
/// only the first; bytes outside the SGEs and past the message untouched.
pub fn recv_scatter(h: &Harness) {
    let mut cfg_b = h.qp_config();
    cfg_b.max_recv_sge = 4.min(h.caps().max_recv_sge);
    let mut p = h.connected_pair(&h.qp_config(), &cfg_b);
    let k = (p.qb.caps().max_recv_sge as usize).min(4);
    if k < 2 {
        eprintln!("recv_scatter: the device grants {k} receive SGE(s); nothing to scatter");
        return;
    }
    let arenas = [p.b.arena(256, 8), p.b.arena(4096, 8)];
    const PIECE: usize = 100;
    const OFF: usize = 8;
    let sa = p.a.arena(4096, 2);
    for (round, msg_len) in [(0u64, PIECE * (k - 1) + 50), (1, 60)] {
        let slots: Vec<SlotMut> = (0..k).map(|j| slot_filled(&arenas[j % 2], 0xEE)).collect();
        let sges: Vec<Sge> = slots.iter().map(|s| s.sge_range(OFF, PIECE)).collect();
        p.qb.post_recv(&[RecvRequest {
            wr_id: round,
            sg_list: &sges,
        }]);
        let src = slot_with(&sa, &message(31, round, msg_len));
        p.qa.post_send(&[WorkRequest::send(round, &[src.sge_filled()])]);
        expect_ok(
            &p.qa.next("SEND"),
            round,
            WcOpcode::Send,
            "SEND into a scattered receive",
        );
        let wc = p.qb.next("scattered receive");
        expect_ok(&wc, round, WcOpcode::Recv, "scattered receive");
        assert_eq!(
            wc.byte_len as usize, msg_len,
            "byte_len of a scattered receive"
        );
        let want = message(31, round, msg_len);
        for (j, s) in slots.iter().enumerate() {
            let b = s.as_slice();
            let (from, to) = ((j * PIECE).min(msg_len), ((j + 1) * PIECE).min(msg_len));
            let got = to - from;
            check_filled(
                &b[..OFF],
                0xEE,
                &format!("round {round}: bytes before SGE {j}"),
            );
            check_bytes(
                &b[OFF..OFF + got],
                &want[from..to],
                &format!("round {round}: SGE {j} of a scattered receive"),
            );
            check_filled(
                &b[OFF + got..],
                0xEE,
                &format!("round {round}: bytes of SGE {j} past the message"),
            );
        }
    }
}

/// An RDMA WRITE gathering `max_send_sge` SGEs into a window, then an RDMA
/// READ scattering the window into `max_sge_rd` SGEs over two arenas.
pub fn write_gather_read_scatter(h: &Harness) {
    let mut cfg = h.qp_config();
    cfg.max_send_sge = h.caps().max_send_sge.min(64);
    let mut p = h.connected_pair(&cfg, &h.qp_config());
    let n = (p.qa.caps().max_send_sge as usize).min(64);
    let src = pieces(&p.a, n, 700);
    let sges: Vec<Sge> = src.slots.iter().map(|s| s.sge_filled()).collect();
    let wlen = 64 << 10;
    let win = p.b.window(wlen, Access::REMOTE_WRITE | Access::REMOTE_READ);
    let r = win.remote();
    const AT: usize = 10;
    p.qa.post_send(&[WorkRequest::one_sided(
        1,
        Opcode::RdmaWrite,
        &sges,
        r.addr + AT as u64,
        r.rkey,
    )]);
    expect_ok(
        &p.qa.next("gathering WRITE"),
        1,
        WcOpcode::RdmaWrite,
        &format!("WRITE of {n} SGEs"),
    );
    let mut want = vec![0u8; wlen];
    want[AT..AT + src.bytes.len()].copy_from_slice(&src.bytes);

    let m = n.min(p.a.caps().max_sge_rd as usize).max(1);
    let dst_arenas = [p.a.arena(256, m), p.a.arena(4096, m)];
    let dsts: Vec<SlotMut> = (0..m)
        .map(|j| slot_filled(&dst_arenas[j % 2], 0xEE))
        .collect();
    let lens: Vec<usize> = (0..m).map(|j| 1 + (j * 53) % 90).collect();
    let dsg: Vec<Sge> = dsts
        .iter()
        .zip(&lens)
        .map(|(d, &l)| d.sge_range(0, l))
        .collect();
    let total: usize = lens.iter().sum();
    p.qa.post_send(&[WorkRequest::one_sided(
        2,
        Opcode::RdmaRead,
        &dsg,
        r.addr + AT as u64,
        r.rkey,
    )]);
    let wc = p.qa.next("scattering READ");
    expect_ok(&wc, 2, WcOpcode::RdmaRead, &format!("READ into {m} SGEs"));
    assert_eq!(wc.byte_len as usize, total, "byte_len of a scattering READ");
    let mut at = AT;
    for (j, (d, &l)) in dsts.iter().zip(&lens).enumerate() {
        check_bytes(
            &d.as_slice()[..l],
            &want[at..at + l],
            &format!("READ SGE {j}"),
        );
        check_filled(&d.as_slice()[l..], 0xEE, &format!("past READ SGE {j}"));
        at += l;
    }
    check_bytes(
        win.revoke().as_slice(),
        &want,
        &format!("window after a WRITE of {n} SGEs"),
    );
}
