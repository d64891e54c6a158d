//! Behaviour of the soft device: data paths byte for byte, keys, connection
//! management, RNR, every error status and its side, flushing, SRQs from
//! several threads, device copy counters, teardown in flight.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::task::{Wake, Waker};
use std::time::Duration;

use common::*;
use zcmsg::{
    Access, Armed, DeviceCaps, Opcode, QpConfig, QpState, RecvRequest, SendFlags, Sge, Transport,
    TransportError, WcOpcode, WcStatus, WorkCompletion, WorkRequest,
};
use zcmsg_soft::{SoftDevice, MAX_PRIVATE_DATA};

// ---------------------------------------------------------------- data paths

#[test]
fn send_gathers_and_scatters_byte_for_byte() {
    let e = env();
    let (mut a, mut b) = e.dev.pair(&cfg(), &cfg()).unwrap();
    let (p1, p2, p3) = (pattern(100, 1), pattern(3000, 2), pattern(1, 3));
    let (s1, s2, s3) = (e.slot(&p1), e.slot(&p2), e.slot(&p3));
    let (r1, r2) = (e.empty(), e.empty());
    // The receive spans two slots: 1000 bytes of one, then the other.
    b.post_recv(&[RecvRequest {
        wr_id: 10,
        sg_list: &[r1.sge_range(0, 1000), r2.sge()],
    }])
    .unwrap();
    let sg = [s1.sge_filled(), s2.sge_filled(), s3.sge_filled()];
    a.post_send(&[WorkRequest::send(1, &sg)]).unwrap();
    let wa = poll_n(&mut *a, 1);
    assert_eq!(
        (wa[0].wr_id, wa[0].status, wa[0].opcode),
        (1, WcStatus::Success, WcOpcode::Send)
    );
    let wb = poll_n(&mut *b, 1);
    assert_eq!(
        (
            wb[0].wr_id,
            wb[0].status,
            wb[0].opcode,
            wb[0].byte_len,
            wb[0].imm_data
        ),
        (10, WcStatus::Success, WcOpcode::Recv, 3101, None)
    );
    assert_eq!(wb[0].qp_num, b.qp_num());
    let mut want = p1.clone();
    want.extend_from_slice(&p2);
    want.extend_from_slice(&p3);
    let (mut r1, mut r2) = (r1, r2);
    r1.set_len(1000);
    r2.set_len(2101);
    assert_eq!(r1.as_slice(), &want[..1000]);
    assert_eq!(r2.as_slice(), &want[1000..]);
}

#[test]
fn immediate_data_and_zero_byte_messages() {
    let e = env();
    let (mut a, mut b) = e.dev.pair(&cfg(), &cfg()).unwrap();
    let w = e.window(256, Access::REMOTE_WRITE, 0);
    let r = w.remote();
    let data = e.slot(&pattern(200, 9));
    let rx = e.empty();
    post_recv(&mut *b, 1, &rx);
    b.post_recv(&[RecvRequest {
        wr_id: 2,
        sg_list: &[],
    }])
    .unwrap();
    b.post_recv(&[RecvRequest {
        wr_id: 3,
        sg_list: &[],
    }])
    .unwrap();
    a.post_send(&[
        WorkRequest::send(11, &[data.sge_range(0, 5)])
            .with_flags(SendFlags::SIGNALED)
            .with_imm(0xdead_beef),
        WorkRequest {
            opcode: Opcode::SendWithImm,
            ..WorkRequest::send(12, &[])
        }
        .with_imm(7),
        WorkRequest::one_sided(
            13,
            Opcode::RdmaWriteWithImm,
            &[data.sge_filled()],
            r.addr + 56,
            r.rkey,
        )
        .with_imm(42),
    ])
    .unwrap();
    let wa = poll_n(&mut *a, 3);
    assert!(wa.iter().all(|w| w.status == WcStatus::Success), "{wa:?}");
    assert_eq!(wa[2].opcode, WcOpcode::RdmaWrite);
    let wb = poll_n(&mut *b, 3);
    // A SEND opcode without imm flag ignores imm_data.
    assert_eq!((wb[0].byte_len, wb[0].imm_data), (5, None));
    assert_eq!(
        (wb[1].opcode, wb[1].byte_len, wb[1].imm_data),
        (WcOpcode::Recv, 0, Some(7))
    );
    assert_eq!(
        (wb[2].wr_id, wb[2].opcode, wb[2].byte_len, wb[2].imm_data),
        (3, WcOpcode::RecvRdmaWithImm, 200, Some(42))
    );
    let got = w.revoke();
    assert_eq!(&got.as_slice()[56..], &pattern(200, 9)[..]);
    assert!(got.as_slice()[..56].iter().all(|&b| b == 0));
}

#[test]
fn write_then_read_back_across_two_devices() {
    let (ea, eb) = (env(), env());
    let (mut a, mut b) = SoftDevice::connect_pair(&ea.dev, &eb.dev, &cfg(), &cfg()).unwrap();
    let win = eb.window(8192, Access::REMOTE_WRITE | Access::REMOTE_READ, 0xee);
    let r = win.remote();
    let (p1, p2) = (pattern(4000, 5), pattern(4000, 6));
    let (s1, s2) = (ea.slot(&p1), ea.slot(&p2));
    a.post_send(&[WorkRequest::one_sided(
        1,
        Opcode::RdmaWrite,
        &[s1.sge_filled(), s2.sge_filled()],
        r.addr + 100,
        r.rkey,
    )])
    .unwrap();
    assert_eq!(ids(&poll_n(&mut *a, 1)), vec![(1, WcStatus::Success)]);
    // READ it back, scattered over two targets.
    let (t1, t2, t3) = (ea.empty(), ea.empty(), ea.empty());
    a.post_send(&[WorkRequest::one_sided(
        2,
        Opcode::RdmaRead,
        &[t1.sge_range(0, 3000), t2.sge(), t3.sge_range(0, 904)],
        r.addr + 100,
        r.rkey,
    )])
    .unwrap();
    let w = poll_n(&mut *a, 1);
    assert_eq!(
        (w[0].status, w[0].opcode, w[0].byte_len),
        (WcStatus::Success, WcOpcode::RdmaRead, 8000)
    );
    let (mut t1, mut t2, mut t3) = (t1, t2, t3);
    t1.set_len(3000);
    t2.set_len(4096);
    t3.set_len(904);
    let mut want = p1.clone();
    want.extend_from_slice(&p2);
    assert_eq!(t1.as_slice(), &want[..3000]);
    assert_eq!(t2.as_slice(), &want[3000..7096]);
    assert_eq!(t3.as_slice(), &want[7096..]);
    assert!(poll_now(&mut *b).is_empty());
    let got = win.revoke();
    assert!(got.as_slice()[..100].iter().all(|&x| x == 0xee));
    assert_eq!(&got.as_slice()[100..8100], &want[..]);
    assert!(got.as_slice()[8100..].iter().all(|&x| x == 0xee));
    // Counted on the requester's device only.
    let s = ea.dev.stats();
    assert_eq!(
        (s.write_ops, s.write_bytes, s.read_ops, s.read_bytes),
        (1, 8000, 1, 8000)
    );
    assert_eq!(eb.dev.stats().copy_ops, 0);
}

#[test]
fn zero_byte_write_and_read_need_no_valid_rkey() {
    let e = env();
    let (mut a, _b) = e.dev.pair(&cfg(), &cfg()).unwrap();
    a.post_send(&[
        WorkRequest::one_sided(1, Opcode::RdmaWrite, &[], 0x1234, 0xbad),
        WorkRequest::one_sided(2, Opcode::RdmaRead, &[], 0, 0),
    ])
    .unwrap();
    assert_eq!(
        ids(&poll_n(&mut *a, 2)),
        vec![(1, WcStatus::Success), (2, WcStatus::Success)]
    );
    assert_eq!(a.state(), QpState::ReadyToSend);
}

#[test]
fn atomics_return_old_values() {
    let e = env();
    let (mut a, _b) = e.dev.pair(&cfg(), &cfg()).unwrap();
    let w = e.window(64, Access::REMOTE_ATOMIC | Access::REMOTE_READ, 0);
    let r = w.remote();
    let res = e.empty();
    let faa = |id, add| {
        WorkRequest::one_sided(id, Opcode::AtomicFetchAndAdd, &[], r.addr + 8, r.rkey)
            .with_atomic(add, 0)
    };
    let sg = [res.sge_range(0, 8)];
    let sg2 = [res.sge_range(8, 8)];
    let sg3 = [res.sge_range(16, 8)];
    a.post_send(&[
        WorkRequest {
            sg_list: &sg,
            ..faa(1, 5)
        },
        WorkRequest {
            sg_list: &sg2,
            ..faa(2, 10)
        },
        WorkRequest::one_sided(3, Opcode::AtomicCmpAndSwp, &sg3, r.addr + 8, r.rkey)
            .with_atomic(15, 99),
    ])
    .unwrap();
    let wc = poll_n(&mut *a, 3);
    assert!(
        wc.iter()
            .all(|w| w.status == WcStatus::Success && w.byte_len == 8),
        "{wc:?}"
    );
    assert_eq!(
        wc.iter().map(|w| w.opcode).collect::<Vec<_>>(),
        vec![WcOpcode::FetchAdd, WcOpcode::FetchAdd, WcOpcode::CompSwap]
    );
    let mut res = res;
    res.set_len(24);
    let word = |i: usize| u64::from_ne_bytes(res.as_slice()[i * 8..][..8].try_into().unwrap());
    assert_eq!((word(0), word(1), word(2)), (0, 5, 15));
    // A failed compare leaves the value and returns it.
    let res2 = e.empty();
    a.post_send(&[WorkRequest::one_sided(
        4,
        Opcode::AtomicCmpAndSwp,
        &[res2.sge_range(0, 8)],
        r.addr + 8,
        r.rkey,
    )
    .with_atomic(1, 2)])
        .unwrap();
    poll_n(&mut *a, 1);
    let mut res2 = res2;
    res2.set_len(8);
    assert_eq!(u64::from_ne_bytes(res2.as_slice().try_into().unwrap()), 99);
    let got = w.revoke();
    assert_eq!(
        u64::from_ne_bytes(got.as_slice()[8..16].try_into().unwrap()),
        99
    );
    assert_eq!(e.dev.stats().atomic_ops, 4);
}

#[test]
fn atomics_are_atomic_under_contention_from_several_queue_pairs() {
    const THREADS: u64 = 4;
    const EACH: u64 = 2000;
    let (ea, eb) = (env(), env());
    let w = eb.window(64, Access::REMOTE_ATOMIC, 0);
    let r = w.remote();
    let barrier = Arc::new(Barrier::new(THREADS as usize));
    let mut handles = Vec::new();
    let mut keep = Vec::new();
    for t in 0..THREADS {
        // Half on the window's device (loopback), half from another device.
        let (mut q, peer) = if t % 2 == 0 {
            eb.dev.pair(&cfg(), &cfg()).unwrap()
        } else {
            SoftDevice::connect_pair(&ea.dev, &eb.dev, &cfg(), &cfg()).unwrap()
        };
        keep.push(peer);
        let e = if t % 2 == 0 { &eb } else { &ea };
        let res = e.empty();
        let barrier = barrier.clone();
        handles.push(std::thread::spawn(move || {
            let mut res = res;
            barrier.wait();
            let mut seen = Vec::with_capacity(EACH as usize);
            for i in 0..EACH {
                q.post_send(&[WorkRequest::one_sided(
                    i,
                    Opcode::AtomicFetchAndAdd,
                    &[res.sge_range(0, 8)],
                    r.addr,
                    r.rkey,
                )
                .with_atomic(1, 0)])
                    .unwrap();
                let wc = poll_n(&mut *q, 1);
                assert_eq!(wc[0].status, WcStatus::Success);
                res.set_len(8);
                seen.push(u64::from_ne_bytes(res.as_slice().try_into().unwrap()));
            }
            seen
        }));
    }
    let mut all: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort_unstable();
    // Every old value 0..N-1 was returned exactly once.
    assert_eq!(all, (0..THREADS * EACH).collect::<Vec<_>>());
    drop(keep);
    let got = w.revoke();
    assert_eq!(
        u64::from_ne_bytes(got.as_slice()[..8].try_into().unwrap()),
        THREADS * EACH
    );
}

#[test]
fn ping_pong_between_two_threads_keeps_every_byte() {
    const ROUNDS: u64 = 2000;
    let (ea, eb) = (Arc::new(env()), Arc::new(env()));
    let (mut a, mut b) = SoftDevice::connect_pair(&ea.dev, &eb.dev, &cfg(), &cfg()).unwrap();
    let eb2 = eb.clone();
    let t = std::thread::spawn(move || {
        let e = eb2;
        let mut rx: Vec<_> = (0..8).map(|_| e.empty()).collect();
        for (i, s) in rx.iter().enumerate() {
            post_recv(&mut *b, i as u64, s);
        }
        for round in 0..ROUNDS {
            let wc = poll_n(&mut *b, 1)[0];
            assert_eq!(wc.status, WcStatus::Success);
            let slot = &mut rx[wc.wr_id as usize];
            slot.set_len(wc.byte_len as usize);
            assert_eq!(
                slot.as_slice(),
                &pattern(wc.byte_len as usize, round as u8)[..]
            );
            let reply = e.slot(slot.as_slice());
            post_recv(&mut *b, wc.wr_id, slot);
            b.post_send(&[WorkRequest::send(round, &[reply.sge_filled()])])
                .unwrap();
            assert_eq!(poll_n(&mut *b, 1)[0].status, WcStatus::Success);
        }
        b
    });
    let mut rx: Vec<_> = (0..8).map(|_| ea.empty()).collect();
    for (i, s) in rx.iter().enumerate() {
        post_recv(&mut *a, i as u64, s);
    }
    let mut got_sends = 0;
    for round in 0..ROUNDS {
        let len = 1 + (round as usize * 37) % 4000;
        let msg = ea.slot(&pattern(len, round as u8));
        a.post_send(&[WorkRequest::send(round, &[msg.sge_filled()])])
            .unwrap();
        loop {
            let wc = poll_n(&mut *a, 1)[0];
            assert_eq!(wc.status, WcStatus::Success);
            if wc.opcode == WcOpcode::Send {
                got_sends += 1;
                continue;
            }
            let slot = &mut rx[wc.wr_id as usize];
            slot.set_len(wc.byte_len as usize);
            assert_eq!(slot.as_slice(), &pattern(len, round as u8)[..]);
            post_recv(&mut *a, wc.wr_id, slot);
            break;
        }
    }
    got_sends += poll_now(&mut *a).len() as u64;
    assert_eq!(got_sends, ROUNDS);
    let _b = t.join().unwrap();
}

// ---------------------------------------------------------------- keys

#[test]
fn keys_have_generations_and_stale_keys_only_fail() {
    let e = env();
    let dev = &e.dev;
    let mem = e.arena.memory();
    let before = dev.registrations();
    let r1 = dev
        .register_range(
            mem.clone(),
            0,
            4096,
            Access::LOCAL_WRITE | Access::REMOTE_WRITE,
        )
        .unwrap();
    assert_ne!(r1.lkey, r1.rkey);
    assert_eq!(r1.iova, e.arena.base());
    dev.deregister(r1.lkey).unwrap();
    assert!(matches!(
        dev.deregister(r1.lkey),
        Err(TransportError::InvalidArgument(_))
    ));
    assert!(
        dev.deregister(r1.rkey).is_err(),
        "deregistering takes the lkey"
    );
    // The same memory registered again gets new keys.
    let r2 = dev
        .register_range(
            mem.clone(),
            0,
            4096,
            Access::LOCAL_WRITE | Access::REMOTE_WRITE,
        )
        .unwrap();
    assert!(r2.lkey != r1.lkey && r2.rkey != r1.rkey);
    assert_eq!(dev.registrations(), before + 1);
    let mut all = std::collections::HashSet::new();
    for _ in 0..200 {
        let r = dev.register(mem.clone(), Access::LOCAL_WRITE).unwrap();
        assert!(all.insert(r.lkey) && all.insert(r.rkey));
        dev.deregister(r.lkey).unwrap();
    }
    assert!(!all.contains(&r1.lkey) && !all.contains(&r2.lkey));

    let (mut a, mut b) = dev.pair(&cfg(), &cfg()).unwrap();
    let rx = e.empty();
    post_recv(&mut *b, 1, &rx);
    // A stale lkey in a SEND: local protection error, nothing delivered.
    let src = e.slot(b"stale");
    let stale = Sge::new(src.sge_filled().addr(), 5, r1.lkey);
    a.post_send(&[WorkRequest::send(1, &[stale])]).unwrap();
    assert_eq!(ids(&poll_n(&mut *a, 1)), vec![(1, WcStatus::LocProtErr)]);
    assert!(poll_now(&mut *b).is_empty(), "the receive was not consumed");
    assert_eq!(b.state(), QpState::ReadyToSend);
    drop((a, b));

    // A stale rkey, and an lkey used as an rkey: remote access errors.
    for key in [r1.rkey, r2.lkey] {
        let (mut a, _b) = dev.pair(&cfg(), &cfg()).unwrap();
        a.post_send(&[WorkRequest::one_sided(
            2,
            Opcode::RdmaWrite,
            &[src.sge_filled()],
            r2.iova,
            key,
        )])
        .unwrap();
        assert_eq!(ids(&poll_n(&mut *a, 1)), vec![(2, WcStatus::RemAccessErr)]);
    }
    dev.deregister(r2.lkey).unwrap();
}

#[test]
fn keys_of_one_device_mean_nothing_to_another() {
    let (ea, eb) = (env(), env());
    // A loopback pair on device B, but an SGE made by device A's arena.
    let (mut q, _p) = eb.dev.pair(&cfg(), &cfg()).unwrap();
    let src = ea.slot(b"foreign");
    q.post_send(&[WorkRequest::one_sided(
        1,
        Opcode::RdmaWrite,
        &[src.sge_filled()],
        0,
        0,
    )])
    .unwrap();
    assert_eq!(ids(&poll_n(&mut *q, 1)), vec![(1, WcStatus::LocProtErr)]);
    // Across devices, an rkey is translated by the peer's device only.
    let own = ea.window(64, Access::REMOTE_WRITE, 0);
    let (mut a, _b) = SoftDevice::connect_pair(&ea.dev, &eb.dev, &cfg(), &cfg()).unwrap();
    let src = ea.slot(b"x");
    a.post_send(&[WorkRequest::one_sided(
        2,
        Opcode::RdmaWrite,
        &[src.sge_filled()],
        own.remote().addr,
        own.remote().rkey,
    )])
    .unwrap();
    assert_eq!(ids(&poll_n(&mut *a, 1)), vec![(2, WcStatus::RemAccessErr)]);
}

#[test]
fn registration_arguments_are_checked() {
    let e = env();
    let mem = e.arena.memory();
    let len = mem.len();
    for (off, l) in [(0, len + 1), (len, 1), (usize::MAX, 2)] {
        assert!(matches!(
            e.dev
                .register_range(mem.clone(), off, l, Access::LOCAL_WRITE),
            Err(TransportError::InvalidArgument(_))
        ));
    }
    let caps = DeviceCaps {
        max_mr_size: 4096,
        ..SoftDevice::default_caps()
    };
    let small = SoftDevice::with_caps(caps);
    assert!(small
        .register_range(mem.clone(), 0, 4097, Access::LOCAL_WRITE)
        .is_err());
    assert!(small
        .register_range(mem, 0, 4096, Access::LOCAL_WRITE)
        .is_ok());
    assert_eq!(small.caps().address_space, zcmsg::AddressSpace::Cpu);
    assert!(small.caps().name.starts_with("soft"));
}

// ---------------------------------------------------------------- connection management

#[test]
fn listen_and_connect_by_name() {
    let (ea, eb) = (env(), env());
    let name = "soft-test:listen-connect";
    assert!(matches!(
        ea.dev.connect(name, &cfg(), b""),
        Err(TransportError::ConnectionRefused(_))
    ));
    let mut l = eb.dev.listen(name, &cfg()).unwrap();
    assert_eq!(l.local_addr(), name);
    assert!(matches!(
        ea.dev.listen(name, &cfg()),
        Err(TransportError::AddressInUse(_))
    ));
    assert!(matches!(
        l.accept(Duration::from_millis(10)),
        Err(TransportError::Timeout(_))
    ));
    assert!(matches!(
        ea.dev.connect(name, &cfg(), &[0u8; MAX_PRIVATE_DATA + 1]),
        Err(TransportError::InvalidArgument(_))
    ));
    let pd_bytes: Vec<u8> = (0..MAX_PRIVATE_DATA as u8).collect();
    // Connect first, accept later: the connector may post at once (RNR waits).
    let mut a = ea.dev.connect(name, &cfg(), &pd_bytes).unwrap();
    let msg = ea.slot(b"across hosts");
    a.post_send(&[WorkRequest::send(1, &[msg.sge_filled()])])
        .unwrap();
    let (mut b, got) = l.accept(Duration::from_secs(5)).unwrap();
    assert_eq!(got, pd_bytes);
    let rx = eb.empty();
    post_recv(&mut *b, 9, &rx);
    assert_eq!(ids(&poll_n(&mut *a, 1)), vec![(1, WcStatus::Success)]);
    let w = poll_n(&mut *b, 1)[0];
    let mut rx = rx;
    rx.set_len(w.byte_len as usize);
    assert_eq!(rx.as_slice(), b"across hosts");
    assert_eq!(soft(&*a).peer_qp_num(), b.qp_num());
    assert!(Arc::ptr_eq(soft(&*b).device(), &eb.dev));
    drop(l);
    // The name is free again.
    let l2 = ea.dev.listen(name, &cfg()).unwrap();
    drop(l2);
    assert!(matches!(
        ea.dev.connect(name, &cfg(), b""),
        Err(TransportError::ConnectionRefused(_))
    ));
}

#[test]
fn port_zero_names_are_unique_and_unaccepted_connections_fail_when_the_listener_goes() {
    let e = env();
    let l1 = e.dev.listen("127.0.0.1:0", &cfg()).unwrap();
    let l2 = e.dev.listen("127.0.0.1:0", &cfg()).unwrap();
    assert_ne!(l1.local_addr(), l2.local_addr());
    assert!(l1.local_addr().starts_with("127.0.0.1:"));
    let mut a = e.dev.connect(&l1.local_addr(), &cfg(), b"hi").unwrap();
    let rx = e.empty();
    post_recv(&mut *a, 5, &rx);
    drop(l1);
    // The accepting side was dropped with the listener: the connector is in error.
    assert_eq!(a.state(), QpState::Error);
    assert_eq!(ids(&poll_n(&mut *a, 1)), vec![(5, WcStatus::WrFlushErr)]);
    drop(l2);
}

// ---------------------------------------------------------------- RNR

fn rnr_cfg(rnr_retry: u8) -> QpConfig {
    QpConfig { rnr_retry, ..cfg() }
}

#[test]
fn rnr_retries_then_fails_with_rnr_retry_exc_err() {
    let e = env();
    for rnr_retry in [0u8, 1, 3] {
        let (mut a, mut b) = e.dev.pair(&rnr_cfg(rnr_retry), &cfg()).unwrap();
        let before = e.dev.stats().rnr_naks;
        let msg = e.slot(b"nobody listens");
        let rx = e.empty();
        post_recv(&mut *a, 77, &rx);
        a.post_send(&[
            WorkRequest::send(1, &[msg.sge_filled()]),
            WorkRequest::send(2, &[msg.sge_filled()]),
        ])
        .unwrap();
        let wc = poll_n(&mut *a, 3);
        assert_eq!(
            ids(&wc),
            vec![
                (1, WcStatus::RnrRetryExcErr),
                (2, WcStatus::WrFlushErr),
                (77, WcStatus::WrFlushErr)
            ]
        );
        assert_eq!(wc[2].opcode, WcOpcode::Recv);
        assert_eq!(a.state(), QpState::Error);
        // The initial attempt plus rnr_retry retries were each NAKed.
        assert_eq!(e.dev.stats().rnr_naks - before, u64::from(rnr_retry) + 1);
        // The receiver is unaffected.
        assert_eq!(b.state(), QpState::ReadyToSend);
        assert!(poll_now(&mut *b).is_empty());
    }
}

#[test]
fn a_waiting_send_holds_back_later_requests_until_a_receive_arrives() {
    let e = env();
    let (mut a, mut b) = e.dev.pair(&rnr_cfg(7), &cfg()).unwrap();
    let w = e.window(64, Access::REMOTE_WRITE, 0);
    let r = w.remote();
    let msg = e.slot(b"first");
    let wr = e.slot(b"second");
    a.post_send(&[
        WorkRequest::send(1, &[msg.sge_filled()]),
        WorkRequest::one_sided(2, Opcode::RdmaWrite, &[wr.sge_filled()], r.addr, r.rkey),
    ])
    .unwrap();
    // rnr_retry 7 retries forever: polling never fails it.
    for _ in 0..50 {
        assert!(poll_now(&mut *a).is_empty());
        std::thread::sleep(Duration::from_millis(1));
    }
    let sa = soft(&*a);
    assert!(sa.rnr_waiting());
    assert_eq!(sa.pending_sends(), 2);
    assert_eq!(a.state(), QpState::ReadyToSend);
    let rx = e.empty();
    post_recv(&mut *b, 3, &rx);
    assert_eq!(
        ids(&poll_n(&mut *a, 2)),
        vec![(1, WcStatus::Success), (2, WcStatus::Success)]
    );
    assert_eq!(soft(&*a).pending_sends(), 0);
    let wb = poll_n(&mut *b, 1)[0];
    let mut rx = rx;
    rx.set_len(wb.byte_len as usize);
    assert_eq!(rx.as_slice(), b"first");
    assert_eq!(&w.revoke().as_slice()[..6], b"second");
}

#[test]
fn rnr_with_write_with_imm_and_an_armed_sender_is_woken_by_post_recv() {
    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let e = env();
    let (mut a, mut b) = e.dev.pair(&rnr_cfg(7), &cfg()).unwrap();
    let w = e.window(64, Access::REMOTE_WRITE, 0);
    let src = e.slot(b"imm write");
    a.post_send(&[WorkRequest::one_sided(
        1,
        Opcode::RdmaWriteWithImm,
        &[src.sge_filled()],
        w.remote().addr,
        w.remote().rkey,
    )
    .with_imm(5)])
        .unwrap();
    let flag = Arc::new(Flag(AtomicBool::new(false)));
    let waker = Waker::from(flag.clone());
    assert_eq!(a.arm(&waker), Armed::Armed);
    b.post_recv(&[RecvRequest {
        wr_id: 4,
        sg_list: &[],
    }])
    .unwrap();
    // Woken by post_recv (or by the RNR timer): either way, a wake comes.
    while !flag.0.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    assert_eq!(ids(&poll_n(&mut *a, 1)), vec![(1, WcStatus::Success)]);
    let wb = poll_n(&mut *b, 1)[0];
    assert_eq!(
        (wb.opcode, wb.byte_len, wb.imm_data),
        (WcOpcode::RecvRdmaWithImm, 9, Some(5))
    );
    assert_eq!(&w.revoke().as_slice()[..9], b"imm write");
}

#[test]
fn a_waiting_send_progresses_while_the_sender_is_idle() {
    let e = env();
    let (mut a, mut b) = e.dev.pair(&rnr_cfg(7), &cfg()).unwrap();
    let msg = e.slot(&pattern(128, 4));
    a.post_send(&[WorkRequest::send(20, &[msg.sge_filled()])])
        .unwrap();
    std::thread::sleep(Duration::from_millis(2));
    let rx = e.empty();
    post_recv(&mut *b, 7, &rx);
    // Only the receiver polls: the receive posted ran the waiting SEND.
    let w = poll_now(&mut *b);
    assert_eq!(ids(&w), vec![(7, WcStatus::Success)]);
    let mut rx = rx;
    rx.set_len(w[0].byte_len as usize);
    assert_eq!(rx.as_slice(), &pattern(128, 4)[..]);
    assert_eq!(ids(&poll_now(&mut *a)), vec![(20, WcStatus::Success)]);

    // Through a shared receive queue, posted from another thread.
    let srq = e.dev.create_srq(4, 1).unwrap();
    let (mut c, mut d) = e
        .dev
        .pair(
            &rnr_cfg(7),
            &QpConfig {
                srq: Some(srq.clone()),
                ..cfg()
            },
        )
        .unwrap();
    c.post_send(&[WorkRequest::send(21, &[msg.sge_filled()])])
        .unwrap();
    let sge = rx.sge();
    std::thread::scope(|s| {
        s.spawn(|| {
            srq.post_recv(&[RecvRequest {
                wr_id: 8,
                sg_list: &[sge],
            }])
            .unwrap()
        });
    });
    assert_eq!(ids(&poll_now(&mut *d)), vec![(8, WcStatus::Success)]);
    assert_eq!(ids(&poll_now(&mut *c)), vec![(21, WcStatus::Success)]);
}

#[test]
fn the_rnr_timer_fails_a_waiting_send_without_anyone_polling() {
    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let e = env();
    let (mut a, _b) = e.dev.pair(&rnr_cfg(2), &cfg()).unwrap();
    let msg = e.slot(b"never received");
    a.post_send(&[WorkRequest::send(1, &[msg.sge_filled()])])
        .unwrap();
    let flag = Arc::new(Flag(AtomicBool::new(false)));
    assert_eq!(a.arm(&Waker::from(flag.clone())), Armed::Armed);
    // The timer retries twice, then fails the SEND and wakes us (hang protection only).
    let start = std::time::Instant::now();
    while !flag.0.load(Ordering::SeqCst) {
        assert!(start.elapsed() < Duration::from_secs(30), "never woken");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(a.state(), QpState::Error);
    assert_eq!(ids(&poll_now(&mut *a)), vec![(1, WcStatus::RnrRetryExcErr)]);
}

#[test]
fn inline_payload_is_taken_at_post_time_even_when_the_send_waits() {
    let e = env();
    let (mut a, mut b) = e.dev.pair(&rnr_cfg(7), &cfg()).unwrap();
    let mut src = e.arena.alloc().unwrap();
    bytes::BufMut::put_slice(&mut src, b"inline from a slot!!!");
    let sge = src.sge_filled();
    // No receive yet: the send waits, its payload already copied.
    a.post_send(
        &[WorkRequest::send(1, &[sge]).with_flags(SendFlags::SIGNALED | SendFlags::INLINE)],
    )
    .unwrap();
    src.as_mut_slice().fill(b'X');
    let staged = e.dev.stats().inline_staged_bytes;
    assert_eq!(staged, 21);
    let rx = e.empty();
    post_recv(&mut *b, 1, &rx);
    assert_eq!(ids(&poll_n(&mut *a, 1)), vec![(1, WcStatus::Success)]);
    let mut rx = rx;
    rx.set_len(poll_n(&mut *b, 1)[0].byte_len as usize);
    assert_eq!(rx.as_slice(), b"inline from a slot!!!");
    // With a receive waiting it executes at once, and the buffer is free
    // again when post_send returns.
    let rx2 = e.empty();
    post_recv(&mut *b, 2, &rx2);
    src.as_mut_slice()[..6].copy_from_slice(b"direct");
    let sge = src.sge_range(0, 6);
    a.post_send(
        &[WorkRequest::send(2, &[sge]).with_flags(SendFlags::SIGNALED | SendFlags::INLINE)],
    )
    .unwrap();
    src.as_mut_slice().fill(0);
    poll_n(&mut *a, 1);
    let mut rx2 = rx2;
    rx2.set_len(poll_n(&mut *b, 1)[0].byte_len as usize);
    assert_eq!(rx2.as_slice(), b"direct");
    assert_eq!(e.dev.stats().inline_staged_bytes, staged);
}

#[test]
fn an_inline_sge_outside_registered_memory_is_a_protection_error() {
    let e = env();
    let (mut a, mut b) = e.dev.pair(&cfg(), &cfg()).unwrap();
    let rx = e.empty();
    post_recv(&mut *b, 1, &rx);
    let stack = *b"not registered";
    // The device reads no address its table does not cover, inline or not.
    let sge = Sge::new(stack.as_ptr() as u64, stack.len() as u32, 0);
    a.post_send(
        &[WorkRequest::send(9, &[sge]).with_flags(SendFlags::SIGNALED | SendFlags::INLINE)],
    )
    .unwrap();
    assert_eq!(ids(&poll_n(&mut *a, 1)), vec![(9, WcStatus::LocProtErr)]);
    assert!(
        e.pd.builder(zcmsg::UnregisteredPolicy::Reject)
            .borrowed(&stack)
            .is_err(),
        "borrowed() refuses unregistered memory"
    );
}

// ---------------------------------------------------------------- post-time refusals

#[test]
fn malformed_requests_are_refused_at_post_time() {
    let caps = DeviceCaps {
        max_msg_sz: 1000,
        atomics: false,
        ..SoftDevice::default_caps()
    };
    let e = env_on(SoftDevice::with_caps(caps));
    let qc = QpConfig {
        max_send_wr: 4,
        max_recv_wr: 2,
        max_send_sge: 2,
        max_recv_sge: 1,
        max_inline_data: 16,
        ..QpConfig::default()
    };
    let (mut a, mut b) = e.dev.pair(&qc, &cfg()).unwrap();
    assert_eq!(a.caps().max_inline_data, 16);
    let s = e.slot(&[1u8; 600]);
    let w = e.window(4096, Access::REMOTE_WRITE | Access::REMOTE_ATOMIC, 0);
    let r = w.remote();
    let one = [s.sge_range(0, 8)];
    let three = [s.sge_range(0, 1), s.sge_range(1, 1), s.sge_range(2, 1)];
    let big = [s.sge_range(0, 600), s.sge_range(0, 600)];
    let seventeen = [s.sge_range(0, 17)];
    let write = |id, sg| WorkRequest::one_sided(id, Opcode::RdmaWrite, sg, r.addr, r.rkey);
    #[track_caller]
    fn err(res: Result<(), zcmsg::PostError>) -> zcmsg::PostError {
        res.unwrap_err()
    }

    let e1 = err(a.post_send(&[write(1, &one), write(2, &three)]));
    assert_eq!(e1.index, 1);
    assert!(matches!(
        e1.error,
        TransportError::TooManySges { got: 3, max: 2 }
    ));
    let e2 = err(a.post_send(&[write(3, &big)]));
    assert!(matches!(
        e2.error,
        TransportError::MessageTooLarge {
            got: 1200,
            max: 1000
        }
    ));
    let e3 = err(a.post_send(&[write(4, &seventeen).with_flags(SendFlags::INLINE)]));
    assert!(matches!(
        e3.error,
        TransportError::InlineTooLarge { got: 17, max: 16 }
    ));
    let e4 = err(a.post_send(&[WorkRequest::one_sided(
        5,
        Opcode::AtomicFetchAndAdd,
        &one,
        r.addr,
        r.rkey,
    )]));
    assert!(matches!(
        e4.error,
        TransportError::BadOpcode(Opcode::AtomicFetchAndAdd)
    ));
    let e5 = err(a.post_send(&[
        WorkRequest::one_sided(6, Opcode::RdmaRead, &one, r.addr, r.rkey)
            .with_flags(SendFlags::INLINE),
    ]));
    assert!(matches!(e5.error, TransportError::InvalidArgument(_)));
    let e6 =
        err(a.post_send(&[
            WorkRequest::send(7, &[Sge::new(0, 4, 0)]).with_flags(SendFlags::INLINE)
        ]));
    assert!(matches!(e6.error, TransportError::InvalidArgument(_)));

    // Send queue: write 1 executed (signaled, unpolled) holds a slot; 3 more fit.
    let e7 = err(a.post_send(&[
        write(8, &one),
        write(9, &one),
        write(10, &one),
        write(11, &one),
    ]));
    assert_eq!(e7.index, 3);
    assert!(matches!(e7.error, TransportError::QueueFull { depth: 4 }));
    assert_eq!(poll_n(&mut *a, 4).len(), 4);
    a.post_send(&[write(12, &one)]).unwrap();
    // Unsignaled requests that complete at once hold no slot.
    for i in 0..20 {
        a.post_send(&[write(100 + i, &one).with_flags(SendFlags::NONE)])
            .unwrap();
    }
    assert_eq!(ids(&poll_now(&mut *a)), vec![(12, WcStatus::Success)]);

    // Receive queue: depth 2, one SGE.
    let rx = e.empty();
    let mut b2 = e.dev.pair(&cfg(), &qc).unwrap().1;
    let e8 = err(b2.post_recv(&[RecvRequest {
        wr_id: 1,
        sg_list: &[rx.sge(), rx.sge()],
    }]));
    assert!(matches!(
        e8.error,
        TransportError::TooManySges { got: 2, max: 1 }
    ));
    assert!(poll_now(&mut *b).is_empty());
    let e9 = err(b2.post_recv(&[
        RecvRequest {
            wr_id: 1,
            sg_list: &[],
        },
        RecvRequest {
            wr_id: 2,
            sg_list: &[],
        },
        RecvRequest {
            wr_id: 3,
            sg_list: &[],
        },
    ]));
    assert_eq!(e9.index, 2);
    assert!(matches!(e9.error, TransportError::QueueFull { depth: 2 }));
    drop(w);
}

#[test]
fn atomic_alignment_and_length_are_checked_at_post_time() {
    let e = env();
    let (mut a, _b) = e.dev.pair(&cfg(), &cfg()).unwrap();
    let w = e.window(64, Access::REMOTE_ATOMIC, 0);
    let r = w.remote();
    let res = e.empty();
    let e1 = a
        .post_send(&[WorkRequest::one_sided(
            1,
            Opcode::AtomicFetchAndAdd,
            &[res.sge_range(0, 8)],
            r.addr + 4,
            r.rkey,
        )])
        .unwrap_err();
    assert!(matches!(e1.error, TransportError::InvalidArgument(_)));
    let e2 = a
        .post_send(&[WorkRequest::one_sided(
            2,
            Opcode::AtomicCmpAndSwp,
            &[res.sge_range(0, 4)],
            r.addr,
            r.rkey,
        )])
        .unwrap_err();
    assert!(matches!(e2.error, TransportError::InvalidArgument(_)));
    assert_eq!(a.state(), QpState::ReadyToSend);
    assert!(poll_now(&mut *a).is_empty());
}

#[test]
fn queue_pair_configs_are_checked_against_the_device() {
    let e = env();
    let over = |f: fn(&mut QpConfig)| {
        let mut c = cfg();
        f(&mut c);
        e.dev.pair(&c, &cfg()).err()
    };
    assert!(over(|c| c.max_send_wr = 16385).is_some());
    assert!(over(|c| c.max_recv_wr = 16385).is_some());
    assert!(over(|c| c.max_send_sge = 33).is_some());
    assert!(over(|c| c.max_recv_sge = 33).is_some());
    assert!(over(|c| c.rnr_retry = 8).is_some());
    assert!(over(|c| c.max_inline_data = 100_000).is_none());
    let (a, _b) = e
        .dev
        .pair(
            &QpConfig {
                max_inline_data: 100_000,
                ..cfg()
            },
            &cfg(),
        )
        .unwrap();
    assert_eq!(a.caps().max_inline_data, 256);
    // An SRQ of another device is refused.
    let other = SoftDevice::new();
    let srq = other.create_srq(8, 1).unwrap();
    assert!(e
        .dev
        .pair(
            &QpConfig {
                srq: Some(srq),
                ..cfg()
            },
            &cfg()
        )
        .is_err());
    assert!(e.dev.create_srq(0, 1).is_err());
    assert!(e.dev.create_srq(8, 33).is_err());
}

// ---------------------------------------------------------------- error statuses and sides

#[test]
fn local_sge_out_of_bounds_is_loc_prot_err_on_the_requester_only() {
    let e = env();
    let (mut a, mut b) = e.dev.pair(&cfg(), &cfg()).unwrap();
    let rx = e.empty();
    post_recv(&mut *b, 5, &rx);
    let end = e.arena.base() + e.arena.len() as u64;
    let bad = Sge::new(end - 10, 11, e.arena.lkey());
    a.post_send(&[WorkRequest::send(1, &[bad])]).unwrap();
    assert_eq!(ids(&poll_n(&mut *a, 1)), vec![(1, WcStatus::LocProtErr)]);
    assert_eq!(a.state(), QpState::Error);
    assert_eq!(b.state(), QpState::ReadyToSend);
    assert!(poll_now(&mut *b).is_empty());
    // An address wrapping around the address space is out of bounds too.
    let (mut c, _d) = e.dev.pair(&cfg(), &cfg()).unwrap();
    c.post_send(&[WorkRequest::one_sided(
        2,
        Opcode::RdmaWrite,
        &[Sge::new(u64::MAX - 1, 4, e.arena.lkey())],
        0,
        0,
    )])
    .unwrap();
    assert_eq!(ids(&poll_n(&mut *c, 1)), vec![(2, WcStatus::LocProtErr)]);
}

#[test]
fn read_or_atomic_into_memory_without_local_write_is_loc_prot_err() {
    let e = env();
    let ro = e
        .dev
        .register_range(e.arena.memory(), 0, 4096, Access::LOCAL_READ)
        .unwrap();
    let w = e.window(64, Access::REMOTE_READ | Access::REMOTE_ATOMIC, 3);
    let r = w.remote();
    let target = Sge::new(ro.iova, 8, ro.lkey);
    for (id, wr) in [
        (
            1,
            WorkRequest::one_sided(1, Opcode::RdmaRead, &[target], r.addr, r.rkey),
        ),
        (
            2,
            WorkRequest::one_sided(2, Opcode::AtomicFetchAndAdd, &[target], r.addr, r.rkey)
                .with_atomic(1, 0),
        ),
    ] {
        let (mut a, b) = e.dev.pair(&cfg(), &cfg()).unwrap();
        a.post_send(&[wr]).unwrap();
        assert_eq!(ids(&poll_n(&mut *a, 1)), vec![(id, WcStatus::LocProtErr)]);
        assert_eq!(b.state(), QpState::ReadyToSend, "the responder is fine");
    }
    // As in rxe, the atomic was applied before its result could not land.
    let got = w.revoke();
    assert_eq!(got.as_slice()[0], 4);
    e.dev.deregister(ro.lkey).unwrap();
}

#[test]
fn receive_too_small_is_loc_len_err_on_the_receiver_and_rem_inv_req_err_on_the_sender() {
    let e = env();
    let (mut a, mut b) = e.dev.pair(&cfg(), &cfg()).unwrap();
    let rx = e.empty();
    let rx2 = e.empty();
    b.post_recv(&[RecvRequest {
        wr_id: 1,
        sg_list: &[rx.sge_range(0, 10)],
    }])
    .unwrap();
    post_recv(&mut *b, 2, &rx2);
    let msg = e.slot(&pattern(11, 0));
    a.post_send(&[
        WorkRequest::send(10, &[msg.sge_filled()]),
        WorkRequest::send(11, &[msg.sge_filled()]),
    ])
    .unwrap();
    assert_eq!(
        ids(&poll_n(&mut *a, 2)),
        vec![(10, WcStatus::RemInvReqErr), (11, WcStatus::WrFlushErr)]
    );
    let wb = poll_n(&mut *b, 2);
    assert_eq!(
        ids(&wb),
        vec![(1, WcStatus::LocLenErr), (2, WcStatus::WrFlushErr)]
    );
    assert!(wb
        .iter()
        .all(|w| w.opcode == WcOpcode::Recv && w.qp_num == b.qp_num()));
    assert_eq!((a.state(), b.state()), (QpState::Error, QpState::Error));
    // Nothing was written.
    let mut rx = rx;
    rx.set_len(10);
    assert_eq!(rx.as_slice(), &[0u8; 10]);
}

#[test]
fn receive_with_a_bad_lkey_is_loc_prot_err_on_the_receiver_and_rem_op_err_on_the_sender() {
    let e = env();
    let ro = e
        .dev
        .register_range(e.arena.memory(), 0, 4096, Access::LOCAL_READ)
        .unwrap();
    let rx = e.empty();
    for (id, sge) in [
        (1, Sge::new(rx.sge().addr(), 64, 0x1234_5678)),
        (2, Sge::new(ro.iova, 64, ro.lkey)),
        (
            3,
            Sge::new(e.arena.base() + e.arena.len() as u64 - 8, 200, rx.lkey()),
        ),
    ] {
        let (mut a, mut b) = e.dev.pair(&cfg(), &cfg()).unwrap();
        // A first SGE big enough for the message is all that is checked.
        let big = e.empty();
        b.post_recv(&[RecvRequest {
            wr_id: 100,
            sg_list: &[big.sge(), sge],
        }])
        .unwrap();
        b.post_recv(&[RecvRequest {
            wr_id: id,
            sg_list: &[sge],
        }])
        .unwrap();
        let msg = e.slot(b"to a bad receive");
        a.post_send(&[
            WorkRequest::send(1, &[msg.sge_filled()]),
            WorkRequest::send(2, &[msg.sge_filled()]),
        ])
        .unwrap();
        assert_eq!(
            ids(&poll_n(&mut *a, 2)),
            vec![(1, WcStatus::Success), (2, WcStatus::RemOpErr)]
        );
        assert_eq!(
            ids(&poll_n(&mut *b, 2)),
            vec![(100, WcStatus::Success), (id, WcStatus::LocProtErr)]
        );
        assert_eq!(b.state(), QpState::Error);
    }
    e.dev.deregister(ro.lkey).unwrap();
}

#[test]
fn bad_remote_access_is_rem_access_err_and_the_responder_goes_to_error() {
    let e = env();
    let w = e.window(4096, Access::REMOTE_WRITE, 0);
    let ro = e.window(4096, Access::REMOTE_READ, 7);
    let r = w.remote();
    let src = e.slot(&pattern(64, 1));
    let sg = [src.sge_filled()];
    let res = e.empty();
    let rsg = [res.sge_range(0, 8)];
    let cases: Vec<(&str, WorkRequest<'_>)> = vec![
        (
            "unknown rkey",
            WorkRequest::one_sided(1, Opcode::RdmaWrite, &sg, r.addr, 0x7777_7777),
        ),
        (
            "past the end",
            WorkRequest::one_sided(1, Opcode::RdmaWrite, &sg, r.addr + 4096 - 63, r.rkey),
        ),
        (
            "before the start",
            WorkRequest::one_sided(1, Opcode::RdmaWrite, &sg, r.addr - 1, r.rkey),
        ),
        (
            "wrapping",
            WorkRequest::one_sided(1, Opcode::RdmaWrite, &sg, u64::MAX - 8, r.rkey),
        ),
        (
            "no remote write",
            WorkRequest::one_sided(
                1,
                Opcode::RdmaWrite,
                &sg,
                ro.remote().addr,
                ro.remote().rkey,
            ),
        ),
        (
            "no remote read",
            WorkRequest::one_sided(1, Opcode::RdmaRead, &sg, r.addr, r.rkey),
        ),
        (
            "no remote atomic",
            WorkRequest::one_sided(1, Opcode::AtomicFetchAndAdd, &rsg, r.addr, r.rkey),
        ),
        (
            "write-imm, no right",
            WorkRequest::one_sided(
                1,
                Opcode::RdmaWriteWithImm,
                &sg,
                ro.remote().addr,
                ro.remote().rkey,
            ),
        ),
    ];
    for (what, wr) in cases {
        let (mut a, mut b) = e.dev.pair(&cfg(), &cfg()).unwrap();
        let rx = e.empty();
        post_recv(&mut *b, 50, &rx);
        post_recv(&mut *b, 51, &rx);
        a.post_send(&[wr, WorkRequest::send(2, &sg)]).unwrap();
        assert_eq!(
            ids(&poll_n(&mut *a, 2)),
            vec![(1, WcStatus::RemAccessErr), (2, WcStatus::WrFlushErr)],
            "{what}"
        );
        assert_eq!(b.state(), QpState::Error, "{what}");
        let wb = poll_n(&mut *b, 2);
        if wr.opcode == Opcode::RdmaWriteWithImm {
            assert_eq!(
                ids(&wb),
                vec![(50, WcStatus::RemAccessErr), (51, WcStatus::WrFlushErr)]
            );
        } else {
            assert_eq!(
                ids(&wb),
                vec![(50, WcStatus::WrFlushErr), (51, WcStatus::WrFlushErr)],
                "{what}"
            );
        }
    }
    assert!(
        w.revoke().as_slice().iter().all(|&b| b == 0),
        "nothing was written"
    );
}

#[test]
fn requests_to_a_peer_in_error_fail_with_retry_exc_err() {
    let e = env();
    let (mut a, mut b) = e.dev.pair(&cfg(), &cfg()).unwrap();
    let w = e.window(64, Access::REMOTE_WRITE, 0);
    // Put B in error by its own local protection error.
    b.post_send(&[WorkRequest::send(1, &[Sge::new(8, 8, 0)])])
        .unwrap();
    assert_eq!(ids(&poll_n(&mut *b, 1)), vec![(1, WcStatus::LocProtErr)]);
    assert_eq!(
        a.state(),
        QpState::ReadyToSend,
        "a local error is not reported to the peer"
    );
    let src = e.slot(b"late");
    a.post_send(&[
        WorkRequest::one_sided(
            2,
            Opcode::RdmaWrite,
            &[src.sge_filled()],
            w.remote().addr,
            w.remote().rkey,
        ),
        WorkRequest::send(3, &[src.sge_filled()]),
    ])
    .unwrap();
    assert_eq!(
        ids(&poll_n(&mut *a, 2)),
        vec![(2, WcStatus::RetryExcErr), (3, WcStatus::WrFlushErr)]
    );
}

// ---------------------------------------------------------------- error state

#[test]
fn error_state_flushes_everything_and_later_posts_flush_too() {
    let e = env();
    let (mut a, _b) = e.dev.pair(&rnr_cfg(7), &cfg()).unwrap();
    let rxs: Vec<_> = (0..3).map(|_| e.empty()).collect();
    for (i, r) in rxs.iter().enumerate() {
        post_recv(&mut *a, 100 + i as u64, r);
    }
    let msg = e.slot(b"m");
    // A waits (RNR), the unsignaled one behind it too.
    a.post_send(&[
        WorkRequest::send(1, &[msg.sge_filled()]),
        WorkRequest::send(2, &[msg.sge_filled()]).with_flags(SendFlags::NONE),
    ])
    .unwrap();
    assert!(poll_now(&mut *a).is_empty());
    // Now a local protection error... behind the waiting ones; so disconnect instead.
    a.disconnect();
    a.disconnect(); // idempotent
    assert_eq!(a.state(), QpState::Error);
    let wc = poll_n(&mut *a, 5);
    assert_eq!(
        ids(&wc),
        vec![
            (1, WcStatus::WrFlushErr),
            (2, WcStatus::WrFlushErr),
            (100, WcStatus::WrFlushErr),
            (101, WcStatus::WrFlushErr),
            (102, WcStatus::WrFlushErr)
        ]
    );
    // Posting in error succeeds and flushes, signaled or not, sends and receives.
    a.post_send(&[WorkRequest::send(3, &[msg.sge_filled()]).with_flags(SendFlags::NONE)])
        .unwrap();
    post_recv(&mut *a, 103, &rxs[0]);
    assert_eq!(
        ids(&poll_n(&mut *a, 2)),
        vec![(3, WcStatus::WrFlushErr), (103, WcStatus::WrFlushErr)]
    );
    assert!(poll_now(&mut *a).is_empty());
}

#[test]
fn unsignaled_successes_complete_silently() {
    let e = env();
    let (mut a, mut b) = e.dev.pair(&cfg(), &cfg()).unwrap();
    let w = e.window(64, Access::REMOTE_WRITE, 0);
    let src = e.slot(b"abcdefgh");
    let wr = |id, off, f| {
        WorkRequest::one_sided(
            id,
            Opcode::RdmaWrite,
            &[],
            w.remote().addr + off,
            w.remote().rkey,
        )
        .with_flags(f)
    };
    let sg = [src.sge_filled()];
    a.post_send(&[
        WorkRequest {
            sg_list: &sg,
            ..wr(1, 0, SendFlags::NONE)
        },
        WorkRequest {
            sg_list: &sg,
            ..wr(2, 8, SendFlags::NONE)
        },
        WorkRequest {
            sg_list: &sg,
            ..wr(3, 16, SendFlags::SIGNALED)
        },
    ])
    .unwrap();
    assert_eq!(ids(&poll_now(&mut *a)), vec![(3, WcStatus::Success)]);
    assert!(poll_now(&mut *b).is_empty());
    assert_eq!(&w.revoke().as_slice()[..24], b"abcdefghabcdefghabcdefgh");
}

// ---------------------------------------------------------------- SRQ

#[test]
fn srq_fed_from_several_threads_serves_several_queue_pairs() {
    const SENDERS: usize = 3;
    const EACH: usize = 300;
    const POSTERS: usize = 3;
    let e = Arc::new(env_on(SoftDevice::new()));
    let srq = e.dev.create_srq(64, 1).unwrap();
    let rcfg = QpConfig {
        srq: Some(srq.clone()),
        rnr_retry: 7,
        ..cfg()
    };
    assert!(matches!(
        e.dev.pair(&rcfg, &cfg()).unwrap().0.post_recv(&[]),
        Err(e) if matches!(e.error, TransportError::InvalidArgument(_))
    ));
    // Receive buffers: one arena slot per wr_id, posted by POSTERS threads.
    let total = SENDERS * EACH;
    let buffers = Arc::new(e.pd.arena(zcmsg::ArenaConfig::new(64, 64)).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let free = Arc::new(crossbeam_queue::ArrayQueue::new(64));
    let mut slots = Vec::new();
    for i in 0..64u64 {
        let s = buffers.alloc().unwrap();
        slots.push(s);
        free.push(i).unwrap();
    }
    let sges: Arc<Vec<Sge>> = Arc::new(slots.iter().map(|s| s.sge()).collect());
    let mut posters = Vec::new();
    for _ in 0..POSTERS {
        let (srq, free, stop, sges) = (srq.clone(), free.clone(), stop.clone(), sges.clone());
        posters.push(std::thread::spawn(move || {
            let mut posted = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match free.pop() {
                    Some(i) => {
                        srq.post_recv(&[RecvRequest {
                            wr_id: i,
                            sg_list: &[sges[i as usize]],
                        }])
                        .unwrap();
                        posted += 1;
                    }
                    None => std::thread::yield_now(),
                }
            }
            posted
        }));
    }
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for t in 0..SENDERS {
        let (a, b) = e.dev.pair(&rnr_cfg(7), &rcfg).unwrap();
        receivers.push(b);
        let e = e.clone();
        let mut a = a;
        senders.push(std::thread::spawn(move || {
            for i in 0..EACH {
                let msg = e.slot(&[t as u8, (i % 251) as u8, (i / 251) as u8]);
                a.post_send(&[WorkRequest::send(i as u64, &[msg.sge_filled()])])
                    .unwrap();
                assert_eq!(poll_n(&mut *a, 1)[0].status, WcStatus::Success);
            }
            a
        }));
    }
    // Poll the receiving queue pairs, check data, recycle buffers.
    let mut seen = vec![vec![false; EACH]; SENDERS];
    let mut got = 0;
    let mut wc = [WorkCompletion::EMPTY; 8];
    let start = std::time::Instant::now();
    while got < total {
        let mut any = false;
        for b in receivers.iter_mut() {
            let n = b.poll_cq(&mut wc);
            for w in &wc[..n] {
                assert_eq!(
                    (w.status, w.byte_len, w.qp_num),
                    (WcStatus::Success, 3, b.qp_num())
                );
                let s = &mut slots[w.wr_id as usize];
                s.set_len(3);
                let d = s.as_slice();
                let (t, i) = (d[0] as usize, d[1] as usize + 251 * d[2] as usize);
                assert!(!seen[t][i], "delivered twice");
                seen[t][i] = true;
                free.push(w.wr_id).unwrap();
                got += 1;
                any = true;
            }
        }
        if !any {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "stuck at {got}/{total}"
            );
            std::thread::yield_now();
        }
    }
    let senders: Vec<_> = senders.into_iter().map(|h| h.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    let posted: u64 = posters.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(seen.iter().all(|v| v.iter().all(|&x| x)));
    assert!(posted >= total as u64);
    // Every slot comes back: dropping the receivers returns unpolled ones.
    drop(receivers);
    drop(senders);
    let soft_srq = srq.as_any().downcast_ref::<zcmsg_soft::SoftSrq>().unwrap();
    assert_eq!(soft_srq.max_wr(), 64);
    let more: Vec<_> = (0..64 - soft_srq.posted() as u64)
        .map(|i| RecvRequest {
            wr_id: 1000 + i,
            sg_list: &[],
        })
        .collect();
    srq.post_recv(&more).unwrap();
    assert!(srq
        .post_recv(&[RecvRequest {
            wr_id: 0,
            sg_list: &[]
        }])
        .is_err());
}

#[test]
fn srq_errors_complete_on_the_receiving_queue_pair_and_others_go_on() {
    let e = env();
    let srq = e.dev.create_srq(8, 2).unwrap();
    let rcfg = QpConfig {
        srq: Some(srq.clone()),
        ..cfg()
    };
    let (mut a1, mut b1) = e.dev.pair(&cfg(), &rcfg).unwrap();
    let (mut a2, mut b2) = e.dev.pair(&cfg(), &rcfg).unwrap();
    let small = e.empty();
    let rx = e.empty();
    srq.post_recv(&[
        RecvRequest {
            wr_id: 1,
            sg_list: &[small.sge_range(0, 2)],
        },
        RecvRequest {
            wr_id: 2,
            sg_list: &[rx.sge()],
        },
    ])
    .unwrap();
    let msg = e.slot(b"abc");
    a1.post_send(&[WorkRequest::send(1, &[msg.sge_filled()])])
        .unwrap();
    assert_eq!(ids(&poll_n(&mut *a1, 1)), vec![(1, WcStatus::RemInvReqErr)]);
    assert_eq!(ids(&poll_n(&mut *b1, 1)), vec![(1, WcStatus::LocLenErr)]);
    assert_eq!(b1.state(), QpState::Error);
    // The SRQ's other receive is not flushed: the other queue pair gets it.
    a2.post_send(&[WorkRequest::send(2, &[msg.sge_filled()])])
        .unwrap();
    assert_eq!(ids(&poll_n(&mut *a2, 1)), vec![(2, WcStatus::Success)]);
    assert_eq!(ids(&poll_n(&mut *b2, 1)), vec![(2, WcStatus::Success)]);
    assert!(poll_now(&mut *b1).is_empty());
}

// ---------------------------------------------------------------- counters

#[test]
fn device_copies_are_counted() {
    let e = env();
    let (mut a, mut b) = e.dev.pair(&cfg(), &cfg()).unwrap();
    let w = e.window(4096, Access::REMOTE_WRITE | Access::REMOTE_READ, 0);
    let r = w.remote();
    let s0 = e.dev.stats();
    let rx = e.empty();
    post_recv(&mut *b, 1, &rx);
    let msg = e.slot(&[5u8; 1000]);
    let tgt = e.empty();
    a.post_send(&[
        WorkRequest::send(1, &[msg.sge_filled()]),
        WorkRequest::one_sided(
            2,
            Opcode::RdmaWrite,
            &[msg.sge_range(0, 300)],
            r.addr,
            r.rkey,
        ),
        WorkRequest::one_sided(
            3,
            Opcode::RdmaRead,
            &[tgt.sge_range(0, 200)],
            r.addr,
            r.rkey,
        ),
    ])
    .unwrap();
    poll_n(&mut *a, 3);
    let d = e.dev.stats().since(&s0);
    assert_eq!((d.send_ops, d.send_bytes), (1, 1000));
    assert_eq!((d.write_ops, d.write_bytes), (1, 300));
    assert_eq!((d.read_ops, d.read_bytes), (1, 200));
    assert_eq!((d.copy_ops, d.copy_bytes), (3, 1500));
    // Counters of dropped queue pairs stay.
    drop((a, b));
    assert_eq!(e.dev.stats().since(&s0).copy_bytes, 1500);
    // The framework counted no copies of its own.
    assert_eq!(e.pd.stats().snapshot().total_bytes(), 0);
}

// ---------------------------------------------------------------- notification

#[test]
fn arm_reports_ready_or_wakes_on_the_next_completion() {
    let e = Arc::new(env());
    let (mut a, mut b) = e.dev.pair(&cfg(), &cfg()).unwrap();
    let rx = e.empty();
    post_recv(&mut *b, 1, &rx);
    let w = zcmsg::util::thread_waker();
    assert_eq!(b.arm(&w), Armed::Armed);
    let e2 = e.clone();
    let t = std::thread::spawn(move || {
        let msg = e2.slot(b"wake up");
        a.post_send(&[WorkRequest::send(1, &[msg.sge_filled()])])
            .unwrap();
        a
    });
    // The framework's wait_poll parks on arm() and is unparked by the sender.
    let mut wc = [WorkCompletion::EMPTY; 2];
    let mut n = 0;
    while n == 0 {
        n = zcmsg::transport::wait_poll(&mut *b, &mut wc, Duration::ZERO, Duration::from_secs(30));
    }
    assert_eq!(ids(&wc[..n]), vec![(1, WcStatus::Success)]);
    let mut a = t.join().unwrap();
    assert_eq!(a.arm(&w), Armed::Ready, "the send completion is waiting");
    assert_eq!(poll_now(&mut *a).len(), 1);
    assert_eq!(a.arm(&w), Armed::Armed);
}

/// Wait for a completion as a sleeping consumer does: poll, arm, park, and
/// nothing else (no spinning). Panics if a completion was waiting after
/// 2 s without a wake-up (a lost wake-up), or if nothing came at all.
fn sleep_poll(qp: &mut dyn zcmsg::QueuePair, wc: &mut [WorkCompletion]) -> usize {
    let w = zcmsg::util::thread_waker();
    loop {
        let n = qp.poll_cq(wc);
        if n > 0 {
            return n;
        }
        if qp.arm(&w) == Armed::Armed {
            let t = std::time::Instant::now();
            std::thread::park_timeout(Duration::from_secs(2));
            if t.elapsed() >= Duration::from_secs(2) {
                let n = qp.poll_cq(wc);
                assert_eq!(
                    n, 0,
                    "a completion waited 2 s with no wake-up: a lost wake-up"
                );
                panic!("nothing arrived within 2 s");
            }
        }
    }
}

/// Both sides of a ping-pong sleep between messages (`arm`, then park):
/// each one arms while the other is about to post, the race the wake-up
/// protocol must win every time (the poster reads the flag after
/// releasing its send mutex; the armer takes that mutex between setting
/// the flag and re-checking). 20,000 round trips, every message checked.
#[test]
fn a_ping_pong_of_sleepers_loses_no_wake_up() {
    const N: u64 = 20_000;
    let e = Arc::new(env());
    let (mut a, mut b) = e.dev.pair(&cfg(), &cfg()).unwrap();
    let mut ra: Vec<zcmsg::SlotMut> = (0..8).map(|_| e.empty()).collect();
    let mut rb: Vec<zcmsg::SlotMut> = (0..8).map(|_| e.empty()).collect();
    for (i, s) in ra.iter().enumerate() {
        post_recv(&mut *a, i as u64, s);
    }
    for (i, s) in rb.iter().enumerate() {
        post_recv(&mut *b, i as u64, s);
    }
    // One message for each side, with its round number in the first 8 bytes.
    let mut ma = e.slot(&[0u8; 64]);
    let mut mb = e.slot(&[0u8; 64]);
    let echo = std::thread::spawn(move || {
        let mut wc = [WorkCompletion::EMPTY; 4];
        let mut got = 0u64;
        while got < N {
            let n = sleep_poll(&mut *b, &mut wc);
            for w in &wc[..n] {
                assert_eq!(w.status, WcStatus::Success, "echo side: {w:?}");
                if !w.opcode.is_recv() {
                    continue;
                }
                let r = &mut rb[w.wr_id as usize];
                r.set_len(8);
                let round = u64::from_le_bytes(r.as_slice().try_into().unwrap());
                assert_eq!(round, got, "echo side: message out of order");
                got += 1;
                post_recv(&mut *b, w.wr_id, r);
                mb.as_mut_slice()[..8].copy_from_slice(&round.to_le_bytes());
                b.post_send(&[WorkRequest::send(round, &[mb.sge_filled()])])
                    .unwrap();
            }
        }
        (b, rb, mb)
    });
    let mut wc = [WorkCompletion::EMPTY; 4];
    for round in 0..N {
        ma.as_mut_slice()[..8].copy_from_slice(&round.to_le_bytes());
        a.post_send(&[WorkRequest::send(round, &[ma.sge_filled()])])
            .unwrap();
        let mut echoed = false;
        while !echoed {
            let n = sleep_poll(&mut *a, &mut wc);
            for w in &wc[..n] {
                assert_eq!(w.status, WcStatus::Success, "first side: {w:?}");
                if w.opcode.is_recv() {
                    let r = &mut ra[w.wr_id as usize];
                    r.set_len(8);
                    let back = u64::from_le_bytes(r.as_slice().try_into().unwrap());
                    assert_eq!(back, round, "the echo of round {round}");
                    post_recv(&mut *a, w.wr_id, r);
                    echoed = true;
                }
            }
        }
    }
    let _ = echo.join().expect("the echo side");
}

// ---------------------------------------------------------------- teardown

#[test]
fn dropping_a_queue_pair_fails_the_peers_outstanding_work() {
    let e = env();
    let (mut a, b) = e.dev.pair(&rnr_cfg(7), &cfg()).unwrap();
    let rx = e.empty();
    post_recv(&mut *a, 9, &rx);
    let msg = e.slot(b"in flight");
    let w = e.window(64, Access::REMOTE_WRITE, 0);
    a.post_send(&[
        WorkRequest::send(1, &[msg.sge_filled()]),
        WorkRequest::one_sided(
            2,
            Opcode::RdmaWrite,
            &[msg.sge_filled()],
            w.remote().addr,
            w.remote().rkey,
        ),
    ])
    .unwrap();
    assert!(soft(&*a).rnr_waiting());
    let flag = Arc::new(AtomicU64::new(0));
    struct Count(Arc<AtomicU64>);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let waker = Waker::from(Arc::new(Count(flag.clone())));
    assert_eq!(a.arm(&waker), Armed::Armed);
    drop(b);
    assert!(flag.load(Ordering::SeqCst) >= 1, "the peer's drop woke us");
    assert_eq!(a.state(), QpState::Error);
    assert_eq!(
        ids(&poll_n(&mut *a, 3)),
        vec![
            (1, WcStatus::RetryExcErr),
            (2, WcStatus::WrFlushErr),
            (9, WcStatus::WrFlushErr)
        ]
    );
    a.post_send(&[WorkRequest::send(3, &[msg.sge_filled()])])
        .unwrap();
    assert_eq!(ids(&poll_n(&mut *a, 1)), vec![(3, WcStatus::WrFlushErr)]);
    assert!(w.revoke().as_slice().iter().all(|&b| b == 0));
}

/// A SEND waiting for a receive when the peer disconnects: arming
/// afterwards reports it ready (the request has failed, `RetryExcErr`)
/// instead of sleeping until the RNR timer next looks at it.
#[test]
fn arming_after_the_peer_disconnected_under_a_waiting_send_is_ready() {
    let e = env();
    let (mut a, mut b) = e.dev.pair(&rnr_cfg(7), &cfg()).unwrap();
    let msg = e.slot(b"waits");
    a.post_send(&[WorkRequest::send(1, &[msg.sge_filled()])])
        .unwrap();
    assert!(soft(&*a).rnr_waiting());
    b.disconnect();
    let w = zcmsg::util::thread_waker();
    assert_eq!(a.arm(&w), Armed::Ready, "the waiting SEND has failed");
    assert_eq!(ids(&poll_n(&mut *a, 1)), vec![(1, WcStatus::RetryExcErr)]);
}

#[test]
fn disconnect_is_seen_by_the_peer_like_a_drop() {
    let e = env();
    let (mut a, mut b) = e.dev.pair(&cfg(), &cfg()).unwrap();
    let rx = e.empty();
    post_recv(&mut *b, 4, &rx);
    b.disconnect();
    assert_eq!((a.state(), b.state()), (QpState::Error, QpState::Error));
    let msg = e.slot(b"x");
    a.post_send(&[WorkRequest::send(1, &[msg.sge_filled()])])
        .unwrap();
    assert_eq!(ids(&poll_n(&mut *a, 1)), vec![(1, WcStatus::WrFlushErr)]);
    assert_eq!(ids(&poll_n(&mut *b, 1)), vec![(4, WcStatus::WrFlushErr)]);
}

#[test]
fn dropping_the_peer_while_its_partner_hammers_it_from_another_thread() {
    let e = Arc::new(env());
    for round in 0..20 {
        let (mut a, mut b) = e.dev.pair(&rnr_cfg(7), &cfg()).unwrap();
        let rxs: Vec<_> = (0..32).map(|_| e.empty()).collect();
        for (i, r) in rxs.iter().enumerate() {
            post_recv(&mut *b, i as u64, r);
        }
        let e2 = e.clone();
        let t = std::thread::spawn(move || {
            let msg = e2.slot(&pattern(512, 1));
            let (mut ok, mut failed, mut flushed) = (0u64, 0u64, 0u64);
            let mut posted = 0u64;
            while failed + flushed == 0 || posted < 8 {
                if a.post_send(&[WorkRequest::send(posted, &[msg.sge_filled()])])
                    .is_ok()
                {
                    posted += 1;
                }
                for w in poll_now(&mut *a) {
                    match w.status {
                        WcStatus::Success => ok += 1,
                        WcStatus::WrFlushErr => flushed += 1,
                        _ => failed += 1,
                    }
                }
            }
            // Every posted request completes exactly once.
            let mut wc = poll_now(&mut *a);
            while ok + failed + flushed + (wc.len() as u64) < posted {
                wc.extend(poll_now(&mut *a));
                std::thread::yield_now();
            }
            ok += wc.iter().filter(|w| w.status.is_ok()).count() as u64;
            assert_eq!(a.state(), QpState::Error);
            ok
        });
        // Let some messages land, then drop the receiver mid-stream.
        let got = poll_n(&mut *b, 1 + round % 8);
        assert!(got.iter().all(|w| w.status == WcStatus::Success));
        drop(b);
        let ok = t.join().unwrap();
        assert!(ok <= 32);
        drop(rxs);
    }
}

#[test]
fn after_deregister_returns_the_device_never_touches_the_region() {
    let (ea, eb) = (Arc::new(env()), env());
    for _ in 0..5 {
        let win = eb.window(1 << 16, Access::REMOTE_WRITE, 0);
        let r = win.remote();
        let (mut a, b) = SoftDevice::connect_pair(&ea.dev, &eb.dev, &cfg(), &cfg()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, ea2) = (stop.clone(), ea.clone());
        let t = std::thread::spawn(move || {
            let mut n = 0u64;
            let srcs: Vec<_> = (0..8).map(|i| ea2.slot(&[i as u8 + 1; 4096])).collect();
            loop {
                let s = &srcs[(n % 8) as usize];
                let sg: Vec<Sge> = (0..8).map(|_| s.sge_filled()).collect();
                // Writes of 32 KiB into the window, over and over.
                a.post_send(&[WorkRequest::one_sided(
                    n,
                    Opcode::RdmaWrite,
                    &sg[..8],
                    r.addr + (n % 2) * 32768,
                    r.rkey,
                )])
                .unwrap();
                let w = poll_n(&mut *a, 1)[0];
                n += 1;
                if w.status != WcStatus::Success {
                    assert_eq!(w.status, WcStatus::RemAccessErr);
                    return n;
                }
                if stop2.load(Ordering::Relaxed) {
                    return n;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(2));
        let revoked = win.revoke();
        let first = revoked.as_slice().to_vec();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            revoked.as_slice(),
            &first[..],
            "written after deregister returned"
        );
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        drop(b);
    }
}

#[test]
fn a_receive_polled_during_the_senders_post_list_can_be_reposted_at_once() {
    // Completions become visible slot by slot while the sender is still
    // executing its post list; the receiver reposting each one at once must
    // find room (every polled receive was consumed), never QueueFull.
    const DEPTH: u32 = 16;
    const TOTAL: u64 = 20_000;
    let e = Arc::new(env());
    let c = QpConfig {
        max_recv_wr: DEPTH,
        ..cfg()
    };
    let (mut a, mut b) = e.dev.pair(&cfg(), &c).unwrap();
    let reposted = Arc::new(AtomicU64::new(0));
    let (e2, reposted2) = (e.clone(), reposted.clone());
    let receiver = std::thread::spawn(move || {
        let slots: Vec<_> = (0..DEPTH).map(|_| e2.empty()).collect();
        for (i, s) in slots.iter().enumerate() {
            post_recv(&mut *b, i as u64, s);
        }
        let mut got = 0u64;
        let mut wc = [WorkCompletion::EMPTY; 16];
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while got < TOTAL {
            let n = b.poll_cq(&mut wc);
            for w in &wc[..n] {
                assert_eq!((w.status, w.byte_len), (WcStatus::Success, 64), "{w:?}");
                let s = &slots[w.wr_id as usize];
                b.post_recv(&[RecvRequest {
                    wr_id: w.wr_id,
                    sg_list: &[s.sge()],
                }])
                .unwrap_or_else(|err| panic!("repost after {got} messages: {err}"));
                got += 1;
                reposted2.store(got, Ordering::Release);
            }
            assert!(std::time::Instant::now() < deadline, "got {got} of {TOTAL}");
        }
    });
    let msg = e.slot(&pattern(64, 9));
    let sge = [msg.sge_filled()];
    let mut posted = 0u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while posted < TOTAL && !receiver.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "posted {posted} of {TOTAL}"
        );
        let room = u64::from(DEPTH) + reposted.load(Ordering::Acquire) - posted;
        let k = room.min(16).min(TOTAL - posted);
        if k > 0 {
            let wrs: Vec<_> = (0..k)
                .map(|i| {
                    let wr = WorkRequest::send(posted + i, &sge);
                    if i == k - 1 {
                        wr.with_flags(SendFlags::SIGNALED)
                    } else {
                        wr.with_flags(SendFlags::NONE)
                    }
                })
                .collect();
            a.post_send(&wrs).unwrap();
            posted += k;
        }
        for w in poll_now(&mut *a) {
            assert_eq!(w.status, WcStatus::Success, "{w:?}");
        }
    }
    receiver.join().unwrap();
}

#[test]
fn dropped_devices_and_queue_pairs_leave_nothing_registered() {
    let e = env();
    let before = e.dev.registrations();
    {
        let _w = e.window(4096, Access::REMOTE_WRITE, 0);
        let (_a, _b) = e.dev.pair(&cfg(), &cfg()).unwrap();
        assert_eq!(e.dev.registrations(), before + 1);
    }
    assert_eq!(e.dev.registrations(), before);
    let weak = Arc::downgrade(&e.dev);
    drop(e);
    assert!(
        weak.upgrade().is_none(),
        "no queue pair or listener keeps the device"
    );
}

#[test]
fn a_receive_in_memory_registered_while_the_sender_executes_is_found() {
    // The sender keeps retrying a waiting SEND (its execution loads the
    // region tables), while the receiver registers fresh memory and posts a
    // receive in it at once: the receive must be usable, as on hardware,
    // where a registration is complete when the call returns.
    const ROUNDS: u64 = 300;
    let e = Arc::new(env());
    let (mut a, mut b) = e.dev.pair(&rnr_cfg(7), &cfg()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (e2, stop2) = (e.clone(), stop.clone());
    let sender = std::thread::spawn(move || {
        let msg = e2.slot(&pattern(64, 3));
        let mut done = 0u64;
        a.post_send(&[WorkRequest::send(0, &[msg.sge_filled()])])
            .unwrap();
        while !stop2.load(Ordering::Relaxed) {
            for w in poll_now(&mut *a) {
                assert_eq!(w.status, WcStatus::Success, "{w:?}");
                done += 1;
                a.post_send(&[WorkRequest::send(done, &[msg.sge_filled()])])
                    .unwrap();
            }
        }
        done
    });
    for i in 0..ROUNDS {
        let w = e.window(64, Access::LOCAL_WRITE, 0);
        let sge = w.sge(0, 64);
        b.post_recv(&[RecvRequest {
            wr_id: i,
            sg_list: &[sge],
        }])
        .unwrap();
        let wc = poll_n(&mut *b, 1)[0];
        assert_eq!((wc.wr_id, wc.status), (i, WcStatus::Success), "round {i}");
        assert_eq!(&w.revoke().as_slice()[..64], &pattern(64, 3)[..]);
    }
    stop.store(true, Ordering::Relaxed);
    assert!(sender.join().unwrap() >= ROUNDS - 1);
}
