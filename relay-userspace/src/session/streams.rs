//! SDP for calls a SIP proxy sets up over ng: every media stream (audio, video, ...) is
//! anchored, each on a port pair of its own on the relay's interface toward the side that
//! gets the description. Profiles, codecs and keys pass through untouched: both sides
//! share them and the relay forwards what they send (plain RTP, SRTP, DTLS) as is.

use std::net::{IpAddr, SocketAddr};

use sdp::description::common::{Address, Attribute, ConnectionInformation};

use super::sdp::{ICE_ATTRIBUTES, IceLines, SdpError, parse, rtcp_address};

/// Where one side sends and wants one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamEndpoint {
    pub rtp: SocketAddr,
    /// The RTP address when multiplexed (RFC 5761), else `rtcp_apart`.
    pub rtcp: SocketAddr,
    pub rtcp_mux: bool,
    /// Where RTCP goes when it is not multiplexed: `a=rtcp` (RFC 3605) or port + 1. A side
    /// that offered rtcp-mux falls back to it when the answer refuses multiplexing.
    pub rtcp_apart: SocketAddr,
}

impl StreamEndpoint {
    /// The endpoint with RTCP on its own port (RFC 5761 section 5.1.1: the answer did not
    /// accept rtcp-mux).
    pub fn demuxed(self) -> StreamEndpoint {
        StreamEndpoint {
            rtcp: self.rtcp_apart,
            rtcp_mux: false,
            ..self
        }
    }
}

/// One m-line as a side described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    /// `audio`, `video`...
    pub media: String,
    pub proto: String,
    /// None where the stream is refused (port 0).
    pub endpoint: Option<StreamEndpoint>,
    /// The side's ICE for the stream when it speaks ICE (credentials at media or session
    /// level): only component 1's candidates, the one the relay's agents check (RTP, and
    /// RTCP when multiplexed).
    pub ice: Option<IceLines>,
}

/// Every m-line of a description, in order. `address` takes the place of the description's
/// connection address (the SIP source address, when the proxy says the SDP's is not to be
/// trusted).
pub fn streams(text: &str, address: Option<IpAddr>) -> Result<Vec<Stream>, SdpError> {
    let description = parse(text)?;
    if description.media_descriptions.is_empty() {
        return Err(SdpError::NoMedia);
    }
    let session_address = description
        .connection_information
        .as_ref()
        .and_then(|c| c.address.as_ref());
    description
        .media_descriptions
        .iter()
        .enumerate()
        .map(|(i, media)| {
            let port = media.media_name.port.value;
            let endpoint = if port == 0 {
                None
            } else {
                let port = u16::try_from(port)
                    .map_err(|_| SdpError::Unparseable(format!("m-line {}: port {port}", i + 1)))?;
                let ip = match address {
                    Some(ip) => ip,
                    None => media
                        .connection_information
                        .as_ref()
                        .and_then(|c| c.address.as_ref())
                        .or(session_address)
                        .and_then(|a| a.address.parse::<IpAddr>().ok())
                        .ok_or(SdpError::NoStreamAddress { line: i + 1 })?,
                };
                let rtp = SocketAddr::new(ip, port);
                let rtcp_mux = media.has_attribute("rtcp-mux");
                let rtcp_apart = media
                    .attribute("rtcp")
                    .flatten()
                    .and_then(|value| rtcp_address(value, ip))
                    .map(|rtcp| match address {
                        // The SIP source stands for every address the SDP names.
                        Some(_) => SocketAddr::new(ip, rtcp.port()),
                        None => rtcp,
                    })
                    .unwrap_or_else(|| SocketAddr::new(ip, port.wrapping_add(1)));
                Some(StreamEndpoint {
                    rtp,
                    rtcp: if rtcp_mux { rtp } else { rtcp_apart },
                    rtcp_mux,
                    rtcp_apart,
                })
            };
            let value = |key: &str| {
                media
                    .attribute(key)
                    .flatten()
                    .or_else(|| description.attribute(key).map(String::as_str))
                    .map(str::to_owned)
            };
            let ice = match (value("ice-ufrag"), value("ice-pwd")) {
                (Some(ufrag), Some(pwd)) => Some(IceLines {
                    ufrag,
                    pwd,
                    candidates: media
                        .attributes
                        .iter()
                        .filter(|a| a.is_ice_candidate())
                        .filter_map(|a| a.value.clone())
                        .filter(|c| c.split_whitespace().nth(1) == Some("1"))
                        .collect(),
                }),
                _ => None,
            };
            Ok(Stream {
                media: media.media_name.media.clone(),
                proto: media.media_name.protos.join("/"),
                endpoint,
                ice,
            })
        })
        .collect()
}

/// How the description the relay writes treats rtcp-mux.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RtcpMux {
    /// As the other side wrote it.
    #[default]
    AsIs,
    /// `a=rtcp-mux` added (rtpengine's `rtcp-mux-offer`): the relay takes either.
    Offer,
    /// `a=rtcp-mux` removed (`rtcp-mux-demux`): RTCP on its own port.
    Demux,
}

/// What the relay changes in a description it passes on.
#[derive(Debug, Clone, Copy)]
pub struct Anchor<'a> {
    /// The relay's address on the interface toward the side that gets the description.
    pub ip: IpAddr,
    /// The relay's RTP port of each m-line (None: refused, port 0); RTCP is the one above.
    pub ports: &'a [Option<u16>],
    pub rtcp_mux: RtcpMux,
    /// `o=`'s address too (rtpengine's `replace-origin`).
    pub origin: bool,
    /// `a=rtcp:PORT IN IP4 ADDRESS`; otherwise `a=rtcp:PORT` (the address is `c=`'s), as
    /// rtpengine writes it unless told `full-rtcp-attribute`.
    pub full_rtcp: bool,
    /// The relay's ICE toward the side, by m-line (missing or None: that stream is plain).
    pub ice: &'a [Option<IceLines>],
}

/// The description with the relay in every address: the session and media `c=`, each
/// m-line's port and `a=rtcp`, `o=` when asked; the other side's ICE attributes removed,
/// the relay's own written where it speaks ICE toward the side that gets the description.
pub fn anchor_streams(text: &str, anchor: Anchor) -> Result<String, SdpError> {
    let mut description = parse(text)?;
    if anchor.ports.len() != description.media_descriptions.len() {
        return Err(SdpError::NoMedia);
    }
    let address_type = if anchor.ip.is_ipv4() { "IP4" } else { "IP6" };
    let connection = ConnectionInformation {
        network_type: "IN".to_owned(),
        address_type: address_type.to_owned(),
        address: Some(Address {
            address: anchor.ip.to_string(),
            ttl: None,
            range: None,
        }),
    };
    if anchor.origin {
        description.origin.unicast_address = anchor.ip.to_string();
        description.origin.address_type = address_type.to_owned();
    }
    description.connection_information = Some(connection);
    description
        .attributes
        .retain(|a| !ICE_ATTRIBUTES.contains(&a.key.as_str()) && a.key != "rtcp");
    for (index, (media, port)) in description
        .media_descriptions
        .iter_mut()
        .zip(anchor.ports)
        .enumerate()
    {
        media
            .attributes
            .retain(|a| !ICE_ATTRIBUTES.contains(&a.key.as_str()) && a.key != "rtcp");
        media.connection_information = None;
        let Some(port) = *port else {
            media.media_name.port.value = 0;
            continue;
        };
        media.media_name.port.value = port as isize;
        match anchor.rtcp_mux {
            RtcpMux::AsIs => {}
            RtcpMux::Offer if !media.has_attribute("rtcp-mux") => media
                .attributes
                .push(Attribute::new("rtcp-mux".into(), None)),
            RtcpMux::Offer => {}
            RtcpMux::Demux => media.attributes.retain(|a| a.key != "rtcp-mux"),
        }
        // RFC 3605: where RTCP goes when it is not multiplexed (and a fallback when it is).
        let rtcp = if media.has_attribute("rtcp-mux") {
            port
        } else {
            port + 1
        };
        let value = if anchor.full_rtcp {
            format!("{rtcp} IN {address_type} {}", anchor.ip)
        } else {
            rtcp.to_string()
        };
        media
            .attributes
            .push(Attribute::new("rtcp".into(), Some(value)));
        if let Some(Some(ice)) = anchor.ice.get(index) {
            let mut push = |key: &str, value: Option<String>| {
                media.attributes.push(Attribute::new(key.into(), value))
            };
            push("ice-ufrag", Some(ice.ufrag.clone()));
            push("ice-pwd", Some(ice.pwd.clone()));
            for candidate in &ice.candidates {
                push("candidate", Some(candidate.clone()));
            }
            push("end-of-candidates", None);
        }
    }
    Ok(description.marshal())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIPP: &str = "v=0\r\no=user1 53655765 2353687637 IN IP4 10.40.0.2\r\ns=-\r\nc=IN IP4 10.40.0.2\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
    const VIDEO: &str = "v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\nm=audio 5004 RTP/AVP 0\r\na=rtcp:5009\r\na=candidate:1 1 udp 1 192.0.2.10 5004 typ host\r\nm=video 5006 RTP/AVP 96\r\nc=IN IP4 192.0.2.11\r\na=rtcp-mux\r\na=rtpmap:96 VP8/90000\r\nm=text 0 RTP/AVP 98\r\n";

    #[test]
    fn every_stream_and_its_rtcp() {
        let streams = streams(VIDEO, None).unwrap();
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            streams[0].endpoint,
            Some(StreamEndpoint {
                rtp: addr("192.0.2.10:5004"),
                rtcp: addr("192.0.2.10:5009"),
                rtcp_mux: false,
                rtcp_apart: addr("192.0.2.10:5009"),
            })
        );
        assert_eq!(
            streams[1].endpoint,
            Some(StreamEndpoint {
                rtp: addr("192.0.2.11:5006"),
                rtcp: addr("192.0.2.11:5006"),
                rtcp_mux: true,
                rtcp_apart: addr("192.0.2.11:5007"),
            })
        );
        assert_eq!(
            (streams[2].media.as_str(), streams[2].endpoint),
            ("text", None)
        );
        let trusted = super::streams(SIPP, Some("203.0.113.7".parse().unwrap())).unwrap();
        assert_eq!(trusted[0].endpoint.unwrap().rtp, addr("203.0.113.7:6000"));
    }

    #[test]
    fn the_relay_takes_every_address_and_nothing_of_the_other_side_is_left() {
        let ip: IpAddr = "10.30.0.1".parse().unwrap();
        let out = anchor_streams(
            VIDEO,
            Anchor {
                ip,
                ports: &[Some(30000), Some(30002), None],
                rtcp_mux: RtcpMux::AsIs,
                origin: true,
                full_rtcp: true,
                ice: &[],
            },
        )
        .unwrap();
        assert!(!out.contains("192.0.2."), "{out}");
        assert!(!out.contains("candidate"), "{out}");
        assert!(out.contains("m=audio 30000 RTP/AVP 0\r\n"), "{out}");
        assert!(out.contains("a=rtcp:30001 IN IP4 10.30.0.1\r\n"), "{out}");
        assert!(out.contains("m=video 30002 RTP/AVP 96\r\n"), "{out}");
        assert!(out.contains("a=rtcp:30002 IN IP4 10.30.0.1\r\n"), "{out}");
        assert!(out.contains("m=text 0 RTP/AVP 98\r\n"), "{out}");
        // Parses again, with the relay's addresses.
        let again = streams(&out, None).unwrap();
        assert_eq!(again[0].endpoint.unwrap().rtcp.port(), 30001);
        assert_eq!(again[1].endpoint.unwrap().rtp.ip(), ip);
    }

    #[test]
    fn rtcp_mux_offered_or_removed_and_the_origin_kept_unless_asked() {
        let ip: IpAddr = "10.30.0.1".parse().unwrap();
        let anchor = |rtcp_mux, origin| {
            anchor_streams(
                SIPP,
                Anchor {
                    ip,
                    ports: &[Some(30010)],
                    rtcp_mux,
                    origin,
                    full_rtcp: false,
                    ice: &[],
                },
            )
            .unwrap()
        };
        let offered = anchor(RtcpMux::Offer, false);
        assert!(offered.contains("a=rtcp-mux\r\n"), "{offered}");
        assert!(offered.contains("a=rtcp:30010\r\n"), "{offered}");
        assert!(
            offered.contains("o=user1 53655765 2353687637 IN IP4 10.40.0.2"),
            "{offered}"
        );
        let demuxed = anchor_streams(
            VIDEO,
            Anchor {
                ip,
                ports: &[Some(30000), Some(30002), None],
                rtcp_mux: RtcpMux::Demux,
                origin: false,
                full_rtcp: true,
                ice: &[],
            },
        )
        .unwrap();
        assert!(!demuxed.contains("a=rtcp-mux"), "{demuxed}");
        assert!(demuxed.contains("a=rtcp:30003 "), "{demuxed}");
    }

    #[test]
    fn a_sides_ice_is_read_and_the_relays_own_written_where_it_speaks_ice() {
        const AGENT: &str = "v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\na=ice-ufrag:Sess\r\na=ice-pwd:sessionpassword0123456789\r\nm=audio 5004 RTP/AVP 0\r\na=candidate:1 1 udp 2130706431 192.0.2.10 5004 typ host\r\na=candidate:1 2 udp 2130706430 192.0.2.10 5005 typ host\r\nm=video 5006 RTP/AVP 96\r\na=ice-ufrag:Vid0\r\na=ice-pwd:videopassword0123456789012\r\n";
        let parsed = streams(AGENT, None).unwrap();
        let audio = parsed[0].ice.as_ref().unwrap();
        assert_eq!(audio.ufrag, "Sess");
        // Component 1 only: the relay's agents check RTP (RTCP multiplexed or plain).
        assert_eq!(
            audio.candidates,
            ["1 1 udp 2130706431 192.0.2.10 5004 typ host"]
        );
        assert_eq!(parsed[1].ice.as_ref().unwrap().ufrag, "Vid0");
        assert_eq!(streams(SIPP, None).unwrap()[0].ice, None);

        let relay = IceLines {
            ufrag: "rLay".into(),
            pwd: "relaypassword012345678901".into(),
            candidates: vec!["9 1 udp 2130706431 10.30.0.1 30000 typ host".into()],
        };
        let out = anchor_streams(
            AGENT,
            Anchor {
                ip: "10.30.0.1".parse().unwrap(),
                ports: &[Some(30000), Some(30002)],
                rtcp_mux: RtcpMux::Offer,
                origin: false,
                full_rtcp: false,
                ice: &[Some(relay.clone())],
            },
        )
        .unwrap();
        assert!(
            !out.contains("Sess") && !out.contains("192.0.2.10 5004"),
            "{out}"
        );
        let again = streams(&out, None).unwrap();
        assert_eq!(again[0].ice, Some(relay), "{out}");
        assert_eq!(again[1].ice, None, "{out}");
        assert_eq!(out.matches("a=end-of-candidates").count(), 1, "{out}");
    }

    #[test]
    fn a_description_without_media_or_with_a_bad_port_is_refused() {
        let none = "v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n";
        assert_eq!(streams(none, None), Err(SdpError::NoMedia));
        let no_address =
            "v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nt=0 0\r\nm=audio 5004 RTP/AVP 0\r\n";
        assert_eq!(
            streams(no_address, None),
            Err(SdpError::NoStreamAddress { line: 1 })
        );
        let big = "v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\nm=audio 70000 RTP/AVP 0\r\n";
        assert!(matches!(streams(big, None), Err(SdpError::Unparseable(_))));
    }
}
