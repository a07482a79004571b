//! Media security on a call's legs (docs/calls-design.md, "Media security"): what each
//! side's SDP asks for, the SRTP contexts the relay holds when it terminates a leg's
//! security, DTLS-SRTP toward WebRTC apps (RFC 5763/5764), SDES keys (RFC 4568), and the
//! counters of what the relay transcrypted or refused.
//!
//! This layer knows no call and no signalling: `calls` decides which leg gets what and
//! drives these pieces.

pub mod counters;
pub mod dtls;
pub mod security;
pub mod srtp;

pub use counters::{MediaCounters, MediaTotals};
pub use security::{Crypto, Fingerprint, Security, Setup};
pub use srtp::{SrtpError, SrtpSession, Suite};
