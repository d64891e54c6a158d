//! Which registered region holds an address range?
//!
//! Lookups take no lock: the region table is an immutable sorted vector
//! behind an `ArcSwap`, replaced whole (copy on write) by the rare register
//! and deregister calls, which serialize on a mutex among themselves only.
//! A batch of lookups costs one atomic load (the snapshot). Each lookup of
//! the builders' fast path then tries the hint of the address's page: one
//! load and one 32-byte record, checked, so the cost does not grow with the
//! number of regions. A missed hint costs a branchless binary search over
//! the dense array of region starts (O(log n)), which updates the hint.
//! (Measured against a branch-free linear count over the starts: slower
//! at 1 and 16 regions on baseline x86-64, which has no 64-bit SIMD compare.)

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Guard};

use crate::verbs::Access;

use crate::error::MemError;

/// One registered region as the builders see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionEntry {
    /// CPU address of the first byte.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
    /// Local key.
    pub lkey: u32,
    /// Remote key.
    pub rkey: u32,
    /// Device address of the first byte.
    pub iova: u64,
    /// Who registered it (an arena id or a cache entry id).
    pub owner: u64,
    /// The access rights it was registered with.
    pub access: Access,
}

impl RegionEntry {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.base + self.len
    }
}

/// Slots in a table's hint array (a power of two): 16 KiB of `AtomicU32`.
const HINTS: usize = 4096;

/// What the SGE builders read of one region on their hot path, in one
/// 32-byte record (two per cache line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(32))]
pub(crate) struct Hot {
    /// CPU address of the first byte.
    pub(crate) start: u64,
    /// One past the last byte the fast path may use: the region's end, or 0
    /// (nothing fits) for the sentinel and for registration-cache entries,
    /// which must go through the cache's pinning.
    pub(crate) fast_end: u64,
    /// `iova - base` (wrapping): add it to a CPU address for the device address.
    pub(crate) delta: u64,
    /// Local key.
    pub(crate) lkey: u32,
}

impl Hot {
    /// The record of no region: nothing fits it.
    const NONE: Hot = Hot {
        start: u64::MAX,
        fast_end: 0,
        delta: 0,
        lkey: 0,
    };

    /// True if `[addr, end)` lies in this record's fast range.
    #[inline(always)]
    pub(crate) fn fits(&self, addr: u64, end: u64) -> bool {
        (self.start <= addr) & (end <= self.fast_end)
    }
}

/// The immutable table behind a snapshot, struct-of-arrays: region starts in
/// their own dense array (the search touches only them), the hot records
/// beside it (the hit path touches one of them), the full entries for the
/// rare paths.
struct Table {
    /// Sorted region starts.
    starts: Box<[u64]>,
    /// `hot[0]` is [`Hot::NONE`]; `hot[i + 1]` is region `i`.
    hot: Box<[Hot]>,
    /// Region `i`, sorted by base.
    entries: Vec<RegionEntry>,
    /// Per 4 KiB page (hashed): the `hot` index of the region that held an
    /// address of that page at the last miss. Only a hint: every use is
    /// checked against the record, so a stale or colliding hint costs a
    /// search, never a wrong answer. Written only on a miss.
    hints: Box<[AtomicU32; HINTS]>,
}

impl Default for Table {
    fn default() -> Self {
        Table::from_entries(Vec::new())
    }
}

impl Table {
    /// The hot-path view: plain slices, copied into registers by the
    /// caller's loop.
    #[inline(always)]
    fn lookup(&self) -> Lookup<'_> {
        Lookup {
            hints: &self.hints,
            hot: &self.hot,
            starts: &self.starts,
        }
    }

    fn from_entries(entries: Vec<RegionEntry>) -> Table {
        debug_assert!(entries.windows(2).all(|w| w[0].end() <= w[1].base));
        let starts: Vec<u64> = entries.iter().map(|e| e.base).collect();
        let hot = std::iter::once(Hot::NONE)
            .chain(entries.iter().map(|e| Hot {
                start: e.base,
                fast_end: if e.owner & super::CACHE_OWNER == 0 {
                    e.end()
                } else {
                    0
                },
                delta: e.iova.wrapping_sub(e.base),
                lkey: e.lkey,
            }))
            .collect();
        Table {
            starts: starts.into_boxed_slice(),
            hot,
            entries,
            hints: Box::new([const { AtomicU32::new(0) }; HINTS]),
        }
    }

    /// How many regions start at or below `addr` (0 ..= n): region
    /// `rank - 1` is the only one that can hold `addr`.
    #[inline(always)]
    fn rank(&self, addr: u64) -> usize {
        rank_binary(&self.starts, addr)
    }
}

/// The hint slot of the page of `addr`: the page number folded onto itself
/// (neighbouring pages get neighbouring slots; no multiply on the path).
#[inline(always)]
pub(crate) fn hint_slot(addr: u64) -> usize {
    let page = addr >> 12;
    ((page ^ (page >> HINTS.trailing_zeros())) as usize) & (HINTS - 1)
}

/// Number of `starts` (sorted) at or below `addr`, by a binary search whose
/// steps are arithmetic (no branch to mispredict).
#[inline(always)]
pub(crate) fn rank_binary(starts: &[u64], addr: u64) -> usize {
    let mut size = starts.len();
    if size == 0 {
        return 0;
    }
    let mut lo = 0usize;
    while size > 1 {
        let half = size / 2;
        // `lo + half < starts.len()` always: the check is never taken.
        let le = starts[lo + half] <= addr;
        lo += usize::from(le) * half;
        size -= half;
    }
    lo + usize::from(starts[lo] <= addr)
}

/// The hot-path view of a [`Snapshot`]: the hint array, the hot records
/// and the region starts.
#[derive(Clone, Copy)]
pub(crate) struct Lookup<'a> {
    hints: &'a [AtomicU32; HINTS],
    hot: &'a [Hot],
    starts: &'a [u64],
}

impl<'a> Lookup<'a> {
    /// The record the hint of `addr`'s page names: one load and one 32-byte
    /// record, the same cost with 1 or 1024 regions. Only a guess: the
    /// caller checks it with [`Hot::fits`] and calls [`Lookup::search`] if
    /// it does not fit.
    #[inline(always)]
    pub(crate) fn hinted(self, addr: u64) -> &'a Hot {
        let i = self.hints[hint_slot(addr)].load(Ordering::Relaxed) as usize;
        debug_assert!(i < self.hot.len());
        // SAFETY: a table's hints start at 0 and are only ever set (in
        // `search`) to a rank over this same table's starts, at most
        // `starts.len()`, and `hot.len() == starts.len() + 1` (the sentinel
        // plus one record per region; `Table::from_entries`): `i` is in bounds.
        unsafe { self.hot.get_unchecked(i) }
    }

    /// The record of the only region that can hold `addr` ([`Hot::NONE`] if
    /// none starts at or below it), by the binary search over the dense
    /// starts; points the page's hint at it.
    #[cold]
    #[inline(never)]
    pub(crate) fn search(self, addr: u64) -> &'a Hot {
        let r = rank_binary(self.starts, addr);
        // `r <= n < 2^32` (a table of 2^32 regions cannot be built).
        self.hints[hint_slot(addr)].store(r as u32, Ordering::Relaxed);
        &self.hot[r]
    }
}

/// A snapshot of the region table for a batch of lookups.
pub struct Snapshot(Guard<Arc<Table>>);

impl Snapshot {
    /// The region containing `addr`, if any.
    #[inline]
    pub fn find(&self, addr: u64) -> Option<&RegionEntry> {
        let t = &*self.0;
        let r = t.rank(addr);
        let e = t.entries.get(r.wrapping_sub(1))?;
        (addr < e.end()).then_some(e)
    }

    /// The hot-path view of this snapshot (the tests' way in; the builders
    /// keep a [`CachedTable`]).
    #[cfg(test)]
    pub(crate) fn lookup(&self) -> Lookup<'_> {
        self.0.lookup()
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.0.entries.len()
    }

    /// True if no region is registered.
    pub fn is_empty(&self) -> bool {
        self.0.entries.is_empty()
    }
}

/// A table kept by a builder across lists, with the registry generation it
/// was current at: reusing it costs one load of the generation instead of a
/// snapshot per list. It may keep an old table (plain records, no memory or
/// registration) alive until the next [`Registry::refresh`].
pub(crate) struct CachedTable {
    generation: u64,
    table: Arc<Table>,
}

impl CachedTable {
    /// The hot-path view of the cached table.
    #[inline(always)]
    pub(crate) fn lookup(&self) -> Lookup<'_> {
        self.table.lookup()
    }
}

/// The address-to-region table of one protection domain.
#[derive(Default)]
pub struct Registry {
    table: ArcSwap<Table>,
    /// Bumped after every table change (Release), so a cached table is
    /// known current when the generation it was read at is still current.
    generation: AtomicU64,
    writers: Mutex<()>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("regions", &self.table.load().entries.len())
            .finish()
    }
}

impl Registry {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// A lock-free snapshot for lookups.
    #[inline]
    pub fn snapshot(&self) -> Snapshot {
        Snapshot(self.table.load())
    }

    /// The current table, to keep across lookups.
    pub(crate) fn cached(&self) -> CachedTable {
        // The generation first: a table read after it is at least as new,
        // so a change in between only causes one extra reload later.
        let generation = self.generation.load(Ordering::Acquire);
        CachedTable {
            generation,
            table: self.table.load_full(),
        }
    }

    /// Replace the table (writers hold `writers`), then bump the generation
    /// so kept tables reload.
    fn publish(&self, entries: Vec<RegionEntry>) {
        self.table.store(Arc::new(Table::from_entries(entries)));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Bring `c` up to date: one load when nothing changed since it was read.
    #[inline]
    pub(crate) fn refresh(&self, c: &mut CachedTable) {
        let g = self.generation.load(Ordering::Acquire);
        if g != c.generation {
            *c = self.cached();
        }
    }

    /// The region containing `addr`, if any (one snapshot per call).
    pub fn find(&self, addr: u64) -> Option<RegionEntry> {
        self.snapshot().find(addr).copied()
    }

    /// Add a region; regions never overlap.
    pub fn insert(&self, e: RegionEntry) -> Result<(), MemError> {
        let _w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.table.load_full();
        let cur = &cur.entries;
        let i = cur.partition_point(|x| x.base < e.base);
        let overlaps_prev = i > 0 && cur[i - 1].end() > e.base;
        let overlaps_next = cur.get(i).is_some_and(|n| n.base < e.end());
        if overlaps_prev || overlaps_next || e.len == 0 {
            return Err(MemError::Overlap {
                addr: e.base,
                len: e.len,
            });
        }
        let mut next = Vec::with_capacity(cur.len() + 1);
        next.extend_from_slice(&cur[..i]);
        next.push(e);
        next.extend_from_slice(&cur[i..]);
        self.publish(next);
        Ok(())
    }

    /// Remove the region owned by `owner` that starts at `base`; returns it.
    pub fn remove(&self, base: u64, owner: u64) -> Option<RegionEntry> {
        let _w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.table.load_full();
        let i = cur
            .entries
            .iter()
            .position(|x| x.base == base && x.owner == owner)?;
        let mut next = cur.entries.clone();
        let e = next.remove(i);
        self.publish(next);
        Some(e)
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.table.load().entries.len()
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::CACHE_OWNER;

    fn e(base: u64, len: u64, lkey: u32) -> RegionEntry {
        RegionEntry {
            base,
            len,
            lkey,
            rkey: 0,
            iova: base,
            owner: lkey as u64,
            access: Access::LOCAL_WRITE,
        }
    }

    #[test]
    fn finds_containing_region_and_refuses_overlap() {
        let r = Registry::new();
        r.insert(e(1000, 100, 1)).unwrap();
        r.insert(e(1100, 50, 2)).unwrap();
        r.insert(e(5000, 10, 3)).unwrap();
        assert!(matches!(
            r.insert(e(1050, 10, 4)),
            Err(MemError::Overlap { .. })
        ));
        assert!(matches!(
            r.insert(e(990, 11, 4)),
            Err(MemError::Overlap { .. })
        ));
        assert_eq!(r.find(999), None);
        assert_eq!(r.find(1000).unwrap().lkey, 1);
        assert_eq!(r.find(1099).unwrap().lkey, 1);
        assert_eq!(r.find(1100).unwrap().lkey, 2);
        assert_eq!(r.find(1150), None);
        assert_eq!(r.find(5009).unwrap().lkey, 3);
        assert_eq!(r.remove(1100, 2).unwrap().lkey, 2);
        assert_eq!(r.find(1100), None);
        assert_eq!(r.remove(1100, 2), None);
    }

    #[test]
    fn a_kept_table_follows_every_insert_and_remove() {
        let r = Registry::new();
        r.insert(e(1 << 20, 4096, 1)).unwrap();
        let mut kept = r.cached();
        let g = kept.generation;
        r.refresh(&mut kept);
        assert_eq!(kept.generation, g, "no change, no reload");
        assert_eq!(fast(kept.lookup(), 1 << 21, 8), None);
        r.insert(e(1 << 21, 4096, 2)).unwrap();
        assert_eq!(fast(kept.lookup(), 1 << 21, 8), None, "not refreshed yet");
        r.refresh(&mut kept);
        assert_eq!(fast(kept.lookup(), 1 << 21, 8).map(|h| h.lkey), Some(2));
        assert_eq!(fast(kept.lookup(), 1 << 20, 8).map(|h| h.lkey), Some(1));
        r.remove(1 << 20, 1).unwrap();
        r.refresh(&mut kept);
        assert_eq!(
            fast(kept.lookup(), 1 << 20, 8),
            None,
            "a removed region stays found"
        );
        assert_eq!(fast(kept.lookup(), 1 << 21, 8).map(|h| h.lkey), Some(2));
    }

    /// What the builders' fast path must answer, by a plain scan: the
    /// region holding all of `[addr, addr + len)`, unless it is a
    /// registration-cache entry.
    fn expected(regions: &[RegionEntry], addr: u64, len: u64) -> Option<RegionEntry> {
        regions
            .iter()
            .find(|e| e.base <= addr && addr < e.end())
            .filter(|e| addr + len <= e.end() && e.owner & CACHE_OWNER == 0)
            .copied()
    }

    /// The builders' lookup: the hint, then the search if it does not fit.
    fn fast(look: Lookup<'_>, addr: u64, len: u64) -> Option<Hot> {
        let mut h = look.hinted(addr);
        if !h.fits(addr, addr + len) {
            h = look.search(addr);
        }
        h.fits(addr, addr + len).then_some(*h)
    }

    fn check(look: Lookup<'_>, regions: &[RegionEntry], addr: u64, len: u64) {
        let got = fast(look, addr, len);
        match expected(regions, addr, len) {
            None => assert_eq!(got, None, "addr {addr:#x} len {len}"),
            Some(e) => {
                let h = got.unwrap_or_else(|| panic!("addr {addr:#x} len {len}: no region"));
                assert_eq!((h.start, h.fast_end, h.lkey), (e.base, e.end(), e.lkey));
                assert_eq!(addr.wrapping_add(h.delta), e.iova + (addr - e.base));
            }
        }
    }

    /// Regions from (gap, len, cached) triples: gaps of 0 make neighbours
    /// adjacent; a registration-cache owner for every `cached`.
    fn build(spec: &[(u64, u64, bool)], first: u64) -> Vec<RegionEntry> {
        let mut at = first;
        spec.iter()
            .enumerate()
            .map(|(i, &(gap, len, cached))| {
                at += gap;
                let r = RegionEntry {
                    base: at,
                    len,
                    lkey: i as u32 + 1,
                    rkey: 0,
                    iova: 0x7e00_0000_0000_0000 + (i as u64) * 0x1_0000_0000,
                    owner: if cached {
                        CACHE_OWNER | i as u64
                    } else {
                        i as u64
                    },
                    access: Access::LOCAL_WRITE,
                };
                at += len;
                r
            })
            .collect()
    }

    #[test]
    fn sentinel_padding_and_cache_entries_never_fit() {
        let r = Registry::new();
        let look = r.snapshot();
        assert_eq!(fast(look.lookup(), 4096, 1), None);
        r.insert(e(0x10000, 0x1000, 1)).unwrap();
        r.insert(RegionEntry {
            owner: CACHE_OWNER | 7,
            ..e(0x20000, 0x1000, 2)
        })
        .unwrap();
        let snap = r.snapshot();
        let look = snap.lookup();
        assert_eq!(fast(look, 0x10000, 0x1000).map(|h| h.lkey), Some(1));
        assert_eq!(fast(look, 0x10000, 0x1001), None);
        assert_eq!(fast(look, 0xffff, 1), None);
        // A cache entry is found by `find` but never by the fast path.
        assert_eq!(snap.find(0x20000).map(|e| e.lkey), Some(2));
        assert_eq!(fast(look, 0x20000, 1), None);
    }

    #[test]
    fn a_colliding_hint_costs_a_search_not_a_wrong_answer() {
        // Pages 2^24 apart share a hint slot.
        let (a, b) = (0x10_0000u64, 0x10_0000u64 + (1 << 36));
        assert_eq!(hint_slot(a), hint_slot(b));
        let regions = vec![e(a, 0x1000, 1), e(b, 0x1000, 2)];
        let r = Registry::new();
        for x in &regions {
            r.insert(*x).unwrap();
        }
        let snap = r.snapshot();
        for _ in 0..3 {
            for addr in [a, b, a + 0xfff, b + 0x800, a + 0x1000, b - 1] {
                check(snap.lookup(), &regions, addr, 1);
            }
        }
        // A hint left by an older table means nothing to a new one.
        r.insert(e(a + 0x1000, 0x1000, 3)).unwrap();
        let regions = vec![regions[0], e(a + 0x1000, 0x1000, 3), regions[1]];
        check(r.snapshot().lookup(), &regions, a + 0x1000, 0x1000);
        check(r.snapshot().lookup(), &regions, a + 0xfff, 2);
    }

    proptest::proptest! {
        #[test]
        fn rank_binary_counts_starts_at_or_below(
            mut starts in proptest::collection::vec(proptest::num::u64::ANY, 0..1100),
            probes in proptest::collection::vec(proptest::num::u64::ANY, 0..32),
        ) {
            starts.sort_unstable();
            starts.dedup();
            let edges = starts.iter().flat_map(|&s| [s.wrapping_sub(1), s, s.wrapping_add(1)]);
            for p in probes.into_iter().chain(edges).chain([0, u64::MAX]) {
                proptest::prop_assert_eq!(rank_binary(&starts, p), starts.partition_point(|&s| s <= p));
            }
        }

        /// The hinted lookup (cold, warm, and after other pages moved the
        /// hints) agrees with a scan on random region sets: gaps, adjacent
        /// regions, cache entries, every boundary.
        #[test]
        fn hinted_lookup_agrees_with_a_scan(
            spec in proptest::collection::vec((0u64..3 * 4096, 1u64..5 * 4096, proptest::bool::weighted(0.2)), 0..40),
            first in 4096u64..(1 << 40),
            probes in proptest::collection::vec((0u64..(1 << 20), 1u64..8192), 0..64),
        ) {
            let regions = build(&spec, first);
            let r = Registry::new();
            for x in &regions {
                r.insert(*x).unwrap();
            }
            let snap = r.snapshot();
            let mut cases: Vec<(u64, u64)> = probes.iter().map(|&(off, len)| (first + off, len)).collect();
            for x in &regions {
                for (addr, len) in [
                    (x.base, x.len), (x.base, x.len + 1), (x.base - 1, 1), (x.base - 1, 2),
                    (x.end() - 1, 1), (x.end() - 1, 2), (x.end(), 1), (x.base + x.len / 2, 1),
                ] {
                    cases.push((addr, len));
                }
            }
            for _ in 0..2 {
                for &(addr, len) in cases.iter().chain(cases.iter().rev()) {
                    check(snap.lookup(), &regions, addr, len);
                }
            }
            for &(addr, len) in &cases {
                let want = expected(&regions, addr, len);
                let found = snap.find(addr);
                proptest::prop_assert_eq!(
                    found.filter(|e| addr + len <= e.end() && e.owner & CACHE_OWNER == 0).copied(),
                    want
                );
                proptest::prop_assert_eq!(
                    found.copied(),
                    regions.iter().find(|e| e.base <= addr && addr < e.end()).copied()
                );
            }
        }
    }
}
