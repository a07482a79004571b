//! A TURN-only app: its network lets out only UDP to the relay's TURN port (3478) and TCP
//! to its signalling port (443). Its ICE agent allocates on the relay's own TURN server and offers the
//! relayed candidate; the relay's ICE agent reaches it there (the allocation's peer is the
//! relay's ICE address). Instead of hairpinning through the relay socket, the call's flows
//! start at the app's TURN channel: ChannelData stripped and sent on to the PBX, the PBX's
//! RTP framed and sent to the app from the TURN port, one flow pair in XDP. ICE consent
//! (STUN inside the channel) still reaches the relay's agent.

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use relay_tests::{
    app::{App, talk},
    config_file::ConfigFile,
    lab::{EDGE_TURN, EdgeLab, calls_config},
    netns::{PinDir, enter_by_name},
    pbx::rtp_echo,
    recv_async,
    relayd::Relayd,
    require_root, runtime,
    signalling_client::{Socket, mint_token, request, until_message},
};
use serde_json::{Value, json};

const API_KEY: &str = "acme-api-key-0123456789";
const PBX_RTP: &str = relay_tests::pbx::RTP;
const PBX_OFFER: &str = relay_tests::pbx::SDP;
/// 6 s at 50 packets/s: longer than a consent check period, so consent over TURN counts.
const PACKETS: u32 = 300;

/// Events to the controller until one is `event` (with `state`, when given).
async fn until(controller: &mut Socket, event: &str, state: Option<&str>) -> Value {
    until_message(controller, Duration::from_secs(20), 20, event, |message| {
        message["event"] == event && state.is_none_or(|state| message["state"] == state)
    })
    .await
}

#[test]
fn a_turn_only_app_gets_its_call_with_the_media_in_xdp() {
    require_root();
    let lab = EdgeLab::new();
    lab.only_turn_and_signalling();
    let pins = PinDir::new();
    let config = ConfigFile::new(&calls_config(&pins.path, "acme", API_KEY, EDGE_TURN));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let fingerprint = relayd.signalling_fingerprint();
    let echo_socket = lab.pbx.udp_socket(PBX_RTP.parse().unwrap());
    runtime().block_on(async {
        let echo = tokio::spawn(rtp_echo(echo_socket));
        let mut controller = lab.controller(&fingerprint, "acme", API_KEY).await;
        let token = mint_token(&mut controller, "alice", 300).await;
        let (said_tx, said) = mpsc::channel();
        let (go, go_rx) = mpsc::channel::<()>();
        let app_ns = lab.app.name.clone();
        let app_thread = std::thread::spawn(move || {
            enter_by_name(&app_ns);
            runtime().block_on(async move {
                let mut app = App::in_edge_lab(&fingerprint, &token).await;
                app.use_turn("turn:198.51.100.1:3478?transport=udp", "app", "app-secret");
                said_tx.send(0).unwrap();
                let incoming = app.next_within(Duration::from_secs(10)).await;
                let media = app.answer(&incoming).await;
                said_tx.send(talk(&media, 0, PACKETS).await.echoed).unwrap();
                // After the hangup: the app's agent goes, and its allocation with it.
                let (_, go_rx) = recv_async(go_rx).await;
                let ended = app.next_within(Duration::from_secs(10)).await;
                assert_eq!(ended["event"], "call.ended", "{ended}");
                app.close().await;
                drop(go_rx);
            })
        });
        let (_, said) = recv_async(said).await;
        let created = request(
            &mut controller,
            json!({"type": "call.create", "id": 2, "user": "alice", "sdp": PBX_OFFER}),
        )
        .await;
        assert_eq!(created["type"], "result", "{created}");
        let connected = until(&mut controller, "call.state", Some("connected")).await;
        assert_eq!(
            connected["remote_type"], "relay",
            "the app is reached through its TURN allocation: {connected}"
        );
        assert!(
            connected["remote"]
                .as_str()
                .unwrap()
                .starts_with("198.51.100.1:"),
            "its relayed address is on this relay: {connected}"
        );
        let (echoed, said) = recv_async(said).await;
        drop(said);
        assert_eq!(
            echoed,
            PACKETS,
            "every RTP packet came back\n{}",
            relayd.log()
        );

        // One flow pair from the app's TURN channel straight to the PBX, in XDP.
        let flows = relayd.ctl_json(&["flow", "list"]);
        let flows = flows["flows"].as_array().unwrap().clone();
        assert_eq!(flows.len(), 2, "{flows:?}");
        let to_pbx = flows
            .iter()
            .find(|flow| flow["new_dst"] == PBX_RTP)
            .expect("a flow to the PBX");
        assert_eq!(to_pbx["dst"], "198.51.100.1:3478", "{to_pbx}");
        assert!(
            to_pbx["src"].as_str().unwrap().starts_with("198.51.100.2:"),
            "{to_pbx}"
        );
        assert!(to_pbx["channel"]["strip"].is_u64(), "{to_pbx}");
        let to_app = flows
            .iter()
            .find(|flow| flow["src"] == PBX_RTP)
            .expect("a flow from the PBX");
        assert_eq!(
            (
                &to_app["new_src"],
                &to_app["new_dst"],
                &to_app["channel"]["add"]
            ),
            (
                &json!("198.51.100.1:3478"),
                &to_pbx["src"],
                &to_pbx["channel"]["strip"]
            ),
            "{to_app}"
        );
        for flow in &flows {
            assert!(
                flow["counters"]["xdp_packets"].as_u64().unwrap() >= u64::from(PACKETS) - 10,
                "the kernel carried the call's media: {flow}\n{}",
                relayd.log()
            );
        }
        let allocations = relayd.ctl_json(&["turn", "allocations"]);
        assert_eq!(
            allocations["allocations"].as_array().unwrap().len(),
            1,
            "{allocations}"
        );
        assert!(
            lab.guest_drops() > 0,
            "the app's direct route was tried and dropped"
        );
        assert!(
            relayd
                .ctl_ok(&["calls", "show", "1"])
                .contains("(relay) <-> relay ICE"),
            "{}",
            relayd.ctl_ok(&["calls", "show", "1"])
        );

        // Hangup: the call's flows go; the app closes its agent, and its allocation goes.
        let result = request(
            &mut controller,
            json!({"type": "call.hangup", "id": 3, "call": created["call"]}),
        )
        .await;
        assert_eq!(result["type"], "result", "{result}");
        go.send(()).unwrap();
        tokio::task::spawn_blocking(move || app_thread.join().unwrap())
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let flows = relayd.ctl_json(&["flow", "list"]);
            let allocations = relayd.ctl_json(&["turn", "allocations"]);
            let left = (
                flows["flows"].as_array().unwrap().len(),
                allocations["allocations"].as_array().unwrap().len(),
            );
            if left == (0, 0) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "left after the call: {flows} {allocations}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        echo.abort();
    });
}

/// A TURN client whose network lets out nothing but TCP to port 443: coturn's uclient
/// (`-t -S`: TURN over TLS) reaches the TURN server through the signalling port, which tells
/// TURN from WebSocket by the first bytes after the TLS handshake. Its messages reach an
/// echo peer behind the relay and come back (relayed in userspace: XDP does not touch TCP).
#[test]
fn turn_over_tls_on_the_signalling_port_when_only_443_gets_out() {
    require_root();
    let lab = EdgeLab::new();
    lab.only_tcp_443();
    let pins = PinDir::new();
    let config = ConfigFile::new(&calls_config(
        &pins.path,
        "acme",
        API_KEY,
        &EDGE_TURN.replace(
            r#"allowed_peers = ["198.51.100.1"]"#,
            r#"allowed_peers = ["198.51.100.1", "10.30.0.2"]"#,
        ),
    ));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let _peer = relay_tests::process::Background::spawn(
        &lab.pbx,
        &["turnutils_peer", "-L", "10.30.0.2", "-p", "3480"],
    );
    std::thread::sleep(Duration::from_millis(300));
    let output = std::process::Command::new("timeout")
        .args(["60", "ip", "netns", "exec", &lab.app.name])
        .args([
            "turnutils_uclient",
            "-t",
            "-S",
            "-p",
            "443",
            "-u",
            "app",
            "-w",
            "app-secret",
            "-e",
            "10.30.0.2",
            "-r",
            "3480",
            "-n",
            "200",
            "-l",
            "172",
            "-c",
            "-z",
            "5",
            "198.51.100.1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run turnutils_uclient");
    // While it runs, relayctl shows its allocation as one over TLS.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut over = Vec::new();
    while over.is_empty() && std::time::Instant::now() < deadline {
        let allocations = relayd.ctl_json(&["turn", "allocations"]);
        over = allocations["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["transport"].as_str().unwrap_or_default().to_owned())
            .collect();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !over.is_empty() && over.iter().all(|t| t == "tls"),
        "{over:?}"
    );
    let output = output.wait_with_output().expect("turnutils_uclient ends");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let number_after = |label: &str| -> u32 {
        text.rsplit(label)
            .next()
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|digits| digits.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        (
            number_after("tot_send_msgs="),
            number_after("tot_recv_msgs=")
        ),
        (200, 200),
        "every message through TURN over TLS and back:\n{text}\n{}",
        relayd.log()
    );
    // The allocation went with the TLS connection.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while relayd.ctl_json(&["turn", "allocations"])["allocations"] != json!([]) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            relayd.ctl_ok(&["turn", "allocations"])
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The signalling on the same port still answers WebSocket clients.
    runtime().block_on(async {
        let mut controller = lab
            .controller(&relayd.signalling_fingerprint(), "acme", API_KEY)
            .await;
        let token = mint_token(&mut controller, "alice", 60).await;
        assert!(token.starts_with("acme:alice:"), "{token}");
    });
}
