//! Per-message CPU cost of the endpoint layer on the soft device, both ends
//! driven by one thread (no cross-core waiting), in three shapes:
//!
//! ```text
//! cost_probe N          # N messages streamed in post lists of 16 (queue + flush_sends)
//! cost_probe N pp       # N ping-pong round trips (try_send / try_recv)
//! cost_probe N empty    # N calls of progress() with nothing to do (the spin granularity)
//! ```
//!
//! Wall time is printed, but the repeatable figure is the instruction count:
//! run it under `valgrind --tool=callgrind` for two values of N and divide
//! the difference by the difference of N (setup cancels out), e.g.
//!
//! ```text
//! cargo build --release -p zcmsg-bench --example cost_probe
//! valgrind --tool=callgrind ./target/release/examples/cost_probe 16000
//! valgrind --tool=callgrind ./target/release/examples/cost_probe 48000
//! ```

use std::time::{Duration, Instant};

use bytes::BufMut;
use zcmsg::{ArenaConfig, Endpoint, EndpointConfig, Pd, Recv, Transport};
use zcmsg_soft::SoftDevice;

fn recv_one(ep: &mut Endpoint, peer: &mut Endpoint) -> bytes::Bytes {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ep.try_recv().expect("receive") {
            Some(Recv::Message(m)) => return m,
            Some(Recv::Eos) => panic!("end of stream"),
            None => {
                peer.progress();
                assert!(Instant::now() < deadline, "no message within 10 s");
            }
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map(|s| s.parse().expect("N: a count"))
        .unwrap_or(100_000);
    let mode = args.next().unwrap_or_default();
    let dev = SoftDevice::new();
    let cfg = EndpointConfig::default();
    let (qa, qb) = dev.pair(&cfg.qp, &cfg.qp).expect("pair");
    let pd = Pd::new(dev.clone() as std::sync::Arc<dyn Transport>);
    let mut a = Endpoint::start(&pd, qa, &cfg).expect("endpoint a");
    let mut b = Endpoint::start(&pd, qb, &cfg).expect("endpoint b");
    while a.credits() <= 0 || b.credits() <= 0 {
        a.progress();
        b.progress();
    }
    let arena = pd.arena(ArenaConfig::new(64, 4)).expect("arena");
    let mut s = arena.alloc().expect("slot");
    s.put_bytes(0x61, 64);
    let msg = s.freeze();
    let t = Instant::now();
    match mode.as_str() {
        "empty" => {
            for _ in 0..n {
                std::hint::black_box(a.progress());
            }
            println!(
                "{:.1} ns per empty progress",
                t.elapsed().as_nanos() as f64 / n as f64
            );
        }
        "pp" => {
            for _ in 0..n {
                a.try_send(msg.clone()).expect("send");
                let m = recv_one(&mut b, &mut a);
                b.try_send(m).expect("echo");
                std::hint::black_box(recv_one(&mut a, &mut b));
            }
            println!(
                "{:.1} ns per round trip",
                t.elapsed().as_nanos() as f64 / n as f64
            );
        }
        _ => {
            for _ in 0..n / 16 {
                for _ in 0..16 {
                    a.queue(msg.clone()).expect("queue");
                }
                a.flush_sends();
                for _ in 0..16 {
                    std::hint::black_box(recv_one(&mut b, &mut a).len());
                }
                a.progress();
            }
            println!(
                "{:.1} ns per message",
                t.elapsed().as_nanos() as f64 / n as f64
            );
        }
    }
}
