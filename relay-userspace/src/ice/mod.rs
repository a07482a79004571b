//! ICE toward the app (RFC 8445), with webrtc-ice: every call's leg shares one UDP port on
//! the relay's WAN address (`IcePort`, a `UDPMuxDefault`), and each leg is a full agent
//! (`IceLeg`) whose selected candidate pair says where the app's media comes from: the
//! flows of the call are installed on that pair.

pub mod leg;
