//! A device that only registers memory, for testing and benchmarking the
//! builders and arenas without any data path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::TransportError;
use crate::sge::AddressSpace;
use crate::transport::{
    DeviceCaps, Listener, QpConfig, QueuePair, RegionMemory, Registration, SharedRecvQueue,
    Transport,
};
use crate::verbs::Access;

/// IOVAs handed out by [`RegistryOnly`] in `Iova` mode start here, far from any CPU address.
pub const IOVA_BASE: u64 = 0x7e00_0000_0000_0000;

/// A registration: the memory kept alive, offset, length, access.
type Held = (Arc<dyn RegionMemory>, usize, usize, Access);

/// Registers memory and records it; every data-path call is `Unsupported`.
pub struct RegistryOnly {
    caps: DeviceCaps,
    next_key: AtomicU32,
    regions: Mutex<HashMap<u32, Held>>,
    next_iova: Mutex<u64>,
}

impl RegistryOnly {
    /// A device in the given address space with rxe-like limits.
    pub fn new(space: AddressSpace) -> Self {
        RegistryOnly {
            caps: DeviceCaps {
                name: "registry-only".into(),
                address_space: space,
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
            },
            next_key: AtomicU32::new(1),
            regions: Mutex::new(HashMap::new()),
            next_iova: Mutex::new(IOVA_BASE),
        }
    }

    /// Live registrations.
    pub fn registrations(&self) -> usize {
        self.regions.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Copy the bytes `sg_list` names (CPU address space), checking every SGE
    /// against the registration its `lkey` names (inline SGEs included).
    pub fn gather(&self, sg_list: &[crate::sge::Sge]) -> Result<Vec<u8>, crate::verbs::WcStatus> {
        let mut out = Vec::new();
        for s in sg_list {
            let (ptr, _keep) = self.check(s.lkey(), s.addr(), u64::from(s.length()), None)?;
            // SAFETY: `check` proved the range lies inside a registered region
            // whose memory `_keep` keeps alive.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(ptr, s.length() as usize) });
        }
        Ok(out)
    }

    /// Write `data` into the memory `sg_list` names (needs LOCAL_WRITE);
    /// returns bytes written, or `LocLenErr` if it does not fit.
    pub fn scatter(
        &self,
        sg_list: &[crate::sge::Sge],
        data: &[u8],
    ) -> Result<usize, crate::verbs::WcStatus> {
        let cap: u64 = sg_list.iter().map(|s| u64::from(s.length())).sum();
        if (data.len() as u64) > cap {
            return Err(crate::verbs::WcStatus::LocLenErr);
        }
        let mut off = 0usize;
        for s in sg_list {
            if off == data.len() {
                break;
            }
            let n = (s.length() as usize).min(data.len() - off);
            let (ptr, _keep) =
                self.check(s.lkey(), s.addr(), n as u64, Some(Access::LOCAL_WRITE))?;
            // SAFETY: the range is inside a registered, writable region kept
            // alive by this device; the poster does not touch it until the
            // completion.
            unsafe { std::ptr::copy_nonoverlapping(data[off..].as_ptr(), ptr, n) };
            off += n;
        }
        Ok(off)
    }

    /// Read `len` bytes at `addr` of the registration with remote key `rkey`.
    pub fn read_remote(
        &self,
        rkey: u32,
        addr: u64,
        len: u64,
    ) -> Result<Vec<u8>, crate::verbs::WcStatus> {
        let (ptr, _keep) = self
            .check(rkey, addr, len, Some(Access::REMOTE_READ))
            .map_err(|_| crate::verbs::WcStatus::RemAccessErr)?;
        // SAFETY: checked inside a live registered region.
        Ok(unsafe { std::slice::from_raw_parts(ptr, len as usize) }.to_vec())
    }

    /// Write `data` at `addr` of the registration with remote key `rkey`.
    pub fn write_remote(
        &self,
        rkey: u32,
        addr: u64,
        data: &[u8],
    ) -> Result<(), crate::verbs::WcStatus> {
        let (ptr, _keep) = self
            .check(rkey, addr, data.len() as u64, Some(Access::REMOTE_WRITE))
            .map_err(|_| crate::verbs::WcStatus::RemAccessErr)?;
        // SAFETY: checked inside a live registered, remote-writable region.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, data.len()) };
        Ok(())
    }

    fn check(
        &self,
        key: u32,
        addr: u64,
        len: u64,
        need: Option<Access>,
    ) -> Result<(*mut u8, Arc<dyn RegionMemory>), crate::verbs::WcStatus> {
        let regions = self.regions.lock().unwrap_or_else(|p| p.into_inner());
        let (mem, off, rlen, access) = regions
            .get(&key)
            .ok_or(crate::verbs::WcStatus::LocProtErr)?;
        if self.caps.address_space != AddressSpace::Cpu {
            return Err(crate::verbs::WcStatus::LocProtErr);
        }
        let base = mem.as_ptr() as u64 + *off as u64;
        let end = addr
            .checked_add(len)
            .ok_or(crate::verbs::WcStatus::LocProtErr)?;
        if addr < base || end > base + *rlen as u64 {
            return Err(crate::verbs::WcStatus::LocProtErr);
        }
        if let Some(n) = need {
            if !access.contains(n) {
                return Err(crate::verbs::WcStatus::LocProtErr);
            }
        }
        Ok((addr as *mut u8, mem.clone()))
    }

    /// Access of the registration with `lkey`.
    pub fn access_of(&self, lkey: u32) -> Option<Access> {
        self.regions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&lkey)
            .map(|r| r.3)
    }
}

impl Transport for RegistryOnly {
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
        if offset.checked_add(len).is_none_or(|e| e > mem.len()) {
            return Err(TransportError::InvalidArgument(
                "range outside the memory".into(),
            ));
        }
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let cpu = mem.as_ptr() as u64 + offset as u64;
        let iova = match self.caps.address_space {
            AddressSpace::Cpu => cpu,
            AddressSpace::Iova => {
                let mut n = self.next_iova.lock().unwrap_or_else(|p| p.into_inner());
                // Keep the offset within the page, as ibv_reg_mr_iova2 requires.
                let v = *n + (cpu & 0xfff);
                *n += (len as u64 + 0x1fff) & !0xfff;
                v
            }
        };
        self.regions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (mem, offset, len, access));
        Ok(Registration {
            lkey: key,
            rkey: key,
            iova,
        })
    }

    fn deregister(&self, lkey: u32) -> Result<(), TransportError> {
        self.regions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&lkey)
            .map(|_| ())
            .ok_or_else(|| {
                TransportError::InvalidArgument(format!("no registration with lkey {lkey}"))
            })
    }

    fn create_srq(&self, _: u32, _: u32) -> Result<Arc<dyn SharedRecvQueue>, TransportError> {
        Err(TransportError::Unsupported("RegistryOnly has no data path"))
    }

    fn listen(&self, _: &str, _: &QpConfig) -> Result<Box<dyn Listener>, TransportError> {
        Err(TransportError::Unsupported("RegistryOnly has no data path"))
    }

    fn connect(
        &self,
        _: &str,
        _: &QpConfig,
        _: &[u8],
    ) -> Result<Box<dyn QueuePair>, TransportError> {
        Err(TransportError::Unsupported("RegistryOnly has no data path"))
    }
}
