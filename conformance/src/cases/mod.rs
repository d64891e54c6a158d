//! The cases. Each is a `pub fn(&Harness)` that panics with a message naming
//! what was expected and what was observed; [`suite!`](crate::suite) turns
//! every one into its own `#[test]`. Cases that need an optional device
//! feature (atomics, shared receive queues, inline data) pass with a note on
//! stderr when the device lacks it.

mod atomics;
mod conn;
mod endpoints;
mod errors;
mod flow;
mod ops;
mod post;
mod scale;
mod srq;
mod teardown;

pub use atomics::*;
pub use conn::*;
pub use endpoints::*;
pub use errors::*;
pub use flow::*;
pub use ops::*;
pub use post::*;
pub use scale::*;
pub use srq::*;
pub use teardown::*;

/// A case: runs against a harness, panics on failure.
pub type Case = fn(&crate::Harness);

/// Every case by name, in the order the suite lists them.
pub const ALL: &[(&str, Case)] = crate::__for_each_case!([crate::__case_table]);

/// What every case file uses.
pub(crate) mod prelude {
    pub(crate) use std::time::Duration;

    pub(crate) use bytes::{BufMut, Bytes};
    pub(crate) use zcmsg::{
        Access, Arena, ArenaConfig, Armed, Opcode, PostError, QpConfig, QpState, RecvRequest,
        RwPlan, SendFlags, Sge, SlotMut, TransportError, UnregisteredPolicy, WcOpcode, WcStatus,
        Window, WorkCompletion, WorkRequest,
    };

    pub(crate) use crate::check::*;
    pub(crate) use crate::harness::{Endpoint, Harness, Host, Pair};

    /// How long "nothing else happens" is watched for.
    pub(crate) const QUIET: Duration = Duration::from_millis(20);

    /// Post `n` receives (whole slots of `arena`, pre-filled with 0xEE) with
    /// ids `first_wr..`; returns the slots in order.
    #[track_caller]
    pub(crate) fn post_recvs(
        ep: &mut Endpoint,
        arena: &Arena,
        first_wr: u64,
        n: usize,
    ) -> Vec<SlotMut> {
        let slots: Vec<SlotMut> = (0..n).map(|_| slot_filled(arena, 0xEE)).collect();
        let sgs: Vec<[Sge; 1]> = slots.iter().map(|s| [s.sge()]).collect();
        let wrs: Vec<RecvRequest<'_>> = sgs
            .iter()
            .enumerate()
            .map(|(i, sg)| RecvRequest {
                wr_id: first_wr + i as u64,
                sg_list: sg,
            })
            .collect();
        if !wrs.is_empty() {
            ep.post_recv(&wrs);
        }
        slots
    }

    /// True if the device does atomics. If it does not, the atomic cases
    /// check this instead: an atomic request is refused at post time, and
    /// the remote word is untouched.
    pub(crate) fn atomics_supported(h: &Harness) -> bool {
        if h.caps().atomics {
            return true;
        }
        let mut p = h.connected_pair(&h.qp_config(), &h.qp_config());
        let mut win = p.b.window(64, Access::REMOTE_ATOMIC);
        win.fill(0x5A);
        let r = win.remote();
        let la = p.a.arena(64, 1);
        let res = slot_filled(&la, 0xEE);
        let e =
            p.qa.try_post_send(&[WorkRequest::one_sided(
                1,
                Opcode::AtomicFetchAndAdd,
                &[res.sge_range(0, 8)],
                r.addr,
                r.rkey,
            )
            .with_atomic(1, 0)])
                .expect_err("an atomic request on a device without atomics");
        assert_eq!(e.index, 0, "refused at the atomic request: {e}");
        check_bytes(
            win.revoke().as_slice(),
            &[0x5A; 64],
            "the remote word after a refused atomic",
        );
        false
    }

    /// True if the device has shared receive queues. If it has none, the
    /// SRQ cases check this instead: creating one is refused.
    pub(crate) fn srq_supported(h: &Harness) -> bool {
        if h.caps().srq {
            return true;
        }
        let b = h.host();
        assert!(
            b.dev.create_srq(64, 1).is_err(),
            "{}: create_srq succeeded on a device that reports no SRQ support",
            h.caps().name
        );
        false
    }

    /// The native-endian u64 at `off`.
    pub(crate) fn u64_at(b: &[u8], off: usize) -> u64 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[off..off + 8]);
        u64::from_ne_bytes(w)
    }

    /// The first eight native-endian words of `b`.
    pub(crate) fn words_of(b: &[u8]) -> [u64; 8] {
        std::array::from_fn(|i| u64_at(b, i * 8))
    }

    /// Run `f` on its own thread and panic if it does not return within
    /// `timeout` (a transport call that hangs fails the case instead).
    #[track_caller]
    pub(crate) fn bounded<T: Send + 'static>(
        timeout: Duration,
        what: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        });
        match rx.recv_timeout(timeout) {
            Ok(Ok(v)) => v,
            Ok(Err(p)) => std::panic::resume_unwind(p),
            Err(_) => panic!("{what} did not return within {timeout:?}: a hang"),
        }
    }
}
