//! The zcmsg conformance suite against a real RDMA device (rxe0 in the
//! Soft-RoCE lab). Ignored on the host; in the lab guest run with
//! `--include-ignored`, where a missing device fails every case.
//!
//! Two instances: `verbs` with the default address space (region-relative
//! IOVAs through `ibv_reg_mr_iova2`) and `verbs_cpu` with CPU addresses.
//! Each simulated host opens the device anew (its own protection domain and
//! event thread); connections are rdma_cm loopbacks on `ZCMSG_LAB_ADDR`
//! (default 192.0.2.1) with a port picked by the listener.

use std::sync::Arc;
use std::time::Duration;

use zcmsg::{AddressSpace, Transport};
use zcmsg_verbs::{VerbsConfig, VerbsDevice};

fn open_lab_device() -> Arc<dyn Transport> {
    open_with(VerbsConfig::default())
}

/// The device with CPU addresses as IOVAs (`ibv_reg_mr`).
fn open_lab_device_cpu() -> Arc<dyn Transport> {
    open_with(VerbsConfig {
        address_space: Some(AddressSpace::Cpu),
        ..VerbsConfig::default()
    })
}

fn open_with(cfg: VerbsConfig) -> Arc<dyn Transport> {
    let name = std::env::var("ZCMSG_LAB_DEVICE").unwrap_or_else(|_| "rxe0".into());
    VerbsDevice::open(Some(&name), &cfg).unwrap_or_else(|e| {
        panic!(
            "opening RDMA device {name} for the conformance suite (ZCMSG_LAB={:?}): {e}",
            std::env::var("ZCMSG_LAB").ok()
        )
    }) as Arc<dyn Transport>
}

fn lab_addr() -> String {
    std::env::var("ZCMSG_LAB_ADDR").unwrap_or_else(|_| "192.0.2.1".into())
}

zcmsg_conformance::suite!(
    verbs,
    zcmsg_conformance::Harness::new(
        open_lab_device,
        zcmsg_conformance::addr::ip_any_port(&lab_addr()),
    )
    // Full emulation runs 10-50x slower than a real machine.
    .scale(0.2)
    .timeout(Duration::from_secs(30)),
    ignore = "needs the Soft-RoCE lab"
);

zcmsg_conformance::suite!(
    verbs_cpu,
    zcmsg_conformance::Harness::new(
        open_lab_device_cpu,
        zcmsg_conformance::addr::ip_any_port(&lab_addr()),
    )
    .scale(0.2)
    .timeout(Duration::from_secs(30)),
    ignore = "needs the Soft-RoCE lab"
);
