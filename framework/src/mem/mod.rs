//! Memory registered once: protection domains, arenas, slots, the region
//! registry and the registration cache for foreign memory.

mod arena;
mod cache;
mod registry;
pub mod sys;
mod window;

use std::sync::{Arc, Mutex};

use bytes::Bytes;

pub use arena::{Arena, ArenaConfig, SlotMut};
pub use cache::CacheConfig;
pub(crate) use registry::{CachedTable, Hot, Lookup};
pub use registry::{RegionEntry, Registry, Snapshot};
pub use sys::HugePages;
pub use window::{Exposure, Revoked, Window};

use crate::error::{MemError, SgeError};
use crate::sge::{AddressSpace, SgeBuilder};
use crate::stats::CopyStats;
use crate::transport::{DeviceCaps, Transport};

/// Owner ids with this bit belong to registration-cache entries.
pub(crate) const CACHE_OWNER: u64 = 1 << 63;

/// What the builders do with a chunk that lies outside every registered region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum UnregisteredPolicy {
    /// A typed error naming the address and length.
    Reject,
    /// Copy the chunk into registered memory (counted as `Bounce`). Always works.
    #[default]
    Bounce,
    /// Register the chunk's memory on first use, in a bounded cache with
    /// eviction. Each entry holds a clone of the `Bytes` it registered, so the
    /// memory cannot be freed and reused while registered; an entry is evicted
    /// only when no posted request uses it.
    RegisterCached,
}

/// Bounce buffers: slots of this size; bigger chunks get an arena of their own.
const BOUNCE_SLOT: usize = 64 << 10;
const BOUNCE_SLOTS: usize = 64;

struct PdInner {
    transport: Arc<dyn Transport>,
    registry: Arc<Registry>,
    stats: Arc<CopyStats>,
    space: AddressSpace,
    bounce: Mutex<Option<Arena>>,
    cache: Mutex<cache::RegCache>,
}

/// A protection domain: a device, the regions registered with it, and the
/// copy counters of everything built against it. Cloning is cheap.
#[derive(Clone)]
pub struct Pd {
    inner: Arc<PdInner>,
}

impl std::fmt::Debug for Pd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pd")
            .field("device", &self.inner.transport.caps().name)
            .field("regions", &self.inner.registry.len())
            .finish()
    }
}

impl Pd {
    /// The protection domain of `transport`, with the default cache limits.
    pub fn new(transport: Arc<dyn Transport>) -> Pd {
        Self::with_cache(transport, CacheConfig::default())
    }

    /// The protection domain of `transport` with registration-cache limits.
    pub fn with_cache(transport: Arc<dyn Transport>, cache: CacheConfig) -> Pd {
        let space = transport.caps().address_space;
        Pd {
            inner: Arc::new(PdInner {
                transport,
                registry: Arc::new(Registry::new()),
                stats: Arc::new(CopyStats::default()),
                space,
                bounce: Mutex::new(None),
                cache: Mutex::new(cache::RegCache::new(cache)),
            }),
        }
    }

    /// The device.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    /// The device's capabilities.
    pub fn caps(&self) -> &DeviceCaps {
        self.inner.transport.caps()
    }

    /// Allocate and register an arena (exactly one registration).
    pub fn arena(&self, cfg: ArenaConfig) -> Result<Arena, MemError> {
        Arena::create(
            self.inner.transport.clone(),
            self.inner.registry.clone(),
            &cfg,
        )
    }

    /// A buffer a peer may access remotely (`access` among REMOTE_WRITE,
    /// REMOTE_READ, REMOTE_ATOMIC), registered on its own so only it is
    /// exposed; read it after [`Window::revoke`].
    pub fn window(&self, len: usize, access: crate::verbs::Access) -> Result<Window, MemError> {
        Window::create(self.inner.transport.clone(), len, access)
    }

    /// Expose the bytes of `chunk` to peers for RDMA READ until the
    /// returned handle drops: a registration of exactly those bytes, or,
    /// when the chunk lies in an arena registered with `REMOTE_READ`, that
    /// arena's registration, lent with no registration of its own (see
    /// [`ArenaConfig::access`]). `Bytes` are immutable, so reads race with
    /// nothing.
    pub fn expose_bytes(&self, chunk: &Bytes) -> Result<Exposure, MemError> {
        Exposure::create(self.inner.transport.clone(), &self.inner.registry, chunk)
    }

    /// The address-to-region table.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Copy counters of everything built against this protection domain.
    pub fn stats(&self) -> &CopyStats {
        &self.inner.stats
    }

    /// Shared handle to the copy counters.
    pub fn stats_handle(&self) -> Arc<CopyStats> {
        self.inner.stats.clone()
    }

    /// An SGE builder applying `policy` to unregistered memory.
    pub fn builder(&self, policy: UnregisteredPolicy) -> SgeBuilder<'_> {
        SgeBuilder::new(self, policy)
    }

    /// Entries in the registration cache.
    pub fn cached_registrations(&self) -> usize {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    #[inline]
    pub(crate) fn address_space(&self) -> AddressSpace {
        self.inner.space
    }

    #[inline]
    pub(crate) fn device_addr(&self, e: &RegionEntry, cpu: u64) -> u64 {
        match self.inner.space {
            AddressSpace::Cpu => cpu,
            AddressSpace::Iova => e.iova + (cpu - e.base),
        }
    }

    pub(crate) fn bounce_slot_size(&self) -> usize {
        BOUNCE_SLOT
    }

    /// A registered slot of at least `len` bytes for a bounce or coalescing copy.
    pub(crate) fn bounce_slot(&self, len: usize) -> Option<SlotMut> {
        if len <= BOUNCE_SLOT {
            let mut b = self.inner.bounce.lock().unwrap_or_else(|p| p.into_inner());
            if b.is_none() {
                match self.arena(ArenaConfig {
                    huge_pages: HugePages::Never,
                    ..ArenaConfig::new(BOUNCE_SLOT, BOUNCE_SLOTS)
                }) {
                    Ok(a) => *b = Some(a),
                    Err(e) => {
                        tracing::warn!("cannot create the bounce arena: {e}");
                        return None;
                    }
                }
            }
            if let Some(s) = b.as_ref().and_then(|a| a.alloc()) {
                return Some(s);
            }
        }
        // Too big for a bounce slot, or all in flight: a one-slot arena of its own.
        tracing::debug!(len, "bounce through a dedicated arena");
        self.arena(ArenaConfig {
            huge_pages: HugePages::Never,
            ..ArenaConfig::new(len.max(1), 1)
        })
        .ok()?
        .alloc()
    }

    pub(crate) fn pin_cached(&self, chunk: &mut Bytes, owner: u64) {
        let mut c = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.pin(chunk, owner);
    }

    pub(crate) fn register_cached(&self, chunk: &mut Bytes) -> Result<RegionEntry, SgeError> {
        let mut c = self.inner.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.register(&self.inner.transport, &self.inner.registry, chunk)
    }
}

impl Drop for PdInner {
    fn drop(&mut self) {
        let c = self.cache.get_mut().unwrap_or_else(|p| p.into_inner());
        c.clear(&self.transport, &self.registry);
    }
}
