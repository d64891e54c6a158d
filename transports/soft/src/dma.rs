//! The device's data movement ("DMA"): the only `unsafe` code of the crate.
//!
//! Addresses arrive here already translated: [`crate::mr::MrTable::translate`]
//! turned an SGE (`addr`, `length`, key) into a [`Seg`] inside a live
//! registration, after checking the key, the access rights and the bounds
//! with checked arithmetic. Segments carry plain addresses (`usize`, with
//! exposed provenance) so that the scratch lists holding them stay `Send`;
//! they never outlive the post or poll call that translated them.

use std::sync::atomic::{AtomicU64, Ordering};

/// A translated range of memory: `len` bytes at `addr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Seg {
    pub(crate) addr: usize,
    pub(crate) len: usize,
}

impl Seg {
    /// The segment of a byte slice the device owns (a staged inline payload,
    /// an atomic's result on the stack).
    pub(crate) fn of(bytes: &[u8]) -> Seg {
        Seg {
            addr: bytes.as_ptr().expose_provenance(),
            len: bytes.len(),
        }
    }

    /// The segment of a writable byte slice the device owns.
    pub(crate) fn of_mut(bytes: &mut [u8]) -> Seg {
        Seg {
            addr: bytes.as_mut_ptr().expose_provenance(),
            len: bytes.len(),
        }
    }
}

/// Copy the bytes of `src`, in order, into `dst`, in order; returns the bytes
/// copied (the smaller of the two totals). Overlapping ranges (a loopback
/// WRITE onto itself) are copied as by `memmove`.
///
/// # Safety
/// For the whole call, every segment of `src` must be valid for reads and
/// every segment of `dst` valid for writes of its `len` bytes: memory of a
/// registration kept alive by a table snapshot the caller holds, memory the
/// device owns, or an inline payload the poster vouched for. No Rust
/// reference to the `dst` bytes may be live (the `RegionMemory` contract).
pub(crate) unsafe fn copy_segs(dst: &[Seg], src: &[Seg]) -> usize {
    if let ([d], [s]) = (dst, src) {
        // The common shape (one SGE each side), without the general walk.
        let n = d.len.min(s.len);
        // SAFETY: `n` bytes fit both segments, valid for the call by the
        // caller's contract; `ptr::copy` tolerates overlap.
        unsafe {
            std::ptr::copy(
                std::ptr::with_exposed_provenance::<u8>(s.addr),
                std::ptr::with_exposed_provenance_mut::<u8>(d.addr),
                n,
            );
        }
        return n;
    }
    let mut dsts = dst.iter().copied();
    let mut cur = Seg::default();
    let mut copied = 0;
    for s in src {
        let (mut from, mut left) = (s.addr, s.len);
        while left > 0 {
            if cur.len == 0 {
                match dsts.next() {
                    Some(d) => cur = d,
                    None => return copied,
                }
                continue;
            }
            let n = left.min(cur.len);
            // SAFETY: `from..from+n` lies in a source segment and
            // `cur.addr..cur.addr+n` in a destination segment (n never
            // exceeds what is left of either), both valid for the call by the
            // caller's contract; `ptr::copy` tolerates overlap.
            unsafe {
                std::ptr::copy(
                    std::ptr::with_exposed_provenance::<u8>(from),
                    std::ptr::with_exposed_provenance_mut::<u8>(cur.addr),
                    n,
                );
            }
            from += n;
            left -= n;
            cur.addr += n;
            cur.len -= n;
            copied += n;
        }
    }
    copied
}

/// The two verbs atomics.
#[derive(Clone, Copy, Debug)]
pub(crate) enum AtomicOp {
    /// Replace with `swap` if equal to `compare`.
    CmpSwp { compare: u64, swap: u64 },
    /// Add.
    FetchAdd(u64),
}

/// Execute `op` on the 8 bytes at `addr` as one hardware atomic operation and
/// return the value found there, so that atomics from several queue pairs and
/// threads on the same word are correct under contention.
///
/// # Safety
/// `addr` must be 8-byte aligned and valid for reads and writes of 8 bytes for
/// the whole call (memory of a registration kept alive by the caller's table
/// snapshot), and no Rust reference to those bytes may be live.
pub(crate) unsafe fn atomic(addr: usize, op: AtomicOp) -> u64 {
    debug_assert_eq!(addr % 8, 0);
    // SAFETY: aligned and valid for the call by the caller's contract; the
    // device only ever accesses remote atomics through `AtomicU64`.
    let word = unsafe { AtomicU64::from_ptr(std::ptr::with_exposed_provenance_mut::<u64>(addr)) };
    match op {
        AtomicOp::CmpSwp { compare, swap } => {
            match word.compare_exchange(compare, swap, Ordering::AcqRel, Ordering::Acquire) {
                Ok(v) | Err(v) => v,
            }
        }
        AtomicOp::FetchAdd(add) => word.fetch_add(add, Ordering::AcqRel),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scatter_gather_copies_in_order_across_uneven_segments() {
        let src_a = *b"hello, ";
        let src_b = *b"scatter-gather";
        let mut d1 = [0u8; 5];
        let mut d2 = [0u8; 3];
        let mut d3 = [0u8; 20];
        let dst = [
            Seg::of_mut(&mut d1),
            Seg::of_mut(&mut d2),
            Seg::of_mut(&mut d3),
        ];
        let src = [Seg::of(&src_a), Seg::of(&src_b)];
        // SAFETY: all segments are local arrays alive for the call.
        let n = unsafe { copy_segs(&dst, &src) };
        assert_eq!(n, 21);
        let mut out = Vec::new();
        out.extend_from_slice(&d1);
        out.extend_from_slice(&d2);
        out.extend_from_slice(&d3[..13]);
        assert_eq!(&out, b"hello, scatter-gather");
        assert_eq!(&d3[13..], &[0u8; 7]);
    }

    #[test]
    fn atomics_return_the_old_value() {
        let word = AtomicU64::new(5);
        let addr = word.as_ptr().expose_provenance();
        // SAFETY: `word` is aligned, alive, and only accessed atomically.
        let old = unsafe { atomic(addr, AtomicOp::FetchAdd(3)) };
        assert_eq!((old, word.load(Ordering::Relaxed)), (5, 8));
        // SAFETY: as above.
        let old = unsafe {
            atomic(
                addr,
                AtomicOp::CmpSwp {
                    compare: 7,
                    swap: 1,
                },
            )
        };
        assert_eq!((old, word.load(Ordering::Relaxed)), (8, 8));
        // SAFETY: as above.
        let old = unsafe {
            atomic(
                addr,
                AtomicOp::CmpSwp {
                    compare: 8,
                    swap: 1,
                },
            )
        };
        assert_eq!((old, word.load(Ordering::Relaxed)), (8, 1));
    }
}
