//! The XDP program under real traffic, by table size and load: relayd holds 1, 1,000 or
//! 101,000 flows (installed through its control socket, as a controller would), trafgen
//! steps through their 4-tuples at about 10k pps, 100k pps and as fast as it can (both
//! CPUs sending, so both receive), and each cell reports what the kernel says the program
//! cost per packet (`bpf_stats`), what was delivered, and relayd's own CPU (its flow table's
//! tick, which reads every flow's counters each second: nothing else runs in it here).

use std::{
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use relay_tests::{
    generator::{Load, trafgen_on_cpus, udp_frames},
    lab::ThreeHosts,
    measure::{Sink, process_cpu_ns, sysctl_bpf_stats, udp_arrived, xdp_run_stats},
    netns::PinDir,
    relayd::Relayd,
};

/// Installed flows: client ports 4000..=4999, and relay ports 20000 onwards (1,000 and 101
/// ports are coprime, so trafgen's stepping visits every pair).
const TABLES: [(u16, u16); 3] = [(1, 1), (1000, 1), (1000, 101)];
/// Offered loads, with the number of trafgen processes.
const LOADS: [(Load, u32); 3] = [
    (Load::Gap { micros: 100 }, 1),
    (Load::Burst { pps: 100_000 }, 1),
    (Load::Unlimited, 2),
];
/// In native mode a veth takes frames only as fast as its peer's NAPI drains its ring: two
/// unlimited trafgen processes overflow it (trafgen stops with EAGAIN), one does not.
fn processes(mode: &str, load: Load, processes: u32) -> u32 {
    if mode == "native" && load == Load::Unlimited {
        1
    } else {
        processes
    }
}
const MODES: [&str; 2] = ["generic", "native"];
const STEP_SECS: u64 = 3;
const CLIENT_PORT: u16 = 4000;
const RELAY_PORT: u16 = 20000;

struct Cell {
    mode: &'static str,
    flows: u32,
    load: String,
    offered_pps: f64,
    delivered_pps: f64,
    loss: f64,
    xdp_ns: Option<f64>,
    /// Cycles and LLC misses per run, from `bpftool prog profile`.
    profile: Option<(f64, f64)>,
    relayd_cpu_percent: f64,
    error: Option<String>,
}

pub fn run() {
    let unsupported = profile_unsupported();
    let mut cells = Vec::new();
    for mode in MODES {
        for (client_ports, relay_ports) in TABLES {
            cells.extend(table(
                mode,
                client_ports,
                relay_ports,
                unsupported.is_none(),
            ));
        }
    }
    println!(
        "XDP under traffic: relayd with N flows, trafgen stepping through their 4-tuples, 172-byte UDP, {STEP_SECS} s per cell"
    );
    println!(
        "(XDP ns/pkt: bpf_stats run_time_ns / run_cnt; relayd CPU: the whole process, which here only runs the flow table's tick)"
    );
    if let Some(reason) = &unsupported {
        println!("(bpftool prog profile, cycles and LLC misses per packet: {reason})");
    }
    println!(
        "{:<8} {:>8} {:>11} {:>12} {:>14} {:>7} {:>11} {:>11} {:>11} {:>11}",
        "mode",
        "flows",
        "load",
        "offered pps",
        "delivered pps",
        "loss",
        "XDP ns/pkt",
        "cycles/pkt",
        "LLC mis/pkt",
        "relayd CPU"
    );
    for cell in &cells {
        if let Some(err) = &cell.error {
            println!(
                "{:<8} {:>8} {:>11}  generator failed: {err}",
                cell.mode, cell.flows, cell.load
            );
            continue;
        }
        let (cycles, misses) = match cell.profile {
            Some((cycles, misses)) => (format!("{cycles:.0}"), format!("{misses:.2}")),
            None => ("-".to_owned(), "-".to_owned()),
        };
        println!(
            "{:<8} {:>8} {:>11} {:>12.0} {:>14.0} {:>6.2}% {:>11} {:>11} {:>11} {:>10.2}%",
            cell.mode,
            cell.flows,
            cell.load,
            cell.offered_pps,
            cell.delivered_pps,
            cell.loss * 100.0,
            cell.xdp_ns.map_or("-".to_owned(), |ns| format!("{ns:.0}")),
            cycles,
            misses,
            cell.relayd_cpu_percent
        );
    }
}

/// One relayd with `client_ports` x `relay_ports` flows, measured idle and under each load.
fn table(mode: &'static str, client_ports: u16, relay_ports: u16, profile: bool) -> Vec<Cell> {
    let flows = u32::from(client_ports) * u32::from(relay_ports);
    let lab = crate::lab();
    let pins = PinDir::new();
    let pin_dir = pins.path.to_string_lossy().into_owned();
    let relayd = Relayd::start(
        Some(&lab.relay),
        &lab.relayd_args(&["--datapath", "xdp", "--xdp-mode", mode], &pin_dir),
    );
    let started = Instant::now();
    install(&relayd, client_ports, relay_ports);
    eprintln!(
        "matrix: {mode}, {flows} flows installed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let _sink = Sink::bind(&lab.peer, "10.10.2.2:5004".parse().unwrap());
    let config =
        std::env::temp_dir().join(format!("{}.trafgen", relay_tests::unique("relay-matrix-")));
    std::fs::write(
        &config,
        udp_frames(
            &lab.client,
            "c0",
            &lab.relay,
            "rc",
            (
                Ipv4Addr::new(10, 10, 1, 2),
                CLIENT_PORT..=CLIENT_PORT + client_ports - 1,
            ),
            (
                Ipv4Addr::new(10, 10, 1, 1),
                RELAY_PORT..=RELAY_PORT + relay_ports - 1,
            ),
            "fill(0xab, 172)",
        ),
    )
    .unwrap();
    sysctl_bpf_stats(true);
    let setup = Setup {
        mode,
        flows,
        lab: &lab,
        relayd: &relayd,
        config: &config,
        profile,
    };
    let mut cells = vec![idle(mode, flows, &relayd)];
    for (load, processes) in LOADS {
        let processes = self::processes(mode, load, processes);
        eprintln!("matrix: {mode}, {flows} flows, {}", label(load, processes));
        cells.push(step(&setup, load, processes));
    }
    sysctl_bpf_stats(false);
    let _ = std::fs::remove_file(&config);
    cells
}

fn label(load: Load, processes: u32) -> String {
    if processes > 1 {
        format!("{} x{processes}", load.label())
    } else {
        load.label()
    }
}

/// relayd's CPU with the flows installed and no traffic: the tick alone, over two of its
/// readings of every flow (a large table is read every few seconds).
fn idle(mode: &'static str, flows: u32, relayd: &Relayd) -> Cell {
    let reading_every = (flows as usize).div_ceil(relay::datapath::table::FLOWS_READ_PER_TICK);
    let before = process_cpu_ns(relayd.pid());
    let started = Instant::now();
    thread::sleep(Duration::from_secs(STEP_SECS.max(2 * reading_every as u64)));
    let cpu = process_cpu_ns(relayd.pid()) - before;
    Cell {
        mode,
        flows,
        load: "idle".to_owned(),
        offered_pps: 0.0,
        delivered_pps: 0.0,
        loss: 0.0,
        xdp_ns: None,
        profile: None,
        relayd_cpu_percent: cpu as f64 / started.elapsed().as_nanos() as f64 * 100.0,
        error: None,
    }
}

/// One relayd and its table, as each cell measures it.
struct Setup<'a> {
    mode: &'static str,
    flows: u32,
    lab: &'a ThreeHosts,
    relayd: &'a Relayd,
    /// The trafgen configuration.
    config: &'a std::path::Path,
    /// Whether `bpftool prog profile` runs beside trafgen.
    profile: bool,
}

fn step(setup: &Setup<'_>, load: Load, processes: u32) -> Cell {
    let Setup {
        mode,
        flows,
        lab,
        relayd,
        config,
        profile,
    } = *setup;
    let profiler = profile.then(|| {
        Command::new("bpftool")
            .args(["prog", "profile", "name", relay_common::XDP_RELAY_PROGRAM])
            .args([
                "duration",
                &STEP_SECS.to_string(),
                "cycles",
                "llc_misses",
                "--json",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run bpftool prog profile")
    });
    let stats_before = xdp_run_stats();
    let delivered_before = udp_arrived(&lab.peer);
    let relayd_before = process_cpu_ns(relayd.pid());
    let sent = trafgen_on_cpus(&lab.client, "c0", config, load, STEP_SECS, processes);
    thread::sleep(Duration::from_millis(300));
    let delivered = udp_arrived(&lab.peer) - delivered_before;
    let relayd_cpu = process_cpu_ns(relayd.pid()) - relayd_before;
    let stats_after = xdp_run_stats();
    let xdp_ns = match (stats_before, stats_after) {
        (Some((t0, c0)), Some((t1, c1))) if c1 > c0 => Some((t1 - t0) as f64 / (c1 - c0) as f64),
        _ => None,
    };
    let profile = profiler.and_then(|profiler| {
        let output = profiler.wait_with_output().ok()?;
        per_run(&serde_json::from_slice(&output.stdout).ok()?)
    });
    let elapsed = sent.elapsed_secs;
    Cell {
        mode,
        flows,
        load: label(load, processes),
        profile,
        offered_pps: sent.pps(),
        delivered_pps: delivered as f64 / elapsed,
        loss: 1.0 - delivered as f64 / sent.packets.max(1) as f64,
        xdp_ns,
        relayd_cpu_percent: relayd_cpu as f64 / ((elapsed + 0.3) * 1e9) * 100.0,
        error: sent.error,
    }
}

/// Installs the flows through relayd's control socket, requests pipelined a thousand at a
/// time; panics on the first refusal (the benchmark would measure misses otherwise).
fn install(relayd: &Relayd, client_ports: u16, relay_ports: u16) {
    let stream = UnixStream::connect(&relayd.socket).expect("connect to the control socket");
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let pairs: Vec<(u16, u16)> = (0..relay_ports)
        .flat_map(|r| (0..client_ports).map(move |c| (CLIENT_PORT + c, RELAY_PORT + r)))
        .collect();
    let total = pairs.len();
    let mut line = String::new();
    for (chunk_index, chunk) in pairs.chunks(1000).enumerate() {
        let mut requests = String::new();
        for (i, (client, relay)) in chunk.iter().enumerate() {
            let request = serde_json::json!({
                "version": 1,
                "id": chunk_index * 1000 + i + 1,
                "method": "flow.add",
                "params": {
                    "src": format!("10.10.1.2:{client}"),
                    "dst": format!("10.10.1.1:{relay}"),
                    "new_src": "10.10.2.1:30000",
                    "new_dst": "10.10.2.2:5004",
                },
            });
            requests.push_str(&request.to_string());
            requests.push('\n');
        }
        writer.write_all(requests.as_bytes()).unwrap();
        for _ in chunk {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let answer: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert!(
                answer.get("error").is_none(),
                "flow.add refused: {line}{}",
                relayd.log()
            );
        }
        if total > 10_000 {
            eprint!(
                "\rmatrix: installing flows {}/{total}",
                (chunk_index + 1) * 1000
            );
        }
    }
    if total > 10_000 {
        eprintln!();
    }
}

/// Cycles and LLC misses per run from `bpftool prog profile --json`:
/// `{"run_cnt": N, "metrics": [{"name": "cycles", "value": V, ...}, ...]}`.
fn per_run(profile: &serde_json::Value) -> Option<(f64, f64)> {
    let runs = profile["run_cnt"].as_f64().filter(|runs| *runs > 0.0)?;
    let metric = |name: &str| {
        profile["metrics"]
            .as_array()?
            .iter()
            .find(|metric| metric["name"] == name)?["value"]
            .as_f64()
    };
    Some((metric("cycles")? / runs, metric("llc_misses")? / runs))
}

/// Why `bpftool prog profile` cannot count cycles and LLC misses here, if it cannot.
fn profile_unsupported() -> Option<String> {
    let output = Command::new("bpftool")
        .args(["prog", "profile", "id", "0", "duration", "1", "cycles"])
        .output();
    let text = match output {
        Ok(output) => String::from_utf8_lossy(&output.stderr).into_owned(),
        Err(err) => return Some(format!("not measured: bpftool: {err}")),
    };
    if text.contains("not supported") {
        return Some(
            "not measured: this bpftool is built without it (needs clang >= 10)".to_owned(),
        );
    }
    if !pmu_counts_cycles() {
        return Some(
            "not measured: no hardware performance counters (perf cannot count cycles)".to_owned(),
        );
    }
    None
}

/// Whether the CPU's performance monitoring unit counts cycles (a VM may not expose it).
fn pmu_counts_cycles() -> bool {
    Command::new("perf")
        .args(["stat", "-x,", "-e", "cycles", "true"])
        .output()
        .map(|output| {
            let text = String::from_utf8_lossy(&output.stderr);
            !text.contains("not supported") && !text.contains("not counted")
        })
        .unwrap_or(false)
}
