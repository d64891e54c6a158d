//! Refusals at post time: typed `PostError`s with the index of the first
//! request not posted; the requests before it were posted and run.

use super::prelude::*;

#[track_caller]
fn expect_refused(
    r: Result<(), PostError>,
    index: usize,
    what: &str,
    kind: impl Fn(&TransportError) -> bool,
) {
    match r {
        Ok(()) => panic!("{what}: the post was accepted; expected a PostError at index {index}"),
        Err(e) => {
            assert_eq!(e.index, index, "{what}: PostError index ({e})");
            assert!(kind(&e.error), "{what}: unexpected refusal reason: {e}");
        }
    }
}

/// A SEND list whose third request has one SGE more than `max_send_sge`, and
/// a receive list whose second request has one more than `max_recv_sge`:
/// `TooManySges` at that index; the requests before it were posted and work.
pub fn post_too_many_sges(h: &Harness) {
    let mut cfg = h.qp_config();
    cfg.max_recv_sge = 2.min(h.caps().max_recv_sge);
    let mut p = h.connected_pair(&cfg, &cfg);
    let max_send = p.qa.caps().max_send_sge as usize;
    let max_recv = p.qb.caps().max_recv_sge as usize;
    let sa = p.a.arena(64, max_send + 8);
    let rb = p.b.arena(4096, max_recv + 8);

    // Receives: [ok, too many] -> index 1, the first one posted.
    let r0 = slot_filled(&rb, 0xEE);
    let extra: Vec<SlotMut> = (0..=max_recv).map(|_| slot_filled(&rb, 0xEE)).collect();
    let extra_sg: Vec<Sge> = extra.iter().map(|s| s.sge_range(0, 64)).collect();
    expect_refused(
        p.qb.try_post_recv(&[
            RecvRequest {
                wr_id: 1,
                sg_list: &[r0.sge()],
            },
            RecvRequest {
                wr_id: 2,
                sg_list: &extra_sg,
            },
        ]),
        1,
        &format!(
            "receive with {} SGEs (max_recv_sge {max_recv})",
            max_recv + 1
        ),
        |e| matches!(e, TransportError::TooManySges { .. }),
    );
    let r1 = slot_filled(&rb, 0xEE);
    let r2 = slot_filled(&rb, 0xEE);
    p.qb.post_recv(&[
        RecvRequest {
            wr_id: 3,
            sg_list: &[r1.sge()],
        },
        RecvRequest {
            wr_id: 4,
            sg_list: &[r2.sge()],
        },
    ]);

    // Sends: [ok, ok, too many, ok] -> index 2.
    let pieces: Vec<SlotMut> = (0..=max_send)
        .map(|i| slot_with(&sa, &pattern(20 + i as u64, 16)))
        .collect();
    let many: Vec<Sge> = pieces.iter().map(|s| s.sge_filled()).collect();
    let m0 = slot_with(&sa, &message(21, 0, 40));
    let m1 = slot_with(&sa, &message(21, 1, 40));
    let m2 = slot_with(&sa, &message(21, 2, 40));
    let (g0, g1, g2) = ([m0.sge_filled()], [m1.sge_filled()], [m2.sge_filled()]);
    expect_refused(
        p.qa.try_post_send(&[
            WorkRequest::send(10, &g0),
            WorkRequest::send(11, &g1),
            WorkRequest::send(12, &many),
            WorkRequest::send(13, &g2),
        ]),
        2,
        &format!("SEND with {} SGEs (max_send_sge {max_send})", max_send + 1),
        |e| matches!(e, TransportError::TooManySges { .. }),
    );
    let wcs = p.qa.take(2, "the SENDs before the refused one");
    expect_ok(&wcs[0], 10, WcOpcode::Send, "first SEND of the list");
    expect_ok(&wcs[1], 11, WcOpcode::Send, "second SEND of the list");
    p.qa.post_send(&[WorkRequest::send(13, &g2)]);
    expect_ok(
        &p.qa.next("SEND after the refusal"),
        13,
        WcOpcode::Send,
        "the queue pair still works",
    );
    for (k, (id, seq)) in [(1u64, 0u64), (3, 1), (4, 2)].into_iter().enumerate() {
        let wc = p.qb.next("receive");
        expect_ok(
            &wc,
            id,
            WcOpcode::Recv,
            "receives in order (the refused one was never posted)",
        );
        let slot = [&r0, &r1, &r2][k];
        check_message(&slot.as_slice()[..40], 21, seq, 40, "payload");
    }
    p.qb.expect_idle(QUIET, "the refused SEND was never sent");
}

/// `max_send_wr - 1` unsignaled SENDs and a signaled one fill the send queue
/// (the peer has no receive yet, so nothing can complete); one more in the same
/// list is refused with `QueueFull` at index `max_send_wr`. Once the peer
/// posts receives, all of them arrive in order and the queue takes more.
pub fn post_queue_full(h: &Harness) {
    let mut cfg = h.qp_config();
    cfg.max_send_wr = 16.min(h.caps().max_qp_wr);
    cfg.rnr_retry = 7;
    let mut p = h.connected_pair(&cfg, &h.qp_config());
    let depth = p.qa.caps().max_send_wr as usize;
    assert!(
        depth >= cfg.max_send_wr as usize,
        "granted max_send_wr {depth} < requested {}",
        cfg.max_send_wr
    );
    let sa = p.a.arena(64, depth + 2);
    let rb = p.b.arena(64, depth + 2);
    let srcs: Vec<SlotMut> = (0..=depth)
        .map(|i| slot_with(&sa, &message(22, i as u64, 48)))
        .collect();
    let sgs: Vec<[Sge; 1]> = srcs.iter().map(|s| [s.sge_filled()]).collect();
    let wrs: Vec<WorkRequest<'_>> = sgs
        .iter()
        .enumerate()
        .map(|(i, sg)| {
            let f = if i == depth - 1 {
                SendFlags::SIGNALED
            } else {
                SendFlags::NONE
            };
            WorkRequest::send(i as u64, sg).with_flags(f)
        })
        .collect();
    expect_refused(
        p.qa.try_post_send(&wrs),
        depth,
        &format!("{} requests on a send queue of {depth}", depth + 1),
        is_queue_full,
    );
    // A single post is refused too while the queue is full.
    expect_refused(
        p.qa.try_post_send(&wrs[depth..]),
        0,
        "one more request on a full send queue",
        is_queue_full,
    );
    let recvs = post_recvs(&mut p.qb, &rb, 0, depth + 1);
    expect_ok(
        &p.qa.next("the signaled SEND"),
        depth as u64 - 1,
        WcOpcode::Send,
        "the signaled SEND covers the rest",
    );
    p.qa.post_send(&[WorkRequest::send(depth as u64, &sgs[depth])]);
    expect_ok(
        &p.qa.next("SEND after the queue drained"),
        depth as u64,
        WcOpcode::Send,
        "the queue takes more",
    );
    for (i, mut slot) in recvs.into_iter().enumerate() {
        let wc = p.qb.next("receive");
        expect_ok(&wc, i as u64, WcOpcode::Recv, "every SEND arrives in order");
        slot.set_len(48);
        check_message(slot.as_slice(), 22, i as u64, 48, "payload");
    }
}

/// `max_recv_wr + 1` receives in one list: `QueueFull` at index
/// `max_recv_wr`; the posted ones are consumed in order.
pub fn post_recv_queue_full(h: &Harness) {
    let mut cfg = h.qp_config();
    cfg.max_recv_wr = 16.min(h.caps().max_qp_wr);
    let mut p = h.connected_pair(&h.qp_config(), &cfg);
    let depth = p.qb.caps().max_recv_wr as usize;
    let sa = p.a.arena(64, depth + 1);
    let rb = p.b.arena(64, depth + 2);
    let slots: Vec<SlotMut> = (0..=depth).map(|_| slot_filled(&rb, 0xEE)).collect();
    let sgs: Vec<[Sge; 1]> = slots.iter().map(|s| [s.sge()]).collect();
    let wrs: Vec<RecvRequest<'_>> = sgs
        .iter()
        .enumerate()
        .map(|(i, sg)| RecvRequest {
            wr_id: i as u64,
            sg_list: sg,
        })
        .collect();
    expect_refused(
        p.qb.try_post_recv(&wrs),
        depth,
        &format!("{} receives on a receive queue of {depth}", depth + 1),
        is_queue_full,
    );
    let srcs: Vec<SlotMut> = (0..depth)
        .map(|i| slot_with(&sa, &message(23, i as u64, 32)))
        .collect();
    for (i, s) in srcs.iter().enumerate() {
        p.qa.post_send(&[WorkRequest::send(i as u64, &[s.sge_filled()])]);
    }
    for (i, wc) in p.qa.take(depth, "SENDs").iter().enumerate() {
        expect_ok(wc, i as u64, WcOpcode::Send, "SEND into a posted receive");
    }
    for (i, slot) in slots.iter().enumerate().take(depth) {
        let wc = p.qb.next("receive");
        expect_ok(&wc, i as u64, WcOpcode::Recv, "receives in order");
        check_message(&slot.as_slice()[..32], 23, i as u64, 32, "payload");
    }
    p.qb.post_recv(&wrs[depth..]);
}

/// An inline SEND one byte over the queue pair's `max_inline_data`, second
/// in a list: `InlineTooLarge` at index 1; the first (exactly the limit) arrives.
pub fn post_inline_too_large(h: &Harness) {
    let mut cfg = h.qp_config();
    cfg.max_inline_data = h.caps().max_inline_data.min(256);
    let mut p = h.connected_pair(&cfg, &h.qp_config());
    let m = p.qa.caps().max_inline_data as usize;
    let rb = p.b.arena(4096, 2);
    let recvs = post_recvs(&mut p.qb, &rb, 0, 2);
    let sa = p.a.arena(m + 64, 2);
    let mut ok = sa.alloc().expect("slot");
    ok.set_len(m);
    ok.as_mut_slice().copy_from_slice(&message(24, 0, m));
    let mut over = sa.alloc().expect("slot");
    over.set_len(m + 1);
    over.as_mut_slice().copy_from_slice(&message(24, 1, m + 1));
    let (s_ok, s_over) = ([ok.sge_filled()], [over.sge_filled()]);
    let f = SendFlags::SIGNALED | SendFlags::INLINE;
    expect_refused(
        p.qa.try_post_send(&[
            WorkRequest::send(1, &s_ok).with_flags(f),
            WorkRequest::send(2, &s_over).with_flags(f),
        ]),
        1,
        &format!("inline SEND of {} bytes (max_inline_data {m})", m + 1),
        |e| matches!(e, TransportError::InlineTooLarge { .. }),
    );
    expect_ok(
        &p.qa.next("the inline SEND at the limit"),
        1,
        WcOpcode::Send,
        "inline SEND at the limit",
    );
    let wc = p.qb.next("receive");
    expect_ok(&wc, 0, WcOpcode::Recv, "receiver");
    assert_eq!(wc.byte_len as usize, m);
    check_message(
        &recvs[0].as_slice()[..m],
        24,
        0,
        m,
        "inline payload at the limit",
    );
    p.qb.expect_idle(QUIET, "the refused inline SEND was never sent");
}

/// A SEND and an RDMA WRITE one byte over the device's `max_msg_sz`:
/// `MessageTooLarge` at their index; the request before the SEND arrives.
pub fn post_message_too_large(h: &Harness) {
    let mut cfg = h.qp_config();
    cfg.max_send_sge = h.caps().max_send_sge.min(32);
    let mut p = h.connected_pair(&cfg, &h.qp_config());
    let max = u64::from(p.a.caps().max_msg_sz);
    let over = max + 1;
    // Cover max_msg_sz + 1 bytes with SGEs over one arena of at most 64 MiB
    // (the same memory may be named more than once by a SEND's gather list).
    let chunk = over.min(64 << 20);
    let need = over.div_ceil(chunk) as usize;
    let max_sge = p.qa.caps().max_send_sge as usize;
    if need > max_sge || over > u64::from(u32::MAX) {
        eprintln!("post_message_too_large: {over} bytes need {need} SGEs of {chunk} (max_send_sge {max_sge}); skipped");
        return;
    }
    let big = p.a.arena((chunk as usize).div_ceil(4096) * 4096, 1);
    let slot = big.alloc().expect("one slot");
    let mut sges = Vec::new();
    let mut left = over;
    while left > 0 {
        let n = left.min(chunk);
        sges.push(slot.sge_range(0, n as usize));
        left -= n;
    }
    let sa = p.a.arena(4096, 1);
    let small = slot_with(&sa, &message(25, 0, 64));
    let rb = p.b.arena(4096, 2);
    let recvs = post_recvs(&mut p.qb, &rb, 0, 2);
    let win = p.b.window(4096, Access::REMOTE_WRITE);
    let r = win.remote();
    let sg = [small.sge_filled()];
    expect_refused(
        p.qa.try_post_send(&[WorkRequest::send(1, &sg), WorkRequest::send(2, &sges)]),
        1,
        &format!("SEND of {over} bytes (max_msg_sz {max})"),
        |e| matches!(e, TransportError::MessageTooLarge { .. }),
    );
    expect_ok(
        &p.qa.next("the SEND before the refused one"),
        1,
        WcOpcode::Send,
        "small SEND",
    );
    let wc = p.qb.next("receive");
    expect_ok(&wc, 0, WcOpcode::Recv, "receiver");
    check_message(&recvs[0].as_slice()[..64], 25, 0, 64, "payload");
    expect_refused(
        p.qa.try_post_send(&[WorkRequest::one_sided(
            3,
            Opcode::RdmaWrite,
            &sges,
            r.addr,
            r.rkey,
        )]),
        0,
        &format!("RDMA WRITE of {over} bytes (max_msg_sz {max})"),
        |e| matches!(e, TransportError::MessageTooLarge { .. }),
    );
    p.qa.expect_idle(QUIET, "refused requests never complete");
    p.qb.expect_idle(QUIET, "refused requests never arrive");
    check_filled(win.revoke().as_slice(), 0, "window after a refused WRITE");
}
