//! Connection management, queue-pair attributes and completion notification.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::Instant;

use super::prelude::*;

/// Private data reaches the listener: 56 bytes (the rdma_cm limit) arrive
/// intact (a transport may pad shorter data with zeros to 56 bytes, never
/// alter it); an empty one arrives as zeros or nothing; more than 56 bytes is
/// refused by `connect` without hanging.
pub fn connect_private_data(h: &Harness) {
    let (a, b) = (h.host(), h.host());
    let cfg = h.qp_config();
    let timeout = h.wait_timeout();
    for sent in [pattern(90, 56), Vec::new(), b"hello".to_vec()] {
        let mut l = b
            .dev
            .listen(&h.next_addr(), &cfg)
            .unwrap_or_else(|e| panic!("listen: {e}"));
        let target = l.local_addr();
        let acc = std::thread::spawn(move || l.accept(timeout));
        let (dev, c, data) = (a.dev.clone(), cfg.clone(), sent.clone());
        let qa = bounded(timeout * 2, "connect", move || {
            dev.connect(&target, &c, &data)
        })
        .unwrap_or_else(|e| panic!("connect with {} bytes of private data: {e}", sent.len()));
        let (qb, got) = bounded(timeout * 2, "accept", move || acc.join())
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
            .unwrap_or_else(|e| panic!("accept: {e}"));
        assert!(
            got.len() >= sent.len()
                && got[..sent.len()] == sent[..]
                && got[sent.len()..].iter().all(|&x| x == 0),
            "private data of {} bytes arrived as {got:02x?}",
            sent.len()
        );
        assert!(
            got.len() <= 56,
            "private data longer than 56 bytes delivered: {}",
            got.len()
        );
        drop((qa, qb));
    }
    let l = b
        .dev
        .listen(&h.next_addr(), &cfg)
        .unwrap_or_else(|e| panic!("listen: {e}"));
    let target = l.local_addr();
    let (dev, c) = (a.dev.clone(), cfg.clone());
    let r = bounded(
        timeout * 2,
        "connect with 57 bytes of private data",
        move || dev.connect(&target, &c, &[7u8; 57]),
    );
    assert!(
        r.is_err(),
        "connect with 57 bytes of private data must be refused"
    );
    drop(l);
}

/// Connecting where nobody listens (a fresh address, and the address of a
/// listener dropped since) fails with an error, within the timeout.
pub fn connect_refused(h: &Harness) {
    let a = h.host();
    let b = h.host();
    let mut cfg = h.qp_config();
    cfg.connect_timeout = cfg.connect_timeout.min(Duration::from_secs(2));
    let timeout = h.wait_timeout() * 2;
    let fresh = h.next_addr();
    let (dev, c) = (a.dev.clone(), cfg.clone());
    let r = bounded(
        timeout,
        "connect to an address nobody listens on",
        move || dev.connect(&fresh, &c, &[]),
    );
    assert!(
        r.is_err(),
        "connect to an address nobody listens on succeeded"
    );
    let l = b
        .dev
        .listen(&h.next_addr(), &cfg)
        .unwrap_or_else(|e| panic!("listen: {e}"));
    let gone = l.local_addr();
    drop(l);
    let (dev, c) = (a.dev.clone(), cfg.clone());
    let r = bounded(timeout, "connect to a dropped listener", move || {
        dev.connect(&gone, &c, &[])
    });
    assert!(
        r.is_err(),
        "connect to a listener that was dropped succeeded"
    );
}

/// A second listener on an address in use is refused with `AddressInUse`;
/// once the first listener is dropped the address can be listened on again
/// and connections to it work.
pub fn listen_address_in_use(h: &Harness) {
    let (a, b) = (h.host(), h.host());
    let cfg = h.qp_config();
    let l1 = b
        .dev
        .listen(&h.next_addr(), &cfg)
        .unwrap_or_else(|e| panic!("listen: {e}"));
    let addr = l1.local_addr();
    match b.dev.listen(&addr, &cfg) {
        Err(TransportError::AddressInUse(_)) => {}
        Err(e) => panic!("second listen on {addr}: expected AddressInUse, got {e}"),
        Ok(_) => panic!("second listen on {addr} succeeded"),
    }
    drop(l1);
    let mut l2 = b
        .dev
        .listen(&addr, &cfg)
        .unwrap_or_else(|e| panic!("listen on {addr} after the first listener was dropped: {e}"));
    let timeout = h.wait_timeout();
    let acc = std::thread::spawn(move || l2.accept(timeout));
    let (dev, c) = (a.dev.clone(), cfg.clone());
    let qa = bounded(timeout * 2, "connect", move || dev.connect(&addr, &c, &[]))
        .unwrap_or_else(|e| panic!("connect to the re-listened address: {e}"));
    let (qb, _) = bounded(timeout * 2, "accept", move || acc.join())
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
        .unwrap_or_else(|e| panic!("accept on the re-listened address: {e}"));
    let mut qa = Endpoint::new(qa, timeout, "a");
    let mut qb = Endpoint::new(qb, timeout, "b");
    let sa = a.arena(64, 1);
    let rb = b.arena(64, 1);
    let r = post_recvs(&mut qb, &rb, 0, 1);
    let s = slot_with(&sa, &message(60, 0, 32));
    qa.post_send(&[WorkRequest::send(0, &[s.sge_filled()])]);
    expect_ok(
        &qa.next("SEND"),
        0,
        WcOpcode::Send,
        "SEND on a re-listened address",
    );
    expect_ok(
        &qb.next("receive"),
        0,
        WcOpcode::Recv,
        "receive on a re-listened address",
    );
    check_message(&r[0].as_slice()[..32], 60, 0, 32, "payload");
}

/// Queue pairs grant at least what was asked (within the device's limits),
/// start in `ReadyToSend`, and asking beyond the device's `max_qp_wr` fails
/// cleanly (no hang, no queue pair).
pub fn qp_caps_and_state(h: &Harness) {
    let c = h.caps().clone();
    let mut cfg_a = h.qp_config();
    cfg_a.max_send_wr = 32.min(c.max_qp_wr);
    cfg_a.max_recv_wr = 48.min(c.max_qp_wr);
    cfg_a.max_send_sge = 3.min(c.max_send_sge);
    cfg_a.max_recv_sge = 2.min(c.max_recv_sge);
    cfg_a.max_inline_data = 32.min(c.max_inline_data);
    let mut cfg_b = h.qp_config();
    cfg_b.max_send_wr = 8.min(c.max_qp_wr);
    cfg_b.max_recv_wr = 100.min(c.max_qp_wr);
    cfg_b.max_send_sge = 1;
    cfg_b.max_recv_sge = 1;
    cfg_b.max_inline_data = 0;
    let p = h.connected_pair(&cfg_a, &cfg_b);
    for (ep, cfg) in [(&p.qa, &cfg_a), (&p.qb, &cfg_b)] {
        let g = ep.caps();
        let what = format!("{}: granted {g:?} for {cfg:?}", ep.label());
        assert!(g.max_send_wr >= cfg.max_send_wr, "{what}: max_send_wr");
        assert!(g.max_recv_wr >= cfg.max_recv_wr, "{what}: max_recv_wr");
        assert!(g.max_send_sge >= cfg.max_send_sge, "{what}: max_send_sge");
        assert!(g.max_recv_sge >= cfg.max_recv_sge, "{what}: max_recv_sge");
        assert!(
            g.max_inline_data >= cfg.max_inline_data,
            "{what}: max_inline_data"
        );
        assert!(
            g.max_inline_data <= c.max_inline_data,
            "{what}: more inline data than the device allows"
        );
        assert!(
            g.max_send_sge <= c.max_send_sge && g.max_recv_sge <= c.max_recv_sge,
            "{what}: more SGEs than the device allows"
        );
        assert_eq!(
            ep.state(),
            QpState::ReadyToSend,
            "{}: state after connecting",
            ep.label()
        );
    }
    if c.max_qp_wr < u32::MAX {
        let mut too_deep = h.qp_config();
        too_deep.max_send_wr = c.max_qp_wr + 1;
        let r = h.try_connected_pair(&too_deep, &h.qp_config());
        assert!(
            r.is_err(),
            "a queue pair deeper than the device's max_qp_wr ({}) was created",
            c.max_qp_wr
        );
    }
    if c.max_send_sge < u32::MAX {
        let mut too_wide = h.qp_config();
        too_wide.max_send_sge = c.max_send_sge + 1;
        let r = h.try_connected_pair(&too_wide, &h.qp_config());
        assert!(
            r.is_err(),
            "a queue pair with more SGEs than the device's max_send_sge ({}) was created",
            c.max_send_sge
        );
    }
}

struct CountWaker(AtomicUsize);

impl Wake for CountWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn counting_waker() -> (Waker, Arc<CountWaker>) {
    let c = Arc::new(CountWaker(AtomicUsize::new(0)));
    (Waker::from(c.clone()), c)
}

fn wait_woken(c: &CountWaker, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if c.0.load(Ordering::SeqCst) > 0 {
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    c.0.load(Ordering::SeqCst) > 0
}

/// `arm` on an empty completion queue returns `Armed` and the waker fires
/// when a completion arrives; arming while a completion is already waiting
/// either says `Ready` or fires the waker: a completion is never missed.
pub fn arm_wakes_on_completion(h: &Harness) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let sa = p.a.arena(256, 2);
    let rb = p.b.arena(256, 2);
    let recvs = post_recvs(&mut p.qb, &rb, 0, 2);
    assert_eq!(p.qb.poll(), 0, "no completion before anything was sent");
    let (waker, count) = counting_waker();
    assert_eq!(
        p.qb.qp().arm(&waker),
        Armed::Armed,
        "arming an empty completion queue"
    );
    let s0 = slot_with(&sa, &message(61, 0, 100));
    p.qa.post_send(&[WorkRequest::send(0, &[s0.sge_filled()])]);
    assert!(
        wait_woken(&count, h.wait_timeout()),
        "the armed waker was not woken when a receive completed"
    );
    let wc = p.qb.next("the receive that woke the waker");
    expect_ok(&wc, 0, WcOpcode::Recv, "receive after arm");
    check_message(&recvs[0].as_slice()[..100], 61, 0, 100, "payload");
    expect_ok(&p.qa.next("SEND"), 0, WcOpcode::Send, "SEND");

    // The receive completes while nobody is armed; arming then must not miss it.
    let s1 = slot_with(&sa, &message(61, 1, 100));
    p.qa.post_send(&[WorkRequest::send(1, &[s1.sge_filled()])]);
    expect_ok(&p.qa.next("SEND"), 1, WcOpcode::Send, "SEND");
    std::thread::sleep(Duration::from_millis(2));
    let (waker, count) = counting_waker();
    match p.qb.qp().arm(&waker) {
        Armed::Ready => {}
        Armed::Armed => assert!(
            wait_woken(&count, h.wait_timeout()),
            "a completion was waiting (its SEND had completed) but arm() said Armed and never woke the waker: a lost wakeup"
        ),
    }
    let wc = p.qb.next("the receive found after arming");
    expect_ok(&wc, 1, WcOpcode::Recv, "receive");
    check_message(&recvs[1].as_slice()[..100], 61, 1, 100, "payload");
}

/// A receiver armed and waiting on an idle queue pair is woken when the peer
/// disconnects: its receives complete with errors (flushed) instead of
/// waiting forever.
pub fn arm_wakes_on_peer_disconnect(h: &Harness) {
    let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
    let rb = p.b.arena(256, 4);
    let recvs = post_recvs(&mut p.qb, &rb, 0, 4);
    let (waker, count) = counting_waker();
    assert_eq!(
        p.qb.qp().arm(&waker),
        Armed::Armed,
        "arming an empty completion queue"
    );
    std::thread::sleep(Duration::from_millis(2));
    p.qa.disconnect();
    assert!(
        wait_woken(&count, h.wait_timeout()),
        "the peer disconnected but the armed receiver was never woken"
    );
    let wcs = p.qb.take(4, "receives failed by the peer's disconnect");
    for (i, wc) in wcs.iter().enumerate() {
        expect_error(
            wc,
            i as u64,
            "a receive outstanding when the peer disconnected",
        );
    }
    expect_qp_error(p.qb.state(), "receiver after the peer disconnected");
    for s in &recvs {
        check_filled(
            s.as_slice(),
            0xEE,
            "receive buffers of a disconnected queue pair",
        );
    }
}
