//! One anchored stream of an ng call: a port pair on each side's interface, the two sides'
//! addresses, the flows that forward between them in the kernel, and the userspace
//! forwarders for what the kernel passes up (a stream's first packets before both sides
//! are known, DTLS, RTCP between a multiplexing side and one that is not, the userspace
//! datapath). A side's address is learned from its first packet when it differs from its
//! SDP's (NAT), unless the proxy said `asymmetric`; from then on only that source counts
//! (strict source: no RTP bleed, no injection).

use std::{
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{net::UdpSocket, task::JoinHandle};

use crate::{
    datapath::{FlowSpec, table::FlowTable},
    media::srtp::is_rtcp,
    session::streams::StreamEndpoint,
    time::monotonic_ns,
};

/// Which of a stream's two sockets on a side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Rtp,
    Rtcp,
}

/// The relay's port pair on one side.
pub struct Ports {
    pub rtp: Arc<UdpSocket>,
    pub rtcp: Arc<UdpSocket>,
    pub address: SocketAddr,
}

impl Ports {
    pub fn rtcp_address(&self) -> SocketAddr {
        SocketAddr::new(self.address.ip(), self.address.port() + 1)
    }

    fn socket(&self, kind: Kind) -> &Arc<UdpSocket> {
        match kind {
            Kind::Rtp => &self.rtp,
            Kind::Rtcp => &self.rtcp,
        }
    }
}

/// A side's endpoint as the relay forwards to and accepts from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub endpoint: StreamEndpoint,
    /// As its SDP said.
    pub advertised: StreamEndpoint,
    /// May still take its address from its first packet.
    pub learn: bool,
    /// Its address was taken from its media, not its SDP.
    pub learned: bool,
}

/// Packets and bytes received from one side, RTP and RTCP apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    pub rtp_packets: u64,
    pub rtp_bytes: u64,
    pub rtcp_packets: u64,
    pub rtcp_bytes: u64,
    /// Packets the relay refused from elsewhere on the side's ports (strict source).
    pub refused: u64,
}

#[derive(Default)]
struct Counter {
    packets: AtomicU64,
    bytes: AtomicU64,
}

impl Counter {
    fn add(&self, bytes: usize) {
        self.packets.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

struct Flows {
    /// (id, from side, kind).
    installed: Vec<(u32, usize, Kind)>,
    /// What removed flows carried, by side and kind.
    retired: [[(u64, u64); 2]; 2],
}

pub struct StreamMedia {
    pub index: usize,
    pub media: String,
    pub proto: String,
    /// Side 0: the first offer's sender (the caller); side 1: the answerer.
    pub ports: [Ports; 2],
    /// Flows go into the kernel (XDP); with the userspace datapath the forwarders carry
    /// everything.
    offload: bool,
    peers: Mutex<[Option<Peer>; 2]>,
    flows: Mutex<Flows>,
    /// Received in userspace from each side, by kind.
    counted: [[Counter; 2]; 2],
    refused: [AtomicU64; 2],
    /// CLOCK_MONOTONIC ns of the last packet in userspace, from each side.
    last_packet_ns: [AtomicU64; 2],
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Rtp => 0,
        Kind::Rtcp => 1,
    }
}

impl StreamMedia {
    pub fn new(
        index: usize,
        media: String,
        proto: String,
        ports: [Ports; 2],
        offload: bool,
    ) -> Arc<StreamMedia> {
        Arc::new(StreamMedia {
            index,
            media,
            proto,
            ports,
            offload,
            peers: Mutex::new([None, None]),
            flows: Mutex::new(Flows {
                installed: Vec::new(),
                retired: [[(0, 0); 2]; 2],
            }),
            counted: Default::default(),
            refused: Default::default(),
            last_packet_ns: Default::default(),
            tasks: Mutex::new(Vec::new()),
        })
    }

    fn peers(&self) -> MutexGuard<'_, [Option<Peer>; 2]> {
        self.peers.lock().expect("ng stream poisoned")
    }

    pub fn peer(&self, side: usize) -> Option<Peer> {
        self.peers()[side]
    }

    /// A side's endpoint from its SDP (None: it refused the stream); the flows follow.
    pub fn set_peer(&self, table: &FlowTable, side: usize, peer: Option<Peer>) {
        self.peers()[side] = peer;
        self.install(table);
    }

    /// Starts the forwarders of both sides' sockets.
    pub fn start(self: &Arc<Self>, table: Arc<FlowTable>) {
        let mut tasks = self.tasks.lock().expect("ng stream poisoned");
        for side in 0..2 {
            for kind in [Kind::Rtp, Kind::Rtcp] {
                let (stream, table) = (self.clone(), table.clone());
                tasks.push(tokio::spawn(async move {
                    stream.forward(&table, side, kind).await;
                }));
            }
        }
    }

    async fn forward(&self, table: &FlowTable, side: usize, kind: Kind) {
        let socket = self.ports[side].socket(kind).clone();
        let other = 1 - side;
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let packet = &buf[..n];
            let Some(target) = self.accept(table, side, kind, from) else {
                continue;
            };
            self.counted[side][kind_index(kind)].add(n);
            self.last_packet_ns[side].store(monotonic_ns(), Ordering::Relaxed);
            let Some(to) = target else { continue };
            // RTCP from a multiplexing side to one that is not goes to its RTCP port.
            let out_kind = match kind {
                Kind::Rtp if is_rtcp(packet) && !to.rtcp_mux => Kind::Rtcp,
                Kind::Rtcp if to.rtcp_mux => Kind::Rtp,
                kind => kind,
            };
            let destination = match out_kind {
                Kind::Rtp => to.rtp,
                Kind::Rtcp => to.rtcp,
            };
            let _ = self.ports[other]
                .socket(out_kind)
                .send_to(packet, destination)
                .await;
        }
    }

    /// Whether a packet from `from` on a side's socket is that side's (learning its address
    /// when it may), and where the other side wants it: `Some(None)` when it is not known
    /// yet.
    fn accept(
        &self,
        table: &FlowTable,
        side: usize,
        kind: Kind,
        from: SocketAddr,
    ) -> Option<Option<StreamEndpoint>> {
        let mut peers = self.peers();
        let Some(mut peer) = peers[side] else {
            self.refused[side].fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let expected = match kind {
            Kind::Rtp => peer.endpoint.rtp,
            Kind::Rtcp => peer.endpoint.rtcp,
        };
        if from != expected {
            if !peer.learn || self.kernel_saw(table, side, expected) {
                self.refused[side].fetch_add(1, Ordering::Relaxed);
                return None;
            }
            tracing::info!(
                stream = self.index,
                sdp = %expected,
                media = %from,
                "ng: a side's media comes from another address than its SDP says (NAT): the relay follows it"
            );
            match kind {
                Kind::Rtp => {
                    peer.endpoint.rtp = from;
                    if peer.endpoint.rtcp_mux {
                        peer.endpoint.rtcp = from;
                    }
                }
                Kind::Rtcp => peer.endpoint.rtcp = from,
            }
            peer.learned = true;
        }
        // Its first packet from where it is: the address holds from now on.
        peer.learn = false;
        let changed = peers[side] != Some(peer);
        peers[side] = Some(peer);
        let to = peers[1 - side].map(|peer| peer.endpoint);
        drop(peers);
        // A new address, or flows the table expired while the stream was silent longer
        // than flows.idle_timeout_secs (a call on hold): the kernel takes over again.
        if changed || (to.is_some() && self.flows_gone(table)) {
            self.install(table);
        }
        Some(to)
    }

    /// Whether flows should be in the kernel and some are not (expired idle).
    fn flows_gone(&self, table: &FlowTable) -> bool {
        if !self.offload {
            return false;
        }
        let flows = self.flows.lock().expect("ng stream poisoned");
        // Only flows once installed: a table that refused them (full) is not asked again
        // for every packet.
        flows
            .installed
            .iter()
            .any(|(id, _, _)| !table.contains(*id))
    }

    /// Whether the kernel already forwarded packets from `source` on this side.
    fn kernel_saw(&self, table: &FlowTable, side: usize, source: SocketAddr) -> bool {
        let now = monotonic_ns();
        let flows = self.flows.lock().expect("ng stream poisoned");
        flows
            .installed
            .iter()
            .filter(|(_, from, _)| *from == side)
            .filter_map(|(id, _, _)| table.get(*id, now).ok())
            .any(|flow| flow.spec.src == source && flow.counters.packets() > 0)
    }

    /// The flows between the two sides' current addresses, in place of the previous ones;
    /// none until both sides are known.
    fn install(&self, table: &FlowTable) {
        let peers = *self.peers();
        let now = monotonic_ns();
        let mut flows = self.flows.lock().expect("ng stream poisoned");
        for (id, side, kind) in std::mem::take(&mut flows.installed) {
            if let Ok(flow) = table.remove(id, now) {
                let retired = &mut flows.retired[side][kind_index(kind)];
                retired.0 += flow.counters.packets();
                retired.1 += flow.counters.bytes();
            }
        }
        let [Some(a), Some(b)] = peers else { return };
        if !self.offload {
            return;
        }
        let mut specs = Vec::new();
        for (side, from, to) in [(0, a.endpoint, b.endpoint), (1, b.endpoint, a.endpoint)] {
            let (here, there) = (&self.ports[side], &self.ports[1 - side]);
            specs.push((
                side,
                Kind::Rtp,
                FlowSpec {
                    src: from.rtp,
                    dst: here.address,
                    new_src: there.address,
                    new_dst: to.rtp,
                    channel: None,
                    rtcp_to_userspace: from.rtcp_mux && !to.rtcp_mux,
                },
            ));
            if !from.rtcp_mux {
                specs.push((
                    side,
                    Kind::Rtcp,
                    FlowSpec {
                        src: from.rtcp,
                        dst: here.rtcp_address(),
                        new_src: if to.rtcp_mux {
                            there.address
                        } else {
                            there.rtcp_address()
                        },
                        new_dst: to.rtcp,
                        channel: None,
                        rtcp_to_userspace: false,
                    },
                ));
            }
        }
        for (side, kind, spec) in specs {
            // The sockets on the relay addresses are the stream's own: the kernel-only kind.
            match table.offload(&[spec], now) {
                Ok(ids) => flows.installed.push((ids[0], side, kind)),
                Err(err) => {
                    tracing::warn!(stream = self.index, src = %spec.src, %err, "ng: a flow stays in userspace");
                }
            }
        }
    }

    /// Everything received from a side: kernel flows (removed ones included) and userspace.
    pub fn received(&self, table: &FlowTable, side: usize) -> Received {
        let now = monotonic_ns();
        let flows = self.flows.lock().expect("ng stream poisoned");
        // [kind][packets, bytes]: what removed flows and userspace carried, then the flows.
        let mut totals = [0, 1].map(|kind| {
            let (counter, retired) = (&self.counted[side][kind], flows.retired[side][kind]);
            [
                retired.0 + counter.packets.load(Ordering::Relaxed),
                retired.1 + counter.bytes.load(Ordering::Relaxed),
            ]
        });
        for (id, from, kind) in &flows.installed {
            if *from != side {
                continue;
            }
            if let Ok(flow) = table.get(*id, now) {
                let total = &mut totals[kind_index(*kind)];
                total[0] += flow.counters.packets();
                total[1] += flow.counters.bytes();
            }
        }
        Received {
            rtp_packets: totals[0][0],
            rtp_bytes: totals[0][1],
            rtcp_packets: totals[1][0],
            rtcp_bytes: totals[1][1],
            refused: self.refused[side].load(Ordering::Relaxed),
        }
    }

    /// CLOCK_MONOTONIC ns of the last packet from `side` (None: either way): the flow
    /// table's last sample of the kernel's last-seen, or userspace's; 0 when none.
    pub fn last_packet_ns(&self, table: &FlowTable, side: Option<usize>) -> u64 {
        let flows = self.flows.lock().expect("ng stream poisoned");
        let of_side = |from: usize| side.is_none_or(|side| side == from);
        flows
            .installed
            .iter()
            .filter(|(_, from, _)| of_side(*from))
            .filter_map(|(id, _, _)| table.sampled_last_seen_ns(*id).ok())
            .chain(
                (0..2)
                    .filter(|from| of_side(*from))
                    .map(|from| self.last_packet_ns[from].load(Ordering::Relaxed)),
            )
            .max()
            .unwrap_or(0)
    }

    pub fn flow_ids(&self) -> Vec<u32> {
        let flows = self.flows.lock().expect("ng stream poisoned");
        flows.installed.iter().map(|(id, _, _)| *id).collect()
    }

    /// Removes the flows and stops the forwarders (the sockets close with the last owner).
    pub fn close(&self, table: &FlowTable) {
        self.peers()[0] = None;
        self.peers()[1] = None;
        self.install(table);
        for task in self.tasks.lock().expect("ng stream poisoned").drain(..) {
            task.abort();
        }
    }
}

/// Binds port pairs (RTP even, RTCP the one above) from a range, going round it so that a
/// port just freed is the last to be taken again.
pub struct PortPool {
    range: RangeInclusive<u16>,
    next: Mutex<u16>,
}

impl PortPool {
    pub fn new(range: RangeInclusive<u16>) -> PortPool {
        let first = *range.start() + (*range.start() % 2);
        PortPool {
            range,
            next: Mutex::new(first),
        }
    }

    pub async fn bind(&self, ip: IpAddr) -> Option<Ports> {
        let (first, last) = (
            *self.range.start() + (*self.range.start() % 2),
            *self.range.end(),
        );
        let pairs = (last.saturating_sub(first) / 2 + 1) as usize;
        for _ in 0..pairs {
            let port = {
                let mut next = self.next.lock().expect("ng ports poisoned");
                let port = *next;
                *next = if port.saturating_add(3) > last {
                    first
                } else {
                    port + 2
                };
                port
            };
            if port.saturating_add(1) > last {
                continue;
            }
            let address = SocketAddr::new(ip, port);
            let rtcp = SocketAddr::new(ip, port + 1);
            if let (Ok(rtp), Ok(rtcp)) =
                (UdpSocket::bind(address).await, UdpSocket::bind(rtcp).await)
            {
                return Some(Ports {
                    rtp: Arc::new(rtp),
                    rtcp: Arc::new(rtcp),
                    address,
                });
            }
        }
        None
    }
}
