//! relayd stopping or dying with calls in progress. Without a state store: stopped, every
//! call ends (`relay-stopped`), both sides hear it, no flow is left; killed, the next relayd
//! finds the calls' flows adopted from the pinned table on its ICE and LAN ports, removes
//! them (nobody could end those calls), and starts and takes calls again. With a state
//! store, stopped or killed, the next relayd takes the calls back and their media never
//! stops.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::Duration,
};

use dtls::crypto::Certificate;
use relay_tests::{
    app::{App, talk},
    config_file::ConfigFile,
    dtls_app::{
        dtls_answer, dtls_pbx_echo, fingerprint as dtls_fingerprint, handshake_both_ways, talk_srtp,
    },
    lab::{EdgeLab, anchor_config, calls_config},
    netns::{PinDir, enter_by_name},
    pbx::rtp_echo,
    recv_async,
    relayd::{Relayd, StateFile},
    require_root, runtime,
    signalling_client::{Socket, mint_token, receive_within, request, until_message},
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

fn start_with_store(lab: &EdgeLab, config: &ConfigFile, state: &StateFile) -> Relayd {
    Relayd::start_with_state(&lab.relay.name, &["--config", config.path()], &state.0)
}

/// The PBX's end: echoes every RTP packet and counts them.
async fn counting_echo(socket: std::net::UdpSocket, received: Arc<AtomicU32>) {
    socket.set_nonblocking(true).unwrap();
    let socket = tokio::net::UdpSocket::from_std(socket).unwrap();
    let mut buf = vec![0u8; 2048];
    while let Ok((n, from)) = socket.recv_from(&mut buf).await {
        received.fetch_add(1, Ordering::Relaxed);
        let _ = socket.send_to(&buf[..n], from).await;
    }
}

/// What the app saw: echoes of the stretch across the restart and of the one after it,
/// and the first event on a session it opened after the restart.
struct AppSide {
    across: u32,
    after: u32,
    restored: Value,
}

/// The signalling session ended with the old relayd: the app signs in again and hears
/// what the new relayd says first (its `call.state restored`).
async fn signed_in_again(app: App, fingerprint: &str, token: &str) -> Value {
    let mut again = App::in_edge_lab(fingerprint, token).await;
    let restored = receive_within(&mut again.signalling, Duration::from_secs(5))
        .await
        .unwrap_or_default();
    app.close().await;
    again.close().await;
    restored
}

/// The controller comes back to the new relayd and hears first that `call` was restored.
async fn controller_back(lab: &EdgeLab, relayd: &Relayd, call: &Value) -> Socket {
    let mut controller = lab
        .controller(&relayd.signalling_fingerprint(), "acme", API_KEY)
        .await;
    let restored = receive_within(&mut controller, Duration::from_secs(5))
        .await
        .unwrap_or_default();
    assert_eq!(
        (&restored["event"], &restored["state"], &restored["call"]),
        (&json!("call.state"), &json!("restored"), call),
        "{restored}\n{}",
        relayd.log()
    );
    controller
}

/// alice's call from the PBX's `offer`; its id.
async fn create_call(controller: &mut Socket, offer: &str) -> Value {
    let created = request(
        controller,
        json!({"type": "call.create", "id": 2, "user": "alice", "sdp": offer}),
    )
    .await;
    assert_eq!(created["type"], "result", "{created}");
    created["call"].clone()
}

/// Packets the app sends while relayd restarts (3 s at 50/s), and after it: 8 s, longer
/// than the 5 s in which the relay stops media toward an app whose consent it lost.
const ACROSS: u32 = 150;
const AFTER: u32 = 400;

/// A connected call (pass-through, media in XDP) survives a restart of relayd: `kill`
/// with SIGKILL (the store was written within a second of the call connecting), else
/// stopped with SIGTERM as systemd does. Its flows stay pinned and are taken back, the PBX
/// gets every packet, consent goes on with the same credentials, both sides hear
/// `call.state restored` when they come back, and the call can be hung up as before.
fn restart_keeps_the_call(kill: bool) {
    require_root();
    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let state = StateFile::new("calls-state-");
    let config = ConfigFile::new(&calls_config(&pins.path, "acme", API_KEY, ""));
    let mut relayd = start_with_store(&lab, &config, &state);
    let at_pbx = Arc::new(AtomicU32::new(0));
    let echo_socket = lab.pbx.udp_socket(PBX_RTP.parse().unwrap());
    runtime().block_on(async {
        let echo = tokio::spawn(counting_echo(echo_socket, at_pbx.clone()));
        let fingerprint = relayd.signalling_fingerprint();
        let mut controller = lab.controller(&fingerprint, "acme", API_KEY).await;
        let token = mint_token(&mut controller, "alice", 300).await;
        let (connected_tx, connected) = mpsc::channel();
        let app_ns = lab.app.name.clone();
        let app = std::thread::spawn(move || {
            enter_by_name(&app_ns);
            runtime().block_on(async move {
                let mut app = App::in_edge_lab(&fingerprint, &token).await;
                connected_tx.send(()).unwrap();
                let incoming = app.next_within(Duration::from_secs(10)).await;
                let media = app.answer(&incoming).await;
                connected_tx.send(()).unwrap();
                let across = talk(&media, 0, ACROSS).await.echoed;
                let after = talk(&media, ACROSS, AFTER).await.echoed;
                AppSide {
                    across,
                    after,
                    restored: signed_in_again(app, &fingerprint, &token).await,
                }
            })
        });
        let (_, connected) = recv_async(connected).await;
        let call = create_call(&mut controller, PBX_OFFER).await;
        let (_, _connected) = recv_async(connected).await;
        let flows_before = relayd.ctl_json(&["flow", "list"])["flows"].clone();
        assert_eq!(flows_before.as_array().unwrap().len(), 2, "{}", relayd.log());
        // The store is written within a second of the call connecting.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let old_log = if kill {
            relayd.kill();
            relayd.log()
        } else {
            assert!(relayd.stop(), "relayd stops cleanly:\n{}", relayd.log());
            let log = relayd.log();
            assert!(
                log.contains("the connected calls are kept in the state store"),
                "{log}"
            );
            log
        };
        drop(controller);
        let started = std::time::Instant::now();
        relayd = start_with_store(&lab, &config, &state);
        let restart = started.elapsed();
        assert!(
            relayd.log().contains("call restored from the state store"),
            "before:\n{old_log}\nafter:\n{}",
            relayd.log()
        );
        // ICE passwords are in the store: the owner's only, as the TURN secrets are.
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&state.0).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let calls = relayd.ctl_json(&["calls", "list"]);
        assert_eq!(calls["calls"][0]["call"], call, "{calls}\n{}", relayd.log());
        assert_eq!(calls["calls"][0]["state"], "connected", "{calls}");
        let flows_after = relayd.ctl_json(&["flow", "list"])["flows"].clone();
        let ids = |flows: &Value| -> Vec<Value> {
            flows
                .as_array()
                .unwrap()
                .iter()
                .map(|flow| flow["id"].clone())
                .collect()
        };
        assert_eq!(ids(&flows_after), ids(&flows_before), "{}", relayd.log());
        // The controller comes back and hears of it.
        let mut controller = controller_back(&lab, &relayd, &call).await;
        let app = tokio::task::spawn_blocking(move || app.join().unwrap())
            .await
            .unwrap();
        let to_pbx = at_pbx.load(Ordering::Relaxed);
        eprintln!(
            "{}: relayd back in {restart:?}; the PBX got {to_pbx} of {} packets, the app {} of {ACROSS} echoes across the restart and {} of {AFTER} after it",
            if kill { "killed" } else { "stopped" },
            ACROSS + AFTER,
            app.across,
            app.after
        );
        assert_eq!(
            (&app.restored["event"], &app.restored["state"]),
            (&json!("call.state"), &json!("restored")),
            "{}\n{}",
            app.restored,
            relayd.log()
        );
        // The media never left the kernel: nothing lost toward the PBX, and consent went
        // on after the restart (media toward the app would stop 5 s after it failed).
        assert_eq!(to_pbx, ACROSS + AFTER, "{}", relayd.log());
        assert!(app.across >= ACROSS * 98 / 100, "{}", relayd.log());
        assert!(app.after >= AFTER * 98 / 100, "{}", relayd.log());
        // And it ends as any call does.
        let hung_up = request(
            &mut controller,
            json!({"type": "call.hangup", "id": 3, "call": call}),
        )
        .await;
        assert_eq!(hung_up["type"], "result", "{hung_up}");
        assert_eq!(relayd.ctl_json(&["flow", "list"])["flows"], json!([]));
        echo.abort();
    });
}

#[test]
fn a_stopped_and_started_relayd_keeps_the_calls_and_their_media() {
    restart_keeps_the_call(false);
}

#[test]
fn a_killed_relayd_keeps_the_calls_and_their_media() {
    restart_keeps_the_call(true);
}

/// Numbers of the bridged call's packets: the app's SRTP sequence numbers (their low 16
/// bits) roll over 1.3 s into the stretch across the restart, after the call's first record
/// (within a second of connecting) and about when the kill comes (1.5 s): the next relayd
/// infers the rollover counter from the recorded index (RFC 3711 appendix A).
const BRIDGED_FIRST: u32 = 65_536 - 65;

/// A bridged call (DTLS-SRTP toward the app, plain RTP toward the PBX; the relay carries
/// every packet) survives relayd being killed: the store kept each leg's keys and how far
/// its packets went, the next relayd unprotects the app's SRTP and protects the PBX's
/// echoes with the same keys from there on, across a rollover of the sequence numbers
/// the store did not see; the DTLS certificate (the fingerprint the app checked) is the
/// same. Packets sent while no relayd ran are lost; counted. Both relayds carry the media
/// on their AF_XDP workers: the workers' restart with relayd loses only what came while
/// none ran.
#[test]
fn a_killed_relayd_keeps_a_bridged_call_and_its_keys() {
    killed_relayd_keeps_a_bridged_call(false);
}

/// The same with a PBX that speaks DTLS-SRTP too: both legs' DTLS keys are kept, the PBX's
/// association (with the relayd that was killed) is not needed again.
#[test]
fn a_killed_relayd_keeps_a_call_bridged_to_a_dtls_pbx() {
    killed_relayd_keeps_a_bridged_call(true);
}

fn killed_relayd_keeps_a_bridged_call(dtls_pbx: bool) {
    require_root();
    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let state = StateFile::new("bridged-state-");
    let config = ConfigFile::new(&anchor_config(&pins.path, "acme", API_KEY, ""));
    let mut relayd = start_with_store(&lab, &config, &state);
    let at_pbx = Arc::new(AtomicU32::new(0));
    let echo_socket = lab.pbx.udp_socket(PBX_RTP.parse().unwrap());
    let pbx_certificate = Certificate::generate_self_signed(vec!["pbx".to_owned()]).unwrap();
    let pbx_offer = if dtls_pbx {
        relay_tests::pbx::dtls_sdp(&dtls_fingerprint(pbx_certificate.certificate[0].as_ref()))
    } else {
        PBX_OFFER.to_owned()
    };
    runtime().block_on(async {
        let mut echo_socket = Some(echo_socket);
        let mut echo = (!dtls_pbx).then(|| {
            tokio::spawn(counting_echo(echo_socket.take().unwrap(), at_pbx.clone()))
        });
        let fingerprint = relayd.signalling_fingerprint();
        let mut controller = lab.controller(&fingerprint, "acme", API_KEY).await;
        let token = mint_token(&mut controller, "alice", 300).await;
        let (connected_tx, connected) = mpsc::channel();
        let app_ns = lab.app.name.clone();
        let app = std::thread::spawn(move || {
            enter_by_name(&app_ns);
            runtime().block_on(async move {
                let mut app = App::in_edge_lab(&fingerprint, &token).await;
                connected_tx.send(String::new()).unwrap();
                let incoming = app.next_within(Duration::from_secs(10)).await;
                let relay_fingerprint = incoming["sdp"]
                    .as_str()
                    .unwrap()
                    .split("\r\n")
                    .find_map(|line| line.strip_prefix("a=fingerprint:"))
                    .unwrap()
                    .to_owned();
                let certificate = Certificate::generate_self_signed(vec!["app".to_owned()]).unwrap();
                let own = dtls_fingerprint(certificate.certificate[0].as_ref());
                let media = app
                    .answer_edited(&incoming, |answer| dtls_answer(answer, &own), None)
                    .await;
                let mut srtp = handshake_both_ways(media.clone(), certificate)
                    .await
                    .expect("the relay completes the handshake");
                connected_tx.send(relay_fingerprint).unwrap();
                let across = talk_srtp(&media, &mut srtp, BRIDGED_FIRST, ACROSS).await;
                let after = talk_srtp(&media, &mut srtp, BRIDGED_FIRST + ACROSS, AFTER).await;
                AppSide {
                    across,
                    after,
                    restored: signed_in_again(app, &fingerprint, &token).await,
                }
            })
        });
        let (_, connected) = recv_async(connected).await;
        let call = create_call(&mut controller, &pbx_offer).await;
        if let Some(socket) = echo_socket {
            // The PBX's end of DTLS: the server toward the relay's LAN port.
            let answered = until_message(&mut controller, Duration::from_secs(20), 20, "call.answered", |event: &Value| {
                event["event"] == "call.answered"
            })
            .await;
            let relay_lan = answered["sdp"]
                .as_str()
                .unwrap()
                .split("\r\n")
                .find_map(|line| line.strip_prefix("m=audio "))
                .and_then(|rest| rest.split(' ').next())
                .unwrap()
                .to_owned();
            let relay_lan = format!("10.30.0.1:{relay_lan}").parse().unwrap();
            let (_, task) = dtls_pbx_echo(socket, relay_lan, pbx_certificate, false, at_pbx.clone())
                .await
                .unwrap_or_else(|err| panic!("the PBX's handshake: {err}\n{}", relayd.log()));
            echo = Some(task);
        }
        let (relay_fingerprint, _connected) = recv_async(connected).await;
        let pbx_dtls = if dtls_pbx { "connected" } else { "-" };
        let shown = relayd.ctl_json_until(
            &["calls", "show", &call.to_string()],
            Duration::from_secs(2),
            |shown| shown["bridged"]["dtls"] == "connected" && shown["bridged"]["pbx_dtls"] == pbx_dtls,
        );
        assert_eq!(
            (&shown["bridged"]["dtls"], &shown["bridged"]["pbx_dtls"]),
            (&json!("connected"), &json!(pbx_dtls)),
            "{shown}"
        );
        // Written within a second of the call connecting; the rollover comes after it.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        relayd.kill();
        let old_log = relayd.log();
        drop(controller);
        let started = std::time::Instant::now();
        relayd = start_with_store(&lab, &config, &state);
        let restart = started.elapsed();
        assert!(
            relayd.log().contains("call restored from the state store"),
            "before:\n{old_log}\nafter:\n{}",
            relayd.log()
        );
        assert!(
            relayd.log().contains(&relay_fingerprint),
            "the same DTLS certificate ({relay_fingerprint}):\n{}",
            relayd.log()
        );
        let calls = relayd.ctl_json(&["calls", "list"]);
        assert_eq!(calls["calls"][0]["call"], call, "{calls}\n{}", relayd.log());
        assert_eq!(calls["calls"][0]["state"], "connected", "{calls}");
        let mut controller = controller_back(&lab, &relayd, &call).await;
        let app = tokio::task::spawn_blocking(move || app.join().unwrap())
            .await
            .unwrap();
        let to_pbx = at_pbx.load(Ordering::Relaxed);
        let shown = relayd.ctl_json(&["calls", "show", &call.to_string()]);
        eprintln!(
            "bridged (DTLS PBX: {dtls_pbx}), killed: relayd back in {restart:?}; the PBX got {to_pbx} of {} packets, the app {} of {ACROSS} echoes across the restart and {} of {AFTER} after it; after the restart: {}",
            ACROSS + AFTER,
            app.across,
            app.after,
            shown["bridged"]
        );
        assert_eq!(
            (&app.restored["event"], &app.restored["state"]),
            (&json!("call.state"), &json!("restored")),
            "{}\n{}",
            app.restored,
            relayd.log()
        );
        // Only what was sent while no relayd ran is lost: the restart takes well under
        // the 3 s of the stretch across it. After it, every packet both ways: the keys and
        // rollover counters went on (a wrong rollover counter fails every tag).
        assert!(app.across >= ACROSS / 2, "{}", relayd.log());
        assert!(app.after >= AFTER * 98 / 100, "{}", relayd.log());
        assert!(to_pbx >= app.across + app.after, "{}", relayd.log());
        assert_eq!(shown["bridged"]["auth_failures"], 0, "{shown}");
        // The new relayd's AF_XDP workers carried what came after (both directions): the
        // flows steered to the old one's went at start, the restored call was steered anew.
        let status = relayd.ctl_json(&["status"]);
        let workers = &status["datapath"]["transcrypt"]["counters"];
        assert!(
            workers["sent"].as_u64().unwrap() >= 2 * u64::from(app.after),
            "{status}\n{}",
            relayd.log()
        );
        assert_eq!(workers["refused"], 0, "{status}");
        // Keys are in the store, never in the log.
        let store = std::fs::read(&state.0).unwrap();
        assert!(!store.is_empty());
        assert!(!relayd.log().contains("inline:"), "{}", relayd.log());
        let hung_up = request(
            &mut controller,
            json!({"type": "call.hangup", "id": 3, "call": call}),
        )
        .await;
        assert_eq!(hung_up["type"], "result", "{hung_up}");
        echo.into_iter().for_each(|echo| echo.abort());
    });
}
