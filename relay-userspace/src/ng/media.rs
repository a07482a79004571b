//! One anchored stream of an ng call: a port pair on each side's interface, the two sides'
//! addresses, the flows that forward between them in the kernel, and the userspace
//! forwarders for what the kernel passes up (a stream's first packets before both sides
//! are known, DTLS, RTCP between a multiplexing side and one that is not, the userspace
//! datapath). A side's address is learned from its first packet when it differs from its
//! SDP's (NAT), unless the proxy said `asymmetric`; from then on only that source counts
//! (strict source: no RTP bleed, no injection). A side the relay speaks ICE toward has an
//! agent on its RTP port instead (`IceSide`): its address is the selected pair's.

use std::{
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{net::UdpSocket, task::JoinHandle};
use webrtc_ice::state::ConnectionState;

use super::ice::{CONNECT_TIMEOUT, IceProgress, IceSide};
use crate::{
    datapath::{FlowSpec, table::FlowTable},
    ice::leg::SelectedPair,
    media::srtp::is_rtcp,
    session::{sdp::IceLines, streams::StreamEndpoint},
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
    /// The relay's ICE agent toward a side, on its RTP port.
    ice: Mutex<[Option<Arc<IceSide>>; 2]>,
    /// Each side's ICE as its latest SDP had it.
    remote_ice: Mutex<[Option<IceLines>; 2]>,
    /// The forwarders (with the socket each reads) and the ICE sides' tasks.
    tasks: Mutex<Vec<(Option<Socket>, JoinHandle<()>)>>,
}

/// One of a stream's four sockets: (side, kind).
type Socket = (usize, Kind);

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
            ice: Mutex::new([None, None]),
            remote_ice: Mutex::new([None, None]),
            tasks: Mutex::new(Vec::new()),
        })
    }

    fn peers(&self) -> MutexGuard<'_, [Option<Peer>; 2]> {
        self.peers.lock().expect("ng stream poisoned")
    }

    pub fn peer(&self, side: usize) -> Option<Peer> {
        self.peers()[side]
    }

    fn ice_side(&self, side: usize) -> Option<Arc<IceSide>> {
        self.ice.lock().expect("ng stream poisoned")[side].clone()
    }

    /// The answer toward `side` has no rtcp-mux: a side that offered it sends RTCP to the
    /// relay's RTCP port from its own (RFC 5761 section 5.1.1), and gets it there.
    pub fn refuse_rtcp_mux(&self, table: &FlowTable, side: usize) {
        let demux = |peer: Peer| Peer {
            endpoint: peer.endpoint.demuxed(),
            advertised: peer.advertised.demuxed(),
            ..peer
        };
        match self.ice_side(side) {
            Some(ice) => match ice.sdp() {
                Some(sdp) if sdp.endpoint.rtcp_mux => {
                    ice.set_sdp(Some(demux(sdp)));
                    self.peers()[side] = ice.peer();
                }
                _ => return,
            },
            None => {
                let mut peers = self.peers();
                match peers[side] {
                    Some(peer) if peer.endpoint.rtcp_mux => peers[side] = Some(demux(peer)),
                    _ => return,
                }
            }
        }
        self.install(table);
    }

    /// The side's SDP kept the stream (an endpoint, wherever ICE finds it).
    pub fn described(&self, side: usize) -> bool {
        match self.ice_side(side) {
            Some(ice) => ice.sdp().is_some(),
            None => self.peer(side).is_some(),
        }
    }

    /// The side's SDP had ICE credentials.
    pub fn remote_ice_known(&self, side: usize) -> bool {
        self.remote_ice.lock().expect("ng stream poisoned")[side].is_some()
    }

    /// How far the relay's ICE has come toward the stream's sides: the worst of them;
    /// None when it speaks ICE toward neither.
    pub fn ice_progress(&self) -> Option<IceProgress> {
        let agents = self.ice.lock().expect("ng stream poisoned");
        agents.iter().flatten().map(|ice| ice.progress()).min()
    }

    /// The relay speaks ICE toward the side.
    pub fn speaks_ice(&self, side: usize) -> bool {
        self.ice_side(side).is_some()
    }

    /// A side's endpoint from its SDP (None: it refused the stream); the flows follow. A
    /// side the relay speaks ICE toward is where ICE found it, with its SDP's RTCP.
    pub fn set_peer(&self, table: &FlowTable, side: usize, peer: Option<Peer>) {
        let peer = match self.ice_side(side) {
            Some(ice) => {
                ice.set_sdp(peer);
                ice.peer()
            }
            None => peer,
        };
        self.peers()[side] = peer;
        self.install(table);
    }

    /// The relay's ICE toward `side` (an agent on its RTP port, made on the first call):
    /// what the SDP toward the side carries. `controlling` when that SDP is an offer.
    pub async fn speak_ice(
        self: &Arc<Self>,
        table: &Arc<FlowTable>,
        side: usize,
        controlling: bool,
        consent_timeout: std::time::Duration,
    ) -> anyhow::Result<IceLines> {
        if let Some(ice) = self.ice_side(side) {
            return Ok(ice.local());
        }
        // The agent reads the RTP socket from now on, in place of its forwarder.
        {
            let mut tasks = self.tasks.lock().expect("ng stream poisoned");
            tasks.retain(|(socket, task)| {
                let reads = *socket == Some((side, Kind::Rtp));
                if reads {
                    task.abort();
                }
                !reads
            });
        }
        let ice = Arc::new(
            IceSide::new(self.ports[side].rtp.clone(), controlling, consent_timeout).await?,
        );
        let sdp = self.peers()[side].take();
        ice.set_sdp(sdp);
        self.ice.lock().expect("ng stream poisoned")[side] = Some(ice.clone());
        // No flows toward the side's SDP address: media waits for the selected pair.
        self.install(table);
        // The side's credentials may be known already (the relay answers its offer).
        self.start_ice(table, side);
        Ok(ice.local())
    }

    /// The ICE a side's SDP carries (kept: the relay may speak ICE toward the side later,
    /// in the answer to its offer). With a relay agent toward the side and the side's
    /// credentials known, the checks start (once). New credentials in the side's `offer`
    /// restart ICE toward a connected side.
    pub async fn remote_ice(
        self: &Arc<Self>,
        table: &Arc<FlowTable>,
        side: usize,
        remote: Option<IceLines>,
        offer: bool,
    ) {
        if let (true, Some(ice), Some(lines)) = (offer, self.ice_side(side), remote.as_ref()) {
            match ice.restart(lines).await {
                Ok(true) => {
                    tracing::info!(
                        stream = self.index,
                        side,
                        "ng: the side restarts ICE (new credentials): the relay checks again with new ones of its own"
                    )
                }
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(stream = self.index, side, %err, "ng: an ICE restart could not start; the pair in use stays")
                }
            }
        }
        if remote.is_some() {
            self.remote_ice.lock().expect("ng stream poisoned")[side] = remote;
        }
        self.start_ice(table, side);
    }

    fn start_ice(self: &Arc<Self>, table: &Arc<FlowTable>, side: usize) {
        let Some(ice) = self.ice_side(side) else {
            return;
        };
        let remote = self.remote_ice.lock().expect("ng stream poisoned")[side].clone();
        let Some(remote) = ice.set_remote(remote) else {
            return;
        };
        let (stream, table) = (self.clone(), table.clone());
        let task = tokio::spawn(async move { stream.run_ice(&table, side, ice, remote).await });
        self.tasks
            .lock()
            .expect("ng stream poisoned")
            .push((None, task));
    }

    /// A side that answered the relay's ICE without any (RFC 8445 section 5.1.3: then
    /// neither side uses ICE): the relay's agent goes, the side is plain UDP at its SDP's
    /// address. False when the relay does not speak ICE toward it or it gave credentials.
    pub fn plain_again(self: &Arc<Self>, table: &Arc<FlowTable>, side: usize) -> bool {
        let ice = {
            let mut agents = self.ice.lock().expect("ng stream poisoned");
            match &agents[side] {
                Some(ice) if !ice.has_remote() => agents[side].take(),
                _ => None,
            }
        };
        let Some(ice) = ice else {
            return false;
        };
        let peer = ice.sdp();
        close_ice(ice);
        let (stream, forwarding) = (self.clone(), table.clone());
        let task = tokio::spawn(async move { stream.forward(&forwarding, side, Kind::Rtp).await });
        self.tasks
            .lock()
            .expect("ng stream poisoned")
            .push((Some((side, Kind::Rtp)), task));
        self.peers()[side] = peer;
        self.install(table);
        true
    }

    /// Checks until a pair is selected, then follows it (the side may nominate another)
    /// and its consent; the side's media that reaches userspace comes through the leg.
    async fn run_ice(&self, table: &FlowTable, side: usize, ice: Arc<IceSide>, remote: IceLines) {
        let (pair, conn, mut pairs, mut states) = {
            let mut leg = ice.leg.lock().await;
            for candidate in &remote.candidates {
                if let Err(err) = leg.add_remote_candidate(candidate) {
                    tracing::debug!(stream = self.index, %err, "ng: an ICE candidate skipped");
                }
            }
            let connect = leg.connect(ice.controlling, remote.ufrag, remote.pwd);
            match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(Ok(pair)) => (pair, leg.conn(), leg.pairs(), leg.states()),
                Ok(Err(err)) => {
                    ice.failed();
                    tracing::warn!(stream = self.index, side, %err, "ng: ICE toward a side failed: no media to or from it");
                    return;
                }
                Err(_) => {
                    ice.failed();
                    tracing::warn!(
                        stream = self.index,
                        side,
                        timeout_secs = CONNECT_TIMEOUT.as_secs(),
                        "ng: ICE toward a side found no working pair in time: no media to or from it"
                    );
                    return;
                }
            }
        };
        tracing::info!(stream = self.index, side, local = %pair.local, remote = %pair.remote, "ng: ICE connected");
        let follow = |selected: Option<SelectedPair>| {
            ice.select(selected);
            self.peers()[side] = ice.peer();
            self.install(table);
        };
        follow(Some(pair));
        let Some(conn) = conn else { return };
        let mut buf = vec![0u8; 2048];
        let consent_lost = || {
            tracing::warn!(
                stream = self.index,
                side,
                "ng: ICE consent toward a side expired (ng.ice_consent_timeout_secs without answers): media to and from it stops"
            );
            follow(None);
        };
        loop {
            tokio::select! {
                received = conn.recv_from(&mut buf) => match received {
                    Ok((n, from)) => self.relay(table, side, Kind::Rtp, &buf[..n], from).await,
                    // The port let go of the leg: its consent expired (the state may not
                    // have been looked at yet).
                    Err(_) => {
                        if *states.borrow() == ConnectionState::Failed {
                            consent_lost();
                        }
                        return;
                    }
                },
                changed = pairs.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let selected = *pairs.borrow_and_update();
                    if let Some(pair) = selected {
                        tracing::info!(stream = self.index, side, remote = %pair.remote, "ng: ICE selected another pair: media follows it");
                        follow(Some(pair));
                    }
                }
                changed = states.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let state = *states.borrow_and_update();
                    if state == ConnectionState::Failed {
                        consent_lost();
                        return;
                    }
                }
            }
        }
    }

    /// Starts the forwarders of both sides' sockets.
    pub fn start(self: &Arc<Self>, table: Arc<FlowTable>) {
        let mut tasks = self.tasks.lock().expect("ng stream poisoned");
        for side in 0..2 {
            for kind in [Kind::Rtp, Kind::Rtcp] {
                let (stream, table) = (self.clone(), table.clone());
                let task = tokio::spawn(async move {
                    stream.forward(&table, side, kind).await;
                });
                tasks.push((Some((side, kind)), task));
            }
        }
    }

    async fn forward(&self, table: &FlowTable, side: usize, kind: Kind) {
        let socket = self.ports[side].socket(kind).clone();
        let mut buf = vec![0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            self.relay(table, side, kind, &buf[..n], from).await;
        }
    }

    /// A packet from a side's socket (or its ICE leg), to the other side when it is the
    /// side's and the other is known.
    async fn relay(
        &self,
        table: &FlowTable,
        side: usize,
        kind: Kind,
        packet: &[u8],
        from: SocketAddr,
    ) {
        let Some(target) = self.accept(table, side, kind, from) else {
            return;
        };
        self.counted[side][kind_index(kind)].add(packet.len());
        self.last_packet_ns[side].store(monotonic_ns(), Ordering::Relaxed);
        let Some(to) = target else { return };
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
        let _ = self.ports[1 - side]
            .socket(out_kind)
            .send_to(packet, destination)
            .await;
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
            // Removed now, or expired idle by the table before (a silence on hold).
            let counted = table
                .remove(id, now)
                .map(|flow| flow.counters)
                .ok()
                .or_else(|| table.expired_counters(id));
            if let Some(counters) = counted {
                let retired = &mut flows.retired[side][kind_index(kind)];
                retired.0 += counters.packets();
                retired.1 += counters.bytes();
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
                    opaque_payload: false,
                    to_worker: false,
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
                        opaque_payload: false,
                        to_worker: false,
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
            let counted = table
                .get(*id, now)
                .map(|flow| flow.counters)
                .ok()
                .or_else(|| table.expired_counters(*id));
            if let Some(counters) = counted {
                let total = &mut totals[kind_index(*kind)];
                total[0] += counters.packets();
                total[1] += counters.bytes();
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
        for (_, task) in self.tasks.lock().expect("ng stream poisoned").drain(..) {
            task.abort();
        }
        let agents = std::mem::take(&mut *self.ice.lock().expect("ng stream poisoned"));
        agents.into_iter().flatten().for_each(close_ice);
    }
}

/// Ends an agent's checks and its port's reading of the socket (its tasks were aborted or
/// never started).
fn close_ice(ice: Arc<IceSide>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            ice.leg.lock().await.close().await;
            ice.port.close().await;
        });
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
