//! Shared helpers of the examples: open a pair of devices by transport name.

use std::sync::Arc;

use zcmsg::Transport;

/// Two devices ("hosts") and an address the second one listens on.
pub type Devices = (Arc<dyn Transport>, Arc<dyn Transport>, String);

/// Two devices ("hosts") of the named transport and an address to listen on.
pub fn devices(transport: &str, tag: &str) -> Result<Devices, String> {
    match transport {
        "soft" => Ok((
            zcmsg_soft::SoftDevice::new() as Arc<dyn Transport>,
            zcmsg_soft::SoftDevice::new() as Arc<dyn Transport>,
            format!("{tag}-{}", std::process::id()),
        )),
        other => Err(format!("unknown transport {other:?} (available: soft)")),
    }
}
