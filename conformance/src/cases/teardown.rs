//! Teardown with work in flight: no hang, every request accounted for, and
//! nothing leaked afterwards.

use std::collections::BTreeSet;
use std::time::Instant;

use super::prelude::*;

/// Collect one completion for every id in `expected` (any order), each an
/// error, within the harness timeout; panic on a success, an unknown id, a
/// duplicate, or a hang.
fn all_fail(
    ep: &mut Endpoint,
    expected: &BTreeSet<u64>,
    exact: Option<WcStatus>,
    what: &str,
) -> Vec<WorkCompletion> {
    let deadline = Instant::now() + ep.timeout();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    while seen.len() < expected.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(wc) = ep.try_next(left) else {
            let missing: Vec<u64> = expected.difference(&seen).copied().collect();
            panic!(
                "{what}: {} of {} outstanding requests never completed within {:?} (missing wr_ids {missing:?}): a hang",
                missing.len(),
                expected.len(),
                ep.timeout()
            );
        };
        assert!(
            expected.contains(&wc.wr_id),
            "{what}: completion for a wr_id never posted: {wc:?}"
        );
        assert!(
            seen.insert(wc.wr_id),
            "{what}: wr_id {} completed twice: {wc:?}",
            wc.wr_id
        );
        match exact {
            Some(s) => assert_eq!(wc.status, s, "{what}: status of {wc:?}"),
            None => assert!(
                wc.status != WcStatus::Success,
                "{what}: an outstanding request succeeded although it could not: {wc:?}"
            ),
        }
        out.push(wc);
    }
    ep.expect_idle(
        QUIET,
        &format!("{what}: nothing after every request completed"),
    );
    out
}

/// What one side keeps in flight: SENDs the peer has no receive for (so they
/// wait, with infinite RNR retries), WRITEs and READs queued behind them, and
/// optionally receives nothing will ever fill.
struct Outstanding {
    arena: Arena,
    slots: Vec<SlotMut>,
    ids: BTreeSet<u64>,
}

fn load(host: &Host, ep: &mut Endpoint, peer: &Window, sends: usize, recvs: usize) -> Outstanding {
    let arena = host.arena(4096, sends + recvs + 8);
    let mut ids = BTreeSet::new();
    let mut slots = post_recvs(ep, &arena, 1000, recvs);
    ids.extend(1000..1000 + recvs as u64);
    let r = peer.remote();
    let srcs: Vec<SlotMut> = (0..sends)
        .map(|i| slot_with(&arena, &message(50, i as u64, 256)))
        .collect();
    let ssg: Vec<[Sge; 1]> = srcs.iter().map(|s| [s.sge_filled()]).collect();
    let dsts: Vec<SlotMut> = (0..4).map(|_| slot_filled(&arena, 0xEE)).collect();
    let dsg: Vec<[Sge; 1]> = dsts.iter().map(|d| [d.sge_range(0, 512)]).collect();
    let mut wrs: Vec<WorkRequest<'_>> = ssg
        .iter()
        .enumerate()
        .map(|(i, sg)| WorkRequest::send(i as u64, sg))
        .collect();
    for (j, sg) in ssg.iter().take(4).enumerate() {
        wrs.push(WorkRequest::one_sided(
            100 + j as u64,
            Opcode::RdmaWrite,
            sg,
            r.addr + j as u64 * 512,
            r.rkey,
        ));
    }
    for (j, sg) in dsg.iter().enumerate() {
        wrs.push(WorkRequest::one_sided(
            200 + j as u64,
            Opcode::RdmaRead,
            sg,
            r.addr + j as u64 * 512,
            r.rkey,
        ));
    }
    ids.extend(wrs.iter().map(|w| w.wr_id));
    ep.post_send(&wrs);
    drop(wrs);
    slots.extend(srcs);
    slots.extend(dsts);
    Outstanding { arena, slots, ids }
}

fn teardown_config(h: &Harness) -> QpConfig {
    let mut cfg = h.qp_config();
    cfg.rnr_retry = 7;
    cfg.max_send_wr = 64.min(h.caps().max_qp_wr);
    cfg.max_recv_wr = 64.min(h.caps().max_qp_wr);
    cfg
}

/// Check the arena got every slot back once the test dropped them, then drop it.
fn slots_home(o: Outstanding, what: &str) {
    let Outstanding { arena, slots, .. } = o;
    drop(slots);
    assert_eq!(
        arena.free_slots(),
        arena.slots(),
        "{what}: arena slots back home after teardown"
    );
}

/// Side `b` vanishes (queue pair, memory, device handle dropped at once)
/// while `a` has receives, SENDs waiting for receivers, WRITEs and READs
/// outstanding: every one of `a`'s requests completes with an error within
/// the timeout (no hang), `a` ends in the error state, and once everything is
/// dropped both hosts have ended every registration and the devices hold no
/// registered memory.
pub fn teardown_drop_peer(h: &Harness) {
    let cfg = teardown_config(h);
    let Pair { mut qa, qb, a, b } = h.connected_pair(&cfg, &cfg);
    let tb = b.tracker();
    let win_b = b.window(64 << 10, Access::REMOTE_WRITE | Access::REMOTE_READ);
    let out = load(&a, &mut qa, &win_b, 24, 16);
    std::thread::sleep(Duration::from_millis(5));
    drop((qb, win_b, b));
    all_fail(
        &mut qa,
        &out.ids,
        None,
        "a's outstanding requests after b vanished",
    );
    expect_qp_error(qa.state(), "a after its peer vanished");
    drop(qa);
    slots_home(out, "a");
    a.assert_released("host a after teardown");
    tb.assert_released("host b after it vanished", h.wait_timeout());
}

/// `b` calls `disconnect()` while both sides have SENDs waiting for
/// receivers and WRITEs/READs behind them: `b` is in the error state at once
/// and flushes its own requests with `WrFlushErr` in order; every one of
/// `a`'s completes with an error within the timeout; `disconnect()` is
/// idempotent; posting afterwards is refused or flushed; nothing leaks.
pub fn teardown_disconnect(h: &Harness) {
    let cfg = teardown_config(h);
    let Pair {
        mut qa,
        mut qb,
        a,
        b,
    } = h.connected_pair(&cfg, &cfg);
    let win_a = a.window(64 << 10, Access::REMOTE_WRITE | Access::REMOTE_READ);
    let win_b = b.window(64 << 10, Access::REMOTE_WRITE | Access::REMOTE_READ);
    let out_a = load(&a, &mut qa, &win_b, 16, 0);
    let out_b = load(&b, &mut qb, &win_a, 16, 0);
    std::thread::sleep(Duration::from_millis(5));
    qb.disconnect();
    expect_qp_error(qb.state(), "b right after disconnect()");
    qb.disconnect();
    let flushed = all_fail(
        &mut qb,
        &out_b.ids,
        Some(WcStatus::WrFlushErr),
        "b's own requests after disconnect()",
    );
    let order: Vec<u64> = flushed.iter().map(|w| w.wr_id).collect();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(order, sorted, "b's flushes come in posting order");
    all_fail(
        &mut qa,
        &out_a.ids,
        None,
        "a's outstanding requests after b disconnected",
    );
    expect_qp_error(qa.state(), "a after its peer disconnected");

    let s = slot_with(&out_b.arena, &message(51, 0, 64));
    match qb.try_post_send(&[WorkRequest::send(77, &[s.sge_filled()])]) {
        Err(e) => assert_eq!(e.index, 0, "post_send after disconnect(): {e}"),
        Ok(()) => expect_status(
            &qb.next("flush of a post after disconnect()"),
            77,
            WcStatus::WrFlushErr,
            "post after disconnect()",
        ),
    }
    drop(s);
    drop((qa, qb));
    let (ta, tb) = (a.tracker(), b.tracker());
    slots_home(out_a, "a");
    slots_home(out_b, "b");
    drop((win_a, win_b));
    a.assert_released("host a after disconnect");
    b.assert_released("host b after disconnect");
    drop((a, b));
    ta.assert_released("host a dropped", h.wait_timeout());
    tb.assert_released("host b dropped", h.wait_timeout());
}

/// A receive that completed before a send failed is reported before the
/// failure, and the receive side's flushes after it, though the two sides
/// come from different queues (on verbs, two CQs): `b`'s SEND to `a`
/// completes (so one of `a`'s three receives has), then `a` posts a SEND
/// that waits for a receive `b` never posts, and disconnects, which
/// flushes it and the two other receives. `a`, which polled nothing until
/// then, finds the message first, byte for byte, then the SEND's flush,
/// then its receives' flushes. (An endpoint judges a failed Close by what
/// it has received, and a flushed receive ends its connection: a peer
/// that closes after our Close reached it may leave before acknowledging
/// ours, and in any other order that flush fails a close that had
/// succeeded.)
pub fn teardown_recv_before_later_send_error(h: &Harness) {
    let cfg = teardown_config(h);
    let Pair {
        mut qa,
        mut qb,
        a,
        b,
    } = h.connected_pair(&cfg, &cfg);
    let ra = a.arena(4096, 4);
    let sb = b.arena(4096, 1);
    let mut recv = post_recvs(&mut qa, &ra, 1000, 3);
    let m = slot_with(&sb, &message(52, 0, 300));
    qb.post_send(&[WorkRequest::send(1, &[m.sge_filled()])]);
    expect_ok(&qb.next("b's SEND"), 1, WcOpcode::Send, "b's SEND");
    let stuck = slot_with(&ra, &message(52, 1, 64));
    qa.post_send(&[WorkRequest::send(2, &[stuck.sge_filled()])]);
    std::thread::sleep(Duration::from_millis(5));
    qa.disconnect();
    // Time for the flush to be written beside the waiting receive.
    std::thread::sleep(Duration::from_millis(200));
    let first = qa.next("a's first completion");
    expect_ok(
        &first,
        1000,
        WcOpcode::Recv,
        "a's receive, before its send's flush",
    );
    let mut slot = recv.remove(0);
    slot.set_len(first.byte_len as usize);
    check_message(slot.as_slice(), 52, 0, 300, "the message a received");
    let second = qa.next("the flush of a's SEND");
    assert_eq!(second.wr_id, 2, "a's second completion: {second:?}");
    assert_ne!(
        second.status,
        WcStatus::Success,
        "a SEND nobody received succeeded: {second:?}"
    );
    for id in [1001, 1002] {
        let wc = qa.next("the flush of a receive");
        expect_status(
            &wc,
            id,
            WcStatus::WrFlushErr,
            "a's unused receives, after the SEND's flush",
        );
    }
    qa.expect_idle(QUIET, "nothing after the flushes");
    expect_qp_error(qa.state(), "a after disconnect()");
    drop((qa, qb, slot, stuck, m, recv, ra, sb));
    a.assert_released("host a");
    b.assert_released("host b");
}

/// A window deregistered while the peer keeps writing into it: once
/// `deregister` (here `Window::revoke`) returns, the memory never changes
/// again, and the writer's next WRITE fails with `RemAccessErr`.
pub fn deregister_stops_remote_access(h: &Harness) {
    use std::sync::atomic::{AtomicU64, Ordering};
    const LEN: usize = 64 << 10;
    let Pair { qa, qb, a, b } = h.connected_pair(&h.qp_config(), &h.qp_config());
    let win = b.window(LEN, Access::REMOTE_WRITE);
    let r = win.remote();
    let sa = a.arena(LEN, 1);
    let done = AtomicU64::new(0);
    let timeout = h.wait_timeout();
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut qa = qa;
            let mut src = slot_filled(&sa, 0);
            let deadline = Instant::now() + timeout;
            for n in 0u64.. {
                assert!(
                    Instant::now() < deadline,
                    "{n} WRITEs into a deregistered window kept succeeding for {timeout:?}"
                );
                // A different byte every round, so a late write would show.
                src.as_mut_slice().fill((n % 251) as u8 + 1);
                let sg = [src.sge_range(0, LEN)];
                qa.post_send(&[WorkRequest::one_sided(n, Opcode::RdmaWrite, &sg, r.addr, r.rkey)]);
                let wc = qa.next("a WRITE racing a deregistration");
                match wc.status {
                    WcStatus::Success => {
                        assert_eq!(wc.wr_id, n, "completion order");
                        done.store(n + 1, Ordering::SeqCst);
                    }
                    WcStatus::RemAccessErr => {
                        assert_eq!(wc.wr_id, n, "completion order");
                        return n;
                    }
                    _ => panic!("a WRITE racing a deregistration: expected Success or RemAccessErr, got {wc:?}"),
                }
            }
            unreachable!()
        });
        let deadline = Instant::now() + timeout;
        while done.load(Ordering::SeqCst) < 3 && !writer.is_finished() {
            assert!(Instant::now() < deadline, "the writer made no progress");
            std::thread::yield_now();
        }
        let revoked = win.revoke();
        let snapshot = revoked.as_slice().to_vec();
        std::thread::sleep(Duration::from_millis(5));
        check_bytes(
            revoked.as_slice(),
            &snapshot,
            "window memory after deregister returned",
        );
        let failed_at = writer
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e));
        assert!(
            failed_at >= 3,
            "the WRITEs failed before the window was deregistered (at {failed_at})"
        );
        check_bytes(
            revoked.as_slice(),
            &snapshot,
            "window memory after the failed WRITE",
        );
    });
    drop(qb);
}

/// Registrations come and go on both devices (arenas and windows created,
/// written, dropped, on another thread) while a queue pair moves SENDs and
/// WRITE/READ round trips between them: the traffic stays intact, the keys in
/// use keep working, and every registration made by the churn ends.
pub fn registration_churn_under_traffic(h: &Harness) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let rounds = h.iterations(100) as u64;
    let burst = 16u64;
    let mut cfg = h.qp_config();
    cfg.rnr_retry = 7;
    let Pair {
        mut qa,
        mut qb,
        a,
        b,
    } = h.connected_pair(&cfg, &cfg);
    let sa = a.arena(1024, 2 * burst as usize);
    let rb = b.arena(1024, burst as usize);
    let win = b.window(64 << 10, Access::REMOTE_WRITE | Access::REMOTE_READ);
    let r = win.remote();
    let (live_a, live_b) = (a.tracker().live(), b.tracker().live());
    let stop = AtomicBool::new(false);
    let cycles = AtomicU64::new(0);
    let churned = std::thread::scope(|s| {
        let churn = s.spawn(|| {
            let mut k = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let x = a.arena(4096, 2);
                let _filled = slot_with(&x, &pattern(k, 100));
                let mut w = b.window(4096, Access::REMOTE_WRITE);
                w.fill(1);
                let z = b.arena_with(ArenaConfig {
                    access: Access::REMOTE_READ,
                    ..ArenaConfig::new(4096, 1)
                });
                drop((z, w, _filled, x));
                k += 1;
                cycles.store(k, Ordering::SeqCst);
            }
            k
        });
        let _stop_on_exit = StopOnDrop(&stop);
        // Start the traffic once the churn is under way.
        let deadline = Instant::now() + h.wait_timeout();
        while cycles.load(Ordering::SeqCst) == 0 && !churn.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the churn thread made no progress"
            );
            std::thread::yield_now();
        }
        for round in 0..rounds {
            let recvs = post_recvs(&mut qb, &rb, 0, burst as usize);
            let srcs: Vec<SlotMut> = (0..burst)
                .map(|i| slot_with(&sa, &message(80, round * burst + i, 200 + i as usize)))
                .collect();
            for (i, m) in srcs.iter().enumerate() {
                qa.post_send(&[WorkRequest::send(i as u64, &[m.sge_filled()])]);
            }
            for (i, slot) in recvs.iter().enumerate() {
                let wc = qb.next("a SEND during registration churn");
                expect_ok(&wc, i as u64, WcOpcode::Recv, "receive during churn");
                let seq = round * burst + i as u64;
                check_message(
                    &slot.as_slice()[..200 + i],
                    80,
                    seq,
                    200 + i,
                    "SEND during churn",
                );
            }
            for i in 0..burst {
                expect_ok(
                    &qa.next("send completion"),
                    i,
                    WcOpcode::Send,
                    "SEND during churn",
                );
            }
            let off = (round % 64) * 1024;
            let w = slot_with(&sa, &pattern(0xc0 + round, 1024));
            let d = slot_filled(&sa, 0xEE);
            qa.post_send(&[
                WorkRequest::one_sided(
                    100,
                    Opcode::RdmaWrite,
                    &[w.sge_filled()],
                    r.addr + off,
                    r.rkey,
                ),
                WorkRequest::one_sided(
                    101,
                    Opcode::RdmaRead,
                    &[d.sge_range(0, 1024)],
                    r.addr + off,
                    r.rkey,
                ),
            ]);
            expect_ok(
                &qa.next("WRITE during churn"),
                100,
                WcOpcode::RdmaWrite,
                "WRITE during churn",
            );
            expect_ok(
                &qa.next("READ during churn"),
                101,
                WcOpcode::RdmaRead,
                "READ during churn",
            );
            check_bytes(
                &d.as_slice()[..1024],
                &pattern(0xc0 + round, 1024),
                "READ back during churn",
            );
        }
        stop.store(true, Ordering::SeqCst);
        churn
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    });
    assert!(churned > 0, "the churn thread never ran");
    assert_eq!(
        a.tracker().live(),
        live_a,
        "host a: every churned registration ended"
    );
    assert_eq!(
        b.tracker().live(),
        live_b,
        "host b: every churned registration ended"
    );
    assert!(
        a.tracker().failures().is_empty() && b.tracker().failures().is_empty(),
        "deregistrations failed"
    );
    drop(win);
}

/// Stops the churn thread even when the traffic side panics.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
