//! Deterministic simulation of the protocol core: two `Connection`s joined by
//! a simulated reliable-connected wire (in-order per queue), with completions
//! delivered in seeded random interleavings across queues and sides, fake
//! time, lost peers, failed queue pairs and forged messages.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use zcmsg::proto::wire::{Header, Kind};
use zcmsg::proto::{
    ConnError, Connection, Event, Limits, Msg, Outcome, ProtoConfig, RecvOp, SendOp,
};
use zcmsg::testing::RegistryOnly;
use zcmsg::{
    AddressSpace, Arena, ArenaConfig, Opcode, Pd, SendFlags, Sge, WcOpcode, WcStatus,
    WorkCompletion,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Side {
    dev: Arc<RegistryOnly>,
    pd: Pd,
    conn: Connection,
    rq: VecDeque<RecvOp>,
    send_cq: VecDeque<WorkCompletion>,
    recv_cq: VecDeque<WorkCompletion>,
    got: Vec<Vec<u8>>,
    outcomes: Vec<(u64, Outcome)>,
    failed: Option<ConnError>,
    eos: bool,
    /// The application holds received messages instead of dropping them.
    hold: bool,
    held: Vec<Bytes>,
    /// SENDs waiting for a receive (receiver-not-ready retry on the wire).
    /// SENDs waiting for a receive: payload and immediate data.
    inbound: VecDeque<(Vec<u8>, Option<u32>)>,
    /// A dead side does nothing; the wire answers its peer's requests with
    /// nothing (no completion) unless `nak` is set.
    dead: bool,
}

fn cfg() -> ProtoConfig {
    ProtoConfig {
        recv_slots: 16,
        reserve: 4,
        slot_size: 1024 + 24,
        credit_batch: 4,
        signal_every: 4,
        heartbeat_interval: Duration::from_millis(50),
        heartbeat_timeout: Duration::from_millis(500),
        ..ProtoConfig::default()
    }
}

fn lim() -> Limits {
    Limits {
        max_send_wr: 32,
        max_send_sge: 4,
        max_sge_rd: 4,
        max_msg_sz: 64 << 10,
        max_inline_data: 64,
    }
}

fn side(now: Instant, cfg: ProtoConfig) -> Side {
    let dev = Arc::new(RegistryOnly::new(AddressSpace::Cpu));
    let pd = Pd::new(dev.clone());
    let conn = Connection::new(pd.clone(), cfg, lim(), now).unwrap();
    Side {
        dev,
        pd,
        conn,
        rq: VecDeque::new(),
        send_cq: VecDeque::new(),
        recv_cq: VecDeque::new(),
        got: Vec::new(),
        outcomes: Vec::new(),
        failed: None,
        eos: false,
        hold: false,
        held: Vec::new(),
        inbound: VecDeque::new(),
        dead: false,
    }
}

/// Post side `i`'s transmit batch onto the wire, executing it against `j`.
fn pump(a: &mut Side, b: &mut Side, now: Instant) {
    if a.dead {
        return;
    }
    let Side {
        conn,
        dev,
        rq,
        send_cq,
        inbound,
        recv_cq,
        ..
    } = a;
    let tx = conn.transmit(now);
    rq.extend(tx.recvs.iter().copied());
    // Receives just posted take SENDs that were waiting (RNR retry).
    while !inbound.is_empty() && !rq.is_empty() {
        let (Some((data, imm)), Some(r)) = (inbound.pop_front(), rq.pop_front()) else {
            break;
        };
        let n = dev
            .scatter(&[r.sge], &data)
            .expect("receive slot too small");
        recv_cq.push_back(WorkCompletion {
            wr_id: r.wr_id,
            status: WcStatus::Success,
            opcode: WcOpcode::Recv,
            byte_len: n as u32,
            imm_data: imm,
            qp_num: 2,
        });
    }
    for op in tx.sends {
        let sg = &tx.sges[op.sge_start as usize..(op.sge_start + op.sge_count) as usize];
        let imm = (op.opcode == Opcode::SendWithImm).then_some(op.imm);
        execute(dev, send_cq, b, op, sg, imm);
    }
}

/// Execute one send-queue request of a side (its device `dev`, its send
/// completion queue) against the peer `b`.
fn execute(
    dev: &RegistryOnly,
    send_cq: &mut VecDeque<WorkCompletion>,
    b: &mut Side,
    op: &SendOp,
    sg: &[Sge],
    imm: Option<u32>,
) {
    let dev_b = b.dev.clone();
    {
        let signaled = op.flags.contains(SendFlags::SIGNALED);
        if b.dead {
            // The peer is gone: nothing comes back (the RC retry is still running).
            return;
        }
        let status = match op.opcode {
            Opcode::Send | Opcode::SendWithImm => {
                // Inline or not, every SGE must name registered memory.
                let data = dev.gather(sg).expect("SGE outside registered memory");
                if b.rq.is_empty() || !b.inbound.is_empty() {
                    // Only the handshake may arrive before the peer posted
                    // receives (RC retries it); anything else means the sender
                    // ignored its credits.
                    let hello =
                        imm.is_none() && Header::decode(&data).map(|h| h.kind) == Ok(Kind::Hello);
                    assert!(
                        hello || !b.inbound.is_empty(),
                        "credit flow control violated: a SEND arrived with no receive posted"
                    );
                    b.inbound.push_back((data, imm));
                    if signaled {
                        send_cq.push_back(WorkCompletion {
                            wr_id: op.wr_id,
                            status: WcStatus::Success,
                            opcode: WcOpcode::Send,
                            byte_len: 0,
                            imm_data: None,
                            qp_num: 1,
                        });
                    }
                    return;
                }
                let r = b.rq.pop_front().expect("checked above");
                let n = dev_b
                    .scatter(&[r.sge], &data)
                    .expect("receive slot too small");
                b.recv_cq.push_back(WorkCompletion {
                    wr_id: r.wr_id,
                    status: WcStatus::Success,
                    opcode: WcOpcode::Recv,
                    byte_len: n as u32,
                    imm_data: imm,
                    qp_num: 2,
                });
                WcStatus::Success
            }
            Opcode::RdmaRead => {
                let len: u64 = sg.iter().map(|s| u64::from(s.length())).sum();
                match dev_b.read_remote(op.rkey, op.remote_addr, len) {
                    Ok(data) => {
                        dev.scatter(sg, &data).unwrap();
                        WcStatus::Success
                    }
                    Err(s) => s,
                }
            }
            Opcode::RdmaWrite => {
                let data = dev.gather(sg).unwrap();
                dev_b
                    .write_remote(op.rkey, op.remote_addr, &data)
                    .err()
                    .unwrap_or(WcStatus::Success)
            }
            other => panic!("unexpected opcode {other:?}"),
        };
        if signaled || status != WcStatus::Success {
            send_cq.push_back(WorkCompletion {
                wr_id: op.wr_id,
                status,
                opcode: WcOpcode::for_send(op.opcode),
                byte_len: 0,
                imm_data: None,
                qp_num: 1,
            });
        }
    }
}

fn drain(s: &mut Side) {
    loop {
        // Every other message is taken owning its slot, and given back
        // (or held as Bytes), the rest as Bytes: slots and credits must
        // stay right whichever way they leave.
        let m = if s.got.len() % 2 == 1 {
            match s.conn.poll_message_owned() {
                Some(r) if !s.hold => {
                    s.got.push(r.to_vec());
                    s.conn.recycle_recv(r);
                    continue;
                }
                Some(r) => r.into_bytes(),
                None => break,
            }
        } else {
            match s.conn.poll_message() {
                Some(m) => m,
                None => break,
            }
        };
        // The test keeps a copy; the application's Bytes (and with it the
        // receive slot) is held only while `hold` is set.
        s.got.push(m.to_vec());
        if s.hold {
            s.held.push(m);
        }
    }
    while let Some(ev) = s.conn.poll_event() {
        match ev {
            Event::Sent { id, outcome } => s.outcomes.push((id, outcome)),
            Event::PeerClosed => s.eos = true,
            Event::Failed(e) => s.failed = Some(e),
            Event::Connected | Event::OpDone { .. } => {}
        }
    }
    if !s.hold {
        s.held.clear();
    }
}

/// One random step: deliver one completion somewhere, or pump, or tick.
fn step(sides: &mut [Side; 2], rng: &mut Rng, now: Instant) {
    let i = rng.below(2) as usize;
    let (a, b) = sides.split_at_mut(1);
    let (me, peer) = if i == 0 {
        (&mut a[0], &mut b[0])
    } else {
        (&mut b[0], &mut a[0])
    };
    if me.dead {
        return;
    }
    match rng.below(5) {
        0 | 1 => {
            if let Some(wc) = me.recv_cq.pop_front() {
                me.conn.on_completion(&wc);
            }
        }
        2 => {
            if let Some(wc) = me.send_cq.pop_front() {
                me.conn.on_completion(&wc);
            }
        }
        3 => pump(me, peer, now),
        _ => me.conn.on_tick(now),
    }
    drain(me);
}

fn message(rng: &mut Rng, arena: &Arena, id: u64) -> (Vec<Bytes>, Vec<u8>) {
    let sizes = [0usize, 1, 40, 500, 1000, 1024, 1025, 3000, 20_000, 150_000];
    let size = sizes[rng.below(sizes.len() as u64) as usize];
    let content: Vec<u8> = (0..size).map(|k| (k as u64 * 31 + id * 7) as u8).collect();
    let nchunks = 1 + rng.below(6) as usize;
    let mut chunks = Vec::new();
    let mut off = 0;
    for c in 0..nchunks {
        let end = if c + 1 == nchunks {
            size
        } else {
            off + (size - off) / 2
        };
        let part = &content[off..end];
        off = end;
        // Registered (arena) or foreign (bounced) memory, at random.
        if part.len() <= arena.slot_size() && rng.below(2) == 0 {
            let mut s = arena.alloc().expect("arena slot");
            s.put_slice(part);
            chunks.push(s.freeze());
        } else {
            chunks.push(Bytes::copy_from_slice(part));
        }
    }
    (chunks, content)
}

fn run_exchange(seed: u64, hold_for: usize, handoff: bool) {
    let t0 = Instant::now();
    let mut rng = Rng(seed | 1);
    let c = ProtoConfig { handoff, ..cfg() };
    let mut sides = [side(t0, c.clone()), side(t0, c)];
    let arenas: Vec<Arena> = sides
        .iter()
        .map(|s| s.pd.arena(ArenaConfig::new(160 << 10, 1024)).unwrap())
        .collect();
    const N: u64 = 120;
    let mut expect: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
    let mut ids: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut queued = [0u64; 2];
    let mut fast_sent = [0u64; 2];
    // Odd seeds feed messages faster than the sides pump (a backlog: credit
    // pressure, the queued path); even seeds slowly, so the queue is often
    // empty and small messages take the inline fast path.
    let feed = if seed % 2 == 1 { 4 } else { 24 };
    sides[1].hold = hold_for > 0;
    let mut now = t0;
    for n in 0..400_000u64 {
        now += Duration::from_micros(20);
        // Keep feeding messages.
        for k in 0..2 {
            if queued[k] < N && rng.below(feed) == 0 {
                let (chunks, content) = message(&mut rng, &arenas[k], queued[k] + 1000 * k as u64);
                // Half the time the fast path first: posted at once when it
                // applies, else queued like any message.
                let msg = Msg::from(chunks);
                let fast = if rng.below(2) == 0 {
                    sides[k].conn.send_now(&msg, false, now).unwrap()
                } else {
                    None
                };
                let id = match fast {
                    Some(f) => {
                        let (a, b) = sides.split_at_mut(1);
                        let (me, peer) = if k == 0 {
                            (&mut a[0], &mut b[0])
                        } else {
                            (&mut b[0], &mut a[0])
                        };
                        let op = SendOp {
                            wr_id: f.wr_id,
                            opcode: if f.imm.is_some() {
                                Opcode::SendWithImm
                            } else {
                                Opcode::Send
                            },
                            flags: f.flags,
                            sge_start: 0,
                            sge_count: 1,
                            remote_addr: 0,
                            rkey: 0,
                            imm: f.imm.unwrap_or(0),
                        };
                        if !me.dead {
                            execute(&me.dev.clone(), &mut me.send_cq, peer, &op, &[f.sge], f.imm);
                        }
                        fast_sent[k] += 1;
                        f.id
                    }
                    None => sides[k].conn.send(msg).unwrap(),
                };
                ids[k].push(id);
                expect[k].push(content);
                queued[k] += 1;
            }
        }
        step(&mut sides, &mut rng, now);
        // The holding receiver lets go after a while: no deadlock meanwhile.
        if sides[1].hold && n as usize > hold_for {
            sides[1].hold = false;
            sides[1].held.clear();
        }
        let done = (0..2).all(|k| {
            queued[k] == N
                && sides[1 - k].got.len() as u64 == N
                && sides[k].outcomes.len() as u64 == N
        });
        if done {
            break;
        }
    }
    for k in 0..2 {
        let peer = &sides[1 - k];
        assert!(
            sides[k].failed.is_none(),
            "seed {seed}: side {k} failed: {:?}",
            sides[k].failed
        );
        assert_eq!(
            peer.got.len(),
            expect[k].len(),
            "seed {seed}: side {} got {} of {} messages",
            1 - k,
            peer.got.len(),
            expect[k].len()
        );
        for (i, (m, e)) in peer.got.iter().zip(&expect[k]).enumerate() {
            assert_eq!(
                &m[..],
                &e[..],
                "seed {seed}: message {i} from side {k} differs"
            );
        }
        let h = sides[k].pd.stats().snapshot();
        if handoff {
            assert!(
                h.handoff_ops > 0,
                "seed {seed}: single-chunk messages were handed over"
            );
        } else {
            assert_eq!(h.handoff_ops, 0);
            assert!(
                feed == 4 || fast_sent[k] > 0,
                "seed {seed}: side {k}: no message took the inline fast path"
            );
            assert!(
                feed != 4 || h.coalesce_ops > 0,
                "seed {seed}: side {k}: the backlog formed no bundle"
            );
        }
        let mut o = sides[k].outcomes.clone();
        o.sort();
        let want: Vec<(u64, Outcome)> = ids[k].iter().map(|&i| (i, Outcome::Delivered)).collect();
        assert_eq!(
            o, want,
            "seed {seed}: every send of side {k} delivered exactly once"
        );
    }
}

/// `data` arrives in the posted receive `r` of side `s` (with `imm`), as
/// the device would complete it; then the side's events are drained.
fn arrive(s: &mut Side, r: RecvOp, data: &[u8], imm: Option<u32>) {
    let n = s.dev.scatter(&[r.sge], data).unwrap();
    s.conn.on_completion(&WorkCompletion {
        wr_id: r.wr_id,
        status: WcStatus::Success,
        opcode: WcOpcode::Recv,
        byte_len: n as u32,
        imm_data: imm,
        qp_num: 1,
    });
    drain(s);
}

/// Two sides with the default test configuration, stepped (with `seed`)
/// until both handshakes are done; returns them, the generator and the time.
fn open_pair(seed: u64) -> ([Side; 2], Rng, Instant) {
    let t0 = Instant::now();
    let mut rng = Rng(seed);
    let mut sides = [side(t0, cfg()), side(t0, cfg())];
    let mut now = t0;
    while !(sides[0].conn.is_open() && sides[1].conn.is_open()) {
        now += Duration::from_micros(10);
        step(&mut sides, &mut rng, now);
    }
    (sides, rng, now)
}

#[test]
fn a_recycled_slot_is_kept_only_by_its_own_connection() {
    let (mut sides, _rng, now) = open_pair(5);
    // Two compact messages from side 0, one post each (queued together
    // they would be bundled), none taken yet.
    let (a, b) = sides.split_at_mut(1);
    for k in 0..2u8 {
        a[0].conn.send(Bytes::from(vec![k; 40])).unwrap();
        let tx = a[0].conn.transmit(now);
        let (ops, sges) = (tx.sends.to_vec(), tx.sges.to_vec());
        for op in &ops {
            let sg = &sges[op.sge_start as usize..(op.sge_start + op.sge_count) as usize];
            let imm = (op.opcode == Opcode::SendWithImm).then_some(op.imm);
            execute(&a[0].dev.clone(), &mut a[0].send_cq, &mut b[0], op, sg, imm);
        }
    }
    let s1 = &mut b[0];
    while let Some(wc) = s1.recv_cq.pop_front() {
        s1.conn.on_completion(&wc);
    }
    let first = s1.conn.poll_message_owned().expect("first message");
    let second = s1.conn.poll_message_owned().expect("second message");
    assert_eq!((&first[..], &second[..]), (&[0u8; 40][..], &[1u8; 40][..]));
    assert!(
        first.owns_slot() && second.owns_slot(),
        "compact messages own their slots"
    );
    // Into the other connection: not kept there.
    let before = a[0].conn.spare_slots();
    a[0].conn.recycle_recv(first);
    assert_eq!(a[0].conn.spare_slots(), before, "a foreign slot was kept");
    // Into its own: kept, and posted again before a fresh one.
    let before = s1.conn.spare_slots();
    s1.conn.recycle_recv(second);
    assert_eq!(
        s1.conn.spare_slots(),
        before + 1,
        "its own slot was not kept"
    );
}

#[test]
fn random_interleavings_deliver_everything_in_order_exactly_once() {
    for seed in 1..=12u64 {
        run_exchange(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 0, false);
    }
}

#[test]
fn the_in_process_handoff_passes_the_same_exchange() {
    for seed in 1..=6u64 {
        run_exchange(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 0, true);
        run_exchange(seed.wrapping_mul(0x2545_f491_4f6c_dd1d), 20_000, true);
    }
}

#[test]
fn a_receiver_holding_every_message_stalls_the_sender_without_deadlock() {
    for seed in 1..=4u64 {
        run_exchange(seed.wrapping_mul(0x2545_f491_4f6c_dd1d), 20_000, false);
    }
}

#[test]
fn holding_receiver_caps_data_in_flight_at_its_slots() {
    let t0 = Instant::now();
    let mut rng = Rng(77);
    // One message per slot here (bundles would pack the 200 into 4 slots).
    let c = ProtoConfig {
        bundle: false,
        ..cfg()
    };
    let mut sides = [side(t0, c.clone()), side(t0, c)];
    sides[1].hold = true;
    for _ in 0..200 {
        sides[0].conn.send(Bytes::from_static(b"x")).unwrap();
    }
    let mut now = t0;
    for _ in 0..150_000 {
        now += Duration::from_micros(10);
        step(&mut sides, &mut rng, now);
    }
    // At most recv_slots data messages can be outstanding while the app holds them.
    assert_eq!(
        sides[1].got.len(),
        16,
        "the holder got exactly its data slots' worth"
    );
    assert!(sides[0].failed.is_none() && sides[1].failed.is_none());
    // Control traffic still flows: heartbeats kept both alive past the timeout.
    assert!(now - t0 > cfg().heartbeat_timeout);
}

#[test]
fn small_messages_queued_together_travel_as_bundles() {
    // 200 small messages queued at once (even to a receiver holding every
    // one): packed several to a request and a receive slot, each delivered
    // as its own message, in order, and each send reported once.
    let t0 = Instant::now();
    let mut rng = Rng(11);
    let mut sides = [side(t0, cfg()), side(t0, cfg())];
    sides[1].hold = true;
    let mut ids = Vec::new();
    for i in 0..200u32 {
        let body = i.to_le_bytes()[..(i % 5) as usize].to_vec();
        ids.push(sides[0].conn.send(Bytes::from(body)).unwrap());
    }
    let mut now = t0;
    for _ in 0..50_000 {
        now += Duration::from_micros(10);
        step(&mut sides, &mut rng, now);
        if sides[1].got.len() == 200 && sides[0].outcomes.len() == 200 {
            break;
        }
    }
    assert!(sides[0].failed.is_none() && sides[1].failed.is_none());
    assert_eq!(
        sides[1].got.len(),
        200,
        "every message, though the receiver holds them all"
    );
    for (i, m) in sides[1].got.iter().enumerate() {
        let i = i as u32;
        assert_eq!(&m[..], &i.to_le_bytes()[..(i % 5) as usize], "message {i}");
    }
    let st = sides[0].pd.stats().snapshot();
    assert!(
        st.coalesce_ops > 0 && st.coalesce_ops <= 16,
        "{} bundles for 200 messages in 16 receive slots",
        st.coalesce_ops
    );
    let mut o = sides[0].outcomes.clone();
    o.sort();
    let want: Vec<(u64, Outcome)> = ids.iter().map(|&i| (i, Outcome::Delivered)).collect();
    assert_eq!(o, want, "every send reported delivered once");
}

#[test]
fn a_bundle_buffer_too_small_for_a_message_sends_it_alone() {
    // Bundles of at most 48 bytes (the buffer rounds up to 64): two 30-byte
    // messages (92 bytes with the header and records) never fit, so each is
    // sent alone, never cut, refused or bundled on its own.
    let t0 = Instant::now();
    let mut rng = Rng(13);
    let c = ProtoConfig {
        bundle_bytes: 48,
        ..cfg()
    };
    let mut sides = [side(t0, c.clone()), side(t0, c)];
    for i in 0..50u8 {
        sides[0].conn.send(Bytes::from(vec![i; 30])).unwrap();
    }
    let mut now = t0;
    for _ in 0..50_000 {
        now += Duration::from_micros(10);
        step(&mut sides, &mut rng, now);
        if sides[1].got.len() == 50 {
            break;
        }
    }
    assert!(sides[0].failed.is_none() && sides[1].failed.is_none());
    assert_eq!(sides[1].got.len(), 50);
    for (i, m) in sides[1].got.iter().enumerate() {
        assert_eq!(&m[..], &[i as u8; 30][..], "message {i}");
    }
    assert_eq!(sides[0].conn.bundled_count(), 0);
}

#[test]
fn a_silent_peer_is_declared_dead_and_every_pending_send_resolves() {
    let t0 = Instant::now();
    let mut rng = Rng(5);
    // One message per request, so some are posted and some never are
    // (bundled, all 40 would go in one request).
    let c = ProtoConfig {
        bundle: false,
        ..cfg()
    };
    let mut sides = [side(t0, c.clone()), side(t0, c)];
    let mut now = t0;
    for _ in 0..2000 {
        now += Duration::from_micros(10);
        step(&mut sides, &mut rng, now);
    }
    assert!(sides[0].conn.is_open() && sides[1].conn.is_open());
    sides[1].dead = true;
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(
            sides[0]
                .conn
                .send(Bytes::from_static(b"into the void"))
                .unwrap(),
        );
    }
    while sides[0].failed.is_none() && now - t0 < Duration::from_secs(5) {
        now += Duration::from_millis(1);
        step(&mut sides, &mut rng, now);
    }
    assert!(
        matches!(sides[0].failed, Some(ConnError::HeartbeatTimeout(_))),
        "{:?}",
        sides[0].failed
    );
    let mut resolved: Vec<u64> = sides[0].outcomes.iter().map(|o| o.0).collect();
    resolved.sort();
    assert_eq!(resolved, ids, "every pending send resolved once");
    // Posted-but-unacknowledged ones are Unknown, never-posted ones Failed.
    assert!(sides[0].outcomes.iter().all(|o| o.1 != Outcome::Delivered));
    assert!(sides[0].outcomes.iter().any(|o| o.1 == Outcome::Failed));
}

#[test]
fn a_failed_work_request_fails_the_connection_with_typed_outcomes() {
    let (mut sides, _, now) = open_pair(9);
    let id = sides[0]
        .conn
        .send_tracked(Bytes::from_static(b"one"))
        .unwrap();
    let (a, b) = sides.split_at_mut(1);
    pump(&mut a[0], &mut b[0], now);
    let s0 = &mut a[0];
    // The device reports the request failed: retries exhausted, peer gone.
    let mut wc = s0.send_cq.pop_back().expect("a tracked send is signaled");
    wc.status = WcStatus::RetryExcErr;
    s0.conn.on_completion(&wc);
    drain(s0);
    assert_eq!(
        s0.failed,
        Some(ConnError::Completion(WcStatus::RetryExcErr))
    );
    assert!(
        s0.outcomes.contains(&(id, Outcome::Unknown)),
        "{:?}",
        s0.outcomes
    );
    assert!(s0.conn.send(Bytes::from_static(b"late")).is_err());
}

#[test]
fn forged_headers_and_wrong_versions_are_protocol_errors() {
    let t0 = Instant::now();
    // A Hello from another version.
    let mut s = side(t0, cfg());
    let tx = s.conn.transmit(t0);
    let recv = tx.recvs[0];
    let bad = Header {
        kind: Kind::Hello,
        flags: 0,
        credits: 0,
        seq: 0,
        len: 16,
        aux: zcmsg::proto::wire::MAGIC | 99,
    };
    arrive(&mut s, recv, &bad.to_bytes(), None);
    assert!(
        matches!(&s.failed, Some(ConnError::Protocol(m)) if m.contains("version 99")),
        "{:?}",
        s.failed
    );

    // A bundle whose records do not add up: one says 9 bytes, 3 follow.
    let forged_bundle = {
        let mut h = Header {
            kind: Kind::Bundle,
            flags: 0,
            credits: 0,
            seq: 0,
            len: 7,
            aux: 1,
        }
        .to_bytes()
        .to_vec();
        h.extend_from_slice(&9u32.to_le_bytes());
        h.extend_from_slice(&[1, 2, 3]);
        h
    };
    // Garbage instead of a header, an eager header whose length lies, a
    // forged bundle; then immediates that are not compact eager headers,
    // or one out of order.
    let eager_lies = {
        let mut h = Header {
            kind: Kind::Eager,
            flags: 0,
            credits: 0,
            seq: 0,
            len: 1000,
            aux: 0,
        }
        .to_bytes()
        .to_vec();
        h.extend_from_slice(&[1, 2, 3]);
        h
    };
    let cases = [
        (vec![0xffu8; 24], None),
        (forged_bundle, None),
        (eager_lies, None),
        (vec![1, 2, 3], Some(0x0000_0001)),
        (vec![1, 2, 3], Some(zcmsg::proto::wire::eager_imm(5, 0))),
    ];
    for (garbage, imm) in cases {
        let (mut sides, _, _) = open_pair(3);
        let s = &mut sides[0];
        let r = s.rq.pop_front().expect("a posted receive");
        arrive(s, r, &garbage, imm);
        assert!(
            matches!(s.failed, Some(ConnError::Protocol(_))),
            "{:?} for {imm:?}",
            s.failed
        );
    }

    // A compact eager header before the handshake.
    let mut s = side(t0, cfg());
    let tx = s.conn.transmit(t0);
    let recv = tx.recvs[0];
    arrive(
        &mut s,
        recv,
        b"early",
        Some(zcmsg::proto::wire::eager_imm(0, 0)),
    );
    assert!(
        matches!(&s.failed, Some(ConnError::Protocol(m)) if m.contains("before Hello")),
        "{:?}",
        s.failed
    );
}

#[test]
fn a_small_message_sent_at_once_carries_its_header_in_the_immediate() {
    let (mut sides, mut rng, mut now) = open_pair(5);
    let payload: Vec<u8> = (0..64u8).collect();
    let msg = Msg::from(Bytes::from(payload.clone()));
    let f = sides[0]
        .conn
        .send_now(&msg, false, now)
        .unwrap()
        .expect("the fast path applies to an open, idle connection");
    let imm = f.imm.expect("a compact header in the immediate");
    assert_eq!(
        zcmsg::proto::wire::decode_eager_imm(imm).unwrap().0,
        0,
        "the first message's sequence number"
    );
    assert_eq!(f.sge.length(), 64, "the SEND carries the payload alone");
    let sge = [f.sge];
    let wr = f.work_request(&sge);
    assert_eq!(wr.opcode, Opcode::SendWithImm);
    assert_eq!(wr.imm_data, imm);
    post_now_of(&mut sides, &f);
    for _ in 0..1000 {
        now += Duration::from_micros(10);
        step(&mut sides, &mut rng, now);
        if !sides[1].got.is_empty() {
            break;
        }
    }
    assert_eq!(sides[1].got.len(), 1, "delivered once");
    assert_eq!(
        &sides[1].got[0][..],
        &payload[..],
        "byte for byte, from the slot's start"
    );
    assert!(sides[1].failed.is_none(), "{:?}", sides[1].failed);
}

#[test]
fn close_is_end_of_stream_after_everything_sent_before() {
    let t0 = Instant::now();
    let mut rng = Rng(11);
    let mut sides = [side(t0, cfg()), side(t0, cfg())];
    for i in 0..10u8 {
        sides[0].conn.send(Bytes::from(vec![i; 3000])).unwrap();
    }
    sides[0].conn.close().unwrap();
    assert!(sides[0].conn.close().is_err(), "second close is an error");
    assert!(
        sides[0].conn.send(Bytes::from_static(b"late")).is_err(),
        "send after close is an error"
    );
    let mut now = t0;
    for _ in 0..100_000 {
        now += Duration::from_micros(10);
        step(&mut sides, &mut rng, now);
        if sides[1].eos {
            break;
        }
    }
    assert!(sides[1].eos, "the peer saw end of stream");
    assert_eq!(
        sides[1].got.len(),
        10,
        "everything sent before close arrived first"
    );
    assert!(sides[1]
        .got
        .iter()
        .enumerate()
        .all(|(i, m)| m.len() == 3000 && m[0] == i as u8));
    assert!(sides[1].failed.is_none(), "end of stream is not an error");
}

/// Side 0 sends a last tracked message and closes (after side 1 closed, if
/// `peer_first`). Side 1 takes the requests but is gone before its
/// acknowledgement reaches side 0: the message's request (or, with
/// `fail_close`, the Close's) ends in RetryExcErr, the ones after it are
/// flushed. Returns both sides and the message's id.
fn unacknowledged_last_request(peer_first: bool, fail_close: bool) -> ([Side; 2], u64) {
    let (mut sides, mut rng, mut now) = open_pair(31);
    if peer_first {
        sides[1].conn.close().unwrap();
        while !(sides[0].eos && sides[1].conn.close_done()) {
            now += Duration::from_micros(10);
            step(&mut sides, &mut rng, now);
        }
    }
    let [s0, s1] = &mut sides;
    // Settle what side 0 has pending, so the batch below is all there is.
    while let Some(wc) = s0.recv_cq.pop_front().or_else(|| s0.send_cq.pop_front()) {
        s0.conn.on_completion(&wc);
    }
    drain(s0);
    let id = s0
        .conn
        .send_tracked(Bytes::from_static(b"the last word"))
        .unwrap();
    s0.conn.close().unwrap();
    let tx = s0.conn.transmit(now);
    let (ops, sges) = (tx.sends.to_vec(), tx.sges.to_vec());
    s0.rq.extend(tx.recvs.iter().copied());
    let kinds: Vec<Kind> = ops
        .iter()
        .map(|op| {
            // A compact eager message carries its header in the immediate.
            if op.opcode == Opcode::SendWithImm {
                return Kind::Eager;
            }
            let sg = &sges[op.sge_start as usize..(op.sge_start + op.sge_count) as usize];
            Header::decode(&s0.dev.gather(sg).unwrap()).unwrap().kind
        })
        .collect();
    let want = if fail_close { Kind::Close } else { Kind::Eager };
    let at = kinds
        .iter()
        .position(|&k| k == want)
        .unwrap_or_else(|| panic!("no {want:?} request in {kinds:?}"));
    for (i, op) in ops.iter().enumerate() {
        let status = match i.cmp(&at) {
            std::cmp::Ordering::Less => {
                let sg = &sges[op.sge_start as usize..(op.sge_start + op.sge_count) as usize];
                let imm = (op.opcode == Opcode::SendWithImm).then_some(op.imm);
                execute(&s0.dev, &mut s0.send_cq, s1, op, sg, imm);
                continue;
            }
            std::cmp::Ordering::Equal => WcStatus::RetryExcErr,
            std::cmp::Ordering::Greater => WcStatus::WrFlushErr,
        };
        s0.send_cq.push_back(WorkCompletion {
            wr_id: op.wr_id,
            status,
            opcode: WcOpcode::Send,
            byte_len: 0,
            imm_data: None,
            qp_num: 1,
        });
    }
    s1.dead = true;
    while let Some(wc) = s0.send_cq.pop_front() {
        s0.conn.on_completion(&wc);
    }
    drain(s0);
    (sides, id)
}

#[test]
fn a_close_that_fails_after_the_peers_close_is_done_when_all_before_it_was_delivered() {
    let (sides, id) = unacknowledged_last_request(true, true);
    let s0 = &sides[0];
    assert!(
        s0.conn.close_done(),
        "the peer closed first and everything before our Close was delivered"
    );
    assert_eq!(s0.outcomes, vec![(id, Outcome::Delivered)]);
    assert_eq!(
        s0.failed,
        Some(ConnError::Completion(WcStatus::RetryExcErr)),
        "the connection still ends failed"
    );
}

#[test]
fn a_failed_close_is_not_done_when_a_message_before_it_failed_or_the_peer_had_not_closed() {
    // The message's own request failed: its fate is unknown, so is the close's.
    let (sides, id) = unacknowledged_last_request(true, false);
    assert!(!sides[0].conn.close_done());
    assert_eq!(sides[0].outcomes, vec![(id, Outcome::Unknown)]);
    // The peer had not closed: it never learns that we did.
    let (sides, id) = unacknowledged_last_request(false, true);
    assert!(!sides[0].conn.close_done());
    assert_eq!(sides[0].outcomes, vec![(id, Outcome::Delivered)]);
    assert!(sides[0].failed.is_some());
}

#[test]
fn untracked_deliveries_go_unreported_when_asked_and_tracked_ones_still_report() {
    let t0 = Instant::now();
    let mut rng = Rng(21);
    let mut sides = [side(t0, cfg()), side(t0, cfg())];
    sides[0].conn.set_report_untracked(false);
    // Small ones (inline, bundled when queued together), a large eager
    // one, and one tracked among them.
    let mut untracked = Vec::new();
    for i in 0..20u8 {
        let len = if i == 7 { 900 } else { 40 };
        untracked.push(sides[0].conn.send(Bytes::from(vec![i; len])).unwrap());
    }
    let tracked = sides[0]
        .conn
        .send_tracked(Bytes::from_static(b"tracked"))
        .unwrap();
    let mut now = t0;
    for _ in 0..100_000 {
        now += Duration::from_micros(10);
        step(&mut sides, &mut rng, now);
        if sides[1].got.len() == 21 && !sides[0].outcomes.is_empty() {
            break;
        }
    }
    assert_eq!(sides[1].got.len(), 21, "everything arrived");
    assert_eq!(
        sides[0].outcomes,
        vec![(tracked, Outcome::Delivered)],
        "only the tracked message reported (untracked: {untracked:?})"
    );
    assert!(
        sides[0].conn.bundled_count() > 0,
        "bundles were covered too"
    );
}

/// Post what `send_now` returned for side `a` against `b`, as the endpoint
/// does; returns its request id.
fn post_now_of(sides: &mut [Side; 2], f: &zcmsg::proto::SendNow) -> u64 {
    let sge = [f.sge];
    let wr = f.work_request(&sge);
    let op = SendOp {
        wr_id: f.wr_id,
        opcode: wr.opcode,
        flags: f.flags,
        sge_start: 0,
        sge_count: 1,
        remote_addr: 0,
        rkey: 0,
        imm: f.imm.unwrap_or(0),
    };
    let (a, b) = sides.split_at_mut(1);
    execute(
        &a[0].dev.clone(),
        &mut a[0].send_cq,
        &mut b[0],
        &op,
        &sge,
        f.imm,
    );
    f.wr_id
}

#[test]
fn runs_of_sends_at_once_report_each_outcome_once_through_partial_retirement_and_failure() {
    let (mut sides, _, now) = open_pair(33);
    // Every message's outcome is reported (the default), so each id of a
    // run of untracked inline requests must come back, once, in order.
    let mut ids = Vec::new();
    let mut wr_ids = Vec::new();
    for i in 0..9u8 {
        let msg = Msg::from(Bytes::from(vec![i; 32]));
        let f = sides[0]
            .conn
            .send_now(&msg, i == 5, now)
            .unwrap()
            .expect("credits and send-queue room for nine");
        ids.push(f.id);
        wr_ids.push(post_now_of(&mut sides, &f));
    }
    // The peer takes them (and its receive completions carry nothing back).
    while let Some(wc) = sides[1].recv_cq.pop_front() {
        sides[1].conn.on_completion(&wc);
    }
    drain(&mut sides[1]);
    assert_eq!(sides[1].got.len(), 9);
    for (i, m) in sides[1].got.iter().enumerate() {
        assert_eq!(m, &vec![i as u8; 32], "message {i} byte for byte");
    }
    // Signaled: every 4th (cfg's signal_every) and the tracked one. Each
    // completion retires exactly the requests up to it, also when it falls
    // inside a run of untracked ones.
    let signaled: Vec<WorkCompletion> = sides[0].send_cq.drain(..).collect();
    assert!(signaled.len() >= 2, "{signaled:?}");
    for wc in &signaled {
        sides[0].conn.on_completion(wc);
        drain(&mut sides[0]);
        let upto = wr_ids.iter().position(|&w| w == wc.wr_id).unwrap();
        let want: Vec<(u64, Outcome)> = ids[..=upto]
            .iter()
            .map(|&id| (id, Outcome::Delivered))
            .collect();
        assert_eq!(
            sides[0].outcomes, want,
            "after the completion of {}",
            wc.wr_id
        );
    }
    let done = sides[0].outcomes.len();
    assert!(done < 9, "the last requests wait for the next signaled one");
    // A failure retires what completed before the failed request and
    // resolves the rest, each once.
    let mut more = Vec::new();
    for i in 0..3u8 {
        let msg = Msg::from(Bytes::from(vec![i; 8]));
        let f = sides[0].conn.send_now(&msg, false, now).unwrap().unwrap();
        more.push(f.id);
        wr_ids.push(post_now_of(&mut sides, &f));
    }
    let failed_wr = wr_ids[wr_ids.len() - 2];
    sides[0].conn.on_completion(&WorkCompletion {
        wr_id: failed_wr,
        status: WcStatus::RetryExcErr,
        opcode: WcOpcode::Send,
        byte_len: 0,
        imm_data: None,
        qp_num: 1,
    });
    drain(&mut sides[0]);
    let all: Vec<u64> = ids.iter().chain(&more).copied().collect();
    let got: Vec<u64> = sides[0].outcomes.iter().map(|&(id, _)| id).collect();
    assert_eq!(got, all, "every message reported once, in order");
    let n = all.len();
    for (k, &(id, outcome)) in sides[0].outcomes.iter().enumerate() {
        let want = if k < n - 2 {
            Outcome::Delivered
        } else {
            Outcome::Unknown
        };
        assert_eq!(outcome, want, "message {id}");
    }
    assert_eq!(
        sides[0].failed,
        Some(ConnError::Completion(WcStatus::RetryExcErr))
    );
}

#[test]
fn a_small_contiguous_message_goes_from_its_own_bytes_and_others_fall_back() {
    let (mut sides, _, now) = open_pair(41);
    let one = Msg::from(Bytes::from(vec![7u8; 48]));
    let before = sides[0].pd.stats().snapshot();
    let (f, bytes) = sides[0]
        .conn
        .send_now_inline(&one, false, now)
        .unwrap()
        .expect("one slice with a compact header goes from its own bytes");
    assert_eq!(bytes, &[7u8; 48][..], "the message's own bytes, not a copy");
    assert_eq!(zcmsg::proto::wire::decode_eager_imm(f.imm).unwrap().0, 0);
    assert!(f.flags.contains(SendFlags::INLINE));
    let after = sides[0].pd.stats().snapshot();
    assert_eq!(
        after.inline_bytes - before.inline_bytes,
        48,
        "the device's copy is counted as inline"
    );
    // Two chunks would need gathering, and an empty message carries its
    // header in the payload: neither goes this way, and nothing is taken.
    let two = Msg::from(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]);
    assert!(sides[0]
        .conn
        .send_now_inline(&two, false, now)
        .unwrap()
        .is_none());
    let empty = Msg::from(Bytes::new());
    assert!(sides[0]
        .conn
        .send_now_inline(&empty, false, now)
        .unwrap()
        .is_none());
    let next = sides[0]
        .conn
        .send_now(&two, false, now)
        .unwrap()
        .expect("the staging path takes the gathered one");
    assert_eq!(next.id, f.id + 1, "the refusals took no id");
}
