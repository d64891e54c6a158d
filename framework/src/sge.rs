//! Scatter-gather entries and the builders that fill them.
//!
//! Application code never writes `lkey` or `addr`: [`SgeBuilder`] looks up the
//! registered region each `Bytes` chunk lies in, takes the local key from the
//! protection domain's registration of it, and writes the address in the
//! device's [`AddressSpace`]. [`RwPlan`] splits one-sided lists at the
//! device's SGE and message-size limits the way the kernel's
//! `rdma_rw_ctx_init` does, and says how many work requests it needs before
//! anything is posted.

use bytes::{BufMut, Bytes};

use std::cell::RefCell;

use crate::error::SgeError;
use crate::mem::UnregisteredPolicy;
use crate::mem::{CachedTable, Hot, Pd};
use crate::stats::CopyReason;
use crate::verbs::{Opcode, RemoteRegion, WorkRequest};

/// How a device reads SGE addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressSpace {
    /// CPU virtual addresses, translated by a software device's region table (like rxe).
    Cpu,
    /// The region's I/O virtual address plus the offset (hardware; `ibv_reg_mr_iova2`).
    Iova,
}

/// One scatter-gather entry, layout-identical to `struct ibv_sge`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Sge {
    addr: u64,
    length: u32,
    lkey: u32,
}

const _: () = {
    assert!(std::mem::size_of::<Sge>() == 16);
    assert!(std::mem::align_of::<Sge>() == 8);
    assert!(std::mem::offset_of!(Sge, addr) == 0);
    assert!(std::mem::offset_of!(Sge, length) == 8);
    assert!(std::mem::offset_of!(Sge, lkey) == 12);
};

impl Sge {
    /// Build an SGE from raw parts. Only builders, transports and conformance
    /// tests that probe a device's checks should call this: applications get
    /// SGEs from [`SgeBuilder`] and slots.
    #[inline]
    pub const fn new(addr: u64, length: u32, lkey: u32) -> Sge {
        Sge { addr, length, lkey }
    }
    /// Address in the device's address space.
    #[inline]
    pub const fn addr(&self) -> u64 {
        self.addr
    }
    /// Length in bytes.
    #[inline]
    pub const fn length(&self) -> u32 {
        self.length
    }
    /// Local key.
    #[inline]
    pub const fn lkey(&self) -> u32 {
        self.lkey
    }
}

/// Chunks per run of [`SgeBuilder::list`]'s fast loop.
const RUN: usize = 16;

/// Builds SGEs for one protection domain under one unregistered-memory policy.
///
/// A builder keeps the region table its first [`SgeBuilder::list`] read and
/// reuses it while the registry is unchanged (one load of the registry's
/// generation per list instead of a snapshot), so keep a builder across
/// messages rather than making one per message. It is not `Sync`: one per
/// thread.
pub struct SgeBuilder<'a> {
    pd: &'a Pd,
    policy: UnregisteredPolicy,
    table: RefCell<Option<CachedTable>>,
}

/// The loop of [`SgeBuilder::list`]'s runs: SGEs for `block` into `buf`
/// while each chunk is non-empty and fits the record `pick` names for its
/// address; returns how many. No calls inside, so its values stay in
/// registers and its stores do not wait on a vector's length.
#[inline(always)]
fn fill_run<'t>(
    buf: &mut [Sge; RUN],
    block: &[Bytes],
    delta_mask: u64,
    pick: impl Fn(u64) -> &'t Hot,
) -> usize {
    let mut k = 0;
    for (slot, c) in buf.iter_mut().zip(block) {
        let (addr, len) = (c.as_ptr() as u64, c.len() as u64);
        let h = pick(addr);
        if !(h.fits(addr, addr.wrapping_add(len)) & (len.wrapping_sub(1) < u64::from(u32::MAX))) {
            break;
        }
        *slot = Sge::new(addr.wrapping_add(h.delta & delta_mask), len as u32, h.lkey);
        k += 1;
    }
    k
}

impl<'a> SgeBuilder<'a> {
    pub(crate) fn new(pd: &'a Pd, policy: UnregisteredPolicy) -> Self {
        Self::with_table(pd, policy, None)
    }

    /// A builder that starts from a table kept from an earlier builder.
    pub(crate) fn with_table(
        pd: &'a Pd,
        policy: UnregisteredPolicy,
        table: Option<CachedTable>,
    ) -> Self {
        SgeBuilder {
            pd,
            policy,
            table: RefCell::new(table),
        }
    }

    /// The table this builder kept, for the next one.
    pub(crate) fn into_table(self) -> Option<CachedTable> {
        self.table.into_inner()
    }

    /// The SGE for one chunk (`rdma_map_sge_single`). A chunk in unregistered
    /// memory is handled by the policy, which may replace `chunk` with a
    /// registered copy (`Bounce`) or a pinned registration (`RegisterCached`);
    /// the caller keeps `chunk` alive until the completion.
    pub fn single(&self, chunk: &mut Bytes) -> Result<Sge, SgeError> {
        let mut out = [Sge::default(); 1];
        match self.map_chunk(chunk, &mut |i, s| {
            if i == 0 {
                out[0] = s;
                Ok(())
            } else {
                Err(())
            }
        })? {
            1 => Ok(out[0]),
            0 => Ok(Sge::new(0, 0, 0)),
            _ => Err(SgeError::CrossesRegion {
                addr: chunk.as_ptr() as u64,
                len: chunk.len() as u64,
            }),
        }
    }

    /// The SGE of a borrowed slice of registered memory, for synchronous use
    /// only (e.g. an inline send, which the device copies at post time, so
    /// the slice may change right after `post_send` returns). Unregistered
    /// memory is an error: a device reads every SGE through its region table.
    pub fn borrowed(&self, data: &[u8]) -> Result<Sge, SgeError> {
        let addr = data.as_ptr() as u64;
        let len = data.len() as u64;
        let snap = self.pd.registry().snapshot();
        match snap.find(addr) {
            Some(e) if addr + len <= e.end() && len <= u64::from(u32::MAX) => {
                Ok(Sge::new(self.pd.device_addr(e, addr), len as u32, e.lkey))
            }
            _ => Err(SgeError::Unregistered { addr, len }),
        }
    }

    /// SGEs for a list of chunks, in order, appended to `out`
    /// (`rdma_fill_ib_sge_from_sgl`). A chunk spanning adjacent regions gets
    /// one SGE per region; empty chunks get none.
    pub fn list(&self, chunks: &mut [Bytes], out: &mut Vec<Sge>) -> Result<(), SgeError> {
        // One table for the whole list (the kept one if the registry has not
        // changed); the common case (a chunk inside one region, arena
        // memory) never leaves the inner loop: one hinted lookup, one
        // 32-byte record, one compare, one store. The general path takes its
        // own snapshot, so it may register (cache, bounce) while this
        // table is held; this list then finishes on the table it started
        // with, as with any snapshot.
        let mut kept = self.table.borrow_mut();
        let reg = self.pd.registry();
        let table = match &mut *kept {
            Some(t) => {
                reg.refresh(t);
                t
            }
            none => none.insert(reg.cached()),
        };
        let look = table.lookup();
        // Device address = CPU address + (delta & mask): no branch on the space.
        let delta_mask = match self.pd.address_space() {
            AddressSpace::Iova => u64::MAX,
            AddressSpace::Cpu => 0,
        };
        out.reserve(chunks.len());
        let mut i = 0;
        while i < chunks.len() {
            // A run of chunks whose page hints are right, built into a local
            // array by a loop with no calls (its values stay in registers
            // and its stores do not wait on the vector's length), then
            // appended at once. The run stops at the first chunk that is
            // empty, misses its hint or needs the general path.
            let block = &chunks[i..chunks.len().min(i + RUN)];
            let mut buf = [Sge::default(); RUN];
            // First the whole run against the first chunk's record alone
            // (the chunks of a message mostly share an arena: then no hint
            // is loaded per chunk); if one falls outside it, the run is
            // built again from its start, each chunk by its page hint.
            let mut k = match block.first() {
                Some(first) => {
                    let h = look.hinted(first.as_ptr() as u64);
                    fill_run(&mut buf, block, delta_mask, |_| h)
                }
                None => 0,
            };
            if k < block.len() {
                k = fill_run(&mut buf, block, delta_mask, |addr| look.hinted(addr));
            }
            out.extend_from_slice(&buf[..k]);
            i += k;
            if k < block.len() {
                self.list_one(look, delta_mask, &mut chunks[i], out)?;
                i += 1;
            }
        }
        Ok(())
    }

    /// One chunk off [`SgeBuilder::list`]'s run: empty (no SGE), a missed
    /// hint (search, which repairs the hint), or the general path.
    #[inline(never)]
    fn list_one(
        &self,
        look: crate::mem::Lookup<'_>,
        delta_mask: u64,
        c: &mut Bytes,
        out: &mut Vec<Sge>,
    ) -> Result<(), SgeError> {
        let (addr, len) = (c.as_ptr() as u64, c.len() as u64);
        if len == 0 {
            return Ok(());
        }
        let h = look.search(addr);
        if h.fits(addr, addr.wrapping_add(len)) & (len <= u64::from(u32::MAX)) {
            out.push(Sge::new(
                addr.wrapping_add(h.delta & delta_mask),
                len as u32,
                h.lkey,
            ));
            Ok(())
        } else {
            // Crossing, cached, unregistered or too long: the general path.
            self.list_slow(c, out)
        }
    }

    /// The general path of [`SgeBuilder::list`] for one chunk, out of line
    /// so the fast loop keeps its values in registers.
    #[cold]
    #[inline(never)]
    fn list_slow(&self, c: &mut Bytes, out: &mut Vec<Sge>) -> Result<(), SgeError> {
        self.map_chunk(c, &mut |_, s| {
            out.push(s);
            Ok(())
        })
        .map(|_| ())
    }

    /// SGEs for one SEND of `chunks`. A SEND is never split: over `max_msg_sz`
    /// it is refused (`MessageTooLarge`: use rendezvous); over `max_sge`, the
    /// cheapest run of neighbouring chunks is coalesced into one registered slot
    /// (counted as `Coalesce`), and if that cannot fit a slot, `TooManySges`.
    pub fn send(
        &self,
        chunks: &mut [Bytes],
        max_sge: u32,
        max_msg_sz: u32,
        out: &mut Vec<Sge>,
    ) -> Result<(), SgeError> {
        let total: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        if total > u64::from(max_msg_sz) {
            return Err(SgeError::MessageTooLarge {
                len: total,
                max: max_msg_sz,
            });
        }
        let start = out.len();
        self.list(chunks, out)?;
        let need = out.len() - start;
        if need <= max_sge as usize {
            return Ok(());
        }
        out.truncate(start);
        self.coalesce(chunks, need, max_sge)?;
        self.list(chunks, out)?;
        debug_assert!(out.len() - start <= max_sge as usize);
        Ok(())
    }

    /// Merge the run of neighbouring chunks with the fewest bytes whose SGEs,
    /// replaced by one, bring the count to `max_sge`.
    fn coalesce(&self, chunks: &mut [Bytes], need: usize, max_sge: u32) -> Result<(), SgeError> {
        let err = SgeError::TooManySges { need, max: max_sge };
        if max_sge == 0 {
            return Err(err);
        }
        let excess = need - max_sge as usize;
        let limit = self.pd.bounce_slot_size() as u64;
        let snap = self.pd.registry().snapshot();
        let sges_of = |c: &Bytes| -> usize {
            if c.is_empty() {
                return 0;
            }
            let mut n = 0;
            let (mut a, end) = (c.as_ptr() as u64, c.as_ptr() as u64 + c.len() as u64);
            while a < end {
                n += 1;
                match snap.find(a) {
                    Some(e) => a = e.end(),
                    None => return 1,
                }
            }
            n
        };
        let counts: Vec<usize> = chunks.iter().map(sges_of).collect();
        // Find the window [i, j) with sum(counts) >= excess + 1 and fewest bytes.
        let mut best: Option<(usize, usize, u64)> = None;
        for i in 0..chunks.len() {
            let (mut n, mut bytes) = (0usize, 0u64);
            for j in i..chunks.len() {
                n += counts[j];
                bytes += chunks[j].len() as u64;
                if bytes > limit {
                    break;
                }
                if n > excess {
                    if best.is_none_or(|b| bytes < b.2) {
                        best = Some((i, j + 1, bytes));
                    }
                    break;
                }
            }
        }
        let (i, j, bytes) = best.ok_or(err)?;
        let mut slot = self
            .pd
            .bounce_slot(bytes as usize)
            .ok_or(SgeError::NoBounceSlot { len: bytes })?;
        for c in &mut chunks[i..j] {
            slot.put_slice(c);
            *c = Bytes::new();
        }
        chunks[i] = slot.freeze();
        self.pd.stats().add(CopyReason::Coalesce, bytes);
        Ok(())
    }

    /// Emit the SGEs of one chunk; returns how many.
    fn map_chunk(
        &self,
        chunk: &mut Bytes,
        emit: &mut dyn FnMut(usize, Sge) -> Result<(), ()>,
    ) -> Result<usize, SgeError> {
        let len = chunk.len() as u64;
        if len == 0 {
            return Ok(0);
        }
        let addr = chunk.as_ptr() as u64;
        let cross = || SgeError::CrossesRegion { addr, len };
        {
            let snap = self.pd.registry().snapshot();
            if let Some(e) = snap.find(addr) {
                // Fast path: the whole chunk lies in one region.
                if addr + len <= e.end() {
                    if e.owner & crate::mem::CACHE_OWNER != 0 {
                        let e = *e;
                        drop(snap);
                        self.pd.pin_cached(chunk, e.owner);
                        return self.emit_in(&e, chunk, emit);
                    }
                    if len > u64::from(u32::MAX) {
                        return Err(SgeError::ChunkTooLong { len });
                    }
                    emit(
                        0,
                        Sge::new(self.pd.device_addr(e, addr), len as u32, e.lkey),
                    )
                    .map_err(|_| cross())?;
                    return Ok(1);
                }
                // The chunk spans regions: one SGE per region if all are registered.
                let mut pieces = 0;
                let mut a = addr;
                let end = addr + len;
                let mut all = true;
                while a < end {
                    match snap.find(a) {
                        Some(e) => a = e.end(),
                        None => {
                            all = false;
                            break;
                        }
                    }
                    pieces += 1;
                }
                if all {
                    let mut a = addr;
                    for k in 0..pieces {
                        let Some(e) = snap.find(a) else { break };
                        let piece_end = e.end().min(end);
                        if e.owner & crate::mem::CACHE_OWNER != 0 {
                            // Mixed cache/arena spans are rare: bounce them instead.
                            all = false;
                            break;
                        }
                        let plen = piece_end - a;
                        if plen > u64::from(u32::MAX) {
                            return Err(SgeError::ChunkTooLong { len: plen });
                        }
                        emit(k, Sge::new(self.pd.device_addr(e, a), plen as u32, e.lkey))
                            .map_err(|_| cross())?;
                        a = piece_end;
                    }
                    if all {
                        return Ok(pieces);
                    }
                    return Err(cross());
                }
            }
        }
        // Unregistered (at least partly): apply the policy to the whole chunk.
        match self.policy {
            UnregisteredPolicy::Reject => Err(SgeError::Unregistered { addr, len }),
            UnregisteredPolicy::Bounce => {
                let mut slot = self
                    .pd
                    .bounce_slot(chunk.len())
                    .ok_or(SgeError::NoBounceSlot { len })?;
                slot.put_slice(chunk);
                *chunk = slot.freeze();
                self.pd.stats().add(CopyReason::Bounce, len);
                let e = self.pd.registry().find(chunk.as_ptr() as u64).ok_or(
                    SgeError::Unregistered {
                        addr: chunk.as_ptr() as u64,
                        len,
                    },
                )?;
                self.emit_in(&e, chunk, emit)
            }
            UnregisteredPolicy::RegisterCached => {
                let e = self.pd.register_cached(chunk)?;
                self.emit_in(&e, chunk, emit)
            }
        }
    }

    fn emit_in(
        &self,
        e: &crate::mem::RegionEntry,
        chunk: &Bytes,
        emit: &mut dyn FnMut(usize, Sge) -> Result<(), ()>,
    ) -> Result<usize, SgeError> {
        let addr = chunk.as_ptr() as u64;
        let len = chunk.len() as u64;
        if len > u64::from(u32::MAX) {
            return Err(SgeError::ChunkTooLong { len });
        }
        emit(
            0,
            Sge::new(self.pd.device_addr(e, addr), len as u32, e.lkey),
        )
        .map_err(|_| SgeError::CrossesRegion { addr, len })?;
        Ok(1)
    }
}

/// One work request of a split one-sided operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RwSpan {
    /// Index of its first SGE in [`RwPlan::sges`].
    pub sge_start: u32,
    /// Number of SGEs.
    pub sge_count: u32,
    /// Remote address it targets.
    pub remote_addr: u64,
    /// Bytes it moves.
    pub len: u32,
}

/// A one-sided RDMA WRITE or READ split into work requests at `max_sge` and
/// `max_msg_sz`. Reusable: `build` clears it, so a steady state allocates nothing.
#[derive(Clone, Debug, Default)]
pub struct RwPlan {
    sges: Vec<Sge>,
    spans: Vec<RwSpan>,
    rkey: u32,
}

impl RwPlan {
    /// An empty plan.
    pub fn new() -> Self {
        Self::default()
    }

    /// Split `local` (the source of a WRITE or the destination of a READ)
    /// against `remote`, whose length must equal the local total. Returns the
    /// number of work requests.
    pub fn build(
        &mut self,
        local: &[Sge],
        remote: RemoteRegion,
        max_sge: u32,
        max_msg_sz: u32,
    ) -> Result<usize, SgeError> {
        self.sges.clear();
        self.spans.clear();
        self.rkey = remote.rkey;
        let total: u64 = local.iter().map(|s| u64::from(s.length())).sum();
        if total != remote.len || remote.addr.checked_add(remote.len).is_none() {
            return Err(SgeError::LengthMismatch {
                local: total,
                remote: remote.len,
            });
        }
        if max_sge == 0 || max_msg_sz == 0 {
            return Err(SgeError::TooManySges {
                need: local.len(),
                max: max_sge,
            });
        }
        let mut remote_addr = remote.addr;
        let mut cur = RwSpan {
            sge_start: 0,
            sge_count: 0,
            remote_addr,
            len: 0,
        };
        for s in local.iter().filter(|s| s.length() > 0) {
            let (mut addr, mut left) = (s.addr(), s.length());
            while left > 0 {
                if cur.sge_count == max_sge || cur.len == max_msg_sz {
                    self.spans.push(cur);
                    cur = RwSpan {
                        sge_start: self.sges.len() as u32,
                        sge_count: 0,
                        remote_addr,
                        len: 0,
                    };
                }
                let take = left.min(max_msg_sz - cur.len);
                self.sges.push(Sge::new(addr, take, s.lkey()));
                cur.sge_count += 1;
                cur.len += take;
                addr += u64::from(take);
                remote_addr += u64::from(take);
                left -= take;
            }
        }
        if cur.sge_count > 0 {
            self.spans.push(cur);
        }
        Ok(self.spans.len())
    }

    /// Number of work requests.
    pub fn wr_count(&self) -> usize {
        self.spans.len()
    }

    /// The split SGEs, in order.
    pub fn sges(&self) -> &[Sge] {
        &self.sges
    }

    /// The work requests' spans.
    pub fn spans(&self) -> &[RwSpan] {
        &self.spans
    }

    /// Work requests for `opcode` (RDMA_WRITE or RDMA_READ), appended to `out`.
    /// Only the last is signaled (selective signaling: RC completes in order);
    /// ids are `first_wr_id`, `first_wr_id + 1`, ...
    pub fn work_requests<'p>(
        &'p self,
        opcode: Opcode,
        first_wr_id: u64,
        out: &mut Vec<WorkRequest<'p>>,
    ) {
        let n = self.spans.len();
        for (i, sp) in self.spans.iter().enumerate() {
            let sg = &self.sges[sp.sge_start as usize..(sp.sge_start + sp.sge_count) as usize];
            let flags = if i + 1 == n {
                crate::verbs::SendFlags::SIGNALED
            } else {
                crate::verbs::SendFlags::NONE
            };
            out.push(
                WorkRequest::one_sided(
                    first_wr_id + i as u64,
                    opcode,
                    sg,
                    sp.remote_addr,
                    self.rkey,
                )
                .with_flags(flags),
            );
        }
    }
}
