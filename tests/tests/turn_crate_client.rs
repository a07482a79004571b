//! The `turn` crate's client (webrtc-rs: an implementation we did not write) through our
//! TURN server: Allocate, CreatePermission and ChannelBind as it does them, then RTP-sized
//! packets both ways between it and a peer, each checked byte for byte. With XDP the bound
//! channel is offloaded: the kernel's per-flow counters carried the packets. Closing the
//! client (Refresh with lifetime 0) removes the allocation and its flows. Static and TURN
//! REST API credentials. Peers in a default-refused or an operator-denied range get 403,
//! counted in the metrics.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use relay::turn::credentials::rest_api_password;
use relay_tests::{
    config_file::ConfigFile,
    lab::{ThreeHosts, turn_config},
    netns::PinDir,
    relayd::{Relayd, http_get, metric},
    require_root,
    traffic::{numbered, sequence_of},
};
use serde_json::Value;
use tokio::{net::UdpSocket, time::timeout};
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

/// Round trips client -> peer -> client after the channel is bound.
const PACKETS: u32 = 2000;
const SERVER: &str = "10.10.1.1:3478";
const PEER: &str = "10.10.2.2:5004";
const METRICS: &str = "10.10.1.1:9477";
/// Refused by default (private), and by the operator's `denied_peers`.
const PRIVATE_PEER: &str = "10.10.2.3:5004";
const DENIED_PEER: &str = "203.0.113.9:5004";

/// What one client session saw.
struct Session {
    relayed: SocketAddr,
    /// Round trips whose echo came back intact, in order.
    echoed: u32,
    /// Allocations and flows as relayd listed them while the channel was bound.
    allocations: Value,
    flows: Value,
}

/// One client session from `client` (port 0) to the server at `server`, with the echo peer.
async fn session(
    lab: &ThreeHosts,
    relayd: &Relayd,
    (client, server): (&str, &str),
    username: &str,
    password: &str,
) -> Session {
    let socket = |std: std::net::UdpSocket| {
        std.set_nonblocking(true).unwrap();
        UdpSocket::from_std(std).unwrap()
    };
    let client_socket = socket(lab.client.udp_socket(client.parse().unwrap()));
    let peer = socket(lab.peer.udp_socket(PEER.parse().unwrap()));
    let client = Client::new(ClientConfig {
        stun_serv_addr: server.into(),
        turn_serv_addr: server.into(),
        username: username.into(),
        password: password.into(),
        // Taken from the server's 401 answer.
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(client_socket),
        vnet: None,
    })
    .await
    .expect("turn client");
    client.listen().await.expect("listen");
    let relay = client
        .allocate()
        .await
        .unwrap_or_else(|err| panic!("allocate as {username}: {err}\n{}", relayd.log()));
    let relayed = relay.local_addr().unwrap();

    // The first datagram makes the client create the permission (awaited) and send
    // ChannelBind (not awaited), and goes out as a Send indication.
    let peer_addr: SocketAddr = PEER.parse().unwrap();
    relay.send_to(b"hello", peer_addr).await.unwrap();
    let mut buf = vec![0u8; 1500];
    let (n, from) = timeout(Duration::from_secs(3), peer.recv_from(&mut buf))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the peer should get the Send indication's data\n{}",
                relayd.log()
            )
        })
        .unwrap();
    assert_eq!((&buf[..n], from), (&b"hello"[..], relayed));
    // Once the ChannelBind is answered the client sends ChannelData.
    let mut bound = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let allocations = relayd.ctl_json(&["turn", "allocations"]);
        if allocations["allocations"][0]["channels"]
            .as_array()
            .is_some_and(|channels| !channels.is_empty())
        {
            bound = true;
            break;
        }
    }
    assert!(bound, "no channel was bound\n{}", relayd.log());
    // Give the client the ChannelBind answer's turn to be read.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Ping-pong: one packet in flight, so nothing is lost to queueing; the peer echoes to
    // the relayed address.
    let mut echoed = 0;
    for sequence in 0..PACKETS {
        relay.send_to(&numbered(sequence), peer_addr).await.unwrap();
        let Ok(Ok((n, from))) = timeout(Duration::from_secs(1), peer.recv_from(&mut buf)).await
        else {
            continue;
        };
        assert_eq!(from, relayed, "the peer must see the relayed address");
        assert_eq!(sequence_of(&buf[..n]), Some(sequence), "client -> peer");
        peer.send_to(&buf[..n], relayed).await.unwrap();
        let Ok(Ok((n, from))) = timeout(Duration::from_secs(1), relay.recv_from(&mut buf)).await
        else {
            continue;
        };
        assert_eq!(from, peer_addr, "the client must see the peer's address");
        assert_eq!(sequence_of(&buf[..n]), Some(sequence), "peer -> client");
        echoed += 1;
    }
    let allocations = relayd.ctl_json(&["turn", "allocations"]);
    let flows = relayd.ctl_json(&["flow", "list"]);

    // Refresh with lifetime 0, then the client's own end.
    relay.close().await.unwrap();
    client.close().await.unwrap();
    Session {
        relayed,
        echoed,
        allocations,
        flows,
    }
}

/// Allocates and tries to reach peers the policy refuses: each send fails (the client's
/// CreatePermission gets 403) and nothing is relayed.
async fn refused_peers(relayd: &Relayd, lab: &ThreeHosts) {
    let socket = lab.client.udp_socket("10.10.1.2:0".parse().unwrap());
    socket.set_nonblocking(true).unwrap();
    let client = Client::new(ClientConfig {
        stun_serv_addr: SERVER.into(),
        turn_serv_addr: SERVER.into(),
        username: "alice".into(),
        password: "wonderland".into(),
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(UdpSocket::from_std(socket).unwrap()),
        vnet: None,
    })
    .await
    .unwrap();
    client.listen().await.unwrap();
    let relay = client.allocate().await.unwrap();
    for peer in [PRIVATE_PEER, DENIED_PEER] {
        let refused = relay.send_to(b"let me in", peer.parse().unwrap()).await;
        assert!(refused.is_err(), "{peer} must be refused\n{}", relayd.log());
    }
    let allocations = relayd.ctl_json(&["turn", "allocations"]);
    assert_eq!(
        allocations["allocations"][0]["permissions"],
        serde_json::json!([]),
        "{allocations}"
    );
    relay.close().await.unwrap();
    client.close().await.unwrap();
}

fn run(datapath: &str) {
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&turn_config(
        datapath,
        &pins.path.to_string_lossy(),
        r#"secrets = ["north", "south"]
denied_peers = ["203.0.113.0/24"]"#,
    ));
    let relayd = Relayd::start(
        Some(&lab.relay),
        &["--config", config.path(), "--metrics-listen", METRICS],
    );
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let rest_user = format!("{expiry}:alice");
    let credentials = [
        ("alice".to_owned(), "wonderland".to_owned()),
        (rest_user.clone(), rest_api_password("south", &rest_user)),
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (username, password) in &credentials {
        let seen = runtime.block_on(session(
            &lab,
            &relayd,
            ("10.10.1.2:0", SERVER),
            username,
            password,
        ));
        let context = format!(
            "{datapath}, user {username}: {}\n{}\n{}",
            seen.allocations,
            seen.flows,
            relayd.log()
        );
        assert_eq!(seen.relayed.ip().to_string(), "10.10.2.1", "{context}");
        assert_eq!(
            seen.echoed, PACKETS,
            "every round trip came back: {context}"
        );
        let allocation = &seen.allocations["allocations"][0];
        assert_eq!(allocation["username"], username.as_str(), "{context}");
        if datapath == "xdp" {
            // Two flows (strip toward the peer, add toward the client) carried both
            // directions; a handful may go the slow path while a neighbour is resolved.
            assert_eq!(allocation["offloaded_flows"], 2, "{context}");
            let packets = allocation["packets"].as_u64().unwrap();
            assert!(
                packets >= 2 * u64::from(PACKETS) - 10,
                "the kernel should have carried the channel's packets, counted {packets}: {context}"
            );
        } else {
            assert_eq!(allocation["offloaded_flows"], 0, "{context}");
        }

        // Refresh(0) took the allocation and its flows away.
        std::thread::sleep(Duration::from_millis(300));
        let allocations = relayd.ctl_json(&["turn", "allocations"]);
        assert_eq!(
            allocations["allocations"].as_array().unwrap().len(),
            0,
            "{allocations}"
        );
        let flows = relayd.ctl_json(&["flow", "list"]);
        assert_eq!(flows["flows"].as_array().unwrap().len(), 0, "{flows}");
    }

    // Over IPv6 to the server: the relayed address is IPv4 (the client does not ask for
    // IPv6, RFC 8656 7.2) and so is the peer. XDP does not translate between families, so
    // this channel is relayed in userspace, and still arrives intact.
    let seen = runtime.block_on(session(
        &lab,
        &relayd,
        ("[fd10:1::2]:0", "[fd10:1::1]:3478"),
        "alice",
        "wonderland",
    ));
    let context = format!(
        "{datapath}, IPv6 client: {}\n{}",
        seen.allocations,
        relayd.log()
    );
    assert_eq!(seen.relayed.ip().to_string(), "10.10.2.1", "{context}");
    assert_eq!(
        seen.echoed, PACKETS,
        "every round trip came back: {context}"
    );
    assert_eq!(
        seen.allocations["allocations"][0]["client"]
            .as_str()
            .unwrap()
            .split(']')
            .next(),
        Some("[fd10:1::2"),
        "{context}"
    );
    assert_eq!(
        seen.allocations["allocations"][0]["offloaded_flows"], 0,
        "{context}"
    );

    runtime.block_on(refused_peers(&relayd, &lab));
    // The client's close sends Refresh(0) without waiting for the answer: on a busy
    // machine a scrape right after can come before the server has taken it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !relayd.ctl_json(&["turn", "allocations"])["allocations"]
        .as_array()
        .unwrap()
        .is_empty()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = http_get(&lab.relay, METRICS, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            r#"relay_turn_refusals_total{code="403",reason="Forbidden"}"#
        ),
        Some(2),
        "{metrics}"
    );
    // Every client's first request is answered 401 with a nonce: not a failure.
    assert_eq!(
        metric(
            &metrics,
            r#"relay_turn_refusals_total{code="401",reason="Unauthorized"}"#
        ),
        None,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "relay_turn_allocations"), Some(0));
}

#[test]
fn turn_crate_client_through_our_turn_server_with_xdp_offload() {
    require_root();
    run("xdp");
}

#[test]
fn turn_crate_client_through_our_turn_server_in_userspace() {
    require_root();
    run("userspace");
}
