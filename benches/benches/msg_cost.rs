//! CPU cost of one 64 B message, both sides driven by ONE thread: the raw
//! soft device (post a SEND, poll the receive, repost it) next to the
//! endpoint layer (16 messages queued and posted as one list like the raw
//! side's, or sent one `try_send` at a time; try_recv; drop the `Bytes`). No core waits for
//! another, so the ratio is the framework's own per-message work, free of
//! the scheduling noise that two spinning threads on a shared 2-vCPU machine
//! suffer. The two-thread figures are zcperf's.
//!
//! Run: `cargo bench -p zcmsg-bench --bench msg_cost`

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::BufMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use zcmsg::{
    ArenaConfig, Endpoint, EndpointConfig, Pd, QpConfig, Recv, RecvRequest, SendFlags, Transport,
    WorkCompletion, WorkRequest,
};
use zcmsg_soft::SoftDevice;

/// Messages per timed batch (one post list on the raw side).
const BATCH: usize = 16;

fn raw(c: &mut Criterion) {
    let dev = SoftDevice::new();
    let cfg = QpConfig {
        max_send_wr: 128,
        max_recv_wr: 256,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 64,
        ..QpConfig::default()
    };
    let (mut a, mut b) = dev.pair(&cfg, &cfg).unwrap();
    let pd = Pd::new(dev.clone() as std::sync::Arc<dyn Transport>);
    let arena = pd.arena(ArenaConfig::new(64, 300)).unwrap();
    let recv: Vec<_> = (0..256).map(|_| arena.alloc().unwrap()).collect();
    for (i, s) in recv.iter().enumerate() {
        let sge = [s.sge()];
        b.post_recv(&[RecvRequest {
            wr_id: i as u64,
            sg_list: &sge,
        }])
        .unwrap();
    }
    let mut msg = arena.alloc().unwrap();
    msg.put_bytes(0x5a, 64);
    let sge = [msg.sge_filled()];
    let mut wc = [WorkCompletion::EMPTY; 32];
    let mut g = c.benchmark_group("msg_cost_64B");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("raw_device", |bch| {
        bch.iter(|| {
            let wrs: [WorkRequest<'_>; BATCH] = std::array::from_fn(|k| {
                let f = if k + 1 == BATCH {
                    SendFlags::SIGNALED | SendFlags::INLINE
                } else {
                    SendFlags::INLINE
                };
                WorkRequest::send(k as u64, &sge).with_flags(f)
            });
            a.post_send(&wrs).unwrap();
            let mut got = 0;
            while got < BATCH {
                let n = b.poll_cq(&mut wc);
                for w in &wc[..n] {
                    let s = &recv[w.wr_id as usize];
                    black_box(w.byte_len);
                    let sg = [s.sge()];
                    b.post_recv(&[RecvRequest {
                        wr_id: w.wr_id,
                        sg_list: &sg,
                    }])
                    .unwrap();
                }
                got += n;
            }
            while a.poll_cq(&mut wc) == 0 {}
        })
    });
    g.finish();
}

fn endpoint(c: &mut Criterion) {
    let dev = SoftDevice::new();
    let cfg = EndpointConfig::default();
    let (qa, qb) = dev.pair(&cfg.qp, &cfg.qp).unwrap();
    let pd = Pd::new(dev.clone() as std::sync::Arc<dyn Transport>);
    let mut a = Endpoint::start(&pd, qa, &cfg).unwrap();
    let mut b = Endpoint::start(&pd, qb, &cfg).unwrap();
    let t = Instant::now();
    while a.credits() <= 0 || b.credits() <= 0 {
        a.progress();
        b.progress();
        assert!(t.elapsed() < Duration::from_secs(5), "handshake");
    }
    let arena = pd.arena(ArenaConfig::new(64, 4)).unwrap();
    let mut s = arena.alloc().unwrap();
    s.put_bytes(0x61, 64);
    let msg = s.freeze();
    let mut g = c.benchmark_group("msg_cost_64B");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (name, post_list) in [("endpoint_post_list", true), ("endpoint_try_send", false)] {
        g.bench_function(name, |bch| {
            bch.iter(|| {
                for _ in 0..BATCH {
                    if post_list {
                        a.queue(msg.clone()).unwrap();
                    } else {
                        a.try_send(msg.clone()).unwrap();
                    }
                }
                a.flush_sends();
                let mut got = 0;
                while got < BATCH {
                    match b.try_recv().unwrap() {
                        Some(Recv::Message(m)) => {
                            black_box(m.len());
                            got += 1;
                        }
                        Some(Recv::Eos) => panic!("eos"),
                        None => {
                            a.progress();
                        }
                    }
                }
                a.progress();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, raw, endpoint);
criterion_main!(benches);
