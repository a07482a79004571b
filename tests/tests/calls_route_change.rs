//! A route change mid-call, as when a phone leaves Wi-Fi for cellular: the app's network
//! goes away, it comes back from another address (another NAT mapping) and restarts ICE
//! with `call.update`; the relay re-selects, replaces the call's flows, and the media goes
//! on in XDP. The gap (from the old network's loss to the first RTP packet back on the new
//! one) is measured and printed. Both ICE roles: the PBX's call (the relay controls ICE)
//! and the app's call (the app does).

use std::{
    sync::mpsc,
    time::{Duration, Instant},
};

use relay_tests::{
    app::{App, talk},
    config_file::ConfigFile,
    lab::{EdgeLab, calls_config},
    netns::{PinDir, enter_by_name},
    pbx::rtp_echo,
    relayd::Relayd,
    require_root, runtime,
    signalling_client::{Socket, call, mint_token, receive_within, until_message},
};
use serde_json::{Value, json};

const API_KEY: &str = "acme-api-key-0123456789";
const PBX_RTP: &str = relay_tests::pbx::RTP;
const PBX_SDP: &str = relay_tests::pbx::SDP;

/// Packets at 50 per second before the move (1 s) and after it (2 s).
const BEFORE: u32 = 50;
const AFTER: u32 = 100;

/// What the app measured.
struct Moved {
    before: u32,
    after: u32,
    /// From the old network's loss to the first packet back on the new one.
    gap: Duration,
    /// Of which the ICE restart (call.update, checks, the relay's route-changed).
    restart: Duration,
}

/// The app: connects, takes or places the call, talks, moves, talks again.
async fn app(
    token: String,
    fingerprint: String,
    app_calls: bool,
    ready: mpsc::Sender<()>,
) -> (App, Value, Moved) {
    let mut app = App::in_edge_lab(&fingerprint, &token).await;
    ready.send(()).unwrap();
    let (call_id, media) = if app_calls {
        app.call_out().await
    } else {
        let incoming = app.next().await;
        let media = app.answer(&incoming).await;
        (incoming["call"].clone(), media)
    };
    let before = talk(&media, 0, BEFORE).await.echoed;
    // The Wi-Fi network is gone: its agent with it.
    app.close_agents().await;
    let moved = Instant::now();
    let media = app
        .restart(&call_id, EdgeLab::APP_SECOND.parse().unwrap(), app_calls)
        .await;
    let restart = moved.elapsed();
    let talked = talk(&media, 1000, AFTER).await;
    let gap = talked.first_echo.map_or(Duration::MAX, |at| at - moved);
    (
        app,
        call_id,
        Moved {
            before,
            after: talked.echoed,
            gap,
            restart,
        },
    )
}

/// Events to the controller until one says `state`.
async fn until_state(controller: &mut Socket, state: &str) -> Value {
    until_message(controller, Duration::from_secs(15), 10, state, |event| {
        event["state"] == state
    })
    .await
}

fn route_change(app_calls: bool) {
    require_root();
    let lab = EdgeLab::new();
    lab.second_network();
    let pins = PinDir::new();
    let config = ConfigFile::new(&calls_config(&pins.path, "acme", API_KEY, ""));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let fingerprint = relayd.signalling_fingerprint();
    let echo_socket = lab.pbx.udp_socket(PBX_RTP.parse().unwrap());
    runtime().block_on(async {
        let echo = tokio::spawn(rtp_echo(echo_socket));
        let mut controller = lab.controller(&fingerprint, "acme", API_KEY).await;
        let token = mint_token(&mut controller, "alice", 300).await;
        let (ready_tx, ready) = mpsc::channel();
        let app_ns = lab.app.name.clone();
        let app_thread = std::thread::spawn(move || {
            enter_by_name(&app_ns);
            let (app, call_id, moved) =
                runtime().block_on(app(token, fingerprint, app_calls, ready_tx));
            // The app's session closes with the thread's runtime: hang up from here.
            (call_id, moved, app)
        });
        tokio::task::spawn_blocking(move || ready.recv().unwrap())
            .await
            .unwrap();
        if app_calls {
            let incoming = receive_within(&mut controller, Duration::from_secs(10))
                .await
                .unwrap();
            assert_eq!(incoming["event"], "call.incoming", "{incoming}");
            let answered = call(
                &mut controller,
                json!({"type": "call.answer", "id": 2, "call": incoming["call"], "sdp": PBX_SDP}),
            )
            .await;
            assert_eq!(answered["type"], "result", "{answered}");
        } else {
            let created = call(
                &mut controller,
                json!({"type": "call.create", "id": 2, "user": "alice", "sdp": PBX_SDP}),
            )
            .await;
            assert_eq!(created["type"], "result", "{created}");
        }
        let connected = until_state(&mut controller, "connected").await;
        assert!(
            connected["remote"].as_str().unwrap().starts_with("198.51.100.2:"),
            "{connected}"
        );
        until_state(&mut controller, "ice-restart").await;
        let changed = until_state(&mut controller, "route-changed").await;
        assert!(
            changed["remote"].as_str().unwrap().starts_with("198.51.100.3:"),
            "the relay sees the app's new address: {changed}"
        );
        let (call_id, moved, app) = tokio::task::spawn_blocking(move || app_thread.join().unwrap())
            .await
            .unwrap();
        println!(
            "route change ({}): media gap {} ms, of which the ICE restart {} ms; {} of {} packets back before, {} of {} after",
            if app_calls { "the app's call" } else { "the PBX's call" },
            moved.gap.as_millis(),
            moved.restart.as_millis(),
            moved.before,
            BEFORE,
            moved.after,
            AFTER,
        );
        assert_eq!(moved.before, BEFORE, "{}", relayd.log());
        assert_eq!(moved.after, AFTER, "media continues after the move\n{}", relayd.log());
        assert!(
            moved.gap < Duration::from_secs(5),
            "the media came back on the new route within seconds: {} ms",
            moved.gap.as_millis()
        );

        // The call's flows were replaced: the app's new address, the media in XDP.
        let listed = relayd.ctl_json(&["calls", "list"]);
        assert!(
            listed["calls"][0]["app"].as_str().unwrap().starts_with("198.51.100.3:"),
            "{listed}"
        );
        let flows = relayd.ctl_json(&["flow", "list"]);
        let flows = flows["flows"].as_array().unwrap().clone();
        assert_eq!(flows.len(), 2, "{flows:?}");
        for flow in &flows {
            let text = flow.to_string();
            assert!(text.contains("198.51.100.3:"), "{flow}");
            assert!(!text.contains("198.51.100.2:"), "the old route's flow is gone: {flow}");
            assert!(
                flow["counters"]["xdp_packets"].as_u64().unwrap() >= u64::from(AFTER) - 10,
                "the kernel carries the media on the new route: {flow}\n{}",
                relayd.log()
            );
        }

        let result = call(
            &mut controller,
            json!({"type": "call.hangup", "id": 5, "call": call_id}),
        )
        .await;
        assert_eq!(result["type"], "result", "{result}");
        drop(app);
        let flows = relayd.ctl_json(&["flow", "list"]);
        assert_eq!(flows["flows"].as_array().unwrap().len(), 0, "{flows}");
        echo.abort();
    });
}

#[test]
fn the_app_moves_networks_during_a_pbx_call_and_the_media_follows_in_xdp() {
    route_change(false);
}

#[test]
fn the_app_moves_networks_during_its_own_call_and_the_media_follows_in_xdp() {
    route_change(true);
}
