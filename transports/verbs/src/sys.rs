//! The FFI boundary: the only module of this crate with `unsafe` code.
//!
//! Every raw libibverbs / librdmacm object is wrapped in an owning handle
//! whose `Drop` destroys it, and every child holds an `Arc` of its parent
//! (a memory region its protection domain, a protection domain its device
//! context, a queue pair its completion queues, an rdma_cm id its event
//! channel), so no object can outlive what it was created from whatever order
//! the rest of the crate drops things in. The handles' methods are safe: they
//! only pass pointers the handles own, and memory the device may touch comes
//! in as `Arc<dyn RegionMemory>` (whose unsafe trait promises it stays valid)
//! and is kept alive by the registration. Inline SGEs, which the provider
//! copies with the CPU at post time, are checked against the registration
//! table and translated to CPU addresses before they are posted
//! ([`CmId::post_send`]).
//!
//! Struct fields: `rdma-mummy-sys` is generated from rdma-core headers newer
//! than Debian 12's rdma-core 44. Only fields of structs whose layout is part
//! of the stable ABI are read or written (`ibv_sge`, `ibv_send_wr`,
//! `ibv_recv_wr`, `ibv_wc`, `ibv_qp_init_attr`, `ibv_qp_attr`,
//! `ibv_device_attr`, `rdma_cm_id`'s leading fields, `rdma_conn_param`,
//! `rdma_cm_event`); the extended queries (`ibv_query_device_ex`,
//! `ibv_query_port`) pass their struct size, zero the whole struct first, and
//! read only fields that rdma-core 44 fills (`odp_caps`, the classic port
//! attributes).

use std::ffi::{c_int, c_uint, c_void, CStr};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rdma_mummy_sys as ffi;
use zcmsg::{
    Opcode, RecvRequest, RegionMemory, SendFlags, Sge, TransportError, WcOpcode, WcStatus,
    WorkCompletion, WorkRequest,
};

// `zcmsg::Sge` is handed to the device by pointer as an `ibv_sge` list, with
// no conversion. The framework asserts `Sge` is 16 bytes, 8-aligned, with
// `addr` at 0, `length` at 8 and `lkey` at 12; these assert `ibv_sge` is the same.
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<Sge>() == size_of::<ffi::ibv_sge>());
    assert!(align_of::<Sge>() == align_of::<ffi::ibv_sge>());
    assert!(size_of::<ffi::ibv_sge>() == 16);
    assert!(offset_of!(ffi::ibv_sge, addr) == 0);
    assert!(offset_of!(ffi::ibv_sge, length) == 8);
    assert!(offset_of!(ffi::ibv_sge, lkey) == 12);
};

/// View a list of SGEs as the `ibv_sge` list the device reads.
#[inline]
fn sge_ptr(sges: &[Sge]) -> *mut ffi::ibv_sge {
    if sges.is_empty() {
        std::ptr::null_mut()
    } else {
        // The layouts are identical (checked at compile time above); the
        // device only reads through this pointer.
        sges.as_ptr().cast::<ffi::ibv_sge>().cast_mut()
    }
}

/// The calling thread's `errno`.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn set_errno(v: i32) {
    // SAFETY: `__errno_location` returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() = v };
}

/// An OS error for a raw errno (positive or negative).
pub fn os_err(code: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(code.abs())
}

// ---------------------------------------------------------------------------
// Libraries, fork safety, device lists
// ---------------------------------------------------------------------------

/// What the run-time libraries offer.
#[derive(Clone, Copy, Debug)]
pub struct LibInfo {
    /// `ibv_reg_mr_iova2` is exported (otherwise only IOVA == VA works).
    pub reg_mr_iova2: bool,
}

fn dlerror_string() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by libdl,
    // valid until the next dl* call on this thread; it is copied at once.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "unknown dlopen error".into()
    } else {
        // SAFETY: non-null, NUL-terminated (see above).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Check that libibverbs and librdmacm can be loaded (rdma-mummy-sys loads
/// them at start-up and turns every call into `EOPNOTSUPP` when they are
/// missing; this says which one is missing and why).
pub fn libraries() -> Result<LibInfo, TransportError> {
    static INFO: OnceLock<Result<LibInfo, String>> = OnceLock::new();
    let r = INFO.get_or_init(|| {
        let mut info = LibInfo {
            reg_mr_iova2: false,
        };
        for lib in [c"libibverbs.so.1", c"librdmacm.so.1"] {
            // SAFETY: a NUL-terminated library name; the handle is kept open
            // for the life of the process (rdma-mummy-sys holds it open too).
            let h = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
            if h.is_null() {
                return Err(format!("{}: {}", lib.to_string_lossy(), dlerror_string()));
            }
            if lib == c"libibverbs.so.1" {
                // SAFETY: `h` is a live handle and the name NUL-terminated.
                let sym = unsafe { libc::dlsym(h, c"ibv_reg_mr_iova2".as_ptr()) };
                info.reg_mr_iova2 = !sym.is_null();
            }
        }
        Ok(info)
    });
    r.clone().map_err(TransportError::LibraryMissing)
}

/// libibverbs' fork protection state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForkStatus {
    /// Not initialized: a child process touching registered pages may corrupt DMA.
    Disabled,
    /// `ibv_fork_init` ran (or `RDMAV_FORK_SAFE`/`IBV_FORK_SAFE` was set).
    Enabled,
    /// The kernel keeps registered pages safe across fork by itself (Linux >= 5.13).
    Unneeded,
}

/// `ibv_is_fork_initialized`.
pub fn fork_status() -> ForkStatus {
    // SAFETY: no arguments; reads libibverbs' global state.
    match unsafe { ffi::ibv_is_fork_initialized() } {
        ffi::IBV_FORK_ENABLED => ForkStatus::Enabled,
        ffi::IBV_FORK_UNNEEDED => ForkStatus::Unneeded,
        _ => ForkStatus::Disabled,
    }
}

/// `ibv_fork_init`; returns the error code on failure.
pub fn fork_init() -> Result<(), i32> {
    // SAFETY: no arguments; must run before resources exist, which the caller
    // arranges (it is called before any device is opened).
    let rc = unsafe { ffi::ibv_fork_init() };
    if rc == 0 {
        Ok(())
    } else {
        Err(rc.abs())
    }
}

/// Map the errno of a failed `ibv_get_device_list` / `rdma_get_devices`.
fn list_error(what: &str, e: i32) -> TransportError {
    match e {
        libc::ENOSYS => TransportError::NoRdmaStack,
        libc::EACCES | libc::EPERM => TransportError::Permission(format!(
            "{what}: {} (access to /dev/infiniband is needed)",
            os_err(e)
        )),
        libc::EOPNOTSUPP => {
            TransportError::LibraryMissing(format!("{what}: the RDMA library could not be loaded"))
        }
        _ => TransportError::io(what.to_string(), os_err(e)),
    }
}

/// Names of the verbs devices (`ibv_get_device_list`).
pub fn device_names() -> Result<Vec<String>, TransportError> {
    libraries()?;
    let mut n: c_int = 0;
    set_errno(0);
    // SAFETY: `n` is a valid out-parameter.
    let list = unsafe { ffi::ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Err(list_error("ibv_get_device_list", errno()));
    }
    let mut names = Vec::with_capacity(n.max(0) as usize);
    for i in 0..n.max(0) as usize {
        // SAFETY: the list holds `n` valid device pointers.
        let dev = unsafe { *list.add(i) };
        if dev.is_null() {
            break;
        }
        // SAFETY: `dev` is a device of the list, alive until the list is freed.
        let name = unsafe { ffi::ibv_get_device_name(dev) };
        if !name.is_null() {
            // SAFETY: a NUL-terminated name owned by the device.
            names.push(
                unsafe { CStr::from_ptr(name) }
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    // SAFETY: `list` came from ibv_get_device_list and is freed once.
    unsafe { ffi::ibv_free_device_list(list) };
    Ok(names)
}

// ---------------------------------------------------------------------------
// Device context
// ---------------------------------------------------------------------------

/// A device context as librdmacm opened it (`rdma_get_devices`): queue pairs
/// created on rdma_cm ids must use a protection domain of exactly this
/// context, so the device is opened through librdmacm, not `ibv_open_device`.
pub struct Context {
    list: *mut *mut ffi::ibv_context,
    raw: *mut ffi::ibv_context,
    name: String,
}

// SAFETY: an ibv_context is thread-safe (libibverbs serializes what needs
// it); this handle only hands out its pointer to libibverbs calls.
unsafe impl Send for Context {}
// SAFETY: see `Send`.
unsafe impl Sync for Context {}

/// The device attributes the transport uses (`ibv_device_attr`, reduced).
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceAttr {
    /// Largest registration.
    pub max_mr_size: u64,
    /// Deepest work queue.
    pub max_qp_wr: u32,
    /// SGEs per request.
    pub max_sge: u32,
    /// SGEs per RDMA READ.
    pub max_sge_rd: u32,
    /// Largest completion queue.
    pub max_cqe: u32,
    /// Outstanding READ/atomic requests a QP can answer.
    pub max_qp_rd_atom: u32,
    /// Outstanding READ/atomic requests a QP can issue.
    pub max_qp_init_rd_atom: u32,
    /// Atomic operations supported.
    pub atomics: bool,
    /// Shared receive queues.
    pub max_srq: u32,
    /// Most work requests per shared receive queue.
    pub max_srq_wr: u32,
    /// SGEs per shared receive queue request.
    pub max_srq_sge: u32,
    /// Physical ports.
    pub phys_port_cnt: u8,
    /// `ibv_odp_caps.general_caps` (0 when the extended query is unsupported).
    pub odp_general_caps: u64,
}

impl DeviceAttr {
    /// The device supports implicit on-demand paging.
    pub fn implicit_odp(&self) -> bool {
        let support = ffi::ibv_odp_general_caps::IBV_ODP_SUPPORT.0 as u64;
        let implicit = ffi::ibv_odp_general_caps::IBV_ODP_SUPPORT_IMPLICIT.0 as u64;
        self.odp_general_caps & support != 0 && self.odp_general_caps & implicit != 0
    }
}

/// Port attributes the transport uses (`ibv_port_attr`, reduced).
#[derive(Clone, Copy, Debug, Default)]
pub struct PortAttr {
    /// `ibv_port_state` (4 = active).
    pub state: u32,
    /// Active MTU enum (1 = 256 ... 5 = 4096).
    pub active_mtu: u32,
    /// Largest message.
    pub max_msg_sz: u32,
    /// 1 = InfiniBand, 2 = Ethernet.
    pub link_layer: u8,
}

impl Context {
    /// Open `name` (or the first device) through librdmacm.
    pub fn open(name: Option<&str>) -> Result<Arc<Context>, TransportError> {
        let mut n: c_int = 0;
        set_errno(0);
        // SAFETY: `n` is a valid out-parameter.
        let list = unsafe { ffi::rdma_get_devices(&mut n) };
        if list.is_null() {
            let e = errno();
            return Err(match e {
                libc::ENODEV | libc::ENOENT => TransportError::NoDevice(name.map(str::to_owned)),
                _ => list_error(
                    "rdma_get_devices (is the rdma_ucm kernel module loaded?)",
                    e,
                ),
            });
        }
        let mut found = None;
        let mut names = Vec::new();
        for i in 0..n.max(0) as usize {
            // SAFETY: the list holds `n` context pointers.
            let ctx = unsafe { *list.add(i) };
            if ctx.is_null() {
                break;
            }
            // SAFETY: a live context from librdmacm; `device` is set by libibverbs.
            let dev = unsafe { (*ctx).device };
            // SAFETY: `dev` is the context's device.
            let cname = unsafe { ffi::ibv_get_device_name(dev) };
            if cname.is_null() {
                continue;
            }
            // SAFETY: NUL-terminated, owned by the device.
            let s = unsafe { CStr::from_ptr(cname) }
                .to_string_lossy()
                .into_owned();
            if found.is_none() && name.is_none_or(|want| want == s) {
                found = Some((ctx, s.clone()));
            }
            names.push(s);
        }
        match found {
            Some((raw, name)) => Ok(Arc::new(Context { list, raw, name })),
            None => {
                // SAFETY: `list` came from rdma_get_devices and is freed once.
                unsafe { ffi::rdma_free_devices(list) };
                tracing::debug!(?names, "rdma_cm devices");
                Err(TransportError::NoDevice(name.map(str::to_owned)))
            }
        }
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The context pointer as a number, to compare with an rdma_cm id's device.
    pub fn id(&self) -> usize {
        self.raw as usize
    }

    /// `ibv_query_device` plus the ODP part of `ibv_query_device_ex`.
    pub fn query(&self) -> Result<DeviceAttr, TransportError> {
        // SAFETY: all-zero is a valid ibv_device_attr (integers and arrays).
        let mut a: ffi::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `raw` is a live context and `a` a valid out-parameter.
        let rc = unsafe { ffi::ibv_query_device(self.raw, &mut a) };
        if rc != 0 {
            return Err(TransportError::io("ibv_query_device", os_err(rc)));
        }
        // SAFETY: all-zero is a valid ibv_device_attr_ex (plain data).
        let mut ex: ffi::ibv_device_attr_ex = unsafe { std::mem::zeroed() };
        // SAFETY: live context; `ex` is zeroed and its size is passed by the
        // wrapper, so an older library fills only the prefix it knows.
        let rc = unsafe { ffi::ibv_query_device_ex(self.raw, std::ptr::null(), &mut ex) };
        let odp = if rc == 0 { ex.odp_caps.general_caps } else { 0 };
        Ok(DeviceAttr {
            max_mr_size: a.max_mr_size,
            max_qp_wr: a.max_qp_wr.max(0) as u32,
            max_sge: a.max_sge.max(0) as u32,
            max_sge_rd: a.max_sge_rd.max(0) as u32,
            max_cqe: a.max_cqe.max(0) as u32,
            max_qp_rd_atom: a.max_qp_rd_atom.max(0) as u32,
            max_qp_init_rd_atom: a.max_qp_init_rd_atom.max(0) as u32,
            atomics: a.atomic_cap != ffi::ibv_atomic_cap::IBV_ATOMIC_NONE,
            max_srq: a.max_srq.max(0) as u32,
            max_srq_wr: a.max_srq_wr.max(0) as u32,
            max_srq_sge: a.max_srq_sge.max(0) as u32,
            phys_port_cnt: a.phys_port_cnt,
            odp_general_caps: odp,
        })
    }

    /// `ibv_query_port`.
    pub fn query_port(&self, port: u8) -> Result<PortAttr, TransportError> {
        // SAFETY: all-zero is a valid ibv_port_attr.
        let mut p: ffi::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: live context; `p` zeroed, its size passed by the wrapper.
        let rc = unsafe { ffi::ibv_query_port(self.raw, port, &mut p) };
        if rc != 0 {
            return Err(TransportError::io(
                format!("ibv_query_port({}, {port})", self.name),
                os_err(rc),
            ));
        }
        Ok(PortAttr {
            state: p.state,
            active_mtu: p.active_mtu,
            max_msg_sz: p.max_msg_sz,
            link_layer: p.link_layer,
        })
    }

    /// `ibv_query_gid`: the 16 raw bytes of GID `index` of `port`.
    pub fn query_gid(&self, port: u8, index: u32) -> Option<[u8; 16]> {
        // SAFETY: all-zero is a valid ibv_gid (a byte array union).
        let mut gid: ffi::ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: live context; `gid` a valid out-parameter.
        let rc = unsafe { ffi::ibv_query_gid(self.raw, port, index as c_int, &mut gid) };
        if rc != 0 {
            return None;
        }
        // SAFETY: every bit pattern is a valid `[u8; 16]`.
        Some(unsafe { gid.raw })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: `list` came from rdma_get_devices; every child object holds
        // an Arc of this context, so none is left.
        unsafe { ffi::rdma_free_devices(self.list) };
    }
}

// ---------------------------------------------------------------------------
// Protection domain and memory regions
// ---------------------------------------------------------------------------

/// A protection domain (`ibv_pd`).
pub struct Pd {
    raw: *mut ffi::ibv_pd,
    _ctx: Arc<Context>,
}

// SAFETY: ibv_pd is used by libibverbs calls only, which are thread-safe.
unsafe impl Send for Pd {}
// SAFETY: see `Send`.
unsafe impl Sync for Pd {}

impl Pd {
    /// `ibv_alloc_pd`.
    pub fn alloc(ctx: &Arc<Context>) -> Result<Arc<Pd>, TransportError> {
        // SAFETY: live context.
        let raw = unsafe { ffi::ibv_alloc_pd(ctx.raw) };
        if raw.is_null() {
            return Err(TransportError::io("ibv_alloc_pd", os_err(errno())));
        }
        Ok(Arc::new(Pd {
            raw,
            _ctx: ctx.clone(),
        }))
    }

    /// Register `[offset, offset + len)` of `mem` with `access`
    /// (`ibv_access_flags` bits), at `iova` (`ibv_reg_mr_iova2`) or at its
    /// CPU address (`ibv_reg_mr`). On failure returns the errno.
    pub fn register(
        self: &Arc<Self>,
        mem: Arc<dyn RegionMemory>,
        offset: usize,
        len: usize,
        access: u32,
        iova: Option<u64>,
    ) -> Result<Mr, i32> {
        if offset.checked_add(len).is_none_or(|e| e > mem.len()) || len == 0 {
            return Err(libc::EINVAL);
        }
        // In bounds of one allocation (checked above): pointer arithmetic only.
        let addr = mem.as_ptr().wrapping_add(offset).cast::<c_void>();
        set_errno(0);
        let raw = match iova {
            // SAFETY: `addr..addr+len` lies in `mem`, which `RegionMemory`
            // promises stays valid while `mem` lives; the returned Mr keeps
            // `mem` alive until the region is deregistered.
            Some(iova) => unsafe { ffi::ibv_reg_mr_iova2(self.raw, addr, len, iova, access) },
            // SAFETY: as above.
            None => unsafe { ffi::ibv_reg_mr(self.raw, addr, len, access as c_int) },
        };
        if raw.is_null() {
            let e = errno();
            return Err(if e == 0 { libc::EINVAL } else { e });
        }
        Ok(Mr {
            raw,
            mem: Some(mem),
            _pd: self.clone(),
        })
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: every object created in this PD holds an Arc of it, so none is left.
        let rc = unsafe { ffi::ibv_dealloc_pd(self.raw) };
        if rc != 0 {
            tracing::warn!("ibv_dealloc_pd failed: {}", os_err(rc));
        }
    }
}

/// A memory region (`ibv_mr`), keeping its memory alive.
pub struct Mr {
    raw: *mut ffi::ibv_mr,
    mem: Option<Arc<dyn RegionMemory>>,
    _pd: Arc<Pd>,
}

// SAFETY: ibv_mr is only read (keys) and deregistered through libibverbs.
unsafe impl Send for Mr {}
// SAFETY: see `Send`.
unsafe impl Sync for Mr {}

impl Mr {
    /// Local key.
    pub fn lkey(&self) -> u32 {
        // SAFETY: `raw` is a live MR; lkey is written once at registration.
        unsafe { (*self.raw).lkey }
    }
    /// Remote key.
    pub fn rkey(&self) -> u32 {
        // SAFETY: as for `lkey`.
        unsafe { (*self.raw).rkey }
    }

    /// `ibv_dereg_mr`. On failure the region stays registered and is handed back.
    pub fn deregister(mut self) -> Result<(), (Mr, i32)> {
        // SAFETY: live MR, deregistered once (Drop sees `raw` null afterwards).
        let rc = unsafe { ffi::ibv_dereg_mr(self.raw) };
        if rc != 0 {
            return Err((self, rc.abs()));
        }
        self.raw = std::ptr::null_mut();
        self.mem = None;
        Ok(())
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        if self.raw.is_null() {
            return;
        }
        // SAFETY: live MR, deregistered once.
        let rc = unsafe { ffi::ibv_dereg_mr(self.raw) };
        if rc != 0 {
            tracing::warn!(
                "ibv_dereg_mr failed ({}); leaking the memory the device may still use",
                os_err(rc)
            );
            // The device may still touch the memory: never free it.
            if let Some(m) = self.mem.take() {
                std::mem::forget(m);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Completion channels and queues
// ---------------------------------------------------------------------------

fn set_nonblocking(fd: RawFd) -> Result<(), i32> {
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL have no memory arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(errno());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(errno());
    }
    Ok(())
}

/// A completion channel (`ibv_comp_channel`) with a non-blocking descriptor.
pub struct CompChannel {
    raw: *mut ffi::ibv_comp_channel,
    _ctx: Arc<Context>,
}

// SAFETY: the channel is read by one thread (the device's event thread) and
// otherwise only named when creating CQs; libibverbs allows both.
unsafe impl Send for CompChannel {}
// SAFETY: see `Send`.
unsafe impl Sync for CompChannel {}

impl CompChannel {
    /// `ibv_create_comp_channel`, made non-blocking.
    pub fn create(ctx: &Arc<Context>) -> Result<Arc<CompChannel>, TransportError> {
        // SAFETY: live context.
        let raw = unsafe { ffi::ibv_create_comp_channel(ctx.raw) };
        if raw.is_null() {
            return Err(TransportError::io(
                "ibv_create_comp_channel",
                os_err(errno()),
            ));
        }
        let ch = CompChannel {
            raw,
            _ctx: ctx.clone(),
        };
        set_nonblocking(ch.fd()).map_err(|e| TransportError::io("fcntl(O_NONBLOCK)", os_err(e)))?;
        Ok(Arc::new(ch))
    }

    /// The descriptor that becomes readable when a completion event is queued.
    pub fn fd(&self) -> RawFd {
        // SAFETY: live channel; `fd` is set at creation.
        unsafe { (*self.raw).fd }
    }

    /// Take one completion event, acknowledge it at once and return the CQ's
    /// context (the key it was created with); `None` when none is queued.
    pub fn next_event(&self) -> Option<usize> {
        let mut cq: *mut ffi::ibv_cq = std::ptr::null_mut();
        let mut cq_ctx: *mut c_void = std::ptr::null_mut();
        // SAFETY: live channel, valid out-parameters; the fd is non-blocking.
        let rc = unsafe { ffi::ibv_get_cq_event(self.raw, &mut cq, &mut cq_ctx) };
        if rc != 0 || cq.is_null() {
            return None;
        }
        // SAFETY: `cq` was just reported by the channel. Its destruction
        // waits (inside libibverbs) until every reported event is acked, so it
        // is alive here; it is acked exactly once.
        unsafe { ffi::ibv_ack_cq_events(cq, 1) };
        Some(cq_ctx as usize)
    }
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        // SAFETY: every CQ on this channel holds an Arc of it, so none is left.
        let rc = unsafe { ffi::ibv_destroy_comp_channel(self.raw) };
        if rc != 0 {
            tracing::warn!("ibv_destroy_comp_channel failed: {}", os_err(rc));
        }
    }
}

/// A completion queue (`ibv_cq`).
pub struct Cq {
    raw: *mut ffi::ibv_cq,
    _channel: Option<Arc<CompChannel>>,
    _ctx: Arc<Context>,
}

// SAFETY: polling and arming go through the provider, which locks the CQ.
unsafe impl Send for Cq {}
// SAFETY: see `Send`.
unsafe impl Sync for Cq {}

/// A raw work completion, as polled.
pub type RawWc = ffi::ibv_wc;

/// An all-zero raw completion, to size poll buffers.
pub fn empty_wc() -> RawWc {
    // SAFETY: ibv_wc is plain integers and a union of integers: all-zero is valid.
    unsafe { std::mem::zeroed() }
}

impl Cq {
    /// `ibv_create_cq` with `cqe` entries, reporting events with context `key`
    /// on `channel`.
    pub fn create(
        ctx: &Arc<Context>,
        cqe: u32,
        key: usize,
        channel: Option<&Arc<CompChannel>>,
    ) -> Result<Arc<Cq>, TransportError> {
        let ch = channel.map_or(std::ptr::null_mut(), |c| c.raw);
        // SAFETY: live context and channel (of the same context); the key is
        // an opaque number handed back in events.
        let raw = unsafe {
            ffi::ibv_create_cq(
                ctx.raw,
                cqe.min(i32::MAX as u32) as c_int,
                key as *mut c_void,
                ch,
                0,
            )
        };
        if raw.is_null() {
            return Err(TransportError::io(
                format!("ibv_create_cq({cqe} entries)"),
                os_err(errno()),
            ));
        }
        Ok(Arc::new(Cq {
            raw,
            _channel: channel.cloned(),
            _ctx: ctx.clone(),
        }))
    }

    /// `ibv_poll_cq` into `out`; returns how many (0 on a provider error, logged).
    #[inline]
    pub fn poll(&self, out: &mut [RawWc]) -> usize {
        if out.is_empty() {
            return 0;
        }
        let n = out.len().min(i32::MAX as usize) as i32;
        // SAFETY: live CQ; `out` has room for `n` entries.
        let rc = unsafe { ffi::ibv_poll_cq(self.raw, n, out.as_mut_ptr()) };
        if rc < 0 {
            poll_failed(rc);
            return 0;
        }
        rc as usize
    }

    /// `ibv_req_notify_cq` for the next completion (not only solicited ones).
    pub fn req_notify(&self) -> Result<(), i32> {
        // SAFETY: live CQ created with a completion channel (or none: then
        // the provider just arms nothing).
        let rc = unsafe { ffi::ibv_req_notify_cq(self.raw, 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(rc.abs())
        }
    }
}

/// A provider's poll error, reported out of line (the busy-poll path
/// stays free of the logging's frame).
#[cold]
#[inline(never)]
fn poll_failed(rc: i32) {
    tracing::error!("ibv_poll_cq failed: {rc}");
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: every QP on this CQ holds an Arc of it, so none is left;
        // events reported for it are acked by the event thread right away,
        // which ibv_destroy_cq waits for.
        let rc = unsafe { ffi::ibv_destroy_cq(self.raw) };
        if rc != 0 {
            tracing::warn!("ibv_destroy_cq failed: {}", os_err(rc));
        }
    }
}

/// A completion status other than success, as [`WcStatus`].
#[cold]
#[inline(never)]
fn error_status(st: ffi::ibv_wc_status::Type) -> WcStatus {
    use ffi::ibv_wc_status as s;
    match st {
        s::IBV_WC_SUCCESS => WcStatus::Success,
        s::IBV_WC_LOC_LEN_ERR => WcStatus::LocLenErr,
        s::IBV_WC_LOC_QP_OP_ERR => WcStatus::LocQpOpErr,
        s::IBV_WC_LOC_EEC_OP_ERR => WcStatus::LocEecOpErr,
        s::IBV_WC_LOC_PROT_ERR => WcStatus::LocProtErr,
        s::IBV_WC_WR_FLUSH_ERR => WcStatus::WrFlushErr,
        s::IBV_WC_MW_BIND_ERR => WcStatus::MwBindErr,
        s::IBV_WC_BAD_RESP_ERR => WcStatus::BadRespErr,
        s::IBV_WC_LOC_ACCESS_ERR => WcStatus::LocAccessErr,
        s::IBV_WC_REM_INV_REQ_ERR => WcStatus::RemInvReqErr,
        s::IBV_WC_REM_ACCESS_ERR => WcStatus::RemAccessErr,
        s::IBV_WC_REM_OP_ERR => WcStatus::RemOpErr,
        s::IBV_WC_RETRY_EXC_ERR => WcStatus::RetryExcErr,
        s::IBV_WC_RNR_RETRY_EXC_ERR => WcStatus::RnrRetryExcErr,
        s::IBV_WC_LOC_RDD_VIOL_ERR => WcStatus::LocRddViolErr,
        s::IBV_WC_REM_INV_RD_REQ_ERR => WcStatus::RemInvRdReqErr,
        s::IBV_WC_REM_ABORT_ERR => WcStatus::RemAbortErr,
        s::IBV_WC_INV_EECN_ERR => WcStatus::InvEecnErr,
        s::IBV_WC_INV_EEC_STATE_ERR => WcStatus::InvEecStateErr,
        s::IBV_WC_FATAL_ERR => WcStatus::FatalErr,
        s::IBV_WC_RESP_TIMEOUT_ERR => WcStatus::RespTimeoutErr,
        // IBV_WC_GENERAL_ERR, the tag-matching statuses and anything newer.
        _ => WcStatus::GeneralErr,
    }
}

/// Convert one raw completion. `recv` says it came from a receive CQ: the
/// opcode of an error completion is undefined in verbs, so receive-side
/// errors are reported as `Recv` and send-side errors as `Send`.
#[inline]
pub fn completion(wc: &RawWc, recv: bool) -> WorkCompletion {
    use ffi::ibv_wc_opcode as o;
    // Success tested first, the rest mapped out of line: the full match
    // compiles to a jump table, an indirect jump on every completion.
    let status = if wc.status == ffi::ibv_wc_status::IBV_WC_SUCCESS {
        WcStatus::Success
    } else {
        error_status(wc.status)
    };
    let opcode = if recv {
        if status == WcStatus::Success && wc.opcode == o::IBV_WC_RECV_RDMA_WITH_IMM {
            WcOpcode::RecvRdmaWithImm
        } else {
            WcOpcode::Recv
        }
    } else if status != WcStatus::Success {
        WcOpcode::Send
    } else {
        match wc.opcode {
            o::IBV_WC_RDMA_WRITE => WcOpcode::RdmaWrite,
            o::IBV_WC_RDMA_READ => WcOpcode::RdmaRead,
            o::IBV_WC_COMP_SWAP => WcOpcode::CompSwap,
            o::IBV_WC_FETCH_ADD => WcOpcode::FetchAdd,
            _ => WcOpcode::Send,
        }
    };
    let with_imm = ffi::ibv_wc_flags::IBV_WC_WITH_IMM.0;
    let imm_data = (status == WcStatus::Success && wc.wc_flags & with_imm != 0).then(|| {
        // SAFETY: with IBV_WC_WITH_IMM set the union holds the immediate
        // (network byte order); any u32 bit pattern is valid anyway.
        u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data })
    });
    WorkCompletion {
        wr_id: wc.wr_id,
        status,
        opcode,
        byte_len: wc.byte_len,
        imm_data,
        qp_num: wc.qp_num,
    }
}

/// `ibv_wc_status_str` of a raw status (for logs).
pub fn wc_status_str(status: u32) -> String {
    // SAFETY: returns a static string or NULL.
    let p = unsafe { ffi::ibv_wc_status_str(status) };
    if p.is_null() {
        format!("status {status}")
    } else {
        // SAFETY: static NUL-terminated string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

// ---------------------------------------------------------------------------
// Work request lists
// ---------------------------------------------------------------------------

type RawSendWr = ffi::ibv_send_wr;
type RawRecvWr = ffi::ibv_recv_wr;

/// A reusable array of send work requests: a post builds its chained list
/// here, so steady-state posting allocates nothing. Between posts it holds
/// stale pointers that nothing reads. `inline` holds the checked CPU-address
/// SGEs of INLINE requests for the duration of a post.
#[derive(Default)]
pub struct SendList {
    wrs: Vec<RawSendWr>,
    inline: Vec<Sge>,
}

/// A reusable array of receive work requests (see [`SendList`]).
#[derive(Default)]
pub struct RecvList(Vec<RawRecvWr>);

// SAFETY: the raw pointers inside are only written by the owner and read by
// the provider during a post, which borrows the list mutably.
unsafe impl Send for SendList {}
// SAFETY: see `SendList`.
unsafe impl Send for RecvList {}

impl SendList {
    /// Room for `n` requests before the first post grows it.
    pub fn with_capacity(n: usize) -> SendList {
        SendList {
            wrs: Vec::with_capacity(n),
            inline: Vec::with_capacity(n),
        }
    }

    /// The first request, for a post of one (made on first use).
    #[inline]
    fn first(&mut self) -> &mut RawSendWr {
        if self.wrs.is_empty() {
            self.wrs.push(empty_send_wr());
        }
        &mut self.wrs[0]
    }
}

/// A registration as the send path sees it: where its bytes are for the
/// device (`iova`) and for the CPU (`cpu`), and the memory kept alive.
///
/// Invariant (checked by [`Region::new`]): `cpu..cpu + len` lies inside the
/// memory, which stays valid while this value (or a table holding it) lives.
#[derive(Clone)]
pub struct Region {
    iova: u64,
    cpu: u64,
    len: u64,
    _mem: Arc<dyn RegionMemory>,
}

impl Region {
    /// `[offset, offset + len)` of `mem`, registered at `iova`.
    pub fn new(mem: Arc<dyn RegionMemory>, offset: usize, len: usize, iova: u64) -> Option<Region> {
        if offset.checked_add(len)? > mem.len() || iova.checked_add(len as u64).is_none() {
            return None;
        }
        Some(Region {
            iova,
            cpu: mem.as_ptr() as u64 + offset as u64,
            len: len as u64,
            _mem: mem,
        })
    }

    /// The CPU address of `[addr, addr + len)` (device address space), if
    /// the range lies inside the region.
    #[inline]
    fn translate(&self, addr: u64, len: u32) -> Option<u64> {
        let off = addr.checked_sub(self.iova)?;
        (off.checked_add(u64::from(len))? <= self.len).then_some(self.cpu + off)
    }
}

/// The device's registrations by lkey.
pub type Regions = std::collections::HashMap<u32, Region>;

/// Why a post stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostFail {
    /// The provider refused request `index` with `code`.
    Provider {
        /// First request not posted.
        index: usize,
        /// Error code.
        code: i32,
    },
    /// Request `index` is INLINE and one of its SGEs is not inside the
    /// registration its lkey names; nothing from it on was posted.
    Inline {
        /// First request not posted.
        index: usize,
    },
}

impl RecvList {
    /// Room for `n` requests before the first post grows it.
    pub fn with_capacity(n: usize) -> RecvList {
        RecvList(Vec::with_capacity(n))
    }
}

/// An all-zero send work request.
pub fn empty_send_wr() -> RawSendWr {
    // SAFETY: ibv_send_wr is integers, raw pointers and unions of those: all-zero is valid.
    unsafe { std::mem::zeroed() }
}

/// An all-zero receive work request.
pub fn empty_recv_wr() -> RawRecvWr {
    // SAFETY: integers and raw pointers: all-zero is valid.
    unsafe { std::mem::zeroed() }
}

#[inline]
fn opcode(op: Opcode) -> ffi::ibv_wr_opcode::Type {
    use ffi::ibv_wr_opcode as w;
    match op {
        Opcode::Send => w::IBV_WR_SEND,
        Opcode::SendWithImm => w::IBV_WR_SEND_WITH_IMM,
        Opcode::RdmaWrite => w::IBV_WR_RDMA_WRITE,
        Opcode::RdmaWriteWithImm => w::IBV_WR_RDMA_WRITE_WITH_IMM,
        Opcode::RdmaRead => w::IBV_WR_RDMA_READ,
        Opcode::AtomicCmpAndSwp => w::IBV_WR_ATOMIC_CMP_AND_SWP,
        Opcode::AtomicFetchAndAdd => w::IBV_WR_ATOMIC_FETCH_AND_ADD,
        // `Opcode` is non-exhaustive; a new variant is refused before posting.
        _ => w::IBV_WR_SEND,
    }
}

/// `ibv_send_flags` of `f`: the same bits (checked at compile time).
#[inline(always)]
fn send_flags(f: SendFlags) -> c_uint {
    c_uint::from(f.bits())
}

const _: () = {
    use ffi::ibv_send_flags as s;
    assert!(SendFlags::FENCE.bits() as u32 == s::IBV_SEND_FENCE.0);
    assert!(SendFlags::SIGNALED.bits() as u32 == s::IBV_SEND_SIGNALED.0);
    assert!(SendFlags::SOLICITED.bits() as u32 == s::IBV_SEND_SOLICITED.0);
    assert!(SendFlags::INLINE.bits() as u32 == s::IBV_SEND_INLINE.0);
};

/// `ibv_post_send` of the one request `raw` (its `next` is null).
///
/// # Safety
/// `qp` is a live queue pair, and every SGE `raw` points at, with the
/// memory it names, stays valid for the call (what each caller shows).
#[inline]
unsafe fn post_one_raw(qp: *mut ffi::ibv_qp, raw: &mut RawSendWr) -> Result<(), PostFail> {
    let mut bad: *mut RawSendWr = std::ptr::null_mut();
    // SAFETY: the caller's contract above.
    let rc = unsafe { ffi::ibv_post_send(qp, raw, &mut bad) };
    if rc != 0 {
        return Err(PostFail::Provider {
            index: 0,
            code: rc.abs(),
        });
    }
    Ok(())
}

/// Fill `raw` from `wr`: the SGE list is referenced, not copied.
#[inline]
fn fill_send_wr(raw: &mut RawSendWr, wr: &WorkRequest<'_>) {
    raw.wr_id = wr.wr_id;
    raw.next = std::ptr::null_mut();
    raw.sg_list = sge_ptr(wr.sg_list);
    raw.num_sge = wr.sg_list.len() as c_int;
    raw.opcode = opcode(wr.opcode);
    raw.send_flags = send_flags(wr.flags);
    raw.imm_data_invalidated_rkey_union = ffi::imm_data_invalidated_rkey_union_t {
        imm_data: if wr.opcode.has_imm() {
            wr.imm_data.to_be()
        } else {
            0
        },
    };
    raw.wr = if wr.opcode.is_atomic() {
        ffi::wr_t {
            atomic: ffi::atomic_t {
                remote_addr: wr.remote_addr,
                compare_add: wr.compare_add,
                swap: wr.swap,
                rkey: wr.rkey,
            },
        }
    } else {
        ffi::wr_t {
            rdma: ffi::rdma_t {
                remote_addr: wr.remote_addr,
                rkey: wr.rkey,
            },
        }
    };
}

/// Check and translate the SGEs of INLINE requests into `inline` (CPU
/// addresses: the provider copies inline payloads with the CPU), looking
/// each lkey up in `hint` (one current entry of the table) first, then in
/// `regions`. Returns how many requests may be posted: all, or up to the
/// first INLINE request with an SGE outside the registration its lkey names.
fn check_inline(
    inline: &mut Vec<Sge>,
    wrs: &[WorkRequest<'_>],
    hint: Option<(u32, &Region)>,
    regions: Option<&Regions>,
) -> usize {
    inline.clear();
    for (i, wr) in wrs.iter().enumerate() {
        if !wr.flags.contains(SendFlags::INLINE) {
            continue;
        }
        let start = inline.len();
        for sge in wr.sg_list {
            if sge.length() == 0 {
                inline.push(Sge::new(0, 0, sge.lkey()));
                continue;
            }
            let region = match hint {
                Some((k, r)) if k == sge.lkey() => Some(r),
                _ => regions.and_then(|r| r.get(&sge.lkey())),
            };
            let cpu = region.and_then(|r| r.translate(sge.addr(), sge.length()));
            match cpu {
                Some(cpu) => inline.push(Sge::new(cpu, sge.length(), sge.lkey())),
                None => {
                    inline.truncate(start);
                    return i;
                }
            }
        }
    }
    wrs.len()
}

/// Build a chained list of `wrs` in `scratch` (grown, never shrunk) and
/// return its head. INLINE requests take their SGEs from `scratch.inline`
/// (filled by [`check_inline`] for exactly these requests), the others
/// reference their own lists.
fn chain_send(scratch: &mut SendList, wrs: &[WorkRequest<'_>]) -> *mut RawSendWr {
    let SendList { wrs: raw, inline } = scratch;
    if raw.len() < wrs.len() {
        raw.resize_with(wrs.len(), empty_send_wr);
    }
    let base = raw.as_mut_ptr();
    let mut cursor = 0;
    for (i, wr) in wrs.iter().enumerate() {
        fill_send_wr(&mut raw[i], wr);
        if wr.flags.contains(SendFlags::INLINE) {
            let n = wr.sg_list.len();
            raw[i].sg_list = sge_ptr(&inline[cursor..cursor + n]);
            cursor += n;
        }
        if i + 1 < wrs.len() {
            // In bounds: `raw` holds at least `wrs.len()` entries and is
            // not reallocated until the post returns.
            raw[i].next = base.wrapping_add(i + 1);
        }
    }
    base
}

/// Build a chained receive list in `scratch` and return its head.
/// `raw`'s request fields from `wr` (its SGE pointer borrows `wr`); `next`
/// is left as it is.
#[inline]
fn fill_recv_wr(raw: &mut RawRecvWr, wr: &RecvRequest<'_>) {
    raw.wr_id = wr.wr_id;
    raw.sg_list = sge_ptr(wr.sg_list);
    raw.num_sge = wr.sg_list.len() as c_int;
}

fn chain_recv(scratch: &mut RecvList, wrs: &[RecvRequest<'_>]) -> *mut RawRecvWr {
    let scratch = &mut scratch.0;
    if scratch.len() < wrs.len() {
        scratch.resize_with(wrs.len(), empty_recv_wr);
    }
    let base = scratch.as_mut_ptr();
    for (i, wr) in wrs.iter().enumerate() {
        let r = &mut scratch[i];
        fill_recv_wr(r, wr);
        r.next = if i + 1 < wrs.len() {
            base.wrapping_add(i + 1)
        } else {
            std::ptr::null_mut()
        };
    }
    base
}

/// Index of `bad` in the list starting at `base` (0 when unknown).
fn bad_index<T>(base: *mut T, bad: *mut T, len: usize) -> usize {
    if bad.is_null() {
        return 0;
    }
    let off = (bad as usize).wrapping_sub(base as usize) / std::mem::size_of::<T>().max(1);
    off.min(len)
}

// ---------------------------------------------------------------------------
// Shared receive queues
// ---------------------------------------------------------------------------

/// A shared receive queue (`ibv_srq`).
pub struct Srq {
    raw: *mut ffi::ibv_srq,
    max_wr: u32,
    max_sge: u32,
    pd: Arc<Pd>,
}

// SAFETY: ibv_post_srq_recv is thread-safe in libibverbs providers.
unsafe impl Send for Srq {}
// SAFETY: see `Send`.
unsafe impl Sync for Srq {}

impl Srq {
    /// `ibv_create_srq`; returns the queue with the granted depth and SGEs.
    pub fn create(pd: &Arc<Pd>, max_wr: u32, max_sge: u32) -> Result<Arc<Srq>, TransportError> {
        // SAFETY: all-zero is a valid ibv_srq_init_attr.
        let mut attr: ffi::ibv_srq_init_attr = unsafe { std::mem::zeroed() };
        attr.attr.max_wr = max_wr;
        attr.attr.max_sge = max_sge;
        // SAFETY: live PD; `attr` valid and updated with the granted values.
        let raw = unsafe { ffi::ibv_create_srq(pd.raw, &mut attr) };
        if raw.is_null() {
            let e = errno();
            return Err(if e == libc::EINVAL {
                TransportError::InvalidArgument(format!(
                    "ibv_create_srq refused max_wr {max_wr}, max_sge {max_sge}"
                ))
            } else {
                TransportError::io("ibv_create_srq", os_err(e))
            });
        }
        Ok(Arc::new(Srq {
            raw,
            max_wr: attr.attr.max_wr.max(max_wr),
            max_sge: attr.attr.max_sge.max(max_sge),
            pd: pd.clone(),
        }))
    }

    /// Granted depth.
    pub fn max_wr(&self) -> u32 {
        self.max_wr
    }
    /// Granted SGEs per receive.
    pub fn max_sge(&self) -> u32 {
        self.max_sge
    }
    /// The protection domain it was created in.
    pub fn pd(&self) -> &Arc<Pd> {
        &self.pd
    }

    /// `ibv_post_srq_recv` of the whole list with one doorbell. On failure:
    /// (index of the first request not posted, error code).
    pub fn post_recv(
        &self,
        scratch: &mut RecvList,
        wrs: &[RecvRequest<'_>],
    ) -> Result<(), (usize, i32)> {
        if wrs.is_empty() {
            return Ok(());
        }
        let head = chain_recv(scratch, wrs);
        let mut bad: *mut RawRecvWr = std::ptr::null_mut();
        // SAFETY: live SRQ; the list is valid for the call and its SGE
        // pointers borrow `wrs`. The device only writes memory the SGEs'
        // lkeys grant, and checks them itself.
        let rc = unsafe { ffi::ibv_post_srq_recv(self.raw, head, &mut bad) };
        if rc == 0 {
            Ok(())
        } else {
            Err((bad_index(head, bad, wrs.len()), rc.abs()))
        }
    }
}

impl Drop for Srq {
    fn drop(&mut self) {
        // SAFETY: every QP using the SRQ holds an Arc of it, so none is left.
        let rc = unsafe { ffi::ibv_destroy_srq(self.raw) };
        if rc != 0 {
            tracing::warn!("ibv_destroy_srq failed: {}", os_err(rc));
        }
    }
}

// ---------------------------------------------------------------------------
// A QP outside rdma_cm, only to probe what the device grants
// ---------------------------------------------------------------------------

/// Create and destroy an RC queue pair asking for `inline` bytes of inline
/// data; returns what the device granted, or `None` if it refused.
pub fn probe_inline(pd: &Arc<Pd>, cq: &Cq, inline: u32) -> Option<u32> {
    // SAFETY: all-zero is a valid ibv_qp_init_attr.
    let mut attr: ffi::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
    attr.send_cq = cq.raw;
    attr.recv_cq = cq.raw;
    attr.qp_type = ffi::ibv_qp_type::IBV_QPT_RC;
    attr.cap.max_send_wr = 1;
    attr.cap.max_recv_wr = 1;
    attr.cap.max_send_sge = 1;
    attr.cap.max_recv_sge = 1;
    attr.cap.max_inline_data = inline;
    // SAFETY: live PD and CQ of the same context; `attr` valid.
    let qp = unsafe { ffi::ibv_create_qp(pd.raw, &mut attr) };
    if qp.is_null() {
        return None;
    }
    // SAFETY: the QP just created, destroyed once.
    unsafe { ffi::ibv_destroy_qp(qp) };
    Some(attr.cap.max_inline_data.max(inline))
}

// ---------------------------------------------------------------------------
// rdma_cm
// ---------------------------------------------------------------------------

/// An rdma_cm event channel with a non-blocking descriptor.
pub struct EventChannel {
    raw: *mut ffi::rdma_event_channel,
}

// SAFETY: an event channel is a descriptor; librdmacm calls on it are thread-safe.
unsafe impl Send for EventChannel {}
// SAFETY: see `Send`.
unsafe impl Sync for EventChannel {}

/// `rdma_cm_event_type` values used here.
pub mod event {
    use rdma_mummy_sys::rdma_cm_event_type as t;
    /// Address resolved.
    pub const ADDR_RESOLVED: u32 = t::RDMA_CM_EVENT_ADDR_RESOLVED;
    /// Address resolution failed.
    pub const ADDR_ERROR: u32 = t::RDMA_CM_EVENT_ADDR_ERROR;
    /// Route resolved.
    pub const ROUTE_RESOLVED: u32 = t::RDMA_CM_EVENT_ROUTE_RESOLVED;
    /// Route resolution failed.
    pub const ROUTE_ERROR: u32 = t::RDMA_CM_EVENT_ROUTE_ERROR;
    /// A peer wants to connect.
    pub const CONNECT_REQUEST: u32 = t::RDMA_CM_EVENT_CONNECT_REQUEST;
    /// Connecting failed.
    pub const CONNECT_ERROR: u32 = t::RDMA_CM_EVENT_CONNECT_ERROR;
    /// The peer is unreachable.
    pub const UNREACHABLE: u32 = t::RDMA_CM_EVENT_UNREACHABLE;
    /// The peer rejected the connection (or nobody listens).
    pub const REJECTED: u32 = t::RDMA_CM_EVENT_REJECTED;
    /// Connected.
    pub const ESTABLISHED: u32 = t::RDMA_CM_EVENT_ESTABLISHED;
    /// The connection was closed.
    pub const DISCONNECTED: u32 = t::RDMA_CM_EVENT_DISCONNECTED;
    /// The device went away.
    pub const DEVICE_REMOVAL: u32 = t::RDMA_CM_EVENT_DEVICE_REMOVAL;
}

/// A copied rdma_cm event (the original is acked before this is returned).
pub struct CmEvent {
    /// `rdma_cm_event_type`.
    pub kind: u32,
    /// Status (negative errno, or a reject reason).
    pub status: i32,
    /// The id it concerns, as a number (for matching only).
    pub id: usize,
    /// The context the id was created or tagged with.
    pub context: usize,
    /// The private data, as delivered (for IB/RoCE padded to 56 bytes).
    pub private_data: Vec<u8>,
    /// Peer's initiator depth (connect requests).
    pub initiator_depth: u8,
    /// Peer's responder resources (connect requests).
    pub responder_resources: u8,
    /// For a connect request: the new id, owned.
    pub new_id: Option<CmId>,
}

impl std::fmt::Debug for CmEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CmEvent")
            .field("kind", &event_str(self.kind))
            .field("status", &self.status)
            .field("id", &format_args!("{:#x}", self.id))
            .finish()
    }
}

/// `rdma_event_str`.
pub fn event_str(kind: u32) -> String {
    // SAFETY: returns a static string (or NULL when the library is missing).
    let p = unsafe { ffi::rdma_event_str(kind) };
    if p.is_null() {
        format!("event {kind}")
    } else {
        // SAFETY: static NUL-terminated string.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

impl EventChannel {
    /// `rdma_create_event_channel`, made non-blocking.
    pub fn create() -> Result<Arc<EventChannel>, TransportError> {
        // SAFETY: no arguments.
        let raw = unsafe { ffi::rdma_create_event_channel() };
        if raw.is_null() {
            let e = errno();
            return Err(match e {
                libc::ENOSYS => TransportError::NoRdmaStack,
                libc::EACCES | libc::EPERM => TransportError::Permission(format!(
                    "rdma_create_event_channel: {} (access to /dev/infiniband/rdma_cm is needed)",
                    os_err(e)
                )),
                _ => TransportError::io(
                    "rdma_create_event_channel (is the rdma_ucm module loaded?)",
                    os_err(e),
                ),
            });
        }
        let ch = EventChannel { raw };
        set_nonblocking(ch.fd()).map_err(|e| TransportError::io("fcntl(O_NONBLOCK)", os_err(e)))?;
        Ok(Arc::new(ch))
    }

    /// The descriptor that becomes readable when an event is queued.
    pub fn fd(&self) -> RawFd {
        // SAFETY: live channel.
        unsafe { (*self.raw).fd }
    }

    /// Take one event (`Ok(None)` when none is queued). The event is copied
    /// and acknowledged before returning. A connect request's new id is owned
    /// by the returned event and tied to this channel (`self_arc`).
    pub fn next_event(self: &Arc<Self>) -> Result<Option<CmEvent>, i32> {
        let mut ev: *mut ffi::rdma_cm_event = std::ptr::null_mut();
        // SAFETY: live channel, valid out-parameter, non-blocking descriptor.
        let rc = unsafe { ffi::rdma_get_cm_event(self.raw, &mut ev) };
        if rc != 0 || ev.is_null() {
            let e = errno();
            return if e == libc::EAGAIN || e == libc::EWOULDBLOCK || e == 0 {
                Ok(None)
            } else {
                Err(e)
            };
        }
        // SAFETY: `ev` is a live event until acked below; its id is alive
        // (rdma_destroy_id waits until the id's events are acked).
        let out = unsafe {
            let e = &*ev;
            let id = e.id;
            let kind = e.event;
            let context = if id.is_null() {
                0
            } else {
                (*id).context as usize
            };
            let mut out = CmEvent {
                kind,
                status: e.status,
                id: id as usize,
                context,
                private_data: Vec::new(),
                initiator_depth: 0,
                responder_resources: 0,
                new_id: None,
            };
            if matches!(
                kind,
                event::CONNECT_REQUEST | event::ESTABLISHED | event::REJECTED | event::DISCONNECTED
            ) {
                let conn = e.param.conn;
                if !conn.private_data.is_null() && conn.private_data_len > 0 {
                    out.private_data = std::slice::from_raw_parts(
                        conn.private_data.cast::<u8>(),
                        conn.private_data_len as usize,
                    )
                    .to_vec();
                }
                out.initiator_depth = conn.initiator_depth;
                out.responder_resources = conn.responder_resources;
            }
            if kind == event::CONNECT_REQUEST && !id.is_null() {
                out.new_id = Some(CmId {
                    raw: id,
                    channel: self.clone(),
                    parts: None,
                });
            }
            out
        };
        // SAFETY: acked exactly once; nothing of it is used afterwards.
        unsafe { ffi::rdma_ack_cm_event(ev) };
        Ok(Some(out))
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id on this channel holds an Arc of it, so none is left.
        unsafe { ffi::rdma_destroy_event_channel(self.raw) };
    }
}

/// The queue pair's resources, kept alive by the id that owns the QP.
struct QpParts {
    _pd: Arc<Pd>,
    _send_cq: Arc<Cq>,
    _recv_cq: Arc<Cq>,
    _srq: Option<Arc<Srq>>,
}

/// Queue pair sizes asked for and granted (`ibv_qp_cap`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QpCap {
    /// Send queue depth.
    pub max_send_wr: u32,
    /// Receive queue depth.
    pub max_recv_wr: u32,
    /// SGEs per send.
    pub max_send_sge: u32,
    /// SGEs per receive.
    pub max_recv_sge: u32,
    /// Inline bytes.
    pub max_inline_data: u32,
}

/// Connection parameters (`rdma_conn_param`).
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnParam<'a> {
    /// Private data (at most 56 bytes on IB/RoCE).
    pub private_data: &'a [u8],
    /// READ/atomic requests this side answers at once.
    pub responder_resources: u8,
    /// READ/atomic requests this side issues at once.
    pub initiator_depth: u8,
    /// Transport retries.
    pub retry_count: u8,
    /// Receiver-not-ready retries (7 = infinite).
    pub rnr_retry_count: u8,
}

/// An rdma_cm id (`rdma_cm_id`), with the RC queue pair created on it.
pub struct CmId {
    raw: *mut ffi::rdma_cm_id,
    channel: Arc<EventChannel>,
    parts: Option<QpParts>,
}

// SAFETY: librdmacm ids may be used from any thread; the QP's post/poll
// paths are serialized by `&mut` on the owning queue pair.
unsafe impl Send for CmId {}
// SAFETY: the `&self` methods are librdmacm/libibverbs calls that are thread-safe.
unsafe impl Sync for CmId {}

fn sockaddr_of(addr: &SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
        }
    }
    ss
}

fn socketaddr_from(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn rc_errno(rc: c_int) -> Result<(), i32> {
    if rc == 0 {
        Ok(())
    } else {
        let e = errno();
        Err(if e == 0 { rc.abs().max(libc::EIO) } else { e })
    }
}

const RDMA_OPTION_ID: c_int = 0;
const RDMA_OPTION_ID_ACK_TIMEOUT: c_int = 3;

impl CmId {
    /// `rdma_create_id` on `channel` for reliable-connected queue pairs, with `context`.
    pub fn create(channel: &Arc<EventChannel>, context: usize) -> Result<CmId, i32> {
        let mut raw: *mut ffi::rdma_cm_id = std::ptr::null_mut();
        // SAFETY: live channel; valid out-parameter; the context is an opaque number.
        let rc = unsafe {
            ffi::rdma_create_id(
                channel.raw,
                &mut raw,
                context as *mut c_void,
                ffi::rdma_port_space::RDMA_PS_TCP,
            )
        };
        rc_errno(rc)?;
        Ok(CmId {
            raw,
            channel: channel.clone(),
            parts: None,
        })
    }

    /// The id as a number (to match events).
    pub fn id(&self) -> usize {
        self.raw as usize
    }

    /// The device context the id is bound to, as a number (0 when unbound).
    pub fn device(&self) -> usize {
        // SAFETY: live id; `verbs` is set by librdmacm on bind/resolve.
        unsafe { (*self.raw).verbs as usize }
    }

    /// The port the id is bound to.
    pub fn port_num(&self) -> u8 {
        // SAFETY: live id.
        unsafe { (*self.raw).port_num }
    }

    /// Tag the id with `context` (handed back in its events).
    pub fn set_context(&mut self, context: usize) {
        // SAFETY: live id owned by `self`; librdmacm only reads this field back into events.
        unsafe { (*self.raw).context = context as *mut c_void };
    }

    /// The local address (after bind or resolve).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        // SAFETY: live id; the union's storage variant covers every address family.
        let ss = unsafe { (*self.raw).route.addr.src_addr_union.src_storage };
        socketaddr_from(&ss)
    }

    /// The source GID rdma_cm resolved (RoCE: derived from the source address).
    pub fn sgid(&self) -> [u8; 16] {
        // SAFETY: live id; any bit pattern is valid for the raw GID bytes.
        unsafe { (*self.raw).route.addr.addr.ibaddr.sgid.raw }
    }

    /// `rdma_bind_addr`.
    pub fn bind(&mut self, addr: SocketAddr) -> Result<(), i32> {
        let mut ss = sockaddr_of(&addr);
        // SAFETY: live id; `ss` holds a valid address of its family.
        rc_errno(unsafe {
            ffi::rdma_bind_addr(self.raw, (&mut ss as *mut libc::sockaddr_storage).cast())
        })
    }

    /// `rdma_listen`.
    pub fn listen(&mut self, backlog: i32) -> Result<(), i32> {
        // SAFETY: live, bound id.
        rc_errno(unsafe { ffi::rdma_listen(self.raw, backlog) })
    }

    /// `rdma_resolve_addr` (asynchronous: wait for ADDR_RESOLVED).
    pub fn resolve_addr(
        &mut self,
        src: Option<SocketAddr>,
        dst: SocketAddr,
        timeout: Duration,
    ) -> Result<(), i32> {
        let mut d = sockaddr_of(&dst);
        let mut s = src.map(|a| sockaddr_of(&a));
        let sp = s.as_mut().map_or(std::ptr::null_mut(), |s| {
            (s as *mut libc::sockaddr_storage).cast()
        });
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as c_int;
        // SAFETY: live id; the addresses are valid for the call.
        rc_errno(unsafe {
            ffi::rdma_resolve_addr(
                self.raw,
                sp,
                (&mut d as *mut libc::sockaddr_storage).cast(),
                ms,
            )
        })
    }

    /// `rdma_resolve_route` (asynchronous: wait for ROUTE_RESOLVED).
    pub fn resolve_route(&mut self, timeout: Duration) -> Result<(), i32> {
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as c_int;
        // SAFETY: live id with a resolved address.
        rc_errno(unsafe { ffi::rdma_resolve_route(self.raw, ms) })
    }

    /// `rdma_create_qp`: an RC queue pair on `pd` with the given CQs (and
    /// SRQ), tagged with `key`. Returns what was granted.
    pub fn create_qp(
        &mut self,
        pd: &Arc<Pd>,
        send_cq: Arc<Cq>,
        recv_cq: Arc<Cq>,
        srq: Option<Arc<Srq>>,
        cap: QpCap,
        key: usize,
    ) -> Result<QpCap, i32> {
        if self.parts.is_some() {
            return Err(libc::EEXIST);
        }
        // SAFETY: all-zero is a valid ibv_qp_init_attr.
        let mut attr: ffi::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.qp_context = key as *mut c_void;
        attr.send_cq = send_cq.raw;
        attr.recv_cq = recv_cq.raw;
        attr.srq = srq.as_ref().map_or(std::ptr::null_mut(), |s| s.raw);
        attr.qp_type = ffi::ibv_qp_type::IBV_QPT_RC;
        attr.sq_sig_all = 0;
        attr.cap = ffi::ibv_qp_cap {
            max_send_wr: cap.max_send_wr,
            max_recv_wr: if srq.is_some() { 0 } else { cap.max_recv_wr },
            max_send_sge: cap.max_send_sge,
            max_recv_sge: if srq.is_some() { 0 } else { cap.max_recv_sge },
            max_inline_data: cap.max_inline_data,
        };
        // SAFETY: live id bound to the PD's context (librdmacm checks and
        // fails with EINVAL otherwise); CQs and SRQ of the same context;
        // `attr` valid and updated with the granted capabilities.
        rc_errno(unsafe { ffi::rdma_create_qp(self.raw, pd.raw, &mut attr) })?;
        self.parts = Some(QpParts {
            _pd: pd.clone(),
            _send_cq: send_cq,
            _recv_cq: recv_cq,
            _srq: srq,
        });
        Ok(QpCap {
            max_send_wr: attr.cap.max_send_wr,
            max_recv_wr: attr.cap.max_recv_wr,
            max_send_sge: attr.cap.max_send_sge,
            max_recv_sge: attr.cap.max_recv_sge,
            max_inline_data: attr.cap.max_inline_data,
        })
    }

    /// The QP to post sends to, or the refusal when there is none.
    #[inline]
    fn send_qp(&self) -> Result<*mut ffi::ibv_qp, PostFail> {
        let qp = self.qp();
        if qp.is_null() {
            return Err(PostFail::Provider {
                index: 0,
                code: libc::EINVAL,
            });
        }
        Ok(qp)
    }

    fn qp(&self) -> *mut ffi::ibv_qp {
        if self.parts.is_none() {
            return std::ptr::null_mut();
        }
        // SAFETY: live id; `qp` is set by rdma_create_qp.
        unsafe { (*self.raw).qp }
    }

    /// The queue pair number (0 without a QP).
    pub fn qp_num(&self) -> u32 {
        let qp = self.qp();
        if qp.is_null() {
            0
        } else {
            // SAFETY: live QP owned by this id.
            unsafe { (*qp).qp_num }
        }
    }

    /// `rdma_set_option(RDMA_OPTION_ID_ACK_TIMEOUT)`.
    pub fn set_ack_timeout(&mut self, timeout: u8) -> Result<(), i32> {
        let mut v = timeout;
        // SAFETY: live id; the option value is one byte, as the option expects.
        rc_errno(unsafe {
            ffi::rdma_set_option(
                self.raw,
                RDMA_OPTION_ID,
                RDMA_OPTION_ID_ACK_TIMEOUT,
                (&mut v as *mut u8).cast(),
                1,
            )
        })
    }

    fn conn_param(p: &ConnParam<'_>) -> ffi::rdma_conn_param {
        ffi::rdma_conn_param {
            private_data: if p.private_data.is_empty() {
                std::ptr::null()
            } else {
                p.private_data.as_ptr().cast()
            },
            private_data_len: p.private_data.len().min(255) as u8,
            responder_resources: p.responder_resources,
            initiator_depth: p.initiator_depth,
            flow_control: 1,
            retry_count: p.retry_count.min(7),
            rnr_retry_count: p.rnr_retry_count.min(7),
            srq: 0,
            qp_num: 0,
        }
    }

    /// `rdma_connect` (asynchronous: wait for ESTABLISHED).
    pub fn connect(&mut self, p: &ConnParam<'_>) -> Result<(), i32> {
        let mut cp = Self::conn_param(p);
        // SAFETY: live id with a resolved route and a QP; the parameters and
        // private data are valid for the call (librdmacm copies them).
        rc_errno(unsafe { ffi::rdma_connect(self.raw, &mut cp) })
    }

    /// `rdma_accept` (then wait for ESTABLISHED).
    pub fn accept(&mut self, p: &ConnParam<'_>) -> Result<(), i32> {
        let mut cp = Self::conn_param(p);
        // SAFETY: live id from a connect request, with a QP; parameters valid for the call.
        rc_errno(unsafe { ffi::rdma_accept(self.raw, &mut cp) })
    }

    /// `rdma_reject` with no private data.
    pub fn reject(&mut self) -> Result<(), i32> {
        // SAFETY: live id from a connect request.
        rc_errno(unsafe { ffi::rdma_reject(self.raw, std::ptr::null(), 0) })
    }

    /// `rdma_disconnect`: moves the QP to the error state (flushing it) and
    /// tells the peer.
    pub fn disconnect(&self) -> Result<(), i32> {
        // SAFETY: live id; librdmacm serializes with its own state.
        rc_errno(unsafe { ffi::rdma_disconnect(self.raw) })
    }

    /// `rdma_migrate_id` to `channel`.
    pub fn migrate(&mut self, channel: &Arc<EventChannel>) -> Result<(), i32> {
        // SAFETY: live id and channel; librdmacm waits for this id's
        // outstanding events on the old channel to be acked (all are).
        rc_errno(unsafe { ffi::rdma_migrate_id(self.raw, channel.raw) })?;
        self.channel = channel.clone();
        Ok(())
    }

    /// Move the QP to the error state (`ibv_modify_qp`), flushing it.
    pub fn modify_to_error(&self) -> Result<(), i32> {
        let qp = self.qp();
        if qp.is_null() {
            return Err(libc::EINVAL);
        }
        // SAFETY: all-zero is a valid ibv_qp_attr.
        let mut attr: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ffi::ibv_qp_state::IBV_QPS_ERR;
        // SAFETY: live QP; only the state is modified.
        let rc = unsafe {
            ffi::ibv_modify_qp(
                qp,
                &mut attr,
                ffi::ibv_qp_attr_mask::IBV_QP_STATE.0 as c_int,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(rc.abs())
        }
    }

    /// `ibv_query_qp`: (state, source GID index of the address vector).
    pub fn query_state(&self) -> Option<(u32, u8)> {
        let qp = self.qp();
        if qp.is_null() {
            return None;
        }
        // SAFETY: all-zero is valid for both attribute structs.
        let mut attr: ffi::ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut init: ffi::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE.0 | ffi::ibv_qp_attr_mask::IBV_QP_AV.0;
        // SAFETY: live QP; valid out-parameters.
        let rc = unsafe { ffi::ibv_query_qp(qp, &mut attr, mask as c_int, &mut init) };
        (rc == 0).then_some((attr.qp_state, attr.ah_attr.grh.sgid_index))
    }

    /// `ibv_post_send` of the whole list with one doorbell, through the
    /// context's ops table.
    ///
    /// Non-inline SGEs are handed to the device as they are: it checks them
    /// against their lkeys. INLINE requests are copied by the provider with
    /// the CPU during this call, from whatever address their SGEs name, so
    /// their SGEs are checked here against `regions` (the lkey must name a
    /// registration that contains the whole range) and translated to CPU
    /// addresses; `regions` keeps that memory alive for the call. Requests
    /// from the first INLINE one that fails the check on are not posted.
    #[inline]
    pub fn post_send(
        &self,
        scratch: &mut SendList,
        wrs: &[WorkRequest<'_>],
        hint: Option<(u32, &Region)>,
        regions: Option<&Regions>,
    ) -> Result<(), PostFail> {
        let qp = self.send_qp()?;
        let n = check_inline(&mut scratch.inline, wrs, hint, regions);
        if n > 0 {
            let head = chain_send(scratch, &wrs[..n]);
            let mut bad: *mut RawSendWr = std::ptr::null_mut();
            // SAFETY: live QP; the chained list lives in `scratch` for the
            // call; non-inline SGE pointers borrow `wrs` (layout-identical to
            // ibv_sge) and are checked by the device against their keys;
            // inline SGEs point into `scratch.inline`, whose CPU ranges were
            // checked to lie inside registrations whose memory `hint` or
            // `regions` keeps alive for the call.
            let rc = unsafe { ffi::ibv_post_send(qp, head, &mut bad) };
            if rc != 0 {
                return Err(PostFail::Provider {
                    index: bad_index(head, bad, n),
                    code: rc.abs(),
                });
            }
        }
        if n < wrs.len() {
            return Err(PostFail::Inline { index: n });
        }
        Ok(())
    }

    /// [`CmId::post_send`] of one request, without the list's passes (the
    /// latency path posts one request per message, and under emulation, as
    /// on a busy core, every instruction of the wrapper is time). `wr` is
    /// either not INLINE, or INLINE with exactly one non-empty SGE: that
    /// SGE must lie inside `inline_region`, the registration its lkey names
    /// (`None`: no such registration), through which it is translated to
    /// the CPU address the provider copies from. Refused with
    /// [`PostFail::Inline`] otherwise, nothing posted.
    #[inline]
    pub fn post_send_one(
        &self,
        scratch: &mut SendList,
        wr: &WorkRequest<'_>,
        inline_region: Option<&Region>,
    ) -> Result<(), PostFail> {
        let qp = self.send_qp()?;
        let raw = scratch.first();
        fill_send_wr(raw, wr);
        let cpu: [Sge; 1];
        if wr.flags.contains(SendFlags::INLINE) {
            let translated = match wr.sg_list {
                [s] if s.length() > 0 => inline_region
                    .and_then(|r| r.translate(s.addr(), s.length()))
                    .map(|addr| Sge::new(addr, s.length(), s.lkey())),
                _ => None,
            };
            let Some(t) = translated else {
                return Err(PostFail::Inline { index: 0 });
            };
            cpu = [t];
            raw.sg_list = sge_ptr(&cpu);
        }
        // SAFETY: live QP; `raw` is one request (its `next` is null) that
        // lives in `scratch` for the call; a non-inline SGE pointer borrows
        // `wr` (layout-identical to ibv_sge) and is checked by the device
        // against its key; an inline SGE points at `cpu`, a CPU range
        // checked to lie inside `inline_region`, whose memory the caller's
        // borrow keeps alive for the call.
        unsafe { post_one_raw(qp, raw) }
    }

    /// `ibv_post_send` of one INLINE SEND (SEND_WITH_IMM with `imm`) whose
    /// payload is `data`: the provider copies it into the request before
    /// returning, so it needs no registration (no key is read for inline
    /// data). `flags` are the request's flags besides INLINE.
    #[inline]
    pub fn post_inline(
        &self,
        scratch: &mut SendList,
        wr_id: u64,
        flags: SendFlags,
        imm: Option<u32>,
        data: &[u8],
    ) -> Result<(), PostFail> {
        let qp = self.send_qp()?;
        let raw = scratch.first();
        let sge = [Sge::new(data.as_ptr() as u64, data.len() as u32, 0)];
        raw.wr_id = wr_id;
        raw.next = std::ptr::null_mut();
        raw.sg_list = sge_ptr(&sge);
        raw.num_sge = c_int::from(!data.is_empty());
        raw.send_flags = send_flags(flags | SendFlags::INLINE);
        raw.opcode = match imm {
            Some(_) => ffi::ibv_wr_opcode::IBV_WR_SEND_WITH_IMM,
            None => ffi::ibv_wr_opcode::IBV_WR_SEND,
        };
        raw.imm_data_invalidated_rkey_union = ffi::imm_data_invalidated_rkey_union_t {
            imm_data: imm.unwrap_or(0).to_be(),
        };
        // SAFETY: live QP; `raw` is one request (its `next` is null) that
        // lives in `scratch` for the call; its one SGE (none when `data` is
        // empty) is on our stack and names `data`, borrowed for the call:
        // the request is INLINE, so the provider copies those bytes before
        // it returns and reads no key for them.
        unsafe { post_one_raw(qp, raw) }
    }

    /// `ibv_post_recv` of one request, built on the stack (the latency
    /// loops repost one receive per message). On failure: the error code.
    #[inline]
    pub fn post_recv_one(&self, wr: &RecvRequest<'_>) -> Result<(), i32> {
        let qp = self.qp();
        if qp.is_null() {
            return Err(libc::EINVAL);
        }
        let mut raw = empty_recv_wr();
        fill_recv_wr(&mut raw, wr);
        let mut bad: *mut RawRecvWr = std::ptr::null_mut();
        // SAFETY: live QP; `raw` is one request (its `next` is null) on our
        // stack for the call, its SGE pointer borrows `wr`; the device
        // writes only memory the SGEs' lkeys grant and checks them.
        let rc = unsafe { ffi::ibv_post_recv(qp, &mut raw, &mut bad) };
        if rc == 0 {
            Ok(())
        } else {
            Err(rc.abs())
        }
    }

    /// `ibv_post_recv` of the whole list with one doorbell. On failure:
    /// (index of the first request not posted, error code).
    #[inline]
    pub fn post_recv(
        &self,
        scratch: &mut RecvList,
        wrs: &[RecvRequest<'_>],
    ) -> Result<(), (usize, i32)> {
        let qp = self.qp();
        if qp.is_null() {
            return Err((0, libc::EINVAL));
        }
        if wrs.is_empty() {
            return Ok(());
        }
        let head = chain_recv(scratch, wrs);
        let mut bad: *mut RawRecvWr = std::ptr::null_mut();
        // SAFETY: live QP; the list lives in `scratch` for the call; the
        // device writes only memory the SGEs' lkeys grant and checks them.
        let rc = unsafe { ffi::ibv_post_recv(qp, head, &mut bad) };
        if rc == 0 {
            Ok(())
        } else {
            Err((bad_index(head, bad, wrs.len()), rc.abs()))
        }
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        if self.parts.is_some() {
            // SAFETY: live id with a QP created by rdma_create_qp; our own CQs
            // are not destroyed by librdmacm (it only destroys CQs it made).
            unsafe { ffi::rdma_destroy_qp(self.raw) };
        }
        // SAFETY: live id, destroyed once; events reported for it were acked
        // (the event readers ack before dispatching), which this waits for.
        let rc = unsafe { ffi::rdma_destroy_id(self.raw) };
        if rc != 0 {
            tracing::warn!("rdma_destroy_id failed: {}", os_err(errno()));
        }
        // `parts` (CQs, SRQ, PD) drop after the QP and id are gone.
        self.parts = None;
    }
}

// ---------------------------------------------------------------------------
// OS helpers: readiness waits, epoll, eventfd, interfaces
// ---------------------------------------------------------------------------

/// Wait until `fd` is readable or `timeout` passes; true if readable.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as c_int;
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    rc > 0 && p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0
}

/// An epoll instance.
pub struct Epoll {
    fd: RawFd,
}

impl Epoll {
    /// `epoll_create1(EPOLL_CLOEXEC)`.
    pub fn new() -> std::io::Result<Epoll> {
        // SAFETY: no pointers.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Epoll { fd })
    }

    /// Watch `fd` for readability, reporting `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> std::io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: valid epoll fd and event struct; `fd` outlives the epoll
        // instance or is removed first (the caller's structure guarantees it).
        if unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wait for readiness; returns the tokens ready (appended to `out`).
    pub fn wait(&self, out: &mut Vec<u64>, timeout: Option<Duration>) {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as c_int);
        // SAFETY: valid epoll fd and a buffer of 8 events.
        let n = unsafe { libc::epoll_wait(self.fd, evs.as_mut_ptr(), evs.len() as c_int, ms) };
        for ev in evs.iter().take(n.max(0) as usize) {
            out.push(ev.u64);
        }
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: our descriptor, closed once.
        unsafe { libc::close(self.fd) };
    }
}

/// An eventfd, to wake the event thread.
pub struct EventFd {
    fd: RawFd,
}

impl EventFd {
    /// `eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)`.
    pub fn new() -> std::io::Result<EventFd> {
        // SAFETY: no pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(EventFd { fd })
    }
    /// The descriptor.
    pub fn fd(&self) -> RawFd {
        self.fd
    }
    /// Make it readable.
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our descriptor.
        unsafe { libc::write(self.fd, (&one as *const u64).cast(), 8) };
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: our descriptor, closed once.
        unsafe { libc::close(self.fd) };
    }
}

/// The addresses of network interface `name` (`getifaddrs`).
pub fn interface_addrs(name: &str) -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: valid out-parameter; freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freed.
        let ifa = unsafe { &*cur };
        // SAFETY: ifa_name is a NUL-terminated string of the node.
        let n = unsafe { CStr::from_ptr(ifa.ifa_name) };
        if n.to_bytes() == name.as_bytes() && !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr of the family it names,
            // no larger than sockaddr_storage.
            let fam = unsafe { (*ifa.ifa_addr).sa_family } as c_int;
            let len = match fam {
                libc::AF_INET => std::mem::size_of::<libc::sockaddr_in>(),
                libc::AF_INET6 => std::mem::size_of::<libc::sockaddr_in6>(),
                _ => 0,
            };
            if len > 0 {
                // SAFETY: all-zero storage, then `len` bytes copied from a
                // sockaddr of exactly that family and size.
                let ss = unsafe {
                    let mut ss: libc::sockaddr_storage = std::mem::zeroed();
                    std::ptr::copy_nonoverlapping(
                        ifa.ifa_addr.cast::<u8>(),
                        (&mut ss as *mut libc::sockaddr_storage).cast::<u8>(),
                        len,
                    );
                    ss
                };
                if let Some(a) = socketaddr_from(&ss) {
                    out.push(a.ip());
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sge_is_an_ibv_sge() {
        let sges = [
            Sge::new(0x1122_3344_5566_7788, 0x99aa_bbcc, 0xddee_ff01),
            Sge::new(7, 8, 9),
        ];
        let p = sge_ptr(&sges);
        // SAFETY: two layout-identical entries behind `p`, read only.
        let raw = unsafe { std::slice::from_raw_parts(p, 2) };
        assert_eq!(raw[0].addr, 0x1122_3344_5566_7788);
        assert_eq!(raw[0].length, 0x99aa_bbcc);
        assert_eq!(raw[0].lkey, 0xddee_ff01);
        assert_eq!((raw[1].addr, raw[1].length, raw[1].lkey), (7, 8, 9));
        assert!(sge_ptr(&[]).is_null());
    }

    #[test]
    fn send_lists_chain_and_carry_every_field() {
        let sg = [Sge::new(0x1000, 64, 5)];
        let wrs = [
            WorkRequest::send(1, &sg).with_imm(0x0102_0304),
            WorkRequest {
                opcode: Opcode::SendWithImm,
                ..WorkRequest::send(2, &sg)
            }
            .with_imm(0x0102_0304)
            .with_flags(SendFlags::SIGNALED | SendFlags::INLINE | SendFlags::FENCE),
            WorkRequest::one_sided(3, Opcode::RdmaRead, &sg, 0xabc0, 77),
            WorkRequest::one_sided(4, Opcode::AtomicCmpAndSwp, &sg, 0x8, 78).with_atomic(5, 6),
            WorkRequest::send(5, &[]),
        ];
        let mut list = SendList::default();
        let regions = inline_regions(&sg);
        assert_eq!(
            check_inline(&mut list.inline, &wrs, None, Some(&regions)),
            wrs.len()
        );
        let head = chain_send(&mut list, &wrs);
        let scratch = &mut list.wrs;
        let base = scratch.as_mut_ptr();
        assert_eq!(head, base);
        assert_eq!(scratch[0].next, base.wrapping_add(1));
        assert!(scratch[4].next.is_null());
        assert_eq!(scratch[0].opcode, ffi::ibv_wr_opcode::IBV_WR_SEND);
        // SAFETY: plain integer fields of the union written just above.
        unsafe {
            assert_eq!(
                scratch[0].imm_data_invalidated_rkey_union.imm_data, 0,
                "no imm on SEND"
            );
            assert_eq!(
                scratch[1].imm_data_invalidated_rkey_union.imm_data,
                0x0102_0304u32.to_be()
            );
            assert_eq!(scratch[2].wr.rdma.remote_addr, 0xabc0);
            assert_eq!(scratch[2].wr.rdma.rkey, 77);
            assert_eq!(scratch[3].wr.atomic.remote_addr, 0x8);
            assert_eq!(scratch[3].wr.atomic.compare_add, 5);
            assert_eq!(scratch[3].wr.atomic.swap, 6);
            assert_eq!(scratch[3].wr.atomic.rkey, 78);
        }
        let s = ffi::ibv_send_flags::IBV_SEND_SIGNALED.0
            | ffi::ibv_send_flags::IBV_SEND_INLINE.0
            | ffi::ibv_send_flags::IBV_SEND_FENCE.0;
        assert_eq!(scratch[1].send_flags, s);
        assert_eq!(scratch[4].num_sge, 0);
        assert!(scratch[4].sg_list.is_null());
        assert_eq!(scratch[0].sg_list.cast_const(), sg.as_ptr().cast());
        // The INLINE request reads the translated (CPU) copy of its SGE.
        assert_ne!(scratch[1].sg_list.cast_const(), sg.as_ptr().cast());
        // A shorter list reuses the array without reallocating.
        let cap = scratch.capacity();
        check_inline(&mut list.inline, &wrs[..2], None, Some(&regions));
        let head2 = chain_send(&mut list, &wrs[..2]);
        assert_eq!(list.wrs.capacity(), cap);
        assert!(list.wrs[1].next.is_null());
        assert_eq!(bad_index(head2, head2.wrapping_add(1), 2), 1);
    }

    struct Heap(Vec<u8>);
    // SAFETY: a boxed Vec never moves or frees while the value lives; the
    // tests only read it.
    unsafe impl RegionMemory for Heap {
        fn as_ptr(&self) -> *mut u8 {
            self.0.as_ptr().cast_mut()
        }
        fn len(&self) -> usize {
            self.0.len()
        }
    }

    /// A table with lkey 5 at IOVA 0x1000 (4096 bytes) for `chain_send`'s test.
    fn inline_regions(_sg: &[Sge]) -> Regions {
        let mem: Arc<dyn RegionMemory> = Arc::new(Heap(vec![0; 8192]));
        let mut t = Regions::new();
        t.insert(5, Region::new(mem, 0, 4096, 0x1000).unwrap());
        t
    }

    #[test]
    fn inline_sges_are_checked_and_translated() {
        let mem: Arc<dyn RegionMemory> = Arc::new(Heap(vec![0; 8192]));
        let cpu = mem.as_ptr() as u64;
        let mut t = Regions::new();
        t.insert(7, Region::new(mem.clone(), 100, 1000, 0x40_0064).unwrap());
        assert!(
            Region::new(mem.clone(), 8000, 200, 0).is_none(),
            "outside the memory"
        );
        let ok = [Sge::new(0x40_0064 + 10, 20, 7), Sge::new(0, 0, 99)];
        let outside = [Sge::new(0x40_0064 + 990, 11, 7)];
        let wrong_key = [Sge::new(0x40_0064, 8, 8)];
        let inl = SendFlags::SIGNALED | SendFlags::INLINE;
        let wrs = [
            WorkRequest::send(1, &ok).with_flags(inl),
            WorkRequest::send(2, &outside),
            WorkRequest::send(3, &outside).with_flags(inl),
            WorkRequest::send(4, &ok).with_flags(inl),
        ];
        let mut v = Vec::new();
        assert_eq!(
            check_inline(&mut v, &wrs, None, Some(&t)),
            2,
            "stops at the bad INLINE request"
        );
        assert_eq!(v.len(), 2);
        assert_eq!((v[0].addr(), v[0].length()), (cpu + 110, 20));
        assert_eq!(v[1].length(), 0);
        let w = [WorkRequest::send(1, &wrong_key).with_flags(inl)];
        assert_eq!(check_inline(&mut v, &w, None, Some(&t)), 0);
        assert_eq!(
            check_inline(&mut v, &wrs[..1], None, None),
            0,
            "no table: nothing inline passes"
        );
        assert!(v.is_empty());
        assert_eq!(
            check_inline(&mut v, &wrs[1..2], None, None),
            1,
            "non-inline requests are not checked"
        );
        // The hint answers for its own key, without the table; other keys
        // still go to the table, and a hint checks ranges like the table.
        let r7 = t.get(&7).unwrap();
        assert_eq!(check_inline(&mut v, &wrs[..1], Some((7, r7)), None), 1);
        assert_eq!((v[0].addr(), v[0].length()), (cpu + 110, 20));
        assert_eq!(check_inline(&mut v, &wrs[2..3], Some((7, r7)), None), 0);
        assert_eq!(check_inline(&mut v, &w, Some((7, r7)), Some(&t)), 0);
        assert_eq!(check_inline(&mut v, &wrs[..1], Some((8, r7)), Some(&t)), 1);
        assert_eq!(v[0].addr(), cpu + 110, "a hint for another key is not used");
    }

    #[test]
    fn completions_map_status_opcode_and_immediate() {
        let mut wc = empty_wc();
        wc.wr_id = 9;
        wc.opcode = ffi::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM;
        wc.wc_flags = ffi::ibv_wc_flags::IBV_WC_WITH_IMM.0;
        wc.imm_data_invalidated_rkey_union.imm_data = 0xdead_beefu32.to_be();
        wc.byte_len = 12;
        let c = completion(&wc, true);
        assert_eq!(c.opcode, WcOpcode::RecvRdmaWithImm);
        assert_eq!(c.imm_data, Some(0xdead_beef));
        assert_eq!((c.wr_id, c.byte_len), (9, 12));
        for (raw, want) in [
            (
                ffi::ibv_wc_status::IBV_WC_WR_FLUSH_ERR,
                WcStatus::WrFlushErr,
            ),
            (
                ffi::ibv_wc_status::IBV_WC_REM_ACCESS_ERR,
                WcStatus::RemAccessErr,
            ),
            (
                ffi::ibv_wc_status::IBV_WC_RNR_RETRY_EXC_ERR,
                WcStatus::RnrRetryExcErr,
            ),
            (ffi::ibv_wc_status::IBV_WC_GENERAL_ERR, WcStatus::GeneralErr),
            (ffi::ibv_wc_status::IBV_WC_TM_ERR, WcStatus::GeneralErr),
            (
                ffi::ibv_wc_status::IBV_WC_RESP_TIMEOUT_ERR,
                WcStatus::RespTimeoutErr,
            ),
        ] {
            wc.status = raw;
            let r = completion(&wc, true);
            assert_eq!(r.status, want);
            assert_eq!(
                r.opcode,
                WcOpcode::Recv,
                "a failed receive is still a receive"
            );
            assert_eq!(r.imm_data, None);
            assert_eq!(completion(&wc, false).opcode, WcOpcode::Send);
        }
        let mut s = empty_wc();
        s.opcode = ffi::ibv_wc_opcode::IBV_WC_FETCH_ADD;
        assert_eq!(completion(&s, false).opcode, WcOpcode::FetchAdd);
        s.opcode = ffi::ibv_wc_opcode::IBV_WC_RDMA_READ;
        assert_eq!(completion(&s, false).opcode, WcOpcode::RdmaRead);
    }

    #[test]
    fn every_verbs_status_has_a_distinct_mapping() {
        let mut seen = std::collections::HashSet::new();
        for raw in 0..=ffi::ibv_wc_status::IBV_WC_GENERAL_ERR {
            let mut wc = empty_wc();
            wc.status = raw;
            assert!(seen.insert(completion(&wc, false).status), "status {raw}");
        }
    }

    #[test]
    fn socket_addresses_round_trip() {
        for a in ["192.0.2.1:4791", "[fe80::1%3]:7", "0.0.0.0:0"] {
            let a: SocketAddr = a.parse().unwrap();
            assert_eq!(socketaddr_from(&sockaddr_of(&a)), Some(a));
        }
    }
}
