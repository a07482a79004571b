//! rtpengine's ng control protocol, so that Kamailio's and OpenSIPS's `rtpengine` modules
//! use the relay as their media relay (docs/ng.md): `bencode` the codec, `protocol` the
//! requests parsed into types, `calls` the calls and their SDP, `media` each stream's
//! ports, flows and userspace forwarders, `ice` the relay as an ICE agent toward a side
//! (`ICE=force`), `server` the UDP socket with its reply cache.

pub mod bencode;
pub mod calls;
pub mod config;
pub mod ice;
pub mod media;
pub mod protocol;
pub mod server;
