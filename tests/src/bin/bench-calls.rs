//! `cargo xtask bench calls`: calls through signalling and ICE in the edge lab (apps behind
//! the NAT, the relay with WAN and LAN, an RTP echo on the PBX), side by side with the media
//! in XDP and in the relay's userspace path (the same relayd with `datapath.mode =
//! "userspace"`).
//!
//! 1. Call setup: the controller creates calls to apps that are connected and waiting (each a
//!    signalling session and a webrtc-ice agent); each app answers, runs ICE and sends RTP at
//!    50 packets/s from the moment its agent is connected. Setup time: `call.create` sent ->
//!    the call's first RTP packet at the PBX. First one call at a time (latency), then waves
//!    of calls created at once (setups per second). The flows' kernel counters tell how many
//!    of the first packets XDP forwarded.
//! 2. Concurrent calls: with every call up, a paced generator (a raw socket) sends RTP at 50
//!    packets/s per call on the calls' own 5-tuples (through the NAT's mappings), the PBX echoes each packet: 50/s each
//!    way per call. Counted by nftables counters at the NAT (toward the relay, back to the
//!    app) and at the PBX; loss each way, relayd's CPU, XDP's run time.

use std::{
    collections::HashMap,
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, atomic::Ordering},
    thread,
    time::{Duration, Instant},
};

use relay_tests::{
    bench::{Controller, PbxEcho, add_call_counters, counter, loss, percentile},
    config_file::ConfigFile,
    fleet::{self, Fleet},
    generator::paced_udp,
    lab::{APPS_BEHIND_ONE_NAT, EdgeLab, calls_config},
    measure::{host_busy_ns, process_cpu_ns, sysctl_bpf_stats, xdp_run_stats},
    netns::{PinDir, enter_by_name},
    relayd::Relayd,
    require_root,
    signalling_client::{Socket, receive_within, send},
    traffic::numbered,
};
use serde_json::json;

const API_KEY: &str = "bench-api-key-0123456789";
const PBX_OFFER: &str = relay_tests::pbx::SDP;
/// Calls set up one at a time, then in waves of WAVE, up to CALLS in all.
const SEQUENTIAL: usize = 20;
const WAVE: usize = 100;
const CALLS: usize = 1000;
/// `bench-calls N`: at most N calls (a quick look); default CALLS.
fn max_calls() -> usize {
    std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(CALLS)
}
/// Concurrent calls carrying media, 50 packets/s each way each (0: every call connected and
/// silent, what the calls cost the relay by themselves).
const STEPS: [usize; 6] = [0, 50, 100, 250, 500, 1000];
const STEP_SECS: u64 = 10;
const SETTLE_SECS: u64 = 5;
/// UDP length of the RTP packets (172-byte payload): what the counters match.
const RTP_UDP_LENGTH: u32 = 180;

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Xdp,
    Userspace,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Xdp => "XDP",
            Path::Userspace => "userspace",
        }
    }
}

struct Setup {
    /// One at a time: ms from call.create to the first RTP at the PBX.
    latencies_ms: Vec<f64>,
    /// Waves: calls set up per second (create of the first -> first RTP of the last).
    waves_per_sec: Vec<f64>,
    calls: usize,
    first_packet_in_xdp: usize,
}

struct Step {
    calls: usize,
    offered_pps: f64,
    loss_to_pbx: f64,
    loss_to_app: f64,
    relayd_cpu_percent: f64,
    host_cpu_percent: f64,
    xdp_ns_per_packet: Option<f64>,
}

fn main() {
    require_root();
    let mut results = Vec::new();
    // `bench-calls N xdp`: the XDP path only (what relayd's own cost is measured on).
    let paths: &[Path] = match std::env::args().nth(2).as_deref() {
        Some("xdp") => &[Path::Xdp],
        _ => &[Path::Xdp, Path::Userspace],
    };
    for &path in paths {
        eprintln!("bench calls: media in {}", path.name());
        results.push((path, run(path)));
    }
    print_tables(&results);
}

fn run(path: Path) -> (Setup, Vec<Step>) {
    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let mut config = calls_config(
        &pins.path,
        "acme",
        API_KEY,
        &format!(
            "port_range = \"40000-43999\"\nice_timeout_secs = 60\nmedia_timeout_secs = 600\nstats_interval_secs = 0{APPS_BEHIND_ONE_NAT}"
        ),
    )
    // Waves of calls send the controller bursts of results and events.
    .replace("[signalling]\n", "[signalling]\nqueue_length = 4096\n");
    if path == Path::Userspace {
        config = config.replace("mode = \"xdp\"", "mode = \"userspace\"");
    }
    let config = ConfigFile::new(&config);
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let fingerprint = relayd.signalling_fingerprint();
    let echo = PbxEcho::start(&lab.pbx);
    add_call_counters(&lab, RTP_UDP_LENGTH);

    let Controller {
        runtime,
        socket: mut controller,
        tokens,
    } = Controller::connect(&lab, &fingerprint, API_KEY, "user", max_calls());

    // The apps, in their namespace on a thread of their own: connected and waiting.
    let (addresses_tx, addresses) = std::sync::mpsc::channel::<SocketAddr>();
    let fleet = Arc::new(Fleet::default());
    let apps = {
        let (app_ns, fingerprint, fleet) =
            (lab.app.name.clone(), fingerprint.clone(), fleet.clone());
        thread::spawn(move || {
            enter_by_name(&app_ns);
            let steady = tokens.len();
            relay_tests::runtime().block_on(fleet::run(
                tokens,
                steady,
                fingerprint,
                addresses_tx,
                fleet,
            ))
        })
    };
    let waiting = Instant::now();
    while fleet.connected.load(Ordering::Relaxed) < max_calls() as u64
        && waiting.elapsed() < Duration::from_secs(120)
    {
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "bench calls: {} apps connected in {:.1} s",
        fleet.connected.load(Ordering::Relaxed),
        waiting.elapsed().as_secs_f64()
    );

    let mut setup = runtime.block_on(set_up_calls(&mut controller, &echo));
    // Each app tells its address once it has talked for its second.
    let mut app_addresses = Vec::new();
    while app_addresses.len() < max_calls() {
        match addresses.recv_timeout(Duration::from_secs(30)) {
            Ok(address) => app_addresses.push(address),
            Err(_) => break,
        }
    }
    thread::sleep(Duration::from_millis(300));
    (setup.first_packet_in_xdp, setup.calls) = first_packets_in_xdp(&relayd, &echo);
    eprintln!("bench calls: {} calls up", app_addresses.len());
    let steps = load_steps(&lab, &relayd, &app_addresses, path);

    fleet.done.store(true, Ordering::Relaxed);
    let _ = apps.join();
    drop(controller);
    (setup, steps)
}

/// Creates the calls: SEQUENTIAL one at a time, then waves; times each to its first RTP at
/// the PBX.
async fn set_up_calls(controller: &mut Socket, echo: &PbxEcho) -> Setup {
    let mut latencies_ms = Vec::new();
    let mut waves_per_sec = Vec::new();
    let mut next_user = 0;
    let mut request_id = 100_000;
    while next_user < max_calls() {
        let wave = if next_user < SEQUENTIAL {
            1
        } else {
            WAVE.min(max_calls() - next_user)
        };
        let started = Instant::now();
        let mut created: HashMap<u64, Instant> = HashMap::new();
        for user in next_user..next_user + wave {
            request_id += 1;
            created.insert(request_id, Instant::now());
            send(
                controller,
                json!({"type": "call.create", "id": request_id, "user": format!("user{user}"), "sdp": PBX_OFFER}),
            )
            .await;
        }
        next_user += wave;
        // Each call's LAN port from its call.answered, then its first RTP at the PBX.
        let mut call_of_request: HashMap<u64, u64> = HashMap::new();
        let mut lan_port: HashMap<u64, u16> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while lan_port.len() < wave && Instant::now() < deadline {
            let Ok(message) = receive_within(controller, Duration::from_secs(60)).await else {
                break;
            };
            match (message["type"].as_str(), message["event"].as_str()) {
                (Some("result"), _) => {
                    if let (Some(id), Some(call)) =
                        (message["id"].as_u64(), message["call"].as_u64())
                    {
                        call_of_request.insert(call, id);
                    }
                }
                (Some("event"), Some("call.answered")) => {
                    let sdp = message["sdp"].as_str().unwrap_or_default();
                    if let (Some(call), Ok(endpoint)) =
                        (message["call"].as_u64(), relay::session::sdp::audio(sdp))
                    {
                        lan_port.insert(call, endpoint.rtp.port());
                    }
                }
                (Some("error"), _) => eprintln!("bench calls: {message}"),
                _ => {}
            }
        }
        let mut last = started;
        for (call, port) in &lan_port {
            let first = loop {
                if let Some(first) = echo.first_arrival(*port) {
                    break Some(first);
                }
                if Instant::now() > deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            let (Some(first), Some(request)) = (first, call_of_request.get(call)) else {
                continue;
            };
            last = last.max(first);
            if wave == 1 {
                latencies_ms.push((first - created[request]).as_secs_f64() * 1000.0);
            }
        }
        if wave > 1 {
            waves_per_sec.push(lan_port.len() as f64 / (last - started).as_secs_f64());
        }
    }
    Setup {
        latencies_ms,
        waves_per_sec,
        calls: 0,
        first_packet_in_xdp: 0,
    }
}

/// Calls whose first packet XDP forwarded: the flow toward the PBX counted in the kernel
/// every packet the PBX got from the call's LAN port (none came through the userspace
/// tasks before the flows were in). Read once the apps have stopped talking.
fn first_packets_in_xdp(relayd: &Relayd, echo: &PbxEcho) -> (usize, usize) {
    let calls = relayd.ctl_json(&["calls", "list"]);
    let calls = calls["calls"].as_array().unwrap();
    let first_in_xdp = calls
        .iter()
        .filter(|call| {
            let lan: Option<SocketAddr> = call["lan"].as_str().and_then(|a| a.parse().ok());
            let at_pbx = lan.map_or(0, |lan| echo.packets_from(lan.port()));
            // The call's flows are kernel-only: what they count, XDP forwarded.
            let in_xdp = call["to_pbx"]["packets"].as_u64().unwrap_or(0);
            at_pbx > 0 && in_xdp == at_pbx
        })
        .count();
    (first_in_xdp, calls.len())
}

/// 50 packets/s per call on the first `calls` calls' 5-tuples (paced_udp), STEP_SECS each.
fn load_steps(lab: &EdgeLab, relayd: &Relayd, apps: &[SocketAddr], path: Path) -> Vec<Step> {
    let mut steps = Vec::new();
    let xdp = path == Path::Xdp;
    if xdp {
        sysctl_bpf_stats(true);
    }
    // The setup's tail settles first (the last calls' agents closing, the apps' agents
    // still checking): the first step measured 10% where the next ones measured 6-7%.
    thread::sleep(Duration::from_secs(SETTLE_SECS));
    for calls in STEPS.into_iter().filter(|calls| *calls <= apps.len()) {
        let flows: Vec<(SocketAddrV4, SocketAddrV4)> = apps[..calls]
            .iter()
            .filter_map(|app| match app {
                SocketAddr::V4(app) => Some((*app, EdgeLab::ICE.parse().unwrap())),
                SocketAddr::V6(_) => None,
            })
            .collect();
        let pps = calls as u64 * 50;
        eprintln!("bench calls: {calls} calls, {pps} packets/s each way");
        let before = (
            counter(&lab.nat, "to_relay"),
            counter(&lab.pbx, "at_pbx"),
            counter(&lab.nat, "to_app"),
        );
        let stats_before = xdp.then(xdp_run_stats).flatten();
        let cpu_before = process_cpu_ns(relayd.pid());
        let host_before = host_busy_ns();
        let elapsed = if flows.is_empty() {
            thread::sleep(Duration::from_secs(STEP_SECS));
            STEP_SECS as f64
        } else {
            let sent = paced_udp(
                &lab.app,
                &flows,
                &numbered(0),
                pps,
                Duration::from_secs(STEP_SECS),
            );
            thread::sleep(Duration::from_millis(500));
            sent.elapsed_secs
        };
        let cpu = process_cpu_ns(relayd.pid()) - cpu_before;
        let host = host_busy_ns() - host_before;
        let to_relay = counter(&lab.nat, "to_relay") - before.0;
        let at_pbx = counter(&lab.pbx, "at_pbx") - before.1;
        let to_app = counter(&lab.nat, "to_app") - before.2;
        let xdp_ns = match (stats_before, xdp.then(xdp_run_stats).flatten()) {
            (Some((t0, n0)), Some((t1, n1))) if n1 > n0 => {
                Some((t1 - t0) as f64 / (n1 - n0) as f64)
            }
            _ => None,
        };
        steps.push(Step {
            calls,
            offered_pps: to_relay as f64 / elapsed,
            loss_to_pbx: loss(to_relay, at_pbx),
            loss_to_app: loss(at_pbx, to_app),
            relayd_cpu_percent: cpu as f64 / (elapsed * 1e9) * 100.0,
            host_cpu_percent: host as f64 / (elapsed * 1e9 * 2.0) * 100.0,
            xdp_ns_per_packet: xdp_ns,
        });
    }
    if xdp {
        sysctl_bpf_stats(false);
    }
    steps
}

fn print_tables(results: &[(Path, (Setup, Vec<Step>))]) {
    println!(
        "Call setup: call.create -> the call's first RTP packet at the PBX (the app answers, runs ICE through the NAT, sends at 50 packets/s)"
    );
    println!(
        "{:<10} {:>13} {:>13} {:>20} {:>8} {:>22}",
        "media", "one: p50 ms", "one: p90 ms", "waves of 100: /s", "calls", "first packet in XDP"
    );
    for (path, (setup, _)) in results {
        let waves = setup
            .waves_per_sec
            .iter()
            .map(|rate| format!("{rate:.0}"))
            .collect::<Vec<_>>();
        let mean =
            setup.waves_per_sec.iter().sum::<f64>() / setup.waves_per_sec.len().max(1) as f64;
        println!(
            "{:<10} {:>13.1} {:>13.1} {:>20} {:>8} {:>22}",
            path.name(),
            percentile(&setup.latencies_ms, 0.5),
            percentile(&setup.latencies_ms, 0.9),
            format!(
                "{mean:.0} (min {})",
                waves
                    .iter()
                    .min_by_key(|w| w.parse::<u64>().unwrap_or(0))
                    .cloned()
                    .unwrap_or_default()
            ),
            setup.calls,
            format!("{} of {}", setup.first_packet_in_xdp, setup.calls),
        );
    }
    println!();
    println!(
        "Concurrent calls: 50 RTP packets/s each way per call (paced generator on the calls' 5-tuples, the PBX echoes), {STEP_SECS} s per step"
    );
    println!(
        "{:<10} {:>6} {:>12} {:>12} {:>12} {:>11} {:>10} {:>12}",
        "media",
        "calls",
        "offered pps",
        "loss to PBX",
        "loss to app",
        "relayd CPU",
        "host CPU",
        "XDP ns/pkt"
    );
    for (path, (_, steps)) in results {
        for step in steps {
            println!(
                "{:<10} {:>6} {:>12.0} {:>11.3}% {:>11.3}% {:>10.1}% {:>9.1}% {:>12}",
                path.name(),
                step.calls,
                step.offered_pps,
                step.loss_to_pbx * 100.0,
                step.loss_to_app * 100.0,
                step.relayd_cpu_percent,
                step.host_cpu_percent,
                step.xdp_ns_per_packet
                    .map_or("-".to_owned(), |ns| format!("{ns:.0}")),
            );
        }
    }
    for (path, (_, steps)) in results {
        let sustained = steps
            .iter()
            .filter(|step| step.loss_to_pbx <= 0.0 && step.loss_to_app <= 0.0)
            .map(|step| step.calls)
            .max();
        println!(
            "{}: most concurrent calls without loss: {}",
            path.name(),
            sustained.map_or("none of the steps".to_owned(), |calls| calls.to_string())
        );
    }
}
