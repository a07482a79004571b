//! Runs the sans-IO TURN core on real sockets: one tokio task per listening socket and per
//! relay socket feeds datagrams to the core; its actions are carried out here (sends, relay
//! sockets opened and closed, channel flows offloaded to the flow table and removed).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use tokio::{net::UdpSocket, sync::watch, task::JoinHandle};

use super::{
    credentials::Credentials,
    server::{Action, RevokeTarget, ServerConfig, TurnServer, channel_flows},
};
use crate::{
    datapath::{
        DatapathKind,
        table::{FlowError, FlowTable},
        userspace::{send_now, set_socket_option},
    },
    state::StateStore,
    time::{monotonic_ns, unix_now},
    turn::config::TurnConfig,
};

const MAX_DATAGRAM: usize = 65_535;
/// Relay ports tried for one Allocate before it is answered 508.
const RELAY_BIND_TRIES: u32 = 4;

pub struct TurnService {
    server: Mutex<TurnServer>,
    sockets: Mutex<HashMap<SocketAddr, Bound>>,
    table: Arc<FlowTable>,
    offload: bool,
    /// Clients also over TCP (`turn.tcp`).
    tcp: bool,
    /// Flow ids of offloaded channels, by the client -> peer flow's key.
    offloaded: Mutex<HashMap<crate::datapath::flow::FlowId, Vec<u32>>>,
    /// Channels whose peer is a call inside this relay: the call's flows carry them
    /// (`lend_channel`), so the TURN server offloads none of its own for them.
    lent: Mutex<std::collections::HashSet<crate::datapath::flow::FlowId>>,
    /// Clients over TCP, by (client, server): what is sent to them goes into their
    /// connection's queue.
    tcp_clients: Mutex<TcpClients>,
    /// Where allocations are kept across restarts, and whether they changed since the
    /// last save.
    store: Option<Arc<StateStore>>,
    dirty: AtomicBool,
}

/// What goes to a client over TCP: its connection's outgoing messages.
type TcpQueue = tokio::sync::mpsc::Sender<Vec<u8>>;
/// Clients over TCP or TLS by (client, server): their queue and transport ("tcp", "tls").
type TcpClients = HashMap<(SocketAddr, SocketAddr), (TcpQueue, &'static str)>;

/// One allocation as `relayctl turn allocations` shows it.
#[derive(Debug, Clone)]
pub struct AllocationReport {
    pub username: String,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// How the client talks to the server: udp, tcp, or tls (on the signalling port).
    pub transport: String,
    /// One relayed address, or IPv4 and IPv6 for a dual allocation.
    pub relays: Vec<SocketAddr>,
    pub expires_in_secs: u64,
    pub permissions: Vec<IpAddr>,
    pub channels: Vec<(u16, SocketAddr)>,
    /// Flows of its channels installed in the kernel datapath.
    pub offloaded_flows: usize,
    /// Packets and bytes of those flows (kernel and slow path).
    pub packets: u64,
    pub bytes: u64,
}

/// A channel whose peer is inside this relay (see [`TurnService::lend_channel`]): the
/// client's 5-tuple toward the listener, the channel number, the relayed address and the
/// peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalChannel {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub number: u16,
    pub relay: SocketAddr,
    pub peer: SocketAddr,
}

/// The TURN server at a glance.
#[derive(Debug, Clone)]
pub struct TurnStatus {
    pub listening: Vec<SocketAddr>,
    pub allocations: u64,
    pub channels: u64,
    /// Where allocations are kept across restarts; absent: they are not.
    pub state_store: Option<String>,
    /// Whether bound channels are forwarded in the kernel.
    pub offload: bool,
    /// Whether clients may also come over TCP (and TLS on the signalling port).
    pub tcp: bool,
}

/// What the metrics show of the TURN server.
pub struct TurnSummary {
    pub allocations: u64,
    pub channels: u64,
    pub refusals: Vec<(u16, &'static str, u64)>,
    pub relay_bind_failures: u64,
    /// Datagrams dropped without an answer, by reason.
    pub discards: Vec<(&'static str, u64)>,
}

struct Bound {
    socket: Arc<UdpSocket>,
    receiver: JoinHandle<()>,
    /// A listening address (not an allocation's relay address).
    listener: bool,
}

enum Side {
    Client,
    Peer,
}

/// The state store's name for the key nonces are signed with.
const NONCE_KEY: &str = "turn_nonce_key";

impl TurnService {
    /// Binds the listening sockets and starts serving; stops when `stopped` changes.
    pub async fn start(
        settings: &TurnConfig,
        table: Arc<FlowTable>,
        store: Option<Arc<StateStore>>,
        admission: Arc<crate::admission::Admission>,
        mut stopped: watch::Receiver<bool>,
    ) -> anyhow::Result<Arc<TurnService>> {
        let config = server_config(settings)?;
        let credentials = credentials(settings);
        let offload = settings.offload && table.status().kind == DatapathKind::Xdp;
        if settings.offload && !offload {
            tracing::warn!(
                "turn: offload is on but the datapath is userspace: relaying ChannelData in userspace"
            );
        }
        let service = Arc::new(TurnService {
            server: Mutex::new(TurnServer::new(
                config,
                credentials,
                Box::new(<rand::rngs::StdRng as rand::SeedableRng>::from_os_rng()),
            )),
            sockets: Mutex::new(HashMap::new()),
            table,
            offload,
            tcp: settings.tcp,
            offloaded: Mutex::new(HashMap::new()),
            lent: Mutex::new(std::collections::HashSet::new()),
            tcp_clients: Mutex::new(HashMap::new()),
            store,
            dirty: AtomicBool::new(false),
        });
        service.restore();
        for address in settings.listen_addresses() {
            service
                .bind(address, Side::Client, false)
                .with_context(|| format!("turn.listen: {address}: cannot listen"))?;
            tracing::info!(%address, offload, "turn: listening");
            if settings.tcp {
                let listener = std::net::TcpListener::bind(address)
                    .and_then(|listener| {
                        listener.set_nonblocking(true)?;
                        tokio::net::TcpListener::from_std(listener)
                    })
                    .with_context(|| {
                        format!("turn.listen: {address}: cannot listen on TCP (turn.tcp)")
                    })?;
                let listener =
                    crate::admission::Listener::new(listener, "turn-tcp", admission.clone());
                tokio::spawn(service.clone().serve_tcp(listener, address));
                tracing::info!(%address, "turn: listening on TCP (relayed in userspace)");
            }
        }
        let ticking = service.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = interval.tick() => {
                        let actions = ticking.server().expire(unix_now());
                        if !actions.is_empty() {
                            ticking.dirty.store(true, Ordering::Relaxed);
                        }
                        ticking.carry_out(actions);
                        ticking.save(false);
                    }
                    // The daemon calls stop() itself, and waits for it.
                    _ = stopped.changed() => return,
                }
            }
        });
        Ok(service)
    }

    /// Brings back the allocations the state store kept (a restart): their relay sockets,
    /// and their channels' flows, adopted from the pinned flow table when they are there.
    fn restore(self: &Arc<Self>) {
        let Some(store) = &self.store else {
            return;
        };
        match store.secret(NONCE_KEY, super::nonce::KEY_BYTES) {
            Ok(key) => self.server().keep_nonces(&key),
            Err(err) => {
                tracing::error!(%err, "turn: cannot keep the nonce key in the state store; clients of restored allocations will get 401 on their next request");
            }
        }
        let stored = match store.load_allocations() {
            Ok(stored) => stored,
            Err(err) => {
                tracing::error!(%err, "turn: cannot read the state store; starting without stored allocations");
                return;
            }
        };
        if stored.is_empty() {
            return;
        }
        let found = stored.len();
        let (actions, restored) = self.server().restore(stored, unix_now());
        self.carry_out(actions);
        tracing::info!(
            restored,
            stored = found,
            path = %store.path().display(),
            "turn: allocations restored from the state store"
        );
    }

    /// The allocations a restart or a standby could take back: all but those over TCP,
    /// which end with their connection.
    pub fn records(&self) -> Vec<crate::state::AllocationRecord> {
        let mut snapshot = self.server().snapshot();
        snapshot.retain(|allocation| !self.over_tcp(allocation.client, allocation.server));
        snapshot
    }

    /// Takes over the allocations of a relay of the cluster that is down, from the records
    /// it kept in Redis: this relay is its standby and serves the same relayed addresses,
    /// so each allocation goes on (its relay sockets, permissions, channels and their
    /// flows); the clients' next request gets a new nonce (438), as after any restart
    /// without the nonce key. Returns how many it took.
    pub fn take_over(
        self: &Arc<Self>,
        from: &str,
        records: Vec<crate::state::AllocationRecord>,
    ) -> usize {
        let found = records.len();
        let (actions, taken) = self.server().restore(records, unix_now());
        self.carry_out(actions);
        self.dirty.store(true, Ordering::Relaxed);
        self.save(true);
        tracing::info!(
            from,
            taken,
            found,
            "turn: allocations taken over from a relay of the cluster that is down"
        );
        taken
    }

    /// Writes the allocations to the state store when they changed (or `always`).
    fn save(&self, always: bool) {
        let Some(store) = &self.store else {
            return;
        };
        if !self.dirty.swap(false, Ordering::Relaxed) && !always {
            return;
        }
        // An allocation over TCP ends with its connection, which a restart closes.
        let snapshot = self.records();
        if let Err(err) = store.save_allocations(&snapshot) {
            // Tried again at the next change; said once per failure.
            tracing::error!(%err, "turn: cannot save allocations; a restart now would lose them");
        }
    }

    /// Takes over credentials, peer policy, lifetimes and limits from `settings` (a reload):
    /// new requests see them at once; allocations, permissions and channels already made
    /// keep going until they are refreshed (and then need the new credentials) or expire.
    pub fn reconfigure(&self, settings: &TurnConfig) -> anyhow::Result<()> {
        let config = server_config(settings)?;
        self.server().reconfigure(config, credentials(settings));
        Ok(())
    }
}

/// The TURN core's configuration from the `[turn]` settings.
fn server_config(settings: &TurnConfig) -> anyhow::Result<ServerConfig> {
    let relay_ips = settings.relay_ips();
    Ok(ServerConfig {
        realm: settings.realm.clone(),
        software: concat!("relay ", env!("CARGO_PKG_VERSION")).to_owned(),
        relay_ipv4: relay_ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        }),
        relay_ipv6: relay_ips.iter().find_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        }),
        ports: settings.ports().context("turn.port_range")?,
        default_lifetime: settings.default_lifetime_secs,
        max_lifetime: settings.max_lifetime_secs,
        nonce_lifetime: settings.default_lifetime_secs,
        max_allocations: settings.max_allocations,
        max_allocations_per_user: settings.max_allocations_per_user,
        peers: settings.peer_policy(),
        max_allocate_rate_per_source: settings.max_allocate_rate_per_source,
        max_request_rate_per_source: settings.max_request_rate_per_source,
    })
}

fn credentials(settings: &TurnConfig) -> Credentials {
    Credentials::new(
        settings
            .users
            .iter()
            .map(|u| (u.name.clone(), u.password.clone())),
        settings.secrets.clone(),
    )
}

impl TurnService {
    /// The allocations with their offload state and the kernel counters of their channels.
    pub fn report(&self) -> Vec<AllocationReport> {
        let now = unix_now();
        let allocations = self.server().allocations();
        let offloaded = self.offloaded.lock().expect("turn offloads poisoned");
        allocations
            .into_iter()
            .map(|allocation| {
                let ids: Vec<u32> = allocation
                    .channels
                    .iter()
                    .filter_map(|(number, peer)| {
                        let key = (allocation.client, allocation.server, *number);
                        offloaded.get(&key).map(|ids| (ids, peer))
                    })
                    .flat_map(|(ids, _)| ids.iter().copied())
                    .collect();
                let (packets, bytes) = ids
                    .iter()
                    .filter_map(|id| self.table.get(*id, monotonic_ns()).ok())
                    .fold((0, 0), |(p, b), flow| {
                        (p + flow.counters.packets(), b + flow.counters.bytes())
                    });
                let transport = self
                    .tcp_clients
                    .lock()
                    .expect("turn tcp poisoned")
                    .get(&(allocation.client, allocation.server))
                    .map_or("udp", |(_, transport)| transport)
                    .to_owned();
                AllocationReport {
                    username: allocation.username,
                    client: allocation.client,
                    server: allocation.server,
                    transport,
                    relays: allocation.relays,
                    expires_in_secs: allocation.expires.saturating_sub(now),
                    permissions: allocation.permissions,
                    channels: allocation.channels,
                    offloaded_flows: ids.len(),
                    packets,
                    bytes,
                }
            })
            .collect()
    }

    /// The TURN server at a glance (`relayctl status`).
    pub fn status(&self) -> TurnStatus {
        let summary = self.summary();
        let mut listening: Vec<SocketAddr> = self
            .sockets
            .lock()
            .expect("turn sockets poisoned")
            .iter()
            .filter(|(_, bound)| bound.listener)
            .map(|(address, _)| *address)
            .collect();
        listening.sort();
        TurnStatus {
            listening,
            allocations: summary.allocations,
            channels: summary.channels,
            state_store: self
                .store
                .as_ref()
                .map(|store| store.path().display().to_string()),
            offload: self.offload,
            tcp: self.tcp,
        }
    }

    /// Counts for the metrics: allocations, channels, refusals by (code, reason), discards
    /// by reason, relay sockets that could not be opened.
    pub fn summary(&self) -> TurnSummary {
        let server = self.server();
        let allocations = server.allocations();
        TurnSummary {
            allocations: allocations.len() as u64,
            channels: allocations.iter().map(|a| a.channels.len() as u64).sum(),
            refusals: server.refusals(),
            relay_bind_failures: server.relay_bind_failures(),
            discards: server.discards(),
        }
    }

    /// Deletes allocations (`relayctl turn revoke`); returns how many.
    pub fn revoke(self: &Arc<Self>, target: &RevokeTarget) -> usize {
        let (actions, count) = self.server().revoke(target);
        self.carry_out(actions);
        count
    }

    /// A client connected over TCP: what the core sends it goes to `queue`.
    pub(super) fn tcp_connected(
        &self,
        client: SocketAddr,
        server: SocketAddr,
        queue: TcpQueue,
        transport: &'static str,
    ) {
        self.tcp_clients
            .lock()
            .expect("turn tcp poisoned")
            .insert((client, server), (queue, transport));
    }

    pub(super) fn tcp_disconnected(&self, client: SocketAddr, server: SocketAddr) {
        self.tcp_clients
            .lock()
            .expect("turn tcp poisoned")
            .remove(&(client, server));
    }

    fn over_tcp(&self, client: SocketAddr, server: SocketAddr) -> bool {
        self.tcp_clients
            .lock()
            .expect("turn tcp poisoned")
            .contains_key(&(client, server))
    }

    pub(super) fn server(&self) -> std::sync::MutexGuard<'_, TurnServer> {
        self.server.lock().expect("turn server poisoned")
    }

    fn bind(
        self: &Arc<Self>,
        address: SocketAddr,
        side: Side,
        dont_fragment: bool,
    ) -> std::io::Result<()> {
        let socket = std::net::UdpSocket::bind(address)?;
        socket.set_nonblocking(true)?;
        if dont_fragment {
            set_dont_fragment(&socket, address.is_ipv6())?;
        }
        crate::datapath::userspace::enlarge_socket_buffers(&socket);
        let socket = Arc::new(UdpSocket::from_std(socket)?);
        let listener = matches!(side, Side::Client);
        let receiver = tokio::spawn(self.clone().receive(socket.clone(), address, side));
        self.sockets.lock().expect("turn sockets poisoned").insert(
            address,
            Bound {
                socket,
                receiver,
                listener,
            },
        );
        Ok(())
    }

    async fn receive(self: Arc<Self>, socket: Arc<UdpSocket>, local: SocketAddr, side: Side) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let (len, from) = match socket.recv_from(&mut buf).await {
                Ok(received) => received,
                Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                Err(err) => {
                    tracing::error!(%local, %err, "turn: receive failed; socket closed");
                    return;
                }
            };
            let now = unix_now();
            // A STUN request may change an allocation (first byte 0..=3, RFC 7983); media
            // does not.
            if matches!(side, Side::Client) && buf[0] < 4 {
                self.dirty.store(true, Ordering::Relaxed);
            }
            let actions = match side {
                Side::Client => self.server().from_client(now, local, from, &buf[..len]),
                Side::Peer => self.server().from_peer(now, local, from, &buf[..len]),
            };
            self.carry_out(actions);
        }
    }

    pub(super) fn carry_out(self: &Arc<Self>, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send {
                    from,
                    to,
                    mut bytes,
                } => {
                    let tcp = self
                        .tcp_clients
                        .lock()
                        .expect("turn tcp poisoned")
                        .get(&(to, from))
                        .map(|(queue, _)| queue.clone());
                    if let Some(queue) = tcp {
                        // ChannelData is padded to 4 bytes over TCP (RFC 8656 12.5).
                        bytes.resize(bytes.len().next_multiple_of(4), 0);
                        if queue.try_send(bytes).is_err() {
                            tracing::debug!(client = %to, "turn: TCP client not reading; a message dropped");
                        }
                        continue;
                    }
                    let socket = self
                        .sockets
                        .lock()
                        .expect("turn sockets poisoned")
                        .get(&from)
                        .map(|bound| bound.socket.clone());
                    if let Some(socket) = socket
                        && let Err(err) = send_now(&socket, &bytes, to)
                    {
                        tracing::debug!(%from, %to, %err, "turn: send failed");
                    }
                }
                Action::OpenRelay {
                    relay,
                    dont_fragment,
                } => {
                    if let Err(err) = self.bind(relay, Side::Peer, dont_fragment) {
                        // Something else holds the port (the range overlaps the host's
                        // ephemeral ports): the allocation could carry nothing, so it goes;
                        // the client's next request gets 437 and it allocates again.
                        tracing::warn!(%relay, %err, "turn: cannot open a relay socket; the allocation is deleted");
                        let (actions, _) = self.server().revoke(&RevokeTarget::Relay(relay));
                        self.carry_out(actions);
                    }
                }
                Action::Allocate { .. } => self.open_allocation(action, 1),
                Action::CloseRelay(relay) => {
                    if let Some(bound) = self
                        .sockets
                        .lock()
                        .expect("turn sockets poisoned")
                        .remove(&relay)
                    {
                        bound.receiver.abort();
                    }
                }
                Action::Offload(flows) => {
                    // XDP does not touch TCP: channels of TCP clients stay in userspace.
                    if !self.offload
                        || self.over_tcp(flows[0].src, flows[0].dst)
                        || self
                            .lent
                            .lock()
                            .expect("turn lent poisoned")
                            .contains(&flows[0].id())
                    {
                        continue;
                    }
                    // An IPv6 client with an IPv4 peer (or the reverse) needs the IP header
                    // replaced, which the XDP program does not do: userspace relays it.
                    if flows[0].src.is_ipv4() != flows[0].new_dst.is_ipv4() {
                        tracing::info!(client = %flows[0].src, peer = %flows[0].new_dst, "turn: channel relayed in userspace: client and peer are of different IP families");
                        continue;
                    }
                    match self.table.offload(&flows, monotonic_ns()) {
                        Ok(ids) => {
                            tracing::info!(client = %flows[0].src, peer = %flows[0].new_dst, ?ids, "turn: channel offloaded to the kernel");
                            self.offloaded
                                .lock()
                                .expect("turn offloads poisoned")
                                .insert(flows[0].id(), ids);
                        }
                        // A restored channel whose flows the table adopted from the pins:
                        // they forwarded all along.
                        Err(FlowError::Duplicate { .. })
                            if let (Some(to_peer), Some(to_client)) = (
                                self.table.find(flows[0].id()),
                                self.table.find(flows[1].id()),
                            ) =>
                        {
                            let ids = vec![to_peer, to_client];
                            tracing::info!(client = %flows[0].src, peer = %flows[0].new_dst, ?ids, "turn: channel's flows adopted from the pinned table");
                            self.offloaded
                                .lock()
                                .expect("turn offloads poisoned")
                                .insert(flows[0].id(), ids);
                        }
                        Err(err) => tracing::warn!(%err, "turn: channel stays in userspace"),
                    }
                }
                Action::Unload(flows) => {
                    let ids = self
                        .offloaded
                        .lock()
                        .expect("turn offloads poisoned")
                        .remove(&flows[0].id());
                    for id in ids.into_iter().flatten() {
                        let _ = self.table.remove(id, monotonic_ns());
                    }
                }
            }
        }
    }

    /// Opens the relay sockets of a new allocation and sends its answer. A port another
    /// socket on the host holds (the range overlaps the host's ephemeral ports or another
    /// service) is left out and the Allocate handed in again, at most
    /// [`RELAY_BIND_TRIES`] times; then it is answered 508.
    fn open_allocation(self: &Arc<Self>, action: Action, attempt: u32) {
        let Action::Allocate {
            relays,
            dont_fragment,
            answer,
            refusal,
            client,
            server,
            request,
        } = action
        else {
            return self.carry_out(vec![action]);
        };
        let failed = relays.iter().find_map(|&relay| {
            self.bind(relay, Side::Peer, dont_fragment)
                .err()
                .map(|err| (relay, err))
        });
        let Some((relay, err)) = failed else {
            return self.carry_out(vec![*answer]);
        };
        let retry = attempt < RELAY_BIND_TRIES;
        tracing::warn!(%relay, %err, %client, attempt, retry, "turn: cannot open a relay socket: another socket on this host holds the port (keep turn.port_range clear of other services and of net.ipv4.ip_local_port_range); the port is left out for a minute");
        let now = unix_now();
        let closes = self.server().relay_unavailable(now, relay, retry);
        self.carry_out(closes);
        if !retry {
            return self.carry_out(vec![*refusal]);
        }
        let again = self.server().from_client(now, server, client, &request);
        for action in again {
            match action {
                Action::Allocate { .. } => self.open_allocation(action, attempt + 1),
                other => self.carry_out(vec![other]),
            }
        }
    }

    /// The channel bound from the allocation whose relayed address is `relay` to `peer`,
    /// when there is one: a TURN-only app's call, whose peer is the relay's own ICE
    /// address. The call then forwards the channel itself, client to PBX in one flow pair
    /// (no hairpin through the relay socket), so the TURN server's flows for it leave the
    /// table until [`TurnService::return_channel`].
    pub fn lend_channel(&self, relay: SocketAddr, peer: SocketAddr) -> Option<LocalChannel> {
        let channel = self.find_channel(relay, peer)?;
        let key = (channel.client, channel.server, channel.number);
        self.lent.lock().expect("turn lent poisoned").insert(key);
        let ids = self
            .offloaded
            .lock()
            .expect("turn offloads poisoned")
            .remove(&key);
        for id in ids.into_iter().flatten() {
            let _ = self.table.remove(id, monotonic_ns());
        }
        tracing::info!(client = %channel.client, channel = channel.number, %relay, %peer, "turn: channel to a call in this relay: the call's flows carry it");
        Some(channel)
    }

    /// Whether the channel is still bound (its allocation alive).
    pub fn is_bound(&self, channel: &LocalChannel) -> bool {
        self.find_channel(channel.relay, channel.peer).as_ref() == Some(channel)
    }

    /// Ends a [`TurnService::lend_channel`]: when the channel is still bound, the TURN
    /// server's own flows take it back.
    pub fn return_channel(self: &Arc<Self>, channel: &LocalChannel) {
        let key = (channel.client, channel.server, channel.number);
        self.lent.lock().expect("turn lent poisoned").remove(&key);
        if self.is_bound(channel) {
            self.carry_out(vec![Action::Offload(channel_flows(
                (channel.client, channel.server),
                channel.relay,
                channel.number,
                channel.peer,
            ))]);
        }
    }

    /// The channel bound from the allocation whose relayed address is `relay` to `peer`.
    pub fn find_channel(&self, relay: SocketAddr, peer: SocketAddr) -> Option<LocalChannel> {
        let allocation = self
            .server()
            .allocations()
            .into_iter()
            .find(|allocation| allocation.relays.contains(&relay))?;
        // A client over TCP gets its ChannelData on its connection, which no flow can
        // write: its calls stay on the relay socket's path.
        if self.over_tcp(allocation.client, allocation.server) {
            return None;
        }
        let (number, _) = allocation
            .channels
            .iter()
            .find(|(_, bound)| *bound == peer)?;
        Some(LocalChannel {
            client: allocation.client,
            server: allocation.server,
            number: *number,
            relay,
            peer,
        })
    }

    /// Stops every socket task and removes offloaded flows (their sockets are going away).
    /// relayd is stopping: saves the allocations (when there is a store) and closes the
    /// sockets.
    pub fn stop(&self) {
        self.save(true);
        self.shut_down();
    }

    fn shut_down(&self) {
        for (_, bound) in self.sockets.lock().expect("turn sockets poisoned").drain() {
            bound.receiver.abort();
        }
        // With a state store the next relayd restores the allocations and adopts their
        // flows, which forward in the kernel meanwhile; without one nothing would own them.
        if self.store.is_some() {
            return;
        }
        for (_, ids) in self
            .offloaded
            .lock()
            .expect("turn offloads poisoned")
            .drain()
        {
            for id in ids {
                let _ = self.table.remove(id, monotonic_ns());
            }
        }
    }
}

/// DONT-FRAGMENT (RFC 8656 7.2): datagrams relayed from this socket carry the DF bit (IPv4)
/// or are never fragmented by this host (IPv6); too big for the path means an ICMP error
/// instead of fragments.
fn set_dont_fragment(socket: &std::net::UdpSocket, ipv6: bool) -> std::io::Result<()> {
    if ipv6 {
        set_socket_option(socket, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1)
    } else {
        set_socket_option(
            socket,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    }
}
