//! Helpers shared by the soft device's tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BufMut;
use zcmsg::{
    Access, Arena, ArenaConfig, Pd, QpConfig, QueuePair, RecvRequest, SlotMut, WcStatus, Window,
    WorkCompletion,
};
use zcmsg_soft::{SoftDevice, SoftQp};

/// A device, its protection domain and one arena.
pub struct Env {
    pub dev: Arc<SoftDevice>,
    pub pd: Pd,
    pub arena: Arena,
}

pub fn env() -> Env {
    env_on(SoftDevice::new())
}

pub fn env_on(dev: Arc<SoftDevice>) -> Env {
    let pd = Pd::new(dev.clone());
    let arena = pd
        .arena(ArenaConfig {
            huge_pages: zcmsg::HugePages::Never,
            ..ArenaConfig::new(4096, 64)
        })
        .unwrap();
    Env { dev, pd, arena }
}

impl Env {
    /// A slot filled with `data`.
    pub fn slot(&self, data: &[u8]) -> SlotMut {
        let mut s = self.arena.alloc().expect("arena exhausted");
        s.put_slice(data);
        s
    }

    /// An empty slot (a receive or READ target).
    pub fn empty(&self) -> SlotMut {
        self.arena.alloc().expect("arena exhausted")
    }

    /// A remotely accessible window filled with `byte`.
    pub fn window(&self, len: usize, access: Access, byte: u8) -> Window {
        let mut w = self.pd.window(len, access).unwrap();
        w.fill(byte);
        w
    }
}

/// A small queue pair configuration.
pub fn cfg() -> QpConfig {
    QpConfig {
        max_send_wr: 64,
        max_recv_wr: 64,
        max_send_sge: 8,
        max_recv_sge: 8,
        max_inline_data: 128,
        ..QpConfig::default()
    }
}

/// A pattern of `len` bytes that differs per `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Poll until `n` completions arrived (hang protection only: 30 s).
pub fn poll_n(qp: &mut dyn QueuePair, n: usize) -> Vec<WorkCompletion> {
    let mut out = Vec::new();
    let mut wc = [WorkCompletion::EMPTY; 16];
    let start = Instant::now();
    while out.len() < n {
        let k = qp.poll_cq(&mut wc[..(n - out.len()).min(16)]);
        out.extend_from_slice(&wc[..k]);
        if k == 0 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no completion: waited for {n}, got {out:?}"
            );
            std::thread::yield_now();
        }
    }
    out
}

/// Everything pollable right now.
pub fn poll_now(qp: &mut dyn QueuePair) -> Vec<WorkCompletion> {
    let mut out = Vec::new();
    let mut wc = [WorkCompletion::EMPTY; 16];
    loop {
        let k = qp.poll_cq(&mut wc);
        if k == 0 {
            return out;
        }
        out.extend_from_slice(&wc[..k]);
    }
}

/// Post one receive of `slot`'s whole capacity.
pub fn post_recv(qp: &mut dyn QueuePair, wr_id: u64, slot: &SlotMut) {
    qp.post_recv(&[RecvRequest {
        wr_id,
        sg_list: &[slot.sge()],
    }])
    .unwrap();
}

/// The soft queue pair behind a `dyn QueuePair`.
pub fn soft(qp: &dyn QueuePair) -> &SoftQp {
    qp.as_any()
        .downcast_ref::<SoftQp>()
        .expect("a soft queue pair")
}

/// `(wr_id, status)` of each completion.
pub fn ids(wcs: &[WorkCompletion]) -> Vec<(u64, WcStatus)> {
    wcs.iter().map(|w| (w.wr_id, w.status)).collect()
}
