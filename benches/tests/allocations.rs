//! The hot path allocates nothing beyond the one small allocation
//! `Bytes::from_owner` makes per buffer handed to the application: counted
//! here with a counting allocator, on the in-process device, both ends
//! driven by this thread, after a warm-up (the queues and tables have
//! grown to their working size):
//!
//! - the copy path (`try_send_slice` / `try_recv_into`): no allocation;
//! - the `Bytes` path (`try_send` / `try_recv`): one per message received;
//! - an RPC echo call (`start_call` / `progress` / `poll_reply`, a handler
//!   answering with its request): one for the request the server's handler
//!   gets and one for the reply the client gets; over 256 bytes, one more
//!   per message for its header slot (see below).
//!
//! (Its own test binary: the allocator is the process's.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{BufMut, Bytes};
use zcmsg::{ArenaConfig, Endpoint};
use zcmsg_bench::onethread::{pair, recv, recv_into, recv_slot, rpc_call, rpc_echo_pair};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is passed to the system allocator unchanged; the
// count is a thread-local `Cell` that itself never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Allocations this thread made while `f` ran.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = ALLOCS.with(Cell::get);
    f();
    ALLOCS.with(Cell::get) - before
}

/// Allocations in `N` runs of `f`, after `WARM` runs to reach the working
/// size of every queue and table.
fn steady_allocations(mut f: impl FnMut()) -> u64 {
    for _ in 0..WARM {
        f();
    }
    allocations(|| {
        for _ in 0..N {
            f();
        }
    })
}

const WARM: usize = 2_000;
const N: usize = 10_000;

#[test]
fn the_copy_path_allocates_nothing() {
    let (mut a, mut b) = pair();
    let msg = [0x5au8; 64];
    let mut buf = [0u8; 128];
    let mut round_trip = |a: &mut Endpoint, b: &mut Endpoint| {
        while a.try_send_slice(&msg).expect("send").is_none() {
            a.progress();
            b.progress();
        }
        let n = recv_into(b, a, &mut buf);
        assert_eq!(buf[..n], msg);
        while b.try_send_slice(&buf[..n]).expect("echo").is_none() {
            a.progress();
            b.progress();
        }
        let n = recv_into(a, b, &mut buf);
        assert_eq!(buf[..n], msg);
    };
    let n = steady_allocations(|| round_trip(&mut a, &mut b));
    assert_eq!(n, 0, "allocations in {N} round trips on the copy path");
}

#[test]
fn the_slot_path_allocates_nothing() {
    let (mut a, mut b) = pair();
    let msg = [0x3cu8; 64];
    // A larger message from registered memory, made once (a clone of it
    // allocates nothing).
    let arena = a.pd().arena(ArenaConfig::new(2000, 2)).expect("arena");
    let mut slot = arena.alloc().expect("slot");
    slot.put_bytes(0x77, 2000);
    let big = slot.freeze();
    let round_trip = |a: &mut Endpoint, b: &mut Endpoint, data: &Bytes| {
        // A small message goes at once, a larger one through the queue;
        // both arrive in a slot of their own, read in place and given back.
        if data.len() <= a.inline_limit() {
            while a.try_send_slice(data).expect("send").is_none() {
                a.progress();
                b.progress();
            }
        } else {
            a.try_send(data.clone()).expect("send");
        }
        let m = recv_slot(b, a);
        assert!(m[..] == *data && m.owns_slot());
        while b
            .try_send_slice(&m[..m.len().min(64)])
            .expect("echo")
            .is_none()
        {
            a.progress();
            b.progress();
        }
        b.recycle(m);
        let m = recv_slot(a, b);
        assert!(m[..] == data[..data.len().min(64)]);
        a.recycle(m);
    };
    let small = Bytes::copy_from_slice(&msg);
    let n = steady_allocations(|| round_trip(&mut a, &mut b, &small));
    assert_eq!(n, 0, "allocations in {N} round trips on the slot path");
    let n = steady_allocations(|| round_trip(&mut a, &mut b, &big));
    assert_eq!(
        n, 0,
        "allocations in {N} round trips of a registered 2000-byte request on the slot path"
    );
}

#[test]
fn the_bytes_path_allocates_once_per_message_received() {
    let (mut a, mut b) = pair();
    let msg = Bytes::from_static(&[0xa5; 64]);
    let round_trip = |a: &mut Endpoint, b: &mut Endpoint| {
        a.try_send(msg.clone()).expect("send");
        let m = recv(b, a);
        b.try_send(m).expect("echo");
        assert_eq!(recv(a, b), msg);
    };
    let n = steady_allocations(|| round_trip(&mut a, &mut b));
    assert_eq!(
        n,
        2 * N as u64,
        "allocations in {N} round trips (two messages received each)"
    );
}

#[test]
fn an_rpc_call_allocates_once_per_message_received() {
    let (mut client, mut server) = rpc_echo_pair();
    let req = Bytes::from_static(b"an eight-byte-ish request");
    let call = || assert_eq!(rpc_call(&mut client, &mut server, req.clone()), req);
    let n = steady_allocations(call);
    assert_eq!(
        n,
        2 * N as u64,
        "allocations in {N} calls (the request and the reply received)"
    );
}

#[test]
fn a_large_rpc_call_allocates_only_for_its_header_slots_beyond_that() {
    // Over the 256-byte inline frame a message goes as its header slot
    // and the body's own chunk (zero-copy), as `Msg::Two`: no `Vec`. The
    // header slot made `Bytes` is one allocation per message, on top of
    // the one per message received.
    let (mut client, mut server) = rpc_echo_pair();
    let arena = client
        .endpoint()
        .pd()
        .arena(zcmsg::ArenaConfig::new(1024, 4))
        .expect("arena");
    let mut slot = arena.alloc().expect("slot");
    bytes::BufMut::put_bytes(&mut slot, 7, 1024);
    let req = slot.freeze();
    let call = || assert_eq!(rpc_call(&mut client, &mut server, req.clone()), req);
    let n = steady_allocations(call);
    assert_eq!(
        n,
        4 * N as u64,
        "allocations in {N} calls of 1 KiB (two received, two header slots)"
    );
}
