//! The device: protection domain, region table, queue pair factory, counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use arc_swap::ArcSwap;
use zcmsg::{
    Access, AddressSpace, DeviceCaps, Listener, QpCaps, QpConfig, QueuePair, RegionMemory,
    Registration, SharedRecvQueue, Transport, TransportError,
};

use crate::mr::{KeyAlloc, Mr, MrTable};
use crate::qp::{QpCore, SoftQp};
use crate::srq::{SoftSrq, SrqInner};

/// Two connected queue pairs, as [`SoftDevice::pair`] returns them.
pub type QpPair = (Box<dyn QueuePair>, Box<dyn QueuePair>);

static NEXT_DEVICE: AtomicU64 = AtomicU64::new(0);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Device copies and operations, counted by the device that executed them
/// (the requester's: it runs SENDs, WRITEs, READs and atomics in the
/// poster's thread). These are the device's own "DMA" copies, separate from
/// the framework's [`zcmsg::CopyStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Data copies: one per SEND, WRITE or READ that moved at least one byte.
    pub copy_ops: u64,
    /// Bytes those copies moved.
    pub copy_bytes: u64,
    /// SENDs (with or without immediate) delivered into a receive.
    pub send_ops: u64,
    /// Bytes delivered by SENDs.
    pub send_bytes: u64,
    /// RDMA WRITEs (with or without immediate) executed.
    pub write_ops: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// RDMA READs executed.
    pub read_ops: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Atomics executed on remote memory.
    pub atomic_ops: u64,
    /// Inline payloads copied into a queued work request at post time
    /// (only when the request could not execute at once, e.g. behind an RNR wait).
    pub inline_staged_ops: u64,
    /// Bytes of those inline payloads.
    pub inline_staged_bytes: u64,
    /// Receiver-not-ready NAKs: failed delivery attempts counted against `rnr_retry`.
    pub rnr_naks: u64,
}

impl DeviceStats {
    /// The difference `self - earlier`, counter by counter.
    pub fn since(&self, earlier: &DeviceStats) -> DeviceStats {
        let mut d = *self;
        d.sub(earlier);
        d
    }

    fn sub(&mut self, o: &DeviceStats) {
        self.copy_ops -= o.copy_ops;
        self.copy_bytes -= o.copy_bytes;
        self.send_ops -= o.send_ops;
        self.send_bytes -= o.send_bytes;
        self.write_ops -= o.write_ops;
        self.write_bytes -= o.write_bytes;
        self.read_ops -= o.read_ops;
        self.read_bytes -= o.read_bytes;
        self.atomic_ops -= o.atomic_ops;
        self.inline_staged_ops -= o.inline_staged_ops;
        self.inline_staged_bytes -= o.inline_staged_bytes;
        self.rnr_naks -= o.rnr_naks;
    }

    fn add(&mut self, o: &DeviceStats) {
        self.copy_ops += o.copy_ops;
        self.copy_bytes += o.copy_bytes;
        self.send_ops += o.send_ops;
        self.send_bytes += o.send_bytes;
        self.write_ops += o.write_ops;
        self.write_bytes += o.write_bytes;
        self.read_ops += o.read_ops;
        self.read_bytes += o.read_bytes;
        self.atomic_ops += o.atomic_ops;
        self.inline_staged_ops += o.inline_staged_ops;
        self.inline_staged_bytes += o.inline_staged_bytes;
        self.rnr_naks += o.rnr_naks;
    }
}

/// Per-queue-pair counters, written only under the queue pair's send-queue
/// mutex (a load and a store, no read-modify-write, no shared cache line).
#[derive(Default)]
pub(crate) struct Counters {
    send_ops: AtomicU64,
    send_bytes: AtomicU64,
    write_ops: AtomicU64,
    write_bytes: AtomicU64,
    read_ops: AtomicU64,
    read_bytes: AtomicU64,
    atomic_ops: AtomicU64,
    inline_ops: AtomicU64,
    inline_bytes: AtomicU64,
    rnr_naks: AtomicU64,
}

#[inline]
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// What a counted operation was.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Count {
    Send(u64),
    Write(u64),
    Read(u64),
    Atomic,
    InlineStaged(u64),
    RnrNak,
}

impl Counters {
    #[inline]
    pub(crate) fn count(&self, what: Count) {
        match what {
            Count::Send(n) => {
                bump(&self.send_ops, 1);
                bump(&self.send_bytes, n);
            }
            Count::Write(n) => {
                bump(&self.write_ops, 1);
                bump(&self.write_bytes, n);
            }
            Count::Read(n) => {
                bump(&self.read_ops, 1);
                bump(&self.read_bytes, n);
            }
            Count::Atomic => bump(&self.atomic_ops, 1),
            Count::InlineStaged(n) => {
                bump(&self.inline_ops, 1);
                bump(&self.inline_bytes, n);
            }
            Count::RnrNak => bump(&self.rnr_naks, 1),
        }
    }

    /// `ops` SENDs of `bytes` in all (a post list's run).
    #[inline]
    pub(crate) fn count_sends(&self, ops: u64, bytes: u64) {
        bump(&self.send_ops, ops);
        bump(&self.send_bytes, bytes);
    }

    fn snapshot(&self) -> DeviceStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DeviceStats {
            copy_ops: 0,
            copy_bytes: 0,
            send_ops: l(&self.send_ops),
            send_bytes: l(&self.send_bytes),
            write_ops: l(&self.write_ops),
            write_bytes: l(&self.write_bytes),
            read_ops: l(&self.read_ops),
            read_bytes: l(&self.read_bytes),
            atomic_ops: l(&self.atomic_ops),
            inline_staged_ops: l(&self.inline_ops),
            inline_staged_bytes: l(&self.inline_bytes),
            rnr_naks: l(&self.rnr_naks),
        }
    }
}

/// A queue pair's execution counters, kept where its device (and its
/// peer's) can sum them, also after the queue pair is gone.
///
/// There is no execution state here: every execution of a queue pair's
/// requests (touching registered memory or the peer's receive side) runs
/// under that queue pair's send-queue mutex, so waiting for an execution
/// in progress to end is taking that mutex once (`QpCore::quiesce`). That
/// is how "after `deregister` returns, no memory of the region is touched"
/// holds with no fence on the data path: the poster already takes the
/// mutex for its send queue.
#[derive(Default)]
pub(crate) struct Exec {
    pub(crate) counters: Counters,
}

/// A queue pair's copy of a device's region table, reloaded only when the
/// device's generation moved: one load per execution instead of an
/// `ArcSwap` load (which takes two atomic read-modify-writes). Kept under
/// the queue pair's send-queue mutex. Safe against deregistration like any
/// snapshot: the generation is read under that mutex, which `deregister`
/// takes after bumping the generation, so an execution that still uses a
/// table naming a removed region is one the deregistration waits for.
#[derive(Default)]
pub(crate) struct TableCache {
    gen: u64,
    table: Option<Arc<MrTable>>,
}

impl TableCache {
    /// The device's current table (call under the queue pair's send mutex,
    /// which is what makes its use an execution deregistration waits for).
    #[inline]
    pub(crate) fn get(&mut self, dev: &SoftDevice) -> &MrTable {
        // The generation first: a table loaded after it is at least as new.
        let gen = dev.table_gen.load(Ordering::Acquire);
        if self.gen != gen {
            self.table = None;
            self.gen = gen;
        }
        self.table.get_or_insert_with(|| dev.table.load_full())
    }

    /// Drop the kept table if the device's has changed since.
    pub(crate) fn forget_if_stale(&mut self, dev: &SoftDevice) {
        if self.gen != dev.table_gen.load(Ordering::Acquire) {
            self.table = None;
        }
    }
}

struct ExecEntry {
    exec: Arc<Exec>,
    /// Its queue pair, whose cached region tables a deregistration drops.
    qp: Weak<QpCore>,
    /// The queue pair belongs to this device (its counters count here);
    /// otherwise it is the peer of one of ours on another device.
    own: bool,
}

/// The in-process software RDMA device (see the crate docs).
///
/// `Send + Sync`: share it behind its `Arc`. Registration, deregistration
/// and queue pair creation serialize among themselves on small mutexes; the
/// data path takes none of them.
pub struct SoftDevice {
    id: u64,
    caps: DeviceCaps,
    me: Weak<SoftDevice>,
    pub(crate) table: ArcSwap<MrTable>,
    /// Bumped after every change of `table` (see [`TableCache`]).
    table_gen: AtomicU64,
    keys: Mutex<KeyAlloc>,
    execs: Mutex<Vec<ExecEntry>>,
    retired: Mutex<DeviceStats>,
}

impl std::fmt::Debug for SoftDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftDevice")
            .field("name", &self.caps.name)
            .field("regions", &self.table.load().len())
            .finish()
    }
}

impl SoftDevice {
    /// The limits of a new device: like rxe, with `max_msg_sz` 8 MiB enforced.
    pub fn default_caps() -> DeviceCaps {
        DeviceCaps {
            name: "soft".into(),
            address_space: AddressSpace::Cpu,
            max_send_sge: 32,
            max_recv_sge: 32,
            max_sge_rd: 32,
            max_msg_sz: 8 << 20,
            max_inline_data: 256,
            max_qp_wr: 16384,
            max_mr_size: u64::MAX,
            atomics: true,
            srq: true,
            implicit_odp: false,
            dma_remote_writes: false,
        }
    }

    /// A device with [`SoftDevice::default_caps`], named `soft<N>`.
    pub fn new() -> Arc<SoftDevice> {
        Self::with_caps(Self::default_caps())
    }

    /// A device with the given limits (e.g. a small `max_msg_sz` for tests).
    /// The address space is always [`AddressSpace::Cpu`]; a name of `"soft"`
    /// becomes `soft<N>`.
    pub fn with_caps(mut caps: DeviceCaps) -> Arc<SoftDevice> {
        let id = NEXT_DEVICE.fetch_add(1, Ordering::Relaxed);
        caps.address_space = AddressSpace::Cpu;
        if caps.name == "soft" || caps.name.is_empty() {
            caps.name = format!("soft{id}");
        }
        Arc::new_cyclic(|me| SoftDevice {
            id,
            caps,
            me: me.clone(),
            table: ArcSwap::from_pointee(MrTable::default()),
            table_gen: AtomicU64::new(0),
            keys: Mutex::new(KeyAlloc::new(id)),
            execs: Mutex::new(Vec::new()),
            retired: Mutex::new(DeviceStats::default()),
        })
    }

    pub(crate) fn arc(&self) -> Result<Arc<SoftDevice>, TransportError> {
        self.me
            .upgrade()
            .ok_or_else(|| TransportError::InvalidArgument("device is being dropped".into()))
    }

    /// Live registrations.
    pub fn registrations(&self) -> usize {
        self.table.load().len()
    }

    /// Device copies and operations so far, over all of this device's queue
    /// pairs, live and dropped.
    pub fn stats(&self) -> DeviceStats {
        let mut s = *lock(&self.retired);
        for e in lock(&self.execs).iter().filter(|e| e.own) {
            s.add(&e.exec.counters.snapshot());
        }
        s.copy_ops = s.send_ops + s.write_ops + s.read_ops;
        s.copy_bytes = s.send_bytes + s.write_bytes + s.read_bytes;
        s
    }

    /// A connected pair of queue pairs on this device (loopback), created
    /// with `a` and `b`. Both are ready to send at once.
    pub fn pair(&self, a: &QpConfig, b: &QpConfig) -> Result<QpPair, TransportError> {
        let me = self.arc()?;
        let (qa, qb) = SoftQp::create_pair(&me, a, &me, b)?;
        Ok((Box::new(qa), Box::new(qb)))
    }

    /// A connected pair across two devices, like two hosts: the first queue
    /// pair is on `a`, the second on `b`, and each side's remote keys are
    /// translated by the other side's device.
    pub fn connect_pair(
        a: &Arc<SoftDevice>,
        b: &Arc<SoftDevice>,
        config_a: &QpConfig,
        config_b: &QpConfig,
    ) -> Result<QpPair, TransportError> {
        let (qa, qb) = SoftQp::create_pair(a, config_a, b, config_b)?;
        Ok((Box::new(qa), Box::new(qb)))
    }

    /// Check `cfg` against the device and say what a queue pair gets.
    pub(crate) fn qp_caps(
        &self,
        cfg: &QpConfig,
    ) -> Result<(QpCaps, Option<Arc<SrqInner>>), TransportError> {
        let c = &self.caps;
        let bad = |what: String| Err(TransportError::InvalidArgument(what));
        if cfg.max_send_wr > c.max_qp_wr {
            return bad(format!(
                "max_send_wr {} exceeds the device's max_qp_wr {}",
                cfg.max_send_wr, c.max_qp_wr
            ));
        }
        if cfg.max_send_sge > c.max_send_sge {
            return bad(format!(
                "max_send_sge {} exceeds the device's {}",
                cfg.max_send_sge, c.max_send_sge
            ));
        }
        let srq = match &cfg.srq {
            None => None,
            Some(s) => {
                if !c.srq {
                    return Err(TransportError::Unsupported(
                        "shared receive queues are disabled on this device",
                    ));
                }
                let Some(s) = s.as_any().downcast_ref::<SoftSrq>() else {
                    return bad("the shared receive queue is not a soft device's".into());
                };
                if s.inner.device_id != self.id {
                    return bad("the shared receive queue belongs to another device".into());
                }
                Some(s.inner.clone())
            }
        };
        if srq.is_none() {
            if cfg.max_recv_wr > c.max_qp_wr {
                return bad(format!(
                    "max_recv_wr {} exceeds the device's max_qp_wr {}",
                    cfg.max_recv_wr, c.max_qp_wr
                ));
            }
            if cfg.max_recv_sge > c.max_recv_sge {
                return bad(format!(
                    "max_recv_sge {} exceeds the device's {}",
                    cfg.max_recv_sge, c.max_recv_sge
                ));
            }
        }
        let caps = QpCaps {
            max_send_wr: cfg.max_send_wr,
            max_recv_wr: if srq.is_some() { 0 } else { cfg.max_recv_wr },
            max_send_sge: cfg.max_send_sge,
            max_recv_sge: match &srq {
                Some(s) => s.slots.max_sge() as u32,
                None => cfg.max_recv_sge,
            },
            max_inline_data: cfg.max_inline_data.min(c.max_inline_data),
        };
        Ok((caps, srq))
    }

    /// Track a queue pair whose executions may touch this device's regions
    /// (deregistration waits for them) and whose counters (see [`Exec`])
    /// count here if `own`.
    pub(crate) fn add_exec(&self, exec: &Arc<Exec>, qp: Weak<QpCore>, own: bool) {
        lock(&self.execs).push(ExecEntry {
            exec: exec.clone(),
            qp,
            own,
        });
    }

    /// Stop tracking it; an own queue pair's counters move to the retired sum.
    pub(crate) fn remove_exec(&self, exec: &Arc<Exec>) {
        let mut list = lock(&self.execs);
        if let Some(i) = list.iter().position(|e| Arc::ptr_eq(&e.exec, exec)) {
            let e = list.swap_remove(i);
            drop(list);
            if e.own {
                lock(&self.retired).add(&e.exec.counters.snapshot());
            }
        }
    }

    fn insert(&self, mr: Mr) {
        let _serialize = lock(&self.keys);
        let next = self.table.load().with(mr);
        self.table.store(Arc::new(next));
        self.table_gen.fetch_add(1, Ordering::SeqCst);
    }
}

impl Transport for SoftDevice {
    fn caps(&self) -> &DeviceCaps {
        &self.caps
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
        if offset.checked_add(len).is_none_or(|end| end > mem.len()) {
            return Err(TransportError::InvalidArgument(format!(
                "range {offset}+{len} outside the {}-byte memory",
                mem.len()
            )));
        }
        if len as u64 > self.caps.max_mr_size {
            return Err(TransportError::InvalidArgument(format!(
                "registration of {len} bytes exceeds max_mr_size {}",
                self.caps.max_mr_size
            )));
        }
        let lkey = lock(&self.keys).next().ok_or_else(|| {
            TransportError::InvalidArgument("the device's key space is exhausted".into())
        })?;
        let mr = Mr::new(lkey, mem, offset, len, access);
        let reg = Registration {
            lkey,
            rkey: mr.rkey(),
            iova: mr.addr,
        };
        self.insert(mr);
        Ok(reg)
    }

    fn deregister(&self, lkey: u32) -> Result<(), TransportError> {
        let removed = {
            let _serialize = lock(&self.keys);
            let cur = self.table.load();
            let (next, mr) = cur.without(lkey).ok_or_else(|| {
                TransportError::InvalidArgument(format!("no registration with lkey {lkey:#x}"))
            })?;
            self.table.store(Arc::new(next));
            self.table_gen.fetch_add(1, Ordering::SeqCst);
            mr
        };
        // Every execution runs under its queue pair's send mutex and reads
        // the generation there: taking each mutex once waits for an
        // execution that may still use the old table, and any later one
        // sees the new generation. Queue pairs keep the table they last
        // executed with; the stale ones go at the same time, so that the
        // region's memory is released here (when the last snapshot naming
        // it goes), not at a queue pair's next post.
        let qps: Vec<Weak<QpCore>> = lock(&self.execs).iter().map(|e| e.qp.clone()).collect();
        for qp in &qps {
            // A queue pair that is gone has no execution in progress: one
            // running holds a strong reference.
            if let Some(qp) = qp.upgrade() {
                qp.drop_stale_tables();
            }
        }
        drop(removed);
        Ok(())
    }

    fn create_srq(
        &self,
        max_wr: u32,
        max_sge: u32,
    ) -> Result<Arc<dyn SharedRecvQueue>, TransportError> {
        if !self.caps.srq {
            return Err(TransportError::Unsupported(
                "shared receive queues are disabled on this device",
            ));
        }
        if max_wr == 0 || max_wr > self.caps.max_qp_wr {
            return Err(TransportError::InvalidArgument(format!(
                "SRQ depth {max_wr} outside 1..={}",
                self.caps.max_qp_wr
            )));
        }
        if max_sge > self.caps.max_recv_sge {
            return Err(TransportError::InvalidArgument(format!(
                "SRQ max_sge {max_sge} exceeds the device's {}",
                self.caps.max_recv_sge
            )));
        }
        Ok(Arc::new(SoftSrq::new(self.id, max_wr, max_sge)))
    }

    fn listen(&self, addr: &str, config: &QpConfig) -> Result<Box<dyn Listener>, TransportError> {
        self.qp_caps(config)?;
        Ok(Box::new(crate::cm::listen(self.arc()?, addr, config)?))
    }

    fn connect(
        &self,
        addr: &str,
        config: &QpConfig,
        private_data: &[u8],
    ) -> Result<Box<dyn QueuePair>, TransportError> {
        Ok(Box::new(crate::cm::connect(
            &self.arc()?,
            addr,
            config,
            private_data,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mr::tests::Buf;
    use zcmsg::{QpConfig, RecvRequest, SendFlags, Sge, WcStatus, WorkCompletion, WorkRequest};

    fn mem(len: usize) -> (Arc<dyn RegionMemory>, Weak<dyn RegionMemory>) {
        let m: Arc<dyn RegionMemory> = Arc::new(Buf(vec![7u8; len].into_boxed_slice()));
        let w = Arc::downgrade(&m);
        (m, w)
    }

    /// 64 bytes registered on `da` (the source) and on `db` (the
    /// destination), one SEND from `qa` into a receive posted on `qb`,
    /// checked: both queue pairs have executed with both regions. Returns
    /// the two registrations, weak handles on their memories, and the
    /// source SGE.
    fn send_once(
        da: &SoftDevice,
        db: &SoftDevice,
        qa: &mut dyn QueuePair,
        qb: &mut dyn QueuePair,
    ) -> ([Registration; 2], [Weak<dyn RegionMemory>; 2], Sge) {
        let (src, src_w) = mem(64);
        let (dst, dst_w) = mem(64);
        let (src_ptr, dst_ptr) = (src.as_ptr() as u64, dst.as_ptr() as u64);
        let ra = da.register(src, Access::LOCAL_WRITE).unwrap();
        let rb = db.register(dst, Access::LOCAL_WRITE).unwrap();
        let rsge = [Sge::new(dst_ptr, 64, rb.lkey)];
        qb.post_recv(&[RecvRequest {
            wr_id: 1,
            sg_list: &rsge,
        }])
        .unwrap();
        let ssge = Sge::new(src_ptr, 64, ra.lkey);
        qa.post_send(&[WorkRequest::send(2, &[ssge])]).unwrap();
        let mut wc = [WorkCompletion::EMPTY; 4];
        assert_eq!(qb.poll_cq(&mut wc), 1);
        assert_eq!((wc[0].wr_id, wc[0].byte_len), (1, 64));
        ([ra, rb], [src_w, dst_w], ssge)
    }

    #[test]
    fn deregistration_releases_memory_that_queue_pairs_executed_with() {
        // Queue pairs keep the region table of their last execution; a
        // deregistration must still release the region's memory when it
        // returns, on the poster's device and on the peer's.
        let (da, db) = (SoftDevice::new(), SoftDevice::new());
        let cfg = QpConfig::default();
        let (mut qa, mut qb) = SoftDevice::connect_pair(&da, &db, &cfg, &cfg).unwrap();
        let ([ra, rb], [src_w, dst_w], ssge) = send_once(&da, &db, &mut *qa, &mut *qb);
        da.deregister(ra.lkey).unwrap();
        db.deregister(rb.lkey).unwrap();
        assert!(
            src_w.upgrade().is_none(),
            "the sender's memory is still held"
        );
        assert!(
            dst_w.upgrade().is_none(),
            "the receiver's memory is still held"
        );
        // And the queue pair notices: the stale key now fails.
        qa.post_send(&[WorkRequest::send(3, &[ssge]).with_flags(SendFlags::SIGNALED)])
            .unwrap();
        let mut wc = [WorkCompletion::EMPTY; 4];
        let n = qa.poll_cq(&mut wc);
        let last = wc[..n].iter().find(|w| w.wr_id == 3).expect("completion 3");
        assert_eq!(last.status, WcStatus::LocProtErr);
    }

    #[test]
    fn the_two_ends_of_a_pair_share_no_cache_line_pair() {
        // Each owner writes its queue pair's receive cursor on every poll;
        // the two are allocated one after the other, and 64 bytes apart
        // they shared a line (or the adjacent-line prefetcher's pair of
        // lines), which cost a two-thread ping-pong ~65 ns one way
        // (aeb7926).
        let dev = SoftDevice::new();
        let cfg = QpConfig::default();
        let (qa, qb) = dev.pair(&cfg, &cfg).unwrap();
        let at = |q: &dyn QueuePair| {
            let qp = q.as_any().downcast_ref::<SoftQp>().expect("a SoftQp");
            (qp as *const SoftQp as usize, std::mem::size_of_val(qp))
        };
        for (a, size) in [at(&*qa), at(&*qb)] {
            assert_eq!(a % 128, 0, "a queue pair starts a 128-byte pair of lines");
            assert_eq!(size % 128, 0, "and ends one");
        }
    }

    #[test]
    fn receives_flushed_lap_after_lap_never_read_as_an_old_success() {
        // A completion entry's tag is its receive's lap (8 bits): it must
        // be written every lap, flushes included, or after 256 laps of
        // receives flushed in the error state an old success would match.
        let dev = SoftDevice::new();
        let cfg = QpConfig {
            max_recv_wr: 1,
            ..QpConfig::default()
        };
        let (mut qa, mut qb) = dev.pair(&cfg, &cfg).unwrap();
        let (buf, _w) = mem(64);
        let at = buf.as_ptr() as u64;
        let r = dev.register(buf, Access::LOCAL_WRITE).unwrap();
        let sge = [Sge::new(at, 64, r.lkey)];
        let mut wc = [WorkCompletion::EMPTY; 4];
        let post = |qb: &mut dyn QueuePair, id: u64| {
            qb.post_recv(&[RecvRequest {
                wr_id: id,
                sg_list: &sge,
            }])
            .unwrap();
        };
        // Every entry of the ring (twice the depth) holds a success.
        for id in 0..2 {
            post(&mut *qb, id);
            qa.post_send(&[WorkRequest::send(id, &sge)]).unwrap();
            assert_eq!(qb.poll_cq(&mut wc), 1);
            assert_eq!(wc[0].status, WcStatus::Success);
        }
        qb.disconnect();
        for id in 2..2 + 2 * 300 {
            post(&mut *qb, id);
            assert_eq!(qb.poll_cq(&mut wc), 1, "receive {id}");
            assert_eq!((wc[0].wr_id, wc[0].status), (id, WcStatus::WrFlushErr));
        }
    }

    #[test]
    fn a_dropped_queue_pair_kept_by_its_peer_keeps_no_region_alive() {
        // The peer holds the dropped queue pair's core; the region table
        // that core kept from its last execution must not keep a region's
        // memory alive past its deregistration.
        let dev = SoftDevice::new();
        let cfg = QpConfig::default();
        let (mut qa, mut qb) = dev.pair(&cfg, &cfg).unwrap();
        let ([ra, _], [src_w, _], _) = send_once(&dev, &dev, &mut *qa, &mut *qb);
        drop(qa);
        dev.deregister(ra.lkey).unwrap();
        assert!(
            src_w.upgrade().is_none(),
            "the dropped sender's kept table still holds the memory"
        );
        drop(qb);
    }
}
