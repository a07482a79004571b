//! The TURN server (RFC 8656), being built in pieces: what exists so far is the
//! authentication the server will use, sans-IO (time is passed in).
//!
//! - [`credentials`]: long-term credentials from static users and the TURN REST API scheme
//!   coturn calls `use-auth-secret`.
//! - [`nonce`]: stateless nonces that expire (438 Stale Nonce) and are bound to the client.

pub mod credentials;
pub mod nonce;
