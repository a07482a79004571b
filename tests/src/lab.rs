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

/// The deployment the relay is for: an app behind a NAT on the Internet side, the relay with
/// a WAN and a LAN interface, a PBX on the LAN.
///
/// ```text
/// app ns           nat ns (masquerade)                relay ns                  pbx ns
///  a0 10.20.0.2 --- n0 10.20.0.1  n1 198.51.100.2 --- w0 198.51.100.1
///                                                      l0 10.30.0.1 ---------- p0 10.30.0.2
/// ```
pub struct EdgeLab {
    pub app: NetNs,
    pub nat: NetNs,
    pub relay: NetNs,
    pub pbx: NetNs,
}

impl EdgeLab {
    /// The relay's WAN address, where apps reach it (TURN on :3478).
    pub const RELAY_WAN: &str = "198.51.100.1";
    /// The relay's LAN address, where the PBX sees media come from.
    pub const RELAY_LAN: &str = "10.30.0.1";
    pub const APP: &str = "10.20.0.2";
    /// The app's second network ([`EdgeLab::second_network`]: Wi-Fi to cellular) and the
    /// NAT's public address for it.
    pub const APP_SECOND: &str = "10.20.0.3";
    pub const NAT_SECOND: &str = "198.51.100.3";
    pub const PBX: &str = "10.30.0.2";
    /// The relay's signalling (WebSocket over TLS) and ICE addresses in [`calls_config`].
    pub const SIGNALLING: &str = "198.51.100.1:443";
    pub const ICE: &str = "198.51.100.1:3479";

    pub fn new() -> EdgeLab {
        let lab = EdgeLab {
            app: NetNs::new("rapp"),
            nat: NetNs::new("rnat"),
            relay: NetNs::new("rrel"),
            pbx: NetNs::new("rpbx"),
        };
        veth(&lab.app, "a0", &lab.nat, "n0");
        veth(&lab.nat, "n1", &lab.relay, "w0");
        veth(&lab.relay, "l0", &lab.pbx, "p0");
        for (ns, dev, address) in [
            (&lab.app, "a0", "10.20.0.2/24"),
            (&lab.nat, "n0", "10.20.0.1/24"),
            (&lab.nat, "n1", "198.51.100.2/24"),
            (&lab.relay, "w0", "198.51.100.1/24"),
            (&lab.relay, "l0", "10.30.0.1/24"),
            (&lab.pbx, "p0", "10.30.0.2/24"),
        ] {
            ns.exec(&["ip", "addr", "add", address, "dev", dev]);
        }
        lab.app
            .exec(&["ip", "route", "add", "default", "via", "10.20.0.1"]);
        // The PBX side reaches the relay's public address through it (the controller
        // connects outbound to the relay's signalling port).
        lab.pbx
            .exec(&["ip", "route", "add", "default", "via", "10.30.0.1"]);
        lab.nat.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        lab.nat.exec(&[
            "nft",
            "add table ip nat; add chain ip nat post { type nat hook postrouting priority 100; }; add rule ip nat post oifname n1 masquerade",
        ]);
        // As in ThreeHosts: GRO on the far ends of what XDP redirects, no partial checksums
        // from the senders (XDP-FACTS.md).
        for (ns, dev) in [(&lab.app, "a0"), (&lab.nat, "n1"), (&lab.pbx, "p0")] {
            ns.exec(&["ethtool", "-K", dev, "tx", "off", "gro", "on"]);
        }
        lab
    }
}

/// relayd configuration for the edge lab: XDP on the WAN and LAN interfaces, signalling on
/// [`EdgeLab::SIGNALLING`] with one tenant, calls with ICE on [`EdgeLab::ICE`]. `extra`
/// lines go into `[calls]`, and may open further tables after it. The media passes through
/// as each side wrote it (the test app and the PBX speak plain RTP): see
/// [`anchor_config`] for the relay's own media security.
pub fn calls_config(pin_dir: &std::path::Path, tenant: &str, api_key: &str, extra: &str) -> String {
    anchor_config(
        pin_dir,
        tenant,
        api_key,
        &format!("app_media = \"as-pbx\"\npbx_media = \"as-app\"\n{extra}"),
    )
}

/// [`calls_config`] with the relay's default media security: DTLS-SRTP toward the app
/// when the PBX calls, plain RTP toward the PBX when the app calls.
pub fn anchor_config(
    pin_dir: &std::path::Path,
    tenant: &str,
    api_key: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[datapath]
mode = "xdp"
interfaces = ["w0", "l0"]
xdp_mode = "generic"
pin_dir = "{}"
[signalling]
enabled = true
listen = "{}"
token_secret = "a token secret of enough length"
tenants = [{{ name = "{tenant}", api_key = "{api_key}" }}]
[calls]
enabled = true
ice_listen = "{}"
lan_address = "{}"
{extra}
"#,
        pin_dir.display(),
        EdgeLab::SIGNALLING,
        EdgeLab::ICE,
        EdgeLab::RELAY_LAN,
    )
}

impl EdgeLab {
    /// The app's network lets only TURN and signalling out: UDP to the relay's TURN port
    /// and TCP to its signalling port (443), as in hotel and corporate guest networks.
    /// Everything else from the app is dropped at the NAT.
    pub fn only_turn_and_signalling(&self) {
        self.guest_network(&["udp dport 3478", "tcp dport 443"]);
    }

    /// The app's network lets only TCP to the relay's port 443 out (TURN over TLS there).
    pub fn only_tcp_443(&self) {
        self.guest_network(&["tcp dport 443"]);
    }

    /// A guest network at the NAT: from the app, only `allowed` (nft matches) toward the
    /// relay's WAN address get through; the rest is dropped and counted.
    fn guest_network(&self, allowed: &[&str]) {
        let mut rules = vec![
            "add table ip guest".to_owned(),
            "add chain ip guest forward { type filter hook forward priority 0; policy accept; }"
                .to_owned(),
            "add rule ip guest forward ct state established,related accept".to_owned(),
        ];
        for allowed in allowed {
            rules.push(format!(
                "add rule ip guest forward iifname n0 ip daddr {} {allowed} accept",
                EdgeLab::RELAY_WAN
            ));
        }
        rules.push("add rule ip guest forward iifname n0 counter drop".to_owned());
        self.nat.exec(&["nft", &rules.join("; ")]);
    }

    /// Packets from the app the guest network dropped ([`EdgeLab::only_turn_and_signalling`]).
    pub fn guest_drops(&self) -> u64 {
        let output = self
            .nat
            .exec(&["nft", "list", "chain", "ip", "guest", "forward"]);
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find(|line| line.contains("drop"))
            .and_then(|line| {
                line.split_whitespace()
                    .skip_while(|word| *word != "packets")
                    .nth(1)
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0)
    }

    /// Gives the app a second network to move to: [`EdgeLab::APP_SECOND`], which the NAT
    /// maps to its other public address [`EdgeLab::NAT_SECOND`] (the relay sees another
    /// address, as when a phone leaves Wi-Fi for cellular).
    pub fn second_network(&self) {
        self.app
            .exec(&["ip", "addr", "add", "10.20.0.3/24", "dev", "a0"]);
        self.nat
            .exec(&["ip", "addr", "add", "198.51.100.3/24", "dev", "n1"]);
        self.nat.exec(&[
            "nft",
            "insert rule ip nat post ip saddr 10.20.0.3 oifname n1 snat to 198.51.100.3",
        ]);
    }
}

/// `[connections]` for a lab whose many apps all come from the NAT's one public address
/// (as behind a carrier-grade NAT): the default 256 connections per source would refuse
/// all but the first 256 apps' signalling. To append to [`calls_config`]'s `extra`.
pub const APPS_BEHIND_ONE_NAT: &str = "\n[connections]\nmax_per_source = 4096\n";

/// `[turn]` for the edge lab, to append to [`calls_config`]'s `extra`: TURN on the relay's
/// WAN address (:3478), relayed addresses there too, user `app`/`app-secret`, and the
/// relay's own ICE address as an allowed peer (a documentation range here, which the
/// default peer policy refuses; a public WAN address passes it).
pub const EDGE_TURN: &str = r#"
[turn]
enabled = true
listen = ["198.51.100.1:3478"]
relay_addresses = ["198.51.100.1"]
users = [{ name = "app", password = "app-secret" }]
allowed_peers = ["198.51.100.1"]
"#;

impl EdgeLab {
    /// The PBX side's controller, connected to the relay's signalling from the PBX's
    /// namespace with the tenant's API key.
    pub async fn controller(
        &self,
        fingerprint: &str,
        tenant: &str,
        api_key: &str,
    ) -> crate::signalling_client::Socket {
        crate::signalling_client::controller(
            &self.pbx,
            EdgeLab::SIGNALLING.parse().expect("address"),
            fingerprint,
            tenant,
            api_key,
        )
        .await
    }
}

impl Default for EdgeLab {
    fn default() -> Self {
        EdgeLab::new()
    }
}

/// relayd configuration for the three-host lab as a SIP proxy's media relay: XDP on both
/// relay interfaces, ng on `ng` with the client side named `wan` (10.10.1.1) and the peer
/// side `lan` (10.10.2.1). `extra` lines go into `[ng]`, and may open further tables.
pub fn ng_config(pin_dir: &std::path::Path, ng: &str, extra: &str) -> String {
    format!(
        r#"
[datapath]
mode = "xdp"
interfaces = ["rc", "rp"]
xdp_mode = "generic"
pin_dir = "{}"
[ng]
listen = "{ng}"
interfaces = {{ wan = "10.10.1.1", lan = "10.10.2.1" }}
{extra}
"#,
        pin_dir.display()
    )
}

/// Two relays behind floating addresses, as keepalived runs an active node and its standby:
/// the edge lab's app, NAT and PBX, with a switch between them and both relays. The active
/// relay holds the floating WAN and LAN addresses (EdgeLab's relay addresses, on top of its
/// own); [`FailoverLab::fail_over`] moves them to the standby, as keepalived would. Redis
/// listens on the LAN switch's own address. Both relays may bind the floating addresses
/// before they hold them (`net.ipv4.ip_nonlocal_bind`, as keepalived setups do).
///
/// ```text
/// app ns        nat ns                 switch ns                    relay ns (x2)
///  a0 10.20.0.2 - n0 / n1 198.51.100.2 - sn  [br-wan] sw0, sw1 ----- w0 198.51.100.11, .12
///                                           [br-lan] sl0, sl1 ----- l0 10.30.0.11, .12
///                                                    sp 10.30.0.100 (Redis)
///                                                     |
///                                              pbx ns p0 10.30.0.2
/// ```
pub struct FailoverLab {
    pub app: NetNs,
    pub nat: NetNs,
    pub switch: NetNs,
    /// The active relay's namespace, then the standby's.
    pub relays: [NetNs; 2],
    pub pbx: NetNs,
}

impl FailoverLab {
    /// Where Redis listens: the LAN switch's address.
    pub const REDIS: &str = "10.30.0.100";
    /// Each relay's own WAN and LAN addresses (the floating ones are EdgeLab's).
    pub const OWN_WAN: [&str; 2] = ["198.51.100.11", "198.51.100.12"];
    pub const OWN_LAN: [&str; 2] = ["10.30.0.11", "10.30.0.12"];

    pub fn new() -> FailoverLab {
        let lab = FailoverLab {
            app: NetNs::new("fapp"),
            nat: NetNs::new("fnat"),
            switch: NetNs::new("fsw"),
            relays: [NetNs::new("frel0"), NetNs::new("frel1")],
            pbx: NetNs::new("fpbx"),
        };
        veth(&lab.app, "a0", &lab.nat, "n0");
        veth(&lab.nat, "n1", &lab.switch, "sn");
        veth(&lab.relays[0], "w0", &lab.switch, "sw0");
        veth(&lab.relays[1], "w0", &lab.switch, "sw1");
        veth(&lab.relays[0], "l0", &lab.switch, "sl0");
        veth(&lab.relays[1], "l0", &lab.switch, "sl1");
        veth(&lab.pbx, "p0", &lab.switch, "sp");
        for (bridge, ports) in [
            ("br-wan", ["sn", "sw0", "sw1"]),
            ("br-lan", ["sl0", "sl1", "sp"]),
        ] {
            lab.switch
                .exec(&["ip", "link", "add", bridge, "type", "bridge"]);
            for port in ports {
                lab.switch
                    .exec(&["ip", "link", "set", port, "master", bridge]);
            }
            lab.switch.exec(&["ip", "link", "set", bridge, "up"]);
        }
        lab.switch.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", FailoverLab::REDIS),
            "dev",
            "br-lan",
        ]);
        for (ns, dev, address) in [
            (&lab.app, "a0", "10.20.0.2/24"),
            (&lab.nat, "n0", "10.20.0.1/24"),
            (&lab.nat, "n1", "198.51.100.2/24"),
            (&lab.pbx, "p0", "10.30.0.2/24"),
        ] {
            ns.exec(&["ip", "addr", "add", address, "dev", dev]);
        }
        for (relay, (wan, lan)) in lab
            .relays
            .iter()
            .zip(FailoverLab::OWN_WAN.iter().zip(FailoverLab::OWN_LAN))
        {
            relay.exec(&["ip", "addr", "add", &format!("{wan}/24"), "dev", "w0"]);
            relay.exec(&["ip", "addr", "add", &format!("{lan}/24"), "dev", "l0"]);
            relay.exec(&["sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=1"]);
        }
        lab.hold_floating(0);
        lab.app
            .exec(&["ip", "route", "add", "default", "via", "10.20.0.1"]);
        lab.pbx
            .exec(&["ip", "route", "add", "default", "via", EdgeLab::RELAY_LAN]);
        lab.nat.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        lab.nat.exec(&[
            "nft",
            "add table ip nat; add chain ip nat post { type nat hook postrouting priority 100; }; add rule ip nat post oifname n1 masquerade",
        ]);
        // As in EdgeLab: no partial checksums from the senders, GRO where XDP's redirects
        // arrive (XDP-FACTS.md).
        for (ns, dev) in [(&lab.app, "a0"), (&lab.nat, "n1"), (&lab.pbx, "p0")] {
            ns.exec(&["ethtool", "-K", dev, "tx", "off", "gro", "on"]);
        }
        for dev in ["sw0", "sw1", "sl0", "sl1"] {
            lab.switch
                .exec(&["ethtool", "-K", dev, "tx", "off", "gro", "on"]);
        }
        lab
    }

    /// Relay `index` takes the floating addresses (secondary to its own).
    fn hold_floating(&self, index: usize) {
        let relay = &self.relays[index];
        relay.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", EdgeLab::RELAY_WAN),
            "dev",
            "w0",
        ]);
        relay.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", EdgeLab::RELAY_LAN),
            "dev",
            "l0",
        ]);
    }

    /// The active relay's box is gone (its links down: nothing in or out, its XDP program
    /// included) and the standby holds the floating addresses; the NAT and the PBX learn
    /// where they are now (keepalived's gratuitous ARP).
    pub fn fail_over(&self) {
        for dev in ["w0", "l0"] {
            self.relays[0].exec(&["ip", "link", "set", dev, "down"]);
        }
        self.hold_floating(1);
        for (ns, dev) in [(&self.nat, "n1"), (&self.pbx, "p0")] {
            ns.exec(&["ip", "neigh", "flush", "dev", dev]);
        }
    }
}

/// The `[cluster]` section of one relay of an active/standby pair sharing Redis at
/// `redis_url`: node `node`, the standby of `standby_for` when that is not empty, its health
/// record living `ttl_secs`.
pub fn pair_cluster(node: &str, redis_url: &str, standby_for: &str, ttl_secs: u64) -> String {
    format!(
        "[cluster]\nenabled = true\nnode = \"{node}\"\nredis_url = \"{redis_url}\"\n\
         health_ttl_secs = {ttl_secs}\nstandby_for = \"{standby_for}\"\n"
    )
}

impl Default for FailoverLab {
    fn default() -> Self {
        FailoverLab::new()
    }
}
