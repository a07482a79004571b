//! Calls across two relays sharing a real redis-server, in the edge lab: the controller is
//! connected to relay edge-a, the app to relay edge-b.
//!
//! - The PBX calls the app: the call is anchored on edge-b, where the app is (its id is
//!   one of edge-b's); the controller's requests reach it through Redis and its events come
//!   back the same way; its media flows in edge-b's XDP program.
//! - edge-b anchors `cluster.max_calls` (1) already: the next call for the same app is
//!   placed on edge-a, the least loaded relay with room; the app gets edge-a's ICE address,
//!   its answer and hangup (sent to edge-b) reach edge-a, and the media flows there.
//! - The app calls the PBX while edge-b is full: placed on edge-a (the app gets edge-a's ICE
//!   address in the answer, its events come through edge-b's signalling); once edge-b has
//!   room again, anchored on edge-b, the controller on edge-a getting the `call.incoming`
//!   and its answer reaching edge-b.
//! - A request for a call no relay has is `bad_request`; a user connected nowhere is
//!   `offline`.

use std::{sync::mpsc, time::Duration};

use relay::cluster::call_id_base;
use relay_tests::{
    app::{App, talk},
    config_file::ConfigFile,
    lab::{EdgeLab, calls_config},
    netns::{PinDir, enter_by_name},
    pbx::rtp_echo,
    recv_async,
    redis::RedisServer,
    relayd::{Relayd, http_get, metric},
    require_root, runtime,
    signalling_client::{
        Socket, call, controller, mint_token, request, until_call_state, until_message,
    },
};
use serde_json::{Value, json};

const API_KEY: &str = "acme-api-key-0123456789";
const PBX_RTP: &str = "10.30.0.2:40000";
/// edge-a's signalling and ICE, beside edge-b's on the relay's WAN address.
const SIGNALLING_A: &str = "198.51.100.1:8443";
const ICE_A: &str = "198.51.100.1:3480";
const PACKETS: u32 = 100;
/// edge-a's metrics.
const METRICS_A: &str = "127.0.0.1:9478";

/// The PBX's offer and answer: plain RTP from its LAN address.
const PBX_OFFER: &str = "v=0\r\no=PBX 1 1 IN IP4 10.30.0.2\r\ns=PBX\r\nc=IN IP4 10.30.0.2\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n";
const PBX_ANSWER: &str = "v=0\r\no=PBX 2 2 IN IP4 10.30.0.2\r\ns=PBX\r\nc=IN IP4 10.30.0.2\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n";

const CLUSTER: &str = "[cluster]\nenabled = true\nhealth_ttl_secs = 3\n";

/// edge-a: the userspace datapath (edge-b has XDP on the lab's interfaces), its own
/// signalling, ICE and LAN ports on the same addresses.
fn edge_a_config() -> String {
    format!(
        r#"
[datapath]
mode = "userspace"
[metrics]
listen = "{METRICS_A}"
[signalling]
enabled = true
listen = "{SIGNALLING_A}"
token_secret = "a token secret of enough length"
tenants = [{{ name = "acme", api_key = "{API_KEY}" }}]
[calls]
enabled = true
ice_listen = "{ICE_A}"
lan_address = "{}"
app_media = "as-pbx"
pbx_media = "as-app"
port_range = "41100-41110"
{CLUSTER}node = "edge-a"
"#,
        EdgeLab::RELAY_LAN
    )
}

fn base_of(call: &Value) -> u64 {
    call.as_u64().expect("a call id") & !0xffff_ffff
}

/// What the app does, step by step as the test says (`go`), reporting to `done`.
async fn app(
    token: String,
    fingerprint: String,
    done: mpsc::Sender<Value>,
    go: mpsc::Receiver<()>,
) {
    let mut app = App::in_edge_lab(&fingerprint, &token).await;
    done.send(json!("connected")).unwrap();
    // The first call: anchored on edge-b, where the app is.
    let incoming = app.next_within(Duration::from_secs(10)).await;
    let offer = incoming["sdp"].as_str().unwrap_or_default();
    assert!(offer.contains(" 198.51.100.1 3479 typ host"), "{incoming}");
    let first = app.answer(&incoming).await;
    let talked = talk(&first, 0, PACKETS).await.echoed;
    done.send(json!({"call": incoming["call"], "echoed": talked}))
        .unwrap();
    // The second: placed on edge-a; everything still goes through edge-b's signalling.
    let (_, go) = recv_async(go).await;
    let incoming = app.next_within(Duration::from_secs(10)).await;
    let offer = incoming["sdp"].as_str().unwrap_or_default().to_owned();
    assert!(offer.contains(" 198.51.100.1 3480 typ host"), "{incoming}");
    let second = app.answer(&incoming).await;
    let talked = talk(&second, 0, PACKETS).await.echoed;
    let hangup = app
        .request(json!({"type": "call.hangup", "id": 7, "call": incoming["call"]}))
        .await;
    assert_eq!(hangup["type"], "result", "{hangup}");
    done.send(json!({"call": incoming["call"], "echoed": talked}))
        .unwrap();
    // The app calls out while edge-b is still full: placed on edge-a, whose ICE address
    // the relay's answer names.
    let (_, go) = recv_async(go).await;
    let (placed, media, answer) = app.call_out_edited(|offer| offer).await;
    assert!(answer.contains(" 198.51.100.1 3480 typ host"), "{answer}");
    let talked = talk(&media, 0, PACKETS).await.echoed;
    let hangup = app
        .request(json!({"type": "call.hangup", "id": 9, "call": placed}))
        .await;
    assert_eq!(hangup["type"], "result", "{hangup}");
    done.send(json!({"call": placed, "echoed": talked}))
        .unwrap();
    // The controller hangs up the first call.
    let ended = app.next_within(Duration::from_secs(10)).await;
    assert_eq!(
        (&ended["event"], &ended["reason"]),
        (&json!("call.ended"), &json!("hangup")),
        "{ended}"
    );
    app.close_agents().await;
    // The app calls out.
    let (_, go) = recv_async(go).await;
    let (call_id, media) = app.call_out().await;
    let talked = talk(&media, 0, PACKETS).await.echoed;
    let hangup = app
        .request(json!({"type": "call.hangup", "id": 8, "call": call_id}))
        .await;
    assert_eq!(hangup["type"], "result", "{hangup}");
    done.send(json!({"call": call_id, "echoed": talked}))
        .unwrap();
    drop(go);
    app.close().await;
}

#[test]
fn a_call_is_anchored_where_its_app_is_and_placed_elsewhere_when_that_relay_is_full() {
    require_root();
    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let redis = RedisServer::start(&lab.relay, 6379);
    let config_b = ConfigFile::new(&calls_config(
        &pins.path,
        "acme",
        API_KEY,
        &format!(
            "port_range = \"41000-41010\"\nstats_interval_secs = 1\n{CLUSTER}node = \"edge-b\"\nmax_calls = 1\n"
        ),
    ));
    let config_a = ConfigFile::new(&edge_a_config());
    let edge_b = Relayd::start(Some(&lab.relay), &["--config", config_b.path()]);
    let edge_a = Relayd::start(Some(&lab.relay), &["--config", config_a.path()]);
    let both_alive = |status: &Value| status["nodes_alive"] == 2;
    for relayd in [&edge_a, &edge_b] {
        let status =
            relayd.ctl_json_until(&["cluster", "status"], Duration::from_secs(10), both_alive);
        assert!(both_alive(&status), "{status:#}\n{}", relayd.log());
    }
    let (fingerprint_a, fingerprint_b) = (
        edge_a.signalling_fingerprint(),
        edge_b.signalling_fingerprint(),
    );
    let echo_socket = lab.pbx.udp_socket(PBX_RTP.parse().unwrap());
    runtime().block_on(async {
        let pbx_echo = tokio::spawn(rtp_echo(echo_socket));
        let mut controller: Socket = controller(
            &lab.pbx,
            SIGNALLING_A.parse().unwrap(),
            &fingerprint_a,
            "acme",
            API_KEY,
        )
        .await;
        // Connected nowhere: offline, as on one relay.
        let offline = call(
            &mut controller,
            json!({"type": "call.create", "id": 1, "user": "alice", "sdp": PBX_OFFER}),
        )
        .await;
        assert_eq!(offline["code"], "offline", "{offline}");
        let token = mint_token(&mut controller, "alice", 300).await;
        let (done_tx, done) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        let app_ns = lab.app.name.clone();
        let app_thread = std::thread::spawn(move || {
            enter_by_name(&app_ns);
            runtime().block_on(app(token, fingerprint_b, done_tx, go_rx))
        });
        let (_, done) = recv_async(done).await;

        // The PBX calls the app: anchored on edge-b.
        let created = call(
            &mut controller,
            json!({"type": "call.create", "id": 2, "user": "alice", "sdp": PBX_OFFER}),
        )
        .await;
        assert_eq!(created["type"], "result", "{created}");
        let first = created["call"].clone();
        assert_eq!(base_of(&first), call_id_base("edge-b"), "{created}");
        let answered = until_message(
            &mut controller,
            Duration::from_secs(10),
            5,
            "call.answered",
            |m| m["event"] == "call.answered",
        )
        .await;
        let pbx_answer = relay::session::sdp::audio(answered["sdp"].as_str().unwrap()).unwrap();
        assert_eq!(
            pbx_answer.rtp.to_string(),
            "10.30.0.1:41000",
            "edge-b's LAN port: {answered}"
        );
        let connected = until_call_state(&mut controller, "connected").await;
        assert_eq!(connected["call"], first, "{connected}");
        let (report, done) = recv_async(done).await;
        assert_eq!(report["echoed"], PACKETS, "{report}\n{}", edge_b.log());
        // Its events come to the controller on edge-a: the stats every second, the
        // talk's packets counted in them.
        let stats = until_message(
            &mut controller,
            Duration::from_secs(3),
            10,
            "call.stats with the talk",
            |m| {
                m["event"] == "call.stats"
                    && m["to_pbx"]["packets"].as_u64() >= Some(u64::from(PACKETS) - 5)
            },
        )
        .await;
        assert_eq!(stats["call"], first, "{stats}");
        // The media in edge-b's XDP program; edge-a has nothing.
        let flows = edge_b.ctl_json(&["flow", "list"]);
        let flows = flows["flows"].as_array().unwrap();
        assert_eq!(flows.len(), 2, "the call's two flows: {flows:?}");
        for flow in flows {
            assert!(
                flow["counters"]["xdp_packets"].as_u64().unwrap() >= u64::from(PACKETS) - 5,
                "{flow}"
            );
        }
        assert_eq!(edge_a.ctl_json(&["calls", "list"])["calls"], json!([]));
        // Both relays published their load: edge-b is full.
        let full = edge_a.ctl_json_until(&["cluster", "status"], Duration::from_secs(3), |s| {
            s["members"].as_array().is_some_and(|m| {
                m.iter()
                    .any(|m| m["node"] == "edge-b" && m["load"]["calls"] == 1)
            })
        });
        assert!(full.to_string().contains("\"max_calls\":1"), "{full:#}");

        // A second call for the same app: edge-b is at its max_calls, so edge-a takes it.
        let created = request(
            &mut controller,
            json!({"type": "call.create", "id": 3, "user": "alice", "sdp": PBX_OFFER}),
        )
        .await;
        assert_eq!(created["type"], "result", "{created}\n{}", edge_a.log());
        let second = created["call"].clone();
        assert_eq!(base_of(&second), call_id_base("edge-a"), "{created}");
        go.send(()).unwrap();
        let answered = until_message(
            &mut controller,
            Duration::from_secs(10),
            10,
            "call.answered",
            |m| m["event"] == "call.answered" && m["call"] == second,
        )
        .await;
        let pbx_answer = relay::session::sdp::audio(answered["sdp"].as_str().unwrap()).unwrap();
        assert_eq!(
            pbx_answer.rtp.to_string(),
            "10.30.0.1:41100",
            "edge-a's LAN port: {answered}"
        );
        let (report, done) = recv_async(done).await;
        assert_eq!(report["call"], second, "{report}");
        assert_eq!(report["echoed"], PACKETS, "{report}\n{}", edge_a.log());
        assert!(
            edge_a
                .log()
                .contains("the call is placed on the least loaded relay"),
            "{}",
            edge_a.log()
        );
        // The app hung it up from edge-b: the controller is told by edge-a.
        let ended = until_message(
            &mut controller,
            Duration::from_secs(10),
            20,
            "call.ended",
            |m| m["event"] == "call.ended" && m["call"] == second,
        )
        .await;
        assert_eq!(ended["reason"], "hangup", "{ended}");
        assert_eq!(edge_a.ctl_json(&["calls", "list"])["calls"], json!([]));

        // The app calls out while edge-b is still full: placed on edge-a, where the
        // controller is; its answer and the app's media go there.
        go.send(()).unwrap();
        let incoming = until_message(
            &mut controller,
            Duration::from_secs(10),
            10,
            "call.incoming",
            |m| m["event"] == "call.incoming",
        )
        .await;
        let placed = incoming["call"].clone();
        assert_eq!(base_of(&placed), call_id_base("edge-a"), "{incoming}");
        let answered = request(
            &mut controller,
            json!({"type": "call.answer", "id": 7, "call": placed, "sdp": PBX_ANSWER}),
        )
        .await;
        assert_eq!(answered["type"], "result", "{answered}");
        let (report, done) = recv_async(done).await;
        assert_eq!(report["call"], placed, "{report}");
        assert_eq!(report["echoed"], PACKETS, "{report}\n{}", edge_a.log());
        let ended = until_message(
            &mut controller,
            Duration::from_secs(10),
            20,
            "call.ended",
            |m| m["event"] == "call.ended" && m["call"] == placed,
        )
        .await;
        assert_eq!(ended["reason"], "hangup", "{ended}");

        // Requests for calls nobody has.
        for call_id in [call_id_base("edge-b") + 999, 12345] {
            let refused = request(
                &mut controller,
                json!({"type": "call.hangup", "id": 4, "call": call_id}),
            )
            .await;
            assert_eq!(refused["code"], "bad_request", "{refused}");
            assert!(
                refused["message"]
                    .as_str()
                    .unwrap()
                    .contains("no such call"),
                "{refused}"
            );
        }
        // edge-a counted the requests it sent to edge-b (the first call's create and the
        // hangup of an id of edge-b's), every one answered.
        let metrics = http_get(&lab.relay, METRICS_A, "/metrics");
        assert!(
            metric(
                &metrics,
                r#"relay_cluster_call_requests_total{outcome="answered"}"#
            )
            .is_some_and(|answered| answered >= 2),
            "{metrics}"
        );
        assert_eq!(
            metric(
                &metrics,
                r#"relay_cluster_call_requests_total{outcome="unanswered"}"#
            ),
            Some(0),
            "{metrics}"
        );
        // The controller hangs up the first call on edge-b.
        let hangup = request(
            &mut controller,
            json!({"type": "call.hangup", "id": 5, "call": first}),
        )
        .await;
        assert_eq!(hangup["type"], "result", "{hangup}");
        edge_b.wait_for_no_flows(Duration::from_secs(5), "after the hangup");

        // The app calls the PBX: anchored on edge-b, the controller on edge-a answers.
        go.send(()).unwrap();
        let incoming = until_message(
            &mut controller,
            Duration::from_secs(10),
            10,
            "call.incoming",
            |m| m["event"] == "call.incoming",
        )
        .await;
        assert_eq!(incoming["user"], "alice", "{incoming}");
        assert_eq!(
            base_of(&incoming["call"]),
            call_id_base("edge-b"),
            "{incoming}"
        );
        let answered = request(
            &mut controller,
            json!({"type": "call.answer", "id": 6, "call": incoming["call"], "sdp": PBX_ANSWER}),
        )
        .await;
        assert_eq!(answered["type"], "result", "{answered}");
        let (report, _) = recv_async(done).await;
        assert_eq!(report["echoed"], PACKETS, "{report}\n{}", edge_b.log());
        let ended = until_message(
            &mut controller,
            Duration::from_secs(10),
            20,
            "call.ended",
            |m| m["event"] == "call.ended" && m["call"] == incoming["call"],
        )
        .await;
        assert_eq!(ended["reason"], "hangup", "{ended}");
        tokio::task::spawn_blocking(move || app_thread.join().unwrap())
            .await
            .unwrap();
        edge_b.wait_for_no_flows(Duration::from_secs(5), "after the app's hangup");
        pbx_echo.abort();
    });
    drop(redis);
}
