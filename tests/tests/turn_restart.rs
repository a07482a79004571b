//! A restart keeps TURN media flowing and the allocations known: with a state store, a
//! stopped relayd leaves its channels' flows in the kernel (the client's ChannelData keeps
//! reaching the peer meanwhile), and the next relayd restores the allocation from the store,
//! adopts its flows with their counters, and manages it again: its client deletes it with
//! the nonce it held from before, and an operator's revoke removes an allocation's flows.

use std::{net::SocketAddr, time::Duration};

use relay_tests::{
    config_file::ConfigFile,
    lab::{ThreeHosts, turn_config},
    netns::PinDir,
    relayd::{Relayd, StateFile},
    require_root, turn_client,
};
use tokio::{net::UdpSocket, time::timeout};
use webrtc_util::Conn;

const SERVER: &str = "10.10.1.1:3478";
const PEER: &str = "10.10.2.2:5004";
const BURST: usize = 200;

fn start(lab: &ThreeHosts, config: &ConfigFile, state: &StateFile) -> Relayd {
    Relayd::start_with_state(&lab.relay.name, &["--config", config.path()], &state.0)
}

/// Sends `count` packets through the relayed connection, each waited for up to `wait`;
/// returns how many the peer received.
async fn send(relay: &impl Conn, peer: &UdpSocket, count: usize, wait: Duration) -> usize {
    let peer_addr: SocketAddr = PEER.parse().unwrap();
    let mut received = 0;
    let mut buf = [0u8; 512];
    for sequence in 0..count {
        relay
            .send_to(&relay_tests::traffic::numbered(sequence as u32), peer_addr)
            .await
            .unwrap();
        if let Ok(Ok(_)) = timeout(wait, peer.recv_from(&mut buf)).await {
            received += 1;
        }
    }
    received
}

async fn burst(relay: &impl Conn, peer: &UdpSocket) -> usize {
    send(relay, peer, BURST, Duration::from_millis(500)).await
}

#[test]
fn allocations_survive_a_restart_and_their_media_never_stops() {
    require_root();
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&turn_config("xdp", &pins.path.to_string_lossy(), ""));
    let state = StateFile::new("relay-state-");
    let mut relayd = start(&lab, &config, &state);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client_socket = lab.client.udp_socket("10.10.1.2:0".parse().unwrap());
    let peer_socket = lab.peer.udp_socket(PEER.parse().unwrap());
    runtime.block_on(async {
        client_socket.set_nonblocking(true).unwrap();
        peer_socket.set_nonblocking(true).unwrap();
        let peer = UdpSocket::from_std(peer_socket).unwrap();
        let client = turn_client::listening(
            UdpSocket::from_std(client_socket).unwrap(),
            SERVER.parse().unwrap(),
            "alice",
            "wonderland",
        )
        .await
        .unwrap();
        let relay = client.allocate().await.unwrap();
        let relayed = relay.local_addr().unwrap();
        // Permission and channel; then the channel's media goes through XDP.
        relay
            .send_to(b"hello", PEER.parse().unwrap())
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        timeout(Duration::from_secs(3), peer.recv_from(&mut buf))
            .await
            .expect("hello")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(burst(&relay, &peer).await, BURST, "{}", relayd.log());

        // relayd stops: the kernel keeps forwarding the channel.
        assert!(relayd.stop(), "{}", relayd.log());
        assert_eq!(
            burst(&relay, &peer).await,
            BURST,
            "media while relayd is down"
        );

        let relayd = start(&lab, &config, &state);
        assert!(
            relayd
                .log()
                .contains("turn: allocations restored from the state store restored=1"),
            "{}",
            relayd.log()
        );
        let status = relayd.ctl_json(&["status"]);
        assert_eq!(status["turn"]["allocations"], 1, "{status}");
        assert_eq!(status["turn"]["tcp"], true, "{status}");
        assert!(
            relayd.ctl_ok(&["status"]).contains("(UDP and TCP)"),
            "{}",
            relayd.ctl_ok(&["status"])
        );
        assert_eq!(
            status["turn"]["state_store"],
            state.0.to_string_lossy().as_ref(),
            "{status}"
        );
        assert!(
            relayd
                .ctl_ok(&["status"])
                .contains("allocations kept across restarts in"),
            "{}",
            relayd.ctl_ok(&["status"])
        );
        let allocations = relayd.ctl_json(&["turn", "allocations"]);
        let allocation = &allocations["allocations"][0];
        assert_eq!(allocation["username"], "alice", "{allocations}");
        assert_eq!(
            allocation["relays"][0],
            relayed.to_string(),
            "{allocations}"
        );
        assert_eq!(allocation["channels"].as_array().unwrap().len(), 1);
        assert_eq!(
            allocation["offloaded_flows"],
            2,
            "{allocations}\n{}",
            relayd.log()
        );
        // The kernel counters went on across the restart: both bursts so far, the one
        // while relayd was down included.
        let packets = allocation["packets"].as_u64().unwrap();
        assert!(packets >= 2 * BURST as u64 - 10, "{allocations}");
        assert_eq!(burst(&relay, &peer).await, BURST, "media after the restart");

        // The restored allocation is managed again, by its client too: the nonce it holds
        // from before the restart is still good (the nonce key is kept in the state store),
        // so its delete (a Refresh with lifetime 0, which the turn crate sends once without
        // waiting; a 401 there would leave the allocation) removes it and its flows.
        relay.close().await.unwrap();
        let deleted = std::time::Instant::now();
        while relayd.ctl_json(&["status"])["turn"]["allocations"] != 0
            && deleted.elapsed() < Duration::from_secs(3)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            relayd.ctl_json(&["status"])["turn"]["allocations"],
            0,
            "{}",
            relayd.log()
        );
        let flows = relayd.ctl_json(&["flow", "list"]);
        assert_eq!(flows["flows"].as_array().unwrap().len(), 0, "{flows}");
        assert_eq!(
            send(&relay, &peer, 20, Duration::from_millis(100)).await,
            0,
            "nothing after the delete"
        );

        // A revoke removes an allocation and its flows.
        let second_socket = lab.client.udp_socket("10.10.1.2:0".parse().unwrap());
        second_socket.set_nonblocking(true).unwrap();
        let second = turn_client::listening(
            UdpSocket::from_std(second_socket).unwrap(),
            SERVER.parse().unwrap(),
            "alice",
            "wonderland",
        )
        .await
        .unwrap();
        let relay = second.allocate().await.unwrap();
        relay
            .send_to(b"hello", PEER.parse().unwrap())
            .await
            .unwrap();
        timeout(Duration::from_secs(3), peer.recv_from(&mut buf))
            .await
            .expect("hello")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            burst(&relay, &peer).await,
            BURST,
            "a new allocation's media"
        );
        assert_eq!(relayd.ctl_json(&["turn", "revoke", "alice"])["revoked"], 1);
        let flows = relayd.ctl_json(&["flow", "list"]);
        assert_eq!(flows["flows"].as_array().unwrap().len(), 0, "{flows}");
        assert_eq!(
            send(&relay, &peer, 20, Duration::from_millis(100)).await,
            0,
            "nothing after the revoke"
        );
        second.close().await.unwrap();
        client.close().await.unwrap();
    });
}
