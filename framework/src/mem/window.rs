//! Memory a peer may write: exposed windows.
//!
//! A window is registered with remote access and is never handed to the
//! application as `Bytes` while exposed: a peer's write into memory Rust code
//! reads through `&[u8]` would be a data race. The owner reads it only after
//! [`Window::revoke`], which deregisters it (the peer's key stops working,
//! and the device touches the memory no more), returning a [`Revoked`] buffer
//! that can be read or turned into `Bytes` without a copy.

use std::sync::Arc;

use bytes::Bytes;

use super::registry::Registry;
use super::sys::{HugePages, Mapping};
use crate::error::MemError;
use crate::sge::{AddressSpace, Sge};
use crate::transport::{RegionMemory, Registration, Transport};
use crate::verbs::{Access, RemoteRegion};

/// A registered buffer exposed to peers (remote write, read or atomics).
pub struct Window {
    mapping: Arc<Mapping>,
    len: usize,
    reg: Registration,
    access: Access,
    transport: Arc<dyn Transport>,
    live: bool,
    /// [`crate::DeviceCaps::dma_remote_writes`], read once: `load_byte`
    /// is a spin loop's body, which should not make a virtual call.
    watchable: bool,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("len", &self.len)
            .field("rkey", &self.reg.rkey)
            .field("access", &self.access)
            .finish()
    }
}

impl Window {
    pub(crate) fn create(
        transport: Arc<dyn Transport>,
        len: usize,
        access: Access,
    ) -> Result<Window, MemError> {
        let mapping = Arc::new(Mapping::new(len.max(1), HugePages::Auto, None)?);
        let access = access | Access::LOCAL_WRITE;
        let reg =
            transport.register_range(mapping.clone() as Arc<dyn RegionMemory>, 0, len, access)?;
        let watchable = transport.caps().dma_remote_writes;
        Ok(Window {
            mapping,
            len,
            reg,
            access,
            transport,
            live: true,
            watchable,
        })
    }

    /// What to hand the peer: address in this device's address space, length, rkey.
    pub fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.reg.iova,
            len: self.len as u64,
            rkey: self.reg.rkey,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The registration.
    pub fn registration(&self) -> Registration {
        self.reg
    }

    /// An SGE over `[off, off + len)`, for local use (e.g. as the target of an
    /// RDMA READ or an atomic's result).
    ///
    /// # Panics
    /// If the range is outside the window.
    pub fn sge(&self, off: usize, len: usize) -> Sge {
        assert!(off.checked_add(len).is_some_and(|e| e <= self.len));
        let addr = match self.transport.caps().address_space {
            AddressSpace::Cpu => self.mapping.as_ptr() as u64 + off as u64,
            AddressSpace::Iova => self.reg.iova + off as u64,
        };
        Sge::new(addr, len as u32, self.reg.lkey)
    }

    /// The byte at `off`, read with one atomic load (acquire) while the
    /// window stays exposed: how a side learns that a peer's RDMA WRITE has
    /// landed without a completion, by watching a flag byte the peer writes
    /// (`ib_write_lat` watches the last byte of its buffer). Only the byte
    /// itself is read; the rest of the window is read after
    /// [`Window::revoke`] (devices give no order among the bytes of one
    /// WRITE, and no other read happens while the window is exposed).
    ///
    /// `None` if the device's remote writes are not DMA from outside the
    /// process ([`crate::DeviceCaps::dma_remote_writes`]: the in-process
    /// software device copies with plain Rust writes, which an atomic read
    /// would race with), or if `off` is outside the window.
    #[inline]
    pub fn load_byte(&self, off: usize) -> Option<u8> {
        if off >= self.len || !self.watchable {
            return None;
        }
        // SAFETY: `off` is inside the mapping, which lives as long as
        // `self`. While the window is exposed this process touches its
        // bytes only through `&mut self` (`fill`, excluded by `&self` here)
        // or atomically (this load): the device's DMA writes happen outside
        // the Rust abstract machine (checked by `dma_remote_writes`), like a
        // kernel writing a shared ring, so the load cannot race with a Rust
        // access. A `u8` has no alignment requirement.
        let b = unsafe { std::sync::atomic::AtomicU8::from_ptr(self.mapping.as_ptr().add(off)) };
        Some(b.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Fill the window before exposing it (no peer can write it yet only if it
    /// has not been handed out: callers fill first, then send `remote()`).
    pub fn fill(&mut self, byte: u8) {
        // SAFETY: `&mut self`; the device writes only on a peer's request,
        // and the caller fills before handing out the remote key.
        unsafe { std::ptr::write_bytes(self.mapping.as_ptr(), byte, self.len) };
    }

    /// End the peer's access: deregister, so the device touches the memory no
    /// more and the key is dead. The bytes are then safe to read.
    pub fn revoke(mut self) -> Revoked {
        self.end();
        Revoked {
            mapping: self.mapping.clone(),
            len: self.len,
        }
    }

    fn end(&mut self) {
        if self.live {
            self.live = false;
            if let Err(e) = self.transport.deregister(self.reg.lkey) {
                tracing::warn!(lkey = self.reg.lkey, "revoking a window failed: {e}");
            }
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        self.end();
    }
}

/// A window whose exposure has ended: plain memory, readable.
pub struct Revoked {
    mapping: Arc<Mapping>,
    len: usize,
}

impl Revoked {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: deregistered, so no device writes it; the mapping lives as
        // long as `self` and is initialized.
        unsafe { std::slice::from_raw_parts(self.mapping.as_ptr(), self.len) }
    }

    /// The bytes as `Bytes`, without a copy.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Revoked {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

/// Immutable `Bytes` exposed to a peer for RDMA READ (rendezvous sends):
/// a registration of exactly the chunk's bytes, held until dropped; or,
/// for a chunk of an arena registered with `REMOTE_READ`, that arena's own
/// registration, lent (see [`crate::ArenaConfig::access`]).
pub struct Exposure {
    reg: Registration,
    len: u64,
    transport: Arc<dyn Transport>,
    /// The chunk, kept (and with it its arena's registration) while the
    /// arena's registration is lent; `None` when the exposure registered
    /// the chunk itself.
    lent: Option<Bytes>,
}

impl Exposure {
    pub(crate) fn create(
        transport: Arc<dyn Transport>,
        registry: &Registry,
        chunk: &Bytes,
    ) -> Result<Exposure, MemError> {
        let len = chunk.len();
        let addr = chunk.as_ptr() as u64;
        let arena = registry.find(addr).filter(|e| {
            e.owner & super::CACHE_OWNER == 0
                && e.access.contains(Access::REMOTE_READ)
                && addr + len as u64 <= e.end()
        });
        if let Some(e) = arena {
            return Ok(Exposure {
                reg: Registration {
                    lkey: e.lkey,
                    rkey: e.rkey,
                    iova: e.iova.wrapping_add(addr - e.base),
                },
                len: len as u64,
                transport,
                lent: Some(chunk.clone()),
            });
        }
        let mem = Arc::new(super::cache::BytesMemory(chunk.clone()));
        let reg = transport.register_range(mem, 0, len, Access::REMOTE_READ)?;
        Ok(Exposure {
            reg,
            len: len as u64,
            transport,
            lent: None,
        })
    }

    /// True if this exposure lends its arena's registration (no
    /// registration of its own).
    pub fn is_lent(&self) -> bool {
        self.lent.is_some()
    }

    /// What the peer reads.
    pub fn remote(&self) -> RemoteRegion {
        RemoteRegion {
            addr: self.reg.iova,
            len: self.len,
            rkey: self.reg.rkey,
        }
    }
}

impl Drop for Exposure {
    fn drop(&mut self) {
        if self.lent.is_some() {
            return;
        }
        if let Err(e) = self.transport.deregister(self.reg.lkey) {
            tracing::warn!(lkey = self.reg.lkey, "ending an exposure failed: {e}");
        }
    }
}
