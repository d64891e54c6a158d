//! How close a SEND ping-pong through completion queues can come to the
//! one-line floor on this machine. Two-thread ping-pongs, each timed
//! over N round trips (total time over 2N hops, one way), in alternating
//! rounds:
//! - `floor`: one `AtomicU64` handed back and forth (the summary's floor);
//! - `rings`: the least a SEND through completion queues moves, with no
//!   device at all: each side writes a 16-byte completion into the other's
//!   ring (four to a cache line) and spins on its own;
//! - `shared`: the same, the two rings sharing their lines by fours (a
//!   line holds entries `i..i+4` of both, as the soft device lays out the
//!   completions of a pair's two ends): a round trip's two completions go
//!   into one line, which each side has just read when it writes;
//! - `shared+lock`: `shared`, each side writing its completion and a 64 B
//!   payload (a line of its own) under a mutex of its own, as the device
//!   posts under its send queue's mutex;
//! - `shared+lock+read`: `shared+lock`, each side also reading the payload
//!   it received, after its answer (or next request) is out, as `zcperf
//!   send-lat` checks its messages: still no device, only the data
//!   movement a checked ping-pong asks for;
//! - `pair` and `connect_pair`: the soft device's 64 B inline SEND
//!   ping-pong between the two ends of `SoftDevice::pair` (one device) and
//!   of `SoftDevice::connect_pair` (two), each side posting its answer
//!   (or next request) before it reposts the receive it took;
//! - `pair+read`: `pair`, each side also reading the first byte of the
//!   message it received before reposting its receive.
//!
//! ```text
//! cargo run --release -p zcmsg-bench --example two_rings -- [N] [ROUNDS]
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use zcmsg::{
    Arena, ArenaConfig, Pd, QpConfig, QueuePair, RecvRequest, SendFlags, SlotMut, Transport,
    WorkCompletion, WorkRequest,
};
use zcmsg_soft::SoftDevice;

/// One way, in ns, of `n` round trips that took `ns` in all.
fn one_way(ns: u128, n: u64) -> f64 {
    ns as f64 / n as f64 / 2.0
}

fn floor(n: u64) -> f64 {
    let f = Arc::new(AtomicU64::new(0));
    let g = f.clone();
    let echo = std::thread::spawn(move || {
        for i in 0..n {
            while g.load(Ordering::Acquire) != 2 * i + 1 {
                std::hint::spin_loop();
            }
            g.store(2 * i + 2, Ordering::Release);
        }
    });
    let t = Instant::now();
    for i in 0..n {
        f.store(2 * i + 1, Ordering::Release);
        while f.load(Ordering::Acquire) != 2 * i + 2 {
            std::hint::spin_loop();
        }
    }
    let ns = t.elapsed().as_nanos();
    echo.join().expect("echo thread");
    one_way(ns, n)
}

/// A completion ring of 32 entries of 16 bytes, four to a cache line.
#[repr(align(64))]
#[derive(Default)]
struct Line([AtomicU64; 8]);

struct Ring(Vec<Line>);

impl Ring {
    fn new() -> Arc<Ring> {
        Arc::new(Ring((0..8).map(|_| Line::default()).collect()))
    }
    fn entry(&self, seq: u64) -> &AtomicU64 {
        &self.0[(seq % 32 / 4) as usize].0[(seq % 4 * 2) as usize]
    }
    fn complete(&self, seq: u64) {
        self.entry(seq).store(seq + 1, Ordering::Release);
    }
    fn wait(&self, seq: u64) {
        while self.entry(seq).load(Ordering::Acquire) != seq + 1 {
            std::hint::spin_loop();
        }
    }
}

fn rings(n: u64) -> f64 {
    let (a, b) = (Ring::new(), Ring::new());
    let (a2, b2) = (a.clone(), b.clone());
    let echo = std::thread::spawn(move || {
        for i in 0..n {
            b2.wait(i);
            a2.complete(i);
        }
    });
    let t = Instant::now();
    for i in 0..n {
        b.complete(i);
        a.wait(i);
    }
    let ns = t.elapsed().as_nanos();
    echo.join().expect("echo thread");
    one_way(ns, n)
}

/// `rings` with the two rings in the same lines, four entries of each side
/// to a line; with `locked`, each side writes a 64 B payload into a slot of
/// the other's and its completion under a mutex of its own; with `read`,
/// each side then reads the payload it received, after its own write.
fn shared(n: u64, locked: bool, read: bool) -> f64 {
    #[derive(Default)]
    #[repr(align(128))]
    struct Side {
        lock: std::sync::Mutex<()>,
    }
    struct Shared {
        lines: Vec<Line>,
        slots: [Vec<Line>; 2],
        sides: [Side; 2],
    }
    impl Shared {
        fn entry(&self, side: usize, seq: u64) -> &AtomicU64 {
            let i = (seq % 32) as usize;
            &self.lines[i / 4].0[side * 4 + i % 4]
        }
        fn complete(&self, side: usize, seq: u64, locked: bool) {
            let _g = locked.then(|| self.sides[side].lock.lock().expect("lock"));
            if locked {
                for w in &self.slots[side][(seq % 16) as usize].0 {
                    w.store(seq, Ordering::Relaxed);
                }
            }
            self.entry(side, seq).store(seq + 1, Ordering::Release);
        }
        fn wait(&self, side: usize, seq: u64) {
            while self.entry(side, seq).load(Ordering::Acquire) != seq + 1 {
                std::hint::spin_loop();
            }
        }
        /// The first word of the payload `side` received as `seq`.
        fn read(&self, side: usize, seq: u64) -> u64 {
            self.slots[side][(seq % 16) as usize].0[0].load(Ordering::Relaxed)
        }
    }
    let lines = || (0..16).map(|_| Line::default()).collect::<Vec<_>>();
    let s = Arc::new(Shared {
        lines: (0..8).map(|_| Line::default()).collect(),
        slots: [lines(), lines()],
        sides: Default::default(),
    });
    let s2 = s.clone();
    let echo = std::thread::spawn(move || {
        let mut seen = 0u64;
        for i in 0..n {
            s2.wait(1, i);
            s2.complete(0, i, locked);
            if read {
                seen = seen.wrapping_add(s2.read(1, i));
            }
        }
        seen
    });
    let mut seen = 0u64;
    let t = Instant::now();
    for i in 0..n {
        s.complete(1, i, locked);
        if read && i > 0 {
            seen = seen.wrapping_add(s.read(0, i - 1));
        }
        s.wait(0, i);
    }
    let ns = t.elapsed().as_nanos();
    seen = seen.wrapping_add(echo.join().expect("echo thread"));
    std::hint::black_box(seen);
    one_way(ns, n)
}

/// One end of a device ping-pong: its queue pair, 16 posted receive slots
/// and a 64-byte message slot.
struct End {
    qp: Box<dyn QueuePair>,
    _pd: Pd,
    _arena: Arena,
    recv: Vec<SlotMut>,
    msg: SlotMut,
}

impl End {
    fn new(dev: &Arc<SoftDevice>, qp: Box<dyn QueuePair>) -> End {
        let pd = Pd::new(dev.clone() as Arc<dyn Transport>);
        let arena = pd.arena(ArenaConfig::new(64, 20)).expect("arena");
        let recv: Vec<SlotMut> = (0..16).map(|_| arena.alloc().expect("slot")).collect();
        let mut msg = arena.alloc().expect("slot");
        msg.set_len(64);
        let mut e = End {
            qp,
            _pd: pd,
            _arena: arena,
            recv,
            msg,
        };
        for i in 0..16 {
            e.repost(i);
        }
        e
    }

    fn repost(&mut self, i: u64) {
        let sge = [self.recv[i as usize].sge()];
        self.qp
            .post_recv(&[RecvRequest {
                wr_id: i,
                sg_list: &sge,
            }])
            .expect("post_recv");
    }

    fn send(&mut self, seq: u64) {
        let mut flags = SendFlags::INLINE;
        if seq % 64 == 63 {
            flags |= SendFlags::SIGNALED;
        }
        let sge = [self.msg.sge_filled()];
        self.qp
            .post_send(&[WorkRequest::send(seq, &sge).with_flags(flags)])
            .expect("post_send");
    }

    /// The first byte of the message receive `i` holds.
    fn first_byte(&mut self, i: u64) -> u8 {
        let s = &mut self.recv[i as usize];
        s.set_len(64);
        s.as_slice()[0]
    }

    /// Spin until a receive completes; returns its wr_id.
    fn recv(&mut self, wc: &mut [WorkCompletion]) -> u64 {
        loop {
            let k = self.qp.poll_cq(wc);
            if let Some(w) = wc[..k].iter().find(|w| w.opcode.is_recv()) {
                assert!(w.status.is_ok(), "receive failed: {w:?}");
                return w.wr_id;
            }
        }
    }
}

fn device(n: u64, two_devices: bool, read: bool) -> f64 {
    let cfg = QpConfig {
        max_send_wr: 128,
        max_recv_wr: 16,
        max_send_sge: 1,
        max_recv_sge: 1,
        max_inline_data: 64,
        ..QpConfig::default()
    };
    let (da, db) = (SoftDevice::new(), SoftDevice::new());
    let (qa, qb) = if two_devices {
        SoftDevice::connect_pair(&da, &db, &cfg, &cfg).expect("connect_pair")
    } else {
        da.pair(&cfg, &cfg).expect("pair")
    };
    let mut a = End::new(&da, qa);
    let mut b = End::new(if two_devices { &db } else { &da }, qb);
    let echo = std::thread::spawn(move || {
        let mut wc = [WorkCompletion::EMPTY; 16];
        let mut seen = 0u64;
        for i in 0..n {
            let id = b.recv(&mut wc);
            b.send(i);
            if read {
                seen += u64::from(b.first_byte(id));
            }
            b.repost(id);
        }
        (b, seen)
    });
    let mut wc = [WorkCompletion::EMPTY; 16];
    let mut seen = 0u64;
    let t = Instant::now();
    let mut taken = None;
    for i in 0..n {
        a.send(i);
        if let Some(id) = taken.take() {
            if read {
                seen += u64::from(a.first_byte(id));
            }
            a.repost(id);
        }
        taken = Some(a.recv(&mut wc));
    }
    let ns = t.elapsed().as_nanos();
    let (b, seen_b) = echo.join().expect("echo thread");
    std::hint::black_box(seen + seen_b);
    drop((a, b));
    one_way(ns, n)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().map_or(1_000_000, |s| s.parse().expect("N"));
    let rounds: usize = args.next().map_or(5, |s| s.parse().expect("ROUNDS"));
    let names = [
        "floor",
        "rings",
        "shared",
        "shared+lock",
        "shared+lock+read",
        "pair",
        "connect_pair",
        "pair+read",
    ];
    let mut t: [Vec<f64>; 8] = Default::default();
    for _ in 0..rounds {
        t[0].push(floor(n));
        t[1].push(rings(n));
        t[2].push(shared(n, false, false));
        t[3].push(shared(n, true, false));
        t[4].push(shared(n, true, true));
        t[5].push(device(n, false, false));
        t[6].push(device(n, true, false));
        t[7].push(device(n, false, true));
    }
    let m: Vec<f64> = t.into_iter().map(median).collect();
    println!("{n} round trips, median of {rounds} rounds, one way:");
    for (name, v) in names.iter().zip(&m) {
        println!(
            "  {name:<17} {v:7.1} ns   /floor {:.2}x   /rings {:.2}x",
            v / m[0],
            v / m[1]
        );
    }
}
