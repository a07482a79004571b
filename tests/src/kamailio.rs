//! Kamailio (Debian `kamailio`) as the SIP proxy in front of the relay: its `rtpengine`
//! module speaks ng to the relay for every INVITE, reply with SDP and BYE
//! (`rtpengine_offer`, `rtpengine_answer`, `rtpengine_delete`), as a deployment would run
//! it with rtpengine. Stopped on drop.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{netns::NetNs, process::Background};

pub struct Kamailio {
    process: Background,
    dir: PathBuf,
}

/// The routing script: record-route, forward every INVITE to `next_hop`, offer and answer
/// through ng with `offer_flags`, delete on BYE or a failed INVITE; in-dialog requests
/// follow the routes.
fn script(
    listen: &[SocketAddr],
    ng: SocketAddr,
    next_hop: SocketAddr,
    offer_flags: &str,
) -> String {
    let listen: String = listen
        .iter()
        .map(|address| format!("listen=udp:{address}\n"))
        .collect();
    format!(
        r#"#!KAMAILIO
debug=2
log_stderror=yes
children=2
auto_aliases=no
# Replies and requests leave from the interface toward their destination.
mhomed=1
{listen}
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "rtpengine.so"
modparam("rtpengine", "rtpengine_sock", "udp:{ng}")
modparam("rtpengine", "rtpengine_tout_ms", 2000)

request_route {{
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    if (has_totag()) {{
        # sipp's scenarios send in-dialog requests to the proxy without the Route set:
        # those go on to the callee as the loose-routed ones would.
        if (!loose_route()) {{
            $du = "sip:{next_hop}";
        }}
        if (is_method("BYE")) {{
            rtpengine_delete();
        }} else if (is_method("ACK") && has_body("application/sdp")) {{
            rtpengine_answer();
        }}
        t_relay();
        exit;
    }}
    if (is_method("INVITE")) {{
        record_route();
        if (has_body("application/sdp")) {{
            rtpengine_offer("{offer_flags}");
        }}
        t_on_reply("REPLY");
        t_on_failure("FAILED");
        $du = "sip:{next_hop}";
        t_relay();
        exit;
    }}
    sl_send_reply("405", "Method Not Allowed");
}}

onreply_route[REPLY] {{
    if (has_body("application/sdp")) {{
        rtpengine_answer("{offer_flags}");
    }}
}}

failure_route[FAILED] {{
    rtpengine_delete();
}}
"#
    )
}

impl Kamailio {
    /// Kamailio in `ns` on the `listen` addresses, with the relay's ng socket at `ng`.
    pub fn start(
        ns: &NetNs,
        listen: &[SocketAddr],
        ng: SocketAddr,
        next_hop: SocketAddr,
        offer_flags: &str,
    ) -> Kamailio {
        let dir = std::env::temp_dir().join(crate::unique("relay-kamailio-"));
        std::fs::create_dir_all(&dir).expect("kamailio dir");
        let config = dir.join("kamailio.cfg");
        std::fs::write(&config, script(listen, ng, next_hop, offer_flags)).expect("kamailio.cfg");
        let check = ns.exec(&["kamailio", "-c", "-f", config.to_str().expect("path")]);
        assert!(check.status.success(), "kamailio -c: {check:?}");
        let output = dir.join("output");
        let process = Background::spawn_with_output(
            ns,
            &[
                "kamailio",
                "-DD",
                "-E",
                "-f",
                config.to_str().expect("path"),
                "-Y",
                dir.to_str().expect("path"),
                "-P",
                dir.join("kamailio.pid").to_str().expect("path"),
            ],
            &output,
        );
        let kamailio = Kamailio { process, dir };
        // Up once its SIP sockets are bound (its children have started, and with them the
        // rtpengine module's ping of the relay).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let wanted = listen[0].to_string();
        loop {
            let sockets = ns.exec(&["ss", "-Hlun"]);
            if String::from_utf8_lossy(&sockets.stdout).contains(&wanted) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "kamailio did not start listening on {wanted}:\n{}",
                kamailio.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(300));
        kamailio
    }

    /// Kamailio in the three-host lab's relay namespace, on both relay addresses, sending
    /// every INVITE to the peer side's sipp at 10.10.2.2:5060, the caller on the `wan`
    /// interface and the callee on `lan`.
    pub fn in_three_hosts(lab: &crate::lab::ThreeHosts, ng: SocketAddr) -> Kamailio {
        let address = |text: &str| text.parse().expect("address");
        Kamailio::start(
            &lab.relay,
            &[address("10.10.1.1:5060"), address("10.10.2.1:5060")],
            ng,
            address("10.10.2.2:5060"),
            "replace-origin ICE=remove direction=wan direction=lan",
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("output")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }
}

impl Drop for Kamailio {
    fn drop(&mut self) {
        // Its children go with it: SIGTERM to the main process ends them all.
        let _ = std::process::Command::new("kill")
            .arg(self.process.pid().to_string())
            .status();
        self.process.wait_exit(Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
