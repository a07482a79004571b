//! `cargo xtask soak [--minutes N] [--calls N]`: concurrent calls in the edge lab carrying
//! media at 50 packets/s each way for N minutes (default 10; 1,000 calls), while faults are
//! injected on a schedule printed at the start: relayd killed with SIGKILL and started
//! again, relayd stopped and started (as `systemctl restart`), the LAN link down for a
//! second, 200 apps' signalling sessions dropped and reconnected at once, a configuration
//! reload (SIGHUP). relayd keeps its calls in a state store, so they survive its restarts.
//!
//! The media is a paced generator on the calls' own 5-tuples (through the NAT), echoed by
//! the PBX; nftables counters at the NAT and at the PBX count each direction per slice of
//! SLICE_SECS, so the loss around each fault is that slice's. Reported: loss per slice
//! with its fault, calls alive at the end, relayd's RSS and open files per slice, the flows
//! left once every call was hung up (must be none), and every log line at WARN or above,
//! grouped.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use relay_tests::{
    app::{App, talk},
    bench::{Controller, PbxEcho, add_call_counters, counter, loss},
    config_file::ConfigFile,
    generator::paced_udp,
    lab::{EdgeLab, calls_config},
    netns::{PinDir, enter_by_name},
    relayd::{Relayd, StateFile},
    require_root,
    signalling_client::{receive_within, send},
    traffic::numbered,
};
use serde_json::json;

const API_KEY: &str = "soak-api-key-0123456789";
const PBX_OFFER: &str = relay_tests::pbx::SDP;
const SLICE_SECS: u64 = 10;
/// UDP length of the generator's RTP packets: what the counters match.
const RTP_UDP_LENGTH: u32 = 180;
/// Apps whose signalling reconnects at once in the reconnect fault.
const RECONNECTS: usize = 200;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Fault {
    None,
    Kill,
    Restart,
    LinkFlap,
    Reconnects,
    Reload,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::None => "-",
            Fault::Kill => "kill -9 relayd, start it again",
            Fault::Restart => "stop relayd (SIGTERM), start it again",
            Fault::LinkFlap => "LAN link down 1 s, up",
            Fault::Reconnects => "200 apps' signalling reconnects",
            Fault::Reload => "configuration reload (SIGHUP)",
        }
    }
}

/// Every other slice is quiet, so that each fault's loss stands alone.
const SCHEDULE: [Fault; 10] = [
    Fault::None,
    Fault::Kill,
    Fault::None,
    Fault::LinkFlap,
    Fault::None,
    Fault::Reconnects,
    Fault::None,
    Fault::Reload,
    Fault::None,
    Fault::Restart,
];

struct Slice {
    at_secs: u64,
    fault: Fault,
    sent: u64,
    loss_to_pbx: f64,
    loss_to_app: f64,
    rss_kib: u64,
    open_files: usize,
    calls: u64,
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|value| {
            value
                .parse()
                .unwrap_or_else(|_| panic!("{name}: {value:?}: not a whole number"))
        })
        .unwrap_or(default)
}

/// relayd in the relay's namespace `relay_ns`, keeping its calls in `state`.
fn start(relay_ns: &str, config: &str, state: &std::path::Path) -> Relayd {
    Relayd::start_with_state(relay_ns, &["--config", config], state)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// The WARN and ERROR lines of a relayd log, without their time and their fields.
fn warnings(log: &str, into: &mut BTreeMap<String, u64>) {
    for line in log.lines() {
        let Some((_, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if !(rest.starts_with("WARN") || rest.starts_with("ERROR")) {
            continue;
        }
        // "LEVEL target: message key=value ...": up to the first field.
        let message = match rest.find('=') {
            Some(end) => rest[..end]
                .rsplit_once(' ')
                .map_or(rest, |(message, _)| message),
            None => rest,
        };
        *into.entry(message.to_owned()).or_default() += 1;
    }
}

fn main() {
    require_root();
    let minutes = arg("--minutes", 10);
    let calls = arg("--calls", 1000) as usize;
    let slices = (minutes * 60).div_ceil(SLICE_SECS) as usize;
    println!(
        "soak: {calls} calls at 50 packets/s each way for {minutes} min, in slices of {SLICE_SECS} s; faults at the start of these slices:"
    );
    for (index, fault) in SCHEDULE.iter().cycle().take(slices).enumerate() {
        if *fault != Fault::None {
            println!("  {:>5} s  {}", index as u64 * SLICE_SECS, fault.name());
        }
    }

    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let state_file = StateFile::new("soak-state-");
    let state = state_file.0.clone();
    let config = ConfigFile::new(
        &calls_config(
            &pins.path,
            "acme",
            API_KEY,
            "port_range = \"40000-43999\"\nice_timeout_secs = 60\nmedia_timeout_secs = 600\nstats_interval_secs = 0",
        )
        .replace("[signalling]\n", "[signalling]\nqueue_length = 4096\n"),
    );
    let mut relayd = start(&lab.relay.name, config.path(), &state);
    let mut logs = String::new();
    let fingerprint = relayd.signalling_fingerprint();
    let _echo = PbxEcho::start(&lab.pbx);
    add_call_counters(&lab, RTP_UDP_LENGTH);
    let Controller {
        runtime,
        socket: mut controller,
        tokens,
    } = Controller::connect(&lab, &fingerprint, API_KEY, "user", calls);

    // The apps: each answers its call, talks for a second, tells its address, and stays
    // until `done`; the first RECONNECTS reconnect their signalling at each `reconnect`.
    let (addresses_tx, addresses) = std::sync::mpsc::channel::<SocketAddr>();
    let done = Arc::new(AtomicBool::new(false));
    let connected = Arc::new(AtomicU64::new(0));
    let reconnect = Arc::new(AtomicU64::new(0));
    let reconnected = Arc::new(AtomicU64::new(0));
    let apps = {
        let (app_ns, fingerprint, done, connected, reconnect, reconnected) = (
            lab.app.name.clone(),
            fingerprint.clone(),
            done.clone(),
            connected.clone(),
            reconnect.clone(),
            reconnected.clone(),
        );
        thread::spawn(move || {
            enter_by_name(&app_ns);
            relay_tests::runtime().block_on(run_apps(
                tokens,
                fingerprint,
                addresses_tx,
                done,
                connected,
                reconnect,
                reconnected,
            ))
        })
    };
    let waiting = Instant::now();
    while connected.load(Ordering::Relaxed) < calls as u64
        && waiting.elapsed() < Duration::from_secs(120)
    {
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "soak: {} apps connected in {:.1} s",
        connected.load(Ordering::Relaxed),
        waiting.elapsed().as_secs_f64()
    );
    // The calls, in waves of 100.
    let mut call_ids = Vec::new();
    runtime.block_on(async {
        for user in 0..calls {
            send(
                &mut controller,
                json!({"type": "call.create", "id": 1_000 + user, "user": format!("user{user}"), "sdp": PBX_OFFER}),
            )
            .await;
            if user % 100 == 99 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while call_ids.len() < calls && Instant::now() < deadline {
            let Ok(message) = receive_within(&mut controller, Duration::from_secs(30)).await
            else {
                break;
            };
            if message["type"] == "result"
                && let Some(call) = message["call"].as_u64()
            {
                call_ids.push(call);
            } else if message["type"] == "error" {
                eprintln!("soak: {message}");
            }
        }
    });
    let mut app_addresses = Vec::new();
    while app_addresses.len() < calls {
        match addresses.recv_timeout(Duration::from_secs(60)) {
            Ok(address) => app_addresses.push(address),
            Err(_) => break,
        }
    }
    println!(
        "soak: {} calls created, {} connected and talking",
        call_ids.len(),
        app_addresses.len()
    );
    let flows: Vec<(SocketAddrV4, SocketAddrV4)> = app_addresses
        .iter()
        .filter_map(|app| match app {
            SocketAddr::V4(app) => Some((*app, EdgeLab::ICE.parse().unwrap())),
            SocketAddr::V6(_) => None,
        })
        .collect();
    let pps = flows.len() as u64 * 50;

    let started = Instant::now();
    let mut report = Vec::new();
    for (index, fault) in SCHEDULE.iter().cycle().take(slices).enumerate() {
        let before = (
            counter(&lab.nat, "to_relay"),
            counter(&lab.pbx, "at_pbx"),
            counter(&lab.nat, "to_app"),
        );
        // The fault runs beside the slice's media, a second into it.
        let injecting = {
            let fault = *fault;
            let (relay_ns, config, state) = (
                lab.relay.name.clone(),
                config.path().to_owned(),
                state.clone(),
            );
            let reconnect = reconnect.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_secs(1));
                let mut log = String::new();
                match fault {
                    Fault::Kill => {
                        relayd.kill();
                        log = relayd.log();
                        relayd = start(&relay_ns, &config, &state);
                    }
                    Fault::Restart => {
                        relayd.stop();
                        log = relayd.log();
                        relayd = start(&relay_ns, &config, &state);
                    }
                    Fault::Reload => {
                        // SAFETY: a signal to the child this soak started.
                        unsafe { libc::kill(relayd.pid() as libc::pid_t, libc::SIGHUP) };
                    }
                    Fault::LinkFlap => {
                        let link = |state: &str| {
                            let _ = std::process::Command::new("ip")
                                .args([
                                    "netns", "exec", &relay_ns, "ip", "link", "set", "l0", state,
                                ])
                                .status();
                        };
                        link("down");
                        thread::sleep(Duration::from_secs(1));
                        link("up");
                    }
                    Fault::Reconnects => {
                        reconnect.fetch_add(1, Ordering::Relaxed);
                    }
                    Fault::None => {}
                }
                (relayd, log)
            })
        };
        paced_udp(
            &lab.app,
            &flows,
            &numbered(0),
            pps,
            Duration::from_secs(SLICE_SECS),
        );
        let (back, log) = injecting.join().expect("the fault's thread");
        relayd = back;
        logs.push_str(&log);
        thread::sleep(Duration::from_millis(500));
        let to_relay = counter(&lab.nat, "to_relay") - before.0;
        let at_pbx = counter(&lab.pbx, "at_pbx") - before.1;
        let to_app = counter(&lab.nat, "to_app") - before.2;
        let status = relayd.ctl_json(&["status"]);
        report.push(Slice {
            at_secs: index as u64 * SLICE_SECS,
            fault: *fault,
            sent: to_relay,
            loss_to_pbx: loss(to_relay, at_pbx),
            loss_to_app: loss(at_pbx, to_app),
            rss_kib: rss_kib(relayd.pid()),
            open_files: open_files(relayd.pid()),
            calls: status["calls"].as_u64().unwrap_or(0),
        });
        let last = report.last().unwrap();
        eprintln!(
            "soak: {:>5} s {:<40} loss to PBX {:.3}%, to app {:.3}%, {} calls",
            last.at_secs,
            fault.name(),
            last.loss_to_pbx * 100.0,
            last.loss_to_app * 100.0,
            last.calls
        );
    }
    let soaked = started.elapsed();
    let alive = relayd.ctl_json(&["status"])["calls"].as_u64().unwrap_or(0);

    // Every call hung up: nothing of them may stay.
    runtime.block_on(async {
        let mut controller = lab
            .controller(&relayd.signalling_fingerprint(), "acme", API_KEY)
            .await;
        for (n, call) in call_ids.iter().enumerate() {
            send(
                &mut controller,
                json!({"type": "call.hangup", "id": 500_000 + n, "call": call}),
            )
            .await;
        }
        let mut answered = 0;
        while answered < call_ids.len() {
            match receive_within(&mut controller, Duration::from_secs(10)).await {
                Ok(message) if message["type"] == "result" || message["type"] == "error" => {
                    answered += 1
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    done.store(true, Ordering::Relaxed);
    let _ = apps.join();
    thread::sleep(Duration::from_secs(1));
    let flows_left = relayd.ctl_json(&["flow", "list"])["flows"]
        .as_array()
        .map_or(0, Vec::len);
    logs.push_str(&relayd.log());
    drop(relayd);
    drop(state_file);

    println!();
    println!(
        "Soak: {} calls, 50 packets/s each way ({pps} pps offered each way), {:.0} s; loss per {SLICE_SECS} s slice, the fault at its start",
        flows.len(),
        soaked.as_secs_f64()
    );
    println!(
        "{:>6}  {:<40} {:>9} {:>12} {:>12} {:>7} {:>9} {:>6}",
        "at s", "fault", "sent", "loss to PBX", "loss to app", "calls", "RSS MiB", "fds"
    );
    for slice in &report {
        println!(
            "{:>6}  {:<40} {:>9} {:>11.3}% {:>11.3}% {:>7} {:>9.1} {:>6}",
            slice.at_secs,
            slice.fault.name(),
            slice.sent,
            slice.loss_to_pbx * 100.0,
            slice.loss_to_app * 100.0,
            slice.calls,
            slice.rss_kib as f64 / 1024.0,
            slice.open_files
        );
    }
    println!();
    println!(
        "calls alive at the end: {alive} of {} (expected all); apps reconnected: {}",
        flows.len(),
        reconnected.load(Ordering::Relaxed)
    );
    println!("flows left after every call was hung up: {flows_left} (expected 0)");
    let mut grouped = BTreeMap::new();
    warnings(&logs, &mut grouped);
    println!("log lines at WARN or above, grouped: {}", grouped.len());
    for (message, count) in &grouped {
        println!("  {count:>6}  {message}");
    }
}

async fn run_apps(
    tokens: Vec<String>,
    fingerprint: String,
    addresses: std::sync::mpsc::Sender<SocketAddr>,
    done: Arc<AtomicBool>,
    connected: Arc<AtomicU64>,
    reconnect: Arc<AtomicU64>,
    reconnected: Arc<AtomicU64>,
) {
    let connecting = Arc::new(tokio::sync::Semaphore::new(20));
    let mut tasks = Vec::new();
    for (index, token) in tokens.into_iter().enumerate() {
        let (fingerprint, addresses, done, connected, reconnect, reconnected, connecting) = (
            fingerprint.clone(),
            addresses.clone(),
            done.clone(),
            connected.clone(),
            reconnect.clone(),
            reconnected.clone(),
            connecting.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut app = {
                let _permit = connecting.acquire().await.unwrap();
                App::in_edge_lab(&fingerprint, &token).await
            };
            connected.fetch_add(1, Ordering::Relaxed);
            let incoming = app.next_within(Duration::from_secs(600)).await;
            let media = app.answer(&incoming).await;
            talk(&media, 0, 50).await;
            if let Ok(local) = media.local_addr() {
                let _ = addresses.send(local);
            }
            let mut round = 0;
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let now = reconnect.load(Ordering::Relaxed);
                if now != round && index < RECONNECTS {
                    round = now;
                    // A new session; the old one's socket closes with it.
                    app.signalling = App::in_edge_lab(&fingerprint, &token).await.signalling;
                    reconnected.fetch_add(1, Ordering::Relaxed);
                }
            }
            app.close().await;
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
}
