//! TURN ChannelData through the relay, end to end in namespaces: the client sends
//! ChannelData to the relay's TURN port; the peer receives the bare data from the relay's
//! allocation address; the peer's answers reach the client as ChannelData on the same
//! channel. Over IPv4 and IPv6, with XDP (generic and native) and the userspace datapath.
//! Padded ChannelData (allowed over UDP) is left to userspace, which trims the padding.

use std::{net::SocketAddr, time::Duration};

use relay_tests::{
    lab::ThreeHosts,
    netns::PinDir,
    packet::channel_data,
    relayd::Relayd,
    require_root,
    traffic::{Framing, numbered, sequence_of, stream},
};

const PACKETS: u32 = 5_000;
const CHANNEL: u16 = 0x4001;
/// Slow-path packets allowed per flow in the XDP modes (neighbour resolution).
const SLOW_PATH_ALLOWANCE: u64 = 5;

/// Client -> relay -> peer: ChannelData on CHANNEL in, the bare payload out.
const CLIENT_TO_PEER: Framing = Framing {
    encode: |sequence| channel_data(CHANNEL, &numbered(sequence)),
    decode: sequence_of,
};

/// Peer -> relay -> client: the bare payload in, ChannelData on CHANNEL out, with a Length
/// that matches the data.
const PEER_TO_CLIENT: Framing = Framing {
    encode: numbered,
    decode: |message| match message {
        [0x40, 0x01, hi, lo, data @ ..]
            if usize::from(u16::from_be_bytes([*hi, *lo])) == data.len() =>
        {
            sequence_of(data)
        }
        _ => None,
    },
};

fn run_mode(mode: &str, datapath: &[&str]) {
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let pin_dir = pins.path.to_string_lossy().into_owned();
    let relayd = Relayd::start(Some(&lab.relay), &lab.relayd_args(datapath, &pin_dir));
    let a = |s: &str| s.parse::<SocketAddr>().unwrap();
    for (client, turn_port, allocation, peer) in [
        (
            "10.10.1.2:50000",
            "10.10.1.1:3478",
            "10.10.2.1:40000",
            "10.10.2.2:6000",
        ),
        (
            "[fd10:1::2]:50000",
            "[fd10:1::1]:3478",
            "[fd10:2::1]:40000",
            "[fd10:2::2]:6000",
        ),
    ] {
        let (client, turn_port, allocation, peer) =
            (a(client), a(turn_port), a(allocation), a(peer));
        relayd.ctl_ok(&[
            "flow",
            "add",
            "--src",
            &client.to_string(),
            "--dst",
            &turn_port.to_string(),
            "--new-src",
            &allocation.to_string(),
            "--new-dst",
            &peer.to_string(),
            "--strip-channel",
            "0x4001",
            "--reverse",
        ]);
        let client_socket = lab.client.udp_socket(client);
        let peer_socket = lab.peer.udp_socket(peer);
        let forward = stream(
            &client_socket,
            turn_port,
            peer_socket.try_clone().unwrap(),
            allocation,
            PACKETS,
            &CLIENT_TO_PEER,
        );
        let backward = stream(
            &peer_socket,
            allocation,
            client_socket.try_clone().unwrap(),
            turn_port,
            PACKETS,
            &PEER_TO_CLIENT,
        );
        if let Err(problem) = forward.and(backward) {
            panic!("{mode}: {problem}\n{}", relayd.diagnostics());
        }
        // Padded ChannelData: the data is what Length says, the padding is dropped.
        peer_socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut padded = channel_data(CHANNEL, &numbered(7)[..171]);
        padded.push(0);
        client_socket.send_to(&padded, turn_port).unwrap();
        let mut buf = [0u8; 512];
        let (len, from) = peer_socket
            .recv_from(&mut buf)
            .expect("padded ChannelData relayed");
        assert_eq!(
            (&buf[..len], from),
            (&numbered(7)[..171], allocation),
            "{mode}"
        );
    }

    let flows = relayd.ctl_json(&["flow", "list"]);
    let flows = flows["flows"].as_array().expect("flow list");
    assert_eq!(flows.len(), 4, "{flows:?}");
    for flow in flows {
        let counter = |name: &str| flow["counters"][name].as_u64().unwrap();
        let (xdp, user) = (counter("xdp_packets"), counter("userspace_packets"));
        let stripping = flow["channel"]["strip"].is_u64();
        let expected = u64::from(PACKETS) + u64::from(stripping);
        assert_eq!(xdp + user, expected, "{mode}: flow {flow}");
        if mode == "userspace" {
            assert_eq!(xdp, 0, "{mode}: flow {flow}");
        } else {
            // The padded packet is the slow path's by rule.
            assert!(
                user <= SLOW_PATH_ALLOWANCE + u64::from(stripping),
                "{mode}: {flow}"
            );
        }
    }
}

#[test]
fn channel_data_with_xdp_generic() {
    require_root();
    run_mode(
        "xdp-generic",
        &["--datapath", "xdp", "--xdp-mode", "generic"],
    );
}

#[test]
fn channel_data_with_xdp_native() {
    require_root();
    run_mode("xdp-native", &["--datapath", "xdp", "--xdp-mode", "native"]);
}

#[test]
fn channel_data_with_userspace() {
    require_root();
    run_mode("userspace", &["--datapath", "userspace"]);
}
