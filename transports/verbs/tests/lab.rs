//! Device tests: they need a real RDMA device and run inside the Soft-RoCE
//! lab guest (`deploy/lab/`), where a missing device is a failure:
//!
//! ```text
//! ZCMSG_LAB=1 ZCMSG_LAB_DEVICE=rxe0 ZCMSG_LAB_ADDR=192.0.2.1 \
//!     lab-<hash> --include-ignored --test-threads=1
//! ```
//!
//! Every connection is a loopback through rdma_cm on `ZCMSG_LAB_ADDR`, with
//! two devices opened in this process (two "hosts" on the same rxe device).

mod common;
use common::logs;

use std::sync::Arc;

use bytes::BufMut;
use std::thread;
use std::time::{Duration, Instant};

use zcmsg::mem::sys::{has_cap_ipc_lock, memlock_limit, HugePages, Mapping};
use zcmsg::transport::wait_poll;
use zcmsg::{
    Access, AddressSpace, ArenaConfig, Opcode, Pd, QpConfig, QpState, QueuePair, RecvRequest,
    RegionMemory, SendFlags, Sge, Transport, TransportError, WcOpcode, WcStatus, WorkCompletion,
    WorkRequest,
};
use zcmsg_verbs::{VerbsConfig, VerbsDevice, VerbsQp};

const LAB: &str = "needs the Soft-RoCE lab";

fn lab_device() -> String {
    std::env::var("ZCMSG_LAB_DEVICE").unwrap_or_else(|_| "rxe0".into())
}

fn lab_addr() -> String {
    std::env::var("ZCMSG_LAB_ADDR").unwrap_or_else(|_| "192.0.2.1".into())
}

fn open(space: AddressSpace) -> Arc<VerbsDevice> {
    logs();
    let cfg = VerbsConfig {
        address_space: Some(space),
        ..VerbsConfig::default()
    };
    let name = lab_device();
    VerbsDevice::open(Some(&name), &cfg).unwrap_or_else(|e| {
        panic!(
            "opening {name} (ZCMSG_LAB={:?}): {e}",
            std::env::var("ZCMSG_LAB").ok()
        )
    })
}

const T: Duration = Duration::from_secs(20);

/// Wait for the next completion.
fn next(qp: &mut dyn QueuePair, what: &str) -> WorkCompletion {
    let mut wc = [WorkCompletion::EMPTY; 1];
    let n = wait_poll(qp, &mut wc, Duration::from_micros(50), T);
    assert_eq!(
        n,
        1,
        "no completion within {T:?} for {what} (state {:?})",
        qp.state()
    );
    wc[0]
}

fn ok(wc: WorkCompletion, wr_id: u64, op: WcOpcode, what: &str) {
    assert!(
        wc.wr_id == wr_id && wc.status == WcStatus::Success && wc.opcode == op,
        "{what}: expected a successful {op:?} of wr_id {wr_id}, got {wc:?}"
    );
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// Two devices ("hosts"), a connected pair: `a` connected to `b`'s listener.
struct Pair {
    qa: Box<dyn QueuePair>,
    qb: Box<dyn QueuePair>,
    a: Arc<VerbsDevice>,
    b: Arc<VerbsDevice>,
}

fn pair(space: AddressSpace, cfg: &QpConfig) -> Pair {
    let a = open(space);
    let b = open(space);
    let mut l = b
        .listen(&format!("{}:0", lab_addr()), cfg)
        .unwrap_or_else(|e| panic!("listen on {}:0: {e}", lab_addr()));
    let target = l.local_addr();
    assert!(
        !target.ends_with(":0"),
        "listener did not report its port: {target}"
    );
    let acc = thread::spawn(move || l.accept(T));
    let pdata: Vec<u8> = (1..=50u8).collect();
    let qa = a
        .connect(&target, cfg, &pdata)
        .unwrap_or_else(|e| panic!("connect to {target}: {e}"));
    let (qb, got) = acc.join().expect("accept thread").expect("accept");
    assert_eq!(&got[..pdata.len()], &pdata[..], "private data arrives");
    assert!(
        got.len() <= 56 && got[pdata.len()..].iter().all(|&b| b == 0),
        "{got:?}"
    );
    Pair { qa, qb, a, b }
}

fn gid_of(qp: &dyn QueuePair) -> zcmsg_verbs::GidInfo {
    let v = qp
        .as_any()
        .downcast_ref::<VerbsQp>()
        .expect("a verbs queue pair");
    v.gid().cloned().expect("the GID was read back")
}

#[test]
#[ignore = "needs the Soft-RoCE lab"]
fn open_and_print_caps() {
    let _ = LAB;
    let names = zcmsg_verbs::list_devices().expect("list_devices in the lab");
    assert!(names.contains(&lab_device()), "{names:?}");
    for space in [AddressSpace::Cpu, AddressSpace::Iova] {
        let d = open(space);
        let c = d.caps();
        eprintln!("{}: {c:#?} fork={:?}", d.name(), d.fork_status());
        assert_eq!(c.name, lab_device());
        assert_eq!(c.address_space, space);
        assert!(c.max_send_sge >= 1 && c.max_recv_sge >= 1 && c.max_sge_rd >= 1);
        assert!(c.max_qp_wr >= 256);
        assert!(c.max_msg_sz >= 1 << 20);
        assert!(c.max_inline_data > 0, "rxe grants inline data");
        assert!(c.atomics, "rxe supports atomics");
        assert!(c.srq);
        assert!(d.max_qp_init_rd_atom() > 0);
        assert!(d.is_roce());
        eprintln!("implicit ODP reported: {}", c.implicit_odp);
    }
}

#[test]
#[ignore = "needs the Soft-RoCE lab"]
fn register_in_both_address_spaces() {
    let page = zcmsg::mem::sys::page_size() as u64;
    for space in [AddressSpace::Cpu, AddressSpace::Iova] {
        let d = open(space);
        let m: Arc<dyn RegionMemory> =
            Arc::new(Mapping::new(1 << 20, HugePages::Never, None).unwrap());
        let base = m.as_ptr() as u64;
        assert_eq!(base % page, 0, "page-aligned arena");
        let r1 = d
            .register(m.clone(), Access::LOCAL_WRITE | Access::REMOTE_READ)
            .unwrap();
        let r2 = d
            .register_range(
                m.clone(),
                100,
                4096,
                Access::LOCAL_WRITE | Access::REMOTE_WRITE,
            )
            .unwrap();
        let r3 = d
            .register_range(m.clone(), 8192, 8192, Access::REMOTE_ATOMIC)
            .unwrap();
        eprintln!("{space:?}: {r1:?} {r2:?} {r3:?}");
        for r in [r1, r2, r3] {
            assert_ne!(r.lkey, 0);
            assert_ne!(r.rkey, 0);
        }
        assert_ne!(r1.lkey, r2.lkey);
        assert_ne!(r2.lkey, r3.lkey);
        match space {
            AddressSpace::Cpu => {
                assert_eq!(r1.iova, base);
                assert_eq!(r2.iova, base + 100);
                assert_eq!(r3.iova, base + 8192);
            }
            AddressSpace::Iova => {
                // Region-relative: the in-page offset of the first byte.
                assert_eq!(r1.iova, 0);
                assert_eq!(r2.iova, 100);
                assert_eq!(r3.iova, 0);
            }
        }
        assert_eq!(d.registrations(), 3);
        assert!(matches!(
            d.register_range(m.clone(), (1 << 20) - 10, 20, Access::LOCAL_WRITE),
            Err(TransportError::InvalidArgument(_))
        ));
        for r in [r1, r2, r3] {
            d.deregister(r.lkey).unwrap();
        }
        assert!(matches!(
            d.deregister(r1.lkey),
            Err(TransportError::InvalidArgument(_))
        ));
        assert_eq!(d.registrations(), 0);
        assert_eq!(Arc::strong_count(&m), 1, "the device let go of the memory");
        // Through the framework: an arena is one registration.
        let pd = Pd::new(d.clone());
        let arena = pd.arena(ArenaConfig::new(4096, 8)).unwrap();
        assert_eq!(d.registrations(), 1);
        assert_eq!(arena.registration().lkey, arena.lkey());
    }
}

/// Set the soft `RLIMIT_MEMLOCK` (the hard limit stays), returning the old soft limit.
fn set_memlock_soft(v: libc::rlim_t) -> libc::rlim_t {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one `rlimit`.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r), 0);
        let old = r.rlim_cur;
        r.rlim_cur = v.min(r.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_MEMLOCK, &r), 0);
        old
    }
}

#[test]
#[ignore = "needs the Soft-RoCE lab"]
fn memlock_is_checked_and_cap_ipc_lock_honoured() {
    let cap = has_cap_ipc_lock();
    eprintln!("CAP_IPC_LOCK: {cap}, RLIMIT_MEMLOCK: {:?}", memlock_limit());
    assert!(cap, "the lab runs as root with CAP_IPC_LOCK");
    let d = open(AddressSpace::Iova);
    // The guest's default: 8 MiB. Registering 64 MiB must still work, both in
    // zcmsg's accounting and in the kernel, because of CAP_IPC_LOCK.
    let old = set_memlock_soft(8 << 20);
    assert_eq!(memlock_limit(), Some(8 << 20));
    let len = 64 << 20;
    let m: Arc<dyn RegionMemory> = Arc::new(Mapping::new(len, HugePages::Never, None).unwrap());
    let r = d.register(m, Access::LOCAL_WRITE);
    set_memlock_soft(old);
    let r = r.unwrap_or_else(|e| {
        panic!("registering {len} bytes with CAP_IPC_LOCK over an 8 MiB limit: {e}")
    });
    d.deregister(r.lkey).unwrap();
}

fn exercise(space: AddressSpace) {
    let cfg = QpConfig {
        connect_timeout: T,
        ..QpConfig::default()
    };
    let mut p = pair(space, &cfg);
    for qp in [&*p.qa, &*p.qb] {
        let g = gid_of(qp);
        eprintln!("{space:?}: qp {} uses {g:?}", qp.qp_num());
        assert!(g.is_roce_v2(), "the lab connection uses RoCE v2: {g:?}");
    }
    assert_eq!(p.qa.state(), QpState::ReadyToSend);
    let pa = Pd::new(p.a.clone());
    let pb = Pd::new(p.b.clone());
    let sa = pa.arena(ArenaConfig::new(64 << 10, 32)).unwrap();
    let rb = pb.arena(ArenaConfig::new(64 << 10, 32)).unwrap();

    // SEND / RECV, with and without immediate, several sizes.
    let sizes = [1usize, 63, 4096, 5000, 64 << 10];
    let mut recvs = Vec::new();
    for (i, _) in sizes.iter().enumerate() {
        let mut s = rb.alloc().unwrap();
        let cap = s.capacity();
        s.set_len(cap);
        s.as_mut_slice().fill(0xEE);
        p.qb.post_recv(&[RecvRequest {
            wr_id: 100 + i as u64,
            sg_list: &[s.sge()],
        }])
        .unwrap();
        recvs.push(s);
    }
    for (i, &len) in sizes.iter().enumerate() {
        let mut s = sa.alloc().unwrap();
        s.put_slice(&pattern(i as u8, len));
        let sg = [s.sge_filled()];
        let wr = if i % 2 == 1 {
            WorkRequest {
                opcode: Opcode::SendWithImm,
                ..WorkRequest::send(i as u64, &sg)
            }
            .with_imm(0xdead_0000 + i as u32)
        } else {
            WorkRequest::send(i as u64, &sg)
        };
        p.qa.post_send(&[wr]).unwrap();
        ok(next(&mut *p.qa, "SEND"), i as u64, WcOpcode::Send, "sender");
        let wc = next(&mut *p.qb, "RECV");
        ok(wc, 100 + i as u64, WcOpcode::Recv, "receiver");
        assert_eq!(wc.byte_len as usize, len);
        assert_eq!(wc.qp_num, p.qb.qp_num());
        assert_eq!(wc.imm_data, (i % 2 == 1).then_some(0xdead_0000 + i as u32));
        let r = &recvs[i];
        assert_eq!(
            &r.as_slice()[..len],
            &pattern(i as u8, len)[..],
            "SEND payload {i}"
        );
        assert!(
            r.as_slice()[len..].iter().all(|&b| b == 0xEE),
            "bytes past the message"
        );
    }

    // Inline SEND from a registered slot, overwritten right after the post
    // (in the IOVA space the transport translates the SGE to the CPU address
    // the provider copies from).
    let m = p.qa.caps().max_inline_data as usize;
    assert!(m > 0);
    let mut r = rb.alloc().unwrap();
    let rcap = r.capacity();
    r.set_len(rcap);
    p.qb.post_recv(&[RecvRequest {
        wr_id: 7,
        sg_list: &[r.sge()],
    }])
    .unwrap();
    let mut src = sa.alloc().unwrap();
    src.put_slice(&pattern(77, m));
    p.qa.post_send(&[WorkRequest::send(70, &[src.sge_filled()])
        .with_flags(SendFlags::SIGNALED | SendFlags::INLINE)])
        .unwrap();
    src.as_mut_slice().fill(0);
    ok(
        next(&mut *p.qa, "inline SEND"),
        70,
        WcOpcode::Send,
        "inline sender",
    );
    let wc = next(&mut *p.qb, "inline RECV");
    ok(wc, 7, WcOpcode::Recv, "inline receiver");
    assert_eq!(&r.as_slice()[..m], &pattern(77, m)[..], "inline payload");
    let mut big = sa.alloc().unwrap();
    big.put_slice(&pattern(1, m + 1));
    let e =
        p.qa.post_send(&[WorkRequest::send(71, &[big.sge_filled()])
            .with_flags(SendFlags::SIGNALED | SendFlags::INLINE)])
            .unwrap_err();
    assert_eq!(e.index, 0);
    assert!(
        matches!(e.error, TransportError::InlineTooLarge { .. }),
        "{e}"
    );
    // Inline data from unregistered memory is refused at post time: the
    // provider would read any address it is given.
    let mut r72 = rb.alloc().unwrap();
    let r72cap = r72.capacity();
    r72.set_len(r72cap);
    p.qb.post_recv(&[RecvRequest {
        wr_id: 72,
        sg_list: &[r72.sge()],
    }])
    .unwrap();
    let stack = [1u8; 8];
    let e =
        p.qa.post_send(&[
            WorkRequest::send(72, &[src.sge_range(0, 8)]).with_flags(SendFlags::INLINE),
            WorkRequest::send(73, &[Sge::new(stack.as_ptr() as u64, 8, 0)])
                .with_flags(SendFlags::SIGNALED | SendFlags::INLINE),
        ])
        .unwrap_err();
    assert_eq!(e.index, 1, "{e}");
    assert!(matches!(e.error, TransportError::InvalidArgument(_)), "{e}");
    ok(
        next(&mut *p.qb, "the valid inline SEND before the refused one"),
        72,
        WcOpcode::Recv,
        "inline before refusal",
    );

    // RDMA WRITE into a window, selective signaling, one post list.
    let win = pb
        .window(256 << 10, Access::REMOTE_WRITE | Access::REMOTE_READ)
        .unwrap();
    let rr = win.remote();
    let srcs: Vec<_> = (0..4)
        .map(|i| {
            let mut s = sa.alloc().unwrap();
            s.put_slice(&pattern(40 + i as u8, 10_000 + i));
            s
        })
        .collect();
    let sges: Vec<[Sge; 1]> = srcs.iter().map(|s| [s.sge_filled()]).collect();
    let offs = [0u64, 3, 65_536 + 1, 200_000];
    let wrs: Vec<WorkRequest<'_>> = sges
        .iter()
        .enumerate()
        .map(|(i, sg)| {
            WorkRequest::one_sided(
                200 + i as u64,
                Opcode::RdmaWrite,
                sg,
                rr.addr + offs[i],
                rr.rkey,
            )
            .with_flags(if i == 3 {
                SendFlags::SIGNALED
            } else {
                SendFlags::NONE
            })
        })
        .collect();
    p.qa.post_send(&wrs).unwrap();
    ok(
        next(&mut *p.qa, "WRITE list"),
        203,
        WcOpcode::RdmaWrite,
        "last WRITE",
    );
    drop(wrs);

    // RDMA READ back what was written, into a local slot.
    let mut dst = sa.alloc().unwrap();
    let dcap = dst.capacity();
    dst.set_len(dcap);
    dst.as_mut_slice().fill(0xAB);
    p.qa.post_send(&[WorkRequest::one_sided(
        300,
        Opcode::RdmaRead,
        &[dst.sge_range(0, 10_001)],
        rr.addr + offs[1],
        rr.rkey,
    )])
    .unwrap();
    let wc = next(&mut *p.qa, "READ");
    ok(wc, 300, WcOpcode::RdmaRead, "READ");
    assert_eq!(wc.byte_len, 10_001);
    assert_eq!(
        &dst.as_slice()[..10_001],
        &pattern(41, 10_001)[..],
        "READ data"
    );
    assert!(dst.as_slice()[10_001..].iter().all(|&b| b == 0xAB));

    // READ from a peer's registered arena (remote read on an arena).
    let src_arena = pb
        .arena(ArenaConfig {
            access: Access::REMOTE_READ,
            ..ArenaConfig::new(64 << 10, 1)
        })
        .unwrap();
    let mut s = src_arena.alloc().unwrap();
    s.put_slice(&pattern(99, 64 << 10));
    let src = s.freeze();
    let reg = src_arena.registration();
    let raddr = reg.iova + (src.as_ptr() as u64 - src_arena.base());
    let mut dst2 = sa.alloc().unwrap();
    let d2cap = dst2.capacity();
    dst2.set_len(d2cap);
    p.qa.post_send(&[WorkRequest::one_sided(
        301,
        Opcode::RdmaRead,
        &[dst2.sge_range(0, 64 << 10)],
        raddr,
        reg.rkey,
    )])
    .unwrap();
    ok(
        next(&mut *p.qa, "READ of an arena"),
        301,
        WcOpcode::RdmaRead,
        "READ arena",
    );
    assert_eq!(dst2.as_slice(), &src[..]);

    // WRITE_WITH_IMM consumes a receive and leaves its buffer alone.
    let mut r2 = rb.alloc().unwrap();
    let r2cap = r2.capacity();
    r2.set_len(r2cap);
    r2.as_mut_slice().fill(0x11);
    p.qb.post_recv(&[RecvRequest {
        wr_id: 8,
        sg_list: &[r2.sge()],
    }])
    .unwrap();
    let mut s = sa.alloc().unwrap();
    s.put_slice(&pattern(5, 1000));
    p.qa.post_send(&[WorkRequest::one_sided(
        400,
        Opcode::RdmaWriteWithImm,
        &[s.sge_filled()],
        rr.addr + 100_000,
        rr.rkey,
    )
    .with_imm(0xCAFE)])
        .unwrap();
    ok(
        next(&mut *p.qa, "WRITE_WITH_IMM"),
        400,
        WcOpcode::RdmaWrite,
        "WRITE_WITH_IMM",
    );
    let wc = next(&mut *p.qb, "RECV of WRITE_WITH_IMM");
    ok(
        wc,
        8,
        WcOpcode::RecvRdmaWithImm,
        "receiver of WRITE_WITH_IMM",
    );
    assert_eq!((wc.byte_len, wc.imm_data), (1000, Some(0xCAFE)));
    assert!(r2.as_slice().iter().all(|&b| b == 0x11));

    let got = win.revoke();
    let mut want = vec![0u8; 256 << 10];
    for (i, &o) in offs.iter().enumerate() {
        let o = o as usize;
        want[o..o + 10_000 + i].copy_from_slice(&pattern(40 + i as u8, 10_000 + i));
    }
    want[100_000..101_000].copy_from_slice(&pattern(5, 1000));
    assert!(got.as_slice() == &want[..], "window after WRITEs differs");

    // Atomics on an 8-byte aligned window.
    let mut aw = pb.window(64, Access::REMOTE_ATOMIC).unwrap();
    aw.fill(0);
    let ar = aw.remote();
    let mut res = sa.alloc().unwrap();
    let rescap = res.capacity();
    res.set_len(rescap);
    res.as_mut_slice().fill(0xEE);
    // (opcode, word offset, compare or addend, swap)
    let steps = [
        (Opcode::AtomicFetchAndAdd, 0u64, 5u64, 0u64),
        (Opcode::AtomicFetchAndAdd, 0, u64::MAX, 0), // 5 + MAX wraps to 4
        (Opcode::AtomicCmpAndSwp, 0, 4, 0x1234),     // match: old 4, new 0x1234
        (Opcode::AtomicCmpAndSwp, 0, 4, 0x9999),     // no match: old 0x1234
        (Opcode::AtomicCmpAndSwp, 8, 0, 42),         // word 1: old 0
    ];
    let olds = [0u64, 5, 4, 0x1234, 0];
    for (i, &(op, word_off, cmp_add, swap)) in steps.iter().enumerate() {
        let sg = [res.sge_range(i * 8, 8)];
        let wr = WorkRequest::one_sided(500 + i as u64, op, &sg, ar.addr + word_off, ar.rkey)
            .with_atomic(cmp_add, swap);
        p.qa.post_send(&[wr]).unwrap();
        let want_op = if op == Opcode::AtomicFetchAndAdd {
            WcOpcode::FetchAdd
        } else {
            WcOpcode::CompSwap
        };
        ok(
            next(&mut *p.qa, "atomic"),
            500 + i as u64,
            want_op,
            "atomic",
        );
        let old = u64::from_ne_bytes(res.as_slice()[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(old, olds[i], "old value of atomic step {i}");
    }
    let words = aw.revoke();
    let w0 = u64::from_ne_bytes(words.as_slice()[..8].try_into().unwrap());
    let w1 = u64::from_ne_bytes(words.as_slice()[8..16].try_into().unwrap());
    assert_eq!((w0, w1), (0x1234, 42));

    // A bad rkey: remote access error, the QP goes to error, later requests flush.
    let mut s = sa.alloc().unwrap();
    s.put_slice(b"x");
    let bad = rr.rkey ^ 0x00ff_ff00;
    p.qa.post_send(&[
        WorkRequest::one_sided(600, Opcode::RdmaWrite, &[s.sge_filled()], rr.addr, bad),
        WorkRequest::send(601, &[s.sge_filled()]),
    ])
    .unwrap();
    let wc = next(&mut *p.qa, "WRITE with a bad rkey");
    assert_eq!(
        (wc.wr_id, wc.status),
        (600, WcStatus::RemAccessErr),
        "{wc:?}"
    );
    let wc = next(&mut *p.qa, "flush");
    assert_eq!((wc.wr_id, wc.status), (601, WcStatus::WrFlushErr), "{wc:?}");
    assert_eq!(p.qa.state(), QpState::Error);

    // The peer learns: its posted receive flushes and its state is Error.
    let mut r3 = rb.alloc().unwrap();
    let r3cap = r3.capacity();
    r3.set_len(r3cap);
    let _ = p.qb.post_recv(&[RecvRequest {
        wr_id: 9,
        sg_list: &[r3.sge()],
    }]);
    p.qa.disconnect();
    let deadline = Instant::now() + T;
    let mut flushed = false;
    while Instant::now() < deadline {
        let mut wc = [WorkCompletion::EMPTY; 4];
        let n = wait_poll(
            &mut *p.qb,
            &mut wc,
            Duration::from_micros(50),
            Duration::from_millis(200),
        );
        if wc[..n]
            .iter()
            .any(|w| w.wr_id == 9 && w.status == WcStatus::WrFlushErr)
        {
            flushed = true;
            break;
        }
    }
    assert!(
        flushed,
        "the peer's receive was flushed after the disconnect"
    );
    assert_eq!(p.qb.state(), QpState::Error);
}

#[test]
#[ignore = "needs the Soft-RoCE lab"]
fn send_write_read_atomics_cpu_addresses() {
    exercise(AddressSpace::Cpu);
}

#[test]
#[ignore = "needs the Soft-RoCE lab"]
fn send_write_read_atomics_iova() {
    exercise(AddressSpace::Iova);
}

#[test]
#[ignore = "needs the Soft-RoCE lab"]
fn sleeping_wait_is_woken_by_the_completion_channel() {
    let cfg = QpConfig {
        connect_timeout: T,
        ..QpConfig::default()
    };
    let mut p = pair(AddressSpace::Iova, &cfg);
    let pb = Pd::new(p.b.clone());
    let pa = Pd::new(p.a.clone());
    let rb = pb.arena(ArenaConfig::new(4096, 4)).unwrap();
    let sa = pa.arena(ArenaConfig::new(4096, 4)).unwrap();
    let r = rb.alloc().unwrap();
    p.qb.post_recv(&[RecvRequest {
        wr_id: 1,
        sg_list: &[r.sge()],
    }])
    .unwrap();
    let mut qb = p.qb;
    let sleeper = thread::spawn(move || {
        let mut wc = [WorkCompletion::EMPTY; 1];
        // No spinning: arm, sleep on the channel, get woken.
        let t0 = Instant::now();
        let n = wait_poll(&mut *qb, &mut wc, Duration::ZERO, T);
        (n, wc[0], t0.elapsed(), qb)
    });
    thread::sleep(Duration::from_millis(300));
    let mut s = sa.alloc().unwrap();
    s.put_slice(b"wake up");
    p.qa.post_send(&[WorkRequest::send(2, &[s.sge_filled()])])
        .unwrap();
    let (n, wc, took, _qb) = sleeper.join().unwrap();
    assert_eq!(n, 1, "woken with a completion");
    ok(wc, 1, WcOpcode::Recv, "woken receiver");
    assert!(took < T, "{took:?}");
    eprintln!("sleeping receiver woken after {took:?}");
    ok(next(&mut *p.qa, "SEND"), 2, WcOpcode::Send, "sender");
}

#[test]
#[ignore = "needs the Soft-RoCE lab"]
fn shared_receive_queue() {
    let a = open(AddressSpace::Iova);
    let b = open(AddressSpace::Iova);
    let srq = b.create_srq(64, 1).expect("create_srq");
    let cfg = QpConfig {
        connect_timeout: T,
        ..QpConfig::default()
    };
    let cfg_b = QpConfig {
        srq: Some(srq.clone()),
        ..cfg.clone()
    };
    let mut l = b.listen(&format!("{}:0", lab_addr()), &cfg_b).unwrap();
    let target = l.local_addr();
    let acc = thread::spawn(move || {
        let x = l.accept(T).expect("accept 1");
        let y = l.accept(T).expect("accept 2");
        (x, y)
    });
    let mut q1 = a.connect(&target, &cfg, &[1]).unwrap();
    let mut q2 = a.connect(&target, &cfg, &[2]).unwrap();
    let ((mut s1, d1), (mut s2, d2)) = acc.join().unwrap();
    assert_eq!((d1[0], d2[0]), (1, 2));
    assert_eq!(s1.caps().max_recv_wr, 0);
    assert!(s1.post_recv(&[]).is_err(), "receives go to the SRQ");
    let pb = Pd::new(b.clone());
    let pa = Pd::new(a.clone());
    let rb = pb.arena(ArenaConfig::new(4096, 4)).unwrap();
    let sa = pa.arena(ArenaConfig::new(4096, 4)).unwrap();
    let slots: Vec<_> = (0..2).map(|_| rb.alloc().unwrap()).collect();
    let sg: Vec<[Sge; 1]> = slots.iter().map(|s| [s.sge()]).collect();
    srq.post_recv(&[
        RecvRequest {
            wr_id: 10,
            sg_list: &sg[0],
        },
        RecvRequest {
            wr_id: 11,
            sg_list: &sg[1],
        },
    ])
    .unwrap();
    let mut m = sa.alloc().unwrap();
    m.put_slice(b"via q2");
    q2.post_send(&[WorkRequest::send(1, &[m.sge_filled()])])
        .unwrap();
    ok(next(&mut *q2, "SEND q2"), 1, WcOpcode::Send, "q2");
    let wc = next(&mut *s2, "SRQ receive on s2");
    assert_eq!((wc.wr_id, wc.qp_num, wc.byte_len), (10, s2.qp_num(), 6));
    q1.post_send(&[WorkRequest::send(2, &[m.sge_filled()])])
        .unwrap();
    ok(next(&mut *q1, "SEND q1"), 2, WcOpcode::Send, "q1");
    let wc = next(&mut *s1, "SRQ receive on s1");
    assert_eq!((wc.wr_id, wc.qp_num), (11, s1.qp_num()));
}

#[test]
#[ignore = "needs the Soft-RoCE lab"]
fn connecting_to_nobody_is_refused_and_timeouts_are_typed() {
    let a = open(AddressSpace::Iova);
    let cfg = QpConfig {
        connect_timeout: Duration::from_secs(10),
        ..QpConfig::default()
    };
    match a.connect(&format!("{}:1", lab_addr()), &cfg, &[]) {
        Err(TransportError::ConnectionRefused(m)) => eprintln!("refused: {m}"),
        Err(e) => panic!("expected ConnectionRefused, got {e:?}"),
        Ok(_) => panic!("connected to a port nobody listens on"),
    }
    assert!(matches!(
        a.connect(&format!("{}:1", lab_addr()), &cfg, &[0u8; 57]),
        Err(TransportError::InvalidArgument(_))
    ));
    let mut l = a.listen(&format!("{}:0", lab_addr()), &cfg).unwrap();
    match l.accept(Duration::from_millis(200)) {
        Err(TransportError::Timeout(_)) => {}
        Err(e) => panic!("expected a timeout, got {e:?}"),
        Ok(_) => panic!("accepted a connection nobody made"),
    }
    let port = l.local_addr();
    assert!(matches!(
        a.listen(&port, &cfg),
        Err(TransportError::AddressInUse(_))
    ));
}

#[test]
#[ignore = "needs the Soft-RoCE lab"]
fn source_address_and_interface_overrides() {
    logs();
    let netdev = std::env::var("ZCMSG_LAB_NETDEV").unwrap_or_else(|_| "veth0".into());
    let ip: std::net::IpAddr = lab_addr().parse().unwrap();
    let cfg = QpConfig {
        connect_timeout: T,
        ..QpConfig::default()
    };
    let b = open(AddressSpace::Iova);
    for vc in [
        VerbsConfig {
            source_addr: Some(ip),
            require_roce_v2: true,
            ..VerbsConfig::default()
        },
        VerbsConfig {
            source_interface: Some(netdev.clone()),
            require_roce_v2: true,
            ..VerbsConfig::default()
        },
    ] {
        let a = VerbsDevice::open(Some(&lab_device()), &vc).unwrap();
        let mut l = b.listen(&format!("{}:0", lab_addr()), &cfg).unwrap();
        let target = l.local_addr();
        let acc = thread::spawn(move || l.accept(T));
        let qa = a
            .connect(&target, &cfg, b"src")
            .unwrap_or_else(|e| panic!("connect with {vc:?}: {e}"));
        let (_qb, _) = acc.join().unwrap().unwrap();
        let g = gid_of(&*qa);
        assert!(g.is_roce_v2(), "{g:?}");
        assert_eq!(g.gid.to_ipv4_mapped(), Some(lab_addr().parse().unwrap()));
    }
    let bad = VerbsDevice::open(
        Some(&lab_device()),
        &VerbsConfig {
            source_interface: Some("no-such-if0".into()),
            ..VerbsConfig::default()
        },
    )
    .unwrap();
    let e = match bad.connect(&format!("{}:1", lab_addr()), &cfg, &[]) {
        Err(e) => e,
        Ok(_) => panic!("connected from an interface that does not exist"),
    };
    assert!(matches!(e, TransportError::InvalidArgument(_)), "{e:?}");
}
