//! `cargo xtask bench cluster`: two relays sharing a Redis server (Debian's redis-server)
//! in one network namespace, signalling on each. The tenant's controller is connected to
//! the first relay; APPS apps are connected, half to each relay. What a cross-relay hop
//! adds to signalling:
//!
//! 1. `send` from the controller to one app, one at a time (ROUND_TRIPS per path): the
//!    time to the controller's `result` and to the app's receipt, for an app on the same
//!    relay and for one on the other relay (through the relays' Redis channels);
//! 2. `send` to a user connected nowhere: the time to `offline` on one relay alone (no
//!    cluster) and in the cluster (every other relay asked first);
//! 3. the relays' and Redis's CPU over the cross-relay round trips;
//! 4. calls placed across relays: `call.create` from the controller for an app on the same
//!    relay and for one on the other relay (anchored there, through Redis), one at a time
//!    and each hung up after the app got its `call.incoming` (CALLS per path): the time to
//!    the controller's `result` and to the app's `call.incoming`, and calls a second;
//! 5. takeover: in the failover lab (an active relay and its standby behind floating
//!    addresses, XDP on each), TAKEOVER_CALLS connected calls; the active relay is killed
//!    (kill -9, its links down) and the floating addresses move: the time until the standby
//!    has every call, and what its takeover itself took.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use relay_tests::{
    app::App,
    bench::percentile,
    config_file::ConfigFile,
    lab::{EdgeLab, FailoverLab, calls_config, pair_cluster},
    measure::process_cpu_ns,
    netns::{NetNs, PinDir, enter_by_name},
    redis::RedisServer,
    relayd::Relayd,
    require_root, runtime,
    signalling_client::{Socket, call, connect, controller, receive, request},
};
use serde_json::{Value, json};

const API_KEY: &str = "bench-api-key-0123456789";
const APPS: usize = 20;
const ROUND_TRIPS: usize = 1000;
const OFFLINE_TRIES: usize = 300;
const ADDRESS_A: &str = "127.0.0.1:4431";
const ADDRESS_B: &str = "127.0.0.1:4432";
const CALLS: usize = 300;
const TAKEOVER_CALLS: usize = 100;
const TAKEOVER_TTL_SECS: u64 = 1;
const PBX_OFFER: &str = "v=0\r\no=PBX 1 1 IN IP4 127.0.0.1\r\ns=PBX\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n";

fn config(node: &str, listen: &str, cluster: bool) -> ConfigFile {
    let cluster = if cluster {
        // Each relay's calls on ports of its own.
        let (ice, ports) = if node == "edge-a" {
            ("127.0.0.1:3480", "42000-42999")
        } else {
            ("127.0.0.1:3481", "43000-43999")
        };
        format!(
            "[calls]\nenabled = true\nice_listen = \"{ice}\"\nlan_address = \"127.0.0.1\"\nport_range = \"{ports}\"\n\
             [cluster]\nenabled = true\nnode = \"{node}\"\nredis_url = \"redis://127.0.0.1:6379\"\n"
        )
    } else {
        String::new()
    };
    ConfigFile::new(&format!(
        "[datapath]\nmode = \"userspace\"\n[metrics]\nlisten = \"\"\n\
         [signalling]\nenabled = true\nlisten = \"{listen}\"\n\
         token_secret = \"a token secret of enough length\"\n\
         tenants = [{{ name = \"acme\", api_key = \"{API_KEY}\" }}]\n{cluster}"
    ))
}

struct Latencies {
    result_ms: Vec<f64>,
    receipt_ms: Vec<f64>,
}

/// ROUND_TRIPS sends from the controller to `users` in turn: each answer and receipt.
async fn round_trips(controller: &mut Socket, apps: &mut [(String, Socket)]) -> Latencies {
    let mut latencies = Latencies {
        result_ms: Vec::new(),
        receipt_ms: Vec::new(),
    };
    for n in 0..ROUND_TRIPS {
        let (user, app) = &mut apps[n % apps.len()];
        let started = Instant::now();
        let answer = call(
            controller,
            json!({"type": "send", "id": n, "to": {"user": user}, "body": n}),
        )
        .await;
        let answered = started.elapsed();
        assert_eq!(answer["delivered"], 1, "{answer}");
        let message = receive(app).await.expect("the app's session stays");
        let received = started.elapsed();
        assert_eq!(message["body"], n, "{message}");
        latencies.result_ms.push(answered.as_secs_f64() * 1000.0);
        latencies.receipt_ms.push(received.as_secs_f64() * 1000.0);
    }
    latencies
}

/// CALLS calls from the controller to `apps` in turn, each hung up once its app got the
/// offer: each `result`'s and `call.incoming`'s time, and the wall time of them all.
async fn calls_to(controller: &mut Socket, apps: &mut [(String, Socket)]) -> (Latencies, f64) {
    let mut latencies = Latencies {
        result_ms: Vec::new(),
        receipt_ms: Vec::new(),
    };
    let started_all = Instant::now();
    for n in 0..CALLS {
        let (user, app) = &mut apps[n % apps.len()];
        let started = Instant::now();
        let created = call(
            controller,
            json!({"type": "call.create", "id": n, "user": user, "sdp": PBX_OFFER}),
        )
        .await;
        let answered = started.elapsed();
        assert_eq!(created["type"], "result", "{created}");
        let incoming = receive(app).await.expect("the app's session stays");
        let received = started.elapsed();
        assert_eq!(incoming["event"], "call.incoming", "{incoming}");
        latencies.result_ms.push(answered.as_secs_f64() * 1000.0);
        latencies.receipt_ms.push(received.as_secs_f64() * 1000.0);
        let hangup = call(
            controller,
            json!({"type": "call.hangup", "id": n, "call": created["call"]}),
        )
        .await;
        assert_eq!(hangup["type"], "result", "{hangup}");
        let ended = receive(app).await.expect("the app's session stays");
        assert_eq!(ended["event"], "call.ended", "{ended}");
    }
    (latencies, started_all.elapsed().as_secs_f64())
}

/// OFFLINE_TRIES sends to a user connected nowhere: the time to `offline`.
async fn offline(controller: &mut Socket) -> Vec<f64> {
    let mut ms = Vec::new();
    for n in 0..OFFLINE_TRIES {
        let started = Instant::now();
        let answer = call(
            controller,
            json!({"type": "send", "id": n, "to": {"user": "nobody"}, "body": n}),
        )
        .await;
        assert_eq!(answer["code"], "offline", "{answer}");
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    ms
}

async fn app(ns: &NetNs, address: SocketAddr, fingerprint: &str, token: String) -> Socket {
    let mut socket = connect(ns, address, fingerprint).await;
    let welcome = call(
        &mut socket,
        json!({"type": "hello", "v": 1, "role": "client", "token": token}),
    )
    .await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    socket
}

async fn mint(controller: &mut Socket, user: &str) -> String {
    let minted: Value = call(
        controller,
        json!({"type": "token.mint", "id": 0, "user": user, "ttl_secs": 600}),
    )
    .await;
    minted["token"].as_str().expect("a token").to_owned()
}

fn row(path: &str, values: &[f64]) {
    println!(
        "{path:<34} {:>8.3} {:>8.3} {:>8.3} {:>8}",
        percentile(values, 0.5),
        percentile(values, 0.9),
        percentile(values, 0.99),
        values.len()
    );
}

/// Waits until `done` says so, polling every 50 ms, at most `within`; panics naming `what`.
fn wait_for(within: Duration, what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Part 5: TAKEOVER_CALLS connected calls taken over by the standby when the active relay
/// dies. Returns (seconds from kill -9 to the standby having them all, the takeover's own
/// milliseconds as the standby logged them).
fn takeover() -> (f64, String) {
    let lab = FailoverLab::new();
    let redis = RedisServer::start_on(&lab.switch, FailoverLab::REDIS, 6379);
    let (pins_a, pins_b) = (PinDir::new(), PinDir::new());
    let relay_config = |pins: &PinDir, node: &str, standby_for: &str| {
        ConfigFile::new(&calls_config(
            &pins.path,
            "acme",
            API_KEY,
            &format!(
                "port_range = \"41000-41999\"\n{}",
                pair_cluster(node, &redis.url(), standby_for, TAKEOVER_TTL_SECS)
            ),
        ))
    };
    let (config_a, config_b) = (
        relay_config(&pins_a, "edge-a", ""),
        relay_config(&pins_b, "edge-b", "edge-a"),
    );
    let mut a = Relayd::start(Some(&lab.relays[0]), &["--config", config_a.path()]);
    let b = Relayd::start(Some(&lab.relays[1]), &["--config", config_b.path()]);
    wait_for(
        Duration::from_secs(10),
        "both relays in the cluster",
        || a.ctl_json(&["cluster", "status"])["nodes_alive"] == 2,
    );
    let (fingerprint_a, fingerprint_b) = (a.signalling_fingerprint(), b.signalling_fingerprint());
    let _ = fingerprint_b;
    let connected = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let signalling: SocketAddr = EdgeLab::SIGNALLING.parse().unwrap();
    let runtime = runtime();
    let (mut acme, users) = runtime.block_on(async {
        let mut acme = controller(&lab.pbx, signalling, &fingerprint_a, "acme", API_KEY).await;
        let mut users = Vec::new();
        for n in 0..TAKEOVER_CALLS {
            let user = format!("mover{n}");
            let token = mint(&mut acme, &user).await;
            users.push((user, token));
        }
        (acme, users)
    });
    let apps = {
        let (connected, answered, stop) = (connected.clone(), answered.clone(), stop.clone());
        let app_ns = lab.app.name.clone();
        let tokens: Vec<String> = users.iter().map(|(_, token)| token.clone()).collect();
        std::thread::spawn(move || {
            enter_by_name(&app_ns);
            relay_tests::runtime().block_on(async move {
                let mut apps = tokio::task::JoinSet::new();
                for token in tokens {
                    let (fingerprint, connected, answered, stop) = (
                        fingerprint_a.clone(),
                        connected.clone(),
                        answered.clone(),
                        stop.clone(),
                    );
                    apps.spawn(async move {
                        let mut app = App::in_edge_lab(&fingerprint, &token).await;
                        connected.fetch_add(1, Ordering::Relaxed);
                        let incoming = app.next_within(Duration::from_secs(60)).await;
                        let _media = app.answer(&incoming).await;
                        answered.fetch_add(1, Ordering::Relaxed);
                        // The agent answers the relay's consent checks until the end.
                        while !stop.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        app.close().await;
                    });
                }
                while apps.join_next().await.is_some() {}
            })
        })
    };
    wait_for(Duration::from_secs(60), "every app connected", || {
        connected.load(Ordering::Relaxed) == TAKEOVER_CALLS
    });
    runtime.block_on(async {
        for (n, (user, _)) in users.iter().enumerate() {
            let created = request(
                &mut acme,
                json!({"type": "call.create", "id": n, "user": user, "sdp": PBX_OFFER}),
            )
            .await;
            assert_eq!(created["type"], "result", "{created}");
        }
    });
    wait_for(Duration::from_secs(120), "every call answered", || {
        answered.load(Ordering::Relaxed) == TAKEOVER_CALLS
    });
    // Every call's record in Redis.
    redis.cli_until(
        &[
            "EVAL",
            "return #redis.call('KEYS', 'relay:call:edge-a:*')",
            "0",
        ],
        Duration::from_secs(10),
        |n| n == TAKEOVER_CALLS.to_string(),
    );
    let failed = Instant::now();
    a.kill();
    lab.fail_over();
    wait_for(
        Duration::from_secs(30),
        "the standby has every call",
        || {
            b.ctl_json(&["calls", "list"])["calls"]
                .as_array()
                .is_some_and(|calls| calls.len() == TAKEOVER_CALLS)
        },
    );
    let all_there = failed.elapsed().as_secs_f64();
    let log = b.log();
    let took = log
        .lines()
        .find(|line| line.contains("took over the calls of the node that is down"))
        .unwrap_or("")
        .to_owned();
    stop.store(true, Ordering::Relaxed);
    apps.join().expect("the apps' thread");
    drop(acme);
    (all_there, took)
}

fn main() {
    require_root();
    let ns = NetNs::new("bcl");
    let runtime = runtime();

    // One relay alone: `offline` without a cluster.
    let alone_ms = {
        let config = config("alone", ADDRESS_A, false);
        let relayd = Relayd::start(Some(&ns), &["--config", config.path()]);
        let fingerprint = relayd.signalling_fingerprint();
        runtime.block_on(async {
            let mut acme = controller(
                &ns,
                ADDRESS_A.parse().unwrap(),
                &fingerprint,
                "acme",
                API_KEY,
            )
            .await;
            offline(&mut acme).await
        })
    };

    let redis = RedisServer::start(&ns, 6379);
    let (config_a, config_b) = (
        config("edge-a", ADDRESS_A, true),
        config("edge-b", ADDRESS_B, true),
    );
    let a = Relayd::start(Some(&ns), &["--config", config_a.path()]);
    let b = Relayd::start(Some(&ns), &["--config", config_b.path()]);
    let (fingerprint_a, fingerprint_b) = (a.signalling_fingerprint(), b.signalling_fingerprint());
    // Both relays know the other is alive.
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.ctl_json(&["cluster", "status"])["nodes_alive"] != 2
        || b.ctl_json(&["cluster", "status"])["nodes_alive"] != 2
    {
        assert!(
            Instant::now() < deadline,
            "the relays do not see each other"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (same, other, cluster_offline_ms, cpu, placed) = runtime.block_on(async {
        let mut acme = controller(
            &ns,
            ADDRESS_A.parse().unwrap(),
            &fingerprint_a,
            "acme",
            API_KEY,
        )
        .await;
        let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
        for n in 0..APPS {
            let user = format!("user{n}");
            let token = mint(&mut acme, &user).await;
            if n % 2 == 0 {
                on_a.push((
                    user,
                    app(&ns, ADDRESS_A.parse().unwrap(), &fingerprint_a, token).await,
                ));
            } else {
                on_b.push((
                    user,
                    app(&ns, ADDRESS_B.parse().unwrap(), &fingerprint_b, token).await,
                ));
            }
        }
        println!(
            "bench cluster: {APPS} apps connected, half to each relay; {ROUND_TRIPS} sends per path"
        );
        let same = round_trips(&mut acme, &mut on_a).await;
        let cpu_before = [a.pid(), b.pid(), redis.pid()].map(process_cpu_ns);
        let started = Instant::now();
        let other = round_trips(&mut acme, &mut on_b).await;
        let wall = started.elapsed().as_secs_f64();
        let cpu_after = [a.pid(), b.pid(), redis.pid()].map(process_cpu_ns);
        let cpu: Vec<f64> = (0..3)
            .map(|i| (cpu_after[i] - cpu_before[i]) as f64 / 1e9 / wall * 100.0)
            .collect();
        let cluster_offline_ms = offline(&mut acme).await;
        let calls_same = calls_to(&mut acme, &mut on_a).await;
        let calls_other = calls_to(&mut acme, &mut on_b).await;
        (
            same,
            other,
            cluster_offline_ms,
            (cpu, wall),
            (calls_same, calls_other),
        )
    });

    println!();
    println!(
        "Signalling through two relays sharing Redis: the controller on edge-a, `send` one at a time"
    );
    println!(
        "{:<34} {:>8} {:>8} {:>8} {:>8}",
        "path", "p50 ms", "p90 ms", "p99 ms", "sends"
    );
    row("same relay: result", &same.result_ms);
    row("same relay: app's receipt", &same.receipt_ms);
    row("other relay: result", &other.result_ms);
    row("other relay: app's receipt", &other.receipt_ms);
    row("offline, one relay (no cluster)", &alone_ms);
    row("offline, cluster of two", &cluster_offline_ms);
    let (cpu, wall) = cpu;
    println!();
    println!(
        "Over the {ROUND_TRIPS} cross-relay sends ({:.0} a second): edge-a {:.1}%, edge-b {:.1}%, redis-server {:.1}% of a core",
        ROUND_TRIPS as f64 / wall,
        cpu[0],
        cpu[1],
        cpu[2]
    );
    let ((same, same_wall), (other, other_wall)) = placed;
    println!();
    println!(
        "Calls from the controller on edge-a, one at a time, each hung up once offered ({CALLS} per path)"
    );
    println!(
        "{:<34} {:>8} {:>8} {:>8} {:>8}",
        "path", "p50 ms", "p90 ms", "p99 ms", "calls"
    );
    row("app on edge-a: result", &same.result_ms);
    row("app on edge-a: call.incoming", &same.receipt_ms);
    row("app on edge-b: result", &other.result_ms);
    row("app on edge-b: call.incoming", &other.receipt_ms);
    println!(
        "calls placed and hung up a second: {:.0} on the app's own relay, {:.0} across relays",
        CALLS as f64 / same_wall,
        CALLS as f64 / other_wall
    );
    drop((a, b, redis));

    let (all_there, took) = takeover();
    println!();
    println!(
        "Takeover of {TAKEOVER_CALLS} connected calls (XDP, health TTL {TAKEOVER_TTL_SECS} s): the standby had every call {all_there:.2} s after kill -9 of the active relay"
    );
    println!("the standby's log: {took}");
}
