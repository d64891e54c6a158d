//! A small object store over RPC, zero-copy end to end:
//! - PUT: the client exposes its object for RDMA READ and sends only its
//!   handle; the server pulls it straight into a slot of the store's own
//!   registered arena (`BulkCtx::pull_into`) and keeps that slot as the
//!   object's `Bytes`.
//! - GET: the server answers with the stored `Bytes` itself: sent from the
//!   registered slot (eager), or read by the client from it (rendezvous,
//!   for objects over the endpoint's eager limit).
//! - DEL: the object's slot goes home to the store's arena.
//!
//! Every object is checked byte for byte; the rates and both sides'
//! framework copies are printed.
//!
//! `cargo run --release -p zcmsg-examples --bin kvstore [-- --objects 256 --size 16384]`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use clap::Parser;
use zcmsg::{Access, ArenaConfig, Endpoint, EndpointConfig, Pd, RemoteRegion, Rpc, RpcError};

/// The store's one RPC method; the operation is the request's first byte.
const KV: u16 = 1;
const PUT: u8 = 1;
const GET: u8 = 2;
const DEL: u8 = 3;
const LIMIT: Duration = Duration::from_secs(30);

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    dev: zcmsg_examples::DeviceArgs,
    /// Objects stored.
    #[arg(long, default_value_t = 256)]
    objects: u64,
    /// Bytes per object.
    #[arg(long, default_value_t = 16384)]
    size: usize,
    /// Times every object is stored and read back.
    #[arg(long, default_value_t = 4)]
    rounds: u64,
    /// How long both sides' blocking waits poll before they sleep, in
    /// microseconds (`EndpointConfig::spin`; default the endpoint's).
    #[arg(long)]
    spin_us: Option<u64>,
}

fn main() {
    if let Err(e) = run(&Args::parse()) {
        eprintln!("kvstore: {e}");
        std::process::exit(1);
    }
}

/// A request: the operation, the key, and for a PUT the object's handle.
fn request(op: u8, key: u64, object: Option<RemoteRegion>) -> Bytes {
    let mut b = BytesMut::with_capacity(9 + RemoteRegion::WIRE_LEN);
    b.put_u8(op);
    b.put_u64_le(key);
    if let Some(r) = object {
        b.put_slice(&r.to_bytes());
    }
    b.freeze()
}

/// Object `key`'s bytes in round `round`.
fn fill(buf: &mut [u8], key: u64, round: u64) {
    let seed = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round;
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (seed
            .wrapping_add(i as u64)
            .wrapping_mul(0x2545_f491_4f6c_dd1d)
            >> 56) as u8;
    }
}

/// The server's store: objects kept as the slots they were pulled into.
struct Store {
    slots: zcmsg::Arena,
    objects: HashMap<u64, Bytes>,
}

impl Store {
    fn serve(&mut self, bulk: &mut zcmsg::BulkCtx<'_>, req: &[u8]) -> zcmsg::Reply {
        let (&op, rest) = req.split_first().ok_or("empty request")?;
        let key = rest
            .get(..8)
            .and_then(|k| k.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or("request without a key")?;
        match op {
            PUT => {
                let object = RemoteRegion::from_bytes(&rest[8..]).ok_or("PUT without a handle")?;
                let slot = self.slots.alloc().ok_or("the store is full")?;
                let filled = bulk.pull_into(object, slot).map_err(|e| e.to_string())?;
                // A replaced object's slot goes home when its last reader drops it.
                self.objects.insert(key, filled.freeze());
                Ok(Bytes::new().into())
            }
            GET => self
                .objects
                .get(&key)
                .map(|o| o.clone().into())
                .ok_or_else(|| format!("no object {key}")),
            DEL => self
                .objects
                .remove(&key)
                .map(|_| Bytes::new().into())
                .ok_or_else(|| format!("no object {key}")),
            op => Err(format!("unknown operation {op}")),
        }
    }
}

fn run(a: &Args) -> Result<(), String> {
    if a.size == 0 || a.objects == 0 {
        return Err("--size and --objects must be at least 1".into());
    }
    let (dev_a, dev_b, addr) = zcmsg_examples::devices(&a.dev, "kvstore")?;
    let mut cfg = EndpointConfig::default();
    if let Some(us) = a.spin_us {
        cfg.spin = Duration::from_micros(us);
    }
    let pd_b = Pd::new(dev_b.clone());
    let mut listener = dev_b.listen(&addr, &cfg.qp).map_err(|e| e.to_string())?;
    let at = listener.local_addr();
    let (scfg, size, objects) = (cfg.clone(), a.size, a.objects as usize);
    let server = std::thread::spawn(move || -> Result<(u64, usize, usize), String> {
        let ep = Endpoint::accept(&pd_b, &mut *listener, &scfg).map_err(|e| e.to_string())?;
        // Every object once, and room for the ones being replaced.
        // Registered for remote reads: a GET of an object over the eager
        // limit goes by rendezvous (the client reads the stored slot), and
        // its exposure then lends the store's one registration instead of
        // registering the object per GET (any client may read any object
        // here anyway).
        let slots = pd_b
            .arena(ArenaConfig {
                access: Access::REMOTE_READ,
                ..ArenaConfig::new(size, objects + 8)
            })
            .map_err(|e| e.to_string())?;
        let mut store = Store {
            slots: slots.clone(),
            objects: HashMap::new(),
        };
        let mut rpc = Rpc::new(ep, 4096).map_err(|e| e.to_string())?;
        rpc.handle(KV, move |bulk, req| store.serve(bulk, &req));
        let before = rpc.endpoint().copies();
        rpc.serve(LIMIT).map_err(|e| e.to_string())?;
        let c = rpc.endpoint().copies().since(&before);
        Ok((
            c.bounce_bytes + c.coalesce_bytes,
            slots.slots() - slots.free_slots(),
            slots.slots(),
        ))
    });

    let pd = Pd::new(dev_a);
    let ep = Endpoint::connect(&pd, &at, &cfg).map_err(|e| e.to_string())?;
    let mut rpc = Rpc::new(ep, 4096).map_err(|e| e.to_string())?;
    // The client's objects: registered once, for remote reads, so a PUT's
    // exposure lends that registration (no registration per object).
    let staging = pd
        .arena(ArenaConfig {
            access: Access::REMOTE_READ,
            ..ArenaConfig::new(a.size, 2)
        })
        .map_err(|e| e.to_string())?;
    println!(
        "zcmsg object store on the {} transport: {} objects of {} B, {} rounds",
        a.dev.transport, a.objects, a.size, a.rounds
    );
    let before = rpc.endpoint().copies();
    let (mut put_time, mut get_time) = (Duration::ZERO, Duration::ZERO);
    let mut want = vec![0u8; a.size];
    for round in 0..a.rounds {
        for key in 0..a.objects {
            let mut slot = staging.alloc().ok_or("no staging slot")?;
            slot.set_len(a.size);
            fill(slot.as_mut_slice(), key, round);
            let object = slot.freeze();
            let t = Instant::now();
            let exposed = pd.expose_bytes(&object).map_err(|e| e.to_string())?;
            rpc.call(KV, request(PUT, key, Some(exposed.remote())), LIMIT)
                .map_err(|e| format!("PUT {key}: {e}"))?;
            put_time += t.elapsed();
        }
        for key in 0..a.objects {
            let t = Instant::now();
            let got = rpc
                .call(KV, request(GET, key, None), LIMIT)
                .map_err(|e| format!("GET {key}: {e}"))?;
            get_time += t.elapsed();
            fill(&mut want, key, round);
            if got[..] != want[..] {
                return Err(format!("round {round}: object {key} came back wrong"));
            }
        }
    }
    let n = (a.objects * a.rounds) as f64;
    let rate = |d: Duration| n * a.size as f64 / d.as_secs_f64() / 1e6;
    println!(
        "  PUT (the server pulls each object into its store): {:.1} us per object, {:.0} MB/s",
        put_time.as_secs_f64() * 1e6 / n,
        rate(put_time)
    );
    println!(
        "  GET (the stored Bytes sent back as they are): {:.1} us per object, {:.0} MB/s",
        get_time.as_secs_f64() * 1e6 / n,
        rate(get_time)
    );
    // Delete every other object; their GETs are refused, the rest still read.
    for key in (0..a.objects).step_by(2) {
        rpc.call(KV, request(DEL, key, None), LIMIT)
            .map_err(|e| format!("DEL {key}: {e}"))?;
    }
    match rpc.call(KV, request(GET, 0, None), LIMIT) {
        Err(RpcError::Handler(why)) => println!("  DEL of every other object; a GET of one: {why}"),
        other => return Err(format!("a GET of a deleted object: {other:?}")),
    }
    let last = a.rounds.saturating_sub(1);
    for key in (1..a.objects).step_by(2) {
        let got = rpc
            .call(KV, request(GET, key, None), LIMIT)
            .map_err(|e| format!("GET {key}: {e}"))?;
        fill(&mut want, key, last);
        if got[..] != want[..] {
            return Err(format!("object {key} came back wrong after the DELs"));
        }
    }
    let client = rpc.endpoint().copies().since(&before);
    rpc.endpoint().try_close().map_err(|e| e.to_string())?;
    rpc.endpoint()
        .wait(LIMIT, |e| e.is_eos())
        .map_err(|e| e.to_string())?;
    let (server_copies, in_use, slots) = server.join().map_err(|_| "server panicked")??;
    println!("  every object verified");
    println!(
        "  framework copies of object bytes: client {} B, server {} B",
        client.bounce_bytes + client.coalesce_bytes,
        server_copies
    );
    println!("  store slots in use after the DELs: {in_use} of {slots}");
    Ok(())
}
