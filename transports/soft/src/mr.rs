//! The device's region table: keys to registered memory.
//!
//! The table is immutable; register and deregister (rare: arenas register
//! once) build a new one and publish it through an `ArcSwap`. A lookup on
//! the data path is one probe, usually, of an open-addressed index that
//! holds each registration's translation inline (key, rights, bounds, CPU
//! address: no pointer to chase), and the snapshot keeps every region it names
//! (and so its memory, an `Arc<dyn RegionMemory>`) alive while the device
//! copies. That the device no longer *touches* a region once `deregister`
//! returns is the job of the quiescence protocol in `device.rs`.
//!
//! Keys: each registration gets an even local key and the odd remote key
//! after it (`rkey = lkey + 1`), so an lkey used as an rkey, or the reverse,
//! fails. Keys come from a per-device counter that visits every even 32-bit
//! value except 0 once before it is exhausted (2^31 - 1 registrations per
//! device), so a key is never reused while the device lives: a stale key can
//! only fail. Each device starts its counter at a different point, so a key
//! of one device (protection domain) is unlikely to name a region of another.

use std::sync::Arc;

use zcmsg::{Access, RegionMemory};

/// One registration.
pub(crate) struct Mr {
    pub(crate) lkey: u32,
    /// Keeps the memory alive (and in place) while the registration, or a
    /// table snapshot naming it, exists.
    _mem: Arc<dyn RegionMemory>,
    /// Offset of the first registered byte in `mem`.
    offset: usize,
    /// `mem`'s start as an exposed address, taken once at registration
    /// (the memory does not move while `mem` is held), so a translation is
    /// arithmetic, not a virtual call.
    base: usize,
    /// Device (= CPU) address of the first registered byte.
    pub(crate) addr: u64,
    pub(crate) len: u64,
    pub(crate) access: Access,
}

impl Mr {
    pub(crate) fn new(
        lkey: u32,
        mem: Arc<dyn RegionMemory>,
        offset: usize,
        len: usize,
        access: Access,
    ) -> Mr {
        let addr = (mem.as_ptr() as u64).wrapping_add(offset as u64);
        let base = mem.as_ptr().expose_provenance();
        Mr {
            lkey,
            _mem: mem,
            offset,
            base,
            addr,
            len: len as u64,
            access,
        }
    }

    pub(crate) fn rkey(&self) -> u32 {
        self.lkey | 1
    }
}

/// Which key of a registration a request names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyKind {
    /// An SGE's `lkey`.
    Local,
    /// A one-sided request's `rkey`.
    Remote,
}

/// One registration's translation, inline in the table's index.
#[derive(Clone, Copy, Default)]
struct Entry {
    /// 0: an empty entry (0 is never a key).
    lkey: u32,
    access: Access,
    /// Device address of the first registered byte, and the length.
    addr: u64,
    len: u64,
    /// CPU address of the first registered byte (`base + offset`).
    cpu: usize,
}

/// One registration's translation, copied out of a table: a run of
/// requests naming the same key looks it up once and checks each range
/// against the copy (valid while the table it came from is held).
#[derive(Clone, Copy)]
pub(crate) struct Xlat<'t>(&'t Entry);

/// What [`Xlat::default`] holds: no key, no bytes, no rights.
static NO_ENTRY: Entry = Entry {
    lkey: 0,
    access: Access::LOCAL_READ,
    addr: 0,
    len: 0,
    cpu: 0,
};

impl Default for Xlat<'_> {
    fn default() -> Self {
        Xlat(&NO_ENTRY)
    }
}

impl Xlat<'_> {
    /// The key it translates (0 for the default, which names nothing).
    #[inline(always)]
    pub(crate) fn lkey(&self) -> u32 {
        self.0.lkey
    }

    /// The CPU address of `[addr, addr + len)` if the registration grants
    /// `need` and the range lies inside it (checked arithmetic).
    #[inline(always)]
    pub(crate) fn range(&self, need: Access, addr: u64, len: u64) -> Option<usize> {
        let e = self.0;
        if !e.access.contains(need) {
            return None;
        }
        let off = addr.checked_sub(e.addr)?;
        let end = off.checked_add(len)?;
        if end > e.len {
            return None;
        }
        // `offset + off` stays inside the memory (checked at registration
        // that `offset + len <= mem.len()`), so the sum does not wrap.
        Some(e.cpu.wrapping_add(usize::try_from(off).ok()?))
    }
}

/// An immutable snapshot of the registrations, with an open-addressed
/// index by key (at most half full, so a lookup of a key that is not there
/// ends at an empty entry soon).
#[derive(Default)]
pub(crate) struct MrTable {
    /// Keeps each registration (and its memory) alive; in no order.
    mrs: Vec<Arc<Mr>>,
    index: Box<[Entry]>,
}

/// The index position a key's probe starts at (a multiplicative hash: keys
/// are consecutive even numbers).
#[inline]
fn home(lkey: u32, mask: usize) -> usize {
    (lkey.wrapping_mul(0x9E37_79B1).rotate_right(16) as usize) & mask
}

impl MrTable {
    fn new(mrs: Vec<Arc<Mr>>) -> MrTable {
        let cap = if mrs.is_empty() {
            0
        } else {
            (2 * mrs.len()).next_power_of_two()
        };
        let mut index = vec![Entry::default(); cap].into_boxed_slice();
        let mask = cap.wrapping_sub(1);
        for mr in &mrs {
            let mut h = home(mr.lkey, mask);
            while index[h].lkey != 0 {
                h = (h + 1) & mask;
            }
            index[h] = Entry {
                lkey: mr.lkey,
                access: mr.access,
                addr: mr.addr,
                len: mr.len,
                cpu: mr.base.wrapping_add(mr.offset),
            };
        }
        MrTable { mrs, index }
    }

    #[inline(always)]
    fn find(&self, lkey: u32) -> Option<&Entry> {
        let mask = self.index.len().checked_sub(1)?;
        let mut h = home(lkey, mask);
        loop {
            let e = &self.index[h];
            if e.lkey == 0 {
                return None;
            }
            if e.lkey == lkey {
                return Some(e);
            }
            h = (h + 1) & mask;
        }
    }

    /// The translation of local key `lkey` (an even key), to check ranges
    /// against with [`Xlat::range`] as often as needed.
    #[inline(always)]
    pub(crate) fn local(&self, lkey: u32) -> Option<Xlat<'_>> {
        if lkey & 1 == 1 {
            return None;
        }
        self.find(lkey).map(Xlat)
    }

    /// Number of registrations.
    pub(crate) fn len(&self) -> usize {
        self.mrs.len()
    }

    /// Translate `[addr, addr + len)` named by `key` into a CPU address, if
    /// the key is live and of the right kind, the registration grants
    /// `need`, and the range lies inside it (checked arithmetic throughout).
    /// `len` must be positive; zero-length SGEs are never translated.
    #[inline(always)]
    pub(crate) fn translate(
        &self,
        key: u32,
        kind: KeyKind,
        need: Access,
        addr: u64,
        len: u64,
    ) -> Option<usize> {
        let is_remote = key & 1 == 1;
        if is_remote != (kind == KeyKind::Remote) {
            return None;
        }
        Xlat(self.find(key & !1)?).range(need, addr, len)
    }

    /// A table with `mr` added.
    pub(crate) fn with(&self, mr: Mr) -> MrTable {
        let mut mrs = Vec::with_capacity(self.mrs.len() + 1);
        mrs.extend_from_slice(&self.mrs);
        mrs.push(Arc::new(mr));
        MrTable::new(mrs)
    }

    /// A table without the registration of `lkey`, and that registration.
    pub(crate) fn without(&self, lkey: u32) -> Option<(MrTable, Arc<Mr>)> {
        let i = self.mrs.iter().position(|m| m.lkey == lkey)?;
        let mut mrs = self.mrs.clone();
        let mr = mrs.remove(i);
        Some((MrTable::new(mrs), mr))
    }
}

/// Hands out local keys: every even value but 0, once each.
pub(crate) struct KeyAlloc {
    next: u32,
    left: u32,
}

impl KeyAlloc {
    /// A counter starting at a point derived from the device id.
    pub(crate) fn new(device_id: u64) -> KeyAlloc {
        let start = ((device_id as u32).wrapping_mul(0x9E37_79B9).rotate_left(16)) & !1;
        KeyAlloc {
            next: start.max(2),
            left: (1u32 << 31) - 1,
        }
    }

    /// The next local key, or `None` when all were used.
    pub(crate) fn next(&mut self) -> Option<u32> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let key = self.next;
        self.next = self.next.wrapping_add(2);
        if self.next == 0 {
            self.next = 2;
        }
        Some(key)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Plain heap memory to register in unit tests.
    pub(crate) struct Buf(pub(crate) Box<[u8]>);
    // SAFETY: a boxed slice never moves or shrinks while the `Buf` lives.
    unsafe impl RegionMemory for Buf {
        fn as_ptr(&self) -> *mut u8 {
            self.0.as_ptr() as *mut u8
        }
        fn len(&self) -> usize {
            self.0.len()
        }
    }

    #[test]
    fn keys_are_even_nonzero_distinct_and_wrap_without_repeating() {
        let mut k = KeyAlloc::new(7);
        let mut seen = HashSet::new();
        for _ in 0..10_000 {
            let key = k.next().unwrap();
            assert!(key != 0 && key % 2 == 0);
            assert!(seen.insert(key));
        }
        // Near the top of the key space the counter wraps to 2, skipping 0.
        let mut k = KeyAlloc {
            next: u32::MAX - 3,
            left: 5,
        };
        let keys: Vec<u32> = std::iter::from_fn(|| k.next()).collect();
        assert_eq!(keys, vec![u32::MAX - 3, u32::MAX - 1, 2, 4, 6]);
        assert_eq!(k.next(), None, "exhausted counters refuse");
        // Two devices start far apart.
        assert_ne!(KeyAlloc::new(1).next, KeyAlloc::new(2).next);
    }

    #[test]
    fn the_index_finds_every_live_key_and_no_other() {
        let mem: Arc<dyn RegionMemory> = Arc::new(Buf(vec![0u8; 4096].into_boxed_slice()));
        let base = mem.as_ptr() as usize;
        let mut alloc = KeyAlloc::new(3);
        let mut t = MrTable::default();
        assert_eq!(
            t.translate(2, KeyKind::Local, Access::LOCAL_READ, 0, 1),
            None
        );
        let mut keys = Vec::new();
        // Region k covers byte k of `mem`: a lookup that found the wrong
        // entry would translate to the wrong byte.
        for k in 0..300usize {
            let key = alloc.next().unwrap();
            t = t.with(Mr::new(key, mem.clone(), k, 1, Access::LOCAL_WRITE));
            keys.push(key);
        }
        let addr = |k: usize| mem.as_ptr() as u64 + k as u64;
        for (k, &key) in keys.iter().enumerate() {
            let got = t.translate(key, KeyKind::Local, Access::LOCAL_WRITE, addr(k), 1);
            assert_eq!(got, Some(base + k), "key {key}");
            assert_eq!(
                t.translate(key, KeyKind::Local, Access::LOCAL_WRITE, addr(k + 1), 1),
                None
            );
        }
        // Every other one removed: those fail, the rest still translate.
        for &key in keys.iter().step_by(2) {
            t = t.without(key).unwrap().0;
        }
        for (k, &key) in keys.iter().enumerate() {
            let got = t.translate(key, KeyKind::Local, Access::LOCAL_READ, addr(k), 1);
            assert_eq!(got, (k % 2 == 1).then_some(base + k), "key {key}");
        }
        assert_eq!(t.len(), 150);
        // Keys never handed out, and 0, find nothing.
        for key in [0, alloc.next().unwrap(), keys[0] + 600 * 2] {
            assert_eq!(
                t.translate(key, KeyKind::Local, Access::LOCAL_READ, addr(0), 1),
                None
            );
        }
    }

    #[test]
    fn translate_checks_kind_access_and_bounds_with_overflow() {
        let mem: Arc<dyn RegionMemory> = Arc::new(Buf(vec![0u8; 100].into_boxed_slice()));
        let base = mem.as_ptr() as u64;
        let t = MrTable::default().with(Mr::new(
            10,
            mem.clone(),
            20,
            50,
            Access::LOCAL_WRITE | Access::REMOTE_READ,
        ));
        let a = base + 20;
        let ok = t.translate(10, KeyKind::Local, Access::LOCAL_WRITE, a, 50);
        assert_eq!(ok, Some(mem.as_ptr().wrapping_add(20) as usize));
        assert_eq!(
            t.translate(10, KeyKind::Local, Access::LOCAL_READ, a + 49, 1),
            Some(mem.as_ptr().wrapping_add(69) as usize)
        );
        // Out of bounds on either side, or wrapping around.
        assert_eq!(
            t.translate(10, KeyKind::Local, Access::LOCAL_READ, a - 1, 1),
            None
        );
        assert_eq!(
            t.translate(10, KeyKind::Local, Access::LOCAL_READ, a + 1, 50),
            None
        );
        assert_eq!(
            t.translate(10, KeyKind::Local, Access::LOCAL_READ, a, u64::MAX),
            None
        );
        assert_eq!(
            t.translate(10, KeyKind::Local, Access::LOCAL_READ, u64::MAX, 2),
            None
        );
        // The rkey only works remotely and only for the rights granted.
        assert_eq!(
            t.translate(11, KeyKind::Local, Access::LOCAL_READ, a, 1),
            None
        );
        assert_eq!(
            t.translate(10, KeyKind::Remote, Access::REMOTE_READ, a, 1),
            None
        );
        assert!(t
            .translate(11, KeyKind::Remote, Access::REMOTE_READ, a, 1)
            .is_some());
        assert_eq!(
            t.translate(11, KeyKind::Remote, Access::REMOTE_WRITE, a, 1),
            None
        );
        // Unknown keys and removed keys fail.
        assert_eq!(
            t.translate(12, KeyKind::Local, Access::LOCAL_READ, a, 1),
            None
        );
        let (t2, mr) = t.without(10).unwrap();
        assert_eq!(mr.rkey(), 11);
        assert_eq!(t2.len(), 0);
        assert_eq!(
            t2.translate(10, KeyKind::Local, Access::LOCAL_READ, a, 1),
            None
        );
    }
}
