//! What the call benchmarks share: the PBX end that echoes, nftables counters where the
//! packets pass, and the arithmetic of their tables.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    lab::EdgeLab,
    netns::NetNs,
    signalling_client::{Socket, controller, mint_token},
};

/// A benchmark's controller: connected from the PBX's namespace to relayd's signalling as
/// tenant `acme`, with a token minted for each of its users (`{prefix}0`, `{prefix}1`, ...).
/// The runtime drives its socket.
pub struct Controller {
    pub runtime: tokio::runtime::Runtime,
    pub socket: Socket,
    pub tokens: Vec<String>,
}

impl Controller {
    pub fn connect(
        lab: &EdgeLab,
        fingerprint: &str,
        api_key: &str,
        prefix: &str,
        users: usize,
    ) -> Controller {
        let runtime = crate::runtime();
        let mut socket = runtime.block_on(controller(
            &lab.pbx,
            EdgeLab::SIGNALLING.parse().expect("address"),
            fingerprint,
            "acme",
            api_key,
        ));
        let tokens = runtime.block_on(async {
            let mut tokens = Vec::new();
            for user in 0..users {
                tokens.push(mint_token(&mut socket, &format!("{prefix}{user}"), 3600).await);
            }
            tokens
        });
        Controller {
            runtime,
            socket,
            tokens,
        }
    }
}

/// The PBX: echoes every packet, and notes when the first packet from each relay LAN port
/// (each call) arrived.
pub struct PbxEcho {
    /// By relay LAN port: the first packet's arrival, and how many came.
    first: Arc<Mutex<HashMap<u16, (Instant, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl PbxEcho {
    pub fn start(ns: &NetNs) -> PbxEcho {
        PbxEcho::start_on(ns, crate::pbx::RTP.parse().expect("address"))
    }

    /// An echo like the PBX's on another `address` of `ns`.
    pub fn start_on(ns: &NetNs, address: std::net::SocketAddr) -> PbxEcho {
        let socket = ns.udp_socket(address);
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let first = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (first, stop) = (first.clone(), stop.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        first
                            .lock()
                            .unwrap()
                            .entry(from.port())
                            .or_insert_with(|| (Instant::now(), 0))
                            .1 += 1;
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            })
        };
        PbxEcho {
            first,
            stop,
            thread: Some(thread),
        }
    }

    pub fn first_arrival(&self, lan_port: u16) -> Option<Instant> {
        self.first.lock().unwrap().get(&lan_port).map(|(at, _)| *at)
    }

    pub fn packets_from(&self, lan_port: u16) -> u64 {
        self.first
            .lock()
            .unwrap()
            .get(&lan_port)
            .map_or(0, |(_, n)| *n)
    }
}

impl Drop for PbxEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An nftables counter in `ns`'s table `bench`: `name` counts the packets `rule` (an nft
/// match, e.g. `udp length 180 udp dport 3479`) matches at `hook`.
pub fn add_counter(ns: &NetNs, hook: &str, name: &str, rule: &str) {
    ns.exec(&[
        "nft",
        &format!(
            "add table ip bench; add chain ip bench {hook} {{ type filter hook {hook} priority 0; }}; add counter ip bench {name}; add rule ip bench {hook} {rule} counter name {name}"
        ),
    ]);
}

/// The counters of calls' RTP of `udp_length` in the edge lab: `to_relay` (from the apps
/// to the relay's ICE port, at the NAT), `at_pbx` (into the PBX's RTP port) and `to_app`
/// (from the ICE port back toward the apps, at the NAT).
pub fn add_call_counters(lab: &EdgeLab, udp_length: u32) {
    let ice_port = EdgeLab::ICE.rsplit_once(':').expect("ADDRESS:PORT").1;
    let pbx_port = crate::pbx::RTP.rsplit_once(':').expect("ADDRESS:PORT").1;
    add_counter(
        &lab.nat,
        "forward",
        "to_relay",
        &format!("udp length {udp_length} udp dport {ice_port}"),
    );
    add_counter(
        &lab.nat,
        "forward",
        "to_app",
        &format!("udp length {udp_length} udp sport {ice_port}"),
    );
    add_counter(
        &lab.pbx,
        "input",
        "at_pbx",
        &format!("udp length {udp_length} udp dport {pbx_port}"),
    );
}

pub fn counter(ns: &NetNs, name: &str) -> u64 {
    let output = ns.exec(&["nft", "list", "counter", "ip", "bench", name]);
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .skip_while(|word| *word != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The share of `sent` that did not arrive (none sent: none lost).
pub fn loss(sent: u64, arrived: u64) -> f64 {
    if sent == 0 {
        return 0.0;
    }
    1.0 - arrived as f64 / sent as f64
}

pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}
