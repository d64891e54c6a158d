//! The harness: what a transport supplies, and the connected queue pairs,
//! hosts and bounded waits every case is built from.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use zcmsg::transport::wait_poll;
use zcmsg::{
    Access, Arena, ArenaConfig, DeviceCaps, Listener, Pd, PostError, QpCaps, QpConfig, QpState,
    QueuePair, RecvRequest, RegionMemory, Registration, SharedRecvQueue, Transport, TransportError,
    Window, WorkCompletion, WorkRequest,
};

/// How long a waiting loop spins before it parks (waking a sleeping vCPU costs
/// about 30 µs on these machines).
const SPIN: Duration = Duration::from_micros(50);

type DeviceFactory = dyn Fn() -> Arc<dyn Transport> + Send + Sync;
type AddrFactory = dyn Fn() -> String + Send + Sync;

/// Errors of the harness itself (connection set-up), as opposed to failed
/// expectations, which panic with a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HarnessError {
    /// The transport returned an error.
    #[error("{what}: {source}")]
    Transport {
        /// What the harness was doing.
        what: String,
        /// The transport's error.
        #[source]
        source: TransportError,
    },
    /// A call did not return within the harness timeout.
    #[error("{0} did not finish within {1:?}")]
    Timeout(String, Duration),
    /// The transport broke a rule the harness relies on.
    #[error("{0}")]
    Protocol(String),
}

/// What a transport hands the suite: how to open a device (once per simulated
/// host) and how to make listen addresses, plus knobs for slow environments.
///
/// ```
/// use std::sync::Arc;
/// use zcmsg::{AddressSpace, Transport};
/// use zcmsg::testing::RegistryOnly;
/// use zcmsg_conformance::{addr, Harness};
///
/// let h = Harness::new(
///     || Arc::new(RegistryOnly::new(AddressSpace::Cpu)) as Arc<dyn Transport>,
///     addr::named("doc"),
/// )
/// .scale(0.5);
/// assert_eq!(h.iterations(100), 50);
/// // RegistryOnly has no data path: connecting fails cleanly instead of hanging.
/// assert!(h.try_connected_pair(&h.qp_config(), &h.qp_config()).is_err());
/// ```
pub struct Harness {
    device: Arc<DeviceFactory>,
    addr: Arc<AddrFactory>,
    scale: f64,
    timeout: Duration,
    caps: OnceLock<DeviceCaps>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("scale", &self.scale)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn env_f64(name: &str) -> Option<f64> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0)
}

impl Harness {
    /// A harness over `device` (called once per host: cases that need two
    /// hosts call it twice, and both devices may live in one process) and
    /// `addr` (a fresh listen address per call; see [`crate::addr`]).
    ///
    /// Defaults: scale 1.0, timeout 10 s. The environment can stretch both
    /// without recompiling: `ZCMSG_CONFORMANCE_SCALE` multiplies the scale,
    /// `ZCMSG_CONFORMANCE_TIMEOUT_SECS` replaces the timeout.
    pub fn new<D, A>(device: D, addr: A) -> Harness
    where
        D: Fn() -> Arc<dyn Transport> + Send + Sync + 'static,
        A: Fn() -> String + Send + Sync + 'static,
    {
        Harness {
            device: Arc::new(device),
            addr: Arc::new(addr),
            scale: 1.0,
            timeout: Duration::from_secs(10),
            caps: OnceLock::new(),
        }
    }

    /// Multiply every iteration count by `scale` (e.g. 0.1 under emulation).
    pub fn scale(mut self, scale: f64) -> Harness {
        self.scale = if scale.is_finite() && scale > 0.0 {
            scale
        } else {
            1.0
        };
        self
    }

    /// The longest any single expected event (a completion, a connection) may
    /// take before the case fails with a message instead of hanging.
    pub fn timeout(mut self, timeout: Duration) -> Harness {
        self.timeout = timeout;
        self
    }

    /// The wait bound in force (after `ZCMSG_CONFORMANCE_TIMEOUT_SECS`).
    pub fn wait_timeout(&self) -> Duration {
        env_f64("ZCMSG_CONFORMANCE_TIMEOUT_SECS")
            .map(Duration::from_secs_f64)
            .unwrap_or(self.timeout)
    }

    /// `n` scaled by the harness scale (and `ZCMSG_CONFORMANCE_SCALE`), at least 1.
    pub fn iterations(&self, n: usize) -> usize {
        let s = self.scale * env_f64("ZCMSG_CONFORMANCE_SCALE").unwrap_or(1.0);
        ((n as f64 * s).round() as usize).max(1)
    }

    /// A fresh listen address.
    pub fn next_addr(&self) -> String {
        (self.addr)()
    }

    /// A fresh device straight from the factory (not audited; [`Harness::host`] wraps one).
    pub fn device(&self) -> Arc<dyn Transport> {
        (self.device)()
    }

    /// The device's capabilities (read once, from a device opened for it).
    pub fn caps(&self) -> &DeviceCaps {
        self.caps.get_or_init(|| self.device().caps().clone())
    }

    /// A new host: a device from the factory and its protection domain.
    pub fn host(&self) -> Host {
        let tracker = Arc::new(Tracked::new(self.device()));
        let dev: Arc<dyn Transport> = tracker.clone();
        Host {
            pd: Pd::new(dev.clone()),
            dev,
            tracker,
            timeout: self.wait_timeout(),
        }
    }

    /// Default queue-pair settings clamped to the device's limits, with the
    /// harness timeout as `connect_timeout`.
    pub fn qp_config(&self) -> QpConfig {
        let c = self.caps();
        let d = QpConfig::default();
        QpConfig {
            max_send_wr: d.max_send_wr.min(c.max_qp_wr),
            max_recv_wr: d.max_recv_wr.min(c.max_qp_wr),
            max_send_sge: d.max_send_sge.min(c.max_send_sge),
            max_recv_sge: d.max_recv_sge.min(c.max_recv_sge),
            max_inline_data: d.max_inline_data.min(c.max_inline_data),
            connect_timeout: self.wait_timeout(),
            ..d
        }
    }

    /// Two hosts joined by one queue pair: `b` listens (with `cfg_b`), `a`
    /// connects (with `cfg_a`). Panics with a clear message on failure.
    pub fn connected_pair(&self, cfg_a: &QpConfig, cfg_b: &QpConfig) -> Pair {
        self.try_connected_pair(cfg_a, cfg_b)
            .unwrap_or_else(|e| panic!("connecting a queue pair: {e}"))
    }

    /// [`Harness::connected_pair`], returning set-up failures.
    pub fn try_connected_pair(
        &self,
        cfg_a: &QpConfig,
        cfg_b: &QpConfig,
    ) -> Result<Pair, HarnessError> {
        let a = self.host();
        let b = self.host();
        let (qa, qb) = self
            .try_connect(&a, &b, 1, cfg_a, cfg_b)?
            .pop()
            .ok_or_else(|| HarnessError::Protocol("no queue pair".into()))?;
        Ok(Pair { qa, qb, a, b })
    }

    /// `n` queue pairs between two existing hosts: `b` listens once and
    /// accepts `n` times (in a thread), `a` connects `n` times, each with its
    /// index as private data. Returns `(a side, b side)` per index, matched by
    /// that private data. Panics on failure.
    pub fn connect(
        &self,
        a: &Host,
        b: &Host,
        n: usize,
        cfg_a: &QpConfig,
        cfg_b: &QpConfig,
    ) -> Vec<(Endpoint, Endpoint)> {
        self.try_connect(a, b, n, cfg_a, cfg_b)
            .unwrap_or_else(|e| panic!("connecting {n} queue pair(s): {e}"))
    }

    /// [`Harness::connect`], returning set-up failures.
    pub fn try_connect(
        &self,
        a: &Host,
        b: &Host,
        n: usize,
        cfg_a: &QpConfig,
        cfg_b: &QpConfig,
    ) -> Result<Vec<(Endpoint, Endpoint)>, HarnessError> {
        let timeout = self.wait_timeout();
        let addr = self.next_addr();
        let mut listener =
            b.dev
                .listen(&addr, cfg_b)
                .map_err(|source| HarnessError::Transport {
                    what: format!("listen({addr})"),
                    source,
                })?;
        let target = listener.local_addr();
        type Accepted = Result<(Box<dyn QueuePair>, Vec<u8>), TransportError>;
        let (atx, arx) = mpsc::channel::<Accepted>();
        std::thread::Builder::new()
            .name("conformance-accept".into())
            .spawn(move || {
                for _ in 0..n {
                    let r = listener.accept(timeout);
                    let stop = r.is_err();
                    if atx.send(r).is_err() || stop {
                        break;
                    }
                }
            })
            .map_err(|e| HarnessError::Protocol(format!("spawning the accept thread: {e}")))?;
        let (ctx, crx) = mpsc::channel::<Result<Box<dyn QueuePair>, TransportError>>();
        let dev = a.dev.clone();
        let cfg = cfg_a.clone();
        let to = target.clone();
        std::thread::Builder::new()
            .name("conformance-connect".into())
            .spawn(move || {
                for i in 0..n {
                    let r = dev.connect(&to, &cfg, &(i as u32).to_le_bytes());
                    let stop = r.is_err();
                    if ctx.send(r).is_err() || stop {
                        break;
                    }
                }
            })
            .map_err(|e| HarnessError::Protocol(format!("spawning the connect thread: {e}")))?;

        // Both sides may block until the other shows up; bound the whole
        // set-up so a transport that hangs fails the case instead.
        let deadline = Instant::now() + timeout * 2 + Duration::from_millis(20) * n as u32;
        let left = || deadline.saturating_duration_since(Instant::now());
        let mut clients = Vec::with_capacity(n);
        for i in 0..n {
            match crx.recv_timeout(left()) {
                Ok(Ok(qp)) => clients.push(qp),
                Ok(Err(source)) => {
                    return Err(HarnessError::Transport {
                        what: format!("connect #{i} to {target}"),
                        source,
                    })
                }
                Err(_) => {
                    return Err(HarnessError::Timeout(
                        format!("connect #{i} to {target}"),
                        timeout * 2,
                    ))
                }
            }
        }
        let mut servers: HashMap<u32, Box<dyn QueuePair>> = HashMap::new();
        for i in 0..n {
            match arx.recv_timeout(left()) {
                Ok(Ok((qp, pdata))) => {
                    let idx = pdata
                        .get(..4)
                        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .ok_or_else(|| {
                            HarnessError::Protocol(format!(
                                "accept #{i} returned {} bytes of private data, the connector sent 4",
                                pdata.len()
                            ))
                        })?;
                    if idx as usize >= n || servers.insert(idx, qp).is_some() {
                        return Err(HarnessError::Protocol(format!(
                            "accept #{i} returned private data {pdata:?}: not an index the connector sent, or a duplicate"
                        )));
                    }
                }
                Ok(Err(source)) => {
                    return Err(HarnessError::Transport {
                        what: format!("accept #{i} on {target}"),
                        source,
                    })
                }
                Err(_) => {
                    return Err(HarnessError::Timeout(
                        format!("accept #{i} on {target}"),
                        timeout * 2,
                    ))
                }
            }
        }
        Ok(clients
            .into_iter()
            .enumerate()
            .map(|(i, qa)| {
                let qb = servers
                    .remove(&(i as u32))
                    .expect("every index was accepted");
                (
                    Endpoint::new(qa, timeout, format!("a#{i}")),
                    Endpoint::new(qb, timeout, format!("b#{i}")),
                )
            })
            .collect())
    }
}

/// One simulated host: a device from the factory (wrapped to audit its
/// registrations) and its protection domain.
pub struct Host {
    /// The device (the audited wrapper; hand it to anything that takes a transport).
    pub dev: Arc<dyn Transport>,
    /// Its protection domain.
    pub pd: Pd,
    tracker: Arc<Tracked>,
    timeout: Duration,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("device", &self.dev.caps().name)
            .field("live_registrations", &self.tracker.live())
            .finish()
    }
}

impl Host {
    /// The device's capabilities.
    pub fn caps(&self) -> &DeviceCaps {
        self.dev.caps()
    }

    /// A registered arena of `slots` slots of `slot_size` bytes (local access only).
    pub fn arena(&self, slot_size: usize, slots: usize) -> Arena {
        self.arena_with(ArenaConfig::new(slot_size, slots))
    }

    /// A registered arena; panics with the error if the device refuses.
    pub fn arena_with(&self, cfg: ArenaConfig) -> Arena {
        self.pd
            .arena(cfg.clone())
            .unwrap_or_else(|e| panic!("creating an arena {cfg:?}: {e}"))
    }

    /// A window of `len` bytes a peer may access with `access`.
    pub fn window(&self, len: usize, access: Access) -> Window {
        self.pd
            .window(len, access)
            .unwrap_or_else(|e| panic!("creating a {len}-byte window with {access:?}: {e}"))
    }

    /// The audit of this host's registrations.
    pub fn tracker(&self) -> Arc<Tracked> {
        self.tracker.clone()
    }

    /// Panic unless every registration has ended, every deregistration
    /// succeeded, and the device let go of the memory of every ended
    /// registration within the harness timeout.
    pub fn assert_released(&self, what: &str) {
        self.tracker.assert_released(what, self.timeout);
    }
}

/// A transport wrapper that forwards everything and audits registrations:
/// which are live, whether deregistering succeeded, and whether the device
/// still holds the memory of a registration that ended.
pub struct Tracked {
    inner: Arc<dyn Transport>,
    live: Mutex<HashMap<u32, Weak<dyn RegionMemory>>>,
    ended: Mutex<Vec<(u32, Weak<dyn RegionMemory>)>>,
    failures: Mutex<Vec<String>>,
    registered: AtomicU64,
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked")
            .field("device", &self.inner.caps().name)
            .field("live", &self.live())
            .finish()
    }
}

impl Tracked {
    /// Wrap `inner`.
    pub fn new(inner: Arc<dyn Transport>) -> Tracked {
        Tracked {
            inner,
            live: Mutex::new(HashMap::new()),
            ended: Mutex::new(Vec::new()),
            failures: Mutex::new(Vec::new()),
            registered: AtomicU64::new(0),
        }
    }

    /// The wrapped device.
    pub fn inner(&self) -> &Arc<dyn Transport> {
        &self.inner
    }

    /// Registrations not yet ended.
    pub fn live(&self) -> usize {
        lock(&self.live).len()
    }

    /// Registrations made so far.
    pub fn registered(&self) -> u64 {
        self.registered.load(Ordering::Relaxed)
    }

    /// Deregistrations the device refused, with its error.
    pub fn failures(&self) -> Vec<String> {
        lock(&self.failures).clone()
    }

    /// Ended registrations whose memory someone (the device, or a value the
    /// test still holds) keeps alive, as lkeys.
    pub fn memory_held(&self) -> Vec<u32> {
        lock(&self.ended)
            .iter()
            .filter(|(_, w)| w.strong_count() > 0)
            .map(|(k, _)| *k)
            .collect()
    }

    /// See [`Host::assert_released`].
    pub fn assert_released(&self, what: &str, timeout: Duration) {
        let f = self.failures();
        assert!(f.is_empty(), "{what}: deregistering failed: {f:?}");
        let live: Vec<u32> = lock(&self.live).keys().copied().collect();
        assert!(
            live.is_empty(),
            "{what}: {} registration(s) still live after everything was dropped (lkeys {live:?})",
            live.len()
        );
        let deadline = Instant::now() + timeout;
        loop {
            let held = self.memory_held();
            if held.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the device still holds the memory of {} ended registration(s) (lkeys {held:?}) {timeout:?} after they were deregistered and every queue pair was dropped",
                held.len()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn record(&self, reg: &Registration, mem: &Arc<dyn RegionMemory>) {
        self.registered.fetch_add(1, Ordering::Relaxed);
        lock(&self.live).insert(reg.lkey, Arc::downgrade(mem));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Transport for Tracked {
    fn caps(&self) -> &DeviceCaps {
        self.inner.caps()
    }

    fn register(
        &self,
        mem: Arc<dyn RegionMemory>,
        access: Access,
    ) -> Result<Registration, TransportError> {
        let reg = self.inner.register(mem.clone(), access)?;
        self.record(&reg, &mem);
        Ok(reg)
    }

    fn register_range(
        &self,
        mem: Arc<dyn RegionMemory>,
        offset: usize,
        len: usize,
        access: Access,
    ) -> Result<Registration, TransportError> {
        let reg = self
            .inner
            .register_range(mem.clone(), offset, len, access)?;
        self.record(&reg, &mem);
        Ok(reg)
    }

    fn deregister(&self, lkey: u32) -> Result<(), TransportError> {
        let r = self.inner.deregister(lkey);
        match &r {
            Ok(()) => {
                if let Some(w) = lock(&self.live).remove(&lkey) {
                    lock(&self.ended).push((lkey, w));
                }
            }
            Err(e) => lock(&self.failures).push(format!("lkey {lkey}: {e}")),
        }
        r
    }

    fn create_srq(
        &self,
        max_wr: u32,
        max_sge: u32,
    ) -> Result<Arc<dyn SharedRecvQueue>, TransportError> {
        self.inner.create_srq(max_wr, max_sge)
    }

    fn listen(&self, addr: &str, config: &QpConfig) -> Result<Box<dyn Listener>, TransportError> {
        self.inner.listen(addr, config)
    }

    fn connect(
        &self,
        addr: &str,
        config: &QpConfig,
        private_data: &[u8],
    ) -> Result<Box<dyn QueuePair>, TransportError> {
        self.inner.connect(addr, config, private_data)
    }
}

/// Two hosts and the queue pair between them: `a` connected, `b` listened.
/// Fields drop in order: queue pairs first, then the hosts.
pub struct Pair {
    /// Host `a`'s end.
    pub qa: Endpoint,
    /// Host `b`'s end.
    pub qb: Endpoint,
    /// The connecting host.
    pub a: Host,
    /// The listening host.
    pub b: Host,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("qa", &self.qa)
            .field("qb", &self.qb)
            .finish_non_exhaustive()
    }
}

/// A queue pair with a buffer of completions polled but not yet looked at,
/// and bounded waits that fail with a message instead of hanging.
pub struct Endpoint {
    qp: Box<dyn QueuePair>,
    pending: VecDeque<WorkCompletion>,
    timeout: Duration,
    label: String,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("label", &self.label)
            .field("qp_num", &self.qp.qp_num())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl Endpoint {
    /// Wrap `qp`; `label` names it in failure messages.
    pub fn new(qp: Box<dyn QueuePair>, timeout: Duration, label: impl Into<String>) -> Endpoint {
        Endpoint {
            qp,
            pending: VecDeque::new(),
            timeout,
            label: label.into(),
        }
    }

    /// The queue pair.
    pub fn qp(&mut self) -> &mut dyn QueuePair {
        &mut *self.qp
    }

    /// The label used in messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The wait bound.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The local queue pair number.
    pub fn qp_num(&self) -> u32 {
        self.qp.qp_num()
    }

    /// What the queue pair was created with.
    pub fn caps(&self) -> QpCaps {
        self.qp.caps()
    }

    /// The queue pair's state.
    pub fn state(&self) -> QpState {
        self.qp.state()
    }

    /// Post send-queue requests; panics if the queue pair refuses.
    #[track_caller]
    pub fn post_send(&mut self, wrs: &[WorkRequest<'_>]) {
        if let Err(e) = self.qp.post_send(wrs) {
            panic!(
                "{}: post_send of {} request(s) failed: {e}",
                self.label,
                wrs.len()
            );
        }
    }

    /// Post send-queue requests, returning the refusal.
    pub fn try_post_send(&mut self, wrs: &[WorkRequest<'_>]) -> Result<(), PostError> {
        self.qp.post_send(wrs)
    }

    /// Post receives; panics if the queue pair refuses.
    #[track_caller]
    pub fn post_recv(&mut self, wrs: &[RecvRequest<'_>]) {
        if let Err(e) = self.qp.post_recv(wrs) {
            panic!(
                "{}: post_recv of {} request(s) failed: {e}",
                self.label,
                wrs.len()
            );
        }
    }

    /// Post receives, returning the refusal.
    pub fn try_post_recv(&mut self, wrs: &[RecvRequest<'_>]) -> Result<(), PostError> {
        self.qp.post_recv(wrs)
    }

    /// Move the device's waiting completions into the pending buffer; returns how many.
    pub fn poll(&mut self) -> usize {
        let mut buf = [WorkCompletion::EMPTY; 32];
        let mut total = 0;
        loop {
            let n = self.qp.poll_cq(&mut buf);
            self.pending.extend(&buf[..n]);
            total += n;
            if n < buf.len() {
                return total;
            }
        }
    }

    /// The next completion without waiting: the oldest pending one, or one
    /// freshly polled.
    pub fn poll_one(&mut self) -> Option<WorkCompletion> {
        if self.pending.is_empty() {
            self.poll();
        }
        self.pending.pop_front()
    }

    /// The next completion if one arrives within `within`.
    pub fn try_next(&mut self, within: Duration) -> Option<WorkCompletion> {
        if let Some(wc) = self.pending.pop_front() {
            return Some(wc);
        }
        let deadline = Instant::now() + within;
        let mut buf = [WorkCompletion::EMPTY; 32];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = wait_poll(&mut *self.qp, &mut buf, SPIN.min(left), left);
            if n > 0 {
                self.pending.extend(&buf[..n]);
                return self.pending.pop_front();
            }
            if left.is_zero() {
                return None;
            }
        }
    }

    /// The next completion; panics (naming `what`) if none arrives within the timeout.
    #[track_caller]
    pub fn next(&mut self, what: &str) -> WorkCompletion {
        let t = self.timeout;
        match self.try_next(t) {
            Some(wc) => wc,
            None => panic!(
                "{}: no completion within {t:?} while waiting for {what} (queue pair state {:?})",
                self.label,
                self.qp.state()
            ),
        }
    }

    /// The next `n` completions, in order.
    #[track_caller]
    pub fn take(&mut self, n: usize, what: &str) -> Vec<WorkCompletion> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let t = self.timeout;
            match self.try_next(t) {
                Some(wc) => out.push(wc),
                None => panic!(
                    "{}: only {} of {n} completions within {t:?} while waiting for {what}; got {out:?}",
                    self.label,
                    out.len()
                ),
            }
        }
        out
    }

    /// Wait for the completion of `wr_id`, keeping any other completion
    /// pending (in order) for later calls.
    #[track_caller]
    pub fn wait_wr(&mut self, wr_id: u64, what: &str) -> WorkCompletion {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(i) = self.pending.iter().position(|w| w.wr_id == wr_id) {
                return self.pending.remove(i).expect("index is in range");
            }
            if self.poll() == 0 {
                assert!(
                    Instant::now() < deadline,
                    "{}: no completion for wr_id {wr_id} ({what}) within {:?}; other completions: {:?}",
                    self.label,
                    self.timeout,
                    self.pending
                );
                let left = deadline.saturating_duration_since(Instant::now());
                let mut buf = [WorkCompletion::EMPTY; 32];
                let n = wait_poll(
                    &mut *self.qp,
                    &mut buf,
                    SPIN,
                    left.min(Duration::from_millis(20)),
                );
                self.pending.extend(&buf[..n]);
            }
        }
    }

    /// Collect completions until none arrives for `quiet`.
    pub fn drain(&mut self, quiet: Duration) -> Vec<WorkCompletion> {
        let mut out = Vec::new();
        while let Some(wc) = self.try_next(quiet) {
            out.push(wc);
        }
        out
    }

    /// Panic if any completion arrives within `quiet`.
    #[track_caller]
    pub fn expect_idle(&mut self, quiet: Duration, what: &str) {
        if let Some(wc) = self.try_next(quiet) {
            panic!(
                "{}: expected no completion ({what}), got {wc:?}",
                self.label
            );
        }
    }

    /// Move the queue pair to the error state.
    pub fn disconnect(&mut self) {
        self.qp.disconnect();
    }

    /// The wrapped queue pair.
    pub fn into_qp(self) -> Box<dyn QueuePair> {
        self.qp
    }
}
