//! ICE toward the app (RFC 8445), with webrtc-ice: every call's leg shares one UDP port on
//! the relay's WAN address (`IcePort`, a `UDPMuxDefault`). A leg runs a full agent until its
//! pair is selected (`IceLeg`); then the port takes the leg over (`consent`): one timer
//! checks every connected leg's consent, and the leg's packets go to its connection. The
//! flows of the call are installed on the selected pair.

pub mod consent;
pub mod leg;
