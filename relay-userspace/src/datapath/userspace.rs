//! The userspace datapath: one tokio task per bound relay address receives, looks the sender
//! up, and re-sends from the flow's `new_src` socket. Same contract as the XDP program (strict
//! source, same rewrite), for hosts where XDP cannot attach. The XDP datapath also uses it as
//! its slow path for the packets the program passes up (e.g. the first packet of a flow, whose
//! `sendto` makes the kernel resolve the next hop's neighbour entry).

use std::{
    collections::{HashMap, HashSet},
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{net::UdpSocket, runtime::Handle, task::JoinHandle};

use super::{
    DatapathError, FlowCounters, FlowSpec, SocketStats,
    flow::{ChannelOp, FlowId},
};
use crate::time::monotonic_ns;

/// Size of a TURN ChannelData header (RFC 8656 12.4).
const CHANNEL_HEADER: usize = 4;
/// Largest UDP payload we can receive.
const MAX_DATAGRAM: usize = 65_535;

pub struct SocketForwarder {
    runtime: Handle,
    shared: Arc<Shared>,
    sockets: Mutex<HashMap<SocketAddr, BoundSocket>>,
}

#[derive(Default)]
struct Shared {
    /// (src, dst) -> where to send.
    routes: RwLock<HashMap<FlowId, Arc<Route>>>,
    /// The routes that have relayed a packet: counters are read only for these. Beside XDP
    /// few do (a flow's packets go to userspace only until the kernel knows its next hop,
    /// or for RTCP kept apart), and the tick asks for every flow's counters each time.
    used: Mutex<HashSet<FlowId>>,
    forwarded_packets: AtomicU64,
    forwarded_bytes: AtomicU64,
    unknown_source_packets: AtomicU64,
    /// ChannelData whose Length runs past the packet.
    malformed_packets: AtomicU64,
    send_errors: AtomicU64,
}

struct Route {
    new_dst: SocketAddr,
    channel: Option<ChannelOp>,
    out: Arc<UdpSocket>,
    packets: AtomicU64,
    bytes: AtomicU64,
    last_seen_ns: AtomicU64,
}

struct BoundSocket {
    socket: Arc<UdpSocket>,
    /// Number of route ends (receive or send side) using this socket.
    users: usize,
    receiver: JoinHandle<()>,
}

impl SocketForwarder {
    pub fn new(runtime: Handle) -> SocketForwarder {
        SocketForwarder {
            runtime,
            shared: Arc::default(),
            sockets: Mutex::default(),
        }
    }

    /// Installs or replaces the route for `spec`, binding its relay addresses if needed.
    pub fn install(&self, spec: &FlowSpec) -> Result<(), DatapathError> {
        let mut sockets = self.sockets.lock().expect("socket table poisoned");
        self.acquire(&mut sockets, "dst", spec.dst)?;
        let out = match self.acquire(&mut sockets, "new_src", spec.new_src) {
            Ok(out) => out,
            Err(err) => {
                release(&mut sockets, spec.dst);
                return Err(err);
            }
        };
        let route = Arc::new(Route {
            new_dst: spec.new_dst,
            channel: spec.channel,
            out,
            packets: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            last_seen_ns: AtomicU64::new(0),
        });
        let previous = self
            .shared
            .routes
            .write()
            .expect("route table poisoned")
            .insert(spec.id(), route);
        if let Some(previous) = previous {
            // A replacement: the old route's sockets are released, the new ones kept.
            let old_src = previous.out.local_addr().ok();
            release(&mut sockets, spec.dst);
            if let Some(old_src) = old_src {
                release(&mut sockets, old_src);
            }
        }
        Ok(())
    }

    pub fn remove(&self, spec: &FlowSpec) {
        let mut sockets = self.sockets.lock().expect("socket table poisoned");
        let removed = self
            .shared
            .routes
            .write()
            .expect("route table poisoned")
            .remove(&spec.id());
        if removed.is_some() {
            release(&mut sockets, spec.dst);
            release(&mut sockets, spec.new_src);
        }
        self.shared
            .used
            .lock()
            .expect("used routes poisoned")
            .remove(&spec.id());
    }

    pub fn counters(&self, spec: &FlowSpec) -> FlowCounters {
        self.counters_of(std::iter::once(spec))
            .pop()
            .expect("one spec")
    }

    /// The counters of each of `specs`, in order, under one read of the route table.
    pub fn counters_of<'a>(&self, specs: impl Iterator<Item = &'a FlowSpec>) -> Vec<FlowCounters> {
        let used = self.shared.used.lock().expect("used routes poisoned");
        if used.is_empty() {
            return specs.map(|_| FlowCounters::default()).collect();
        }
        let routes = self.shared.routes.read().expect("route table poisoned");
        specs
            .map(|spec| spec.id())
            .map(
                |key| match used.contains(&key).then(|| routes.get(&key)).flatten() {
                    Some(route) => FlowCounters {
                        userspace_packets: route.packets.load(Ordering::Relaxed),
                        userspace_bytes: route.bytes.load(Ordering::Relaxed),
                        last_seen_ns: route.last_seen_ns.load(Ordering::Relaxed),
                        ..FlowCounters::default()
                    },
                    None => FlowCounters::default(),
                },
            )
            .collect()
    }

    pub fn stats(&self) -> SocketStats {
        let shared = &self.shared;
        SocketStats {
            forwarded_packets: shared.forwarded_packets.load(Ordering::Relaxed),
            forwarded_bytes: shared.forwarded_bytes.load(Ordering::Relaxed),
            unknown_source_packets: shared.unknown_source_packets.load(Ordering::Relaxed),
            malformed_packets: shared.malformed_packets.load(Ordering::Relaxed),
            send_errors: shared.send_errors.load(Ordering::Relaxed),
            bound_sockets: self.sockets.lock().expect("socket table poisoned").len() as u64,
        }
    }

    fn acquire(
        &self,
        sockets: &mut HashMap<SocketAddr, BoundSocket>,
        field: &'static str,
        addr: SocketAddr,
    ) -> Result<Arc<UdpSocket>, DatapathError> {
        if let Some(bound) = sockets.get_mut(&addr) {
            bound.users += 1;
            return Ok(bound.socket.clone());
        }
        let socket = bind(addr).map_err(|source| DatapathError::Bind {
            field,
            addr,
            source,
        })?;
        let socket = Arc::new(socket);
        let receiver = self
            .runtime
            .spawn(receive(self.shared.clone(), socket.clone(), addr));
        sockets.insert(
            addr,
            BoundSocket {
                socket: socket.clone(),
                users: 1,
                receiver,
            },
        );
        Ok(socket)
    }
}

impl Drop for SocketForwarder {
    fn drop(&mut self) {
        for bound in self
            .sockets
            .get_mut()
            .expect("socket table poisoned")
            .values()
        {
            bound.receiver.abort();
        }
    }
}

fn release(sockets: &mut HashMap<SocketAddr, BoundSocket>, addr: SocketAddr) {
    if let Some(bound) = sockets.get_mut(&addr) {
        bound.users -= 1;
        if bound.users == 0 {
            bound.receiver.abort();
            sockets.remove(&addr);
        }
    }
}

/// Socket buffer size: a relay port absorbs bursts from many senders while its task is
/// scheduled out; the kernel default (~208 KiB) overflows at a few hundred packets.
const SOCKET_BUFFER_BYTES: libc::c_int = 4 * 1024 * 1024;

fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    enlarge_socket_buffers(&socket);
    UdpSocket::from_std(socket)
}

/// Sends one datagram now. tokio's `try_send_to` answers WouldBlock until its reactor has
/// seen the socket writable once, which loses the first datagram sent on a fresh socket (a
/// relay socket opened for a new allocation, say); a UDP send never waits, so this asks the
/// kernel directly. WouldBlock from here means the send buffer is really full.
pub fn send_now(socket: &UdpSocket, data: &[u8], to: SocketAddr) -> io::Result<usize> {
    socket2::SockRef::from(socket).send_to(data, &to.into())
}

/// Sets the receive and send buffers to [`SOCKET_BUFFER_BYTES`], beyond
/// net.core.[rw]mem_max when the process has CAP_NET_ADMIN, else as far as the sysctl allows.
pub fn enlarge_socket_buffers(socket: &std::net::UdpSocket) {
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if set_socket_option(socket, libc::SOL_SOCKET, force, SOCKET_BUFFER_BYTES).is_err() {
            let _ = set_socket_option(socket, libc::SOL_SOCKET, plain, SOCKET_BUFFER_BYTES);
        }
    }
}

/// setsockopt with an int value.
pub fn set_socket_option(
    socket: &std::net::UdpSocket,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt reads a c_int we own, on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Packets handled per wake-up before yielding to other tasks.
const BATCH: usize = 256;

/// Waits until the socket is readable, then drains it without going back to the reactor:
/// one `recvfrom` and one `sendto` per packet while packets keep coming.
async fn receive(shared: Arc<Shared>, socket: Arc<UdpSocket>, local: SocketAddr) {
    // Packets are received behind room for a ChannelData header, so adding one copies
    // nothing.
    let mut buf = vec![0u8; CHANNEL_HEADER + MAX_DATAGRAM];
    loop {
        if let Err(err) = socket.readable().await {
            tracing::error!(%local, %err, "userspace datapath: socket failed; closed");
            return;
        }
        for _ in 0..BATCH {
            match socket.try_recv_from(&mut buf[CHANNEL_HEADER..]) {
                Ok((len, from)) => {
                    relay_one(&shared, local, from, &mut buf[..CHANNEL_HEADER + len])
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                // ICMP port unreachable from an earlier send surfaces here as ECONNREFUSED; it
                // concerns that send, not this socket, so keep receiving.
                Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(err) => {
                    tracing::error!(%local, %err, "userspace datapath: receive failed; socket closed");
                    return;
                }
            }
        }
        tokio::task::yield_now().await;
    }
}

/// Relays one packet, which starts at `buf[CHANNEL_HEADER..]`.
fn relay_one(shared: &Shared, local: SocketAddr, from: SocketAddr, buf: &mut [u8]) {
    let packet = &buf[CHANNEL_HEADER..];
    // ChannelData (first byte 64..=79, RFC 7983) is looked up with its channel number.
    let channel = match packet {
        [first @ 0x40..=0x7f, second, _, _, ..] => u16::from_be_bytes([*first, *second]),
        _ => 0,
    };
    // A payload that merely looks like ChannelData (a peer's data to a relay address) is
    // looked up as plain data too, as the XDP program does.
    let route = {
        let routes = shared.routes.read().expect("route table poisoned");
        routes
            .get_key_value(&(from, local, channel))
            .or_else(|| routes.get_key_value(&(from, local, 0)))
            .map(|(key, route)| (*key, route.clone()))
    };
    let Some((key, route)) = route else {
        // Strict source: only the registered sender is relayed.
        shared
            .unknown_source_packets
            .fetch_add(1, Ordering::Relaxed);
        return;
    };
    // Bytes at the IP layer as received, as the XDP counters count them.
    let ip_len = (packet.len() + ip_udp_overhead(from)) as u64;
    let out: &[u8] = match route.channel {
        None => &buf[CHANNEL_HEADER..],
        // The Length field says where the data ends; padding after it is dropped.
        Some(ChannelOp::Strip(_)) => {
            let length = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            match packet.get(CHANNEL_HEADER..CHANNEL_HEADER + length) {
                Some(data) => data,
                None => {
                    shared.malformed_packets.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        Some(ChannelOp::Add(number)) => {
            let length = packet.len() as u16;
            buf[..2].copy_from_slice(&number.to_be_bytes());
            buf[2..4].copy_from_slice(&length.to_be_bytes());
            buf
        }
    };
    // A UDP send does not wait: with an 4 MiB send buffer, WouldBlock means the egress is
    // saturated and the packet is dropped, as the kernel would drop it.
    match send_now(&route.out, out, route.new_dst) {
        Ok(_) => {
            if route.packets.fetch_add(1, Ordering::Relaxed) == 0 {
                shared
                    .used
                    .lock()
                    .expect("used routes poisoned")
                    .insert(key);
            }
            route.bytes.fetch_add(ip_len, Ordering::Relaxed);
            route.last_seen_ns.store(monotonic_ns(), Ordering::Relaxed);
            shared.forwarded_packets.fetch_add(1, Ordering::Relaxed);
            shared.forwarded_bytes.fetch_add(ip_len, Ordering::Relaxed);
        }
        Err(err) => {
            if shared.send_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(%local, to = %route.new_dst, %err, "userspace datapath: send failed (logged once; counted in stats)");
            }
        }
    }
}

fn ip_udp_overhead(addr: SocketAddr) -> usize {
    match addr {
        SocketAddr::V4(_) => 20 + 8,
        SocketAddr::V6(_) => 40 + 8,
    }
}
