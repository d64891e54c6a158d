//! # zcmsg-conformance
//!
//! The conformance suite every zcmsg transport must pass. It is written only
//! against the [`zcmsg::Transport`] trait (and the framework's protection
//! domains, arenas, windows and builders), never against a concrete device,
//! so the in-process software device, verbs on Soft-RoCE or a NIC, and TCP
//! over io_uring are held to the same verbs semantics: every operation moves
//! the right bytes (checked byte for byte against seeded patterns, never by
//! counting completions), every error is reported on the right side with the
//! right [`zcmsg::WcStatus`], nothing is ever silently lost, and nothing hangs.
//!
//! ## Adding the suite to a transport
//!
//! Add `zcmsg-conformance` as a dev-dependency and write one test file with
//! one macro call. The [`Harness`] takes a device factory (called once per
//! simulated host; cases that need two hosts call it twice, and both may live
//! in one process) and a listen-address generator from [`addr`]:
//!
//! ```ignore
//! // transports/soft/tests/conformance.rs
//! zcmsg_conformance::suite!(
//!     soft,
//!     zcmsg_conformance::Harness::new(
//!         || zcmsg_soft::SoftDevice::new() as std::sync::Arc<dyn zcmsg::Transport>,
//!         zcmsg_conformance::addr::named("soft"),
//!     )
//! );
//! ```
//!
//! A transport that only works in a lab (the verbs transport needs a
//! Soft-RoCE device) marks every generated test ignored on the host and runs
//! them in the lab with `cargo test -- --include-ignored`:
//!
//! ```ignore
//! zcmsg_conformance::suite!(
//!     verbs,
//!     zcmsg_conformance::Harness::new(open_rxe, zcmsg_conformance::addr::ip_any_port("192.0.2.1"))
//!         .scale(0.2)
//!         .timeout(std::time::Duration::from_secs(60)),
//!     ignore = "needs the Soft-RoCE lab"
//! );
//! ```
//!
//! The macro expands into a module (named by the first argument) with one
//! `#[test]` per case, each calling the `pub fn` of the same name in
//! [`cases`], so `cargo test` reports failures case by case and
//! `cargo test soft::rdma_read` runs one. The harness expression is evaluated
//! once per test binary.
//!
//! Knobs for slow environments (QEMU guests run 10-50x slower): the
//! harness's [`Harness::scale`] multiplies iteration counts and
//! [`Harness::timeout`] bounds every single wait (default 10 s); the
//! environment variables `ZCMSG_CONFORMANCE_SCALE` (multiplies) and
//! `ZCMSG_CONFORMANCE_TIMEOUT_SECS` (replaces) adjust them without a rebuild.
//! Every wait is bounded: a hang becomes a failure that says what was awaited.
//!
//! Memory: the largest cases (64 MiB WRITE and READ) hold about 130 MiB each.
//!
//! ## The cases
//!
//! On a device without a feature a case needs (atomics, shared receive
//! queues, inline data: see `DeviceCaps`), the case checks that the
//! feature is refused instead of returning early; the soft device runs the
//! suite twice, the second time without atomics and shared receive queues
//! (`soft_lean`), so those checks run too. Two cases still step aside on
//! device limits, saying so on stderr: `post_message_too_large` when
//! `max_msg_sz + 1` bytes need more SGEs of at most 64 MiB than the queue
//! pair grants, and `recv_scatter` with fewer than two receive SGEs. Both
//! run in full on the soft device and on rxe.
//!
//! Operations and their data:
//! - `send_recv_small`: SENDs of 1..4096 bytes; payload, `byte_len`, opcodes, `qp_num`, no immediate.
//! - `send_zero_length`: empty SEND, SEND_WITH_IMM and WRITE_WITH_IMM consume receives with `byte_len` 0.
//! - `send_with_imm`: immediate values (0, 1, `u32::MAX`, patterns) arrive unchanged with the payload.
//! - `rdma_write`: WRITEs at odd offsets and lengths land exactly there; no receive consumed.
//! - `rdma_write_with_imm`: consumes a receive (with or without SGEs), delivers imm and `byte_len`, leaves the receive buffer alone.
//! - `imm_with_large_byte_len`: SEND_WITH_IMM and WRITE_WITH_IMM of a few hundred KiB deliver the whole `byte_len` beside the immediate, and their bytes.
//! - `rdma_read`: READs of sub-ranges of a peer's registered `Bytes`; data, opcode, `byte_len`.
//! - `atomic_cmp_and_swp`: old value returned to the local SGE, swap only on a match.
//! - `atomic_fetch_and_add`: old values returned, sums wrap.
//! - `inline_send`: inline SENDs up to the queue pair's `max_inline_data`, source overwritten right after the post.
//! - `post_inline_from_slice`: `post_inline` SENDs (with and without immediate) from an unregistered buffer, 0 bytes to the inline limit, in order with usual SENDs; over the limit refused at post time.
//! - `inline_write`: the same for an inline RDMA WRITE.
//! - `window_flag_byte`: on DMA devices a window's flag byte shows each peer WRITE (no completion on the target); elsewhere `load_byte` refuses.
//! - `unsignaled_covered_by_signaled`: unsignaled successes give no completion; a signaled one covers them; a READ sees earlier unsignaled WRITEs.
//! - `post_list`: one post of 32 mixed requests and one of 32 receives; completions in order.
//! - `post_list_shapes`: SENDs of changing shapes in one list (gather, scatter, empty SGE, immediate, inline, one past the posted receives), and a list failing in its middle: each lands or fails in place.
//! - `post_list_same_region_out_of_bounds`: in a list of SENDs from (or into receives of) one region, one whose SGE has that region's key but crosses its end fails in place (the range is checked per request, even where a device translates the region once per list).
//! - `poll_cq_small_batches`: polling one or three at a time (and with an empty buffer) loses nothing.
//! - `same_device_pair`: both ends on one device: SEND, WRITE, READ, atomic.
//! - `zero_copy_send`: registered `Bytes` through `SgeBuilder::send` leave the copy counters at zero.
//!
//! Completion errors, on the right side, then the error state and flushes:
//! - `err_recv_too_small`: `LocLenErr` on the receiver, `RemInvReqErr` on the sender (rxe: `LocQpOpErr` / `RemOpErr`), both flush the rest.
//! - `err_bad_rkey`: unknown or deregistered rkey: `RemAccessErr` (WRITE, READ, atomic).
//! - `err_remote_out_of_bounds`: outside the rkey's region (byte-granular): `RemAccessErr`, nothing written.
//! - `err_remote_write_without_access`: WRITE to memory without `REMOTE_WRITE`: `RemAccessErr`.
//! - `err_remote_read_without_access`: READ from memory without `REMOTE_READ`: `RemAccessErr`.
//! - `err_atomic_without_access`: atomics without `REMOTE_ATOMIC`: `RemAccessErr`.
//! - `err_atomic_misaligned`: atomics on an address not 8-byte aligned: refused at post time, or `RemInvReqErr`.
//! - `err_local_bad_lkey`: local SGE with an unknown lkey: `LocProtErr`.
//! - `err_local_sge_out_of_bounds`: local SGE outside its region: `LocProtErr`.
//! - `err_unsignaled_failure_completes`: an unsignaled request that fails still reports it.
//! - `err_post_after_error`: posting in the error state is refused or flushed, never run.
//! - `err_inline_unregistered`: an inline SGE outside registered memory is refused or completes `LocProtErr`.
//!
//! Refusals at post time (`PostError` with the index of the first request not posted):
//! - `post_too_many_sges`: SEND and receive lists with one SGE too many.
//! - `post_queue_full`: `max_send_wr + 1` requests while nothing can complete.
//! - `post_recv_queue_full`: `max_recv_wr + 1` receives.
//! - `post_inline_too_large`: inline payload over `max_inline_data`.
//! - `post_message_too_large`: SEND and WRITE over `max_msg_sz`.
//!
//! Flow:
//! - `rnr_retry_exceeded`: no receive and a small `rnr_retry`: `RnrRetryExcErr` (SEND and WRITE_WITH_IMM), never silently lost.
//! - `rnr_late_recv_delivered`: SENDs posted before their receives wait and arrive in order.
//! - `rnr_progress_without_sender_polling`: a waiting SEND is delivered once a receive is posted, with the sender idle.
//! - `ordering_sends`: thousands of SENDs with sequence numbers arrive once, in order, intact.
//! - `ordering_write_then_send_imm`: a WRITE is visible when the SEND_WITH_IMM / WRITE_WITH_IMM behind it arrives.
//! - `backpressure_small_queue`: a producer thread against a 4-deep send queue, a consumer thread reposting.
//!
//! Scale:
//! - `many_queue_pairs`: 64 queue pairs on one device pair, traffic both ways on each.
//! - `large_rdma_write`, `large_rdma_read`: 64 MiB split by `RwPlan` at `max_msg_sz`.
//! - `send_gather_max_sges`: a SEND of `max_send_sge` SGEs from three arenas into one receive.
//! - `recv_scatter`: a receive over several SGEs at offsets in their slots.
//! - `write_gather_read_scatter`: a WRITE gathering many SGEs, a READ scattering into `max_sge_rd`.
//!
//! Concurrency and shared resources:
//! - `atomic_fetch_add_contention`: 4 threads, 4 queue pairs, one counter: exact total, distinct old values.
//! - `atomic_cmp_swap_contention`: CAS increment loops from 4 threads: exact total.
//! - `srq_two_qps`: two queue pairs receiving through one shared receive queue; one failing leaves it to the other.
//! - `srq_recv_too_small`: a shared receive too small fails only the queue pair that took it; the next one serves the other.
//! - `srq_many_senders`: four sender threads into four queue pairs on one shared receive queue, reposted by four receiver threads.
//!
//! Teardown:
//! - `teardown_drop_peer`: one side vanishes with work in flight; the other's requests all fail, no hang, no leak.
//! - `teardown_disconnect`: `disconnect()` with work in flight on both sides; flushes, no hang, no leak.
//! - `teardown_recv_before_later_send_error`: a receive completed before a send failed is polled before the failure.
//! - `deregister_stops_remote_access`: once deregistering returns, a peer's WRITEs no longer touch the memory.
//! - `registration_churn_under_traffic`: arenas and windows come and go on another thread while traffic flows.
//!
//! Connections:
//! - `connect_private_data`: private data up to 56 bytes arrives; 57 is refused.
//! - `connect_refused`: nobody listening: an error, not a hang.
//! - `listen_address_in_use`: `AddressInUse`, and the address is free again after the listener drops.
//! - `qp_caps_and_state`: granted capabilities cover the request; beyond the device limits fails.
//! - `arm_wakes_on_completion`: `arm` wakes on the next completion and never misses one already waiting.
//! - `arm_wakes_on_peer_disconnect`: an armed receiver is woken (its receives flushed) when the peer disconnects.
//!
//! Endpoints and RPC (each runs through the device, then again with the in-process handoff on):
//! - `ep_message_integrity_all_sizes`: 0 B to 64 MiB across the eager/rendezvous threshold, echoed byte for byte, no bounce or coalescing of registered memory.
//! - `ep_vectored_and_foreign_messages`: 20-chunk messages, registered and foreign; eager bounces the foreign bytes, rendezvous copies nothing.
//! - `ep_credit_exhaustion_and_recovery`: a receiver holding every message gets exactly its receive slots, then everything arrives in order.
//! - `ep_rpc_many_concurrent_calls`: 1000 calls in flight, each answered once and matched; an unknown method is a typed error.
//! - `ep_rpc_bulk_pull_and_push`: the server READs 4 MiB from the client and WRITEs the result back; a handler pulls 64 KiB into a slot of its own arena (`pull_into`), and a slot too small for the pull is refused.
//! - `ep_rpc_timeout_and_stray_reply` (through the device only): the late reply of a call that timed out is dropped and the next call goes on; a reply to a call never made is a typed error.
//! - `ep_recv_slot`: `try_recv_slot` hands over every message from one byte to the eager limit, inline or not, byte for byte in a receive slot of its own (the header in the immediate), an empty one too; given back with `recycle`, three times the receive slots go round with credits flowing, one in eight kept as `Bytes` stays intact; the receiving side copies nothing; end of stream arrives. With the in-process handoff on, each message comes as the sender's own `Bytes`, intact, and `recycle` takes it.
//! - `ep_small_messages_bundled`: small messages queued together share one SEND and one receive slot (bundles, counted as coalescing copies) and still arrive as separate zero-copy messages, intact and in order.
//! - `ep_queued_burst`: messages queued with `Endpoint::queue` stay unposted until `flush_sends`, then arrive complete and in order (eager and rendezvous mixed); one queued on an idle endpoint goes out with its next `progress`.
//! - `ep_recv_timeout`: `recv_timeout` with nothing sent waits its whole timeout and says so (zero included); messages sent before the wait, and one sent from another thread during it, arrive byte for byte and in order; then end of stream.
//! - `ep_copy_path` (through the device only): `try_send_slice` and `try_recv_into` move small messages byte for byte without `Bytes`; a slice over the inline limit is not sent, a buffer too small is refused with the message kept, copy and zero-copy receives take turns, copied-out slots keep credits flowing, counted as `copy_out`.
//! - `ep_small_messages_inline` (through the device only): messages that fit `max_inline_data` with their header are copied at post time (counted, foreign memory not bounced) and release their chunks at once; larger eager ones hold theirs until the completion.
//! - `ep_graceful_close`: everything before the close arrives, then end of stream; a second close and a late send are typed errors.
//! - `ep_peer_failure_mid_stream`: the peer vanishes; the failure is reported in bounded time and later sends are refused.
//! - `ep_silent_peer_under_slow_polling`: a connected peer that stops talking fails the connection by the heartbeat timeout, also for an application that polls slowly with its own sleeps.
//! - `ep_async_under_tokio_and_cancellation`: async send/recv/close under tokio; a dropped send future leaves its buffer parked until the device is done.

#![forbid(unsafe_code)]

pub mod addr;
pub mod cases;
pub mod check;
pub mod harness;

pub use harness::{Endpoint, Harness, HarnessError, Host, Pair, Tracked};

/// Expand into a module of `#[test]` functions, one per conformance case.
///
/// `suite!(name, harness_expr)` or `suite!(name, harness_expr, ignore = "reason")`;
/// see the [crate documentation](crate) for an example.
#[macro_export]
macro_rules! suite {
    ($name:ident, $harness:expr, ignore = $reason:literal $(,)?) => {
        $crate::suite!(@module $name, $harness, [$reason]);
    };
    ($name:ident, $harness:expr $(,)?) => {
        $crate::suite!(@module $name, $harness, []);
    };
    (@module $name:ident, $harness:expr, $ignore:tt) => {
        #[allow(unused_imports)]
        mod $name {
            use super::*;

            fn harness() -> &'static $crate::Harness {
                static HARNESS: ::std::sync::OnceLock<$crate::Harness> = ::std::sync::OnceLock::new();
                HARNESS.get_or_init(|| $harness)
            }

            $crate::__for_each_case!([$crate::__suite_tests] $ignore);
        }
    };
}

/// Call the macro named in brackets with the extra tokens, then every case
/// name: the one list of cases, shared by [`suite!`] and [`cases::ALL`].
#[doc(hidden)]
#[macro_export]
macro_rules! __for_each_case {
    ([$($cb:tt)*] $($args:tt)*) => {
        $($cb)*! { $($args)* ;
            send_recv_small,
            send_zero_length,
            send_with_imm,
            rdma_write,
            rdma_write_with_imm,
            imm_with_large_byte_len,
            rdma_read,
            atomic_cmp_and_swp,
            atomic_fetch_and_add,
            inline_send,
            post_inline_from_slice,
            inline_write,
            window_flag_byte,
            unsignaled_covered_by_signaled,
            post_list,
            post_list_shapes,
            post_list_same_region_out_of_bounds,
            poll_cq_small_batches,
            same_device_pair,
            zero_copy_send,
            err_recv_too_small,
            err_bad_rkey,
            err_remote_out_of_bounds,
            err_remote_write_without_access,
            err_remote_read_without_access,
            err_atomic_without_access,
            err_atomic_misaligned,
            err_local_bad_lkey,
            err_local_sge_out_of_bounds,
            err_unsignaled_failure_completes,
            err_post_after_error,
            err_inline_unregistered,
            post_too_many_sges,
            post_queue_full,
            post_recv_queue_full,
            post_inline_too_large,
            post_message_too_large,
            rnr_retry_exceeded,
            rnr_late_recv_delivered,
            rnr_progress_without_sender_polling,
            ordering_sends,
            ordering_write_then_send_imm,
            backpressure_small_queue,
            many_queue_pairs,
            large_rdma_write,
            large_rdma_read,
            send_gather_max_sges,
            recv_scatter,
            write_gather_read_scatter,
            atomic_fetch_add_contention,
            atomic_cmp_swap_contention,
            srq_two_qps,
            srq_recv_too_small,
            srq_many_senders,
            teardown_drop_peer,
            teardown_disconnect,
            teardown_recv_before_later_send_error,
            deregister_stops_remote_access,
            registration_churn_under_traffic,
            connect_private_data,
            connect_refused,
            listen_address_in_use,
            qp_caps_and_state,
            arm_wakes_on_completion,
            arm_wakes_on_peer_disconnect,
            ep_message_integrity_all_sizes,
            ep_vectored_and_foreign_messages,
            ep_credit_exhaustion_and_recovery,
            ep_rpc_many_concurrent_calls,
            ep_rpc_bulk_pull_and_push,
            ep_rpc_timeout_and_stray_reply,
            ep_graceful_close,
            ep_queued_burst,
            ep_recv_timeout,
            ep_small_messages_inline,
            ep_copy_path,
            ep_recv_slot,
            ep_small_messages_bundled,
            ep_peer_failure_mid_stream,
            ep_silent_peer_under_slow_polling,
            ep_async_under_tokio_and_cancellation,
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __suite_tests {
    ($ignore:tt ; $($case:ident),* $(,)?) => {
        $( $crate::__suite_test!($ignore $case); )*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __suite_test {
    ([] $case:ident) => {
        #[test]
        fn $case() {
            $crate::cases::$case(harness())
        }
    };
    ([$reason:literal] $case:ident) => {
        #[test]
        #[ignore = $reason]
        fn $case() {
            $crate::cases::$case(harness())
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __case_table {
    (; $($case:ident),* $(,)?) => {
        &[ $( (stringify!($case), $crate::cases::$case as $crate::cases::Case) ),* ]
    };
}

#[cfg(test)]
mod tests {
    /// Cases described in the docs above (lines starting with "//! - `").
    fn cases_in_docs() -> usize {
        include_str!("lib.rs")
            .lines()
            .filter(|l| l.starts_with("//! - `"))
            .map(|l| l.matches("`, `").count() + 1)
            .sum()
    }

    #[test]
    fn docs_list_every_case_once() {
        let docs = include_str!("lib.rs");
        let mut names = std::collections::HashSet::new();
        for (name, _) in crate::cases::ALL {
            assert!(names.insert(*name), "case {name} listed twice");
            assert!(
                docs.contains(&format!("- `{name}`"))
                    || docs.contains(&format!("`{name}`,"))
                    || docs.contains(&format!(", `{name}`")),
                "the crate docs do not describe case {name}"
            );
        }
        assert_eq!(names.len(), cases_in_docs());
    }
}
