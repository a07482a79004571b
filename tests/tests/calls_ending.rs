//! Calls that end without a hangup: no media for `calls.media_timeout_secs` (read from the
//! flows' kernel counters), and lost ICE consent (RFC 7675: the app stops answering the
//! relay's checks; media toward it stops at once, the call ends when consent expires).
//! Either way both sides are told why and every flow of the call is gone.

use std::{sync::mpsc, time::Duration};

use relay_tests::{
    app::App,
    config_file::ConfigFile,
    lab::{EdgeLab, calls_config},
    netns::{PinDir, enter_by_name},
    relayd::Relayd,
    require_root, runtime,
    signalling_client::{Socket, call, mint_token, receive_within},
    traffic::numbered,
};
use serde_json::{Value, json};

const API_KEY: &str = "acme-api-key-0123456789";
const PBX_RTP: &str = relay_tests::pbx::RTP;
const PBX_OFFER: &str = "v=0\r\no=PBX 1 1 IN IP4 10.30.0.2\r\ns=PBX\r\nc=IN IP4 10.30.0.2\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n";

/// How the app ends its part.
#[derive(Clone, Copy)]
enum AppEnds {
    /// Stops sending media, keeps answering consent checks.
    Silence,
    /// Closes its ICE agent: no more consent.
    Vanish,
}

/// A call that connects and carries some media, then ends the way `ends` says; returns
/// what the controller and the app were told, and the relay's flow and call lists after.
fn call_that_ends(ends: AppEnds, timeouts: &str) -> (Vec<Value>, Value, Value, String) {
    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&calls_config(&pins.path, "acme", API_KEY, timeouts));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let fingerprint = relayd.signalling_fingerprint();
    let echo = lab.pbx.udp_socket(PBX_RTP.parse().unwrap());
    std::thread::spawn(move || {
        echo.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let main = runtime();
    let (told_controller, told_app) = main.block_on(async {
        let mut controller: Socket = lab.controller(&fingerprint, "acme", API_KEY).await;
        let token = mint_token(&mut controller, "alice", 300).await;
        let (ready_tx, ready) = mpsc::channel();
        let app_ns = lab.app.name.clone();
        let app = std::thread::spawn(move || {
            enter_by_name(&app_ns);
            runtime().block_on(async move {
                let mut app = App::in_edge_lab(&fingerprint, &token).await;
                ready_tx.send(()).unwrap();
                let incoming = app.next().await;
                let media = app.answer(&incoming).await;
                for sequence in 0..50 {
                    media.send(&numbered(sequence)).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if let AppEnds::Vanish = ends {
                    // No more consent answers.
                    app.close_agents().await;
                }
                let ended = app.next_within(Duration::from_secs(20)).await;
                app.close().await;
                ended
            })
        });
        tokio::task::spawn_blocking(move || ready.recv().unwrap())
            .await
            .unwrap();
        let created = call(
            &mut controller,
            json!({"type": "call.create", "id": 2, "user": "alice", "sdp": PBX_OFFER}),
        )
        .await;
        assert_eq!(created["type"], "result", "{created}");
        let mut told = Vec::new();
        loop {
            let event = receive_within(&mut controller, Duration::from_secs(20))
                .await
                .expect("the session stays");
            let last = event["event"] == "call.ended";
            told.push(event);
            if last {
                break;
            }
        }
        let told_app = tokio::task::spawn_blocking(move || app.join().unwrap())
            .await
            .unwrap();
        (told, told_app)
    });
    let flows = relayd.ctl_json(&["flow", "list"]);
    let calls = relayd.ctl_json(&["calls", "list"]);
    (
        told_controller,
        told_app,
        json!({"flows": flows, "calls": calls}),
        relayd.log(),
    )
}

fn states(events: &[Value]) -> Vec<String> {
    events
        .iter()
        // The periodic traffic reports are not states.
        .filter(|e| e["event"] != "call.stats")
        .map(|e| {
            format!(
                "{} {}",
                e["event"].as_str().unwrap_or(""),
                e["state"].as_str().or(e["reason"].as_str()).unwrap_or("")
            )
        })
        .collect()
}

#[test]
fn a_call_without_media_ends_by_the_media_timeout() {
    require_root();
    let (controller, app, after, log) = call_that_ends(AppEnds::Silence, "media_timeout_secs = 3");
    assert_eq!(
        states(&controller),
        [
            "call.answered ",
            "call.state checking",
            "call.state connected",
            "call.ended media-timeout"
        ],
        "{log}"
    );
    assert_eq!(
        (&app["event"], &app["reason"]),
        (&json!("call.ended"), &json!("media-timeout"))
    );
    assert_eq!(after["flows"]["flows"], json!([]), "{after}");
    assert_eq!(after["calls"]["calls"], json!([]), "{after}");
}

#[test]
fn a_call_whose_app_stops_answering_consent_ends() {
    require_root();
    let (controller, _, after, log) = call_that_ends(
        AppEnds::Vanish,
        "consent_timeout_secs = 7\nmedia_timeout_secs = 60",
    );
    assert_eq!(
        states(&controller),
        [
            "call.answered ",
            "call.state checking",
            "call.state connected",
            "call.state consent-lost",
            "call.ended consent-lost"
        ],
        "{log}"
    );
    assert_eq!(after["flows"]["flows"], json!([]), "{after}");
    assert_eq!(after["calls"]["calls"], json!([]), "{after}");
}

/// An app that keeps answering keeps its consent past `consent_timeout_secs` several times
/// over: the relay's checks (sent by the ICE port once the leg is connected, its agent
/// closed) are answered by the app's webrtc-ice agent, and the relay answers the agent's.
/// Without media the call still ends, by the media timeout, never by consent.
#[test]
fn an_app_that_answers_consent_keeps_its_call_past_the_consent_timeout() {
    require_root();
    let (controller, app, after, log) = call_that_ends(
        AppEnds::Silence,
        "consent_timeout_secs = 6\nmedia_timeout_secs = 15",
    );
    assert_eq!(
        states(&controller),
        [
            "call.answered ",
            "call.state checking",
            "call.state connected",
            "call.ended media-timeout"
        ],
        "{log}"
    );
    assert_eq!(
        (&app["event"], &app["reason"]),
        (&json!("call.ended"), &json!("media-timeout"))
    );
    assert_eq!(after["calls"]["calls"], json!([]), "{after}");
}
