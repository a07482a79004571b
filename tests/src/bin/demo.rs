//! `cargo xtask demo`: the relay in the deployment it is for, in network namespaces made for
//! the occasion and removed at the end: apps behind a NAT, the relay (XDP on its WAN and LAN
//! interfaces, signalling and calls), a PBX on the LAN that echoes RTP, and its controller.
//! The controller places three calls to three users' apps through the relay's signalling;
//! each app answers with its own ICE agent (webrtc-ice) through the NAT and sends 50 RTP
//! packets a second for about 20 seconds, while the live `relayctl` tables show the calls
//! and the flows their media became in the kernel.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use relay_tests::{
    app::App,
    config_file::ConfigFile,
    lab::{EdgeLab, calls_config},
    netns::{PinDir, enter_by_name},
    relayd::{Relayd, http_get, metric},
    require_root, runtime,
    signalling_client::{controller, mint_token, request},
    traffic::{numbered, sequence_of},
};
use serde_json::json;

const CALLS: u16 = 3;
const PACKETS_PER_SECOND: u64 = 50;
const SIGNALLING: &str = EdgeLab::SIGNALLING;
const METRICS: &str = "10.30.0.1:9477";
const API_KEY: &str = "demo-api-key-0123456789";

/// How long the calls last; RELAY_DEMO_SECONDS shortens it (the demo's test).
fn seconds() -> u64 {
    std::env::var("RELAY_DEMO_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20)
}

/// What one call's app counted.
#[derive(Default)]
struct CallCounters {
    sent: AtomicU64,
    echoed: AtomicU64,
}

fn pbx_rtp(call: u16) -> SocketAddr {
    SocketAddr::new(EdgeLab::PBX.parse().unwrap(), 40000 + 2 * call)
}

fn pbx_offer(call: u16) -> String {
    let rtp = pbx_rtp(call);
    format!(
        "v=0\r\no=PBX {call} 1 IN IP4 {ip}\r\ns=PBX\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=ptime:20\r\na=sendrecv\r\n",
        ip = rtp.ip(),
        port = rtp.port()
    )
}

fn main() {
    require_root();
    println!("relay demo: apps (behind NAT) -> relay (signalling, ICE, XDP) -> PBX (RTP echo)");
    println!(
        "building the namespaces: apps 10.20.0.2 | NAT | relay WAN 198.51.100.1, LAN 10.30.0.1 | PBX 10.30.0.2"
    );
    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&calls_config(
        &pins.path,
        "demo",
        API_KEY,
        &format!(
            "[metrics]
listen = \"{METRICS}\""
        ),
    ));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let fingerprint = relayd.signalling_fingerprint();
    println!("relayd is up; `relayctl status`:\n");
    println!("{}", relayd.ctl_ok(&["status"]));

    // The PBX: an RTP echo per call.
    let stop = Arc::new(AtomicBool::new(false));
    let echoes: Vec<_> = (0..CALLS)
        .map(|call| echo(lab.pbx.udp_socket(pbx_rtp(call)), stop.clone()))
        .collect();

    let main_runtime = runtime();
    let mut controller = main_runtime.block_on(controller(
        &lab.pbx,
        SIGNALLING.parse().unwrap(),
        &fingerprint,
        "demo",
        API_KEY,
    ));
    println!("the PBX's controller is connected to the relay's signalling ({SIGNALLING})");

    // The apps, one user each, on one runtime in a thread inside the app namespace.
    let tokens: Vec<String> = (0..CALLS)
        .map(|call| {
            main_runtime.block_on(async {
                mint_token(&mut controller, &format!("user{}", call + 1), 600).await
            })
        })
        .collect();
    let counters: Vec<Arc<CallCounters>> = (0..CALLS).map(|_| Arc::default()).collect();
    let (ready_tx, ready) = mpsc::channel();
    let apps = {
        let (counters, fingerprint, app_ns) =
            (counters.clone(), fingerprint.clone(), lab.app.name.clone());
        thread::spawn(move || {
            enter_by_name(&app_ns);
            runtime().block_on(run_apps(tokens, fingerprint, counters, ready_tx));
        })
    };
    for _ in 0..CALLS {
        ready.recv().expect("the apps connect");
    }
    println!("{CALLS} apps are connected; the PBX calls them:");
    let mut call_ids = Vec::new();
    main_runtime.block_on(async {
        for call in 0..CALLS {
            let created = request(
                &mut controller,
                json!({"type": "call.create", "id": call, "user": format!("user{}", call + 1), "sdp": pbx_offer(call)}),
            )
            .await;
            println!("  call {} -> user{}: {}", created["call"], call + 1, created["type"]);
            call_ids.push(created["call"].clone());
        }
    });

    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds() + 5) && !apps.is_finished() {
        thread::sleep(Duration::from_secs(4).min(Duration::from_secs(seconds())));
        println!(
            "\n=== {:>2} s ===================================================================",
            started.elapsed().as_secs()
        );
        println!("$ relayctl calls list");
        println!("{}", relayd.ctl_ok(&["calls", "list"]));
        println!("$ relayctl flow list");
        println!("{}", relayd.ctl_ok(&["flow", "list"]));
    }
    let apps_ok = apps.join().is_ok();
    main_runtime.block_on(async {
        for id in &call_ids {
            let _ = request(
                &mut controller,
                json!({"type": "call.hangup", "id": 200, "call": id}),
            )
            .await;
        }
    });
    stop.store(true, Ordering::Relaxed);
    for echo in echoes {
        let _ = echo.join();
    }

    println!("\n=== summary ===================================================================");
    if !apps_ok {
        println!("the apps failed; relayd's log:\n{}", relayd.log());
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
    let xdp = metric(&metrics, r#"relay_forwarded_packets_total{path="xdp"}"#).unwrap_or(0);
    let total: u64 = counters
        .iter()
        .map(|c| 2 * c.echoed.load(Ordering::Relaxed))
        .sum();
    println!(
        "relay: {xdp} of the calls' {total} packets forwarded by XDP ({:.1}% in the kernel)",
        100.0 * xdp as f64 / total.max(1) as f64
    );
    println!("(the first packets of a call, before its flows are installed, go through relayd)");
    println!(
        "after the hangups: {}",
        relayd.ctl_ok(&["calls", "list"]).trim()
    );
    println!("removing the namespaces, relayd and its pins");
}

/// Every app connects, answers its call and sends RTP for `seconds()`.
async fn run_apps(
    tokens: Vec<String>,
    fingerprint: String,
    counters: Vec<Arc<CallCounters>>,
    ready: mpsc::Sender<()>,
) {
    let mut tasks = Vec::new();
    for (token, counters) in tokens.into_iter().zip(counters) {
        let (fingerprint, ready) = (fingerprint.clone(), ready.clone());
        tasks.push(tokio::spawn(async move {
            let mut app = App::in_edge_lab(&fingerprint, &token).await;
            ready.send(()).unwrap();
            let incoming = app.next().await;
            let media = app.answer(&incoming).await;
            let receiving = {
                let (media, counters) = (media.clone(), counters.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 2048];
                    while let Ok(n) = media.recv(&mut buf).await {
                        if sequence_of(&buf[..n]).is_some() {
                            counters.echoed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            };
            let mut interval =
                tokio::time::interval(Duration::from_micros(1_000_000 / PACKETS_PER_SECOND));
            for sequence in 0..(seconds() * PACKETS_PER_SECOND) as u32 {
                interval.tick().await;
                if media.send(&numbered(sequence)).await.is_ok() {
                    counters.sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            receiving.abort();
            app.close().await;
        }));
    }
    for task in tasks {
        task.await.expect("an app");
    }
}

/// Echoes every datagram back to its sender until `stop`.
fn echo(socket: std::net::UdpSocket, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
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
