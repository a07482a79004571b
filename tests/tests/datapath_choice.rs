//! `datapath.mode`: "auto" falls back to userspace and says why; "xdp" refuses to start
//! without XDP, naming the cause.

use std::process::Command;

use relay_tests::{
    netns::NetNs,
    relayd::{Relayd, binary},
    require_root,
};

#[test]
fn auto_falls_back_to_userspace_and_says_why() {
    require_root();
    let ns = NetNs::new("rdca");
    let relayd = Relayd::start(Some(&ns), &["--datapath", "auto", "--interface", "nosuch0"]);
    let status = relayd.ctl_json(&["status"]);
    assert_eq!(status["datapath"]["kind"], "userspace", "{status}");
    let reason = status["datapath"]["fallback_reason"]
        .as_str()
        .unwrap_or_default();
    assert!(
        reason.contains("\"nosuch0\": no such interface"),
        "{status}"
    );
    assert!(
        relayd
            .log()
            .contains("datapath: using userspace: XDP could not be set up"),
        "{}",
        relayd.log()
    );
    let text = relayd.ctl_ok(&["status"]);
    assert!(text.contains("XDP not in use: "), "{text}");
}

#[test]
fn xdp_mode_refuses_to_start_without_xdp() {
    require_root();
    let ns = NetNs::new("rdcx");
    let output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .arg("--")
        .arg(binary("relayd"))
        .args([
            "--datapath",
            "xdp",
            "--interface",
            "nosuch0",
            "--control-socket",
            "/tmp/relay-never.sock",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("relayd: datapath.interfaces: \"nosuch0\": no such interface"),
        "{stderr}"
    );
}
