//! A PBX that speaks DTLS-SRTP, in the edge lab: it offers `UDP/TLS/RTP/SAVP` with its own
//! certificate (`a=setup:actpass`, as a WebRTC-capable PBX does toward a trunk); the app is
//! a WebRTC app (DTLS-SRTP over its ICE agent, the webrtc-rs `dtls` crate). The relay
//! terminates both: it answers the PBX `a=setup:active` with its own fingerprint and no
//! BUNDLE, runs the handshake toward the PBX's RTP address as the client and the app's as
//! the server, and transcrypts between the two sets of keys.
//!
//! The other direction with `calls.pbx_media = "dtls-srtp"`: the app calls a PBX that takes
//! only DTLS-SRTP; the relay offers it `actpass`, the PBX answers `active` and is the client.
//!
//! The PBX end is the `dtls` crate (server or client) on its RTP socket: it checks the relay's
//! certificate against the relay's SDP, unprotects every packet with its keys and echoes it
//! protected again; the app counts the echoes it can unprotect.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use dtls::crypto::Certificate;
use relay_tests::{
    app::App,
    config_file::ConfigFile,
    dtls_app::{
        dtls_answer, dtls_pbx_echo, fingerprint, handshake_as, handshake_both_ways, talk_srtp,
    },
    lab::{EdgeLab, anchor_config},
    netns::{PinDir, enter_by_name},
    relayd::Relayd,
    require_root, runtime,
    signalling_client::{mint_token, request, until_call_state, until_message},
};
use serde_json::{Value, json};

const API_KEY: &str = "acme-api-key-0123456789";
const PBX_RTP: &str = relay_tests::pbx::RTP;
/// Packets the app sends (50 per second).
const PACKETS: u32 = 150;

/// The edge lab with relayd on a configuration made for its pin directory (`extra` in
/// `[calls]`), and the PBX's RTP socket. Fields drop in order: relayd stops before its pins
/// and namespaces go.
struct Lab {
    relayd: Relayd,
    pbx_socket: std::net::UdpSocket,
    _config: ConfigFile,
    _pins: PinDir,
    lab: EdgeLab,
}

impl Lab {
    fn start(extra: &str) -> Lab {
        require_root();
        let lab = EdgeLab::new();
        let pins = PinDir::new();
        let config = ConfigFile::new(&anchor_config(&pins.path, "acme", API_KEY, extra));
        Lab {
            relayd: Relayd::start(Some(&lab.relay), &["--config", config.path()]),
            pbx_socket: lab.pbx.udp_socket(PBX_RTP.parse().unwrap()),
            _config: config,
            _pins: pins,
            lab,
        }
    }
}

/// The value of the first `a=<name>:` line of `sdp`.
fn attribute<'a>(sdp: &'a str, name: &str) -> Option<&'a str> {
    sdp.split("\r\n")
        .find_map(|line| line.strip_prefix(&format!("a={name}:")))
}

/// The relay's media address in its answer to the PBX (`c=` and `m=audio`).
fn media_address(sdp: &str) -> std::net::SocketAddr {
    let ip = sdp
        .split("\r\n")
        .find_map(|line| line.strip_prefix("c=IN IP4 "))
        .expect("c= line");
    let port = sdp
        .split("\r\n")
        .find_map(|line| line.strip_prefix("m=audio "))
        .and_then(|rest| rest.split(' ').next())
        .expect("m=audio line");
    format!("{ip}:{port}").parse().unwrap()
}

/// The WebRTC app, signed in when this returns: it answers the call it is offered with
/// DTLS-SRTP, completes its handshake and sends `packets` (counting the echoes); it
/// returns the relay's offer and the count. With `packets` 0 it only tries the handshake.
async fn dtls_app(
    lab: &EdgeLab,
    signalling: String,
    token: String,
    packets: u32,
) -> std::thread::JoinHandle<(String, u32)> {
    let app_ns = lab.app.name.clone();
    let (signed_in, app_there) = tokio::sync::oneshot::channel();
    let app = std::thread::spawn(move || {
        enter_by_name(&app_ns);
        runtime().block_on(async move {
            let mut app = App::in_edge_lab(&signalling, &token).await;
            signed_in.send(()).unwrap();
            let incoming = app.next_within(Duration::from_secs(10)).await;
            let offer = incoming["sdp"].as_str().unwrap().to_owned();
            let certificate = Certificate::generate_self_signed(vec!["app".to_owned()]).unwrap();
            let own = fingerprint(certificate.certificate[0].as_ref());
            let media = app
                .answer_edited(&incoming, |answer| dtls_answer(answer, &own), None)
                .await;
            let handshake = handshake_both_ways(media.clone(), certificate).await;
            let echoed = if packets == 0 {
                0
            } else {
                let mut srtp = handshake.expect("the relay completes the app's handshake");
                talk_srtp(&media, &mut srtp, 1, packets).await
            };
            app.close().await;
            (offer, echoed)
        })
    });
    app_there.await.unwrap();
    app
}

/// The PBX calls alice with its DTLS offer naming `pbx_fingerprint`: the call, and the
/// relay's answer once the app answered.
async fn pbx_calls(
    controller: &mut relay_tests::signalling_client::Socket,
    pbx_fingerprint: &str,
    relayd: &Relayd,
) -> (Value, String) {
    let created = request(
        controller,
        json!({"type": "call.create", "id": 2, "user": "alice", "sdp": relay_tests::pbx::dtls_sdp(pbx_fingerprint)}),
    )
    .await;
    assert_eq!(created["type"], "result", "{created}\n{}", relayd.log());
    let answered = until_message(
        controller,
        Duration::from_secs(20),
        20,
        "call.answered",
        |event: &Value| event["event"] == "call.answered",
    )
    .await;
    (
        created["call"].clone(),
        answered["sdp"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn a_dtls_pbx_and_a_webrtc_app_are_bridged_each_with_its_own_keys() {
    let Lab {
        relayd,
        pbx_socket,
        lab,
        ..
    } = &Lab::start("");
    let pbx_socket = pbx_socket.try_clone().unwrap();
    let pbx_certificate = Certificate::generate_self_signed(vec!["pbx".to_owned()]).unwrap();
    let pbx_fingerprint = fingerprint(pbx_certificate.certificate[0].as_ref());
    runtime().block_on(async {
        let signalling = relayd.signalling_fingerprint();
        let mut controller = lab.controller(&signalling, "acme", API_KEY).await;
        let token = mint_token(&mut controller, "alice", 300).await;
        let app = dtls_app(lab, signalling, token, PACKETS).await;
        let (call, answer) = pbx_calls(&mut controller, &pbx_fingerprint, relayd).await;
        assert!(answer.contains(" UDP/TLS/RTP/SAVP "), "{answer}");
        assert_eq!(attribute(&answer, "setup"), Some("active"), "{answer}");
        assert!(answer.contains("a=rtcp-mux\r\n"), "{answer}");
        assert!(
            attribute(&answer, "group").is_none(),
            "no BUNDLE toward the PBX: {answer}"
        );
        assert!(attribute(&answer, "crypto").is_none(), "{answer}");
        let relay_fingerprint = attribute(&answer, "fingerprint")
            .expect("the relay's fingerprint")
            .to_owned();
        assert_ne!(relay_fingerprint, pbx_fingerprint);

        // The PBX: the DTLS server on its RTP socket, toward the relay's LAN port.
        let at_pbx = Arc::new(AtomicU32::new(0));
        let relay_lan = media_address(&answer);
        let (relay, echo) = dtls_pbx_echo(
            pbx_socket,
            relay_lan,
            pbx_certificate,
            false,
            at_pbx.clone(),
        )
        .await
        .unwrap_or_else(|err| {
            panic!(
                "the relay's handshake toward the PBX: {err}\n{}",
                relayd.log()
            )
        });
        assert_eq!(
            relay, relay_fingerprint,
            "the relay's certificate is the one its SDP names"
        );
        let connected = until_call_state(&mut controller, "connected").await;
        assert_eq!(
            (&connected["app_security"], &connected["pbx_security"]),
            (&json!("dtls-srtp"), &json!("dtls-srtp")),
            "{connected}"
        );
        let shown = relayd.ctl_json(&["calls", "show", &call.to_string()]);
        assert_eq!(
            (&shown["bridged"]["dtls"], &shown["bridged"]["pbx_dtls"]),
            (&json!("connected"), &json!("connected")),
            "{shown}"
        );
        let (offer, echoed) = tokio::task::spawn_blocking(move || app.join().unwrap())
            .await
            .unwrap();
        assert!(
            offer.contains(" UDP/TLS/RTP/SAVPF "),
            "DTLS toward the app: {offer}"
        );
        assert_eq!(
            attribute(&offer, "fingerprint"),
            Some(relay_fingerprint.as_str())
        );
        let at_pbx = at_pbx.load(Ordering::Relaxed);
        println!("PBX unprotected {at_pbx} of {PACKETS}; the app unprotected {echoed} echoes");
        assert!(
            at_pbx >= PACKETS - 2,
            "at the PBX: {at_pbx}\n{}",
            relayd.log()
        );
        assert!(echoed >= PACKETS - 4, "echoed: {echoed}\n{}", relayd.log());
        let shown = relayd.ctl_json(&["calls", "show", &call.to_string()]);
        assert_eq!(shown["bridged"]["auth_failures"], 0, "{shown}");
        let hung_up = request(
            &mut controller,
            json!({"type": "call.hangup", "id": 3, "call": call}),
        )
        .await;
        assert_eq!(hung_up["type"], "result", "{hung_up}");
        echo.abort();
    });
}

/// A PBX whose certificate is not the one its SDP names: the relay's handshake toward it
/// fails the fingerprint check and the call ends `dtls-failed`, its flows and ports gone.
#[test]
fn a_dtls_pbx_with_another_certificate_ends_the_call() {
    let Lab {
        relayd,
        pbx_socket,
        lab,
        ..
    } = &Lab::start("");
    let pbx_socket = pbx_socket.try_clone().unwrap();
    let named = Certificate::generate_self_signed(vec!["pbx".to_owned()]).unwrap();
    let used = Certificate::generate_self_signed(vec!["pbx".to_owned()]).unwrap();
    runtime().block_on(async {
        let signalling = relayd.signalling_fingerprint();
        let mut controller = lab.controller(&signalling, "acme", API_KEY).await;
        let token = mint_token(&mut controller, "alice", 300).await;
        let app = dtls_app(lab, signalling, token, 0).await;
        let (call, answer) = pbx_calls(
            &mut controller,
            &fingerprint(named.certificate[0].as_ref()),
            relayd,
        )
        .await;
        pbx_socket.set_nonblocking(true).unwrap();
        let socket = Arc::new(tokio::net::UdpSocket::from_std(pbx_socket).unwrap());
        socket.connect(media_address(&answer)).await.unwrap();
        // The handshake itself may finish on the PBX's side: the relay checks after it.
        let pbx = tokio::spawn(handshake_as(socket, used, false));
        let ended = until_message(
            &mut controller,
            Duration::from_secs(20),
            20,
            "call.ended",
            |event: &Value| event["event"] == "call.ended",
        )
        .await;
        assert_eq!(
            (&ended["call"], &ended["reason"]),
            (&call, &json!("dtls-failed")),
            "{ended}\n{}",
            relayd.log()
        );
        assert!(
            relayd.log().contains("DTLS with the PBX failed"),
            "{}",
            relayd.log()
        );
        assert_eq!(relayd.ctl_json(&["flow", "list"])["flows"], json!([]));
        assert_eq!(relayd.ctl_json(&["calls", "list"])["calls"], json!([]));
        pbx.abort();
        tokio::task::spawn_blocking(move || app.join().unwrap())
            .await
            .unwrap();
    });
}

/// The app calls out with DTLS-SRTP and `pbx_media = "dtls-srtp"`: the PBX gets an offer with
/// the relay's certificate, `a=setup:actpass` and no BUNDLE, answers `a=setup:active` and
/// starts the handshake as the client; media is transcrypted both ways.
#[test]
fn an_app_calls_a_pbx_that_takes_only_dtls() {
    let Lab {
        relayd,
        pbx_socket,
        lab,
        ..
    } = &Lab::start("pbx_media = \"dtls-srtp\"");
    let pbx_socket = pbx_socket.try_clone().unwrap();
    let pbx_certificate = Certificate::generate_self_signed(vec!["pbx".to_owned()]).unwrap();
    let pbx_fingerprint = fingerprint(pbx_certificate.certificate[0].as_ref());
    runtime().block_on(async {
        let signalling = relayd.signalling_fingerprint();
        let mut controller = lab.controller(&signalling, "acme", API_KEY).await;
        let token = mint_token(&mut controller, "alice", 300).await;
        let app_ns = lab.app.name.clone();
        let app = std::thread::spawn(move || {
            enter_by_name(&app_ns);
            runtime().block_on(async move {
                let mut app = App::in_edge_lab(&signalling, &token).await;
                let certificate =
                    Certificate::generate_self_signed(vec!["app".to_owned()]).unwrap();
                let own = fingerprint(certificate.certificate[0].as_ref());
                let (_, media, answer) = app
                    .call_out_until(
                        |offer| {
                            offer.replace(" RTP/AVP ", " UDP/TLS/RTP/SAVPF ").replace(
                                "a=sendrecv",
                                &format!("a=sendrecv\r\na=fingerprint:{own}\r\na=setup:actpass"),
                            )
                        },
                        None,
                    )
                    .await;
                let mut srtp = handshake_both_ways(media.clone(), certificate)
                    .await
                    .expect("the relay completes the app's handshake");
                let echoed = talk_srtp(&media, &mut srtp, 1, PACKETS).await;
                app.close().await;
                (answer, echoed)
            })
        });
        let incoming = until_message(
            &mut controller,
            Duration::from_secs(20),
            20,
            "call.incoming",
            |event: &Value| event["event"] == "call.incoming",
        )
        .await;
        let offer = incoming["sdp"].as_str().unwrap().to_owned();
        assert!(offer.contains(" UDP/TLS/RTP/SAVP "), "{offer}");
        assert_eq!(attribute(&offer, "setup"), Some("actpass"), "{offer}");
        assert!(
            offer.contains("a=rtcp-mux\r\n"),
            "one handshake keys RTCP too: {offer}"
        );
        assert!(
            attribute(&offer, "group").is_none(),
            "no BUNDLE toward the PBX: {offer}"
        );
        let relay_fingerprint = attribute(&offer, "fingerprint")
            .expect("the relay's fingerprint")
            .to_owned();
        let pbx_answer = relay_tests::pbx::dtls_sdp(&pbx_fingerprint)
            .replace(" 0 8\r\n", " 0\r\n")
            .replace("a=setup:actpass", "a=setup:active");
        let answered = request(
            &mut controller,
            json!({"type": "call.answer", "id": 2, "call": incoming["call"], "sdp": pbx_answer}),
        )
        .await;
        assert_eq!(answered["type"], "result", "{answered}\n{}", relayd.log());

        // The PBX: the DTLS client on its RTP socket, toward the relay's LAN port.
        let at_pbx = Arc::new(AtomicU32::new(0));
        let relay_lan = media_address(&offer);
        let (relay, echo) =
            dtls_pbx_echo(pbx_socket, relay_lan, pbx_certificate, true, at_pbx.clone())
                .await
                .unwrap_or_else(|err| {
                    panic!(
                        "the PBX's handshake toward the relay: {err}\n{}",
                        relayd.log()
                    )
                });
        assert_eq!(relay, relay_fingerprint);
        let connected = until_call_state(&mut controller, "connected").await;
        assert_eq!(
            (&connected["app_security"], &connected["pbx_security"]),
            (&json!("dtls-srtp"), &json!("dtls-srtp")),
            "{connected}"
        );
        let (answer, echoed) = tokio::task::spawn_blocking(move || app.join().unwrap())
            .await
            .unwrap();
        assert_eq!(attribute(&answer, "setup"), Some("passive"), "{answer}");
        let at_pbx = at_pbx.load(Ordering::Relaxed);
        println!("PBX unprotected {at_pbx} of {PACKETS}; the app unprotected {echoed} echoes");
        assert!(
            at_pbx >= PACKETS - 2,
            "at the PBX: {at_pbx}\n{}",
            relayd.log()
        );
        assert!(echoed >= PACKETS - 4, "echoed: {echoed}\n{}", relayd.log());
        echo.abort();
    });
}
