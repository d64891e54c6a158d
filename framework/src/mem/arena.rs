//! Registered arenas and their slots.
//!
//! An [`Arena`] is one page-aligned mapping, registered with the device once
//! when it is created. It is carved into equal slots. [`SlotMut`] is an
//! exclusive, writable slot (`bytes::BufMut`); [`SlotMut::freeze`] turns it
//! into `Bytes` with `Bytes::from_owner` (no copy). When the last `Bytes`
//! clone drops, on whatever thread, the slot index goes back through a
//! lock-free queue. The arena is deregistered only when every slot is home
//! and the last `Arena` handle is gone, because every slot holds the arena.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes};
use crossbeam_queue::ArrayQueue;

use super::registry::{RegionEntry, Registry};
use super::sys::{HugePages, Mapping};
use crate::error::MemError;
use crate::sge::{AddressSpace, Sge};
use crate::transport::{RegionMemory, Registration, Transport};
use crate::verbs::Access;

static NEXT_ARENA_ID: AtomicU64 = AtomicU64::new(1);

/// How to build an arena.
#[derive(Clone, Debug)]
pub struct ArenaConfig {
    /// Bytes per slot; rounded up to 64 bytes (to a page from 4 KiB up) so every slot is aligned.
    pub slot_size: usize,
    /// Number of slots.
    pub slots: usize,
    /// Huge page policy.
    pub huge_pages: HugePages,
    /// Bind the memory to this NUMA node.
    pub numa_node: Option<u32>,
    /// Access rights of the arena's one registration. `LOCAL_WRITE` is always
    /// added. `REMOTE_WRITE` and `REMOTE_ATOMIC` are refused: memory a peer
    /// may write is never handed out as `Bytes`; expose a range for that.
    ///
    /// With `REMOTE_READ`, an exposure of its chunks for RDMA READ
    /// ([`crate::Pd::expose_bytes`], and so every rendezvous send of them)
    /// lends the arena's own registration instead of registering the chunk:
    /// no registration per message. The trade: a peer that was handed such
    /// a key can read the whole arena for as long as it is registered, so
    /// choose it for memory whose contents any peer may see.
    pub access: Access,
}

impl Default for ArenaConfig {
    fn default() -> Self {
        ArenaConfig {
            slot_size: 64 << 10,
            slots: 256,
            huge_pages: HugePages::Auto,
            numa_node: None,
            access: Access::LOCAL_WRITE,
        }
    }
}

impl ArenaConfig {
    /// `slots` slots of `slot_size` bytes, other settings default.
    pub fn new(slot_size: usize, slots: usize) -> Self {
        ArenaConfig {
            slot_size,
            slots,
            ..Default::default()
        }
    }
}

pub(crate) struct ArenaInner {
    id: u64,
    mapping: Arc<Mapping>,
    reg: Registration,
    access: Access,
    slot_size: usize,
    slots: u32,
    free: ArrayQueue<u32>,
    transport: Arc<dyn Transport>,
    registry: Arc<Registry>,
    space: AddressSpace,
}

impl Drop for ArenaInner {
    fn drop(&mut self) {
        self.registry.remove(self.mapping.as_ptr() as u64, self.id);
        if let Err(e) = self.transport.deregister(self.reg.lkey) {
            tracing::warn!(lkey = self.reg.lkey, "deregistering an arena failed: {e}");
        }
    }
}

/// A registered arena of equal slots. Cloning is cheap (one `Arc`).
#[derive(Clone)]
pub struct Arena {
    inner: Arc<ArenaInner>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("id", &self.inner.id)
            .field("base", &(self.inner.mapping.as_ptr() as u64))
            .field("slot_size", &self.inner.slot_size)
            .field("slots", &self.inner.slots)
            .field("free", &self.inner.free.len())
            .field("lkey", &self.inner.reg.lkey)
            .field("huge", &self.inner.mapping.is_huge())
            .finish()
    }
}

impl Arena {
    pub(crate) fn create(
        transport: Arc<dyn Transport>,
        registry: Arc<Registry>,
        cfg: &ArenaConfig,
    ) -> Result<Arena, MemError> {
        if cfg.slots == 0 || cfg.slots > u32::MAX as usize {
            return Err(MemError::Config(format!(
                "slot count {} out of range",
                cfg.slots
            )));
        }
        if cfg.slot_size == 0 {
            return Err(MemError::Config("slot size is zero".into()));
        }
        if cfg.access.contains(Access::REMOTE_WRITE) || cfg.access.contains(Access::REMOTE_ATOMIC) {
            return Err(MemError::Config(
                "an arena hands its slots out as Bytes, so peers may not write it: expose a range with remote write instead".into(),
            ));
        }
        let align = if cfg.slot_size >= 4096 { 4096 } else { 64 };
        let slot_size = cfg.slot_size.div_ceil(align) * align;
        let total = slot_size
            .checked_mul(cfg.slots)
            .ok_or_else(|| MemError::Config("arena size overflows".into()))?;
        let caps = transport.caps();
        if total as u64 > caps.max_mr_size {
            return Err(MemError::Config(format!(
                "arena of {total} bytes exceeds the device's max_mr_size {}",
                caps.max_mr_size
            )));
        }
        let mapping = Arc::new(Mapping::new(total, cfg.huge_pages, cfg.numa_node)?);
        let access = cfg.access | Access::LOCAL_WRITE;
        let reg = transport.register(mapping.clone() as Arc<dyn RegionMemory>, access)?;
        let id = NEXT_ARENA_ID.fetch_add(1, Ordering::Relaxed);
        let base = mapping.as_ptr() as u64;
        if let Err(e) = registry.insert(RegionEntry {
            base,
            len: mapping.len() as u64,
            lkey: reg.lkey,
            rkey: reg.rkey,
            iova: reg.iova,
            owner: id,
            access,
        }) {
            let _ = transport.deregister(reg.lkey);
            return Err(e);
        }
        let free = ArrayQueue::new(cfg.slots);
        for i in 0..cfg.slots as u32 {
            let _ = free.push(i);
        }
        tracing::debug!(
            id,
            base,
            total,
            slot_size,
            lkey = reg.lkey,
            huge = mapping.is_huge(),
            "arena registered"
        );
        let space = caps.address_space;
        Ok(Arena {
            inner: Arc::new(ArenaInner {
                id,
                mapping,
                reg,
                access,
                slot_size,
                slots: cfg.slots as u32,
                free,
                transport,
                registry,
                space,
            }),
        })
    }

    /// Take a free slot, or `None` if all are in use. Lock-free.
    #[inline]
    pub fn alloc(&self) -> Option<SlotMut> {
        let idx = self.inner.free.pop()?;
        Some(SlotMut {
            handle: SlotHandle {
                arena: self.inner.clone(),
                idx,
            },
            len: 0,
        })
    }

    /// Copy `data` into a fresh slot and freeze it: a convenience for tests and
    /// for callers that start from unregistered memory (the copy is theirs).
    pub fn copy_from(&self, data: &[u8]) -> Option<Bytes> {
        if data.len() > self.inner.slot_size {
            return None;
        }
        let mut s = self.alloc()?;
        s.put_slice(data);
        Some(s.freeze())
    }

    /// The registration's keys and device address.
    pub fn registration(&self) -> Registration {
        self.inner.reg
    }
    /// Local key of every slot.
    pub fn lkey(&self) -> u32 {
        self.inner.reg.lkey
    }
    /// Access rights registered.
    pub fn access(&self) -> Access {
        self.inner.access
    }
    /// Bytes per slot.
    pub fn slot_size(&self) -> usize {
        self.inner.slot_size
    }
    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.inner.slots as usize
    }
    /// Slots currently free.
    pub fn free_slots(&self) -> usize {
        self.inner.free.len()
    }
    /// True if the arena sits on 2 MiB hugetlb pages.
    pub fn is_huge(&self) -> bool {
        self.inner.mapping.is_huge()
    }
    /// CPU address of the first byte.
    pub fn base(&self) -> u64 {
        self.inner.mapping.as_ptr() as u64
    }
    /// Length of the mapping.
    pub fn len(&self) -> usize {
        self.inner.mapping.len()
    }
    /// True if the arena has no bytes (never: creation refuses it).
    pub fn is_empty(&self) -> bool {
        self.inner.mapping.len() == 0
    }
    /// The arena's memory, for registering sub-ranges (exposures).
    pub fn memory(&self) -> Arc<dyn RegionMemory> {
        self.inner.mapping.clone()
    }
}

/// Owns one slot index; returns it to the arena when dropped.
struct SlotHandle {
    arena: Arc<ArenaInner>,
    idx: u32,
}

impl SlotHandle {
    #[inline]
    fn ptr(&self) -> *mut u8 {
        // SAFETY: idx < slots, so the offset stays inside the mapping.
        unsafe {
            self.arena
                .mapping
                .as_ptr()
                .add(self.idx as usize * self.arena.slot_size)
        }
    }

    #[inline]
    fn sge(&self, off: usize, len: usize) -> Sge {
        let a = &self.arena;
        let cpu = self.ptr() as u64 + off as u64;
        let addr = match a.space {
            AddressSpace::Cpu => cpu,
            AddressSpace::Iova => a.reg.iova + (cpu - a.mapping.as_ptr() as u64),
        };
        Sge::new(addr, len as u32, a.reg.lkey)
    }
}

impl Drop for SlotHandle {
    fn drop(&mut self) {
        // Capacity equals the slot count and each index is pushed once, so
        // this never fails.
        let _ = self.arena.free.push(self.idx);
    }
}

/// An exclusive, writable slot of a registered arena.
///
/// Write it through `BufMut` (or [`SlotMut::as_mut_slice`] after
/// [`SlotMut::set_len`]), then [`SlotMut::freeze`] it into `Bytes`. It can also
/// be posted as a receive or RDMA READ target through [`SlotMut::sge`]; the
/// device writes it while the framework holds the `SlotMut`, and the filled
/// length is set from the completion.
pub struct SlotMut {
    handle: SlotHandle,
    len: usize,
}

impl std::fmt::Debug for SlotMut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotMut")
            .field("idx", &self.handle.idx)
            .field("len", &self.len)
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl SlotMut {
    /// Bytes the slot can hold.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.handle.arena.slot_size
    }
    /// Bytes filled so far.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }
    /// True if nothing is filled.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Set the filled length (e.g. from a completion's `byte_len`). Arena
    /// memory is always initialized, so any length up to the capacity is sound.
    ///
    /// # Panics
    /// If `len` exceeds the capacity.
    #[inline]
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity(), "slot length {len} over capacity");
        self.len = len;
    }
    /// The filled bytes.
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the slot is exclusively ours, inside a live mapping, and
        // initialized; no device writes it unless posted, which takes `&mut`.
        unsafe { std::slice::from_raw_parts(self.handle.ptr(), self.len) }
    }
    /// The filled bytes, writable.
    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.handle.ptr(), self.len) }
    }
    /// An SGE over the whole capacity, for a receive or an RDMA READ target.
    #[inline]
    pub fn sge(&self) -> Sge {
        self.handle.sge(0, self.capacity())
    }
    /// An SGE over `[off, off + len)` of the slot.
    ///
    /// # Panics
    /// If the range is outside the slot.
    #[inline]
    pub fn sge_range(&self, off: usize, len: usize) -> Sge {
        assert!(off.checked_add(len).is_some_and(|e| e <= self.capacity()));
        self.handle.sge(off, len)
    }
    /// An SGE over the filled bytes.
    #[inline]
    pub fn sge_filled(&self) -> Sge {
        self.handle.sge(0, self.len)
    }
    /// The local key.
    #[inline]
    pub fn lkey(&self) -> u32 {
        self.handle.arena.reg.lkey
    }
    /// True if this slot is one of `arena`'s.
    #[inline]
    pub fn is_of(&self, arena: &Arena) -> bool {
        Arc::ptr_eq(&self.handle.arena, &arena.inner)
    }
    /// Turn the filled bytes into `Bytes` without copying. Dropping the last
    /// clone returns the slot to its arena.
    #[inline]
    pub fn freeze(self) -> Bytes {
        let len = self.len;
        Bytes::from_owner(FrozenSlot {
            handle: self.handle,
            len,
        })
    }
}

// SAFETY: `chunk_mut` hands out exactly the unfilled part of our exclusive
// slot, `advance_mut` checks it stays within capacity.
unsafe impl BufMut for SlotMut {
    #[inline]
    fn remaining_mut(&self) -> usize {
        self.capacity() - self.len
    }
    #[inline]
    unsafe fn advance_mut(&mut self, cnt: usize) {
        assert!(cnt <= self.remaining_mut(), "advance past the slot's end");
        self.len += cnt;
    }
    #[inline]
    fn chunk_mut(&mut self) -> &mut UninitSlice {
        let cap = self.capacity();
        // SAFETY: [len, cap) lies inside our exclusive slot of a live mapping.
        unsafe { UninitSlice::from_raw_parts_mut(self.handle.ptr().add(self.len), cap - self.len) }
    }
}

impl Extend<u8> for SlotMut {
    /// Append bytes.
    ///
    /// # Panics
    /// If they do not fit the slot.
    fn extend<I: IntoIterator<Item = u8>>(&mut self, iter: I) {
        for b in iter {
            self.put_u8(b);
        }
    }
}

struct FrozenSlot {
    handle: SlotHandle,
    len: usize,
}

impl AsRef<[u8]> for FrozenSlot {
    #[inline]
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the slot is kept by `handle` (and the mapping by its arena);
        // after freezing nothing writes it: it is never posted as a receive
        // again until it is home, and arenas refuse remote-write access.
        unsafe { std::slice::from_raw_parts(self.handle.ptr(), self.len) }
    }
}
