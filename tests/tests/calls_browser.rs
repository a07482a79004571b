//! A real browser as the app: headless Chromium (Debian `chromium`) runs
//! tests/browser/app.html in the app's network, behind the lab's NAT, and is called by the
//! PBX, then calls it, through the relay's signalling. The browser's own WebRTC stack does
//! ICE, DTLS-SRTP, BUNDLE and rtcp-mux with the relay; the PBX leg is plain RTP/AVP with
//! RTCP on its own port. The relay terminates DTLS-SRTP and transcrypts each packet.
//!
//! The PBX end is an echo that sends every RTP packet back under another SSRC (a browser
//! would take its own SSRC coming back for a loop): the browser hears its own fake
//! microphone, so its `inbound-rtp` audio counts packets and energy above zero, and its
//! transport is DTLS `connected` with the certificate whose fingerprint the relay put in
//! its SDP. The first two calls carry video too: the browser's audio and video share one
//! BUNDLE transport toward the relay, and the PBX gets each on LAN ports of their own; the
//! echo sends the fake camera's VP8 back on the video port, and the browser decodes frames
//! of it. The first call lasts past the relay's consent timeout: consent checks answered
//! both ways with the browser's own ICE stack keep the media going. In a third call the PBX
//! offers SDES-SRTP (`RTP/SAVP`, `a=crypto`): the echo unprotects with the relay's key and
//! protects with its own (webrtc-srtp's contexts, keys from the SDPs), so the browser hears
//! it only if the relay bridged DTLS-SRTP to SDES-SRTP both ways; the echo counts the
//! packets that failed authentication. Its video is refused (SDES toward the PBX keys the
//! audio only). The relay's AF_XDP workers carry the transcrypted media (the XDP program
//! steers it to them; copy mode on veth).

use std::{
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use relay_tests::{
    config_file::ConfigFile,
    lab::{EdgeLab, anchor_config},
    netns::{NetNs, PinDir},
    process::Background,
    relayd::Relayd,
    require_root, runtime, sdes,
    signalling_client::{Socket, mint_token, request, until_call_state, until_message},
};
use serde_json::{Value, json};
use webrtc_srtp::context::Context;

const API_KEY: &str = "acme-api-key-0123456789";
/// The first call lasts CONSENT_WINDOW past its first audio, longer than the relay's
/// consent timeout and several rounds of consent checks each way (every 4-6 s from the
/// relay, every 2.5 s or so from Chromium).
const CONSENT_TIMEOUT_SECS: u64 = 6;
const CONSENT_WINDOW: Duration = Duration::from_secs(12);
/// The PBX end's RTP address (RTCP on the port above).
const PBX_RTP: &str = "10.30.0.2:40000";

/// The PBX end's video RTP port (RTCP on the port above).
const PBX_VIDEO_PORT: u16 = 40002;

/// The PBX's SDP: G.711 u-law only, RTCP on its own port (no rtcp-mux), and VP8 video on
/// PBX_VIDEO_PORT under the payload type `vp8`.
fn pbx_sdp(vp8: u8) -> String {
    pbx_sdp_with(vp8, None)
}

/// [`pbx_sdp`], with SDES keys when `crypto` is given (`RTP/SAVP`).
fn pbx_sdp_with(vp8: u8, crypto: Option<&str>) -> String {
    let profile = if crypto.is_some() {
        "RTP/SAVP"
    } else {
        "RTP/AVP"
    };
    let mut lines = vec![
        "v=0".to_owned(),
        "o=pbx 1 1 IN IP4 10.30.0.2".to_owned(),
        "s=pbx".to_owned(),
        "c=IN IP4 10.30.0.2".to_owned(),
        "t=0 0".to_owned(),
        format!("m=audio 40000 {profile} 0"),
        "a=rtpmap:0 PCMU/8000".to_owned(),
        "a=ptime:20".to_owned(),
        "a=sendrecv".to_owned(),
    ];
    lines.extend(crypto.map(|crypto| format!("a=crypto:{crypto}")));
    lines.extend([
        format!("m=video {PBX_VIDEO_PORT} {profile} {vp8}"),
        format!("a=rtpmap:{vp8} VP8/90000"),
        "a=sendrecv".to_owned(),
    ]);
    lines.join("\r\n") + "\r\n"
}

/// The payload type of VP8 in the browser's offer (as the relay passed it on).
fn vp8_payload_type(offer: &str) -> u8 {
    offer
        .split("\r\n")
        .find_map(|line| line.strip_prefix("a=rtpmap:")?.strip_suffix(" VP8/90000"))
        .and_then(|pt| pt.parse().ok())
        .unwrap_or_else(|| panic!("VP8 in the browser's offer: {offer}"))
}

/// The PBX end: RTP back to where it came from with the SSRC changed, on the audio port
/// and the video port; RTCP taken and dropped. Counts what it echoed of each; stops when
/// `stop` is set (or after two minutes).
struct SsrcEcho {
    echoed: Arc<AtomicU64>,
    video_echoed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// With SDES toward the PBX (audio only): (the relay's packets, the PBX's own), set
    /// once the SDPs are known; and the packets that failed to unprotect.
    srtp: Arc<std::sync::Mutex<Option<(Context, Context)>>>,
    failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl SsrcEcho {
    fn start(pbx: &NetNs) -> SsrcEcho {
        let (echoed, video_echoed, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let srtp: Arc<std::sync::Mutex<Option<(Context, Context)>>> = Arc::default();
        let failed = Arc::new(AtomicU64::new(0));
        let audio: SocketAddr = PBX_RTP.parse().unwrap();
        let video = SocketAddr::new(audio.ip(), PBX_VIDEO_PORT);
        let mut threads = Vec::new();
        for (address, echoed, keyed) in [(audio, &echoed, true), (video, &video_echoed, false)] {
            let rtp = pbx.udp_socket(address);
            let rtcp = pbx.udp_socket(SocketAddr::new(address.ip(), address.port() + 1));
            let (echoed, stop) = (echoed.clone(), stop.clone());
            let (srtp, failed) = (srtp.clone(), failed.clone());
            threads.push(std::thread::spawn(move || {
                let _rtcp: UdpSocket = rtcp;
                rtp.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let Ok((n, from)) = rtp.recv_from(&mut buf) else {
                        continue;
                    };
                    if n < 12 || buf[0] >> 6 != 2 {
                        continue;
                    }
                    let mut keys = srtp.lock().unwrap();
                    let keys = if keyed { keys.as_mut() } else { None };
                    let mut packet = match keys {
                        None => buf[..n].to_vec(),
                        Some((from_relay, _)) => match from_relay.decrypt_rtp(&buf[..n]) {
                            Ok(plain) => plain.to_vec(),
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        },
                    };
                    for byte in &mut packet[8..12] {
                        *byte ^= 0x5a;
                    }
                    if let Some((_, own)) = keys {
                        packet = own.encrypt_rtp(&packet).expect("protects").to_vec();
                    }
                    if rtp.send_to(&packet, from).is_ok() {
                        echoed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        SsrcEcho {
            echoed,
            video_echoed,
            stop,
            srtp,
            failed,
            threads,
        }
    }

    /// SDES from now on: `own` is the PBX's `a=crypto` value, `relay` the relay's.
    fn use_sdes(&self, own: &str, relay: &str) {
        *self.srtp.lock().unwrap() = Some((sdes::context_of(relay), sdes::context_of(own)));
    }
}

impl Drop for SsrcEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Headless Chromium on the test page, its log read for the page's reports.
struct Chromium {
    _process: Background,
    log: PathBuf,
    _profile: tempfile::TempDir,
}

impl Chromium {
    fn open(ns: &NetNs, token: &str, mode: &str) -> Chromium {
        let profile = tempfile::tempdir().expect("a profile directory");
        let log = profile.path().join("chromium.log");
        let page = concat!(env!("CARGO_MANIFEST_DIR"), "/browser/app.html");
        let url = format!(
            "file://{page}#url=wss://{}/&token={token}&mode={mode}",
            EdgeLab::SIGNALLING
        );
        let user_data = format!("--user-data-dir={}", profile.path().display());
        let process = Background::spawn_with_output(
            ns,
            &[
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                // The relay's signalling certificate is self-signed in the lab.
                "--ignore-certificate-errors",
                "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream",
                "--autoplay-policy=no-user-gesture-required",
                "--enable-logging=stderr",
                "--v=0",
                &user_data,
                &url,
            ],
            &log,
        );
        Chromium {
            _process: process,
            log,
            _profile: profile,
        }
    }

    /// Every report the page made so far, in order.
    fn reports(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.split("RELAYTEST:")
            .skip(1)
            .filter_map(|rest| rest.split_once(":END"))
            .filter_map(|(encoded, _)| STANDARD.decode(encoded).ok())
            .filter_map(|json| serde_json::from_slice(&json).ok())
            .collect()
    }

    /// The first report for which `done` holds, within `limit`.
    async fn until(&self, limit: Duration, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(found) = self.reports().into_iter().find(&done) {
                return found;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: String = log.lines().rev().take(40).collect::<Vec<_>>().join("\n");
                panic!(
                    "the browser never reported {what}\nreports: {:?}\nlog (last lines, newest first):\n{tail}",
                    self.reports()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The browser hears the PBX end: audio packets with energy (in a report that also has the
/// transport's remote certificate: getStats may leave it out of a snapshot).
fn hears(report: &Value) -> bool {
    report["kind"] == "stats"
        && report["remoteFingerprint"].is_string()
        && report["audio"]["packetsReceived"].as_u64().unwrap_or(0) >= 100
        && report["audio"]["totalAudioEnergy"].as_f64().unwrap_or(0.0) > 0.0
}

/// The browser sees the PBX end's video: its own camera's VP8 echoed back, decoded.
fn sees(report: &Value) -> bool {
    report["kind"] == "stats"
        && report["video"]["packetsReceived"].as_u64().unwrap_or(0) >= 50
        && report["video"]["framesDecoded"].as_u64().unwrap_or(0) > 0
}

async fn next_event(controller: &mut Socket, name: &str) -> Value {
    until_message(controller, Duration::from_secs(20), 20, name, |event| {
        event["event"] == name
    })
    .await
}

/// What every call must show once the browser hears the PBX.
fn assert_bridged(heard: &Value, relayd: &Relayd, call: u64) {
    assert_eq!(heard["dtls"], "connected", "{heard}");
    let relay_fingerprint = heard["relayFingerprint"]
        .as_str()
        .expect("the relay's a=fingerprint");
    assert_eq!(
        heard["remoteFingerprint"]
            .as_str()
            .map(str::to_ascii_lowercase),
        Some(relay_fingerprint.to_ascii_lowercase()),
        "the browser's DTLS peer is the certificate the relay's SDP named: {heard}"
    );
    assert!(
        relayd
            .log()
            .contains(relay_fingerprint.split(' ').nth(1).unwrap()),
        "relayd logged the fingerprint it offered"
    );
    let status = relayd.ctl_json(&["status"]);
    assert_eq!(
        status["calls_media"]["dtls_fingerprint"].as_str(),
        Some(relay_fingerprint),
        "relayctl status names the certificate: {status}"
    );
    assert!(
        relayd
            .ctl_ok(&["status"])
            .contains("media toward apps dtls-srtp, toward the PBX rtp"),
        "{}",
        relayd.ctl_ok(&["status"])
    );
    let shown = relayd.ctl_json(&["calls", "show", &call.to_string()]);
    assert_eq!(
        (
            shown["app_security"].as_str(),
            shown["pbx_security"].as_str()
        ),
        (Some("dtls-srtp"), Some("rtp")),
        "{shown}"
    );
    assert_eq!(shown["bridged"]["dtls"], "connected", "{shown}");
    assert!(
        shown["to_pbx"]["packets"].as_u64().unwrap() >= 100,
        "{shown}"
    );
    assert!(
        shown["to_app"]["packets"].as_u64().unwrap() >= 100,
        "{shown}"
    );
    assert_eq!(shown["bridged"]["auth_failures"], 0, "{shown}");
    assert!(
        shown["flows"].as_array().unwrap().is_empty(),
        "a bridged call has no forwarding flows: {shown}"
    );
    // Its media is steered to the AF_XDP workers (veth: copy mode), which transcrypt it:
    // from the browser, and from each PBX port that sends (RTP and RTCP apart, video too).
    assert!(
        shown["bridged"]["steered_flows"].as_array().unwrap().len() >= 3,
        "{shown}"
    );
    let workers = &status["datapath"]["transcrypt"];
    assert_eq!(workers["path"], "af_xdp", "{status}");
    assert!(
        workers["counters"]["sent"].as_u64().unwrap() >= 200,
        "the workers carried the call: {status}"
    );
}

/// Waits until the browser hears the PBX end (and sees it, with `video`), checks the call
/// was bridged, hangs it up.
async fn hear_then_hang_up(
    browser: &Chromium,
    controller: &mut Socket,
    relayd: &Relayd,
    id: u64,
    video: bool,
) {
    let heard = browser
        .until(Duration::from_secs(20), "audio from the PBX", hears)
        .await;
    assert_bridged(&heard, relayd, id);
    if video {
        let seen = browser
            .until(Duration::from_secs(20), "video from the PBX", sees)
            .await;
        assert_eq!(seen["dtls"], "connected", "{seen}");
        let shown = relayd.ctl_json(&["calls", "show", &id.to_string()]);
        let stream = &shown["streams"][0];
        assert_eq!(
            (
                stream["media"].as_str(),
                stream["line"].as_u64(),
                stream["pbx"].as_str()
            ),
            (Some("video"), Some(2), Some("10.30.0.2:40002")),
            "{shown}"
        );
        let text = relayd.ctl_ok(&["calls", "show", &id.to_string()]);
        assert!(
            text.contains(&format!("<-> PBX 10.30.0.2:{PBX_VIDEO_PORT} (m-line 2")),
            "{text}"
        );
    }
    let result = request(
        controller,
        json!({"type": "call.hangup", "id": 10 + id, "call": id}),
    )
    .await;
    assert_eq!(result["type"], "result", "{result}");
}

#[test]
fn a_browser_calls_and_is_called_over_dtls_srtp_bridged_to_plain_rtp() {
    require_root();
    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&anchor_config(
        &pins.path,
        "acme",
        API_KEY,
        &format!("consent_timeout_secs = {CONSENT_TIMEOUT_SECS}"),
    ));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let fingerprint = relayd.signalling_fingerprint();
    let echo = SsrcEcho::start(&lab.pbx);
    runtime().block_on(async {
        let mut controller = lab.controller(&fingerprint, "acme", API_KEY).await;
        let token = mint_token(&mut controller, "alice", 300).await;

        // The PBX calls the browser.
        let browser = Chromium::open(&lab.app, &token, "answer");
        browser
            .until(Duration::from_secs(30), "welcome", |r| {
                r["kind"] == "signalling" && r["message"]["type"] == "welcome"
            })
            .await;
        let created = request(
            &mut controller,
            json!({"type": "call.create", "id": 2, "user": "alice", "sdp": pbx_sdp(96)}),
        )
        .await;
        assert_eq!(created["type"], "result", "{created}");
        let id = created["call"].as_u64().unwrap();
        let answered = next_event(&mut controller, "call.answered").await;
        let answer = answered["sdp"].as_str().unwrap();
        assert!(answer.contains("m=audio 40000 RTP/AVP 0"), "{answer}");
        assert!(
            answer.contains("m=video ") && !answer.contains("m=video 0 "),
            "the browser took the video, on a LAN port of its own: {answer}"
        );
        assert!(
            !answer.contains("a=fingerprint"),
            "plain RTP toward the PBX: {answer}"
        );
        let connected = until_call_state(&mut controller, "connected").await;
        assert_eq!(
            (&connected["app_security"], &connected["pbx_security"]),
            (&json!("dtls-srtp"), &json!("rtp")),
            "{connected}"
        );
        // Consent both ways with a real browser, past calls.consent_timeout_secs: the
        // relay answers Chromium's checks (else Chromium's transport stops being writable
        // and its media toward the PBX stops), Chromium answers the relay's (else the relay
        // stops the media toward it, then ends the call).
        browser
            .until(Duration::from_secs(20), "audio from the PBX", hears)
            .await;
        let before = relayd.ctl_json(&["calls", "show", &id.to_string()]);
        tokio::time::sleep(CONSENT_WINDOW).await;
        let after = relayd.ctl_json(&["calls", "show", &id.to_string()]);
        let grew = |direction: &str| {
            after[direction]["packets"].as_u64().unwrap_or(0)
                - before[direction]["packets"].as_u64().unwrap_or(0)
        };
        let expected = CONSENT_WINDOW.as_secs() * 50 * 8 / 10;
        assert!(
            grew("to_pbx") >= expected && grew("to_app") >= expected,
            "media went on both ways for {CONSENT_WINDOW:?} (at least {expected} packets each): {before}\n{after}\n{}",
            relayd.log()
        );
        hear_then_hang_up(&browser, &mut controller, &relayd, id, true).await;
        let ended = browser
            .until(Duration::from_secs(10), "call.ended", |r| {
                r["message"]["event"] == "call.ended"
            })
            .await;
        assert_eq!(
            ended["message"]["reason"], "hangup",
            "the call lasted until the hangup: {ended}"
        );
        drop(browser);

        // The browser calls the PBX: audio and video offered, one BUNDLE transport; the
        // PBX gets each on a port of its own and takes both.
        let browser = Chromium::open(&lab.app, &token, "call");
        let incoming = next_event(&mut controller, "call.incoming").await;
        let offer = incoming["sdp"].as_str().unwrap();
        assert!(
            offer.contains(" RTP/AVP "),
            "plain RTP toward the PBX: {offer}"
        );
        assert!(
            offer.contains("m=video ") && !offer.contains("m=video 0 "),
            "video toward the PBX on a port of its own: {offer}"
        );
        for webrtc in [
            "a=fingerprint",
            "a=setup",
            "a=group",
            "a=ice-ufrag",
            "a=candidate",
        ] {
            assert!(!offer.contains(webrtc), "{webrtc} toward the PBX: {offer}");
        }
        let id = incoming["call"].as_u64().unwrap();
        let answered = request(
            &mut controller,
            json!({"type": "call.answer", "id": 4, "call": id, "sdp": pbx_sdp(vp8_payload_type(offer))}),
        )
        .await;
        assert_eq!(answered["type"], "result", "{answered}");
        hear_then_hang_up(&browser, &mut controller, &relayd, id, true).await;
        drop(browser);

        // An SDES PBX calls the browser: DTLS-SRTP toward it, SDES-SRTP toward the PBX. Its
        // video would need keys of its own toward the PBX: refused, the audio bridged.
        let browser = Chromium::open(&lab.app, &token, "answer");
        browser
            .until(Duration::from_secs(30), "welcome", |r| {
                r["kind"] == "signalling" && r["message"]["type"] == "welcome"
            })
            .await;
        let crypto = sdes::crypto_line(&[0x42; 30]);
        let created = request(
            &mut controller,
            json!({"type": "call.create", "id": 6, "user": "alice", "sdp": pbx_sdp_with(96, Some(&crypto))}),
        )
        .await;
        assert_eq!(created["type"], "result", "{created}");
        let id = created["call"].as_u64().unwrap();
        let answered = next_event(&mut controller, "call.answered").await;
        let answer = answered["sdp"].as_str().unwrap();
        assert!(answer.contains("m=audio 40000 RTP/SAVP 0"), "{answer}");
        assert!(answer.contains("m=video 0 "), "{answer}");
        let relay_crypto = answer
            .split("\r\n")
            .find_map(|line| line.strip_prefix("a=crypto:"))
            .unwrap_or_else(|| panic!("the relay's own key toward the PBX: {answer}"));
        assert!(relay_crypto.starts_with("1 AES_CM_128_HMAC_SHA1_80 inline:"), "{answer}");
        assert_ne!(relay_crypto, crypto, "the relay's key is its own");
        echo.use_sdes(&crypto, relay_crypto);
        let connected = until_call_state(&mut controller, "connected").await;
        assert_eq!(connected["pbx_security"], "sdes-srtp", "{connected}");
        let heard = browser
            .until(Duration::from_secs(20), "audio from the SDES PBX", hears)
            .await;
        assert_eq!(heard["dtls"], "connected", "{heard}");
        let shown = relayd.ctl_json(&["calls", "show", &id.to_string()]);
        assert_eq!(shown["pbx_security"], "sdes-srtp", "{shown}");
        assert_eq!(shown["bridged"]["auth_failures"], 0, "{shown}");
        assert_eq!(
            echo.failed.load(Ordering::Relaxed),
            0,
            "every packet the relay sent the PBX unprotected with its key"
        );
        let result = request(
            &mut controller,
            json!({"type": "call.hangup", "id": 7, "call": id}),
        )
        .await;
        assert_eq!(result["type"], "result", "{result}");
    });
    assert!(
        echo.echoed.load(Ordering::Relaxed) >= 200,
        "the PBX end echoed both calls"
    );
    assert!(
        echo.video_echoed.load(Ordering::Relaxed) >= 100,
        "the PBX end echoed video"
    );
}
