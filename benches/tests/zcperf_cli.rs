//! zcperf's command line on the in-process device: perftest's `-a` sweep
//! prints one row per size under one header, with every size's data
//! checked by the run; options that cannot go together are refused with
//! the reason, before anything runs.

use std::process::Command;

fn zcperf(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_zcperf"))
        .args(args)
        .output()
        .expect("zcperf runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The first column of each row: the sizes, in order.
fn row_sizes(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn all_sizes_run_under_one_header() {
    let want: Vec<u64> = (1..=23).map(|k| 1u64 << k).collect();
    for (test, header) in [
        ("send-lat", "t_typical[usec]"),
        ("send-bw", "BW average[MB/sec]"),
        ("write-bw", "BW average[MB/sec]"),
    ] {
        let (ok, out) = zcperf(&[test, "-a", "-n", "20"]);
        assert!(ok, "{test} -a:\n{out}");
        assert_eq!(out.matches(header).count(), 1, "{test}: one header\n{out}");
        assert_eq!(row_sizes(&out), want, "{test}: a row per size\n{out}");
    }
    // Receives of 8 MiB are cut to the receive budget, and it says so.
    let (_, out) = zcperf(&["send-bw", "-a", "-n", "20"]);
    assert!(
        out.contains("# -r 512 cut to 32 receives of 8388608 B"),
        "{out}"
    );
}

#[test]
fn options_that_cannot_go_together_are_refused() {
    for (args, why) in [
        (&["send-lat", "-a", "-s", "64"][..], "drop -s"),
        (&["ep-lat", "-a", "--copy"][..], "run it with -s, not -a"),
        (
            &["ep-lat", "-a", "--slot"][..],
            "--slot sends messages up to",
        ),
        (&["ep-lat", "--copy", "--slot"][..], "cannot be used with"),
        (
            &["send-lat", "--server"][..],
            "the in-process device does not reach other processes",
        ),
        (
            &["send-lat", "192.0.2.1"][..],
            "the in-process device does not reach other processes",
        ),
        (
            &["--server"][..],
            "the summary runs both sides in this process",
        ),
    ] {
        let (ok, out) = zcperf(args);
        assert!(!ok, "{args:?} ran:\n{out}");
        assert!(out.contains(why), "{args:?}: {out}");
    }
}
