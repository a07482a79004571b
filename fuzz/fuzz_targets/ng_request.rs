#![no_main]
//! ng datagrams' bodies as the ng server takes them: the bencode decoder never panics nor
//! recurses without bound, what it decodes encodes back to a value that decodes the same,
//! and the request parser either names what is wrong or gives a request. An offer's SDP is
//! anchored as the relay would: what it writes parses again with every stream at the relay
//! and none of the sender's addresses in `c=`, `o=` or `a=rtcp`; with the relay's ICE on
//! every other stream, each stream's ICE is the relay's or none (never the sender's).
//! Seeds: fuzz/seeds/ng_request.

use libfuzzer_sys::fuzz_target;
use relay::{
    ng::{
        bencode,
        protocol::{self, Request},
    },
    session::{
        sdp::IceLines,
        streams::{self, Anchor, RtcpMux},
    },
};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = bencode::decode(data) else {
        return;
    };
    let encoded = value.encode();
    assert_eq!(
        bencode::decode(&encoded).as_ref(),
        Ok(&value),
        "encode then decode is the identity"
    );
    let Ok(Request::Offer(signal)) = protocol::parse(&value) else {
        return;
    };
    let Ok(parsed) = streams::streams(&signal.sdp, None) else {
        return;
    };
    let ip = "10.99.0.1".parse().unwrap();
    let ports: Vec<Option<u16>> = parsed
        .iter()
        .enumerate()
        .map(|(i, s)| s.endpoint.map(|_| 30000 + 2 * i as u16))
        .collect();
    let relay_ice = IceLines {
        ufrag: "rLay".into(),
        pwd: "relaypassword012345678901".into(),
        candidates: vec!["1 1 udp 2130706431 10.99.0.1 30000 typ host".into()],
    };
    let ice: Vec<Option<IceLines>> = (0..parsed.len())
        .map(|i| (i % 2 == 0).then(|| relay_ice.clone()))
        .collect();
    for rtcp_mux in [RtcpMux::AsIs, RtcpMux::Offer, RtcpMux::Demux] {
        let Ok(written) = streams::anchor_streams(
            &signal.sdp,
            Anchor {
                ip,
                ports: &ports,
                rtcp_mux,
                origin: true,
                full_rtcp: true,
                ice: &ice,
            },
        ) else {
            continue;
        };
        let again = streams::streams(&written, None).expect("what the relay writes parses again");
        assert_eq!(again.len(), parsed.len(), "{written}");
        for ((stream, port), ice) in again.iter().zip(&ports).zip(&ice) {
            assert_eq!(
                stream.endpoint.map(|e| (e.rtp.ip(), e.rtp.port())),
                port.map(|p| (ip, p)),
                "each stream at the relay:\n{written}"
            );
            // The relay's ICE where it speaks ICE on a kept stream; nobody's elsewhere
            // (session-level credentials of the sender are gone too).
            let expected = ice.as_ref().filter(|_| port.is_some());
            assert_eq!(stream.ice.as_ref(), expected, "each stream's ICE:\n{written}");
        }
        for other in parsed.iter().filter_map(|s| s.endpoint) {
            let other = other.rtp.ip().to_string();
            if other == ip.to_string() {
                continue;
            }
            assert!(
                !written
                    .lines()
                    .filter(|l| ["c=", "o=", "a=rtcp:"].iter().any(|p| l.starts_with(p)))
                    .any(|l| l.split_whitespace().any(|w| w == other)),
                "the sender's address {other} leaked:\n{written}"
            );
        }
    }
});
