//! A bridged call's streams besides its audio (video): toward the app every stream shares
//! the one BUNDLE transport (RFC 8843), toward the PBX each has its own LAN ports, as a PBX
//! writes one transport per m-line. What comes from the app is told apart here: RTP by its
//! payload type (the app's m-lines have distinct ones, as BUNDLE asks of them) and then by
//! the SSRCs that learnt, RTCP by the SSRCs it reports on.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::net::UdpSocket;

use super::Call;
use crate::session::sdp::{self, AudioEndpoint};

/// The most streams a call anchors besides its audio (a camera, a screen share, a second
/// audio); further ones are refused (port 0).
pub(super) const MOST_STREAMS: usize = 3;

/// One anchored stream's LAN side: its m-line and the relay's ports for it.
pub(super) struct LanStream {
    /// Its m-line, from 0, and its media (`video`, `audio`).
    pub(super) index: usize,
    pub(super) media: String,
    pub(super) lan: SocketAddr,
    pub(super) rtp: Arc<UdpSocket>,
    pub(super) rtcp: Arc<UdpSocket>,
}

/// Where the PBX wants one stream: RTP, and RTCP when not with it (no rtcp-mux). None in
/// place of the whole: the PBX refused the stream, or has not answered yet.
pub(super) type PbxStream = Option<(SocketAddr, Option<SocketAddr>)>;

/// The PBX's address for each of `streams` in its SDP `endpoints` (its other streams).
pub(super) fn pbx_streams(streams: &[LanStream], endpoints: &[AudioEndpoint]) -> Vec<PbxStream> {
    streams
        .iter()
        .map(|stream| {
            endpoints
                .iter()
                .find(|endpoint| endpoint.line == stream.index + 1)
                .map(|endpoint| (endpoint.rtp, (!endpoint.rtcp_mux).then_some(endpoint.rtcp)))
        })
        .collect()
}

impl Call {
    /// Where the PBX wants `stream`'s RTP, or its RTCP when not with the RTP (`rtcp`);
    /// None: with the RTP (RTCP), or refused (RTP of another stream).
    pub(super) fn pbx_address(&self, stream: usize, rtcp: bool) -> Option<SocketAddr> {
        let inner = self.inner();
        match stream.checked_sub(1) {
            None if rtcp => inner.pbx_rtcp,
            None => Some(inner.pbx()),
            Some(k) => {
                let (rtp, rtcp_address) = inner.pbx_streams.get(k).copied().flatten()?;
                if rtcp { rtcp_address } else { Some(rtp) }
            }
        }
    }

    /// The routes of the call's packets from the app, from the app's SDP.
    pub(super) fn routes(&self) -> Routes {
        let indexes: Vec<usize> = self.streams.iter().map(|stream| stream.index).collect();
        routes_for(&self.inner().app_sdp, &indexes)
    }
}

/// The routes of packets from an app whose SDP is `app_sdp`, for a call whose other
/// streams are the m-lines `indexes`.
pub(super) fn routes_for(app_sdp: &str, indexes: &[usize]) -> Routes {
    if indexes.is_empty() {
        return Routes::audio_only();
    }
    match (sdp::audio(app_sdp), sdp::other_streams(app_sdp)) {
        (Ok(audio), Ok(others)) => Routes::new(&audio, indexes, &others),
        _ => Routes::audio_only(),
    }
}

/// Which stream a packet belongs to: 0 is the audio stream, `k + 1` the call's `k`th
/// other stream.
pub(super) struct Routes {
    /// The app's payload types, each to its stream.
    payload_types: [Option<u8>; 128],
    /// SSRCs seen on each side's RTP, each to its stream.
    app_ssrcs: Mutex<HashMap<u32, u8>>,
    pbx_ssrcs: Mutex<HashMap<u32, u8>>,
    /// Whether there is anything to tell apart (a call with audio only: everything is 0).
    several: bool,
}

/// SSRCs remembered per side: a few per stream (media, RTX, FEC, and the changes of a
/// restarted sender); beyond it they are forgotten and learnt again.
const MOST_SSRCS: usize = 64;

impl Routes {
    /// An audio-only call's.
    pub(super) fn audio_only() -> Routes {
        Routes {
            payload_types: [None; 128],
            app_ssrcs: Mutex::default(),
            pbx_ssrcs: Mutex::default(),
            several: false,
        }
    }

    /// From the app's SDP: its audio stream's formats, and each other stream's (`streams`:
    /// the call's other streams' m-lines, in order; `endpoints`: what the app's SDP says of
    /// its other streams).
    pub(super) fn new(
        audio: &AudioEndpoint,
        streams: &[usize],
        endpoints: &[AudioEndpoint],
    ) -> Routes {
        let mut routes = Routes::audio_only();
        if streams.is_empty() {
            return routes;
        }
        routes.several = true;
        let mut claim = |formats: &[String], stream: u8| {
            for pt in formats.iter().filter_map(|f| f.parse::<u8>().ok()) {
                if let Some(slot) = routes.payload_types.get_mut(pt as usize) {
                    slot.get_or_insert(stream);
                }
            }
        };
        claim(&audio.formats, 0);
        for (k, index) in streams.iter().enumerate() {
            if let Some(endpoint) = endpoints.iter().find(|e| e.line == index + 1) {
                claim(&endpoint.formats, k as u8 + 1);
            }
        }
        routes
    }

    /// The stream of an unprotected packet from the app (RTP or RTCP).
    pub(super) fn app_stream(&self, packet: &[u8], rtcp: bool) -> usize {
        if !self.several || packet.len() < 12 {
            return 0;
        }
        if rtcp {
            let sender = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
            return self.rtcp_stream(packet, sender);
        }
        let ssrc = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
        let stream = self.payload_types[(packet[1] & 0x7f) as usize]
            .or_else(|| lock(&self.app_ssrcs).get(&ssrc).copied())
            .unwrap_or(0);
        learn(&self.app_ssrcs, ssrc, stream);
        stream as usize
    }

    /// An RTP packet from the PBX on `stream`'s port: its SSRC is that stream's (what the
    /// app's reports and feedback about it name).
    pub(super) fn learn_pbx(&self, packet: &[u8], stream: usize) {
        if !self.several || packet.len() < 12 {
            return;
        }
        let ssrc = u32::from_be_bytes([packet[8], packet[9], packet[10], packet[11]]);
        learn(&self.pbx_ssrcs, ssrc, stream as u8);
    }

    /// RTCP goes with its sender's stream (a sender report); else with the stream its
    /// first report block or feedback names (a receiver's RTCP about the PBX's media);
    /// else with the audio.
    fn rtcp_stream(&self, packet: &[u8], sender: u32) -> usize {
        if let Some(stream) = lock(&self.app_ssrcs).get(&sender) {
            return *stream as usize;
        }
        // RFC 3550 6.4: a sender report's blocks follow its 20 bytes of sender info; a
        // receiver report's and feedback's (RFC 4585 6.1) first SSRC is at byte 8.
        let about = match packet[1] {
            200 if packet[0] & 0x1f > 0 => 28,
            201 if packet[0] & 0x1f > 0 => 8,
            205 | 206 => 8,
            _ => return 0,
        };
        let Some(bytes) = packet.get(about..about + 4) else {
            return 0;
        };
        let ssrc = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        lock(&self.pbx_ssrcs)
            .get(&ssrc)
            .map_or(0, |stream| *stream as usize)
    }
}

fn lock(ssrcs: &Mutex<HashMap<u32, u8>>) -> std::sync::MutexGuard<'_, HashMap<u32, u8>> {
    ssrcs.lock().expect("bridge routes")
}

fn learn(ssrcs: &Mutex<HashMap<u32, u8>>, ssrc: u32, stream: u8) {
    let mut ssrcs = lock(ssrcs);
    if ssrcs.get(&ssrc) == Some(&stream) {
        return;
    }
    if ssrcs.len() >= MOST_SSRCS {
        ssrcs.clear();
    }
    ssrcs.insert(ssrc, stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(line: usize, formats: &[&str]) -> AudioEndpoint {
        let address: SocketAddr = "10.0.0.1:4000".parse().unwrap();
        AudioEndpoint {
            rtp: address,
            rtcp_mux: true,
            rtcp: address,
            ice_ufrag: None,
            ice_pwd: None,
            candidates: vec![],
            proto: "UDP/TLS/RTP/SAVPF".into(),
            security: Ok(crate::media::Security::Plain),
            line,
            media: "video".into(),
            formats: formats.iter().map(|f| f.to_string()).collect(),
        }
    }

    fn rtp(pt: u8, ssrc: u32) -> Vec<u8> {
        let mut packet = vec![0x80, pt, 0, 1, 0, 0, 0, 0];
        packet.extend(ssrc.to_be_bytes());
        packet.extend([0; 20]);
        packet
    }

    fn rtcp(pt: u8, count: u8, sender: u32, about_at: usize, about: u32) -> Vec<u8> {
        let mut packet = vec![0x80 | count, pt, 0, 7];
        packet.extend(sender.to_be_bytes());
        packet.resize(about_at, 0);
        packet.extend(about.to_be_bytes());
        packet.resize(about_at + 24, 0);
        packet
    }

    #[test]
    fn app_packets_go_to_their_stream_by_payload_type_then_ssrc() {
        let audio = endpoint(1, &["111", "0"]);
        let routes = Routes::new(&audio, &[1], &[endpoint(2, &["96", "97"])]);
        assert_eq!(routes.app_stream(&rtp(111, 10), false), 0);
        assert_eq!(routes.app_stream(&rtp(96, 20), false), 1);
        assert_eq!(routes.app_stream(&rtp(97, 21), false), 1);
        // A payload type of neither (a codec switched to mid-call without an offer): the
        // SSRC tells.
        assert_eq!(routes.app_stream(&rtp(45, 20), false), 1);
        assert_eq!(routes.app_stream(&rtp(45, 99), false), 0);
        // The app's sender report about its video.
        assert_eq!(routes.app_stream(&rtcp(200, 0, 20, 28, 0), true), 1);
        // Its receiver report and its PLI about the PBX's video.
        routes.learn_pbx(&rtp(96, 5000), 1);
        routes.learn_pbx(&rtp(0, 6000), 0);
        assert_eq!(routes.app_stream(&rtcp(201, 1, 1, 8, 5000), true), 1);
        assert_eq!(routes.app_stream(&rtcp(206, 1, 1, 8, 5000), true), 1);
        assert_eq!(routes.app_stream(&rtcp(200, 1, 77, 28, 5000), true), 1);
        assert_eq!(routes.app_stream(&rtcp(201, 1, 1, 8, 6000), true), 0);
        // Nothing known, or too short to tell: the audio.
        assert_eq!(routes.app_stream(&rtcp(201, 1, 1, 8, 1234), true), 0);
        assert_eq!(routes.app_stream(&[0x81, 201, 0, 1, 0, 0, 0, 1], true), 0);
        assert_eq!(routes.app_stream(&[0x80], false), 0);
    }

    #[test]
    fn an_audio_only_call_has_one_stream() {
        let routes = Routes::new(&endpoint(1, &["0"]), &[], &[]);
        assert_eq!(routes.app_stream(&rtp(96, 20), false), 0);
        assert!(lock(&routes.app_ssrcs).is_empty(), "nothing learnt");
    }

    #[test]
    fn ssrcs_are_forgotten_past_the_bound() {
        let routes = Routes::new(&endpoint(1, &["0"]), &[1], &[endpoint(2, &["96"])]);
        for ssrc in 0..(MOST_SSRCS as u32 * 3) {
            routes.app_stream(&rtp(96, ssrc), false);
        }
        assert!(lock(&routes.app_ssrcs).len() <= MOST_SSRCS);
    }
}
