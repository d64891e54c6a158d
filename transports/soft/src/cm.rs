//! Connection management by name, process-wide (the soft device's rdma_cm).
//!
//! Listeners register a name in one process-global table, so queue pairs on
//! different devices (hosts) can connect. `connect` creates both queue pairs
//! at once, queues the listener's side with the private data, and returns
//! without waiting for `accept`: the connecting side may post at once (a SEND
//! waits, RNR, until the accepting side posts receives). A name ending in
//! `:0` gets a free number in place of the 0, like a port.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use zcmsg::{Listener, QpConfig, QueuePair, TransportError};

use crate::device::SoftDevice;
use crate::qp::SoftQp;

/// Most private data a connect carries (`rdma_connect`'s limit for RC).
pub const MAX_PRIVATE_DATA: usize = 56;

struct Backlog {
    queue: VecDeque<(SoftQp, Vec<u8>)>,
    closed: bool,
}

struct ListenShared {
    name: String,
    device: Arc<SoftDevice>,
    config: QpConfig,
    backlog: Mutex<Backlog>,
    ready: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The listeners by name (few: a list).
struct Registry(Vec<Arc<ListenShared>>);

impl Registry {
    fn get(&self, name: &str) -> Option<&Arc<ListenShared>> {
        self.0.iter().find(|l| l.name == name)
    }
    fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }
}

fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: Mutex<Registry> = Mutex::new(Registry(Vec::new()));
    &REGISTRY
}

static NEXT_PORT: AtomicU32 = AtomicU32::new(20000);

/// A listener of the soft device, registered under its name until dropped.
/// Dropping it refuses new connections and disconnects the ones not yet
/// accepted. `Send`.
pub struct SoftListener {
    shared: Arc<ListenShared>,
}

impl std::fmt::Debug for SoftListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftListener")
            .field("name", &self.shared.name)
            .finish()
    }
}

pub(crate) fn listen(
    device: Arc<SoftDevice>,
    addr: &str,
    config: &QpConfig,
) -> Result<SoftListener, TransportError> {
    if addr.is_empty() {
        return Err(TransportError::InvalidArgument("empty listen name".into()));
    }
    let mut reg = lock(registry());
    let name = match addr.strip_suffix(":0") {
        Some(prefix) => loop {
            let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
            let candidate = format!("{prefix}:{n}");
            if !reg.contains_key(&candidate) {
                break candidate;
            }
        },
        None => addr.to_string(),
    };
    if reg.contains_key(&name) {
        return Err(TransportError::AddressInUse(name));
    }
    let shared = Arc::new(ListenShared {
        name: name.clone(),
        device,
        config: config.clone(),
        backlog: Mutex::new(Backlog {
            queue: VecDeque::new(),
            closed: false,
        }),
        ready: Condvar::new(),
    });
    reg.0.push(shared.clone());
    Ok(SoftListener { shared })
}

pub(crate) fn connect(
    device: &Arc<SoftDevice>,
    addr: &str,
    config: &QpConfig,
    private_data: &[u8],
) -> Result<SoftQp, TransportError> {
    if private_data.len() > MAX_PRIVATE_DATA {
        return Err(TransportError::InvalidArgument(format!(
            "{} bytes of private data exceed {MAX_PRIVATE_DATA}",
            private_data.len()
        )));
    }
    let listener = lock(registry())
        .get(addr)
        .cloned()
        .ok_or_else(|| TransportError::ConnectionRefused(format!("nobody listens at {addr:?}")))?;
    let (mine, theirs) = SoftQp::create_pair(device, config, &listener.device, &listener.config)?;
    let mut b = lock(&listener.backlog);
    if b.closed {
        drop(b);
        drop((mine, theirs));
        return Err(TransportError::ConnectionRefused(format!(
            "the listener at {addr:?} closed"
        )));
    }
    b.queue.push_back((theirs, private_data.to_vec()));
    drop(b);
    listener.ready.notify_one();
    Ok(mine)
}

impl Listener for SoftListener {
    fn local_addr(&self) -> String {
        self.shared.name.clone()
    }

    fn accept(
        &mut self,
        timeout: Duration,
    ) -> Result<(Box<dyn QueuePair>, Vec<u8>), TransportError> {
        let deadline = Instant::now().checked_add(timeout);
        let mut b = lock(&self.shared.backlog);
        loop {
            if let Some((qp, data)) = b.queue.pop_front() {
                return Ok((Box::new(qp), data));
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if left.is_zero() {
                return Err(TransportError::Timeout(format!(
                    "no connection at {:?} within {timeout:?}",
                    self.shared.name
                )));
            }
            b = self
                .shared
                .ready
                .wait_timeout(b, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

impl Drop for SoftListener {
    fn drop(&mut self) {
        {
            let mut reg = lock(registry());
            reg.0.retain(|s| !Arc::ptr_eq(s, &self.shared));
        }
        let pending = {
            let mut b = lock(&self.shared.backlog);
            b.closed = true;
            std::mem::take(&mut b.queue)
        };
        // Dropping them disconnects their peers, outside every lock.
        drop(pending);
    }
}
