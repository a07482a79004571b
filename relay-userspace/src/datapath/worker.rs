//! Transcryption workers: threads that take the packets the XDP program steers to their
//! AF_XDP sockets (flows with `to_worker`), have each one's UDP payload rewritten by the
//! flow's [`Transcrypt`], put fresh Ethernet, IP and UDP headers before it and transmit it
//! from the UMEM, without a system call per packet or the socket layer.
//!
//! One worker per receive queue number (up to the number of CPUs), pinned to its CPU; it
//! owns the sockets of that queue on every attached interface. A flow's handler is given to
//! every worker: RSS keeps a 5-tuple on one queue, and when a flow moves to another queue
//! (a rehash, a changed indirection table) the worker of that queue has it already.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
};

use relay_common::WorkerMeta;

use super::xsk::XskSocket;

/// Packets a worker reads from one socket before it moves to the next.
const BATCH: u32 = 64;
/// Where a packet copied into another socket's frame starts: the headroom the kernel would
/// leave.
const COPY_OFFSET: usize = 256;
const ETH_HEADER: usize = 14;
const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const UDP_HEADER: usize = 8;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
/// TTL / hop limit of what a worker sends: the relay originates the packet, as its sockets
/// would.
const TTL: u8 = 64;

/// A transcrypted flow's per-packet work, given by whoever installs the flow.
pub trait Transcrypt: Send + Sync {
    /// Rewrites the UDP payload in `buf[..len]` in place (`buf` has room to grow) and says
    /// what goes out; None drops the packet (the implementation counts why).
    fn transcrypt(&self, buf: &mut [u8], len: usize) -> Option<Egress>;
}

/// What a [`Transcrypt`] made of a packet: the new payload's length and its addresses.
/// `to` must be reachable through the flow's next hop (the flow's `new_dst` address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Egress {
    pub len: usize,
    pub from: SocketAddr,
    pub to: SocketAddr,
}

enum Control {
    Install(u32, Arc<dyn Transcrypt>),
    Remove(u32),
    Stop,
}

/// What the workers counted, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerCounters {
    /// Packets read from the sockets.
    pub received: u64,
    /// Packets handed to a socket for transmission.
    pub sent: u64,
    pub sent_bytes: u64,
    /// Packets of a flow no worker knows (removed a moment ago).
    pub unknown_flow: u64,
    /// Packets the flow's handler refused (authentication, replay, no keys: it counts why).
    pub refused: u64,
    /// Packets too short or not Ethernet/IP/UDP as the program promised.
    pub malformed: u64,
    /// Packets for an interface with no worker socket, or with no frame or ring room there.
    pub not_sent: u64,
    /// Packets the kernel dropped before a worker saw them (no fill ring frame, RX ring
    /// full), from the sockets' statistics.
    pub kernel_dropped: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    sent: AtomicU64,
    sent_bytes: AtomicU64,
    unknown_flow: AtomicU64,
    refused: AtomicU64,
    malformed: AtomicU64,
    not_sent: AtomicU64,
    kernel_dropped: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn read(&self) -> WorkerCounters {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        WorkerCounters {
            received: get(&self.received),
            sent: get(&self.sent),
            sent_bytes: get(&self.sent_bytes),
            unknown_flow: get(&self.unknown_flow),
            refused: get(&self.refused),
            malformed: get(&self.malformed),
            not_sent: get(&self.not_sent),
            kernel_dropped: get(&self.kernel_dropped),
        }
    }
}

/// One socket a worker owns, for `relayctl status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSocket {
    pub interface: String,
    pub queue: u32,
    pub zero_copy: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkersStatus {
    pub threads: usize,
    pub sockets: Vec<WorkerSocket>,
    pub counters: WorkerCounters,
}

struct Worker {
    control: mpsc::Sender<Control>,
    /// An eventfd the worker polls beside its sockets: written after each control message.
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

/// The running workers.
pub struct Workers {
    workers: Vec<Worker>,
    sockets: Vec<WorkerSocket>,
    counters: Arc<Counters>,
}

/// An opened socket and where the XDP program finds it: (XSKMAP index, descriptor).
pub type Registration = (u32, std::os::fd::RawFd);

impl Workers {
    /// Opens a socket on every receive queue of every interface (`name`, ifindex, first
    /// XSKMAP index) and starts one worker per queue number, at most one per CPU.
    /// `register` puts each socket into the XSKMAP; the returned workers must outlive
    /// those entries (closing a socket removes it from the map).
    pub fn start(
        interfaces: &[(String, u32, u32)],
        mut register: impl FnMut(Registration) -> io::Result<()>,
    ) -> io::Result<Workers> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut per_worker: Vec<Vec<XskSocket>> = Vec::new();
        let mut sockets = Vec::new();
        for (name, ifindex, first) in interfaces {
            let queues = receive_queues(name).min(relay_common::XSK_QUEUES_PER_INTERFACE);
            for queue in 0..queues {
                let socket = XskSocket::open(*ifindex, queue).map_err(|err| {
                    io::Error::new(
                        err.kind(),
                        format!("opening an AF_XDP socket on {name} queue {queue}: {err}"),
                    )
                })?;
                register((first + queue, socket.raw_fd()))?;
                sockets.push(WorkerSocket {
                    interface: name.clone(),
                    queue,
                    zero_copy: socket.zero_copy,
                });
                let worker = queue as usize % cpus;
                if per_worker.len() <= worker {
                    per_worker.resize_with(worker + 1, Vec::new);
                }
                per_worker[worker].push(socket);
            }
        }
        let counters = Arc::new(Counters::default());
        let mut workers = Vec::new();
        for (cpu, owned) in per_worker.into_iter().enumerate() {
            // SAFETY: plain eventfd creation; the descriptor is owned at once.
            let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a descriptor just opened and owned by nothing else.
            let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
            let (control, inbox) = mpsc::channel();
            let state = WorkerState {
                sockets: owned,
                flows: HashMap::new(),
                stopping: false,
                inbox,
                wake: wake.clone(),
                counters: counters.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("relay-worker-{cpu}"))
                .spawn(move || {
                    pin_to_cpu(cpu);
                    state.run();
                })?;
            workers.push(Worker {
                control,
                wake,
                thread: Some(thread),
            });
        }
        Ok(Workers {
            workers,
            sockets,
            counters,
        })
    }

    /// Gives every worker the flow's handler (before the flow is steered to them).
    pub fn install(&self, flow_id: u32, handler: Arc<dyn Transcrypt>) {
        for worker in &self.workers {
            worker.tell(Control::Install(flow_id, handler.clone()));
        }
    }

    /// Takes the flow's handler back (after the flow left the kernel table).
    pub fn remove(&self, flow_id: u32) {
        for worker in &self.workers {
            worker.tell(Control::Remove(flow_id));
        }
    }

    pub fn status(&self) -> WorkersStatus {
        WorkersStatus {
            threads: self.workers.len(),
            sockets: self.sockets.clone(),
            counters: self.counters.read(),
        }
    }
}

impl Worker {
    fn tell(&self, message: Control) {
        if self.control.send(message).is_ok() {
            let one: u64 = 1;
            // SAFETY: an 8-byte write of a u64 to our eventfd.
            unsafe {
                libc::write(
                    self.wake.as_raw_fd(),
                    (&raw const one).cast(),
                    size_of::<u64>(),
                )
            };
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for worker in &self.workers {
            worker.tell(Control::Stop);
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// The receive queues `name` has (1 when sysfs does not say).
fn receive_queues(name: &str) -> u32 {
    std::fs::read_dir(format!("/sys/class/net/{name}/queues"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|entry| entry.file_name().to_string_lossy().starts_with("rx-"))
                .count() as u32
        })
        .unwrap_or(1)
        .max(1)
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET stays within it for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::debug!(cpu, "worker: cannot pin to its CPU; runs unpinned");
        }
    }
}

struct WorkerState {
    sockets: Vec<XskSocket>,
    flows: HashMap<u32, Arc<dyn Transcrypt>>,
    /// Told to stop.
    stopping: bool,
    inbox: mpsc::Receiver<Control>,
    wake: Arc<OwnedFd>,
    counters: Arc<Counters>,
}

impl WorkerState {
    fn run(mut self) {
        let mut dropped_before = 0;
        loop {
            self.take_messages();
            if self.stopping {
                return;
            }
            let mut busy = false;
            for index in 0..self.sockets.len() {
                busy |= self.serve(index);
            }
            for socket in &mut self.sockets {
                match socket.flush() {
                    // Packets left in the TX ring: no sleeping until they are out.
                    Ok(left) => busy |= left,
                    Err(err) => {
                        tracing::warn!(ifindex = socket.ifindex, queue = socket.queue, %err, "worker: transmitting failed");
                    }
                }
                socket.reap();
                socket.refill();
            }
            if !busy {
                let dropped: u64 = self
                    .sockets
                    .iter()
                    .map(|socket| {
                        let counters = socket.counters();
                        counters.rx_dropped + counters.rx_ring_full + counters.rx_fill_ring_empty
                    })
                    .sum();
                Counters::add(&self.counters.kernel_dropped, dropped - dropped_before);
                dropped_before = dropped;
                self.sleep();
            }
        }
    }

    /// Applies the control messages (a stop sets `stopping`).
    fn take_messages(&mut self) {
        while let Ok(message) = self.inbox.try_recv() {
            match message {
                Control::Install(id, handler) => {
                    self.flows.insert(id, handler);
                }
                Control::Remove(id) => {
                    self.flows.remove(&id);
                }
                Control::Stop => self.stopping = true,
            }
        }
    }

    /// Waits for packets or a control message.
    fn sleep(&self) {
        let mut fds: Vec<libc::pollfd> = self
            .sockets
            .iter()
            .map(|socket| libc::pollfd {
                fd: socket.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        fds.push(libc::pollfd {
            fd: self.wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: fds is a valid array of pollfd of the length passed.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        let mut drained: u64 = 0;
        // SAFETY: an 8-byte read from our non-blocking eventfd into a u64.
        unsafe {
            libc::read(
                self.wake.as_raw_fd(),
                (&raw mut drained).cast(),
                size_of::<u64>(),
            )
        };
    }

    /// Handles a batch from socket `index`; whether there was any.
    fn serve(&mut self, index: usize) -> bool {
        let ready = self.sockets[index].received(BATCH);
        if ready > 0 {
            // A flow's handler is sent before its first packet can be steered: taken now,
            // with the packets seen, it is here for each of them.
            self.take_messages();
        }
        for _ in 0..ready {
            let (address, len) = self.sockets[index].next_received();
            self.handle(index, address, len);
        }
        if ready > 0 {
            self.sockets[index].release_received();
            Counters::add(&self.counters.received, u64::from(ready));
        }
        ready > 0
    }

    fn handle(&mut self, index: usize, address: u64, len: usize) {
        let (frame, offset) = self.sockets[index].frame_mut(address);
        let Some((meta, payload, payload_len)) = parse(frame, offset, len) else {
            Counters::add(&self.counters.malformed, 1);
            self.sockets[index].recycle(address);
            return;
        };
        let Some(handler) = self.flows.get(&meta.flow_id) else {
            Counters::add(&self.counters.unknown_flow, 1);
            self.sockets[index].recycle(address);
            return;
        };
        let Some(egress) = handler.transcrypt(&mut frame[payload..], payload_len) else {
            Counters::add(&self.counters.refused, 1);
            self.sockets[index].recycle(address);
            return;
        };
        let Some(start) = write_headers(frame, payload, &meta, &egress) else {
            Counters::add(&self.counters.malformed, 1);
            self.sockets[index].recycle(address);
            return;
        };
        let out_len = payload + egress.len - start;
        let frame_start = address - offset as u64;
        let sent = if meta.ifindex == self.sockets[index].ifindex {
            self.sockets[index].send(frame_start + start as u64, out_len)
        } else {
            self.copy_out(index, address, start..start + out_len, meta.ifindex)
        };
        if sent {
            Counters::add(&self.counters.sent, 1);
            Counters::add(&self.counters.sent_bytes, out_len as u64);
        } else {
            Counters::add(&self.counters.not_sent, 1);
        }
    }

    /// Sends `range` of the frame at `address` (of socket `from`) on a socket of `ifindex`,
    /// copied into one of its frames; the original frame goes back to `from`.
    fn copy_out(
        &mut self,
        from: usize,
        address: u64,
        range: std::ops::Range<usize>,
        ifindex: u32,
    ) -> bool {
        let Some(to) = self.sockets.iter().position(|s| s.ifindex == ifindex) else {
            self.sockets[from].recycle(address);
            return false;
        };
        let Some(target) = self.sockets[to].take_frame() else {
            self.sockets[from].recycle(address);
            return false;
        };
        let len = range.len();
        // Distinct: the egress is another interface than the one `from` serves.
        let Ok([source, target_socket]) = self.sockets.get_disjoint_mut([from, to]) else {
            self.sockets[from].recycle(address);
            return false;
        };
        let (frame, _) = source.frame_mut(address);
        let (out, _) = target_socket.frame_mut(target);
        out[COPY_OFFSET..COPY_OFFSET + len].copy_from_slice(&frame[range]);
        source.recycle(address);
        target_socket.send(target + COPY_OFFSET as u64, len)
    }
}

/// What a worker does with a frame around its flow's handler, for the fuzz target: parse
/// what the kernel handed over (metadata before `offset`, the packet in
/// `frame[offset..offset + len]`), then write headers for `egress` before the payload.
/// Where the headers start, or None where a worker would drop the packet.
#[cfg(fuzzing)]
pub fn rewrite_frame(frame: &mut [u8], offset: usize, len: usize, egress: Egress) -> Option<usize> {
    let (meta, payload, _) = parse(frame, offset, len)?;
    write_headers(frame, payload, &meta, &egress)
}

/// The metadata before the packet at `frame[offset..offset + len]`, and where its UDP
/// payload starts in the frame and how long it is. None when the packet is not what the
/// program steers (untagged Ethernet, IPv4 without options or IPv6 without extension
/// headers, UDP) or lengths do not fit.
fn parse(frame: &[u8], offset: usize, len: usize) -> Option<(WorkerMeta, usize, usize)> {
    let meta_len = size_of::<WorkerMeta>();
    let meta_bytes = frame.get(offset.checked_sub(meta_len)?..offset)?;
    let word = |at: usize| u32::from_ne_bytes(meta_bytes[at..at + 4].try_into().unwrap());
    let mac = |at: usize| -> [u8; 6] { meta_bytes[at..at + 6].try_into().unwrap() };
    let meta = WorkerMeta {
        flow_id: word(0),
        ifindex: word(4),
        smac: mac(8),
        dmac: mac(14),
    };
    let packet = frame.get(offset..offset + len)?;
    let ethertype = u16::from_be_bytes([*packet.get(12)?, *packet.get(13)?]);
    let (ip_header, protocol) = match ethertype {
        ETHERTYPE_IPV4 if *packet.get(ETH_HEADER)? == 0x45 => {
            (IPV4_HEADER, *packet.get(ETH_HEADER + 9)?)
        }
        ETHERTYPE_IPV6 if *packet.get(ETH_HEADER)? >> 4 == 6 => {
            (IPV6_HEADER, *packet.get(ETH_HEADER + 6)?)
        }
        _ => return None,
    };
    if protocol != IPPROTO_UDP {
        return None;
    }
    let udp = ETH_HEADER + ip_header;
    let udp_len = usize::from(u16::from_be_bytes([
        *packet.get(udp + 4)?,
        *packet.get(udp + 5)?,
    ]));
    if udp_len < UDP_HEADER || udp + udp_len > len {
        return None;
    }
    Some((meta, offset + udp + UDP_HEADER, udp_len - UDP_HEADER))
}

/// Writes Ethernet, IP and UDP headers for `egress` right before the payload at
/// `frame[payload..]`; where they start. None when the addresses' families differ.
fn write_headers(
    frame: &mut [u8],
    payload: usize,
    meta: &WorkerMeta,
    egress: &Egress,
) -> Option<usize> {
    let (from, to) = (egress.from, egress.to);
    let ip_header = match (from, to) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => IPV4_HEADER,
        (SocketAddr::V6(_), SocketAddr::V6(_)) => IPV6_HEADER,
        _ => return None,
    };
    let start = payload.checked_sub(ETH_HEADER + ip_header + UDP_HEADER)?;
    let udp_len = UDP_HEADER + egress.len;
    let (headers, rest) = frame[start..].split_at_mut(payload - start);
    let body = rest.get(..egress.len)?;
    let (eth, rest) = headers.split_at_mut(ETH_HEADER);
    let (ip, udp) = rest.split_at_mut(ip_header);
    eth[0..6].copy_from_slice(&meta.dmac);
    eth[6..12].copy_from_slice(&meta.smac);
    let mut pseudo = 0u32;
    match (from, to) {
        (SocketAddr::V4(from), SocketAddr::V4(to)) => {
            eth[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            ip[0] = 0x45;
            ip[1] = 0;
            ip[2..4].copy_from_slice(&((IPV4_HEADER + udp_len) as u16).to_be_bytes());
            // Identification 0 with Don't Fragment (RFC 6864).
            ip[4..6].fill(0);
            ip[6] = 0x40;
            ip[7] = 0;
            ip[8] = TTL;
            ip[9] = IPPROTO_UDP;
            ip[10..12].fill(0);
            ip[12..16].copy_from_slice(&from.ip().octets());
            ip[16..20].copy_from_slice(&to.ip().octets());
            let checksum = !fold(sum(ip, 0));
            ip[10..12].copy_from_slice(&checksum.to_be_bytes());
            pseudo = sum(&ip[12..20], pseudo);
        }
        (SocketAddr::V6(from), SocketAddr::V6(to)) => {
            eth[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            ip[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
            ip[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
            ip[6] = IPPROTO_UDP;
            ip[7] = TTL;
            ip[8..24].copy_from_slice(&from.ip().octets());
            ip[24..40].copy_from_slice(&to.ip().octets());
            pseudo = sum(&ip[8..40], pseudo);
        }
        _ => return None,
    }
    udp[0..2].copy_from_slice(&from.port().to_be_bytes());
    udp[2..4].copy_from_slice(&to.port().to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    udp[6..8].fill(0);
    // RFC 768: the pseudo-header (addresses, protocol, UDP length), the header, the data.
    pseudo += u32::from(IPPROTO_UDP) + udp_len as u32;
    let checksum = match !fold(sum(body, sum(udp, pseudo))) {
        0 => 0xffff,
        checksum => checksum,
    };
    udp[6..8].copy_from_slice(&checksum.to_be_bytes());
    Some(start)
}

/// The one's complement sum of `data` as big-endian 16-bit words (an odd last byte padded
/// with zero) added to `initial`, not yet folded.
fn sum(data: &[u8], initial: u32) -> u32 {
    let mut total = u64::from(initial);
    let mut words = data.chunks_exact(2);
    for word in &mut words {
        total += u64::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        total += u64::from(*last) << 8;
    }
    // Fold the carries out of the upper half so the result fits a u32 again.
    while total > 0xffff_ffff {
        total = (total & 0xffff_ffff) + (total >> 32);
    }
    total as u32
}

fn fold(mut total: u32) -> u16 {
    while total > 0xffff {
        total = (total & 0xffff) + (total >> 16);
    }
    total as u16
}

#[cfg(test)]
mod tests {
    use super::{super::xsk::FRAME_SIZE, *};

    /// A frame as the kernel hands it: metadata, then Ethernet/IPv4/UDP with `payload`.
    fn received(payload: &[u8]) -> (Vec<u8>, usize, usize) {
        let mut frame = vec![0u8; FRAME_SIZE as usize];
        let offset = 256;
        let meta = [7u32.to_ne_bytes(), 3u32.to_ne_bytes()].concat();
        frame[offset - 20..offset - 12].copy_from_slice(&meta);
        frame[offset - 12..offset - 6].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        frame[offset - 6..offset].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        let egress = Egress {
            len: payload.len(),
            from: "192.0.2.1:5000".parse().unwrap(),
            to: "192.0.2.9:6000".parse().unwrap(),
        };
        let payload_at = offset + ETH_HEADER + IPV4_HEADER + UDP_HEADER;
        frame[payload_at..payload_at + payload.len()].copy_from_slice(payload);
        let start = write_headers(&mut frame, payload_at, &WorkerMeta::default(), &egress)
            .expect("headers");
        assert_eq!(start, offset);
        let len = ETH_HEADER + IPV4_HEADER + UDP_HEADER + payload.len();
        (frame, offset, len)
    }

    #[test]
    fn parses_what_it_writes() {
        let (frame, offset, len) = received(&[0x80; 172]);
        let (meta, payload, payload_len) = parse(&frame, offset, len).expect("parsed");
        assert_eq!(meta.flow_id, 7);
        assert_eq!(meta.ifindex, 3);
        assert_eq!(meta.smac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(meta.dmac, [2, 0, 0, 0, 0, 2]);
        assert_eq!(payload, offset + 42);
        assert_eq!(payload_len, 172);
    }

    #[test]
    fn checksums_verify() {
        let (frame, offset, len) = received(&[0x80, 1, 2, 3, 4]);
        let ip = &frame[offset + ETH_HEADER..offset + ETH_HEADER + IPV4_HEADER];
        assert_eq!(fold(sum(ip, 0)), 0xffff, "IPv4 header checksum");
        let udp = &frame[offset + ETH_HEADER + IPV4_HEADER..offset + len];
        let pseudo = sum(&ip[12..20], 0) + 17 + udp.len() as u32;
        assert_eq!(fold(sum(udp, pseudo)), 0xffff, "UDP checksum");
    }

    #[test]
    fn refuses_what_it_cannot_parse() {
        let (frame, offset, len) = received(&[0x80; 20]);
        // Shorter than the UDP length says.
        assert!(parse(&frame, offset, len - 1).is_none());
        // No room for the metadata.
        assert!(parse(&frame, 10, len).is_none());
        let mut not_udp = frame.clone();
        not_udp[offset + ETH_HEADER + 9] = 6;
        assert!(parse(&not_udp, offset, len).is_none());
        let mut options = frame.clone();
        options[offset + ETH_HEADER] = 0x46;
        assert!(parse(&options, offset, len).is_none());
        for cut in 0..len {
            let _ = parse(&frame[..offset + cut], offset, len);
        }
    }

    #[test]
    fn mixed_families_are_refused() {
        let mut frame = vec![0u8; 512];
        let egress = Egress {
            len: 4,
            from: "192.0.2.1:5000".parse().unwrap(),
            to: "[2001:db8::1]:6000".parse().unwrap(),
        };
        assert!(write_headers(&mut frame, 300, &WorkerMeta::default(), &egress).is_none());
    }
}
