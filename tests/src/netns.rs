//! Network namespaces, links and bpffs pin directories owned by guards.

use std::{
    fs::File,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Output},
    thread,
};

/// A network namespace (`ip netns add`), deleted with everything in it on drop. Its name
/// starts with `rt-`: `cargo xtask test` removes those a killed test process left.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> NetNs {
        let name = crate::unique(&format!("rt-{prefix}"));
        run(&["ip", "netns", "add", &name]);
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace and panics with its output if it fails.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates and BPF
    /// test runs it performs belong to the namespace.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let name = self.name.clone();
        thread::spawn(move || {
            enter_by_name(&name);
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// A UDP socket bound to `addr` inside the namespace, with buffers as large as relayd's,
    /// so that a bounded burst fits.
    pub fn udp_socket(&self, addr: SocketAddr) -> UdpSocket {
        self.enter(move || {
            let socket = UdpSocket::bind(addr).unwrap_or_else(|err| panic!("bind {addr}: {err}"));
            relay::datapath::userspace::enlarge_socket_buffers(&socket);
            socket
        })
    }

    pub fn ifindex(&self, name: &str) -> u32 {
        let name = name.to_owned();
        self.enter(move || relay::datapath::xdp::ifindex(&name).expect("ifindex"))
    }

    pub fn mac(&self, interface: &str) -> [u8; 6] {
        let output = self.exec(&["cat", &format!("/sys/class/net/{interface}/address")]);
        parse_mac(String::from_utf8_lossy(&output.stdout).trim())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Moves the calling thread into the network namespace `name` (for a thread that runs
/// concurrently with others, where [`NetNs::enter`]'s join does not fit).
pub fn enter_by_name(name: &str) {
    let path = format!("/run/netns/{name}");
    let ns = File::open(&path).unwrap_or_else(|err| panic!("opening {path}: {err}"));
    // SAFETY: setns on a namespace fd we own; it only changes this thread.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// Creates a veth pair `a` (in `ns_a`) <-> `b` (in `ns_b`), both up.
pub fn veth(ns_a: &NetNs, a: &str, ns_b: &NetNs, b: &str) {
    run(&[
        "ip", "link", "add", a, "netns", &ns_a.name, "type", "veth", "peer", "name", b, "netns",
        &ns_b.name,
    ]);
    ns_a.exec(&["ip", "link", "set", a, "up"]);
    ns_b.exec(&["ip", "link", "set", b, "up"]);
}

pub fn parse_mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap_or_else(|_| panic!("MAC {text:?}")))
        .collect();
    bytes.try_into().unwrap_or_else(|_| panic!("MAC {text:?}"))
}

/// A unique directory under /sys/fs/bpf for pinned maps, removed with its pins on drop.
pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new() -> PinDir {
        PinDir {
            path: PathBuf::from(format!("/sys/fs/bpf/{}", crate::unique("relay-test-"))),
        }
    }
}

impl Default for PinDir {
    fn default() -> Self {
        PinDir::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Runs a command and panics with its output when it fails.
pub fn run(args: &[&str]) -> Output {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|err| panic!("running {args:?}: {err}"));
    assert!(
        output.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
