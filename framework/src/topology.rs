//! Placement near a NIC, through hwloc (feature `topology`).
//!
//! [`nearest`] looks a device up in the machine's hwloc topology — an RDMA
//! device such as `mlx5_0` or `rxe0`, or a network interface such as `eth0` —
//! and returns the NUMA node and the CPUs (PUs) closest to it.
//! [`bind_current_thread`] then pins the calling thread to those CPUs, so
//! pollers and the memory they touch stay on the device's side of the machine.
//!
//! Devices hwloc cannot place (a software `rxe` device, a `veth`, the loopback
//! interface, or any device in a VM without PCI locality) are not an error:
//! the whole machine is returned, with `numa_node: None`, and
//! [`Placement::source`] says so.
//!
//! ```no_run
//! let placement = zcmsg::topology::nearest("mlx5_0")?;
//! println!("{}: numa {:?}, cpus {:?}", placement.source, placement.numa_node, placement.cpus);
//! zcmsg::topology::bind_current_thread(&placement.cpus[..1])?;
//! # Ok::<(), zcmsg::topology::TopologyError>(())
//! ```

use hwlocality::{
    bitmap::BitmapIndex,
    cpu::{binding::CpuBindingFlags, cpuset::CpuSet},
    object::TopologyObject,
    topology::builder::TypeFilter,
    Topology,
};

/// Where work for a device should run: its NUMA node and nearest CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// OS index of the first NUMA node near the device, `None` if unknown
    /// (device not found in the topology).
    pub numa_node: Option<u32>,
    /// OS indices of the PUs (hardware threads) of the cores nearest the
    /// device, ascending. Never empty.
    pub cpus: Vec<u32>,
    /// How the placement was found, e.g. `"hwloc OS device mlx5_0 (near
    /// Package L#0)"` or `"whole machine (device rxe0 not found in
    /// topology)"`.
    pub source: String,
}

/// Errors of topology discovery and thread binding.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// hwloc failed to configure or load the machine's topology.
    #[error("hwloc failed to load the topology: {0}")]
    Load(String),
    /// [`bind_current_thread`] was given no CPUs.
    #[error("no CPUs to bind to")]
    NoCpus,
    /// A CPU index is not a PU of this machine's topology.
    #[error("CPU {0} is not in this machine's topology")]
    UnknownCpu(u32),
    /// hwloc failed to bind the calling thread.
    #[error("hwloc failed to bind the current thread: {0}")]
    Bind(String),
}

/// Finds the NUMA node and CPUs nearest `device`.
///
/// `device` is an hwloc OS device name: an RDMA device (`mlx5_0`, `rxe0`) or
/// a network interface (`eth0`). The topology is loaded with I/O devices, the
/// OS device of that name is looked up, and the CPU and node sets of its first
/// non-I/O ancestor (package, NUMA node, …) are returned.
///
/// A device missing from the topology is not an error: the whole machine's
/// CPUs are returned with `numa_node: None`, and [`Placement::source`] says
/// the device was not found.
///
/// Loading a topology with I/O devices takes milliseconds; call this once at
/// start-up, not per message.
///
/// # Errors
///
/// [`TopologyError::Load`] if hwloc cannot load the topology.
pub fn nearest(device: &str) -> Result<Placement, TopologyError> {
    let topology = Topology::builder()
        .with_io_type_filter(TypeFilter::KeepImportant)
        .map_err(|e| TopologyError::Load(e.to_string()))?
        .build()
        .map_err(|e| TopologyError::Load(e.to_string()))?;

    let near = topology
        .os_devices()
        .find(|obj| {
            obj.name()
                .is_some_and(|n| n.to_bytes() == device.as_bytes())
        })
        .and_then(TopologyObject::first_non_io_ancestor);

    if let Some(ancestor) = near {
        if let Some(cpuset) = ancestor.cpuset().filter(|set| !set.is_empty()) {
            return Ok(Placement {
                numa_node: ancestor
                    .nodeset()
                    .and_then(|set| set.first_set())
                    .and_then(index_u32),
                cpus: indices(&cpuset),
                source: format!(
                    "hwloc OS device {device} (near {} L#{})",
                    ancestor.object_type(),
                    ancestor.logical_index()
                ),
            });
        }
    }

    Ok(Placement {
        numa_node: None,
        cpus: indices(&topology.cpuset()),
        source: format!("whole machine (device {device} not found in topology)"),
    })
}

/// Binds the calling thread to the PUs `cpus` (OS indices), through hwloc.
///
/// The thread may run on any of them; pass one CPU to pin it to exactly one.
/// Loads a topology (without I/O devices) on each call, so bind once per
/// thread at start-up.
///
/// # Errors
///
/// - [`TopologyError::NoCpus`] if `cpus` is empty.
/// - [`TopologyError::UnknownCpu`] if a CPU is not a PU of this machine.
/// - [`TopologyError::Load`] if hwloc cannot load the topology.
/// - [`TopologyError::Bind`] if the operating system refuses the binding.
pub fn bind_current_thread(cpus: &[u32]) -> Result<(), TopologyError> {
    if cpus.is_empty() {
        return Err(TopologyError::NoCpus);
    }
    let topology = Topology::new().map_err(|e| TopologyError::Load(e.to_string()))?;
    let machine = topology.cpuset();
    let mut set = CpuSet::new();
    for &cpu in cpus {
        let idx = usize::try_from(cpu)
            .ok()
            .and_then(|i| BitmapIndex::try_from(i).ok())
            .filter(|&i| machine.is_set(i))
            .ok_or(TopologyError::UnknownCpu(cpu))?;
        set.set(idx);
    }
    topology
        .bind_cpu(&set, CpuBindingFlags::THREAD)
        .map_err(|e| TopologyError::Bind(e.to_string()))
}

/// The OS indices of the PUs in `set`, ascending.
fn indices(set: &CpuSet) -> Vec<u32> {
    set.iter_set().filter_map(index_u32).collect()
}

/// hwloc indices are at most `c_int::MAX`, so this never returns `None`.
fn index_u32(idx: BitmapIndex) -> Option<u32> {
    u32::try_from(idx).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PUs this process may run on.
    fn online_pus() -> usize {
        std::thread::available_parallelism()
            .expect("available_parallelism")
            .get()
    }

    fn assert_whole_machine(p: &Placement, device: &str) {
        assert_eq!(p.numa_node, None, "{p:?}");
        assert_eq!(p.cpus.len(), online_pus(), "{p:?}");
        assert!(p.cpus.windows(2).all(|w| w[0] < w[1]), "{p:?}");
        assert!(p.source.starts_with("whole machine"), "{p:?}");
        assert!(p.source.contains(device), "{p:?}");
    }

    #[test]
    fn loopback_falls_back_to_whole_machine() {
        let p = nearest("lo").expect("hwloc loads");
        assert_whole_machine(&p, "lo");
    }

    #[test]
    fn unknown_device_falls_back_to_whole_machine() {
        let p = nearest("zcmsg_no_such_dev0").expect("hwloc loads");
        assert_whole_machine(&p, "zcmsg_no_such_dev0");
    }

    #[test]
    fn bind_moves_thread_to_cpu() {
        let p = nearest("zcmsg_no_such_dev0").expect("hwloc loads");
        let first = *p.cpus.first().expect("at least one PU");
        let last = *p.cpus.last().expect("at least one PU");
        // First, then last: with two or more PUs the thread must really move.
        for cpu in [first, last] {
            bind_current_thread(&[cpu]).expect("bind");
            std::thread::yield_now();
            // SAFETY: sched_getcpu takes no arguments and only reads the
            // calling thread's state.
            let now = unsafe { libc::sched_getcpu() };
            assert_eq!(u32::try_from(now).ok(), Some(cpu), "bound to {cpu}");
        }
    }

    #[test]
    fn bind_rejects_bad_cpus() {
        assert!(matches!(
            bind_current_thread(&[]),
            Err(TopologyError::NoCpus)
        ));
        assert!(matches!(
            bind_current_thread(&[u32::MAX]),
            Err(TopologyError::UnknownCpu(u32::MAX))
        ));
    }
}
