//! Restart without dropping media: the XDP program stays attached through pinned links
//! while relayd is stopped, a new relayd takes the links over (atomic program replacement)
//! and adopts the flows; not one packet of a stream running across the restart is lost.
//! `relayd --detach-xdp` then removes everything from the kernel.

use std::{
    collections::HashSet,
    net::SocketAddr,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use relay_tests::{
    lab::{CLIENT_TO_PEER_FLOW, ThreeHosts},
    netns::PinDir,
    relayd::{Relayd, binary},
    require_root,
    traffic::{numbered, sequence_of},
};

const PACKETS: u32 = 20_000;

fn restart_keeps_forwarding(datapath: &[&str]) {
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let pin_dir = pins.path.to_string_lossy().into_owned();
    let args = lab.relayd_args(datapath, &pin_dir);
    let mut first = Relayd::start(Some(&lab.relay), &args);
    first.ctl_ok(&CLIENT_TO_PEER_FLOW);
    let sender = lab.client.udp_socket("10.10.1.2:4000".parse().unwrap());
    let receiver = lab.peer.udp_socket("10.10.2.2:5004".parse().unwrap());
    receiver
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let relay_addr: SocketAddr = "10.10.1.1:20000".parse().unwrap();

    // About 10k packets per second for 2 s, across the restart.
    let sending = Arc::new(AtomicBool::new(true));
    let still_sending = sending.clone();
    let sender_thread = thread::spawn(move || {
        let started = Instant::now();
        for sequence in 0..PACKETS {
            sender.send_to(&numbered(sequence), relay_addr).unwrap();
            // Pace by the clock, not by sleeps, which are coarse.
            while started.elapsed() < Duration::from_micros(100) * sequence {
                std::hint::spin_loop();
            }
        }
        still_sending.store(false, Ordering::Relaxed);
    });
    let receiver_thread = thread::spawn(move || {
        let mut seen = HashSet::new();
        let mut buf = [0u8; 512];
        loop {
            match receiver.recv_from(&mut buf) {
                Ok((len, _)) => {
                    if let Some(sequence) = sequence_of(&buf[..len]) {
                        seen.insert(sequence);
                    }
                }
                Err(_) if !sending.load(Ordering::Relaxed) => return seen,
                Err(_) => {}
            }
        }
    });

    thread::sleep(Duration::from_millis(400));
    // The first packets may have gone through the first relayd's socket while the kernel
    // resolved the peer's neighbour entry (pass_no_neighbour); its counters go with it.
    let before_stop = first.ctl_json(&["flow", "show", "1"]);
    let via_first_userspace = before_stop["counters"]["userspace_packets"]
        .as_u64()
        .unwrap();
    assert!(
        first.stop(),
        "relayd did not stop cleanly:\n{}",
        first.log()
    );
    assert!(
        first.log().contains("XDP stays attached"),
        "{}",
        first.log()
    );
    // relayd is down for a while; the kernel keeps forwarding.
    thread::sleep(Duration::from_millis(300));
    let second = Relayd::start(Some(&lab.relay), &args);
    sender_thread.join().unwrap();
    let seen = receiver_thread.join().unwrap();
    assert_eq!(
        seen.len() as u32,
        PACKETS,
        "packets lost across the restart:\n{}",
        second.log()
    );
    assert!(
        second.log().contains("took over the pinned link"),
        "{}",
        second.log()
    );
    let status = second.ctl_json(&["status"]);
    let mode = if datapath.contains(&"native") {
        "native"
    } else {
        "generic"
    };
    let interfaces = status["datapath"]["interfaces"].as_array().unwrap();
    assert!(!interfaces.is_empty(), "XDP attached somewhere: {status}");
    for interface in interfaces {
        assert_eq!(interface["xdp_mode"], mode, "{status}");
    }
    let flow = second.ctl_json(&["flow", "show", "1"]);
    let counter = |name: &str| flow["counters"][name].as_u64().unwrap();
    assert!(
        counter("xdp_packets") + via_first_userspace >= u64::from(PACKETS) - 5,
        "the kernel forwarded the stream (the first relayd's socket {via_first_userspace} of it): {flow}"
    );
    drop(second);

    let output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.relay.name))
        .arg("--")
        .arg(binary("relayd"))
        .args(["--detach-xdp", "--pin-dir", &pin_dir])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("link_rc") && stdout.contains("RELAY_FLOWS"),
        "{stdout}"
    );
    assert!(!pins.path.exists(), "the pin directory should be gone");
    let attached = lab.relay.exec(&["ip", "-d", "link", "show", "dev", "rc"]);
    assert!(
        !String::from_utf8_lossy(&attached.stdout).contains("prog/xdp"),
        "XDP still attached after --detach-xdp"
    );
}

#[test]
fn restart_keeps_forwarding_xdp_generic() {
    require_root();
    restart_keeps_forwarding(&["--datapath", "xdp", "--xdp-mode", "generic"]);
}

#[test]
fn restart_keeps_forwarding_xdp_native() {
    require_root();
    restart_keeps_forwarding(&["--datapath", "xdp", "--xdp-mode", "native"]);
}
