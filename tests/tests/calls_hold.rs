//! A call on hold: silent both ways for longer than `flows.idle_timeout_secs` (here 2 s,
//! the media timeout 30 s). Its flows are the call's to end, so the flow table does not
//! expire them: when the app's media resumes it goes through XDP again at once, the call
//! still connected, and relayd forwards none of it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use relay_tests::{
    app::App,
    config_file::ConfigFile,
    lab::{EdgeLab, calls_config},
    netns::{PinDir, enter_by_name},
    relayd::Relayd,
    require_root, runtime,
    signalling_client::{mint_token, request, until_call_state},
    traffic::numbered,
};
use serde_json::{Value, json};

const API_KEY: &str = "acme-api-key-0123456789";

/// Kernel-forwarded packets of the flows in `relayctl flow list --json`.
fn xdp_packets(flows: &Value) -> u64 {
    flows["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|flow| flow["counters"]["xdp_packets"].as_u64().unwrap())
        .sum()
}

#[test]
fn a_call_on_hold_longer_than_the_flow_idle_timeout_keeps_its_flows() {
    require_root();
    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&calls_config(
        &pins.path,
        "acme",
        API_KEY,
        "media_timeout_secs = 30\n[flows]\nidle_timeout_secs = 2",
    ));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let echo_socket = lab.pbx.udp_socket(relay_tests::pbx::RTP.parse().unwrap());
    let at_pbx = Arc::new(AtomicU32::new(0));
    runtime().block_on(async {
        let echo = {
            let at_pbx = at_pbx.clone();
            echo_socket.set_nonblocking(true).unwrap();
            let socket = tokio::net::UdpSocket::from_std(echo_socket).unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                    at_pbx.fetch_add(1, Ordering::Relaxed);
                    let _ = socket.send_to(&buf[..n], from).await;
                }
            })
        };
        let fingerprint = relayd.signalling_fingerprint();
        let mut controller = lab.controller(&fingerprint, "acme", API_KEY).await;
        let token = mint_token(&mut controller, "alice", 300).await;
        let (signed_in, app_there) = tokio::sync::oneshot::channel();
        let (resume_tx, resume) = tokio::sync::oneshot::channel::<()>();
        let app_ns = lab.app.name.clone();
        let app = std::thread::spawn(move || {
            enter_by_name(&app_ns);
            runtime().block_on(async move {
                let mut app = App::in_edge_lab(&fingerprint, &token).await;
                signed_in.send(()).unwrap();
                let incoming = app.next_within(Duration::from_secs(10)).await;
                let media = app.answer(&incoming).await;
                let talk = |first: u32| {
                    let media = media.clone();
                    async move {
                        for number in first..first + 50 {
                            media.send(&numbered(number)).await.unwrap();
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                };
                talk(0).await;
                // On hold: nothing either way until the test says.
                resume.await.unwrap();
                talk(50).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                app.close().await;
            })
        });
        app_there.await.unwrap();
        let created = request(
            &mut controller,
            json!({"type": "call.create", "id": 2, "user": "alice", "sdp": relay_tests::pbx::SDP}),
        )
        .await;
        assert_eq!(created["type"], "result", "{created}");
        until_call_state(&mut controller, "connected").await;
        // The first 50 packets, then 4 s of silence: twice the flows' idle timeout.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let before = relayd.ctl_json(&["flow", "list"]);
        assert_eq!(before["flows"].as_array().unwrap().len(), 2, "{before}");
        tokio::time::sleep(Duration::from_secs(4)).await;
        let held = relayd.ctl_json(&["flow", "list"]);
        assert_eq!(
            held["flows"].as_array().unwrap().len(),
            2,
            "the call's flows stay while it is on hold: {held}\n{}",
            relayd.log()
        );
        assert_eq!(relayd.ctl_json(&["stats"])["flows_expired"], 0);
        resume_tx.send(()).unwrap();
        tokio::task::spawn_blocking(move || app.join().unwrap())
            .await
            .unwrap();
        let after = relayd.ctl_json(&["flow", "list"]);
        let resumed = xdp_packets(&after) - xdp_packets(&held);
        println!(
            "on hold 4 s with flows idle-expiring after 2 s: {resumed} packets in XDP after it, {} at the PBX",
            at_pbx.load(Ordering::Relaxed)
        );
        // 50 each way after the hold, in the kernel.
        assert!(resumed >= 98, "{resumed}: {after}\n{}", relayd.log());
        assert_eq!(at_pbx.load(Ordering::Relaxed), 100);
        let calls = relayd.ctl_json(&["calls", "list"]);
        assert_eq!(calls["calls"][0]["state"], "connected", "{calls}");
        echo.abort();
    });
}
