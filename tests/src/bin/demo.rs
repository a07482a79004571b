//! `cargo xtask demo`: the relay in the deployment it is for, in network namespaces made for
//! the occasion and removed at the end: an app behind a NAT, the relay (XDP on its WAN and
//! LAN interfaces, TURN on the WAN side), a PBX on the LAN that echoes RTP. Three app
//! "calls" allocate through the relay with a real TURN client (the turn crate's), bind a
//! channel to the PBX and send 50 RTP-sized packets a second each way for about 20 seconds,
//! while the live `relayctl` tables show the flows the channels became and their rates.
//!
//! Until calls with signalling and ICE exist (issue 4), the media path of a call is the
//! TURN one: the same ChannelData offload to XDP that a TURN-only app gets.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use relay_tests::{
    config_file::ConfigFile,
    lab::EdgeLab,
    netns::PinDir,
    relayd::{Relayd, http_get, metric},
    require_root,
    traffic::{numbered, sequence_of},
};
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

const CALLS: u16 = 3;
const PACKETS_PER_SECOND: u64 = 50;
/// How long the calls last; RELAY_DEMO_SECONDS shortens it (the demo's test).
fn seconds() -> u64 {
    std::env::var("RELAY_DEMO_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}
const METRICS: &str = "10.30.0.1:9477";

/// What one call's app side counted.
#[derive(Default)]
struct CallCounters {
    sent: AtomicU64,
    echoed: AtomicU64,
}

fn main() {
    require_root();
    println!("relay demo: app (behind NAT) -> relay (XDP + TURN) -> PBX (RTP echo)");
    println!(
        "building the namespaces: app 10.20.0.2 | NAT | relay WAN 198.51.100.1, LAN 10.30.0.1 | PBX 10.30.0.2"
    );
    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&format!(
        r#"
[datapath]
mode = "xdp"
interfaces = ["w0", "l0"]
xdp_mode = "generic"
pin_dir = "{}"
[metrics]
listen = "{METRICS}"
[turn]
enabled = true
listen = ["{}:3478"]
relay_addresses = ["{}"]
users = [{{ name = "demo", password = "demo-password" }}]
# The PBX LAN is private: allowed explicitly, as an operator would.
allowed_peers = ["10.30.0.0/24"]
"#,
        pins.path.display(),
        EdgeLab::RELAY_WAN,
        EdgeLab::RELAY_LAN
    ));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    println!("relayd is up; `relayctl status`:\n");
    println!("{}", relayd.ctl_ok(&["status"]));

    // The PBX: an RTP echo per call.
    let stop = Arc::new(AtomicBool::new(false));
    let mut echoes = Vec::new();
    for call in 0..CALLS {
        let socket = lab.pbx.udp_socket(SocketAddr::new(
            EdgeLab::PBX.parse().unwrap(),
            40000 + 2 * call,
        ));
        echoes.push(echo(socket, stop.clone()));
    }

    // The app's calls, each with its own TURN client, on one runtime in a thread.
    let counters: Vec<Arc<CallCounters>> = (0..CALLS).map(|_| Arc::default()).collect();
    let sockets: Vec<UdpSocket> = (0..CALLS)
        .map(|_| lab.app.udp_socket("10.20.0.2:0".parse().unwrap()))
        .collect();
    let calls = {
        let counters = counters.clone();
        thread::spawn(move || run_calls(sockets, counters))
    };

    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds() + 3) && !calls.is_finished() {
        thread::sleep(Duration::from_secs(4).min(Duration::from_secs(seconds())));
        println!(
            "\n=== {:>2} s ===================================================================",
            started.elapsed().as_secs()
        );
        println!("$ relayctl turn allocations");
        println!("{}", relayd.ctl_ok(&["turn", "allocations"]));
        println!("$ relayctl flow list");
        println!("{}", relayd.ctl_ok(&["flow", "list"]));
    }
    let outcome = calls.join().expect("the calls' thread");
    stop.store(true, Ordering::Relaxed);
    for echo in echoes {
        let _ = echo.join();
    }

    println!("\n=== summary ===================================================================");
    if let Err(err) = outcome {
        println!("the calls failed: {err}");
        println!("relayd's log:\n{}", relayd.log());
        std::process::exit(1);
    }
    for (call, counter) in counters.iter().enumerate() {
        let sent = counter.sent.load(Ordering::Relaxed);
        let echoed = counter.echoed.load(Ordering::Relaxed);
        println!(
            "call {}: {sent} RTP packets sent, {echoed} came back from the PBX ({:.2}% lost)",
            call + 1,
            100.0 * (1.0 - echoed as f64 / sent.max(1) as f64)
        );
    }
    let metrics = http_get(&lab.relay, METRICS, "/metrics");
    let by_path = |path: &str| {
        metric(
            &metrics,
            &format!("relay_forwarded_packets_total{{path=\"{path}\"}}"),
        )
        .unwrap_or(0)
    };
    let (xdp, userspace) = (by_path("xdp"), by_path("userspace"));
    println!(
        "relay: {xdp} packets forwarded by XDP, {userspace} by userspace sockets ({:.1}% in the kernel)",
        100.0 * xdp as f64 / (xdp + userspace).max(1) as f64
    );
    println!(
        "(packets sent as Send indications before a channel is bound are relayed by the TURN server itself)"
    );
    println!("removing the namespaces, relayd and its pins");
}

/// Echoes every datagram back to its sender until `stop`.
fn echo(socket: UdpSocket, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        }
    })
}

fn run_calls(sockets: Vec<UdpSocket>, counters: Vec<Arc<CallCounters>>) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for (call, (socket, counters)) in sockets.into_iter().zip(counters).enumerate() {
            tasks.push(tokio::spawn(one_call(call as u16, socket, counters)));
        }
        for task in tasks {
            task.await.map_err(|e| e.to_string())??;
        }
        Ok(())
    })
}

/// One call's media: allocate, bind a channel to the PBX's RTP port, then 50 packets a
/// second for `seconds()` while reading the echoes.
async fn one_call(call: u16, socket: UdpSocket, counters: Arc<CallCounters>) -> Result<(), String> {
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    let socket = tokio::net::UdpSocket::from_std(socket).map_err(|e| e.to_string())?;
    let server = format!("{}:3478", EdgeLab::RELAY_WAN);
    let client = Client::new(ClientConfig {
        stun_serv_addr: server.clone(),
        turn_serv_addr: server,
        username: "demo".into(),
        password: "demo-password".into(),
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn: Arc::new(socket),
        vnet: None,
    })
    .await
    .map_err(|e| format!("call {}: {e}", call + 1))?;
    client.listen().await.map_err(|e| e.to_string())?;
    let relay = Arc::new(
        client
            .allocate()
            .await
            .map_err(|e| format!("call {}: allocate: {e}", call + 1))?,
    );
    let pbx = SocketAddr::new(EdgeLab::PBX.parse().unwrap(), 40000 + 2 * call);
    let receiving = {
        let relay = relay.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, _)) = relay.recv_from(&mut buf).await {
                if sequence_of(&buf[..n]).is_some() {
                    counters.echoed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let mut interval = tokio::time::interval(Duration::from_micros(1_000_000 / PACKETS_PER_SECOND));
    for sequence in 0..(seconds() * PACKETS_PER_SECOND) as u32 {
        interval.tick().await;
        relay
            .send_to(&numbered(sequence), pbx)
            .await
            .map_err(|e| format!("call {}: send: {e}", call + 1))?;
        counters.sent.fetch_add(1, Ordering::Relaxed);
    }
    // The last echoes, then hang up: Refresh with lifetime 0 removes allocation and flows.
    tokio::time::sleep(Duration::from_millis(300)).await;
    receiving.abort();
    relay.close().await.map_err(|e| e.to_string())?;
    client.close().await.map_err(|e| e.to_string())?;
    Ok(())
}
