//! zcperf's tests as their two halves run them, on the in-process device:
//! every test through [`raw::in_process`] (the server half in a thread,
//! the same code `zcperf --server` runs), the data checked by each side, and
//! a client refused, with the reason on both sides, when it asks a server
//! for another test. The verbs device runs the same halves in two processes
//! in the Soft-RoCE lab (`tests/lab.rs`).

use std::sync::Arc;

use zcmsg::{Opcode, Transport};
use zcmsg_bench::ep::{self, PingPongPath};
use zcmsg_bench::raw::{self, Params};
use zcmsg_bench::wlat;
use zcmsg_soft::SoftDevice;

fn dev() -> Arc<dyn Transport> {
    SoftDevice::new() as Arc<dyn Transport>
}

fn params(size: usize, iters: u64) -> Params {
    Params {
        size,
        iters,
        tx_depth: 128,
        rx_depth: 64,
        post_list: 16,
        inline: true,
    }
}

/// A listener name of its own (the in-process device's names are the
/// process's, and the tests run in parallel).
fn addr(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("two-sides-{tag}-{n}")
}

#[test]
fn every_test_runs_through_its_two_halves() {
    for size in [0, 1, 64, 300, 65536] {
        let p = params(size, 500);
        let lat = raw::send_lat(dev(), dev(), &addr("sl"), &p).unwrap();
        assert_eq!(lat.samples.len(), 500, "send-lat -s {size}");
        let wl = wlat::write_lat(dev(), dev(), &addr("wl"), &p).unwrap();
        assert_eq!(wl.samples.len(), 500, "write-lat -s {size}");
        for op in [Opcode::Send, Opcode::RdmaWrite] {
            let bw = raw::stream_bw(dev(), dev(), &addr("bw"), &params(size, 1000), op).unwrap();
            assert_eq!((bw.msgs, bw.bytes), (1000, 1000 * size as u64), "{op:?}");
            assert!(bw.elapsed.as_nanos() > 0);
        }
    }
    for path in [PingPongPath::Bytes, PingPongPath::Copy, PingPongPath::Slot] {
        let s = ep::ping_pong(dev(), dev(), &addr("el"), 64, 300, path).unwrap();
        assert_eq!(s.len(), 300);
    }
    let (mps, bps, copies) = ep::stream(dev(), dev(), &addr("eb"), 4096, 2000, false).unwrap();
    assert!(mps > 0.0 && (bps / mps - 4096.0).abs() < 1e-6);
    // Registered `Bytes` of 4 KiB go out without a framework copy.
    assert_eq!(copies.bounce_bytes + copies.coalesce_bytes, 0);
}

/// A server of `serve` on the in-process device, and what the client of
/// `client` hears from it.
fn mismatch(
    cfg: zcmsg::QpConfig,
    serve: impl FnOnce(Arc<dyn Transport>, &mut dyn zcmsg::Listener) -> Result<raw::Served, String>
        + Send
        + 'static,
    client: impl FnOnce(Arc<dyn Transport>, &str) -> Result<(), String>,
) -> String {
    let b = dev();
    let b2 = b.clone();
    raw::in_process(
        &b,
        &addr("refuse"),
        &cfg,
        move |l| serve(b2, l),
        |at| client(dev(), at),
    )
    .unwrap_err()
}

#[test]
fn a_server_refuses_another_test_and_both_sides_say_why() {
    let p = params(64, 10);
    let sp = p.clone();
    let raw_cfg = raw::qp_config(&p);
    let ep_cfg = zcmsg::EndpointConfig::default().qp;
    let e = mismatch(
        raw_cfg.clone(),
        move |t, l| raw::stream_server(t, l, &sp, Opcode::Send, None),
        |t, at| raw::send_lat_client(t, at, &p).map(|_| ()),
    );
    assert!(
        e.contains("the server refused: server runs send-bw, not send-lat")
            && e.contains("the server: refused the client"),
        "{e}"
    );
    let p = params(64, 10);
    let sp = p.clone();
    let e = mismatch(
        raw_cfg,
        move |t, l| wlat::write_lat_server(t, l, &sp),
        |t, at| raw::stream_client(t, at, &p, Opcode::RdmaWrite, None).map(|_| ()),
    );
    assert!(e.contains("server runs write-lat, not write-bw"), "{e}");
    // The endpoint tests ask in their first message.
    let e = mismatch(ep_cfg, ep::ping_pong_server, |t, at| {
        ep::stream_client(t, at, &zcmsg::EndpointConfig::default(), 64, 10).map(|_| ())
    });
    assert!(
        e.contains("the server refused: server runs ep-lat, not ep-bw")
            && e.contains("the server: refused the client"),
        "{e}"
    );
}

#[test]
fn a_raw_client_meets_an_endpoint_server_with_an_error_not_a_hang() {
    // An endpoint server reads the raw client's hello as no endpoint
    // handshake; both sides fail within their bounds.
    let p = params(64, 10);
    let cfg = zcmsg::EndpointConfig::default().qp;
    let e = mismatch(cfg, ep::ping_pong_server, |t, at| {
        raw::send_lat_client(t, at, &p).map(|_| ())
    });
    assert!(
        e.contains("not a zcperf control message") && e.contains("the server:"),
        "{e}"
    );
}
