//! The examples on a real RDMA device: run in the Soft-RoCE lab guest
//! (deploy/lab-tests.sh builds this with `--features verbs` and runs it
//! with `--include-ignored`), where the guest sets `ZCMSG_LAB_DEVICE` and
//! `ZCMSG_LAB_ADDR`; without them, or without a device, these fail.

use std::process::Command;

fn on_the_device(bin: &str, args: &[&str]) -> String {
    let dev = std::env::var("ZCMSG_LAB_DEVICE").expect("ZCMSG_LAB_DEVICE: run in the lab guest");
    let addr = std::env::var("ZCMSG_LAB_ADDR").expect("ZCMSG_LAB_ADDR: run in the lab guest");
    let out = Command::new(bin)
        .args(["--transport", "verbs", "-d", &dev, "--addr", &addr])
        .args(args)
        .output()
        .expect("run the example");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{bin} {args:?} failed:\n{text}");
    text
}

#[test]
#[ignore = "needs the Soft-RoCE lab"]
fn the_object_store_runs_on_rxe() {
    // 16 KiB objects: over the default eager limit, so every GET is a
    // rendezvous (the client READs the stored slot) and every PUT a READ.
    let out = on_the_device(
        env!("CARGO_BIN_EXE_kvstore"),
        &["--objects", "32", "--size", "16384", "--rounds", "2"],
    );
    for line in [
        "on the verbs transport",
        "every object verified",
        "a GET of one: no object 0",
        "framework copies of object bytes: client 0 B, server 0 B",
        "store slots in use after the DELs: 16 of 40",
    ] {
        assert!(out.contains(line), "no {line:?} in\n{out}");
    }
}

#[test]
#[ignore = "needs the Soft-RoCE lab"]
fn rpc_echo_runs_on_rxe() {
    let out = on_the_device(env!("CARGO_BIN_EXE_rpc_echo"), &["--calls", "2000"]);
    for line in [
        "on the verbs transport",
        "2000 echo calls",
        "client-side framework copies: 0 B",
        "server finished cleanly",
    ] {
        assert!(out.contains(line), "no {line:?} in\n{out}");
    }
}
