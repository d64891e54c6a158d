//! What a one-way stream of 64 B SENDs between two threads can reach on
//! this machine, by who executes the SEND: models of the data movement
//! alone (no device, no checks, no locks), beside crossbeam-channel and
//! an SPSC ring in alternating rounds. Messages per second, medians over
//! the rounds, and each model's ratio to crossbeam in the same round.
//!
//! - `crossbeam`, `spsc`: the summary's references (`zcperf`'s own).
//! - `device`: the soft device itself, as `zcperf send-bw -s 64` runs it
//!   (two devices, inline SENDs in post lists of 16, 128 in flight, 512
//!   receives reposted once per poll).
//! - `sender-exec`: what the soft device does. The receiver posts 32-byte
//!   receive entries into a ring and publishes its post index once per
//!   poll; the sender reads the next entry, copies the 64 B payload into
//!   the buffer it names and writes an 8-byte completion word (eight to a
//!   line) that the receiver spins on; the receiver reads the payload's
//!   first byte and reposts. Each message's payload line, a quarter of a
//!   receive entry's line and an eighth of a completion line cross to the
//!   other core and back.
//! - `sender-exec+20`: `sender-exec` with a chain of 20 dependent
//!   multiply-shift-xor steps in the receiver per message (~10 ns here):
//!   what the receiver's own work per message does to the rate.
//! - `recv-exec`: the SEND executed by the receiver's poll instead. The
//!   sender writes a 32-byte work request (its source buffer, the length,
//!   a lap tag) into its own send ring; the receiver polls that ring,
//!   copies the payload from the sender's buffer into its own receive
//!   buffer, writes its own completion word and reads the payload's first
//!   byte there, all in its own cache, and publishes how far it consumed
//!   every 32 messages. The source is one buffer sent again and again, as
//!   `zcperf send-bw` and perftest send one registered buffer.
//! - `recv-exec-fresh`: `recv-exec` with a fresh source per message: the
//!   sender writes the 64 bytes into the next of a ring of buffers first,
//!   as crossbeam's sender writes its message into a slot.
//!
//! ```text
//! cargo run --release -p zcmsg-bench --example stream_models -- [MESSAGES] [ROUNDS]
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use zcmsg::{Opcode, Transport};
use zcmsg_bench::raw::{self, Params};
use zcmsg_bench::refs;
use zcmsg_soft::SoftDevice;

/// Ring entries (receive entries, work requests, completions, buffers).
const N: usize = 1024;
/// The receiver publishes its progress at least this often.
const PUBLISH: u64 = 32;

/// 64 bytes, a line of its own.
#[repr(align(64))]
#[derive(Default)]
struct Buf([AtomicU64; 8]);

impl Buf {
    fn copy_from(&self, src: &Buf) {
        for (d, s) in self.0.iter().zip(&src.0) {
            d.store(s.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

/// A 32-byte entry: a receive (buffer index, length, id) or a work request
/// (lap tag, source index, length, id), two to a line.
#[derive(Default)]
struct Entry([AtomicU64; 4]);

#[repr(align(64))]
#[derive(Default)]
struct Index(AtomicU64);

fn ring<T: Default>(n: usize) -> Vec<T> {
    (0..n).map(|_| T::default()).collect()
}

fn spin_until(cond: impl Fn() -> bool) {
    while !cond() {
        std::hint::spin_loop();
    }
}

/// `steps` dependent steps of work, standing for a receiver's own per
/// message work.
fn work(seed: u64, steps: u32) -> u64 {
    let mut x = std::hint::black_box(seed);
    for _ in 0..steps {
        x = x.wrapping_mul(3).wrapping_add(1) ^ (x >> 7);
    }
    x
}

/// The soft device's movement: the sender writes into the receiver's
/// buffers; the receiver does `steps` of [`work`] per message.
fn sender_exec(msgs: u64, steps: u32) -> f64 {
    struct Shared {
        rq: Vec<Entry>,
        posted: Index,
        cq: Vec<AtomicU64>,
        bufs: Vec<Buf>,
    }
    let sh = Arc::new(Shared {
        rq: ring(N),
        posted: Index::default(),
        cq: ring(N),
        bufs: ring(N),
    });
    for (i, e) in sh.rq.iter().enumerate() {
        e.0[0].store(i as u64, Ordering::Relaxed);
        e.0[1].store(64, Ordering::Relaxed);
    }
    sh.posted.0.store(N as u64, Ordering::Release);
    let rx = sh.clone();
    let receiver = std::thread::spawn(move || {
        let (mut seq, mut sum) = (0u64, 0u64);
        while seq < msgs {
            let first = seq;
            // One poll: everything completed, up to 32.
            while seq < msgs
                && seq - first < PUBLISH
                && rx.cq[seq as usize % N].load(Ordering::Acquire) == seq + 1
            {
                // The receiver knows its buffer by the completion's id.
                sum += rx.bufs[seq as usize % N].0[0].load(Ordering::Relaxed) & 0xff;
                if steps > 0 {
                    sum ^= work(seq, steps) & 1;
                }
                seq += 1;
            }
            if seq == first {
                std::hint::spin_loop();
                continue;
            }
            // Repost what the poll took, one post index store.
            for s in first..seq {
                let e = &rx.rq[(s as usize + N) % N];
                e.0[0].store(s % N as u64, Ordering::Relaxed);
                e.0[1].store(64, Ordering::Relaxed);
                e.0[2].store(s, Ordering::Relaxed);
            }
            rx.posted.0.store(seq + N as u64, Ordering::Release);
        }
        sum
    });
    let src = Buf::default();
    let start = Instant::now();
    let mut posted = 0u64;
    for seq in 0..msgs {
        if seq >= posted {
            spin_until(|| sh.posted.0.load(Ordering::Acquire) > seq);
            posted = sh.posted.0.load(Ordering::Acquire);
        }
        let i = seq as usize % N;
        src.0[0].store(seq, Ordering::Relaxed);
        let b = sh.rq[i].0[0].load(Ordering::Relaxed) as usize;
        sh.bufs[b].copy_from(&src);
        sh.cq[i].store(seq + 1, Ordering::Release);
    }
    std::hint::black_box(receiver.join().expect("receiver"));
    msgs as f64 / start.elapsed().as_secs_f64()
}

/// The SEND executed by the receiver: it pulls from the sender's buffer.
fn recv_exec(msgs: u64, fresh: bool) -> f64 {
    struct Shared {
        sq: Vec<Entry>,
        consumed: Index,
        src: Vec<Buf>,
    }
    let sh = Arc::new(Shared {
        sq: ring(N),
        consumed: Index::default(),
        src: ring(if fresh { N } else { 1 }),
    });
    let rx = sh.clone();
    let receiver = std::thread::spawn(move || {
        let bufs: Vec<Buf> = ring(N);
        let cq: Vec<AtomicU64> = ring(N);
        let (mut seq, mut sum) = (0u64, 0u64);
        while seq < msgs {
            let first = seq;
            while seq < msgs && seq - first < PUBLISH {
                let w = &rx.sq[seq as usize % N];
                if w.0[0].load(Ordering::Acquire) != seq + 1 {
                    break;
                }
                let s = w.0[1].load(Ordering::Relaxed) as usize;
                let i = seq as usize % N;
                bufs[i].copy_from(&rx.src[s]);
                cq[i].store(seq + 1, Ordering::Relaxed);
                // The application's poll_cq, then its read of the message.
                if cq[i].load(Ordering::Relaxed) == seq + 1 {
                    sum += bufs[i].0[0].load(Ordering::Relaxed) & 0xff;
                }
                seq += 1;
            }
            if seq == first {
                std::hint::spin_loop();
                continue;
            }
            rx.consumed.0.store(seq, Ordering::Release);
        }
        sum
    });
    let start = Instant::now();
    let mut consumed = 0u64;
    for seq in 0..msgs {
        if seq - consumed >= N as u64 {
            spin_until(|| sh.consumed.0.load(Ordering::Acquire) + N as u64 > seq);
            consumed = sh.consumed.0.load(Ordering::Acquire);
        }
        let i = seq as usize % N;
        let s = if fresh { i } else { 0 };
        if fresh {
            for (k, w) in sh.src[s].0.iter().enumerate() {
                w.store(seq ^ k as u64, Ordering::Relaxed);
            }
        }
        let w = &sh.sq[i];
        w.0[1].store(s as u64, Ordering::Relaxed);
        w.0[2].store(64, Ordering::Relaxed);
        w.0[3].store(seq, Ordering::Relaxed);
        w.0[0].store(seq + 1, Ordering::Release);
    }
    std::hint::black_box(receiver.join().expect("receiver"));
    msgs as f64 / start.elapsed().as_secs_f64()
}

/// The soft device's own stream, as `zcperf send-bw -s 64` runs it.
fn device(msgs: u64) -> f64 {
    let p = Params {
        size: 64,
        iters: msgs,
        tx_depth: 128,
        rx_depth: 512,
        post_list: 16,
        inline: true,
    };
    let addr = format!("stream-models-{}", std::process::id());
    let bw = raw::stream_bw(
        SoftDevice::new() as Arc<dyn Transport>,
        SoftDevice::new() as Arc<dyn Transport>,
        &addr,
        &p,
        Opcode::Send,
    )
    .expect("the device's stream");
    bw.msgs as f64 / bw.elapsed.as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let msgs: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    type Model = (&'static str, Box<dyn Fn(u64) -> f64>);
    let models: Vec<Model> = vec![
        ("device", Box::new(device)),
        ("crossbeam", Box::new(refs::crossbeam_msgrate)),
        ("spsc", Box::new(refs::spsc_msgrate)),
        ("sender-exec", Box::new(|n| sender_exec(n, 0))),
        ("sender-exec+20", Box::new(|n| sender_exec(n, 20))),
        ("recv-exec", Box::new(|n| recv_exec(n, false))),
        ("recv-exec-fresh", Box::new(|n| recv_exec(n, true))),
    ];
    let mut rate = vec![Vec::new(); models.len()];
    let mut ratio = vec![Vec::new(); models.len()];
    for _ in 0..rounds {
        let r: Vec<f64> = models.iter().map(|(_, f)| f(msgs)).collect();
        for (i, x) in r.iter().enumerate() {
            rate[i].push(x / 1e6);
            ratio[i].push(x / r[1]);
        }
    }
    println!("{msgs} messages of 64 B, {rounds} rounds (medians)");
    println!("{:<16} {:>10} {:>13}", "model", "Mmsg/s", "/ crossbeam");
    for (i, (name, _)) in models.iter().enumerate() {
        println!(
            "{:<16} {:>10.1} {:>12.2}x",
            name,
            median(&mut rate[i]),
            median(&mut ratio[i])
        );
    }
}
