//! The object store example end to end on the in-process device: objects
//! sent eager and by rendezvous come back intact, deleted ones are
//! refused, and neither side copies object bytes.

use std::process::Command;

fn kvstore(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kvstore"))
        .args(args)
        .output()
        .expect("run kvstore");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn objects_go_in_and_out_without_a_framework_copy() {
    // 4 KiB objects come back eager; 200,000-byte ones, over the endpoint's
    // eager limit, by rendezvous (the client reads the stored slot).
    for size in ["4096", "200000"] {
        let (ok, out) = kvstore(&["--objects", "24", "--size", size, "--rounds", "2"]);
        assert!(ok, "--size {size}:\n{out}");
        for line in [
            "every object verified",
            "a GET of one: no object 0",
            "framework copies of object bytes: client 0 B, server 0 B",
            "store slots in use after the DELs: 12 of 32",
        ] {
            assert!(out.contains(line), "--size {size}: no {line:?} in\n{out}");
        }
    }
}

#[test]
fn an_empty_store_is_refused() {
    let (ok, out) = kvstore(&["--objects", "0"]);
    assert!(!ok && out.contains("at least 1"), "{out}");
}
