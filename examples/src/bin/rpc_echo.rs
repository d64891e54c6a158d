//! RPC echo with a bulk transfer: the client names a region of its memory in
//! the request, the server pulls it with an RDMA READ, checksums it, and
//! replies. Prints call latency and the copy counters.
//!
//! `cargo run --release -p zcmsg-examples --bin rpc_echo`

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use clap::Parser;
use zcmsg::{Access, Endpoint, EndpointConfig, Pd, Rpc};

const ECHO: u16 = 1;
const SUM_BULK: u16 = 2;
/// Bulk calls made; the later half is reported.
const BULK_CALLS: usize = 16;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    dev: zcmsg_examples::DeviceArgs,
    /// Calls to make.
    #[arg(long, default_value_t = 20_000)]
    calls: u64,
}

fn main() {
    if let Err(e) = run(&Args::parse()) {
        eprintln!("rpc_echo: {e}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> Result<(), String> {
    let (dev_a, dev_b, addr) = zcmsg_examples::devices(&a.dev, "rpc-echo")?;
    let cfg = EndpointConfig::default();
    let pd_b = Pd::new(dev_b.clone());
    let mut listener = dev_b.listen(&addr, &cfg.qp).map_err(|e| e.to_string())?;
    let at = listener.local_addr();
    let scfg = cfg.clone();
    let server = std::thread::spawn(move || -> Result<(), String> {
        let ep = Endpoint::accept(&pd_b, &mut *listener, &scfg).map_err(|e| e.to_string())?;
        let mut rpc = Rpc::new(ep, 1 << 20).map_err(|e| e.to_string())?;
        rpc.handle(ECHO, |_, req| Ok(req.into()));
        rpc.handle(SUM_BULK, |bulk, req| {
            let region = zcmsg::RemoteRegion::from_bytes(&req).ok_or("bad bulk handle")?;
            let data = bulk.pull(region).map_err(|e| e.to_string())?;
            let sum: u64 = data.as_slice().iter().map(|&b| u64::from(b)).sum();
            Ok(Bytes::copy_from_slice(&sum.to_le_bytes()).into())
        });
        rpc.serve(Duration::from_secs(30))
            .map_err(|e| e.to_string())
    });
    let pd = Pd::new(dev_a);
    let ep = Endpoint::connect(&pd, &at, &cfg).map_err(|e| e.to_string())?;
    let mut rpc = Rpc::new(ep, 4096).map_err(|e| e.to_string())?;
    println!("zcmsg RPC echo on the {} transport", a.dev.transport);

    let t = Instant::now();
    for i in 0..a.calls {
        let req = Bytes::copy_from_slice(&i.to_le_bytes());
        let rep = rpc
            .call(ECHO, req, Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        if rep[..] != i.to_le_bytes() {
            return Err(format!("call {i}: wrong reply"));
        }
    }
    let per = t.elapsed() / a.calls as u32;
    println!(
        "  {} echo calls: {:.2} us per call (round trip)",
        a.calls,
        per.as_nanos() as f64 / 1000.0
    );

    // Bulk: expose 1 MiB of ours; the server pulls it and returns the checksum.
    let mut win = pd
        .window(1 << 20, Access::REMOTE_READ)
        .map_err(|e| e.to_string())?;
    win.fill(3);
    let handle = win.remote();
    let mut req = bytes::BytesMut::new();
    req.put_slice(&handle.to_bytes());
    let req = req.freeze();
    let before = rpc.endpoint().copies();
    // The first pulls also touch the server's bulk buffers for the first
    // time (page faults); the median of the later ones is the steady state.
    let mut us = Vec::with_capacity(BULK_CALLS);
    for _ in 0..BULK_CALLS {
        let t = Instant::now();
        let rep = rpc
            .call(SUM_BULK, req.clone(), Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let sum = u64::from_le_bytes(rep[..8].try_into().map_err(|_| "short reply")?);
        if sum != 3 * (1 << 20) {
            return Err(format!("bulk checksum {sum} is wrong"));
        }
        us.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    let first = us[0];
    let mut warm = us[BULK_CALLS / 2..].to_vec();
    warm.sort_by(f64::total_cmp);
    let copied = rpc.endpoint().copies().since(&before);
    println!(
        "  1 MiB bulk pulled by the server and checksummed: {:.1} us a call (median of the last {}; the first took {:.1} us, touching the server's buffers); client-side framework copies: {} B",
        warm[warm.len() / 2],
        warm.len(),
        first,
        copied.bounce_bytes + copied.coalesce_bytes
    );
    drop(win.revoke());
    rpc.endpoint().try_close().map_err(|e| e.to_string())?;
    rpc.endpoint()
        .wait(Duration::from_secs(10), |e| e.is_eos())
        .map_err(|e| e.to_string())?;
    server.join().map_err(|_| "server panicked")??;
    println!("  server finished cleanly");
    Ok(())
}
