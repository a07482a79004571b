//! The TURN server (RFC 8656), being built in pieces (docs/turn-design.md). What exists is
//! sans-IO (time is passed in) and unit tested; the socket driver, the configuration and the
//! offload through the flow table come next.
//!
//! - [`credentials`]: long-term credentials from static users and the TURN REST API scheme
//!   coturn calls `use-auth-secret`.
//! - [`nonce`]: stateless nonces that expire (438 Stale Nonce) and are bound to the client.
//! - [`message`]: the STUN/TURN attribute set (stun_codec) and ChannelData framing.
//! - [`server`]: the protocol core: Binding, Allocate, Refresh, CreatePermission,
//!   ChannelBind, Send and Data indications, ChannelData, expiry, peer policy, quotas.
//! - [`driver`]: the core on real UDP sockets, offload to the flow table, the state store.
//! - [`tcp`]: clients over TCP.

pub mod config;
pub mod credentials;
pub mod driver;
pub mod message;
pub mod nonce;
pub mod policy;
pub mod server;
pub mod tcp;
