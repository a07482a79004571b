//! relayd as the packaged unit runs it: not root, but a system user with exactly the
//! ambient capabilities packaging/relayd.service grants (read from the unit), bpffs
//! mounted root-only (mode 0700) as systemd mounts it, and the pin directory made for it by
//! root, as the unit's `ExecStartPre=+` does. It must attach XDP, open the transcryption
//! workers' AF_XDP sockets, forward a flow in the kernel, and after a restart adopt that
//! flow from its pins.
//!
//! The root-only bpffs lives in a mount namespace of the test's own, kept by a file, so the
//! host's bpffs is untouched and both relayd runs see the same pins.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use relay_tests::{
    lab::{CLIENT_TO_PEER_FLOW, ThreeHosts},
    relayd::{Relayd, binary},
    require_root, unique,
};

/// The unprivileged user relayd runs as (nobody: no files of its own anywhere).
const UID: &str = "65534";
const PIN_DIR: &str = "/sys/fs/bpf/relay";
const PACKETS: u32 = 1000;

/// A persistent mount namespace with a root-only bpffs and relayd's pin directory in it;
/// unmounted and removed on drop (the namespace dies with its last process).
struct PrivateBpffs {
    handle: PathBuf,
}

impl PrivateBpffs {
    fn new() -> PrivateBpffs {
        let handle = Path::new("/run").join(unique("relay-test-mnt-"));
        fs::write(&handle, "").unwrap();
        let bpffs = PrivateBpffs { handle };
        let mount_ns = format!("--mount={}", bpffs.handle.display());
        run(&["unshare", &mount_ns, "--propagation", "private", "true"]);
        let setup = format!(
            "mount -t bpf bpf /sys/fs/bpf -o mode=0700 && install -d -o {UID} -g {UID} -m 0750 {PIN_DIR}"
        );
        run(&["nsenter", &mount_ns, "sh", "-c", &setup]);
        bpffs
    }

    fn mount_ns(&self) -> String {
        format!("--mount={}", self.handle.display())
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        // Unpin links and maps first, so the program is detached even if a relayd were
        // still holding the namespace.
        let _ = Command::new("nsenter")
            .arg(self.mount_ns())
            .arg(binary("relayd"))
            .args(["--detach-xdp", "--pin-dir", PIN_DIR])
            .output();
        let _ = Command::new("umount").arg(&self.handle).output();
        let _ = fs::remove_file(&self.handle);
    }
}

fn run(args: &[&str]) {
    let output = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        output.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The capabilities the unit grants, in setpriv's syntax (`+bpf,+perfmon,...`).
fn unit_capabilities() -> String {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/relayd.service");
    let text = fs::read_to_string(&unit).unwrap();
    let line = text
        .lines()
        .find_map(|line| line.strip_prefix("AmbientCapabilities="))
        .expect("AmbientCapabilities in the unit");
    line.split_whitespace()
        .map(|cap| format!("+{}", cap.trim_start_matches("CAP_").to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

/// A copy of relayd anyone may execute (the build tree may sit under a private home).
struct PublicBinary {
    dir: PathBuf,
}

impl PublicBinary {
    fn new() -> PublicBinary {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(unique("relay-unprivileged-"));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::copy(binary("relayd"), dir.join("relayd")).unwrap();
        fs::set_permissions(dir.join("relayd"), fs::Permissions::from_mode(0o755)).unwrap();
        PublicBinary { dir }
    }
}

impl Drop for PublicBinary {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn start_unprivileged(lab: &ThreeHosts, bpffs: &PrivateBpffs, relayd: &PublicBinary) -> Relayd {
    let caps = unit_capabilities();
    let mut command = Command::new("nsenter");
    command
        .arg(bpffs.mount_ns())
        .arg(format!("--net=/run/netns/{}", lab.relay.name))
        .args([
            "--",
            "setpriv",
            "--reuid",
            UID,
            "--regid",
            UID,
            "--clear-groups",
        ])
        .arg(format!("--inh-caps=-all,{caps}"))
        .arg(format!("--ambient-caps=-all,{caps}"))
        .arg(format!("--bounding-set=-all,{caps}"))
        .arg(relayd.dir.join("relayd"));
    Relayd::start_command(
        command,
        &[
            "--datapath",
            "xdp",
            "--interface",
            "rc",
            "--interface",
            "rp",
            "--pin-dir",
            PIN_DIR,
        ],
    )
}

/// Sends `PACKETS` from the client through the lab's flow; returns how many the peer got.
fn stream(lab: &ThreeHosts) -> u32 {
    let sender = lab.client.udp_socket("10.10.1.2:4000".parse().unwrap());
    let receiver = lab.peer.udp_socket("10.10.2.2:5004".parse().unwrap());
    receiver
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let relay: SocketAddr = "10.10.1.1:20000".parse().unwrap();
    let mut buf = [0u8; 512];
    let mut arrived = 0;
    for sequence in 0..PACKETS {
        sender
            .send_to(&relay_tests::traffic::numbered(sequence), relay)
            .unwrap();
        if receiver.recv_from(&mut buf).is_ok() {
            arrived += 1;
        }
    }
    arrived
}

fn xdp_packets(relayd: &Relayd) -> u64 {
    let flows = relayd.ctl_json(&["flow", "list"]);
    flows["flows"][0]["counters"]["xdp_packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("one flow with counters: {flows}"))
}

#[test]
fn relayd_runs_unprivileged_with_the_units_capabilities() {
    require_root();
    let lab = ThreeHosts::new();
    let bpffs = PrivateBpffs::new();
    let binary = PublicBinary::new();

    let mut relayd = start_unprivileged(&lab, &bpffs, &binary);
    let status = relayd.ctl_json(&["status"]);
    assert_eq!(
        status["datapath"]["transcrypt"]["path"],
        "af_xdp",
        "the unit's capabilities open the workers' AF_XDP sockets: {status}\n{}",
        relayd.log()
    );
    assert_eq!(
        status["datapath"]["kind"],
        "xdp",
        "{status}\n{}",
        relayd.log()
    );
    relayd.ctl_ok(&CLIENT_TO_PEER_FLOW);
    assert_eq!(stream(&lab), PACKETS, "{}", relayd.log());
    let forwarded = xdp_packets(&relayd);
    assert!(
        forwarded >= u64::from(PACKETS) - 5,
        "the kernel forwarded only {forwarded}\n{}",
        relayd.log()
    );
    let pid = relayd.pid();
    let uid = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("Uid:").map(str::to_owned))
        .unwrap();
    assert!(
        uid.split_whitespace().all(|id| id == UID),
        "relayd runs as {UID}: {uid}"
    );

    // A restart (as the unit's Restart= or an upgrade does it) adopts the pinned flow.
    assert!(relayd.stop(), "{}", relayd.log());
    let relayd = start_unprivileged(&lab, &bpffs, &binary);
    let flows = relayd.ctl_json(&["flow", "list"]);
    assert_eq!(
        flows["flows"].as_array().map(Vec::len),
        Some(1),
        "{flows}\n{}",
        relayd.log()
    );
    let before = xdp_packets(&relayd);
    assert_eq!(stream(&lab), PACKETS, "{}", relayd.log());
    assert!(xdp_packets(&relayd) - before >= u64::from(PACKETS) - 5);
}
