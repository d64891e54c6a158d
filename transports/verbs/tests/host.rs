//! Runs everywhere (not ignored): opening a device never panics and, where
//! there is none, says why with a typed error. On this project's host the
//! kernel has no RDMA, so the answer is `NoRdmaStack` (rdma-core installed)
//! or `LibraryMissing` (not installed); inside the Soft-RoCE guest a device
//! exists and opens.

use std::path::Path;

use zcmsg::{Transport, TransportError};
use zcmsg_verbs::{list_devices, VerbsConfig, VerbsDevice};

/// Devices the kernel shows in sysfs.
fn sysfs_devices() -> Vec<String> {
    std::fs::read_dir("/sys/class/infiniband")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn kernel_has_uverbs() -> bool {
    Path::new("/sys/class/infiniband_verbs").exists()
}

#[test]
fn opening_a_device_gives_a_device_or_a_typed_reason() {
    let sysfs = sysfs_devices();
    let r = VerbsDevice::open(None, &VerbsConfig::default());
    match &r {
        Ok(dev) => {
            eprintln!("opened {}: {:?}", dev.name(), dev.caps());
            assert!(
                sysfs.iter().any(|d| d == dev.name()),
                "opened {} but sysfs lists {sysfs:?}",
                dev.name()
            );
        }
        Err(e) => eprintln!("no device: {e}"),
    }
    match r {
        Ok(_) => {}
        // Without rdma-core installed nothing else can be said.
        Err(TransportError::LibraryMissing(msg)) => {
            assert!(
                msg.contains("libibverbs") || msg.contains("librdmacm"),
                "{msg}"
            )
        }
        Err(TransportError::NoRdmaStack) => assert!(
            !kernel_has_uverbs(),
            "NoRdmaStack although the kernel has uverbs (/sys/class/infiniband_verbs)"
        ),
        Err(TransportError::NoDevice(None)) => assert!(
            kernel_has_uverbs() && sysfs.is_empty(),
            "NoDevice although sysfs lists {sysfs:?}"
        ),
        Err(e) => panic!("unexpected error opening a device: {e:?}"),
    }
    if !kernel_has_uverbs() {
        // This host: the kernel has no RDMA stack.
        let e = VerbsDevice::open(None, &VerbsConfig::default()).unwrap_err();
        assert!(
            matches!(
                e,
                TransportError::NoRdmaStack | TransportError::LibraryMissing(_)
            ),
            "{e:?}"
        );
        assert!(matches!(
            list_devices(),
            Err(TransportError::NoRdmaStack | TransportError::LibraryMissing(_))
        ));
    }
}

#[test]
fn a_device_that_does_not_exist_is_no_device_or_the_stack_reason() {
    match VerbsDevice::open(Some("no-such-rdma-dev0"), &VerbsConfig::default()) {
        Ok(d) => panic!("opened {d:?}"),
        Err(TransportError::NoDevice(Some(n))) => assert_eq!(n, "no-such-rdma-dev0"),
        Err(TransportError::NoDevice(None))
        | Err(TransportError::NoRdmaStack)
        | Err(TransportError::LibraryMissing(_)) => assert!(sysfs_devices().is_empty()),
        Err(e) => panic!("unexpected error: {e:?}"),
    }
}

#[test]
fn errors_say_what_to_do() {
    let e = TransportError::NoRdmaStack.to_string();
    assert!(e.contains("no RDMA stack"), "{e}");
    if let Err(e) = list_devices() {
        let s = e.to_string();
        assert!(!s.is_empty());
        eprintln!("list_devices: {s}");
    }
}
