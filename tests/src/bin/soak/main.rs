//! `cargo xtask soak [--minutes N] [--calls N] [--allocations N] [--faults LIST]`: in the edge lab, calls
//! carrying media at 50 packets/s each way and TURN allocations with a bound channel
//! carrying media at the same rate, for N minutes (default 10; 1,000 calls and 1,000
//! allocations), while faults are injected on a schedule printed at the start: relayd
//! killed with SIGKILL and started again, relayd stopped and started (as `systemctl
//! restart`), the LAN link down for a second, 200 apps' signalling sessions dropped and
//! reconnected at once, churn (100 calls hung up and 100 new ones answered, 100 allocations
//! made, used and deleted), a configuration reload (SIGHUP). `--faults churn,reload` keeps
//! those only (names: kill, restart, link-flap, reconnects, churn, reload). relayd keeps its calls and
//! allocations in a state store, so they survive its restarts.
//!
//! The steady media is one paced generator on the calls' and the allocations' own
//! 5-tuples (through the NAT), echoed at the PBX; nftables counters at the NAT and at the
//! PBX count each direction per slice of SLICE_SECS, so the loss around each fault is that
//! slice's. The churned calls and allocations count their own echoes. Reported: loss per
//! slice with its fault, the churn, calls and allocations alive at the end, relayd's RSS
//! and open files per slice, the flows and allocations left once everything ended (must be
//! none), and every log line at WARN or above, grouped; relayd's whole log is kept in a
//! file whose path is printed.

mod turn;

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
    sync::{Arc, atomic::Ordering},
    thread,
    time::{Duration, Instant},
};

use relay_tests::{
    bench::{Controller, PbxEcho, add_call_counters, add_counter, counter, loss},
    config_file::ConfigFile,
    fleet,
    generator::paced_udp_each,
    lab::{APPS_BEHIND_ONE_NAT, EdgeLab, calls_config},
    netns::{PinDir, enter_by_name},
    relayd::{Relayd, StateFile},
    require_root,
    signalling_client::{Socket, receive_within, send},
    traffic::numbered,
};
use serde_json::{Value, json};

const API_KEY: &str = "soak-api-key-0123456789";
const PBX_OFFER: &str = relay_tests::pbx::SDP;
const SLICE_SECS: u64 = 10;
/// UDP length of the generator's RTP packets: what the call counters match; the
/// allocations' ChannelData is 4 bytes longer toward the relay and back to the app.
const RTP_UDP_LENGTH: u32 = 180;
const TURN_SERVER: &str = "198.51.100.1:3478";
/// The allocations' peer: an echo beside the PBX's.
const TURN_PEER: &str = "10.30.0.2:40002";
/// Calls hung up and placed again, and allocations made and deleted, at each churn.
const CHURN_CALLS: usize = 100;
const CHURN_ALLOCATIONS: usize = 100;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Fault {
    None,
    Kill,
    Restart,
    LinkFlap,
    Reconnects,
    Churn,
    Reload,
}

impl Fault {
    const ALL: [Fault; 6] = [
        Fault::Kill,
        Fault::Restart,
        Fault::LinkFlap,
        Fault::Reconnects,
        Fault::Churn,
        Fault::Reload,
    ];

    /// Its name on the command line (`--faults`).
    fn key(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Kill => "kill",
            Fault::Restart => "restart",
            Fault::LinkFlap => "link-flap",
            Fault::Reconnects => "reconnects",
            Fault::Churn => "churn",
            Fault::Reload => "reload",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Fault::None => "-",
            Fault::Kill => "kill -9 relayd, start it again",
            Fault::Restart => "stop relayd (SIGTERM), start it again",
            Fault::LinkFlap => "LAN link down 1 s, up",
            Fault::Reconnects => "200 apps' signalling reconnects",
            Fault::Churn => "churn: 100 calls, 100 allocations",
            Fault::Reload => "configuration reload (SIGHUP)",
        }
    }
}

/// Every other slice is quiet, so that each fault's loss stands alone.
const DEFAULT_SCHEDULE: [Fault; 12] = [
    Fault::None,
    Fault::Kill,
    Fault::None,
    Fault::LinkFlap,
    Fault::None,
    Fault::Reconnects,
    Fault::None,
    Fault::Churn,
    Fault::None,
    Fault::Reload,
    Fault::None,
    Fault::Restart,
];

/// Packets counted toward the relay, at the far end, and back at the NAT.
#[derive(Clone, Copy, Default)]
struct Counted {
    to_relay: u64,
    at_far_end: u64,
    to_app: u64,
}

impl Counted {
    fn read(lab: &EdgeLab, [to_relay, at_far_end, to_app]: [&str; 3]) -> Counted {
        Counted {
            to_relay: counter(&lab.nat, to_relay),
            at_far_end: counter(&lab.pbx, at_far_end),
            to_app: counter(&lab.nat, to_app),
        }
    }

    fn since(self, before: Counted) -> Counted {
        Counted {
            to_relay: self.to_relay - before.to_relay,
            at_far_end: self.at_far_end - before.at_far_end,
            to_app: self.to_app - before.to_app,
        }
    }

    fn loss_there(self) -> f64 {
        loss(self.to_relay, self.at_far_end)
    }

    fn loss_back(self) -> f64 {
        loss(self.at_far_end, self.to_app)
    }
}

const CALL_COUNTERS: [&str; 3] = ["to_relay", "at_pbx", "to_app"];
const TURN_COUNTERS: [&str; 3] = ["turn_to_relay", "turn_at_peer", "turn_to_app"];

struct Slice {
    at_secs: u64,
    fault: Fault,
    calls: Counted,
    turn: Counted,
    rss_kib: u64,
    open_files: usize,
    calls_alive: u64,
    allocations: u64,
}

/// The schedule: every fault, or those `--faults` names (comma-separated), each after a
/// quiet slice. With one fault (`--faults churn`), it comes every other slice, without
/// the restarts that would hide growth within one relayd's life.
fn schedule() -> Vec<Fault> {
    let args: Vec<String> = std::env::args().collect();
    let Some(list) = args
        .iter()
        .position(|a| a == "--faults")
        .and_then(|i| args.get(i + 1))
    else {
        return DEFAULT_SCHEDULE.to_vec();
    };
    let mut schedule = Vec::new();
    for key in list.split(',') {
        let fault = Fault::ALL
            .into_iter()
            .find(|fault| fault.key() == key)
            .unwrap_or_else(|| {
                let keys: Vec<_> = Fault::ALL.iter().map(|fault| fault.key()).collect();
                panic!("--faults: {key:?} is not one of {}", keys.join(", "))
            });
        schedule.extend([Fault::None, fault]);
    }
    schedule
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

/// The WARN and ERROR lines of a relayd log, grouped by their message (without the time
/// and the fields): how many, and the first one whole.
fn warnings(log: &str, into: &mut BTreeMap<String, (u64, String)>) {
    for line in log.lines() {
        let Some((_, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if !(rest.starts_with("WARN") || rest.starts_with("ERROR")) {
            continue;
        }
        // "LEVEL target: message key=value ...": up to the first field, a word with an
        // `=` after a name (a message may hold " = " itself).
        let field = rest.split(' ').position(|word| {
            word.split_once('=').is_some_and(|(name, _)| {
                !name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || c == '_')
            })
        });
        let message = match field {
            Some(words) => rest.split(' ').take(words).collect::<Vec<_>>().join(" "),
            None => rest.to_owned(),
        };
        into.entry(message)
            .or_insert_with(|| (0, line.to_owned()))
            .0 += 1;
    }
}

/// The relay's configuration: the calls, many apps behind one NAT address (one source for
/// the connection and request limits), TURN on the WAN address relaying toward the PBX's
/// LAN.
fn config(pins: &PinDir) -> String {
    calls_config(
        &pins.path,
        "acme",
        API_KEY,
        "port_range = \"40000-43999\"\nice_timeout_secs = 60\nmedia_timeout_secs = 600\nstats_interval_secs = 0",
    )
    .replace("[signalling]\n", "[signalling]\nqueue_length = 4096\n")
        + &format!(
            r#"
{APPS_BEHIND_ONE_NAT}
[turn]
enabled = true
listen = ["{TURN_SERVER}"]
relay_addresses = ["{lan}"]
users = [{{ name = "{user}", password = "{password}" }}]
allowed_peers = ["{pbx}"]
max_allocations_per_user = 10000
max_allocate_rate_per_source = 0
max_request_rate_per_source = 0
"#,
            lan = EdgeLab::RELAY_LAN,
            user = turn::USERNAME,
            password = turn::PASSWORD,
            pbx = EdgeLab::PBX,
        )
}

/// Places a call to each of `users`, waits for their results; the calls' ids.
async fn place_calls(controller: &mut Socket, users: std::ops::Range<usize>) -> Vec<u64> {
    let first_id = 1_000_000;
    let wanted = users.len();
    for user in users {
        send(
            controller,
            json!({"type": "call.create", "id": first_id + user, "user": format!("user{user}"), "sdp": PBX_OFFER}),
        )
        .await;
        if user % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while ids.len() < wanted && Instant::now() < deadline {
        let Ok(message) = receive_within(controller, Duration::from_secs(30)).await else {
            break;
        };
        let ours = message["id"]
            .as_u64()
            .is_some_and(|id| id >= first_id as u64);
        if message["type"] == "result"
            && ours
            && let Some(call) = message["call"].as_u64()
        {
            ids.push(call);
        } else if message["type"] == "error" {
            eprintln!("soak: {message}");
        }
    }
    ids
}

/// Hangs up `calls`; how many the relay answered.
async fn hang_up(controller: &mut Socket, calls: &[u64]) -> usize {
    for (n, call) in calls.iter().enumerate() {
        send(
            controller,
            json!({"type": "call.hangup", "id": 500_000 + n, "call": call}),
        )
        .await;
    }
    let mut answered = 0;
    while answered < calls.len() {
        match receive_within(controller, Duration::from_secs(10)).await {
            Ok(message) if message["type"] == "result" || message["type"] == "error" => {
                answered += 1
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    answered
}

fn status_count(status: &Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(status, |value, key| &value[*key])
        .as_u64()
        .unwrap_or(0)
}

/// What one churn round did.
struct Churn {
    at_secs: u64,
    calls_ended: usize,
    calls_placed: usize,
    calls_answered: u64,
    call_packets: (u64, u64),
    allocations: u64,
    allocations_failed: u64,
    allocation_packets: (u64, u64),
    secs: f64,
}

fn main() {
    require_root();
    let minutes = arg("--minutes", 10);
    let calls = arg("--calls", 1000) as usize;
    let allocations = arg("--allocations", 1000) as usize;
    let slices = (minutes * 60).div_ceil(SLICE_SECS) as usize;
    let schedule = schedule();
    println!(
        "soak: {calls} calls and {allocations} TURN allocations at 50 packets/s each way for {minutes} min, in slices of {SLICE_SECS} s; faults at the start of these slices:"
    );
    for (index, fault) in schedule.iter().cycle().take(slices).enumerate() {
        if *fault != Fault::None {
            println!("  {:>5} s  {}", index as u64 * SLICE_SECS, fault.name());
        }
    }

    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let state_file = StateFile::new("soak-state-");
    let state = state_file.0.clone();
    let config = ConfigFile::new(&config(&pins));
    let mut relayd = start(&lab.relay.name, config.path(), &state);
    let mut logs = String::new();
    let fingerprint = relayd.signalling_fingerprint();
    let _echo = PbxEcho::start(&lab.pbx);
    let _turn_echo = PbxEcho::start_on(&lab.pbx, TURN_PEER.parse().expect("address"));
    add_call_counters(&lab, RTP_UDP_LENGTH);
    let turn_length = RTP_UDP_LENGTH + 4;
    let turn_port = TURN_SERVER.rsplit_once(':').expect("ADDRESS:PORT").1;
    let peer_port = TURN_PEER.rsplit_once(':').expect("ADDRESS:PORT").1;
    add_counter(
        &lab.nat,
        "forward",
        "turn_to_relay",
        &format!("udp length {turn_length} udp dport {turn_port}"),
    );
    add_counter(
        &lab.nat,
        "forward",
        "turn_to_app",
        &format!("udp length {turn_length} udp sport {turn_port}"),
    );
    add_counter(
        &lab.pbx,
        "input",
        "turn_at_peer",
        &format!("udp length {RTP_UDP_LENGTH} udp dport {peer_port}"),
    );
    // The generator's ChannelData comes back to clients that did not send it.
    lab.app.exec(&[
        "nft",
        &format!(
            "add table ip soak; add chain ip soak input {{ type filter hook input priority 0; }}; add rule ip soak input udp sport {turn_port} udp length {turn_length} drop"
        ),
    ]);
    let Controller {
        runtime,
        socket: mut controller,
        tokens,
    } = Controller::connect(&lab, &fingerprint, API_KEY, "user", calls + CHURN_CALLS);

    let (addresses_tx, addresses) = std::sync::mpsc::channel::<SocketAddr>();
    let apps = Arc::new(fleet::Fleet::default());
    let apps_thread = {
        let (app_ns, fingerprint, apps) = (lab.app.name.clone(), fingerprint.clone(), apps.clone());
        thread::spawn(move || {
            enter_by_name(&app_ns);
            relay_tests::runtime().block_on(fleet::run(
                tokens,
                calls,
                fingerprint,
                addresses_tx,
                apps,
            ))
        })
    };
    let server: SocketAddr = TURN_SERVER.parse().expect("address");
    let peer: SocketAddr = TURN_PEER.parse().expect("address");
    let (clients_tx, clients) = std::sync::mpsc::channel::<SocketAddr>();
    let turn_counts = Arc::new(turn::Counts::default());
    let turn_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let turn_thread = {
        let (app_ns, done, counts) = (lab.app.name.clone(), turn_done.clone(), turn_counts.clone());
        thread::spawn(move || {
            enter_by_name(&app_ns);
            relay_tests::runtime().block_on(turn::keep(
                allocations,
                server,
                peer,
                clients_tx,
                done,
                counts,
            ))
        })
    };
    let waiting = Instant::now();
    while apps.connected.load(Ordering::Relaxed) < (calls + CHURN_CALLS) as u64
        && waiting.elapsed() < Duration::from_secs(120)
    {
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "soak: {} apps connected in {:.1} s",
        apps.connected.load(Ordering::Relaxed),
        waiting.elapsed().as_secs_f64()
    );
    let call_ids = runtime.block_on(place_calls(&mut controller, 0..calls));
    let mut churn_ids = runtime.block_on(place_calls(&mut controller, calls..calls + CHURN_CALLS));
    let mut app_addresses = Vec::new();
    while app_addresses.len() < calls {
        match addresses.recv_timeout(Duration::from_secs(60)) {
            Ok(address) => app_addresses.push(address),
            Err(_) => break,
        }
    }
    let mut client_addresses = Vec::new();
    while client_addresses.len() < allocations {
        match clients.recv_timeout(Duration::from_secs(60)) {
            Ok(address) => client_addresses.push(address),
            Err(_) => break,
        }
    }
    println!(
        "soak: {} calls created, {} connected and talking; {} more calls to churn; {} TURN allocations with a channel ({} failed)",
        call_ids.len(),
        app_addresses.len(),
        churn_ids.len(),
        client_addresses.len(),
        turn_counts.failed.load(Ordering::Relaxed)
    );
    let v4 = |addresses: &[SocketAddr], to: SocketAddrV4| -> Vec<(SocketAddrV4, SocketAddrV4)> {
        addresses
            .iter()
            .filter_map(|from| match from {
                SocketAddr::V4(from) => Some((*from, to)),
                SocketAddr::V6(_) => None,
            })
            .collect()
    };
    let call_flows = v4(&app_addresses, EdgeLab::ICE.parse().expect("address"));
    let turn_flows = v4(&client_addresses, TURN_SERVER.parse().expect("address"));
    let steady_calls = call_flows.len();
    let flows: Vec<_> = call_flows.iter().chain(&turn_flows).copied().collect();
    let pps = flows.len() as u64 * 50;
    let payloads = (numbered(0), turn::channel_data(&numbered(0)));

    let started = Instant::now();
    let mut report = Vec::new();
    let mut churns = Vec::new();
    for (index, fault) in schedule.iter().cycle().take(slices).enumerate() {
        let at_secs = index as u64 * SLICE_SECS;
        let before = (
            Counted::read(&lab, CALL_COUNTERS),
            Counted::read(&lab, TURN_COUNTERS),
        );
        thread::scope(|scope| {
            let generator = {
                let (flows, (rtp, channel)) = (&flows, payloads.clone());
                let lab = &lab;
                scope.spawn(move || {
                    paced_udp_each(
                        &lab.app,
                        flows,
                        move |flow| {
                            if flow < steady_calls {
                                rtp.clone()
                            } else {
                                channel.clone()
                            }
                        },
                        pps,
                        Duration::from_secs(SLICE_SECS),
                    )
                })
            };
            // The fault, a second into the slice's media.
            thread::sleep(Duration::from_secs(1));
            match fault {
                Fault::Kill => {
                    relayd.kill();
                    logs.push_str(&relayd.log());
                    relayd = start(&lab.relay.name, config.path(), &state);
                }
                Fault::Restart => {
                    relayd.stop();
                    logs.push_str(&relayd.log());
                    relayd = start(&lab.relay.name, config.path(), &state);
                }
                Fault::Reload => {
                    // SAFETY: a signal to the child this soak started.
                    unsafe { libc::kill(relayd.pid() as libc::pid_t, libc::SIGHUP) };
                }
                Fault::LinkFlap => {
                    lab.relay.exec(&["ip", "link", "set", "l0", "down"]);
                    thread::sleep(Duration::from_secs(1));
                    lab.relay.exec(&["ip", "link", "set", "l0", "up"]);
                }
                Fault::Reconnects => {
                    apps.reconnect.fetch_add(1, Ordering::Relaxed);
                }
                Fault::Churn => {
                    let churning = Instant::now();
                    let answered = apps.churn_answered.load(Ordering::Relaxed);
                    let call_packets = (
                        apps.churn_sent.load(Ordering::Relaxed),
                        apps.churn_echoed.load(Ordering::Relaxed),
                    );
                    let turn_before = (
                        turn_counts.churned.load(Ordering::Relaxed),
                        turn_counts.churn_failed.load(Ordering::Relaxed),
                        turn_counts.churn_sent.load(Ordering::Relaxed),
                        turn_counts.churn_echoed.load(Ordering::Relaxed),
                    );
                    let allocating = {
                        let (app_ns, counts) = (lab.app.name.clone(), turn_counts.clone());
                        scope.spawn(move || {
                            enter_by_name(&app_ns);
                            relay_tests::runtime().block_on(turn::churn(
                                CHURN_ALLOCATIONS,
                                server,
                                peer,
                                counts,
                            ))
                        })
                    };
                    apps.churn_ready.store(0, Ordering::Relaxed);
                    apps.churn.fetch_add(1, Ordering::Relaxed);
                    let waiting = Instant::now();
                    while apps.churn_ready.load(Ordering::Relaxed) < CHURN_CALLS as u64
                        && waiting.elapsed() < Duration::from_secs(20)
                    {
                        thread::sleep(Duration::from_millis(50));
                    }
                    let (ended, placed) = runtime.block_on(async {
                        let mut controller = lab.controller(&fingerprint, "acme", API_KEY).await;
                        let ended = hang_up(&mut controller, &churn_ids).await;
                        churn_ids = place_calls(&mut controller, calls..calls + CHURN_CALLS).await;
                        (ended, churn_ids.len())
                    });
                    let waiting = Instant::now();
                    while apps.churn_answered.load(Ordering::Relaxed) < answered + placed as u64
                        && waiting.elapsed() < Duration::from_secs(30)
                    {
                        thread::sleep(Duration::from_millis(50));
                    }
                    let _ = allocating.join();
                    churns.push(Churn {
                        at_secs,
                        calls_ended: ended,
                        calls_placed: placed,
                        calls_answered: apps.churn_answered.load(Ordering::Relaxed) - answered,
                        call_packets: (
                            apps.churn_sent.load(Ordering::Relaxed) - call_packets.0,
                            apps.churn_echoed.load(Ordering::Relaxed) - call_packets.1,
                        ),
                        allocations: turn_counts.churned.load(Ordering::Relaxed) - turn_before.0,
                        allocations_failed: turn_counts.churn_failed.load(Ordering::Relaxed)
                            - turn_before.1,
                        allocation_packets: (
                            turn_counts.churn_sent.load(Ordering::Relaxed) - turn_before.2,
                            turn_counts.churn_echoed.load(Ordering::Relaxed) - turn_before.3,
                        ),
                        secs: churning.elapsed().as_secs_f64(),
                    });
                }
                Fault::None => {}
            }
            generator.join().expect("the generator");
        });
        thread::sleep(Duration::from_millis(500));
        let status = relayd.ctl_json(&["status"]);
        report.push(Slice {
            at_secs,
            fault: *fault,
            calls: Counted::read(&lab, CALL_COUNTERS).since(before.0),
            turn: Counted::read(&lab, TURN_COUNTERS).since(before.1),
            rss_kib: rss_kib(relayd.pid()),
            open_files: open_files(relayd.pid()),
            calls_alive: status_count(&status, &["calls"]),
            allocations: status_count(&status, &["turn", "allocations"]),
        });
        let last = report.last().expect("a slice");
        eprintln!(
            "soak: {:>5} s {:<38} calls' loss to PBX {:.3}%, to app {:.3}%; TURN's to peer {:.3}%, to app {:.3}%; {} calls, {} allocations",
            last.at_secs,
            fault.name(),
            last.calls.loss_there() * 100.0,
            last.calls.loss_back() * 100.0,
            last.turn.loss_there() * 100.0,
            last.turn.loss_back() * 100.0,
            last.calls_alive,
            last.allocations,
        );
    }
    let soaked = started.elapsed();
    let status = relayd.ctl_json(&["status"]);
    let calls_alive = status_count(&status, &["calls"]);
    let allocations_alive = status_count(&status, &["turn", "allocations"]);
    let channels_alive = status_count(&status, &["turn", "channels"]);

    // Everything ended: nothing of it may stay.
    let every_call: Vec<u64> = call_ids.iter().chain(&churn_ids).copied().collect();
    runtime.block_on(async {
        let mut controller = lab.controller(&fingerprint, "acme", API_KEY).await;
        hang_up(&mut controller, &every_call).await;
    });
    apps.done.store(true, Ordering::Relaxed);
    turn_done.store(true, Ordering::Relaxed);
    let _ = apps_thread.join();
    let _ = turn_thread.join();
    let (mut flows_left, mut allocations_left) = (usize::MAX, u64::MAX);
    let waiting = Instant::now();
    while (flows_left, allocations_left) != (0, 0) && waiting.elapsed() < Duration::from_secs(15) {
        thread::sleep(Duration::from_millis(500));
        flows_left = relayd.ctl_json(&["flow", "list"])["flows"]
            .as_array()
            .map_or(0, Vec::len);
        allocations_left = status_count(&relayd.ctl_json(&["status"]), &["turn", "allocations"]);
    }
    logs.push_str(&relayd.log());
    drop(relayd);
    drop(state_file);

    println!();
    println!(
        "Soak: {steady_calls} calls and {} TURN allocations, 50 packets/s each way ({pps} pps offered each way), {:.0} s; loss per {SLICE_SECS} s slice, the fault at its start",
        turn_flows.len(),
        soaked.as_secs_f64()
    );
    println!(
        "{:>6}  {:<38} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>8} {:>6}",
        "", "", "calls", "loss", "loss", "TURN", "loss", "loss", "", "", "", ""
    );
    println!(
        "{:>6}  {:<38} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>8} {:>6}",
        "at s",
        "fault",
        "sent",
        "to PBX",
        "to app",
        "sent",
        "to peer",
        "to app",
        "calls",
        "allocs",
        "RSS MiB",
        "fds"
    );
    let percent = |share: f64| format!("{:.3}%", share * 100.0);
    for slice in &report {
        println!(
            "{:>6}  {:<38} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6} {:>8.1} {:>6}",
            slice.at_secs,
            slice.fault.name(),
            slice.calls.to_relay,
            percent(slice.calls.loss_there()),
            percent(slice.calls.loss_back()),
            slice.turn.to_relay,
            percent(slice.turn.loss_there()),
            percent(slice.turn.loss_back()),
            slice.calls_alive,
            slice.allocations,
            slice.rss_kib as f64 / 1024.0,
            slice.open_files
        );
    }
    if !churns.is_empty() {
        println!();
        println!(
            "Churn (each: that many calls hung up and placed again, allocations made, used and deleted):"
        );
        println!(
            "{:>6}  {:>6} {:>6} {:>8} {:>14} {:>7} {:>7} {:>14} {:>6}",
            "at s", "ended", "placed", "answered", "echoed", "allocs", "failed", "echoed", "secs"
        );
        for churn in &churns {
            println!(
                "{:>6}  {:>6} {:>6} {:>8} {:>14} {:>7} {:>7} {:>14} {:>6.1}",
                churn.at_secs,
                churn.calls_ended,
                churn.calls_placed,
                churn.calls_answered,
                format!("{}/{}", churn.call_packets.1, churn.call_packets.0),
                churn.allocations,
                churn.allocations_failed,
                format!(
                    "{}/{}",
                    churn.allocation_packets.1, churn.allocation_packets.0
                ),
                churn.secs
            );
        }
    }
    println!();
    println!(
        "calls alive at the end: {calls_alive} of {} (expected all); apps reconnected: {}",
        steady_calls + churn_ids.len(),
        apps.reconnected.load(Ordering::Relaxed)
    );
    println!(
        "TURN allocations alive at the end: {allocations_alive} of {} (expected all), channels {channels_alive}",
        turn_flows.len()
    );
    println!(
        "after every call was hung up and every allocation deleted: {flows_left} flows, {allocations_left} allocations left (expected 0)"
    );
    let log_path = std::env::temp_dir().join(relay_tests::unique("soak-relayd-") + ".log");
    match std::fs::write(&log_path, &logs) {
        Ok(()) => println!("relayd's log, every run of it: {}", log_path.display()),
        Err(err) => println!(
            "relayd's log could not be kept: {}: {err}",
            log_path.display()
        ),
    }
    let mut grouped = BTreeMap::new();
    warnings(&logs, &mut grouped);
    println!("log lines at WARN or above, grouped: {}", grouped.len());
    for (message, (count, first)) in &grouped {
        println!("  {count:>6}  {message}");
        println!("          first: {first}");
    }
}
