//! References measured in the same run as zcmsg, so figures are ratios on
//! one machine at one moment: the physical floor (two cores handing one cache
//! line back and forth), `crossbeam-channel`, an SPSC ring, and a plain
//! `copy_from_slice`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Payload of the message-passing references: 64 bytes, like the 64 B SENDs.
pub type Msg = [u8; 64];

/// One-way latency of two threads handing an `AtomicU64` back and forth.
pub fn atomic_pingpong(iters: u64) -> Duration {
    #[repr(align(128))]
    struct Line(AtomicU64);
    let line = Arc::new(Line(AtomicU64::new(0)));
    let peer = line.clone();
    let t = std::thread::spawn(move || {
        for i in 0..iters {
            while peer.0.load(Ordering::Acquire) != 2 * i + 1 {
                std::hint::spin_loop();
            }
            peer.0.store(2 * i + 2, Ordering::Release);
        }
    });
    let start = Instant::now();
    for i in 0..iters {
        line.0.store(2 * i + 1, Ordering::Release);
        while line.0.load(Ordering::Acquire) != 2 * i + 2 {
            std::hint::spin_loop();
        }
    }
    let el = start.elapsed();
    t.join().unwrap();
    el / (2 * iters as u32).max(1)
}

/// One-way latency of a 64-byte message over two bounded crossbeam channels.
pub fn crossbeam_pingpong(iters: u64) -> Duration {
    let (tx_a, rx_a) = crossbeam_channel::bounded::<Msg>(1);
    let (tx_b, rx_b) = crossbeam_channel::bounded::<Msg>(1);
    let t = std::thread::spawn(move || {
        for _ in 0..iters {
            let m = rx_a.recv().unwrap();
            tx_b.send(m).unwrap();
        }
    });
    let start = Instant::now();
    let mut m = [7u8; 64];
    for i in 0..iters {
        m[0] = i as u8;
        tx_a.send(m).unwrap();
        m = rx_b.recv().unwrap();
    }
    let el = start.elapsed();
    t.join().unwrap();
    el / (2 * iters as u32).max(1)
}

/// Messages per second of 64-byte messages through a bounded crossbeam channel.
pub fn crossbeam_msgrate(iters: u64) -> f64 {
    let (tx, rx) = crossbeam_channel::bounded::<Msg>(1024);
    let t = std::thread::spawn(move || {
        let mut sum = 0u64;
        for _ in 0..iters {
            sum += u64::from(rx.recv().unwrap()[0]);
        }
        sum
    });
    let start = Instant::now();
    let mut m = [1u8; 64];
    for i in 0..iters {
        m[0] = i as u8;
        tx.send(m).unwrap();
    }
    t.join().unwrap();
    iters as f64 / start.elapsed().as_secs_f64()
}

/// Messages per second of 64-byte messages through an SPSC ring (`rtrb`).
pub fn spsc_msgrate(iters: u64) -> f64 {
    let (mut p, mut c) = rtrb::RingBuffer::<Msg>::new(1024);
    let t = std::thread::spawn(move || {
        let mut got = 0u64;
        let mut sum = 0u64;
        while got < iters {
            match c.pop() {
                Ok(m) => {
                    sum += u64::from(m[0]);
                    got += 1;
                }
                Err(_) => std::hint::spin_loop(),
            }
        }
        sum
    });
    let start = Instant::now();
    let mut m = [1u8; 64];
    for i in 0..iters {
        m[0] = i as u8;
        while p.push(m).is_err() {
            std::hint::spin_loop();
        }
    }
    t.join().unwrap();
    iters as f64 / start.elapsed().as_secs_f64()
}

/// Bytes per second of `copy_from_slice` of `size` bytes between two
/// page-aligned buffers (the floor of any device that copies).
pub fn copy_bw(size: usize, iters: u64) -> f64 {
    let mut a = vec![0u8; size + 4096];
    let mut b = vec![0u8; size + 4096];
    let (oa, ob) = (a.as_ptr().align_offset(4096), b.as_ptr().align_offset(4096));
    let src = &mut a[oa..oa + size];
    let dst = &mut b[ob..ob + size];
    for (i, x) in src.iter_mut().enumerate() {
        *x = i as u8;
    }
    let start = Instant::now();
    for i in 0..iters {
        src[0] = i as u8;
        dst.copy_from_slice(src);
        std::hint::black_box(&mut *dst);
    }
    size as f64 * iters as f64 / start.elapsed().as_secs_f64()
}

/// As [`copy_bw`], from one buffer into `dsts` destination buffers in
/// turn, all slots of one arena (the memory the SEND's source and receives
/// are): the working set of a SEND stream whose receives each have their
/// own buffer, which the one-destination copy, hot in the cache, does not
/// pay for.
pub fn copy_bw_spread(size: usize, dsts: usize, iters: u64) -> f64 {
    use bytes::BufMut;
    let dsts = dsts.max(1);
    let dev = zcmsg_soft::SoftDevice::new();
    let pd = zcmsg::Pd::new(dev as Arc<dyn zcmsg::Transport>);
    let arena = pd
        .arena(zcmsg::ArenaConfig::new(size, dsts + 1))
        .expect("an arena for the copy reference");
    let mut slots: Vec<zcmsg::SlotMut> = (0..=dsts)
        .map(|_| {
            let mut s = arena.alloc().expect("a slot of the arena just made");
            s.put_bytes(1, size);
            s
        })
        .collect();
    let mut src = slots.pop().expect("dsts + 1 slots");
    let start = Instant::now();
    for i in 0..iters {
        src.as_mut_slice()[0] = i as u8;
        let d = &mut slots[i as usize % dsts];
        d.as_mut_slice().copy_from_slice(src.as_slice());
        std::hint::black_box(&mut *d);
    }
    size as f64 * iters as f64 / start.elapsed().as_secs_f64()
}

/// UCX's own figures from `ucx_perftest` over shared memory (`UCX_TLS=sm`),
/// server and client on 127.0.0.1, if `ucx_perftest` is installed (Debian
/// package `ucx-utils`). Returns (median latency in µs, message rate in msg/s)
/// from the "Final:" line for `tag_lat` or `tag_bw`.
pub fn ucx_perftest(test: &str, size: usize, iters: u64) -> Option<(f64, f64)> {
    use std::process::{Command, Stdio};
    let run = |server: bool| {
        let mut c = Command::new("ucx_perftest");
        if !server {
            c.arg("127.0.0.1");
        }
        c.args([
            "-t",
            test,
            "-s",
            &size.to_string(),
            "-n",
            &iters.to_string(),
            "-f",
            "-p",
            "13337",
        ])
        .env("UCX_TLS", "sm,self")
        .stdin(Stdio::null())
        .stderr(Stdio::null());
        c
    };
    let mut srv = run(true).stdout(Stdio::null()).spawn().ok()?;
    std::thread::sleep(Duration::from_millis(500));
    let out = run(false).output();
    let _ = srv.wait();
    let out = out.ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // With -f the result is one line of numbers (without -f it starts "Final:").
    let f: Vec<f64> = text
        .lines()
        .map(|l| l.trim_start().trim_start_matches("Final:"))
        .map(|l| {
            l.split_whitespace()
                .map(|x| x.parse::<f64>())
                .collect::<Result<Vec<f64>, _>>()
        })
        .filter_map(Result::ok)
        .rfind(|v| v.len() >= 8)?;
    // iterations, lat p50, lat avg, lat overall, bw avg, bw overall, rate avg, rate overall
    (f.len() >= 8).then(|| (f[1], f[7]))
}
