//! The zcmsg conformance suite against the software device.

zcmsg_conformance::suite!(
    soft,
    zcmsg_conformance::Harness::new(
        || zcmsg_soft::SoftDevice::new() as std::sync::Arc<dyn zcmsg::Transport>,
        zcmsg_conformance::addr::named("soft"),
    )
);

// The same suite on a device without atomics and shared receive queues:
// the cases of those features check that they are refused instead.
zcmsg_conformance::suite!(
    soft_lean,
    zcmsg_conformance::Harness::new(
        || {
            let mut caps = zcmsg_soft::SoftDevice::default_caps();
            caps.atomics = false;
            caps.srq = false;
            zcmsg_soft::SoftDevice::with_caps(caps) as std::sync::Arc<dyn zcmsg::Transport>
        },
        zcmsg_conformance::addr::named("soft-lean"),
    )
);
