//! `cargo xtask bench fastpath`: the cost of the XDP program per packet (BPF_PROG_TEST_RUN with
//! repeat, flow table nearly empty and holding 1,000,000 flows), and packets per second
//! forwarded end to end through a relay namespace by the XDP and the userspace datapaths with
//! the same generator (trafgen), side by side. Needs root.

use std::{
    net::SocketAddr,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use relay::datapath::{FlowSpec, xdp::KernelProgram};
use relay_common::XDP_RELAY_PROGRAM;
use relay_tests::{
    netns::{NetNs, PinDir, veth},
    packet::{Frame, rtp_payload},
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
const E2E_PACKETS: u64 = 2_000_000;

fn main() {
    require_root();
    println!(
        "relay fast path benchmark ({} CPUs)\n",
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    program_cost();
    println!();
    end_to_end();
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
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        // A flow whose rewrite is its own key, so every repeat is a hit.
        let bench = FlowSpec {
            src: a("198.51.100.7:4000"),
            dst: a("10.2.0.2:5004"),
            new_src: a("198.51.100.7:4000"),
            new_dst: a("10.2.0.2:5004"),
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
                measure(&mut kernel, &hit, XDP_REDIRECT),
            ),
            (
                "miss, 1 flow in the table".to_owned(),
                measure(&mut kernel, &miss, XDP_PASS),
            ),
        ];
        let started = Instant::now();
        for i in 0..TABLE_FLOWS {
            let spec = FlowSpec {
                src: SocketAddr::from(([100, 64 + (i >> 16) as u8, (i >> 8) as u8, i as u8], 4000)),
                dst: SocketAddr::from(([10, 1, 0, 1], 20000 + (i % 40000) as u16)),
                new_src: SocketAddr::from(([10, 2, 0, 1], 30000)),
                new_dst: SocketAddr::from(([10, 2, 0, 2], 5004)),
            };
            kernel.install(i + 2, 1, &spec).unwrap();
            if i % 100_000 == 99_999 {
                eprint!("\rfilling the flow table: {}/{TABLE_FLOWS}", i + 1);
            }
        }
        eprintln!(" ({:.1} s)", started.elapsed().as_secs_f64());
        rows.push((
            format!("hit, {} flows in the table", TABLE_FLOWS + 1),
            measure(&mut kernel, &hit, XDP_REDIRECT),
        ));
        rows.push((
            format!("miss, {} flows in the table", TABLE_FLOWS + 1),
            measure(&mut kernel, &miss, XDP_PASS),
        ));
        rows
    });
    println!(
        "XDP program cost: BPF_PROG_TEST_RUN, {ROUNDS} runs x {REPEAT} repeats, 172-byte RTP in IPv4/UDP"
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
fn measure(kernel: &mut KernelProgram, frame: &[u8], expected: u32) -> (u64, u64, u64) {
    let program = kernel.program_mut(XDP_RELAY_PROGRAM).unwrap();
    let mut samples: Vec<u64> = (0..ROUNDS)
        .map(|_| {
            let result = program
                .test_run(TestRunOptions {
                    data_in: Some(frame),
                    repeat: REPEAT,
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

struct Lab {
    client: NetNs,
    relay: NetNs,
    peer: NetNs,
}

fn lab() -> Lab {
    let lab = Lab {
        client: NetNs::new("rbc"),
        relay: NetNs::new("rbr"),
        peer: NetNs::new("rbe"),
    };
    veth(&lab.client, "c0", &lab.relay, "rc");
    veth(&lab.relay, "rp", &lab.peer, "p0");
    lab.client
        .exec(&["ip", "addr", "add", "10.10.1.2/24", "dev", "c0"]);
    lab.relay
        .exec(&["ip", "addr", "add", "10.10.1.1/24", "dev", "rc"]);
    lab.relay
        .exec(&["ip", "addr", "add", "10.10.2.1/24", "dev", "rp"]);
    lab.peer
        .exec(&["ip", "addr", "add", "10.10.2.2/24", "dev", "p0"]);
    lab.peer.exec(&["ethtool", "-K", "p0", "gro", "on"]);
    let p0 = lab.peer.exec(&["cat", "/sys/class/net/p0/address"]);
    let p0 = String::from_utf8_lossy(&p0.stdout).trim().to_owned();
    lab.relay.exec(&[
        "ip",
        "neigh",
        "replace",
        "10.10.2.2",
        "lladdr",
        &p0,
        "dev",
        "rp",
        "nud",
        "permanent",
    ]);
    lab
}

struct Run {
    name: &'static str,
    offered_pps: f64,
    delivered_pps: f64,
    loss: f64,
    host_cpu_ns_per_packet: f64,
    relayd_cpu_percent: f64,
    xdp_ns: Option<f64>,
}

fn end_to_end() {
    let runs: Vec<Run> = [
        (
            "xdp generic",
            vec!["--datapath", "xdp", "--xdp-mode", "generic"],
        ),
        (
            "xdp native",
            vec!["--datapath", "xdp", "--xdp-mode", "native"],
        ),
        ("userspace", vec!["--datapath", "userspace"]),
    ]
    .into_iter()
    .map(|(name, args)| end_to_end_run(name, &args))
    .collect();
    println!(
        "End to end: trafgen (1 process) sends {E2E_PACKETS} x 172-byte UDP client ns -> relay ns -> peer ns"
    );
    println!(
        "{:<12} {:>12} {:>14} {:>7} {:>16} {:>12} {:>14}",
        "datapath",
        "offered pps",
        "delivered pps",
        "loss",
        "host CPU ns/pkt",
        "relayd CPU",
        "XDP ns/pkt"
    );
    for run in &runs {
        println!(
            "{:<12} {:>12.0} {:>14.0} {:>6.2}% {:>16.0} {:>11.1}% {:>14}",
            run.name,
            run.offered_pps,
            run.delivered_pps,
            run.loss * 100.0,
            run.host_cpu_ns_per_packet,
            run.relayd_cpu_percent,
            run.xdp_ns.map_or("-".to_owned(), |ns| format!("{ns:.0}"))
        );
    }
    let best_xdp = runs
        .iter()
        .filter(|r| r.xdp_ns.is_some())
        .map(|r| r.delivered_pps)
        .fold(0.0, f64::max);
    let userspace = runs
        .iter()
        .find(|r| r.name == "userspace")
        .map_or(1.0, |r| r.delivered_pps);
    println!(
        "delivered pps, best XDP / userspace: {:.1}x",
        best_xdp / userspace.max(1.0)
    );
    println!(
        "(host CPU ns/pkt: busy CPU time of the whole host during the run per delivered packet, generator included)"
    );
}

fn end_to_end_run(name: &'static str, args: &[&str]) -> Run {
    eprintln!("end to end: {name} ...");
    let lab = lab();
    let pins = PinDir::new();
    let mut relayd_args = args.to_vec();
    let pin_dir = pins.path.to_string_lossy().into_owned();
    relayd_args.extend_from_slice(&[
        "--interface",
        "rc",
        "--interface",
        "rp",
        "--pin-dir",
        &pin_dir,
    ]);
    let relayd = Relayd::start(Some(&lab.relay), &relayd_args);
    relayd.ctl_ok(&[
        "flow",
        "add",
        "--src",
        "10.10.1.2:4000",
        "--dst",
        "10.10.1.1:20000",
        "--new-src",
        "10.10.2.1:30000",
        "--new-dst",
        "10.10.2.2:5004",
    ]);
    let sink = lab.peer.udp_socket("10.10.2.2:5004".parse().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let draining = {
        let stop = stop.clone();
        thread::spawn(move || {
            sink.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let _ = sink.recv_from(&mut buf);
            }
        })
    };
    let rc_mac = lab.relay.exec(&["cat", "/sys/class/net/rc/address"]);
    let c0_mac = lab.client.exec(&["cat", "/sys/class/net/c0/address"]);
    let config =
        std::env::temp_dir().join(format!("{}.trafgen", relay_tests::unique("relay-bench-")));
    std::fs::write(
        &config,
        format!(
            "{{ eth(da={}, sa={}), ipv4(saddr=10.10.1.2, daddr=10.10.1.1, ttl=64), udp(sp=4000, dp=20000), fill(0xab, 172) }}\n",
            String::from_utf8_lossy(&rc_mac.stdout).trim(),
            String::from_utf8_lossy(&c0_mac.stdout).trim()
        ),
    )
    .unwrap();
    let xdp = args.contains(&"xdp");
    if xdp {
        sysctl_bpf_stats(true);
    }
    let stats_before = xdp.then(xdp_run_stats).flatten();
    let delivered_before = udp_arrived(&lab.peer);
    let cpu_before = host_busy_ns();
    let relayd_before = process_cpu_ns(&relayd);
    let started = Instant::now();
    let status = Command::new("timeout")
        .args([
            "-s",
            "INT",
            "60",
            "ip",
            "netns",
            "exec",
            &lab.client.name,
            "trafgen",
            "--dev",
            "c0",
            "--conf",
        ])
        .arg(&config)
        .args(["--no-sock-mem", "-Q", "-n", &E2E_PACKETS.to_string()])
        .output()
        .expect("run trafgen");
    let elapsed = started.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(300));
    let cpu = host_busy_ns() - cpu_before;
    let relayd_cpu = process_cpu_ns(&relayd) - relayd_before;
    let delivered = udp_arrived(&lab.peer) - delivered_before;
    let stats_after = xdp.then(xdp_run_stats).flatten();
    if xdp {
        sysctl_bpf_stats(false);
    }
    stop.store(true, Ordering::Relaxed);
    draining.join().unwrap();
    let _ = std::fs::remove_file(&config);
    assert!(
        status.status.success() || status.status.code() == Some(124),
        "trafgen: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let xdp_ns = match (stats_before, stats_after) {
        (Some((t0, c0)), Some((t1, c1))) if c1 > c0 => Some((t1 - t0) as f64 / (c1 - c0) as f64),
        _ => None,
    };
    Run {
        name,
        offered_pps: E2E_PACKETS as f64 / elapsed,
        delivered_pps: delivered as f64 / elapsed,
        loss: 1.0 - delivered as f64 / E2E_PACKETS as f64,
        host_cpu_ns_per_packet: cpu as f64 / delivered.max(1) as f64,
        relayd_cpu_percent: relayd_cpu as f64 / (elapsed * 1e9) * 100.0,
        xdp_ns,
    }
}

/// UDP datagrams that reached the peer's UDP layer (delivered to the socket, or dropped
/// there because the sink could not keep up: either way the relay delivered them).
fn udp_arrived(ns: &NetNs) -> u64 {
    let snmp = ns.exec(&["cat", "/proc/net/snmp"]);
    let text = String::from_utf8_lossy(&snmp.stdout);
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let values: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let field = |name: &str| -> u64 {
        header
            .iter()
            .position(|h| *h == name)
            .and_then(|i| values[i].parse().ok())
            .unwrap_or(0)
    };
    field("InDatagrams") + field("RcvbufErrors")
}

/// Busy CPU time of the whole host in ns (all CPUs, everything but idle and iowait).
fn host_busy_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    let busy: u64 = cpu.iter().sum::<u64>() - cpu[3] - cpu[4];
    busy * 1_000_000_000 / clock_ticks()
}

fn process_cpu_ns(relayd: &Relayd) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", relayd.pid())).unwrap_or_default();
    // Fields after the command name (which may contain spaces): utime is 14th, stime 15th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    (fields.get(11).unwrap_or(&0) + fields.get(12).unwrap_or(&0)) * 1_000_000_000 / clock_ticks()
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as u64 }
}

fn sysctl_bpf_stats(on: bool) {
    let _ = std::fs::write(
        "/proc/sys/kernel/bpf_stats_enabled",
        if on { "1" } else { "0" },
    );
}

/// (run_time_ns, run_cnt) of the relay program, summed over loaded instances.
fn xdp_run_stats() -> Option<(u64, u64)> {
    let output = Command::new("bpftool")
        .args(["prog", "show", "name", XDP_RELAY_PROGRAM, "--json"])
        .output()
        .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    let progs = match value {
        serde_json::Value::Array(progs) => progs,
        single => vec![single],
    };
    Some(progs.iter().fold((0, 0), |(t, c), p| {
        (
            t + p["run_time_ns"].as_u64().unwrap_or(0),
            c + p["run_cnt"].as_u64().unwrap_or(0),
        )
    }))
}
