//! The wire format: a 24-byte header at the start of a SEND, or a compact
//! one in its immediate data.
//!
//! ```text
//! 0      1      2         4         8                16               24
//! | kind | flags| credits | seq     | len             | aux            |
//! ```
//! All fields little-endian. `credits` returns receive slots the sender of
//! this message reposted since its last report (piggybacked flow control).
//!
//! An eager message (sent at once by `Connection::send_now`, or from the
//! send queue, inline or not) carries no header in its payload: it is a
//! SEND_WITH_IMM whose immediate data is a compact header, so a 64-byte
//! message lands in one cache line of the receive slot instead of spilling
//! its last 24 bytes into a second one, and the slot is handed over from
//! offset 0:
//!
//! ```text
//! bit 31        30..16              15..0
//! | 1 (eager) | credits (15 bits) | low 16 bits of seq |
//! ```
//!
//! Its length is the completion's byte count. Every other message keeps
//! the full header and is sent without immediate data: an empty one (a
//! zero-length SGE means 2 GiB to some devices), one sent while more
//! credits are owed than the compact header holds, bundles, rendezvous and
//! control messages. A receiver of this version takes either form of an
//! eager message, wherever it was sent from.

use crate::verbs::RemoteRegion;

/// Protocol version carried by `Hello`.
pub const VERSION: u16 = 3;
/// Header length in bytes.
pub const HDR: usize = 24;
/// Magic in `Hello`'s aux field, so a non-zcmsg peer is recognised at once.
pub const MAGIC: u64 = 0x7a63_6d73_6731_0000; // "zcmsg1\0\0"

/// Marks an immediate that is a compact eager header (see the module docs);
/// an immediate without it is a protocol error.
pub const IMM_EAGER: u32 = 1 << 31;
/// Most credits a compact eager header returns.
pub const IMM_MAX_CREDITS: u16 = 0x7fff;

/// The compact header of an eager message: `seq` (its low 16 bits are
/// sent) and up to [`IMM_MAX_CREDITS`] credits.
pub fn eager_imm(seq: u32, credits: u16) -> u32 {
    debug_assert!(credits <= IMM_MAX_CREDITS);
    IMM_EAGER | (u32::from(credits & IMM_MAX_CREDITS) << 16) | (seq & 0xffff)
}

/// Decode a compact eager header into the low 16 bits of its sequence
/// number and its credits.
pub fn decode_eager_imm(imm: u32) -> Result<(u16, u16), WireError> {
    if imm & IMM_EAGER == 0 {
        return Err(WireError::BadImmediate(imm));
    }
    Ok((
        (imm & 0xffff) as u16,
        ((imm >> 16) as u16) & IMM_MAX_CREDITS,
    ))
}

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Handshake: version, receive slots, limits.
    Hello = 1,
    /// A whole message in this SEND.
    Eager = 2,
    /// Rendezvous request to send: the payload names the sender's regions.
    Rts = 3,
    /// Rendezvous done: the receiver has read message `seq`; release it.
    Done = 4,
    /// Explicit credit return.
    Credit = 5,
    /// No more messages from this side.
    Close = 6,
    /// Liveness.
    Heartbeat = 7,
    /// In-process handoff: the payload (`len` bytes) travels as the sender's
    /// own `Bytes` through the peer's handoff queue; this SEND keeps order
    /// and credits.
    Handoff = 8,
    /// Several small messages in one SEND: `aux` of them, numbered from
    /// `seq`, their bytes back to back, then a trailer of their lengths
    /// ([`REC`] bytes each, u32 little-endian, in order), `len` bytes in
    /// all. The lengths sit together so the receiver finds every message
    /// from one or two cache lines of the trailer, without touching the
    /// payload: records that led each message (version 2) made it chase
    /// one cache miss per message, in series.
    Bundle = 9,
}

/// Bytes a bundle spends per message: its length in the trailer, u32
/// little-endian.
pub const REC: usize = 4;

/// Most messages in one bundle.
pub const MAX_BUNDLE: u64 = 64;

/// Check a bundle's trailer (`count` lengths, which with the messages must
/// exactly fill `payload`) and call `each(offset, len)` for every message,
/// offsets relative to `payload`. Nothing is reported unless the whole
/// bundle is well formed. Reads only the trailer, never the messages.
pub fn bundle_records(
    payload: &[u8],
    count: u64,
    mut each: impl FnMut(usize, usize),
) -> Result<(), WireError> {
    let bad = |why: &str| {
        WireError::BadBundle(format!(
            "{count} messages in {} bytes: {why}",
            payload.len()
        ))
    };
    if count == 0 || count > MAX_BUNDLE {
        return Err(bad("count out of range"));
    }
    let Some(body) = payload.len().checked_sub(count as usize * REC) else {
        return Err(bad("the trailer of lengths is cut short"));
    };
    let trailer = &payload[body..];
    let len_at = |i: usize| {
        let r = &trailer[i * REC..][..REC];
        u32::from_le_bytes([r[0], r[1], r[2], r[3]]) as usize
    };
    // At most 64 lengths of at most 2^32 - 1 each: the sum cannot wrap.
    let total: usize = (0..count as usize).map(len_at).sum();
    if total != body {
        return Err(bad(if total > body {
            "the messages run past the trailer"
        } else {
            "bytes left over"
        }));
    }
    let mut off = 0;
    for i in 0..count as usize {
        let len = len_at(i);
        each(off, len);
        off += len;
    }
    Ok(())
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Eager,
            3 => Kind::Rts,
            4 => Kind::Done,
            5 => Kind::Credit,
            6 => Kind::Close,
            7 => Kind::Heartbeat,
            8 => Kind::Handoff,
            9 => Kind::Bundle,
            _ => return None,
        })
    }

    /// Data messages consume data credits and are delivered to the application.
    pub fn is_data(self) -> bool {
        matches!(self, Kind::Eager | Kind::Rts | Kind::Handoff | Kind::Bundle)
    }
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Message kind.
    pub kind: Kind,
    /// Reserved flags (0).
    pub flags: u8,
    /// Receive slots returned.
    pub credits: u16,
    /// Data: message sequence number; Done: the sequence released.
    pub seq: u32,
    /// Eager/Rts: payload length; Hello: receive slots offered.
    pub len: u64,
    /// Rts: number of regions; Hello: magic | version.
    pub aux: u64,
}

/// Why a header or payload was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// Fewer bytes than a header.
    #[error("truncated header: {0} bytes")]
    Truncated(usize),
    /// Unknown kind byte.
    #[error("unknown message kind {0}")]
    BadKind(u8),
    /// The header's length disagrees with the bytes received.
    #[error("header says {said} payload bytes, {got} arrived")]
    BadLength {
        /// Claimed.
        said: u64,
        /// Received.
        got: u64,
    },
    /// A handshake from something that is not a zcmsg peer, or another version.
    #[error("handshake refused: {0}")]
    Handshake(String),
    /// A rendezvous descriptor that does not parse.
    #[error("malformed rendezvous descriptor: {0}")]
    BadRendezvous(String),
    /// A bundle whose records do not add up.
    #[error("malformed bundle: {0}")]
    BadBundle(String),
    /// Immediate data that is not a compact eager header.
    #[error("immediate data {0:#010x} is not a compact eager header")]
    BadImmediate(u32),
}

impl Header {
    /// Encode into the first `HDR` bytes of `out`.
    pub fn encode(&self, out: &mut [u8]) {
        out[0] = self.kind as u8;
        out[1] = self.flags;
        out[2..4].copy_from_slice(&self.credits.to_le_bytes());
        out[4..8].copy_from_slice(&self.seq.to_le_bytes());
        out[8..16].copy_from_slice(&self.len.to_le_bytes());
        out[16..24].copy_from_slice(&self.aux.to_le_bytes());
    }

    /// Encode into a fresh array.
    pub fn to_bytes(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        self.encode(&mut b);
        b
    }

    /// Decode, checking the kind.
    pub fn decode(b: &[u8]) -> Result<Header, WireError> {
        if b.len() < HDR {
            return Err(WireError::Truncated(b.len()));
        }
        let kind = Kind::from_u8(b[0]).ok_or(WireError::BadKind(b[0]))?;
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        Ok(Header {
            kind,
            flags: b[1],
            credits: u16::from_le_bytes([b[2], b[3]]),
            seq: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            len: u64_at(8),
            aux: u64_at(16),
        })
    }
}

/// Encode a rendezvous descriptor (the regions) after the header.
pub fn encode_regions(regions: &[RemoteRegion], out: &mut [u8]) -> usize {
    let mut off = 0;
    for r in regions {
        out[off..off + RemoteRegion::WIRE_LEN].copy_from_slice(&r.to_bytes());
        off += RemoteRegion::WIRE_LEN;
    }
    off
}

/// Decode `n` regions whose lengths must add up to `total`.
pub fn decode_regions(
    b: &[u8],
    n: u64,
    total: u64,
    out: &mut Vec<RemoteRegion>,
) -> Result<(), WireError> {
    out.clear();
    let need = (n as usize)
        .checked_mul(RemoteRegion::WIRE_LEN)
        .ok_or_else(|| WireError::BadRendezvous("region count overflows".into()))?;
    if n == 0 || b.len() < need {
        return Err(WireError::BadRendezvous(format!(
            "{n} regions need {need} bytes, {} arrived",
            b.len()
        )));
    }
    let mut sum = 0u64;
    for i in 0..n as usize {
        let r = RemoteRegion::from_bytes(&b[i * RemoteRegion::WIRE_LEN..])
            .ok_or_else(|| WireError::BadRendezvous("region wraps the address space".into()))?;
        sum = sum
            .checked_add(r.len)
            .ok_or_else(|| WireError::BadRendezvous("lengths overflow".into()))?;
        out.push(r);
    }
    if sum != total {
        return Err(WireError::BadRendezvous(format!(
            "regions hold {sum} bytes, header says {total}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_garbage() {
        let h = Header {
            kind: Kind::Rts,
            flags: 0,
            credits: 513,
            seq: 0xdead_beef,
            len: 1 << 40,
            aux: 3,
        };
        assert_eq!(Header::decode(&h.to_bytes()), Ok(h));
        assert_eq!(
            Header::decode(&h.to_bytes()[..23]),
            Err(WireError::Truncated(23))
        );
        let mut bad = h.to_bytes();
        bad[0] = 99;
        assert_eq!(Header::decode(&bad), Err(WireError::BadKind(99)));
    }

    #[test]
    fn bundles_must_add_up() {
        let msgs = [&b"ab"[..], b"", b"xyz"];
        let mut buf = Vec::new();
        for m in msgs {
            buf.extend_from_slice(m);
        }
        for m in msgs {
            buf.extend_from_slice(&(m.len() as u32).to_le_bytes());
        }
        let mut got = Vec::new();
        bundle_records(&buf, 3, |off, len| got.push(buf[off..off + len].to_vec())).unwrap();
        assert_eq!(got, vec![b"ab".to_vec(), vec![], b"xyz".to_vec()]);
        let none = |_: usize, _: usize| panic!("a malformed bundle reported a message");
        // Wrong counts, a cut trailer, overlong lengths, bytes left over.
        assert!(bundle_records(&buf, 2, none).is_err());
        assert!(bundle_records(&buf, 4, none).is_err());
        assert!(bundle_records(&buf, 0, none).is_err());
        assert!(bundle_records(&buf[..buf.len() - 1], 3, none).is_err());
        assert!(bundle_records(&buf[1..], 3, none).is_err());
        assert!(bundle_records(&buf[..2], 1, none).is_err());
        let t = buf.len() - 3 * REC;
        let mut long = buf.clone();
        long[t] = 200;
        assert!(bundle_records(&long, 3, none).is_err());
        let mut short = buf.clone();
        short[t] = 1;
        assert!(bundle_records(&short, 3, none).is_err());
        let mut huge = buf.clone();
        huge[t..t + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(bundle_records(&huge, 3, none).is_err());
        assert!(bundle_records(&[], MAX_BUNDLE + 1, none).is_err());
        assert!(
            bundle_records(&[0; 4 * MAX_BUNDLE as usize], MAX_BUNDLE, |_, len| {
                assert_eq!(len, 0)
            })
            .is_ok()
        );
    }

    #[test]
    fn regions_must_add_up() {
        let rs = [
            RemoteRegion {
                addr: 4096,
                len: 100,
                rkey: 1,
            },
            RemoteRegion {
                addr: 8192,
                len: 28,
                rkey: 2,
            },
        ];
        let mut buf = [0u8; 64];
        let n = encode_regions(&rs, &mut buf);
        let mut out = Vec::new();
        decode_regions(&buf[..n], 2, 128, &mut out).unwrap();
        assert_eq!(out, rs);
        assert!(decode_regions(&buf[..n], 2, 129, &mut out).is_err());
        assert!(decode_regions(&buf[..n - 1], 2, 128, &mut out).is_err());
        assert!(decode_regions(&buf[..n], 0, 0, &mut out).is_err());
        assert!(decode_regions(&buf[..n], u64::MAX, 128, &mut out).is_err());
    }
}
