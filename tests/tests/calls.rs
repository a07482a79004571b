//! A call end to end, as the relay is deployed (EdgeLab: an app behind a NAT, the relay
//! with a WAN and a LAN interface, a PBX on the LAN): the controller (a signalling client on
//! the PBX side) offers the PBX's SDP to user alice; the app (a signalling client and a
//! webrtc-ice agent behind the NAT) gets the relay's offer with its ICE candidate, answers,
//! and ICE connects through the NAT; the PBX gets the relay's LAN address in its answer.
//! RTP from the app reaches the PBX (which echoes it) and comes back; the call's two flows
//! carry it in XDP. Hangup removes the flows and tells the app.

use std::{sync::mpsc, time::Duration};

use relay_tests::{
    app::{App, Media, talk},
    config_file::ConfigFile,
    lab::{EdgeLab, calls_config},
    netns::{PinDir, enter_by_name},
    pbx::rtp_echo,
    recv_async,
    redis::RedisServer,
    relayd::Relayd,
    require_root, runtime,
    signalling_client::{Socket, call, mint_token, receive, receive_within, request},
    traffic::{numbered, sequence_of},
};
use serde_json::{Value, json};

const SIGNALLING: &str = EdgeLab::SIGNALLING;

const API_KEY: &str = "acme-api-key-0123456789";
const PBX_RTP: &str = "10.30.0.2:40000";
const PACKETS: u32 = 300;
/// After the PBX moved its RTP to this address (`call.update` from the controller).
const PBX_RTP_MOVED: &str = "10.30.0.2:40002";
const MOVED_PACKETS: u32 = 50;
/// Where the PBX (no rtcp-mux) has its RTCP, and what the app sends there.
const PBX_RTCP: &str = "10.30.0.2:40001";
const RTCP_PACKETS: u32 = 5;
/// A DTLS handshake record's start (content type 22, DTLS 1.2), padded.
const DTLS_RECORD: [u8; 40] = [
    22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 1, 0, 27, 1, 0, 0, 21, 0, 0, 0, 0, 0, 0, 0, 21, 0xfe,
    0xfd, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
];
const DTLS_RECORDS: u32 = 3;
/// An RTCP receiver report (RFC 3550 6.4.2): V=2, RC=1, PT=201, one report block.
const RTCP_RECEIVER_REPORT: [u8; 32] = [
    0x81, 201, 0, 7, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0,
];

/// The PBX's offer: plain RTP from its LAN address.
const PBX_OFFER: &str = "v=0\r\no=PBX 1 1 IN IP4 10.30.0.2\r\ns=PBX\r\nc=IN IP4 10.30.0.2\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n";

/// The app, on a thread inside its namespace: connects with its token, tells the test it is
/// ready, answers the call (its candidates trickled after the answer), sends RTP through the relay to the PBX's echo (one packet in
/// flight) and counts what comes back; after the hangup, returns the `call.ended` it got.
/// Sends `packet` `count` times, one in flight, and counts how often it came back intact.
async fn echoes(media: &Media, packet: &[u8], count: u32) -> u32 {
    let mut buf = vec![0u8; 2048];
    let mut echoed = 0;
    for _ in 0..count {
        media.send(packet).await.unwrap();
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), media.recv(&mut buf)).await
            && buf[..n] == *packet
        {
            echoed += 1;
        }
    }
    echoed
}

async fn app(
    token: String,
    fingerprint: String,
    done: mpsc::Sender<u32>,
    hangup_done: mpsc::Receiver<()>,
) -> Value {
    let mut app = App::in_edge_lab(&fingerprint, &token).await;
    app.trickle();
    done.send(0).unwrap();
    let incoming = app.next().await;
    let offer = incoming["sdp"].as_str().unwrap_or_default().to_owned();
    assert!(offer.contains("c=IN IP4 198.51.100.1"), "{incoming}");
    assert!(
        !offer.contains("10.30.0.2"),
        "the PBX's address is hidden: {offer}"
    );
    let media = app.answer(&incoming).await;
    // A candidate that is not one: refused, the call goes on.
    let refused = app
        .request(json!({"type": "call.candidate", "id": 50, "call": incoming["call"], "candidate": "candidate:garbage"}))
        .await;
    assert_eq!(refused["code"], "bad_request", "{refused}");
    let mut echoed = 0;
    let mut buf = vec![0u8; 2048];
    for sequence in 0..PACKETS {
        media.send(&numbered(sequence)).await.unwrap();
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), media.recv(&mut buf)).await
            && sequence_of(&buf[..n]) == Some(sequence)
        {
            echoed += 1;
        }
    }
    done.send(echoed).unwrap();
    // RTCP, multiplexed on the app's side; the PBX (no rtcp-mux) has it on its own port.
    done.send(echoes(&media, &RTCP_RECEIVER_REPORT, RTCP_PACKETS).await)
        .unwrap();
    // DTLS records (a DTLS-SRTP handshake end to end): never in the kernel path, the call's
    // userspace tasks carry them unchanged both ways.
    done.send(echoes(&media, &DTLS_RECORD, DTLS_RECORDS).await)
        .unwrap();
    // The PBX moves its RTP (a re-INVITE): the media goes on to the new address.
    let (_, hangup_done) = recv_async(hangup_done).await;
    done.send(talk(&media, 1000, MOVED_PACKETS).await.echoed)
        .unwrap();
    tokio::task::spawn_blocking(move || hangup_done.recv().unwrap())
        .await
        .unwrap();
    let ended = app.next().await;
    app.close().await;
    ended
}

#[test]
fn the_pbx_calls_an_app_behind_nat_and_the_media_flows_in_xdp() {
    require_root();
    let lab = EdgeLab::new();
    let pins = PinDir::new();
    // The relay as a cluster node: its sessions and the call recorded in a real Redis.
    let redis = RedisServer::start(&lab.relay, 6379);
    let config = ConfigFile::new(&calls_config(
        &pins.path,
        "acme",
        API_KEY,
        "port_range = \"41000-41010\"\nstats_interval_secs = 1\n[metrics]\nlisten = \"10.30.0.1:9477\"\n\
         [cluster]\nenabled = true\nnode = \"edge-a\"\nhealth_ttl_secs = 3",
    ));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let fingerprint = relayd.signalling_fingerprint();
    let echo_socket = lab.pbx.udp_socket(PBX_RTP.parse().unwrap());
    let main_runtime = runtime();
    main_runtime.block_on(async {
        let pbx_echo = tokio::spawn(rtp_echo(echo_socket));
        // The PBX's RTCP port: echoes, and notes who sent it what.
        let rtcp_seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let rtcp_echo = {
            let socket = lab.pbx.udp_socket(PBX_RTCP.parse().unwrap());
            socket.set_nonblocking(true).unwrap();
            let socket = tokio::net::UdpSocket::from_std(socket).unwrap();
            let seen = rtcp_seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                    seen.lock().unwrap().push((from, buf[..n].to_vec()));
                    let _ = socket.send_to(&buf[..n], from).await;
                }
            })
        };
        let mut controller: Socket = lab.controller(&fingerprint, "acme", API_KEY).await;
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
        assert_eq!(
            answer["code"], "bad_request",
            "an SDP without audio: {answer}"
        );
        let token = mint_token(&mut controller, "alice", 300).await;

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
        let (_, done) = recv_async(done).await;
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
        assert!(
            !pbx_answer.contains("a=candidate"),
            "no ICE toward the PBX: {pbx_answer}"
        );
        // The PBX offered no rtcp-mux: RTCP stays on the port above RTP.
        assert!(!pbx_answer.contains("a=rtcp-mux"), "{pbx_answer}");
        assert_eq!(
            endpoint.rtcp.port(),
            endpoint.rtp.port() + 1,
            "{pbx_answer}"
        );
        let checking = receive(&mut controller).await.unwrap();
        assert_eq!(checking["state"], "checking", "ICE runs: {checking}");
        let state = receive(&mut controller).await.unwrap();
        assert_eq!(state["state"], "connected", "{state}");
        // The app's address as the relay sees it: the NAT's.
        assert!(
            state["remote"]
                .as_str()
                .unwrap()
                .starts_with("198.51.100.2:"),
            "{state}"
        );
        // Learned from the app's checks through the NAT: peer reflexive.
        assert_eq!(
            (&state["local_type"], &state["remote_type"]),
            (&json!("host"), &json!("prflx")),
            "{state}"
        );

        let (echoed, done) = recv_async(done).await;
        assert_eq!(
            echoed,
            PACKETS,
            "every RTP packet came back\n{}",
            relayd.log()
        );
        let (rtcp_echoed, done) = recv_async(done).await;
        let (dtls_echoed, done) = recv_async(done).await;
        assert_eq!(
            dtls_echoed, DTLS_RECORDS,
            "DTLS records went to the PBX and back, unchanged"
        );
        assert_eq!(
            rtcp_echoed, RTCP_PACKETS,
            "RTCP reached the PBX's RTCP port and came back from it"
        );
        let seen = rtcp_seen.lock().unwrap().clone();
        assert_eq!(seen.len(), RTCP_PACKETS as usize, "{seen:?}");
        for (from, packet) in &seen {
            assert_eq!(
                (from.to_string(), packet.as_slice()),
                ("10.30.0.1:41001".to_owned(), &RTCP_RECEIVER_REPORT[..]),
                "from the relay's RTCP port, as sent"
            );
        }
        let stats = relayd.ctl_json(&["stats"]);
        let verdict = |name: &str| {
            stats["verdicts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["verdict"] == name)
                .map_or(0, |v| v["packets"].as_u64().unwrap())
        };
        assert!(
            verdict("pass_rtcp") >= u64::from(RTCP_PACKETS),
            "the XDP program left RTCP to userspace: {stats}"
        );
        // Both ways (ICE consent checks count here too).
        assert!(
            verdict("pass_stun_dtls") >= 2 * u64::from(DTLS_RECORDS),
            "the XDP program left DTLS to userspace: {stats}"
        );
        let listed = relayd.ctl_json(&["calls", "list"]);
        let listed_call = &listed["calls"][0];
        assert_eq!(
            (
                &listed_call["user"],
                &listed_call["state"],
                &listed_call["pbx"]
            ),
            (&json!("alice"), &json!("connected"), &json!(PBX_RTP)),
            "{listed}"
        );
        assert!(
            listed_call["packets"].as_u64().unwrap() >= 2 * u64::from(PACKETS) - 20,
            "{listed}"
        );
        let table = relayd.ctl_ok(&["calls", "list"]);
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
        let column = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
        assert_eq!(
            (column("STATE"), column("VIA"), column("PBX")),
            ("connected", "prflx", PBX_RTP),
            "{table}"
        );
        // Per direction, from the kernel counters.
        for direction in ["to_pbx", "to_app"] {
            assert!(
                listed_call[direction]["packets"].as_u64().unwrap() >= u64::from(PACKETS) - 10,
                "{listed}"
            );
        }
        // A cluster node numbers its calls from a base its name gives.
        assert_eq!(
            call_id.as_u64().unwrap() & !0xffff_ffff,
            relay::cluster::call_id_base("edge-a"),
            "{created}"
        );
        let shown_id = call_id.to_string();
        let shown = relayd.ctl_ok(&["calls", "show", &shown_id]);
        assert!(
            shown.contains("(prflx) <-> relay ICE 198.51.100.1:3479")
                && shown.contains("pbx leg     relay 10.30.0.1:41000 <-> PBX 10.30.0.2:40000"),
            "{shown}"
        );
        assert_eq!(
            relayd.ctl_json(&["calls", "show", &shown_id])["user"],
            "alice"
        );
        let unknown = relayd.ctl(&["calls", "show", "99"]);
        assert_eq!(unknown.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&unknown.stderr).contains("call: 99: no such call"));
        // The periodic report to the controller (every second here).
        let stats = loop {
            let event = receive_within(&mut controller, Duration::from_secs(3))
                .await
                .expect("call.stats within the interval");
            if event["event"] == "call.stats" {
                break event;
            }
        };
        assert!(
            stats["to_pbx"]["packets"].as_u64().unwrap() > 0
                && stats["to_app"]["bytes"].as_u64().unwrap() > 0
                && stats["idle_ms"].is_u64(),
            "{stats}"
        );
        assert_eq!(relayd.ctl_json(&["status"])["calls"], 1);
        // In Redis: the call's record under the node's name with four health TTLs (a
        // standby reads it after the node's health expired), the
        // node's sessions (the controller and alice's app), its load.
        let call_key = format!("relay:call:edge-a:{call_id}");
        let record = redis.cli_until(&["GET", &call_key], REFRESHES, |got| !got.is_empty());
        let record: Value = serde_json::from_str(&record).expect("a call record");
        assert_eq!(
            (&record["tenant"], &record["user"], &record["pbx"]),
            (&json!("acme"), &json!("alice"), &json!(PBX_RTP)),
            "{record:#}"
        );
        let ttl: u64 = redis.cli(&["TTL", &call_key]).parse().unwrap();
        assert!((9..=12).contains(&ttl), "TTL {ttl}");
        // While it does not change, the record is only given a new TTL at each refresh
        // (every second here), not written again.
        let expires = || {
            let stats = redis.cli(&["INFO", "commandstats"]);
            stats
                .lines()
                .find_map(|line| line.strip_prefix("cmdstat_expire:calls="))
                .and_then(|rest| rest.split(',').next())
                .map_or(0, |calls| calls.parse::<u64>().unwrap())
        };
        let before = expires();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let renewed = expires() - before;
        assert!(renewed >= 2, "{renewed} EXPIREs in 2.5 s");
        let sessions: Value =
            serde_json::from_str(&redis.cli(&["GET", "relay:sessions:edge-a"])).unwrap();
        let sessions = sessions.as_array().unwrap();
        assert!(
            sessions.contains(&json!({"tenant": "acme", "role": "client", "user": "alice"}))
                && sessions.contains(&json!({"tenant": "acme", "role": "controller"})),
            "{sessions:?}"
        );
        let cluster = relayd.ctl_json_until(&["cluster", "status"], Duration::from_secs(3), |s| {
            s["members"][0]["load"]["calls"] == 1
        });
        assert_eq!(cluster["members"][0]["load"]["calls"], 1, "{cluster:#}");
        let metrics = relay_tests::relayd::http_get(&lab.relay, "10.30.0.1:9477", "/metrics");
        assert_eq!(
            relay_tests::relayd::metric(&metrics, "relay_calls"),
            Some(1),
            "{metrics}"
        );
        assert_eq!(
            relay_tests::relayd::metric(&metrics, r#"relay_signalling_sessions{role="client"}"#),
            Some(1),
            "{metrics}"
        );
        assert!(
            relayd
                .ctl_ok(&["status"])
                .contains("calls       1 in progress")
        );
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
            // Only the RTP: the RTCP and DTLS that followed it went through userspace.
            assert!(xdp <= u64::from(PACKETS), "{flow}");
        }

        // Requests about calls that do not exist (or not yet) are refused and change
        // nothing: the call goes on.
        for (id, message) in [
            (20, json!({"type": "call.hangup", "id": 20, "call": 99})),
            (
                21,
                json!({"type": "call.update", "id": 21, "call": 99, "sdp": PBX_OFFER}),
            ),
            (
                22,
                json!({"type": "call.answer", "id": 22, "call": 99, "sdp": PBX_OFFER}),
            ),
            (
                23,
                json!({"type": "call.update", "id": 23, "call": call_id, "sdp": "v=0\r\n"}),
            ),
            (
                24,
                json!({"type": "call.candidate", "id": 24, "call": 99, "candidate": "x"}),
            ),
        ] {
            let refused = request(&mut controller, message).await;
            assert_eq!(
                (&refused["type"], &refused["id"], &refused["code"]),
                (&json!("error"), &json!(id), &json!("bad_request")),
                "{refused}"
            );
        }
        // The PBX leg has no ICE: candidates from the controller are refused.
        let refused = request(
            &mut controller,
            json!({"type": "call.candidate", "id": 25, "call": call_id, "candidate": "x"}),
        )
        .await;
        assert_eq!(refused["code"], "forbidden", "{refused}");
        assert_eq!(
            relayd.ctl_json(&["calls", "list"])["calls"][0]["state"],
            "connected"
        );

        // The PBX's re-INVITE moves its RTP: the first echo stops, the relay answers with
        // its unchanged LAN address and replaces the flows toward the new one.
        pbx_echo.abort();
        let moved_echo = tokio::spawn(rtp_echo(lab.pbx.udp_socket(PBX_RTP_MOVED.parse().unwrap())));
        let moved_offer = PBX_OFFER.replace("m=audio 40000", "m=audio 40002");
        let updated = request(
            &mut controller,
            json!({"type": "call.update", "id": 6, "call": call_id, "sdp": moved_offer}),
        )
        .await;
        assert_eq!(updated["type"], "result", "{updated}");
        let relay_answer = updated["sdp"].as_str().unwrap();
        assert_eq!(
            relay::session::sdp::audio(relay_answer).unwrap().rtp,
            endpoint.rtp,
            "the relay's LAN address stays: {relay_answer}"
        );
        hangup_tx.send(()).unwrap();
        let done = tokio::task::spawn_blocking(move || {
            let echoed = done.recv().unwrap();
            assert_eq!(echoed, MOVED_PACKETS, "the media reached the moved PBX RTP");
        });
        done.await.unwrap();
        assert_eq!(
            relayd.ctl_json(&["calls", "list"])["calls"][0]["pbx"],
            PBX_RTP_MOVED
        );
        // The changed call is written again.
        redis.cli_until(&["GET", &call_key], REFRESHES, |got| {
            got.contains(PBX_RTP_MOVED)
        });

        let result = request(
            &mut controller,
            json!({"type": "call.hangup", "id": 5, "call": call_id}),
        )
        .await;
        assert_eq!(result["type"], "result", "{result}");
        hangup_tx.send(()).unwrap();
        let ended = tokio::task::spawn_blocking(move || app_thread.join().unwrap())
            .await
            .unwrap();
        assert_eq!(
            (&ended["event"], &ended["reason"]),
            (&json!("call.ended"), &json!("hangup")),
            "{ended}"
        );
        let flows = relayd.ctl_json(&["flow", "list"]);
        assert_eq!(flows["flows"].as_array().unwrap().len(), 0, "{flows}");
        assert_eq!(relayd.ctl_ok(&["calls", "list"]), "no calls\n");
        // An ended call's record goes at the next refresh, not at its TTL.
        redis.cli_until(&["EXISTS", &call_key], REFRESHES, |got| got == "0");
        let metrics = relay_tests::relayd::http_get(&lab.relay, "10.30.0.1:9477", "/metrics");
        for (series, value) in [
            (r#"relay_calls_ended_total{reason="hangup"}"#, 1),
            ("relay_call_setup_seconds_count", 1),
            ("relay_calls", 0),
        ] {
            assert_eq!(
                relay_tests::relayd::metric(&metrics, series),
                Some(value),
                "{series}\n{metrics}"
            );
        }
        let setup: f64 = metrics
            .lines()
            .find_map(|line| line.strip_prefix("relay_call_setup_seconds_sum "))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("{metrics}"));
        assert!(setup > 0.0, "{metrics}");
        // Unknown calls: the operator is told.
        let unknown = relayd.ctl(&["calls", "hangup", "99"]);
        assert_eq!(unknown.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&unknown.stderr).contains("call: 99: no such call"));
        moved_echo.abort();
        rtcp_echo.abort();
    });
}

/// A few of the cluster's refreshes (a second apart in the first test).
const REFRESHES: Duration = Duration::from_secs(3);

/// The PBX's answer to an app's call: plain RTP from its LAN address.
const PBX_ANSWER: &str = "v=0\r\no=PBX 2 2 IN IP4 10.30.0.2\r\ns=PBX\r\nc=IN IP4 10.30.0.2\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n";

#[test]
fn an_app_behind_nat_calls_the_pbx_and_the_media_flows_in_xdp() {
    require_root();
    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&calls_config(&pins.path, "acme", API_KEY, ""));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let fingerprint = relayd.signalling_fingerprint();
    let echo_socket = lab.pbx.udp_socket(PBX_RTP.parse().unwrap());
    let main_runtime = runtime();
    main_runtime.block_on(async {
        let pbx_echo = tokio::spawn(rtp_echo(echo_socket));
        let mut controller: Socket = lab.controller(&fingerprint, "acme", API_KEY).await;
        let token = mint_token(&mut controller, "bob", 300).await;
        let (done_tx, done) = mpsc::channel();
        let app_ns = lab.app.name.clone();
        let app_thread = std::thread::spawn(move || {
            enter_by_name(&app_ns);
            runtime().block_on(async move {
                let mut app = App::in_edge_lab(&fingerprint, &token).await;
                let (call_id, media) = app.call_out().await;
                let mut echoed = 0;
                let mut buf = vec![0u8; 2048];
                for sequence in 0..PACKETS {
                    media.send(&numbered(sequence)).await.unwrap();
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(1), media.recv(&mut buf)).await
                        && sequence_of(&buf[..n]) == Some(sequence)
                    {
                        echoed += 1;
                    }
                }
                done_tx.send(echoed).unwrap();
                // The app's signalling drops and it connects again: the call is listed in
                // its welcome, the media never stopped, and it hangs up from the new
                // session.
                let welcome = app
                    .reconnect(SIGNALLING.parse().unwrap(), &fingerprint, &token)
                    .await;
                assert_eq!(
                    welcome["calls"],
                    json!([{"call": call_id, "user": "bob", "state": "connected", "called": "app"}]),
                    "{welcome}"
                );
                assert_eq!(talk(&media, 1000, 50).await.echoed, 50);
                let result = call(
                    &mut app.signalling,
                    json!({"type": "call.hangup", "id": 9, "call": call_id}),
                )
                .await;
                assert_eq!(result["type"], "result", "{result}");
                app.close().await;
            })
        });
        // The controller gets the app's call with the PBX's offer: the relay's LAN side.
        let incoming = receive_within(&mut controller, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(
            (&incoming["event"], &incoming["user"]),
            (&json!("call.incoming"), &json!("bob")),
            "{incoming}"
        );
        let pbx_offer = incoming["sdp"].as_str().unwrap();
        let endpoint = relay::session::sdp::audio(pbx_offer).unwrap();
        assert_eq!(endpoint.rtp.ip().to_string(), "10.30.0.1", "{pbx_offer}");
        assert!(!pbx_offer.contains("a=candidate"), "{pbx_offer}");
        assert!(
            !pbx_offer.contains("10.20.0.2"),
            "the app's address is hidden: {pbx_offer}"
        );
        let answered = call(
            &mut controller,
            json!({"type": "call.answer", "id": 2, "call": incoming["call"], "sdp": PBX_ANSWER}),
        )
        .await;
        assert_eq!(answered["type"], "result", "{answered}");
        let echoed = tokio::task::spawn_blocking(move || done.recv().unwrap())
            .await
            .unwrap();
        assert_eq!(
            echoed,
            PACKETS,
            "every RTP packet came back\n{}",
            relayd.log()
        );
        let flows = relayd.ctl_json(&["flow", "list"]);
        let flows = flows["flows"].as_array().unwrap();
        assert_eq!(flows.len(), 2, "the call's two flows: {flows:?}");
        for flow in flows {
            assert!(
                flow["counters"]["xdp_packets"].as_u64().unwrap() >= u64::from(PACKETS) - 10,
                "{flow}"
            );
        }
        // After the app's hangup the controller is told, and nothing is left.
        let mut ended = Value::Null;
        for _ in 0..3 {
            let event = receive_within(&mut controller, Duration::from_secs(10))
                .await
                .unwrap();
            if event["event"] == "call.ended" {
                ended = event;
                break;
            }
        }
        assert_eq!(ended["reason"], "hangup", "{ended}");
        tokio::task::spawn_blocking(move || app_thread.join().unwrap())
            .await
            .unwrap();
        let flows = relayd.ctl_json(&["flow", "list"]);
        assert_eq!(flows["flows"].as_array().unwrap().len(), 0, "{flows}");
        pbx_echo.abort();
    });
}
