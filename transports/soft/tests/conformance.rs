//! The zcmsg conformance suite against the software device.

zcmsg_conformance::suite!(
    soft,
    zcmsg_conformance::Harness::new(
        || zcmsg_soft::SoftDevice::new() as std::sync::Arc<dyn zcmsg::Transport>,
        zcmsg_conformance::addr::named("soft"),
    )
);
