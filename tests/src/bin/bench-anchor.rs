//! `cargo xtask bench anchor`: bridged calls in the edge lab (apps behind the NAT, the relay
//! with WAN and LAN, an RTP echo on the PBX), the relay terminating each leg's security:
//! SDES-SRTP (AES_CM_128_HMAC_SHA1_80) toward the app, plain RTP toward the PBX, every
//! packet transcrypted: by relayd's AF_XDP workers (the XDP program steers the calls' media
//! to them), by relayd on the calls' sockets (`datapath.transcrypt = "sockets"`), and,
//! side by side in the same run, by rtpengine 10.5 in userspace mode
//! (`--table=-1`, Debian `rtpengine-daemon`) bridges the same calls, driven over its ng
//! protocol as Kamailio drives it (`transport-protocol=RTP/SAVP`, SDES toward the app).
//!
//! 0. The SRTP transforms alone (`cargo xtask bench anchor crypto` runs only this): ns per
//!    packet to protect and unprotect, each suite, the relay's beside webrtc-srtp's.
//! 1. Calls: ours through signalling and ICE (each app a signalling session and a
//!    webrtc-ice agent that answers with an SDES key of its own); rtpengine's with an ng
//!    `offer` (the PBX's plain SDP) and `answer` (the app's SDES SDP) each.
//! 2. DTLS-SRTP setup, ours only (rtpengine's per-packet run above uses SDES): apps that
//!    answer with a certificate of their own and run the handshake as the client (the
//!    webrtc-rs `dtls` crate) once ICE has connected; one call at a time, then a wave of
//!    calls created at once.
//! 3. Concurrent calls: with every call up, one paced generator (a raw socket in the app's
//!    namespace) sends each call's RTP at 50 packets/s, SRTP-protected per packet with the
//!    call's own key (webrtc-srtp), on the call's 5-tuple through the NAT; the relay
//!    unprotects it for the PBX, the PBX echoes, the relay protects the echo for the app:
//!    50 packets/s each way per call. Counted by nftables at the NAT (toward the relay,
//!    back to the app) and at the PBX; the echo toward the app is dropped (counted) when it
//!    reaches the app's host, so no app reads it. Loss each way, the relay's CPU (its
//!    process, workers included, plus the XDP program's run time from bpf_stats), and its
//!    CPU per bridged packet (both directions).

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use relay_tests::{
    app::App,
    bench::{Controller, PbxEcho, add_counter, counter, loss, percentile},
    config_file::ConfigFile,
    dtls_app::{dtls_answer, fingerprint, handshake},
    generator::paced_udp_each,
    lab::{APPS_BEHIND_ONE_NAT, EdgeLab, anchor_config},
    measure::{host_busy_ns, process_cpu_ns, process_user_ns, sysctl_bpf_stats, xdp_run_stats},
    netns::{PinDir, enter_by_name},
    ng::NgClient,
    relayd::Relayd,
    require_root,
    rtpengine::Rtpengine,
    sdes,
    signalling_client::{receive_within, send},
};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::json;
use webrtc_srtp::context::Context;

const API_KEY: &str = "bench-api-key-0123456789";
const PBX_OFFER: &str = relay_tests::pbx::SDP;
const CALLS: usize = 1000;
/// `bench-anchor N`: at most N calls (a quick look); default CALLS. A second argument
/// runs only the relays whose name has it (`af_xdp`, `sockets`, `rtpengine`), without the
/// DTLS setup part.
fn max_calls() -> usize {
    std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(CALLS)
}
/// Calls set up at once (signalling requests in flight).
const WAVE: usize = 100;
/// Steps up to the calls set up: 2000 only with `bench-anchor 2000` (the port range's
/// room), which rtpengine and the sockets do not keep up with on these 2 cores.
const STEPS: [usize; 6] = [50, 100, 250, 500, 1000, 2000];
const STEP_SECS: u64 = 10;
/// 172-byte RTP (20 ms of PCMU), 182 bytes in SRTP with its 10-byte tag: the UDP lengths
/// the counters match.
const RTP_LENGTH: usize = 172;
const RTP_UDP_LENGTH: usize = RTP_LENGTH + 8;
const SRTP_UDP_LENGTH: usize = RTP_LENGTH + 10 + 8;
/// rtpengine's ng listener in the relay's namespace.
const RTPENGINE_NG: &str = "127.0.0.1:22223";
/// The NAT's public address, which the relays see the apps' packets come from.
const NAT_PUBLIC: &str = "198.51.100.2";

#[derive(Clone, Copy, PartialEq)]
enum Relay {
    /// relayd with its AF_XDP workers (`datapath.transcrypt = "af_xdp"`).
    Workers,
    /// relayd transcrypting on the calls' sockets (`datapath.transcrypt = "sockets"`).
    Sockets,
    Rtpengine,
}

impl Relay {
    fn name(self) -> &'static str {
        match self {
            Relay::Workers => "relayd/af_xdp",
            Relay::Sockets => "relayd/sockets",
            Relay::Rtpengine => "rtpengine",
        }
    }
}

/// One bridged call as the generator sees it: the app's source (in its namespace), where
/// the relay takes the app's media, and the app's SRTP key.
struct BridgedCall {
    app: SocketAddrV4,
    relay: SocketAddrV4,
    key: [u8; 30],
}

struct Step {
    calls: usize,
    offered_pps: f64,
    loss_to_pbx: f64,
    loss_to_app: f64,
    /// relayd's or rtpengine's process CPU (workers included), plus the XDP program's run
    /// time (bpf_stats).
    relay_cpu_percent: f64,
    /// The relay's CPU time per packet it bridged (toward the PBX and toward the app).
    relay_us_per_packet: f64,
    /// The XDP program's run time per packet it saw (bpf_stats), part of the above.
    xdp_ns_per_packet: f64,
    /// The relay's user-mode CPU per bridged packet: its own work (crypto, rewriting,
    /// polling rings), without the system calls and what the kernel runs inside them (on
    /// veth, the receiving namespace's stack runs in the sender's system call).
    user_us_per_packet: f64,
    host_cpu_percent: f64,
}

struct Run {
    /// Calls up, and how long setting them all up took.
    calls: usize,
    setup_secs: f64,
    steps: Vec<Step>,
}

/// DTLS setup: calls set up one at a time, then a wave of calls created at once.
const DTLS_SEQUENTIAL: usize = 20;
const DTLS_WAVE: usize = 100;

/// What DTLS setup took: ms from the app's ICE connected to its SRTP keys (the
/// handshake), and from `call.create` to the keys.
#[derive(Default)]
struct DtlsSetup {
    one_handshake_ms: Vec<f64>,
    one_create_to_keys_ms: Vec<f64>,
    wave_handshake_ms: Vec<f64>,
    /// From the wave's first `call.create` to the last call's keys.
    wave_secs: f64,
    failed: usize,
}

fn main() {
    print_crypto();
    if std::env::args().nth(1).as_deref() == Some("crypto") {
        return;
    }
    require_root();
    let mut results = Vec::new();
    // `bench-anchor N NAME`: only the relays whose name contains NAME (e.g. af_xdp).
    let only = std::env::args().nth(2).unwrap_or_default();
    for relay in [Relay::Workers, Relay::Sockets, Relay::Rtpengine]
        .into_iter()
        .filter(|relay| relay.name().contains(&only))
    {
        eprintln!("bench anchor: {}", relay.name());
        results.push((relay, run(relay)));
    }
    print_tables(&results);
    if only.is_empty() {
        eprintln!("bench anchor: DTLS-SRTP setup with relayd");
        print_dtls(&run_dtls_setup());
    }
}

/// The SRTP transforms alone, on one core, no I/O: 172-byte RTP packets (20 ms of PCMU)
/// protected, then the results unprotected, in each suite: the relay's own transforms
/// beside webrtc-srtp's contexts (which the test apps use).
fn print_crypto() {
    use relay::media::{Crypto, SrtpSession, Suite};
    use webrtc_srtp::protection_profile::ProtectionProfile;
    const PACKETS: u32 = 200_000;
    let packets: Vec<Vec<u8>> = (0..PACKETS)
        .map(|n| {
            let mut packet = relay_tests::traffic::numbered(n);
            packet[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            packet
        })
        .collect();
    let per_packet = |started: Instant| started.elapsed().as_nanos() / u128::from(PACKETS);
    println!("\nSRTP crypto alone: ns per 172-byte RTP packet ({PACKETS} packets, one core)\n");
    println!(
        "| suite | relay protect | relay unprotect | relay in place: protect | unprotect | webrtc-srtp protect | webrtc-srtp unprotect |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for suite in Suite::ALL {
        let keys = Crypto::generate(1, suite);
        let both = (keys.key(), keys.salt());
        let (mut sender, mut receiver) = (
            SrtpSession::new(suite, both, both).expect("keys"),
            SrtpSession::new(suite, both, both).expect("keys"),
        );
        let started = Instant::now();
        let protected: Vec<_> = packets
            .iter()
            .map(|packet| {
                sender
                    .protect(std::hint::black_box(packet))
                    .expect("protect")
            })
            .collect();
        let relay_protect = per_packet(started);
        let started = Instant::now();
        for packet in &protected {
            std::hint::black_box(receiver.unprotect(packet).expect("unprotect"));
        }
        let relay_unprotect = per_packet(started);
        // In place, as a bridge carries its packets: no allocation per packet.
        let (mut sender, mut receiver) = (
            SrtpSession::new(suite, both, both).expect("keys"),
            SrtpSession::new(suite, both, both).expect("keys"),
        );
        let mut buffers: Vec<(Vec<u8>, usize)> = packets
            .iter()
            .map(|packet| {
                let mut buf = packet.clone();
                buf.resize(packet.len() + relay::media::srtp::MAX_OVERHEAD, 0);
                (buf, packet.len())
            })
            .collect();
        let started = Instant::now();
        for (buf, len) in &mut buffers {
            *len = sender
                .protect_in_place(std::hint::black_box(buf), *len)
                .expect("protect");
        }
        let in_place_protect = per_packet(started);
        let started = Instant::now();
        for (buf, len) in &mut buffers {
            std::hint::black_box(
                receiver
                    .unprotect_in_place(std::hint::black_box(buf), *len)
                    .expect("unprotect"),
            );
        }
        let in_place_unprotect = per_packet(started);
        let profile = match suite {
            Suite::AeadAes128Gcm => ProtectionProfile::AeadAes128Gcm,
            Suite::AesCm128HmacSha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
            Suite::AesCm128HmacSha1_32 => ProtectionProfile::Aes128CmHmacSha1_32,
        };
        let context = || Context::new(keys.key(), keys.salt(), profile, None, None).expect("keys");
        let (mut encrypt, mut decrypt) = (context(), context());
        let started = Instant::now();
        let protected: Vec<_> = packets
            .iter()
            .map(|packet| {
                encrypt
                    .encrypt_rtp(std::hint::black_box(packet))
                    .expect("encrypt")
            })
            .collect();
        let webrtc_protect = per_packet(started);
        let started = Instant::now();
        for packet in &protected {
            std::hint::black_box(decrypt.decrypt_rtp(packet).expect("decrypt"));
        }
        let webrtc_unprotect = per_packet(started);
        println!(
            "| {} | {relay_protect} | {relay_unprotect} | {in_place_protect} | {in_place_unprotect} | {webrtc_protect} | {webrtc_unprotect} |",
            suite.sdes_name()
        );
    }
}

fn run(relay: Relay) -> Run {
    let lab = EdgeLab::new();
    let _echo = PbxEcho::start(&lab.pbx);
    add_counter(
        &lab.nat,
        "forward",
        "to_relay",
        &format!(
            "udp length {SRTP_UDP_LENGTH} ip daddr {}",
            EdgeLab::RELAY_WAN
        ),
    );
    add_counter(
        &lab.nat,
        "forward",
        "to_app",
        &format!(
            "udp length {SRTP_UDP_LENGTH} ip saddr {}",
            EdgeLab::RELAY_WAN
        ),
    );
    add_counter(
        &lab.pbx,
        "input",
        "at_pbx",
        &format!("udp length {RTP_UDP_LENGTH} udp dport 40000"),
    );
    // The app's host drops the relayed SRTP before any socket: what reached it is counted
    // at the NAT, and no app spends CPU on it.
    lab.app.exec(&[
        "nft",
        &format!(
            "add table ip sink; add chain ip sink input {{ type filter hook input priority 0; }}; add rule ip sink input udp length {SRTP_UDP_LENGTH} counter drop"
        ),
    ]);
    match relay {
        Relay::Workers => run_ours(&lab, "af_xdp"),
        Relay::Sockets => run_ours(&lab, "sockets"),
        Relay::Rtpengine => run_rtpengine(&lab),
    }
}

/// relayd's configuration for the edge lab with LAN ports for 2,000 calls, no stats events,
/// and `extra` lines in `[calls]`; transcrypted media on `transcrypt` (`datapath.transcrypt`).
fn bench_config(pins: &PinDir, extra: &str, transcrypt: &str) -> ConfigFile {
    let config = anchor_config(
        &pins.path,
        "acme",
        API_KEY,
        &format!(
            "port_range = \"40000-43999\"\nice_timeout_secs = 60\nstats_interval_secs = 0\n{extra}{APPS_BEHIND_ONE_NAT}"
        ),
    )
    // Waves of calls send the controller bursts of results and events.
    .replace("[signalling]\n", "[signalling]\nqueue_length = 4096\n")
    .replace(
        "[datapath]\n",
        &format!("[datapath]\ntranscrypt = \"{transcrypt}\"\n"),
    );
    ConfigFile::new(&config)
}

/// relayd with `calls.app_media = "sdes-srtp"`: the PBX's plain offer reaches each app as
/// RTP/SAVPF with a key of the relay's; the app answers with its own.
fn run_ours(lab: &EdgeLab, transcrypt: &str) -> Run {
    let pins = PinDir::new();
    let config = bench_config(
        &pins,
        "app_media = \"sdes-srtp\"\nmedia_timeout_secs = 600",
        transcrypt,
    );
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let fingerprint = relayd.signalling_fingerprint();

    let Controller {
        runtime,
        socket: mut controller,
        tokens,
    } = Controller::connect(lab, &fingerprint, API_KEY, "user", max_calls());

    // The apps, in their namespace on a thread of their own.
    let (calls_tx, calls_rx) = std::sync::mpsc::channel::<BridgedCall>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let done = Arc::new(AtomicBool::new(false));
    let apps = {
        let (app_ns, fingerprint, done) = (lab.app.name.clone(), fingerprint.clone(), done.clone());
        thread::spawn(move || {
            enter_by_name(&app_ns);
            relay_tests::runtime().block_on(run_apps(tokens, fingerprint, ready_tx, calls_tx, done))
        })
    };
    let mut ready = 0;
    while ready < max_calls() && ready_rx.recv_timeout(Duration::from_secs(120)).is_ok() {
        ready += 1;
    }
    eprintln!("bench anchor: {ready} apps connected");

    let started = Instant::now();
    runtime.block_on(async {
        let mut request_id = 100_000;
        for wave in (0..max_calls()).collect::<Vec<_>>().chunks(WAVE) {
            for user in wave {
                request_id += 1;
                send(
                    &mut controller,
                    json!({"type": "call.create", "id": request_id, "user": format!("user{user}"), "sdp": PBX_OFFER}),
                )
                .await;
            }
            let mut answered = 0;
            while answered < wave.len() {
                let Ok(message) = receive_within(&mut controller, Duration::from_secs(60)).await
                else {
                    break;
                };
                match (message["type"].as_str(), message["event"].as_str()) {
                    (Some("event"), Some("call.answered")) => answered += 1,
                    (Some("error"), _) => eprintln!("bench anchor: {message}"),
                    _ => {}
                }
            }
        }
    });
    let mut calls = Vec::new();
    while calls.len() < max_calls() {
        match calls_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(call) => calls.push(call),
            Err(_) => break,
        }
    }
    let setup_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "bench anchor: {} bridged calls up in {setup_secs:.1} s",
        calls.len()
    );
    let steps = load_steps(lab, relayd.pid(), &calls);
    let transcrypt = &relayd.ctl_json(&["status"])["datapath"]["transcrypt"];
    eprintln!(
        "bench anchor: transcrypted on {}: {}",
        transcrypt["path"], transcrypt["counters"]
    );
    done.store(true, Ordering::Relaxed);
    let _ = apps.join();
    drop(controller);
    Run {
        calls: calls.len(),
        setup_secs,
        steps,
    }
}

/// Every app connects, answers its call with an SDES key of its own (the relay's offer's
/// tag), tells its ICE address and key once the relay says `connected`, and stays (ICE
/// consent) until `done`.
async fn run_apps(
    tokens: Vec<String>,
    fingerprint: String,
    ready: std::sync::mpsc::Sender<()>,
    calls: std::sync::mpsc::Sender<BridgedCall>,
    done: Arc<AtomicBool>,
) {
    let connecting = Arc::new(tokio::sync::Semaphore::new(20));
    let mut tasks = Vec::new();
    for token in tokens {
        let (fingerprint, ready, calls, done, connecting) = (
            fingerprint.clone(),
            ready.clone(),
            calls.clone(),
            done.clone(),
            connecting.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut app = {
                let _permit = connecting.acquire().await.unwrap();
                App::in_edge_lab(&fingerprint, &token).await
            };
            let _ = ready.send(());
            let incoming = app.next_within(Duration::from_secs(600)).await;
            let key = random_key();
            let own = sdes::crypto_line(&key);
            let media = app
                .answer_edited(
                    &incoming,
                    |answer| sdes::with_crypto(&answer, &own),
                    Some("connected"),
                )
                .await;
            if let Ok(SocketAddr::V4(local)) = media.local_addr() {
                let _ = calls.send(BridgedCall {
                    app: local,
                    relay: EdgeLab::ICE.parse().unwrap(),
                    key,
                });
            }
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            app.close().await;
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

/// rtpengine in the relay's namespace, in userspace (no kernel table), one interface on
/// each side; each call an ng offer from the PBX side and the app's SDES answer.
fn run_rtpengine(lab: &EdgeLab) -> Run {
    let rtpengine = Rtpengine::start(
        &lab.relay,
        &[
            &format!("wan/{}", EdgeLab::RELAY_WAN),
            &format!("lan/{}", EdgeLab::RELAY_LAN),
        ],
        RTPENGINE_NG,
        (30000, 39999),
        // Calls idle for the steps they are not in are not timed out.
        &[
            "--timeout=600",
            "--silent-timeout=600",
            "--offer-timeout=600",
            "--log-level=5",
        ],
    );
    let mut ng = NgClient::new(&lab.relay, RTPENGINE_NG.parse().unwrap());
    let started = Instant::now();
    let mut calls = Vec::new();
    for n in 0..max_calls() {
        match rtpengine_call(&mut ng, n) {
            Ok(call) => calls.push(call),
            Err(err) => {
                eprintln!("bench anchor: rtpengine call {n}: {err:#}");
                break;
            }
        }
    }
    let setup_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "bench anchor: {} rtpengine calls up in {setup_secs:.1} s",
        calls.len()
    );
    let steps = load_steps(lab, rtpengine.pid(), &calls);
    Run {
        calls: calls.len(),
        setup_secs,
        steps,
    }
}

/// One call through rtpengine: the PBX's offer made SDES toward the app, the app's SDES
/// answer made plain toward the PBX.
fn rtpengine_call(ng: &mut NgClient, n: usize) -> anyhow::Result<BridgedCall> {
    let call_id = format!("bench-{n}");
    let offer = ng.request(&json!({
        "command": "offer",
        "call-id": call_id,
        "from-tag": format!("pbx-{n}"),
        "sdp": PBX_OFFER,
        "transport-protocol": "RTP/SAVP",
        "direction": ["lan", "wan"],
        "ICE": "remove",
        "DTLS": "off",
        "SDES": ["only-AES_CM_128_HMAC_SHA1_80"],
        "flags": ["trust-address"],
    }))?;
    let sdp = offer["sdp"].as_str().unwrap_or_default();
    let relay = match relay::session::sdp::audio(sdp)?.rtp {
        SocketAddr::V4(relay) => relay,
        SocketAddr::V6(relay) => anyhow::bail!("rtpengine offered {relay}"),
    };
    let tag = sdp
        .lines()
        .filter_map(|line| line.strip_prefix("a=crypto:"))
        .find(|crypto| crypto.contains(" AES_CM_128_HMAC_SHA1_80 "))
        .and_then(|crypto| crypto.split_whitespace().next())
        .ok_or_else(|| anyhow::anyhow!("no AES_CM_128_HMAC_SHA1_80 key in {sdp}"))?
        .to_owned();
    let key = random_key();
    let port = 20000 + n as u16;
    let crypto = sdes::crypto_line(&key).replacen("1 ", &format!("{tag} "), 1);
    let answer = format!(
        "v=0\r\no=app 1 1 IN IP4 {NAT_PUBLIC}\r\ns=-\r\nc=IN IP4 {NAT_PUBLIC}\r\nt=0 0\r\nm=audio {port} RTP/SAVP 0 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\na=crypto:{crypto}\r\n"
    );
    ng.request(&json!({
        "command": "answer",
        "call-id": call_id,
        "from-tag": format!("pbx-{n}"),
        "to-tag": format!("app-{n}"),
        "sdp": answer,
        "transport-protocol": "RTP/AVP",
        "flags": ["trust-address"],
    }))?;
    Ok(BridgedCall {
        app: SocketAddrV4::new(EdgeLab::APP.parse().unwrap(), port),
        relay,
        key,
    })
}

/// relayd with its default media security toward the app (DTLS-SRTP): how long each
/// call's handshake takes, alone and in a wave.
fn run_dtls_setup() -> DtlsSetup {
    let lab = EdgeLab::new();
    let _echo = PbxEcho::start(&lab.pbx);
    let pins = PinDir::new();
    let config = bench_config(&pins, "", "af_xdp");
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let fingerprint = relayd.signalling_fingerprint();
    let users = DTLS_SEQUENTIAL + DTLS_WAVE;
    let Controller {
        runtime,
        socket: mut controller,
        tokens,
    } = Controller::connect(&lab, &fingerprint, API_KEY, "dtls", users);
    // Each app reports its handshake's duration and when its keys were there (or that it
    // failed).
    let (keys_tx, keys_rx) = std::sync::mpsc::channel::<Option<(Duration, Instant)>>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let done = Arc::new(AtomicBool::new(false));
    let apps = {
        let (app_ns, fingerprint, done) = (lab.app.name.clone(), fingerprint.clone(), done.clone());
        thread::spawn(move || {
            enter_by_name(&app_ns);
            relay_tests::runtime().block_on(run_dtls_apps(
                tokens,
                fingerprint,
                ready_tx,
                keys_tx,
                done,
            ))
        })
    };
    let mut ready = 0;
    while ready < users && ready_rx.recv_timeout(Duration::from_secs(60)).is_ok() {
        ready += 1;
    }
    let mut setup = DtlsSetup::default();
    let mut request_id = 200_000;
    let mut create = |controller: &mut relay_tests::signalling_client::Socket, user: usize| {
        request_id += 1;
        runtime.block_on(send(
            controller,
            json!({"type": "call.create", "id": request_id, "user": format!("dtls{user}"), "sdp": PBX_OFFER}),
        ));
    };
    for user in 0..DTLS_SEQUENTIAL {
        let created = Instant::now();
        create(&mut controller, user);
        match keys_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Some((handshake, keys))) => {
                setup
                    .one_handshake_ms
                    .push(handshake.as_secs_f64() * 1000.0);
                setup
                    .one_create_to_keys_ms
                    .push((keys - created).as_secs_f64() * 1000.0);
            }
            _ => setup.failed += 1,
        }
    }
    let started = Instant::now();
    for user in DTLS_SEQUENTIAL..users {
        create(&mut controller, user);
    }
    let mut last = started;
    for _ in 0..DTLS_WAVE {
        match keys_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Some((handshake, keys))) => {
                setup
                    .wave_handshake_ms
                    .push(handshake.as_secs_f64() * 1000.0);
                last = last.max(keys);
            }
            _ => setup.failed += 1,
        }
    }
    setup.wave_secs = (last - started).as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = apps.join();
    drop(controller);
    setup
}

/// Every app connects, answers its call with its own certificate (`a=setup:active`), runs
/// ICE and then the DTLS handshake as the client, and reports how long the handshake took.
async fn run_dtls_apps(
    tokens: Vec<String>,
    signalling_fingerprint: String,
    ready: std::sync::mpsc::Sender<()>,
    keys: std::sync::mpsc::Sender<Option<(Duration, Instant)>>,
    done: Arc<AtomicBool>,
) {
    let mut tasks = Vec::new();
    for token in tokens {
        let (signalling_fingerprint, ready, keys, done) = (
            signalling_fingerprint.clone(),
            ready.clone(),
            keys.clone(),
            done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut app = App::in_edge_lab(&signalling_fingerprint, &token).await;
            let _ = ready.send(());
            let incoming = app.next_within(Duration::from_secs(600)).await;
            let certificate =
                dtls::crypto::Certificate::generate_self_signed(vec!["app".to_owned()])
                    .expect("a certificate");
            let own = fingerprint(certificate.certificate[0].as_ref());
            let media = app
                .answer_edited(&incoming, |answer| dtls_answer(answer, &own), None)
                .await;
            let connected = Instant::now();
            let result = handshake(media, certificate).await;
            let _ = keys.send(
                result
                    .as_ref()
                    .ok()
                    .map(|_| (connected.elapsed(), Instant::now())),
            );
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            drop(result);
            app.close().await;
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}

fn print_dtls(setup: &DtlsSetup) {
    println!();
    println!(
        "DTLS-SRTP setup with relayd (the app the client, ECDSA P-256, AES_CM_128_HMAC_SHA1_80): handshake = the app's ICE connected -> its SRTP keys"
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "", "p50 ms", "p90 ms", "calls"
    );
    for (what, values) in [
        ("one at a time: handshake", &setup.one_handshake_ms),
        ("one at a time: create->keys", &setup.one_create_to_keys_ms),
        ("wave of 100: handshake", &setup.wave_handshake_ms),
    ] {
        println!(
            "{what:<28} {:>10.1} {:>10.1} {:>10}",
            percentile(values, 0.5),
            percentile(values, 0.9),
            values.len()
        );
    }
    println!(
        "wave of {DTLS_WAVE}: all keys {:.2} s after the first call.create; {} calls failed",
        setup.wave_secs, setup.failed
    );
}

fn random_key() -> [u8; 30] {
    let mut key = [0u8; 30];
    SystemRandom::new().fill(&mut key).expect("random bytes");
    key
}

/// What the generator keeps per call: its SRTP context and where its stream is.
struct Stream {
    srtp: Context,
    ssrc: u32,
    sequence: u16,
}

impl Stream {
    /// The call's next RTP packet (PT 0, 160 bytes of PCMU silence), protected.
    fn next_packet(&mut self) -> Vec<u8> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut rtp = vec![0xffu8; RTP_LENGTH];
        rtp[0] = 0x80;
        rtp[1] = 0;
        rtp[2..4].copy_from_slice(&self.sequence.to_be_bytes());
        rtp[4..8].copy_from_slice(&(u32::from(self.sequence) * 160).to_be_bytes());
        rtp[8..12].copy_from_slice(&self.ssrc.to_be_bytes());
        self.srtp
            .encrypt_rtp(&rtp)
            .expect("an RTP packet to protect")
            .to_vec()
    }
}

/// 50 packets/s per call on the first `calls` calls' 5-tuples, STEP_SECS each step.
fn load_steps(lab: &EdgeLab, relay_pid: u32, calls: &[BridgedCall]) -> Vec<Step> {
    let streams: Vec<Stream> = calls
        .iter()
        .enumerate()
        .map(|(n, call)| Stream {
            srtp: sdes::context(&call.key),
            ssrc: 0x5000_0000 + n as u32,
            sequence: 0,
        })
        .collect();
    // The generator's thread protects each packet; the streams go on from step to step.
    let streams = Arc::new(Mutex::new(streams));
    let mut steps = Vec::new();
    sysctl_bpf_stats(true);
    for n in STEPS.into_iter().filter(|n| *n <= calls.len()) {
        let flows: Vec<(SocketAddrV4, SocketAddrV4)> = calls[..n]
            .iter()
            .map(|call| (call.app, call.relay))
            .collect();
        let pps = n as u64 * 50;
        eprintln!("bench anchor: {n} calls, {pps} packets/s each way");
        let before = (
            counter(&lab.nat, "to_relay"),
            counter(&lab.pbx, "at_pbx"),
            counter(&lab.nat, "to_app"),
        );
        let cpu_before = process_cpu_ns(relay_pid);
        let user_before = process_user_ns(relay_pid);
        let xdp_before = xdp_run_stats().unwrap_or_default();
        let host_before = host_busy_ns();
        let sent = {
            let streams = streams.clone();
            paced_udp_each(
                &lab.app,
                &flows,
                move |index| streams.lock().unwrap()[index].next_packet(),
                pps,
                Duration::from_secs(STEP_SECS),
            )
        };
        thread::sleep(Duration::from_millis(500));
        let elapsed = sent.elapsed_secs;
        let xdp_after = xdp_run_stats().unwrap_or_default();
        let (xdp_ns, xdp_runs) = (xdp_after.0 - xdp_before.0, xdp_after.1 - xdp_before.1);
        let cpu = process_cpu_ns(relay_pid) - cpu_before + xdp_ns;
        let user = process_user_ns(relay_pid) - user_before;
        let host = host_busy_ns() - host_before;
        let to_relay = counter(&lab.nat, "to_relay") - before.0;
        let at_pbx = counter(&lab.pbx, "at_pbx") - before.1;
        let to_app = counter(&lab.nat, "to_app") - before.2;
        steps.push(Step {
            calls: n,
            offered_pps: to_relay as f64 / elapsed,
            loss_to_pbx: loss(to_relay, at_pbx),
            loss_to_app: loss(at_pbx, to_app),
            relay_cpu_percent: cpu as f64 / (elapsed * 1e9) * 100.0,
            relay_us_per_packet: cpu as f64 / 1e3 / (at_pbx + to_app).max(1) as f64,
            xdp_ns_per_packet: xdp_ns as f64 / xdp_runs.max(1) as f64,
            user_us_per_packet: user as f64 / 1e3 / (at_pbx + to_app).max(1) as f64,
            host_cpu_percent: host as f64 / (elapsed * 1e9 * 2.0) * 100.0,
        });
    }
    sysctl_bpf_stats(false);
    steps
}

fn print_tables(results: &[(Relay, Run)]) {
    println!(
        "Bridged calls: SDES-SRTP (AES_CM_128_HMAC_SHA1_80) toward the app, plain RTP toward the PBX; 50 packets/s each way per call (paced generator protecting per packet, the PBX echoes), {STEP_SECS} s per step"
    );
    for (relay, run) in results {
        println!(
            "{}: {} calls set up in {:.1} s",
            relay.name(),
            run.calls,
            run.setup_secs
        );
    }
    println!(
        "{:<15} {:>6} {:>12} {:>12} {:>12} {:>10} {:>15} {:>11} {:>12} {:>9}",
        "relay",
        "calls",
        "offered pps",
        "loss to PBX",
        "loss to app",
        "relay CPU",
        "us/bridged pkt",
        "XDP ns/pkt",
        "user us/pkt",
        "host CPU"
    );
    for (relay, run) in results {
        for step in &run.steps {
            println!(
                "{:<15} {:>6} {:>12.0} {:>11.3}% {:>11.3}% {:>9.1}% {:>15.2} {:>11.0} {:>12.2} {:>8.1}%",
                relay.name(),
                step.calls,
                step.offered_pps,
                step.loss_to_pbx * 100.0,
                step.loss_to_app * 100.0,
                step.relay_cpu_percent,
                step.relay_us_per_packet,
                step.xdp_ns_per_packet,
                step.user_us_per_packet,
                step.host_cpu_percent,
            );
        }
    }
    for (relay, run) in results {
        let sustained = run
            .steps
            .iter()
            .filter(|step| step.loss_to_pbx <= 0.0 && step.loss_to_app <= 0.0)
            .map(|step| step.calls)
            .max();
        println!(
            "{}: most concurrent bridged calls without loss: {}",
            relay.name(),
            sustained.map_or("none of the steps".to_owned(), |calls| calls.to_string())
        );
    }
}
