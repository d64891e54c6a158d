//! The macro expands in both forms. `RegistryOnly` has no data path, so its
//! generated cases are ignored; the harness itself is checked directly.

use std::sync::Arc;

use zcmsg::testing::RegistryOnly;
use zcmsg::{AddressSpace, Transport};
use zcmsg_conformance::{addr, Harness};

fn registry_only() -> Harness {
    Harness::new(
        || Arc::new(RegistryOnly::new(AddressSpace::Cpu)) as Arc<dyn Transport>,
        addr::named("registry-only"),
    )
    .timeout(std::time::Duration::from_secs(2))
}

zcmsg_conformance::suite!(
    registry_only_suite,
    registry_only(),
    ignore = "RegistryOnly has no data path"
);

#[test]
fn connecting_without_a_data_path_fails_cleanly() {
    let h = registry_only();
    let err = h
        .try_connected_pair(&h.qp_config(), &h.qp_config())
        .expect_err("RegistryOnly cannot connect");
    assert!(err.to_string().contains("listen"), "{err}");
}

#[test]
fn hosts_audit_registrations() {
    let h = registry_only();
    let host = h.host();
    let arena = host.arena(4096, 4);
    let win = host.window(100, zcmsg::Access::REMOTE_WRITE);
    assert_eq!(host.tracker().live(), 2);
    drop((arena, win));
    assert_eq!(host.tracker().live(), 0);
    host.assert_released("after dropping an arena and a window");
}

#[test]
fn every_case_is_listed() {
    assert!(zcmsg_conformance::cases::ALL.len() >= 50);
    assert!(h_caps_clamped());
}

fn h_caps_clamped() -> bool {
    let h = registry_only();
    let c = h.qp_config();
    c.max_send_sge <= h.caps().max_send_sge
        && c.connect_timeout == std::time::Duration::from_secs(2)
}
