//! The relay under a SIP proxy over rtpengine's ng protocol: Kamailio (Debian `kamailio`,
//! its `rtpengine` module) between two sipps (Debian `sip-tester`), the caller on the
//! relay's WAN side and the callee on its LAN side. Kamailio offers, answers and deletes
//! through the relay's ng socket; the caller plays G.711 audio, the callee echoes it; the
//! media goes both ways in XDP, and the BYE removes every flow. Bad ng requests get an
//! error reply with a reason and change nothing. A side behind a NAT is followed from its
//! first packet, then held to that source.

use std::{net::SocketAddr, time::Duration};

use relay_tests::{
    config_file::ConfigFile,
    kamailio::Kamailio,
    lab::{ThreeHosts, ng_config},
    netns::{NetNs, PinDir},
    ng::NgClient,
    pbx::{Sipp, sipp_successful_calls},
    relayd::Relayd,
    require_root,
};
use serde_json::{Value, json};

const NG: &str = "127.0.0.1:2223";

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("address")
}

/// The flows whose packets come from `ip`, RTP (even relay port) first.
fn flows_from(flows: &Value, ip: &str) -> Vec<Value> {
    flows["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|flow| flow["src"].as_str().unwrap().starts_with(&format!("{ip}:")))
        .cloned()
        .collect()
}

fn xdp_packets(flow: &Value) -> u64 {
    flow["counters"]["xdp_packets"].as_u64().unwrap_or(0)
}

#[test]
fn kamailio_puts_a_call_between_two_sipps_through_the_relay_and_its_media_in_xdp() {
    require_root();
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&ng_config(&pins.path, NG, "media_timeout_secs = 30"));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let kamailio = Kamailio::in_three_hosts(&lab, addr(NG));
    let mut callee = Sipp::uas(&lab.peer, addr("10.10.2.2:5060"), addr("10.10.2.2:6000"), 1);
    let mut caller = Sipp::uac_pcap(
        &lab.client,
        addr("10.10.1.2:5060"),
        addr("10.10.1.2:6000"),
        addr("10.10.1.1:5060"),
        1,
    );

    // Both directions of RTP in the kernel while the caller plays its audio.
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    let (to_callee, to_caller) = loop {
        let flows = relayd.ctl_json(&["flow", "list"]);
        let (from_caller, from_callee) = (
            flows_from(&flows, "10.10.1.2"),
            flows_from(&flows, "10.10.2.2"),
        );
        let most = |flows: &[Value]| flows.iter().map(xdp_packets).max().unwrap_or(0);
        if most(&from_caller) >= 100 && most(&from_callee) >= 100 {
            break (from_caller, from_callee);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "RTP both ways in XDP: {flows}\n{}\n{}",
            relayd.log(),
            kamailio.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    // RTP and RTCP each way: sipp keeps RTCP on the port above.
    assert_eq!(
        (to_callee.len(), to_caller.len()),
        (2, 2),
        "{to_callee:?} {to_caller:?}"
    );
    for flow in to_callee.iter().chain(&to_caller) {
        assert!(
            flow["dst"].as_str().unwrap().starts_with("10.10.1.1:")
                || flow["dst"].as_str().unwrap().starts_with("10.10.2.1:"),
            "{flow}"
        );
    }
    // The callee sees the relay's LAN address, the caller its WAN address.
    assert!(
        to_callee
            .iter()
            .all(|f| f["new_src"].as_str().unwrap().starts_with("10.10.2.1:"))
    );
    assert!(
        to_caller
            .iter()
            .all(|f| f["new_src"].as_str().unwrap().starts_with("10.10.1.1:"))
    );

    // The call as ng reports it to the proxy.
    let mut ng = NgClient::new(&lab.relay, addr(NG));
    let list = ng.request(&json!({"command": "list"})).unwrap();
    let calls = list["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{list}");
    let query = ng
        .request(&json!({"command": "query", "call-id": calls[0]}))
        .unwrap();
    assert_eq!(query["tags"].as_object().unwrap().len(), 2, "{query}");
    assert!(
        query["totals"]["RTP"]["packets"].as_u64().unwrap() >= 200,
        "{query}"
    );

    // The operator sees it too.
    let listed = relayd.ctl_json(&["calls", "list"]);
    let ng_calls = listed["ng_calls"].as_array().unwrap();
    assert_eq!(ng_calls.len(), 1, "{listed}");
    assert_eq!(
        (&ng_calls[0]["call_id"], &ng_calls[0]["state"]),
        (&calls[0], &json!("answered")),
        "{listed}"
    );
    assert_eq!(
        ng_calls[0]["flows"].as_array().unwrap().len(),
        4,
        "{listed}"
    );
    let table = relayd.ctl_ok(&["calls", "list"]);
    assert!(
        table.contains("NG CALL-ID") && table.contains("answered"),
        "{table}"
    );

    // The caller hangs up: Kamailio deletes the call, its flows go.
    let screen = caller.finish();
    assert_eq!(
        sipp_successful_calls(&screen),
        Some(1),
        "the caller's call went through\n{screen}\n{}",
        kamailio.log()
    );
    relayd.wait_for_no_flows(Duration::from_secs(5), "the BYE removed every flow");
    let list = ng.request(&json!({"command": "list"})).unwrap();
    assert_eq!(list["calls"], json!([]), "{list}");
    let screen = callee.finish();
    assert_eq!(sipp_successful_calls(&screen), Some(1), "{screen}");
    let log = relayd.log();
    assert!(
        log.contains("ng: call answered; media flows installed"),
        "{log}"
    );
    drop(kamailio);
}

/// Sends one datagram to the ng socket and returns the reply, whole.
fn raw(ns: &NetNs, datagram: &[u8]) -> String {
    let socket = ns.udp_socket(addr("127.0.0.1:0"));
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    socket.send_to(datagram, addr(NG)).unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, _) = socket.recv_from(&mut buf).expect("a reply");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

const OFFER_SDP: &str = "v=0\r\no=- 1 1 IN IP4 10.10.1.2\r\ns=-\r\nc=IN IP4 10.10.1.2\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0\r\n";

#[test]
fn bad_ng_requests_get_a_reason_and_change_nothing() {
    require_root();
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&ng_config(&pins.path, NG, "media_timeout_secs = 30"));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let mut ng = NgClient::new(&lab.relay, addr(NG));
    assert_eq!(
        ng.request(&json!({"command": "ping"})).unwrap()["result"],
        "pong"
    );
    let offered = ng
        .request(&json!({"command": "offer", "call-id": "good", "from-tag": "a", "sdp": OFFER_SDP}))
        .unwrap();
    assert!(
        // No direction=: the first interface by name (lan) on both sides.
        offered["sdp"]
            .as_str()
            .unwrap()
            .contains("c=IN IP4 10.10.2.1"),
        "{offered}"
    );

    for (datagram, reason) in [
        (
            &b"c1 not bencode"[..],
            "bencode: unexpected byte 'n' at byte 0",
        ),
        (b"c2 d4:call1:xe", "no command in the message"),
        (b"c3 d7:command7:unknowne", "unknown command \"unknown\""),
    ] {
        let reply = raw(&lab.relay, datagram);
        let cookie = std::str::from_utf8(&datagram[..2]).unwrap();
        assert!(reply.starts_with(&format!("{cookie} d")), "{reply}");
        assert!(reply.contains("6:result5:error"), "{reply}");
        assert!(
            reply.contains(&format!("{}:{reason}", reason.len())),
            "{reply} names {reason:?}"
        );
    }
    let oversize = [b"c4 ".to_vec(), vec![b'x'; 40_000]].concat();
    assert!(raw(&lab.relay, &oversize).contains("more than 32768"));
    for (request, reason) in [
        (
            json!({"command": "answer", "call-id": "nobody", "from-tag": "a", "to-tag": "b", "sdp": OFFER_SDP}),
            "unknown call-id \"nobody\"",
        ),
        (
            json!({"command": "offer", "call-id": "empty", "from-tag": "a", "sdp": "v=0\r\no=- 1 1 IN IP4 10.10.1.2\r\ns=-\r\nt=0 0\r\n"}),
            "sdp: the description has no media stream (m=)",
        ),
        (
            json!({"command": "offer", "call-id": "where", "from-tag": "a", "sdp": OFFER_SDP, "direction": ["moon"]}),
            "direction=moon: no such interface (ng.interfaces: lan, wan)",
        ),
        (
            json!({"command": "offer", "call-id": "dtls", "from-tag": "a", "sdp": OFFER_SDP, "DTLS": "passive"}),
            "DTLS=passive",
        ),
        (
            json!({"command": "delete", "call-id": "nobody"}),
            "unknown call-id \"nobody\"",
        ),
    ] {
        let err = ng.request(&request).unwrap_err().to_string();
        assert!(err.contains(reason), "{request}: {err}");
    }
    // The same cookie twice: the reply already sent, the work not done again.
    let offer = b"same d7:call-id5:twice7:command5:offer8:from-tag1:a3:sdp87:v=0\r\no=- 1 1 IN IP4 10.10.1.2\r\ns=-\r\nc=IN IP4 10.10.1.2\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0\r\ne";
    let (first, again) = (raw(&lab.relay, offer), raw(&lab.relay, offer));
    assert!(first.contains("6:result2:ok"), "{first}");
    assert_eq!(first, again);

    // Nothing else changed: the good call and the retransmitted one, nothing of the rest.
    let list = ng.request(&json!({"command": "list"})).unwrap();
    assert_eq!(list["calls"], json!(["good", "twice"]), "{list}");
    assert_eq!(
        ng.request(&json!({"command": "ping"})).unwrap()["result"],
        "pong"
    );
    let deleted = ng
        .request(&json!({"command": "delete", "call-id": "good", "from-tag": "a"}))
        .unwrap();
    assert_eq!(deleted["result"], "ok", "{deleted}");
    assert!(relayd.log().contains("ng: request refused"));
}

/// A side behind a NAT: its SDP names one port, its media comes from another. The relay
/// follows the first packet's source (flows replaced, `learned address` in `query`), then
/// refuses any other source (counted as errors); with `asymmetric` it never follows.
#[test]
fn a_natted_sides_address_is_learned_from_its_first_packet_then_held() {
    require_root();
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&ng_config(&pins.path, NG, ""));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let mut ng = NgClient::new(&lab.relay, addr(NG));
    let sdp = |ip: &str, port: u16| {
        format!(
            "v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtcp-mux\r\n"
        )
    };
    let port_of = |reply: &Value| -> u16 {
        let sdp = reply["sdp"].as_str().unwrap();
        let line = sdp.lines().find(|l| l.starts_with("m=audio ")).unwrap();
        line.split(' ').nth(1).unwrap().parse().unwrap()
    };
    let callee = lab.peer.udp_socket(addr("10.10.2.2:7000"));
    callee
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 2048];
    for (call, flags, follows) in [
        ("nat", json!([]), true),
        ("strict", json!(["asymmetric"]), false),
    ] {
        let offer = ng
            .request(
                &json!({"command": "offer", "call-id": call, "from-tag": "a",
                "sdp": sdp("10.10.1.2", 7000), "direction": ["wan", "lan"], "flags": flags}),
            )
            .unwrap();
        let answer = ng
            .request(
                &json!({"command": "answer", "call-id": call, "from-tag": "a", "to-tag": "b",
                "sdp": sdp("10.10.2.2", 7000), "flags": flags}),
            )
            .unwrap();
        let (_, wan_port) = (port_of(&offer), port_of(&answer));
        let relay_wan = addr(&format!("10.10.1.1:{wan_port}"));
        // The caller's NAT mapped its port 7000 to 7100.
        let natted = lab.client.udp_socket(addr("10.10.1.2:7100"));
        let rtp = [0x80u8, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0xaa];
        natted.send_to(&rtp, relay_wan).unwrap();
        let arrived = callee.recv_from(&mut buf).ok();
        assert_eq!(
            arrived.is_some(),
            follows,
            "{call}: the first packet from the NAT's port reached the callee: {arrived:?}\n{}",
            relayd.log()
        );
        let query = ng
            .request(&json!({"command": "query", "call-id": call}))
            .unwrap();
        let stream = &query["tags"]["a"]["medias"][0];
        let endpoint = &stream["streams"][0]["endpoint"]["port"];
        if follows {
            assert_eq!(endpoint, &json!(7100), "{query}");
            assert!(
                stream["flags"]
                    .as_array()
                    .unwrap()
                    .contains(&json!("learned address")),
                "{query}"
            );
            // The kernel carries it from there: the flow starts at the learned source.
            let flows = relayd.ctl_json(&["flow", "list"]);
            assert!(
                flows["flows"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|f| f["src"] == "10.10.1.2:7100"),
                "{flows}"
            );
            for _ in 0..5 {
                natted.send_to(&rtp, relay_wan).unwrap();
                callee
                    .recv_from(&mut buf)
                    .expect("media through the learned flow");
            }
        } else {
            assert_eq!(endpoint, &json!(7000), "{query}");
        }
        // Anyone else on the caller's relay port is refused and counted.
        let stranger = lab.client.udp_socket(addr("10.10.1.2:7200"));
        stranger.send_to(&rtp, relay_wan).unwrap();
        assert!(
            callee.recv_from(&mut buf).is_err(),
            "{call}: a stranger's packet was forwarded"
        );
        let query = ng
            .request(&json!({"command": "query", "call-id": call}))
            .unwrap();
        let refused = query["totals"]["RTP"]["errors"].as_u64().unwrap();
        assert_eq!(refused, if follows { 1 } else { 2 }, "{call}: {query}");
        ng.request(&json!({"command": "delete", "call-id": call}))
            .unwrap();
    }
}

/// A call silent for longer than flows.idle_timeout_secs (on hold) loses its flows to the
/// table's expiry; its next packet goes through relayd, which puts the flows back.
#[test]
fn flows_expired_during_a_silence_come_back_with_the_media() {
    require_root();
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&ng_config(
        &pins.path,
        NG,
        "media_timeout_secs = 60\n[flows]\nidle_timeout_secs = 1",
    ));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let mut ng = NgClient::new(&lab.relay, addr(NG));
    let sdp = |ip: &str| {
        format!(
            "v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio 7000 RTP/AVP 0\r\na=rtcp-mux\r\n"
        )
    };
    ng.request(
        &json!({"command": "offer", "call-id": "hold", "from-tag": "a",
        "sdp": sdp("10.10.1.2"), "direction": ["wan", "lan"]}),
    )
    .unwrap();
    let answer = ng
        .request(
            &json!({"command": "answer", "call-id": "hold", "from-tag": "a", "to-tag": "b",
            "sdp": sdp("10.10.2.2")}),
        )
        .unwrap();
    let sdp_text = answer["sdp"].as_str().unwrap();
    let line = sdp_text
        .lines()
        .find(|l| l.starts_with("m=audio "))
        .unwrap();
    let relay_wan = addr(&format!("10.10.1.1:{}", line.split(' ').nth(1).unwrap()));
    let flows = |relayd: &Relayd| {
        relayd.ctl_json(&["flow", "list"])["flows"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(flows(&relayd), 2);
    let caller = lab.client.udp_socket(addr("10.10.1.2:7000"));
    let callee = lab.peer.udp_socket(addr("10.10.2.2:7000"));
    callee
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let rtp = [0x80u8, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0xaa];
    let mut buf = [0u8; 64];
    // Talk, then hold: the flows that carried the talk expire with what they counted.
    for _ in 0..5 {
        caller.send_to(&rtp, relay_wan).unwrap();
        callee.recv_from(&mut buf).expect("media before the hold");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while flows(&relayd) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the silent call's flows expire"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    caller.send_to(&rtp, relay_wan).unwrap();
    callee
        .recv_from(&mut buf)
        .expect("the first packet after the silence, through relayd");
    assert_eq!(flows(&relayd), 2, "the flows are back\n{}", relayd.log());
    for _ in 0..5 {
        caller.send_to(&rtp, relay_wan).unwrap();
        callee
            .recv_from(&mut buf)
            .expect("media through the kernel again");
    }
    let listed = relayd.ctl_json(&["flow", "list"]);
    let xdp: u64 = listed["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["counters"]["xdp_packets"].as_u64().unwrap_or(0))
        .sum();
    assert!(xdp >= 4, "the kernel forwards again: {listed}");
    // The call's totals have it all: before the hold, the packet after it, and since.
    let query = ng
        .request(&json!({"command": "query", "call-id": "hold"}))
        .unwrap();
    assert_eq!(query["totals"]["RTP"]["packets"], 11, "{query}");
}
