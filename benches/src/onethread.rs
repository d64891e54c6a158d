//! Both ends of a connection driven by one thread on the in-process device:
//! no cross-core waiting, so instruction counts (`cost_probe` under
//! callgrind) and allocation counts (`tests/allocations.rs`) are the
//! framework's own and repeatable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use zcmsg::{Endpoint, EndpointConfig, Pd, Received, Recv, RecvInto, RecvSlot, Rpc, Transport};
use zcmsg_soft::SoftDevice;

/// How long any wait here may take before it panics.
const LIMIT: Duration = Duration::from_secs(10);

/// Two connected endpoints (a `SoftDevice::pair`), credits exchanged.
pub fn pair() -> (Endpoint, Endpoint) {
    let dev = SoftDevice::new();
    let cfg = EndpointConfig::default();
    let (qa, qb) = dev.pair(&cfg.qp, &cfg.qp).expect("pair");
    let pd = Pd::new(dev as Arc<dyn Transport>);
    let mut a = Endpoint::start(&pd, qa, &cfg).expect("endpoint a");
    let mut b = Endpoint::start(&pd, qb, &cfg).expect("endpoint b");
    while a.credits() <= 0 || b.credits() <= 0 {
        a.progress();
        b.progress();
    }
    (a, b)
}

/// Poll `ep` with `take` (driving `peer` in between) until it yields.
pub fn wait_for<T>(
    ep: &mut Endpoint,
    peer: &mut Endpoint,
    mut take: impl FnMut(&mut Endpoint) -> Option<T>,
) -> T {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(x) = take(ep) {
            return x;
        }
        peer.progress();
        assert!(Instant::now() < deadline, "no message within {LIMIT:?}");
    }
}

/// The next message `ep` receives, as `Bytes`.
pub fn recv(ep: &mut Endpoint, peer: &mut Endpoint) -> Bytes {
    wait_for(ep, peer, |ep| match ep.try_recv().expect("receive") {
        Some(Recv::Message(m)) => Some(m),
        Some(Recv::Eos) => panic!("end of stream"),
        None => None,
    })
}

/// The next message `ep` receives, copied into `buf`; its length.
pub fn recv_into(ep: &mut Endpoint, peer: &mut Endpoint, buf: &mut [u8]) -> usize {
    wait_for(ep, peer, |ep| {
        match ep.try_recv_into(buf).expect("receive") {
            Some(RecvInto::Message(n)) => Some(n),
            Some(RecvInto::Eos) => panic!("end of stream"),
            None => None,
        }
    })
}

/// The next message `ep` receives, owning its receive slot.
pub fn recv_slot(ep: &mut Endpoint, peer: &mut Endpoint) -> Received {
    wait_for(ep, peer, |ep| match ep.try_recv_slot().expect("receive") {
        Some(RecvSlot::Message(m)) => Some(m),
        Some(RecvSlot::Eos) => panic!("end of stream"),
        None => None,
    })
}

/// An RPC client and a server whose method 1 answers with its request.
pub fn rpc_echo_pair() -> (Rpc, Rpc) {
    let (a, b) = pair();
    let client = Rpc::new(a, 4096).expect("client");
    let mut server = Rpc::new(b, 4096).expect("server");
    server.handle(1, |_, req| Ok(req.into()));
    (client, server)
}

/// One call of method 1, the server's turns driven between the client's
/// polls; the reply.
pub fn rpc_call(client: &mut Rpc, server: &mut Rpc, req: Bytes) -> Bytes {
    let call = client.start_call(1, req).expect("call");
    let deadline = Instant::now() + LIMIT;
    loop {
        server.progress().expect("server");
        client.progress().expect("client");
        if let Some(r) = client.poll_reply(call) {
            return r.expect("reply");
        }
        assert!(Instant::now() < deadline, "no reply within {LIMIT:?}");
    }
}
