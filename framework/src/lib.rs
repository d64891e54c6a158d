//! # zcmsg
//!
//! Zero-copy messaging for RDMA-class transports. Memory is registered once,
//! when an [`Arena`] is created under a protection domain ([`Pd`]); every
//! buffer carved from it carries that registration's local key. Scatter-gather
//! lists are built from `bytes::Bytes` chunks by [`SgeBuilder`], which looks up
//! the region each chunk lies in, takes `lkey` from the registration and writes
//! `addr` in the device's [`AddressSpace`] — application code never fills an
//! SGE by hand. Work requests go to a [`Transport`]: real verbs, the in-process
//! software device, or TCP over io_uring.
//!
//! ```
//! use std::sync::Arc;
//! use bytes::BufMut;
//! use zcmsg::{ArenaConfig, Pd, UnregisteredPolicy, AddressSpace};
//! use zcmsg::testing::RegistryOnly;
//!
//! let pd = Pd::new(Arc::new(RegistryOnly::new(AddressSpace::Cpu)));
//! let arena = pd.arena(ArenaConfig::new(4096, 16)).unwrap();
//! let mut slot = arena.alloc().unwrap();
//! slot.put_slice(b"hello, device");
//! let mut msg = [slot.freeze()];
//! let mut sges = Vec::new();
//! pd.builder(UnregisteredPolicy::Reject).list(&mut msg, &mut sges).unwrap();
//! assert_eq!(sges[0].lkey(), arena.lkey());
//! assert_eq!(sges[0].length(), 13);
//! assert_eq!(pd.stats().snapshot().total_bytes(), 0); // zero copies
//! ```

pub mod endpoint;
pub mod error;
pub mod mem;
pub mod proto;
pub mod rpc;
pub mod sge;
pub mod stats;
pub mod testing;
#[cfg(feature = "topology")]
pub mod topology;
pub mod transport;
pub mod util;
pub mod verbs;

pub use endpoint::{Endpoint, EndpointConfig, EndpointError, Recv, RecvInto, RecvSlot};
pub use error::{MemError, PostError, SgeError, TransportError};
pub use mem::{
    Arena, ArenaConfig, CacheConfig, HugePages, Pd, Revoked, SlotMut, UnregisteredPolicy, Window,
};
pub use proto::{ConnError, Msg, Outcome, ProtoConfig, Received, SendError};
pub use rpc::{BulkCtx, Reply, Rpc, RpcError};
pub use sge::{AddressSpace, RwPlan, RwSpan, Sge, SgeBuilder};
pub use stats::{CopyReason, CopySnapshot, CopyStats};
pub use transport::{
    Armed, DeviceCaps, Listener, QpCaps, QpConfig, QpState, QueuePair, RegionMemory, Registration,
    SendErrorHold, SharedRecvQueue, Transport,
};
pub use verbs::{
    Access, Opcode, RecvRequest, RemoteRegion, SendFlags, WcOpcode, WcStatus, WorkCompletion,
    WorkRequest,
};
