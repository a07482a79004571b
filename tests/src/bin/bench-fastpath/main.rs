//! `cargo xtask bench fastpath [cost] [matrix] [end-to-end]`: the cost of the XDP program per
//! packet (BPF_PROG_TEST_RUN with repeat, flow table nearly empty and holding 1,000,000
//! flows); the program under real traffic by table size and load (`matrix.rs`); and packets
//! per second forwarded end to end through a relay namespace by the XDP and the userspace
//! datapaths with the same generator (trafgen), side by side. Without arguments, all three.
//! Needs root.

mod matrix;

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use relay::datapath::{ChannelOp, FlowSpec, xdp::KernelProgram};
use relay_common::XDP_RELAY_PROGRAM;
use relay_tests::{
    generator::{Load, trafgen, udp_frame},
    lab::{CLIENT_TO_PEER_FLOW, ThreeHosts},
    measure::{Sink, host_busy_ns, process_cpu_ns, sysctl_bpf_stats, udp_arrived, xdp_run_stats},
    netns::{NetNs, PinDir},
    packet::{Frame, channel_data, rtp_payload},
    relayd::Relayd,
    require_root,
};

const XDP_REDIRECT: u32 = 4;
const XDP_PASS: u32 = 2;
/// Repeats per test run: the kernel reruns the program on the buffer it already rewrote, so
/// the benchmark flow rewrites a packet into itself and only the TTL moves (255 -> 55).
const REPEAT: u32 = 200;
const ROUNDS: usize = 2_000;
const TABLE_FLOWS: u32 = 1_000_000;

/// The parts, in the order they run.
const SECTIONS: [(&str, fn()); 3] = [
    ("cost", program_cost),
    ("matrix", matrix::run),
    ("end-to-end", end_to_end),
];

fn main() {
    require_root();
    let chosen: Vec<String> = std::env::args().skip(1).collect();
    if let Some(unknown) = chosen
        .iter()
        .find(|name| !SECTIONS.iter().any(|(section, _)| section == name))
    {
        let names: Vec<&str> = SECTIONS.iter().map(|(name, _)| *name).collect();
        eprintln!(
            "bench-fastpath: unknown part {unknown:?}; the parts are {}",
            names.join(", ")
        );
        std::process::exit(2);
    }
    println!(
        "relay fast path benchmark ({} CPUs)\n",
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut first = true;
    for (name, section) in SECTIONS {
        if chosen.is_empty() || chosen.iter().any(|c| c == name) {
            if !first {
                println!();
            }
            first = false;
            section();
        }
    }
}

fn program_cost() {
    let ns = NetNs::new("rbp");
    ns.exec(&[
        "ip", "link", "add", "lan", "type", "veth", "peer", "name", "lanp",
    ]);
    ns.exec(&["ip", "link", "set", "lan", "up"]);
    ns.exec(&["ip", "link", "set", "lanp", "up"]);
    ns.exec(&["ip", "addr", "add", "10.2.0.1/24", "dev", "lan"]);
    ns.exec(&[
        "ip",
        "neigh",
        "replace",
        "10.2.0.2",
        "lladdr",
        "02:00:00:00:02:02",
        "dev",
        "lan",
        "nud",
        "permanent",
    ]);
    let pins = PinDir::new();
    let pin_dir = pins.path.clone();
    let rows = ns.enter(move || {
        let mut kernel = KernelProgram::load(&pin_dir, TABLE_FLOWS + 16).expect("load");
        let lan = relay::datapath::xdp::ifindex("lan").unwrap();
        kernel.prepare_forwarding(&[("lan".into(), lan)]).unwrap();
        // Each test run of an XDP program that no interface runs in native mode swaps it into
        // the kernel's XDP dispatcher and waits for two RCU grace periods (milliseconds here);
        // attached, it is already in the dispatcher and a run costs only the run.
        kernel
            .program_mut(XDP_RELAY_PROGRAM)
            .unwrap()
            .attach("lanp", aya::programs::XdpMode::Driver)
            .expect("attach to lanp");
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        // A flow whose rewrite is its own key, so every repeat is a hit.
        let bench = FlowSpec {
            src: a("198.51.100.7:4000"),
            dst: a("10.2.0.2:5004"),
            new_src: a("198.51.100.7:4000"),
            new_dst: a("10.2.0.2:5004"),
            channel: None,
            rtcp_to_userspace: false,
            opaque_payload: false,
            to_worker: false,
        };
        kernel.install(1, 1, &bench).unwrap();
        let hit = Frame {
            ttl: 255,
            ..Frame::udp(bench.src, bench.dst, &rtp_payload(1))
        }
        .bytes();
        let miss = Frame::udp(a("198.51.100.8:4000"), bench.dst, &rtp_payload(1)).bytes();
        let mut rows = vec![
            (
                "hit, 1 flow in the table".to_owned(),
                measure(&mut kernel, &hit, XDP_REDIRECT, REPEAT),
            ),
            (
                "miss, 1 flow in the table".to_owned(),
                measure(&mut kernel, &miss, XDP_PASS, REPEAT),
            ),
        ];
        // A ChannelData flow changes the packet's size, so each run is one packet: compared
        // with a plain hit measured the same way (a single run includes the test-run
        // harness's own per-run overhead).
        let turn = FlowSpec {
            src: a("198.51.100.9:50000"),
            dst: a("10.2.0.1:3478"),
            new_src: a("10.2.0.1:40000"),
            new_dst: a("10.2.0.2:6000"),
            channel: Some(ChannelOp::Strip(0x4001)),
            rtcp_to_userspace: false,
            opaque_payload: false,
            to_worker: false,
        };
        kernel.install(2, 1, &turn).unwrap();
        // Its answers, sent back to a neighbour so that the bench needs no route.
        let back = FlowSpec {
            new_dst: a("10.2.0.2:50000"),
            ..turn.reverse()
        };
        kernel.install(3, 1, &back).unwrap();
        let wrapped =
            Frame::udp(turn.src, turn.dst, &channel_data(0x4001, &rtp_payload(1))).bytes();
        let bare = Frame::udp(turn.new_dst, turn.new_src, &rtp_payload(1)).bytes();
        rows.extend([
            (
                "hit, single run".to_owned(),
                measure(&mut kernel, &hit, XDP_REDIRECT, 1),
            ),
            (
                "ChannelData strip, single run".to_owned(),
                measure(&mut kernel, &wrapped, XDP_REDIRECT, 1),
            ),
            (
                "ChannelData add, single run".to_owned(),
                measure(&mut kernel, &bare, XDP_REDIRECT, 1),
            ),
        ]);
        let started = Instant::now();
        for i in 0..TABLE_FLOWS {
            let spec = FlowSpec {
                src: SocketAddr::from(([100, 64 + (i >> 16) as u8, (i >> 8) as u8, i as u8], 4000)),
                dst: SocketAddr::from(([10, 1, 0, 1], 20000 + (i % 40000) as u16)),
                new_src: SocketAddr::from(([10, 2, 0, 1], 30000)),
                new_dst: SocketAddr::from(([10, 2, 0, 2], 5004)),
                channel: None,
                rtcp_to_userspace: false,
                opaque_payload: false,
                to_worker: false,
            };
            kernel.install(i + 4, 1, &spec).unwrap();
            if i % 100_000 == 99_999 {
                eprint!("\rfilling the flow table: {}/{TABLE_FLOWS}", i + 1);
            }
        }
        eprintln!(" ({:.1} s)", started.elapsed().as_secs_f64());
        rows.push((
            format!("hit, {} flows in the table", TABLE_FLOWS + 1),
            measure(&mut kernel, &hit, XDP_REDIRECT, REPEAT),
        ));
        rows.push((
            format!("miss, {} flows in the table", TABLE_FLOWS + 1),
            measure(&mut kernel, &miss, XDP_PASS, REPEAT),
        ));
        rows
    });
    println!(
        "XDP program cost: BPF_PROG_TEST_RUN, {ROUNDS} runs x {REPEAT} repeats (or single runs), 172-byte RTP in IPv4/UDP"
    );
    println!(
        "{:<36} {:>10} {:>10} {:>10}",
        "case", "median ns", "p10 ns", "p90 ns"
    );
    for (case, (median, p10, p90)) in rows {
        println!("{case:<36} {median:>10} {p10:>10} {p90:>10}");
    }
}

/// (median, p10, p90) of the per-packet time the kernel reports for each run.
fn measure(
    kernel: &mut KernelProgram,
    frame: &[u8],
    expected: u32,
    repeat: u32,
) -> (u64, u64, u64) {
    let program = kernel.program_mut(XDP_RELAY_PROGRAM).unwrap();
    let mut samples: Vec<u64> = (0..ROUNDS)
        .map(|_| {
            let result = program
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    repeat,
                    ..TestRunOptions::default()
                })
                .expect("test run");
            assert_eq!(
                result.return_value, expected,
                "benchmark packet took the wrong path"
            );
            result.duration.as_nanos() as u64
        })
        .collect();
    samples.sort_unstable();
    (
        samples[ROUNDS / 2],
        samples[ROUNDS / 10],
        samples[ROUNDS * 9 / 10],
    )
}

/// The shared lab, with a permanent neighbour entry for the peer so that no run starts with
/// neighbour resolution.
pub fn lab() -> ThreeHosts {
    let lab = ThreeHosts::new();
    let p0 = lab.peer.mac("p0");
    let p0: Vec<String> = p0.iter().map(|b| format!("{b:02x}")).collect();
    lab.relay.exec(&[
        "ip",
        "neigh",
        "replace",
        "10.10.2.2",
        "lladdr",
        &p0.join(":"),
        "dev",
        "rp",
        "nud",
        "permanent",
    ]);
    lab
}

const LOADS: [Load; 6] = [
    Load::Gap { micros: 10 },
    Load::Gap { micros: 2 },
    Load::Burst { pps: 100_000 },
    Load::Burst { pps: 200_000 },
    Load::Burst { pps: 400_000 },
    Load::Unlimited,
];
/// Seconds per step (approximately).
const STEP_SECS: u64 = 2;
/// The load at which the relays' own CPU per forwarded packet is compared: smooth, and
/// loss-free for every datapath. (Whole-host CPU differences from the kernel-forwarding
/// baseline drown in trafgen's own variation on this machine, so they are shown, not used.)
const CPU_LOAD: Load = Load::Gap { micros: 2 };

/// What sits in the relay namespace.
#[derive(Clone, Copy, PartialEq)]
enum Relay {
    /// No relayd: the kernel routes client -> peer (the generator and sink's own cost).
    KernelForwarding,
    Relayd(&'static [&'static str]),
}

struct Step {
    load: Load,
    offered_pps: f64,
    delivered_pps: f64,
    loss: f64,
    /// Busy CPU time of the whole host per offered packet (generator and sink included).
    host_cpu_ns_per_packet: f64,
    relayd_cpu_percent: f64,
    xdp_ns: Option<f64>,
    generator_error: Option<String>,
}

fn end_to_end() {
    let runs: Vec<(&str, Vec<Step>)> = [
        ("kernel fwd", Relay::KernelForwarding),
        (
            "xdp generic",
            Relay::Relayd(&["--datapath", "xdp", "--xdp-mode", "generic"]),
        ),
        (
            "xdp native",
            Relay::Relayd(&["--datapath", "xdp", "--xdp-mode", "native"]),
        ),
        ("userspace", Relay::Relayd(&["--datapath", "userspace"])),
    ]
    .into_iter()
    .map(|(name, relay)| (name, end_to_end_steps(name, relay)))
    .collect();
    println!(
        "End to end: trafgen (1 process) in client ns -> relay ns -> sink in peer ns, 172-byte UDP"
    );
    println!(
        "(kernel fwd: no relayd, the relay ns routes the packets: what generator and sink cost alone;"
    );
    println!(" host CPU ns/pkt: busy time of the whole host per offered packet)");
    println!(
        "{:<12} {:>11} {:>12} {:>14} {:>7} {:>16} {:>11} {:>11}",
        "relay",
        "load",
        "offered pps",
        "delivered pps",
        "loss",
        "host CPU ns/pkt",
        "relayd CPU",
        "XDP ns/pkt"
    );
    for (name, steps) in &runs {
        for step in steps {
            if let Some(err) = &step.generator_error {
                println!(
                    "{name:<12} {:>11}  generator failed: {err}",
                    step.load.label()
                );
                continue;
            }
            println!(
                "{:<12} {:>11} {:>12.0} {:>14.0} {:>6.2}% {:>16.0} {:>10.1}% {:>11}",
                name,
                step.load.label(),
                step.offered_pps,
                step.delivered_pps,
                step.loss * 100.0,
                step.host_cpu_ns_per_packet,
                step.relayd_cpu_percent,
                step.xdp_ns.map_or("-".to_owned(), |ns| format!("{ns:.0}"))
            );
        }
    }
    println!();
    println!(
        "{:<12} {:>18} {:>22} {:>34}",
        "relay",
        "max delivered pps",
        "highest loss-free pps",
        format!("relay's CPU ns/fwd pkt ({})", CPU_LOAD.label())
    );
    let mut summary = Vec::new();
    for (name, steps) in &runs {
        let ok: Vec<&Step> = steps
            .iter()
            .filter(|s| s.generator_error.is_none())
            .collect();
        let max = ok.iter().map(|s| s.delivered_pps).fold(0.0, f64::max);
        let loss_free = ok
            .iter()
            .filter(|s| s.loss < 0.001)
            .map(|s| s.offered_pps)
            .fold(0.0, f64::max);
        // The relay's own cost: the XDP program's run time (bpf_stats), or relayd's CPU time
        // (its system calls included) per packet it forwarded.
        let cpu = ok.iter().find(|s| s.load == CPU_LOAD).and_then(|s| {
            s.xdp_ns.or((s.relayd_cpu_percent > 0.0)
                .then(|| s.relayd_cpu_percent / 100.0 * 1e9 / s.delivered_pps.max(1.0)))
        });
        let cpu_text = cpu.map_or("-".to_owned(), |cpu| format!("{cpu:.0}"));
        println!("{name:<12} {max:>18.0} {loss_free:>22.0} {cpu_text:>34}");
        summary.push(Summary {
            name,
            max,
            loss_free,
            cpu,
        });
    }
    let best = |prefix: &str, pick: fn(&Summary) -> f64| {
        summary
            .iter()
            .filter(|s| s.name.starts_with(prefix))
            .map(pick)
            .fold(0.0, f64::max)
    };
    let xdp_cpu = summary
        .iter()
        .filter(|s| s.name.starts_with("xdp"))
        .filter_map(|s| s.cpu)
        .fold(f64::INFINITY, f64::min);
    let user_cpu = summary
        .iter()
        .find(|s| s.name == "userspace")
        .and_then(|s| s.cpu)
        .unwrap_or(0.0);
    println!();
    println!(
        "XDP / userspace, max delivered pps:                {:.1}x",
        best("xdp", |s| s.max) / best("user", |s| s.max).max(1.0)
    );
    println!(
        "XDP / userspace, highest loss-free pps:            {:.1}x (XDP lost nothing: generator-bound)",
        best("xdp", |s| s.loss_free) / best("user", |s| s.loss_free).max(1.0)
    );
    println!(
        "userspace / XDP, relay's CPU per forwarded packet: {:.1}x",
        user_cpu / xdp_cpu.max(1.0)
    );
}

/// One relay's line in the summary.
struct Summary<'a> {
    name: &'a str,
    max: f64,
    loss_free: f64,
    /// The relay's own CPU ns per forwarded packet at CPU_LOAD.
    cpu: Option<f64>,
}

fn end_to_end_steps(name: &'static str, relay: Relay) -> Vec<Step> {
    let lab = lab();
    let pins = PinDir::new();
    let pin_dir = pins.path.to_string_lossy().into_owned();
    let (relayd, destination) = match relay {
        Relay::KernelForwarding => {
            lab.relay.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            lab.client
                .exec(&["ip", "route", "add", "10.10.2.0/24", "via", "10.10.1.1"]);
            lab.peer
                .exec(&["ip", "route", "add", "10.10.1.0/24", "via", "10.10.2.1"]);
            (None, "10.10.2.2:5004".parse().unwrap())
        }
        Relay::Relayd(args) => {
            let relayd = Relayd::start(Some(&lab.relay), &lab.relayd_args(args, &pin_dir));
            relayd.ctl_ok(&CLIENT_TO_PEER_FLOW);
            (Some(relayd), "10.10.1.1:20000".parse().unwrap())
        }
    };
    let _sink = Sink::bind(&lab.peer, "10.10.2.2:5004".parse().unwrap());
    let config =
        std::env::temp_dir().join(format!("{}.trafgen", relay_tests::unique("relay-bench-")));
    std::fs::write(
        &config,
        udp_frame(
            &lab.client,
            "c0",
            &lab.relay,
            "rc",
            ("10.10.1.2:4000".parse().unwrap(), destination),
            "fill(0xab, 172)",
        ),
    )
    .unwrap();
    let xdp = matches!(relay, Relay::Relayd(args) if args.contains(&"xdp"));
    if xdp {
        sysctl_bpf_stats(true);
    }
    let mut steps = Vec::new();
    for load in LOADS {
        eprintln!("end to end: {name}, {}", load.label());
        steps.push(step(&lab, relayd.as_ref(), &config, load, xdp));
    }
    if xdp {
        sysctl_bpf_stats(false);
    }
    let _ = std::fs::remove_file(&config);
    steps
}

fn step(
    lab: &ThreeHosts,
    relayd: Option<&Relayd>,
    config: &std::path::Path,
    load: Load,
    xdp: bool,
) -> Step {
    let stats_before = xdp.then(xdp_run_stats).flatten();
    let delivered_before = udp_arrived(&lab.peer);
    let cpu_before = host_busy_ns();
    let relayd_before = relayd.map_or(0, |relayd| process_cpu_ns(relayd.pid()));
    let sent = trafgen(&lab.client, "c0", config, load, STEP_SECS);
    // Let the last packets drain through the relay before reading the counters.
    thread::sleep(Duration::from_millis(300));
    let delivered = udp_arrived(&lab.peer) - delivered_before;
    let cpu = host_busy_ns() - cpu_before;
    let relayd_cpu = relayd.map_or(0, |relayd| process_cpu_ns(relayd.pid())) - relayd_before;
    let stats_after = xdp.then(xdp_run_stats).flatten();
    let xdp_ns = match (stats_before, stats_after) {
        (Some((t0, c0)), Some((t1, c1))) if c1 > c0 => Some((t1 - t0) as f64 / (c1 - c0) as f64),
        _ => None,
    };
    let elapsed = sent.elapsed_secs;
    Step {
        load,
        offered_pps: sent.pps(),
        delivered_pps: delivered as f64 / elapsed,
        loss: 1.0 - delivered as f64 / sent.packets.max(1) as f64,
        host_cpu_ns_per_packet: cpu as f64 / sent.packets.max(1) as f64,
        relayd_cpu_percent: relayd_cpu as f64 / (elapsed * 1e9) * 100.0,
        xdp_ns,
        generator_error: sent.error,
    }
}
