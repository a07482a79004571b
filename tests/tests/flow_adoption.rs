//! Flows live in pinned maps: a restarted relayd adopts them with their ids and kernel
//! counters, and forwards them again.

use std::net::SocketAddr;

use relay_tests::{
    lab::{CLIENT_TO_PEER_FLOW, ThreeHosts},
    netns::PinDir,
    relayd::Relayd,
    require_root,
};

#[test]
fn a_restarted_relayd_adopts_pinned_flows() {
    require_root();
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let pin_dir = pins.path.to_string_lossy().into_owned();
    let args = lab.relayd_args(&["--datapath", "xdp", "--xdp-mode", "generic"], &pin_dir);
    let (client, relay, peer) = (&lab.client, &lab.relay, &lab.peer);

    let sender = client.udp_socket("10.10.1.2:4000".parse().unwrap());
    let receiver = peer.udp_socket("10.10.2.2:5004".parse().unwrap());
    receiver
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    let relay_addr: SocketAddr = "10.10.1.1:20000".parse().unwrap();
    let send_and_receive = |count: usize| {
        let mut buf = [0u8; 512];
        for _ in 0..count {
            sender.send_to(&[0x80; 172], relay_addr).unwrap();
            let (len, from) = receiver.recv_from(&mut buf).expect("relayed packet");
            assert_eq!((len, from), (172, "10.10.2.1:30000".parse().unwrap()));
        }
    };

    let mut first = Relayd::start(Some(relay), &args);
    first.ctl_ok(&[&CLIENT_TO_PEER_FLOW[..], &["--reverse"]].concat());
    send_and_receive(10);
    let before = first.ctl_json(&["flow", "show", "1"]);
    assert!(
        first.stop(),
        "relayd did not stop cleanly:\n{}",
        first.log()
    );
    assert!(
        pins.path.join("RELAY_FLOWS").exists(),
        "the flow map should stay pinned after relayd stops"
    );

    let second = Relayd::start(Some(relay), &args);
    assert!(
        second.log().contains("adopted flow from the pinned map"),
        "{}",
        second.log()
    );
    let ids: Vec<u64> = second.ctl_json(&["flow", "list"])["flows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|flow| flow["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2]);
    let after = second.ctl_json(&["flow", "show", "1"]);
    for field in ["src", "dst", "new_src", "new_dst"] {
        assert_eq!(after[field], before[field], "{field}");
    }
    let counter = |flow: &serde_json::Value, name: &str| flow["counters"][name].as_u64().unwrap();
    assert_eq!(
        counter(&before, "xdp_packets") + counter(&before, "userspace_packets"),
        10,
        "{before}"
    );
    // Kernel counters live in the map and survive; the slow path's are per process.
    assert_eq!(
        counter(&after, "xdp_packets"),
        counter(&before, "xdp_packets"),
        "{before} -> {after}"
    );
    send_and_receive(10);
    // New ids continue after the adopted ones.
    let added = second.ctl_json(&[
        "flow",
        "add",
        "--src",
        "10.10.1.2:4001",
        "--dst",
        "10.10.1.1:20001",
        "--new-src",
        "10.10.2.1:30001",
        "--new-dst",
        "10.10.2.2:5005",
    ]);
    assert_eq!(added["ids"], serde_json::json!([3]));
}

/// Verdict counters pinned by a relayd with fewer verdicts (before `pass_rtcp`) do not stop
/// an upgraded relayd: it says so and starts them afresh at its own size. (The flow map
/// keeps its layout across versions; the test above adopts it.)
#[test]
fn verdict_counters_pinned_by_an_older_relayd_are_renewed() {
    require_root();
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let pin_dir = pins.path.to_string_lossy().into_owned();
    let stats_pin = pins.path.join("RELAY_STATS");
    std::fs::create_dir_all(&pins.path).unwrap();
    relay_tests::netns::run(&[
        "bpftool",
        "map",
        "create",
        stats_pin.to_str().unwrap(),
        "type",
        "percpu_array",
        "key",
        "4",
        "value",
        "16",
        "entries",
        "18",
        "name",
        "RELAY_STATS",
    ]);
    let args = lab.relayd_args(&["--datapath", "xdp", "--xdp-mode", "generic"], &pin_dir);
    let relayd = Relayd::start(Some(&lab.relay), &args);
    assert!(
        relayd
            .log()
            .contains("the pinned verdict counters are of another relayd version"),
        "{}",
        relayd.log()
    );
    let stats = relayd.ctl_json(&["stats"]);
    assert!(
        stats["verdicts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["verdict"] == "pass_rtcp"),
        "{stats}"
    );
    let shown = relay_tests::netns::run(&[
        "bpftool",
        "map",
        "show",
        "pinned",
        stats_pin.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&shown.stdout)
            .contains(&format!("max_entries {}", relay_common::Verdict::COUNT)),
        "{}",
        String::from_utf8_lossy(&shown.stdout)
    );
}
