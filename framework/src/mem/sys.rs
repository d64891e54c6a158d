//! Operating-system memory: page-aligned mappings, huge pages, NUMA binding,
//! and the locked-memory limit.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{MemError, TransportError};
use crate::transport::RegionMemory;

/// Size of a huge page this module asks for.
pub const HUGE_PAGE: usize = 2 << 20;

/// Whether an arena uses 2 MiB huge pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HugePages {
    /// Try `MAP_HUGETLB`, then transparent huge pages, then normal pages (logged).
    #[default]
    Auto,
    /// Normal pages only: no `MAP_HUGETLB`, and advice against transparent
    /// huge pages (`MADV_NOHUGEPAGE`), which a system with transparent huge
    /// pages `enabled` set to `always` would otherwise use.
    Never,
    /// `MAP_HUGETLB` or fail.
    Require,
}

/// An anonymous, page-aligned, zero-filled mapping. Its bytes are always
/// initialized (the kernel zero-fills them), so handing any range of it out as
/// `&[u8]` never exposes uninitialized memory.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
    huge: bool,
}

// SAFETY: the mapping is plain memory owned by this value; the raw pointer is
// only a handle, and all concurrent access goes through the arena's slot
// discipline (one exclusive writer per slot) or the device.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`; `&Mapping` exposes only the pointer and the length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `len` bytes (rounded up to the page or huge-page size), optionally
    /// on huge pages and bound to NUMA node `numa_node`.
    pub fn new(len: usize, huge: HugePages, numa_node: Option<u32>) -> Result<Mapping, MemError> {
        if len == 0 {
            return Err(MemError::Config("arena length is zero".into()));
        }
        let page = page_size();
        let mut mapping = None;
        if huge != HugePages::Never {
            let hlen = len.div_ceil(HUGE_PAGE) * HUGE_PAGE;
            match map(hlen, libc::MAP_HUGETLB | libc::MAP_HUGE_2MB) {
                Ok(ptr) => {
                    mapping = Some(Mapping {
                        ptr,
                        len: hlen,
                        huge: true,
                    })
                }
                Err(e) if huge == HugePages::Require => {
                    return Err(MemError::Os {
                        context: "mmap with MAP_HUGETLB (2 MiB pages required)",
                        source: e,
                    })
                }
                Err(e) => tracing::debug!(
                    "no 2 MiB hugetlb pages for a {hlen}-byte arena ({e}); using normal pages with transparent huge page advice"
                ),
            }
        }
        let mapping = match mapping {
            Some(m) => m,
            None => {
                let rlen = len.div_ceil(page) * page;
                let ptr = map(rlen, 0).map_err(|e| MemError::Os {
                    context: "mmap of an arena",
                    source: e,
                })?;
                // `Auto` falls back to transparent huge pages; `Never`
                // advises against them (see `HugePages::Never`).
                let advice = match huge {
                    HugePages::Never => Some(libc::MADV_NOHUGEPAGE),
                    _ if rlen >= HUGE_PAGE => Some(libc::MADV_HUGEPAGE),
                    _ => None,
                };
                if let Some(advice) = advice {
                    // SAFETY: ptr..ptr+rlen is the mapping just created; advice
                    // changes no contents.
                    unsafe { libc::madvise(ptr.cast(), rlen, advice) };
                }
                Mapping {
                    ptr,
                    len: rlen,
                    huge: false,
                }
            }
        };
        if let Some(node) = numa_node {
            mapping.bind(node)?;
        }
        Ok(mapping)
    }

    /// True if backed by 2 MiB hugetlb pages.
    pub fn is_huge(&self) -> bool {
        self.huge
    }

    fn bind(&self, node: u32) -> Result<(), MemError> {
        if node >= 64 {
            return Err(MemError::Config(format!("NUMA node {node} out of range")));
        }
        let mask: u64 = 1 << node;
        const MPOL_BIND: libc::c_long = 2;
        // SAFETY: mbind reads `mask` (64 bits, maxnode 65) and changes the
        // policy of our own mapping only.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                self.ptr as libc::c_long,
                self.len as libc::c_long,
                MPOL_BIND,
                &mask as *const u64 as libc::c_long,
                65 as libc::c_long,
                0 as libc::c_long,
            )
        };
        if rc != 0 {
            return Err(MemError::Os {
                context: "mbind of an arena to its NUMA node",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

fn map(len: usize, extra: libc::c_int) -> std::io::Result<*mut u8> {
    // SAFETY: an anonymous private mapping at an address the kernel picks; no
    // existing memory is affected.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ptr.cast())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `map` with this length and no
        // reference into it outlives `self` (devices hold an `Arc<Mapping>`).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

// SAFETY: `ptr..ptr+len` is one anonymous mapping, zero-filled at creation,
// unmapped only when the `Mapping` drops.
unsafe impl RegionMemory for Mapping {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// `CLOCK_MONOTONIC_COARSE`: the monotonic clock as of the last timer tick
/// (1-4 ms resolution), served from the vDSO's data page without reading
/// any clock hardware, so it stays cheap where the precise clock is not (a
/// guest whose TSC is unstable reads the HPET for every `Instant::now`,
/// about 9 us under emulation). `None` if the kernel refuses it.
pub fn coarse_monotonic() -> Option<std::time::Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (rc == 0 && ts.tv_sec >= 0 && (0..1_000_000_000).contains(&ts.tv_nsec))
        .then(|| std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

static LOCKED: AtomicU64 = AtomicU64::new(0);

/// True if the process has `CAP_IPC_LOCK` in its effective set.
pub fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// The soft `RLIMIT_MEMLOCK`, `None` when unlimited.
pub fn memlock_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0
        || r.rlim_cur == libc::RLIM_INFINITY
    {
        None
    } else {
        Some(r.rlim_cur)
    }
}

/// Account `bytes` of pinned memory against `RLIMIT_MEMLOCK` before a
/// registration that pins, unless the process has `CAP_IPC_LOCK`. Returns a
/// guard-less reservation: call [`memlock_release`] when deregistering.
pub fn memlock_reserve(bytes: u64) -> Result<(), TransportError> {
    if has_cap_ipc_lock() {
        LOCKED.fetch_add(bytes, Ordering::Relaxed);
        return Ok(());
    }
    let limit = memlock_limit();
    let prev = LOCKED.fetch_add(bytes, Ordering::Relaxed);
    if let Some(limit) = limit {
        if prev + bytes > limit {
            LOCKED.fetch_sub(bytes, Ordering::Relaxed);
            return Err(TransportError::MemlockLimit {
                requested: bytes,
                limit,
                locked: prev,
            });
        }
    }
    Ok(())
}

/// Return what [`memlock_reserve`] accounted.
pub fn memlock_release(bytes: u64) {
    LOCKED.fetch_sub(bytes, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `VmFlags` of the mapping that holds `ptr`, from /proc/self/smaps
    /// (the kernel may have merged ours with a neighbour of the same flags).
    fn vm_flags(ptr: *mut u8) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("read /proc/self/smaps");
        let at = ptr as usize;
        let mut in_vma = false;
        for line in smaps.lines() {
            let range = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'));
            if let Some((a, b)) = range {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    in_vma = a <= at && at < b;
                    continue;
                }
            }
            if in_vma {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.split_whitespace().map(str::to_string).collect();
                }
            }
        }
        panic!("no mapping holds {ptr:p} in /proc/self/smaps");
    }

    #[test]
    fn never_means_no_transparent_huge_pages() {
        // Large enough for transparent huge pages: `Never` must advise
        // against them (`nh`), not for them (`hg`).
        let m = Mapping::new(8 << 20, HugePages::Never, None).expect("map 8 MiB");
        assert!(!m.is_huge());
        let flags = vm_flags(m.ptr);
        assert!(flags.iter().any(|f| f == "nh"), "VmFlags {flags:?}");
        assert!(!flags.iter().any(|f| f == "hg"), "VmFlags {flags:?}");
    }

    #[test]
    fn auto_falls_back_to_transparent_huge_pages() {
        let m = Mapping::new(8 << 20, HugePages::Auto, None).expect("map 8 MiB");
        // hugetlb pages (`ht`) when the system has them reserved, else the
        // advice for transparent ones (`hg`).
        let flags = vm_flags(m.ptr);
        let want = if m.is_huge() { "ht" } else { "hg" };
        assert!(flags.iter().any(|f| f == want), "VmFlags {flags:?}");
    }
}
