//! The TURN server core (RFC 8656), sans-IO: datagrams and the time go in, actions come out
//! (datagrams to send, relay sockets to open or close, flows to offload). One driver task
//! per socket carries the actions out; unit tests drive it directly. `now` is Unix time in
//! seconds everywhere: TURN REST API usernames carry Unix expiry times.

use std::{
    collections::HashMap,
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
            Data, EvenPort, Lifetime, RequestedTransport, ReservationToken, XorPeerAddress,
            XorRelayAddress,
        },
        methods::{ALLOCATE, CHANNEL_BIND, CREATE_PERMISSION, DATA, REFRESH, SEND},
    },
    rfc8656::attributes::{AddressFamily, RequestedAddressFamily},
};

use super::{
    credentials::Credentials,
    message::{self, Attribute, ChannelNumber, Incoming, TurnMessage},
    nonce::{NonceIssuer, NonceStatus},
};
use crate::datapath::{ChannelOp, FlowSpec};

/// RFC 8656 9: permissions last 300 s, channel bindings 600 s.
pub const PERMISSION_LIFETIME: u64 = 300;
pub const CHANNEL_LIFETIME: u64 = 600;
/// How long a port reserved by EVEN-PORT(R) waits for its RESERVATION-TOKEN (RFC 8656 7.2
/// suggests about 30 s).
pub const RESERVATION_LIFETIME: u64 = 30;
const UDP: u8 = 17;

#[derive(Debug, Clone)]
pub struct TurnConfig {
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
    /// Peer addresses allowed although they are in a range refused by default.
    pub allowed_peers: Vec<IpAddr>,
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
    OpenRelay(SocketAddr),
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
    relay: SocketAddr,
    expires: u64,
    /// Peer IP -> expiry.
    permissions: HashMap<IpAddr, u64>,
    channels: HashMap<u16, Channel>,
}

struct Channel {
    peer: SocketAddr,
    expires: u64,
}

impl Allocation {
    /// RFC 8656 9: whether a live permission lets `peer` through.
    fn permits(&self, peer: IpAddr, now: u64) -> bool {
        self.permissions
            .get(&peer)
            .is_some_and(|&expires| expires > now)
    }
}

/// What `relayctl turn revoke` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeTarget {
    User(String),
    Relay(SocketAddr),
}

/// One allocation, for `relayctl turn allocations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationInfo {
    pub username: String,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub relay: SocketAddr,
    pub expires: u64,
    pub permissions: Vec<IpAddr>,
    pub channels: Vec<(u16, SocketAddr)>,
}

pub struct TurnServer {
    config: TurnConfig,
    credentials: Credentials,
    nonces: NonceIssuer,
    allocations: HashMap<FiveTuple, Allocation>,
    by_relay: HashMap<SocketAddr, FiveTuple>,
    /// RESERVATION-TOKEN -> (reserved relay address, expiry).
    reservations: HashMap<u64, (SocketAddr, u64)>,
}

/// An error response in the making: code and reason.
struct Refusal(u16, &'static str);

impl TurnServer {
    pub fn new(config: TurnConfig, credentials: Credentials) -> TurnServer {
        let nonces = NonceIssuer::new(config.nonce_lifetime);
        TurnServer {
            config,
            credentials,
            nonces,
            allocations: HashMap::new(),
            by_relay: HashMap::new(),
            reservations: HashMap::new(),
        }
    }

    pub fn allocations(&self) -> Vec<AllocationInfo> {
        self.allocations
            .iter()
            .map(|(&(client, server), allocation)| AllocationInfo {
                username: allocation.username.clone(),
                client,
                server,
                relay: allocation.relay,
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
        // RFC 8656 11.3: only peers with a permission get through.
        if !allocation.permits(peer.ip(), now) {
            return Vec::new();
        }
        if let Some((number, _)) = allocation
            .channels
            .iter()
            .find(|(_, channel)| channel.peer == peer && channel.expires > now)
        {
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
            .filter(|(_, allocation)| match target {
                RevokeTarget::User(username) => allocation.username == *username,
                RevokeTarget::Relay(relay) => allocation.relay == *relay,
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
        for (&five_tuple, allocation) in &mut self.allocations {
            allocation.permissions.retain(|_, expires| *expires > now);
            let relay = allocation.relay;
            allocation.channels.retain(|&number, channel| {
                let keep = channel.expires > now;
                if !keep {
                    actions.push(Action::Unload(channel_flows(
                        five_tuple,
                        relay,
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
            return vec![self.send(
                server,
                client,
                error_response(message, Refusal(400, "Bad Request")),
            )];
        }
        let (username, password) = match self.authenticate(now, client, message) {
            Ok(credentials) => credentials,
            Err(response) => return vec![self.send(server, client, response)],
        };
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
                error_response(message, refusal)
            }
        };
        actions.push(self.send_signed(server, client, response, message, &password));
        actions
    }

    /// Long-term credentials (RFC 8489 9.2): the username and the password that signed the
    /// request, or the error response to send.
    fn authenticate(
        &self,
        now: u64,
        client: SocketAddr,
        message: &TurnMessage,
    ) -> Result<(String, String), TurnMessage> {
        let challenge = |code, reason: &'static str| {
            let mut response = error_response(message, Refusal(code, reason));
            response.add_attribute(Realm::new(self.config.realm.clone()).expect("valid realm"));
            response
                .add_attribute(Nonce::new(self.nonces.issue(client, now)).expect("valid nonce"));
            response
        };
        let Some(integrity) = message.get_attribute::<MessageIntegrity>() else {
            return Err(challenge(401, "Unauthorized"));
        };
        let (Some(username), Some(realm), Some(nonce)) = (
            message.get_attribute::<Username>(),
            message.get_attribute::<Realm>(),
            message.get_attribute::<Nonce>(),
        ) else {
            return Err(error_response(message, Refusal(400, "Bad Request")));
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
            .find(|password| {
                integrity
                    .check_long_term_credential(username, realm, password)
                    .is_ok()
            })
            .map(|password| (username.name().to_owned(), password))
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
        if self.allocations.contains_key(&five_tuple) {
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
        // RFC 8656 7.2: a reservation token says which port; it goes with neither.
        if token.is_some()
            && (even_port.is_some() || message.get_attribute::<RequestedAddressFamily>().is_some())
        {
            return Err(Refusal(400, "Bad Request"));
        }
        let relay_ip = match message
            .get_attribute::<RequestedAddressFamily>()
            .map(|f| f.address_family())
        {
            None | Some(AddressFamily::V4) => self.config.relay_ipv4.map(IpAddr::V4),
            Some(AddressFamily::V6) => self.config.relay_ipv6.map(IpAddr::V6),
        }
        .ok_or(Refusal(440, "Address Family not Supported"))?;
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
        let relay = match token {
            Some(token) => {
                self.reservations
                    .remove(&token)
                    .filter(|(_, expires)| *expires > now)
                    .ok_or(Refusal(508, "Insufficient Capacity"))?
                    .0
            }
            None => {
                let free = |port: u16| self.is_free(SocketAddr::new(relay_ip, port));
                let ports = self.config.ports.clone();
                let port = if even_port.is_some() {
                    // An even port, and when a reservation is asked for, a free odd one above.
                    let reserve = even_port.is_some_and(|e| e.is_requested());
                    ports.clone().find(|&port| {
                        port % 2 == 0
                            && free(port)
                            && (!reserve || (port < *ports.end() && free(port + 1)))
                    })
                } else {
                    ports.clone().find(|&port| free(port))
                };
                SocketAddr::new(relay_ip, port.ok_or(Refusal(508, "Insufficient Capacity"))?)
            }
        };
        let reservation = even_port.is_some_and(|e| e.is_requested()).then(|| {
            let token = random_token();
            let next = SocketAddr::new(relay.ip(), relay.port() + 1);
            self.reservations
                .insert(token, (next, now + RESERVATION_LIFETIME));
            token
        });
        let lifetime = self.lifetime(message);
        self.allocations.insert(
            five_tuple,
            Allocation {
                username: username.to_owned(),
                relay,
                expires: now + lifetime,
                permissions: HashMap::new(),
                channels: HashMap::new(),
            },
        );
        self.by_relay.insert(relay, five_tuple);
        actions.push(Action::OpenRelay(relay));
        let mut response = success_response(message);
        response.add_attribute(XorRelayAddress::new(relay));
        response.add_attribute(Lifetime::from_u32(lifetime as u32));
        response.add_attribute(XorMappedAddress::new(five_tuple.0));
        if let Some(token) = reservation {
            response.add_attribute(ReservationToken::new(token));
        }
        Ok(response)
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
        let allowed = self.config.allowed_peers.clone();
        let allocation = self.owned(five_tuple, username)?;
        for peer in &peers {
            check_peer(allocation.relay, *peer, &allowed)?;
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
        let allowed = self.config.allowed_peers.clone();
        let allocation = self.owned(five_tuple, username)?;
        check_peer(allocation.relay, peer, &allowed)?;
        // RFC 8656 11.2: a channel is bound to one peer, and a peer to one channel.
        let clash = allocation
            .channels
            .iter()
            .any(|(n, channel)| (*n == number) != (channel.peer == peer));
        if clash {
            return Err(Refusal(400, "Bad Request"));
        }
        let relay = allocation.relay;
        let new = allocation
            .channels
            .insert(
                number,
                Channel {
                    peer,
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
        if !allocation.permits(peer.ip(), now) {
            return Vec::new();
        }
        vec![Action::Send {
            from: allocation.relay,
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
            from: allocation.relay,
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
        self.by_relay.remove(&allocation.relay);
        let mut actions: Vec<Action> = allocation
            .channels
            .iter()
            .map(|(number, channel)| {
                Action::Unload(channel_flows(
                    five_tuple,
                    allocation.relay,
                    *number,
                    channel.peer,
                ))
            })
            .collect();
        actions.push(Action::CloseRelay(allocation.relay));
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
        password: &str,
    ) -> Action {
        response
            .add_attribute(Software::new(self.config.software.clone()).expect("valid software"));
        if let (Some(username), Some(realm)) = (
            request.get_attribute::<Username>(),
            request.get_attribute::<Realm>(),
        ) && let Ok(integrity) =
            MessageIntegrity::new_long_term_credential(&response, username, realm, password)
        {
            response.add_attribute(integrity);
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
fn channel_flows(
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
    };
    [to_peer, to_peer.reverse()]
}

/// RFC 8656 9/10 and RFC 6156: the peer must be of the relay address's family (443), and in
/// no range a relay on the Internet edge should reach unless the operator allowed it (403).
fn check_peer(relay: SocketAddr, peer: SocketAddr, allowed: &[IpAddr]) -> Result<(), Refusal> {
    if relay.is_ipv4() != peer.is_ipv4() {
        return Err(Refusal(443, "Peer Address Family Mismatch"));
    }
    let ip = peer.ip();
    if allowed.contains(&ip) {
        return Ok(());
    }
    let special = ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || match ip {
            IpAddr::V4(v4) => {
                v4.is_private() || v4.is_link_local() || v4.is_broadcast() || v4.octets()[0] == 0
            }
            IpAddr::V6(v6) => v6.is_unique_local() || v6.is_unicast_link_local(),
        };
    if special {
        return Err(Refusal(403, "Forbidden"));
    }
    Ok(())
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
        let config = TurnConfig {
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
            allowed_peers: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5))],
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
    }

    impl Client {
        fn new(from: &str, username: &str, password: &str) -> Client {
            Client {
                from: addr(from),
                username: username.to_owned(),
                password: password.to_owned(),
                nonce: None,
            }
        }

        fn request(&self, method: Method, attributes: Vec<Attribute>) -> Vec<u8> {
            let mut message =
                Message::new(MessageClass::Request, method, TransactionId::new([7; 12]));
            for attribute in attributes {
                message.add_attribute(attribute);
            }
            if let Some(nonce) = &self.nonce {
                let username = Username::new(self.username.clone()).unwrap();
                let realm = Realm::new(REALM.to_owned()).unwrap();
                message.add_attribute(username.clone());
                message.add_attribute(realm.clone());
                message.add_attribute(Nonce::new(nonce.clone()).unwrap());
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
            assert_eq!(actions, [Action::OpenRelay(relay)]);
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
        assert_eq!(actions, [Action::OpenRelay(relay)]);
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
        ] {
            let (response, _) = alice.call(&mut server, T0, CREATE_PERMISSION, vec![peer(denied)]);
            assert_eq!(code(&response), 403, "{denied}");
        }
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
}
