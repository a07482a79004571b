//! relayd stopping or dying with calls in progress. Stopped: every call ends
//! (`relay-stopped`), both sides hear it, no flow is left. Killed: the next relayd finds the
//! calls' flows adopted from the pinned table on its ICE and LAN ports, removes them (nobody
//! could end those calls), and starts and takes calls again.

use std::{sync::mpsc, time::Duration};

use relay_tests::{
    app::{App, talk},
    config_file::ConfigFile,
    lab::{EdgeLab, calls_config},
    netns::{PinDir, enter_by_name},
    pbx::rtp_echo,
    recv_async,
    relayd::Relayd,
    require_root, runtime,
    signalling_client::{Socket, mint_token, receive_within, request},
};
use serde_json::{Value, json};

const API_KEY: &str = "acme-api-key-0123456789";
const PBX_RTP: &str = relay_tests::pbx::RTP;
const PBX_OFFER: &str = relay_tests::pbx::SDP;

/// A connected call with media through XDP: the controller's session, and the app's thread
/// (it answers, talks for a second, then returns the next event it gets, if any, within
/// 10 s).
async fn connected_call(
    lab: &EdgeLab,
    relayd: &Relayd,
) -> (Socket, std::thread::JoinHandle<Option<Value>>) {
    let fingerprint = relayd.signalling_fingerprint();
    let mut controller = lab.controller(&fingerprint, "acme", API_KEY).await;
    let token = mint_token(&mut controller, "alice", 300).await;
    let (talked_tx, talked) = mpsc::channel();
    let app_ns = lab.app.name.clone();
    let app = std::thread::spawn(move || {
        enter_by_name(&app_ns);
        runtime().block_on(async move {
            let mut app = App::in_edge_lab(&fingerprint, &token).await;
            talked_tx.send(0).unwrap();
            let incoming = app.next_within(Duration::from_secs(10)).await;
            let media = app.answer(&incoming).await;
            talked_tx.send(talk(&media, 0, 50).await.echoed).unwrap();
            let next = relay_tests::signalling_client::receive_within(
                &mut app.signalling,
                Duration::from_secs(10),
            )
            .await
            .ok();
            app.close().await;
            next
        })
    });
    let (_, talked) = recv_async(talked).await;
    let created = request(
        &mut controller,
        json!({"type": "call.create", "id": 2, "user": "alice", "sdp": PBX_OFFER}),
    )
    .await;
    assert_eq!(created["type"], "result", "{created}");
    let echoed = tokio::task::spawn_blocking(move || talked.recv().unwrap())
        .await
        .unwrap();
    assert_eq!(echoed, 50, "{}", relayd.log());
    assert_eq!(
        relayd.ctl_json(&["flow", "list"])["flows"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    (controller, app)
}

#[test]
fn stopping_relayd_ends_the_calls_and_tells_both_sides() {
    require_root();
    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&calls_config(&pins.path, "acme", API_KEY, ""));
    let mut relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let echo_socket = lab.pbx.udp_socket(PBX_RTP.parse().unwrap());
    runtime().block_on(async {
        let echo = tokio::spawn(rtp_echo(echo_socket));
        let (mut controller, app) = connected_call(&lab, &relayd).await;
        assert!(relayd.stop(), "relayd stops cleanly:\n{}", relayd.log());
        let mut ended = None;
        while let Ok(message) = receive_within(&mut controller, Duration::from_secs(5)).await {
            if message["event"] == "call.ended" {
                ended = Some(message);
                break;
            }
        }
        assert_eq!(
            ended.as_ref().map(|e| &e["reason"]),
            Some(&json!("relay-stopped")),
            "the controller hears of the end: {ended:?}\n{}",
            relayd.log()
        );
        let app_heard = tokio::task::spawn_blocking(move || app.join().unwrap())
            .await
            .unwrap();
        let app_heard = app_heard.unwrap_or_default();
        assert_eq!(
            (&app_heard["event"], &app_heard["reason"]),
            (&json!("call.ended"), &json!("relay-stopped")),
            "{app_heard}"
        );
        echo.abort();
    });
    // No flow of the call stays pinned: the next relayd adopts nothing.
    let next = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    assert_eq!(
        next.ctl_json(&["flow", "list"])["flows"],
        json!([]),
        "{}",
        next.log()
    );
}

#[test]
fn after_a_crash_with_calls_relayd_starts_again_and_clears_their_flows() {
    require_root();
    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&calls_config(&pins.path, "acme", API_KEY, ""));
    let mut relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let echo_socket = lab.pbx.udp_socket(PBX_RTP.parse().unwrap());
    runtime().block_on(async {
        let echo = tokio::spawn(rtp_echo(echo_socket));
        let (controller, app) = connected_call(&lab, &relayd).await;
        relayd.kill();
        drop(controller);
        let _ = tokio::task::spawn_blocking(move || app.join()).await;
        echo.abort();
    });
    // The killed relayd's call flows are pinned; the next one adopts them, then removes
    // them before taking the ICE port they had bound.
    let next = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    assert!(
        next.log()
            .contains("removing the flows of calls an earlier relayd did not end"),
        "{}",
        next.log()
    );
    assert_eq!(next.ctl_json(&["flow", "list"])["flows"], json!([]));
    assert_eq!(next.ctl_json(&["status"])["calls"], 0);
    // And it takes calls again.
    let echo_socket = lab.pbx.udp_socket(PBX_RTP.parse().unwrap());
    runtime().block_on(async {
        let echo = tokio::spawn(rtp_echo(echo_socket));
        let (_controller, app) = connected_call(&lab, &next).await;
        drop(next);
        let _ = tokio::task::spawn_blocking(move || app.join()).await;
        echo.abort();
    });
}
