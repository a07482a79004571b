//! The TURN server (RFC 8656; docs/turn-design.md): a sans-IO core, and the driver that runs
//! it on sockets and offloads bound channels to the flow table.
//!
//! - [`config`]: the `[turn]` section.
//! - [`credentials`]: long-term credentials from static users and the TURN REST API scheme
//!   coturn calls `use-auth-secret`.
//! - [`nonce`]: stateless nonces that expire (438 Stale Nonce) and are bound to the client.
//! - [`message`]: the STUN/TURN attribute set (stun_codec) and ChannelData framing.
//! - [`request`]: a request read once into a typed value (400, 420, 442 raised there).
//! - [`auth`]: who signed a request, and the same signature on its response.
//! - [`refusal`]: the closed set of reasons a request is refused (also the metric labels).
//! - [`policy`]: which peers allocations may reach; the per-source Allocate rate.
//! - [`server`]: the protocol core: Binding, Allocate, Refresh, CreatePermission,
//!   ChannelBind, Send and Data indications, ChannelData, expiry, quotas, the state
//!   store's records.
//! - [`driver`]: the core on real UDP sockets, offload to the flow table, the state store.
//! - [`tcp`]: clients over TCP and TLS.

pub mod auth;
pub mod config;
pub mod credentials;
pub mod driver;
pub mod message;
pub mod nonce;
pub mod policy;
pub mod refusal;
pub mod request;
pub mod server;
pub mod tcp;
