//! The local control API relayctl uses: newline-delimited JSON over a Unix socket, versioned.
//! The format is documented in docs/control-api.md.

pub mod client;
pub mod protocol;
pub mod server;
