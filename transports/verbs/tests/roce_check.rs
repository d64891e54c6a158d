//! `deploy/roce-check.sh`, the host readiness check: on made-up sysfs trees
//! (every host; `ZCMSG_SYSFS` and `ZCMSG_DEVFS` point the script at them)
//! it finds the RoCE v2 GID of an address, refuses a RoCE v1 one, a port
//! that is down and a host with no device; in the Soft-RoCE lab it reports
//! rxe0 ready with the GID index the lab found, and fails for an address
//! the device does not own and for a device that does not exist.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/roce-check.sh")
}

/// Exit code and output of the script with `args`, reading `root`'s
/// made-up sysfs and device files (or the real ones: `None`).
fn run(root: Option<&Path>, args: &[&str]) -> (i32, String) {
    let mut c = Command::new("bash");
    c.arg(script()).args(args);
    if let Some(r) = root {
        c.env("ZCMSG_SYSFS", r.join("sys"))
            .env("ZCMSG_DEVFS", r.join("dev"));
    }
    let out = c.output().expect("bash runs the script");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

fn write(path: PathBuf, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

/// A host with one RoCE device `mlx5_0` on `eth0`: GID 0 link-local, 1 and
/// 2 for 10.0.0.1 (RoCE v1, RoCE v2), 3 for 10.0.0.2 (RoCE v1 only); the
/// port in `state`.
fn fake_host(name: &str, state: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("roce-check-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    let sys = root.join("sys");
    fs::create_dir_all(sys.join("module/ib_uverbs")).unwrap();
    fs::create_dir_all(sys.join("module/rdma_ucm")).unwrap();
    write(sys.join("class/infiniband_verbs/uverbs0/ibdev"), "mlx5_0\n");
    write(root.join("dev/infiniband/uverbs0"), "");
    write(root.join("dev/infiniband/rdma_cm"), "");
    write(sys.join("class/net/eth0/mtu"), "9000\n");
    let port = sys.join("class/infiniband/mlx5_0/ports/1");
    write(port.join("state"), &format!("{state}\n"));
    write(port.join("link_layer"), "Ethernet\n");
    let gids = [
        ("fe80:0000:0000:0000:0000:0000:0000:0001", "IB/RoCE v1"),
        ("0000:0000:0000:0000:0000:ffff:0a00:0001", "IB/RoCE v1"),
        ("0000:0000:0000:0000:0000:ffff:0a00:0001", "RoCE v2"),
        ("0000:0000:0000:0000:0000:ffff:0a00:0002", "IB/RoCE v1"),
    ];
    for (i, (gid, ty)) in gids.iter().enumerate() {
        write(port.join(format!("gids/{i}")), &format!("{gid}\n"));
        write(
            port.join(format!("gid_attrs/types/{i}")),
            &format!("{ty}\n"),
        );
        write(port.join(format!("gid_attrs/ndevs/{i}")), "eth0\n");
    }
    // Unpopulated entries read as zeros.
    write(
        port.join("gids/4"),
        "0000:0000:0000:0000:0000:0000:0000:0000\n",
    );
    root
}

#[test]
fn the_roce_v2_gid_of_an_address_is_found_and_reported() {
    let root = fake_host("v2", "4: ACTIVE");
    let (rc, out) = run(Some(&root), &["--device", "mlx5_0", "--addr", "10.0.0.1"]);
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains("10.0.0.1 is GID index 2, RoCE v2, on eth0 (zcperf -x 2)"),
        "{out}"
    );
    assert!(out.contains("1 RoCE v2 GID entries"), "{out}");
    assert!(out.contains("roce-check: ready"), "{out}");
    fs::remove_dir_all(root).ok();
}

#[test]
fn a_roce_v1_gid_a_port_down_and_no_device_fail_with_the_reason() {
    let root = fake_host("v1", "4: ACTIVE");
    let (rc, out) = run(Some(&root), &["--addr", "10.0.0.2"]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains("10.0.0.2 is GID index 3, type IB/RoCE v1, not RoCE v2"),
        "{out}"
    );
    let (rc, out) = run(Some(&root), &["--addr", "10.0.0.9"]);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("no GID for 10.0.0.9 on mlx5_0"), "{out}");
    // Bad input is refused before any check.
    let (rc, out) = run(Some(&root), &["--addr", "fe80::1"]);
    assert_eq!(rc, 2, "{out}");
    assert!(out.contains("--addr wants an IPv4 address"), "{out}");
    fs::remove_dir_all(root).ok();

    let root = fake_host("down", "1: DOWN");
    let (rc, out) = run(Some(&root), &["--device", "mlx5_0"]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains("state 1: DOWN: the port is not ACTIVE"),
        "{out}"
    );
    fs::remove_dir_all(&root).ok();

    let empty = std::env::temp_dir().join(format!("roce-check-none-{}", std::process::id()));
    fs::create_dir_all(empty.join("sys")).unwrap();
    let (rc, out) = run(Some(&empty), &[]);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("FAIL  no RDMA device"), "{out}");
    let (rc, out) = run(Some(&empty), &["--device", "mlx5_0"]);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("no RDMA device mlx5_0"), "{out}");
    fs::remove_dir_all(empty).ok();
}

fn lab(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run in the Soft-RoCE lab"))
}

#[test]
#[ignore = "needs the Soft-RoCE lab"]
fn the_lab_device_is_ready_and_wrong_input_fails() {
    let (dev, addr, gid) = (
        lab("ZCMSG_LAB_DEVICE"),
        lab("ZCMSG_LAB_ADDR"),
        lab("ZCMSG_LAB_GID_INDEX"),
    );
    let (rc, out) = run(None, &["--device", &dev, "--addr", &addr]);
    println!("{out}");
    assert_eq!(rc, 0, "{out}");
    assert!(
        out.contains(&format!("{addr} is GID index {gid}, RoCE v2")),
        "the GID index the lab found ({gid}):\n{out}"
    );
    assert!(out.contains("state 4: ACTIVE"), "{out}");
    let (rc, out) = run(None, &["--device", &dev, "--addr", "192.0.2.99"]);
    assert_eq!(rc, 1, "{out}");
    assert!(
        out.contains(&format!("no GID for 192.0.2.99 on {dev}")),
        "{out}"
    );
    let (rc, out) = run(None, &["--device", "nosuch0"]);
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("no RDMA device nosuch0"), "{out}");
}
