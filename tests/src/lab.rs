//! The namespace lab most tests use: client —veth— relay —veth— peer.
//!
//! ```text
//! client ns          relay ns                        peer ns
//!   c0 10.10.1.2 ---- rc 10.10.1.1   rp 10.10.2.1 ---- p0 10.10.2.2
//!      fd10:1::2         fd10:1::1      fd10:2::1         fd10:2::2
//! ```

use crate::netns::{NetNs, veth};

/// `relayctl` arguments adding the lab's IPv4 flow: client 10.10.1.2:4000 -> relay
/// 10.10.1.1:20000, re-sent from 10.10.2.1:30000 to the peer 10.10.2.2:5004.
pub const CLIENT_TO_PEER_FLOW: [&str; 10] = [
    "flow",
    "add",
    "--src",
    "10.10.1.2:4000",
    "--dst",
    "10.10.1.1:20000",
    "--new-src",
    "10.10.2.1:30000",
    "--new-dst",
    "10.10.2.2:5004",
];

pub struct ThreeHosts {
    pub client: NetNs,
    pub relay: NetNs,
    pub peer: NetNs,
}

impl ThreeHosts {
    pub fn new() -> ThreeHosts {
        let lab = ThreeHosts {
            client: NetNs::new("rcl"),
            relay: NetNs::new("rrl"),
            peer: NetNs::new("rpe"),
        };
        veth(&lab.client, "c0", &lab.relay, "rc");
        veth(&lab.relay, "rp", &lab.peer, "p0");
        for (ns, dev, v4, v6) in [
            (&lab.client, "c0", "10.10.1.2/24", "fd10:1::2/64"),
            (&lab.relay, "rc", "10.10.1.1/24", "fd10:1::1/64"),
            (&lab.relay, "rp", "10.10.2.1/24", "fd10:2::1/64"),
            (&lab.peer, "p0", "10.10.2.2/24", "fd10:2::2/64"),
        ] {
            ns.exec(&["ip", "addr", "add", v4, "dev", dev]);
            ns.exec(&["ip", "addr", "add", v6, "dev", dev, "nodad"]);
        }
        // Frames redirected by native XDP out of a veth are delivered only when the far end
        // has GRO on; senders on veth emit partial checksums native XDP cannot carry
        // (XDP-FACTS.md).
        for (ns, dev) in [(&lab.client, "c0"), (&lab.peer, "p0")] {
            ns.exec(&["ethtool", "-K", dev, "tx", "off", "gro", "on"]);
        }
        lab
    }

    /// relayd's arguments to attach to both relay interfaces with pins in `pin_dir`, after
    /// the datapath arguments given.
    pub fn relayd_args<'a>(&self, datapath: &[&'a str], pin_dir: &'a str) -> Vec<&'a str> {
        let mut args = datapath.to_vec();
        args.extend_from_slice(&[
            "--interface",
            "rc",
            "--interface",
            "rp",
            "--pin-dir",
            pin_dir,
        ]);
        args
    }
}

/// relayd configuration for the lab with the TURN server on: it listens on the client side
/// (10.10.1.1:3478 and [fd10:1::1]:3478) and allocates on the LAN side (10.10.2.1 and
/// fd10:2::1), where the (private) peers 10.10.2.2 and fd10:2::2 are allowed; user
/// alice/wonderland. `extra` lines go into `[turn]`.
pub fn turn_config(datapath: &str, pin_dir: &str, extra: &str) -> String {
    format!(
        r#"
[datapath]
mode = "{datapath}"
interfaces = ["rc", "rp"]
xdp_mode = "generic"
pin_dir = "{pin_dir}"
[turn]
enabled = true
listen = ["10.10.1.1:3478", "[fd10:1::1]:3478"]
relay_addresses = ["10.10.2.1", "fd10:2::1"]
users = [{{ name = "alice", password = "wonderland" }}]
allowed_peers = ["10.10.2.2", "fd10:2::2"]
{extra}
"#
    )
}

impl Default for ThreeHosts {
    fn default() -> Self {
        ThreeHosts::new()
    }
}
