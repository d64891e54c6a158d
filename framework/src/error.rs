//! Typed errors returned to callers. Completion failures are data
//! ([`crate::WcStatus`]), not errors of the poller.

use crate::verbs::Opcode;

/// Errors of devices and their objects.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The RDMA libraries are not installed.
    #[error("RDMA library not found: {0} (install rdma-core / ibverbs-providers)")]
    LibraryMissing(String),
    /// The kernel has no RDMA stack (ENOSYS from `ibv_get_device_list`).
    #[error("no RDMA stack in this kernel (ibv_get_device_list: ENOSYS)")]
    NoRdmaStack,
    /// No device, or not the one asked for.
    #[error("no RDMA device{}", .0.as_ref().map(|d| format!(" named {d}")).unwrap_or_default())]
    NoDevice(Option<String>),
    /// Permission denied opening or using the device.
    #[error("permission denied: {0}")]
    Permission(String),
    /// Registering would exceed `RLIMIT_MEMLOCK` and the process lacks `CAP_IPC_LOCK`.
    #[error("registering {requested} bytes would exceed RLIMIT_MEMLOCK ({limit} bytes, {locked} already locked by zcmsg); raise it with `ulimit -l unlimited` or grant CAP_IPC_LOCK")]
    MemlockLimit {
        /// Bytes asked for.
        requested: u64,
        /// The soft limit.
        limit: u64,
        /// Bytes this process already registered.
        locked: u64,
    },
    /// An argument is out of the device's range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The queue is full.
    #[error("queue full ({depth} entries)")]
    QueueFull {
        /// The queue's depth.
        depth: u32,
    },
    /// More SGEs than the queue pair was created with.
    #[error("{got} SGEs exceed the queue pair's limit of {max}")]
    TooManySges {
        /// SGEs in the request.
        got: usize,
        /// The limit.
        max: u32,
    },
    /// Inline payload larger than the queue pair's `max_inline_data`.
    #[error("inline payload of {got} bytes exceeds max_inline_data {max}")]
    InlineTooLarge {
        /// Payload bytes.
        got: u64,
        /// The limit.
        max: u32,
    },
    /// A message longer than the device's `max_msg_sz`.
    #[error("message of {got} bytes exceeds max_msg_sz {max}")]
    MessageTooLarge {
        /// Message bytes.
        got: u64,
        /// The limit.
        max: u32,
    },
    /// The opcode is not valid here (e.g. atomics on a device without them).
    #[error("opcode {0:?} is not valid for this queue pair")]
    BadOpcode(Opcode),
    /// The queue pair is not in a state that allows posting.
    #[error("queue pair is in the error state")]
    QpError,
    /// Nobody listens at the address, or the listener refused.
    #[error("connection refused: {0}")]
    ConnectionRefused(String),
    /// The address is already taken by another listener.
    #[error("address in use: {0}")]
    AddressInUse(String),
    /// A wait ran out.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The operation is not supported by this transport.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// An operating-system error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl TransportError {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TransportError::Io {
            context: context.into(),
            source,
        }
    }
}

/// A post that failed part-way, like verbs' `bad_wr`: requests before `index`
/// were posted, the one at `index` and after were not.
#[derive(Debug, thiserror::Error)]
#[error("post failed at request {index}: {error}")]
pub struct PostError {
    /// Index of the first request not posted.
    pub index: usize,
    /// Why.
    #[source]
    pub error: TransportError,
}

impl PostError {
    /// A failure at request `index`.
    pub fn at(index: usize, error: TransportError) -> Self {
        PostError { index, error }
    }
}

/// Errors of the SGE builders.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SgeError {
    /// A chunk lies (partly) outside every registered region and the policy is `Reject`.
    #[error("memory at {addr:#x} (+{len} bytes) is not registered with this protection domain")]
    Unregistered {
        /// Chunk start.
        addr: u64,
        /// Chunk length.
        len: u64,
    },
    /// A single-SGE build was asked for a chunk that spans two regions.
    #[error("chunk at {addr:#x} (+{len} bytes) crosses a region boundary")]
    CrossesRegion {
        /// Chunk start.
        addr: u64,
        /// Chunk length.
        len: u64,
    },
    /// A chunk longer than one SGE can describe (4 GiB - 1).
    #[error("chunk of {len} bytes exceeds the 32-bit SGE length")]
    ChunkTooLong {
        /// Chunk length.
        len: u64,
    },
    /// A SEND needs more SGEs than allowed and coalescing could not help.
    #[error("message needs {need} SGEs, the queue pair allows {max}, and coalescing would not fit one slot")]
    TooManySges {
        /// SGEs needed.
        need: usize,
        /// The limit.
        max: u32,
    },
    /// A SEND longer than `max_msg_sz`: it must go by rendezvous.
    #[error("message of {len} bytes exceeds max_msg_sz {max}")]
    MessageTooLarge {
        /// Message bytes.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// Local and remote lengths of a one-sided operation differ, or the remote range is invalid.
    #[error("local length {local} does not match remote length {remote}")]
    LengthMismatch {
        /// Local bytes.
        local: u64,
        /// Remote bytes.
        remote: u64,
    },
    /// No registered memory was left to bounce or coalesce into.
    #[error("no registered slot free for a {len}-byte bounce or coalesce copy")]
    NoBounceSlot {
        /// Bytes to copy.
        len: u64,
    },
    /// Registering the chunk on the fly failed.
    #[error("registering a chunk on first use failed: {0}")]
    Register(String),
}

/// Errors creating arenas and protection domains.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemError {
    /// The arena configuration is invalid.
    #[error("invalid arena configuration: {0}")]
    Config(String),
    /// `mmap` (or `mbind`) failed.
    #[error("{context}: {source}")]
    Os {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The device refused the registration.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The region overlaps one already registered with this protection domain.
    #[error("region {addr:#x} (+{len}) overlaps a registered region")]
    Overlap {
        /// Start.
        addr: u64,
        /// Length.
        len: u64,
    },
}
