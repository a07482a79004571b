//! A call end to end, as the relay is deployed (EdgeLab: an app behind a NAT, the relay
//! with a WAN and a LAN interface, a PBX on the LAN): the controller (a signalling client on
//! the PBX side) offers the PBX's SDP to user alice; the app (a signalling client and a
//! webrtc-ice agent behind the NAT) gets the relay's offer with its ICE candidate, answers,
//! and ICE connects through the NAT; the PBX gets the relay's LAN address in its answer.
//! RTP from the app reaches the PBX (which echoes it) and comes back; the call's two flows
//! carry it in XDP. Hangup removes the flows and tells the app.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, mpsc},
    time::Duration,
};

use relay_tests::{
    config_file::ConfigFile,
    lab::EdgeLab,
    netns::{PinDir, enter_by_name},
    relayd::{Relayd, binary},
    require_root,
    signalling_client::{Socket, call, connect, connect_here, receive},
    traffic::{numbered, sequence_of},
};
use serde_json::{Value, json};
use webrtc_ice::{
    agent::{Agent, agent_config::AgentConfig},
    candidate::{Candidate, CandidateType, candidate_base::unmarshal_candidate},
    network_type::NetworkType,
    udp_network::UDPNetwork,
};
use webrtc_util::Conn;

const SIGNALLING: &str = "198.51.100.1:8443";
const ICE: &str = "198.51.100.1:3479";
const API_KEY: &str = "acme-api-key-0123456789";
const PBX_RTP: &str = "10.30.0.2:40000";
const PACKETS: u32 = 300;

/// The PBX's offer: plain RTP from its LAN address.
const PBX_OFFER: &str = "v=0\r\no=PBX 1 1 IN IP4 10.30.0.2\r\ns=PBX\r\nc=IN IP4 10.30.0.2\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n";

/// The app's answer to the relay's offer: the offer's codecs, the app's ICE credentials and
/// candidates, its own address.
fn app_answer(
    offer: &str,
    ufrag: &str,
    pwd: &str,
    candidates: &[String],
    rtp: SocketAddr,
) -> String {
    let mut lines: Vec<String> = offer
        .split("\r\n")
        .filter(|line| !line.is_empty())
        .filter(|line| {
            ![
                "a=candidate",
                "a=end-of-candidates",
                "a=ice-ufrag",
                "a=ice-pwd",
            ]
            .iter()
            .any(|prefix| line.starts_with(prefix))
        })
        .map(|line| {
            if line.starts_with("c=") {
                format!("c=IN IP4 {}", rtp.ip())
            } else if let Some(rest) = line.strip_prefix("m=audio ") {
                let (_, tail) = rest.split_once(' ').unwrap();
                format!("m=audio {} {tail}", rtp.port())
            } else if line.starts_with("o=") {
                format!("o=app 2 2 IN IP4 {}", rtp.ip())
            } else {
                line.to_owned()
            }
        })
        .collect();
    lines.push(format!("a=ice-ufrag:{ufrag}"));
    lines.push(format!("a=ice-pwd:{pwd}"));
    lines.extend(candidates.iter().map(|c| format!("a=candidate:{c}")));
    lines.join("\r\n") + "\r\n"
}

/// The app: connects to signalling with its token, waits for the call, answers with its
/// ICE agent's credentials, connects, and sends RTP through the relay; returns how many
/// echoes came back, and the `call.ended` event it gets after the hangup.
/// Runs on a thread inside the app's namespace.
async fn app(
    token: String,
    fingerprint: String,
    done: mpsc::Sender<u32>,
    hangup_done: mpsc::Receiver<()>,
) -> Value {
    let mut signalling = connect_here(SIGNALLING.parse().unwrap(), &fingerprint).await;
    let welcome = call(
        &mut signalling,
        json!({"type": "hello", "v": 1, "role": "client", "token": token}),
    )
    .await;
    assert_eq!(welcome["user"], "alice", "{welcome}");
    done.send(0).unwrap(); // ready for the call
    let incoming = receive(&mut signalling).await.unwrap();
    assert_eq!(incoming["event"], "call.incoming", "{incoming}");
    let offer = incoming["sdp"].as_str().unwrap().to_owned();
    let call_id = incoming["call"].clone();
    assert!(offer.contains("c=IN IP4 198.51.100.1"), "{offer}");
    assert!(
        !offer.contains("10.30.0.2"),
        "the PBX's address is hidden: {offer}"
    );

    let app_ip: IpAddr = "10.20.0.2".parse().unwrap();
    let agent = Arc::new(
        Agent::new(AgentConfig {
            network_types: vec![NetworkType::Udp4],
            candidate_types: vec![CandidateType::Host],
            udp_network: UDPNetwork::Ephemeral(Default::default()),
            ip_filter: Arc::new(Some(Box::new(move |ip: IpAddr| ip == app_ip))),
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    let (gathered_tx, mut gathered) = tokio::sync::mpsc::unbounded_channel();
    agent.on_candidate(Box::new(move |candidate| {
        let _ = gathered_tx.send(candidate.map(|c| c.marshal()));
        Box::pin(async {})
    }));
    agent.gather_candidates().unwrap();
    let mut candidates = Vec::new();
    while let Some(Some(candidate)) = gathered.recv().await {
        candidates.push(candidate);
    }
    let (ufrag, pwd) = agent.get_local_user_credentials().await;
    let host = unmarshal_candidate(&candidates[0]).unwrap().addr();
    let answer = app_answer(&offer, &ufrag, &pwd, &candidates, host);
    let result = call(
        &mut signalling,
        json!({"type": "call.answer", "id": 1, "call": call_id, "sdp": answer}),
    )
    .await;
    assert_eq!(result["type"], "result", "{result}");

    let remote = relay::session::sdp::audio(&offer).unwrap();
    for candidate in &remote.candidates {
        let candidate: Arc<dyn Candidate + Send + Sync> =
            Arc::new(unmarshal_candidate(candidate).unwrap());
        agent.add_remote_candidate(&candidate).unwrap();
    }
    let (_cancel, cancel_rx) = tokio::sync::mpsc::channel(1);
    let conn = tokio::time::timeout(
        Duration::from_secs(10),
        agent.accept(
            cancel_rx,
            remote.ice_ufrag.unwrap(),
            remote.ice_pwd.unwrap(),
        ),
    )
    .await
    .expect("ICE connects through the NAT")
    .unwrap();
    // The relay says connected too.
    let state = receive(&mut signalling).await.unwrap();
    assert_eq!(
        (&state["event"], &state["state"]),
        (&json!("call.state"), &json!("connected")),
        "{state}"
    );

    // RTP through the relay to the PBX's echo and back, one packet in flight.
    let mut echoed = 0;
    let mut buf = vec![0u8; 2048];
    for sequence in 0..PACKETS {
        conn.send(&numbered(sequence)).await.unwrap();
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), conn.recv(&mut buf)).await
            && sequence_of(&buf[..n]) == Some(sequence)
        {
            echoed += 1;
        }
    }
    done.send(echoed).unwrap();
    tokio::task::spawn_blocking(move || hangup_done.recv().unwrap())
        .await
        .unwrap();
    let ended = receive(&mut signalling).await.unwrap();
    let _ = agent.close().await;
    ended
}

async fn pbx_echo(socket: std::net::UdpSocket) {
    socket.set_nonblocking(true).unwrap();
    let socket = tokio::net::UdpSocket::from_std(socket).unwrap();
    let mut buf = vec![0u8; 2048];
    while let Ok((n, from)) = socket.recv_from(&mut buf).await {
        let _ = socket.send_to(&buf[..n], from).await;
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_pbx_calls_an_app_behind_nat_and_the_media_flows_in_xdp() {
    require_root();
    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&format!(
        r#"
[datapath]
mode = "xdp"
interfaces = ["w0", "l0"]
xdp_mode = "generic"
pin_dir = "{}"
[signalling]
enabled = true
listen = "{SIGNALLING}"
token_secret = "a token secret of enough length"
tenants = [{{ name = "acme", api_key = "{API_KEY}" }}]
[calls]
enabled = true
ice_listen = "{ICE}"
lan_address = "10.30.0.1"
port_range = "41000-41010"
"#,
        pins.path.display()
    ));
    let mut command = std::process::Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{}", lab.relay.name))
        .arg("--")
        .arg(binary("relayd"));
    let relayd = Relayd::start_command(command, &["--config", config.path()]);
    let fingerprint = relayd
        .log()
        .lines()
        .find_map(|line| {
            line.split("sha256=")
                .nth(1)
                .map(|rest| rest.split_whitespace().next().unwrap().to_owned())
        })
        .expect("fingerprint logged");
    let echo_socket = lab.pbx.udp_socket(PBX_RTP.parse().unwrap());
    let main_runtime = runtime();
    main_runtime.block_on(async {
        let pbx_echo = tokio::spawn(pbx_echo(echo_socket));
        let mut controller: Socket = connect(&lab.pbx, SIGNALLING.parse().unwrap(), &fingerprint).await;
        let welcome = call(
            &mut controller,
            json!({"type": "hello", "v": 1, "role": "controller", "tenant": "acme", "api_key": API_KEY}),
        )
        .await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        // Nobody to call yet: offline, nothing allocated.
        let answer = call(
            &mut controller,
            json!({"type": "call.create", "id": 1, "user": "alice", "sdp": PBX_OFFER}),
        )
        .await;
        assert_eq!(answer["code"], "offline", "{answer}");
        let answer = call(
            &mut controller,
            json!({"type": "call.create", "id": 2, "user": "alice", "sdp": "v=0\r\n"}),
        )
        .await;
        assert_eq!(answer["code"], "bad_request", "an SDP without audio: {answer}");
        let minted = call(
            &mut controller,
            json!({"type": "token.mint", "id": 3, "user": "alice", "ttl_secs": 300}),
        )
        .await;
        let token = minted["token"].as_str().unwrap().to_owned();

        let (done_tx, done) = mpsc::channel();
        let (hangup_tx, hangup_done) = mpsc::channel();
        let app_ns = lab.app.name.clone();
        let app_thread = {
            let fingerprint = fingerprint.clone();
            std::thread::spawn(move || {
                enter_by_name(&app_ns);
                runtime().block_on(app(token, fingerprint, done_tx, hangup_done))
            })
        };
        // Wait for the app to be connected before calling.
        let done = tokio::task::spawn_blocking(move || {
            done.recv().unwrap();
            done
        })
        .await
        .unwrap();
        let created = call(
            &mut controller,
            json!({"type": "call.create", "id": 4, "user": "alice", "sdp": PBX_OFFER}),
        )
        .await;
        assert_eq!(created["type"], "result", "{created}");
        let call_id = created["call"].clone();
        let answered = receive(&mut controller).await.unwrap();
        assert_eq!(answered["event"], "call.answered", "{answered}");
        let pbx_answer = answered["sdp"].as_str().unwrap();
        let endpoint = relay::session::sdp::audio(pbx_answer).unwrap();
        assert_eq!(endpoint.rtp.ip().to_string(), "10.30.0.1", "{pbx_answer}");
        assert!(!pbx_answer.contains("a=candidate"), "no ICE toward the PBX: {pbx_answer}");
        let state = receive(&mut controller).await.unwrap();
        assert_eq!(state["state"], "connected", "{state}");
        // The app's address as the relay sees it: the NAT's.
        assert!(state["remote"].as_str().unwrap().starts_with("198.51.100.2:"), "{state}");

        let echoed = tokio::task::spawn_blocking(move || done.recv().unwrap())
            .await
            .unwrap();
        assert_eq!(echoed, PACKETS, "every RTP packet came back\n{}", relayd.log());
        let listed = relayd.ctl_json(&["calls", "list"]);
        let listed_call = &listed["calls"][0];
        assert_eq!(
            (&listed_call["user"], &listed_call["state"], &listed_call["pbx"]),
            (&json!("alice"), &json!("connected"), &json!(PBX_RTP)),
            "{listed}"
        );
        assert!(listed_call["packets"].as_u64().unwrap() >= 2 * u64::from(PACKETS) - 20, "{listed}");
        assert!(relayd.ctl_ok(&["calls", "list"]).contains("connected"));
        let flows = relayd.ctl_json(&["flow", "list"]);
        let flows = flows["flows"].as_array().unwrap().clone();
        assert_eq!(flows.len(), 2, "{flows:?}");
        for flow in &flows {
            let xdp = flow["counters"]["xdp_packets"].as_u64().unwrap();
            assert!(
                xdp >= u64::from(PACKETS) - 10,
                "the kernel carried the call's media: {flow}\n{}",
                relayd.log()
            );
        }

        let result = call(
            &mut controller,
            json!({"type": "call.hangup", "id": 5, "call": call_id}),
        )
        .await;
        assert_eq!(result["type"], "result", "{result}");
        hangup_tx.send(()).unwrap();
        let ended = tokio::task::spawn_blocking(move || app_thread.join().unwrap())
            .await
            .unwrap();
        assert_eq!((&ended["event"], &ended["reason"]), (&json!("call.ended"), &json!("hangup")), "{ended}");
        let flows = relayd.ctl_json(&["flow", "list"]);
        assert_eq!(flows["flows"].as_array().unwrap().len(), 0, "{flows}");
        assert_eq!(relayd.ctl_ok(&["calls", "list"]), "no calls\n");
        // Unknown calls: the operator is told.
        let unknown = relayd.ctl(&["calls", "hangup", "99"]);
        assert_eq!(unknown.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&unknown.stderr).contains("call: 99: no such call"));
        pbx_echo.abort();
    });
}
