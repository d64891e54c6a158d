//! Listen-address generators for [`Harness::new`](crate::Harness::new).
//!
//! Every connection the suite makes listens on a fresh address, so cases can
//! run in parallel threads (and test binaries in parallel processes) without
//! colliding. A generator is any `Fn() -> String + Send + Sync`; these are the
//! usual ones.

use std::sync::atomic::{AtomicU64, Ordering};

/// One counter for the whole process, shared by every generator, so two
/// harnesses (or two test threads) never hand out the same address.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Names for transports that listen on names (the software device):
/// `"<prefix>-conf-<pid>-<n>"`, unique within the machine.
pub fn named(prefix: &str) -> impl Fn() -> String + Send + Sync + 'static {
    let prefix = prefix.to_owned();
    move || {
        format!(
            "{prefix}-conf-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// `"<ip>:0"`: the transport picks a free port and the harness connects to
/// [`Listener::local_addr`](zcmsg::Listener::local_addr). The best choice for
/// network transports (verbs over rdma_cm, TCP).
pub fn ip_any_port(ip: &str) -> impl Fn() -> String + Send + Sync + 'static {
    let ip = ip.to_owned();
    move || format!("{ip}:0")
}

/// `"<ip>:<port>"` with ports `first`, `first + 1`, ... `first + count - 1`,
/// then round again, for transports that cannot pick a port themselves. The
/// process id offsets the start so parallel test binaries rarely meet.
pub fn ip_ports(ip: &str, first: u16, count: u16) -> impl Fn() -> String + Send + Sync + 'static {
    let ip = ip.to_owned();
    let count = u64::from(count.max(1));
    let offset = u64::from(std::process::id());
    move || {
        let n = (NEXT.fetch_add(1, Ordering::Relaxed) + offset) % count;
        format!("{ip}:{}", u64::from(first) + n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_across_generators() {
        let a = named("soft");
        let b = named("soft");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100 {
            assert!(seen.insert(a()));
            assert!(seen.insert(b()));
        }
    }

    #[test]
    fn ports_stay_in_range() {
        let g = ip_ports("192.0.2.1", 20000, 10);
        for _ in 0..50 {
            let s = g();
            let port: u16 = s.rsplit(':').next().unwrap().parse().unwrap();
            assert!((20000..20010).contains(&port), "{s}");
            assert!(s.starts_with("192.0.2.1:"));
        }
        assert_eq!(ip_any_port("192.0.2.1")(), "192.0.2.1:0");
    }
}
