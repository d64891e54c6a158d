//! Endpoint and RPC cases: the messaging layer on top of a transport. Every
//! transport runs them through the same suite, so "works on every
//! transport" is a test result, not a claim.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use zcmsg::{
    Access, ArenaConfig, ConnError, Endpoint, EndpointConfig, EndpointError, Outcome, Pd, Received,
    Recv, RecvInto, RecvSlot, RemoteRegion, Rpc, RpcError, SendError, Transport,
};

use crate::Harness;

/// Two devices and a listen address, from the transport under test.
type Devices = (Arc<dyn Transport>, Arc<dyn Transport>, String);

fn devices(h: &Harness) -> Devices {
    (h.device(), h.device(), h.next_addr())
}

fn cfg() -> EndpointConfig {
    let mut c = EndpointConfig::default();
    c.proto.heartbeat_interval = Duration::from_millis(100);
    // Generous: the cases fill and check up to 64 MiB between progress calls
    // (in debug builds, and 10-50x slower under emulation).
    c.proto.heartbeat_timeout = Duration::from_secs(30);
    c
}

fn cfg_handoff() -> EndpointConfig {
    let mut c = cfg();
    c.proto.handoff = true;
    c
}

/// Connect two endpoints (the accepting side in a thread).
fn endpoint_pair(d: Devices, cfg: &EndpointConfig) -> (Endpoint, Endpoint) {
    let (a, b, addr) = d;
    let pd_b = Pd::new(b.clone());
    let mut listener = b.listen(&addr, &cfg.qp).expect("listen");
    let at = listener.local_addr();
    let c2 = cfg.clone();
    let acc =
        std::thread::spawn(move || Endpoint::accept(&pd_b, &mut *listener, &c2).expect("accept"));
    let pd_a = Pd::new(a);
    let ea = Endpoint::connect(&pd_a, &at, cfg).expect("connect");
    let eb = acc.join().expect("accept thread");
    (ea, eb)
}

fn pattern(len: usize, seed: u64) -> impl Iterator<Item = u8> {
    (0..len).map(move |i| ((i as u64).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 7) as u8)
}

fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Echo server: returns every message (its own received `Bytes`, zero-copy),
/// closes when the peer closes. Returns how many it echoed.
fn echo_server(mut ep: Endpoint) -> std::thread::JoinHandle<Result<u64, String>> {
    std::thread::spawn(move || {
        let mut n = 0;
        loop {
            match ep
                .recv_timeout(Duration::from_secs(60))
                .map_err(|e| e.to_string())?
            {
                Recv::Message(m) => {
                    ep.try_send(m).map_err(|e| e.to_string())?;
                    n += 1;
                }
                Recv::Eos => {
                    ep.try_close().map_err(|e| e.to_string())?;
                    ep.wait(Duration::from_secs(30), |e| e.close_delivered())
                        .map_err(|e| e.to_string())?;
                    return Ok(n);
                }
            }
        }
    })
}

fn close_and_join(mut ep: Endpoint, server: std::thread::JoinHandle<Result<u64, String>>) -> u64 {
    ep.try_close().expect("close");
    ep.wait(Duration::from_secs(30), |e| e.is_eos())
        .expect("end of stream from the server");
    server.join().expect("server thread").expect("server")
}

/// Messages of every size class from 0 B to 64 MiB, across the eager /
/// rendezvous threshold, echoed and checked byte for byte; registered memory
/// goes with zero framework copies (no bounce, no coalescing).
fn message_integrity_all_sizes_with(d: Devices, c: &EndpointConfig, max: usize) {
    let (mut ep, srv) = endpoint_pair(d, c);
    let server = echo_server(srv);
    let eager = ep.eager_limit();
    let mut sizes = vec![
        0usize,
        1,
        63,
        64,
        4095,
        eager - 1,
        eager,
        eager + 1,
        64 << 10,
        1 << 20,
        (8 << 20) + 1,
        64 << 20,
    ];
    sizes.retain(|&s| s <= max);
    let arena = ep
        .pd()
        .arena(ArenaConfig::new(max.max(4096), 2))
        .expect("arena");
    let before = ep.copies();
    for (i, &size) in sizes.iter().enumerate() {
        let mut s = arena.alloc().expect("slot");
        s.put_slice(&pattern(size, i as u64).collect::<Vec<u8>>());
        let msg = s.freeze();
        let want = checksum(&msg);
        ep.try_send(msg).expect("send");
        let echo = ep.recv_timeout(Duration::from_secs(120));
        if let Err(e) = &echo {
            let srv = server.join();
            panic!("size {size}: echo failed: {e}; server: {srv:?}");
        }
        match echo.expect("checked") {
            Recv::Message(m) => {
                assert_eq!(m.len(), size, "size {size}: length");
                assert_eq!(checksum(&m), want, "size {size}: content");
            }
            Recv::Eos => panic!("early end of stream"),
        }
    }
    let c = ep.copies().since(&before);
    assert_eq!(c.bounce_bytes, 0, "registered memory is never bounced");
    assert_eq!(c.coalesce_bytes, 0, "single chunks are never coalesced");
    assert_eq!(close_and_join(ep, server), sizes.len() as u64);
}

/// Vectored messages (many chunks, registered and foreign), eager and
/// rendezvous: bytes and order kept; foreign bytes are bounced and counted.
fn vectored_and_foreign_messages_with(d: Devices, c: &EndpointConfig) {
    let (mut ep, srv) = endpoint_pair(d, c);
    let server = echo_server(srv);
    let arena = ep
        .pd()
        .arena(ArenaConfig::new(64 << 10, 64))
        .expect("arena");
    let eager = ep.eager_limit();
    for (round, chunk_len) in [(0u64, 100usize), (1, eager / 3), (2, 50_000)] {
        let mut chunks = Vec::new();
        let mut all = Vec::new();
        let mut foreign = 0u64;
        for k in 0..20u64 {
            let data: Vec<u8> = pattern(chunk_len, round * 100 + k).collect();
            all.extend_from_slice(&data);
            if k % 3 == 0 {
                foreign += data.len() as u64;
                chunks.push(Bytes::from(data));
            } else {
                let mut s = arena.alloc().expect("slot");
                s.put_slice(&data);
                chunks.push(s.freeze());
            }
        }
        let before = ep.copies();
        ep.try_send(chunks).expect("send");
        match ep.recv_timeout(Duration::from_secs(60)).expect("echo") {
            Recv::Message(m) => assert!(m[..] == all[..], "round {round}: vectored content"),
            Recv::Eos => panic!("early end of stream"),
        }
        let c = ep.copies().since(&before);
        if 20 * chunk_len <= eager {
            assert_eq!(
                c.bounce_bytes, foreign,
                "round {round}: eager: foreign chunks bounced ({c:?})"
            );
        } else {
            // Rendezvous registers every chunk where it lies: zero copies, foreign or not.
            assert_eq!(
                c.bounce_bytes + c.coalesce_bytes,
                0,
                "round {round}: rendezvous copies nothing ({c:?})"
            );
        }
    }
    close_and_join(ep, server);
}

/// A receiver that holds every message stops the sender at its receive
/// slots, without deadlock; dropping them lets everything through.
fn credit_exhaustion_and_recovery_with(d: Devices, c: &EndpointConfig) {
    let slots = c.proto.recv_slots as usize;
    let (mut tx, mut rx) = endpoint_pair(d, c);
    let total = slots * 3;
    // Larger than the inline limit, so that each message takes a receive
    // slot of its own (small ones queued together share one, in bundles).
    let len = c.qp.max_inline_data as usize + 64;
    for i in 0..total {
        tx.try_send(Bytes::from(vec![i as u8; len])).expect("queue");
    }
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        tx.progress();
        while let Some(Recv::Message(m)) = rx.try_recv().expect("recv") {
            held.push(m);
        }
    }
    if c.proto.handoff {
        // Handed-over messages are the sender's memory, not receive slots:
        // holding them stalls nothing.
        assert_eq!(held.len(), total, "handoff: holding costs no receive slots");
        return;
    }
    assert_eq!(
        held.len(),
        slots,
        "a holding receiver gets exactly its receive slots"
    );
    assert!(
        tx.failure().is_none() && rx.failure().is_none(),
        "no deadlock, no failure"
    );
    drop(held);
    let mut got = slots;
    let deadline = Instant::now() + Duration::from_secs(30);
    while got < total {
        tx.progress();
        if let Some(Recv::Message(m)) = rx.try_recv().expect("recv") {
            assert_eq!(m[0], got as u8, "order kept across the stall");
            got += 1;
        }
        assert!(
            Instant::now() < deadline,
            "recovery stalled at {got}/{total}"
        );
    }
}

/// Many concurrent RPC calls in flight, each answered once and matched.
fn rpc_many_concurrent_calls_with(d: Devices, c: &EndpointConfig) {
    let (ea, eb) = endpoint_pair(d, c);
    let server = std::thread::spawn(move || {
        let mut rpc = Rpc::new(eb, 1 << 20).expect("rpc");
        rpc.handle(7, |_, req| {
            let mut r = req.to_vec();
            r.reverse();
            // Two chunks: a reply goes out vectored, arrives as one message.
            let mut r = Bytes::from(r);
            let head = r.split_to(r.len() / 2);
            Ok(vec![head, r].into())
        });
        rpc.serve(Duration::from_secs(30))
    });
    let mut rpc = Rpc::new(ea, 4096).expect("rpc");
    let calls: Vec<(u64, Vec<u8>)> = (0..1000u64)
        .map(|i| {
            // 10-409 bytes: either side of the size up to which a call
            // goes as one inline request built on the stack.
            let req: Vec<u8> = pattern(10 + (i as usize % 400), i).collect();
            (
                rpc.start_call(7, Bytes::from(req.clone())).expect("call"),
                req,
            )
        })
        .collect();
    for (id, req) in calls.into_iter().rev() {
        let rep = rpc.wait_reply(id, Duration::from_secs(30)).expect("reply");
        let mut want = req;
        want.reverse();
        assert_eq!(&rep[..], &want[..], "call {id}: reply matches its request");
    }
    match rpc.call(99, Bytes::from_static(b"?"), Duration::from_secs(10)) {
        Err(RpcError::NoSuchMethod(99)) => {}
        other => panic!("unknown method: {other:?}"),
    }
    rpc.endpoint().try_close().expect("close");
    rpc.endpoint()
        .wait(Duration::from_secs(30), |e| e.is_eos())
        .expect("eos");
    server.join().expect("server").expect("serve");
}

/// RPC with bulk handles: the server pulls 4 MiB from the client (READ) and
/// pushes a transformed copy back (WRITE); the client checks its memory.
fn rpc_bulk_pull_and_push_with(d: Devices, c: &EndpointConfig) {
    let (ea, eb) = endpoint_pair(d, c);
    let server = std::thread::spawn(move || {
        // The handler's own slots for `pull_into`: 64 KiB ones, and
        // 4 KiB ones too small for the pull.
        let own = eb.pd().arena(ArenaConfig::new(64 << 10, 2)).expect("arena");
        let small = eb.pd().arena(ArenaConfig::new(4096, 1)).expect("arena");
        let mut rpc = Rpc::new(eb, 4 << 20).expect("rpc");
        rpc.handle(2, move |bulk, req| {
            let src = RemoteRegion::from_bytes(&req).ok_or("bad handle")?;
            let too_small = small.alloc().ok_or("no small slot")?;
            match bulk.pull_into(src, too_small) {
                Err(RpcError::Handler(why)) if why.contains("exceeds the destination slot") => {}
                other => return Err(format!("a pull into a small slot: {other:?}")),
            }
            let data = bulk
                .pull_into(src, own.alloc().ok_or("no slot")?)
                .map_err(|e| e.to_string())?;
            if !data.is_of(&own) || data.len() != src.len as usize {
                return Err("the pull did not land in the handler's slot".into());
            }
            let sum: u64 = data.as_slice().iter().map(|&b| u64::from(b)).sum();
            Ok(Bytes::copy_from_slice(&sum.to_le_bytes()).into())
        });
        rpc.handle(1, |bulk, req| {
            let src = RemoteRegion::from_bytes(&req).ok_or("bad handle")?;
            let dst =
                RemoteRegion::from_bytes(&req[RemoteRegion::WIRE_LEN..]).ok_or("bad handle")?;
            let mut data = bulk.pull(src).map_err(|e| e.to_string())?;
            for b in data.as_mut_slice() {
                *b = b.wrapping_add(1);
            }
            bulk.push(data.freeze(), dst).map_err(|e| e.to_string())?;
            Ok(Bytes::new().into())
        });
        rpc.serve(Duration::from_secs(30))
    });
    let mut rpc = Rpc::new(ea, 4096).expect("rpc");
    let pd = rpc.endpoint().pd().clone();
    let len = 4 << 20;
    let mut src = pd.window(len, Access::REMOTE_READ).expect("window");
    src.fill(41);
    let mut dst = pd.window(len, Access::REMOTE_WRITE).expect("window");
    dst.fill(0);
    let mut req = Vec::new();
    req.extend_from_slice(&src.remote().to_bytes());
    req.extend_from_slice(&dst.remote().to_bytes());
    rpc.call(1, Bytes::from(req), Duration::from_secs(60))
        .expect("bulk call");
    // 64 KiB of the source pulled into a slot of the handler's own.
    let part = RemoteRegion {
        len: 64 << 10,
        ..src.remote()
    };
    let sum = rpc
        .call(
            2,
            Bytes::copy_from_slice(&part.to_bytes()),
            Duration::from_secs(60),
        )
        .expect("pull_into call");
    assert_eq!(
        sum[..],
        (41u64 * (64 << 10)).to_le_bytes(),
        "the checksum of what the handler pulled into its own slot"
    );
    // A chunk of an arena registered for remote reads is exposed under
    // the arena's own key (no registration of its own); one of a local
    // arena gets a registration of exactly its bytes. Both read right.
    for (access, lent) in [(Access::REMOTE_READ, true), (Access::LOCAL_WRITE, false)] {
        let arena = pd
            .arena(ArenaConfig {
                access,
                ..ArenaConfig::new(64 << 10, 2)
            })
            .expect("arena");
        // The second slot, so the exposed bytes start past the arena's base.
        let first = arena.alloc().expect("slot");
        let mut slot = arena.alloc().expect("slot");
        drop(first);
        slot.put_bytes(7, 64 << 10);
        let chunk = slot.freeze().slice(1..);
        let exposed = pd.expose_bytes(&chunk).expect("expose");
        assert_eq!(exposed.is_lent(), lent, "exposure from a {access:?} arena");
        assert_eq!(
            exposed.remote().rkey == arena.registration().rkey,
            lent,
            "the key of an exposure from a {access:?} arena"
        );
        let sum = rpc
            .call(
                2,
                Bytes::copy_from_slice(&exposed.remote().to_bytes()),
                Duration::from_secs(60),
            )
            .expect("pull_into call");
        assert_eq!(
            sum[..],
            (7u64 * ((64 << 10) - 1)).to_le_bytes(),
            "what the handler read through an exposure from a {access:?} arena"
        );
    }
    let out = dst.revoke();
    assert!(
        out.as_slice().iter().all(|&b| b == 42),
        "the server's push landed in our window"
    );
    drop(src);
    rpc.endpoint().try_close().expect("close");
    rpc.endpoint()
        .wait(Duration::from_secs(30), |e| e.is_eos())
        .expect("eos");
    server.join().expect("server").expect("serve");
}

/// Graceful close: everything before arrives, then end of stream (not an
/// error); a second close and a send after close are typed errors.
fn graceful_close_with(d: Devices, c: &EndpointConfig) {
    let (mut a, mut b) = endpoint_pair(d, c);
    for i in 0..50u8 {
        a.try_send(Bytes::from(vec![i; 1000])).expect("send");
    }
    a.try_close().expect("close");
    assert!(matches!(a.try_close(), Err(SendError::AlreadyClosed)));
    assert!(matches!(
        a.try_send(Bytes::from_static(b"x")),
        Err(SendError::Closed)
    ));
    for i in 0..50u8 {
        a.progress();
        match b.recv_timeout(Duration::from_secs(10)).expect("recv") {
            Recv::Message(m) => assert_eq!(m[0], i),
            Recv::Eos => panic!("end of stream before message {i}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        a.progress();
        if let Some(r) = b.try_recv().expect("no error at end of stream") {
            assert_eq!(r, Recv::Eos);
            break;
        }
        assert!(Instant::now() < deadline, "no end of stream");
    }
}

/// The peer vanishes mid-stream: every pending send resolves (never
/// `Delivered` for what was not acknowledged) and the failure is reported
/// within a bounded time.
fn peer_failure_mid_stream_with(d: Devices, c: &EndpointConfig) {
    let (mut a, b) = endpoint_pair(d, c);
    let payload = Bytes::from(vec![9u8; 2000]);
    for _ in 0..500 {
        a.try_send(payload.clone()).expect("send");
    }
    drop(b);
    let start = Instant::now();
    let r = a.wait(Duration::from_secs(20), |e| e.failure().is_some());
    assert!(r.is_ok(), "the failure is reported in time: {r:?}");
    assert!(a.failure().is_some(), "failure recorded: {:?}", a.failure());
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "bounded detection"
    );
    assert!(
        a.try_send(payload).is_err(),
        "sends after a failure are refused"
    );
}

/// A peer that stops talking is found out by the heartbeat timeout even
/// when the application polls slowly, with its own sleeps between
/// `progress` calls (an idle call reads the clock only every 16th time).
fn silent_peer_under_slow_polling_with(d: Devices, c: &EndpointConfig) {
    let mut c = c.clone();
    // Long enough for the handshake in an emulated guest (400 ms was not).
    c.proto.heartbeat_interval = Duration::from_millis(100);
    c.proto.heartbeat_timeout = Duration::from_secs(3);
    let (mut a, b) = endpoint_pair(d, &c);
    // `b` stays connected but never runs its protocol again: no heartbeat
    // or anything else reaches `a` from now on.
    let start = Instant::now();
    let limit = Duration::from_secs(30);
    while a.failure().is_none() && start.elapsed() < limit {
        a.progress();
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = start.elapsed();
    assert!(
        matches!(a.failure(), Some(ConnError::HeartbeatTimeout(_))),
        "a silent peer fails the connection by its heartbeat timeout: {:?} after {took:?}",
        a.failure()
    );
    // 3 s of silence, at most 16 slow calls late, plus slack for
    // emulated guests.
    assert!(took < Duration::from_secs(15), "found out late: {took:?}");
    drop(b);
}

/// Async API under tokio: send/recv/close futures, and a dropped send
/// future leaves its buffer parked until the device is done with it.
fn async_under_tokio_and_cancellation_with(d: Devices, c: &EndpointConfig) {
    let (mut a, b) = endpoint_pair(d, c);
    let server = echo_server(b);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let arena = a.pd().arena(ArenaConfig::new(1 << 20, 8)).expect("arena");
        for i in 0..200u32 {
            let size = if i % 10 == 0 { 200_000 } else { 1000 };
            let mut s = arena.alloc().expect("slot");
            s.extend(pattern(size, u64::from(i)));
            let m = s.freeze();
            let want = checksum(&m);
            assert_eq!(a.send(m).await.expect("send"), Outcome::Delivered);
            let echo = a.recv().await.expect("recv").expect("message");
            assert_eq!(checksum(&echo), want);
        }
        // Cancel a large send right away: its buffer must stay parked.
        let mut s = arena.alloc().expect("slot");
        s.put_bytes(5, 900_000);
        let big = s.freeze();
        let ptr_free_before = arena.free_slots();
        {
            let fut = a.send(big);
            let _ = tokio::time::timeout(Duration::from_micros(1), fut).await;
        }
        // The echo of the cancelled send still arrives intact: nothing was freed early.
        let echo = tokio::time::timeout(Duration::from_secs(30), a.recv())
            .await
            .expect("echo in time")
            .expect("recv")
            .expect("message");
        assert_eq!(echo.len(), 900_000);
        assert!(echo.iter().all(|&b| b == 5));
        drop(echo);
        let deadline = Instant::now() + Duration::from_secs(10);
        while arena.free_slots() <= ptr_free_before {
            a.progress();
            assert!(
                Instant::now() < deadline,
                "the parked slot came home after completion"
            );
            tokio::task::yield_now().await;
        }
        a.close().await.expect("close");
        assert!(a.recv().await.expect("eos").is_none());
    });
    server.join().expect("server").expect("echo");
}

/// `message_integrity_all_sizes_with` through the device, then with the in-process handoff on.
pub fn ep_message_integrity_all_sizes(h: &Harness) {
    message_integrity_all_sizes_with(devices(h), &cfg(), 64 << 20);
    message_integrity_all_sizes_with(devices(h), &cfg_handoff(), 64 << 20);
}

/// `vectored_and_foreign_messages_with` through the device, then with the in-process handoff on.
pub fn ep_vectored_and_foreign_messages(h: &Harness) {
    vectored_and_foreign_messages_with(devices(h), &cfg());
    vectored_and_foreign_messages_with(devices(h), &cfg_handoff());
}

/// `credit_exhaustion_and_recovery_with` through the device, then with the in-process handoff on.
pub fn ep_credit_exhaustion_and_recovery(h: &Harness) {
    credit_exhaustion_and_recovery_with(devices(h), &cfg());
    credit_exhaustion_and_recovery_with(devices(h), &cfg_handoff());
}

/// `rpc_many_concurrent_calls_with` through the device, then with the in-process handoff on.
pub fn ep_rpc_many_concurrent_calls(h: &Harness) {
    rpc_many_concurrent_calls_with(devices(h), &cfg());
    rpc_many_concurrent_calls_with(devices(h), &cfg_handoff());
}

/// `rpc_bulk_pull_and_push_with` through the device, then with the in-process handoff on.
pub fn ep_rpc_bulk_pull_and_push(h: &Harness) {
    rpc_bulk_pull_and_push_with(devices(h), &cfg());
    rpc_bulk_pull_and_push_with(devices(h), &cfg_handoff());
}

/// A call that timed out leaves nothing behind: its late reply is dropped
/// (not kept for good, holding a receive slot) and the next call goes on;
/// a reply to a call that was never made is a typed error.
pub fn ep_rpc_timeout_and_stray_reply(h: &Harness) {
    let (ea, eb) = endpoint_pair(devices(h), &cfg());
    let server = std::thread::spawn(move || {
        let mut rpc = Rpc::new(eb, 4096).expect("rpc");
        rpc.handle(5, |_, req| {
            std::thread::sleep(Duration::from_millis(300));
            Ok(req.into())
        });
        rpc.handle(6, |_, req| Ok(req.into()));
        rpc.serve(Duration::from_secs(30))
    });
    let mut rpc = Rpc::new(ea, 4096).expect("rpc");
    let slow = rpc
        .start_call(5, Bytes::from_static(b"slow"))
        .expect("call");
    match rpc.wait_reply(slow, Duration::from_millis(30)) {
        Err(RpcError::Timeout(_)) => {}
        other => panic!("a 300 ms handler answered within 30 ms: {other:?}"),
    }
    // The server answers in order: this reply comes after the late one.
    let rep = rpc
        .call(6, Bytes::from_static(b"next"), Duration::from_secs(30))
        .expect("the call after a timed-out one");
    assert_eq!(&rep[..], b"next");
    assert!(
        rpc.poll_reply(slow).is_none(),
        "the late reply of a timed-out call is dropped, not kept"
    );
    rpc.endpoint().try_close().expect("close");
    rpc.endpoint()
        .wait(Duration::from_secs(30), |e| e.is_eos())
        .expect("eos");
    server.join().expect("server").expect("serve");

    // A peer that answers a call nobody made (RPC header: kind 2, a zero
    // byte, method, four zero bytes, call id).
    let (ea, mut eb) = endpoint_pair(devices(h), &cfg());
    let mut rpc = Rpc::new(ea, 4096).expect("rpc");
    let mut stray = vec![2u8, 0, 1, 0, 0, 0, 0, 0];
    stray.extend_from_slice(&77u64.to_le_bytes());
    stray.extend_from_slice(b"unasked");
    eb.try_send(Bytes::from(stray)).expect("send");
    let deadline = Instant::now() + Duration::from_secs(30);
    let err = loop {
        eb.progress();
        match rpc.progress() {
            Err(e) => break e,
            Ok(_) => assert!(
                Instant::now() < deadline,
                "the stray reply was not reported"
            ),
        }
    };
    assert!(
        matches!(&err, RpcError::Malformed(m) if m.contains("call 77, which was never made")),
        "{err:?}"
    );
}

/// `graceful_close_with` through the device, then with the in-process handoff on.
pub fn ep_graceful_close(h: &Harness) {
    graceful_close_with(devices(h), &cfg());
    graceful_close_with(devices(h), &cfg_handoff());
}

/// `peer_failure_mid_stream_with` through the device, then with the in-process handoff on.
pub fn ep_peer_failure_mid_stream(h: &Harness) {
    peer_failure_mid_stream_with(devices(h), &cfg());
    peer_failure_mid_stream_with(devices(h), &cfg_handoff());
}

/// `silent_peer_under_slow_polling_with` through the device.
pub fn ep_silent_peer_under_slow_polling(h: &Harness) {
    silent_peer_under_slow_polling_with(devices(h), &cfg());
}

/// `async_under_tokio_and_cancellation_with` through the device, then with the in-process handoff on.
pub fn ep_async_under_tokio_and_cancellation(h: &Harness) {
    async_under_tokio_and_cancellation_with(devices(h), &cfg());
    async_under_tokio_and_cancellation_with(devices(h), &cfg_handoff());
}

/// A burst queued with `Endpoint::queue` goes out only when flushed, as one
/// post list, and arrives complete and in order (eager and rendezvous mixed);
/// a message queued on an idle endpoint goes out with its next `progress`.
fn queued_burst_with(d: Devices, c: &EndpointConfig) {
    let (mut a, mut b) = endpoint_pair(d, c);
    let eager = a.eager_limit();
    let sizes: Vec<usize> = (0..40)
        .map(|i| match i % 10 {
            3 => eager + 1 + i,
            7 => 0,
            _ => 1 + (i * 37) % 512,
        })
        .collect();
    let arena = a
        .pd()
        .arena(ArenaConfig::new((eager + 64).max(4096), sizes.len() + 1))
        .expect("arena");
    let mut want = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let mut s = arena.alloc().expect("slot");
        s.put_slice(&pattern(size, 1000 + i as u64).collect::<Vec<u8>>());
        let m = s.freeze();
        want.push((m.len(), checksum(&m)));
        a.queue(m).expect("queue");
    }
    // Nothing was posted: the peer sees nothing, however long it looks.
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(50) {
        assert!(
            b.try_recv().expect("peer").is_none(),
            "a queued message arrived before flush_sends"
        );
    }
    assert!(a.flush_sends(), "flush_sends posted nothing");
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while got < want.len() {
        a.progress();
        match b.try_recv().expect("receive") {
            Some(Recv::Message(m)) => {
                assert_eq!((m.len(), checksum(&m)), want[got], "message {got}");
                got += 1;
            }
            Some(Recv::Eos) => panic!("early end of stream"),
            None => assert!(Instant::now() < deadline, "{got} of {} arrived", want.len()),
        }
    }
    assert_eq!(a.copies().bounce_bytes, 0, "registered memory was bounced");
    // One more, queued while idle: the very next progress call posts it
    // (an idle poll that finds no completion still looks for queued work),
    // and it arrives with no further call on the sending side.
    let mut s = arena.alloc().expect("slot");
    s.put_slice(&pattern(100, 7).collect::<Vec<u8>>());
    let last = s.freeze();
    a.queue(last.clone()).expect("queue");
    assert!(
        a.progress(),
        "the first progress after queue posted nothing"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match b.try_recv().expect("receive") {
            Some(Recv::Message(m)) => {
                assert_eq!(checksum(&m), checksum(&last), "the last message");
                break;
            }
            Some(Recv::Eos) => panic!("early end of stream"),
            None => assert!(Instant::now() < deadline, "the last message never arrived"),
        }
    }
}

/// Small messages go inline: header and payload are copied at post time
/// (counted as inline copies, foreign memory included, nothing bounced), so
/// the application's chunks are released as soon as `try_send` returns.
/// Larger eager messages stay zero-copy: their slot is held until the
/// send's completion, which comes promptly with no further traffic.
fn small_messages_inline_with(d: Devices, c: &EndpointConfig) {
    let (mut ep, srv) = endpoint_pair(d, c);
    let server = echo_server(srv);
    let inline_max = c.qp.max_inline_data as usize;
    assert!(
        inline_max > 64,
        "the default inline limit fits a 64-byte message and its header"
    );
    let small = 64;
    let big = (ep.eager_limit()).min(4096);
    assert!(
        big > inline_max,
        "eager limit {big} is not above the inline limit"
    );
    let arena = ep.pd().arena(ArenaConfig::new(4096, 1)).expect("arena");
    for (round, size) in [(0u64, small), (1, big), (2, small)] {
        let mut s = arena.alloc().expect("the arena's only slot is free");
        s.put_slice(&pattern(size, 7000 + round).collect::<Vec<u8>>());
        let m = s.freeze();
        let want = checksum(&m);
        let before = ep.copies();
        ep.try_send(m).expect("send");
        let c = ep.copies().since(&before);
        if size == small {
            assert_eq!(
                arena.free_slots(),
                1,
                "round {round}: an inline send still holds its chunk"
            );
            assert!(
                c.inline_bytes >= size as u64,
                "round {round}: inline copies not counted ({c:?})"
            );
        } else {
            assert_eq!(
                arena.free_slots(),
                0,
                "round {round}: a zero-copy send released its chunk before its completion"
            );
            assert_eq!(
                c.inline_bytes, 0,
                "round {round}: a {size}-byte message was copied inline ({c:?})"
            );
        }
        match ep.recv_timeout(Duration::from_secs(60)).expect("echo") {
            Recv::Message(m) => {
                assert_eq!((m.len(), checksum(&m)), (size, want), "round {round}: echo")
            }
            Recv::Eos => panic!("early end of stream"),
        }
        ep.wait(Duration::from_secs(30), |_| arena.free_slots() == 1)
            .unwrap_or_else(|e| panic!("round {round}: the slot never came back: {e}"));
    }
    // Foreign memory that fits inline is copied once, never bounced.
    let before = ep.copies();
    let v: Vec<u8> = pattern(small, 7100).collect();
    ep.try_send(Bytes::from(v.clone())).expect("send");
    match ep.recv_timeout(Duration::from_secs(60)).expect("echo") {
        Recv::Message(m) => assert!(m[..] == v[..], "foreign inline echo"),
        Recv::Eos => panic!("early end of stream"),
    }
    let c = ep.copies().since(&before);
    assert_eq!(c.bounce_bytes, 0, "small foreign message bounced ({c:?})");
    assert!(
        c.inline_bytes >= small as u64,
        "foreign inline copy not counted ({c:?})"
    );
    assert_eq!(close_and_join(ep, server), 4);
}

/// Through the device only: with the in-process handoff on, single-chunk
/// messages are handed over instead.
pub fn ep_small_messages_inline(h: &Harness) {
    small_messages_inline_with(devices(h), &cfg());
}

/// Through the device only: with the in-process handoff on, messages
/// travel as the sender's `Bytes` and `try_send_slice` sends nothing.
pub fn ep_copy_path(h: &Harness) {
    copy_path_with(devices(h), &cfg());
}

/// Busy-poll `b` (and `a`) until `b.try_recv_into(buf)` has an answer.
fn recv_into_within(
    b: &mut Endpoint,
    a: &mut Endpoint,
    buf: &mut [u8],
) -> Result<RecvInto, EndpointError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(r) = b.try_recv_into(buf)? {
            return Ok(r);
        }
        a.progress();
        assert!(Instant::now() < deadline, "no message within 30 s");
    }
}

/// `a.try_send_slice(data)`, progressing both ends until it goes at once.
fn send_slice_within(a: &mut Endpoint, b: &mut Endpoint, data: &[u8]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(id) = a.try_send_slice(data).expect("try_send_slice") {
            return id;
        }
        a.progress();
        b.progress();
        assert!(
            Instant::now() < deadline,
            "a {}-byte slice could not go at once within 30 s",
            data.len()
        );
    }
}

/// The small-message copy path, `try_send_slice` from a buffer and
/// `try_recv_into` a buffer: every size up to the inline limit arrives
/// byte for byte; a longer slice is not sent and nothing is queued; a
/// buffer too small is refused and the message stays first in line; copy
/// and zero-copy receives take turns in order; three times the receive
/// slots go through one after the other (copied-out slots go straight back
/// to the receive queue and credits keep flowing); the copies are counted
/// as `copy_out` and `inline`; end of stream arrives.
fn copy_path_with(d: Devices, c: &EndpointConfig) {
    let (mut a, mut b) = endpoint_pair(d, c);
    let lim = a.inline_limit();
    assert!(lim >= 64, "inline limit {lim}: too small to test");
    let mut buf = vec![0u8; lim];
    let before_a = a.copies();
    let before_b = b.copies();
    let mut copied = 0u64;
    let mut sent = 0u64;
    for (i, len) in [1usize, 7, 63, 64, lim - 1, lim, 0].into_iter().enumerate() {
        let data: Vec<u8> = pattern(len, i as u64).collect();
        send_slice_within(&mut a, &mut b, &data);
        sent += len as u64;
        match recv_into_within(&mut b, &mut a, &mut buf).expect("try_recv_into") {
            RecvInto::Message(n) => {
                assert_eq!(n, len, "length of message {i}");
                assert_eq!(&buf[..n], &data[..], "bytes of message {i}");
            }
            RecvInto::Eos => panic!("end of stream instead of message {i}"),
        }
        copied += len as u64;
    }
    // Longer than the inline limit: not sent, nothing queued.
    assert_eq!(
        a.try_send_slice(&vec![7u8; lim + 1])
            .expect("try_send_slice"),
        None,
        "a slice over the inline limit went at once"
    );
    // Too small a buffer: refused, and the message stays first in line.
    let data: Vec<u8> = pattern(64, 99).collect();
    send_slice_within(&mut a, &mut b, &data);
    let mut small = [0u8; 10];
    match recv_into_within(&mut b, &mut a, &mut small) {
        Err(EndpointError::BufferTooSmall { need: 64, have: 10 }) => {}
        other => panic!("a 64-byte message into a 10-byte buffer: {other:?}"),
    }
    let m = b
        .recv_timeout(Duration::from_secs(30))
        .expect("the refused message");
    assert_eq!(
        m,
        Recv::Message(Bytes::from(data)),
        "the refused message, as Bytes"
    );
    // Copy and zero-copy receives in turn, then three times the receive
    // slots one after the other.
    let n = 3 * b.recv_slots();
    for k in 0..n {
        let data: Vec<u8> = pattern(64, 1000 + k as u64).collect();
        send_slice_within(&mut a, &mut b, &data);
        sent += 64;
        if k % 2 == 0 || k >= 20 {
            match recv_into_within(&mut b, &mut a, &mut buf).expect("try_recv_into") {
                RecvInto::Message(64) => assert_eq!(&buf[..64], &data[..], "message {k}"),
                other => panic!("message {k}: {other:?}"),
            }
            copied += 64;
        } else {
            let got = b.recv_timeout(Duration::from_secs(30)).expect("recv");
            assert_eq!(
                got,
                Recv::Message(Bytes::from(data)),
                "message {k} as Bytes"
            );
        }
    }
    let ca = a.copies().since(&before_a);
    let cb = b.copies().since(&before_b);
    assert_eq!(
        (cb.copy_out_bytes, cb.copy_out_ops),
        (copied, 7 + (n as u64 - 10)),
        "receive copies counted as copy_out ({cb:?})"
    );
    assert!(
        ca.inline_bytes >= sent + 64,
        "slices sent at once are counted as inline copies ({ca:?})"
    );
    a.try_close().expect("close");
    match recv_into_within(&mut b, &mut a, &mut buf).expect("end of stream") {
        RecvInto::Eos => {}
        other => panic!("after close: {other:?}"),
    }
}

/// `small_messages_bundled_with` through the device.
pub fn ep_small_messages_bundled(h: &Harness) {
    small_messages_bundled_with(devices(h), &cfg());
}

/// Small messages queued together travel in bundles: several to one SEND
/// and one receive slot, each delivered as its own zero-copy message, in
/// order, intact (registered and foreign memory alike); the copies are
/// counted as coalescing, and held messages keep their shared slot until
/// the last of them is dropped, after which traffic flows on.
fn small_messages_bundled_with(d: Devices, c: &EndpointConfig) {
    let (mut a, mut b) = endpoint_pair(d, c);
    let small_max = (c.qp.max_inline_data as usize).saturating_sub(24);
    assert!(
        small_max >= 32,
        "the inline limit leaves room for small messages"
    );
    let arena = a.pd().arena(ArenaConfig::new(256, 512)).expect("arena");
    let rounds = 3u64;
    let per_round = 300usize;
    for round in 0..rounds {
        let before = a.copies();
        let bundled_before = a.bundled_count();
        let mut want = Vec::with_capacity(per_round);
        for i in 0..per_round {
            let size = (i * 7 + round as usize) % (small_max + 1);
            let bytes: Vec<u8> = pattern(size, round * 1000 + i as u64).collect();
            let m = if i % 2 == 0 {
                let mut s = arena.alloc().expect("slot");
                s.put_slice(&bytes);
                s.freeze()
            } else {
                Bytes::from(bytes)
            };
            want.push((m.len(), checksum(&m)));
            a.queue(m).expect("queue");
        }
        a.flush_sends();
        let mut held = Vec::with_capacity(per_round);
        let deadline = Instant::now() + Duration::from_secs(60);
        while held.len() < per_round {
            a.progress();
            match b.try_recv().expect("receive") {
                Some(Recv::Message(m)) => {
                    let k = held.len();
                    assert_eq!(
                        (m.len(), checksum(&m)),
                        want[k],
                        "round {round}: message {k}"
                    );
                    held.push(m);
                }
                Some(Recv::Eos) => panic!("early end of stream"),
                None => assert!(
                    Instant::now() < deadline,
                    "round {round}: {} of {per_round} arrived",
                    held.len()
                ),
            }
        }
        let n = a.bundled_count() - bundled_before;
        let cp = a.copies().since(&before);
        assert!(
            n >= per_round as u64 / 2,
            "round {round}: only {n} of {per_round} queued small messages were bundled"
        );
        assert!(
            cp.coalesce_ops > 0 && cp.coalesce_ops < n,
            "round {round}: {n} messages in {} bundles",
            cp.coalesce_ops
        );
        assert_eq!(
            cp.bounce_bytes, 0,
            "round {round}: foreign small messages bounced"
        );
        // Held across the next round's sends: the slots come back when the
        // last message of each bundle is dropped.
        drop(held);
    }
    assert!(a.failure().is_none() && b.failure().is_none());
}

/// `recv_slot_with` through the device; then with the in-process handoff
/// on, where messages arrive as the sender's own `Bytes`.
pub fn ep_recv_slot(h: &Harness) {
    recv_slot_with(devices(h), &cfg());
    recv_slot_handed_over(devices(h), &cfg_handoff());
}

/// `try_recv_slot` when messages are handed over in process: each comes as
/// the `Bytes` the sender sent (not in a receive slot), intact; `recycle`
/// takes it like any other; end of stream arrives.
fn recv_slot_handed_over(d: Devices, c: &EndpointConfig) {
    let (mut a, mut b) = endpoint_pair(d, c);
    let arena = a.pd().arena(ArenaConfig::new(4096, 4)).expect("arena");
    for (i, len) in [1usize, 64, 4000].into_iter().enumerate() {
        let data: Vec<u8> = pattern(len, 500 + i as u64).collect();
        let mut s = arena.alloc().expect("slot");
        s.put_slice(&data);
        a.try_send(s.freeze()).expect("send");
        let got = slot_message_within(&mut b, &mut a);
        assert!(got[..] == data[..], "handed-over message {i} ({len} bytes)");
        assert!(
            !got.owns_slot(),
            "a handed-over message {i} claims a receive slot"
        );
        b.recycle(got);
    }
    assert!(
        a.copies().handoff_ops >= 3,
        "the messages were not handed over ({:?})",
        a.copies()
    );
    a.try_close().expect("close");
    match recv_slot_within(&mut b, &mut a) {
        RecvSlot::Eos => {}
        RecvSlot::Message(m) => panic!("a message of {} bytes after close", m.len()),
    }
}

/// Busy-poll `b` (and `a`) until `b.try_recv_slot()` has an answer.
fn recv_slot_within(b: &mut Endpoint, a: &mut Endpoint) -> RecvSlot {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(r) = b.try_recv_slot().expect("try_recv_slot") {
            return r;
        }
        a.progress();
        assert!(Instant::now() < deadline, "no message within 30 s");
    }
}

/// The next message `b` receives with `try_recv_slot`.
fn slot_message_within(b: &mut Endpoint, a: &mut Endpoint) -> Received {
    match recv_slot_within(b, a) {
        RecvSlot::Message(m) => m,
        RecvSlot::Eos => panic!("end of stream instead of a message"),
    }
}

/// Receiving where the message arrived, `try_recv_slot`: every size from
/// one byte to the eager limit (inline or not) arrives byte for byte in a
/// receive slot of its own, an empty message too; three times the receive
/// slots go through one after the other when each is given back with
/// `recycle` (the slots go round and credits keep flowing), while one in
/// eight is kept as `Bytes` to the end and is still intact; nothing is
/// copied on the receiving side; end of stream arrives.
fn recv_slot_with(d: Devices, c: &EndpointConfig) {
    let (mut a, mut b) = endpoint_pair(d, c);
    let (lim, eager) = (a.inline_limit(), a.eager_limit());
    assert!(eager > lim + 1, "eager limit {eager}, inline limit {lim}");
    let before_b = b.copies();
    let arena = a.pd().arena(ArenaConfig::new(eager, 8)).expect("arena");
    let sizes = [1usize, 63, 64, lim, lim + 1, 4000.min(eager), eager, 0];
    for (i, len) in sizes.into_iter().enumerate() {
        let data: Vec<u8> = pattern(len, 7 + i as u64).collect();
        // Registered memory and foreign memory in turn.
        let m = if i % 2 == 0 {
            let mut s = arena.alloc().expect("slot");
            s.put_slice(&data);
            s.freeze()
        } else {
            Bytes::from(data.clone())
        };
        a.try_send(m).expect("send");
        let got = slot_message_within(&mut b, &mut a);
        assert_eq!(got.len(), len, "length of message {i}");
        assert!(got[..] == data[..], "bytes of message {i} ({len} bytes)");
        // The header went in the immediate: the message is the slot.
        assert_eq!(
            got.owns_slot(),
            len > 0,
            "message {i} ({len} bytes) in a slot of its own"
        );
        b.recycle(got);
    }
    let n = 3 * b.recv_slots();
    let mut kept = Vec::new();
    for k in 0..n {
        let data: Vec<u8> = pattern(64, 1000 + k as u64).collect();
        send_slice_within(&mut a, &mut b, &data);
        let got = slot_message_within(&mut b, &mut a);
        assert!(got[..] == data[..], "message {k}");
        if k % 8 == 0 {
            kept.push((k, got.into_bytes()));
        } else {
            b.recycle(got);
        }
    }
    for (k, m) in &kept {
        let want: Vec<u8> = pattern(64, 1000 + *k as u64).collect();
        assert_eq!(m[..], want[..], "kept message {k}");
    }
    drop(kept);
    let cb = b.copies().since(&before_b);
    assert_eq!(
        (
            cb.copy_out_ops,
            cb.bounce_ops,
            cb.coalesce_ops,
            cb.spill_ops
        ),
        (0, 0, 0, 0),
        "the receiving side copied ({cb:?})"
    );
    a.try_close().expect("close");
    match recv_slot_within(&mut b, &mut a) {
        RecvSlot::Eos => {}
        RecvSlot::Message(m) => panic!("a message of {} bytes after close", m.len()),
    }
    assert!(a.failure().is_none() && b.failure().is_none());
}

/// `queued_burst_with` through the device, then with the in-process handoff on.
pub fn ep_queued_burst(h: &Harness) {
    queued_burst_with(devices(h), &cfg());
    queued_burst_with(devices(h), &cfg_handoff());
}

/// `Endpoint::recv_timeout`: with nothing sent it waits its whole timeout
/// and says so (a zero timeout included, at once); messages sent before the
/// wait, and one sent by another thread while it waits, are returned byte
/// for byte and in order.
pub fn ep_recv_timeout(h: &Harness) {
    let (mut a, mut b) = endpoint_pair(devices(h), &cfg());
    for t in [Duration::ZERO, Duration::from_millis(50)] {
        let start = Instant::now();
        match b.recv_timeout(t) {
            Err(EndpointError::Timeout(d)) => assert_eq!(d, t),
            other => panic!("recv_timeout({t:?}) with nothing sent: {other:?}"),
        }
        let took = start.elapsed();
        assert!(
            took >= t,
            "returned after {took:?}, before its {t:?} timeout"
        );
        assert!(
            took < t + Duration::from_secs(5),
            "returned {took:?} into a {t:?} timeout"
        );
    }
    let msg = |i: u64| Bytes::from(pattern(100 + i as usize, i).collect::<Vec<u8>>());
    for i in 0..3 {
        a.try_send(msg(i)).expect("try_send");
    }
    for i in 0..3 {
        match b.recv_timeout(Duration::from_secs(30)) {
            Ok(Recv::Message(m)) => assert_eq!(m, msg(i), "message {i}"),
            other => panic!("message {i}: {other:?}"),
        }
    }
    // Sent while `b` waits in `recv_timeout`.
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        a.try_send(msg(3)).expect("try_send");
        a
    });
    match b.recv_timeout(Duration::from_secs(30)) {
        Ok(Recv::Message(m)) => assert_eq!(m, msg(3), "message sent during the wait"),
        other => panic!("message sent during the wait: {other:?}"),
    }
    let mut a = sender.join().expect("sender thread");
    a.try_close().expect("close");
    match b.recv_timeout(Duration::from_secs(30)) {
        Ok(Recv::Eos) => {}
        other => panic!("end of stream: {other:?}"),
    }
}
