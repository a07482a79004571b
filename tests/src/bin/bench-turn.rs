//! `cargo xtask bench turn`: TURN relaying through ChannelData, side by side on the same
//! namespaces and traffic: our TURN server with XDP offload, the same with offload off (the
//! TURN core relays in userspace), and coturn (`turnserver`). The load is coturn's
//! `turnutils_uclient` (sessions × messages per second, 172-byte payloads) against an echo
//! peer (`turnutils_peer`); each message crosses the relay twice. Rates are read from the
//! UDP counters of the client and peer namespaces over a window (uclient starts its sessions
//! 1–6 s after connecting and prints whole seconds; ../shared/BENCHMARKING.md).
//!
//! One uclient process saturates before any relay does, so a first part measures the relays
//! with a generator: trafgen sends ChannelData on channels the turn crate's client
//! allocated and bound, at loads up to what trafgen can offer.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use relay_tests::{
    config_file::ConfigFile,
    generator::{Load, trafgen, udp_frame},
    lab::{ThreeHosts, turn_config},
    measure::{Sink, host_busy_ns, process_cpu_ns, sysctl_bpf_stats, udp_arrived, xdp_run_stats},
    netns::PinDir,
    process::Background,
    relayd::Relayd,
    require_root,
    turn_client::bind_channel,
};

const SERVER: &str = "10.10.1.1:3478";
const SINK: &str = "10.10.2.2:5004";
/// (sessions, ms between a session's messages).
const LOADS: [(u32, u32); 3] = [(10, 5), (50, 2), (100, 1)];
/// Seconds uclient sends for; the window is measured inside it.
const SEND_SECS: u32 = 14;
const WARMUP: Duration = Duration::from_secs(7);
const WINDOW: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, PartialEq)]
enum Relay {
    Offload,
    NoOffload,
    Coturn,
}

impl Relay {
    fn name(self) -> &'static str {
        match self {
            Relay::Offload => "ours, XDP offload",
            Relay::NoOffload => "ours, userspace",
            Relay::Coturn => "coturn",
        }
    }
}

struct Run {
    relay: Relay,
    sessions: u32,
    interval_ms: u32,
    relayed_pps: f64,
    loss: String,
    relay_cpu_percent: f64,
    host_cpu_percent: f64,
    xdp_ns: Option<f64>,
}

fn main() {
    require_root();
    if Command::new("turnserver").arg("--help").output().is_err() {
        eprintln!("coturn (turnserver) is not installed: apt-get install coturn");
    }
    // `bench-turn generator` or `bench-turn uclient` runs one part; no argument, both.
    let part = std::env::args().nth(1).unwrap_or_default();
    if part != "uclient" {
        channel_data_benchmark();
        println!();
    }
    if part == "generator" {
        return;
    }
    let mut runs = Vec::new();
    for relay in [Relay::Offload, Relay::NoOffload, Relay::Coturn] {
        for (sessions, interval_ms) in LOADS {
            eprintln!(
                "bench turn: {}, {sessions} sessions every {interval_ms} ms",
                relay.name()
            );
            runs.push(run(relay, sessions, interval_ms));
        }
    }
    println!(
        "TURN relaying: turnutils_uclient (ChannelData, 172-byte payloads) -> relay -> turnutils_peer (echo) -> back"
    );
    println!(
        "(relayed pps: packets delivered to the peer and back to the client per second, over {} s)",
        WINDOW.as_secs()
    );
    println!(
        "{:<18} {:>8} {:>9} {:>13} {:>13} {:>10} {:>9} {:>10}",
        "relay",
        "sessions",
        "msg/s",
        "offered pps",
        "relayed pps",
        "relay CPU",
        "host CPU",
        "XDP ns"
    );
    for run in &runs {
        let offered = f64::from(run.sessions) * 1000.0 / f64::from(run.interval_ms) * 2.0;
        println!(
            "{:<18} {:>8} {:>9.0} {:>13.0} {:>13.0} {:>9.1}% {:>8.1}% {:>10}",
            run.relay.name(),
            run.sessions,
            offered / 2.0,
            offered,
            run.relayed_pps,
            run.relay_cpu_percent,
            run.host_cpu_percent,
            run.xdp_ns.map_or("-".to_owned(), |ns| format!("{ns:.0}"))
        );
    }
    println!();
    for run in &runs {
        println!(
            "{:<18} {:>3} sessions: {}",
            run.relay.name(),
            run.sessions,
            run.loss
        );
    }
    println!();
    let best = |relay: Relay| {
        runs.iter()
            .filter(|r| r.relay == relay)
            .map(|r| r.relayed_pps)
            .fold(0.0, f64::max)
    };
    let cpu_per_packet = |relay: Relay| {
        runs.iter()
            .filter(|r| r.relay == relay && r.relayed_pps > 0.0)
            .map(|r| r.relay_cpu_percent / 100.0 * 1e9 / r.relayed_pps)
            .fold(f64::INFINITY, f64::min)
    };
    println!(
        "max relayed pps: offload {:.0}, userspace {:.0}, coturn {:.0} (offload / coturn {:.1}x)",
        best(Relay::Offload),
        best(Relay::NoOffload),
        best(Relay::Coturn),
        best(Relay::Offload) / best(Relay::Coturn).max(1.0)
    );
    println!(
        "relay process CPU per relayed packet: offload {:.0} ns, userspace {:.0} ns, coturn {:.0} ns",
        cpu_per_packet(Relay::Offload),
        cpu_per_packet(Relay::NoOffload),
        cpu_per_packet(Relay::Coturn)
    );
    println!(
        "(offloaded packets cost no relay process CPU: their cost is the XDP ns/packet column)"
    );
}

fn run(relay: Relay, sessions: u32, interval_ms: u32) -> Run {
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let (_relay_guard, relay_pid) = start_relay(&lab, &pins, relay);
    let _peer = Background::spawn(
        &lab.peer,
        &["turnutils_peer", "-L", "10.10.2.2", "-p", "3480"],
    );
    thread::sleep(Duration::from_millis(800));
    let messages = (SEND_SECS * 1000 / interval_ms).to_string();
    let (sessions_arg, interval_arg) = (sessions.to_string(), interval_ms.to_string());
    let client: Child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.client.name,
            "timeout",
            "60",
            "turnutils_uclient",
        ])
        .args([
            "-u",
            "alice",
            "-w",
            "wonderland",
            "-e",
            "10.10.2.2",
            "-r",
            "3480",
            "-l",
            "172",
            "-c",
            "-m",
            &sessions_arg,
            "-n",
            &messages,
            "-z",
            &interval_arg,
            "10.10.1.1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run turnutils_uclient");
    thread::sleep(WARMUP);
    let xdp = relay == Relay::Offload;
    if xdp {
        sysctl_bpf_stats(true);
    }
    let stats_before = xdp.then(xdp_run_stats).flatten();
    let arrived_before = udp_arrived(&lab.peer) + udp_arrived(&lab.client);
    let cpu_before = process_cpu_ns(relay_pid);
    let host_before = host_busy_ns();
    let started = Instant::now();
    thread::sleep(WINDOW);
    let elapsed = started.elapsed().as_secs_f64();
    let relayed = udp_arrived(&lab.peer) + udp_arrived(&lab.client) - arrived_before;
    let cpu = process_cpu_ns(relay_pid) - cpu_before;
    let host = host_busy_ns() - host_before;
    let stats_after = xdp.then(xdp_run_stats).flatten();
    if xdp {
        sysctl_bpf_stats(false);
    }
    let output = client.wait_with_output().expect("uclient");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let loss = text
        .lines()
        .find(|line| line.contains("Total lost packets"))
        .map_or("uclient printed no summary".to_owned(), |line| {
            line.split_once(": : ")
                .map_or(line, |(_, rest)| rest)
                .trim()
                .to_owned()
        });
    Run {
        relay,
        sessions,
        interval_ms,
        relayed_pps: relayed as f64 / elapsed,
        loss,
        relay_cpu_percent: cpu as f64 / (elapsed * 1e9) * 100.0,
        host_cpu_percent: host as f64 / (elapsed * 1e9) * 100.0 / 2.0,
        xdp_ns: match (stats_before, stats_after) {
            (Some((t0, c0)), Some((t1, c1))) if c1 > c0 => {
                Some((t1 - t0) as f64 / (c1 - c0) as f64)
            }
            _ => None,
        },
    }
}

/// The relay under test, running in the lab's relay namespace until the guard drops.
enum RelayGuard {
    Ours {
        relayd: Relayd,
        /// relayd reads it at start; removed with the guard.
        _config: ConfigFile,
    },
    Coturn(Background),
}

/// Starts `relay` listening on 10.10.1.1:3478 and relaying from 10.10.2.1, with user
/// alice/wonderland and the peer 10.10.2.2 allowed; returns it and its process id.
fn start_relay(lab: &ThreeHosts, pins: &PinDir, relay: Relay) -> (RelayGuard, u32) {
    let config = ConfigFile::new(&turn_config(
        "xdp",
        &pins.path.to_string_lossy(),
        &format!(
            // uclient opens its sessions at once from one address: no per-source limit.
            "max_allocations_per_user = 1000\nmax_allocate_rate_per_source = 0\nmax_request_rate_per_source = 0\noffload = {}",
            relay == Relay::Offload
        ),
    ));
    let guard = match relay {
        Relay::Coturn => RelayGuard::Coturn(Background::spawn(
            &lab.relay,
            &[
                "turnserver",
                "-n",
                "--listening-ip",
                "10.10.1.1",
                "--listening-port",
                "3478",
                "--relay-ip",
                "10.10.2.1",
                "--min-port",
                "49152",
                "--max-port",
                "65535",
                "--lt-cred-mech",
                "--user",
                "alice:wonderland",
                "--realm",
                "relay",
                "--no-tls",
                "--no-dtls",
                "--no-cli",
                "--allowed-peer-ip",
                "10.10.2.2",
                "--total-quota",
                "0",
                "--user-quota",
                "0",
            ],
        )),
        _ => RelayGuard::Ours {
            relayd: Relayd::start(Some(&lab.relay), &["--config", config.path()]),
            _config: config,
        },
    };
    let pid = match &guard {
        RelayGuard::Ours { relayd, .. } => relayd.pid(),
        RelayGuard::Coturn(coturn) => coturn.pid(),
    };
    (guard, pid)
}

/// The generator part: trafgen sends ChannelData on the 5-tuples of channels a real client
/// (the turn crate's) allocated and bound, so the relays are measured beyond what one
/// uclient process can offer. One direction, client -> peer (header stripped); the add
/// direction costs the same in XDP (BENCHMARKS.md, test runs).
const CHANNEL_LOADS: [Load; 5] = [
    Load::Gap { micros: 20 },
    Load::Gap { micros: 2 },
    Load::Burst { pps: 100_000 },
    Load::Burst { pps: 200_000 },
    Load::Unlimited,
];
const CHANNEL_STEP_SECS: u64 = 2;
/// Allocations the generator's packets are spread over (round robin).
const CHANNEL_SESSIONS: usize = 4;
/// The load at which the relays' CPU per relayed packet is compared: smooth, loss-free for
/// all three, and fast enough that wake-ups do not dominate the userspace relays' cost.
const CHANNEL_CPU_LOAD: Load = Load::Gap { micros: 2 };

struct ChannelStep {
    load: Load,
    offered_pps: f64,
    relayed_pps: f64,
    loss: f64,
    /// The relay's own CPU time per relayed packet: its process, plus the XDP program's
    /// run time when it offloads.
    relay_ns_per_packet: f64,
    host_ns_per_packet: f64,
    error: Option<String>,
}

fn channel_data_steps(relay: Relay) -> Result<Vec<ChannelStep>, String> {
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let (_relay_guard, relay_pid) = start_relay(&lab, &pins, relay);
    let _sink = Sink::bind(&lab.peer, SINK.parse().unwrap());
    thread::sleep(Duration::from_millis(800));
    let mut frames = String::new();
    let mut channels = Vec::new();
    for _ in 0..CHANNEL_SESSIONS {
        let bound = bind_channel(
            &lab.client,
            "10.10.1.2:0".parse().unwrap(),
            SERVER.parse().unwrap(),
            "alice",
            "wonderland",
            SINK.parse().unwrap(),
        )?;
        let SocketAddr::V4(client) = bound.client else {
            unreachable!("IPv4 lab")
        };
        let [high, low] = bound.channel.to_be_bytes();
        frames.push_str(&udp_frame(
            &lab.client,
            "c0",
            &lab.relay,
            "rc",
            (client, SERVER.parse().unwrap()),
            &format!("{high:#04x}, {low:#04x}, 0x00, 0xac, fill(0xd5, 172)"),
        ));
        channels.push(bound);
    }
    let config =
        std::env::temp_dir().join(format!("{}.trafgen", relay_tests::unique("relay-turn-")));
    std::fs::write(&config, frames).map_err(|e| e.to_string())?;
    let xdp = relay == Relay::Offload;
    if xdp {
        sysctl_bpf_stats(true);
    }
    let mut steps = Vec::new();
    for load in CHANNEL_LOADS {
        eprintln!("bench turn, generator: {}, {}", relay.name(), load.label());
        let stats_before = xdp.then(xdp_run_stats).flatten();
        let arrived_before = udp_arrived(&lab.peer);
        let cpu_before = process_cpu_ns(relay_pid);
        let host_before = host_busy_ns();
        let sent = trafgen(&lab.client, "c0", &config, load, CHANNEL_STEP_SECS);
        thread::sleep(Duration::from_millis(300));
        let relayed = udp_arrived(&lab.peer) - arrived_before;
        let cpu = process_cpu_ns(relay_pid) - cpu_before;
        let host = host_busy_ns() - host_before;
        let xdp_ns = match (stats_before, xdp.then(xdp_run_stats).flatten()) {
            (Some((t0, _)), Some((t1, _))) => t1 - t0,
            _ => 0,
        };
        steps.push(ChannelStep {
            load,
            offered_pps: sent.pps(),
            relayed_pps: relayed as f64 / sent.elapsed_secs,
            loss: 1.0 - relayed as f64 / sent.packets.max(1) as f64,
            relay_ns_per_packet: (cpu + xdp_ns) as f64 / relayed.max(1) as f64,
            host_ns_per_packet: host as f64 / sent.packets.max(1) as f64,
            error: sent.error,
        });
    }
    if xdp {
        sysctl_bpf_stats(false);
    }
    let _ = std::fs::remove_file(&config);
    Ok(steps)
}

fn channel_data_benchmark() {
    let mut runs = Vec::new();
    for relay in [Relay::Offload, Relay::NoOffload, Relay::Coturn] {
        match channel_data_steps(relay) {
            Ok(steps) => runs.push((relay, steps)),
            Err(err) => eprintln!("bench turn, generator: {}: {err}", relay.name()),
        }
    }
    println!(
        "TURN ChannelData from a generator: trafgen (1 process) -> relay (strip) -> sink, 172-byte payloads, {CHANNEL_SESSIONS} allocations made by the turn crate's client"
    );
    println!(
        "(relay CPU ns/pkt: the relay process's CPU time, plus the XDP program's run time, per relayed packet;"
    );
    println!(
        " host CPU ns/pkt: busy time of the whole host, generator included, per offered packet)"
    );
    println!(
        "{:<18} {:>11} {:>12} {:>12} {:>7} {:>17} {:>16}",
        "relay",
        "load",
        "offered pps",
        "relayed pps",
        "loss",
        "relay CPU ns/pkt",
        "host CPU ns/pkt"
    );
    for (relay, steps) in &runs {
        for step in steps {
            if let Some(err) = &step.error {
                println!(
                    "{:<18} {:>11}  generator failed: {err}",
                    relay.name(),
                    step.load.label()
                );
                continue;
            }
            println!(
                "{:<18} {:>11} {:>12.0} {:>12.0} {:>6.2}% {:>17.0} {:>16.0}",
                relay.name(),
                step.load.label(),
                step.offered_pps,
                step.relayed_pps,
                step.loss * 100.0,
                step.relay_ns_per_packet,
                step.host_ns_per_packet
            );
        }
    }
    let summary = |relay: Relay| {
        let steps = runs
            .iter()
            .find(|(r, _)| *r == relay)
            .map(|(_, steps)| steps.as_slice())
            .unwrap_or_default();
        let ok = || steps.iter().filter(|s| s.error.is_none());
        let max = ok().map(|s| s.relayed_pps).fold(0.0, f64::max);
        let loss_free = ok()
            .filter(|s| s.loss < 0.001)
            .map(|s| s.offered_pps)
            .fold(0.0, f64::max);
        let cpu = ok()
            .find(|s| s.load == CHANNEL_CPU_LOAD)
            .map_or(f64::NAN, |s| s.relay_ns_per_packet);
        (max, loss_free, cpu)
    };
    println!();
    println!(
        "{:<18} {:>17} {:>21} {:>30}",
        "relay",
        "max relayed pps",
        "highest loss-free pps",
        format!("relay CPU ns/pkt ({})", CHANNEL_CPU_LOAD.label())
    );
    for relay in [Relay::Offload, Relay::NoOffload, Relay::Coturn] {
        let (max, loss_free, cpu) = summary(relay);
        println!(
            "{:<18} {max:>17.0} {loss_free:>21.0} {cpu:>30.0}",
            relay.name()
        );
    }
    let (offload_max, offload_loss_free, offload_cpu) = summary(Relay::Offload);
    let (coturn_max, coturn_loss_free, coturn_cpu) = summary(Relay::Coturn);
    println!();
    println!(
        "offload / coturn: max relayed pps {:.1}x, loss-free pps {:.1}x, relay CPU per packet {:.1}x less",
        offload_max / coturn_max.max(1.0),
        offload_loss_free / coturn_loss_free.max(1.0),
        coturn_cpu / offload_cpu.max(1.0)
    );
    println!(
        "(offload lost nothing up to what one trafgen process offers here: its pps figures are lower bounds)"
    );
}
