//! Which registered region holds an address range?
//!
//! Lookups take no lock: the region table is an immutable sorted vector
//! behind an `ArcSwap`, replaced whole (copy on write) by the rare register
//! and deregister calls, which serialize on a mutex among themselves only.
//! A lookup is one atomic load plus a binary search: O(log n) in the number
//! of regions.

use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, Guard};

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
}

impl RegionEntry {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.base + self.len
    }
}

/// The immutable table behind a snapshot: region starts in their own dense
/// array (the binary search touches only them), entries beside it.
#[derive(Default)]
struct Table {
    bases: Vec<u64>,
    entries: Vec<RegionEntry>,
}

impl Table {
    fn from_entries(entries: Vec<RegionEntry>) -> Table {
        Table {
            bases: entries.iter().map(|e| e.base).collect(),
            entries,
        }
    }
}

/// A snapshot of the region table for a batch of lookups.
pub struct Snapshot(Guard<Arc<Table>>);

impl Snapshot {
    /// The region containing `addr`, if any: a branchless binary search over
    /// the region starts.
    #[inline]
    pub fn find(&self, addr: u64) -> Option<&RegionEntry> {
        let bases = &self.0.bases;
        let mut size = bases.len();
        if size == 0 {
            return None;
        }
        let mut lo = 0usize;
        while size > 1 {
            let half = size / 2;
            let mid = lo + half;
            // Compiles to a conditional move: no branch to mispredict.
            lo = if bases[mid] <= addr { mid } else { lo };
            size -= half;
        }
        let e = &self.0.entries[lo];
        (e.base <= addr && addr < e.end()).then_some(e)
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

/// The address-to-region table of one protection domain.
#[derive(Default)]
pub struct Registry {
    table: ArcSwap<Table>,
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
        self.table.store(Arc::new(Table::from_entries(next)));
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
        self.table.store(Arc::new(Table::from_entries(next)));
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

    fn e(base: u64, len: u64, lkey: u32) -> RegionEntry {
        RegionEntry {
            base,
            len,
            lkey,
            rkey: 0,
            iova: base,
            owner: lkey as u64,
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
}
