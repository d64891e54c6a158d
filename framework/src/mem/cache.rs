//! The registration cache behind `UnregisteredPolicy::RegisterCached`.
//!
//! Each entry registers exactly the bytes of one `Bytes` chunk, read-only
//! (the device never writes it), and holds a clone of that `Bytes` so the
//! memory cannot be freed and its address reused while registered. A chunk
//! handed to the device is replaced by a `Bytes` that also holds the entry's
//! pin; an entry is evicted (least recently used first) only when no pin is
//! out, i.e. no posted request uses it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::registry::{RegionEntry, Registry};
use super::CACHE_OWNER;
use crate::error::SgeError;
use crate::transport::{RegionMemory, Transport};
use crate::verbs::Access;

/// Limits of the registration cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Most entries.
    pub max_entries: usize,
    /// Most registered bytes.
    pub max_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: 1024,
            max_bytes: 256 << 20,
        }
    }
}

pub(crate) struct BytesMemory(pub(crate) Bytes);

// SAFETY: `Bytes` memory is immutable and lives as long as the clone we hold;
// the registration is read-only, so the device never writes it.
unsafe impl RegionMemory for BytesMemory {
    fn as_ptr(&self) -> *mut u8 {
        self.0.as_ptr() as *mut u8
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

struct Pinned {
    chunk: Bytes,
    _pin: Arc<()>,
}

impl AsRef<[u8]> for Pinned {
    fn as_ref(&self) -> &[u8] {
        &self.chunk
    }
}

struct Entry {
    region: RegionEntry,
    pin: Arc<()>,
    last_use: u64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) struct RegCache {
    cfg: CacheConfig,
    entries: HashMap<u64, Entry>,
    bytes: u64,
    clock: u64,
}

impl RegCache {
    pub(crate) fn new(cfg: CacheConfig) -> Self {
        RegCache {
            cfg,
            entries: HashMap::new(),
            bytes: 0,
            clock: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Wrap `chunk` so it holds the pin of entry `owner`.
    pub(crate) fn pin(&mut self, chunk: &mut Bytes, owner: u64) {
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(&owner) {
            e.last_use = self.clock;
            let pinned = Pinned {
                chunk: std::mem::take(chunk),
                _pin: e.pin.clone(),
            };
            *chunk = Bytes::from_owner(pinned);
        }
    }

    pub(crate) fn register(
        &mut self,
        transport: &Arc<dyn Transport>,
        registry: &Registry,
        chunk: &mut Bytes,
    ) -> Result<RegionEntry, SgeError> {
        let len = chunk.len() as u64;
        if self.cfg.max_entries == 0 || len > self.cfg.max_bytes {
            return Err(SgeError::Register(format!(
                "a {len}-byte chunk exceeds the registration cache's limit of {} bytes",
                self.cfg.max_bytes
            )));
        }
        while self.entries.len() >= self.cfg.max_entries || self.bytes + len > self.cfg.max_bytes {
            if !self.evict_one(transport, registry) {
                return Err(SgeError::Register(format!(
                    "registration cache full ({} entries, {} bytes; limits {} entries, {} bytes) and every entry is in use by a posted request",
                    self.entries.len(),
                    self.bytes,
                    self.cfg.max_entries,
                    self.cfg.max_bytes
                )));
            }
        }
        let mem = Arc::new(BytesMemory(chunk.clone()));
        let reg = transport
            .register(mem, Access::LOCAL_READ)
            .map_err(|e| SgeError::Register(e.to_string()))?;
        let owner = CACHE_OWNER | NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let region = RegionEntry {
            base: chunk.as_ptr() as u64,
            len,
            lkey: reg.lkey,
            rkey: reg.rkey,
            iova: reg.iova,
            owner,
            access: Access::LOCAL_READ,
        };
        if let Err(e) = registry.insert(region) {
            let _ = transport.deregister(reg.lkey);
            return Err(SgeError::Register(e.to_string()));
        }
        self.bytes += len;
        self.entries.insert(
            owner,
            Entry {
                region,
                pin: Arc::new(()),
                last_use: 0,
            },
        );
        self.pin(chunk, owner);
        Ok(region)
    }

    fn evict_one(&mut self, transport: &Arc<dyn Transport>, registry: &Registry) -> bool {
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| Arc::strong_count(&e.pin) == 1)
            .min_by_key(|(_, e)| e.last_use)
            .map(|(k, _)| *k);
        let Some(k) = victim else { return false };
        if let Some(e) = self.entries.remove(&k) {
            self.drop_entry(&e, transport, registry);
        }
        true
    }

    fn drop_entry(&mut self, e: &Entry, transport: &Arc<dyn Transport>, registry: &Registry) {
        registry.remove(e.region.base, e.region.owner);
        if let Err(err) = transport.deregister(e.region.lkey) {
            tracing::warn!(
                lkey = e.region.lkey,
                "deregistering a cached chunk failed: {err}"
            );
        }
        self.bytes -= e.region.len;
    }

    pub(crate) fn clear(&mut self, transport: &Arc<dyn Transport>, registry: &Registry) {
        let all: Vec<Entry> = self.entries.drain().map(|(_, e)| e).collect();
        for e in &all {
            self.drop_entry(e, transport, registry);
        }
    }
}
