//! What the two sides of a zcperf run tell each other, so that they can run
//! in two processes on two hosts (as perftest's server and client do), and
//! how a side finds its peer.
//!
//! Every test runs the same way, in one process (the server half in a
//! thread, the loopback of the in-process device or of one RDMA port) or in
//! two (`zcperf TEST --server` on one host, `zcperf TEST HOST` on the
//! other):
//!
//! 1. the client connects with [`Ctrl::Hello`] (the raw device: in the
//!    connection's private data, [`HELLO_LEN`] bytes; the endpoints: as their
//!    first message): the test, the message size, the iterations, the post
//!    list and the path, so the server takes them from the client and needs
//!    only the test's name and its own queue depths on its command line;
//! 2. the server sets up (arena, receives, for the WRITE tests its window)
//!    and answers [`Ctrl::Ready`] with its window, or [`Ctrl::Refuse`] with
//!    the reason (another test, a size it cannot hold, an older zcperf);
//! 3. the test runs; each side checks the data it receives byte for byte;
//! 4. the client ends with [`Ctrl::Done`] (on the raw device: the first SEND
//!    after the test's traffic, so the server knows every WRITE has landed)
//!    and the server answers with one of its own (the endpoint stream's
//!    carries the figure the server measured); the client leaves only when
//!    it has that answer, so it never tears the connection down while the
//!    server's last sends are still unacknowledged there.
//!
//! Each message is [`CTRL_LEN`] bytes: a magic, a version, a tag and the
//! fields in little-endian order; a [`Ctrl::Hello`] uses the first
//! [`HELLO_LEN`] of them (rdma_cm carries at most 56 bytes of private data,
//! and may pad them with zeros).

use std::sync::OnceLock;
use std::time::Duration;

use zcmsg::{QueuePair, RemoteRegion};

/// The TCP/IP port a server listens on unless told otherwise (perftest's).
pub const DEFAULT_PORT: u16 = 18515;

/// Size of every control message.
pub const CTRL_LEN: usize = 64;

/// The bytes of a [`Ctrl::Hello`] (the rest of its message is zeros).
pub const HELLO_LEN: usize = 32;

/// How long either side waits for the other's control message.
pub const CTRL_WAIT: Duration = Duration::from_secs(30);

const MAGIC: [u8; 4] = *b"zcpf";
const VERSION: u8 = 1;
/// Longest reason a refusal carries.
pub const MAX_REASON: usize = CTRL_LEN - 8;

/// The tests that run across two processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestKind {
    /// SEND ping-pong.
    SendLat,
    /// SEND stream.
    SendBw,
    /// RDMA WRITE ping-pong.
    WriteLat,
    /// RDMA WRITE stream.
    WriteBw,
    /// Endpoint ping-pong.
    EpLat,
    /// Endpoint stream.
    EpBw,
}

impl TestKind {
    const ALL: [TestKind; 6] = [
        TestKind::SendLat,
        TestKind::SendBw,
        TestKind::WriteLat,
        TestKind::WriteBw,
        TestKind::EpLat,
        TestKind::EpBw,
    ];

    fn code(self) -> u8 {
        Self::ALL.iter().position(|&t| t == self).unwrap_or(0) as u8 + 1
    }

    fn from_code(c: u8) -> Option<TestKind> {
        Self::ALL.get(usize::from(c).checked_sub(1)?).copied()
    }

    /// The name zcperf's command line uses.
    pub fn name(self) -> &'static str {
        match self {
            TestKind::SendLat => "send-lat",
            TestKind::SendBw => "send-bw",
            TestKind::WriteLat => "write-lat",
            TestKind::WriteBw => "write-bw",
            TestKind::EpLat => "ep-lat",
            TestKind::EpBw => "ep-bw",
        }
    }
}

/// What the client asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Which test.
    pub test: TestKind,
    /// Message size in bytes.
    pub size: u64,
    /// Iterations.
    pub iters: u64,
    /// Requests per post list (streams).
    pub post_list: u32,
    /// How the endpoint ping-pong moves its messages.
    pub path: PingPongPath,
}

/// How the endpoint ping-pong moves its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PingPongPath {
    /// `try_send` of `Bytes`, `try_recv` of zero-copy `Bytes` (the echo
    /// sends back the very `Bytes` it received).
    Bytes,
    /// `try_send_slice` from a buffer, `try_recv_into` a buffer: the copy
    /// path for small messages (no allocation, the receive slot reposted
    /// at once), as UCX's tagged send and receive of a user buffer work.
    Copy,
    /// `try_send_slice` from a buffer, `try_recv_slot` read in place and
    /// given back with `recycle`: no copy on receipt and no allocation, as
    /// UCX's active messages hand over the receive buffer.
    Slot,
}

impl PingPongPath {
    fn code(self) -> u8 {
        match self {
            PingPongPath::Bytes => 0,
            PingPongPath::Copy => 1,
            PingPongPath::Slot => 2,
        }
    }
    fn from_code(c: u8) -> Option<PingPongPath> {
        [PingPongPath::Bytes, PingPongPath::Copy, PingPongPath::Slot]
            .into_iter()
            .find(|p| p.code() == c)
    }
    /// How the summary names it.
    pub fn label(self) -> &'static str {
        match self {
            PingPongPath::Bytes => "",
            PingPongPath::Copy => " (copy path)",
            PingPongPath::Slot => " (slot path)",
        }
    }
}

/// One control message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ctrl {
    /// Client to server: the run it asks for.
    Hello(Hello),
    /// Server to client: set up; the window the WRITE tests target.
    Ready(Option<RemoteRegion>),
    /// Server to client: this run cannot be served, and why.
    Refuse(String),
    /// The end of the run: from the client, its traffic is over; from the
    /// server of the endpoint stream, the nanoseconds it measured.
    Done(u64),
}

const TAG_HELLO: u8 = 1;
const TAG_READY: u8 = 2;
const TAG_REFUSE: u8 = 3;
const TAG_DONE: u8 = 4;

impl Ctrl {
    /// The message's bytes.
    pub fn encode(&self) -> [u8; CTRL_LEN] {
        let mut b = [0u8; CTRL_LEN];
        b[..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        let body = &mut b[8..];
        b[5] = match self {
            Ctrl::Hello(h) => {
                body[0] = h.test.code();
                body[1] = h.path.code();
                body[4..8].copy_from_slice(&h.post_list.to_le_bytes());
                body[8..16].copy_from_slice(&h.size.to_le_bytes());
                body[16..24].copy_from_slice(&h.iters.to_le_bytes());
                TAG_HELLO
            }
            Ctrl::Ready(w) => {
                if let Some(w) = w {
                    body[0] = 1;
                    body[8..8 + RemoteRegion::WIRE_LEN].copy_from_slice(&w.to_bytes());
                }
                TAG_READY
            }
            Ctrl::Refuse(why) => {
                // Cut at a character boundary, so the peer reads valid text.
                let mut n = why.len().min(MAX_REASON);
                while !why.is_char_boundary(n) {
                    n -= 1;
                }
                body[..n].copy_from_slice(&why.as_bytes()[..n]);
                TAG_REFUSE
            }
            Ctrl::Done(v) => {
                body[..8].copy_from_slice(&v.to_le_bytes());
                TAG_DONE
            }
        };
        b
    }

    /// Read a control message (or the private data a hello came in,
    /// zero-padded or not); the error says what was wrong with it.
    pub fn decode(bytes: &[u8]) -> Result<Ctrl, String> {
        if bytes.len() < HELLO_LEN || bytes.len() > CTRL_LEN || bytes[..4] != MAGIC {
            return Err(format!(
                "the peer sent {} bytes that are not a zcperf control message (is it a zcperf?)",
                bytes.len()
            ));
        }
        let mut b = [0u8; CTRL_LEN];
        b[..bytes.len()].copy_from_slice(bytes);
        if b[4] != VERSION {
            return Err(format!(
                "the peer speaks zcperf protocol version {}, this zcperf version {VERSION}: run the same zcperf on both hosts",
                b[4]
            ));
        }
        let body = &b[8..];
        let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
        match b[5] {
            TAG_HELLO => Ok(Ctrl::Hello(Hello {
                test: TestKind::from_code(body[0])
                    .ok_or_else(|| format!("the peer asks for unknown test {}", body[0]))?,
                path: PingPongPath::from_code(body[1])
                    .ok_or_else(|| format!("the peer asks for unknown path {}", body[1]))?,
                post_list: u32::from_le_bytes(body[4..8].try_into().expect("4 bytes")),
                size: u64_at(8),
                iters: u64_at(16),
            })),
            TAG_READY => Ok(Ctrl::Ready(if body[0] == 0 {
                None
            } else {
                Some(
                    RemoteRegion::from_bytes(&body[8..])
                        .ok_or("the peer's window wraps around the address space")?,
                )
            })),
            TAG_REFUSE => {
                let end = body.iter().position(|&c| c == 0).unwrap_or(body.len());
                Ok(Ctrl::Refuse(
                    String::from_utf8_lossy(&body[..end]).into_owned(),
                ))
            }
            TAG_DONE => Ok(Ctrl::Done(u64_at(0))),
            t => Err(format!("unknown zcperf control message {t}")),
        }
    }
}

/// What the server answers a [`Hello`] for `want` with, before it sets
/// anything up: `Some(reason)` refuses. `max_size` is the largest message
/// the server will allocate for.
pub fn refusal(h: &Hello, want: TestKind, max_size: u64) -> Option<String> {
    if h.test != want {
        return Some(format!(
            "server runs {}, not {}",
            want.name(),
            h.test.name()
        ));
    }
    if h.size > max_size {
        return Some(format!("size {} over the server's {max_size}", h.size));
    }
    if h.iters == 0 {
        return Some("0 iterations".into());
    }
    None
}

/// A check of every connection a test makes.
pub type ConnCheck = Box<dyn Fn(&dyn QueuePair) -> Result<(), String> + Send + Sync>;

static CONN_CHECK: OnceLock<ConnCheck> = OnceLock::new();

/// Have every connection the tests make checked by `f` (zcperf prints the
/// GID a verbs connection uses and holds it to `-x`), once per process;
/// `false` if a check was set before.
pub fn check_connections(f: ConnCheck) -> bool {
    CONN_CHECK.set(f).is_ok()
}

/// Run the check of [`check_connections`] on a new connection.
pub(crate) fn connected(qp: &dyn QueuePair) -> Result<(), String> {
    CONN_CHECK.get().map_or(Ok(()), |f| f(qp))
}

/// `addr` with `port` when it names none (`192.0.2.1` -> `192.0.2.1:18515`;
/// IPv6 literals in brackets).
pub fn with_port(addr: &str, port: u16) -> String {
    let has_port = match addr.rsplit_once(':') {
        Some((host, p)) => p.parse::<u16>().is_ok() && (!host.contains(':') || host.ends_with(']')),
        None => false,
    };
    if has_port {
        addr.to_string()
    } else if addr.contains(':') && !addr.starts_with('[') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_reads_back_as_written() {
        let w = RemoteRegion {
            addr: 0x7f00_1234_5678,
            len: 65536,
            rkey: 0xdead_beef,
        };
        for t in TestKind::ALL {
            let h = Hello {
                test: t,
                size: 1 << 33,
                iters: u64::MAX - 3,
                post_list: 16,
                path: if t == TestKind::EpLat {
                    PingPongPath::Slot
                } else {
                    PingPongPath::Bytes
                },
            };
            let b = Ctrl::Hello(h).encode();
            assert!(b[HELLO_LEN..].iter().all(|&x| x == 0));
            assert_eq!(Ctrl::decode(&b), Ok(Ctrl::Hello(h)));
            // As private data: its own bytes, or padded to rdma_cm's 56.
            assert_eq!(Ctrl::decode(&b[..HELLO_LEN]), Ok(Ctrl::Hello(h)));
            assert_eq!(Ctrl::decode(&b[..56]), Ok(Ctrl::Hello(h)));
        }
        for c in [
            Ctrl::Ready(None),
            Ctrl::Ready(Some(w)),
            Ctrl::Refuse("server runs send-lat, not write-bw".into()),
            Ctrl::Done(123_456_789),
        ] {
            assert_eq!(Ctrl::decode(&c.encode()), Ok(c));
        }
    }

    #[test]
    fn a_long_reason_is_cut_at_a_character_boundary() {
        let why = "é".repeat(40); // 80 bytes
        match Ctrl::decode(&Ctrl::Refuse(why.clone()).encode()) {
            Ok(Ctrl::Refuse(r)) => {
                assert!(why.starts_with(&r));
                assert_eq!(r.len(), MAX_REASON);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn foreign_or_newer_bytes_are_refused_with_the_reason() {
        let mut b = Ctrl::Done(1).encode();
        assert!(Ctrl::decode(&b[..10]).unwrap_err().contains("not a zcperf"));
        assert!(Ctrl::decode(b"zcperf-hello-from-an-older-zcperf")
            .unwrap_err()
            .contains("not a zcperf"));
        b[4] = VERSION + 1;
        assert!(Ctrl::decode(&b).unwrap_err().contains("version"));
        let mut b = Ctrl::Done(1).encode();
        b[5] = 99;
        assert!(Ctrl::decode(&b).unwrap_err().contains("unknown"));
        let mut b = Ctrl::Hello(Hello {
            test: TestKind::SendBw,
            size: 1,
            iters: 1,
            post_list: 1,
            path: PingPongPath::Bytes,
        })
        .encode();
        b[8] = 77;
        assert!(Ctrl::decode(&b).unwrap_err().contains("unknown test 77"));
        b[8] = TestKind::EpLat.code();
        b[9] = 3;
        assert!(Ctrl::decode(&b).unwrap_err().contains("unknown path 3"));
    }

    #[test]
    fn the_server_refuses_another_test_a_size_it_cannot_hold_and_no_iterations() {
        let h = Hello {
            test: TestKind::WriteBw,
            size: 4096,
            iters: 10,
            post_list: 16,
            path: PingPongPath::Bytes,
        };
        assert_eq!(refusal(&h, TestKind::WriteBw, 4096), None);
        assert!(refusal(&h, TestKind::SendLat, 4096)
            .unwrap()
            .contains("runs send-lat, not write-bw"));
        assert!(refusal(&h, TestKind::WriteBw, 4095)
            .unwrap()
            .contains("size 4096"));
        let h0 = Hello { iters: 0, ..h };
        assert!(refusal(&h0, TestKind::WriteBw, 4096).is_some());
    }

    #[test]
    fn a_port_is_added_only_where_none_is_named() {
        assert_eq!(with_port("192.0.2.1", 18515), "192.0.2.1:18515");
        assert_eq!(with_port("192.0.2.1:7000", 18515), "192.0.2.1:7000");
        assert_eq!(with_port("fe80::1", 9), "[fe80::1]:9");
        assert_eq!(with_port("[fe80::1]:7", 9), "[fe80::1]:7");
        assert_eq!(with_port("host-b", 9), "host-b:9");
    }
}
