//! End to end in network namespaces: client ns —veth— relay ns —veth— peer ns, relayd in the
//! relay ns, flows added with relayctl, real UDP both ways over IPv4 and IPv6. Every packet
//! must arrive rewritten, exactly once; the per-flow counters say which path carried it.
//! The same test runs with XDP in native mode, XDP in generic mode, and the userspace
//! datapath.

use std::{net::SocketAddr, thread, time::Duration};

use relay_tests::{
    lab::ThreeHosts,
    netns::PinDir,
    relayd::{Relayd, http_get, metric},
    require_root,
    traffic::{PLAIN, stream},
};
use serde_json::Value;

/// Where relayd serves metrics, inside the relay namespace.
const METRICS: &str = "127.0.0.1:9477";
/// Packets sent each way, per address family.
const PACKETS: u32 = 10_000;
/// Packets the slow path may carry in the XDP modes: the first packet of each flow goes
/// through a socket so that the kernel resolves the next hop's neighbour entry.
const SLOW_PATH_ALLOWANCE: u64 = 5;

struct Leg {
    client: SocketAddr,
    relay_client_side: SocketAddr,
    relay_peer_side: SocketAddr,
    peer: SocketAddr,
}

fn legs() -> [Leg; 2] {
    let a = |s: &str| s.parse().unwrap();
    [
        Leg {
            client: a("10.10.1.2:4000"),
            relay_client_side: a("10.10.1.1:20000"),
            relay_peer_side: a("10.10.2.1:30000"),
            peer: a("10.10.2.2:5004"),
        },
        Leg {
            client: a("[fd10:1::2]:4000"),
            relay_client_side: a("[fd10:1::1]:20000"),
            relay_peer_side: a("[fd10:2::1]:30000"),
            peer: a("[fd10:2::2]:5004"),
        },
    ]
}

fn run_mode(mode: &str, args: &[&str]) {
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let pin_dir = pins.path.to_string_lossy().into_owned();
    let mut relayd_args = lab.relayd_args(args, &pin_dir);
    relayd_args.extend_from_slice(&["--metrics-listen", METRICS]);
    let relayd = Relayd::start(Some(&lab.relay), &relayd_args);

    let status = relayd.ctl_json(&["status"]);
    let expected_kind = if mode == "userspace" {
        "userspace"
    } else {
        "xdp"
    };
    assert_eq!(status["datapath"]["kind"], expected_kind, "{status}");

    for leg in legs() {
        relayd.ctl_ok(&[
            "flow",
            "add",
            "--src",
            &leg.client.to_string(),
            "--dst",
            &leg.relay_client_side.to_string(),
            "--new-src",
            &leg.relay_peer_side.to_string(),
            "--new-dst",
            &leg.peer.to_string(),
            "--reverse",
        ]);
        let client = lab.client.udp_socket(leg.client);
        let peer = lab.peer.udp_socket(leg.peer);
        let forward = stream(
            &client,
            leg.relay_client_side,
            peer.try_clone().unwrap(),
            leg.relay_peer_side,
            PACKETS,
            &PLAIN,
        );
        let backward = stream(
            &peer,
            leg.relay_peer_side,
            client,
            leg.relay_client_side,
            PACKETS,
            &PLAIN,
        );
        if let Err(problem) = forward.and(backward) {
            panic!("{mode}: {problem}\n{}", relayd.diagnostics());
        }
    }

    let flows = relayd.ctl_json(&["flow", "list"]);
    let flows = flows["flows"].as_array().expect("flow list");
    assert_eq!(flows.len(), 4, "{flows:?}");
    for flow in flows {
        let counter = |name: &str| flow["counters"][name].as_u64().unwrap();
        let (xdp, user) = (counter("xdp_packets"), counter("userspace_packets"));
        assert_eq!(xdp + user, u64::from(PACKETS), "{mode}: flow {flow}");
        if mode == "userspace" {
            assert_eq!(xdp, 0, "{mode}: flow {flow}");
        } else {
            assert!(
                user <= SLOW_PATH_ALLOWANCE,
                "{mode}: the kernel should have forwarded nearly everything: {flow}"
            );
        }
    }
    // Metrics, scraped now, count exactly what was sent: 4 flows of PACKETS each.
    let metrics = http_get(&lab.relay, METRICS, "/metrics");
    let forwarded = metric(&metrics, "relay_forwarded_packets_total{path=\"xdp\"}").unwrap()
        + metric(
            &metrics,
            "relay_forwarded_packets_total{path=\"userspace\"}",
        )
        .unwrap();
    assert_eq!(forwarded, 4 * u64::from(PACKETS), "{mode}:\n{metrics}");
    assert_eq!(metric(&metrics, "relay_flows"), Some(4), "{metrics}");
    let datapath = if mode == "userspace" {
        "userspace"
    } else {
        "xdp"
    };
    assert_eq!(
        metric(
            &metrics,
            &format!("relay_datapath_info{{datapath=\"{datapath}\"}}")
        ),
        Some(1),
        "{metrics}"
    );
    let stats = relayd.ctl_json(&["stats"]);
    if mode != "userspace" {
        let redirected = verdict(&stats, "redirect");
        assert!(
            redirected >= 4 * u64::from(PACKETS) - 4 * SLOW_PATH_ALLOWANCE,
            "{mode}: redirect counter {redirected}: {stats}"
        );
    }
    // Strict source: a stranger sending to the relay port is never forwarded.
    let stranger_addr: SocketAddr = "10.10.1.2:4999".parse().unwrap();
    let stranger = lab.client.udp_socket(stranger_addr);
    for _ in 0..10 {
        stranger
            .send_to(
                &[0x80; 172],
                "10.10.1.1:20000".parse::<SocketAddr>().unwrap(),
            )
            .unwrap();
    }
    thread::sleep(Duration::from_millis(300));
    let after = relayd.ctl_json(&["flow", "list"]);
    let flows = after["flows"].as_array().unwrap();
    assert!(
        !flows.is_empty(),
        "{mode}: the flows are still there: {after}"
    );
    for flow in flows {
        let packets = flow["counters"]["xdp_packets"].as_u64().unwrap()
            + flow["counters"]["userspace_packets"].as_u64().unwrap();
        assert_eq!(
            packets,
            u64::from(PACKETS),
            "{mode}: a stranger's packet was forwarded: {flow}"
        );
    }
    let stats = relayd.ctl_json(&["stats"]);
    assert_eq!(
        stats["userspace"]["unknown_source_packets"], 10,
        "{mode}: {stats}"
    );
}

fn verdict(stats: &Value, name: &str) -> u64 {
    stats["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["verdict"] == name)
        .and_then(|v| v["packets"].as_u64())
        .unwrap_or(0)
}

#[test]
fn forwards_both_ways_with_xdp_native() {
    require_root();
    run_mode("xdp-native", &["--datapath", "xdp", "--xdp-mode", "native"]);
}

#[test]
fn forwards_both_ways_with_xdp_generic() {
    require_root();
    run_mode(
        "xdp-generic",
        &["--datapath", "xdp", "--xdp-mode", "generic"],
    );
}

#[test]
fn forwards_both_ways_with_userspace() {
    require_root();
    run_mode("userspace", &["--datapath", "userspace"]);
}
