//! Connection management with rdma_cm: listen, accept, connect.
//!
//! Set-up runs on an event channel of its own (so waits can time out without
//! disturbing anything else); once a connection is established its id is
//! migrated to the device's shared channel, where the device's event thread
//! sees the peer's disconnect.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zcmsg::{Listener, QpConfig, QueuePair, TransportError};

use crate::device::Core;
use crate::qp::VerbsQp;
use crate::sys::{self, event, CmEvent, CmId, ConnParam, EventChannel};

/// Private data a connector can hand the listener: rdma_cm's limit for
/// reliable connections on IB/RoCE. The listener receives it zero-padded to
/// this length (the CM message has a fixed-size private data field).
pub const MAX_PRIVATE_DATA: usize = 56;

fn parse_addr(addr: &str) -> Result<SocketAddr, TransportError> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| {
            TransportError::InvalidArgument(format!(
                "{addr:?} is not an `ip:port` address the verbs transport can use"
            ))
        })
}

fn check_private(data: &[u8]) -> Result<(), TransportError> {
    if data.len() > MAX_PRIVATE_DATA {
        return Err(TransportError::InvalidArgument(format!(
            "{} bytes of private data: rdma_cm carries at most {MAX_PRIVATE_DATA} on a reliable connection",
            data.len()
        )));
    }
    Ok(())
}

/// Wait for the next event on `ch` until `deadline`.
fn next_event(
    ch: &Arc<EventChannel>,
    deadline: Instant,
    what: &str,
) -> Result<CmEvent, TransportError> {
    loop {
        match ch.next_event() {
            Ok(Some(ev)) => return Ok(ev),
            Ok(None) => {}
            Err(e) => return Err(TransportError::io("rdma_get_cm_event", sys::os_err(e))),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TransportError::Timeout(what.to_owned()));
        }
        sys::wait_readable(ch.fd(), left.min(Duration::from_millis(100)));
    }
}

fn status_text(ev: &CmEvent) -> String {
    if ev.status < 0 {
        sys::os_err(ev.status).to_string()
    } else {
        format!("status {}", ev.status)
    }
}

/// Wait for `want` on the set-up channel of a single id, mapping failures.
fn expect(
    ch: &Arc<EventChannel>,
    want: u32,
    deadline: Instant,
    what: &str,
) -> Result<CmEvent, TransportError> {
    let ev = next_event(ch, deadline, what)?;
    if ev.kind == want && ev.status == 0 {
        return Ok(ev);
    }
    let detail = format!("{what}: {} ({})", sys::event_str(ev.kind), status_text(&ev));
    Err(match ev.kind {
        event::REJECTED => TransportError::ConnectionRefused(format!(
            "{detail}: nobody listens there, or the listener refused"
        )),
        event::UNREACHABLE | event::CONNECT_ERROR => TransportError::ConnectionRefused(detail),
        event::ADDR_ERROR | event::ROUTE_ERROR => TransportError::io(
            detail,
            sys::os_err(if ev.status != 0 {
                ev.status
            } else {
                libc::EHOSTUNREACH
            }),
        ),
        _ => TransportError::ConnectionRefused(format!("{detail}: unexpected event")),
    })
}

fn source_addr(core: &Core, dst: &SocketAddr) -> Result<Option<SocketAddr>, TransportError> {
    if let Some(ip) = core.cfg.source_addr {
        return Ok(Some(SocketAddr::new(ip, 0)));
    }
    let Some(ifname) = &core.cfg.source_interface else {
        return Ok(None);
    };
    let addrs = sys::interface_addrs(ifname)
        .map_err(|e| TransportError::io(format!("addresses of interface {ifname}"), e))?;
    let ip = addrs
        .into_iter()
        .find(|a: &IpAddr| a.is_ipv4() == dst.is_ipv4())
        .ok_or_else(|| {
            TransportError::InvalidArgument(format!(
                "interface {ifname} has no {} address to connect to {dst} from",
                if dst.is_ipv4() { "IPv4" } else { "IPv6" }
            ))
        })?;
    Ok(Some(SocketAddr::new(ip, 0)))
}

fn wrong_device(core: &Core, id: &CmId, addr: &SocketAddr) -> Option<TransportError> {
    (id.device() != 0 && id.device() != core.ctx.id()).then(|| {
        TransportError::InvalidArgument(format!(
            "{addr} is served by another RDMA device than {} (pick the device that owns the address, or set VerbsConfig::source_addr)",
            core.name()
        ))
    })
}

fn cm_err(what: &str, e: i32) -> TransportError {
    match e {
        libc::EADDRINUSE => TransportError::AddressInUse(what.to_owned()),
        libc::EADDRNOTAVAIL | libc::ENODEV => TransportError::InvalidArgument(format!(
            "{what}: {} (no RDMA device has this address)",
            sys::os_err(e)
        )),
        libc::EACCES | libc::EPERM => {
            TransportError::Permission(format!("{what}: {}", sys::os_err(e)))
        }
        _ => TransportError::io(what.to_owned(), sys::os_err(e)),
    }
}

/// Connect to `addr`, handing the listener `private_data`.
pub(crate) fn connect(
    core: &Arc<Core>,
    addr: &str,
    cfg: &QpConfig,
    private_data: &[u8],
) -> Result<VerbsQp, TransportError> {
    let dst = parse_addr(addr)?;
    check_private(private_data)?;
    let deadline = Instant::now() + cfg.connect_timeout;
    let step = cfg.connect_timeout.max(Duration::from_millis(100));
    let ch = EventChannel::create()?;
    let mut id = CmId::create(&ch, 0).map_err(|e| cm_err("rdma_create_id", e))?;
    let src = source_addr(core, &dst)?;
    id.resolve_addr(src, dst, step)
        .map_err(|e| cm_err(&format!("rdma_resolve_addr({dst})"), e))?;
    expect(
        &ch,
        event::ADDR_RESOLVED,
        deadline,
        &format!("resolving {dst}"),
    )?;
    if let Some(e) = wrong_device(core, &id, &dst) {
        return Err(e);
    }
    id.resolve_route(step)
        .map_err(|e| cm_err(&format!("rdma_resolve_route({dst})"), e))?;
    expect(
        &ch,
        event::ROUTE_RESOLVED,
        deadline,
        &format!("route to {dst}"),
    )?;
    let mut qp = VerbsQp::build(core, id, cfg)?;
    let (resp, init) = core.rd_atomic();
    let param = ConnParam {
        private_data,
        responder_resources: resp,
        initiator_depth: init,
        retry_count: cfg.retry_count,
        rnr_retry_count: cfg.rnr_retry,
    };
    qp.id_mut()
        .connect(&param)
        .map_err(|e| cm_err(&format!("rdma_connect({dst})"), e))?;
    expect(
        &ch,
        event::ESTABLISHED,
        deadline,
        &format!("connecting to {dst}"),
    )?;
    let key = qp.key() as usize;
    qp.id_mut().set_context(key);
    qp.id_mut()
        .migrate(&core.cm)
        .map_err(|e| cm_err("rdma_migrate_id", e))?;
    qp.inspect_gid("connector")?;
    Ok(qp)
}

struct Request {
    id: CmId,
    private_data: Vec<u8>,
    initiator_depth: u8,
    responder_resources: u8,
}

/// A listening rdma_cm id.
pub struct VerbsListener {
    backlog: VecDeque<Request>,
    id: CmId,
    ch: Arc<EventChannel>,
    local: SocketAddr,
    cfg: QpConfig,
    core: Arc<Core>,
}

impl std::fmt::Debug for VerbsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsListener")
            .field("device", &self.core.name())
            .field("local", &self.local)
            .finish()
    }
}

impl VerbsListener {
    pub(crate) fn bind(
        core: &Arc<Core>,
        addr: &str,
        cfg: &QpConfig,
    ) -> Result<VerbsListener, TransportError> {
        let sa = parse_addr(addr)?;
        let ch = EventChannel::create()?;
        let mut id = CmId::create(&ch, 0).map_err(|e| cm_err("rdma_create_id", e))?;
        id.bind(sa)
            .map_err(|e| cm_err(&format!("rdma_bind_addr({sa})"), e))?;
        if let Some(e) = wrong_device(core, &id, &sa) {
            return Err(e);
        }
        id.listen(core.cfg.listen_backlog)
            .map_err(|e| cm_err(&format!("rdma_listen({sa})"), e))?;
        let local = id.local_addr().unwrap_or(sa);
        tracing::debug!(device = core.name(), %local, "listening");
        Ok(VerbsListener {
            backlog: VecDeque::new(),
            id,
            ch,
            local,
            cfg: cfg.clone(),
            core: core.clone(),
        })
    }

    /// The next connect request, from the backlog or the channel.
    fn next_request(&mut self, deadline: Instant) -> Result<Request, TransportError> {
        if let Some(r) = self.backlog.pop_front() {
            return Ok(r);
        }
        loop {
            let ev = next_event(
                &self.ch,
                deadline,
                &format!("waiting for a connection on {}", self.local),
            )?;
            match ev.kind {
                event::CONNECT_REQUEST => {
                    if let Some(id) = ev.new_id {
                        return Ok(Request {
                            id,
                            private_data: ev.private_data,
                            initiator_depth: ev.initiator_depth,
                            responder_resources: ev.responder_resources,
                        });
                    }
                }
                event::DEVICE_REMOVAL if ev.id == self.id.id() => {
                    return Err(TransportError::NoDevice(Some(self.core.name().to_owned())))
                }
                _ => tracing::debug!(?ev, "listener: event ignored"),
            }
        }
    }
}

impl Listener for VerbsListener {
    fn local_addr(&self) -> String {
        self.local.to_string()
    }

    fn accept(
        &mut self,
        timeout: Duration,
    ) -> Result<(Box<dyn QueuePair>, Vec<u8>), TransportError> {
        let deadline = Instant::now() + timeout;
        'requests: loop {
            let mut req = self.next_request(deadline)?;
            if let Some(e) = wrong_device(&self.core, &req.id, &self.local) {
                tracing::warn!("rejecting a connection that arrived on another device: {e}");
                let _ = req.id.reject();
                continue;
            }
            let child = req.id.id();
            let mut qp = VerbsQp::build(&self.core, req.id, &self.cfg)?;
            let (resp, init) = self.core.rd_atomic();
            let param = ConnParam {
                private_data: &[],
                // Answer as many READs/atomics as the peer issues, issue as
                // many as it answers (each bounded by this device).
                responder_resources: resp.min(req.initiator_depth),
                initiator_depth: init.min(req.responder_resources),
                retry_count: self.cfg.retry_count,
                rnr_retry_count: self.cfg.rnr_retry,
            };
            if let Err(e) = qp.id_mut().accept(&param) {
                let _ = qp.id_mut().reject();
                return Err(cm_err("rdma_accept", e));
            }
            // Wait for this connection's ESTABLISHED; other requests queue up.
            loop {
                let ev = next_event(
                    &self.ch,
                    deadline,
                    "waiting for the accepted connection to be established",
                )?;
                if ev.kind == event::CONNECT_REQUEST {
                    if let Some(id) = ev.new_id {
                        self.backlog.push_back(Request {
                            id,
                            private_data: ev.private_data,
                            initiator_depth: ev.initiator_depth,
                            responder_resources: ev.responder_resources,
                        });
                    }
                    continue;
                }
                if ev.id != child {
                    tracing::debug!(?ev, "listener: event of another id ignored");
                    continue;
                }
                if ev.kind == event::ESTABLISHED {
                    break;
                }
                // This handshake died before it was established (on a lossy
                // wire the connector may give up on it and try again, which
                // reaches us as a new request): drop it and keep listening.
                tracing::warn!(
                    "an accepted connection failed before it was established: {} ({}); waiting for the next request",
                    sys::event_str(ev.kind),
                    status_text(&ev)
                );
                continue 'requests;
            }
            let key = qp.key() as usize;
            qp.id_mut().set_context(key);
            qp.id_mut()
                .migrate(&self.core.cm)
                .map_err(|e| cm_err("rdma_migrate_id", e))?;
            qp.inspect_gid("listener")?;
            return Ok((Box::new(qp), req.private_data));
        }
    }
}

impl Drop for VerbsListener {
    fn drop(&mut self) {
        for mut r in self.backlog.drain(..) {
            let _ = r.id.reject();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_data_limit_is_rdma_cm_s() {
        assert!(check_private(&[0; 56]).is_ok());
        assert!(check_private(&[]).is_ok());
        assert!(matches!(
            check_private(&[0; 57]),
            Err(TransportError::InvalidArgument(_))
        ));
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(parse_addr("192.0.2.1:7471").unwrap().port(), 7471);
        assert!(parse_addr("192.0.2.1").is_err());
        assert!(parse_addr("not an address").is_err());
    }
}
