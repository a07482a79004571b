//! `cargo xtask bench ng`: the relay as a SIP proxy's media relay over ng, side by side
//! with rtpengine 10.5 in userspace mode (`--table=-1`, Debian `rtpengine-daemon`), in the
//! three-host lab (the caller's side on the relay's WAN interface, the callee's on its LAN
//! interface), the same commands to both.
//!
//! 1. Call setup through Kamailio (its rtpengine module pointed at the relay under test):
//!    sipp's `uac` scenario places SETUP_CALLS calls (INVITE, 200, ACK, BYE: offer,
//!    answer and delete over ng each) at up to SETUP_RATE per second toward sipp's `uas`;
//!    calls per second from the first INVITE to the last BYE, and the calls that failed.
//! 2. Concurrent calls: N calls offered and answered over ng (plain RTP/AVP, one audio
//!    stream, RTCP on the port above), then one paced generator on each side sends each
//!    call's RTP at 50 packets/s toward the relay for STEP_SECS; nftables counts what
//!    arrives on the far side (and drops it before any socket). Loss each way, and the
//!    relay's CPU per relayed packet: relayd's process time plus the XDP program's run
//!    time (bpf_stats), or rtpengine's process time. The veth peer's receive path runs in
//!    the sender's context for both and is counted for neither.

use std::{
    net::{SocketAddr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use relay_tests::{
    bench::{counter, loss},
    config_file::ConfigFile,
    generator::paced_udp,
    kamailio::Kamailio,
    lab::{ThreeHosts, ng_config},
    measure::{process_cpu_ns, sysctl_bpf_stats, xdp_run_stats},
    netns::{NetNs, PinDir},
    ng::NgClient,
    pbx::{Sipp, sipp_successful_calls},
    process::Background,
    relayd::Relayd,
    require_root,
    rtpengine::Rtpengine,
};
use serde_json::json;

const NG: &str = "127.0.0.1:2223";
const SETUP_CALLS: u32 = 2000;
const SETUP_RATE: u32 = 400;
const STEPS: [usize; 4] = [100, 250, 500, 1000];
const STEP_SECS: u64 = 10;
/// 160 bytes of PCMU and the 12-byte RTP header; 180 bytes of UDP.
const RTP_LENGTH: usize = 172;
const UDP_LENGTH: usize = RTP_LENGTH + 8;
/// The sides' RTP ports: call i on FIRST_PORT + 2 i.
const FIRST_PORT: u16 = 20000;

#[derive(Clone, Copy, PartialEq)]
enum Relay {
    Ours,
    Rtpengine,
}

impl Relay {
    fn name(self) -> &'static str {
        match self {
            Relay::Ours => "relayd (XDP)",
            Relay::Rtpengine => "rtpengine (userspace)",
        }
    }
}

struct Setup {
    calls: u64,
    failed: u64,
    per_second: f64,
}

struct Step {
    calls: usize,
    offered_pps: f64,
    loss_to_callee: f64,
    loss_to_caller: f64,
    relay_cpu_percent: f64,
    relay_ns_per_packet: f64,
    /// Of which the XDP program's run time (relayd only).
    xdp_ns_per_packet: f64,
}

/// `bench-ng N`: at most N concurrent calls.
fn max_calls() -> usize {
    std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(*STEPS.last().unwrap())
}

/// The relay under test in the lab's relay namespace; its pid.
enum Running {
    /// The pin directory and configuration live as long as relayd.
    Ours(
        Relayd,
        #[allow(dead_code)] PinDir,
        #[allow(dead_code)] ConfigFile,
    ),
    Rtpengine(Rtpengine),
}

impl Running {
    fn start(relay: Relay, lab: &ThreeHosts) -> Running {
        match relay {
            Relay::Ours => {
                let pins = PinDir::new();
                let config = ConfigFile::new(&ng_config(
                    &pins.path,
                    NG,
                    "media_timeout_secs = 600\n[log]\nlevel = \"warn\"",
                ));
                let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
                Running::Ours(relayd, pins, config)
            }
            Relay::Rtpengine => Running::Rtpengine(Rtpengine::start(
                &lab.relay,
                &["wan/10.10.1.1", "lan/10.10.2.1"],
                NG,
                (30000, 39999),
                &[
                    "--timeout=600",
                    "--silent-timeout=600",
                    "--delete-delay=0",
                    "--log-level=4",
                ],
            )),
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Running::Ours(relayd, ..) => relayd.pid(),
            Running::Rtpengine(rtpengine) => rtpengine.pid(),
        }
    }
}

fn main() {
    require_root();
    sysctl_bpf_stats(true);
    let mut results = Vec::new();
    for relay in [Relay::Ours, Relay::Rtpengine] {
        eprintln!("bench ng: {}", relay.name());
        let lab = ThreeHosts::new();
        let running = Running::start(relay, &lab);
        let setup = setup_rate(&lab);
        eprintln!(
            "bench ng: {}: {} calls through Kamailio, {:.0}/s, {} failed",
            relay.name(),
            setup.calls,
            setup.per_second,
            setup.failed
        );
        let steps = concurrent(relay, &lab, &running);
        results.push((relay, setup, steps));
    }
    sysctl_bpf_stats(false);
    print_tables(&results);
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("address")
}

fn setup_rate(lab: &ThreeHosts) -> Setup {
    let kamailio = Kamailio::in_three_hosts(lab, addr(NG));
    let mut callee = Sipp::uas(
        &lab.peer,
        addr("10.10.2.2:5060"),
        addr("10.10.2.2:6000"),
        SETUP_CALLS,
    );
    let started = Instant::now();
    let output = std::env::temp_dir().join(relay_tests::unique("relay-sipp-"));
    let mut caller = Background::spawn_with_output(
        &lab.client,
        &[
            "sipp",
            "-sn",
            "uac",
            "10.10.1.1:5060",
            "-i",
            "10.10.1.2",
            "-p",
            "5060",
            "-m",
            &SETUP_CALLS.to_string(),
            "-r",
            &SETUP_RATE.to_string(),
            "-l",
            "200",
            "-d",
            "0",
            "-nostdin",
        ],
        &output,
    );
    let finished = caller.wait_exit(Duration::from_secs(
        (SETUP_CALLS / SETUP_RATE) as u64 * 4 + 30,
    ));
    let elapsed = started.elapsed().as_secs_f64();
    let screen = std::fs::read_to_string(&output).unwrap_or_default();
    let _ = std::fs::remove_file(&output);
    let calls = sipp_successful_calls(&screen).unwrap_or(0);
    if !finished {
        eprintln!("bench ng: the caller did not finish:\n{screen}");
    }
    drop(caller);
    let _ = callee.finish();
    drop(kamailio);
    Setup {
        calls,
        failed: u64::from(SETUP_CALLS).saturating_sub(calls),
        per_second: calls as f64 / elapsed,
    }
}

/// Counts what arrives in `ns` on the sides' RTP ports, dropping it before any socket.
fn sink(ns: &NetNs) {
    ns.exec(&[
        "nft",
        &format!(
            "add table ip bench; add chain ip bench input {{ type filter hook input priority 0; }}; add counter ip bench arrived; add rule ip bench input udp length {UDP_LENGTH} udp dport {FIRST_PORT}-{} counter name arrived drop",
            FIRST_PORT + 2 * max_calls() as u16
        ),
    ]);
}

fn sdp(ip: &str, port: u16) -> String {
    format!(
        "v=0\r\no=- {port} 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
    )
}

/// The relay's port in the SDP of its reply.
fn relay_port(reply: &serde_json::Value) -> anyhow::Result<u16> {
    reply["sdp"]
        .as_str()
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|port| port.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no m=audio port in the reply {reply}"))
}

fn concurrent(relay: Relay, lab: &ThreeHosts, running: &Running) -> Vec<Step> {
    sink(&lab.client);
    sink(&lab.peer);
    let mut ng = NgClient::new(&lab.relay, addr(NG));
    // (caller's source, relay's WAN port) and (callee's source, relay's LAN port) per call.
    let mut toward_callee: Vec<(SocketAddrV4, SocketAddrV4)> = Vec::new();
    let mut toward_caller: Vec<(SocketAddrV4, SocketAddrV4)> = Vec::new();
    let mut steps = Vec::new();
    for &n in STEPS.iter().filter(|&&n| n <= max_calls()) {
        while toward_callee.len() < n {
            let i = toward_callee.len();
            let port = FIRST_PORT + 2 * i as u16;
            let call_id = format!("bench-{i}");
            let offer = ng.request(&json!({
                "command": "offer", "call-id": call_id, "from-tag": "caller",
                "sdp": sdp("10.10.1.2", port), "direction": ["wan", "lan"],
                "flags": ["trust-address"], "replace": ["origin"],
            }));
            let answer = offer.and_then(|offer| {
                let to_callee = relay_port(&offer)?;
                let answer = ng.request(&json!({
                    "command": "answer", "call-id": call_id, "from-tag": "caller",
                    "to-tag": "callee", "sdp": sdp("10.10.2.2", port),
                    "flags": ["trust-address"], "replace": ["origin"],
                }))?;
                Ok((to_callee, relay_port(&answer)?))
            });
            match answer {
                Ok((lan_port, wan_port)) => {
                    toward_callee.push((
                        SocketAddrV4::new([10, 10, 1, 2].into(), port),
                        SocketAddrV4::new([10, 10, 1, 1].into(), wan_port),
                    ));
                    toward_caller.push((
                        SocketAddrV4::new([10, 10, 2, 2].into(), port),
                        SocketAddrV4::new([10, 10, 2, 1].into(), lan_port),
                    ));
                }
                Err(err) => {
                    eprintln!("bench ng: {}: call {i}: {err:#}", relay.name());
                    return steps;
                }
            }
        }
        let before = (
            counter(&lab.peer, "arrived"),
            counter(&lab.client, "arrived"),
            process_cpu_ns(running.pid()),
            xdp_run_stats().map_or(0, |(ns, _)| ns),
        );
        let started = Instant::now();
        let pps = 50 * n as u64;
        let payload = vec![0x80u8; RTP_LENGTH];
        let duration = Duration::from_secs(STEP_SECS);
        let (sent_a, sent_b) = thread::scope(|scope| {
            let one =
                scope.spawn(|| paced_udp(&lab.client, &toward_callee, &payload, pps, duration));
            let two = scope.spawn(|| paced_udp(&lab.peer, &toward_caller, &payload, pps, duration));
            (one.join().unwrap().packets, two.join().unwrap().packets)
        });
        let elapsed = started.elapsed().as_secs_f64();
        // Let the last packets land.
        thread::sleep(Duration::from_millis(300));
        let at_callee = counter(&lab.peer, "arrived") - before.0;
        let at_caller = counter(&lab.client, "arrived") - before.1;
        let xdp_ns = if relay == Relay::Ours {
            xdp_run_stats().map_or(0, |(ns, _)| ns) - before.3
        } else {
            0
        };
        let relay_ns = process_cpu_ns(running.pid()) - before.2 + xdp_ns;
        let relayed = (at_callee + at_caller).max(1);
        let step = Step {
            calls: n,
            offered_pps: (sent_a + sent_b) as f64 / elapsed,
            loss_to_callee: loss(sent_a, at_callee),
            loss_to_caller: loss(sent_b, at_caller),
            relay_cpu_percent: relay_ns as f64 / 1e9 / elapsed * 100.0,
            relay_ns_per_packet: relay_ns as f64 / relayed as f64,
            xdp_ns_per_packet: xdp_ns as f64 / relayed as f64,
        };
        eprintln!(
            "bench ng: {}: {n} calls: loss {:.2}% / {:.2}%, {:.0} ns per packet",
            relay.name(),
            step.loss_to_callee * 100.0,
            step.loss_to_caller * 100.0,
            step.relay_ns_per_packet
        );
        steps.push(step);
    }
    // Both parse our own NgClient's delete the same.
    for i in 0..toward_callee.len() {
        let _ = ng.request(
            &json!({"command": "delete", "call-id": format!("bench-{i}"), "from-tag": "caller"}),
        );
    }
    steps
}

fn print_tables(results: &[(Relay, Setup, Vec<Step>)]) {
    println!(
        "Call setup through Kamailio and ng: sipp uac -> Kamailio (rtpengine module) -> sipp uas, {SETUP_CALLS} calls at up to {SETUP_RATE}/s"
    );
    println!("| relay | calls | failed | calls/s |");
    println!("|---|---:|---:|---:|");
    for (relay, setup, _) in results {
        println!(
            "| {} | {} | {} | {:.0} |",
            relay.name(),
            setup.calls,
            setup.failed,
            setup.per_second
        );
    }
    println!();
    println!(
        "Concurrent ng calls: plain RTP, 50 packets/s each way per call, {STEP_SECS} s per step; CPU per relayed packet (relayd + XDP program, or rtpengine)"
    );
    println!(
        "| calls | offered pps | relay | loss to callee | loss to caller | relay CPU | ns/packet | of which XDP |"
    );
    println!("|---:|---:|---|---:|---:|---:|---:|---:|");
    let rows = results
        .iter()
        .map(|(_, _, steps)| steps.len())
        .max()
        .unwrap_or(0);
    for row in 0..rows {
        for (relay, _, steps) in results {
            if let Some(step) = steps.get(row) {
                println!(
                    "| {} | {:.0} | {} | {:.2}% | {:.2}% | {:.1}% | {:.0} | {} |",
                    step.calls,
                    step.offered_pps,
                    relay.name(),
                    step.loss_to_callee * 100.0,
                    step.loss_to_caller * 100.0,
                    step.relay_cpu_percent,
                    step.relay_ns_per_packet,
                    if *relay == Relay::Ours {
                        format!("{:.0}", step.xdp_ns_per_packet)
                    } else {
                        "-".to_owned()
                    }
                );
            }
        }
    }
    if let [(_, _, ours), (_, _, theirs)] = results
        && let (Some(a), Some(b)) = (ours.last(), theirs.last())
        && a.calls == b.calls
    {
        println!();
        println!(
            "At {} calls relayd costs {:.1}x less CPU per relayed packet than rtpengine.",
            a.calls,
            b.relay_ns_per_packet / a.relay_ns_per_packet.max(1.0)
        );
    }
}
