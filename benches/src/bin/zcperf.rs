//! zcperf: perftest-style benchmarks of zcmsg transports, each printed beside
//! references measured in the same run.
//!
//! ```text
//! zcperf                      # the summary on the in-process device
//! zcperf send-lat -s 64 -n 100000       # perftest's spelling works too: send_lat
//! zcperf send-bw -s 65536
//! zcperf write-bw -s 1048576
//! zcperf send-bw -a                     # every size from 2 B to 8 MiB (perftest -a)
//! zcperf send-lat --transport verbs -d rxe0 --addr 192.0.2.1 -x 1   # features = ["verbs"]
//! zcperf write-lat --transport verbs -s 64
//! zcperf ep-lat --transport verbs -s 64
//! zcperf ep-bw --transport verbs -s 65536
//! ```
//!
//! With `--transport verbs` and no HOST, both sides are opened on the same
//! RDMA device (each with its own protection domain) and connected through
//! rdma_cm on `--addr` (a loopback on the device, like perftest's server and
//! client on one port). Across two hosts, as perftest runs:
//!
//! ```text
//! host-b$ zcperf send-lat --transport verbs -d mlx5_0 --server          # serves one run
//! host-a$ zcperf send-lat --transport verbs -d mlx5_0 -s 64 -n 100000 host-b
//! ```
//!
//! The client chooses the size, the iterations and the post list and sends
//! them to the server (each side keeps its own `-t`, `-r`, `-I`); each side
//! checks the data it receives, and the server refuses, with the reason on
//! both sides, a client that asks for another test. `-x` checks that the
//! connection uses that GID index (rdma_cm picks the GID from the address:
//! `--addr` is the client's source address).

use std::sync::Arc;

use clap::{Parser, ValueEnum};
use zcmsg::{Opcode, Transport};
use zcmsg_bench::raw::{self, Params};
use zcmsg_bench::wire::{self, TestKind};
use zcmsg_bench::{refs, report};

/// The device's address the loopback connects through (the Soft-RoCE lab's).
#[cfg(feature = "verbs")]
const LOOPBACK_ADDR: &str = "192.0.2.1";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Test {
    /// Latency, SEND ping-pong and references, then message rate and bandwidth.
    Summary,
    /// SEND ping-pong latency (RTT/2), like ib_send_lat.
    #[value(alias = "send_lat")]
    SendLat,
    /// SEND stream bandwidth, like ib_send_bw.
    #[value(alias = "send_bw")]
    SendBw,
    /// RDMA WRITE stream bandwidth, like ib_write_bw.
    #[value(alias = "write_bw")]
    WriteBw,
    /// RDMA WRITE ping-pong latency (RTT/2), like ib_write_lat (on verbs each
    /// side watches its window's last byte; on the soft device each WRITE
    /// carries an immediate and is seen by its receive completion).
    #[value(alias = "write_lat")]
    WriteLat,
    /// Endpoint ping-pong latency (framing, credits, zero-copy receive).
    #[value(alias = "ep_lat")]
    EpLat,
    /// Endpoint one-way stream bandwidth.
    #[value(alias = "ep_bw")]
    EpBw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// The in-process software device (no hardware needed).
    Soft,
    /// An RDMA device through libibverbs and rdma_cm (build with the
    /// `verbs` feature).
    #[cfg(feature = "verbs")]
    Verbs,
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "zcperf",
    about = "zcmsg benchmarks with perftest's options and columns"
)]
struct Args {
    /// Which test.
    #[arg(value_enum, default_value = "summary")]
    test: Test,
    /// Transport.
    #[arg(long, value_enum, default_value = "soft")]
    transport: Kind,
    /// Message size in bytes (perftest -s).
    #[arg(short = 's', long)]
    size: Option<usize>,
    /// Iterations (perftest -n).
    #[arg(short = 'n', long)]
    iters: Option<u64>,
    /// Send queue depth (perftest -t).
    #[arg(short = 't', long = "tx-depth", default_value_t = 128)]
    tx_depth: u32,
    /// Receive queue depth (perftest -r).
    #[arg(short = 'r', long = "rx-depth", default_value_t = 512)]
    rx_depth: u32,
    /// Requests per post list (perftest -l).
    #[arg(short = 'l', long = "post_list", default_value_t = 16)]
    post_list: u32,
    /// Run every message size from 2 B to 8 MiB (perftest -a); without -n
    /// each size moves about 2 GiB (1,000 to 100,000 iterations). A server
    /// started with -a serves the client's whole sweep.
    #[arg(short = 'a', long = "all")]
    all: bool,
    /// Do not send inline (perftest -I 0).
    #[arg(long)]
    no_inline: bool,
    /// ep-lat: send from and receive into the caller's buffer
    /// (`try_send_slice`, `try_recv_into`: the copy path for small
    /// messages, no allocation) instead of zero-copy `Bytes`.
    #[arg(long, conflicts_with = "slot")]
    copy: bool,
    /// ep-lat: send from the caller's buffer, receive where the message
    /// arrived (`try_recv_slot`, read in place, then `recycle`: no copy on
    /// receipt, no allocation) instead of as zero-copy `Bytes`.
    #[arg(long)]
    slot: bool,
    /// RDMA device (perftest -d), for `--transport verbs`.
    #[arg(short = 'd', long = "ib-dev", default_value = "rxe0")]
    ib_dev: String,
    /// Local IP address: of the device the loopback connects through
    /// (default 192.0.2.1); the one `--server` listens on (default: all);
    /// the client's source address (default: routing decides).
    #[arg(long)]
    addr: Option<String>,
    /// Serve one run of the test to a zcperf client on another host
    /// (perftest's server side), with `--transport verbs`.
    #[arg(long, conflicts_with = "host")]
    server: bool,
    /// Run as the client of `zcperf TEST --server` on HOST (perftest's
    /// client side), with `--transport verbs`.
    host: Option<String>,
    /// The server's port (perftest -p).
    #[arg(short = 'p', long, default_value_t = wire::DEFAULT_PORT)]
    port: u16,
    /// GID index the connection must use (perftest -x); rdma_cm picks the
    /// GID from `--addr`, so this is checked, not set.
    #[arg(short = 'x', long = "gid-index")]
    gid_index: Option<u8>,
}

type Devices = (Arc<dyn Transport>, Arc<dyn Transport>, String);

/// Two devices ("hosts") and the address the second listens on, for `tag`.
fn devices(a: &Args, tag: &str) -> Result<Devices, String> {
    match a.transport {
        Kind::Soft => Ok((
            zcmsg_soft::SoftDevice::new() as Arc<dyn Transport>,
            zcmsg_soft::SoftDevice::new() as Arc<dyn Transport>,
            format!("zcperf-{}-{tag}", std::process::id()),
        )),
        #[cfg(feature = "verbs")]
        Kind::Verbs => {
            let open = || {
                zcmsg_verbs::VerbsDevice::open(
                    Some(&a.ib_dev),
                    &zcmsg_verbs::VerbsConfig::default(),
                )
                .map(|d| d as Arc<dyn Transport>)
                .map_err(|e| format!("opening {}: {e}", a.ib_dev))
            };
            let addr = a.addr.as_deref().unwrap_or(LOOPBACK_ADDR);
            Ok((open()?, open()?, format!("{addr}:0")))
        }
    }
}

/// For verbs: the line that says which GID a connection uses, or why it
/// is not the one `-x` asked for (rdma_cm picks the GID from the address).
#[cfg(feature = "verbs")]
fn gid_line(a: &Args, qp: &dyn zcmsg::QueuePair, via: &str) -> Result<String, String> {
    let g = qp
        .as_any()
        .downcast_ref::<zcmsg_verbs::VerbsQp>()
        .and_then(|q| q.gid().cloned())
        .ok_or("the connection's GID could not be read")?;
    match a.gid_index {
        Some(want) if want != g.index => Err(format!(
            "the connection uses GID index {} but -x {want} was asked (rdma_cm picks the GID from the address: {via})",
            g.index
        )),
        _ => Ok(format!(
            "# {} port {} GID index {} {} ({}), via {via}",
            a.ib_dev,
            g.port,
            g.index,
            g.gid,
            g.kind.as_deref().unwrap_or("type unknown")
        )),
    }
}

/// For verbs: connect once and print (and check against `-x`) the GID the
/// connection uses; across hosts, every connection is checked.
#[cfg(feature = "verbs")]
fn check_gid(a: &Args) -> Result<(), String> {
    if a.transport != Kind::Verbs {
        return Ok(());
    }
    if a.server || a.host.is_some() {
        let a = a.clone();
        wire::check_connections(Box::new(move |qp| {
            println!("{}", gid_line(&a, qp, "this connection")?);
            Ok(())
        }));
        return Ok(());
    }
    let (x, y, addr) = devices(a, "gid")?;
    let cfg = zcmsg::QpConfig::default();
    let mut l = y.listen(&addr, &cfg).map_err(|e| e.to_string())?;
    let at = l.local_addr();
    let acc = std::thread::spawn(move || l.accept(std::time::Duration::from_secs(20)));
    let qp = x.connect(&at, &cfg, b"gid").map_err(|e| e.to_string())?;
    let _peer = acc.join().map_err(|_| "accept panicked")?;
    println!("{}", gid_line(a, &*qp, &at)?);
    Ok(())
}

#[cfg(not(feature = "verbs"))]
fn check_gid(_: &Args) -> Result<(), String> {
    Ok(())
}

/// The test as the two-host exchange names it.
fn test_kind(a: &Args) -> Result<TestKind, String> {
    Ok(match a.test {
        Test::Summary => {
            return Err(
                "the summary runs both sides in this process: name a test to run across hosts"
                    .into(),
            )
        }
        Test::SendLat => TestKind::SendLat,
        Test::SendBw => TestKind::SendBw,
        Test::WriteLat => TestKind::WriteLat,
        Test::WriteBw => TestKind::WriteBw,
        Test::EpLat => TestKind::EpLat,
        Test::EpBw => TestKind::EpBw,
    })
}

/// The device of a run across hosts (a client's source address from
/// `--addr`).
fn open_remote(a: &Args) -> Result<Arc<dyn Transport>, String> {
    match a.transport {
        Kind::Soft => Err(
            "the in-process device does not reach other processes: --server and HOST need --transport verbs"
                .into(),
        ),
        #[cfg(feature = "verbs")]
        Kind::Verbs => {
            let mut cfg = zcmsg_verbs::VerbsConfig::default();
            if a.host.is_some() {
                if let Some(s) = &a.addr {
                    cfg.source_addr =
                        Some(s.parse().map_err(|e| format!("--addr {s}: {e}"))?);
                }
            }
            zcmsg_verbs::VerbsDevice::open(Some(&a.ib_dev), &cfg)
                .map(|d| d as Arc<dyn Transport>)
                .map_err(|e| format!("opening {}: {e}", a.ib_dev))
        }
    }
}

/// `zcperf TEST --server`: serve one run (with `-a`, one per size of the
/// sweep) on one listener, and print what each ran.
fn serve_all(a: &Args, test: TestKind) -> Result<(), String> {
    let runs = if a.all { ALL_SIZES.count() } else { 1 };
    let t = open_remote(a)?;
    let p = params(a, 0, 0);
    let cfg = match test {
        TestKind::WriteLat => zcmsg_bench::wlat::qp_config(&p),
        TestKind::EpLat | TestKind::EpBw => zcmsg::EndpointConfig::default().qp,
        _ => raw::qp_config(&p),
    };
    let at = wire::with_port(a.addr.as_deref().unwrap_or("0.0.0.0"), a.port);
    let mut l = t
        .listen(&at, &cfg)
        .map_err(|e| format!("listen {at}: {e}"))?;
    println!(
        "# zcperf {} server on {}: waiting for a client{}",
        test.name(),
        l.local_addr(),
        if runs > 1 {
            format!(" ({runs} runs, -a)")
        } else {
            String::new()
        }
    );
    for _ in 0..runs {
        serve_one(test, t.clone(), &mut *l, &p)?;
    }
    Ok(())
}

/// Serve one client's run on `l`, and print what it ran.
fn serve_one(
    test: TestKind,
    t: Arc<dyn Transport>,
    l: &mut dyn zcmsg::Listener,
    p: &Params,
) -> Result<(), String> {
    let served = match test {
        TestKind::SendLat => raw::send_lat_server(t, l, p),
        TestKind::SendBw => raw::stream_server(t, l, p, Opcode::Send, None),
        TestKind::WriteLat => zcmsg_bench::wlat::write_lat_server(t, l, p),
        TestKind::WriteBw => raw::stream_server(t, l, p, Opcode::RdmaWrite, None),
        TestKind::EpLat => zcmsg_bench::ep::ping_pong_server(t, l),
        TestKind::EpBw => zcmsg_bench::ep::stream_server(t, l, &zcmsg::EndpointConfig::default()),
    }?;
    let h = served.hello;
    println!(
        "# served {}: {} iterations of {} B{}, the data checked",
        test.name(),
        h.iters,
        h.size,
        h.path.label()
    );
    if test == TestKind::SendBw {
        recvs_note(&raw::adopt(p, &h));
    }
    if let Some((msgs, nanos)) = served.measured {
        let secs = nanos as f64 / 1e9;
        report::bw_header();
        report::bw_row(
            h.size as usize,
            h.iters,
            msgs as f64 * h.size as f64 / secs,
            msgs as f64 / secs,
        );
    }
    Ok(())
}

/// Says so when a SEND stream's receiver posted fewer receives than `-r`.
fn recvs_note(p: &Params) {
    if p.stream_recvs() < p.rx_depth {
        println!(
            "# -r {} cut to {} receives of {} B (at most {} MiB of receive buffers)",
            p.rx_depth,
            p.stream_recvs(),
            p.size,
            raw::RECV_BUDGET >> 20
        );
    }
}

/// What one run of a test measured.
enum Row {
    /// Latency samples (ns).
    Lat(Vec<u64>),
    /// Bytes and messages per second, and a note to print under the row.
    Bw(f64, f64, String),
}

/// Where a test runs: both halves in this process, or as the client of a
/// server at an address.
enum Place<'a> {
    Here,
    Client(&'a Arc<dyn Transport>, &'a str),
}

/// Run `test` once with `p`.
fn measure(a: &Args, test: TestKind, p: &Params, place: &Place<'_>) -> Result<Row, String> {
    use zcmsg_bench::{ep, wlat};
    let op = if test == TestKind::WriteBw {
        Opcode::RdmaWrite
    } else {
        Opcode::Send
    };
    let path = if a.copy {
        ep::PingPongPath::Copy
    } else if a.slot {
        ep::PingPongPath::Slot
    } else {
        ep::PingPongPath::Bytes
    };
    let bw = |b: raw::Bandwidth| {
        let secs = b.elapsed.as_secs_f64();
        Row::Bw(b.bytes as f64 / secs, b.msgs as f64 / secs, String::new())
    };
    let copies = |c: zcmsg::CopySnapshot| c.bounce_bytes + c.coalesce_bytes;
    Ok(match place {
        Place::Here => {
            let (x, y, addr) = devices(a, &format!("{}-{}", test.name(), p.size))?;
            match test {
                TestKind::SendLat => Row::Lat(raw::send_lat(x, y, &addr, p)?.samples),
                TestKind::SendBw | TestKind::WriteBw => bw(raw::stream_bw(x, y, &addr, p, op)?),
                TestKind::WriteLat => Row::Lat(wlat::write_lat(x, y, &addr, p)?.samples),
                TestKind::EpLat => Row::Lat(ep::ping_pong(x, y, &addr, p.size, p.iters, path)?),
                TestKind::EpBw => {
                    let (mps, bps, c) = ep::stream(x, y, &addr, p.size, p.iters, false)?;
                    Row::Bw(bps, mps, format!("# framework copies {} B", copies(c)))
                }
            }
        }
        Place::Client(t, at) => {
            let t = (*t).clone();
            match test {
                TestKind::SendLat => Row::Lat(raw::send_lat_client(t, at, p)?.samples),
                TestKind::SendBw | TestKind::WriteBw => bw(raw::stream_client(t, at, p, op, None)?),
                TestKind::WriteLat => Row::Lat(wlat::write_lat_client(t, at, p)?.samples),
                TestKind::EpLat => Row::Lat(ep::ping_pong_client(t, at, p.size, p.iters, path)?),
                TestKind::EpBw => {
                    let cfg = zcmsg::EndpointConfig::default();
                    let (c, nanos) = ep::stream_client(t, at, &cfg, p.size, p.iters)?;
                    let secs = nanos as f64 / 1e9;
                    Row::Bw(
                        (p.iters * p.size as u64) as f64 / secs,
                        p.iters as f64 / secs,
                        format!("# measured by the server; framework copies {} B", copies(c)),
                    )
                }
            }
        }
    })
}

/// perftest's `-a`: every power of two from 2 B to 8 MiB.
const ALL_SIZES: std::ops::RangeInclusive<u32> = 1..=23;

/// The sizes a single test runs: `-s` (or the test's default), or with
/// `-a` every size of [`ALL_SIZES`].
fn sizes(a: &Args, test: TestKind) -> Result<Vec<usize>, String> {
    if !a.all {
        let default = match test {
            TestKind::SendBw | TestKind::WriteBw | TestKind::EpBw => 65536,
            _ => 64,
        };
        return Ok(vec![a.size.unwrap_or(default)]);
    }
    if a.size.is_some() {
        return Err("-a runs every size from 2 B to 8 MiB: drop -s".into());
    }
    if test == TestKind::EpLat && (a.copy || a.slot) {
        return Err(format!(
            "{} sends messages up to the endpoint's inline limit: run it with -s, not -a",
            if a.copy { "--copy" } else { "--slot" }
        ));
    }
    Ok(ALL_SIZES.map(|k| 1usize << k).collect())
}

/// Iterations at `size`: `-n`, or 100,000, or with `-a` and no `-n` as
/// many as move 2 GiB (between 1,000 and 100,000), so the sweep's large
/// sizes take seconds, not minutes.
fn iters_for(a: &Args, size: usize) -> u64 {
    a.iters.unwrap_or(if a.all {
        ((2u64 << 30) / size as u64).clamp(1000, 100_000)
    } else {
        100_000
    })
}

/// `zcperf TEST [HOST]` (not the summary): each size, a row under one
/// header, in this process or as the client of `HOST`.
fn single(a: &Args, test: TestKind, host: Option<&str>) -> Result<(), String> {
    let remote = match host {
        Some(h) => Some((open_remote(a)?, wire::with_port(h, a.port))),
        None => None,
    };
    let place = match &remote {
        Some((t, at)) => Place::Client(t, at),
        None => Place::Here,
    };
    for (i, size) in sizes(a, test)?.into_iter().enumerate() {
        let p = params(a, size, iters_for(a, size));
        let row = measure(a, test, &p, &place).map_err(|e| {
            if i > 0 && host.is_some() {
                format!("{e} (-a: was the server started with -a too?)")
            } else {
                e
            }
        })?;
        match row {
            Row::Lat(samples) => {
                if i == 0 {
                    report::lat_header();
                }
                report::lat_row(p.size, p.iters, &report::summarize(&samples));
            }
            Row::Bw(bps, mps, note) => {
                if i == 0 {
                    report::bw_header();
                }
                report::bw_row(p.size, p.iters, bps, mps);
                if !note.is_empty() {
                    println!("{note}");
                }
                if test == TestKind::SendBw && host.is_none() {
                    recvs_note(&p);
                }
            }
        }
    }
    Ok(())
}

/// Receives posted for the summary's 1 MiB SEND stream.
const SEND_1M_RECVS: u32 = 16;

fn params(a: &Args, size: usize, iters: u64) -> Params {
    Params {
        size: a.size.unwrap_or(size),
        iters: a.iters.unwrap_or(iters),
        tx_depth: a.tx_depth,
        rx_depth: a.rx_depth,
        post_list: a.post_list,
        inline: !a.no_inline,
    }
}

fn run_lat(a: &Args, p: &Params, tag: &str) -> Result<f64, String> {
    let (x, y, addr) = devices(a, tag)?;
    let lat = raw::send_lat(x, y, &addr, p)?;
    let s = report::summarize(&lat.samples);
    report::lat_header();
    report::lat_row(p.size, p.iters, &s);
    Ok(s.typical)
}

fn run_bw(a: &Args, p: &Params, op: Opcode, tag: &str) -> Result<(f64, f64), String> {
    let (x, y, addr) = devices(a, tag)?;
    let bw = raw::stream_bw(x, y, &addr, p, op)?;
    let secs = bw.elapsed.as_secs_f64();
    let (bps, mps) = (bw.bytes as f64 / secs, bw.msgs as f64 / secs);
    report::bw_header();
    report::bw_row(p.size, p.iters, bps, mps);
    Ok((bps, mps))
}

/// Raw/endpoint pairs in the summary's endpoint section.
const PAIRS: usize = 5;

/// Rounds of zcmsg and its references in the summary's first sections
/// (short runs: the median of many ratios is steadier than a few long runs).
const ROUNDS: usize = 9;

/// Median, smallest and largest of `v` (sorted in place; `v` not empty).
fn median_range(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// One reference's line of a paired section: its median, and the median
/// (and range) of zcmsg's per-round ratios to it; `z[i]` and `r[i]` were
/// measured in the same round. A reference that did not run (UCX not
/// installed) says so; `prec` decimals for the reference's figure.
fn paired_row(name: &str, unit: &str, scale: f64, prec: usize, z: &[f64], r: &[f64]) {
    if r.len() != z.len() || r.is_empty() {
        println!("  {name}   not measured (UCX: apt-get install ucx-utils)");
        return;
    }
    let mut ratios: Vec<f64> = z.iter().zip(r).map(|(a, b)| a / b).collect();
    let (m, lo, hi) = median_range(&mut ratios);
    let v = median_range(&mut r.to_vec()).0 * scale;
    println!("  {name}   {v:8.prec$} {unit:<6}  zcmsg/ref = {m:.2}x ({lo:.2}-{hi:.2})");
}

fn summary(a: &Args) -> Result<(), String> {
    println!(
        "zcperf summary on the {:?} transport: every figure beside references from the same run\n",
        a.transport
    );
    println!("--- 64 B SEND ping-pong, one-way latency ---");
    run_lat(a, &params(a, 64, 100_000), "lat")?;
    println!(
        "  {ROUNDS} rounds, zcmsg then each reference back to back (the vCPUs' placement \
         moves between runs; a round shares it): medians, and the median of the per-round \
         ratios (range)"
    );
    let (mut z, mut refs_l) = (Vec::new(), [Vec::new(), Vec::new(), Vec::new()]);
    for i in 0..ROUNDS {
        let (x, y, addr) = devices(a, &format!("l{i}"))?;
        let l = raw::send_lat(x, y, &addr, &params(a, 64, 30_000))?;
        z.push(report::summarize(&l.samples).typical);
        refs_l[0].push(refs::atomic_pingpong(300_000).as_nanos() as f64 / 1000.0);
        refs_l[1].push(refs::crossbeam_pingpong(60_000).as_nanos() as f64 / 1000.0);
        if let Some((ucx, _)) = refs::ucx_perftest("tag_lat", 64, 30_000) {
            refs_l[2].push(ucx);
        }
    }
    println!(
        "  zcmsg send_lat               {:8.3} us",
        median_range(&mut z.clone()).0
    );
    for (name, r) in [
        ("floor: AtomicU64 ping-pong", &refs_l[0]),
        ("crossbeam-channel bounded ", &refs_l[1]),
        ("UCX sm tag_lat            ", &refs_l[2]),
    ] {
        paired_row(name, "us", 1.0, 3, &z, r);
    }
    println!();

    println!("--- 64 B SEND message rate ---");
    run_bw(a, &params(a, 64, 2_000_000), Opcode::Send, "rate")?;
    println!("  {ROUNDS} rounds, as above");
    let (mut z, mut refs_r) = (Vec::new(), [Vec::new(), Vec::new(), Vec::new()]);
    for i in 0..ROUNDS {
        let (x, y, addr) = devices(a, &format!("r{i}"))?;
        let bw = raw::stream_bw(x, y, &addr, &params(a, 64, 500_000), Opcode::Send)?;
        z.push(bw.msgs as f64 / bw.elapsed.as_secs_f64());
        refs_r[0].push(refs::crossbeam_msgrate(500_000));
        refs_r[1].push(refs::spsc_msgrate(500_000));
        if let Some((_, ucx)) = refs::ucx_perftest("tag_bw", 64, 500_000) {
            refs_r[2].push(ucx);
        }
    }
    println!(
        "  zcmsg send_bw                {:8.2} Mmsg/s",
        median_range(&mut z.clone()).0 / 1e6
    );
    for (name, r) in [
        ("crossbeam-channel bounded ", &refs_r[0]),
        ("SPSC ring (rtrb)          ", &refs_r[1]),
        ("UCX sm tag_bw             ", &refs_r[2]),
    ] {
        paired_row(name, "Mmsg/s", 1e-6, 2, &z, r);
    }
    println!();

    println!("--- endpoints (framing, credits, zero-copy receive) against the raw device ---");
    println!(
        "  {PAIRS} pairs, raw device then endpoint back to back (the vCPUs' placement moves \
         between runs; a pair shares it)"
    );
    let mut lat_r = Vec::new();
    let mut rate_r = Vec::new();
    let (mut ep_lats, mut ep_rates) = (Vec::new(), Vec::new());
    for i in 0..PAIRS {
        let (x, y, addr) = devices(a, &format!("pl{i}"))?;
        let raw_lat = raw::send_lat(x, y, &addr, &params(a, 64, 30_000))?;
        let raw_lat = report::summarize(&raw_lat.samples).typical;
        let (x, y, addr) = devices(a, &format!("el{i}"))?;
        let ep_lat = zcmsg_bench::ep::ping_pong(
            x,
            y,
            &addr,
            64,
            30_000,
            zcmsg_bench::ep::PingPongPath::Bytes,
        )?;
        let ep_lat = report::summarize(&ep_lat).typical;
        let (x, y, addr) = devices(a, &format!("pr{i}"))?;
        let bw = raw::stream_bw(x, y, &addr, &params(a, 64, 500_000), Opcode::Send)?;
        let raw_rate = bw.msgs as f64 / bw.elapsed.as_secs_f64();
        let (x, y, addr) = devices(a, &format!("er{i}"))?;
        let (ep_rate, _, _) = zcmsg_bench::ep::stream(x, y, &addr, 64, 500_000, false)?;
        lat_r.push(ep_lat / raw_lat);
        rate_r.push(ep_rate / raw_rate);
        ep_lats.push(ep_lat);
        ep_rates.push(ep_rate);
    }
    let (lm, llo, lhi) = median_range(&mut lat_r);
    let (rm, rlo, rhi) = median_range(&mut rate_r);
    println!(
        "  endpoint 64 B latency (median) {:8.3} us   endpoint/raw    = {lm:.2}x (pairs {llo:.2}-{lhi:.2})",
        median_range(&mut ep_lats).0
    );
    println!(
        "  endpoint 64 B message rate   {:8.2} Mmsg/s   endpoint/raw    = {rm:.2}x (pairs {rlo:.2}-{rhi:.2})\n",
        median_range(&mut ep_rates).0 / 1e6
    );

    println!("--- 1 MiB RDMA WRITE and SEND bandwidth ---");
    let (wbps, _) = run_bw(a, &params(a, 1 << 20, 4000), Opcode::RdmaWrite, "write")?;
    // 16 receives of 1 MiB (16 MiB, as the L3 holds), not -r's 512 (512
    // MiB: a test of the memory, not of the device); the SEND's reference
    // copies into as many buffers in turn.
    let mut sp = params(a, 1 << 20, 4000);
    sp.rx_depth = sp.rx_depth.min(SEND_1M_RECVS);
    let (sbps, _) = run_bw(a, &sp, Opcode::Send, "sendbw")?;
    let copy = refs::copy_bw(1 << 20, 4000);
    let copy_spread = refs::copy_bw_spread(1 << 20, sp.rx_depth as usize, 4000);
    let gb = |x: f64| x / 1e9;
    println!(
        "  zcmsg write_bw               {:8.2} GB/s   write/copy      = {:.2}x",
        gb(wbps),
        wbps / copy
    );
    println!(
        "  zcmsg send_bw ({:>2} receives)  {:8.2} GB/s   send/copy       = {:.2}x (against the copy into as many buffers)",
        sp.rx_depth,
        gb(sbps),
        sbps / copy_spread
    );
    println!(
        "  copy_from_slice 1 MiB        {:8.2} GB/s   (one destination)",
        gb(copy)
    );
    println!(
        "  copy_from_slice 1 MiB        {:8.2} GB/s   ({} destinations in turn)",
        gb(copy_spread),
        sp.rx_depth
    );
    for handoff in [false, true] {
        let (x, y, addr) = devices(a, &format!("ep1m-{handoff}"))?;
        let (_, bps, c) = zcmsg_bench::ep::stream(x, y, &addr, 1 << 20, 4000, handoff)?;
        println!(
            "  endpoint 1 MiB stream, handoff {:<3}  {:8.2} GB/s   endpoint/copy   = {:.2}x   (framework copies {} B, handed over {} B)",
            if handoff { "on" } else { "off" },
            gb(bps),
            bps / copy,
            c.bounce_bytes + c.coalesce_bytes,
            c.handoff_bytes
        );
    }
    Ok(())
}

fn main() {
    let a = Args::parse();
    if let Err(e) = check_gid(&a) {
        eprintln!("zcperf: {e}");
        std::process::exit(1);
    }
    let r = match (a.server, a.test) {
        (_, Test::Summary) if a.server || a.host.is_some() => Err(
            "the summary runs both sides in this process: name a test to run across hosts".into(),
        ),
        (_, Test::Summary) => summary(&a),
        (true, _) => test_kind(&a).and_then(|t| serve_all(&a, t)),
        (false, _) => test_kind(&a).and_then(|t| single(&a, t, a.host.as_deref())),
    };
    if let Err(e) = r {
        eprintln!("zcperf: {e}");
        std::process::exit(1);
    }
}
