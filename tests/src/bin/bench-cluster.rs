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
//! 3. the relays' and Redis's CPU over the cross-relay round trips.
//!
//! Calls placed across relays and takeover are not measured: the cluster carries neither
//! yet.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use relay_tests::{
    bench::percentile,
    config_file::ConfigFile,
    measure::process_cpu_ns,
    netns::NetNs,
    redis::RedisServer,
    relayd::Relayd,
    require_root, runtime,
    signalling_client::{Socket, call, connect, controller, receive},
};
use serde_json::{Value, json};

const API_KEY: &str = "bench-api-key-0123456789";
const APPS: usize = 20;
const ROUND_TRIPS: usize = 1000;
const OFFLINE_TRIES: usize = 300;
const ADDRESS_A: &str = "127.0.0.1:4431";
const ADDRESS_B: &str = "127.0.0.1:4432";

fn config(node: &str, listen: &str, cluster: bool) -> ConfigFile {
    let cluster = if cluster {
        format!(
            "[cluster]\nenabled = true\nnode = \"{node}\"\nredis_url = \"redis://127.0.0.1:6379\"\n"
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
    let (same, other, cluster_offline_ms, cpu) = runtime.block_on(async {
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
        (same, other, cluster_offline_ms, (cpu, wall))
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
}
