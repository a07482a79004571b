//! Calls' media sessions. `sdp`: the offer/answer rewriting between the app leg
//! (ICE, the relay's WAN side) and the PBX leg (plain SDP/RTP, the relay's LAN side).

pub mod sdp;
