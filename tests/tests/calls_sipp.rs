//! Calls with sipp (Debian `sip-tester`, a SIP implementation we did not write) as the user
//! agent behind the PBX: the controller runs the SIP dialog with sipp and passes the SDP
//! between it and the relay; sipp answers with its own SDP and echoes the RTP
//! (`sipp -sn uas -rtp_echo`). Both directions on one relay: the PBX calls the app (a
//! late-offer INVITE: sipp's 200 OK carries the offer, the ACK the relay's answer), then the
//! app calls the PBX (the relay's offer in the INVITE, sipp's answer in its 200 OK). The
//! media flows in XDP and sipp's own statistics count both calls as successful.

use std::{sync::mpsc, time::Duration};

use relay_tests::{
    app::{App, talk},
    config_file::ConfigFile,
    lab::{EdgeLab, calls_config},
    netns::{PinDir, enter_by_name},
    pbx::{SipDialog, Sipp, sipp_successful_calls},
    recv_async,
    relayd::Relayd,
    require_root, runtime,
    signalling_client::{Socket, call, mint_token, until_message},
};
use serde_json::{Value, json};

const API_KEY: &str = "acme-api-key-0123456789";
/// Packets each way per call, at 50 per second.
const PACKETS: u32 = 150;

/// The app: takes the PBX's call, talks, waits for its end; then calls out, talks, hangs
/// up. Tells the test how many packets came back after each call.
async fn app(token: String, fingerprint: String, said: mpsc::Sender<u32>, go: mpsc::Receiver<()>) {
    let mut app = App::in_edge_lab(&fingerprint, &token).await;
    said.send(0).unwrap();
    let incoming = app.next_within(Duration::from_secs(15)).await;
    let media = app.answer(&incoming).await;
    said.send(talk(&media, 0, PACKETS).await.echoed).unwrap();
    let ended = app.next_within(Duration::from_secs(15)).await;
    assert_eq!(ended["event"], "call.ended", "{ended}");
    app.close_agents().await;

    let (_, go) = recv_async(go).await;
    let (call_id, media) = app.call_out().await;
    said.send(talk(&media, 0, PACKETS).await.echoed).unwrap();
    tokio::task::spawn_blocking(move || go.recv().unwrap())
        .await
        .unwrap();
    let result = call(
        &mut app.signalling,
        json!({"type": "call.hangup", "id": 9, "call": call_id}),
    )
    .await;
    assert_eq!(result["type"], "result", "{result}");
    app.close().await;
}

/// The next event to the controller that is `name`, skipping others (call.state).
async fn next_event(controller: &mut Socket, name: &str) -> Value {
    until_message(controller, Duration::from_secs(15), 10, name, |event| {
        event["event"] == name
    })
    .await
}

/// Both of the call's flows carried at least `packets` in XDP.
fn assert_media_in_xdp(relayd: &Relayd, packets: u32) {
    let flows = relayd.ctl_json(&["flow", "list"]);
    let flows = flows["flows"].as_array().unwrap();
    assert_eq!(flows.len(), 2, "{flows:?}");
    for flow in flows {
        assert!(
            flow["counters"]["xdp_packets"].as_u64().unwrap() >= u64::from(packets) - 10,
            "the kernel carried the call's media: {flow}\n{}",
            relayd.log()
        );
    }
}

#[test]
fn calls_in_both_directions_with_sipp_behind_the_pbx() {
    require_root();
    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&calls_config(&pins.path, "acme", API_KEY, ""));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let fingerprint = relayd.signalling_fingerprint();
    let mut sipp = Sipp::uas(
        &lab.pbx,
        "10.30.0.2:5060".parse().unwrap(),
        "10.30.0.2:40000".parse().unwrap(),
        2,
    );
    runtime().block_on(async {
        let mut controller = lab.controller(&fingerprint, "acme", API_KEY).await;
        let token = mint_token(&mut controller, "alice", 300).await;
        let (said_tx, said) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        let app_ns = lab.app.name.clone();
        let app_thread = std::thread::spawn(move || {
            enter_by_name(&app_ns);
            runtime().block_on(app(token, fingerprint, said_tx, go_rx));
        });
        let (_, said) = recv_async(said).await;

        // The PBX calls the app: sipp offers in its 200 OK (late offer).
        let (mut dialog, ok) = SipDialog::invite(
            lab.pbx.udp_socket("10.30.0.2:5070".parse().unwrap()),
            sipp.sip,
            None,
        );
        assert!(
            ok.body.contains("m=audio 40000"),
            "sipp's offer: {}",
            ok.body
        );
        let created = call(
            &mut controller,
            json!({"type": "call.create", "id": 2, "user": "alice", "sdp": ok.body}),
        )
        .await;
        assert_eq!(created["type"], "result", "{created}");
        let answered = next_event(&mut controller, "call.answered").await;
        let answer = answered["sdp"].as_str().unwrap();
        assert!(answer.contains("c=IN IP4 10.30.0.1"), "{answer}");
        dialog.ack(Some(answer));
        let checking = next_event(&mut controller, "call.state").await;
        assert_eq!(checking["state"], "checking", "{checking}");
        let connected = next_event(&mut controller, "call.state").await;
        assert_eq!(connected["state"], "connected", "{connected}");
        let (echoed, said) = recv_async(said).await;
        assert_eq!(
            echoed,
            PACKETS,
            "sipp echoed every packet\n{}",
            relayd.log()
        );
        assert_media_in_xdp(&relayd, PACKETS);
        let result = call(
            &mut controller,
            json!({"type": "call.hangup", "id": 3, "call": created["call"]}),
        )
        .await;
        assert_eq!(result["type"], "result", "{result}");
        dialog.bye();

        // The app calls the PBX: the relay's offer goes to sipp in the INVITE.
        go.send(()).unwrap();
        let incoming = next_event(&mut controller, "call.incoming").await;
        let offer = incoming["sdp"].as_str().unwrap();
        let (mut dialog, ok) = SipDialog::invite(
            lab.pbx.udp_socket("10.30.0.2:5072".parse().unwrap()),
            sipp.sip,
            Some(offer),
        );
        dialog.ack(None);
        let answered = call(
            &mut controller,
            json!({"type": "call.answer", "id": 4, "call": incoming["call"], "sdp": ok.body}),
        )
        .await;
        assert_eq!(answered["type"], "result", "{answered}");
        let echoed = tokio::task::spawn_blocking(move || said.recv().unwrap())
            .await
            .unwrap();
        assert_eq!(
            echoed,
            PACKETS,
            "sipp echoed every packet\n{}",
            relayd.log()
        );
        assert_media_in_xdp(&relayd, PACKETS);
        go.send(()).unwrap();
        let ended = next_event(&mut controller, "call.ended").await;
        assert_eq!(ended["reason"], "hangup", "{ended}");
        dialog.bye();
        tokio::task::spawn_blocking(move || app_thread.join().unwrap())
            .await
            .unwrap();
        let flows = relayd.ctl_json(&["flow", "list"]);
        assert_eq!(flows["flows"].as_array().unwrap().len(), 0, "{flows}");
    });
    let screen = sipp.finish();
    assert_eq!(
        sipp_successful_calls(&screen),
        Some(2),
        "sipp saw both dialogs through\n{screen}"
    );
}
