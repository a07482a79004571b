//! `cargo xtask bench turn`: TURN relaying through ChannelData, side by side on the same
//! namespaces and traffic: our TURN server with XDP offload, the same with offload off (the
//! TURN core relays in userspace), and coturn (`turnserver`). The load is coturn's
//! `turnutils_uclient` (sessions × messages per second, 172-byte payloads) against an echo
//! peer (`turnutils_peer`); each message crosses the relay twice. Rates are read from the
//! UDP counters of the client and peer namespaces over a window (uclient starts its sessions
//! 1–6 s after connecting and prints whole seconds; ../shared/BENCHMARKING.md).

use std::{
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use relay_tests::{
    config_file::ConfigFile,
    lab::{ThreeHosts, turn_config},
    measure::{host_busy_ns, process_cpu_ns, sysctl_bpf_stats, udp_arrived, xdp_run_stats},
    netns::PinDir,
    process::Background,
    relayd::Relayd,
    require_root,
};

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
    let config = ConfigFile::new(&turn_config(
        "xdp",
        &pins.path.to_string_lossy(),
        &format!(
            "max_allocations_per_user = 1000\noffload = {}",
            relay == Relay::Offload
        ),
    ));
    // Keep whichever relay runs alive for the whole run.
    let (relayd, coturn) = match relay {
        Relay::Coturn => (
            None,
            Some(Background::spawn(
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
        ),
        _ => (
            Some(Relayd::start(
                Some(&lab.relay),
                &["--config", config.path()],
            )),
            None,
        ),
    };
    let relay_pid = relayd
        .as_ref()
        .map(|r| r.pid())
        .or(coturn.as_ref().map(|c| c.pid()))
        .unwrap();
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
