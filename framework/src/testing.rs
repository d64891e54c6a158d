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
