//! The signalling rendezvous: WebSocket over TLS where controllers (the UC server
//! or PBX side, one per tenant, with an API key) and clients (the apps, with short-lived
//! tokens a controller mints) both connect outbound, and the relay routes their messages:
//! a client's to its tenant's controller, a controller's to a user's clients.
//!
//! `protocol` (the JSON messages, documented in docs/signalling.md), `config` (the
//! `[signalling]` section), `auth` (API keys and tokens), `calls` (call requests, events and
//! errors on the wire), `call_requests` (where a call request is served: here, or on the
//! cluster's relay that anchors the call), `hub` (who is connected, routing with bounded
//! queues), `tls` (certificate from the configuration or self-signed), `server` (the accept
//! loop and one task per connection; TURN over TLS on the same port goes to the TURN
//! server), `prefixed` (the first bytes read to tell them apart, given back).

pub mod auth;
mod call_requests;
pub mod calls;
pub mod config;
pub mod hub;
pub mod prefixed;
pub mod protocol;
pub mod server;
pub mod tls;
