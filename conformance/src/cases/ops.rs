//! Every operation, its completion fields and its data.

use super::prelude::*;

/// SEND of messages of several sizes: payload byte for byte, `byte_len`,
/// opcodes, `qp_num` and the absence of immediate data on both sides.
pub fn send_recv_small(h: &Harness) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let sa = p.a.arena(4096, 16);
    let rb = p.b.arena(4096, 16);
    let sizes = [1usize, 7, 8, 63, 64, 100, 1500, 4096];
    let recvs = post_recvs(&mut p.qb, &rb, 100, sizes.len());
    let mut sends = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let s = slot_with(&sa, &message(1, i as u64, len));
        p.qa.post_send(&[WorkRequest::send(i as u64, &[s.sge_filled()])]);
        sends.push(s);
    }
    let (qa_num, qb_num) = (p.qa.qp_num(), p.qb.qp_num());
    for i in 0..sizes.len() {
        let wc = p.qa.next("SEND completion");
        expect_ok(&wc, i as u64, WcOpcode::Send, "sender");
        assert_eq!(wc.qp_num, qa_num, "sender completion's qp_num");
    }
    for (i, (mut slot, &len)) in recvs.into_iter().zip(&sizes).enumerate() {
        let wc = p.qb.next("receive completion");
        expect_ok(&wc, 100 + i as u64, WcOpcode::Recv, "receiver");
        assert_eq!(wc.byte_len as usize, len, "byte_len of message {i}");
        assert_eq!(wc.imm_data, None, "a plain SEND carries no immediate");
        assert_eq!(wc.qp_num, qb_num, "receiver completion's qp_num");
        slot.set_len(len);
        check_message(slot.as_slice(), 1, i as u64, len, "received payload");
    }
    p.qa.expect_idle(QUIET, "nothing else on the sender");
    p.qb.expect_idle(QUIET, "nothing else on the receiver");
}

/// Zero-length SEND, SEND_WITH_IMM and RDMA_WRITE_WITH_IMM: each consumes a
/// receive with `byte_len` 0 and leaves the receive buffer untouched.
pub fn send_zero_length(h: &Harness) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let rb = p.b.arena(256, 4);
    let win = p.b.window(64, Access::REMOTE_WRITE);
    let slots: Vec<SlotMut> = (0..3).map(|_| slot_filled(&rb, 0xEE)).collect();
    for (i, s) in slots.iter().enumerate() {
        p.qb.post_recv(&[RecvRequest {
            wr_id: 10 + i as u64,
            sg_list: &[s.sge()],
        }]);
    }
    let r = win.remote();
    p.qa.post_send(&[
        WorkRequest::send(1, &[]),
        WorkRequest {
            opcode: Opcode::SendWithImm,
            ..WorkRequest::send(2, &[])
        }
        .with_imm(0x1234_5678),
        WorkRequest::one_sided(3, Opcode::RdmaWriteWithImm, &[], r.addr, r.rkey).with_imm(77),
    ]);
    let wcs = p.qa.take(3, "zero-length sends");
    expect_ok(&wcs[0], 1, WcOpcode::Send, "empty SEND");
    expect_ok(&wcs[1], 2, WcOpcode::Send, "empty SEND_WITH_IMM");
    expect_ok(&wcs[2], 3, WcOpcode::RdmaWrite, "empty WRITE_WITH_IMM");
    let wcs = p.qb.take(3, "zero-length receives");
    let want = [
        (10, WcOpcode::Recv, None),
        (11, WcOpcode::Recv, Some(0x1234_5678)),
        (12, WcOpcode::RecvRdmaWithImm, Some(77)),
    ];
    for (wc, (id, op, imm)) in wcs.iter().zip(want) {
        expect_ok(wc, id, op, "zero-length receive");
        assert_eq!(wc.byte_len, 0, "byte_len of an empty message: {wc:?}");
        assert_eq!(wc.imm_data, imm, "immediate of {wc:?}");
    }
    for s in &slots {
        check_filled(s.as_slice(), 0xEE, "receive buffer of an empty message");
    }
    check_filled(
        win.revoke().as_slice(),
        0,
        "window after an empty WRITE_WITH_IMM",
    );
}

/// SEND_WITH_IMM: immediate values (0, 1, patterns, `u32::MAX`) arrive
/// unchanged in host order with the payload.
pub fn send_with_imm(h: &Harness) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let sa = p.a.arena(256, 8);
    let rb = p.b.arena(256, 8);
    let imms = [0u32, 1, 0xdead_beef, 0x8000_0001, u32::MAX, 0x0102_0304];
    let recvs = post_recvs(&mut p.qb, &rb, 0, imms.len());
    let mut keep = Vec::new();
    for (i, &imm) in imms.iter().enumerate() {
        let s = slot_with(&sa, &message(2, i as u64, 40 + i));
        let sg = [s.sge_filled()];
        let wr = WorkRequest {
            opcode: Opcode::SendWithImm,
            ..WorkRequest::send(i as u64, &sg)
        }
        .with_imm(imm);
        p.qa.post_send(&[wr]);
        keep.push(s);
    }
    for (i, wc) in p.qa.take(imms.len(), "SEND_WITH_IMM").iter().enumerate() {
        expect_ok(wc, i as u64, WcOpcode::Send, "sender");
    }
    for (i, mut slot) in recvs.into_iter().enumerate() {
        let wc = p.qb.next("receive with immediate");
        expect_ok(&wc, i as u64, WcOpcode::Recv, "receiver");
        assert_eq!(wc.imm_data, Some(imms[i]), "immediate of message {i}");
        assert_eq!(wc.byte_len as usize, 40 + i);
        slot.set_len(40 + i);
        check_message(
            slot.as_slice(),
            2,
            i as u64,
            40 + i,
            "payload with immediate",
        );
    }
}

/// `post_inline`: SENDs and SEND_WITH_IMMs from a plain buffer, not
/// registered, overwritten as soon as each post returns: every size from 0
/// to the queue pair's inline limit arrives byte for byte with its
/// immediate, in order with SENDs posted the usual way between them;
/// unsignaled, they are covered by the last request's completion; one
/// byte over the limit is refused at post time and nothing of it arrives.
pub fn post_inline_from_slice(h: &Harness) {
    let mut cfg = h.qp_config();
    cfg.max_inline_data = h.caps().max_inline_data;
    let mut p = h.connected_pair(&cfg, &h.qp_config());
    let m = p.qa.caps().max_inline_data as usize;
    assert!(m >= 16, "inline limit {m}: too small to test post_inline");
    let sizes = [0usize, 1, 7, m / 2, m - 1, m];
    let n = sizes.len();
    let rb = p.b.arena(m.max(64), 2 * n + 1);
    let mut recvs = post_recvs(&mut p.qb, &rb, 0, 2 * n + 1).into_iter();
    let sa = p.a.arena(64, n + 1);
    let mut keep = Vec::new();
    let mut buf = vec![0u8; m + 1];
    let imm_of = |i: usize| (i % 2 == 1).then_some(0x5100_0000 | i as u32);
    for (i, &len) in sizes.iter().enumerate() {
        buf[..len].copy_from_slice(&message(11, i as u64, len));
        p.qa.qp()
            .post_inline(2 * i as u64, SendFlags::NONE, imm_of(i), &buf[..len])
            .unwrap_or_else(|e| panic!("post_inline of {len} bytes: {e}"));
        buf.fill(0xEE); // the device copied it at post time
        let s = slot_with(&sa, &message(12, i as u64, 16));
        let flags = if i + 1 == n {
            SendFlags::SIGNALED
        } else {
            SendFlags::NONE
        };
        p.qa.post_send(&[WorkRequest::send(2 * i as u64 + 1, &[s.sge_filled()]).with_flags(flags)]);
        keep.push(s);
    }
    let over =
        p.qa.qp()
            .post_inline(99, SendFlags::SIGNALED, None, &buf[..m + 1]);
    match over {
        Err(e) => {
            assert_eq!(e.index, 0, "{e}");
            assert!(
                matches!(e.error, TransportError::InlineTooLarge { .. }),
                "one byte over the inline limit: {e}"
            );
        }
        Ok(()) => panic!("post_inline of {} bytes (limit {m}) was accepted", m + 1),
    }
    let wc = p.qa.next("the last request's completion");
    expect_ok(&wc, 2 * n as u64 - 1, WcOpcode::Send, "sender");
    for (i, &len) in sizes.iter().enumerate() {
        let wc = p.qb.next("a SEND from post_inline");
        expect_ok(&wc, 2 * i as u64, WcOpcode::Recv, "receiver");
        assert_eq!(wc.byte_len as usize, len, "length of inline message {i}");
        assert_eq!(wc.imm_data, imm_of(i), "immediate of inline message {i}");
        let mut slot = recvs.next().expect("a receive per message");
        slot.set_len(len);
        check_message(slot.as_slice(), 11, i as u64, len, "post_inline payload");
        let wc = p.qb.next("the usual SEND after it");
        expect_ok(&wc, 2 * i as u64 + 1, WcOpcode::Recv, "receiver");
        assert_eq!(wc.imm_data, None);
        let mut slot = recvs.next().expect("a receive per message");
        slot.set_len(wc.byte_len as usize);
        check_message(
            slot.as_slice(),
            12,
            i as u64,
            16,
            "SEND between inline ones",
        );
    }
    // The refused one sent nothing: the last receive is still posted.
    let s = slot_with(&sa, &message(13, 0, 16));
    p.qa.post_send(&[WorkRequest::send(100, &[s.sge_filled()]).with_flags(SendFlags::SIGNALED)]);
    expect_ok(
        &p.qa.next("a SEND after the refusal"),
        100,
        WcOpcode::Send,
        "sender",
    );
    let wc = p.qb.next("the SEND after the refusal");
    expect_ok(&wc, 2 * n as u64, WcOpcode::Recv, "receiver");
    let mut slot = recvs.next().expect("the last receive");
    slot.set_len(wc.byte_len as usize);
    check_message(slot.as_slice(), 13, 0, 16, "SEND after the refusal");
}

/// RDMA_WRITE at several offsets and lengths: the bytes land exactly there,
/// nothing else in the window changes, and no receive is consumed.
pub fn rdma_write(h: &Harness) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let sa = p.a.arena(64 << 10, 8);
    let rb = p.b.arena(256, 2);
    let win = p.b.window(256 << 10, Access::REMOTE_WRITE);
    let r = win.remote();
    let recv = post_recvs(&mut p.qb, &rb, 500, 1);
    // (offset, len): tiny, odd, unaligned, page, large, up to the last byte.
    let writes = [
        (0usize, 1usize),
        (3, 7),
        (4093, 4099),
        (16 << 10, 4096),
        (64 << 10, 64 << 10),
        ((256 << 10) - 1000, 1000),
    ];
    let srcs: Vec<SlotMut> = writes
        .iter()
        .enumerate()
        .map(|(i, &(_, len))| slot_with(&sa, &pattern(300 + i as u64, len)))
        .collect();
    for (i, (&(off, _), s)) in writes.iter().zip(&srcs).enumerate() {
        p.qa.post_send(&[WorkRequest::one_sided(
            i as u64,
            Opcode::RdmaWrite,
            &[s.sge_filled()],
            r.addr + off as u64,
            r.rkey,
        )]);
    }
    for (i, wc) in p.qa.take(writes.len(), "RDMA WRITE").iter().enumerate() {
        expect_ok(wc, i as u64, WcOpcode::RdmaWrite, "writer");
    }
    p.qb.expect_idle(QUIET, "an RDMA WRITE consumes no receive");
    // The receive is still there: a SEND consumes it now.
    let s = slot_with(&sa, &message(3, 0, 32));
    p.qa.post_send(&[WorkRequest::send(99, &[s.sge_filled()])]);
    expect_ok(&p.qa.next("SEND"), 99, WcOpcode::Send, "SEND after writes");
    let wc = p.qb.next("receive after writes");
    expect_ok(
        &wc,
        500,
        WcOpcode::Recv,
        "the receive posted before the writes",
    );
    let mut slot = recv.into_iter().next().expect("one receive");
    slot.set_len(32);
    check_message(slot.as_slice(), 3, 0, 32, "SEND after writes");

    let mut want = vec![0u8; 256 << 10];
    for (i, &(off, len)) in writes.iter().enumerate() {
        want[off..off + len].copy_from_slice(&pattern(300 + i as u64, len));
    }
    check_bytes(win.revoke().as_slice(), &want, "window after RDMA WRITEs");
}

/// RDMA_WRITE_WITH_IMM consumes a receive (with or without a buffer),
/// delivers the immediate and `byte_len`, writes only the window and never
/// the receive buffer.
pub fn rdma_write_with_imm(h: &Harness) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let sa = p.a.arena(4096, 4);
    let rb = p.b.arena(4096, 2);
    let win = p.b.window(16 << 10, Access::REMOTE_WRITE);
    let r = win.remote();
    // Receive 1 has no SGE at all, receive 2 a buffer that must stay untouched.
    p.qb.post_recv(&[RecvRequest {
        wr_id: 1,
        sg_list: &[],
    }]);
    let buf = slot_filled(&rb, 0xEE);
    p.qb.post_recv(&[RecvRequest {
        wr_id: 2,
        sg_list: &[buf.sge()],
    }]);
    let s1 = slot_with(&sa, &pattern(41, 1000));
    let s2 = slot_with(&sa, &pattern(42, 4096));
    p.qa.post_send(&[
        WorkRequest::one_sided(
            10,
            Opcode::RdmaWriteWithImm,
            &[s1.sge_filled()],
            r.addr + 100,
            r.rkey,
        )
        .with_imm(0xCAFE_BABE),
        WorkRequest::one_sided(
            11,
            Opcode::RdmaWriteWithImm,
            &[s2.sge_filled()],
            r.addr + 8192,
            r.rkey,
        )
        .with_imm(7),
    ]);
    let wcs = p.qa.take(2, "WRITE_WITH_IMM");
    expect_ok(&wcs[0], 10, WcOpcode::RdmaWrite, "writer");
    expect_ok(&wcs[1], 11, WcOpcode::RdmaWrite, "writer");
    let wcs = p.qb.take(2, "receives consumed by WRITE_WITH_IMM");
    expect_ok(&wcs[0], 1, WcOpcode::RecvRdmaWithImm, "first receive");
    assert_eq!(
        (wcs[0].byte_len, wcs[0].imm_data),
        (1000, Some(0xCAFE_BABE)),
        "{:?}",
        wcs[0]
    );
    expect_ok(&wcs[1], 2, WcOpcode::RecvRdmaWithImm, "second receive");
    assert_eq!(
        (wcs[1].byte_len, wcs[1].imm_data),
        (4096, Some(7)),
        "{:?}",
        wcs[1]
    );
    check_filled(
        buf.as_slice(),
        0xEE,
        "receive buffer consumed by a WRITE_WITH_IMM",
    );
    let mut want = vec![0u8; 16 << 10];
    want[100..1100].copy_from_slice(&pattern(41, 1000));
    want[8192..12288].copy_from_slice(&pattern(42, 4096));
    check_bytes(
        win.revoke().as_slice(),
        &want,
        "window after WRITE_WITH_IMM",
    );
}

/// SEND_WITH_IMM and RDMA_WRITE_WITH_IMM of a few hundred KiB each deliver
/// their whole `byte_len` beside the immediate, and their bytes (a large
/// count and an immediate in one completion).
pub fn imm_with_large_byte_len(h: &Harness) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let (slen, wlen) = ((200 << 10) + 7, (300 << 10) + 5);
    let sa = p.a.arena(512 << 10, 2);
    let rb = p.b.arena(512 << 10, 1);
    let win = p.b.window(512 << 10, Access::REMOTE_WRITE);
    let r = win.remote();
    let mut buf = slot_filled(&rb, 0xEE);
    p.qb.post_recv(&[RecvRequest {
        wr_id: 1,
        sg_list: &[buf.sge()],
    }]);
    p.qb.post_recv(&[RecvRequest {
        wr_id: 2,
        sg_list: &[],
    }]);
    let s1 = slot_with(&sa, &pattern(51, slen));
    let s2 = slot_with(&sa, &pattern(52, wlen));
    p.qa.post_send(&[
        WorkRequest {
            opcode: Opcode::SendWithImm,
            ..WorkRequest::send(10, &[s1.sge_filled()])
        }
        .with_imm(0x1234_5678),
        WorkRequest::one_sided(
            11,
            Opcode::RdmaWriteWithImm,
            &[s2.sge_filled()],
            r.addr + 64,
            r.rkey,
        )
        .with_imm(0x9ABC_DEF0),
    ]);
    let wcs = p.qa.take(2, "large SEND_WITH_IMM and WRITE_WITH_IMM");
    expect_ok(&wcs[0], 10, WcOpcode::Send, "sender");
    expect_ok(&wcs[1], 11, WcOpcode::RdmaWrite, "writer");
    let wcs =
        p.qb.take(2, "receives of the large requests with immediates");
    expect_ok(&wcs[0], 1, WcOpcode::Recv, "SEND_WITH_IMM's receive");
    assert_eq!(
        (wcs[0].byte_len as usize, wcs[0].imm_data),
        (slen, Some(0x1234_5678)),
        "{:?}",
        wcs[0]
    );
    expect_ok(
        &wcs[1],
        2,
        WcOpcode::RecvRdmaWithImm,
        "WRITE_WITH_IMM's receive",
    );
    assert_eq!(
        (wcs[1].byte_len as usize, wcs[1].imm_data),
        (wlen, Some(0x9ABC_DEF0)),
        "{:?}",
        wcs[1]
    );
    buf.set_len(slen);
    check_bytes(buf.as_slice(), &pattern(51, slen), "large SEND_WITH_IMM");
    let mut want = vec![0u8; 512 << 10];
    want[64..64 + wlen].copy_from_slice(&pattern(52, wlen));
    check_bytes(
        win.revoke().as_slice(),
        &want,
        "window after a large WRITE_WITH_IMM",
    );
}

/// RDMA_READ of several sub-ranges of a peer's registered `Bytes`: the data,
/// the opcode and `byte_len`; bytes past the read length stay untouched.
pub fn rdma_read(h: &Harness) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let src_arena = p.b.arena_with(ArenaConfig {
        access: Access::REMOTE_READ,
        ..ArenaConfig::new(64 << 10, 1)
    });
    let src = slot_with(&src_arena, &pattern(51, 64 << 10)).freeze();
    let remote = remote_of(&src_arena, &src);
    let da = p.a.arena(64 << 10, 8);
    let reads = [
        (0usize, 1usize),
        (5, 13),
        (4090, 8),
        (1000, 30000),
        (0, 64 << 10),
    ];
    let mut dsts: Vec<SlotMut> = reads.iter().map(|_| slot_filled(&da, 0xEE)).collect();
    for (i, (&(off, len), d)) in reads.iter().zip(&dsts).enumerate() {
        p.qa.post_send(&[WorkRequest::one_sided(
            i as u64,
            Opcode::RdmaRead,
            &[d.sge_range(0, len)],
            remote.addr + off as u64,
            remote.rkey,
        )]);
    }
    for (i, (&(off, len), d)) in reads.iter().zip(&mut dsts).enumerate() {
        let wc = p.qa.next("RDMA READ");
        expect_ok(&wc, i as u64, WcOpcode::RdmaRead, "reader");
        assert_eq!(wc.byte_len as usize, len, "byte_len of a READ: {wc:?}");
        check_bytes(&d.as_slice()[..len], &src[off..off + len], "read data");
        check_filled(&d.as_slice()[len..], 0xEE, "bytes past the read length");
    }
    p.qb.expect_idle(QUIET, "a READ shows nothing on the responder");
}

/// ATOMIC_CMP_AND_SWP on 8-byte aligned words: the old value comes back to
/// the local SGE, the swap happens only on a match.
pub fn atomic_cmp_and_swp(h: &Harness) {
    if !atomics_supported(h) {
        return;
    }
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let mut win = p.b.window(64, Access::REMOTE_ATOMIC);
    win.fill(0);
    let r = win.remote();
    let la = p.a.arena(4096, 1);
    let res = slot_filled(&la, 0xEE);
    // (word, compare, swap, expected old)
    let steps: [(u64, u64, u64, u64); 6] = [
        (0, 0, 0x1111_2222_3333_4444, 0),
        (0, 0, 5, 0x1111_2222_3333_4444), // no match: unchanged
        (0, 0x1111_2222_3333_4444, u64::MAX, 0x1111_2222_3333_4444),
        (1, 0, 42, 0),
        (7, 0, 0x8000_0000_0000_0001, 0),
        (7, 1, 3, 0x8000_0000_0000_0001), // no match
    ];
    for (i, &(w, cmp, swap, _)) in steps.iter().enumerate() {
        p.qa.post_send(&[WorkRequest::one_sided(
            i as u64,
            Opcode::AtomicCmpAndSwp,
            &[res.sge_range(i * 8, 8)],
            r.addr + w * 8,
            r.rkey,
        )
        .with_atomic(cmp, swap)]);
    }
    for (i, &(_, _, _, old)) in steps.iter().enumerate() {
        let wc = p.qa.next("CAS");
        expect_ok(&wc, i as u64, WcOpcode::CompSwap, "compare-and-swap");
        assert_eq!(
            u64_at(res.as_slice(), i * 8),
            old,
            "old value returned by CAS step {i}"
        );
    }
    check_filled(
        &res.as_slice()[steps.len() * 8..],
        0xEE,
        "result bytes past the atomics",
    );
    let words = words_of(win.revoke().as_slice());
    let mut want = [0u64; 8];
    want[0] = u64::MAX;
    want[1] = 42;
    want[7] = 0x8000_0000_0000_0001;
    assert_eq!(words, want, "remote words after CAS");
}

/// ATOMIC_FETCH_AND_ADD: old values returned, sums wrap modulo 2^64.
pub fn atomic_fetch_and_add(h: &Harness) {
    if !atomics_supported(h) {
        return;
    }
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let mut win = p.b.window(64, Access::REMOTE_ATOMIC);
    win.fill(0);
    let r = win.remote();
    let la = p.a.arena(4096, 1);
    let res = slot_filled(&la, 0xEE);
    let steps: [(u64, u64, u64); 6] = [
        (0, 1, 0),
        (0, 41, 1),
        (0, u64::MAX, 42), // wraps: 42 + MAX = 41
        (3, 1 << 40, 0),
        (3, 1 << 40, 1 << 40),
        (0, 0, 41),
    ];
    for (i, &(w, add, _)) in steps.iter().enumerate() {
        p.qa.post_send(&[WorkRequest::one_sided(
            i as u64,
            Opcode::AtomicFetchAndAdd,
            &[res.sge_range(i * 8, 8)],
            r.addr + w * 8,
            r.rkey,
        )
        .with_atomic(add, 0)]);
    }
    for (i, &(_, _, old)) in steps.iter().enumerate() {
        let wc = p.qa.next("FAA");
        expect_ok(&wc, i as u64, WcOpcode::FetchAdd, "fetch-and-add");
        assert_eq!(
            u64_at(res.as_slice(), i * 8),
            old,
            "old value returned by FAA step {i}"
        );
    }
    let words = words_of(win.revoke().as_slice());
    assert_eq!(words[0], 41, "word 0 after adds that wrap");
    assert_eq!(words[3], 2 << 40, "word 3 after adds");
    assert!(
        words
            .iter()
            .enumerate()
            .all(|(i, &w)| i == 0 || i == 3 || w == 0),
        "untouched words changed: {words:?}"
    );
}

/// Inline SENDs of 1 byte up to the queue pair's `max_inline_data`, also with
/// two SGEs: the source (a registered slot: zcmsg checks inline SGEs like any
/// other) is overwritten right after `post_send` returns and the receiver
/// still gets the original bytes.
pub fn inline_send(h: &Harness) {
    let mut cfg = h.qp_config();
    cfg.max_inline_data = h.caps().max_inline_data;
    cfg.max_send_sge = cfg.max_send_sge.max(2.min(h.caps().max_send_sge));
    let mut p = h.connected_pair(&cfg, &h.qp_config());
    let m = p.qa.caps().max_inline_data as usize;
    if m == 0 {
        return assert_no_inline(&mut p);
    }
    let mut sizes = vec![1usize, 2, m / 2, m.saturating_sub(1), m];
    sizes.retain(|&s| s > 0);
    sizes.dedup();
    let rb = p.b.arena(m.max(64), sizes.len() + 1);
    let recvs = post_recvs(&mut p.qb, &rb, 0, sizes.len() + 1);
    let sa = p.a.arena(m.max(64), 2);
    let mut src = sa.alloc().expect("source slot");
    for (i, &len) in sizes.iter().enumerate() {
        src.set_len(len);
        src.as_mut_slice()
            .copy_from_slice(&message(4, i as u64, len));
        p.qa.post_send(&[WorkRequest::send(i as u64, &[src.sge_filled()])
            .with_flags(SendFlags::SIGNALED | SendFlags::INLINE)]);
        src.as_mut_slice().fill(0xFF); // the device copied it at post time
    }
    // Two SGEs, m bytes in all, when the queue pair allows two.
    let two = p.qa.caps().max_send_sge >= 2 && m >= 2;
    if two {
        let whole = message(4, 99, m);
        // The halves in two different slots.
        let mut y = sa.alloc().expect("second slot");
        src.set_len(m / 2);
        src.as_mut_slice().copy_from_slice(&whole[..m / 2]);
        y.set_len(m - m / 2);
        y.as_mut_slice().copy_from_slice(&whole[m / 2..]);
        p.qa.post_send(&[WorkRequest::send(99, &[src.sge_filled(), y.sge_filled()])
            .with_flags(SendFlags::SIGNALED | SendFlags::INLINE)]);
        src.as_mut_slice().fill(0xFF);
        y.as_mut_slice().fill(0xFF);
    }
    let n = sizes.len() + usize::from(two);
    let wcs = p.qa.take(n, "inline SENDs");
    for (i, wc) in wcs.iter().enumerate().take(sizes.len()) {
        expect_ok(wc, i as u64, WcOpcode::Send, "inline SEND");
    }
    for (i, mut slot) in recvs.into_iter().enumerate().take(n) {
        let wc = p.qb.next("inline message");
        let (seq, len) = if i < sizes.len() {
            (i as u64, sizes[i])
        } else {
            (99, m)
        };
        expect_ok(&wc, i as u64, WcOpcode::Recv, "receiver of inline data");
        assert_eq!(wc.byte_len as usize, len);
        slot.set_len(len);
        check_message(
            slot.as_slice(),
            4,
            seq,
            len,
            "inline payload (source overwritten after post)",
        );
    }
}

/// A queue pair granted no inline data refuses an INLINE request of even
/// one byte, at post time, as too large (what the inline cases check
/// instead of sizes up to a limit of zero).
fn assert_no_inline(p: &mut Pair) {
    let sa = p.a.arena(64, 1);
    let s = slot_with(&sa, &[1]);
    let e =
        p.qa.try_post_send(&[WorkRequest::send(1, &[s.sge_filled()])
            .with_flags(SendFlags::SIGNALED | SendFlags::INLINE)])
            .expect_err("an INLINE SEND with no inline data granted");
    assert!(
        matches!(e.error, TransportError::InlineTooLarge { .. }),
        "refused as too large for inline: {e}"
    );
}

/// An inline RDMA_WRITE from a registered slot overwritten right after the
/// post: the window holds the original bytes.
pub fn inline_write(h: &Harness) {
    let mut cfg = h.qp_config();
    cfg.max_inline_data = h.caps().max_inline_data;
    let mut p = h.connected_pair(&cfg, &h.qp_config());
    let m = p.qa.caps().max_inline_data as usize;
    if m == 0 {
        return assert_no_inline(&mut p);
    }
    let win = p.b.window(m + 64, Access::REMOTE_WRITE);
    let r = win.remote();
    let sa = p.a.arena(m.max(64), 1);
    let mut buf = sa.alloc().expect("source slot");
    buf.set_len(m);
    buf.as_mut_slice().copy_from_slice(&pattern(61, m));
    p.qa.post_send(&[WorkRequest::one_sided(
        1,
        Opcode::RdmaWrite,
        &[buf.sge_filled()],
        r.addr + 32,
        r.rkey,
    )
    .with_flags(SendFlags::SIGNALED | SendFlags::INLINE)]);
    buf.as_mut_slice().fill(0xFF);
    expect_ok(
        &p.qa.next("inline WRITE"),
        1,
        WcOpcode::RdmaWrite,
        "inline WRITE",
    );
    let mut want = vec![0u8; m + 64];
    want[32..32 + m].copy_from_slice(&pattern(61, m));
    check_bytes(
        win.revoke().as_slice(),
        &want,
        "window after an inline WRITE",
    );
}

/// Unsignaled successes produce no completion; a later signaled request
/// covers them. Unsignaled WRITEs are visible to a signaled READ behind them.
pub fn unsignaled_covered_by_signaled(h: &Harness) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let sa = p.a.arena(4096, 16);
    let rb = p.b.arena(4096, 16);
    let k = 8;
    let recvs = post_recvs(&mut p.qb, &rb, 0, k + 1);
    let srcs: Vec<SlotMut> = (0..=k)
        .map(|i| slot_with(&sa, &message(5, i as u64, 200 + i)))
        .collect();
    let sges: Vec<[Sge; 1]> = srcs.iter().map(|s| [s.sge_filled()]).collect();
    let wrs: Vec<WorkRequest<'_>> = sges
        .iter()
        .enumerate()
        .map(|(i, sg)| {
            let f = if i == k {
                SendFlags::SIGNALED
            } else {
                SendFlags::NONE
            };
            WorkRequest::send(i as u64, sg).with_flags(f)
        })
        .collect();
    p.qa.post_send(&wrs);
    expect_ok(
        &p.qa.next("the signaled SEND"),
        k as u64,
        WcOpcode::Send,
        "only the signaled SEND completes",
    );
    p.qa.expect_idle(QUIET, "unsignaled successes produce no completion");
    for (i, mut slot) in recvs.into_iter().enumerate() {
        let wc = p.qb.next("receive");
        expect_ok(
            &wc,
            i as u64,
            WcOpcode::Recv,
            "every unsignaled SEND is delivered",
        );
        slot.set_len(200 + i);
        check_message(
            slot.as_slice(),
            5,
            i as u64,
            200 + i,
            "unsignaled SEND payload",
        );
    }

    // Unsignaled WRITEs, then a signaled READ of the same bytes.
    let win =
        p.b.window(4 * 1024, Access::REMOTE_WRITE | Access::REMOTE_READ);
    let r = win.remote();
    let wsrc: Vec<SlotMut> = (0..4)
        .map(|i| slot_with(&sa, &pattern(70 + i, 1024)))
        .collect();
    let wsg: Vec<[Sge; 1]> = wsrc.iter().map(|s| [s.sge_filled()]).collect();
    let mut wrs: Vec<WorkRequest<'_>> = wsg
        .iter()
        .enumerate()
        .map(|(i, sg)| {
            WorkRequest::one_sided(
                100 + i as u64,
                Opcode::RdmaWrite,
                sg,
                r.addr + i as u64 * 1024,
                r.rkey,
            )
            .with_flags(SendFlags::NONE)
        })
        .collect();
    let dst = slot_filled(&sa, 0xEE);
    let dsg = [dst.sge_range(0, 4096)];
    wrs.push(WorkRequest::one_sided(
        200,
        Opcode::RdmaRead,
        &dsg,
        r.addr,
        r.rkey,
    ));
    p.qa.post_send(&wrs);
    let wc = p.qa.next("signaled READ behind unsignaled WRITEs");
    expect_ok(&wc, 200, WcOpcode::RdmaRead, "only the READ completes");
    p.qa.expect_idle(QUIET, "unsignaled WRITEs produce no completion");
    let want: Vec<u8> = (0..4).flat_map(|i| pattern(70 + i, 1024)).collect();
    check_bytes(
        &dst.as_slice()[..4096],
        &want,
        "READ after unsignaled WRITEs sees them",
    );
    check_bytes(
        win.revoke().as_slice(),
        &want,
        "window after unsignaled WRITEs",
    );
}

/// One `post_send` of a list mixing every two-sided and one-sided opcode, one
/// `post_recv` of a list: completions in order with the right ids, opcodes,
/// immediates and data.
pub fn post_list(h: &Harness) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let sa = p.a.arena(1024, 64);
    let rb = p.b.arena(1024, 64);
    let win =
        p.b.window(64 << 10, Access::REMOTE_WRITE | Access::REMOTE_READ);
    let r = win.remote();
    let n = 32usize;
    // Every receive in one post_recv.
    let rslots: Vec<SlotMut> = (0..n).map(|_| slot_filled(&rb, 0xEE)).collect();
    let rsg: Vec<[Sge; 1]> = rslots.iter().map(|s| [s.sge()]).collect();
    let rwrs: Vec<RecvRequest<'_>> = rsg
        .iter()
        .enumerate()
        .map(|(i, sg)| RecvRequest {
            wr_id: 1000 + i as u64,
            sg_list: sg,
        })
        .collect();
    p.qb.post_recv(&rwrs);
    // Request i: kind i % 5 = SEND, SEND_WITH_IMM, WRITE, WRITE_WITH_IMM, READ (of what request i-2 wrote).
    let srcs: Vec<SlotMut> = (0..n)
        .map(|i| slot_with(&sa, &message(6, i as u64, 100 + i)))
        .collect();
    let dsts: Vec<SlotMut> = (0..n).map(|_| slot_filled(&sa, 0xEE)).collect();
    let ssg: Vec<[Sge; 1]> = srcs.iter().map(|s| [s.sge_filled()]).collect();
    let dsg: Vec<[Sge; 1]> = (0..n)
        .map(|i| [dsts[i].sge_range(0, 100 + i.saturating_sub(2))])
        .collect();
    let slot_addr = |i: usize| r.addr + i as u64 * 1024;
    let mut wrs = Vec::new();
    for i in 0..n {
        let wr = match i % 5 {
            0 => WorkRequest::send(i as u64, &ssg[i]),
            1 => WorkRequest {
                opcode: Opcode::SendWithImm,
                ..WorkRequest::send(i as u64, &ssg[i])
            }
            .with_imm(i as u32),
            2 => WorkRequest::one_sided(i as u64, Opcode::RdmaWrite, &ssg[i], slot_addr(i), r.rkey),
            3 => WorkRequest::one_sided(
                i as u64,
                Opcode::RdmaWriteWithImm,
                &ssg[i],
                slot_addr(i),
                r.rkey,
            )
            .with_imm(i as u32),
            _ => WorkRequest::one_sided(
                i as u64,
                Opcode::RdmaRead,
                &dsg[i],
                slot_addr(i - 2),
                r.rkey,
            ),
        };
        wrs.push(wr);
    }
    p.qa.post_send(&wrs);
    for (i, wc) in p.qa.take(n, "post list").iter().enumerate() {
        let op = match i % 5 {
            0 | 1 => WcOpcode::Send,
            2 | 3 => WcOpcode::RdmaWrite,
            _ => WcOpcode::RdmaRead,
        };
        expect_ok(wc, i as u64, op, "post list completion (in order)");
        if i % 5 == 4 {
            let len = 100 + i - 2;
            check_message(
                &dsts[i].as_slice()[..len],
                6,
                i as u64 - 2,
                len,
                "READ of a WRITE earlier in the list",
            );
        }
    }
    // Receives are consumed by SEND, SEND_WITH_IMM and WRITE_WITH_IMM, in order.
    let consumers: Vec<usize> = (0..n).filter(|i| i % 5 < 4 && i % 5 != 2).collect();
    for (k, &i) in consumers.iter().enumerate() {
        let wc = p.qb.next("receive of the post list");
        let (op, imm) = match i % 5 {
            0 => (WcOpcode::Recv, None),
            1 => (WcOpcode::Recv, Some(i as u32)),
            _ => (WcOpcode::RecvRdmaWithImm, Some(i as u32)),
        };
        expect_ok(&wc, 1000 + k as u64, op, "receive in order");
        assert_eq!(wc.imm_data, imm, "immediate of request {i}");
        assert_eq!(wc.byte_len as usize, 100 + i, "byte_len of request {i}");
        if op == WcOpcode::Recv {
            check_message(
                &rslots[k].as_slice()[..100 + i],
                6,
                i as u64,
                100 + i,
                "received payload",
            );
        } else {
            check_filled(
                rslots[k].as_slice(),
                0xEE,
                "receive buffer consumed by WRITE_WITH_IMM",
            );
        }
    }
    p.qb.expect_idle(QUIET, "no further receive consumed");
    let win = win.revoke();
    for i in (0..n).filter(|i| i % 5 == 2 || i % 5 == 3) {
        let off = i * 1024;
        check_message(
            &win.as_slice()[off..off + 100 + i],
            6,
            i as u64,
            100 + i,
            "window after list WRITEs",
        );
    }
}

/// Registered `Bytes` (whole slots and slices of them) through
/// `SgeBuilder::send`, posted and delivered: the protection domain's copy
/// counters stay at zero.
pub fn zero_copy_send(h: &Harness) {
    let mut cfg = h.qp_config();
    cfg.max_send_sge = 4.min(h.caps().max_send_sge);
    let mut p = h.connected_pair(&cfg, &h.qp_config());
    let sa = p.a.arena(4096, 8);
    let rb = p.b.arena(16 << 10, 1);
    let recv = post_recvs(&mut p.qb, &rb, 0, 1);
    let before = p.a.pd.stats().snapshot();
    let whole = slot_with(&sa, &pattern(81, 3000)).freeze();
    let other = slot_with(&sa, &pattern(82, 4096)).freeze();
    let mut chunks = vec![
        whole.slice(..1000),
        other.slice(100..4000),
        whole.slice(1000..),
    ];
    chunks.truncate(cfg.max_send_sge.max(1) as usize);
    let want: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let mut sges = Vec::new();
    p.a.pd
        .builder(UnregisteredPolicy::Reject)
        .send(
            &mut chunks,
            p.qa.caps().max_send_sge,
            p.a.caps().max_msg_sz,
            &mut sges,
        )
        .unwrap_or_else(|e| panic!("building SGEs from registered Bytes: {e}"));
    p.qa.post_send(&[WorkRequest::send(1, &sges)]);
    expect_ok(&p.qa.next("SEND"), 1, WcOpcode::Send, "zero-copy SEND");
    let wc = p.qb.next("receive");
    expect_ok(&wc, 0, WcOpcode::Recv, "receiver");
    let mut slot = recv.into_iter().next().expect("one receive");
    slot.set_len(wc.byte_len as usize);
    check_bytes(slot.as_slice(), &want, "zero-copy payload");
    let copied = p.a.pd.stats().snapshot().since(&before);
    assert_eq!(
        copied,
        zcmsg::CopySnapshot::default(),
        "framework copies during a send of registered Bytes"
    );
    assert_eq!(copied.total_bytes(), 0);
    drop(chunks);
}

/// Post lists whose requests change shape from one to the next, where a
/// device may run the common shape on a fast path and must hand every other
/// one to its general path without losing its place:
/// - one list of ten SENDs in which plain one-SGE SENDs alternate with two
///   gathered SGEs, a SEND into a receive of two SGEs, SEND_WITH_IMM, an
///   empty SGE beside a full one and an inline SEND, and whose last one is
///   one more than the peer has receives posted (it waits, RNR, until the
///   receive comes). Every message lands byte for byte in its own receive,
///   in order, with its `byte_len` and immediate.
/// - one list whose third SEND names an unknown lkey, after two good ones
///   (the first unsignaled): those two arrive intact, the third completes
///   `LocProtErr`, the fourth is flushed, and nothing else lands.
pub fn post_list_shapes(h: &Harness) {
    let mut cfg_a = h.qp_config();
    cfg_a.rnr_retry = 7;
    cfg_a.max_send_sge = cfg_a.max_send_sge.max(2.min(h.caps().max_send_sge));
    cfg_a.max_inline_data = cfg_a.max_inline_data.max(64.min(h.caps().max_inline_data));
    let mut cfg_b = h.qp_config();
    cfg_b.max_recv_sge = cfg_b.max_recv_sge.max(2.min(h.caps().max_recv_sge));
    let mut p = h.connected_pair(&cfg_a, &cfg_b);
    let (qa, qb) = (p.qa.caps(), p.qb.caps());
    assert!(
        qa.max_send_sge >= 2 && qb.max_recv_sge >= 2 && qa.max_inline_data >= 40,
        "post_list_shapes needs 2 send and receive SGEs and 40 inline bytes, granted {} / {} / {}",
        qa.max_send_sge,
        qb.max_recv_sge,
        qa.max_inline_data
    );
    const N: usize = 10;
    // Message `i`: its length, immediate, and shape; its bytes are
    // message(41, i, len).
    #[derive(Clone, Copy, PartialEq)]
    enum Shape {
        Plain,
        Gather,
        IntoTwoSges,
        EmptyBesideFull,
        Inline,
    }
    use Shape::*;
    let plan: [(usize, Option<u32>, Shape); N] = [
        (64, None, Plain),
        (120, None, Gather),
        (100, None, Plain),
        (200, None, IntoTwoSges),
        (64, Some(0xC0FF_EE01), Plain),
        (80, None, EmptyBesideFull),
        (90, None, Plain),
        (40, None, Inline),
        (70, None, Plain),
        (64, None, Plain),
    ];
    let sa = p.a.arena(256, 16);
    let rb = p.b.arena(256, 16);
    // Receives 100..109, one 256-byte slot each but the one for the
    // IntoTwoSges message (two SGEs of 100 and 156 bytes, the second in
    // slot N); the last is posted once its SEND waits.
    let mut rslots: Vec<SlotMut> = (0..=N).map(|_| slot_filled(&rb, 0xEE)).collect();
    let rsg: Vec<Vec<Sge>> = (0..N)
        .map(|i| match plan[i].2 {
            IntoTwoSges => vec![rslots[i].sge_range(0, 100), rslots[N].sge_range(0, 156)],
            _ => vec![rslots[i].sge()],
        })
        .collect();
    let rwrs: Vec<RecvRequest<'_>> = rsg
        .iter()
        .enumerate()
        .map(|(i, sg)| RecvRequest {
            wr_id: 100 + i as u64,
            sg_list: sg,
        })
        .collect();
    p.qb.post_recv(&rwrs[..N - 1]);
    let srcs: Vec<SlotMut> = plan
        .iter()
        .enumerate()
        .map(|(i, &(len, _, _))| slot_with(&sa, &message(41, i as u64, len)))
        .collect();
    let ssg: Vec<Vec<Sge>> = srcs
        .iter()
        .zip(&plan)
        .map(|(s, &(len, _, shape))| match shape {
            Gather => vec![s.sge_range(0, 50), s.sge_range(50, len - 50)],
            EmptyBesideFull => vec![s.sge_range(0, 0), s.sge_filled()],
            _ => vec![s.sge_filled()],
        })
        .collect();
    let wrs: Vec<WorkRequest<'_>> = plan
        .iter()
        .enumerate()
        .map(|(i, &(_, imm, shape))| {
            let mut wr = WorkRequest::send(i as u64, &ssg[i]);
            if let Some(v) = imm {
                wr = WorkRequest {
                    opcode: Opcode::SendWithImm,
                    ..wr
                }
                .with_imm(v);
            }
            if shape == Inline {
                wr = wr.with_flags(SendFlags::SIGNALED | SendFlags::INLINE);
            }
            wr
        })
        .collect();
    p.qa.post_send(&wrs);
    for (i, wc) in
        p.qa.take(N - 1, "the SENDs that had receives")
            .iter()
            .enumerate()
    {
        expect_ok(
            wc,
            i as u64,
            WcOpcode::Send,
            &format!("SEND {i} of the mixed list"),
        );
    }
    assert!(
        p.qa.try_next(QUIET).is_none(),
        "the last SEND completed although the peer had no receive for it"
    );
    p.qb.post_recv(&rwrs[N - 1..]);
    expect_ok(
        &p.qa.next("the SEND that waited for its receive"),
        N as u64 - 1,
        WcOpcode::Send,
        "the last SEND, after its receive was posted",
    );
    for (i, &(len, imm, shape)) in plan.iter().enumerate() {
        let wc = p.qb.next("a receive of the mixed list");
        expect_ok(&wc, 100 + i as u64, WcOpcode::Recv, &format!("receive {i}"));
        assert_eq!(wc.byte_len as usize, len, "byte_len of message {i}");
        assert_eq!(wc.imm_data, imm, "immediate of message {i}");
        let want = message(41, i as u64, len);
        let (first, rest) = if shape == IntoTwoSges {
            (100, len - 100)
        } else {
            (len, 0)
        };
        rslots[i].set_len(256);
        check_bytes(
            &rslots[i].as_slice()[..first],
            &want[..first],
            &format!("message {i}"),
        );
        let past = if shape == IntoTwoSges { 100 } else { 256 };
        check_filled(
            &rslots[i].as_slice()[first..past],
            0xEE,
            &format!("message {i}: past its end"),
        );
        if shape == IntoTwoSges {
            rslots[N].set_len(256);
            check_bytes(
                &rslots[N].as_slice()[..rest],
                &want[first..],
                &format!("message {i}, second receive SGE"),
            );
            check_filled(
                &rslots[N].as_slice()[rest..],
                0xEE,
                &format!("message {i}: past its end in the second receive SGE"),
            );
        }
    }
    p.qb.expect_idle(QUIET, "nothing else arrives from the mixed list");

    // A failure in the middle of a list.
    let mut fr = post_recvs(&mut p.qb, &rb, 200, 4);
    let good: Vec<SlotMut> = (0..3)
        .map(|i| slot_with(&sa, &message(42, i, 77)))
        .collect();
    let g = good[2].sge_filled();
    let bad = [Sge::new(g.addr(), g.length(), !g.lkey())];
    let gsg: Vec<[Sge; 1]> = good.iter().map(|s| [s.sge_filled()]).collect();
    p.qa.post_send(&[
        WorkRequest::send(300, &gsg[0]).with_flags(SendFlags::NONE),
        WorkRequest::send(301, &gsg[1]),
        WorkRequest::send(302, &bad),
        WorkRequest::send(303, &gsg[2]),
    ]);
    expect_third_of_four_failed(
        &mut p,
        &[301],
        (302, "SEND with an unknown lkey in the middle of a list"),
        &mut fr,
        (200, 42, 77),
    );
}

/// The end of a list of four SENDs whose third failed at its source
/// (`LocProtErr`): the good ones that were signaled (`good`) complete, the
/// third (`failed`: its id, and what it was) fails, the fourth (the next
/// id) is flushed; the peer received the first two in `recvs[0..2]`
/// (receive ids from `first`, bytes `message(tag, k, len)`) and nothing
/// else.
fn expect_third_of_four_failed(
    p: &mut Pair,
    good: &[u64],
    failed: (u64, &str),
    recvs: &mut [SlotMut],
    (first, tag, len): (u64, u64, usize),
) {
    for &id in good {
        expect_ok(
            &p.qa.next("a good SEND of the list"),
            id,
            WcOpcode::Send,
            "a SEND before the failing one",
        );
    }
    expect_status(
        &p.qa.next("the failing SEND"),
        failed.0,
        WcStatus::LocProtErr,
        failed.1,
    );
    expect_status(
        &p.qa.next("the SEND behind the failing one"),
        failed.0 + 1,
        WcStatus::WrFlushErr,
        "the SEND behind the failing one",
    );
    for (k, slot) in recvs.iter_mut().take(2).enumerate() {
        let wc = p.qb.next("a SEND before the failing one");
        expect_ok(
            &wc,
            first + k as u64,
            WcOpcode::Recv,
            "receive before the failure",
        );
        assert_eq!(wc.byte_len as usize, len, "byte_len before the failure");
        slot.set_len(len);
        check_message(
            slot.as_slice(),
            tag,
            k as u64,
            len,
            "a SEND before the failing one",
        );
    }
    for wc in p.qb.drain(QUIET) {
        assert!(
            wc.status != WcStatus::Success,
            "the peer received something from the failing SEND or behind it: {wc:?}"
        );
    }
}

/// A device may translate a region once for a run of requests and check
/// each request's range against what it found; each range is still
/// checked. Two lists, each on a fresh pair:
/// - four SENDs from one arena, the third with the arena's lkey but
///   crossing the end of its registration: the first two arrive intact, the
///   third completes `LocProtErr`, the fourth is flushed, nothing else lands.
/// - three SENDs into three receives of one arena, the second receive with
///   the arena's lkey but crossing its end: the first message arrives
///   intact; the second fails on both sides (`LocProtErr` on the receive,
///   or rxe's malformed-receive `LocQpOpErr`; `RemOpErr` on the SEND), the
///   rest is flushed on both sides, and the arena is untouched.
pub fn post_list_same_region_out_of_bounds(h: &Harness) {
    /// The device address one past `last`, a 1 KiB slot that must be the
    /// last of its arena (whose registration then ends there too): in the
    /// device's address space, CPU or IOVA.
    fn last_slot_end(arena: &Arena, last: &SlotMut) -> u64 {
        assert_eq!(
            last.as_slice().as_ptr() as u64 + 1024,
            arena.base() + arena.len() as u64,
            "the arena's fourth slot is its last"
        );
        last.sge().addr() + 1024
    }

    // The source side.
    // Arenas of exactly one page (4 slots of 1 KiB): the registration ends
    // where the last slot does.
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let sa = p.a.arena(1024, 4);
    let rb = p.b.arena(1024, 4);
    assert_eq!(sa.len(), 4096, "a 4 KiB arena is one page");
    let mut recvs = post_recvs(&mut p.qb, &rb, 700, 4);
    let good: Vec<SlotMut> = (0..3)
        .map(|i| slot_with(&sa, &message(43, i, 96)))
        .collect();
    let last = sa.alloc().expect("the arena's fourth slot");
    let end = last_slot_end(&sa, &last);
    let over = [Sge::new(end - 32, 96, sa.lkey())];
    let gsg: Vec<[Sge; 1]> = good.iter().map(|s| [s.sge_filled()]).collect();
    p.qa.post_send(&[
        WorkRequest::send(710, &gsg[0]),
        WorkRequest::send(711, &gsg[1]),
        WorkRequest::send(712, &over),
        WorkRequest::send(713, &gsg[2]),
    ]);
    expect_third_of_four_failed(
        &mut p,
        &[710, 711],
        (
            712,
            "a SEND whose SGE has the lkey of the list's region but crosses its end",
        ),
        &mut recvs,
        (700, 43, 96),
    );
    for s in &recvs[2..] {
        check_filled(
            s.as_slice(),
            0xEE,
            "receives the failing SEND and the flushed one did not fill",
        );
    }
    drop(p);

    // The destination side.
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let sa = p.a.arena(1024, 3);
    let rb = p.b.arena(1024, 4);
    assert_eq!(rb.len(), 4096, "a 4 KiB arena is one page");
    // Slots come in order: the fourth ends where the registration does.
    let mut rs: Vec<SlotMut> = (0..4).map(|_| slot_filled(&rb, 0xEE)).collect();
    let end = last_slot_end(&rb, &rs[3]);
    let (s0, s1, s2) = (
        [rs[0].sge()],
        [Sge::new(end - 32, 256, rb.lkey())],
        [rs[1].sge()],
    );
    p.qb.post_recv(&[
        RecvRequest {
            wr_id: 800,
            sg_list: &s0,
        },
        RecvRequest {
            wr_id: 801,
            sg_list: &s1,
        },
        RecvRequest {
            wr_id: 802,
            sg_list: &s2,
        },
    ]);
    let src: Vec<SlotMut> = (0..3)
        .map(|i| slot_with(&sa, &message(44, i, 64)))
        .collect();
    let ssg: Vec<[Sge; 1]> = src.iter().map(|s| [s.sge_filled()]).collect();
    p.qa.post_send(&[
        WorkRequest::send(810, &ssg[0]),
        WorkRequest::send(811, &ssg[1]),
        WorkRequest::send(812, &ssg[2]),
    ]);
    let wc = p.qb.next("the first receive");
    expect_ok(
        &wc,
        800,
        WcOpcode::Recv,
        "the receive before the one crossing its region's end",
    );
    assert_eq!(wc.byte_len, 64, "byte_len of the first message");
    rs[0].set_len(64);
    check_message(rs[0].as_slice(), 44, 0, 64, "the first message");
    let wc = p.qb.next("the receive crossing its region's end");
    assert!(
        wc.wr_id == 801 && matches!(wc.status, WcStatus::LocProtErr | WcStatus::LocQpOpErr),
        "a receive whose SGE has the lkey of the first receive's region but crosses its end: expected wr_id 801 with LocProtErr (or rxe's LocQpOpErr), got {wc:?}"
    );
    expect_status(
        &p.qb.next("the receive behind the failed one"),
        802,
        WcStatus::WrFlushErr,
        "the receive behind the one crossing its region's end",
    );
    expect_ok(
        &p.qa.next("the first SEND"),
        810,
        WcOpcode::Send,
        "the SEND into the good receive",
    );
    expect_status(
        &p.qa
            .next("the SEND into the receive crossing its region's end"),
        811,
        WcStatus::RemOpErr,
        "a SEND into a receive whose SGE crosses its region's end",
    );
    expect_status(
        &p.qa.next("the SEND behind the failed one"),
        812,
        WcStatus::WrFlushErr,
        "the SEND behind the failed one",
    );
    p.qa.expect_idle(QUIET, "nothing more on the sender");
    p.qb.expect_idle(QUIET, "nothing more on the receiver");
    for (i, what) in [
        (1, "the flushed receive's buffer"),
        (2, "a slot no receive named"),
        (
            3,
            "the arena's last slot, where the failing receive's SGE began",
        ),
    ] {
        rs[i].set_len(1024);
        check_filled(rs[i].as_slice(), 0xEE, what);
    }
}

/// Poll one completion at a time (and with an empty buffer) while send and
/// receive completions of both directions are waiting: every completion comes
/// out exactly once, each kind in order, none lost when the buffer is full.
pub fn poll_cq_small_batches(h: &Harness) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let n = 16usize;
    let (sa, ra) = (p.a.arena(256, 2 * n), p.a.arena(256, n));
    let (sb, rb) = (p.b.arena(256, 2 * n), p.b.arena(256, n));
    let a_recvs = post_recvs(&mut p.qa, &ra, 100, n);
    let b_recvs = post_recvs(&mut p.qb, &rb, 100, n);
    let mut keep = Vec::new();
    for i in 0..n {
        let x = slot_with(&sa, &message(62, i as u64, 64));
        p.qa.post_send(&[WorkRequest::send(i as u64, &[x.sge_filled()])]);
        let y = slot_with(&sb, &message(63, i as u64, 64));
        p.qb.post_send(&[WorkRequest::send(i as u64, &[y.sge_filled()])]);
        keep.push((x, y));
    }
    for (ep, batch, tag, recvs) in [
        (&mut p.qa, 1usize, 63u64, &a_recvs),
        (&mut p.qb, 3, 62, &b_recvs),
    ] {
        let what = format!("{}: polling {batch} at a time", ep.label());
        let deadline = std::time::Instant::now() + ep.timeout();
        let (mut sends, mut recvd) = (Vec::new(), Vec::new());
        let mut buf = [WorkCompletion::EMPTY; 3];
        while sends.len() + recvd.len() < 2 * n {
            assert_eq!(
                ep.qp().poll_cq(&mut []),
                0,
                "{what}: poll_cq with an empty buffer"
            );
            let got = ep.qp().poll_cq(&mut buf[..batch]);
            assert!(
                got <= batch,
                "{what}: poll_cq returned {got} for a buffer of {batch}"
            );
            for wc in &buf[..got] {
                if wc.opcode.is_recv() {
                    recvd.push(*wc);
                } else {
                    sends.push(*wc);
                }
            }
            if got == 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{what}: {} send and {} receive completions of {n} each within {:?}",
                    sends.len(),
                    recvd.len(),
                    ep.timeout()
                );
                std::thread::yield_now();
            }
        }
        for (i, wc) in sends.iter().enumerate() {
            expect_ok(wc, i as u64, WcOpcode::Send, &what);
        }
        for (i, wc) in recvd.iter().enumerate() {
            expect_ok(wc, 100 + i as u64, WcOpcode::Recv, &what);
            check_message(&recvs[i].as_slice()[..64], tag, i as u64, 64, &what);
        }
        ep.expect_idle(QUIET, "every completion came out once");
    }
    drop(keep);
}

/// Both ends of a queue pair on one device (one host connecting to itself):
/// SEND, WRITE, READ and an atomic work with the device's own keys on both sides.
pub fn same_device_pair(h: &Harness) {
    let a = h.host();
    let (mut x, mut y) = h
        .connect(&a, &a, 1, &h.qp_config(), &h.qp_config())
        .pop()
        .expect("one queue pair");
    assert_ne!(
        x.qp_num(),
        y.qp_num(),
        "two queue pairs of one device share a number"
    );
    let sa = a.arena(4096, 8);
    let recv = post_recvs(&mut y, &sa, 7, 1);
    let m = slot_with(&sa, &message(64, 0, 500));
    x.post_send(&[WorkRequest::send(1, &[m.sge_filled()])]);
    expect_ok(&x.next("SEND"), 1, WcOpcode::Send, "loopback SEND");
    expect_ok(&y.next("receive"), 7, WcOpcode::Recv, "loopback receive");
    check_message(
        &recv[0].as_slice()[..500],
        64,
        0,
        500,
        "loopback SEND payload",
    );

    let access = if h.caps().atomics {
        Access::REMOTE_WRITE | Access::REMOTE_READ | Access::REMOTE_ATOMIC
    } else {
        Access::REMOTE_WRITE | Access::REMOTE_READ
    };
    let win = a.window(8192, access);
    let r = win.remote();
    let w = slot_with(&sa, &pattern(65, 4096));
    let d = slot_filled(&sa, 0xEE);
    x.post_send(&[
        WorkRequest::one_sided(2, Opcode::RdmaWrite, &[w.sge_filled()], r.addr + 8, r.rkey),
        WorkRequest::one_sided(
            3,
            Opcode::RdmaRead,
            &[d.sge_range(0, 4096)],
            r.addr + 8,
            r.rkey,
        ),
    ]);
    expect_ok(&x.next("WRITE"), 2, WcOpcode::RdmaWrite, "loopback WRITE");
    expect_ok(&x.next("READ"), 3, WcOpcode::RdmaRead, "loopback READ");
    check_bytes(
        &d.as_slice()[..4096],
        &pattern(65, 4096),
        "loopback READ of a loopback WRITE",
    );
    let mut want = vec![0u8; 8192];
    want[8..4104].copy_from_slice(&pattern(65, 4096));
    if h.caps().atomics {
        let res = slot_filled(&sa, 0xEE);
        y.post_send(&[WorkRequest::one_sided(
            4,
            Opcode::AtomicFetchAndAdd,
            &[res.sge_range(0, 8)],
            r.addr + 4096 + 8,
            r.rkey,
        )
        .with_atomic(9, 0)]);
        expect_ok(
            &y.next("FAA"),
            4,
            WcOpcode::FetchAdd,
            "loopback fetch-and-add",
        );
        let old: [u8; 8] = want[4104..4112].try_into().expect("8 bytes");
        assert_eq!(
            u64_at(res.as_slice(), 0),
            u64::from_ne_bytes(old),
            "old value of a loopback FAA"
        );
        want[4104..4112].copy_from_slice(&(u64::from_ne_bytes(old) + 9).to_ne_bytes());
    }
    check_bytes(
        win.revoke().as_slice(),
        &want,
        "window after loopback WRITE and atomic",
    );
}

/// An inline SGE naming unregistered memory is refused (at post time or with
/// `LocProtErr`): unlike libibverbs, no transport reads an unchecked address.
pub fn err_inline_unregistered(h: &Harness) {
    let mut cfg = h.qp_config();
    cfg.max_inline_data = h.caps().max_inline_data;
    let mut p = h.connected_pair(&cfg, &h.qp_config());
    // Within the inline limit, so that only the memory can be the reason
    // (with no inline data granted, one byte is refused as too large).
    let len = (p.qa.caps().max_inline_data as usize).clamp(1, 8);
    let rb = p.b.arena(64, 1);
    let _recvs = post_recvs(&mut p.qb, &rb, 0, 1);
    let stack = [7u8; 8];
    let sge = Sge::new(stack.as_ptr() as u64, len as u32, 0);
    match p.qa.try_post_send(&[
        WorkRequest::send(5, &[sge]).with_flags(SendFlags::SIGNALED | SendFlags::INLINE)
    ]) {
        Err(e) => assert_eq!(e.index, 0, "refused at post time: {e}"),
        Ok(()) => {
            let wc = p.qa.next("inline SEND from unregistered memory");
            assert_eq!(
                (wc.wr_id, wc.status),
                (5, WcStatus::LocProtErr),
                "an unregistered inline SGE is a local protection error"
            );
        }
    }
}

/// A window watched with `Window::load_byte` while a peer writes it. On a
/// device whose remote writes are DMA (verbs), each of a series of RDMA
/// WRITEs is seen through its last byte, in order, with no completion on
/// the target, and the window holds the last write once revoked. On the
/// in-process device, whose writes are plain Rust copies, `load_byte`
/// refuses (`None`) instead of racing with them.
pub fn window_flag_byte(h: &Harness) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let sa = p.a.arena(64, 4);
    let win = p.b.window(64, Access::REMOTE_WRITE);
    assert_eq!(win.load_byte(64), None, "a byte past the window");
    if !p.b.caps().dma_remote_writes {
        assert_eq!(
            win.load_byte(0),
            None,
            "{}: load_byte on a device whose writes are not DMA",
            p.b.caps().name
        );
        return;
    }
    assert_eq!(win.load_byte(63), Some(0), "a fresh window is zeroed");
    let r = win.remote();
    let mut last = Vec::new();
    for round in 1..=20u8 {
        let mut data = pattern(900 + u64::from(round), 64);
        data[63] = round;
        let s = slot_with(&sa, &data);
        p.qa.post_send(&[WorkRequest::one_sided(
            u64::from(round),
            Opcode::RdmaWrite,
            &[s.sge_filled()],
            r.addr,
            r.rkey,
        )]);
        let deadline = std::time::Instant::now() + p.qb.timeout();
        while win.load_byte(63) != Some(round) {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the WRITE's last byte never showed (saw {:?})",
                win.load_byte(63)
            );
            std::hint::spin_loop();
        }
        expect_ok(
            &p.qa.next("RDMA WRITE"),
            u64::from(round),
            WcOpcode::RdmaWrite,
            "writer",
        );
        last = data;
    }
    p.qb.expect_idle(QUIET, "watched WRITEs complete nothing on the target");
    check_bytes(
        win.revoke().as_slice(),
        &last,
        "window after the last WRITE",
    );
}
