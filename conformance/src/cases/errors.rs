//! Completion errors, each on the right side, followed by the error state and
//! the flush of everything behind the failing request.

use std::any::Any;

use super::prelude::*;

/// The failing request of a [`requester_fails`] scenario and what it needs kept alive.
struct Bad {
    opcode: Opcode,
    flags: SendFlags,
    local: Vec<Sge>,
    remote_addr: u64,
    rkey: u32,
    compare_add: u64,
    swap: u64,
    /// Memory the bad request names, kept alive until the end.
    keep: Vec<Box<dyn Any>>,
    /// A window the bad request targeted; it must still be all zeros.
    untouched: Option<Window>,
}

impl Bad {
    fn new(opcode: Opcode, local: Vec<Sge>, remote_addr: u64, rkey: u32) -> Bad {
        Bad {
            opcode,
            flags: SendFlags::SIGNALED,
            local,
            remote_addr,
            rkey,
            compare_add: 0,
            swap: 0,
            keep: Vec::new(),
            untouched: None,
        }
    }
    fn keep(mut self, x: impl Any) -> Bad {
        self.keep.push(Box::new(x));
        self
    }
    fn untouched(mut self, w: Window) -> Bad {
        self.untouched = Some(w);
        self
    }
}

/// On a fresh pair (`b` with two receives posted), `a` posts in one list the
/// request `make` builds, then a WRITE into a clean window and two SENDs, all
/// signaled. Expects `status` on the bad request, `WrFlushErr` on the three
/// behind it in order, nothing more, `a` in the error state, nothing delivered
/// to `b`, and no byte written to the clean window or the bad request's target.
fn requester_fails(
    h: &Harness,
    what: &str,
    status: WcStatus,
    make: impl FnOnce(&Host, &Host) -> Bad,
) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let rb = p.b.arena(4096, 2);
    let _recvs = post_recvs(&mut p.qb, &rb, 500, 2);
    let clean = p.b.window(4096, Access::REMOTE_WRITE);
    let cr = clean.remote();
    let mut bad = make(&p.a, &p.b);
    let sa = p.a.arena(4096, 2);
    let src = slot_with(&sa, &pattern(7, 512));
    let sg = [src.sge_filled()];
    let wrs = [
        WorkRequest {
            wr_id: 1,
            opcode: bad.opcode,
            flags: bad.flags,
            sg_list: &bad.local,
            imm_data: 0,
            remote_addr: bad.remote_addr,
            rkey: bad.rkey,
            compare_add: bad.compare_add,
            swap: bad.swap,
        },
        WorkRequest::one_sided(2, Opcode::RdmaWrite, &sg, cr.addr, cr.rkey),
        WorkRequest::send(3, &sg),
        WorkRequest::send(4, &sg),
    ];
    p.qa.post_send(&wrs);
    let wc = p.qa.next(what);
    expect_status(&wc, 1, status, what);
    assert_eq!(
        wc.qp_num,
        p.qa.qp_num(),
        "{what}: qp_num of the error completion"
    );
    for id in 2..=4 {
        let wc = p.qa.next("flush of the requests behind the failing one");
        expect_status(
            &wc,
            id,
            WcStatus::WrFlushErr,
            &format!("{what}: request {id} behind the failing one"),
        );
    }
    p.qa.expect_idle(QUIET, "nothing after the flushes");
    expect_qp_error(p.qa.state(), &format!("{what}: requester after the error"));
    for wc in p.qb.drain(QUIET) {
        assert!(
            wc.status != WcStatus::Success,
            "{what}: the peer received something although every request after the failing one was flushed: {wc:?}"
        );
    }
    check_filled(
        clean.revoke().as_slice(),
        0,
        &format!("{what}: a flushed WRITE must not land"),
    );
    if let Some(w) = bad.untouched.take() {
        check_filled(
            w.revoke().as_slice(),
            0,
            &format!("{what}: the failing request must not write"),
        );
    }
    drop(bad);
}

/// A SEND larger than the receive buffer: `LocLenErr` on the receiver's
/// receive, `RemInvReqErr` on the sender (IB spec, mlx5); both queue pairs
/// end in the error state and flush the rest, on both sides. Also with a
/// receive without SGEs.
///
/// Linux rxe reports this case as a malformed receive instead
/// (`LocQpOpErr` / `RemOpErr`: its `copy_data` returns `-EINVAL`, not
/// `-ENOSPC`), and a verbs transport cannot tell why the kernel failed a
/// receive, so that pair is accepted too, but only as a pair.
pub fn err_recv_too_small(h: &Harness) {
    for no_sge in [false, true] {
        let what = if no_sge {
            "SEND into a receive without SGEs"
        } else {
            "128-byte SEND into a 64-byte receive"
        };
        let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
        let rb = p.b.arena(4096, 4);
        let sa = p.a.arena(4096, 1);
        let small = slot_filled(&rb, 0xEE);
        let small_sg = [small.sge_range(0, 64)];
        let sg: &[Sge] = if no_sge { &[] } else { &small_sg };
        p.qb.post_recv(&[RecvRequest {
            wr_id: 1,
            sg_list: sg,
        }]);
        let more = post_recvs(&mut p.qb, &rb, 2, 3);
        let src = slot_with(&sa, &pattern(8, 128));
        let s = [src.sge_filled()];
        p.qa.post_send(&[
            WorkRequest::send(1, &s),
            WorkRequest::send(2, &s),
            WorkRequest::send(3, &s),
            WorkRequest::send(4, &s),
        ]);
        let wc = p.qb.next("the receive that is too small");
        assert!(
            wc.wr_id == 1 && matches!(wc.status, WcStatus::LocLenErr | WcStatus::LocQpOpErr),
            "{what}: receiver: expected wr_id 1 to complete with LocLenErr (or rxe's LocQpOpErr), got {wc:?}"
        );
        let receiver_status = wc.status;
        let sender_status = if receiver_status == WcStatus::LocLenErr {
            WcStatus::RemInvReqErr
        } else {
            WcStatus::RemOpErr
        };
        assert!(
            wc.opcode.is_recv(),
            "{what}: an erroneous receive still says it is a receive: {wc:?}"
        );
        for id in 2..=4 {
            let wc = p.qb.next("receiver flush");
            expect_status(
                &wc,
                id,
                WcStatus::WrFlushErr,
                &format!("{what}: receive {id} behind the failed one"),
            );
            assert!(
                wc.opcode.is_recv(),
                "{what}: a flushed receive still says it is a receive: {wc:?}"
            );
        }
        expect_qp_error(p.qb.state(), &format!("{what}: receiver"));
        let wc = p.qa.next("the sender's error");
        expect_status(
            &wc,
            1,
            sender_status,
            &format!("{what}: sender (the receiver said {receiver_status:?})"),
        );
        for id in 2..=4 {
            let wc = p.qa.next("sender flush");
            expect_status(
                &wc,
                id,
                WcStatus::WrFlushErr,
                &format!("{what}: SEND {id} behind the failed one"),
            );
        }
        expect_qp_error(p.qa.state(), &format!("{what}: sender"));
        p.qa.expect_idle(QUIET, "nothing more on the sender");
        p.qb.expect_idle(QUIET, "nothing more on the receiver");
        if !no_sge {
            check_filled(
                &small.as_slice()[64..],
                0xEE,
                "bytes past the too-small receive buffer",
            );
        }
        for s in &more {
            check_filled(s.as_slice(), 0xEE, "flushed receive buffers");
        }
    }
}

/// A one-sided request naming an rkey that does not exist, or that belonged to
/// a window deregistered since: `RemAccessErr` on the requester (WRITE, READ,
/// and atomics when supported), the rest flushed.
pub fn err_bad_rkey(h: &Harness) {
    requester_fails(
        h,
        "WRITE with an unknown rkey",
        WcStatus::RemAccessErr,
        |a, b| {
            let w = b.window(4096, Access::REMOTE_WRITE);
            let r = w.remote();
            let sa = a.arena(4096, 1);
            let s = slot_with(&sa, &pattern(9, 64));
            Bad::new(Opcode::RdmaWrite, vec![s.sge_filled()], r.addr, !r.rkey)
                .keep(s)
                .keep(sa)
                .untouched(w)
        },
    );
    requester_fails(
        h,
        "READ with an unknown rkey",
        WcStatus::RemAccessErr,
        |a, b| {
            let w = b.window(4096, Access::REMOTE_READ);
            let r = w.remote();
            let sa = a.arena(4096, 1);
            let d = slot_filled(&sa, 0xEE);
            Bad::new(Opcode::RdmaRead, vec![d.sge_range(0, 64)], r.addr, !r.rkey)
                .keep(d)
                .keep(sa)
                .keep(w)
        },
    );
    requester_fails(
        h,
        "WRITE with the rkey of a deregistered window",
        WcStatus::RemAccessErr,
        |a, b| {
            let w = b.window(4096, Access::REMOTE_WRITE);
            let r = w.remote();
            let revoked = w.revoke();
            let sa = a.arena(4096, 1);
            let s = slot_with(&sa, &pattern(9, 64));
            Bad::new(Opcode::RdmaWrite, vec![s.sge_filled()], r.addr, r.rkey)
                .keep(s)
                .keep(sa)
                .keep(revoked)
        },
    );
    if h.caps().atomics {
        requester_fails(
            h,
            "FETCH_AND_ADD with an unknown rkey",
            WcStatus::RemAccessErr,
            |a, b| {
                let w = b.window(64, Access::REMOTE_ATOMIC);
                let r = w.remote();
                let sa = a.arena(4096, 1);
                let d = slot_filled(&sa, 0xEE);
                let mut bad = Bad::new(
                    Opcode::AtomicFetchAndAdd,
                    vec![d.sge_range(0, 8)],
                    r.addr,
                    !r.rkey,
                )
                .keep(d)
                .keep(sa)
                .untouched(w);
                bad.compare_add = 1;
                bad
            },
        );
    }
}

/// One-sided requests outside the rkey's region (past the end by a byte,
/// crossing the end inside the same page, below the start): `RemAccessErr`,
/// nothing written, the rest flushed.
pub fn err_remote_out_of_bounds(h: &Harness) {
    // 4000 bytes: the registration ends inside a page, so page-granular checks fail this.
    const LEN: u64 = 4000;
    let cases: [(&str, Opcode, i64, u32); 5] = [
        (
            "WRITE crossing the end of the region",
            Opcode::RdmaWrite,
            LEN as i64 - 4,
            8,
        ),
        (
            "WRITE one byte past the end",
            Opcode::RdmaWrite,
            LEN as i64,
            1,
        ),
        ("WRITE starting below the region", Opcode::RdmaWrite, -8, 16),
        (
            "READ crossing the end of the region",
            Opcode::RdmaRead,
            LEN as i64 - 1,
            2,
        ),
        ("READ past the end", Opcode::RdmaRead, LEN as i64 + 4096, 8),
    ];
    for (what, op, off, len) in cases {
        requester_fails(h, what, WcStatus::RemAccessErr, |a, b| {
            let w = b.window(LEN as usize, Access::REMOTE_WRITE | Access::REMOTE_READ);
            let r = w.remote();
            let sa = a.arena(4096, 1);
            let s = slot_with(&sa, &pattern(10, len as usize));
            let sge = if op == Opcode::RdmaRead {
                s.sge_range(0, len as usize)
            } else {
                s.sge_filled()
            };
            Bad::new(op, vec![sge], r.addr.wrapping_add_signed(off), r.rkey)
                .keep(s)
                .keep(sa)
                .untouched(w)
        });
    }
    if h.caps().atomics {
        requester_fails(
            h,
            "FETCH_AND_ADD past the end",
            WcStatus::RemAccessErr,
            |a, b| {
                let w = b.window(64, Access::REMOTE_ATOMIC);
                let r = w.remote();
                let sa = a.arena(4096, 1);
                let d = slot_filled(&sa, 0xEE);
                let mut bad = Bad::new(
                    Opcode::AtomicFetchAndAdd,
                    vec![d.sge_range(0, 8)],
                    r.addr + 64,
                    r.rkey,
                )
                .keep(d)
                .keep(sa)
                .untouched(w);
                bad.compare_add = 1;
                bad
            },
        );
    }
}

/// RDMA WRITE (and WRITE_WITH_IMM) into memory registered without
/// `REMOTE_WRITE` (a read-only window, an atomic-only window, a remote-read
/// arena): `RemAccessErr`, nothing written.
pub fn err_remote_write_without_access(h: &Harness) {
    requester_fails(
        h,
        "WRITE into a REMOTE_READ-only window",
        WcStatus::RemAccessErr,
        |a, b| {
            let w = b.window(4096, Access::REMOTE_READ);
            let r = w.remote();
            let sa = a.arena(4096, 1);
            let s = slot_with(&sa, &pattern(11, 256));
            Bad::new(Opcode::RdmaWrite, vec![s.sge_filled()], r.addr, r.rkey)
                .keep(s)
                .keep(sa)
                .untouched(w)
        },
    );
    requester_fails(
        h,
        "WRITE_WITH_IMM into a REMOTE_READ-only window",
        WcStatus::RemAccessErr,
        |a, b| {
            let w = b.window(4096, Access::REMOTE_READ);
            let r = w.remote();
            let sa = a.arena(4096, 1);
            let s = slot_with(&sa, &pattern(11, 256));
            Bad::new(
                Opcode::RdmaWriteWithImm,
                vec![s.sge_filled()],
                r.addr,
                r.rkey,
            )
            .keep(s)
            .keep(sa)
            .untouched(w)
        },
    );
    if h.caps().atomics {
        requester_fails(
            h,
            "WRITE into a REMOTE_ATOMIC-only window",
            WcStatus::RemAccessErr,
            |a, b| {
                let w = b.window(4096, Access::REMOTE_ATOMIC);
                let r = w.remote();
                let sa = a.arena(4096, 1);
                let s = slot_with(&sa, &pattern(11, 256));
                Bad::new(Opcode::RdmaWrite, vec![s.sge_filled()], r.addr, r.rkey)
                    .keep(s)
                    .keep(sa)
                    .untouched(w)
            },
        );
    }
    requester_fails(
        h,
        "WRITE into a remote-read arena",
        WcStatus::RemAccessErr,
        |a, b| {
            let ra = b.arena_with(ArenaConfig {
                access: Access::REMOTE_READ,
                ..ArenaConfig::new(4096, 1)
            });
            let target = slot_with(&ra, &[0u8; 256]).freeze();
            let r = remote_of(&ra, &target);
            let sa = a.arena(4096, 1);
            let s = slot_with(&sa, &pattern(11, 256));
            Bad::new(Opcode::RdmaWrite, vec![s.sge_filled()], r.addr, r.rkey)
                .keep(s)
                .keep(sa)
                .keep(CheckZeroOnDrop(target))
                .keep(ra)
        },
    );
}

/// Checks (after the scenario) that arena bytes a peer tried to write stayed zero.
struct CheckZeroOnDrop(Bytes);

impl Drop for CheckZeroOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            check_filled(&self.0, 0, "a remote-read arena after a refused WRITE");
        }
    }
}

/// RDMA READ from memory registered without `REMOTE_READ` (a write-only
/// window, a local-only arena): `RemAccessErr`, the local buffer untouched.
pub fn err_remote_read_without_access(h: &Harness) {
    requester_fails(
        h,
        "READ from a REMOTE_WRITE-only window",
        WcStatus::RemAccessErr,
        |a, b| {
            let w = b.window(4096, Access::REMOTE_WRITE);
            let r = w.remote();
            let sa = a.arena(4096, 1);
            let d = slot_filled(&sa, 0xEE);
            Bad::new(Opcode::RdmaRead, vec![d.sge_range(0, 256)], r.addr, r.rkey)
                .keep(CheckFilledOnDrop(d, 0xEE))
                .keep(sa)
                .keep(w)
        },
    );
    requester_fails(
        h,
        "READ from a local-only arena",
        WcStatus::RemAccessErr,
        |a, b| {
            let la = b.arena(4096, 1);
            let src = slot_with(&la, &pattern(12, 256)).freeze();
            let r = remote_of(&la, &src);
            let sa = a.arena(4096, 1);
            let d = slot_filled(&sa, 0xEE);
            Bad::new(Opcode::RdmaRead, vec![d.sge_range(0, 256)], r.addr, r.rkey)
                .keep(CheckFilledOnDrop(d, 0xEE))
                .keep(sa)
                .keep(src)
                .keep(la)
        },
    );
}

/// Checks (after the scenario) that a local buffer kept its fill byte.
struct CheckFilledOnDrop(SlotMut, u8);

impl Drop for CheckFilledOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            check_filled(
                self.0.as_slice(),
                self.1,
                "the local buffer of a refused request",
            );
        }
    }
}

/// Atomics on memory registered without `REMOTE_ATOMIC`: `RemAccessErr`.
pub fn err_atomic_without_access(h: &Harness) {
    if !atomics_supported(h) {
        return;
    }
    for op in [Opcode::AtomicFetchAndAdd, Opcode::AtomicCmpAndSwp] {
        requester_fails(
            h,
            &format!("{op:?} on a REMOTE_WRITE|REMOTE_READ window"),
            WcStatus::RemAccessErr,
            |a, b| {
                let w = b.window(64, Access::REMOTE_WRITE | Access::REMOTE_READ);
                let r = w.remote();
                let sa = a.arena(4096, 1);
                let d = slot_filled(&sa, 0xEE);
                let mut bad = Bad::new(op, vec![d.sge_range(0, 8)], r.addr, r.rkey)
                    .keep(d)
                    .keep(sa)
                    .untouched(w);
                bad.compare_add = 1;
                bad.swap = 1;
                bad
            },
        );
    }
}

/// An atomic on an address that is not 8-byte aligned is refused at post
/// time (`PostError`, as rxe's `validate_send_wr` does; the queue pair stays
/// usable) or completes with `RemInvReqErr` (the IB "invalid request" NAK,
/// then the error state and flushes). Either way the remote word is unchanged.
pub fn err_atomic_misaligned(h: &Harness) {
    if !atomics_supported(h) {
        return;
    }
    for op in [Opcode::AtomicFetchAndAdd, Opcode::AtomicCmpAndSwp] {
        let what = format!("{op:?} on a misaligned address");
        let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
        let mut win = p.b.window(64, Access::REMOTE_ATOMIC);
        win.fill(0);
        let r = win.remote();
        let sa = p.a.arena(4096, 1);
        let d = slot_filled(&sa, 0xEE);
        let (bad, good) = ([d.sge_range(0, 8)], [d.sge_range(8, 8)]);
        let wrs = [
            WorkRequest::one_sided(1, op, &bad, r.addr + 4, r.rkey).with_atomic(0, 1),
            WorkRequest::one_sided(2, Opcode::AtomicFetchAndAdd, &good, r.addr + 16, r.rkey)
                .with_atomic(5, 0),
        ];
        match p.qa.try_post_send(&wrs) {
            Err(e) => {
                assert_eq!(
                    e.index, 0,
                    "{what}: refused at post time, at its own index ({e})"
                );
                p.qa.expect_idle(QUIET, "a refused request never completes");
                // Nothing from the refused request on was posted; the queue pair still works.
                p.qa.post_send(&wrs[1..]);
                expect_ok(
                    &p.qa.next("an aligned atomic after the refusal"),
                    2,
                    WcOpcode::FetchAdd,
                    &format!("{what}: the queue pair still works after a post-time refusal"),
                );
                assert_eq!(
                    u64_at(d.as_slice(), 8),
                    0,
                    "{what}: old value of the aligned add"
                );
                let words = words_of(win.revoke().as_slice());
                assert_eq!(
                    words,
                    [0, 0, 5, 0, 0, 0, 0, 0],
                    "{what}: only the aligned add changed the window"
                );
            }
            Ok(()) => {
                expect_status(&p.qa.next(&what), 1, WcStatus::RemInvReqErr, &what);
                expect_status(
                    &p.qa.next("flush"),
                    2,
                    WcStatus::WrFlushErr,
                    &format!("{what}: the request behind it"),
                );
                expect_qp_error(p.qa.state(), &what);
                check_filled(
                    win.revoke().as_slice(),
                    0,
                    &format!("{what}: the window is unchanged"),
                );
            }
        }
    }
}

/// A local SGE naming an lkey that does not exist (SEND with one bad SGE,
/// SEND whose second SGE is bad, WRITE source, READ destination):
/// `LocProtErr` on the requester, the rest flushed, nothing sent.
pub fn err_local_bad_lkey(h: &Harness) {
    requester_fails(
        h,
        "SEND from an SGE with an unknown lkey",
        WcStatus::LocProtErr,
        |a, _| {
            let sa = a.arena(4096, 1);
            let s = slot_with(&sa, &pattern(13, 100));
            let g = s.sge_filled();
            Bad::new(
                Opcode::Send,
                vec![Sge::new(g.addr(), g.length(), !g.lkey())],
                0,
                0,
            )
            .keep(s)
            .keep(sa)
        },
    );
    requester_fails(
        h,
        "SEND whose second SGE has an unknown lkey",
        WcStatus::LocProtErr,
        |a, _| {
            let sa = a.arena(4096, 2);
            let s1 = slot_with(&sa, &pattern(13, 100));
            let s2 = slot_with(&sa, &pattern(14, 100));
            let g = s2.sge_filled();
            Bad::new(
                Opcode::Send,
                vec![s1.sge_filled(), Sge::new(g.addr(), g.length(), !g.lkey())],
                0,
                0,
            )
            .keep(s1)
            .keep(s2)
            .keep(sa)
        },
    );
    requester_fails(
        h,
        "WRITE from an SGE with an unknown lkey",
        WcStatus::LocProtErr,
        |a, b| {
            let w = b.window(4096, Access::REMOTE_WRITE);
            let r = w.remote();
            let sa = a.arena(4096, 1);
            let s = slot_with(&sa, &pattern(13, 100));
            let g = s.sge_filled();
            Bad::new(
                Opcode::RdmaWrite,
                vec![Sge::new(g.addr(), g.length(), !g.lkey())],
                r.addr,
                r.rkey,
            )
            .keep(s)
            .keep(sa)
            .untouched(w)
        },
    );
    requester_fails(
        h,
        "READ into an SGE with an unknown lkey",
        WcStatus::LocProtErr,
        |a, b| {
            let ra = b.arena_with(ArenaConfig {
                access: Access::REMOTE_READ,
                ..ArenaConfig::new(4096, 1)
            });
            let src = slot_with(&ra, &pattern(15, 100)).freeze();
            let r = remote_of(&ra, &src);
            let sa = a.arena(4096, 1);
            let d = slot_filled(&sa, 0xEE);
            let g = d.sge_range(0, 100);
            Bad::new(
                Opcode::RdmaRead,
                vec![Sge::new(g.addr(), g.length(), !g.lkey())],
                r.addr,
                r.rkey,
            )
            .keep(CheckFilledOnDrop(d, 0xEE))
            .keep(sa)
            .keep(src)
            .keep(ra)
        },
    );
}

/// A local SGE with a valid lkey but outside its region (crossing the end of
/// the registration, or starting before it): `LocProtErr`, the rest flushed.
pub fn err_local_sge_out_of_bounds(h: &Harness) {
    requester_fails(
        h,
        "SEND from an SGE crossing the end of its region",
        WcStatus::LocProtErr,
        |a, _| {
            let sa = a.arena(4096, 1);
            let s = slot_with(&sa, &pattern(16, 4096));
            let g = s.sge_filled();
            Bad::new(
                Opcode::Send,
                vec![Sge::new(g.addr() + 4096 - 8, 64, g.lkey())],
                0,
                0,
            )
            .keep(s)
            .keep(sa)
        },
    );
    requester_fails(
        h,
        "SEND from an SGE starting before its region",
        WcStatus::LocProtErr,
        |a, _| {
            let sa = a.arena(4096, 1);
            let s = slot_with(&sa, &pattern(16, 64));
            let g = s.sge_filled();
            Bad::new(
                Opcode::Send,
                vec![Sge::new(g.addr() - 8, 16, g.lkey())],
                0,
                0,
            )
            .keep(s)
            .keep(sa)
        },
    );
    requester_fails(
        h,
        "READ into an SGE crossing the end of its region",
        WcStatus::LocProtErr,
        |a, b| {
            let ra = b.arena_with(ArenaConfig {
                access: Access::REMOTE_READ,
                ..ArenaConfig::new(4096, 1)
            });
            let src = slot_with(&ra, &pattern(17, 256)).freeze();
            let r = remote_of(&ra, &src);
            let sa = a.arena(4096, 1);
            let d = slot_filled(&sa, 0xEE);
            let g = d.sge();
            Bad::new(
                Opcode::RdmaRead,
                vec![Sge::new(g.addr() + 4096 - 16, 256, g.lkey())],
                r.addr,
                r.rkey,
            )
            .keep(d)
            .keep(sa)
            .keep(src)
            .keep(ra)
        },
    );
}

/// An unsignaled request that fails still produces its error completion
/// (errors are always reported), followed by the flush of the signaled rest.
pub fn err_unsignaled_failure_completes(h: &Harness) {
    requester_fails(
        h,
        "unsignaled SEND with an unknown lkey",
        WcStatus::LocProtErr,
        |a, _| {
            let sa = a.arena(4096, 1);
            let s = slot_with(&sa, &pattern(18, 100));
            let g = s.sge_filled();
            let mut bad = Bad::new(
                Opcode::Send,
                vec![Sge::new(g.addr(), g.length(), !g.lkey())],
                0,
                0,
            )
            .keep(s)
            .keep(sa);
            bad.flags = SendFlags::NONE;
            bad
        },
    );
}

/// Posting to a queue pair in the error state is either refused
/// (`PostError` at index 0) or flushed with `WrFlushErr`: never executed,
/// never silently lost. Receives likewise.
pub fn err_post_after_error(h: &Harness) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let sa = p.a.arena(4096, 4);
    let rb = p.b.arena(4096, 4);
    let _recvs = post_recvs(&mut p.qb, &rb, 100, 2);
    let s = slot_with(&sa, &pattern(19, 64));
    let g = s.sge_filled();
    let bad = [Sge::new(g.addr(), g.length(), !g.lkey())];
    p.qa.post_send(&[WorkRequest::send(1, &bad)]);
    expect_status(
        &p.qa.next("the failing SEND"),
        1,
        WcStatus::LocProtErr,
        "SEND with an unknown lkey",
    );
    expect_qp_error(p.qa.state(), "after a local protection error");
    let good = [g];
    match p
        .qa
        .try_post_send(&[WorkRequest::send(2, &good), WorkRequest::send(3, &good)])
    {
        Err(e) => assert_eq!(
            e.index, 0,
            "post_send to a queue pair in error: refused at the first request: {e}"
        ),
        Ok(()) => {
            for id in [2, 3] {
                let wc = p.qa.next("flush of a SEND posted in the error state");
                expect_status(
                    &wc,
                    id,
                    WcStatus::WrFlushErr,
                    "SEND posted to a queue pair in error",
                );
            }
        }
    }
    let r = slot_filled(&sa, 0xEE);
    match p.qa.try_post_recv(&[RecvRequest {
        wr_id: 9,
        sg_list: &[r.sge()],
    }]) {
        Err(e) => assert_eq!(e.index, 0, "post_recv to a queue pair in error: {e}"),
        Ok(()) => {
            let wc = p.qa.next("flush of a receive posted in the error state");
            expect_status(
                &wc,
                9,
                WcStatus::WrFlushErr,
                "receive posted to a queue pair in error",
            );
            assert!(
                wc.opcode.is_recv(),
                "a flushed receive says it is a receive: {wc:?}"
            );
        }
    }
    p.qa.expect_idle(QUIET, "nothing else");
    for wc in p.qb.drain(QUIET) {
        assert!(
            wc.status != WcStatus::Success,
            "nothing may be delivered: {wc:?}"
        );
    }
    check_filled(r.as_slice(), 0xEE, "a receive flushed in the error state");
}
