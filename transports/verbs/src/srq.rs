//! Shared receive queues.

use std::any::Any;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use zcmsg::{PostError, RecvRequest, SharedRecvQueue, TransportError};

use crate::device::Core;
use crate::sys::{self, RecvList, Srq};

/// A shared receive queue (`ibv_srq`) of a [`crate::VerbsDevice`]; hand it
/// to queue pairs through [`zcmsg::QpConfig::srq`].
pub struct VerbsSrq {
    srq: Arc<Srq>,
    /// Receives posted and not yet completed (decremented by the queue pairs
    /// that poll their completions): the granted depth is kept to even where
    /// the provider would accept more.
    outstanding: Arc<AtomicU32>,
    scratch: Mutex<RecvList>,
    _core: Arc<Core>,
}

impl std::fmt::Debug for VerbsSrq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsSrq")
            .field("max_wr", &self.srq.max_wr())
            .field("max_sge", &self.srq.max_sge())
            .finish()
    }
}

impl VerbsSrq {
    pub(crate) fn create(
        core: &Arc<Core>,
        max_wr: u32,
        max_sge: u32,
    ) -> Result<VerbsSrq, TransportError> {
        if !core.caps.srq {
            return Err(TransportError::Unsupported(
                "this device has no shared receive queues",
            ));
        }
        let a = &core.attr;
        if max_wr == 0 || max_wr > a.max_srq_wr || max_sge > a.max_srq_sge {
            return Err(TransportError::InvalidArgument(format!(
                "shared receive queue of {max_wr} requests x {max_sge} SGEs: the device allows 1..={} x {}",
                a.max_srq_wr, a.max_srq_sge
            )));
        }
        let srq = Srq::create(&core.pd, max_wr, max_sge.max(1))?;
        Ok(VerbsSrq {
            srq,
            outstanding: Arc::new(AtomicU32::new(0)),
            scratch: Mutex::new(RecvList::with_capacity(64)),
            _core: core.clone(),
        })
    }

    pub(crate) fn raw(&self) -> &Arc<Srq> {
        &self.srq
    }

    pub(crate) fn outstanding(&self) -> Arc<AtomicU32> {
        self.outstanding.clone()
    }

    /// Granted depth.
    pub fn max_wr(&self) -> u32 {
        self.srq.max_wr()
    }

    /// Granted SGEs per receive.
    pub fn max_sge(&self) -> u32 {
        self.srq.max_sge()
    }
}

impl SharedRecvQueue for VerbsSrq {
    fn post_recv(&self, wrs: &[RecvRequest<'_>]) -> Result<(), PostError> {
        let max = self.srq.max_sge();
        let mut stop = wrs
            .iter()
            .position(|w| w.sg_list.len() > max as usize)
            .map(|i| {
                (
                    i,
                    TransportError::TooManySges {
                        got: wrs[i].sg_list.len(),
                        max,
                    },
                )
            });
        // Posts are serialized by the scratch lock; completions only lower
        // the count concurrently, which can only leave more room.
        let mut scratch = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let depth = self.srq.max_wr();
        let free = depth.saturating_sub(self.outstanding.load(Ordering::Acquire)) as usize;
        if free < stop.as_ref().map_or(wrs.len(), |(i, _)| *i) {
            stop = Some((free, TransportError::QueueFull { depth }));
        }
        let k = stop.as_ref().map_or(wrs.len(), |(i, _)| *i);
        if k > 0 {
            let r = self.srq.post_recv(&mut scratch, &wrs[..k]);
            let posted = match &r {
                Ok(()) => k,
                Err((i, _)) => *i,
            };
            self.outstanding.fetch_add(posted as u32, Ordering::AcqRel);
            if let Err((i, code)) = r {
                let e = match code {
                    libc::ENOMEM => TransportError::QueueFull { depth },
                    libc::EINVAL => TransportError::InvalidArgument(
                        "the provider refused the shared receive (EINVAL)".into(),
                    ),
                    _ => TransportError::io("ibv_post_srq_recv", sys::os_err(code)),
                };
                return Err(PostError::at(i, e));
            }
        }
        match stop {
            Some((i, e)) => Err(PostError::at(i, e)),
            None => Ok(()),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
