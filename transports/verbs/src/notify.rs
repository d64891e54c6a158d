//! Sleeping on completions and connection events: one small thread per device.
//!
//! Every completion queue of a device reports to the device's one completion
//! channel, tagged with its queue pair's key; every connected rdma_cm id is
//! migrated to the device's one connection event channel, tagged the same
//! way. The thread blocks in `epoll_wait` on both descriptors (and an eventfd
//! that stops it), acknowledges every event at once (so destroying a CQ or an
//! id never waits on it), and wakes the waker the queue pair stored in
//! [`QueuePair::arm`](zcmsg::QueuePair::arm). It never touches a queue pair's
//! verbs objects: a peer's disconnect only sets a flag that the queue pair's
//! owner acts on (moving the QP to the error state) the next time it polls.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::thread::JoinHandle;

use zcmsg::TransportError;

use crate::sys::{self, CompChannel, EventChannel, EventFd};

/// What the event thread shares with one queue pair.
#[derive(Default)]
pub(crate) struct QpShared {
    /// Woken once at the next completion event (set by `arm`).
    pub waker: Mutex<Option<Waker>>,
    /// The peer disconnected (or the device went away): the owner moves the
    /// queue pair to the error state at its next poll.
    pub peer_gone: AtomicBool,
    /// Send / receive CQ armed (`ibv_req_notify_cq`) and its event not yet seen.
    pub armed: [AtomicBool; 2],
}

/// The context a queue pair's CQ reports events with: its key and which CQ
/// (0 send, 1 receive).
pub(crate) fn cq_context(key: u64, which: usize) -> usize {
    (key as usize) << 1 | (which & 1)
}

impl QpShared {
    fn wake(&self) {
        let w = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = w {
            w.wake();
        }
    }
}

/// Keys to queue pairs.
#[derive(Default)]
pub(crate) struct Dispatch {
    map: Mutex<HashMap<u64, Arc<QpShared>>>,
    next: AtomicU64,
}

impl Dispatch {
    /// A fresh key (never 0) and its shared state.
    pub fn insert(&self) -> (u64, Arc<QpShared>) {
        let key = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let s = Arc::new(QpShared::default());
        self.lock().insert(key, s.clone());
        (key, s)
    }

    pub fn remove(&self, key: u64) {
        self.lock().remove(&key);
    }

    fn get(&self, key: u64) -> Option<Arc<QpShared>> {
        self.lock().get(&key).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<QpShared>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

const STOP: u64 = 0;
const COMP: u64 = 1;
const CM: u64 = 2;

/// The device's event thread; dropping it stops and joins the thread.
pub(crate) struct EventLoop {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    pub fn start(
        name: &str,
        comp: Arc<CompChannel>,
        cm: Arc<EventChannel>,
        dispatch: Arc<Dispatch>,
    ) -> Result<EventLoop, TransportError> {
        let io = |what: &str, e| TransportError::io(format!("event thread: {what}"), e);
        let stop = Arc::new(EventFd::new().map_err(|e| io("eventfd", e))?);
        let ep = sys::Epoll::new().map_err(|e| io("epoll_create1", e))?;
        ep.add(stop.fd(), STOP).map_err(|e| io("epoll_ctl", e))?;
        ep.add(comp.fd(), COMP).map_err(|e| io("epoll_ctl", e))?;
        ep.add(cm.fd(), CM).map_err(|e| io("epoll_ctl", e))?;
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("zcmsg-verbs-{name}"))
            .spawn(move || run(ep, stop2, comp, cm, dispatch))
            .map_err(|e| io("spawn", e))?;
        Ok(EventLoop {
            stop,
            thread: Some(thread),
        })
    }
}

fn run(
    ep: sys::Epoll,
    _stop: Arc<EventFd>,
    comp: Arc<CompChannel>,
    cm: Arc<EventChannel>,
    dispatch: Arc<Dispatch>,
) {
    let mut ready = Vec::with_capacity(8);
    loop {
        ready.clear();
        ep.wait(&mut ready, None);
        for &t in &ready {
            match t {
                STOP => return,
                COMP => {
                    while let Some(ctx) = comp.next_event() {
                        if let Some(s) = dispatch.get((ctx >> 1) as u64) {
                            s.armed[ctx & 1].store(false, Ordering::SeqCst);
                            s.wake();
                        }
                    }
                }
                CM => loop {
                    match cm.next_event() {
                        Ok(Some(ev)) => match ev.kind {
                            sys::event::DISCONNECTED | sys::event::DEVICE_REMOVAL => {
                                tracing::debug!(event = %sys::event_str(ev.kind), key = ev.context, "peer gone");
                                if let Some(s) = dispatch.get(ev.context as u64) {
                                    s.peer_gone.store(true, Ordering::Release);
                                    s.wake();
                                }
                            }
                            _ => tracing::trace!(?ev, "connection event ignored"),
                        },
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!("rdma_get_cm_event failed: {}", sys::os_err(e));
                            break;
                        }
                    }
                },
                _ => {}
            }
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop.signal();
        if let Some(t) = self.thread.take() {
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}
