//! `zcperf --server` and `zcperf HOST` as two processes on a real RDMA
//! device, as perftest's server and client run. They need the Soft-RoCE lab
//! (`deploy/lab-tests.sh` builds zcperf with the `verbs` feature and runs
//! them in the guest with `--include-ignored`, where a missing device fails
//! them):
//!
//! - [`zcperf_two_processes`]: single guest, both processes on rxe0 through
//!   its address: every test that crosses processes, the data checked by
//!   both sides, the figures printed; a client asking a server for another
//!   test is refused, with the reason on both sides; perftest's `-a` sweep
//!   runs across the two, a row per size.
//! - [`zcperf_across_hosts`]: the two-host lab (`deploy/lab/two-host.sh`):
//!   host B serves the tests one after another, host A runs their clients.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run this test in the Soft-RoCE lab"))
}

/// What one zcperf process printed and how it ended.
struct Run {
    ok: bool,
    out: String,
}

/// A zcperf process whose output is collected as it comes.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    out: String,
}

fn zcperf(args: &[String]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_zcperf"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("zcperf runs");
    let (tx, lines) = mpsc::channel();
    for pipe in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
    }
    Proc {
        child,
        lines,
        out: String::new(),
    }
}

impl Proc {
    /// Wait (bounded) for a line containing `what`; false if the process
    /// ended or the time ran out first.
    fn wait_for(&mut self, what: &str, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(l) => {
                    self.out += &l;
                    self.out.push('\n');
                    if l.contains(what) {
                        return true;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if matches!(self.child.try_wait(), Ok(Some(_)))
                        && self.lines.try_recv().is_err()
                    {
                        return false;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
        false
    }

    /// Wait (bounded, then killed) for the end.
    fn finish(mut self, limit: Duration) -> Run {
        let end = Instant::now() + limit;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break Some(s);
            }
            if Instant::now() > end {
                self.child.kill().ok();
                self.child.wait().ok();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The reader threads end with the pipes.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.out += &l;
            self.out.push('\n');
        }
        if status.is_none() {
            self.out += &format!("(killed after {} s)\n", limit.as_secs());
        }
        Run {
            ok: status.is_some_and(|s| s.success()),
            out: self.out,
        }
    }
}

/// One test of the matrix: zcperf's arguments, the size and iterations.
struct Case {
    test: &'static str,
    extra: &'static [&'static str],
    size: u32,
    iters: u32,
}

const CASES: &[Case] = &[
    Case {
        test: "send-lat",
        extra: &[],
        size: 64,
        iters: 1000,
    },
    Case {
        test: "send-bw",
        extra: &[],
        size: 4096,
        iters: 2000,
    },
    Case {
        test: "write-lat",
        extra: &[],
        size: 64,
        iters: 1000,
    },
    Case {
        test: "write-bw",
        extra: &[],
        size: 65536,
        iters: 500,
    },
    Case {
        test: "ep-lat",
        extra: &[],
        size: 64,
        iters: 1000,
    },
    Case {
        test: "ep-lat",
        extra: &["--copy"],
        size: 64,
        iters: 1000,
    },
    Case {
        test: "ep-lat",
        extra: &["--slot"],
        size: 64,
        iters: 1000,
    },
    Case {
        test: "ep-bw",
        extra: &[],
        size: 4096,
        iters: 2000,
    },
];

const LIMIT: Duration = Duration::from_secs(180);

fn device_args() -> Vec<String> {
    vec![
        "--transport".into(),
        "verbs".into(),
        "-d".into(),
        env("ZCMSG_LAB_DEVICE"),
    ]
}

fn server_args(test: &str, addr: &str, port: u16) -> Vec<String> {
    let mut a = vec![test.to_string()];
    a.extend(device_args());
    a.extend([
        "--server".into(),
        "--addr".into(),
        addr.into(),
        "-p".into(),
        port.to_string(),
    ]);
    a
}

fn client_args(c: &Case, host: &str, port: u16) -> Vec<String> {
    let mut a = vec![c.test.to_string()];
    a.extend(device_args());
    a.extend(c.extra.iter().map(|s| s.to_string()));
    a.extend([
        "-s".into(),
        c.size.to_string(),
        "-n".into(),
        c.iters.to_string(),
        "-x".into(),
        env("ZCMSG_LAB_GID_INDEX"),
        "-p".into(),
        port.to_string(),
        host.into(),
    ]);
    a
}

/// Run a client until it connects (the server may not listen yet: across
/// hosts, B starts each server when the previous run is over).
fn client_run(c: &Case, host: &str, port: u16) -> Run {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let r = zcperf(&client_args(c, host, port)).finish(LIMIT);
        let refused = r.out.contains("zcperf: connect ");
        if r.ok || !refused || Instant::now() > end {
            return r;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The client printed perftest's columns, a row of its size and
/// iterations with a figure, and the connection's GID.
fn check_client(c: &Case, client: &Run) {
    let what = format!("{} {:?} -s {}", c.test, c.extra, c.size);
    assert!(client.ok, "{what}: the client failed:\n{}", client.out);
    let header = if c.test.ends_with("lat") {
        "t_typical[usec]"
    } else {
        "BW average[MB/sec]"
    };
    assert!(
        client.out.contains(header),
        "{what}: no header:\n{}",
        client.out
    );
    let row = client
        .out
        .lines()
        .find(|l| {
            l.split_whitespace()
                .take(2)
                .eq([c.size.to_string(), c.iters.to_string()])
        })
        .unwrap_or_else(|| {
            panic!(
                "{what}: no row of {} x {}:\n{}",
                c.size, c.iters, client.out
            )
        });
    let figure: f64 = row
        .split_whitespace()
        .nth(4)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{what}: no figure in {row:?}"));
    assert!(figure > 0.0, "{what}: {row}");
    assert!(
        client.out.contains("GID index"),
        "{what}: the GID is not printed:\n{}",
        client.out
    );
    println!("{what}: {row}");
}

/// The server ran the client's test and said so.
fn check_served(c: &Case, server: &Run) {
    assert!(server.ok, "{}: the server failed:\n{}", c.test, server.out);
    let served = format!(
        "# served {}: {} iterations of {} B",
        c.test, c.iters, c.size
    );
    assert!(
        server.out.contains(&served),
        "{}: the server did not report {served:?}:\n{}",
        c.test,
        server.out
    );
}

#[test]
#[ignore = "needs the Soft-RoCE lab"]
fn zcperf_two_processes() {
    let addr = env("ZCMSG_LAB_ADDR");
    for (i, c) in CASES.iter().enumerate() {
        let port = 18600 + i as u16;
        let mut server = zcperf(&server_args(c.test, &addr, port));
        assert!(
            server.wait_for("waiting for a client", Duration::from_secs(60)),
            "{}: the server did not come up:\n{}",
            c.test,
            server.finish(Duration::from_secs(1)).out
        );
        let client = client_run(c, &addr, port);
        let server = server.finish(LIMIT);
        if !client.ok {
            println!("the server's output:\n{}", server.out);
        }
        check_client(c, &client);
        check_served(c, &server);
    }

    // perftest's -a across the two processes: the server serves the
    // client's whole sweep on one listener, a row per size.
    let port = 18640;
    let mut args = server_args("write-lat", &addr, port);
    args.push("-a".into());
    let mut server = zcperf(&args);
    assert!(server.wait_for(
        "waiting for a client (23 runs, -a)",
        Duration::from_secs(60)
    ));
    let mut args = device_args();
    args.splice(0..0, ["write-lat".to_string()]);
    args.extend(["-a", "-n", "10", "-p", &port.to_string(), &addr].map(String::from));
    let client = zcperf(&args).finish(LIMIT);
    let server = server.finish(LIMIT);
    assert!(
        client.ok,
        "write-lat -a:\n{}\nserver:\n{}",
        client.out, server.out
    );
    let sizes: Vec<u64> = client
        .out
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(
        sizes,
        (1..=23).map(|k| 1u64 << k).collect::<Vec<_>>(),
        "{}",
        client.out
    );
    assert!(server.ok, "{}", server.out);
    assert_eq!(
        server
            .out
            .matches("# served write-lat: 10 iterations")
            .count(),
        23,
        "{}",
        server.out
    );

    // A client of another test: refused, and both sides say why.
    let port = 18650;
    let mut server = zcperf(&server_args("write-bw", &addr, port));
    assert!(server.wait_for("waiting for a client", Duration::from_secs(60)));
    let client = client_run(&CASES[0], &addr, port);
    let server = server.finish(LIMIT);
    assert!(
        !client.ok && !server.ok,
        "client:\n{}\nserver:\n{}",
        client.out,
        server.out
    );
    assert!(
        client
            .out
            .contains("the server refused: server runs write-bw, not send-lat"),
        "{}",
        client.out
    );
    assert!(server.out.contains("refused the client"), "{}", server.out);
}

#[test]
#[ignore = "needs the Soft-RoCE lab"]
fn zcperf_across_hosts() {
    let role = env("ZCMSG_LAB_ROLE");
    for (i, c) in CASES.iter().enumerate() {
        let port = 18700 + i as u16;
        match role.as_str() {
            // B serves each test in turn; A's client retries until it listens.
            "b" => {
                let mut server = zcperf(&server_args(c.test, &env("ZCMSG_LAB_ADDR"), port));
                assert!(server.wait_for("waiting for a client", Duration::from_secs(60)));
                check_served(c, &server.finish(LIMIT));
                println!("[b] served {} {:?}", c.test, c.extra);
            }
            "a" => {
                check_client(c, &client_run(c, &env("ZCMSG_LAB_PEER"), port));
            }
            r => panic!("ZCMSG_LAB_ROLE must be a or b, not {r:?}"),
        }
    }
}
