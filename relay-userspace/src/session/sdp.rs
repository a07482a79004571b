//! SDP rewriting for a call anchored in the relay (sdp crate, which round-trips the rest
//! of the description untouched).
//!
//! Toward the PBX: the app's description with the relay's LAN address and port in `c=`,
//! `m=` and `a=rtcp`, and every ICE attribute removed: the PBX sends plain RTP to the relay.
//! Toward the app: the PBX's description with the relay's WAN address and ICE port, the
//! relay's ICE credentials and candidates, and `a=rtcp-mux` (the app leg is one port).
//! Codecs, `a=crypto` (SDES), `a=fingerprint`/`a=setup` (DTLS) and everything else pass
//! through as they are: the relay never needs the media keys. Media other than the first
//! audio stream is refused (port 0) in both directions: this version anchors one audio
//! stream per call. Neither side learns the other's addresses.

use std::{
    io::Cursor,
    net::{IpAddr, SocketAddr},
};

use sdp::{
    SessionDescription,
    description::{
        common::{Address, Attribute, ConnectionInformation},
        media::MediaDescription,
    },
};

/// ICE attributes, at session or media level, that mean nothing to a plain-RTP PBX.
const ICE_ATTRIBUTES: &[&str] = &[
    "candidate",
    "end-of-candidates",
    "ice-ufrag",
    "ice-pwd",
    "ice-options",
    "ice-lite",
    "ice-mismatch",
    "remote-candidates",
    "ice-pacing",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    #[error("not a session description: {0}")]
    Unparseable(String),
    #[error("the description has no audio stream (m=audio)")]
    NoAudio,
    #[error("the audio stream is refused (port 0)")]
    AudioRefused,
    #[error("the audio stream has no connection address (c=)")]
    NoAddress,
}

/// The relay's ICE side of a call, as the app gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceOffer {
    pub ufrag: String,
    pub pwd: String,
    /// `a=candidate` values, e.g. "1 1 udp 2130706431 198.51.100.1 3479 typ host".
    pub candidates: Vec<String>,
}

/// Where one side wants its audio: the transport address of `m=audio` (media `c=`, else
/// session `c=`), and its ICE credentials and candidates when it speaks ICE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioEndpoint {
    pub rtp: SocketAddr,
    pub rtcp_mux: bool,
    /// Where its RTCP goes: the RTP address when multiplexed (RFC 5761), else `a=rtcp`
    /// (RFC 3605) or the RTP port + 1.
    pub rtcp: SocketAddr,
    pub ice_ufrag: Option<String>,
    pub ice_pwd: Option<String>,
    pub candidates: Vec<String>,
}

pub fn parse(text: &str) -> Result<SessionDescription, SdpError> {
    SessionDescription::unmarshal(&mut Cursor::new(text.as_bytes()))
        .map_err(|err| SdpError::Unparseable(err.to_string()))
}

/// The audio endpoint a description asks for.
pub fn audio(text: &str) -> Result<AudioEndpoint, SdpError> {
    let description = parse(text)?;
    let index = audio_index(&description)?;
    let media = &description.media_descriptions[index];
    if media.media_name.port.value == 0 {
        return Err(SdpError::AudioRefused);
    }
    let address = media
        .connection_information
        .as_ref()
        .or(description.connection_information.as_ref())
        .and_then(|c| c.address.as_ref())
        .and_then(|a| a.address.parse::<IpAddr>().ok())
        .ok_or(SdpError::NoAddress)?;
    let value = |key: &str| -> Option<String> {
        media
            .attribute(key)
            .flatten()
            .or_else(|| description.attribute(key).map(String::as_str))
            .map(str::to_owned)
    };
    let rtp = SocketAddr::new(address, media.media_name.port.value as u16);
    let rtcp_mux = media.has_attribute("rtcp-mux");
    let rtcp = if rtcp_mux {
        rtp
    } else {
        value("rtcp")
            .and_then(|rtcp| rtcp_address(&rtcp, address))
            .unwrap_or_else(|| SocketAddr::new(address, rtp.port().wrapping_add(1)))
    };
    Ok(AudioEndpoint {
        rtp,
        rtcp_mux,
        rtcp,
        ice_ufrag: value("ice-ufrag"),
        ice_pwd: value("ice-pwd"),
        candidates: media
            .attributes
            .iter()
            .filter(|a| a.is_ice_candidate())
            .filter_map(|a| a.value.clone())
            .collect(),
    })
}

/// The app's description as the PBX gets it: audio to `relay` (the relay's LAN address
/// and the call's RTP port), no ICE. RTCP multiplexed only when `mux` (the PBX offered
/// it); otherwise on the next port, where most PBX trunks want it.
pub fn toward_pbx(app: &str, relay: SocketAddr, mux: bool) -> Result<String, SdpError> {
    let mut description = parse(app)?;
    let media = anchor(&mut description, relay)?;
    if !mux {
        media.attributes.retain(|a| a.key != "rtcp-mux");
    }
    // With rtcp-mux RTCP shares the RTP port; without, it is the next one.
    let rtcp_port = if media.has_attribute("rtcp-mux") {
        relay.port()
    } else {
        relay.port() + 1
    };
    set_rtcp(&mut media.attributes, rtcp_port, relay.ip());
    Ok(description.marshal())
}

/// The PBX's description as the app gets it: audio to `relay` (the relay's WAN address and
/// ICE port), the relay's ICE credentials and candidates, RTCP multiplexed.
pub fn toward_app(pbx: &str, relay: SocketAddr, ice: &IceOffer) -> Result<String, SdpError> {
    let mut description = parse(pbx)?;
    let media = anchor(&mut description, relay)?;
    set_rtcp(&mut media.attributes, relay.port(), relay.ip());
    if !media.has_attribute("rtcp-mux") {
        media
            .attributes
            .push(Attribute::new("rtcp-mux".into(), None));
    }
    media
        .attributes
        .push(Attribute::new("ice-ufrag".into(), Some(ice.ufrag.clone())));
    media
        .attributes
        .push(Attribute::new("ice-pwd".into(), Some(ice.pwd.clone())));
    for candidate in &ice.candidates {
        media
            .attributes
            .push(Attribute::new("candidate".into(), Some(candidate.clone())));
    }
    media
        .attributes
        .push(Attribute::new("end-of-candidates".into(), None));
    Ok(description.marshal())
}

/// What both directions do: the relay's address in `o=` and `c=`, every ICE attribute
/// removed, the first audio stream sent to `relay`, the other streams refused (port 0).
/// Returns the audio stream, for the direction's own attributes.
fn anchor(
    description: &mut SessionDescription,
    relay: SocketAddr,
) -> Result<&mut MediaDescription, SdpError> {
    let index = usable_audio(description)?;
    readdress(description, relay.ip());
    description
        .attributes
        .retain(|a| !ICE_ATTRIBUTES.contains(&a.key.as_str()));
    for (i, media) in description.media_descriptions.iter_mut().enumerate() {
        media
            .attributes
            .retain(|a| !ICE_ATTRIBUTES.contains(&a.key.as_str()));
        if i != index {
            media.media_name.port.value = 0;
        }
    }
    let media = &mut description.media_descriptions[index];
    media.media_name.port.value = relay.port() as isize;
    media.connection_information = None;
    Ok(media)
}

fn audio_index(description: &SessionDescription) -> Result<usize, SdpError> {
    description
        .media_descriptions
        .iter()
        .position(|m| m.media_name.media == "audio")
        .ok_or(SdpError::NoAudio)
}

fn usable_audio(description: &SessionDescription) -> Result<usize, SdpError> {
    let index = audio_index(description)?;
    if description.media_descriptions[index].media_name.port.value == 0 {
        return Err(SdpError::AudioRefused);
    }
    Ok(index)
}

/// The relay's address in `o=` and the session `c=`; media `c=` lines go (the session one
/// covers them).
fn readdress(description: &mut SessionDescription, ip: IpAddr) {
    let address_type = if ip.is_ipv4() { "IP4" } else { "IP6" };
    description.origin.unicast_address = ip.to_string();
    description.origin.address_type = address_type.to_owned();
    description.connection_information = Some(ConnectionInformation {
        network_type: "IN".to_owned(),
        address_type: address_type.to_owned(),
        address: Some(Address {
            address: ip.to_string(),
            ttl: None,
            range: None,
        }),
    });
}

/// `a=rtcp:<port> [IN IP4 <ip>]` (RFC 3605): the address, the media's when not given.
fn rtcp_address(value: &str, media: IpAddr) -> Option<SocketAddr> {
    let mut words = value.split_whitespace();
    let port = words.next()?.parse().ok()?;
    let ip = match (words.next(), words.next(), words.next()) {
        (Some("IN"), Some(_), Some(ip)) => ip.parse().ok()?,
        _ => media,
    };
    Some(SocketAddr::new(ip, port))
}

/// `a=rtcp:<port> IN IP4 <ip>` in place of an existing one (RFC 3605); none is added.
fn set_rtcp(attributes: &mut [Attribute], port: u16, ip: IpAddr) {
    let address_type = if ip.is_ipv4() { "IP4" } else { "IP6" };
    let value = format!("{port} IN {address_type} {ip}");
    if let Some(rtcp) = attributes.iter_mut().find(|a| a.key == "rtcp") {
        rtcp.value = Some(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEBRTC_OFFER: &str = include_str!("../../../fixtures/sdp/webrtc-client-offer.sdp");
    const PBX_PLAIN: &str = include_str!("../../../fixtures/sdp/pbx-plain-rtp-offer.sdp");
    const PBX_SRTP: &str = include_str!("../../../fixtures/sdp/pbx-sdes-srtp-offer.sdp");

    fn lines_with<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.split("\r\n")
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    fn ice() -> IceOffer {
        IceOffer {
            ufrag: "Rl4y".into(),
            pwd: "relaypassword0123456789".into(),
            candidates: vec!["1 1 udp 2130706431 198.51.100.1 3479 typ host".into()],
        }
    }

    #[test]
    fn the_app_offer_reaches_the_pbx_without_ice_and_with_the_relays_address() {
        let relay: SocketAddr = "10.30.0.1:40000".parse().unwrap();
        let rewritten = toward_pbx(WEBRTC_OFFER, relay, true).unwrap();
        assert_eq!(lines_with(&rewritten, "c="), ["c=IN IP4 10.30.0.1"]);
        assert_eq!(
            lines_with(&rewritten, "m="),
            ["m=audio 40000 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126"]
        );
        assert_eq!(
            lines_with(&rewritten, "a=rtcp:"),
            ["a=rtcp:40000 IN IP4 10.30.0.1"]
        );
        for gone in ["a=candidate", "a=ice-ufrag", "a=ice-pwd", "a=ice-options"] {
            assert!(
                lines_with(&rewritten, gone).is_empty(),
                "{gone} in\n{rewritten}"
            );
        }
        // Codecs, DTLS and the rest untouched, in order.
        for kept in [
            "a=rtpmap",
            "a=fmtp",
            "a=fingerprint",
            "a=setup",
            "a=rtcp-mux",
            "a=ssrc",
            "a=mid",
        ] {
            assert_eq!(
                lines_with(&rewritten, kept),
                lines_with(WEBRTC_OFFER, kept),
                "{kept}"
            );
        }
        // None of the app's addresses reaches the PBX.
        for address in ["192.168.1.23", "203.0.113.77", "198.51.100.10", "0.0.0.0"] {
            assert!(!rewritten.contains(address), "{address} in\n{rewritten}");
        }
        assert_eq!(
            audio(&rewritten).unwrap(),
            AudioEndpoint {
                rtp: relay,
                rtcp_mux: true,
                rtcp: relay,
                ice_ufrag: None,
                ice_pwd: None,
                candidates: vec![],
            }
        );
    }

    #[test]
    fn toward_a_pbx_without_rtcp_mux_rtcp_is_on_the_next_port() {
        let relay: SocketAddr = "10.30.0.1:40000".parse().unwrap();
        let rewritten = toward_pbx(WEBRTC_OFFER, relay, false).unwrap();
        assert!(
            lines_with(&rewritten, "a=rtcp-mux").is_empty(),
            "{rewritten}"
        );
        assert_eq!(
            lines_with(&rewritten, "a=rtcp:"),
            ["a=rtcp:40001 IN IP4 10.30.0.1"]
        );
        let endpoint = audio(&rewritten).unwrap();
        assert_eq!(
            (endpoint.rtcp_mux, endpoint.rtcp),
            (false, "10.30.0.1:40001".parse().unwrap())
        );
        // An a=rtcp with its own address (RFC 3605) is where RTCP goes.
        let elsewhere =
            PBX_PLAIN.replace("a=sendrecv", "a=rtcp:5000 IN IP4 10.20.0.9\r\na=sendrecv");
        assert_eq!(
            audio(&elsewhere).unwrap().rtcp,
            "10.20.0.9:5000".parse().unwrap(),
            "{elsewhere}"
        );
    }

    #[test]
    fn the_pbx_offer_reaches_the_app_with_the_relays_ice() {
        let relay: SocketAddr = "198.51.100.1:3479".parse().unwrap();
        let rewritten = toward_app(PBX_SRTP, relay, &ice()).unwrap();
        assert_eq!(lines_with(&rewritten, "c="), ["c=IN IP4 198.51.100.1"]);
        assert_eq!(
            lines_with(&rewritten, "m="),
            ["m=audio 3479 RTP/SAVP 8 0 101"]
        );
        // SDES keys pass through byte for byte; the PBX's RTCP port is replaced by mux.
        assert_eq!(
            lines_with(&rewritten, "a=crypto"),
            lines_with(PBX_SRTP, "a=crypto")
        );
        assert_eq!(
            lines_with(&rewritten, "a=rtcp:"),
            ["a=rtcp:3479 IN IP4 198.51.100.1"]
        );
        assert_eq!(lines_with(&rewritten, "a=rtcp-mux"), ["a=rtcp-mux"]);
        assert!(!rewritten.contains("10.20.0.5"), "{rewritten}");
        let endpoint = audio(&rewritten).unwrap();
        assert_eq!(endpoint.rtp, relay);
        assert_eq!(endpoint.ice_ufrag.as_deref(), Some("Rl4y"));
        assert_eq!(endpoint.ice_pwd.as_deref(), Some("relaypassword0123456789"));
        assert_eq!(endpoint.candidates, ice().candidates);
        assert_eq!(
            lines_with(&rewritten, "a=end-of-candidates"),
            ["a=end-of-candidates"]
        );

        // Plain RTP with a session-level c=: the same.
        let rewritten = toward_app(PBX_PLAIN, relay, &ice()).unwrap();
        assert_eq!(lines_with(&rewritten, "c="), ["c=IN IP4 198.51.100.1"]);
        assert_eq!(
            lines_with(&rewritten, "m="),
            ["m=audio 3479 RTP/AVP 8 0 9 101"]
        );
        assert_eq!(
            lines_with(&rewritten, "a=rtpmap"),
            lines_with(PBX_PLAIN, "a=rtpmap")
        );
        assert_eq!(
            lines_with(&rewritten, "o="),
            ["o=PBX 1700000000 1700000001 IN IP4 198.51.100.1"]
        );
    }

    #[test]
    fn the_pbx_endpoint_is_read_from_the_session_connection() {
        assert_eq!(
            audio(PBX_PLAIN).unwrap(),
            AudioEndpoint {
                rtp: "10.20.0.5:16384".parse().unwrap(),
                rtcp_mux: false,
                rtcp: "10.20.0.5:16385".parse().unwrap(),
                ice_ufrag: None,
                ice_pwd: None,
                candidates: vec![],
            }
        );
        let app = audio(WEBRTC_OFFER).unwrap();
        assert_eq!(app.ice_ufrag.as_deref(), Some("kD3t"));
        assert_eq!(app.candidates.len(), 3);
    }

    #[test]
    fn descriptions_without_usable_audio_are_refused() {
        let relay: SocketAddr = "10.30.0.1:40000".parse().unwrap();
        let video_only = PBX_PLAIN.replace("m=audio", "m=video");
        assert_eq!(
            toward_pbx(&video_only, relay, false),
            Err(SdpError::NoAudio)
        );
        assert_eq!(audio(&video_only), Err(SdpError::NoAudio));
        let refused = PBX_PLAIN.replace("m=audio 16384", "m=audio 0");
        assert_eq!(
            toward_app(&refused, relay, &ice()),
            Err(SdpError::AudioRefused)
        );
        assert!(matches!(
            toward_pbx("hello", relay, false),
            Err(SdpError::Unparseable(_))
        ));
        assert!(matches!(
            toward_pbx("", relay, false),
            Err(SdpError::Unparseable(_)) | Err(SdpError::NoAudio)
        ));
        // A second stream (video) is refused toward the other side, audio kept.
        let with_video =
            format!("{PBX_PLAIN}m=video 16390 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n");
        let rewritten = toward_app(&with_video, relay, &ice()).unwrap();
        assert_eq!(
            lines_with(&rewritten, "m="),
            ["m=audio 40000 RTP/AVP 8 0 9 101", "m=video 0 RTP/AVP 96"]
        );
    }
}
