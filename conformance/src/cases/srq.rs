//! Shared receive queues.

use std::collections::HashSet;

use super::prelude::*;

/// Two queue pairs receiving through one shared receive queue, posted to from
/// two threads: each message completes on the queue pair it was sent to, in
/// order, in a buffer of the shared queue named by the completion's `wr_id`,
/// each receive consumed once; posting a receive to such a queue pair is refused.
pub fn srq_two_qps(h: &Harness) {
    if !srq_supported(h) {
        return;
    }
    let (a, b) = (h.host(), h.host());
    let srq = b
        .dev
        .create_srq(64, 1)
        .unwrap_or_else(|e| panic!("create_srq(64, 1): {e}"));
    let mut cfg_b = h.qp_config();
    cfg_b.srq = Some(srq.clone());
    let mut eps = h.connect(&a, &b, 2, &h.qp_config(), &cfg_b);
    let rb = b.arena(512, 24);
    let slots: Vec<SlotMut> = (0..16).map(|_| slot_filled(&rb, 0xEE)).collect();
    let sgs: Vec<[Sge; 1]> = slots.iter().map(|s| [s.sge()]).collect();
    let wrs: Vec<RecvRequest<'_>> = sgs
        .iter()
        .enumerate()
        .map(|(j, sg)| RecvRequest {
            wr_id: 100 + j as u64,
            sg_list: sg,
        })
        .collect();
    let (first, second) = wrs.split_at(8);
    std::thread::scope(|s| {
        let t = s.spawn(|| srq.post_recv(first));
        let r2 = srq.post_recv(second);
        let r1 = t.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        r1.unwrap_or_else(|e| panic!("SRQ post_recv from another thread: {e}"));
        r2.unwrap_or_else(|e| panic!("SRQ post_recv: {e}"));
    });

    // A queue pair that receives through the SRQ has no receive queue of its own.
    let extra = slot_filled(&rb, 0xEE);
    assert!(
        eps[0]
            .1
            .try_post_recv(&[RecvRequest {
                wr_id: 1,
                sg_list: &[extra.sge()],
            }])
            .is_err(),
        "post_recv on a queue pair attached to a shared receive queue must be refused"
    );

    let sa = a.arena(512, 20);
    let per = 5u64;
    let len = |q: usize, k: u64| 50 + q * 100 + k as usize;
    let mut keep = Vec::new();
    for k in 0..per {
        for (q, (x, _)) in eps.iter_mut().enumerate() {
            let s = slot_with(&sa, &message(40 + q as u64, k, len(q, k)));
            x.post_send(&[WorkRequest::send(k, &[s.sge_filled()])]);
            keep.push(s);
        }
    }
    let mut used = HashSet::new();
    for (q, (x, y)) in eps.iter_mut().enumerate() {
        for k in 0..per {
            expect_ok(
                &x.next("SEND"),
                k,
                WcOpcode::Send,
                "SEND to an SRQ-attached queue pair",
            );
            let wc = y.next("receive through the SRQ");
            assert!(
                wc.status == WcStatus::Success && wc.opcode == WcOpcode::Recv,
                "SRQ receive: {wc:?}"
            );
            assert_eq!(
                wc.qp_num,
                y.qp_num(),
                "the completion names the queue pair that received"
            );
            let j = wc
                .wr_id
                .checked_sub(100)
                .filter(|&j| j < 16)
                .unwrap_or_else(|| panic!("wr_id {} was never posted to the SRQ", wc.wr_id))
                as usize;
            assert!(used.insert(j), "SRQ receive {} consumed twice", wc.wr_id);
            assert_eq!(wc.byte_len as usize, len(q, k));
            check_message(
                &slots[j].as_slice()[..len(q, k)],
                40 + q as u64,
                k,
                len(q, k),
                &format!("queue pair {q}, message {k} in the SRQ buffer of its wr_id"),
            );
        }
    }
    for (x, y) in eps.iter_mut() {
        x.expect_idle(Duration::ZERO, "nothing more");
        y.expect_idle(QUIET, "nothing more");
    }

    // One queue pair's error does not flush the shared queue's receives: the
    // other queue pair keeps receiving through them.
    eps[0].1.disconnect();
    for wc in eps[0].1.drain(QUIET) {
        assert!(
            !(100..116).contains(&wc.wr_id),
            "an SRQ receive was flushed because one attached queue pair failed: {wc:?}"
        );
    }
    let (x, y) = &mut eps[1];
    for k in per..per + 2 {
        let s = slot_with(&sa, &message(41, k, len(1, k)));
        x.post_send(&[WorkRequest::send(k, &[s.sge_filled()])]);
        keep.push(s);
        expect_ok(
            &x.next("SEND"),
            k,
            WcOpcode::Send,
            "SEND after the other queue pair failed",
        );
        let wc = y.next("receive through the SRQ after the other queue pair failed");
        expect_ok(&wc, wc.wr_id, WcOpcode::Recv, "SRQ receive");
        let j = (wc.wr_id - 100) as usize;
        assert!(
            j < 16 && used.insert(j),
            "SRQ receive {} posted once, consumed once",
            wc.wr_id
        );
        check_message(
            &slots[j].as_slice()[..len(1, k)],
            41,
            k,
            len(1, k),
            "payload after the other queue pair failed",
        );
    }
    for (j, s) in slots.iter().enumerate() {
        if !used.contains(&j) {
            check_filled(s.as_slice(), 0xEE, "an SRQ receive nobody consumed");
        }
    }
    drop(keep);
}

/// Four senders, each on its own thread and queue pair, into four queue
/// pairs sharing one receive queue, each drained by its own thread that
/// reposts the buffers it consumed to the shared queue: every message arrives
/// once, in order per queue pair, intact.
pub fn srq_many_senders(h: &Harness) {
    use std::sync::Mutex;
    if !srq_supported(h) {
        return;
    }
    const Q: usize = 4;
    const BUFS: usize = 32;
    let per = h.iterations(500) as u64;
    let (a, b) = (h.host(), h.host());
    let srq = b
        .dev
        .create_srq(BUFS as u32, 1)
        .unwrap_or_else(|e| panic!("create_srq: {e}"));
    let mut cfg_a = h.qp_config();
    cfg_a.rnr_retry = 7;
    cfg_a.max_send_wr = 8;
    let mut cfg_b = h.qp_config();
    cfg_b.srq = Some(srq.clone());
    let eps = h.connect(&a, &b, Q, &cfg_a, &cfg_b);
    let rb = b.arena(512, BUFS);
    let slots: Mutex<Vec<Option<SlotMut>>> = Mutex::new((0..BUFS).map(|_| rb.alloc()).collect());
    let post = |j: usize, slots: &Mutex<Vec<Option<SlotMut>>>| {
        let g = slots.lock().unwrap_or_else(|p| p.into_inner());
        let s = g[j].as_ref().expect("a slot is home when posted");
        srq.post_recv(&[RecvRequest {
            wr_id: j as u64,
            sg_list: &[s.sge()],
        }])
        .unwrap_or_else(|e| panic!("SRQ post_recv: {e}"));
    };
    for j in 0..BUFS {
        post(j, &slots);
    }
    let sas: Vec<Arena> = (0..Q).map(|_| a.arena(512, 16)).collect();
    let len = |q: usize, k: u64| 8 + ((k as usize * 31 + q * 7) % 400);
    let (xs, ys): (Vec<Endpoint>, Vec<Endpoint>) = eps.into_iter().unzip();
    std::thread::scope(|s| {
        let mut threads = Vec::new();
        for (q, (mut x, sa)) in xs.into_iter().zip(&sas).enumerate() {
            threads.push(s.spawn(move || {
                let mut inflight = std::collections::VecDeque::new();
                for k in 0..per {
                    while inflight.len() >= 8 {
                        let wc = x.next("send completion");
                        let (id, _slot): (u64, SlotMut) = inflight.pop_front().expect("in flight");
                        expect_ok(
                            &wc,
                            id,
                            WcOpcode::Send,
                            "SEND to an SRQ-attached queue pair",
                        );
                    }
                    let m = slot_with(sa, &message(70 + q as u64, k, len(q, k)));
                    x.post_send(&[WorkRequest::send(k, &[m.sge_filled()])]);
                    inflight.push_back((k, m));
                }
                while let Some((id, _slot)) = inflight.pop_front() {
                    expect_ok(&x.next("send completion"), id, WcOpcode::Send, "SEND");
                }
            }));
        }
        for (q, mut y) in ys.into_iter().enumerate() {
            let (slots, post) = (&slots, &post);
            threads.push(s.spawn(move || {
                for k in 0..per {
                    let wc = y.next(&format!("queue pair {q}: message {k} through the SRQ"));
                    expect_ok(&wc, wc.wr_id, WcOpcode::Recv, "SRQ receive");
                    assert_eq!(
                        wc.qp_num,
                        y.qp_num(),
                        "completion on the receiving queue pair"
                    );
                    let j = wc.wr_id as usize;
                    {
                        let mut g = slots.lock().unwrap_or_else(|p| p.into_inner());
                        let slot = g
                            .get_mut(j)
                            .and_then(Option::as_mut)
                            .unwrap_or_else(|| panic!("wr_id {j} was not posted"));
                        slot.set_len(wc.byte_len as usize);
                        check_message(
                            slot.as_slice(),
                            70 + q as u64,
                            k,
                            len(q, k),
                            &format!("queue pair {q}"),
                        );
                    }
                    post(j, slots);
                }
            }));
        }
        for t in threads {
            t.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        }
    });
}

/// A SEND larger than the shared receive queue's first receive: that receive
/// fails on the queue pair that took it (`LocLenErr` with the sender's
/// `RemInvReqErr`, or rxe's `LocQpOpErr` with `RemOpErr`, as in
/// `err_recv_too_small`), that queue pair goes to the error state, and the
/// shared queue's next receive is neither consumed nor flushed by it: the
/// next SEND, on the other queue pair, lands there byte for byte.
pub fn srq_recv_too_small(h: &Harness) {
    if !srq_supported(h) {
        return;
    }
    let (a, b) = (h.host(), h.host());
    let srq = b
        .dev
        .create_srq(8, 1)
        .unwrap_or_else(|e| panic!("create_srq(8, 1): {e}"));
    let mut cfg_b = h.qp_config();
    cfg_b.srq = Some(srq.clone());
    let mut eps = h.connect(&a, &b, 2, &h.qp_config(), &cfg_b);
    let rb = b.arena(4096, 4);
    let small = slot_filled(&rb, 0xEE);
    let big = slot_filled(&rb, 0xEE);
    // In this order: the first SEND takes the small one.
    srq.post_recv(&[
        RecvRequest {
            wr_id: 1,
            sg_list: &[small.sge_range(0, 64)],
        },
        RecvRequest {
            wr_id: 2,
            sg_list: &[big.sge()],
        },
    ])
    .unwrap_or_else(|e| panic!("SRQ post_recv: {e}"));
    let sa = a.arena(4096, 2);
    let too_big = slot_with(&sa, &message(50, 0, 128));
    let fits = slot_with(&sa, &message(51, 0, 128));

    let (x, y) = &mut eps[0];
    x.post_send(&[WorkRequest::send(1, &[too_big.sge_filled()])]);
    let wc = y.next("the shared receive that is too small");
    assert!(
        wc.wr_id == 1 && matches!(wc.status, WcStatus::LocLenErr | WcStatus::LocQpOpErr),
        "receiver: expected wr_id 1 to complete with LocLenErr (or rxe's LocQpOpErr), got {wc:?}"
    );
    assert_eq!(
        wc.qp_num,
        y.qp_num(),
        "the failed receive completes on the queue pair that took it"
    );
    let sender_status = if wc.status == WcStatus::LocLenErr {
        WcStatus::RemInvReqErr
    } else {
        WcStatus::RemOpErr
    };
    expect_status(
        &x.next("the sender's error"),
        1,
        sender_status,
        &format!("sender (the receiver said {:?})", wc.status),
    );
    expect_qp_error(y.state(), "the queue pair whose receive was too small");
    for wc in y.drain(QUIET) {
        assert_ne!(
            wc.wr_id, 2,
            "the shared queue's other receive was consumed or flushed by the failed queue pair: {wc:?}"
        );
    }

    let (x, y) = &mut eps[1];
    x.post_send(&[WorkRequest::send(2, &[fits.sge_filled()])]);
    expect_ok(
        &x.next("SEND on the other queue pair"),
        2,
        WcOpcode::Send,
        "SEND after the shared queue's first receive failed",
    );
    let wc = y.next("the shared queue's second receive");
    expect_ok(&wc, 2, WcOpcode::Recv, "the shared queue's second receive");
    assert_eq!(wc.byte_len, 128, "bytes received: {wc:?}");
    check_message(
        &big.as_slice()[..128],
        51,
        0,
        128,
        "the shared queue's second receive",
    );
    x.expect_idle(Duration::ZERO, "nothing more");
    y.expect_idle(QUIET, "nothing more");
}
