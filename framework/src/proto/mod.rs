//! The sans-IO protocol: framing, handshake, eager and rendezvous messages,
//! credit flow control, close and heartbeats. No I/O, no clocks: see
//! [`conn::Connection`].

pub mod conn;
pub mod handoff;
pub mod wire;

pub use conn::{
    ConnError, Connection, Event, InlineNow, Limits, Msg, Outcome, Payload, ProtoConfig, Received,
    RecvOp, SendError, SendNow, SendOp, Transmit,
};
