//! The TURN server core (RFC 8656), sans-IO: datagrams and the time go in, actions come out
//! (datagrams to send, relay sockets to open or close, flows to offload). One driver task
//! per socket carries the actions out; unit tests drive it directly. `now` is Unix time in
//! seconds everywhere: TURN REST API usernames carry Unix expiry times. The random source
//! (relay ports, reservation tokens, transaction ids) is given to it.
//!
//! Requests are read once into typed values ([`super::request`]), authenticated once
//! ([`super::auth`]), and refused with a closed set of reasons ([`Refusal`]); the state
//! store's records are mapped in `persist.rs`.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    ops::RangeInclusive,
};

use rand::RngCore;
use stun_codec::{
    MessageClass, TransactionId,
    rfc5389::{
        attributes::{
            Fingerprint, MessageIntegrity, Nonce, Realm, Software, UnknownAttributes, Username,
            XorMappedAddress,
        },
        methods::BINDING,
    },
    rfc5766::{
        attributes::{Data, Lifetime, ReservationToken, XorPeerAddress, XorRelayAddress},
        methods::{DATA, SEND},
    },
    rfc8656::attributes::AddressFamily,
};

pub use super::refusal::{Discard, Refusal};
use super::{
    auth::{AuthFailure, Authenticated, Verifier},
    credentials::Credentials,
    message::{self, AddressErrorCode, Incoming, MessageIntegritySha256, TurnMessage},
    nonce::NonceIssuer,
    policy::{PeerPolicy, SourceRate},
    request::{self, Allocate, Request},
};
use crate::datapath::{ChannelOp, FlowSpec};

mod persist;
#[cfg(test)]
mod tests;

/// RFC 8656 9: permissions last 300 s, channel bindings 600 s.
pub const PERMISSION_LIFETIME: u64 = 300;
pub const CHANNEL_LIFETIME: u64 = 600;
/// How long a port reserved by EVEN-PORT(R) waits for its RESERVATION-TOKEN (RFC 8656 7.2
/// suggests about 30 s).
pub const RESERVATION_LIFETIME: u64 = 30;
/// A refusal reason is logged at most once per this many seconds, with the count since.
pub const REFUSAL_LOG_INTERVAL: u64 = 60;
/// How long a relay port that another socket on the host held is left out of new
/// allocations, in seconds.
pub const HELD_ELSEWHERE_LIFETIME: u64 = 60;

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
    /// STUN requests of any method per source IP address and second (0: no limit).
    pub max_request_rate_per_source: u32,
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
    /// Open a relay socket of a restored allocation (and, inside the server, of a new
    /// one before it becomes [`Action::Allocate`]); with DONT-FRAGMENT (RFC 8656 7.2) its
    /// datagrams carry the DF bit.
    OpenRelay {
        relay: SocketAddr,
        dont_fragment: bool,
    },
    /// A new allocation: open its relay sockets (DONT-FRAGMENT as for `OpenRelay`), then
    /// send `answer`. When one cannot be opened, call [`TurnServer::relay_unavailable`]
    /// and hand `request` (the Allocate, from `client` to `server`) to the server again,
    /// which picks other ports; when tries are over, send `refusal` (508). The client never
    /// hears of an allocation that cannot carry anything.
    Allocate {
        relays: Vec<SocketAddr>,
        dont_fragment: bool,
        answer: Box<Action>,
        refusal: Box<Action>,
        client: SocketAddr,
        server: SocketAddr,
        request: Vec<u8>,
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

/// The random source: a seeded CSPRNG in relayd, a predictable one in tests.
pub type Random = Box<dyn RngCore + Send>;

struct Allocation {
    username: String,
    /// One relayed address, or two (IPv4 then IPv6) for ADDITIONAL-ADDRESS-FAMILY.
    relays: Vec<SocketAddr>,
    expires: u64,
    /// The Allocate request's transaction and our answer, for its retransmissions (none
    /// for an allocation restored after a restart).
    transaction: TransactionId,
    answer: Option<Answer>,
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
    /// Relay ports another socket on the host held when we tried them -> until when they
    /// are left out.
    held_elsewhere: HashMap<SocketAddr, u64>,
    /// Relay sockets that could not be opened, since the start.
    relay_bind_failures: u64,
    allocate_rate: SourceRate,
    request_rate: SourceRate,
    /// Requests dropped over the request rate, for a log line a minute.
    request_rate_log: RefusalCount,
    /// How many of each, for metrics and rate-limited logs.
    refusals: BTreeMap<Refusal, RefusalCount>,
    discards: BTreeMap<Discard, u64>,
    random: Random,
}

#[derive(Debug, Default)]
struct RefusalCount {
    total: u64,
    /// Since the last log line about this reason.
    unlogged: u64,
    logged_at: Option<u64>,
}

impl TurnServer {
    pub fn new(config: ServerConfig, credentials: Credentials, random: Random) -> TurnServer {
        let nonces = NonceIssuer::new(config.nonce_lifetime);
        TurnServer {
            config,
            credentials,
            nonces,
            allocations: HashMap::new(),
            by_relay: HashMap::new(),
            reservations: HashMap::new(),
            held_elsewhere: HashMap::new(),
            relay_bind_failures: 0,
            allocate_rate: SourceRate::default(),
            request_rate: SourceRate::default(),
            request_rate_log: RefusalCount::default(),
            refusals: BTreeMap::new(),
            discards: BTreeMap::new(),
            random,
        }
    }

    /// Issues and checks nonces under `key` from now on (the state store's, kept across
    /// restarts).
    pub fn keep_nonces(&mut self, key: &[u8]) {
        self.nonces = NonceIssuer::with_key(key, self.config.nonce_lifetime);
    }

    /// New configuration and credentials (a reload). Allocations, reservations and nonces
    /// stay: an allocation whose user is gone ends at its next Refresh (401) or expiry.
    pub fn reconfigure(&mut self, config: ServerConfig, credentials: Credentials) {
        self.config = config;
        self.credentials = credentials;
    }

    /// Requests refused since the start, by code and reason (a bounded set), for metrics.
    pub fn refusals(&self) -> Vec<(u16, &'static str, u64)> {
        let mut refusals: Vec<_> = self
            .refusals
            .iter()
            .map(|(refusal, count)| (refusal.code(), refusal.reason(), count.total))
            .collect();
        refusals.sort();
        refusals
    }

    /// Relay sockets that could not be opened since the start (another socket on the host
    /// held the port), for metrics.
    pub fn relay_bind_failures(&self) -> u64 {
        self.relay_bind_failures
    }

    /// Datagrams dropped without an answer since the start, by reason, for metrics.
    pub fn discards(&self) -> Vec<(&'static str, u64)> {
        self.discards
            .iter()
            .map(|(discard, count)| (discard.label(), *count))
            .collect()
    }

    /// Whether a request from `client` is within `turn.max_request_rate_per_source`; the
    /// ones beyond are logged once a minute with how many there were.
    fn request_admitted(&mut self, now: u64, client: SocketAddr) -> bool {
        let limit = self.config.max_request_rate_per_source;
        if self.request_rate.admit(client.ip(), now, limit) {
            return true;
        }
        let log = &mut self.request_rate_log;
        log.total += 1;
        log.unlogged += 1;
        if log
            .logged_at
            .is_none_or(|at| now >= at + REFUSAL_LOG_INTERVAL)
        {
            tracing::warn!(%client, limit, dropped = log.unlogged, "turn: requests over turn.max_request_rate_per_source dropped unanswered (one line a minute; dropped = since the last)");
            log.unlogged = 0;
            log.logged_at = Some(now);
        }
        false
    }

    /// Counts a datagram dropped without an answer; returns no action.
    fn discard(&mut self, why: Discard) -> Vec<Action> {
        *self.discards.entry(why).or_default() += 1;
        Vec::new()
    }

    /// Counts a refusal, and logs it unless this reason was logged less than
    /// [`REFUSAL_LOG_INTERVAL`] seconds ago: a client in a retry loop or a scan cannot flood
    /// the log, and the line says how many were not logged.
    fn refused(&mut self, now: u64, client: SocketAddr, username: &str, refusal: Refusal) {
        let (code, reason) = (refusal.code(), refusal.reason());
        let count = self.refusals.entry(refusal).or_default();
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
        if message::looks_like_request(bytes) && !self.request_admitted(now, client) {
            return self.discard(Discard::RequestRate);
        }
        match message::decode(bytes) {
            None => self.discard(Discard::undecodable(bytes)),
            Some(Incoming::ChannelData { channel, data }) => {
                self.channel_data_from_client(now, five_tuple, channel, data)
            }
            Some(Incoming::Broken(broken)) if broken.class() == MessageClass::Request => {
                tracing::debug!(%client, error = ?broken.error(), "turn: undecodable request: 400");
                self.refused(now, client, "", Refusal::BadRequest);
                let mut response = message::response_to(
                    broken.method(),
                    broken.transaction_id(),
                    MessageClass::ErrorResponse,
                );
                response.add_attribute(Refusal::BadRequest.bare_error_code());
                vec![self.respond(server, client, response, None)]
            }
            Some(Incoming::Broken(_)) => self.discard(Discard::UndecodableStun),
            Some(Incoming::Stun(message)) => match (message.class(), message.method()) {
                (MessageClass::Indication, SEND) => self.send_indication(now, five_tuple, &message),
                (MessageClass::Request, method) => {
                    self.request(now, five_tuple, method, &message, bytes)
                }
                // Responses, and indications other than Send, are not for a server.
                _ => self.discard(Discard::NotForServer),
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
            return self.discard(Discard::NoAllocation);
        };
        let Some(allocation) = self.allocations.get(&(client, server)) else {
            return self.discard(Discard::NoAllocation);
        };
        // RFC 8656 11.3: only peers with a permission get through, each on the relayed
        // address of its own family.
        if !allocation.permits(peer.ip(), now) || relay.is_ipv4() != peer.is_ipv4() {
            return self.discard(Discard::NoPermission);
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
        let mut indication =
            TurnMessage::new(MessageClass::Indication, DATA, self.transaction_id());
        indication.add_attribute(XorPeerAddress::new(peer));
        match Data::new(bytes.to_vec()) {
            Ok(data) => indication.add_attribute(data),
            Err(_) => return Vec::new(),
        }
        vec![self.respond(server, client, indication, None)]
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
        self.held_elsewhere.retain(|_, until| *until > now);
        self.allocate_rate.expire(now);
        self.request_rate.expire(now);
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
        bytes: &[u8],
    ) -> Vec<Action> {
        let (client, server) = five_tuple;
        let unknown = request::unknown_attributes(message);
        if !unknown.is_empty() {
            self.refused(now, client, "", Refusal::UnknownAttribute);
            let mut response = error_response(message, Refusal::UnknownAttribute.bare_error_code());
            response.add_attribute(UnknownAttributes::new(unknown));
            return vec![self.respond(server, client, response, None)];
        }
        if method == BINDING {
            let mut response = message::response_to(
                BINDING,
                message.transaction_id(),
                MessageClass::SuccessResponse,
            );
            response.add_attribute(XorMappedAddress::new(client));
            return vec![self.respond(server, client, response, None)];
        }
        if !request::is_authenticated_method(method) {
            self.refused(now, client, "", Refusal::BadRequest);
            let response = error_response(message, Refusal::BadRequest.bare_error_code());
            return vec![self.respond(server, client, response, None)];
        }
        let verifier = Verifier {
            realm: &self.config.realm,
            nonces: &self.nonces,
            credentials: &self.credentials,
        };
        let signed = match verifier.authenticate(now, client, message) {
            Ok(signed) => signed,
            Err(failure) => return vec![self.not_authenticated(now, five_tuple, message, failure)],
        };
        let username = signed.username().to_owned();
        let mut actions = Vec::new();
        let transaction = message.transaction_id();
        let result = match request::parse(message) {
            Ok(Request::Allocate(allocate)) => self.allocate(
                now,
                five_tuple,
                &username,
                transaction,
                Ok(allocate),
                &mut actions,
            ),
            // 437 (this 5-tuple has an allocation) comes before the request's own problems.
            Err(refusal) if method == stun_codec::rfc5766::methods::ALLOCATE => self.allocate(
                now,
                five_tuple,
                &username,
                transaction,
                Err(refusal),
                &mut actions,
            ),
            Ok(Request::Refresh { lifetime }) => {
                self.refresh(now, five_tuple, &username, lifetime, &mut actions)
            }
            Ok(Request::CreatePermission { peers }) => {
                self.create_permission(now, five_tuple, &username, &peers)
            }
            Ok(Request::ChannelBind { number, peer }) => {
                self.channel_bind(now, five_tuple, &username, number, peer, &mut actions)
            }
            Err(refusal) => Err(refusal),
        };
        let response = match result {
            Ok(answer) => answer.into_message(message),
            Err(refusal) => {
                tracing::debug!(%client, %username, method = ?method, code = refusal.code(), reason = refusal.reason(), "turn: request refused");
                self.refused(now, client, &username, refusal);
                error_response(message, refusal.error_code())
            }
        };
        let answer = self.respond(server, client, response, Some(&signed));
        let mut dont_fragment = false;
        let opened: Vec<SocketAddr> = actions
            .extract_if(.., |action| matches!(action, Action::OpenRelay { .. }))
            .filter_map(|action| match action {
                Action::OpenRelay {
                    relay,
                    dont_fragment: df,
                } => {
                    dont_fragment |= df;
                    Some(relay)
                }
                _ => None,
            })
            .collect();
        if opened.is_empty() {
            actions.push(answer);
        } else {
            let refusal = error_response(message, Refusal::RelayPortInUse.error_code());
            actions.push(Action::Allocate {
                relays: opened,
                dont_fragment,
                answer: Box::new(answer),
                refusal: Box::new(self.respond(server, client, refusal, Some(&signed))),
                client,
                server,
                request: bytes.to_vec(),
            });
        }
        actions
    }

    /// The driver could not open `relay` for the allocation just made (another socket on
    /// the host holds the port): the allocation goes, with its other relayed address, and
    /// the port is left out of new allocations for [`HELD_ELSEWHERE_LIFETIME`]. With
    /// `retry` the driver hands the Allocate in again, which the per-source rate does not
    /// count twice; without, its 508 is counted and logged as a refusal.
    pub fn relay_unavailable(&mut self, now: u64, relay: SocketAddr, retry: bool) -> Vec<Action> {
        self.relay_bind_failures += 1;
        self.held_elsewhere
            .insert(relay, now + HELD_ELSEWHERE_LIFETIME);
        let Some(&five_tuple) = self.by_relay.get(&relay) else {
            return Vec::new();
        };
        let username = self
            .allocations
            .get(&five_tuple)
            .map(|allocation| allocation.username.clone())
            .unwrap_or_default();
        if retry {
            self.allocate_rate.refund(five_tuple.0.ip(), now);
            self.request_rate.refund(five_tuple.0.ip(), now);
        } else {
            self.refused(now, five_tuple.0, &username, Refusal::RelayPortInUse);
        }
        self.delete(five_tuple)
    }

    /// The error response to a request that did not authenticate: with a fresh REALM and
    /// NONCE when the client may try again.
    fn not_authenticated(
        &mut self,
        now: u64,
        (client, server): FiveTuple,
        message: &TurnMessage,
        failure: AuthFailure,
    ) -> Action {
        let AuthFailure { refusal, challenge } = failure;
        let signed = message.get_attribute::<MessageIntegrity>().is_some()
            || message.get_attribute::<MessageIntegritySha256>().is_some();
        tracing::debug!(%client, method = ?message.method(), code = refusal.code(), reason = refusal.reason(), signed, "turn: request not authenticated");
        // The first 401 of every client is the challenge, not a failure.
        if signed || refusal != Refusal::Unauthorized {
            let username = message
                .get_attribute::<Username>()
                .map_or("", |u| u.name())
                .to_owned();
            self.refused(now, client, &username, refusal);
        }
        let mut response = error_response(message, refusal.bare_error_code());
        if challenge {
            response.add_attribute(Realm::new(self.config.realm.clone()).expect("valid realm"));
            response
                .add_attribute(Nonce::new(self.nonces.issue(client, now)).expect("valid nonce"));
        }
        self.respond(server, client, response, None)
    }

    /// RFC 8656 7.2. `request` is the Allocate as parsed: its problems count only once
    /// the 5-tuple is known to have no allocation (437 first).
    fn allocate(
        &mut self,
        now: u64,
        five_tuple: FiveTuple,
        username: &str,
        transaction: TransactionId,
        request: Result<Allocate, Refusal>,
        actions: &mut Vec<Action>,
    ) -> Result<Answer, Refusal> {
        if let Some(existing) = self.allocations.get(&five_tuple) {
            // A retransmitted Allocate gets the original answer again.
            if existing.transaction == transaction
                && existing.username == username
                && let Some(answer) = &existing.answer
            {
                return Ok(answer.clone());
            }
            return Err(Refusal::AllocationMismatch);
        }
        let request = request?;
        let primary_ip = match request.family {
            AddressFamily::V4 => self.config.relay_ipv4.map(IpAddr::V4),
            AddressFamily::V6 => self.config.relay_ipv6.map(IpAddr::V6),
        }
        .ok_or(Refusal::AddressFamilyNotSupported)?;
        if !self.allocate_rate.admit(
            five_tuple.0.ip(),
            now,
            self.config.max_allocate_rate_per_source,
        ) {
            return Err(Refusal::AllocationRateLimitReached);
        }
        let users_allocations = self
            .allocations
            .values()
            .filter(|a| a.username == username)
            .count();
        if users_allocations >= self.config.max_allocations_per_user {
            return Err(Refusal::AllocationQuotaReached);
        }
        if self.allocations.len() >= self.config.max_allocations {
            return Err(Refusal::InsufficientCapacity);
        }
        let even = request.even_port.is_some();
        let reserve = request.even_port.is_some_and(|e| e.reserve_next);
        let relay = match request.token {
            Some(token) => {
                self.reservations
                    .remove(&token)
                    .filter(|(_, expires)| *expires > now)
                    .ok_or(Refusal::InsufficientCapacity)?
                    .0
            }
            None => self
                .free_port(primary_ip, even, reserve)
                .ok_or(Refusal::InsufficientCapacity)?,
        };
        // The IPv6 side of a dual allocation; when it cannot be had, the IPv4 one still is,
        // and the answer says why in ADDRESS-ERROR-CODE (RFC 8656 7.2).
        let second = request
            .additional_ipv6
            .then(|| match self.config.relay_ipv6 {
                None => Err(Refusal::AddressFamilyNotSupported),
                Some(v6) => self
                    .free_port(IpAddr::V6(v6), even, false)
                    .ok_or(Refusal::InsufficientCapacity),
            });
        let mut relays = vec![relay];
        relays.extend(second.and_then(Result::ok));
        let reservation = reserve.then(|| {
            let token = self.random.next_u64();
            let next = SocketAddr::new(relay.ip(), relay.port() + 1);
            self.reservations
                .insert(token, (next, now + RESERVATION_LIFETIME));
            token
        });
        let lifetime = self.lifetime(request.lifetime);
        let mut answer = Answer::default();
        for relay in &relays {
            answer.add(XorRelayAddress::new(*relay));
        }
        answer.add(Lifetime::from_u32(lifetime as u32));
        answer.add(XorMappedAddress::new(five_tuple.0));
        if let Some(token) = reservation {
            answer.add(ReservationToken::new(token));
        }
        if let Some(Err(refusal)) = second {
            answer.add(AddressErrorCode {
                family: AddressFamily::V6,
                code: refusal.code(),
                reason: refusal.reason().to_owned(),
            });
        }
        for relay in &relays {
            self.by_relay.insert(*relay, five_tuple);
            actions.push(Action::OpenRelay {
                relay: *relay,
                dont_fragment: request.dont_fragment,
            });
        }
        self.allocations.insert(
            five_tuple,
            Allocation {
                username: username.to_owned(),
                relays,
                expires: now + lifetime,
                transaction,
                answer: Some(answer.clone()),
                dont_fragment: request.dont_fragment,
                permissions: HashMap::new(),
                channels: HashMap::new(),
            },
        );
        Ok(answer)
    }

    /// A free relay address on `ip` in the port range, drawn at random (a client cannot
    /// guess another's relayed address): an even port when asked, and then with the odd
    /// port above it free too when a reservation is asked for.
    fn free_port(&mut self, ip: IpAddr, even: bool, reserve: bool) -> Option<SocketAddr> {
        let (first, last) = (*self.config.ports.start(), *self.config.ports.end());
        let span = u32::from(last - first) + 1;
        let start = self.random.next_u32() % span;
        let free = |port: u16| self.is_free(SocketAddr::new(ip, port));
        (0..span)
            .map(|step| first + ((start + step) % span) as u16)
            .find(|&port| {
                (!even || port % 2 == 0)
                    && free(port)
                    && (!reserve || (port < last && free(port + 1)))
            })
            .map(|port| SocketAddr::new(ip, port))
    }

    fn refresh(
        &mut self,
        now: u64,
        five_tuple: FiveTuple,
        username: &str,
        requested: Option<u64>,
        actions: &mut Vec<Action>,
    ) -> Result<Answer, Refusal> {
        let lifetime = self.lifetime(requested);
        let allocation = self.owned(five_tuple, username)?;
        let granted = if requested == Some(0) {
            actions.extend(self.delete(five_tuple));
            0
        } else {
            allocation.expires = now + lifetime;
            lifetime
        };
        let mut answer = Answer::default();
        answer.add(Lifetime::from_u32(granted as u32));
        Ok(answer)
    }

    fn create_permission(
        &mut self,
        now: u64,
        five_tuple: FiveTuple,
        username: &str,
        peers: &[SocketAddr],
    ) -> Result<Answer, Refusal> {
        let policy = self.config.peers.clone();
        let allocation = self.owned(five_tuple, username)?;
        for peer in peers {
            check_peer(allocation, *peer, &policy)?;
        }
        for peer in peers {
            allocation
                .permissions
                .insert(peer.ip(), now + PERMISSION_LIFETIME);
        }
        Ok(Answer::default())
    }

    fn channel_bind(
        &mut self,
        now: u64,
        five_tuple: FiveTuple,
        username: &str,
        number: u16,
        peer: SocketAddr,
        actions: &mut Vec<Action>,
    ) -> Result<Answer, Refusal> {
        let policy = self.config.peers.clone();
        let allocation = self.owned(five_tuple, username)?;
        let relay = check_peer(allocation, peer, &policy)?;
        // RFC 8656 11.2: a channel is bound to one peer, and a peer to one channel.
        let clash = allocation
            .channels
            .iter()
            .any(|(n, channel)| (*n == number) != (channel.peer == peer));
        if clash {
            return Err(Refusal::BadRequest);
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
        Ok(Answer::default())
    }

    fn send_indication(
        &mut self,
        now: u64,
        five_tuple: FiveTuple,
        message: &TurnMessage,
    ) -> Vec<Action> {
        let Some(allocation) = self.allocations.get(&five_tuple) else {
            return self.discard(Discard::NoAllocation);
        };
        let (Some(peer), Some(data)) = (
            message
                .get_attribute::<XorPeerAddress>()
                .map(|p| p.address()),
            message.get_attribute::<Data>(),
        ) else {
            return self.discard(Discard::NoChannel);
        };
        let Some(relay) = allocation.relay_for(peer) else {
            return self.discard(Discard::NoPermission);
        };
        if !allocation.permits(peer.ip(), now) {
            return self.discard(Discard::NoPermission);
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
            return self.discard(Discard::NoAllocation);
        };
        let Some(channel) = allocation.channels.get(&number).filter(|c| c.expires > now) else {
            return self.discard(Discard::NoChannel);
        };
        if !allocation.permits(channel.peer.ip(), now) {
            return self.discard(Discard::NoPermission);
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
            && !self.held_elsewhere.contains_key(&relay)
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
            .ok_or(Refusal::AllocationMismatch)?;
        if allocation.username != username {
            return Err(Refusal::WrongCredentials);
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
    fn lifetime(&self, requested: Option<u64>) -> u64 {
        requested
            .unwrap_or(self.config.default_lifetime)
            .clamp(self.config.default_lifetime, self.config.max_lifetime)
    }

    /// A message on its way out: for an authenticated request's response SOFTWARE and the
    /// signature of its credentials (RFC 8489 9.2.4: the response is signed as the request
    /// was); FINGERPRINT on every message. Answers to strangers and Data indications carry
    /// no SOFTWARE (it is optional, RFC 8489 14.14): the smaller an unauthenticated answer,
    /// the less a spoofed request amplifies.
    fn respond(
        &self,
        from: SocketAddr,
        to: SocketAddr,
        mut message: TurnMessage,
        signer: Option<&Authenticated>,
    ) -> Action {
        if let Some(signer) = signer {
            message.add_attribute(
                Software::new(self.config.software.clone()).expect("valid software"),
            );
            signer.sign(&mut message);
        }
        if let Ok(fingerprint) = Fingerprint::new(&message) {
            message.add_attribute(fingerprint);
        }
        Action::Send {
            from,
            to,
            bytes: message::encode(message),
        }
    }

    fn transaction_id(&mut self) -> TransactionId {
        let mut id = [0u8; 12];
        self.random.fill_bytes(&mut id);
        TransactionId::new(id)
    }
}

/// The attributes of a success response, kept as they are for an Allocate's
/// retransmissions.
#[derive(Debug, Clone, Default)]
struct Answer(Vec<message::Attribute>);

impl Answer {
    fn add(&mut self, attribute: impl Into<message::Attribute>) {
        self.0.push(attribute.into());
    }

    fn into_message(self, request: &TurnMessage) -> TurnMessage {
        let mut response = message::response_to(
            request.method(),
            request.transaction_id(),
            MessageClass::SuccessResponse,
        );
        for attribute in self.0 {
            response.add_attribute(attribute);
        }
        response
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
        // The client's data both ways, whatever its first byte: the relay is no ICE or
        // DTLS endpoint of a channel (a call that borrows one installs its own flows).
        opaque_payload: true,
        to_worker: false,
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
        .ok_or(Refusal::PeerAddressFamilyMismatch)?;
    if !policy.permits(peer.ip()) {
        return Err(Refusal::Forbidden);
    }
    Ok(relay)
}

/// An error response to `request`: `refusal.error_code()` for an authenticated request,
/// `refusal.bare_error_code()` (no reason phrase) for one that did not authenticate.
fn error_response(
    request: &TurnMessage,
    code: stun_codec::rfc5389::attributes::ErrorCode,
) -> TurnMessage {
    let mut response = message::response_to(
        request.method(),
        request.transaction_id(),
        MessageClass::ErrorResponse,
    );
    response.add_attribute(code);
    response
}
