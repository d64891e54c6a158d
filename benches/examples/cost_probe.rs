//! Per-message CPU cost of the endpoint layer on the soft device, both ends
//! driven by one thread (no cross-core waiting), in three shapes:
//!
//! ```text
//! cost_probe N          # N messages streamed in post lists of 16 (queue + flush_sends)
//! cost_probe N pp       # N ping-pong round trips (try_send / try_recv)
//! cost_probe N pp-copy  # N ping-pong round trips (try_send_slice / try_recv_into)
//! cost_probe N pp-slot  # N ping-pong round trips (try_send_slice / try_recv_slot + recycle)
//! cost_probe N empty    # N calls of progress() with nothing to do (the spin granularity)
//! cost_probe N empty-into  # N calls of try_recv_into with nothing there (a busy-poll turn)
//! cost_probe N raw-pp   # N ping-pong round trips on the raw device (inline 64 B SENDs)
//! cost_probe N rpc      # N RPC echo calls of 8 bytes (rpc_echo's shape)
//! cost_probe N rpc-1k   # N RPC echo calls of a registered 1 KiB request
//! cost_probe N stream-slot # the stream, received with try_recv_slot + recycle
//! cost_probe N raw-stream # N inline 64 B SENDs on the raw device, in post lists of 16
//!                         # (zcperf send-bw's shape: one signaled, one repost list)
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

use std::time::Instant;

use bytes::BufMut;
use zcmsg::{ArenaConfig, Pd, Transport};
use zcmsg_bench::onethread::{
    pair, recv as recv_one, recv_into, recv_slot, rpc_call, rpc_echo_pair,
};
use zcmsg_soft::SoftDevice;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .map(|s| s.parse().expect("N: a count"))
        .unwrap_or(100_000);
    let mode = args.next().unwrap_or_default();
    match mode.as_str() {
        "raw-pp" => return raw_pp(&SoftDevice::new(), n),
        "raw-stream" => return raw_stream(&SoftDevice::new(), n),
        "rpc" | "rpc-1k" => return rpc_echo(n, mode == "rpc-1k"),
        _ => {}
    }
    let (mut a, mut b) = pair();
    let arena = a.pd().arena(ArenaConfig::new(64, 4)).expect("arena");
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
        "empty-into" => {
            let mut buf = [0u8; 256];
            for _ in 0..n {
                std::hint::black_box(a.try_recv_into(&mut buf).expect("recv"));
            }
            println!(
                "{:.1} ns per empty try_recv_into",
                t.elapsed().as_nanos() as f64 / n as f64
            );
        }
        "pp-copy" => {
            let mut buf = [0u8; 256];
            let m = msg.to_vec();
            for _ in 0..n {
                assert!(
                    a.try_send_slice(&m).expect("send").is_some(),
                    "sent at once"
                );
                let k = recv_into(&mut b, &mut a, &mut buf);
                assert!(b.try_send_slice(&buf[..k]).expect("echo").is_some());
                std::hint::black_box(recv_into(&mut a, &mut b, &mut buf));
            }
            println!(
                "{:.1} ns per round trip",
                t.elapsed().as_nanos() as f64 / n as f64
            );
        }
        "pp-slot" => {
            let m = msg.to_vec();
            for _ in 0..n {
                assert!(
                    a.try_send_slice(&m).expect("send").is_some(),
                    "sent at once"
                );
                let r = recv_slot(&mut b, &mut a);
                assert!(b.try_send_slice(&r).expect("echo").is_some());
                b.recycle(r);
                let r = recv_slot(&mut a, &mut b);
                std::hint::black_box(r.len());
                a.recycle(r);
            }
            println!(
                "{:.1} ns per round trip",
                t.elapsed().as_nanos() as f64 / n as f64
            );
        }
        "stream-slot" => {
            for _ in 0..n / 16 {
                for _ in 0..16 {
                    a.queue(msg.clone()).expect("queue");
                }
                a.flush_sends();
                for _ in 0..16 {
                    let r = recv_slot(&mut b, &mut a);
                    std::hint::black_box(r.len());
                    b.recycle(r);
                }
                a.progress();
            }
            println!(
                "{:.1} ns per message",
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

/// RPC echo calls as `rpc_echo` makes them (an 8-byte request copied into
/// `Bytes`, the handler answering with the request), or of a registered
/// 1 KiB request, the server's turns driven between the client's polls.
fn rpc_echo(n: usize, large: bool) {
    let (mut client, mut server) = rpc_echo_pair();
    let arena = client
        .endpoint()
        .pd()
        .arena(ArenaConfig::new(1024, 4))
        .expect("arena");
    let mut slot = arena.alloc().expect("slot");
    slot.put_bytes(7, 1024);
    let big = slot.freeze();
    let t = Instant::now();
    for i in 0..n as u64 {
        let small = i.to_le_bytes();
        let req = if large {
            big.clone()
        } else {
            bytes::Bytes::copy_from_slice(&small)
        };
        let rep = rpc_call(&mut client, &mut server, req);
        assert!(if large { rep == big } else { rep[..] == small });
    }
    println!(
        "{:.1} ns per call",
        t.elapsed().as_nanos() as f64 / n as f64
    );
}

/// The raw device's ping-pong, as zcperf's send_lat does it, in one thread.
/// Two connected raw queue pairs for 64 B inline SENDs, and 64 B slots of
/// one arena.
struct Raw {
    a: Box<dyn zcmsg::QueuePair>,
    b: Box<dyn zcmsg::QueuePair>,
    _pd: Pd,
    arena: zcmsg::Arena,
    slots: Vec<zcmsg::SlotMut>,
}

/// [`Raw`] with `recv_wr` receives per queue pair and `n` slots (the arena
/// has 8 more).
fn raw_setup(dev: &std::sync::Arc<SoftDevice>, recv_wr: u32, n: usize) -> Raw {
    let cfg = zcmsg::QpConfig {
        max_send_wr: 128,
        max_recv_wr: recv_wr,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 64,
        ..zcmsg::QpConfig::default()
    };
    let (a, b) = dev.pair(&cfg, &cfg).expect("pair");
    let pd = Pd::new(dev.clone() as std::sync::Arc<dyn Transport>);
    let arena = pd.arena(ArenaConfig::new(64, n + 8)).expect("arena");
    let slots = (0..n).map(|_| arena.alloc().expect("slot")).collect();
    Raw {
        a,
        b,
        _pd: pd,
        arena,
        slots,
    }
}

fn raw_pp(dev: &std::sync::Arc<SoftDevice>, n: usize) {
    use zcmsg::{RecvRequest, SendFlags, WorkCompletion, WorkRequest};
    let Raw {
        mut a,
        mut b,
        _pd,
        arena,
        slots,
    } = raw_setup(dev, 16, 32);
    let post = |qp: &mut Box<dyn zcmsg::QueuePair>, i: usize| {
        let sge = [slots[i].sge()];
        qp.post_recv(&[RecvRequest {
            wr_id: i as u64,
            sg_list: &sge,
        }])
        .expect("post_recv");
    };
    for i in 0..16 {
        post(&mut a, i);
        post(&mut b, 16 + i);
    }
    let mut msg = arena.alloc().expect("slot");
    msg.put_bytes(0x5a, 64);
    let sge = [msg.sge_filled()];
    let mut wc = [WorkCompletion::EMPTY; 32];
    let t = Instant::now();
    for it in 0..n {
        for (tx, rx) in [(0, 1), (1, 0)] {
            let qps = [&mut a, &mut b];
            let [x, y] = qps;
            let (txq, rxq) = if tx == 0 { (x, y) } else { (y, x) };
            let f = if (it + 1) % 64 == 0 {
                SendFlags::SIGNALED | SendFlags::INLINE
            } else {
                SendFlags::INLINE
            };
            txq.post_send(&[WorkRequest::send(it as u64, &sge).with_flags(f)])
                .expect("post_send");
            loop {
                let k = rxq.poll_cq(&mut wc);
                let recv = wc[..k].iter().find(|w| w.opcode.is_recv()).copied();
                if let Some(w) = recv {
                    post(rxq, w.wr_id as usize);
                    break;
                }
            }
            let _ = rx;
        }
    }
    println!(
        "{:.1} ns per raw round trip",
        t.elapsed().as_nanos() as f64 / n as f64
    );
}

/// The raw device's SEND stream, as zcperf's send-bw does it, in one thread:
/// a post list of 16 inline SENDs (the last signaled), the receiver's poll
/// and one repost list for what it polled, the sender's poll.
fn raw_stream(dev: &std::sync::Arc<SoftDevice>, n: usize) {
    use zcmsg::{RecvRequest, SendFlags, Sge, WorkCompletion, WorkRequest};
    const LIST: usize = 16;
    let Raw {
        mut a,
        mut b,
        _pd,
        arena,
        slots,
    } = raw_setup(dev, 64, 64);
    // As zcperf's stream reposts: the receive SGEs built once, a list of
    // the requests a poll returned.
    let sges: Vec<[Sge; 1]> = slots.iter().map(|s| [s.sge()]).collect();
    let mut wrs: Vec<RecvRequest<'_>> = Vec::with_capacity(64);
    let mut repost = |qp: &mut Box<dyn zcmsg::QueuePair>, ids: &[u64]| {
        wrs.clear();
        wrs.extend(ids.iter().map(|&i| RecvRequest {
            wr_id: i,
            sg_list: &sges[i as usize],
        }));
        qp.post_recv(&wrs).expect("post_recv");
    };
    let all: Vec<u64> = (0..64).collect();
    repost(&mut b, &all);
    let mut msg = arena.alloc().expect("slot");
    msg.put_bytes(0x5a, 64);
    let sge = [msg.sge_filled()];
    let mut wc = [WorkCompletion::EMPTY; 32];
    let mut ids = Vec::with_capacity(32);
    let t = Instant::now();
    for it in 0..n / LIST {
        let wrs: [WorkRequest<'_>; LIST] = std::array::from_fn(|k| {
            let f = if k + 1 == LIST {
                SendFlags::SIGNALED | SendFlags::INLINE
            } else {
                SendFlags::INLINE
            };
            WorkRequest::send((it * LIST + k) as u64, &sge).with_flags(f)
        });
        a.post_send(&wrs).expect("post_send");
        let mut got = 0;
        while got < LIST {
            let k = b.poll_cq(&mut wc);
            ids.clear();
            ids.extend(
                wc[..k]
                    .iter()
                    .filter(|w| w.opcode.is_recv())
                    .map(|w| w.wr_id),
            );
            got += ids.len();
            repost(&mut b, &ids);
        }
        while a.poll_cq(&mut wc) == 0 {}
    }
    println!(
        "{:.1} ns per raw streamed message",
        t.elapsed().as_nanos() as f64 / n as f64
    );
}
