//! # zcmsg-soft: the in-process software RDMA device
//!
//! What the kernel's rxe is to the RDMA stack, this crate is to zcmsg: a
//! device whose SGEs carry CPU addresses ([`zcmsg::AddressSpace::Cpu`]) that
//! it translates through its own region table, executing the verbs
//! (SEND, SEND_WITH_IMM, RDMA WRITE, WRITE_WITH_IMM, READ, compare-and-swap,
//! fetch-and-add) between reliable-connected queue pairs in one process.
//!
//! ```
//! use bytes::BufMut;
//! use zcmsg::{ArenaConfig, Pd, QpConfig, RecvRequest, WcStatus, WorkCompletion, WorkRequest};
//! use zcmsg_soft::SoftDevice;
//!
//! let dev = SoftDevice::new();
//! let pd = Pd::new(dev.clone());
//! let arena = pd.arena(ArenaConfig::new(4096, 8)).unwrap(); // registered once
//! let (mut a, mut b) = dev.pair(&QpConfig::default(), &QpConfig::default()).unwrap();
//!
//! let mut rx = arena.alloc().unwrap();
//! b.post_recv(&[RecvRequest { wr_id: 1, sg_list: &[rx.sge()] }]).unwrap();
//! let mut tx = arena.alloc().unwrap();
//! tx.put_slice(b"hello, soft device");
//! a.post_send(&[WorkRequest::send(7, &[tx.sge_filled()])]).unwrap();
//!
//! let mut wc = [WorkCompletion::EMPTY; 4];
//! assert_eq!(a.poll_cq(&mut wc), 1);
//! assert_eq!((wc[0].wr_id, wc[0].status), (7, WcStatus::Success));
//! assert_eq!(b.poll_cq(&mut wc), 1);
//! rx.set_len(wc[0].byte_len as usize);
//! assert_eq!(rx.as_slice(), b"hello, soft device");
//! assert_eq!(dev.stats().copy_bytes, 18); // one device copy, straight into the receive
//! ```
//!
//! ## The device
//!
//! - [`SoftDevice::new`] / [`SoftDevice::with_caps`] return an
//!   `Arc<SoftDevice>` implementing [`zcmsg::Transport`]. Limits like rxe's:
//!   32 SGEs per send, receive and READ, `max_msg_sz` 8 MiB — **enforced**: a
//!   SEND, or one WRITE or READ, longer than that is refused at post time with
//!   `MessageTooLarge` (rxe would take it) — inline data up to 256 bytes (a
//!   queue pair gets the smaller of what it asks and that), 16384 work
//!   requests per queue, atomics, shared receive queues, no implicit ODP,
//!   unlimited registration size.
//! - The device instance is the protection domain. [`zcmsg::Transport::register`]
//!   keeps the `Arc<dyn RegionMemory>` and hands out an even lkey and the odd
//!   rkey after it; keys are never reused while the device lives, so a stale
//!   key only ever fails. Local read is always allowed; LOCAL_WRITE,
//!   REMOTE_READ, REMOTE_WRITE and REMOTE_ATOMIC are checked where hardware
//!   checks them. Once `deregister` returns, the device touches none of the
//!   region's memory.
//! - Queue pairs: [`SoftDevice::pair`] (loopback), [`SoftDevice::connect_pair`]
//!   (two devices: two hosts, each translating its own keys), or by name with
//!   `listen`/`connect` through one process-wide table (no listener:
//!   `ConnectionRefused`; a taken name: `AddressInUse`; `accept` past its
//!   timeout: `Timeout`; private data over 56 bytes: `InvalidArgument`; a name
//!   ending in `:0` gets a free number, like a port). `connect` does not wait
//!   for `accept`.
//! - [`DeviceStats`] counts the device's own copies (bytes and operations),
//!   separate from the framework's copy accounting.
//!
//! ## How it runs: no shared lock and no allocation on the data path
//!
//! A work request executes synchronously in the thread that posts it, as rxe
//! runs requests in the sender's context. That thread translates both sides'
//! SGEs (one lock-free load of each device's region table snapshot, then
//! usually one probe of its key index, which holds each translation inline),
//! copies with `memmove`, and completes. Runs of the common SEND (one source
//! segment into a one-SGE receive of the peer's own receive queue) go
//! through the post loop as straight-line code, counted once per run, and
//! the poster then loads the peer's next receive entry so that it crosses
//! cores before the next message needs it; every other shape, and every
//! failure, goes through the general executor one request at a time (the
//! next run starts after it), which applies the status table below:
//!
//! - **Receive queue**: a single-producer (the owner posts) single-consumer
//!   (whoever executes the peer's requests takes) ring of preallocated
//!   entries, compact as a NIC's: a receive request (first SGE, SGE count,
//!   `wr_id`) is 32 bytes and its completion one 8-byte word, so a line
//!   carries two requests or four completions across cores. The consumer
//!   writes the completion of receive `seq` into completion entry `seq` and
//!   tags it done with `seq`'s lap, so receive completions need no separate
//!   queue and cannot overflow; the owner's `poll_cq` reads them in order
//!   from the tags, without any lock. The two ends of a pair share their
//!   completion lines, four entries of each to a line, so that a
//!   ping-pong's request and answer complete in one line (the one-word
//!   floor's pattern) instead of each in a line only the other side held.
//! - **Send queue**: preallocated, behind a mutex of its own queue pair that
//!   the owner's thread takes on every post (uncontended in the common case:
//!   an atomic swap each way; other threads take it rarely, see below). Send
//!   completions are written there by the poster itself. A slot is held from
//!   post until its completion is polled (an unsignaled request that succeeds
//!   at once holds none); `poll_cq` skips the mutex when nothing is outstanding.
//! - **Shared receive queue**: a bounded lock-free MPMC queue of slot indices
//!   (`crossbeam` `ArrayQueue`); completed indices go to the receiving queue
//!   pair through its own single-producer ring.
//! - **Notification**: after publishing completions for the peer and
//!   releasing its send mutex, the poster loads the peer's `armed` flag;
//!   only an armed peer is woken. `arm` stores the waker and the flag, takes
//!   the peer's send mutex once, then re-checks: the poster either finished
//!   before (the re-check sees its completions) or starts after (it sees the
//!   flag), so the data path needs no fence. `arm` only tries the mutex: if
//!   the peer is posting at that moment it reports ready instead of waiting
//!   (the caller polls again). No background thread carries
//!   completions.
//! - **Deregistration and error transitions** need to know that no thread is
//!   still inside a copy. Every execution of a queue pair's requests runs
//!   under its send-queue mutex, which the poster takes anyway, so waiting
//!   for one in progress is taking that mutex once: `deregister` swaps the
//!   table, then takes the mutex of every queue pair that may execute with
//!   the region (dropping the stale table it kept); a queue pair entering
//!   the error state takes its peer's before flushing its own receives.
//!   Region memory itself is kept alive by the table snapshot the executing
//!   thread holds, so even a racing deregistration can never cause a use
//!   after free.
//! - **Receiver not ready**: a SEND (or WRITE_WITH_IMM) meeting an empty
//!   receive queue stays at the head of its send queue, with everything posted
//!   after it (RC order). It is retried by its owner's next `post_send` or
//!   `poll_cq`, or, without its owner doing anything, by whoever posts a
//!   receive for it (the peer's `post_recv`, or any thread posting to the
//!   peer's SRQ: that thread takes the waiting queue pair's send mutex and
//!   executes the request, the one case where another thread executes under
//!   it) and by the
//!   RNR timer, like rxe's `rnr_nak_timer`: a small thread, started on demand
//!   and gone when idle. A failed retry counts once its delay expired (20 µs,
//!   growing fourfold per retry up to 10 ms); after `rnr_retry` of them (7:
//!   forever) the request completes with `RnrRetryExcErr`, and an armed owner
//!   is woken.
//!
//! ## Where errors are reported
//!
//! Requests the hardware refuses are refused by `post_send`/`post_recv` with
//! a [`zcmsg::PostError`] whose `index` is the first request not posted:
//!
//! | trigger | error |
//! |---|---|
//! | more SGEs than the queue pair's `max_send_sge` (READ: also `max_sge_rd`), `max_recv_sge`, or the SRQ's `max_sge` | `TooManySges` |
//! | send queue full: posted requests plus completions not yet polled reach `max_send_wr`; receive queue: posted receives reach `max_recv_wr`; SRQ: posted plus unpolled reach its depth | `QueueFull` |
//! | an opcode the device does not support (atomics with `atomics: false`) | `BadOpcode` |
//! | a SEND, WRITE or READ longer than `max_msg_sz` | `MessageTooLarge` |
//! | INLINE payload over the queue pair's `max_inline_data` | `InlineTooLarge` |
//! | INLINE on a READ or atomic; an inline SGE with a null or wrapping address | `InvalidArgument` |
//! | an atomic with fewer than 8 local bytes, or a remote address not 8-byte aligned (rxe refuses these at post time too) | `InvalidArgument` |
//! | `post_recv` on a queue pair that receives through an SRQ | `InvalidArgument` |
//!
//! Everything else completes with a status, on the side rxe reports it. After
//! any error completion the queue pair is in the error state: its pending
//! requests and its posted receives complete with `WrFlushErr` (receives of a
//! shared receive queue stay there for other queue pairs), and requests posted
//! later are accepted and complete with `WrFlushErr` too, as verbs specifies.
//! Errors always complete, signaled or not. Zero-length SGEs are never checked,
//! and a zero-byte WRITE or READ needs no valid rkey (as in rxe).
//!
//! | trigger | requester (poster) | responder (peer) | rxe |
//! |---|---|---|---|
//! | SEND/WRITE source SGE: unknown or stale lkey, out of bounds (INLINE: lkey ignored) | `LocProtErr`, error state | nothing | same |
//! | READ target or atomic result SGE: bad lkey, out of bounds, no LOCAL_WRITE | `LocProtErr`, error state (an atomic has already been applied remotely) | nothing | same |
//! | SEND or WRITE_WITH_IMM with no receive posted | waits, retried `rnr_retry` times, then `RnrRetryExcErr`, error state | nothing | same |
//! | SEND longer than the receive's SGEs | `RemInvReqErr`, error state | receive `LocLenErr`, error state | rxe fails it as a malformed receive (`RemOpErr` / `LocQpOpErr`); we follow the IB spec and mlx5 |
//! | SEND into a receive SGE with a bad lkey, out of bounds, or without LOCAL_WRITE | `RemOpErr`, error state | receive `LocProtErr`, error state | rxe: `RemOpErr` / `LocQpOpErr` |
//! | WRITE, READ or atomic: unknown or stale rkey, an lkey used as rkey, range outside the region, missing REMOTE_WRITE / REMOTE_READ / REMOTE_ATOMIC | `RemAccessErr`, error state | error state (WRITE_WITH_IMM: its receive completes `RemAccessErr`) | same |
//! | any request to a peer in the error state, disconnected or dropped | `RetryExcErr`, error state | — | same, after `retry_count` ACK timeouts; we know at once |
//! | the peer disconnects or is dropped | the request waiting at the head: `RetryExcErr`; the rest and all receives: `WrFlushErr`; error state | — | the ULP moves the QP to error on the CM event |
//! | `disconnect()` or drop | own requests and receives: `WrFlushErr` | as the row above | |
//!
//! ## Threads
//!
//! - [`SoftDevice`] is `Send + Sync`; registration and queue pair creation take
//!   short mutexes of their own, never the data path.
//! - [`SoftQp`] is `Send`; one thread drives it at a time (`&mut self`). Two
//!   queue pairs of a pair may be driven from two threads, or one.
//! - [`SoftSrq`] is `Send + Sync`; `post_recv` from any number of threads.
//! - [`SoftListener`] is `Send`.
//!
//! ## INLINE
//!
//! An INLINE request's payload is copied during `post_send`, so the caller may
//! reuse its buffers as soon as the call returns. Its SGEs are checked like
//! any other (lkey, bounds, registration alive): unlike `ibv_post_send`, the
//! device never reads an address its region table does not cover, so no safe
//! call can make it read memory it does not own. An inline SGE that does not
//! translate completes with `LocProtErr`.

mod cm;
mod device;
mod dma;
mod mr;
mod notify;
mod qp;
mod ring;
mod srq;

pub use cm::{SoftListener, MAX_PRIVATE_DATA};
pub use device::{DeviceStats, QpPair, SoftDevice};
pub use qp::SoftQp;
pub use srq::SoftSrq;
