//! Behaviour of arenas, the registry and the SGE builders, on a device that
//! only registers memory (both address spaces).

use std::sync::Arc;

use bytes::{BufMut, Bytes};
use proptest::prelude::*;
use zcmsg::testing::{RegistryOnly, IOVA_BASE};
use zcmsg::{
    AddressSpace, ArenaConfig, CacheConfig, Pd, RemoteRegion, RwPlan, Sge, SgeError,
    UnregisteredPolicy,
};

fn pd(space: AddressSpace) -> (Pd, Arc<RegistryOnly>) {
    let dev = Arc::new(RegistryOnly::new(space));
    (Pd::new(dev.clone()), dev)
}

/// Translate an SGE back to the CPU bytes it names, through the PD's registry.
fn resolve(s: &Sge, space: AddressSpace, regions: &[(u64, u64, u32, u64)]) -> Vec<u8> {
    let (base, len, _lkey, iova) = *regions
        .iter()
        .find(|r| r.2 == s.lkey())
        .expect("SGE names a registered lkey");
    let cpu = match space {
        AddressSpace::Cpu => s.addr(),
        AddressSpace::Iova => base + (s.addr() - iova),
    };
    assert!(
        cpu >= base && cpu + u64::from(s.length()) <= base + len,
        "SGE crosses its region"
    );
    // SAFETY: the range lies inside a live registered arena (checked above).
    unsafe { std::slice::from_raw_parts(cpu as *const u8, s.length() as usize).to_vec() }
}

/// A builder kept across lists sees arenas registered after its first list
/// (it keeps the region table only while the registry is unchanged), and
/// chunks of many arenas, with empty ones between, all keep their own keys.
#[test]
fn a_kept_builder_follows_registrations() {
    let (pd, _dev) = pd(AddressSpace::Iova);
    let builder = pd.builder(UnregisteredPolicy::Reject);
    let mut arenas = Vec::new();
    let mut all = Vec::new();
    for round in 0..5 {
        let arena = pd.arena(ArenaConfig::new(4096, 4)).unwrap();
        let mut s = arena.alloc().unwrap();
        s.put_slice(&[round as u8; 300]);
        let b = s.freeze();
        all.push((b.slice(0..100), arena.lkey()));
        all.push((Bytes::new(), 0));
        arenas.push(arena);
        let mut chunks: Vec<Bytes> = all.iter().map(|(c, _)| c.clone()).collect();
        let mut out = Vec::new();
        builder
            .list(&mut chunks, &mut out)
            .unwrap_or_else(|e| panic!("round {round}: a new arena's chunk refused: {e}"));
        let want: Vec<u32> = all
            .iter()
            .filter(|(c, _)| !c.is_empty())
            .map(|x| x.1)
            .collect();
        let got: Vec<u32> = out.iter().map(|s| s.lkey()).collect();
        assert_eq!(got, want, "round {round}: keys");
        assert!(out.iter().all(|s| s.length() == 100));
    }
    // Unregistered memory is still refused by the kept builder.
    let mut foreign = [Bytes::from(vec![1u8; 64])];
    assert!(matches!(
        builder.list(&mut foreign, &mut Vec::new()),
        Err(SgeError::Unregistered { .. })
    ));
}

#[test]
fn registered_bytes_build_without_copies_and_carry_the_arena_lkey() {
    for space in [AddressSpace::Cpu, AddressSpace::Iova] {
        let (pd, _dev) = pd(space);
        let arena = pd.arena(ArenaConfig::new(4096, 8)).unwrap();
        let mut slot = arena.alloc().unwrap();
        slot.put_slice(&[7u8; 1000]);
        let whole = slot.freeze();
        let mut chunks = [whole.slice(10..20), whole.slice(500..1000)];
        let before = pd.stats().snapshot();
        let mut out = Vec::new();
        pd.builder(UnregisteredPolicy::Reject)
            .list(&mut chunks, &mut out)
            .unwrap();
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|s| s.lkey() == arena.lkey()));
        assert_eq!(out[0].length(), 10);
        assert_eq!(out[1].length(), 500);
        let cpu = whole.as_ptr() as u64 + 10;
        match space {
            AddressSpace::Cpu => assert_eq!(out[0].addr(), cpu),
            AddressSpace::Iova => {
                assert_eq!(
                    out[0].addr(),
                    arena.registration().iova + (cpu - arena.base())
                );
                assert!(out[0].addr() >= IOVA_BASE);
            }
        }
        assert_eq!(pd.stats().snapshot().since(&before).total_bytes(), 0);
    }
}

#[test]
fn a_vec_is_bounced_and_counted_byte_for_byte() {
    let (pd, _dev) = pd(AddressSpace::Cpu);
    let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let mut chunks = [Bytes::from(data.clone())];
    let orig_ptr = chunks[0].as_ptr();
    let mut out = Vec::new();
    pd.builder(UnregisteredPolicy::Bounce)
        .list(&mut chunks, &mut out)
        .unwrap();
    let s = pd.stats().snapshot();
    assert_eq!(s.bounce_bytes, 3000);
    assert_eq!(s.bounce_ops, 1);
    assert_ne!(
        chunks[0].as_ptr(),
        orig_ptr,
        "the chunk was replaced by its registered copy"
    );
    assert_eq!(&chunks[0][..], &data[..]);
    assert_eq!(out[0].addr(), chunks[0].as_ptr() as u64);
    assert!(pd.registry().find(out[0].addr()).is_some());
}

#[test]
fn reject_names_the_unregistered_address() {
    let (pd, _dev) = pd(AddressSpace::Cpu);
    let mut chunks = [Bytes::from(vec![1u8; 64])];
    let addr = chunks[0].as_ptr() as u64;
    let err = pd
        .builder(UnregisteredPolicy::Reject)
        .list(&mut chunks, &mut Vec::new())
        .unwrap_err();
    assert_eq!(err, SgeError::Unregistered { addr, len: 64 });
    assert!(err.to_string().contains(&format!("{addr:#x}")));
}

#[test]
fn register_cached_registers_once_pins_while_posted_and_evicts_only_unpinned() {
    let dev = Arc::new(RegistryOnly::new(AddressSpace::Cpu));
    let pd = Pd::with_cache(
        dev.clone(),
        CacheConfig {
            max_entries: 2,
            max_bytes: 1 << 20,
        },
    );
    let b = pd.builder(UnregisteredPolicy::RegisterCached);
    let a = Bytes::from(vec![1u8; 100]);
    let mut c1 = [a.clone()];
    let mut out = Vec::new();
    b.list(&mut c1, &mut out).unwrap();
    assert_eq!(pd.cached_registrations(), 1);
    let lkey_a = out[0].lkey();
    assert_eq!(dev.access_of(lkey_a), Some(zcmsg::Access::LOCAL_READ));
    // A second build of the same memory hits the cache: same key, no new registration.
    let mut c2 = [a.clone()];
    out.clear();
    b.list(&mut c2, &mut out).unwrap();
    assert_eq!(out[0].lkey(), lkey_a);
    assert_eq!(pd.cached_registrations(), 1);
    assert_eq!(pd.stats().snapshot().total_bytes(), 0);
    // Fill the cache while c1/c2 (the "posted" chunks) hold pins on `a`.
    let bb = Bytes::from(vec![2u8; 100]);
    let mut c3 = [bb.clone()];
    b.list(&mut c3, &mut out).unwrap();
    let cc = Bytes::from(vec![3u8; 100]);
    let mut c4 = [cc.clone()];
    // Both entries are pinned (c1..c3 alive): nothing can be evicted.
    let err = b.list(&mut c4, &mut out).unwrap_err();
    assert!(
        matches!(err, SgeError::Register(ref m) if m.contains("in use")),
        "{err}"
    );
    // Completing the request on `bb` unpins it; now it can be evicted.
    drop(c3);
    b.list(&mut c4, &mut out).unwrap();
    assert_eq!(pd.cached_registrations(), 2);
    assert!(
        pd.registry().find(bb.as_ptr() as u64).is_none(),
        "bb evicted"
    );
    assert!(
        pd.registry().find(a.as_ptr() as u64).is_some(),
        "a still pinned"
    );
}

#[test]
fn arena_slots_go_home_from_other_threads_and_the_arena_deregisters_last() {
    let (pd, dev) = pd(AddressSpace::Cpu);
    let arena = pd.arena(ArenaConfig::new(256, 4)).unwrap();
    assert_eq!(dev.registrations(), 1);
    let mut held = Vec::new();
    for i in 0..4u8 {
        let mut s = arena.alloc().unwrap();
        s.put_slice(&[i; 100]);
        held.push(s.freeze());
    }
    assert!(arena.alloc().is_none(), "all four slots are out");
    let slices: Vec<Bytes> = held.iter().map(|b| b.slice(1..50)).collect();
    drop(held);
    assert_eq!(arena.free_slots(), 0, "slices keep their slots");
    std::thread::spawn(move || drop(slices)).join().unwrap();
    assert_eq!(arena.free_slots(), 4);
    // The arena outlives its last handle while a Bytes still points into it.
    let mut s = arena.alloc().unwrap();
    s.put_slice(b"alive");
    let b = s.freeze();
    drop(arena);
    assert_eq!(
        dev.registrations(),
        1,
        "still registered: a Bytes refers to it"
    );
    assert_eq!(&b[..], b"alive");
    drop(b);
    assert_eq!(
        dev.registrations(),
        0,
        "deregistered when the last slot came home"
    );
    assert!(pd.registry().is_empty());
}

#[test]
fn arenas_refuse_remote_write_and_bad_sizes() {
    let (pd, _dev) = pd(AddressSpace::Cpu);
    assert!(pd.arena(ArenaConfig::new(0, 4)).is_err());
    assert!(pd.arena(ArenaConfig::new(64, 0)).is_err());
    let cfg = ArenaConfig {
        access: zcmsg::Access::REMOTE_WRITE,
        ..ArenaConfig::new(64, 4)
    };
    assert!(pd.arena(cfg).is_err());
}

#[test]
fn slots_are_aligned() {
    let (pd, _dev) = pd(AddressSpace::Cpu);
    let small = pd.arena(ArenaConfig::new(100, 8)).unwrap();
    assert_eq!(small.slot_size(), 128);
    let s = small.alloc().unwrap();
    assert_eq!(s.sge().addr() % 64, 0);
    let big = pd.arena(ArenaConfig::new(5000, 2)).unwrap();
    assert_eq!(big.slot_size(), 8192);
    assert_eq!(big.base() % 4096, 0);
}

#[test]
fn send_over_max_msg_sz_is_refused_and_over_max_sge_is_coalesced() {
    let (pd, _dev) = pd(AddressSpace::Cpu);
    let arena = pd.arena(ArenaConfig::new(4096, 64)).unwrap();
    let mut chunks: Vec<Bytes> = (0..10u8)
        .map(|i| {
            let mut s = arena.alloc().unwrap();
            s.put_slice(&vec![i; 10 + i as usize * 100]);
            s.freeze()
        })
        .collect();
    let expect: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    let b = pd.builder(UnregisteredPolicy::Reject);
    let err = b
        .send(&mut chunks.clone(), 32, 100, &mut Vec::new())
        .unwrap_err();
    assert!(matches!(err, SgeError::MessageTooLarge { max: 100, .. }));
    let mut out = Vec::new();
    b.send(&mut chunks, 4, 1 << 20, &mut out).unwrap();
    assert!(out.len() <= 4);
    let got: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    assert_eq!(got, expect, "coalescing keeps the bytes and their order");
    let s = pd.stats().snapshot();
    // The cheapest run to merge is the 7 smallest-first neighbours: 10+110+...+610.
    assert_eq!(s.coalesce_bytes, (0..7).map(|i| 10 + i * 100).sum::<u64>());
    assert_eq!(s.coalesce_ops, 1);
    let total: u64 = out.iter().map(|s| u64::from(s.length())).sum();
    assert_eq!(total, expect.len() as u64);
}

#[test]
fn rw_plan_splits_at_sge_and_message_limits() {
    let local: Vec<Sge> = (0..10)
        .map(|i| Sge::new(0x1000 * (i + 1), 300, 5))
        .collect();
    let remote = RemoteRegion {
        addr: 1 << 40,
        len: 3000,
        rkey: 9,
    };
    let mut plan = RwPlan::new();
    assert_eq!(plan.build(&local, remote, 4, 1 << 20).unwrap(), 3);
    assert_eq!(plan.build(&local, remote, 32, 1000).unwrap(), 3);
    let spans = plan.spans();
    assert_eq!(spans[0].len, 1000);
    assert_eq!(spans[1].remote_addr, remote.addr + 1000);
    assert!(plan
        .build(
            &local,
            RemoteRegion {
                len: 2999,
                ..remote
            },
            4,
            1000
        )
        .is_err());
    let mut wrs = Vec::new();
    plan.build(&local, remote, 4, 1 << 20).unwrap();
    plan.work_requests(zcmsg::Opcode::RdmaWrite, 100, &mut wrs);
    assert_eq!(wrs.len(), 3);
    assert!(wrs[2].flags.contains(zcmsg::SendFlags::SIGNALED));
    assert!(!wrs[0].flags.contains(zcmsg::SendFlags::SIGNALED));
    assert!(wrs.iter().all(|w| w.rkey == 9));
}

/// One chunk of a generated message: a range of one of several arenas, or
/// foreign (unregistered) memory.
#[derive(Clone, Debug)]
enum Src {
    Arena {
        arena: usize,
        slot_off: usize,
        len: usize,
    },
    Foreign {
        len: usize,
    },
}

fn src() -> impl Strategy<Value = Src> {
    prop_oneof![
        3 => (0usize..3, 0usize..2000, 0usize..2048).prop_map(|(arena, slot_off, len)| Src::Arena { arena, slot_off, len }),
        1 => (0usize..5000).prop_map(|len| Src::Foreign { len }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Random chunk sets over several arenas and foreign memory produce SGEs
    /// that cover exactly the chunks' bytes, in order, with the right lkey,
    /// never crossing a region; bad input is a typed error, never a panic.
    #[test]
    fn sges_cover_exactly_the_chunks(
        srcs in prop::collection::vec(src(), 0..40),
        iova in any::<bool>(),
        policy in 0u8..3,
        max_sge in 1u32..40,
    ) {
        let space = if iova { AddressSpace::Iova } else { AddressSpace::Cpu };
        let (pd, _dev) = pd(space);
        let arenas: Vec<_> = (0..3).map(|_| pd.arena(ArenaConfig::new(4096, 40)).unwrap()).collect();
        let mut seed = 1u8;
        let mut chunks: Vec<Bytes> = srcs.iter().map(|s| match *s {
            Src::Arena { arena, slot_off, len } => {
                let mut slot = arenas[arena].alloc().unwrap();
                let fill: Vec<u8> = (0..4096).map(|i| (i as u8).wrapping_mul(seed)).collect();
                seed = seed.wrapping_add(1);
                slot.put_slice(&fill);
                let b = slot.freeze();
                let off = slot_off.min(4096);
                b.slice(off..(off + len).min(4096))
            }
            Src::Foreign { len } => {
                seed = seed.wrapping_add(1);
                Bytes::from((0..len).map(|i| (i as u8) ^ seed).collect::<Vec<u8>>())
            }
        }).collect();
        let expect: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
        let foreign_bytes: u64 = srcs.iter().map(|s| match s { Src::Foreign { len } => *len as u64, _ => 0 }).sum();
        let policy = [UnregisteredPolicy::Reject, UnregisteredPolicy::Bounce, UnregisteredPolicy::RegisterCached][policy as usize];
        let mut out = Vec::new();
        let r = pd.builder(policy).list(&mut chunks, &mut out);
        if policy == UnregisteredPolicy::Reject && foreign_bytes > 0 {
            let is_unregistered = matches!(r, Err(SgeError::Unregistered { .. }));
            prop_assert!(is_unregistered);
            return Ok(());
        }
        prop_assert!(r.is_ok(), "{:?}", r);
        let snap = pd.registry();
        // Collect all regions via lookups on the (possibly replaced) chunks.
        let mut table: Vec<(u64, u64, u32, u64)> = Vec::new();
        for c in chunks.iter().filter(|c| !c.is_empty()) {
            let e = snap.find(c.as_ptr() as u64).expect("every chunk is registered after the build");
            table.push((e.base, e.len, e.lkey, e.iova));
        }
        let got: Vec<u8> = out.iter().flat_map(|s| resolve(s, space, &table)).collect();
        prop_assert_eq!(&got, &expect);
        prop_assert_eq!(out.len(), chunks.iter().filter(|c| !c.is_empty()).count());
        if policy == UnregisteredPolicy::Bounce {
            prop_assert_eq!(pd.stats().snapshot().bounce_bytes, foreign_bytes);
        } else {
            prop_assert_eq!(pd.stats().snapshot().total_bytes(), 0);
        }
        // A SEND of the same chunks respects max_send_sge (coalescing) or says why not.
        let mut send_out = Vec::new();
        match pd.builder(policy).send(&mut chunks, max_sge, u32::MAX, &mut send_out) {
            Ok(()) => {
                prop_assert!(send_out.len() <= max_sge as usize);
                let mut table: Vec<(u64, u64, u32, u64)> = Vec::new();
                for c in chunks.iter().filter(|c| !c.is_empty()) {
                    let e = pd.registry().find(c.as_ptr() as u64).unwrap();
                    table.push((e.base, e.len, e.lkey, e.iova));
                }
                let got: Vec<u8> = send_out.iter().flat_map(|s| resolve(s, space, &table)).collect();
                prop_assert_eq!(&got, &expect);
            }
            Err(e) => {
                let is_too_many = matches!(e, SgeError::TooManySges { .. });
                prop_assert!(is_too_many, "{:?}", e);
            }
        }
        // One-sided split: every WR within limits, bytes and order kept.
        let mut plan = RwPlan::new();
        let total: u64 = out.iter().map(|s| u64::from(s.length())).sum();
        let n = plan.build(&out, RemoteRegion { addr: 1 << 30, len: total, rkey: 3 }, max_sge, 1500).unwrap();
        prop_assert_eq!(n, plan.spans().len());
        let mut remote = 1u64 << 30;
        for sp in plan.spans() {
            prop_assert!(sp.sge_count <= max_sge && sp.len <= 1500 && sp.len > 0);
            prop_assert_eq!(sp.remote_addr, remote);
            remote += u64::from(sp.len);
        }
        prop_assert_eq!(remote, (1u64 << 30) + total);
        let split: Vec<u8> = plan.sges().iter().flat_map(|s| resolve(s, space, &table)).collect();
        prop_assert_eq!(&split, &expect);
    }
}

#[test]
fn a_window_is_registered_alone_and_readable_only_after_revoke() {
    let (pd, dev) = pd(AddressSpace::Iova);
    let mut w = pd
        .window(
            10_000,
            zcmsg::Access::REMOTE_WRITE | zcmsg::Access::REMOTE_READ,
        )
        .unwrap();
    w.fill(0xab);
    assert_eq!(dev.registrations(), 1);
    let r = w.remote();
    assert_eq!(r.len, 10_000);
    assert_eq!(r.addr, w.registration().iova);
    let access = dev.access_of(w.registration().lkey).unwrap();
    assert!(access.contains(zcmsg::Access::REMOTE_WRITE | zcmsg::Access::LOCAL_WRITE));
    let sge = w.sge(100, 50);
    assert_eq!(sge.addr(), r.addr + 100);
    let revoked = w.revoke();
    assert_eq!(dev.registrations(), 0, "revoke ends the registration");
    let b = revoked.into_bytes();
    assert_eq!(b.len(), 10_000);
    assert!(b.iter().all(|&x| x == 0xab));
}
