//! Bad input on a bridged call's media security, in the edge lab: the app speaks
//! DTLS-SRTP through the webrtc-rs `dtls` crate over its own ICE agent (a client that can
//! misbehave on purpose), the PBX end is a plain-RTP socket that counts what reaches it.
//!
//! - a certificate that does not match the fingerprint in the app's SDP: the call ends
//!   `dtls-failed`;
//! - a handshake that never starts: the call ends `dtls-timeout` after
//!   `calls.dtls_timeout_secs`;
//! - SRTP with a damaged tag, replayed and truncated SRTP: counted (`relayctl calls show`,
//!   the AF_XDP workers' counters in `relayctl status`, `/metrics`) and dropped, the good
//!   packets reach the PBX as plain RTP, byte for byte;
//! - an answer with no codec of the offer's: `bad_request` naming the m-line, the call
//!   still offered.

use std::{net::UdpSocket, time::Duration};

use dtls::crypto::Certificate;
use relay_tests::{
    app::App,
    config_file::ConfigFile,
    dtls_app::{dtls_answer, fingerprint, handshake},
    lab::{EdgeLab, anchor_config},
    netns::{PinDir, enter_by_name},
    relayd::{Relayd, http_get, metric},
    require_root, runtime, sdes,
    signalling_client::{Socket, mint_token, request, until_call_state, until_message},
};
use serde_json::{Value, json};

const API_KEY: &str = "acme-api-key-0123456789";
const METRICS: &str = "10.30.0.1:9100";

fn pbx_offer() -> String {
    [
        "v=0",
        "o=pbx 1 1 IN IP4 10.30.0.2",
        "s=pbx",
        "c=IN IP4 10.30.0.2",
        "t=0 0",
        "m=audio 40000 RTP/AVP 0 8",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:8 PCMA/8000",
        "a=sendrecv",
        "",
    ]
    .join("\r\n")
}

fn rtp(seq: u16) -> Vec<u8> {
    let mut packet = vec![0x80, 0x00];
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
    packet.extend_from_slice(&0x0bad_cafe_u32.to_be_bytes());
    packet.extend((0..160).map(|i| (i as u8) ^ (seq as u8)));
    packet
}

async fn next_event(socket: &mut Socket, name: &str) -> Value {
    until_message(socket, Duration::from_secs(20), 20, name, |e| {
        e["event"] == name
    })
    .await
}

/// The edge lab with relayd on a configuration made for its pin directory, and the PBX
/// end's RTP and RTCP sockets (reads time out after `pbx_timeout`). Fields drop in order:
/// relayd stops before its pins and namespaces go.
struct Lab {
    relayd: Relayd,
    fingerprint: String,
    pbx: UdpSocket,
    _pbx_rtcp: UdpSocket,
    _config: ConfigFile,
    _pins: PinDir,
    lab: EdgeLab,
}

impl Lab {
    fn start(
        config: impl FnOnce(&std::path::Path) -> String,
        relayd_args: &[&str],
        pbx_timeout: Duration,
    ) -> Lab {
        let lab = EdgeLab::new();
        let pins = PinDir::new();
        let config = ConfigFile::new(&config(&pins.path));
        let mut args = vec!["--config", config.path()];
        args.extend_from_slice(relayd_args);
        let relayd = Relayd::start(Some(&lab.relay), &args);
        let pbx = lab.pbx.udp_socket("10.30.0.2:40000".parse().unwrap());
        pbx.set_read_timeout(Some(pbx_timeout)).unwrap();
        Lab {
            fingerprint: relayd.signalling_fingerprint(),
            relayd,
            pbx,
            _pbx_rtcp: lab.pbx.udp_socket("10.30.0.2:40001".parse().unwrap()),
            _config: config,
            _pins: pins,
            lab,
        }
    }
}

#[test]
fn bad_dtls_and_srtp_from_the_app_are_refused_with_a_reason() {
    require_root();
    let started = Lab::start(
        |pins| anchor_config(pins, "acme", API_KEY, "dtls_timeout_secs = 2"),
        &["--metrics-listen", METRICS],
        Duration::from_millis(200),
    );
    let Lab {
        relayd,
        fingerprint: signalling_fingerprint,
        pbx,
        lab,
        ..
    } = &started;
    runtime().block_on(async {
        let mut controller = lab.controller(signalling_fingerprint, "acme", API_KEY).await;
        let token = mint_token(&mut controller, "alice", 300).await;
        let app_ns = lab.app.name.clone();
        let (to_app, mut from_test) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
        let (to_test, mut from_app) = tokio::sync::mpsc::unbounded_channel::<Value>();
        let fp = signalling_fingerprint.clone();
        // The app, in its own namespace: answers each call the way the test says.
        let app = std::thread::spawn(move || {
            enter_by_name(&app_ns);
            runtime().block_on(async move {
                let mut app = App::in_edge_lab(&fp, &token).await;
                to_test.send(json!("ready")).unwrap();
                while let Some(how) = from_test.recv().await {
                    // The end of the call before (hung up by the controller) may come first.
                    let incoming = loop {
                        let event = app.next_within(Duration::from_secs(15)).await;
                        if event["event"] == "call.incoming" {
                            break event;
                        }
                    };
                    let certificate = Certificate::generate_self_signed(vec!["app".to_owned()]).unwrap();
                    let own = fingerprint(certificate.certificate[0].as_ref());
                    let stranger = Certificate::generate_self_signed(vec!["someone".to_owned()]).unwrap();
                    let claimed = match how {
                        "wrong-fingerprint" => fingerprint(stranger.certificate[0].as_ref()),
                        _ => own,
                    };
                    if how == "no-common-codec" {
                        let offer = incoming["sdp"].as_str().unwrap();
                        let answer = dtls_answer(offer.to_owned(), &claimed)
                            .replace("RTP/SAVPF 0 8", "RTP/SAVPF 18")
                            .replace("a=rtpmap:0 PCMU/8000", "a=rtpmap:18 G729/8000");
                        let refused = app
                            .request(json!({"type": "call.answer", "id": 1, "call": incoming["call"], "sdp": answer}))
                            .await;
                        to_test.send(refused).unwrap();
                        continue;
                    }
                    let media = app
                        .answer_edited(&incoming, |answer| dtls_answer(answer, &claimed), None)
                        .await;
                    match how {
                        "silent" => {
                            let ended = app.next_within(Duration::from_secs(15)).await;
                            to_test.send(ended).unwrap();
                        }
                        "wrong-fingerprint" => {
                            let _ = handshake(media, certificate).await;
                            let ended = app.next_within(Duration::from_secs(15)).await;
                            to_test.send(ended).unwrap();
                        }
                        _ => {
                            let (_dtls, mut srtp) = handshake(media.clone(), certificate)
                                .await
                                .expect("the relay completes the handshake");
                            let mut sent = Vec::new();
                            for seq in 1..=60u16 {
                                let protected = srtp.encrypt_rtp(&rtp(seq)).unwrap().to_vec();
                                match seq % 6 {
                                    // A damaged tag: refused, counted.
                                    0 => {
                                        let mut damaged = protected.clone();
                                        *damaged.last_mut().unwrap() ^= 0x01;
                                        media.send(&damaged).await.unwrap();
                                    }
                                    // A replay of the packet before: refused, counted.
                                    3 => {
                                        media.send(&protected).await.unwrap();
                                        media.send(&protected).await.unwrap();
                                        sent.push(seq);
                                    }
                                    _ => {
                                        media.send(&protected).await.unwrap();
                                        sent.push(seq);
                                    }
                                }
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            // Truncated: an RTP header and less than a tag.
                            let last = srtp.encrypt_rtp(&rtp(61)).unwrap().to_vec();
                            media.send(&last[..14]).await.unwrap();
                            to_test.send(json!(sent)).unwrap();
                        }
                    }
                }
                app.close().await;
            })
        });
        assert_eq!(from_app.recv().await.unwrap(), json!("ready"));

        // A certificate that is not the one the SDP named.
        to_app.send("wrong-fingerprint").unwrap();
        let created = request(&mut controller, json!({"type": "call.create", "id": 2, "user": "alice", "sdp": pbx_offer()})).await;
        assert_eq!(created["type"], "result", "{created}");
        let ended = next_event(&mut controller, "call.ended").await;
        assert_eq!(ended["reason"], "dtls-failed", "{ended}\n{}", relayd.log());
        let told = from_app.recv().await.unwrap();
        assert_eq!(told["reason"], "dtls-failed", "the app is told too: {told}");

        // A handshake that never starts.
        to_app.send("silent").unwrap();
        let created = request(&mut controller, json!({"type": "call.create", "id": 3, "user": "alice", "sdp": pbx_offer()})).await;
        assert_eq!(created["type"], "result", "{created}");
        let ended = next_event(&mut controller, "call.ended").await;
        assert_eq!(ended["reason"], "dtls-timeout", "{ended}");
        let _ = from_app.recv().await.unwrap();

        // No codec in common: refused, the call stays offered.
        to_app.send("no-common-codec").unwrap();
        let created = request(&mut controller, json!({"type": "call.create", "id": 4, "user": "alice", "sdp": pbx_offer()})).await;
        let refused = from_app.recv().await.unwrap();
        assert_eq!(refused["code"], "bad_request", "{refused}");
        let message = refused["message"].as_str().unwrap();
        assert!(message.contains("m=audio (m-line 1): no codec in common"), "{message}");
        let shown = relayd.ctl_json(&["calls", "show", &created["call"].to_string()]);
        assert_eq!(shown["state"], "offered", "{shown}");
        let result = request(&mut controller, json!({"type": "call.hangup", "id": 5, "call": created["call"]})).await;
        assert_eq!(result["type"], "result", "{result}");

        // Damaged and replayed SRTP among good packets.
        to_app.send("talk").unwrap();
        let created = request(&mut controller, json!({"type": "call.create", "id": 6, "user": "alice", "sdp": pbx_offer()})).await;
        let id = created["call"].as_u64().unwrap();
        let sent: Vec<u16> = serde_json::from_value(from_app.recv().await.unwrap()).unwrap();
        assert_eq!(sent.len(), 50);
        let mut received = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok((n, _)) = pbx.recv_from(&mut buf) {
            let seq = u16::from_be_bytes([buf[2], buf[3]]);
            assert_eq!(&buf[..n], &rtp(seq)[..], "plain RTP, byte for byte, at the PBX");
            received.push(seq);
        }
        assert_eq!(received, sent, "every good packet once, in order");
        let shown = relayd.ctl_json(&["calls", "show", &id.to_string()]);
        assert_eq!(shown["bridged"]["auth_failures"], 10, "{shown}");
        assert_eq!(shown["bridged"]["replays"], 10, "{shown}");
        assert_eq!(shown["to_pbx"]["packets"], 50, "{shown}");
        // Steered: from the app, and from the PBX's RTP and RTCP ports (no rtcp-mux).
        assert_eq!(
            shown["bridged"]["steered_flows"].as_array().map(Vec::len),
            Some(3),
            "{shown}"
        );
        // The AF_XDP workers carried the call (veth: copy mode) and refused the damaged,
        // replayed and truncated packets. What the app sent before the relay's side of the
        // handshake had ended and the call was steered went through the call's sockets.
        let status = relayd.ctl_json(&["status"]);
        let workers = &status["datapath"]["transcrypt"]["counters"];
        let (sent, refused) = (
            workers["sent"].as_u64().unwrap(),
            workers["refused"].as_u64().unwrap(),
        );
        assert!((45..=50).contains(&sent), "{status}");
        assert!((19..=21).contains(&refused), "{status}");
        let metrics = http_get(&lab.relay, METRICS, "/metrics");
        assert_eq!(
            metric(&metrics, r#"relay_transcrypt_packets_total{outcome="refused"}"#),
            Some(refused),
            "{metrics}"
        );
        assert_eq!(
            metric(&metrics, r#"relay_calls_bridged_dropped_packets_total{reason="authentication"}"#),
            Some(10),
            "{metrics}"
        );
        assert_eq!(
            metric(&metrics, r#"relay_calls_ended_total{reason="dtls-failed"}"#),
            Some(1),
            "{metrics}"
        );
        assert_eq!(
            metric(&metrics, r#"relay_calls_ended_total{reason="dtls-timeout"}"#),
            Some(1),
            "{metrics}"
        );
        let result = request(&mut controller, json!({"type": "call.hangup", "id": 7, "call": id})).await;
        assert_eq!(result["type"], "result", "{result}");
        drop(to_app);
        tokio::task::spawn_blocking(move || app.join().unwrap()).await.unwrap();
    });
}

/// With `calls.app_media = "as-pbx"` an SDES PBX's offer reaches the app with its keys and
/// the app's answer reaches the PBX with the app's: both legs share the sides' own keys,
/// so the relay needs none and XDP forwards the SRTP untouched. The app protects with the
/// key of its answer; the PBX end unprotects with it, and the kernel counters carried it.
#[test]
fn sdes_keys_both_sides_share_stay_in_the_kernel() {
    require_root();
    let started = Lab::start(
        |pins| relay_tests::lab::calls_config(pins, "acme", API_KEY, ""),
        &[],
        Duration::from_secs(2),
    );
    let Lab {
        relayd,
        fingerprint: signalling_fingerprint,
        pbx,
        lab,
        ..
    } = &started;
    let pbx_key = sdes::crypto_line(&[0x24; 30]);
    let app_key = [0x35u8; 30];
    const PACKETS: u16 = 100;
    runtime().block_on(async {
        let mut controller = lab
            .controller(signalling_fingerprint, "acme", API_KEY)
            .await;
        let token = mint_token(&mut controller, "alice", 300).await;
        let app_ns = lab.app.name.clone();
        let fp = signalling_fingerprint.clone();
        let expected_key = pbx_key.clone();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let app = std::thread::spawn(move || {
            enter_by_name(&app_ns);
            runtime().block_on(async move {
                let mut app = App::in_edge_lab(&fp, &token).await;
                ready_tx.send(()).unwrap();
                let incoming = app.next_within(Duration::from_secs(15)).await;
                let offer = incoming["sdp"].as_str().unwrap().to_owned();
                assert!(offer.contains(" RTP/SAVP "), "the PBX's profile: {offer}");
                assert!(
                    offer.contains(&format!("a=crypto:{expected_key}")),
                    "the PBX's key: {offer}"
                );
                let own = sdes::crypto_line(&app_key);
                let media = app
                    .answer_edited(
                        &incoming,
                        |answer| sdes::with_crypto(&answer, &own),
                        Some("connected"),
                    )
                    .await;
                let mut srtp = sdes::context(&app_key);
                for seq in 1..=PACKETS {
                    let protected = srtp.encrypt_rtp(&rtp(seq)).unwrap();
                    media.send(&protected).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let ended = app.next_within(Duration::from_secs(15)).await;
                assert_eq!(ended["event"], "call.ended", "{ended}");
                app.close().await;
            })
        });
        ready.await.unwrap();
        let offer = pbx_offer()
            .replace("RTP/AVP 0 8", "RTP/SAVP 0 8")
            .replace("a=sendrecv", &format!("a=sendrecv\r\na=crypto:{pbx_key}"));
        let created = request(
            &mut controller,
            json!({"type": "call.create", "id": 2, "user": "alice", "sdp": offer}),
        )
        .await;
        assert_eq!(created["type"], "result", "{created}");
        let answered = next_event(&mut controller, "call.answered").await;
        let answer = answered["sdp"].as_str().unwrap();
        assert!(answer.contains(" RTP/SAVP "), "{answer}");
        let connected = until_call_state(&mut controller, "connected").await;
        assert_eq!(connected["app_security"], "pass-through", "{connected}");
        let mut srtp = sdes::context(&app_key);
        let mut buf = [0u8; 2048];
        let mut received = 0;
        while received < PACKETS {
            let Ok((n, _)) = pbx.recv_from(&mut buf) else {
                break;
            };
            let plain = srtp
                .decrypt_rtp(&buf[..n])
                .expect("the app's own SRTP, untouched");
            let seq = u16::from_be_bytes([plain[2], plain[3]]);
            assert_eq!(&plain[..], &rtp(seq)[..]);
            received += 1;
        }
        assert_eq!(
            received,
            PACKETS,
            "every packet reached the PBX\n{}",
            relayd.log()
        );
        let flows = relayd.ctl_json(&["flow", "list"]);
        let flows = flows["flows"].as_array().unwrap();
        assert_eq!(flows.len(), 2, "{flows:?}");
        let to_pbx: u64 = flows
            .iter()
            .map(|flow| flow["counters"]["xdp_packets"].as_u64().unwrap())
            .max()
            .unwrap();
        assert!(
            to_pbx >= u64::from(PACKETS) - 10,
            "the kernel carried the SRTP: {flows:?}"
        );
        let result = request(
            &mut controller,
            json!({"type": "call.hangup", "id": 3, "call": created["call"]}),
        )
        .await;
        assert_eq!(result["type"], "result", "{result}");
        tokio::task::spawn_blocking(move || app.join().unwrap())
            .await
            .unwrap();
    });
}

/// An app that offers SDES (`RTP/SAVP` with its `a=crypto`) calls a plain-RTP PBX
/// (`calls.pbx_media = "rtp"`): the relay answers the app with a key of its own under the
/// same tag, unprotects the app's SRTP for the PBX and protects the PBX's RTP for the app.
/// The PBX end echoes; the app unprotects the echo with the relay's key from the answer.
#[test]
fn an_sdes_app_calling_a_plain_pbx_is_bridged() {
    sdes_app_to_plain_pbx("af_xdp");
}

/// The same on the calls' sockets (`datapath.transcrypt = "sockets"`): what relayd falls
/// back to where AF_XDP cannot be had.
#[test]
fn an_sdes_app_calling_a_plain_pbx_is_bridged_on_the_sockets() {
    sdes_app_to_plain_pbx("sockets");
}

fn sdes_app_to_plain_pbx(transcrypt: &'static str) {
    require_root();
    let started = Lab::start(
        |pins| {
            anchor_config(pins, "acme", API_KEY, "").replace(
                "[datapath]\n",
                &format!("[datapath]\ntranscrypt = \"{transcrypt}\"\n"),
            )
        },
        &[],
        Duration::from_secs(2),
    );
    let Lab {
        relayd,
        fingerprint: signalling_fingerprint,
        pbx,
        lab,
        ..
    } = &started;
    let app_key = [0x57u8; 30];
    const PACKETS: u16 = 50;
    runtime().block_on(async {
        let mut controller = lab
            .controller(signalling_fingerprint, "acme", API_KEY)
            .await;
        let token = mint_token(&mut controller, "alice", 300).await;
        let app_ns = lab.app.name.clone();
        let fp = signalling_fingerprint.clone();
        let app = std::thread::spawn(move || {
            enter_by_name(&app_ns);
            runtime().block_on(async move {
                let mut app = App::in_edge_lab(&fp, &token).await;
                let (call, media, answer) = app
                    .call_out_edited(|offer| {
                        offer.replace(" RTP/AVP ", " RTP/SAVP ").replace(
                            "a=sendrecv",
                            &format!("a=sendrecv\r\na=crypto:{}", sdes::crypto_line(&app_key)),
                        )
                    })
                    .await;
                assert!(answer.contains(" RTP/SAVP "), "{answer}");
                let relay_key = answer
                    .split("\r\n")
                    .find_map(|line| line.strip_prefix("a=crypto:"))
                    .unwrap_or_else(|| panic!("the relay's key: {answer}"))
                    .to_owned();
                assert!(
                    relay_key.starts_with("1 AES_CM_128_HMAC_SHA1_80 "),
                    "{answer}"
                );
                let mut own = sdes::context(&app_key);
                // Echoes counted by sequence number until two seconds without any.
                let reader = {
                    let (media, mut relays) = (media.clone(), sdes::context_of(&relay_key));
                    tokio::spawn(async move {
                        let mut seen = std::collections::BTreeSet::new();
                        let mut buf = [0u8; 2048];
                        while let Ok(Ok(n)) =
                            tokio::time::timeout(Duration::from_secs(2), media.recv(&mut buf)).await
                        {
                            let plain = relays.decrypt_rtp(&buf[..n]).expect("the relay's SRTP");
                            let seq = u16::from_be_bytes([plain[2], plain[3]]);
                            assert_eq!(&plain[..], &rtp(seq)[..]);
                            seen.insert(seq);
                        }
                        seen.len() as u32
                    })
                };
                for seq in 1..=PACKETS {
                    media
                        .send(&own.encrypt_rtp(&rtp(seq)).unwrap())
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let echoed = reader.await.unwrap();
                let result = app
                    .request(json!({"type": "call.hangup", "id": 9, "call": call}))
                    .await;
                assert_eq!(result["type"], "result", "{result}");
                app.close().await;
                echoed
            })
        });
        let incoming = next_event(&mut controller, "call.incoming").await;
        let offer = incoming["sdp"].as_str().unwrap();
        assert!(
            offer.contains(" RTP/AVP "),
            "plain RTP toward the PBX: {offer}"
        );
        assert!(
            !offer.contains("a=crypto"),
            "no keys toward a plain PBX: {offer}"
        );
        let answer = pbx_offer().replace("RTP/AVP 0 8", "RTP/AVP 0");
        let answered = request(
            &mut controller,
            json!({"type": "call.answer", "id": 2, "call": incoming["call"], "sdp": answer}),
        )
        .await;
        assert_eq!(answered["type"], "result", "{answered}");
        let connected = until_call_state(&mut controller, "connected").await;
        assert_eq!(
            (&connected["app_security"], &connected["pbx_security"]),
            (&json!("sdes-srtp"), &json!("rtp")),
            "{connected}"
        );
        // The PBX end: plain RTP, byte for byte, echoed back.
        let pbx = pbx.try_clone().expect("the PBX socket");
        let echo = tokio::task::spawn_blocking(move || {
            let mut buf = [0u8; 2048];
            let mut seen = 0;
            while let Ok((n, from)) = pbx.recv_from(&mut buf) {
                let seq = u16::from_be_bytes([buf[2], buf[3]]);
                assert_eq!(&buf[..n], &rtp(seq)[..], "plain RTP at the PBX");
                pbx.send_to(&buf[..n], from).unwrap();
                seen += 1;
            }
            seen
        });
        let echoed = tokio::task::spawn_blocking(move || app.join().unwrap())
            .await
            .unwrap();
        let seen = echo.await.unwrap();
        assert_eq!(
            seen,
            u32::from(PACKETS),
            "every packet reached the PBX\n{}",
            relayd.log()
        );
        assert!(
            echoed >= u32::from(PACKETS) - 2,
            "the app unprotected the echoes: {echoed}"
        );
        // Both directions took the path asked for: the AF_XDP workers (veth: copy mode),
        // or the sockets with nothing steered.
        let status = relayd.ctl_json(&["status"]);
        let path = &status["datapath"]["transcrypt"];
        assert_eq!(path["path"], transcrypt, "{status}");
        let stats = relayd.ctl_json(&["stats"]);
        let to_worker = stats["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["verdict"] == "to_worker")
            .map_or(0, |v| v["packets"].as_u64().unwrap());
        if transcrypt == "sockets" {
            assert_eq!(to_worker, 0, "{stats}");
            assert!(
                relayd
                    .ctl_ok(&["status"])
                    .contains("transcrypt  relay's sockets\n"),
                "{}",
                relayd.ctl_ok(&["status"])
            );
            return;
        }
        assert_eq!(path["sockets"][0]["mode"], "copy", "{status}");
        // As many threads and queues as veth has here; each socket in copy mode.
        let text = relayd.ctl_ok(&["status"]);
        assert!(
            text.contains("transcrypt  AF_XDP workers: ")
                && text.contains("w0 queue 0 (copy)")
                && text.contains("l0 queue 0 (copy)"),
            "{text}"
        );
        let counters = &path["counters"];
        let count = |name: &str| counters[name].as_u64().unwrap();
        assert!(
            count("sent") >= 2 * u64::from(PACKETS) - 4,
            "the workers carried both directions: {status}\n{}",
            relayd.log()
        );
        assert_eq!(
            count("refused") + count("malformed") + count("not_sent"),
            0,
            "{status}"
        );
        assert!(to_worker >= 2 * u64::from(PACKETS) - 4, "{stats}");
    });
}
