//! An active relay and its standby behind floating addresses (FailoverLab), sharing a real
//! redis-server: a call connected through the active relay, its media in that relay's XDP
//! program; the active relay is killed (kill -9, its links down: the box is gone) and
//! keepalived's part, the floating addresses, moves to the standby. The standby sees the
//! active relay's health expire, takes the call over from Redis (same id, ICE credentials,
//! selected pair, LAN port; the flows in its own XDP program) and the media goes on; the
//! controller and the app, connecting again, hear `call.state moved`. The media gap and the
//! packets lost are printed (the aim is under 2 s; the health TTL bounds it from below).
//! A TURN allocation with a bound channel moves the same way: its ChannelData echoed by a
//! peer through the active relay before, through the standby after. A bridged call (the
//! app's DTLS-SRTP, the PBX's plain RTP) moves with its SRTP keys and packet indices.

use std::{
    collections::BTreeMap,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use dtls::crypto::Certificate;
use relay_tests::{
    app::{App, Media},
    config_file::ConfigFile,
    dtls_app::{dtls_answer, fingerprint, handshake_both_ways, talk_srtp},
    lab::{EdgeLab, FailoverLab, anchor_config, calls_config, pair_cluster},
    netns::{PinDir, enter_by_name},
    pbx::rtp_echo,
    recv_async,
    redis::RedisServer,
    relayd::{Relayd, http_get, metric},
    require_root, runtime,
    signalling_client::{controller, mint_token, request, until_call_state, until_message},
    traffic::{numbered, sequence_of},
    turn_client::{BoundChannel, bind_channel},
};
use serde_json::{Value, json};

const API_KEY: &str = "acme-api-key-0123456789";
const PBX_RTP: &str = "10.30.0.2:40000";
const PBX_OFFER: &str = "v=0\r\no=PBX 1 1 IN IP4 10.30.0.2\r\ns=PBX\r\nc=IN IP4 10.30.0.2\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n";
/// 16 s of a voice call's packets (50 a second): the failover happens 3 s in.
const PACKETS: u32 = 800;
const TTL_SECS: u64 = 1;
/// TURN on the floating WAN address, and the peer its allocation's channel is bound to.
const TURN: &str = "198.51.100.1:3478";
const TURN_PEER: &str = "10.30.0.2:40004";
/// Each relay's metrics, in its own namespace.
const METRICS: &str = "127.0.0.1:9479";

fn relay_config(pins: &PinDir, redis: &RedisServer, node: &str, standby_for: &str) -> ConfigFile {
    ConfigFile::new(&calls_config(
        &pins.path,
        "acme",
        API_KEY,
        &format!(
            "port_range = \"41000-41010\"\n{}\
             [metrics]\nlisten = \"{METRICS}\"\n\
             [turn]\nenabled = true\nlisten = [\"{TURN}\"]\nrelay_addresses = [\"{}\"]\n\
             users = [{{ name = \"app\", password = \"app-secret\" }}]\nallowed_peers = [\"10.30.0.2\"]\n",
            pair_cluster(node, &redis.url(), standby_for, TTL_SECS),
            EdgeLab::RELAY_WAN,
        ),
    ))
}

/// What came back of a stream of numbered packets: when each echo arrived, by sequence.
struct Streamed {
    arrived: BTreeMap<u32, Instant>,
}

impl Streamed {
    /// The longest stretch without an echo, between the first and the last.
    fn gap(&self) -> Duration {
        let mut times: Vec<Instant> = self.arrived.values().copied().collect();
        times.sort();
        times
            .windows(2)
            .map(|pair| pair[1] - pair[0])
            .max()
            .unwrap_or_default()
    }
}

/// Sends `count` numbered RTP packets at 50 a second, one every 20 ms, and notes when each
/// one's echo arrives (within a second after the last send).
async fn stream(media: &Media, count: u32) -> Streamed {
    let mut streamed = Streamed {
        arrived: BTreeMap::new(),
    };
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    let mut buf = vec![0u8; 2048];
    let mut next = 0;
    let mut grace = None;
    loop {
        let grace_over = async {
            match grace {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = pace.tick(), if next < count => {
                let _ = media.send(&numbered(next)).await;
                next += 1;
                if next == count {
                    grace = Some(tokio::time::Instant::now() + Duration::from_secs(1));
                }
            }
            received = media.recv(&mut buf) => {
                if let Ok(n) = received
                    && let Some(sequence) = sequence_of(&buf[..n])
                {
                    streamed.arrived.entry(sequence).or_insert_with(Instant::now);
                }
            }
            _ = grace_over => return streamed,
        }
    }
}

#[test]
fn the_standby_takes_a_call_over_when_the_active_relay_dies() {
    require_root();
    let lab = FailoverLab::new();
    let redis = RedisServer::start_on(&lab.switch, FailoverLab::REDIS, 6379);
    let (pins_a, pins_b) = (PinDir::new(), PinDir::new());
    let (config_a, config_b) = (
        relay_config(&pins_a, &redis, "edge-a", ""),
        relay_config(&pins_b, &redis, "edge-b", "edge-a"),
    );
    let mut edge_a = Relayd::start(Some(&lab.relays[0]), &["--config", config_a.path()]);
    let edge_b = Relayd::start(Some(&lab.relays[1]), &["--config", config_b.path()]);
    let standing_by = |status: &Value| {
        status["nodes_alive"] == 2
            && status["members"].as_array().is_some_and(|members| {
                members
                    .iter()
                    .any(|m| m["node"] == "edge-b" && m["load"]["standby"] == true)
            })
    };
    let status =
        edge_a.ctl_json_until(&["cluster", "status"], Duration::from_secs(10), standing_by);
    assert!(standing_by(&status), "{status:#}\n{}", edge_b.log());
    let table = edge_b.ctl_ok(&["cluster", "status"]);
    assert!(
        table.contains("node edge-b (standby of edge-a)") && table.contains("standby"),
        "{table}"
    );
    let (fingerprint_a, fingerprint_b) = (
        edge_a.signalling_fingerprint(),
        edge_b.signalling_fingerprint(),
    );
    let echo_socket = lab.pbx.udp_socket(PBX_RTP.parse().unwrap());
    let peer_socket = lab.pbx.udp_socket(TURN_PEER.parse().unwrap());
    let signalling = EdgeLab::SIGNALLING.parse().unwrap();
    // An app's TURN allocation on the active relay, its channel bound to the peer.
    let channel = Arc::new(
        bind_channel(
            &lab.app,
            "10.20.0.2:0".parse().unwrap(),
            TURN.parse().unwrap(),
            "app",
            "app-secret",
            TURN_PEER.parse().unwrap(),
        )
        .expect("an allocation with a channel"),
    );
    runtime().block_on(async {
        let pbx_echo = tokio::spawn(rtp_echo(echo_socket));
        let peer_echo = tokio::spawn(rtp_echo(peer_socket));
        // The channel's ChannelData, echoed by the peer (off the runtime's thread, which
        // runs the peer).
        let turn_echo = |channel: Arc<BoundChannel>| async move {
            tokio::task::spawn_blocking(move || {
                channel.echoes(TURN.parse().unwrap(), b"over the channel", Duration::from_secs(1))
            })
            .await
            .unwrap()
        };
        assert!(
            turn_echo(channel.clone()).await,
            "through the active relay\n{}\n{}",
            edge_a.ctl_ok(&["flow", "list"]),
            edge_a.ctl_ok(&["stats"])
        );
        let mut controller_a =
            controller(&lab.pbx, signalling, &fingerprint_a, "acme", API_KEY).await;
        let token = mint_token(&mut controller_a, "alice", 300).await;
        let (done_tx, done) = mpsc::channel();
        let app_ns = lab.app.name.clone();
        let app_thread = {
            let (token, fingerprint_b) = (token.clone(), fingerprint_b.clone());
            std::thread::spawn(move || {
                enter_by_name(&app_ns);
                runtime().block_on(async move {
                    let mut app = App::in_edge_lab(&fingerprint_a, &token).await;
                    done_tx.send(json!("connected")).unwrap();
                    let incoming = app.next_within(Duration::from_secs(10)).await;
                    let media = app.answer(&incoming).await;
                    done_tx.send(json!("talking")).unwrap();
                    let streamed = stream(&media, PACKETS).await;
                    // The signalling to the dead relay is gone: the app connects again,
                    // to the floating address, and hears where its call went.
                    let welcome = app
                        .reconnect(EdgeLab::SIGNALLING.parse().unwrap(), &fingerprint_b, &token)
                        .await;
                    let moved = app.next_within(Duration::from_secs(5)).await;
                    done_tx
                        .send(json!({
                            "echoed": streamed.arrived.len(),
                            "gap_ms": streamed.gap().as_millis() as u64,
                            "last_100": streamed.arrived.range(PACKETS - 100..).count(),
                            "welcome": welcome,
                            "moved": moved,
                        }))
                        .unwrap();
                    let ended = app.next_within(Duration::from_secs(10)).await;
                    app.close().await;
                    ended
                })
            })
        };
        let (_, done) = recv_async(done).await;
        let created = request(
            &mut controller_a,
            json!({"type": "call.create", "id": 1, "user": "alice", "sdp": PBX_OFFER}),
        )
        .await;
        assert_eq!(created["type"], "result", "{created}");
        let call_id = created["call"].clone();
        until_call_state(&mut controller_a, "connected").await;
        let (_, done) = recv_async(done).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let flows = edge_a.ctl_json(&["flow", "list"]);
        assert_eq!(flows["flows"].as_array().unwrap().len(), 4, "{flows}");

        // The active relay's box dies; keepalived moves the floating addresses.
        let failed = Instant::now();
        edge_a.kill();
        lab.fail_over();
        drop(controller_a);
        let took = edge_b.ctl_json_until(&["calls", "list"], Duration::from_secs(15), |list| {
            list["calls"][0]["call"] == call_id
        });
        let taken_after = failed.elapsed();
        assert_eq!(
            (&took["calls"][0]["state"], &took["calls"][0]["user"]),
            (&json!("connected"), &json!("alice")),
            "{took:#}\n{}",
            edge_b.log()
        );
        let log = edge_b.log();
        assert!(
            log.contains("took over the calls of the node that is down") && log.contains("taken=1"),
            "{log}"
        );
        // The controller connects again, to the floating address: the call is listed and
        // it hears that the call moved.
        let mut controller_b =
            controller(&lab.pbx, signalling, &fingerprint_b, "acme", API_KEY).await;
        let moved = until_message(&mut controller_b, Duration::from_secs(5), 5, "moved", |m| {
            m["event"] == "call.state" && m["state"] == "moved"
        })
        .await;
        assert_eq!(
            (&moved["call"], &moved["from"]),
            (&call_id, &json!("edge-a")),
            "{moved}"
        );
        let (report, _) = recv_async(done).await;
        let gap_ms = report["gap_ms"].as_u64().unwrap();
        let lost = u64::from(PACKETS) - report["echoed"].as_u64().unwrap();
        println!(
            "takeover: the standby had the call {:.2} s after the failure; media gap {gap_ms} ms, {lost} of {PACKETS} packets lost",
            taken_after.as_secs_f64()
        );
        assert_eq!(report["last_100"], 100, "the media goes on: {report:#}\n{}", edge_b.log());
        assert!(gap_ms < 4000, "{report:#}");
        assert_eq!(report["welcome"]["calls"][0]["call"], call_id, "{report:#}");
        assert_eq!(
            (&report["moved"]["state"], &report["moved"]["call"]),
            (&json!("moved"), &call_id),
            "{report:#}"
        );
        // The allocation moved too: its channel goes on through the standby.
        assert!(
            turn_echo(channel.clone()).await,
            "through the standby\n{}",
            edge_b.log()
        );
        assert!(edge_b.log().contains("allocations=1"), "{}", edge_b.log());
        let metrics = http_get(&lab.relays[1], METRICS, "/metrics");
        for (series, value) in [
            ("relay_cluster_takeovers_total", 1),
            (r#"relay_cluster_taken_over_total{what="calls"}"#, 1),
            (r#"relay_cluster_taken_over_total{what="allocations"}"#, 1),
        ] {
            assert_eq!(metric(&metrics, series), Some(value), "{series}\n{metrics}");
        }
        // The media is in the standby's XDP program now.
        let flows = edge_b.ctl_json(&["flow", "list"]);
        let flows = flows["flows"].as_array().unwrap();
        // The call's two and the channel's two.
        assert_eq!(flows.len(), 4, "{flows:?}");
        for flow in flows.iter().filter(|flow| flow["channel"].is_null()) {
            assert!(
                flow["counters"]["xdp_packets"].as_u64().unwrap() >= 100,
                "{flow}"
            );
        }
        let status = edge_b.ctl_json(&["cluster", "status"]);
        let state = |node: &str| {
            status["members"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["node"] == node)
                .map(|m| m["state"].clone())
        };
        assert_eq!(state("edge-a"), Some(json!("down")), "{status:#}");
        assert_eq!(status["standing_by"], false, "{status:#}");
        let table = edge_b.ctl_ok(&["cluster", "status"]);
        assert!(table.contains("node edge-b (took over from edge-a)"), "{table}");
        assert_eq!(state("edge-b"), Some(json!("alive")), "{status:#}");
        // Its record is the standby's now.
        assert_eq!(
            redis.cli(&["EXISTS", &format!("relay:call:edge-a:{call_id}")]),
            "0"
        );
        redis.cli_until(&["EXISTS", &format!("relay:call:edge-b:{call_id}")], Duration::from_secs(3), |got| got == "1");
        // The controller hangs up on the standby: the app is told, the flows go.
        let hangup = request(
            &mut controller_b,
            json!({"type": "call.hangup", "id": 2, "call": call_id}),
        )
        .await;
        assert_eq!(hangup["type"], "result", "{hangup}");
        let ended = tokio::task::spawn_blocking(move || app_thread.join().unwrap())
            .await
            .unwrap();
        assert_eq!(
            (&ended["event"], &ended["reason"]),
            (&json!("call.ended"), &json!("hangup")),
            "{ended}"
        );
        pbx_echo.abort();
        peer_echo.abort();
    });
}

/// The active relay's and the standby's configuration for bridged calls: the relay's own
/// media security (DTLS-SRTP toward the app, plain RTP toward the PBX).
fn bridging_config(
    pins: &PinDir,
    redis: &RedisServer,
    node: &str,
    standby_for: &str,
) -> ConfigFile {
    ConfigFile::new(&anchor_config(
        &pins.path,
        "acme",
        API_KEY,
        &format!(
            "port_range = \"41000-41010\"\n{}",
            pair_cluster(node, &redis.url(), standby_for, TTL_SECS)
        ),
    ))
}

/// SRTP packets at 50 a second across the failover, and after it.
const BRIDGED_ACROSS: u32 = 600;
const BRIDGED_AFTER: u32 = 100;

#[test]
fn the_standby_takes_a_bridged_call_over_with_its_keys() {
    require_root();
    let lab = FailoverLab::new();
    let redis = RedisServer::start_on(&lab.switch, FailoverLab::REDIS, 6379);
    let (pins_a, pins_b) = (PinDir::new(), PinDir::new());
    let (config_a, config_b) = (
        bridging_config(&pins_a, &redis, "edge-a", ""),
        bridging_config(&pins_b, &redis, "edge-b", "edge-a"),
    );
    let mut edge_a = Relayd::start(Some(&lab.relays[0]), &["--config", config_a.path()]);
    let edge_b = Relayd::start(Some(&lab.relays[1]), &["--config", config_b.path()]);
    let status = edge_a.ctl_json_until(&["cluster", "status"], Duration::from_secs(10), |s| {
        s["nodes_alive"] == 2
    });
    assert_eq!(status["nodes_alive"], 2, "{status:#}");
    let fingerprint_a = edge_a.signalling_fingerprint();
    let echo_socket = lab.pbx.udp_socket(PBX_RTP.parse().unwrap());
    runtime().block_on(async {
        let pbx_echo = tokio::spawn(rtp_echo(echo_socket));
        let mut controller_a = controller(
            &lab.pbx,
            EdgeLab::SIGNALLING.parse().unwrap(),
            &fingerprint_a,
            "acme",
            API_KEY,
        )
        .await;
        let token = mint_token(&mut controller_a, "alice", 300).await;
        let (done_tx, done) = mpsc::channel();
        let app_ns = lab.app.name.clone();
        let app_thread = std::thread::spawn(move || {
            enter_by_name(&app_ns);
            runtime().block_on(async move {
                let mut app = App::in_edge_lab(&fingerprint_a, &token).await;
                done_tx.send(json!("connected")).unwrap();
                let incoming = app.next_within(Duration::from_secs(10)).await;
                let certificate =
                    Certificate::generate_self_signed(vec!["app".to_owned()]).unwrap();
                let own = fingerprint(certificate.certificate[0].as_ref());
                let media = app
                    .answer_edited(&incoming, |answer| dtls_answer(answer, &own), None)
                    .await;
                let mut srtp = handshake_both_ways(media.clone(), certificate)
                    .await
                    .expect("the relay completes the handshake");
                done_tx.send(json!("talking")).unwrap();
                let across = talk_srtp(&media, &mut srtp, 0, BRIDGED_ACROSS).await;
                let after = talk_srtp(&media, &mut srtp, BRIDGED_ACROSS, BRIDGED_AFTER).await;
                done_tx
                    .send(json!({"across": across, "after": after}))
                    .unwrap();
                app.close().await;
            })
        });
        let (_, done) = recv_async(done).await;
        let created = request(
            &mut controller_a,
            json!({"type": "call.create", "id": 1, "user": "alice", "sdp": PBX_OFFER}),
        )
        .await;
        assert_eq!(created["type"], "result", "{created}");
        let call_id = created["call"].clone();
        let connected = until_call_state(&mut controller_a, "connected").await;
        assert_eq!(connected["app_security"], "dtls-srtp", "{connected}");
        let (_, done) = recv_async(done).await;
        tokio::time::sleep(Duration::from_secs(3)).await;

        let failed = Instant::now();
        edge_a.kill();
        lab.fail_over();
        drop(controller_a);
        let took = edge_b.ctl_json_until(&["calls", "list"], Duration::from_secs(15), |list| {
            list["calls"][0]["call"] == call_id
        });
        let taken_after = failed.elapsed();
        assert_eq!(took["calls"][0]["app_security"], "dtls-srtp", "{took:#}");
        let (report, _) = recv_async(done).await;
        let lost = BRIDGED_ACROSS - report["across"].as_u64().unwrap() as u32;
        println!(
            "bridged takeover: the standby had the call {:.2} s after the failure; {lost} of {BRIDGED_ACROSS} SRTP packets lost across it",
            taken_after.as_secs_f64()
        );
        assert_eq!(
            report["after"], BRIDGED_AFTER,
            "the standby carries the bridged media with the call's keys: {report}\n{}",
            edge_b.log()
        );
        assert!(lost < 200, "{report}");
        let shown = edge_b.ctl_json(&["calls", "show", &call_id.to_string()]);
        assert_eq!(
            shown["bridged"]["auth_failures"], 0,
            "{shown:#}"
        );
        tokio::task::spawn_blocking(move || app_thread.join().unwrap())
            .await
            .unwrap();
        pbx_echo.abort();
    });
}
