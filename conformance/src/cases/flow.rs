//! Receiver-not-ready, ordering and back-pressure.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::prelude::*;

/// A SEND with no receive posted on a queue pair with a small `rnr_retry`
/// completes with `RnrRetryExcErr` on the sender (never silently lost), the
/// request behind it is flushed, and the message is not delivered later.
pub fn rnr_retry_exceeded(h: &Harness) {
    let mut cfg = h.qp_config();
    cfg.rnr_retry = 1;
    let mut p = h.connected_pair(&cfg, &h.qp_config());
    let sa = p.a.arena(4096, 1);
    let s = slot_with(&sa, &message(26, 0, 100));
    let sg = [s.sge_filled()];
    p.qa.post_send(&[WorkRequest::send(1, &sg), WorkRequest::send(2, &sg)]);
    let wc = p.qa.next("the SEND nobody posted a receive for");
    expect_status(
        &wc,
        1,
        WcStatus::RnrRetryExcErr,
        "SEND without a receive, rnr_retry 1",
    );
    expect_status(
        &p.qa.next("flush"),
        2,
        WcStatus::WrFlushErr,
        "the SEND behind it",
    );
    expect_qp_error(p.qa.state(), "sender after RNR retries ran out");
    let rb = p.b.arena(4096, 1);
    let late = post_recvs(&mut p.qb, &rb, 9, 1);
    for wc in p.qb.drain(QUIET) {
        assert!(
            wc.status != WcStatus::Success,
            "a SEND reported as failed was delivered after all: {wc:?}"
        );
    }
    check_filled(
        late[0].as_slice(),
        0xEE,
        "a receive posted after the RNR failure",
    );

    // A WRITE_WITH_IMM needs a receive too.
    let mut p = h.connected_pair(&cfg, &h.qp_config());
    let sa = p.a.arena(4096, 1);
    let s = slot_with(&sa, &pattern(26, 100));
    let win = p.b.window(4096, Access::REMOTE_WRITE);
    let r = win.remote();
    p.qa.post_send(&[WorkRequest::one_sided(
        1,
        Opcode::RdmaWriteWithImm,
        &[s.sge_filled()],
        r.addr,
        r.rkey,
    )
    .with_imm(5)]);
    expect_status(
        &p.qa.next("the WRITE_WITH_IMM nobody posted a receive for"),
        1,
        WcStatus::RnrRetryExcErr,
        "WRITE_WITH_IMM without a receive, rnr_retry 1",
    );
    expect_qp_error(p.qa.state(), "writer after RNR retries ran out");
}

/// SENDs posted before their receives wait, not fail: with infinite retries
/// (`rnr_retry` 7) three SENDs wait tens of milliseconds and arrive in order
/// as receives are posted one by one; with the default `rnr_retry` a receive
/// posted right after the SEND gets it.
pub fn rnr_late_recv_delivered(h: &Harness) {
    let mut cfg = h.qp_config();
    cfg.rnr_retry = 7;
    let mut p = h.connected_pair(&cfg, &h.qp_config());
    let sa = p.a.arena(4096, 4);
    let rb = p.b.arena(4096, 4);
    let srcs: Vec<SlotMut> = (0..3)
        .map(|i| slot_with(&sa, &message(27, i, 300)))
        .collect();
    for (i, s) in srcs.iter().enumerate() {
        p.qa.post_send(&[WorkRequest::send(i as u64, &[s.sge_filled()])]);
    }
    p.qa.expect_idle(
        Duration::from_millis(30),
        "SENDs without receives wait (rnr_retry 7)",
    );
    for i in 0..3u64 {
        let mut slot = post_recvs(&mut p.qb, &rb, i, 1).pop().expect("one receive");
        expect_ok(
            &p.qa.next("the waiting SEND"),
            i,
            WcOpcode::Send,
            "SEND that waited for its receive",
        );
        let wc = p.qb.next("a late receive");
        expect_ok(&wc, i, WcOpcode::Recv, "receive posted after its SEND");
        slot.set_len(300);
        check_message(slot.as_slice(), 27, i, 300, "payload of a SEND that waited");
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let sa = p.a.arena(4096, 1);
    let rb = p.b.arena(4096, 1);
    let s = slot_with(&sa, &message(27, 9, 64));
    p.qa.post_send(&[WorkRequest::send(9, &[s.sge_filled()])]);
    let mut slot = post_recvs(&mut p.qb, &rb, 9, 1).pop().expect("one receive");
    expect_ok(
        &p.qa.next("SEND"),
        9,
        WcOpcode::Send,
        "SEND within the retry window",
    );
    let wc = p.qb.next("a receive posted right after its SEND");
    expect_ok(
        &wc,
        9,
        WcOpcode::Recv,
        "receive within the retry window (default rnr_retry)",
    );
    slot.set_len(64);
    check_message(slot.as_slice(), 27, 9, 64, "payload");
}

/// SENDs waiting for receives (infinite RNR retries) are delivered once the
/// peer posts receives, while the sender's thread does not call into its
/// queue pair at all: the device makes progress on its own, as verbs devices
/// do (the requester retries in hardware or in the kernel, not in `poll_cq`).
/// Three SENDs wait; the receiver posts three receives at once, to its own
/// receive queue and (when the device has them) to a shared receive queue.
pub fn rnr_progress_without_sender_polling(h: &Harness) {
    let mut cfg = h.qp_config();
    cfg.rnr_retry = 7;
    let (a, b) = (h.host(), h.host());
    let srq = if h.caps().srq {
        Some(
            b.dev
                .create_srq(16, 1)
                .unwrap_or_else(|e| panic!("create_srq: {e}")),
        )
    } else {
        None
    };
    let mut cfg_srq = h.qp_config();
    cfg_srq.srq = srq.clone();
    let sa = a.arena(4096, 8);
    let rb = b.arena(4096, 8);
    for via_srq in [false, true] {
        if via_srq && srq.is_none() {
            break;
        }
        let what = if via_srq {
            "through a shared receive queue"
        } else {
            "through the receive queue"
        };
        let cfg_b = if via_srq { &cfg_srq } else { &cfg };
        let (mut qa, mut qb) = h
            .connect(&a, &b, 1, &cfg, cfg_b)
            .pop()
            .expect("one queue pair");
        let srcs: Vec<SlotMut> = (0..3)
            .map(|i| slot_with(&sa, &message(27, 20 + i, 128)))
            .collect();
        for (i, s) in srcs.iter().enumerate() {
            qa.post_send(&[WorkRequest::send(20 + i as u64, &[s.sge_filled()])]);
        }
        std::thread::sleep(Duration::from_millis(10));
        let slots: Vec<SlotMut> = (0..3).map(|_| slot_filled(&rb, 0xEE)).collect();
        let sgs: Vec<[Sge; 1]> = slots.iter().map(|s| [s.sge()]).collect();
        let wrs: Vec<RecvRequest<'_>> = sgs
            .iter()
            .enumerate()
            .map(|(i, sg)| RecvRequest {
                wr_id: 20 + i as u64,
                sg_list: sg,
            })
            .collect();
        match &srq {
            Some(q) if via_srq => q
                .post_recv(&wrs)
                .unwrap_or_else(|e| panic!("SRQ post_recv: {e}")),
            _ => qb.post_recv(&wrs),
        }
        // Only the receiver waits; the sender's queue pair is left alone.
        for (i, slot) in slots.iter().enumerate() {
            let wc = qb.try_next(h.wait_timeout()).unwrap_or_else(|| {
                panic!(
                    "{what}: SEND {i} of 3 waiting for a receive was not delivered within {:?} after the receives were posted, while the sender did not poll: the device only makes progress inside the sender's post_send/poll_cq",
                    h.wait_timeout()
                )
            });
            expect_ok(
                &wc,
                20 + i as u64,
                WcOpcode::Recv,
                &format!("{what}: receive of a SEND that waited"),
            );
            check_message(&slot.as_slice()[..128], 27, 20 + i as u64, 128, what);
        }
        for i in 0..3 {
            expect_ok(
                &qa.next("SEND"),
                20 + i,
                WcOpcode::Send,
                "a SEND that waited",
            );
        }
    }
}

fn ordering_len(seq: u64) -> usize {
    8 + (seq * 131 % 500) as usize
}

/// Thousands of SENDs of varying length with sequence numbers, a window of
/// them in flight, the receiver reposting: every message arrives once, in
/// order, byte for byte; send completions come in posting order.
pub fn ordering_sends(h: &Harness) {
    let n = h.iterations(4000) as u64;
    let mut cfg = h.qp_config();
    cfg.max_send_wr = 64.min(h.caps().max_qp_wr);
    cfg.max_recv_wr = 128.min(h.caps().max_qp_wr);
    cfg.rnr_retry = 7;
    let mut p = h.connected_pair(&cfg, &cfg);
    let depth = p.qa.caps().max_send_wr.min(64) as usize;
    let rdepth = p.qb.caps().max_recv_wr.min(128) as usize;
    let sa = p.a.arena(512, depth);
    let rb = p.b.arena(512, rdepth);
    let mut rslots: Vec<Option<SlotMut>> = post_recvs(&mut p.qb, &rb, 0, rdepth)
        .into_iter()
        .map(Some)
        .collect();
    let mut inflight: VecDeque<(u64, SlotMut)> = VecDeque::new();
    let (mut sent, mut received) = (0u64, 0u64);
    let mut last = Instant::now();
    while received < n {
        let mut progress = false;
        while sent < n && inflight.len() < depth {
            let s = slot_with(&sa, &message(28, sent, ordering_len(sent)));
            p.qa.post_send(&[WorkRequest::send(sent, &[s.sge_filled()])]);
            inflight.push_back((sent, s));
            sent += 1;
            progress = true;
        }
        while let Some(wc) = p.qa.poll_one() {
            let (seq, _) = inflight
                .pop_front()
                .unwrap_or_else(|| panic!("a send completion nobody posted: {wc:?}"));
            expect_ok(
                &wc,
                seq,
                WcOpcode::Send,
                "send completions in posting order",
            );
            progress = true;
        }
        while let Some(wc) = p.qb.poll_one() {
            let k = wc.wr_id as usize;
            expect_ok(&wc, wc.wr_id, WcOpcode::Recv, "receive");
            let mut slot = rslots
                .get_mut(k)
                .and_then(Option::take)
                .unwrap_or_else(|| panic!("receive completion for a wr_id not posted: {wc:?}"));
            let len = ordering_len(received);
            assert_eq!(wc.byte_len as usize, len, "byte_len of message {received}");
            slot.set_len(len);
            check_message(slot.as_slice(), 28, received, len, "ordered SEND");
            received += 1;
            p.qb.post_recv(&[RecvRequest {
                wr_id: k as u64,
                sg_list: &[slot.sge()],
            }]);
            rslots[k] = Some(slot);
            progress = true;
        }
        if progress {
            last = Instant::now();
        } else {
            assert!(
                last.elapsed() < h.wait_timeout(),
                "no progress for {:?}: sent {sent}, received {received} of {n}, {} in flight",
                h.wait_timeout(),
                inflight.len()
            );
            std::thread::yield_now();
        }
    }
    while let Some((seq, _)) = inflight.pop_front() {
        expect_ok(
            &p.qa.next("last send completions"),
            seq,
            WcOpcode::Send,
            "send completion",
        );
    }
}

/// An unsignaled RDMA WRITE followed in the same list by a SEND_WITH_IMM (or
/// a WRITE_WITH_IMM): when the receive completes, the written bytes are
/// already visible, every round, each immediate carrying its round number.
pub fn ordering_write_then_send_imm(h: &Harness) {
    let rounds = h.iterations(64);
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let sa = p.a.arena(8192, 2);
    let rb = p.b.arena(64, 2);
    for r in 0..rounds {
        let win = p.b.window(8192, Access::REMOTE_WRITE);
        let rem = win.remote();
        let len = 1000 + (r * 61) % 7000;
        let seed = 0x0bad_0000 + r as u64;
        let src = slot_with(&sa, &pattern(seed, len));
        let note = slot_with(&sa, &message(29, r as u64, 16));
        let mut recv = post_recvs(&mut p.qb, &rb, r as u64, 1)
            .pop()
            .expect("one receive");
        let half = len / 2;
        let (whole, first, second) = (
            [src.sge_filled()],
            [src.sge_range(0, half)],
            [src.sge_range(half, len - half)],
        );
        let nsg = [note.sge_filled()];
        let with_send = r % 2 == 0;
        let wrs = if with_send {
            [
                WorkRequest::one_sided(1, Opcode::RdmaWrite, &whole, rem.addr, rem.rkey)
                    .with_flags(SendFlags::NONE),
                WorkRequest {
                    opcode: Opcode::SendWithImm,
                    ..WorkRequest::send(2, &nsg)
                }
                .with_imm(r as u32),
            ]
        } else {
            [
                WorkRequest::one_sided(1, Opcode::RdmaWrite, &first, rem.addr, rem.rkey)
                    .with_flags(SendFlags::NONE),
                WorkRequest::one_sided(
                    2,
                    Opcode::RdmaWriteWithImm,
                    &second,
                    rem.addr + half as u64,
                    rem.rkey,
                )
                .with_imm(r as u32),
            ]
        };
        p.qa.post_send(&wrs);
        let wc = p.qb.next("the notification behind the WRITE");
        let op = if with_send {
            WcOpcode::Recv
        } else {
            WcOpcode::RecvRdmaWithImm
        };
        expect_ok(&wc, r as u64, op, "notification");
        assert_eq!(wc.imm_data, Some(r as u32), "immediate of round {r}");
        // The notification arrived: the write must be visible now.
        let got = win.revoke();
        check_bytes(
            &got.as_slice()[..len],
            &pattern(seed, len),
            &format!("round {r}: WRITE visible when the notification arrives"),
        );
        check_filled(&got.as_slice()[len..], 0, "window past the write");
        if with_send {
            recv.set_len(16);
            check_message(recv.as_slice(), 29, r as u64, 16, "notification payload");
        }
        expect_ok(
            &p.qa.next("the signaled notification"),
            2,
            WcOpcode::for_send(wrs[1].opcode),
            "notification sent",
        );
        p.qa.expect_idle(Duration::ZERO, "the unsignaled WRITE has no completion");
    }
}

/// Sets the flag when the owning thread panics, so its partner stops waiting.
struct AbortOnPanic<'a>(&'a AtomicBool);

impl Drop for AbortOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

/// The next completion, giving up early if the partner thread failed.
#[track_caller]
fn next_or_abort(ep: &mut Endpoint, abort: &AtomicBool, what: &str) -> Option<WorkCompletion> {
    let deadline = Instant::now() + ep.timeout();
    loop {
        if abort.load(Ordering::SeqCst) {
            return None;
        }
        if let Some(wc) = ep.try_next(Duration::from_millis(20)) {
            return Some(wc);
        }
        assert!(
            Instant::now() < deadline,
            "{}: no completion within {:?} while waiting for {what}",
            ep.label(),
            ep.timeout()
        );
    }
}

fn bp_len(seq: u64) -> usize {
    16 + (seq * 97 % 480) as usize
}

/// A producer thread posting as fast as it can into a small send queue
/// (retrying on `QueueFull`, reaping completions only when refused) and a
/// consumer thread reposting its receives: everything arrives, in order,
/// byte for byte, and the producer did meet a full queue (a request holds its
/// send-queue slot until its completion is polled, as verbs requires).
pub fn backpressure_small_queue(h: &Harness) {
    let n = h.iterations(10_000) as u64;
    let mut cfg_a = h.qp_config();
    cfg_a.max_send_wr = 4;
    cfg_a.rnr_retry = 7;
    let mut cfg_b = h.qp_config();
    cfg_b.max_recv_wr = 16;
    let Pair { qa, qb, a, b } = h.connected_pair(&cfg_a, &cfg_b);
    let depth = qa.caps().max_send_wr as usize;
    let pool = (4 * depth).max(64);
    let sa = a.arena(512, pool);
    let rdepth = qb.caps().max_recv_wr.min(16) as usize;
    let rb = b.arena(512, rdepth);
    let abort = AtomicBool::new(false);
    let full_seen = std::thread::scope(|s| {
        let producer = s.spawn(|| {
            let _g = AbortOnPanic(&abort);
            let mut qa = qa;
            let mut inflight: VecDeque<(u64, SlotMut)> = VecDeque::new();
            let mut full = 0u64;
            let reap =
                |qa: &mut Endpoint, inflight: &mut VecDeque<(u64, SlotMut)>, wc: WorkCompletion| {
                    let (seq, _) = inflight
                        .pop_front()
                        .unwrap_or_else(|| panic!("unexpected send completion {wc:?}"));
                    expect_ok(
                        &wc,
                        seq,
                        WcOpcode::Send,
                        &format!("{}: send completion in order", qa.label()),
                    );
                };
            // Never reap ahead: only a refusal (or running out of buffers)
            // makes the producer look at its completions.
            for seq in 0..n {
                let slot = loop {
                    if let Some(mut s) = sa.alloc() {
                        s.put_slice(&message(30, seq, bp_len(seq)));
                        break s;
                    }
                    let Some(wc) = next_or_abort(&mut qa, &abort, "a completion to free a slot")
                    else {
                        return full;
                    };
                    reap(&mut qa, &mut inflight, wc);
                };
                loop {
                    match qa.try_post_send(&[WorkRequest::send(seq, &[slot.sge_filled()])]) {
                        Ok(()) => break,
                        Err(e) if is_queue_full(&e.error) && e.index == 0 => {
                            full += 1;
                            let Some(wc) =
                                next_or_abort(&mut qa, &abort, "a completion to make room")
                            else {
                                return full;
                            };
                            reap(&mut qa, &mut inflight, wc);
                        }
                        Err(e) => panic!("post_send of message {seq}: {e}"),
                    }
                }
                inflight.push_back((seq, slot));
            }
            while !inflight.is_empty() {
                let Some(wc) = next_or_abort(&mut qa, &abort, "the last send completions") else {
                    return full;
                };
                reap(&mut qa, &mut inflight, wc);
            }
            full
        });
        // The consumer hands its queue pair back instead of dropping it:
        // a queue pair dropped disconnects, and the producer, still
        // reaping its last completions, would see them flushed (the last
        // message can be received before the sender has its ACK).
        let consumer = s.spawn(|| {
            let _g = AbortOnPanic(&abort);
            let mut qb = qb;
            let mut slots: Vec<Option<SlotMut>> = post_recvs(&mut qb, &rb, 0, rdepth)
                .into_iter()
                .map(Some)
                .collect();
            for seq in 0..n {
                let Some(wc) = next_or_abort(&mut qb, &abort, &format!("message {seq}")) else {
                    return qb;
                };
                expect_ok(&wc, wc.wr_id, WcOpcode::Recv, "receive");
                let k = wc.wr_id as usize;
                let mut slot = slots
                    .get_mut(k)
                    .and_then(Option::take)
                    .unwrap_or_else(|| panic!("receive completion for a wr_id not posted: {wc:?}"));
                slot.set_len(wc.byte_len as usize);
                check_message(
                    slot.as_slice(),
                    30,
                    seq,
                    bp_len(seq),
                    "message under back-pressure",
                );
                qb.post_recv(&[RecvRequest {
                    wr_id: k as u64,
                    sg_list: &[slot.sge()],
                }]);
                slots[k] = Some(slot);
            }
            qb
        });
        let full = producer.join();
        let c = consumer.join();
        let _qb = match c {
            Ok(qb) => qb,
            Err(e) => std::panic::resume_unwind(e),
        };
        match full {
            Ok(f) => f,
            Err(e) => std::panic::resume_unwind(e),
        }
    });
    assert!(
        full_seen > 0 || depth >= pool,
        "the producer never met a full send queue (granted max_send_wr {depth}, {pool} buffers): the test did not test back-pressure"
    );
}
