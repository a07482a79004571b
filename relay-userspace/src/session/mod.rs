//! Calls' media sessions. `sdp`: the offer/answer rewriting between the app leg
//! (ICE, the relay's WAN side) and the PBX leg (plain SDP/RTP, the relay's LAN side); `streams`: every stream of a call a SIP proxy
//! sets up over ng, anchored on both sides.

pub mod sdp;
pub mod streams;
