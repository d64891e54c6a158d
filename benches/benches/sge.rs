//! SGE build cost per chunk and registry lookup cost, with 1, 16 and 1024
//! registered regions, each next to a baseline in the same run: filling the
//! same number of `Sge`s from precomputed values. The builder is kept across
//! lists, as the endpoints keep theirs; `registry_snapshot` is what a
//! builder made per list pays on top (one `ArcSwap` snapshot).
//!
//! Run: `cargo bench -p zcmsg-bench --bench sge`

use std::hint::black_box;
use std::sync::Arc;

use bytes::{BufMut, Bytes};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use zcmsg::testing::RegistryOnly;
use zcmsg::{AddressSpace, Arena, ArenaConfig, Pd, Sge, UnregisteredPolicy};

const CHUNKS: usize = 16;

struct Setup {
    pd: Pd,
    _arenas: Vec<Arena>,
    chunks: Vec<Bytes>,
    raw: Vec<(u64, u32, u32)>,
}

fn setup(regions: usize) -> Setup {
    let pd = Pd::new(Arc::new(RegistryOnly::new(AddressSpace::Iova)));
    let arenas: Vec<Arena> = (0..regions)
        .map(|_| pd.arena(ArenaConfig::new(4096, 2 * CHUNKS)).unwrap())
        .collect();
    // Spread the chunks over the regions with a fixed stride so lookups vary.
    let chunks: Vec<Bytes> = (0..CHUNKS)
        .map(|i| {
            let a = &arenas[(i * 7919) % regions];
            let mut s = a.alloc().unwrap();
            s.put_slice(&[i as u8; 512]);
            s.freeze().slice(64..64 + 256)
        })
        .collect();
    let raw = chunks
        .iter()
        .map(|c| (c.as_ptr() as u64, c.len() as u32, 42u32))
        .collect();
    Setup {
        pd,
        _arenas: arenas,
        chunks,
        raw,
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("sge_build");
    g.throughput(Throughput::Elements(CHUNKS as u64));
    for regions in [1usize, 16, 1024] {
        let mut s = setup(regions);
        let mut out: Vec<Sge> = Vec::with_capacity(64);
        g.bench_with_input(
            BenchmarkId::new("builder_list", regions),
            &regions,
            |b, _| {
                let builder = s.pd.builder(UnregisteredPolicy::Reject);
                b.iter(|| {
                    out.clear();
                    builder.list(black_box(&mut s.chunks), &mut out).unwrap();
                    black_box(&out);
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("baseline_fill", regions),
            &regions,
            |b, _| {
                b.iter(|| {
                    out.clear();
                    for &(addr, len, lkey) in black_box(&s.raw) {
                        out.push(Sge::new(addr, len, lkey));
                    }
                    black_box(&out);
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("registry_snapshot", regions),
            &regions,
            |b, _| {
                b.iter(|| {
                    let snap = s.pd.registry().snapshot();
                    black_box(&snap);
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("registry_lookup", regions),
            &regions,
            |b, _| {
                b.iter(|| {
                    let snap = s.pd.registry().snapshot();
                    let mut acc = 0u32;
                    for &(addr, _, _) in black_box(&s.raw) {
                        acc ^= snap.find(addr).map_or(0, |e| e.lkey);
                    }
                    black_box(acc)
                })
            },
        );
    }
    // The common case: all chunks of a message from one arena (16 regions registered).
    let mut s = setup(16);
    let arena = &s._arenas[3];
    s.chunks = (0..CHUNKS)
        .map(|i| {
            let mut slot = arena.alloc().unwrap();
            slot.put_slice(&[i as u8; 512]);
            slot.freeze().slice(64..320)
        })
        .collect();
    let mut out: Vec<Sge> = Vec::with_capacity(64);
    g.bench_function("builder_list_same_arena/16", |b| {
        let builder = s.pd.builder(UnregisteredPolicy::Reject);
        b.iter(|| {
            out.clear();
            builder.list(black_box(&mut s.chunks), &mut out).unwrap();
            black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
