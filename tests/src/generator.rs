//! trafgen as a packet generator for the benchmarks: one process (`-P 1`), a fixed number
//! of frames at a given load, sent from a namespace's interface.

use std::{path::Path, process::Command, time::Instant};

use crate::netns::NetNs;

/// How trafgen offers load. Its rate limit (`-b`) sends in bursts of thousands of frames
/// (it fills and flushes its TX ring), which a socket's receive buffer cannot absorb; with an
/// inter-packet gap (`-t`) it sends one frame per system call, smoothly, but tops out near
/// 50k pps here.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Load {
    Gap { micros: u64 },
    Burst { pps: u64 },
    Unlimited,
}

impl Load {
    pub fn label(self) -> String {
        match self {
            Load::Gap { micros } => format!("gap {micros}us"),
            Load::Burst { pps } => format!("burst {}k", pps / 1000),
            Load::Unlimited => "unlimited".to_owned(),
        }
    }

    /// Frames to send for about `secs` seconds.
    pub fn packets(self, secs: u64) -> u64 {
        secs * match self {
            // A gap of N us gives well under 1e6/N pps (a system call per frame).
            Load::Gap { micros } => 1_000_000 / micros / 2,
            Load::Burst { pps } => pps,
            Load::Unlimited => 400_000,
        }
    }
}

/// What one trafgen run sent.
pub struct Sent {
    /// Frames the interface transmitted (its counter, not trafgen's word).
    pub packets: u64,
    pub elapsed_secs: f64,
    /// trafgen's last error line, when it failed.
    pub error: Option<String>,
}

impl Sent {
    pub fn pps(&self) -> f64 {
        self.packets as f64 / self.elapsed_secs
    }
}

/// Runs trafgen in `ns` on `dev` with the packet configuration in `config` for about
/// `secs` seconds of `load`; bounded by a 30 s timeout.
pub fn trafgen(ns: &NetNs, dev: &str, config: &Path, load: Load, secs: u64) -> Sent {
    trafgen_on_cpus(ns, dev, config, load, secs, 1)
}

/// [`trafgen`] with `processes` trafgen processes, one per CPU (`-P`): with 2, both CPUs
/// send, and on veth each CPU also runs the receiving side's XDP for what it sent. `load`
/// is the total, split between them.
pub fn trafgen_on_cpus(
    ns: &NetNs,
    dev: &str,
    config: &Path,
    load: Load,
    secs: u64,
    processes: u32,
) -> Sent {
    let processes = processes.to_string();
    let mut args: Vec<String> = ["--dev", dev, "--no-sock-mem", "-P", &processes, "-n"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(load.packets(secs).to_string());
    match load {
        Load::Gap { micros } => args.extend(["-t".to_owned(), format!("{micros}us")]),
        Load::Burst { pps } => args.extend(["-b".to_owned(), format!("{pps}pps")]),
        Load::Unlimited => {}
    }
    let before = tx_packets(ns, dev);
    let started = Instant::now();
    let output = Command::new("timeout")
        .args([
            "-s", "INT", "30", "ip", "netns", "exec", &ns.name, "trafgen", "--conf",
        ])
        .arg(config)
        .args(&args)
        .output()
        .expect("run trafgen");
    let elapsed_secs = started.elapsed().as_secs_f64();
    let packets = tx_packets(ns, dev) - before;
    let error = (!output.status.success()).then(|| {
        let text = String::from_utf8_lossy(&output.stderr);
        format!(
            "{} after {packets} packets",
            text.lines().last().unwrap_or("").trim()
        )
    });
    Sent {
        packets,
        elapsed_secs,
        error,
    }
}

/// Frames `dev` in `ns` has transmitted.
pub fn tx_packets(ns: &NetNs, dev: &str) -> u64 {
    let output = ns.exec(&[
        "cat",
        &format!("/sys/class/net/{dev}/statistics/tx_packets"),
    ]);
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// A trafgen configuration line for one Ethernet + IPv4 + UDP frame from `ns`'s `dev` to
/// `peer_ns`'s `peer_dev` (MACs read from both), followed by `payload` in trafgen syntax.
pub fn udp_frame(
    ns: &NetNs,
    dev: &str,
    peer_ns: &NetNs,
    peer_dev: &str,
    (src, dst): (std::net::SocketAddrV4, std::net::SocketAddrV4),
    payload: &str,
) -> String {
    udp_frames(
        ns,
        dev,
        peer_ns,
        peer_dev,
        (*src.ip(), src.port()..=src.port()),
        (*dst.ip(), dst.port()..=dst.port()),
        payload,
    )
}

/// [`udp_frame`] with source and destination ports that trafgen steps through: each frame
/// takes the next port of both ranges (`dinc`), so ranges of coprime lengths a and b give
/// a x b distinct 4-tuples before any repeats.
pub fn udp_frames(
    ns: &NetNs,
    dev: &str,
    peer_ns: &NetNs,
    peer_dev: &str,
    (src, src_ports): (std::net::Ipv4Addr, std::ops::RangeInclusive<u16>),
    (dst, dst_ports): (std::net::Ipv4Addr, std::ops::RangeInclusive<u16>),
    payload: &str,
) -> String {
    let mac = |ns: &NetNs, dev: &str| {
        let output = ns.exec(&["cat", &format!("/sys/class/net/{dev}/address")]);
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    let ports = |range: std::ops::RangeInclusive<u16>| {
        if range.start() == range.end() {
            range.start().to_string()
        } else {
            format!("dinc({}, {}, 1)", range.start(), range.end())
        }
    };
    format!(
        "{{ eth(da={}, sa={}), ipv4(saddr={src}, daddr={dst}, ttl=64), udp(sp={}, dp={}), {payload} }}\n",
        mac(peer_ns, peer_dev),
        mac(ns, dev),
        ports(src_ports),
        ports(dst_ports),
    )
}

/// What [`paced_udp`] sent.
pub struct Paced {
    pub packets: u64,
    pub elapsed_secs: f64,
}

/// Sends `payload` in UDP from `ns` on each of `flows` (source, destination) in turn at
/// `pps` in all, for `duration`: a raw socket, so that the source ports can be those of
/// other sockets (the calls' ICE agents: their NAT mappings and the relay's flows match
/// them). Paced every millisecond (what is due is sent), smooth where trafgen's rate limit
/// sends bursts; checksums computed here. The source address must be the one the
/// namespace's route picks.
pub fn paced_udp(
    ns: &NetNs,
    flows: &[(std::net::SocketAddrV4, std::net::SocketAddrV4)],
    payload: &[u8],
    pps: u64,
    duration: std::time::Duration,
) -> Paced {
    let payload = payload.to_vec();
    paced_udp_each(ns, flows, move |_| payload.clone(), pps, duration)
}

/// [`paced_udp`] with each packet's payload made by `payload(flow index)` when it is due
/// (numbered or encrypted per flow).
pub fn paced_udp_each(
    ns: &NetNs,
    flows: &[(std::net::SocketAddrV4, std::net::SocketAddrV4)],
    mut payload: impl FnMut(usize) -> Vec<u8> + Send + 'static,
    pps: u64,
    duration: std::time::Duration,
) -> Paced {
    let flows = flows.to_vec();
    ns.enter(move || {
        // SAFETY: plain socket calls on a descriptor this function owns and closes.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let started = Instant::now();
        let mut sent = 0u64;
        let mut next = 0usize;
        while started.elapsed() < duration && !flows.is_empty() {
            let due = (started.elapsed().as_secs_f64() * pps as f64) as u64;
            while sent < due {
                let index = next % flows.len();
                let (src, dst) = flows[index];
                next += 1;
                let frame =
                    crate::packet::Frame::udp(src.into(), dst.into(), &payload(index)).bytes();
                // The UDP header and payload: the kernel writes the IP header of a raw socket.
                let datagram = &frame[crate::packet::ETH_HEADER + 20..];
                let address = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*dst.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: the buffer and address outlive the call; lengths are theirs.
                let n = unsafe {
                    libc::sendto(
                        fd,
                        datagram.as_ptr().cast(),
                        datagram.len(),
                        0,
                        (&address as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                if n < 0 {
                    break;
                }
                sent += 1;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let elapsed_secs = started.elapsed().as_secs_f64();
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        Paced {
            packets: sent,
            elapsed_secs,
        }
    })
}
