//! Atomics under contention: several threads, each with its own queue pair,
//! on one remote 8-byte counter.

use super::prelude::*;

const THREADS: usize = 4;

/// Two hosts, `THREADS` queue pairs between them, a zeroed atomic window on `b`.
fn setup(h: &Harness) -> (Host, Host, Vec<Endpoint>, Vec<Endpoint>, Window) {
    let (a, b) = (h.host(), h.host());
    let mut cfg = h.qp_config();
    cfg.max_send_wr = 16.min(h.caps().max_qp_wr);
    let (xs, ys): (Vec<Endpoint>, Vec<Endpoint>) =
        h.connect(&a, &b, THREADS, &cfg, &cfg).into_iter().unzip();
    let mut win = b.window(64, Access::REMOTE_ATOMIC);
    win.fill(0);
    (a, b, xs, ys, win)
}

/// `THREADS` threads each run N fetch-and-adds of 1 on the same remote
/// counter through their own queue pair, several in flight: the final value
/// is exactly `THREADS * N` and the returned old values are exactly
/// `0 .. THREADS * N`, each once.
pub fn atomic_fetch_add_contention(h: &Harness) {
    if !atomics_supported(h) {
        return;
    }
    let per = h.iterations(1000);
    let (a, _b, xs, _ys, win) = setup(h);
    let r = win.remote();
    let arenas: Vec<Arena> = (0..THREADS).map(|_| a.arena(4096, 1)).collect();
    let olds: Vec<Vec<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = xs
            .into_iter()
            .zip(&arenas)
            .map(|(mut x, arena)| {
                s.spawn(move || {
                    let res = slot_filled(arena, 0xEE);
                    let batch = (x.caps().max_send_wr as usize).clamp(1, 16);
                    let mut olds = Vec::with_capacity(per);
                    while olds.len() < per {
                        let k = batch.min(per - olds.len());
                        let base = olds.len() as u64;
                        let sgs: Vec<[Sge; 1]> =
                            (0..k).map(|j| [res.sge_range(j * 8, 8)]).collect();
                        let wrs: Vec<WorkRequest<'_>> = sgs
                            .iter()
                            .enumerate()
                            .map(|(j, sg)| {
                                WorkRequest::one_sided(
                                    base + j as u64,
                                    Opcode::AtomicFetchAndAdd,
                                    sg,
                                    r.addr,
                                    r.rkey,
                                )
                                .with_atomic(1, 0)
                            })
                            .collect();
                        x.post_send(&wrs);
                        for j in 0..k {
                            let wc = x.next("fetch-and-add under contention");
                            expect_ok(&wc, base + j as u64, WcOpcode::FetchAdd, "fetch-and-add");
                        }
                        olds.extend((0..k).map(|j| u64_at(res.as_slice(), j * 8)));
                    }
                    olds
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let total = (THREADS * per) as u64;
    let mut all: Vec<u64> = olds.into_iter().flatten().collect();
    all.sort_unstable();
    let dupes = all.windows(2).filter(|w| w[0] == w[1]).count();
    assert_eq!(
        dupes, 0,
        "{dupes} old values returned twice: two fetch-and-adds were not atomic"
    );
    assert!(
        all.iter().copied().eq(0..total),
        "the old values are not exactly 0..{total} (first {:?}, last {:?})",
        &all[..all.len().min(8)],
        &all[all.len().saturating_sub(8)..]
    );
    assert_eq!(
        u64_at(win.revoke().as_slice(), 0),
        total,
        "final counter after {total} fetch-and-adds"
    );
}

/// `THREADS` threads each increment the same remote counter N times with a
/// compare-and-swap loop (the returned old value is the next guess): the
/// final value is exactly `THREADS * N`, and the values each thread swapped
/// out, over all threads, are exactly `0 .. THREADS * N`.
pub fn atomic_cmp_swap_contention(h: &Harness) {
    if !atomics_supported(h) {
        return;
    }
    let per = h.iterations(200);
    let (a, _b, xs, _ys, win) = setup(h);
    let r = win.remote();
    let arenas: Vec<Arena> = (0..THREADS).map(|_| a.arena(4096, 1)).collect();
    let limit = per * THREADS * 64 + 1000;
    let wins: Vec<Vec<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = xs
            .into_iter()
            .zip(&arenas)
            .map(|(mut x, arena)| {
                s.spawn(move || {
                    let res = slot_filled(arena, 0xEE);
                    let sg = [res.sge_range(0, 8)];
                    let (mut guess, mut attempts) = (0u64, 0usize);
                    let mut won = Vec::with_capacity(per);
                    while won.len() < per {
                        attempts += 1;
                        assert!(
                            attempts < limit,
                            "{} CAS attempts for {per} increments: no progress",
                            attempts
                        );
                        x.post_send(&[WorkRequest::one_sided(
                            attempts as u64,
                            Opcode::AtomicCmpAndSwp,
                            &sg,
                            r.addr,
                            r.rkey,
                        )
                        .with_atomic(guess, guess + 1)]);
                        let wc = x.next("compare-and-swap under contention");
                        expect_ok(&wc, attempts as u64, WcOpcode::CompSwap, "compare-and-swap");
                        let old = u64_at(res.as_slice(), 0);
                        if old == guess {
                            won.push(guess);
                            guess += 1;
                        } else {
                            assert!(
                                old > guess,
                                "the counter went backwards: saw {old} after {guess}"
                            );
                            guess = old;
                        }
                    }
                    won
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let total = (THREADS * per) as u64;
    let mut all: Vec<u64> = wins.into_iter().flatten().collect();
    all.sort_unstable();
    assert!(
        all.iter().copied().eq(0..total),
        "successful swaps are not exactly 0..{total}: two threads won the same value, or one was lost"
    );
    assert_eq!(
        u64_at(win.revoke().as_slice(), 0),
        total,
        "final counter after {total} CAS increments"
    );
}
