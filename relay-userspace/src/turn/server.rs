//! The TURN server core (RFC 8656), sans-IO: datagrams and the time go in, actions come out
//! (datagrams to send, relay sockets to open or close, flows to offload). One driver task
//! per socket carries the actions out; unit tests drive it directly. `now` is Unix time in
//! seconds everywhere: TURN REST API usernames carry Unix expiry times.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
};

use stun_codec::{
    Attribute as _, MessageClass, TransactionId,
    rfc5389::{
        attributes::{
            ErrorCode, Fingerprint, MessageIntegrity, Nonce, Realm, Software, UnknownAttributes,
            Username, XorMappedAddress,
        },
        methods::BINDING,
    },
    rfc5766::{
        attributes::{
            Data, DontFragment, EvenPort, Lifetime, RequestedTransport, ReservationToken,
            XorPeerAddress, XorRelayAddress,
        },
        methods::{ALLOCATE, CHANNEL_BIND, CREATE_PERMISSION, DATA, REFRESH, SEND},
    },
    rfc8656::attributes::{AdditionalAddressFamily, AddressFamily, RequestedAddressFamily},
};

use super::{
    credentials::Credentials,
    message::{
        self, AddressErrorCode, Attribute, ChannelNumber, Incoming, MessageIntegritySha256,
        TurnMessage,
    },
    nonce::{NonceIssuer, NonceStatus},
    policy::{AllocationRate, PeerPolicy},
};
use crate::{
    datapath::{ChannelOp, FlowSpec},
    state::{AllocationRecord, ChannelRecord},
};

/// RFC 8656 9: permissions last 300 s, channel bindings 600 s.
pub const PERMISSION_LIFETIME: u64 = 300;
pub const CHANNEL_LIFETIME: u64 = 600;
/// How long a port reserved by EVEN-PORT(R) waits for its RESERVATION-TOKEN (RFC 8656 7.2
/// suggests about 30 s).
pub const RESERVATION_LIFETIME: u64 = 30;
const UDP: u8 = 17;
/// A refusal reason is logged at most once per this many seconds, with the count since.
pub const REFUSAL_LOG_INTERVAL: u64 = 60;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub realm: String,
    pub software: String,
    /// The relay's addresses allocations are made on, one per family.
    pub relay_ipv4: Option<Ipv4Addr>,
    pub relay_ipv6: Option<Ipv6Addr>,
    pub ports: RangeInclusive<u16>,
    pub default_lifetime: u64,
    pub max_lifetime: u64,
    pub nonce_lifetime: u64,
    pub max_allocations: usize,
    pub max_allocations_per_user: usize,
    /// Which peers allocations may reach.
    pub peers: PeerPolicy,
    /// Allocate requests per source IP address and second (0: no limit).
    pub max_allocate_rate_per_source: u32,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `bytes` from `from` (a listening or a relay address) to `to`.
    Send {
        from: SocketAddr,
        to: SocketAddr,
        bytes: Vec<u8>,
    },
    /// Open a relay socket; with DONT-FRAGMENT (RFC 8656 7.2) its datagrams carry the DF bit.
    OpenRelay {
        relay: SocketAddr,
        dont_fragment: bool,
    },
    CloseRelay(SocketAddr),
    /// A channel was bound: client -> peer (strip) and peer -> client (add) may be forwarded
    /// by the datapath from now on.
    Offload([FlowSpec; 2]),
    /// The channel is gone: remove those flows.
    Unload([FlowSpec; 2]),
}

/// The client's transport (5-tuple over UDP): where it sends from, and which of our
/// listening addresses it sends to.
type FiveTuple = (SocketAddr, SocketAddr);

struct Allocation {
    username: String,
    /// One relayed address, or two (IPv4 then IPv6) for ADDITIONAL-ADDRESS-FAMILY.
    relays: Vec<SocketAddr>,
    expires: u64,
    /// The Allocate request's transaction and our answer, for its retransmissions (none
    /// for an allocation restored after a restart).
    transaction: TransactionId,
    answer: Option<TurnMessage>,
    dont_fragment: bool,
    /// Peer IP -> expiry.
    permissions: HashMap<IpAddr, u64>,
    channels: HashMap<u16, Channel>,
}

struct Channel {
    peer: SocketAddr,
    /// The relayed address of the peer's family.
    relay: SocketAddr,
    expires: u64,
}

impl Allocation {
    /// RFC 8656 9: whether a live permission lets `peer` through.
    fn permits(&self, peer: IpAddr, now: u64) -> bool {
        self.permissions
            .get(&peer)
            .is_some_and(|&expires| expires > now)
    }

    /// The relayed address of `peer`'s family, if the allocation has one.
    fn relay_for(&self, peer: SocketAddr) -> Option<SocketAddr> {
        self.relays
            .iter()
            .copied()
            .find(|relay| relay.is_ipv4() == peer.is_ipv4())
    }
}

/// What `relayctl turn revoke` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeTarget {
    User(String),
    Relay(SocketAddr),
    /// The allocation of one client 5-tuple (its TCP connection closed).
    Client {
        client: SocketAddr,
        server: SocketAddr,
    },
}

/// One allocation, for `relayctl turn allocations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationInfo {
    pub username: String,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub relays: Vec<SocketAddr>,
    pub expires: u64,
    pub permissions: Vec<IpAddr>,
    pub channels: Vec<(u16, SocketAddr)>,
}

pub struct TurnServer {
    config: ServerConfig,
    credentials: Credentials,
    nonces: NonceIssuer,
    allocations: HashMap<FiveTuple, Allocation>,
    by_relay: HashMap<SocketAddr, FiveTuple>,
    /// RESERVATION-TOKEN -> (reserved relay address, expiry).
    reservations: HashMap<u64, (SocketAddr, u64)>,
    allocate_rate: AllocationRate,
    /// (code, reason) -> how many, for metrics and rate-limited logs.
    refusals: BTreeMap<(u16, &'static str), RefusalCount>,
}

/// An error response in the making: code and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refusal(u16, &'static str);

#[derive(Debug, Default)]
struct RefusalCount {
    total: u64,
    /// Since the last log line about this reason.
    unlogged: u64,
    logged_at: Option<u64>,
}

/// Who a request authenticated as, and how it was signed (the response is signed alike).
struct Authenticated {
    username: String,
    password: String,
    sha256: bool,
}

impl TurnServer {
    pub fn new(config: ServerConfig, credentials: Credentials) -> TurnServer {
        let nonces = NonceIssuer::new(config.nonce_lifetime);
        TurnServer {
            config,
            credentials,
            nonces,
            allocations: HashMap::new(),
            by_relay: HashMap::new(),
            reservations: HashMap::new(),
            allocate_rate: AllocationRate::default(),
            refusals: BTreeMap::new(),
        }
    }

    /// The allocations as the state store keeps them.
    pub fn snapshot(&self) -> Vec<AllocationRecord> {
        self.allocations
            .iter()
            .map(|(&(client, server), allocation)| AllocationRecord {
                client,
                server,
                username: allocation.username.clone(),
                relays: allocation.relays.clone(),
                expires: allocation.expires,
                dont_fragment: allocation.dont_fragment,
                permissions: allocation
                    .permissions
                    .iter()
                    .map(|(ip, expires)| (*ip, *expires))
                    .collect(),
                channels: allocation
                    .channels
                    .iter()
                    .map(|(number, channel)| ChannelRecord {
                        number: *number,
                        peer: channel.peer,
                        relay: channel.relay,
                        expires: channel.expires,
                    })
                    .collect(),
            })
            .collect()
    }

    /// Takes back allocations a previous relayd stored: those still alive at `now`, on
    /// relay addresses this configuration still serves, not clashing with one another.
    /// Returns the actions that bring them back (relay sockets, then channel flows) and how
    /// many were restored. Their clients keep their 5-tuples and relayed addresses; the
    /// nonces they hold are stale (438) and replaced at their next request.
    pub fn restore(&mut self, stored: Vec<AllocationRecord>, now: u64) -> (Vec<Action>, usize) {
        let mut actions = Vec::new();
        let mut restored = 0;
        for state in stored {
            let five_tuple = (state.client, state.server);
            let servable = state.relays.iter().all(|relay| {
                let ours = match relay.ip() {
                    IpAddr::V4(v4) => self.config.relay_ipv4 == Some(v4),
                    IpAddr::V6(v6) => self.config.relay_ipv6 == Some(v6),
                };
                ours && self.config.ports.contains(&relay.port()) && self.is_free(*relay)
            });
            if state.expires <= now || !servable || self.allocations.contains_key(&five_tuple) {
                tracing::info!(client = %state.client, relays = ?state.relays, "turn: stored allocation not restored (expired, or its relay address is no longer served)");
                continue;
            }
            let mut channels = HashMap::new();
            for channel in &state.channels {
                if channel.expires <= now {
                    continue;
                }
                channels.insert(
                    channel.number,
                    Channel {
                        peer: channel.peer,
                        relay: channel.relay,
                        expires: channel.expires,
                    },
                );
                actions.push(Action::Offload(channel_flows(
                    five_tuple,
                    channel.relay,
                    channel.number,
                    channel.peer,
                )));
            }
            for relay in &state.relays {
                self.by_relay.insert(*relay, five_tuple);
                actions.push(Action::OpenRelay {
                    relay: *relay,
                    dont_fragment: state.dont_fragment,
                });
            }
            self.allocations.insert(
                five_tuple,
                Allocation {
                    username: state.username,
                    relays: state.relays,
                    expires: state.expires,
                    transaction: TransactionId::new([0; 12]),
                    answer: None,
                    dont_fragment: state.dont_fragment,
                    permissions: state
                        .permissions
                        .into_iter()
                        .filter(|(_, expires)| *expires > now)
                        .collect(),
                    channels,
                },
            );
            restored += 1;
        }
        // Relay sockets first, then the flows that forward to and from them.
        actions.sort_by_key(|action| !matches!(action, Action::OpenRelay { .. }));
        (actions, restored)
    }

    /// New configuration and credentials (a reload). Allocations, reservations and nonces
    /// stay: an allocation whose user is gone ends at its next Refresh (401) or expiry.
    pub fn reconfigure(&mut self, config: ServerConfig, credentials: Credentials) {
        self.config = config;
        self.credentials = credentials;
    }

    /// Requests refused since the start, by code and reason (a bounded set), for metrics.
    pub fn refusals(&self) -> Vec<(u16, &'static str, u64)> {
        self.refusals
            .iter()
            .map(|(&(code, reason), count)| (code, reason, count.total))
            .collect()
    }

    /// Counts a refusal, and logs it unless this reason was logged less than
    /// [`REFUSAL_LOG_INTERVAL`] seconds ago: a client in a retry loop or a scan cannot flood
    /// the log, and the line says how many were not logged.
    fn refused(&mut self, now: u64, client: SocketAddr, username: &str, refusal: Refusal) {
        let Refusal(code, reason) = refusal;
        let count = self.refusals.entry((code, reason)).or_default();
        count.total += 1;
        count.unlogged += 1;
        if count
            .logged_at
            .is_some_and(|at| now < at + REFUSAL_LOG_INTERVAL)
        {
            return;
        }
        let similar = count.unlogged;
        count.unlogged = 0;
        count.logged_at = Some(now);
        // Stale nonces and retransmitted requests are part of normal operation.
        if matches!(code, 437 | 438) {
            tracing::info!(code, reason, %client, username, similar, "turn: request refused (one line per reason a minute; similar = refusals since the last)");
        } else {
            tracing::warn!(code, reason, %client, username, similar, "turn: request refused (one line per reason a minute; similar = refusals since the last)");
        }
    }

    pub fn allocations(&self) -> Vec<AllocationInfo> {
        self.allocations
            .iter()
            .map(|(&(client, server), allocation)| AllocationInfo {
                username: allocation.username.clone(),
                client,
                server,
                relays: allocation.relays.clone(),
                expires: allocation.expires,
                permissions: allocation.permissions.keys().copied().collect(),
                channels: allocation
                    .channels
                    .iter()
                    .map(|(number, channel)| (*number, channel.peer))
                    .collect(),
            })
            .collect()
    }

    /// A datagram from a client to one of our listening addresses (`server`).
    pub fn from_client(
        &mut self,
        now: u64,
        server: SocketAddr,
        client: SocketAddr,
        bytes: &[u8],
    ) -> Vec<Action> {
        let five_tuple = (client, server);
        match message::decode(bytes) {
            None => Vec::new(),
            Some(Incoming::ChannelData { channel, data }) => {
                self.channel_data_from_client(now, five_tuple, channel, data)
            }
            Some(Incoming::Broken(broken)) if broken.class() == MessageClass::Request => {
                tracing::debug!(%client, error = ?broken.error(), "turn: undecodable request: 400");
                self.refused(now, client, "", Refusal(400, "Bad Request"));
                let mut response = TurnMessage::new(
                    MessageClass::ErrorResponse,
                    broken.method(),
                    broken.transaction_id(),
                );
                response.add_attribute(
                    ErrorCode::new(400, "Bad Request".to_owned()).expect("valid reason"),
                );
                vec![self.send(server, client, response)]
            }
            Some(Incoming::Broken(_)) => Vec::new(),
            Some(Incoming::Stun(message)) => match (message.class(), message.method()) {
                (MessageClass::Indication, SEND) => self.send_indication(now, five_tuple, &message),
                (MessageClass::Request, method) => self.request(now, five_tuple, method, &message),
                // Responses, and indications other than Send, are not for a server.
                _ => Vec::new(),
            },
        }
    }

    /// A datagram from `peer` to the relay address `relay`.
    pub fn from_peer(
        &mut self,
        now: u64,
        relay: SocketAddr,
        peer: SocketAddr,
        bytes: &[u8],
    ) -> Vec<Action> {
        let Some(&(client, server)) = self.by_relay.get(&relay) else {
            return Vec::new();
        };
        let Some(allocation) = self.allocations.get(&(client, server)) else {
            return Vec::new();
        };
        // RFC 8656 11.3: only peers with a permission get through, each on the relayed
        // address of its own family.
        if !allocation.permits(peer.ip(), now) || relay.is_ipv4() != peer.is_ipv4() {
            return Vec::new();
        }
        if let Some((number, _)) = allocation.channels.iter().find(|(_, channel)| {
            channel.peer == peer && channel.relay == relay && channel.expires > now
        }) {
            return vec![Action::Send {
                from: server,
                to: client,
                bytes: message::channel_data(*number, bytes),
            }];
        }
        let mut indication = TurnMessage::new(MessageClass::Indication, DATA, transaction_id());
        indication.add_attribute(XorPeerAddress::new(peer));
        match Data::new(bytes.to_vec()) {
            Ok(data) => indication.add_attribute(data),
            Err(_) => return Vec::new(),
        }
        vec![self.send(server, client, indication)]
    }

    /// Deletes the allocations of `username`, or the one on relay address `relay`
    /// (`relayctl turn revoke`). Returns the actions and how many were deleted.
    pub fn revoke(&mut self, target: &RevokeTarget) -> (Vec<Action>, usize) {
        let doomed: Vec<FiveTuple> = self
            .allocations
            .iter()
            .filter(|(five_tuple, allocation)| match target {
                RevokeTarget::User(username) => allocation.username == *username,
                RevokeTarget::Relay(relay) => allocation.relays.contains(relay),
                RevokeTarget::Client {
                    client: target_client,
                    server: target_server,
                } => **five_tuple == (*target_client, *target_server),
            })
            .map(|(five_tuple, _)| *five_tuple)
            .collect();
        let count = doomed.len();
        let actions = doomed
            .into_iter()
            .flat_map(|five_tuple| self.delete(five_tuple))
            .collect();
        (actions, count)
    }

    /// Removes what expired by `now`: allocations, channels, permissions.
    pub fn expire(&mut self, now: u64) -> Vec<Action> {
        let mut actions = Vec::new();
        let expired: Vec<FiveTuple> = self
            .allocations
            .iter()
            .filter(|(_, allocation)| allocation.expires <= now)
            .map(|(five_tuple, _)| *five_tuple)
            .collect();
        for five_tuple in expired {
            actions.extend(self.delete(five_tuple));
        }
        self.reservations.retain(|_, (_, expires)| *expires > now);
        self.allocate_rate.expire(now);
        for (&five_tuple, allocation) in &mut self.allocations {
            allocation.permissions.retain(|_, expires| *expires > now);
            allocation.channels.retain(|&number, channel| {
                let keep = channel.expires > now;
                if !keep {
                    actions.push(Action::Unload(channel_flows(
                        five_tuple,
                        channel.relay,
                        number,
                        channel.peer,
                    )));
                }
                keep
            });
        }
        actions
    }

    fn request(
        &mut self,
        now: u64,
        five_tuple: FiveTuple,
        method: stun_codec::Method,
        message: &TurnMessage,
    ) -> Vec<Action> {
        let (client, server) = five_tuple;
        // RFC 8489 14: comprehension-required attributes we do not know: 420.
        let unknown: Vec<_> = message
            .unknown_attributes()
            .map(|attribute| attribute.get_type())
            .filter(|attribute_type| attribute_type.is_comprehension_required())
            .collect();
        if !unknown.is_empty() {
            self.refused(now, client, "", Refusal(420, "Unknown Attribute"));
            let mut response = error_response(message, Refusal(420, "Unknown Attribute"));
            response.add_attribute(UnknownAttributes::new(unknown));
            return vec![self.send(server, client, response)];
        }
        if method == BINDING {
            let mut response = TurnMessage::new(
                MessageClass::SuccessResponse,
                BINDING,
                message.transaction_id(),
            );
            response.add_attribute(XorMappedAddress::new(client));
            return vec![self.send(server, client, response)];
        }
        if ![ALLOCATE, REFRESH, CREATE_PERMISSION, CHANNEL_BIND].contains(&method) {
            self.refused(now, client, "", Refusal(400, "Bad Request"));
            return vec![self.send(
                server,
                client,
                error_response(message, Refusal(400, "Bad Request")),
            )];
        }
        let signed = match self.authenticate(now, client, message) {
            Ok(signed) => signed,
            Err((refusal, challenge)) => {
                let signed = message.get_attribute::<MessageIntegrity>().is_some()
                    || message.get_attribute::<MessageIntegritySha256>().is_some();
                tracing::debug!(%client, method = ?method, code = refusal.0, reason = refusal.1, signed, "turn: request not authenticated");
                // The first 401 of every client is the challenge, not a failure.
                if signed || refusal.0 != 401 {
                    let username = message
                        .get_attribute::<Username>()
                        .map_or("", |u| u.name())
                        .to_owned();
                    self.refused(now, client, &username, refusal);
                }
                let mut response = error_response(message, refusal);
                if challenge {
                    response
                        .add_attribute(Realm::new(self.config.realm.clone()).expect("valid realm"));
                    response.add_attribute(
                        Nonce::new(self.nonces.issue(client, now)).expect("valid nonce"),
                    );
                }
                return vec![self.send(server, client, response)];
            }
        };
        let username = signed.username.clone();
        let mut actions = Vec::new();
        let result = match method {
            ALLOCATE => self.allocate(now, five_tuple, &username, message, &mut actions),
            REFRESH => self.refresh(now, five_tuple, &username, message, &mut actions),
            CREATE_PERMISSION => self.create_permission(now, five_tuple, &username, message),
            _ => self.channel_bind(now, five_tuple, &username, message, &mut actions),
        };
        let response = match result {
            Ok(response) => response,
            Err(refusal) => {
                tracing::debug!(%client, %username, method = ?method, code = refusal.0, reason = refusal.1, "turn: request refused");
                self.refused(now, client, &username, refusal);
                error_response(message, refusal)
            }
        };
        actions.push(self.send_signed(server, client, response, message, &signed));
        actions
    }

    /// Long-term credentials (RFC 8489 9.2): who signed the request, with
    /// MESSAGE-INTEGRITY-SHA256 when present (MESSAGE-INTEGRITY is then ignored, 9.2.4), else
    /// MESSAGE-INTEGRITY; or the refusal, and whether it carries a fresh REALM and NONCE.
    fn authenticate(
        &self,
        now: u64,
        client: SocketAddr,
        message: &TurnMessage,
    ) -> Result<Authenticated, (Refusal, bool)> {
        let challenge = |code, reason: &'static str| (Refusal(code, reason), true);
        let sha256 = message.get_attribute::<MessageIntegritySha256>();
        let sha1 = message.get_attribute::<MessageIntegrity>();
        if sha256.is_none() && sha1.is_none() {
            return Err(challenge(401, "Unauthorized"));
        }
        let (Some(username), Some(realm), Some(nonce)) = (
            message.get_attribute::<Username>(),
            message.get_attribute::<Realm>(),
            message.get_attribute::<Nonce>(),
        ) else {
            return Err((Refusal(400, "Bad Request"), false));
        };
        match self.nonces.check(nonce.value(), client, now) {
            NonceStatus::Valid => {}
            NonceStatus::Stale => return Err(challenge(438, "Stale Nonce")),
            NonceStatus::Invalid => return Err(challenge(401, "Unauthorized")),
        }
        if realm.text() != self.config.realm {
            return Err(challenge(401, "Unauthorized"));
        }
        let passwords = self
            .credentials
            .passwords(username.name(), now)
            .map_err(|_| challenge(401, "Unauthorized"))?;
        passwords
            .into_iter()
            .find(|password| match (sha256, sha1) {
                (Some(sha256), _) => {
                    sha256.check_long_term(username.name(), realm.text(), password)
                }
                (None, Some(sha1)) => sha1
                    .check_long_term_credential(username, realm, password)
                    .is_ok(),
                (None, None) => false,
            })
            .map(|password| Authenticated {
                username: username.name().to_owned(),
                password,
                sha256: sha256.is_some(),
            })
            .ok_or_else(|| challenge(401, "Unauthorized"))
    }

    fn allocate(
        &mut self,
        now: u64,
        five_tuple: FiveTuple,
        username: &str,
        message: &TurnMessage,
        actions: &mut Vec<Action>,
    ) -> Result<TurnMessage, Refusal> {
        if let Some(existing) = self.allocations.get(&five_tuple) {
            // RFC 8656 7.2: a retransmitted Allocate gets the original answer again.
            if existing.transaction == message.transaction_id()
                && existing.username == username
                && let Some(answer) = &existing.answer
            {
                return Ok(answer.clone());
            }
            return Err(Refusal(437, "Allocation Mismatch"));
        }
        let transport = message
            .get_attribute::<RequestedTransport>()
            .ok_or(Refusal(400, "Bad Request"))?;
        if transport.protocol() != UDP {
            return Err(Refusal(442, "Unsupported Transport Protocol"));
        }
        let even_port = message.get_attribute::<EvenPort>();
        let token = message
            .get_attribute::<ReservationToken>()
            .map(|t| t.token());
        let requested = message
            .get_attribute::<RequestedAddressFamily>()
            .map(|f| f.address_family());
        let additional = message
            .get_attribute::<AdditionalAddressFamily>()
            .map(|f| f.address_family());
        // RFC 8656 7.2: a reservation token says which port, so it goes with none of the
        // others; REQUESTED- and ADDITIONAL-ADDRESS-FAMILY exclude each other; the
        // additional family can only be IPv6.
        if (token.is_some() && (even_port.is_some() || requested.is_some() || additional.is_some()))
            || (requested.is_some() && additional.is_some())
            || additional == Some(AddressFamily::V4)
        {
            return Err(Refusal(400, "Bad Request"));
        }
        let primary_ip = match requested {
            None | Some(AddressFamily::V4) => self.config.relay_ipv4.map(IpAddr::V4),
            Some(AddressFamily::V6) => self.config.relay_ipv6.map(IpAddr::V6),
        }
        .ok_or(Refusal(440, "Address Family not Supported"))?;
        if !self.allocate_rate.admit(
            five_tuple.0.ip(),
            now,
            self.config.max_allocate_rate_per_source,
        ) {
            return Err(Refusal(486, "Allocation Rate Limit Reached"));
        }
        let users_allocations = self
            .allocations
            .values()
            .filter(|a| a.username == username)
            .count();
        if users_allocations >= self.config.max_allocations_per_user {
            return Err(Refusal(486, "Allocation Quota Reached"));
        }
        if self.allocations.len() >= self.config.max_allocations {
            return Err(Refusal(508, "Insufficient Capacity"));
        }
        let reserve = even_port.is_some_and(|e| e.is_requested());
        let relay = match token {
            Some(token) => {
                self.reservations
                    .remove(&token)
                    .filter(|(_, expires)| *expires > now)
                    .ok_or(Refusal(508, "Insufficient Capacity"))?
                    .0
            }
            None => self
                .free_port(primary_ip, even_port.is_some(), reserve)
                .ok_or(Refusal(508, "Insufficient Capacity"))?,
        };
        // The IPv6 side of a dual allocation; when it cannot be had, the IPv4 one still is,
        // and the answer says why in ADDRESS-ERROR-CODE (RFC 8656 7.2).
        let second = additional.map(|_| match self.config.relay_ipv6 {
            None => Err(Refusal(440, "Address Family not Supported")),
            Some(v6) => self
                .free_port(IpAddr::V6(v6), even_port.is_some(), false)
                .ok_or(Refusal(508, "Insufficient Capacity")),
        });
        let mut relays = vec![relay];
        relays.extend(second.and_then(Result::ok));
        let reservation = reserve.then(|| {
            let token = random_token();
            let next = SocketAddr::new(relay.ip(), relay.port() + 1);
            self.reservations
                .insert(token, (next, now + RESERVATION_LIFETIME));
            token
        });
        let lifetime = self.lifetime(message);
        let mut response = success_response(message);
        for relay in &relays {
            response.add_attribute(XorRelayAddress::new(*relay));
        }
        response.add_attribute(Lifetime::from_u32(lifetime as u32));
        response.add_attribute(XorMappedAddress::new(five_tuple.0));
        if let Some(token) = reservation {
            response.add_attribute(ReservationToken::new(token));
        }
        if let Some(Err(Refusal(code, reason))) = second {
            response.add_attribute(AddressErrorCode {
                family: AddressFamily::V6,
                code,
                reason: reason.to_owned(),
            });
        }
        let dont_fragment = message.get_attribute::<DontFragment>().is_some();
        for relay in &relays {
            self.by_relay.insert(*relay, five_tuple);
            actions.push(Action::OpenRelay {
                relay: *relay,
                dont_fragment,
            });
        }
        self.allocations.insert(
            five_tuple,
            Allocation {
                username: username.to_owned(),
                relays,
                expires: now + lifetime,
                transaction: message.transaction_id(),
                answer: Some(response.clone()),
                dont_fragment,
                permissions: HashMap::new(),
                channels: HashMap::new(),
            },
        );
        Ok(response)
    }

    /// A free relay address on `ip` in the port range: an even port when asked, and then
    /// with the odd port above it free too when a reservation is asked for.
    fn free_port(&self, ip: IpAddr, even: bool, reserve: bool) -> Option<SocketAddr> {
        let ports = self.config.ports.clone();
        let free = |port: u16| self.is_free(SocketAddr::new(ip, port));
        let port = ports.clone().find(|&port| {
            (!even || port % 2 == 0)
                && free(port)
                && (!reserve || (port < *ports.end() && free(port + 1)))
        })?;
        Some(SocketAddr::new(ip, port))
    }

    fn refresh(
        &mut self,
        now: u64,
        five_tuple: FiveTuple,
        username: &str,
        message: &TurnMessage,
        actions: &mut Vec<Action>,
    ) -> Result<TurnMessage, Refusal> {
        let requested = message
            .get_attribute::<Lifetime>()
            .map(|l| l.lifetime().as_secs());
        let lifetime = self.lifetime(message);
        let allocation = self.owned(five_tuple, username)?;
        let granted = if requested == Some(0) {
            actions.extend(self.delete(five_tuple));
            0
        } else {
            allocation.expires = now + lifetime;
            lifetime
        };
        let mut response = success_response(message);
        response.add_attribute(Lifetime::from_u32(granted as u32));
        Ok(response)
    }

    fn create_permission(
        &mut self,
        now: u64,
        five_tuple: FiveTuple,
        username: &str,
        message: &TurnMessage,
    ) -> Result<TurnMessage, Refusal> {
        let peers: Vec<SocketAddr> = message
            .attributes()
            .filter_map(|attribute| match attribute {
                Attribute::XorPeerAddress(peer) => Some(peer.address()),
                _ => None,
            })
            .collect();
        if peers.is_empty() {
            return Err(Refusal(400, "Bad Request"));
        }
        let policy = self.config.peers.clone();
        let allocation = self.owned(five_tuple, username)?;
        for peer in &peers {
            check_peer(allocation, *peer, &policy)?;
        }
        for peer in peers {
            allocation
                .permissions
                .insert(peer.ip(), now + PERMISSION_LIFETIME);
        }
        Ok(success_response(message))
    }

    fn channel_bind(
        &mut self,
        now: u64,
        five_tuple: FiveTuple,
        username: &str,
        message: &TurnMessage,
        actions: &mut Vec<Action>,
    ) -> Result<TurnMessage, Refusal> {
        let (Some(number), Some(peer)) = (
            message.get_attribute::<ChannelNumber>().map(|n| n.0),
            message
                .get_attribute::<XorPeerAddress>()
                .map(|p| p.address()),
        ) else {
            return Err(Refusal(400, "Bad Request"));
        };
        if !(relay_common::CHANNEL_MIN..=relay_common::CHANNEL_MAX).contains(&number) {
            return Err(Refusal(400, "Bad Request"));
        }
        let policy = self.config.peers.clone();
        let allocation = self.owned(five_tuple, username)?;
        let relay = check_peer(allocation, peer, &policy)?;
        // RFC 8656 11.2: a channel is bound to one peer, and a peer to one channel.
        let clash = allocation
            .channels
            .iter()
            .any(|(n, channel)| (*n == number) != (channel.peer == peer));
        if clash {
            return Err(Refusal(400, "Bad Request"));
        }
        let new = allocation
            .channels
            .insert(
                number,
                Channel {
                    peer,
                    relay,
                    expires: now + CHANNEL_LIFETIME,
                },
            )
            .is_none();
        allocation
            .permissions
            .insert(peer.ip(), now + PERMISSION_LIFETIME);
        if new {
            actions.push(Action::Offload(channel_flows(
                five_tuple, relay, number, peer,
            )));
        }
        Ok(success_response(message))
    }

    fn send_indication(
        &mut self,
        now: u64,
        five_tuple: FiveTuple,
        message: &TurnMessage,
    ) -> Vec<Action> {
        let (Some(allocation), Some(peer), Some(data)) = (
            self.allocations.get(&five_tuple),
            message
                .get_attribute::<XorPeerAddress>()
                .map(|p| p.address()),
            message.get_attribute::<Data>(),
        ) else {
            return Vec::new();
        };
        let Some(relay) = allocation.relay_for(peer) else {
            return Vec::new();
        };
        if !allocation.permits(peer.ip(), now) {
            return Vec::new();
        }
        vec![Action::Send {
            from: relay,
            to: peer,
            bytes: data.data().to_vec(),
        }]
    }

    fn channel_data_from_client(
        &mut self,
        now: u64,
        five_tuple: FiveTuple,
        number: u16,
        data: Vec<u8>,
    ) -> Vec<Action> {
        let Some(allocation) = self.allocations.get(&five_tuple) else {
            return Vec::new();
        };
        let Some(channel) = allocation.channels.get(&number).filter(|c| c.expires > now) else {
            return Vec::new();
        };
        if !allocation.permits(channel.peer.ip(), now) {
            return Vec::new();
        }
        vec![Action::Send {
            from: channel.relay,
            to: channel.peer,
            bytes: data,
        }]
    }

    /// Whether a relay address is neither allocated nor reserved.
    fn is_free(&self, relay: SocketAddr) -> bool {
        !self.by_relay.contains_key(&relay)
            && !self
                .reservations
                .values()
                .any(|(reserved, _)| *reserved == relay)
    }

    /// The allocation of `five_tuple`, if `username` made it.
    fn owned(&mut self, five_tuple: FiveTuple, username: &str) -> Result<&mut Allocation, Refusal> {
        let allocation = self
            .allocations
            .get_mut(&five_tuple)
            .ok_or(Refusal(437, "Allocation Mismatch"))?;
        if allocation.username != username {
            return Err(Refusal(441, "Wrong Credentials"));
        }
        Ok(allocation)
    }

    fn delete(&mut self, five_tuple: FiveTuple) -> Vec<Action> {
        let Some(allocation) = self.allocations.remove(&five_tuple) else {
            return Vec::new();
        };
        for relay in &allocation.relays {
            self.by_relay.remove(relay);
        }
        let mut actions: Vec<Action> = allocation
            .channels
            .iter()
            .map(|(number, channel)| {
                Action::Unload(channel_flows(
                    five_tuple,
                    channel.relay,
                    *number,
                    channel.peer,
                ))
            })
            .collect();
        actions.extend(allocation.relays.iter().copied().map(Action::CloseRelay));
        actions
    }

    /// The lifetime to grant (RFC 8656 7.2): what the client asks for, at least the default
    /// and at most the maximum.
    fn lifetime(&self, message: &TurnMessage) -> u64 {
        message
            .get_attribute::<Lifetime>()
            .map_or(self.config.default_lifetime, |l| l.lifetime().as_secs())
            .clamp(self.config.default_lifetime, self.config.max_lifetime)
    }

    fn send(&self, from: SocketAddr, to: SocketAddr, mut message: TurnMessage) -> Action {
        message.add_attribute(Software::new(self.config.software.clone()).expect("valid software"));
        if let Ok(fingerprint) = Fingerprint::new(&message) {
            message.add_attribute(fingerprint);
        }
        Action::Send {
            from,
            to,
            bytes: message::encode(message),
        }
    }

    /// A response to an authenticated request: signed with the request's credentials.
    fn send_signed(
        &self,
        from: SocketAddr,
        to: SocketAddr,
        mut response: TurnMessage,
        request: &TurnMessage,
        signed: &Authenticated,
    ) -> Action {
        response
            .add_attribute(Software::new(self.config.software.clone()).expect("valid software"));
        if let (Some(username), Some(realm)) = (
            request.get_attribute::<Username>(),
            request.get_attribute::<Realm>(),
        ) {
            // RFC 8489 9.2.4: the response is signed as the request was.
            if signed.sha256 {
                if let Ok(integrity) = MessageIntegritySha256::new_long_term(
                    &response,
                    username.name(),
                    realm.text(),
                    &signed.password,
                ) {
                    response.add_attribute(integrity);
                }
            } else if let Ok(integrity) = MessageIntegrity::new_long_term_credential(
                &response,
                username,
                realm,
                &signed.password,
            ) {
                response.add_attribute(integrity);
            }
        }
        if let Ok(fingerprint) = Fingerprint::new(&response) {
            response.add_attribute(fingerprint);
        }
        Action::Send {
            from,
            to,
            bytes: message::encode(response),
        }
    }
}

/// The two flows of a bound channel: client -> listener (ChannelData on `number`) becomes
/// relay -> peer, and peer -> relay becomes listener -> client with the header added.
pub(crate) fn channel_flows(
    (client, server): FiveTuple,
    relay: SocketAddr,
    number: u16,
    peer: SocketAddr,
) -> [FlowSpec; 2] {
    let to_peer = FlowSpec {
        src: client,
        dst: server,
        new_src: relay,
        new_dst: peer,
        channel: Some(ChannelOp::Strip(number)),
        rtcp_to_userspace: false,
    };
    [to_peer, to_peer.reverse()]
}

/// RFC 8656 9/10 and RFC 6156: the peer must be of a relayed address's family (443), and
/// the peer policy must let it through (403). The relayed address of its family, if so.
fn check_peer(
    allocation: &Allocation,
    peer: SocketAddr,
    policy: &PeerPolicy,
) -> Result<SocketAddr, Refusal> {
    let relay = allocation
        .relay_for(peer)
        .ok_or(Refusal(443, "Peer Address Family Mismatch"))?;
    if !policy.permits(peer.ip()) {
        return Err(Refusal(403, "Forbidden"));
    }
    Ok(relay)
}

fn error_response(request: &TurnMessage, Refusal(code, reason): Refusal) -> TurnMessage {
    let mut response = TurnMessage::new(
        MessageClass::ErrorResponse,
        request.method(),
        request.transaction_id(),
    );
    response.add_attribute(ErrorCode::new(code, reason.to_owned()).expect("valid error code"));
    response
}

fn success_response(request: &TurnMessage) -> TurnMessage {
    TurnMessage::new(
        MessageClass::SuccessResponse,
        request.method(),
        request.transaction_id(),
    )
}

fn transaction_id() -> TransactionId {
    let mut id = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .expect("system random works");
    TransactionId::new(id)
}

/// Reservation tokens are unguessable, so only the client given one can use the port.
fn random_token() -> u64 {
    let mut token = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut token)
        .expect("system random works");
    u64::from_ne_bytes(token)
}

#[cfg(test)]
mod tests {
    use bytecodec::DecodeExt;
    use stun_codec::{Message, MessageDecoder, Method};

    use super::*;
    use crate::turn::credentials::rest_api_password;

    const T0: u64 = 1_700_000_000;
    const REALM: &str = "relay.example";

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn server() -> TurnServer {
        let config = ServerConfig {
            realm: REALM.to_owned(),
            software: "relay test".to_owned(),
            relay_ipv4: Some(Ipv4Addr::new(203, 0, 113, 1)),
            relay_ipv6: None,
            ports: 49152..=49153,
            default_lifetime: 600,
            max_lifetime: 3600,
            nonce_lifetime: 600,
            max_allocations: 100,
            max_allocations_per_user: 1,
            peers: PeerPolicy {
                allowed: vec!["10.0.0.5".parse().unwrap()],
                denied: vec!["198.18.0.0/15".parse().unwrap()],
            },
            max_allocate_rate_per_source: 3,
        };
        TurnServer::new(
            config,
            Credentials::new(
                [
                    ("alice".into(), "wonderland".into()),
                    ("bob".into(), "builder".into()),
                ],
                vec!["north".into()],
            ),
        )
    }

    const LISTENER: &str = "203.0.113.1:3478";
    const ALICE: &str = "198.51.100.7:50000";
    const PEER: &str = "192.0.2.44:6000";

    /// A TURN client's view: builds requests signed with long-term credentials, reads answers.
    struct Client {
        from: SocketAddr,
        username: String,
        password: String,
        nonce: Option<String>,
        /// Sign with MESSAGE-INTEGRITY-SHA256 instead of MESSAGE-INTEGRITY.
        sha256: bool,
        /// Every request gets a transaction id of its own, as RFC 8489 asks.
        transactions: std::cell::Cell<u8>,
    }

    impl Client {
        fn new(from: &str, username: &str, password: &str) -> Client {
            Client {
                from: addr(from),
                username: username.to_owned(),
                password: password.to_owned(),
                nonce: None,
                sha256: false,
                transactions: std::cell::Cell::new(0),
            }
        }

        fn request(&self, method: Method, attributes: Vec<Attribute>) -> Vec<u8> {
            let transaction = self.transactions.get().wrapping_add(1);
            self.transactions.set(transaction);
            let mut message = Message::new(
                MessageClass::Request,
                method,
                TransactionId::new([transaction; 12]),
            );
            for attribute in attributes {
                message.add_attribute(attribute);
            }
            if let Some(nonce) = &self.nonce {
                let username = Username::new(self.username.clone()).unwrap();
                let realm = Realm::new(REALM.to_owned()).unwrap();
                message.add_attribute(username.clone());
                message.add_attribute(realm.clone());
                message.add_attribute(Nonce::new(nonce.clone()).unwrap());
                if self.sha256 {
                    let integrity = MessageIntegritySha256::new_long_term(
                        &message,
                        &self.username,
                        REALM,
                        &self.password,
                    )
                    .unwrap();
                    message.add_attribute(integrity);
                    return message::encode(message);
                }
                let integrity = MessageIntegrity::new_long_term_credential(
                    &message,
                    &username,
                    &realm,
                    &self.password,
                )
                .unwrap();
                message.add_attribute(integrity);
            }
            message::encode(message)
        }

        /// Sends a request, answering the first 401 with credentials as a client does.
        fn call(
            &mut self,
            server: &mut TurnServer,
            now: u64,
            method: Method,
            attributes: Vec<Attribute>,
        ) -> (TurnMessage, Vec<Action>) {
            let (response, actions) = self.send(server, now, method, attributes.clone());
            if response.class() == MessageClass::ErrorResponse
                && [401, 438].contains(&code(&response))
                && self.nonce_from(&response)
            {
                return self.send(server, now, method, attributes);
            }
            (response, actions)
        }

        fn nonce_from(&mut self, response: &TurnMessage) -> bool {
            let fresh = response
                .get_attribute::<Nonce>()
                .map(|n| n.value().to_owned());
            let changed = fresh.is_some() && fresh != self.nonce;
            self.nonce = fresh.or(self.nonce.take());
            changed
        }

        fn send(
            &self,
            server: &mut TurnServer,
            now: u64,
            method: Method,
            attributes: Vec<Attribute>,
        ) -> (TurnMessage, Vec<Action>) {
            let mut actions = server.from_client(
                now,
                addr(LISTENER),
                self.from,
                &self.request(method, attributes),
            );
            let position = actions
                .iter()
                .position(|a| matches!(a, Action::Send { to, .. } if *to == self.from))
                .expect("a response");
            let Action::Send { bytes, from, .. } = actions.remove(position) else {
                unreachable!()
            };
            assert_eq!(from, addr(LISTENER));
            (decode(&bytes), actions)
        }

        fn allocate(&mut self, server: &mut TurnServer, now: u64) -> SocketAddr {
            let (response, actions) = self.call(
                server,
                now,
                ALLOCATE,
                vec![RequestedTransport::new(UDP).into()],
            );
            assert_eq!(
                response.class(),
                MessageClass::SuccessResponse,
                "{response:?}"
            );
            let relay = response
                .get_attribute::<XorRelayAddress>()
                .unwrap()
                .address();
            assert_eq!(
                actions,
                [Action::OpenRelay {
                    relay,
                    dont_fragment: false
                }]
            );
            relay
        }
    }

    fn decode(bytes: &[u8]) -> TurnMessage {
        MessageDecoder::<Attribute>::new()
            .decode_from_bytes(bytes)
            .unwrap()
            .unwrap()
    }

    fn code(response: &TurnMessage) -> u16 {
        response
            .get_attribute::<ErrorCode>()
            .map_or(0, |e| e.code())
    }

    fn peer(address: &str) -> Attribute {
        XorPeerAddress::new(addr(address)).into()
    }

    #[test]
    fn binding_answers_with_the_mapped_address_without_credentials() {
        let mut server = server();
        let (response, _) = Client::new(ALICE, "", "").send(&mut server, T0, BINDING, vec![]);
        assert_eq!(response.class(), MessageClass::SuccessResponse);
        assert_eq!(
            response
                .get_attribute::<XorMappedAddress>()
                .unwrap()
                .address(),
            addr(ALICE)
        );
    }

    #[test]
    fn allocate_challenges_then_allocates_and_signs_its_answer() {
        let mut server = server();
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        let (challenge, actions) = alice.send(
            &mut server,
            T0,
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into()],
        );
        assert_eq!(code(&challenge), 401);
        assert_eq!(challenge.get_attribute::<Realm>().unwrap().text(), REALM);
        assert!(actions.is_empty());
        alice.nonce_from(&challenge);
        let (response, actions) = alice.send(
            &mut server,
            T0,
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into()],
        );
        assert_eq!(response.class(), MessageClass::SuccessResponse);
        let relay = response
            .get_attribute::<XorRelayAddress>()
            .unwrap()
            .address();
        assert_eq!(relay, addr("203.0.113.1:49152"));
        assert_eq!(
            actions,
            [Action::OpenRelay {
                relay,
                dont_fragment: false
            }]
        );
        assert_eq!(
            response
                .get_attribute::<Lifetime>()
                .unwrap()
                .lifetime()
                .as_secs(),
            600
        );
        let integrity = response
            .get_attribute::<MessageIntegrity>()
            .expect("signed");
        integrity
            .check_long_term_credential(
                &Username::new("alice".into()).unwrap(),
                &Realm::new(REALM.into()).unwrap(),
                "wonderland",
            )
            .expect("signed with alice's key");
        assert_eq!(server.allocations().len(), 1);
    }

    #[test]
    fn credential_errors() {
        let mut server = server();
        let mut wrong = Client::new(ALICE, "alice", "looking-glass");
        let (response, _) = wrong.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into()],
        );
        assert_eq!(code(&response), 401, "wrong password");
        let mut stranger = Client::new(ALICE, "mallory", "x");
        let (response, _) = stranger.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into()],
        );
        assert_eq!(code(&response), 401, "unknown user");

        // A nonce older than its lifetime: 438 with a fresh one, which then works.
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        let (challenge, _) = alice.send(&mut server, T0, ALLOCATE, vec![]);
        alice.nonce_from(&challenge);
        let (response, _) = alice.send(
            &mut server,
            T0 + 601,
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into()],
        );
        assert_eq!(code(&response), 438);
        assert!(alice.nonce_from(&response), "438 carries a new nonce");
        let (response, _) = alice.send(
            &mut server,
            T0 + 601,
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into()],
        );
        assert_eq!(response.class(), MessageClass::SuccessResponse);
        assert!(server.allocations().len() == 1);
    }

    #[test]
    fn rest_api_credentials_allocate_until_they_expire() {
        let mut server = server();
        let username = format!("{}:carol", T0 + 3600);
        let password = rest_api_password("north", &username);
        let mut carol = Client::new(ALICE, &username, &password);
        carol.allocate(&mut server, T0);
        let expired = format!("{}:carol", T0 - 1);
        let mut late = Client::new(
            "198.51.100.8:50000",
            &expired,
            &rest_api_password("north", &expired),
        );
        let (response, _) = late.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into()],
        );
        assert_eq!(code(&response), 401);
    }

    #[test]
    fn allocate_refusals() {
        let mut server = server();
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        let (response, _) = alice.call(&mut server, T0, ALLOCATE, vec![]);
        assert_eq!(code(&response), 400, "no REQUESTED-TRANSPORT");
        let (response, _) = alice.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![RequestedTransport::new(6).into()],
        );
        assert_eq!(code(&response), 442, "TCP");
        let (response, _) = alice.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![
                RequestedTransport::new(UDP).into(),
                RequestedAddressFamily::new(AddressFamily::V6).into(),
            ],
        );
        assert_eq!(code(&response), 440, "no IPv6 relay address");
        alice.allocate(&mut server, T0);
        let (response, _) = alice.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into()],
        );
        assert_eq!(
            code(&response),
            437,
            "second allocation on the same 5-tuple"
        );
        let mut alice_again = Client::new("198.51.100.7:50001", "alice", "wonderland");
        let (response, _) = alice_again.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into()],
        );
        assert_eq!(code(&response), 486, "one allocation per user");
        let mut bob = Client::new("198.51.100.9:50000", "bob", "builder");
        bob.allocate(&mut server, T0);
        let mut carol = Client::new(
            "198.51.100.10:50000",
            &format!("{}:carol", T0 + 60),
            &rest_api_password("north", &format!("{}:carol", T0 + 60)),
        );
        let (response, _) = carol.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into()],
        );
        assert_eq!(code(&response), 508, "the two relay ports are taken");
        assert_eq!(server.allocations().len(), 2);
    }

    #[test]
    fn unknown_comprehension_required_attributes_get_420() {
        let mut server = server();
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        // An unknown type needs raw bytes: take a Binding request and append attribute
        // 0x7777 (comprehension-required range).
        let mut bytes = alice.request(BINDING, vec![]);
        bytes.extend_from_slice(&[0x77, 0x77, 0, 4, 1, 2, 3, 4]);
        let length = (bytes.len() - 20) as u16;
        bytes[2..4].copy_from_slice(&length.to_be_bytes());
        let actions = server.from_client(T0, addr(LISTENER), addr(ALICE), &bytes);
        let Action::Send { bytes, .. } = &actions[0] else {
            panic!("{actions:?}")
        };
        let response = decode(bytes);
        assert_eq!(code(&response), 420);
        assert_eq!(
            response
                .get_attribute::<UnknownAttributes>()
                .unwrap()
                .unknowns()[0]
                .as_u16(),
            0x7777
        );
        // A known attribute the server does not act on yet (EVEN-PORT) is no reason for 420.
        let (response, _) = alice.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![
                EvenPort::new(false).into(),
                RequestedTransport::new(UDP).into(),
            ],
        );
        assert_eq!(
            response.class(),
            MessageClass::SuccessResponse,
            "{response:?}"
        );
    }

    #[test]
    fn even_port_reserves_the_next_port_for_its_token() {
        let mut server = server();
        let transport = || -> Attribute { RequestedTransport::new(UDP).into() };
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        let (response, _) = alice.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![transport(), EvenPort::new(true).into()],
        );
        let relay = response
            .get_attribute::<XorRelayAddress>()
            .unwrap()
            .address();
        assert_eq!(relay.port(), 49152);
        let token = response
            .get_attribute::<ReservationToken>()
            .expect("a token")
            .token();
        let mut bob = Client::new("198.51.100.9:50000", "bob", "builder");
        let (response, _) = bob.call(&mut server, T0, ALLOCATE, vec![transport()]);
        assert_eq!(code(&response), 508, "the reserved port is nobody else's");
        let (response, _) = bob.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![transport(), ReservationToken::new(token ^ 1).into()],
        );
        assert_eq!(code(&response), 508, "a token that was never given");
        let (response, _) = bob.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![
                transport(),
                ReservationToken::new(token).into(),
                EvenPort::new(false).into(),
            ],
        );
        assert_eq!(code(&response), 400, "a token goes without EVEN-PORT");
        let (response, _) = bob.call(
            &mut server,
            T0 + 10,
            ALLOCATE,
            vec![transport(), ReservationToken::new(token).into()],
        );
        assert_eq!(
            response
                .get_attribute::<XorRelayAddress>()
                .unwrap()
                .address()
                .port(),
            49153
        );
        assert!(response.get_attribute::<ReservationToken>().is_none());
    }

    #[test]
    fn reservations_expire() {
        let mut server = server();
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        let (response, _) = alice.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![
                RequestedTransport::new(UDP).into(),
                EvenPort::new(true).into(),
            ],
        );
        let token = response
            .get_attribute::<ReservationToken>()
            .unwrap()
            .token();
        server.expire(T0 + RESERVATION_LIFETIME);
        let mut bob = Client::new("198.51.100.9:50000", "bob", "builder");
        let (response, _) = bob.call(
            &mut server,
            T0 + 31,
            ALLOCATE,
            vec![
                RequestedTransport::new(UDP).into(),
                ReservationToken::new(token).into(),
            ],
        );
        assert_eq!(code(&response), 508, "an expired token");
        let relay = bob.allocate(&mut server, T0 + 31);
        assert_eq!(relay.port(), 49153, "the port is free again");
    }

    #[test]
    fn permissions_relay_send_and_data_indications_until_they_expire() {
        let mut server = server();
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        let relay = alice.allocate(&mut server, T0);
        // No permission yet: peer data is dropped.
        assert!(server.from_peer(T0, relay, addr(PEER), b"hello").is_empty());
        let (response, _) = alice.call(&mut server, T0, CREATE_PERMISSION, vec![peer(PEER)]);
        assert_eq!(response.class(), MessageClass::SuccessResponse);
        let mut send =
            TurnMessage::new(MessageClass::Indication, SEND, TransactionId::new([1; 12]));
        send.add_attribute(XorPeerAddress::new(addr(PEER)));
        send.add_attribute(Data::new(b"to peer".to_vec()).unwrap());
        let actions = server.from_client(
            T0 + 1,
            addr(LISTENER),
            addr(ALICE),
            &message::encode(send.clone()),
        );
        assert_eq!(
            actions,
            [Action::Send {
                from: relay,
                to: addr(PEER),
                bytes: b"to peer".to_vec()
            }]
        );
        let actions = server.from_peer(T0 + 1, relay, addr(PEER), b"to client");
        let [Action::Send { from, to, bytes }] = &actions[..] else {
            panic!("{actions:?}")
        };
        assert_eq!((*from, *to), (addr(LISTENER), addr(ALICE)));
        let data = decode(bytes);
        assert_eq!(
            (data.class(), data.method()),
            (MessageClass::Indication, DATA)
        );
        assert_eq!(data.get_attribute::<Data>().unwrap().data(), b"to client");
        // Permissions last 300 s.
        server.expire(T0 + PERMISSION_LIFETIME);
        assert!(
            server
                .from_peer(T0 + PERMISSION_LIFETIME, relay, addr(PEER), b"late")
                .is_empty()
        );
        assert!(
            server
                .from_client(
                    T0 + PERMISSION_LIFETIME,
                    addr(LISTENER),
                    addr(ALICE),
                    &message::encode(send)
                )
                .is_empty()
        );
    }

    #[test]
    fn channel_bind_offloads_and_relays_channel_data() {
        let mut server = server();
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        let relay = alice.allocate(&mut server, T0);
        let (response, actions) = alice.call(
            &mut server,
            T0,
            CHANNEL_BIND,
            vec![ChannelNumber(0x4001).into(), peer(PEER)],
        );
        assert_eq!(response.class(), MessageClass::SuccessResponse);
        let to_peer = FlowSpec {
            src: addr(ALICE),
            dst: addr(LISTENER),
            new_src: relay,
            new_dst: addr(PEER),
            channel: Some(ChannelOp::Strip(0x4001)),
            rtcp_to_userspace: false,
        };
        assert_eq!(actions, [Action::Offload([to_peer, to_peer.reverse()])]);
        // Refreshing the binding offloads nothing new.
        let (_, actions) = alice.call(
            &mut server,
            T0 + 100,
            CHANNEL_BIND,
            vec![ChannelNumber(0x4001).into(), peer(PEER)],
        );
        assert!(actions.is_empty());
        let actions = server.from_client(
            T0 + 100,
            addr(LISTENER),
            addr(ALICE),
            &message::channel_data(0x4001, b"rtp"),
        );
        assert_eq!(
            actions,
            [Action::Send {
                from: relay,
                to: addr(PEER),
                bytes: b"rtp".to_vec()
            }]
        );
        let actions = server.from_peer(T0 + 100, relay, addr(PEER), b"rtp back");
        assert_eq!(
            actions,
            [Action::Send {
                from: addr(LISTENER),
                to: addr(ALICE),
                bytes: message::channel_data(0x4001, b"rtp back")
            }]
        );
        // One channel per peer, one peer per channel.
        for (number, peer_address) in [(0x4002, PEER), (0x4001, "192.0.2.45:6000")] {
            let (response, _) = alice.call(
                &mut server,
                T0 + 100,
                CHANNEL_BIND,
                vec![ChannelNumber(number).into(), peer(peer_address)],
            );
            assert_eq!(code(&response), 400, "{number:#x} -> {peer_address}");
        }
        // Numbers outside 0x4000..=0x7ffe (RFC 5766, which coturn's client still uses).
        for number in [0x3fff, 0x7fff] {
            let (response, _) = alice.call(
                &mut server,
                T0 + 100,
                CHANNEL_BIND,
                vec![ChannelNumber(number).into(), peer("192.0.2.47:6000")],
            );
            assert_eq!(code(&response), 400, "{number:#x}");
        }
        // The binding, refreshed at T0 + 100, expires at T0 + 700, before the allocation.
        let _ = alice.call(
            &mut server,
            T0 + 100,
            REFRESH,
            vec![Lifetime::from_u32(3600).into()],
        );
        let actions = server.expire(T0 + 100 + CHANNEL_LIFETIME);
        assert_eq!(actions, [Action::Unload([to_peer, to_peer.reverse()])]);
    }

    #[test]
    fn peer_policy() {
        let mut server = server();
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        alice.allocate(&mut server, T0);
        for denied in [
            "127.0.0.1:1",
            "10.1.2.3:5004",
            "169.254.1.1:1",
            "224.0.0.1:1",
            "0.0.0.0:1",
            "192.168.1.1:1",
            "198.19.0.1:1",
        ] {
            let (response, _) = alice.call(&mut server, T0, CREATE_PERMISSION, vec![peer(denied)]);
            assert_eq!(code(&response), 403, "{denied}");
        }
        // Counted by reason for the metrics; the 401 challenge of the first request is not
        // a refusal.
        assert_eq!(server.refusals(), [(403, "Forbidden", 7)]);
        let (response, _) = alice.call(
            &mut server,
            T0,
            CREATE_PERMISSION,
            vec![peer("[2001:db8::1]:5004")],
        );
        assert_eq!(code(&response), 443, "IPv6 peer on an IPv4 allocation");
        let (response, _) = alice.call(
            &mut server,
            T0,
            CREATE_PERMISSION,
            vec![peer("10.0.0.5:5004")],
        );
        assert_eq!(
            response.class(),
            MessageClass::SuccessResponse,
            "allowed by configuration"
        );
        let (response, _) = alice.call(&mut server, T0, CREATE_PERMISSION, vec![]);
        assert_eq!(code(&response), 400, "no XOR-PEER-ADDRESS");
    }

    #[test]
    fn refresh_keeps_or_deletes_and_only_the_owner_may() {
        let mut server = server();
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        let relay = alice.allocate(&mut server, T0);
        let (response, _) = alice.call(
            &mut server,
            T0 + 500,
            REFRESH,
            vec![Lifetime::from_u32(1200).into()],
        );
        assert_eq!(
            response
                .get_attribute::<Lifetime>()
                .unwrap()
                .lifetime()
                .as_secs(),
            1200
        );
        let _ = alice.call(
            &mut server,
            T0 + 500,
            CHANNEL_BIND,
            vec![ChannelNumber(0x4001).into(), peer(PEER)],
        );
        assert!(
            server
                .expire(T0 + 1000)
                .iter()
                .all(|a| !matches!(a, Action::CloseRelay(_))),
            "refreshed"
        );
        // Bob on Alice's 5-tuple (a NAT rebinding, say) may not touch her allocation.
        let mut bob = Client::new(ALICE, "bob", "builder");
        let (response, _) = bob.call(&mut server, T0 + 1000, REFRESH, vec![]);
        assert_eq!(code(&response), 441);
        let (response, actions) = alice.call(
            &mut server,
            T0 + 1000,
            REFRESH,
            vec![Lifetime::from_u32(0).into()],
        );
        assert_eq!(
            response
                .get_attribute::<Lifetime>()
                .unwrap()
                .lifetime()
                .as_secs(),
            0
        );
        assert!(actions.contains(&Action::CloseRelay(relay)));
        assert!(
            actions.iter().any(|a| matches!(a, Action::Unload(_))),
            "the channel's flows go too"
        );
        assert!(server.allocations().is_empty());
        let (response, _) = alice.call(&mut server, T0 + 1000, REFRESH, vec![]);
        assert_eq!(code(&response), 437);
    }

    #[test]
    fn allocations_expire_with_their_lifetime() {
        let mut server = server();
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        let relay = alice.allocate(&mut server, T0);
        assert!(server.expire(T0 + 599).is_empty());
        assert_eq!(server.expire(T0 + 600), [Action::CloseRelay(relay)]);
        assert!(
            server
                .from_peer(T0 + 600, relay, addr(PEER), b"x")
                .is_empty()
        );
    }

    #[test]
    fn malformed_input_changes_nothing_and_panics_nowhere() {
        let mut server = server();
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        alice.allocate(&mut server, T0);
        let before = server.allocations();
        let request = alice.request(REFRESH, vec![Lifetime::from_u32(0).into()]);
        let mut inputs: Vec<Vec<u8>> = (0..request.len()).map(|n| request[..n].to_vec()).collect();
        let mut bad_length = request.clone();
        bad_length[3] = bad_length[3].wrapping_add(4);
        inputs.push(bad_length);
        let mut bad_integrity = request.clone();
        let last = bad_integrity.len() - 1;
        bad_integrity[last] ^= 0xff;
        inputs.push(bad_integrity);
        inputs.push(message::channel_data(0x4001, b"no channel bound"));
        inputs.push(vec![0x40, 0x01, 0xff, 0xff, 1, 2]);
        inputs.push(vec![0x80; 12]);
        for input in &inputs {
            for action in server.from_client(T0, addr(LISTENER), addr(ALICE), input) {
                assert!(
                    matches!(action, Action::Send { .. }),
                    "{input:02x?}: {action:?}"
                );
            }
        }
        assert_eq!(server.allocations(), before);
    }

    fn reason(response: &TurnMessage) -> String {
        response
            .get_attribute::<ErrorCode>()
            .map_or(String::new(), |e| e.reason_phrase().to_owned())
    }

    fn relays(response: &TurnMessage) -> Vec<SocketAddr> {
        response
            .attributes()
            .filter_map(|attribute| match attribute {
                Attribute::XorRelayAddress(relay) => Some(relay.address()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_retransmitted_allocate_gets_the_same_answer_and_allocates_once() {
        let mut server = server();
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        let (challenge, _) = alice.send(&mut server, T0, BINDING, vec![]);
        assert_eq!(challenge.class(), MessageClass::SuccessResponse);
        let (challenge, _) = alice.send(
            &mut server,
            T0,
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into()],
        );
        alice.nonce_from(&challenge);
        let request = alice.request(ALLOCATE, vec![RequestedTransport::new(UDP).into()]);
        let first = server.from_client(T0, addr(LISTENER), addr(ALICE), &request);
        // The answer was lost; the client sends the same request again.
        let again = server.from_client(T0 + 1, addr(LISTENER), addr(ALICE), &request);
        let answer = |actions: &[Action]| {
            actions
                .iter()
                .find_map(|action| match action {
                    Action::Send { bytes, .. } => Some(decode(bytes)),
                    _ => None,
                })
                .unwrap()
        };
        assert_eq!(answer(&first).class(), MessageClass::SuccessResponse);
        assert_eq!(answer(&again).class(), MessageClass::SuccessResponse);
        assert_eq!(relays(&answer(&first)), relays(&answer(&again)));
        assert_eq!(first.len(), 2, "answer and OpenRelay: {first:?}");
        assert_eq!(again.len(), 1, "the answer only: {again:?}");
        assert_eq!(server.allocations().len(), 1);
        // A new Allocate (new transaction) on the same 5-tuple is still a mismatch.
        let (response, _) = alice.call(
            &mut server,
            T0 + 1,
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into()],
        );
        assert_eq!(code(&response), 437);
    }

    #[test]
    fn additional_address_family_allocates_both_families() {
        let mut server = server();
        server.config.relay_ipv6 = Some("2001:db8::1".parse().unwrap());
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        let (response, actions) = alice.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![
                RequestedTransport::new(UDP).into(),
                AdditionalAddressFamily::new(AddressFamily::V6).into(),
            ],
        );
        assert_eq!(
            response.class(),
            MessageClass::SuccessResponse,
            "{response:?}"
        );
        let [v4, v6] = relays(&response)[..] else {
            panic!("two relayed addresses: {response:?}")
        };
        assert_eq!(
            (v4, v6),
            (addr("203.0.113.1:49152"), addr("[2001:db8::1]:49152"))
        );
        assert_eq!(actions.len(), 2, "{actions:?}");
        assert_eq!(server.allocations()[0].relays, [v4, v6]);
        // Each peer is reached from the relayed address of its family.
        let v6_peer = "[2001:db8:5::9]:7000";
        let (response, actions) = alice.call(
            &mut server,
            T0,
            CHANNEL_BIND,
            vec![ChannelNumber(0x4002).into(), peer(v6_peer)],
        );
        assert_eq!(response.class(), MessageClass::SuccessResponse);
        let Action::Offload([to_peer, _]) = actions[0] else {
            panic!("{actions:?}")
        };
        assert_eq!((to_peer.new_src, to_peer.new_dst), (v6, addr(v6_peer)));
        let actions = server.from_peer(T0, v4, addr(v6_peer), b"wrong family");
        assert!(actions.is_empty(), "{actions:?}");
        let (response, _) = alice.call(&mut server, T0, CREATE_PERMISSION, vec![peer(PEER)]);
        assert_eq!(response.class(), MessageClass::SuccessResponse);
        let actions = server.from_client(T0, addr(LISTENER), addr(ALICE), &{
            let mut send = TurnMessage::new(MessageClass::Indication, SEND, transaction_id());
            send.add_attribute(XorPeerAddress::new(addr(PEER)));
            send.add_attribute(Data::new(b"v4".to_vec()).unwrap());
            message::encode(send)
        });
        assert!(
            matches!(&actions[..], [Action::Send { from, .. }] if *from == v4),
            "{actions:?}"
        );
        // Deleting the allocation closes both.
        let (_, actions) = alice.call(&mut server, T0, REFRESH, vec![Lifetime::from_u32(0).into()]);
        assert!(actions.contains(&Action::CloseRelay(v4)), "{actions:?}");
        assert!(actions.contains(&Action::CloseRelay(v6)), "{actions:?}");
    }

    #[test]
    fn additional_address_family_errors() {
        let mut server = server();
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        for (attributes, why) in [
            (
                vec![AdditionalAddressFamily::new(AddressFamily::V4).into()],
                "the additional family can only be IPv6",
            ),
            (
                vec![
                    AdditionalAddressFamily::new(AddressFamily::V6).into(),
                    RequestedAddressFamily::new(AddressFamily::V4).into(),
                ],
                "requested and additional together",
            ),
            (
                vec![
                    AdditionalAddressFamily::new(AddressFamily::V6).into(),
                    ReservationToken::new(7).into(),
                ],
                "a reservation token names one address",
            ),
        ] {
            let mut attributes: Vec<Attribute> = attributes;
            attributes.insert(0, RequestedTransport::new(UDP).into());
            let (response, _) = alice.call(&mut server, T0, ALLOCATE, attributes);
            assert_eq!(code(&response), 400, "{why}");
        }
        // No IPv6 relay address: the IPv4 allocation is made, and the answer says why the
        // IPv6 one is not.
        let (response, actions) = alice.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![
                RequestedTransport::new(UDP).into(),
                AdditionalAddressFamily::new(AddressFamily::V6).into(),
            ],
        );
        assert_eq!(response.class(), MessageClass::SuccessResponse);
        assert_eq!(relays(&response), [addr("203.0.113.1:49152")]);
        assert_eq!(actions.len(), 1);
        let error = response.get_attribute::<AddressErrorCode>().unwrap();
        assert_eq!(
            (error.family, error.code, error.reason.as_str()),
            (AddressFamily::V6, 440, "Address Family not Supported")
        );
    }

    #[test]
    fn message_integrity_sha256_is_checked_and_answered_alike() {
        let mut server = server();
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        alice.sha256 = true;
        let (response, _) = alice.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into()],
        );
        assert_eq!(
            response.class(),
            MessageClass::SuccessResponse,
            "{response:?}"
        );
        assert!(response.get_attribute::<MessageIntegrity>().is_none());
        // The answer's HMAC, checked independently of the attribute's own code: HMAC-SHA256
        // keyed with MD5(user:realm:password) over the answer up to the attribute.
        let bytes = message::encode(response.clone());
        let position = (20..bytes.len())
            .step_by(4)
            .find(|&i| bytes[i..i + 2] == [0x00, 0x1c])
            .expect("MESSAGE-INTEGRITY-SHA256 in the answer");
        let mut signed = bytes[..position].to_vec();
        let length = (position - 20 + 4 + 32) as u16;
        signed[2..4].copy_from_slice(&length.to_be_bytes());
        let key_material = md5::compute(format!("alice:{REALM}:wonderland")).0;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key_material);
        ring::hmac::verify(&key, &signed, &bytes[position + 4..position + 36])
            .expect("the answer is signed with MESSAGE-INTEGRITY-SHA256");

        let mut mallory = Client::new("198.51.100.66:4000", "alice", "not her password");
        mallory.sha256 = true;
        let (response, _) = mallory.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into()],
        );
        assert_eq!(code(&response), 401);
        assert_eq!(server.refusals(), [(401, "Unauthorized", 1)]);
    }

    #[test]
    fn dont_fragment_is_honoured_on_the_relay_socket() {
        let mut server = server();
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        let (response, actions) = alice.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into(), DontFragment.into()],
        );
        assert_eq!(response.class(), MessageClass::SuccessResponse);
        assert_eq!(
            actions,
            [Action::OpenRelay {
                relay: relays(&response)[0],
                dont_fragment: true
            }]
        );
    }

    #[test]
    fn allocations_per_source_are_rate_limited() {
        let mut server = server();
        // Three Allocate requests a second per source IP in the test configuration; the
        // fourth is refused whatever else would have happened to it.
        let mut answers = Vec::new();
        for (n, user) in ["alice", "bob", "alice", "bob"].iter().enumerate() {
            let password = if *user == "alice" {
                "wonderland"
            } else {
                "builder"
            };
            let mut client = Client::new(&format!("198.51.100.7:{}", 40000 + n), user, password);
            let (response, _) = client.call(
                &mut server,
                T0,
                ALLOCATE,
                vec![RequestedTransport::new(UDP).into()],
            );
            answers.push((code(&response), reason(&response)));
        }
        assert_eq!(
            answers,
            [
                (0, String::new()),
                (0, String::new()),
                (486, "Allocation Quota Reached".to_owned()),
                (486, "Allocation Rate Limit Reached".to_owned()),
            ]
        );
        // Another source, or the next second, is not limited.
        let mut carol = Client::new(
            "198.51.100.8:40000",
            &format!("{}:carol", T0 + 60),
            &rest_api_password("north", &format!("{}:carol", T0 + 60)),
        );
        let (response, _) = carol.call(
            &mut server,
            T0,
            ALLOCATE,
            vec![RequestedTransport::new(UDP).into()],
        );
        assert_eq!(reason(&response), "Insufficient Capacity");
        assert_eq!(
            server.refusals(),
            [
                (486, "Allocation Quota Reached", 1),
                (486, "Allocation Rate Limit Reached", 1),
                (508, "Insufficient Capacity", 1)
            ]
        );
    }

    #[test]
    fn a_snapshot_restores_into_a_new_server() {
        let mut before = server();
        let mut alice = Client::new(ALICE, "alice", "wonderland");
        let relay = alice.allocate(&mut before, T0);
        alice.call(
            &mut before,
            T0,
            CHANNEL_BIND,
            vec![ChannelNumber(0x4001).into(), peer(PEER)],
        );
        let mut stored = before.snapshot();
        assert_eq!(stored.len(), 1);
        // Two more that must not come back: one expired, one on an address not served.
        let mut expired = stored[0].clone();
        expired.client = addr("198.51.100.8:1");
        expired.relays = vec![addr("203.0.113.1:49153")];
        expired.expires = T0 + 10;
        let mut elsewhere = stored[0].clone();
        elsewhere.client = addr("198.51.100.9:1");
        elsewhere.relays = vec![addr("203.0.113.77:49153")];
        stored.extend([expired, elsewhere]);

        let mut after = server();
        let (actions, restored) = after.restore(stored, T0 + 20);
        assert_eq!(restored, 1);
        let to_peer = FlowSpec {
            src: addr(ALICE),
            dst: addr(LISTENER),
            new_src: relay,
            new_dst: addr(PEER),
            channel: Some(ChannelOp::Strip(0x4001)),
            rtcp_to_userspace: false,
        };
        assert_eq!(
            actions,
            [
                Action::OpenRelay {
                    relay,
                    dont_fragment: false
                },
                Action::Offload([to_peer, to_peer.reverse()]),
            ]
        );
        assert_eq!(after.allocations(), before.allocations());
        // It relays as before, and its owner manages it (a stale nonce first: 438).
        let actions = after.from_client(
            T0 + 20,
            addr(LISTENER),
            addr(ALICE),
            &message::channel_data(0x4001, b"rtp"),
        );
        assert_eq!(
            actions,
            [Action::Send {
                from: relay,
                to: addr(PEER),
                bytes: b"rtp".to_vec()
            }]
        );
        let (response, actions) = alice.call(
            &mut after,
            T0 + 20,
            REFRESH,
            vec![Lifetime::from_u32(0).into()],
        );
        assert_eq!(response.class(), MessageClass::SuccessResponse);
        assert!(actions.contains(&Action::CloseRelay(relay)), "{actions:?}");
    }
}
