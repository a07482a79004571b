#![no_main]
//! The SDP rewriters on any text: no panic, and what they write parses again, carries the
//! relay's address and never the other side's (in `o=`, `c=` or `a=rtcp`), whatever media
//! security the relay writes. Seeds: fixtures/sdp. Run:
//! `mkdir -p corpus/sdp_rewrite && cp ../fixtures/sdp/*.sdp corpus/sdp_rewrite/ &&
//! cargo +nightly fuzz run sdp_rewrite corpus/sdp_rewrite -- -max_total_time=600`.

use libfuzzer_sys::fuzz_target;
use relay::session::sdp::{self, IceLines, Secure};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(endpoint) = sdp::audio(text) else {
        return;
    };
    let lan: std::net::SocketAddr = "10.99.0.1:40000".parse().unwrap();
    let wan: std::net::SocketAddr = "198.18.0.1:3479".parse().unwrap();
    let _ = sdp::mids(text);
    // Every other stream anchored too, as for a bridged call with video.
    let others: Vec<usize> = sdp::other_streams(text)
        .map(|streams| streams.iter().map(|s| s.line - 1).collect())
        .unwrap_or_default();
    let lan_extra: Vec<(usize, std::net::SocketAddr)> = others
        .iter()
        .enumerate()
        .map(|(n, i)| (*i, std::net::SocketAddr::new(lan.ip(), 40002 + 2 * n as u16)))
        .collect();
    let _ = sdp::check_answer(&endpoint, &endpoint);
    let ice = IceLines {
        ufrag: "fuzz".into(),
        pwd: "fuzzfuzzfuzzfuzzfuzzfuzz".into(),
        candidates: vec!["1 1 udp 2130706431 198.18.0.1 3479 typ host".into()],
    };
    let fingerprint = relay::media::Fingerprint::sha256(b"fuzz");
    let crypto = relay::media::Crypto::generate(1, relay::media::Suite::AesCm128HmacSha1_80);
    let mids = ["0".to_owned()];
    let choices = [
        Secure::AsIs,
        Secure::Plain { proto: "RTP/AVP" },
        Secure::Sdes {
            proto: "RTP/SAVP",
            crypto: &crypto,
        },
        Secure::Dtls {
            proto: "UDP/TLS/RTP/SAVPF",
            fingerprint: &fingerprint,
            setup: relay::media::Setup::ActPass,
            mids: &mids,
            bundle: true,
        },
        Secure::Dtls {
            proto: "UDP/TLS/RTP/SAVP",
            fingerprint: &fingerprint,
            setup: relay::media::Setup::Active,
            mids: &[],
            bundle: false,
        },
    ];
    for secure in choices {
        for (written, relay) in [
            (sdp::toward_pbx(text, lan, false, secure, &[]), lan),
            (sdp::toward_app(text, wan, &ice, secure, &[]), wan),
            (sdp::toward_pbx(text, lan, false, secure, &lan_extra), lan),
            (sdp::toward_app(text, wan, &ice, secure, &others), wan),
        ] {
            let Ok(written) = written else { continue };
            let again = sdp::audio(&written).expect("what the relay writes parses again");
            assert_eq!(
                again.rtp, relay,
                "the stream is anchored at the relay:\n{written}"
            );
            for stream in sdp::other_streams(&written).expect("parses again") {
                assert_eq!(
                    stream.rtp.ip(),
                    relay.ip(),
                    "every stream is anchored at the relay:\n{written}"
                );
            }
            let other = endpoint.rtp.ip().to_string();
            if other != relay.ip().to_string() {
                assert!(
                    !written
                        .lines()
                        .filter(|l| ["c=", "o=", "a=rtcp:"].iter().any(|p| l.starts_with(p)))
                        .any(|l| l.split_whitespace().any(|w| w == other)),
                    "the other side's address {other} leaked:\n{written}"
                );
            }
        }
    }
});
