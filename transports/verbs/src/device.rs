//! The device: opening, capabilities, registration.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Once};

use zcmsg::mem::sys::{memlock_release, memlock_reserve, page_size};
use zcmsg::{
    Access, AddressSpace, DeviceCaps, Listener, QpConfig, QueuePair, RegionMemory, Registration,
    SharedRecvQueue, Transport, TransportError,
};

use crate::notify::{Dispatch, EventLoop};
use crate::sys::{self, ForkStatus};

/// What to do about `fork()` safety of registered memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForkPolicy {
    /// Call `ibv_fork_init` before the first device is opened, unless
    /// libibverbs says the kernel makes it unneeded (Linux >= 5.13 with
    /// copy-on-fork for pinned pages) or it is already enabled
    /// (`RDMAV_FORK_SAFE=1` / `IBV_FORK_SAFE=1` in the environment).
    #[default]
    Auto,
    /// Leave libibverbs as it is (the process never forks while devices are open).
    Leave,
}

/// How a [`VerbsDevice`] is opened.
#[derive(Clone, Debug)]
pub struct VerbsConfig {
    /// The port to use (1 on single-port devices such as rxe).
    pub port: u8,
    /// The address space SGEs and remote addresses use. `None`: IOVAs
    /// (`ibv_reg_mr_iova2`, region-relative: each region's IOVA is the
    /// in-page offset of its first byte) when the library has
    /// `ibv_reg_mr_iova2`, CPU addresses otherwise. `Some(Cpu)` registers
    /// with `ibv_reg_mr` (IOVA = CPU address); `Some(Iova)` fails to open if
    /// `ibv_reg_mr_iova2` is missing.
    pub address_space: Option<AddressSpace>,
    /// Source address for outgoing connections (RoCE: the kernel picks the
    /// GID from it). `None`: routing decides.
    pub source_addr: Option<IpAddr>,
    /// Source interface for outgoing connections: its first address of the
    /// destination's family is used as the source address.
    pub source_interface: Option<String>,
    /// Fork safety, see [`ForkPolicy`].
    pub fork: ForkPolicy,
    /// Inline limit to report in [`DeviceCaps::max_inline_data`]. `None`:
    /// probed at open by creating throw-away queue pairs.
    pub max_inline_data: Option<u32>,
    /// Refuse connections whose GID is not RoCE v2 on Ethernet ports (by
    /// default such a connection is only logged as a warning).
    pub require_roce_v2: bool,
    /// Listen backlog.
    pub listen_backlog: i32,
}

impl Default for VerbsConfig {
    fn default() -> Self {
        VerbsConfig {
            port: 1,
            address_space: None,
            source_addr: None,
            source_interface: None,
            fork: ForkPolicy::Auto,
            max_inline_data: None,
            require_roce_v2: false,
            listen_backlog: 64,
        }
    }
}

/// What queue pairs, listeners and shared receive queues share with the device.
pub(crate) struct Core {
    // Stops the event thread first.
    _events: EventLoop,
    pub(crate) dispatch: Arc<Dispatch>,
    pub(crate) comp: Arc<sys::CompChannel>,
    pub(crate) cm: Arc<sys::EventChannel>,
    pub(crate) pd: Arc<sys::Pd>,
    pub(crate) ctx: Arc<sys::Context>,
    pub(crate) attr: sys::DeviceAttr,
    pub(crate) port: sys::PortAttr,
    pub(crate) cfg: VerbsConfig,
    pub(crate) caps: DeviceCaps,
    /// Live registrations by lkey, for checking and translating inline
    /// SGEs (read lock-free on the send path, replaced on every change).
    pub(crate) regions: arc_swap::ArcSwap<sys::Regions>,
    /// Bumped after every replacement of `regions` (Release): a queue
    /// pair's one-entry cache of it is current while this is unchanged.
    pub(crate) regions_gen: std::sync::atomic::AtomicU64,
}

impl Core {
    /// Replace the inline-check table, then bump its generation (Release),
    /// so no queue pair keeps using an entry of the old one.
    fn replace_regions(&self, t: sys::Regions) {
        self.regions.store(Arc::new(t));
        self.regions_gen
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    pub(crate) fn name(&self) -> &str {
        self.ctx.name()
    }

    /// READ/atomic depths to offer: (responder resources, initiator depth).
    pub(crate) fn rd_atomic(&self) -> (u8, u8) {
        let r = self.attr.max_qp_rd_atom.min(16) as u8;
        let i = self.attr.max_qp_init_rd_atom.min(16) as u8;
        (r, i)
    }
}

struct MrEntry {
    mr: sys::Mr,
    pinned: u64,
}

/// An RDMA device opened with one protection domain: the hardware
/// [`Transport`].
pub struct VerbsDevice {
    mrs: Mutex<HashMap<u32, MrEntry>>,
    core: Arc<Core>,
    fork: ForkStatus,
}

impl std::fmt::Debug for VerbsDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsDevice")
            .field("name", &self.core.name())
            .field("port", &self.core.cfg.port)
            .field("address_space", &self.core.caps.address_space)
            .finish()
    }
}

/// Names of the RDMA devices on this machine (`ibv_get_device_list`).
///
/// Errors say why there are none: [`TransportError::LibraryMissing`] (no
/// rdma-core), [`TransportError::NoRdmaStack`] (the kernel has no RDMA
/// support), [`TransportError::Permission`].
pub fn list_devices() -> Result<Vec<String>, TransportError> {
    sys::device_names()
}

static FORK: Once = Once::new();

fn fork_safety(policy: ForkPolicy) -> ForkStatus {
    if policy == ForkPolicy::Auto {
        FORK.call_once(|| match sys::fork_status() {
            ForkStatus::Disabled => match sys::fork_init() {
                Ok(()) => tracing::debug!("ibv_fork_init: registered memory is fork-safe"),
                Err(e) => tracing::warn!(
                    "ibv_fork_init failed ({}): a child process that touches registered memory may corrupt DMA; set RDMAV_FORK_SAFE=1 before starting the process",
                    sys::os_err(e)
                ),
            },
            s => tracing::debug!("fork safety: {s:?}"),
        });
    }
    sys::fork_status()
}

impl VerbsDevice {
    /// Open device `name` (or the first one) with `cfg`.
    ///
    /// Errors: [`TransportError::LibraryMissing`] when libibverbs or
    /// librdmacm cannot be loaded, [`TransportError::NoRdmaStack`] when the
    /// kernel has no RDMA support (`ibv_get_device_list` fails with ENOSYS),
    /// [`TransportError::NoDevice`] when there is no device (or none named
    /// `name`), [`TransportError::Permission`] when access is denied.
    pub fn open(name: Option<&str>, cfg: &VerbsConfig) -> Result<Arc<VerbsDevice>, TransportError> {
        let lib = sys::libraries()?;
        let fork = fork_safety(cfg.fork);
        let names = sys::device_names()?;
        if names.is_empty() {
            return Err(TransportError::NoDevice(None));
        }
        if let Some(n) = name {
            if !names.iter().any(|d| d == n) {
                tracing::info!(?names, "RDMA devices present");
                return Err(TransportError::NoDevice(Some(n.to_owned())));
            }
        }
        let ctx = sys::Context::open(name)?;
        let attr = ctx.query()?;
        if cfg.port == 0 || cfg.port > attr.phys_port_cnt.max(1) {
            return Err(TransportError::InvalidArgument(format!(
                "{} has {} port(s); port {} does not exist",
                ctx.name(),
                attr.phys_port_cnt,
                cfg.port
            )));
        }
        let port = ctx.query_port(cfg.port)?;
        if port.state != 4 {
            tracing::warn!(
                device = ctx.name(),
                port = cfg.port,
                state = port.state,
                "port is not active (is the network interface up?)"
            );
        }
        let address_space = match cfg.address_space {
            Some(AddressSpace::Iova) if !lib.reg_mr_iova2 => {
                return Err(TransportError::Unsupported(
                    "AddressSpace::Iova needs ibv_reg_mr_iova2, which this libibverbs lacks",
                ))
            }
            Some(s) => s,
            None if lib.reg_mr_iova2 => AddressSpace::Iova,
            None => AddressSpace::Cpu,
        };
        let pd = sys::Pd::alloc(&ctx)?;
        let max_inline_data = match cfg.max_inline_data {
            Some(v) => v,
            None => probed_inline(&ctx, &pd),
        };
        let caps = DeviceCaps {
            name: ctx.name().to_owned(),
            address_space,
            max_send_sge: attr.max_sge,
            max_recv_sge: attr.max_sge,
            max_sge_rd: attr.max_sge_rd,
            max_msg_sz: port.max_msg_sz,
            max_inline_data,
            max_qp_wr: attr.max_qp_wr,
            max_mr_size: attr.max_mr_size,
            atomics: attr.atomics,
            srq: attr.max_srq > 0,
            implicit_odp: attr.implicit_odp(),
            dma_remote_writes: true,
        };
        let comp = sys::CompChannel::create(&ctx)?;
        let cm = sys::EventChannel::create()?;
        let dispatch = Arc::new(Dispatch::default());
        let events = EventLoop::start(ctx.name(), comp.clone(), cm.clone(), dispatch.clone())?;
        tracing::info!(
            device = ctx.name(),
            port = cfg.port,
            link_layer = if port.link_layer == 2 { "Ethernet" } else { "InfiniBand" },
            ?address_space,
            max_sge = attr.max_sge,
            max_sge_rd = attr.max_sge_rd,
            max_qp_wr = attr.max_qp_wr,
            max_msg_sz = port.max_msg_sz,
            active_mtu = 128u32 << port.active_mtu.min(5),
            max_inline_data,
            atomics = attr.atomics,
            implicit_odp = caps.implicit_odp,
            fork = ?fork,
            "opened RDMA device"
        );
        Ok(Arc::new(VerbsDevice {
            mrs: Mutex::new(HashMap::new()),
            core: Arc::new(Core {
                _events: events,
                dispatch,
                comp,
                cm,
                pd,
                ctx,
                attr,
                port,
                cfg: cfg.clone(),
                caps,
                regions: arc_swap::ArcSwap::from_pointee(sys::Regions::new()),
                regions_gen: std::sync::atomic::AtomicU64::new(0),
            }),
            fork,
        }))
    }

    /// The device name.
    pub fn name(&self) -> &str {
        self.core.name()
    }

    /// The port in use.
    pub fn port(&self) -> u8 {
        self.core.cfg.port
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &VerbsConfig {
        &self.core.cfg
    }

    /// libibverbs' fork protection when the device was opened.
    pub fn fork_status(&self) -> ForkStatus {
        self.fork
    }

    /// Most READ/atomic operations a queue pair of this device can have in
    /// flight as initiator (`max_qp_init_rd_atom`).
    pub fn max_qp_init_rd_atom(&self) -> u32 {
        self.core.attr.max_qp_init_rd_atom
    }

    /// Registrations currently live.
    pub fn registrations(&self) -> usize {
        self.lock_mrs().len()
    }

    /// Whether the port's link layer is Ethernet (RoCE).
    pub fn is_roce(&self) -> bool {
        self.core.port.link_layer == 2
    }

    /// The type of GID `index` of the port as sysfs names it (`"RoCE v2"`,
    /// `"IB/RoCE v1"`), if it can be read.
    pub fn gid_type(&self, index: u32) -> Option<String> {
        crate::qp::gid_type(self.core.name(), self.core.cfg.port, index)
    }

    fn lock_mrs(&self) -> std::sync::MutexGuard<'_, HashMap<u32, MrEntry>> {
        self.mrs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replace the inline-check table with an edited copy (callers hold the
    /// `mrs` lock, so edits do not race).
    fn update_regions(&self, edit: impl FnOnce(&mut sys::Regions)) {
        let cur = self.core.regions.load();
        let mut t = sys::Regions::with_capacity(cur.len() + 1);
        for (k, r) in cur.iter() {
            t.insert(*k, r.clone());
        }
        edit(&mut t);
        self.core.replace_regions(t);
    }

    /// The IOVA a registration of `cpu` gets in this device's address space.
    fn iova_for(&self, cpu: u64) -> Option<u64> {
        match self.core.caps.address_space {
            // Region-relative: keep the offset within the page, as
            // ibv_reg_mr_iova2 requires, and nothing of the CPU address.
            AddressSpace::Iova => Some(cpu & (page_size() as u64 - 1)),
            AddressSpace::Cpu => None,
        }
    }
}

fn access_bits(a: Access) -> u32 {
    use rdma_mummy_sys::ibv_access_flags as f;
    let mut bits = 0;
    if a.contains(Access::LOCAL_WRITE) {
        bits |= f::IBV_ACCESS_LOCAL_WRITE.0;
    }
    if a.contains(Access::REMOTE_WRITE) {
        bits |= f::IBV_ACCESS_REMOTE_WRITE.0;
    }
    if a.contains(Access::REMOTE_READ) {
        bits |= f::IBV_ACCESS_REMOTE_READ.0;
    }
    if a.contains(Access::REMOTE_ATOMIC) {
        bits |= f::IBV_ACCESS_REMOTE_ATOMIC.0;
    }
    // Verbs refuses remote write or atomic access without local write.
    if a.contains(Access::REMOTE_WRITE) || a.contains(Access::REMOTE_ATOMIC) {
        bits |= f::IBV_ACCESS_LOCAL_WRITE.0;
    }
    bits
}

/// [`probe_inline`], once per device name and process (the answer does not
/// change, and each probe creates several queue pairs).
fn probed_inline(ctx: &Arc<sys::Context>, pd: &Arc<sys::Pd>) -> u32 {
    static CACHE: std::sync::OnceLock<Mutex<HashMap<String, u32>>> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(&v) = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(ctx.name())
    {
        return v;
    }
    let v = probe_inline(ctx, pd);
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(ctx.name().to_owned(), v);
    v
}

/// The largest inline size the device grants, found by creating throw-away
/// RC queue pairs (0 if even 1 byte is refused).
fn probe_inline(ctx: &Arc<sys::Context>, pd: &Arc<sys::Pd>) -> u32 {
    let Ok(cq) = sys::Cq::create(ctx, 2, 0, None) else {
        return 0;
    };
    if let Some(v) = sys::probe_inline(pd, &cq, 1024) {
        return v;
    }
    let (mut lo, mut hi) = (0u32, 1024u32); // lo granted, hi refused
    let mut granted = 0;
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        match sys::probe_inline(pd, &cq, mid) {
            Some(g) => {
                lo = mid;
                granted = g;
            }
            None => hi = mid,
        }
    }
    granted.max(lo)
}

impl Transport for VerbsDevice {
    fn caps(&self) -> &DeviceCaps {
        &self.core.caps
    }

    fn register(
        &self,
        mem: Arc<dyn RegionMemory>,
        access: Access,
    ) -> Result<Registration, TransportError> {
        let len = mem.len();
        self.register_range(mem, 0, len, access)
    }

    fn register_range(
        &self,
        mem: Arc<dyn RegionMemory>,
        offset: usize,
        len: usize,
        access: Access,
    ) -> Result<Registration, TransportError> {
        if offset.checked_add(len).is_none_or(|e| e > mem.len()) {
            return Err(TransportError::InvalidArgument(format!(
                "range {offset}+{len} lies outside the {}-byte memory",
                mem.len()
            )));
        }
        if len == 0 {
            return Err(TransportError::InvalidArgument(
                "cannot register an empty range".into(),
            ));
        }
        if len as u64 > self.core.caps.max_mr_size {
            return Err(TransportError::InvalidArgument(format!(
                "{len} bytes exceed the device's max_mr_size {}",
                self.core.caps.max_mr_size
            )));
        }
        let cpu = mem.as_ptr() as u64 + offset as u64;
        let iova = self.iova_for(cpu);
        let pinned = len as u64;
        memlock_reserve(pinned)?;
        let bits = access_bits(access);
        let region = sys::Region::new(mem.clone(), offset, len, iova.unwrap_or(cpu));
        let mr = match self.core.pd.register(mem, offset, len, bits, iova) {
            Ok(mr) => mr,
            Err(e) => {
                memlock_release(pinned);
                let what = match iova {
                    Some(v) => format!("ibv_reg_mr_iova2 of {len} bytes at {cpu:#x} (iova {v:#x}, access {access:?})"),
                    None => format!("ibv_reg_mr of {len} bytes at {cpu:#x} (access {access:?})"),
                };
                return Err(match e {
                    libc::EPERM | libc::EACCES => {
                        TransportError::Permission(format!("{what}: {}", sys::os_err(e)))
                    }
                    libc::EINVAL => TransportError::InvalidArgument(format!(
                        "{what}: the device refused it (EINVAL)"
                    )),
                    libc::ENOMEM | libc::EAGAIN => TransportError::io(
                        format!("{what}: the kernel refused to pin the memory; raise RLIMIT_MEMLOCK (`ulimit -l unlimited`, systemd LimitMEMLOCK=infinity) or grant CAP_IPC_LOCK"),
                        sys::os_err(e),
                    ),
                    _ => TransportError::io(what, sys::os_err(e)),
                });
            }
        };
        let reg = Registration {
            lkey: mr.lkey(),
            rkey: mr.rkey(),
            iova: iova.unwrap_or(cpu),
        };
        tracing::debug!(
            lkey = reg.lkey,
            rkey = reg.rkey,
            iova = reg.iova,
            len,
            "registered"
        );
        let mut mrs = self.lock_mrs();
        if let Some(old) = mrs.insert(reg.lkey, MrEntry { mr, pinned }) {
            // Keys are unique per device context; this cannot happen, but if
            // it did the old region must not be dropped silently.
            tracing::error!(lkey = reg.lkey, "lkey reused while registered");
            memlock_release(old.pinned);
        }
        if let Some(region) = region {
            self.update_regions(|t| {
                t.insert(reg.lkey, region);
            });
        }
        drop(mrs);
        Ok(reg)
    }

    fn deregister(&self, lkey: u32) -> Result<(), TransportError> {
        let mut mrs = self.lock_mrs();
        let e = mrs.remove(&lkey).ok_or_else(|| {
            TransportError::InvalidArgument(format!("no registration with lkey {lkey}"))
        })?;
        // Inline SGEs stop passing the check before the region goes away.
        self.update_regions(|t| {
            t.remove(&lkey);
        });
        drop(mrs);
        let pinned = e.pinned;
        match e.mr.deregister() {
            Ok(()) => {
                memlock_release(pinned);
                Ok(())
            }
            Err((mr, code)) => {
                self.lock_mrs().insert(lkey, MrEntry { mr, pinned });
                Err(TransportError::io(
                    format!("ibv_dereg_mr(lkey {lkey})"),
                    sys::os_err(code),
                ))
            }
        }
    }

    fn create_srq(
        &self,
        max_wr: u32,
        max_sge: u32,
    ) -> Result<Arc<dyn SharedRecvQueue>, TransportError> {
        crate::srq::VerbsSrq::create(&self.core, max_wr, max_sge)
            .map(|s| Arc::new(s) as Arc<dyn SharedRecvQueue>)
    }

    fn listen(&self, addr: &str, config: &QpConfig) -> Result<Box<dyn Listener>, TransportError> {
        crate::cm::VerbsListener::bind(&self.core, addr, config)
            .map(|l| Box::new(l) as Box<dyn Listener>)
    }

    fn connect(
        &self,
        addr: &str,
        config: &QpConfig,
        private_data: &[u8],
    ) -> Result<Box<dyn QueuePair>, TransportError> {
        crate::cm::connect(&self.core, addr, config, private_data)
            .map(|q| Box::new(q) as Box<dyn QueuePair>)
    }
}

impl Drop for VerbsDevice {
    fn drop(&mut self) {
        self.core.replace_regions(sys::Regions::new());
        let mrs: Vec<MrEntry> = self.lock_mrs().drain().map(|(_, e)| e).collect();
        for e in mrs {
            let pinned = e.pinned;
            match e.mr.deregister() {
                Ok(()) => memlock_release(pinned),
                // Dropping the Mr retries and, failing again, leaks the memory.
                Err((mr, code)) => {
                    tracing::warn!("ibv_dereg_mr at device close failed: {}", sys::os_err(code));
                    drop(mr);
                }
            }
        }
    }
}
