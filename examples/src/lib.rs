//! Shared helpers of the examples: open a pair of devices by transport name.

use std::sync::Arc;

use zcmsg::Transport;

/// Two devices ("hosts") and an address the second one listens on (connect
/// to the listener's `local_addr()`: with verbs its port is chosen then).
pub type Devices = (Arc<dyn Transport>, Arc<dyn Transport>, String);

/// The examples' device options.
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Transport: soft (the in-process device) or, built with
    /// `--features verbs`, verbs (an RDMA device through libibverbs: both
    /// ends in this process, over the device's loopback).
    #[arg(long, default_value = "soft")]
    pub transport: String,
    /// RDMA device, for `--transport verbs`.
    #[arg(short = 'd', long, default_value = "rxe0")]
    pub device: String,
    /// The device's IP address to listen and connect on, for
    /// `--transport verbs` (rdma_cm picks the GID from it).
    #[arg(long, default_value = "127.0.0.1")]
    pub addr: String,
}

/// Two devices ("hosts") of the named transport and an address to listen on.
pub fn devices(a: &DeviceArgs, tag: &str) -> Result<Devices, String> {
    match a.transport.as_str() {
        "soft" => Ok((
            zcmsg_soft::SoftDevice::new() as Arc<dyn Transport>,
            zcmsg_soft::SoftDevice::new() as Arc<dyn Transport>,
            format!("{tag}-{}", std::process::id()),
        )),
        #[cfg(feature = "verbs")]
        "verbs" => {
            let open = || {
                zcmsg_verbs::VerbsDevice::open(
                    Some(&a.device),
                    &zcmsg_verbs::VerbsConfig::default(),
                )
                .map(|d| d as Arc<dyn Transport>)
                .map_err(|e| format!("opening {}: {e}", a.device))
            };
            Ok((open()?, open()?, format!("{}:0", a.addr)))
        }
        #[cfg(not(feature = "verbs"))]
        "verbs" => Err("this build has no verbs transport: build with --features verbs".into()),
        other => Err(format!(
            "unknown transport {other:?} (available: soft, verbs)"
        )),
    }
}
