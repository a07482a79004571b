//! SDP rewriting for a call anchored in the relay (sdp crate, which round-trips the rest
//! of the description untouched).
//!
//! Toward the PBX: the app's description with the relay's LAN address and port in `c=`,
//! `m=` and `a=rtcp`, and every ICE attribute removed: the PBX sends plain RTP to the relay.
//! Toward the app: the PBX's description with the relay's WAN address and ICE port, the
//! relay's ICE credentials and candidates, and `a=rtcp-mux` (the app leg is one port).
//! Media security is the caller's choice ([`Secure`]): passed through as the other side
//! wrote it (the same keys both ways: the relay never needs them), or the relay's own,
//! when it terminates each leg's security (DTLS-SRTP or SDES toward the app, plain RTP or
//! SDES toward the PBX). Media other than the first audio stream is refused (port 0) in
//! both directions: one audio stream per call is anchored. Neither side learns the other's
//! addresses.

use std::{
    io::Cursor,
    net::{IpAddr, SocketAddr},
};

use sdp::{
    SessionDescription,
    description::common::{Address, Attribute, ConnectionInformation},
};

use crate::media::{Crypto, Fingerprint, Security, Setup};

/// ICE attributes, at session or media level, that mean nothing to a plain-RTP PBX.
pub(super) const ICE_ATTRIBUTES: &[&str] = &[
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
    #[error("the description has no media stream (m=)")]
    NoMedia,
    #[error("m-line {line} has no connection address (c=, at media or session level)")]
    NoStreamAddress { line: usize },

    #[error("m=audio (m-line {line}): {proto} without a=fingerprint: DTLS-SRTP needs one")]
    NoFingerprint { line: usize, proto: String },
    #[error(
        "m=audio (m-line {line}): {proto} with no a=crypto line the relay can use (suites: AEAD_AES_128_GCM, AES_CM_128_HMAC_SHA1_80, _32; no MKI, no session parameters)"
    )]
    NoUsableCrypto { line: usize, proto: String },
    #[error(
        "m=audio (m-line {line}): the answer is {answered} ({answered_security}), the offer was {offered} ({offered_security}): the relay cannot bridge that"
    )]
    ProfileMismatch {
        line: usize,
        offered: String,
        offered_security: &'static str,
        answered: String,
        answered_security: &'static str,
    },
    #[error("m=audio (m-line {line}): a DTLS answer must say a=setup:active or a=setup:passive")]
    BadSetup { line: usize },
    #[error(
        "m=audio (m-line {line}): no codec in common: the offer has payload types {offered}, the answer {answered}"
    )]
    NoCommonCodec {
        line: usize,
        offered: String,
        answered: String,
    },
}

/// What the relay writes about media security in the SDP it sends one side.
#[derive(Debug, Clone, Copy)]
pub enum Secure<'a> {
    /// What the other side wrote, untouched: both legs share its keys.
    AsIs,
    /// A plain profile (`RTP/AVP`), no keys.
    Plain { proto: &'a str },
    /// An SDES profile (`RTP/SAVP`, `RTP/SAVPF`) with the relay's key.
    Sdes { proto: &'a str, crypto: &'a Crypto },
    /// A DTLS profile (`UDP/TLS/RTP/SAVPF`) with the relay's certificate and role. With
    /// `bundle` (toward an app) one BUNDLE transport, `mids` naming the m-lines in order
    /// (the offer's, when answering it); without (toward a PBX) neither group nor mids.
    Dtls {
        proto: &'a str,
        fingerprint: &'a Fingerprint,
        setup: Setup,
        mids: &'a [String],
        bundle: bool,
    },
}

/// Attributes of WebRTC transports and SRTP keying, which the relay writes itself when it
/// terminates a leg's security (a plain-RTP PBX never sees them).
const SECURITY_ATTRIBUTES: &[&str] = &[
    "crypto",
    "fingerprint",
    "setup",
    "tls-id",
    "mid",
    "group",
    "msid-semantic",
    "msid",
    "extmap",
    "extmap-allow-mixed",
    "rtcp-fb",
    "rtcp-rsize",
    "ssrc",
    "ssrc-group",
];

/// One side's ICE in a description: its credentials and candidates (the relay's toward an
/// app or an ng side, or what a side offered).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceLines {
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
    /// The stream's transport profile (`RTP/AVP`, `UDP/TLS/RTP/SAVPF`...).
    pub proto: String,
    /// The keys or the DTLS certificate it sends with, or why the relay could not use them
    /// (only an error where the relay terminates the leg's security).
    pub security: Result<Security, SdpError>,
    /// Which m-line it is (1 is the first), for errors that name it, and its media
    /// (`audio`, `video`).
    pub line: usize,
    pub media: String,
    /// Its payload types (`m=` formats), in order of preference.
    pub formats: Vec<String>,
}

pub fn parse(text: &str) -> Result<SessionDescription, SdpError> {
    SessionDescription::unmarshal(&mut Cursor::new(text.as_bytes()))
        .map_err(|err| SdpError::Unparseable(err.to_string()))
}

/// The audio endpoint a description asks for.
pub fn audio(text: &str) -> Result<AudioEndpoint, SdpError> {
    let description = parse(text)?;
    let index = audio_index(&description)?;
    if description.media_descriptions[index].media_name.port.value == 0 {
        return Err(SdpError::AudioRefused);
    }
    endpoint(&description, index).map_err(|err| match err {
        SdpError::NoStreamAddress { .. } => SdpError::NoAddress,
        err => err,
    })
}

/// The streams a description has besides its first audio stream that the relay can
/// anchor: every other audio or video m-line that is not refused (port 0), in order.
pub fn other_streams(text: &str) -> Result<Vec<AudioEndpoint>, SdpError> {
    let description = parse(text)?;
    let audio = audio_index(&description)?;
    description
        .media_descriptions
        .iter()
        .enumerate()
        .filter(|(i, media)| {
            *i != audio
                && media.media_name.port.value != 0
                && matches!(media.media_name.media.as_str(), "audio" | "video")
        })
        .map(|(i, _)| endpoint(&description, i))
        .collect()
}

/// Where the m-line `index` wants its media, and how it secures it.
fn endpoint(description: &SessionDescription, index: usize) -> Result<AudioEndpoint, SdpError> {
    let media = &description.media_descriptions[index];
    let line = index + 1;
    let address = media
        .connection_information
        .as_ref()
        .or(description.connection_information.as_ref())
        .and_then(|c| c.address.as_ref())
        .and_then(|a| a.address.parse::<IpAddr>().ok())
        .ok_or(SdpError::NoStreamAddress { line })?;
    let value = |key: &str| -> Option<String> {
        media
            .attribute(key)
            .flatten()
            .or_else(|| description.attribute(key).map(String::as_str))
            .map(str::to_owned)
    };
    let rtp = SocketAddr::new(address, media.media_name.port.value as u16);
    let proto = media.media_name.protos.join("/");
    let security = match profile_security(&proto) {
        "dtls-srtp" => value("fingerprint")
            .and_then(|f| Fingerprint::parse(&f))
            .map(|fingerprint| Security::Dtls {
                fingerprint,
                // RFC 4145 section 4: no a=setup means active.
                setup: value("setup")
                    .and_then(|s| Setup::parse(&s))
                    .unwrap_or(Setup::Active),
            })
            .ok_or_else(|| SdpError::NoFingerprint {
                line,
                proto: proto.clone(),
            }),
        "sdes-srtp" => {
            let keys: Vec<Crypto> = media
                .attributes
                .iter()
                .filter(|a| a.key == "crypto")
                .filter_map(|a| a.value.as_deref().and_then(Crypto::parse))
                .collect();
            if keys.is_empty() {
                Err(SdpError::NoUsableCrypto {
                    line,
                    proto: proto.clone(),
                })
            } else {
                Ok(Security::Sdes(keys))
            }
        }
        _ => Ok(Security::Plain),
    };
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
        proto,
        security,
        line,
        media: media.media_name.media.clone(),
        formats: media.media_name.formats.clone(),
    })
}

/// The `a=mid` of every m-line in order (RFC 8843), or its index where it has none.
pub fn mids(text: &str) -> Result<Vec<String>, SdpError> {
    let description = parse(text)?;
    Ok(description
        .media_descriptions
        .iter()
        .enumerate()
        .map(|(i, media)| {
            media
                .attribute("mid")
                .flatten()
                .map_or_else(|| i.to_string(), str::to_owned)
        })
        .collect())
}

/// Checks that an answer's audio stream has the kind of security its offer asked for
/// (RFC 3264 section 6: the answer's profile is the offer's) and a codec of the offer's:
/// a plain-RTP answer to a DTLS offer, or the reverse, or no codec in common, would be a
/// call that carries nothing.
pub fn check_answer(offer: &AudioEndpoint, answer: &AudioEndpoint) -> Result<(), SdpError> {
    let (offered, answered) = (
        profile_security(&offer.proto),
        profile_security(&answer.proto),
    );
    if offered != answered {
        return Err(SdpError::ProfileMismatch {
            line: answer.line,
            offered: offer.proto.clone(),
            offered_security: offered,
            answered: answer.proto.clone(),
            answered_security: answered,
        });
    }
    if let Ok(Security::Dtls {
        setup: Setup::ActPass,
        ..
    }) = answer.security
    {
        return Err(SdpError::BadSetup { line: answer.line });
    }
    // RFC 3264 section 6.1: the answer's formats are among the offer's, under the same
    // payload types.
    if !answer.formats.iter().any(|f| offer.formats.contains(f)) {
        return Err(SdpError::NoCommonCodec {
            line: answer.line,
            offered: offer.formats.join(" "),
            answered: answer.formats.join(" "),
        });
    }
    Ok(())
}

/// The kind of security a transport profile means, as [`Security::name`] says it.
fn profile_security(proto: &str) -> &'static str {
    if proto.contains("TLS") {
        "dtls-srtp"
    } else if proto.contains("SAVP") {
        "sdes-srtp"
    } else {
        "rtp"
    }
}

/// The app's description as the PBX gets it: audio to `relay` (the relay's LAN address
/// and the call's RTP port), no ICE. RTCP multiplexed only when `mux` (the PBX offered
/// it); otherwise on the next port, where most PBX trunks want it. `extra`: the other
/// streams the relay anchors (their m-line index, from 0, and the relay's LAN address for
/// each), each on its own port as the PBX expects; a stream this description refuses stays
/// refused.
pub fn toward_pbx(
    app: &str,
    relay: SocketAddr,
    mux: bool,
    secure: Secure,
    extra: &[(usize, SocketAddr)],
) -> Result<String, SdpError> {
    let mut description = parse(app)?;
    let anchored = anchor(&mut description, relay, extra)?;
    secure_streams(&mut description, secure, &anchored)?;
    for (index, relay) in anchored {
        let media = &mut description.media_descriptions[index];
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
    }
    Ok(description.marshal())
}

/// The PBX's description as the app gets it: audio to `relay` (the relay's WAN address and
/// ICE port), the relay's ICE credentials and candidates, RTCP multiplexed. `extra`: the
/// m-line indexes (from 0) of the other streams the relay anchors, on the same transport
/// (BUNDLE, with a DTLS app).
pub fn toward_app(
    pbx: &str,
    relay: SocketAddr,
    ice: &IceLines,
    secure: Secure,
    extra: &[usize],
) -> Result<String, SdpError> {
    let mut description = parse(pbx)?;
    let extra: Vec<(usize, SocketAddr)> = extra.iter().map(|i| (*i, relay)).collect();
    let anchored = anchor(&mut description, relay, &extra)?;
    secure_streams(&mut description, secure, &anchored)?;
    // Every bundled m-line carries the transport's attributes: the same ICE, one port.
    for (index, _) in anchored {
        let media = &mut description.media_descriptions[index];
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
    }
    Ok(description.marshal())
}

/// The relay's own media security in place of the other side's: profiles, keys, and for
/// DTLS the certificate on every anchored stream, every m-line's mid, and with `bundle` the
/// group of the anchored streams (`anchored`: their indexes, the audio stream first).
fn secure_streams(
    description: &mut SessionDescription,
    secure: Secure,
    anchored: &[(usize, SocketAddr)],
) -> Result<(), SdpError> {
    let proto = match secure {
        Secure::AsIs => return Ok(()),
        Secure::Plain { proto } | Secure::Sdes { proto, .. } | Secure::Dtls { proto, .. } => proto,
    };
    let index = anchored.first().map_or(0, |(index, _)| *index);
    let is_anchored = |i: usize| anchored.iter().any(|(index, _)| *index == i);
    let strip = |attributes: &mut Vec<Attribute>| {
        attributes.retain(|a| !SECURITY_ATTRIBUTES.contains(&a.key.as_str()));
    };
    let mid_of = |mids: &[String], i: usize| mids.get(i).cloned().unwrap_or_else(|| i.to_string());
    strip(&mut description.attributes);
    for (i, media) in description.media_descriptions.iter_mut().enumerate() {
        strip(&mut media.attributes);
        media.media_name.protos = proto.split('/').map(str::to_owned).collect();
        let attribute = |key: &str, value: String| Attribute::new(key.into(), Some(value));
        match secure {
            Secure::Sdes { crypto, .. } if i == index => {
                media
                    .attributes
                    .push(attribute("crypto", crypto.to_string()));
            }
            Secure::Dtls {
                fingerprint,
                setup,
                mids,
                bundle,
                ..
            } => {
                if is_anchored(i) {
                    media
                        .attributes
                        .push(attribute("fingerprint", fingerprint.to_string()));
                    media
                        .attributes
                        .push(attribute("setup", setup.as_str().to_owned()));
                }
                if bundle {
                    media.attributes.push(attribute("mid", mid_of(mids, i)));
                }
            }
            _ => {}
        }
    }
    if let Secure::Dtls {
        mids, bundle: true, ..
    } = secure
    {
        let group: Vec<String> = (0..description.media_descriptions.len())
            .filter(|i| is_anchored(*i))
            .map(|i| mid_of(mids, i))
            .collect();
        description.attributes.push(Attribute::new(
            "group".into(),
            Some(format!("BUNDLE {}", group.join(" "))),
        ));
    }
    Ok(())
}

/// What both directions do: the relay's address in `o=` and `c=`, every ICE attribute
/// removed, the first audio stream sent to `relay` and each stream of `extra` that this
/// description does not refuse to its own address, the other streams refused (port 0).
/// Returns the anchored streams (index and the relay's address), the audio stream first.
fn anchor(
    description: &mut SessionDescription,
    relay: SocketAddr,
    extra: &[(usize, SocketAddr)],
) -> Result<Vec<(usize, SocketAddr)>, SdpError> {
    let index = usable_audio(description)?;
    let mut anchored = vec![(index, relay)];
    anchored.extend(extra.iter().copied().filter(|(i, _)| {
        *i != index
            && description
                .media_descriptions
                .get(*i)
                .is_some_and(|media| media.media_name.port.value != 0)
    }));
    readdress(description, relay.ip());
    // a=rtcp is a media attribute (RFC 3605); at session level it is only the other side's
    // address.
    description
        .attributes
        .retain(|a| !ICE_ATTRIBUTES.contains(&a.key.as_str()) && a.key != "rtcp");
    for (i, media) in description.media_descriptions.iter_mut().enumerate() {
        media
            .attributes
            .retain(|a| !ICE_ATTRIBUTES.contains(&a.key.as_str()));
        media.connection_information = None;
        match anchored.iter().find(|(index, _)| *index == i) {
            Some((_, address)) => media.media_name.port.value = address.port() as isize,
            None => {
                // Refused, and nothing of the other side's addresses left in it: its own
                // c= and a=rtcp would name them (the session c= covers every m-line).
                media.media_name.port.value = 0;
                media.attributes.retain(|a| a.key != "rtcp");
            }
        }
    }
    Ok(anchored)
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
pub(super) fn rtcp_address(value: &str, media: IpAddr) -> Option<SocketAddr> {
    let mut words = value.split_whitespace();
    let port = words.next()?.parse().ok()?;
    let ip = match (words.next(), words.next(), words.next()) {
        (Some("IN"), Some(_), Some(ip)) => ip.parse().ok()?,
        _ => media,
    };
    Some(SocketAddr::new(ip, port))
}

/// `a=rtcp:<port> IN IP4 <ip>` in place of an existing one (RFC 3605); none is added, and
/// any further `a=rtcp` (a media description has one at most) goes.
pub(super) fn set_rtcp(attributes: &mut Vec<Attribute>, port: u16, ip: IpAddr) {
    let address_type = if ip.is_ipv4() { "IP4" } else { "IP6" };
    let value = format!("{port} IN {address_type} {ip}");
    let mut seen = false;
    attributes.retain_mut(|a| {
        if a.key != "rtcp" {
            return true;
        }
        if seen {
            return false;
        }
        seen = true;
        a.value = Some(value.clone());
        true
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEBRTC_OFFER: &str = include_str!("../../../fixtures/sdp/webrtc-client-offer.sdp");
    const PBX_PLAIN: &str = include_str!("../../../fixtures/sdp/pbx-plain-rtp-offer.sdp");
    const PBX_SRTP: &str = include_str!("../../../fixtures/sdp/pbx-sdes-srtp-offer.sdp");
    const WEBRTC_AV_OFFER: &str =
        include_str!("../../../fixtures/sdp/webrtc-audio-video-offer.sdp");

    fn lines_with<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.split("\r\n")
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    fn ice() -> IceLines {
        IceLines {
            ufrag: "Rl4y".into(),
            pwd: "relaypassword0123456789".into(),
            candidates: vec!["1 1 udp 2130706431 198.51.100.1 3479 typ host".into()],
        }
    }

    #[test]
    fn the_app_offer_reaches_the_pbx_without_ice_and_with_the_relays_address() {
        let relay: SocketAddr = "10.30.0.1:40000".parse().unwrap();
        let rewritten = toward_pbx(WEBRTC_OFFER, relay, true, Secure::AsIs, &[]).unwrap();
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
                proto: "UDP/TLS/RTP/SAVPF".into(),
                security: Ok(Security::Dtls {
                    fingerprint: Fingerprint::parse(
                        "sha-256 6B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08"
                    )
                    .unwrap(),
                    setup: Setup::ActPass,
                }),
                line: 1,
                media: "audio".into(),
                formats: ["111", "63", "9", "0", "8", "13", "110", "126"]
                    .map(String::from)
                    .to_vec(),
            }
        );
    }

    #[test]
    fn toward_a_pbx_without_rtcp_mux_rtcp_is_on_the_next_port() {
        let relay: SocketAddr = "10.30.0.1:40000".parse().unwrap();
        let rewritten = toward_pbx(WEBRTC_OFFER, relay, false, Secure::AsIs, &[]).unwrap();
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
            "10.20.0.9:5000".parse::<SocketAddr>().unwrap(),
            "{elsewhere}"
        );
    }

    #[test]
    fn the_pbx_offer_reaches_the_app_with_the_relays_ice() {
        let relay: SocketAddr = "198.51.100.1:3479".parse().unwrap();
        let rewritten = toward_app(PBX_SRTP, relay, &ice(), Secure::AsIs, &[]).unwrap();
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
        let rewritten = toward_app(PBX_PLAIN, relay, &ice(), Secure::AsIs, &[]).unwrap();
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
                proto: "RTP/AVP".into(),
                security: Ok(Security::Plain),
                line: 1,
                media: "audio".into(),
                formats: ["8", "0", "9", "101"].map(String::from).to_vec(),
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
            toward_pbx(&video_only, relay, false, Secure::AsIs, &[]),
            Err(SdpError::NoAudio)
        );
        assert_eq!(audio(&video_only), Err(SdpError::NoAudio));
        let refused = PBX_PLAIN.replace("m=audio 16384", "m=audio 0");
        assert_eq!(
            toward_app(&refused, relay, &ice(), Secure::AsIs, &[]),
            Err(SdpError::AudioRefused)
        );
        assert!(matches!(
            toward_pbx("hello", relay, false, Secure::AsIs, &[]),
            Err(SdpError::Unparseable(_))
        ));
        assert!(matches!(
            toward_pbx("", relay, false, Secure::AsIs, &[]),
            Err(SdpError::Unparseable(_)) | Err(SdpError::NoAudio)
        ));
        // A second stream (video) is refused toward the other side, audio kept.
        let with_video =
            format!("{PBX_PLAIN}m=video 16390 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n");
        let rewritten = toward_app(&with_video, relay, &ice(), Secure::AsIs, &[]).unwrap();
        assert_eq!(
            lines_with(&rewritten, "m="),
            ["m=audio 40000 RTP/AVP 8 0 9 101", "m=video 0 RTP/AVP 96"]
        );
    }

    #[test]
    fn a_webrtc_app_gets_dtls_bundle_and_the_pbx_gets_plain_rtp() {
        let relay: SocketAddr = "198.51.100.1:3479".parse().unwrap();
        let fingerprint = Fingerprint::sha256(b"the relay's certificate");
        let mids = vec!["audio0".to_owned(), "video1".to_owned()];
        let with_video =
            format!("{PBX_PLAIN}m=video 16390 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n");
        let secure = Secure::Dtls {
            proto: "UDP/TLS/RTP/SAVPF",
            fingerprint: &fingerprint,
            setup: Setup::ActPass,
            mids: &mids,
            bundle: true,
        };
        let offer = toward_app(&with_video, relay, &ice(), secure, &[]).unwrap();
        assert_eq!(
            lines_with(&offer, "m="),
            [
                "m=audio 3479 UDP/TLS/RTP/SAVPF 8 0 9 101",
                "m=video 0 UDP/TLS/RTP/SAVPF 96"
            ]
        );
        assert_eq!(lines_with(&offer, "a=group:"), ["a=group:BUNDLE audio0"]);
        assert_eq!(
            lines_with(&offer, "a=mid:"),
            ["a=mid:audio0", "a=mid:video1"]
        );
        assert_eq!(lines_with(&offer, "a=setup:"), ["a=setup:actpass"]);
        assert_eq!(
            lines_with(&offer, "a=fingerprint:"),
            [format!("a=fingerprint:{fingerprint}")]
        );
        let endpoint = audio(&offer).unwrap();
        assert_eq!(
            endpoint.security,
            Ok(Security::Dtls {
                fingerprint: fingerprint.clone(),
                setup: Setup::ActPass
            })
        );
        assert_eq!(mids_of(&offer), mids);

        // The app's WebRTC offer toward a plain-RTP PBX: no DTLS, no BUNDLE, no WebRTC
        // attributes, the codecs kept.
        let lan: SocketAddr = "10.30.0.1:40000".parse().unwrap();
        let plain = toward_pbx(
            WEBRTC_OFFER,
            lan,
            false,
            Secure::Plain { proto: "RTP/AVP" },
            &[],
        )
        .unwrap();
        assert_eq!(
            lines_with(&plain, "m="),
            ["m=audio 40000 RTP/AVP 111 63 9 0 8 13 110 126"]
        );
        for gone in [
            "a=fingerprint",
            "a=setup",
            "a=mid",
            "a=group",
            "a=ssrc",
            "a=msid",
            "a=extmap",
            "a=rtcp-fb",
            "a=rtcp-mux",
        ] {
            assert!(lines_with(&plain, gone).is_empty(), "{gone} in\n{plain}");
        }
        assert_eq!(
            lines_with(&plain, "a=rtpmap"),
            lines_with(WEBRTC_OFFER, "a=rtpmap")
        );
        assert_eq!(audio(&plain).unwrap().security, Ok(Security::Plain));
        // A plain answer to that offer is what the relay asked for; a DTLS one is not.
        check_answer(&audio(&plain).unwrap(), &audio(PBX_PLAIN).unwrap()).unwrap();
        assert!(matches!(
            check_answer(&audio(&plain).unwrap(), &audio(WEBRTC_OFFER).unwrap()),
            Err(SdpError::ProfileMismatch { line: 1, .. })
        ));

        // Toward a DTLS PBX: the relay's certificate and role, neither BUNDLE nor mids.
        let dtls = toward_pbx(
            WEBRTC_OFFER,
            lan,
            false,
            Secure::Dtls {
                proto: "UDP/TLS/RTP/SAVP",
                fingerprint: &fingerprint,
                setup: Setup::Active,
                mids: &[],
                bundle: false,
            },
            &[],
        )
        .unwrap();
        assert_eq!(
            lines_with(&dtls, "m="),
            ["m=audio 40000 UDP/TLS/RTP/SAVP 111 63 9 0 8 13 110 126"]
        );
        assert_eq!(lines_with(&dtls, "a=setup:"), ["a=setup:active"]);
        assert!(lines_with(&dtls, "a=group").is_empty(), "{dtls}");
        assert!(lines_with(&dtls, "a=mid").is_empty(), "{dtls}");
        assert_eq!(
            audio(&dtls).unwrap().security,
            Ok(Security::Dtls {
                fingerprint: fingerprint.clone(),
                setup: Setup::Active
            })
        );
    }

    fn mids_of(text: &str) -> Vec<String> {
        mids(text).unwrap()
    }

    /// Found by the sdp_rewrite fuzz target: a refused second stream kept its own `c=`,
    /// the other side's address.
    #[test]
    fn a_refused_stream_keeps_no_address_of_the_other_side() {
        let relay: SocketAddr = "198.51.100.1:3479".parse().unwrap();
        let with_video = format!(
            "{PBX_PLAIN}m=video 16390 RTP/AVP 96\r\nc=IN IP4 10.20.0.6\r\na=rtcp:16391 IN IP4 10.20.0.6\r\na=rtpmap:96 H264/90000\r\n"
        );
        for secure in [Secure::AsIs, Secure::Plain { proto: "RTP/AVP" }] {
            let rewritten = toward_app(&with_video, relay, &ice(), secure, &[]).unwrap();
            assert!(!rewritten.contains("10.20.0."), "{rewritten}");
            assert_eq!(lines_with(&rewritten, "c="), ["c=IN IP4 198.51.100.1"]);
        }
        // Also found by it: a second a=rtcp in the anchored stream kept the PBX's address.
        let twice = PBX_PLAIN.replace(
            "a=sendrecv",
            "a=rtcp:16385 IN IP4 10.20.0.5\r\na=rtcp:20001 IN IP4 10.20.0.7\r\na=sendrecv",
        );
        // And one at session level, where RFC 3605 has none.
        let twice = twice.replace("t=0 0", "t=0 0\r\na=rtcp:9 IN IP4 10.20.0.8");
        let rewritten = toward_app(&twice, relay, &ice(), Secure::AsIs, &[]).unwrap();
        assert_eq!(
            lines_with(&rewritten, "a=rtcp:"),
            ["a=rtcp:3479 IN IP4 198.51.100.1"],
            "{rewritten}"
        );
    }

    #[test]
    fn sdes_keys_are_the_relays_own_and_unusable_ones_are_named() {
        let lan: SocketAddr = "10.30.0.1:40000".parse().unwrap();
        let key = Crypto::generate(1, crate::media::Suite::AesCm128HmacSha1_80);
        let offer = toward_pbx(
            WEBRTC_OFFER,
            lan,
            false,
            Secure::Sdes {
                proto: "RTP/SAVP",
                crypto: &key,
            },
            &[],
        )
        .unwrap();
        assert_eq!(
            lines_with(&offer, "m="),
            ["m=audio 40000 RTP/SAVP 111 63 9 0 8 13 110 126"]
        );
        assert_eq!(lines_with(&offer, "a=crypto:"), [format!("a=crypto:{key}")]);
        assert_eq!(
            audio(&offer).unwrap().security,
            Ok(Security::Sdes(vec![key]))
        );
        // The fixture's keys carry an MKI, which the relay does not implement: passing
        // them through still works, terminating them is refused with the reason.
        assert!(matches!(
            audio(PBX_SRTP).unwrap().security,
            Err(SdpError::NoUsableCrypto { line: 1, .. })
        ));
        let no_fingerprint = WEBRTC_OFFER.replace("a=fingerprint", "a=x-fingerprint");
        assert!(matches!(
            audio(&no_fingerprint).unwrap().security,
            Err(SdpError::NoFingerprint { line: 1, .. })
        ));
        // An answer with none of the offer's codecs carries nothing either.
        let g729 = PBX_PLAIN
            .replace("RTP/AVP 8 0 9 101", "RTP/AVP 18")
            .replace("a=rtpmap:8 PCMA/8000", "a=rtpmap:18 G729/8000");
        let err = check_answer(&audio(PBX_PLAIN).unwrap(), &audio(&g729).unwrap()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "m=audio (m-line 1): no codec in common: the offer has payload types 8 0 9 101, the answer 18"
        );
        // A DTLS answer must choose a role.
        let actpass = audio(WEBRTC_OFFER).unwrap();
        assert_eq!(
            check_answer(&actpass, &actpass),
            Err(SdpError::BadSetup { line: 1 })
        );
    }

    #[test]
    fn video_is_bundled_toward_the_app_and_on_its_own_ports_toward_the_pbx() {
        let lan: SocketAddr = "10.30.0.1:40000".parse().unwrap();
        let lan_video: SocketAddr = "10.30.0.1:40002".parse().unwrap();
        let others = other_streams(WEBRTC_AV_OFFER).unwrap();
        assert_eq!(others.len(), 1);
        assert_eq!((others[0].line, others[0].formats.len()), (2, 4));
        let offer = toward_pbx(
            WEBRTC_AV_OFFER,
            lan,
            false,
            Secure::Plain { proto: "RTP/AVP" },
            &[(1, lan_video)],
        )
        .unwrap();
        assert_eq!(
            lines_with(&offer, "m="),
            [
                "m=audio 40000 RTP/AVP 111 63 9 0 8 13 110 126",
                "m=video 40002 RTP/AVP 96 97 102 103"
            ]
        );
        assert_eq!(
            lines_with(&offer, "a=rtcp:"),
            [
                "a=rtcp:40001 IN IP4 10.30.0.1",
                "a=rtcp:40003 IN IP4 10.30.0.1"
            ]
        );
        for gone in ["a=mid", "a=group", "a=fingerprint", "a=ssrc", "a=rtcp-mux"] {
            assert!(lines_with(&offer, gone).is_empty(), "{gone} in\n{offer}");
        }
        let video = &other_streams(&offer).unwrap()[0];
        assert_eq!(
            (video.rtp, video.rtcp),
            (lan_video, "10.30.0.1:40003".parse().unwrap())
        );

        // The PBX answers both: the app gets one transport for both, in one group.
        let answer = format!("{PBX_PLAIN}m=video 16390 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n");
        assert_eq!(
            other_streams(&answer).unwrap()[0].rtp,
            "10.20.0.5:16390".parse::<SocketAddr>().unwrap()
        );
        let wan: SocketAddr = "198.51.100.1:3479".parse().unwrap();
        let fingerprint = Fingerprint::sha256(b"the relay's certificate");
        let mids = mids(WEBRTC_AV_OFFER).unwrap();
        let secure = Secure::Dtls {
            proto: "UDP/TLS/RTP/SAVPF",
            fingerprint: &fingerprint,
            setup: Setup::Passive,
            mids: &mids,
            bundle: true,
        };
        let to_app = toward_app(&answer, wan, &ice(), secure, &[1]).unwrap();
        assert_eq!(
            lines_with(&to_app, "m="),
            [
                "m=audio 3479 UDP/TLS/RTP/SAVPF 8 0 9 101",
                "m=video 3479 UDP/TLS/RTP/SAVPF 96"
            ]
        );
        assert_eq!(lines_with(&to_app, "a=group:"), ["a=group:BUNDLE 0 1"]);
        assert_eq!(lines_with(&to_app, "a=setup:").len(), 2, "{to_app}");
        assert_eq!(lines_with(&to_app, "a=ice-ufrag:").len(), 2, "{to_app}");
        assert_eq!(lines_with(&to_app, "a=rtcp-mux").len(), 2, "{to_app}");
        assert!(!to_app.contains("10.20.0.5"), "{to_app}");

        // A PBX that refuses the video: refused toward the app too, out of the group.
        let refusing = format!("{PBX_PLAIN}m=video 0 RTP/AVP 96\r\n");
        assert!(other_streams(&refusing).unwrap().is_empty());
        let to_app = toward_app(&refusing, wan, &ice(), secure, &[1]).unwrap();
        assert_eq!(
            lines_with(&to_app, "m="),
            [
                "m=audio 3479 UDP/TLS/RTP/SAVPF 8 0 9 101",
                "m=video 0 UDP/TLS/RTP/SAVPF 96"
            ]
        );
        assert_eq!(lines_with(&to_app, "a=group:"), ["a=group:BUNDLE 0"]);
    }
}
