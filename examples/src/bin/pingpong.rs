//! Ping-pong between two endpoints: small messages for latency, eager and
//! rendezvous messages for bandwidth, with the copy counters printed to show
//! what was (not) copied.
//!
//! `cargo run --release -p zcmsg-examples --bin pingpong -- --iters 100000`

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use clap::Parser;
use zcmsg::{ArenaConfig, Endpoint, EndpointConfig, Pd, Recv};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    dev: zcmsg_examples::DeviceArgs,
    /// Round trips for the latency run.
    #[arg(long, default_value_t = 100_000)]
    iters: u64,
    /// Message size for the latency run.
    #[arg(long, default_value_t = 64)]
    size: usize,
}

fn main() {
    let a = Args::parse();
    if let Err(e) = run(&a) {
        eprintln!("pingpong: {e}");
        std::process::exit(1);
    }
}

fn echo(
    pd: Pd,
    mut listener: Box<dyn zcmsg::Listener>,
    cfg: EndpointConfig,
) -> Result<u64, String> {
    let mut ep = Endpoint::accept(&pd, &mut *listener, &cfg).map_err(|e| e.to_string())?;
    let mut n = 0;
    loop {
        match ep
            .recv_timeout(Duration::from_secs(30))
            .map_err(|e| e.to_string())?
        {
            // Echo the received Bytes themselves: zero-copy both ways when registered.
            Recv::Message(m) => {
                ep.try_send(m).map_err(|e| e.to_string())?;
                n += 1;
            }
            Recv::Eos => {
                ep.try_close().map_err(|e| e.to_string())?;
                ep.wait(Duration::from_secs(10), |e| e.close_delivered())
                    .map_err(|e| e.to_string())?;
                return Ok(n);
            }
        }
    }
}

fn run(a: &Args) -> Result<(), String> {
    let (dev_a, dev_b, addr) = zcmsg_examples::devices(&a.dev, "pingpong")?;
    let cfg = EndpointConfig::default();
    let pd_b = Pd::new(dev_b.clone());
    let listener = dev_b.listen(&addr, &cfg.qp).map_err(|e| e.to_string())?;
    let at = listener.local_addr();
    let server_cfg = cfg.clone();
    let server = std::thread::spawn(move || echo(pd_b, listener, server_cfg));
    let pd = Pd::new(dev_a);
    let mut ep = Endpoint::connect(&pd, &at, &cfg).map_err(|e| e.to_string())?;
    let arena = pd
        .arena(ArenaConfig::new(8 << 20, 4))
        .map_err(|e| e.to_string())?;
    println!(
        "zcmsg ping-pong on the {} transport (eager limit {} B)",
        a.dev.transport,
        ep.eager_limit()
    );

    // Latency: one message in flight.
    let mut slot = arena.alloc().ok_or("no slot")?;
    slot.put_bytes(0x42, a.size);
    let msg = slot.freeze();
    let before = ep.copies();
    let mut samples = Vec::with_capacity(a.iters as usize);
    // One clock read per round trip (its end is the next one's start), and
    // each echo checked (and its receive slot sent home) while the next
    // request travels: off the path being timed.
    let check = |m: &Bytes| m.len() == a.size && m.iter().all(|&b| b == 0x42);
    let mut last: Option<Bytes> = None;
    let mut t = Instant::now();
    for _ in 0..a.iters {
        ep.try_send(msg.clone()).map_err(|e| e.to_string())?;
        if let Some(m) = last.take() {
            if !check(&m) {
                return Err(format!("bad echo: {m:?}"));
            }
        }
        match ep
            .recv_timeout(Duration::from_secs(10))
            .map_err(|e| e.to_string())?
        {
            Recv::Message(m) => last = Some(m),
            other => return Err(format!("bad echo: {other:?}")),
        }
        let now = Instant::now();
        samples.push((now - t).as_nanos() as u64 / 2);
        t = now;
    }
    if let Some(m) = last.take() {
        if !check(&m) {
            return Err(format!("bad echo: {m:?}"));
        }
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    println!(
        "  {} B one-way latency over {} round trips: median {:.2} us, p99 {:.2} us, p99.9 {:.2} us",
        a.size,
        a.iters,
        pct(0.5),
        pct(0.99),
        pct(0.999)
    );
    let lat_copies = ep.copies().since(&before);
    println!(
        "  copies by the framework: {} B inline (small messages go inline: the payload is copied into the request at post time, its header rides in the immediate), {} B bounced, {} B coalesced",
        lat_copies.inline_bytes, lat_copies.bounce_bytes, lat_copies.coalesce_bytes
    );
    drop(msg);

    // Bandwidth: eager (64 KiB) and rendezvous (4 MiB) round trips, many in flight.
    for (size, count) in [(64usize << 10, 2000u64), (4 << 20, 200)] {
        let mut slot = arena.alloc().ok_or("no slot")?;
        slot.put_bytes(0x17, size);
        let msg = slot.freeze();
        let before = ep.copies();
        let t = Instant::now();
        let (mut sent, mut got) = (0u64, 0u64);
        while got < count {
            while sent < count && sent - got < 32 {
                ep.try_send(msg.clone()).map_err(|e| e.to_string())?;
                sent += 1;
            }
            match ep
                .recv_timeout(Duration::from_secs(30))
                .map_err(|e| e.to_string())?
            {
                Recv::Message(m) if m.len() == size && m[0] == 0x17 && m[size - 1] == 0x17 => {
                    got += 1
                }
                other => return Err(format!("bad echo of {size} B: {other:?}")),
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let c = ep.copies().since(&before);
        let mode = if size <= ep.eager_limit() {
            "eager"
        } else {
            "rendezvous"
        };
        println!(
            "  {size:>8} B {mode:<10} echo: {:.2} GB/s each way, {:.0} msg/s; payload bytes copied by the framework: {} (headers inline: {} B)",
            (size as f64 * count as f64) / secs / 1e9,
            count as f64 / secs,
            c.bounce_bytes + c.coalesce_bytes,
            c.inline_bytes
        );
    }
    ep.try_close().map_err(|e| e.to_string())?;
    ep.wait(Duration::from_secs(10), |e| e.is_eos())
        .map_err(|e| e.to_string())?;
    let served = server.join().map_err(|_| "server panicked")??;
    println!("  server echoed {served} messages; closed cleanly");
    Ok(())
}
