//! # zcmsg-verbs
//!
//! zcmsg's hardware transport: RDMA verbs through libibverbs, connections
//! through librdmacm. Both libraries are loaded at run time (by
//! `rdma-mummy-sys`), so this crate builds on machines without rdma-core and,
//! at run time, says why there is no device instead of failing to link:
//!
//! | situation | error |
//! |---|---|
//! | libibverbs / librdmacm not installed | [`TransportError::LibraryMissing`] |
//! | kernel without RDMA (`ibv_get_device_list`: ENOSYS) | [`TransportError::NoRdmaStack`] |
//! | no device, or none of that name | [`TransportError::NoDevice`] |
//! | `/dev/infiniband` not accessible | [`TransportError::Permission`] |
//!
//! ```no_run
//! use zcmsg::Transport;
//! use zcmsg_verbs::{VerbsConfig, VerbsDevice};
//!
//! let dev = VerbsDevice::open(Some("rxe0"), &VerbsConfig::default())?;
//! println!("{:?}", dev.caps());
//! # Ok::<(), zcmsg::TransportError>(())
//! ```
//!
//! ## What it does
//!
//! - **Registration once per arena**: [`Transport::register`] is one
//!   `ibv_reg_mr_iova2` (or `ibv_reg_mr`) call. In [`AddressSpace::Iova`]
//!   (the default when the library has `ibv_reg_mr_iova2`) each region gets a
//!   *region-relative* IOVA: the in-page offset of its first byte, so remote
//!   addresses say nothing about the process's address space and keep the
//!   page offset `ibv_reg_mr_iova2` requires. [`AddressSpace::Cpu`]
//!   ([`VerbsConfig::address_space`]) registers with `ibv_reg_mr` and
//!   IOVA = CPU address. Pinned bytes are accounted against `RLIMIT_MEMLOCK`
//!   first ([`zcmsg::mem::sys::memlock_reserve`], which honours
//!   `CAP_IPC_LOCK`), and released on deregistration.
//! - **Capabilities** come from `ibv_query_device` / `ibv_query_port`;
//!   `max_inline_data` is probed by creating throw-away queue pairs; implicit
//!   on-demand paging from `ibv_query_device_ex` (`IBV_ODP_SUPPORT_IMPLICIT`).
//! - **Connections** by rdma_cm (`ip:port`, port 0 picks one): address and
//!   route resolution, one RC queue pair per connection with its own send and
//!   receive completion queues, READ/atomic depths above zero, the ACK
//!   timeout from [`QpConfig::ack_timeout`] (`RDMA_OPTION_ID_ACK_TIMEOUT`),
//!   `retry_count` and `rnr_retry` in the connection parameters. On RoCE the
//!   kernel picks the source GID from the source address
//!   ([`VerbsConfig::source_addr`] / [`VerbsConfig::source_interface`]); the
//!   GID index and type actually used are read back from the queue pair,
//!   logged, and checked to be RoCE v2 ([`VerbsQp::gid`]).
//!   Private data: up to [`MAX_PRIVATE_DATA`] (56) bytes; the listener gets
//!   it as rdma_cm delivers it, zero-padded to 56 bytes on IB/RoCE.
//! - **Data path**: a list of work requests is one `ibv_post_send` (one
//!   doorbell), built in an array the queue pair reuses, with the SGE lists
//!   passed by pointer (`zcmsg::Sge` is layout-identical to `ibv_sge`,
//!   checked at compile time). Selective signaling; shared receive queues.
//!   INLINE requests are checked against the device's registration table
//!   (the lkey must name a registration containing the whole range) and
//!   their SGEs translated to CPU addresses before posting, because the
//!   provider copies inline data with the CPU from whatever address it is
//!   given (and in the IOVA space the SGE holds an IOVA, not a pointer); an
//!   unregistered inline SGE is refused at post time. A request holds its
//!   send-queue slot until its completion (or a later one that covers it) is
//!   polled, and receives theirs until they complete, so the granted depths
//!   are kept exactly ([`TransportError::QueueFull`] beyond them) even where
//!   the provider would accept more, and completion queues never overflow.
//!   `poll_cq` is a busy-pollable, non-blocking call;
//!   [`QueuePair::arm`] requests a CQ event (once per CQ until it fires) and
//!   polls once more to close the race, and a small thread per device (epoll
//!   on the completion channel and the rdma_cm channel) wakes the stored
//!   waker. Every `ibv_wc_status` maps to its `WcStatus`; a failed receive
//!   is reported as a receive (send and receive completions come from
//!   separate CQs, since verbs leaves the opcode of an error completion
//!   undefined). A peer's disconnect (or [`QueuePair::disconnect`]) moves the
//!   queue pair to the error state, flushing what is outstanding;
//!   [`QueuePair::state`] reports it. Requests posted to a queue pair in the
//!   error state are flushed like hardware does; rxe does not flush receives
//!   posted to a failed queue pair by itself, so once the error is known the
//!   queue pair is moved to the error state again after such posts (and once
//!   when the error is first seen), which makes rxe flush them.
//!
//! ## Soft-RoCE (rxe) differences seen in the lab
//!
//! - A local SGE naming an unknown lkey completes with `LocQpOpErr` on rxe
//!   (hardware and the IB spec: `LocProtErr`); an SGE outside its region
//!   does give `LocProtErr`.
//! - A receive too small for the SEND gives `LocQpOpErr` / `RemOpErr`.
//! - rxe advertises `max_msg_sz` 8 MiB without enforcing it; this transport
//!   refuses larger requests at post time ([`TransportError::MessageTooLarge`]).
//! - Implicit on-demand paging is reported from the device caps (rxe on
//!   Linux 6.1 has none); it is not used or tested here.

//! ## Fork safety
//!
//! Memory registered with an RDMA device must not be touched through a
//! copy-on-write page after `fork()`: the device keeps writing the parent's
//! original page. rdma-core's remedy is `ibv_fork_init()` before any other
//! verbs call (or `RDMAV_FORK_SAFE=1` in the environment, which does the
//! same), which marks registered ranges `MADV_DONTFORK`; since Linux 5.13 the
//! kernel copies pinned pages at fork itself and `ibv_is_fork_initialized()`
//! says `IBV_FORK_UNNEEDED`. With [`ForkPolicy::Auto`] (the default)
//! [`VerbsDevice::open`] calls `ibv_fork_init()` once, before the first
//! device is opened, unless libibverbs reports it unneeded or already
//! enabled; [`VerbsDevice::fork_status`] tells what is in force. Even so, a
//! child process must not use the parent's registrations, queue pairs or
//! arenas: only `exec` is safe to do after `fork`. Set `RDMAV_FORK_SAFE=1`
//! if other code in the process uses verbs before this crate does.
//!
//! ## Threads
//!
//! The device is `Send + Sync`; a [`VerbsQp`] is driven by one thread at a
//! time (`&mut self`); a [`VerbsSrq`] can be posted to from any thread.
//! Each device runs one event thread, stopped when the last queue pair,
//! listener and shared receive queue of the device are gone.
//!
//! ## Testing
//!
//! Tests that need a device are `#[ignore = "needs the Soft-RoCE lab"]`: the
//! host kernel here has no RDMA. They run inside the Soft-RoCE QEMU guest
//! (`deploy/lab/`) with `--include-ignored`, where a missing device fails
//! them.
//!
//! [`TransportError::LibraryMissing`]: zcmsg::TransportError::LibraryMissing
//! [`TransportError::NoRdmaStack`]: zcmsg::TransportError::NoRdmaStack
//! [`TransportError::NoDevice`]: zcmsg::TransportError::NoDevice
//! [`TransportError::Permission`]: zcmsg::TransportError::Permission
//! [`Transport::register`]: zcmsg::Transport::register
//! [`AddressSpace::Iova`]: zcmsg::AddressSpace::Iova
//! [`AddressSpace::Cpu`]: zcmsg::AddressSpace::Cpu
//! [`QpConfig::ack_timeout`]: zcmsg::QpConfig::ack_timeout
//! [`QueuePair::arm`]: zcmsg::QueuePair::arm
//! [`QueuePair::disconnect`]: zcmsg::QueuePair::disconnect
//! [`QueuePair::state`]: zcmsg::QueuePair::state
//! [`TransportError::QueueFull`]: zcmsg::TransportError::QueueFull
//! [`TransportError::MessageTooLarge`]: zcmsg::TransportError::MessageTooLarge

#![deny(unsafe_code)]

mod cm;
mod device;
mod notify;
mod qp;
mod srq;
#[allow(unsafe_code)] // the FFI boundary: the only module with `unsafe`
mod sys;

pub use cm::{VerbsListener, MAX_PRIVATE_DATA};
pub use device::{list_devices, ForkPolicy, VerbsConfig, VerbsDevice};
pub use qp::{GidInfo, VerbsQp};
pub use srq::VerbsSrq;
pub use sys::ForkStatus;
