//! Idle flows are removed after `flows.idle_timeout_secs`, counted, and logged; a flow that
//! carries packets stays.

use std::{
    net::{SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use relay_tests::{
    netns::{NetNs, veth},
    relayd::Relayd,
    require_root,
};

#[test]
fn idle_flows_expire_and_busy_ones_stay() {
    require_root();
    let relay = NetNs::new("rexp");
    let peer = NetNs::new("rexq");
    veth(&relay, "r0", &peer, "p0");
    relay.exec(&["ip", "addr", "add", "10.30.0.1/24", "dev", "r0"]);
    peer.exec(&["ip", "addr", "add", "10.30.0.2/24", "dev", "p0"]);
    let relayd = Relayd::start(
        Some(&relay),
        &["--datapath", "userspace", "--idle-timeout-secs", "2"],
    );
    // Flow 1 (busy): peer:4000 -> relay:20000, sent back to peer:5000. Flow 2 stays idle.
    relayd.ctl_ok(&[
        "flow",
        "add",
        "--src",
        "10.30.0.2:4000",
        "--dst",
        "10.30.0.1:20000",
        "--new-src",
        "10.30.0.1:20001",
        "--new-dst",
        "10.30.0.2:5000",
    ]);
    relayd.ctl_ok(&[
        "flow",
        "add",
        "--src",
        "10.30.0.2:4100",
        "--dst",
        "10.30.0.1:20100",
        "--new-src",
        "10.30.0.1:20101",
        "--new-dst",
        "10.30.0.2:5100",
    ]);
    let sender: UdpSocket = peer.udp_socket("10.30.0.2:4000".parse().unwrap());
    let _sink = peer.udp_socket("10.30.0.2:5000".parse().unwrap());
    let to: SocketAddr = "10.30.0.1:20000".parse().unwrap();
    let started = Instant::now();
    // 50 packets per second for 4.5 s: twice the timeout.
    while started.elapsed() < Duration::from_millis(4500) {
        sender.send_to(&[0x80; 172], to).unwrap();
        thread::sleep(Duration::from_millis(20));
    }
    let flows = relayd.ctl_json(&["flow", "list"]);
    let ids: Vec<u64> = flows["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1], "only the busy flow should remain: {flows}");
    let rate = flows["flows"][0]["rate_pps"].as_f64().unwrap();
    assert!(
        (30.0..=70.0).contains(&rate),
        "rate of a 50 pps stream: {rate}"
    );
    let stats = relayd.ctl_json(&["stats"]);
    assert_eq!(stats["flows_expired"], 1, "{stats}");
    assert!(
        relayd
            .log()
            .contains("flow idle longer than flows.idle_timeout_secs: removed id=2"),
        "{}",
        relayd.log()
    );
}
