//! Consent freshness (RFC 7675) of every connected leg on one timer for the whole ICE port.
//!
//! A webrtc-ice agent wakes every 200 ms for as long as it lives, connected or not, whatever
//! its keepalive setting: 1,000 connected calls cost 5,000 wakeups a second with their media
//! all in the kernel. So once ICE has selected a leg's pair the relay closes the leg's agent
//! and hands the leg to the port ([`Handoffs`]): the port's socket answers the app's checks
//! for it, one task sends the relay's checks (every 5 s randomized ±20 %, RFC 7675 section
//! 5.1) and says when consent is in doubt or has expired, and the leg's other packets (DTLS,
//! SRTP, media not in the kernel) go to its connection ([`HandedConn`]).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use rand::{Rng, SeedableRng, rngs::StdRng};
use stun::{
    agent::TransactionId,
    attributes::{ATTR_USE_CANDIDATE, ATTR_USERNAME},
    fingerprint::FINGERPRINT,
    integrity::MessageIntegrity,
    message::{
        BINDING_REQUEST, BINDING_SUCCESS, CLASS_ERROR_RESPONSE, CLASS_SUCCESS_RESPONSE, Getter,
        METHOD_BINDING, Message, Setter,
    },
    textattrs::Username,
    xoraddr::XorMappedAddress,
};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, watch},
};
use webrtc_ice::{
    candidate::CandidateType,
    control::{AttrControlled, AttrControlling},
    priority::PriorityAttr,
    state::ConnectionState,
};
use webrtc_util::Conn;

use super::leg::SelectedPair;

/// The basic period between consent checks (RFC 7675 section 5.1), randomized ±20 %; a
/// third of the consent timeout when that is shorter, so that a short timeout still sees
/// several checks (a 6 s timeout and a 6 s period would expire before the first answer).
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// A check unanswered this long is followed by another (a new transaction) every as long,
/// until one is answered.
const RECHECK_EVERY: Duration = Duration::from_secs(1);
/// No answer for this long, and a check unanswered for `RECHECK_EVERY`: consent is in doubt,
/// media toward the app stops (as webrtc-ice's Disconnected after 5 s did).
const DOUBT_AFTER: Duration = Duration::from_secs(5);
/// How often the port's timer looks at its legs.
const TICK: Duration = Duration::from_millis(250);
/// Packets queued toward a leg's connection; more are dropped (its reader is behind).
const QUEUE: usize = 256;
/// The relay's recent checks per leg whose answers still count.
const RECENT_CHECKS: usize = 4;

/// One leg's consent timers, sans-IO: the time comes in.
#[derive(Debug)]
struct Consent {
    timeout: Duration,
    /// The basic period between checks for this timeout.
    every: Duration,
    last_answer: Instant,
    /// The first check sent since the last answer.
    unanswered_since: Option<Instant>,
    next_check: Instant,
    in_doubt: bool,
    /// An ICE restart in progress since then: no checks on the old pair.
    restarting: Option<Instant>,
}

/// What a look at a leg's consent found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Look {
    /// Send a check now.
    check: bool,
    change: Option<Change>,
}

#[derive(Debug, PartialEq, Eq)]
enum Change {
    /// No answers: stop sending toward the app.
    Doubt,
    /// No answer for the consent timeout (or a restart that never completed): the leg ends.
    Expired { was_in_doubt: bool },
}

impl Consent {
    /// Consent just granted (the pair's checks succeeded): the next check after a period.
    fn new(now: Instant, timeout: Duration, spread: f64) -> Consent {
        let every = CHECK_EVERY.min(timeout / 3);
        Consent {
            timeout,
            every,
            last_answer: now,
            unanswered_since: None,
            next_check: now + period(every, spread),
            in_doubt: false,
            restarting: None,
        }
    }

    fn look(&mut self, now: Instant) -> Look {
        let mut look = Look::default();
        if let Some(since) = self.restarting {
            if now.saturating_duration_since(since) >= DOUBT_AFTER + self.timeout {
                look.change = Some(Change::Expired {
                    was_in_doubt: self.in_doubt,
                });
            }
            return look;
        }
        let silent = now.saturating_duration_since(self.last_answer);
        if silent >= self.timeout {
            look.change = Some(Change::Expired {
                was_in_doubt: self.in_doubt,
            });
            return look;
        }
        let overdue = self
            .unanswered_since
            .is_some_and(|since| now.saturating_duration_since(since) >= RECHECK_EVERY);
        if silent >= DOUBT_AFTER && overdue && !self.in_doubt {
            self.in_doubt = true;
            look.change = Some(Change::Doubt);
        }
        if now >= self.next_check {
            look.check = true;
            self.unanswered_since.get_or_insert(now);
            self.next_check = now + RECHECK_EVERY;
        }
        look
    }

    /// An answer to one of the relay's checks: true when consent was in doubt (media toward
    /// the app resumes).
    fn answered(&mut self, now: Instant, spread: f64) -> bool {
        self.last_answer = now;
        self.unanswered_since = None;
        self.next_check = now + period(self.every, spread);
        std::mem::replace(&mut self.in_doubt, false)
    }

    fn restart(&mut self, now: Instant) {
        self.restarting = Some(now);
    }

    /// The restart's new pair passed its checks: consent granted on it.
    fn restarted(&mut self, now: Instant, spread: f64) -> bool {
        self.restarting = None;
        self.answered(now, spread)
    }
}

/// `spread` in [0, 1): 0.8 to 1.2 times the basic period.
fn period(every: Duration, spread: f64) -> Duration {
    every.mul_f64(0.8 + 0.4 * spread.clamp(0.0, 1.0))
}

/// A leg's ICE credentials: the relay's (`local`) and the app's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub local_ufrag: String,
    pub local_pwd: String,
    pub remote_ufrag: String,
    pub remote_pwd: String,
}

/// What a connected leg hands to the port.
pub struct Handoff {
    pub credentials: Credentials,
    pub controlling: bool,
    /// The local candidate's priority (the PRIORITY of the relay's checks).
    pub priority: u32,
    pub pair: SelectedPair,
    pub consent_timeout: Duration,
    /// Where the leg's consent (Disconnected, Connected, Failed) and pair changes go.
    pub states: watch::Sender<ConnectionState>,
    pub pairs: watch::Sender<Option<SelectedPair>>,
}

/// What a leg's STUN messages need of its credentials, made once: each message would
/// otherwise format a USERNAME and copy a password.
struct Keys {
    /// The USERNAME of the app's checks (`relay:app`, RFC 8445 7.2.2).
    theirs: String,
    /// The USERNAME of the relay's checks (`app:relay`).
    ours: Username,
    /// MESSAGE-INTEGRITY with the relay's password (the app's checks and their answers)
    /// and with the app's (the relay's checks and their answers).
    local: MessageIntegrity,
    remote: MessageIntegrity,
}

impl Keys {
    fn of(credentials: &Credentials) -> Keys {
        Keys {
            theirs: format!("{}:{}", credentials.local_ufrag, credentials.remote_ufrag),
            ours: Username::new(
                ATTR_USERNAME,
                format!("{}:{}", credentials.remote_ufrag, credentials.local_ufrag),
            ),
            local: MessageIntegrity::new_short_term_integrity(credentials.local_pwd.clone()),
            remote: MessageIntegrity::new_short_term_integrity(credentials.remote_pwd.clone()),
        }
    }
}

struct Handed {
    credentials: Credentials,
    keys: Keys,
    controlling: bool,
    tie_breaker: u64,
    priority: u32,
    pair: SelectedPair,
    consent: Consent,
    recent_checks: [Option<TransactionId>; RECENT_CHECKS],
    next_slot: usize,
    states: watch::Sender<ConnectionState>,
    pairs: watch::Sender<Option<SelectedPair>>,
    packets: mpsc::Sender<Vec<u8>>,
    /// Which restart is the current one (a later restart makes an earlier one's result
    /// meaningless).
    restart: u64,
}

impl Handed {
    fn sent_check(&self, id: TransactionId) -> bool {
        self.recent_checks.contains(&Some(id))
    }
}

struct Table {
    legs: HashMap<u64, Handed>,
    by_ufrag: HashMap<String, u64>,
    by_remote: HashMap<SocketAddr, u64>,
    next_id: u64,
    rng: StdRng,
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<Handed> {
        let leg = self.legs.remove(&id)?;
        if self.by_ufrag.get(&leg.credentials.local_ufrag) == Some(&id) {
            self.by_ufrag.remove(&leg.credentials.local_ufrag);
        }
        if self.by_remote.get(&leg.pair.remote) == Some(&id) {
            self.by_remote.remove(&leg.pair.remote);
        }
        Some(leg)
    }

    /// The leg's pair moves to `pair` (the app nominated another, or a restart completed).
    fn move_to(&mut self, id: u64, pair: SelectedPair) {
        let Some(leg) = self.legs.get_mut(&id) else {
            return;
        };
        if self.by_remote.get(&leg.pair.remote) == Some(&id) {
            self.by_remote.remove(&leg.pair.remote);
        }
        leg.pair = pair;
        self.by_remote.insert(pair.remote, id);
        leg.pairs.send_replace(Some(pair));
    }
}

/// The connected legs of one ICE port.
pub struct Handoffs {
    socket: Arc<UdpSocket>,
    /// The same socket for the answers and checks sent under the table's lock: a
    /// non-blocking send that needs no readiness from tokio's reactor.
    sender: std::net::UdpSocket,
    table: Mutex<Table>,
    /// Where webrtc-ice's mux sent from this port, and when last: the mux knows a source
    /// only once one of its agents sent to it, so anything but STUN from elsewhere is
    /// dropped (here, and counted; the mux would drop it silently).
    mux_sent_to: Mutex<HashMap<SocketAddr, Instant>>,
    discards: [AtomicU64; PortDiscard::ALL.len()],
}

/// Why the ICE port dropped a datagram before any leg or agent saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortDiscard {
    /// Not STUN, from a source no leg or agent talks to (a stranger's datagram).
    UnknownSource,
    /// Looks like STUN (RFC 7983 first byte, magic cookie) but does not parse.
    MalformedStun,
    /// For a connected leg whose reader is behind (its queue is full).
    LegQueueFull,
}

impl PortDiscard {
    pub const ALL: [PortDiscard; 3] = [
        PortDiscard::UnknownSource,
        PortDiscard::MalformedStun,
        PortDiscard::LegQueueFull,
    ];

    /// Its metric label.
    pub fn name(self) -> &'static str {
        match self {
            PortDiscard::UnknownSource => "unknown_source",
            PortDiscard::MalformedStun => "malformed_stun",
            PortDiscard::LegQueueFull => "leg_queue_full",
        }
    }
}

/// How long the port remembers where the mux sent: longer than any agent goes without
/// sending to a pair it checks (connected legs are handed off, and their traffic never
/// reaches the mux).
const MUX_SENT_TO_MEMORY: Duration = Duration::from_secs(600);

impl Handoffs {
    /// The legs on `socket` (the port's), with their timer: it stops when the port goes.
    pub fn new(socket: Arc<UdpSocket>) -> std::io::Result<Arc<Handoffs>> {
        let sender = socket2::SockRef::from(&*socket).try_clone()?.into();
        let handoffs = Arc::new(Handoffs {
            socket,
            sender,
            table: Mutex::new(Table {
                legs: HashMap::new(),
                by_ufrag: HashMap::new(),
                by_remote: HashMap::new(),
                next_id: 0,
                rng: StdRng::from_os_rng(),
            }),
            mux_sent_to: Mutex::new(HashMap::new()),
            discards: Default::default(),
        });
        let weak = Arc::downgrade(&handoffs);
        tokio::spawn(tick(weak));
        Ok(handoffs)
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().expect("ICE handoffs")
    }

    /// Takes over a connected leg: returns its id and its connection (packets from the
    /// pair's remote that are not consent checks).
    pub fn hand_off(self: &Arc<Self>, handoff: Handoff) -> (u64, Arc<HandedConn>) {
        let (packets, receiver) = mpsc::channel(QUEUE);
        let mut table = self.table();
        let id = table.next_id;
        table.next_id += 1;
        let spread = table.rng.random();
        let tie_breaker = table.rng.random();
        let remote = handoff.pair.remote;
        table
            .by_ufrag
            .insert(handoff.credentials.local_ufrag.clone(), id);
        table.by_remote.insert(remote, id);
        table.legs.insert(
            id,
            Handed {
                keys: Keys::of(&handoff.credentials),
                credentials: handoff.credentials,
                controlling: handoff.controlling,
                tie_breaker,
                priority: handoff.priority,
                pair: handoff.pair,
                consent: Consent::new(Instant::now(), handoff.consent_timeout, spread),
                recent_checks: [None; RECENT_CHECKS],
                next_slot: 0,
                states: handoff.states,
                pairs: handoff.pairs,
                packets,
                restart: 0,
            },
        );
        let conn = Arc::new(HandedConn {
            id,
            handoffs: self.clone(),
            packets: tokio::sync::Mutex::new(receiver),
            local: handoff.pair.local,
        });
        (id, conn)
    }

    /// A connected leg as it is now (credentials, role, priority, pair), for the state
    /// store: a leg handed off again with these goes on where it was.
    pub fn leg(&self, id: u64) -> Option<(Credentials, bool, u32, SelectedPair)> {
        let table = self.table();
        let leg = table.legs.get(&id)?;
        Some((
            leg.credentials.clone(),
            leg.controlling,
            leg.priority,
            leg.pair,
        ))
    }

    /// The leg is gone (its call ended): nothing more is sent or taken for it.
    pub fn remove(&self, id: u64) {
        self.table().remove(id);
    }

    /// An ICE restart begins: no checks on the old pair meanwhile; it expires if the restart
    /// does not complete in time. Returns the restart's number, None for an unknown leg.
    pub fn restart(&self, id: u64) -> Option<u64> {
        let mut table = self.table();
        let leg = table.legs.get_mut(&id)?;
        leg.restart += 1;
        leg.consent.restart(Instant::now());
        Some(leg.restart)
    }

    /// Restart `restart` completed on `pair` with the leg's new credentials.
    pub fn restarted(
        &self,
        id: u64,
        restart: u64,
        credentials: Credentials,
        priority: u32,
        pair: SelectedPair,
    ) {
        let mut table = self.table();
        let spread = table.rng.random();
        let Some(leg) = table.legs.get_mut(&id) else {
            return;
        };
        if leg.restart != restart {
            return;
        }
        leg.keys = Keys::of(&credentials);
        let old_ufrag = std::mem::replace(&mut leg.credentials, credentials);
        leg.priority = priority;
        leg.recent_checks = [None; RECENT_CHECKS];
        let regained = leg.consent.restarted(Instant::now(), spread);
        if regained {
            leg.states.send_replace(ConnectionState::Connected);
        }
        let new_ufrag = leg.credentials.local_ufrag.clone();
        if table.by_ufrag.get(&old_ufrag.local_ufrag) == Some(&id) {
            table.by_ufrag.remove(&old_ufrag.local_ufrag);
        }
        table.by_ufrag.insert(new_ufrag, id);
        table.move_to(id, pair);
    }

    /// Restart `restart` failed (its checks never succeeded): the leg's consent is gone.
    pub fn restart_failed(&self, id: u64, restart: u64) {
        let mut table = self.table();
        if table
            .legs
            .get(&id)
            .is_some_and(|leg| leg.restart == restart)
            && let Some(leg) = table.remove(id)
        {
            if !leg.consent.in_doubt {
                leg.states.send_replace(ConnectionState::Disconnected);
            }
            leg.states.send_replace(ConnectionState::Failed);
        }
    }

    fn remote(&self, id: u64) -> Option<SocketAddr> {
        self.table().legs.get(&id).map(|leg| leg.pair.remote)
    }

    /// A packet the port received from `from`: true when it belonged to a handed-off leg
    /// (answered, counted or queued to the leg), false when the mux should have it (legs
    /// still connecting).
    fn take(&self, packet: &[u8], from: SocketAddr) -> bool {
        // RFC 7983: STUN starts with 0..=3; RTP, DTLS and the rest go to the leg.
        if packet.first().is_some_and(|&b| b > 3) || !stun::message::is_message(packet) {
            let table = self.table();
            let Some(leg) = table.by_remote.get(&from).and_then(|id| table.legs.get(id)) else {
                drop(table);
                if self.mux_knows(from) {
                    return false;
                }
                self.discard(PortDiscard::UnknownSource);
                return true;
            };
            if leg.packets.try_send(packet.to_vec()).is_err() {
                self.discard(PortDiscard::LegQueueFull);
            }
            return true;
        }
        let mut message = Message::new();
        if message.unmarshal_binary(packet).is_err() {
            self.discard(PortDiscard::MalformedStun);
            return true;
        }
        if message.typ == BINDING_REQUEST {
            self.answer(message, from)
        } else if message.typ.method == METHOD_BINDING
            && (message.typ.class == CLASS_SUCCESS_RESPONSE
                || message.typ.class == CLASS_ERROR_RESPONSE)
        {
            self.answered(message, from)
        } else {
            false
        }
    }

    /// The app's check (its consent for the relay's media, or a nomination).
    fn answer(&self, mut request: Message, from: SocketAddr) -> bool {
        let mut username = Username::new(ATTR_USERNAME, String::new());
        if username.get_from(&request).is_err() {
            return false;
        }
        let local_ufrag = username.text.split(':').next().unwrap_or_default();
        let mut table = self.table();
        let Some(&id) = table.by_ufrag.get(local_ufrag) else {
            return false;
        };
        let leg = table.legs.get(&id).expect("indexed legs exist");
        if username.text != leg.keys.theirs || leg.keys.local.check(&mut request).is_err() {
            tracing::debug!(%from, "ice: a check with wrong credentials for a connected leg dropped");
            return true;
        }
        let mut response = Message::new();
        let built = response.build(&[
            Box::new(request.transaction_id),
            Box::new(BINDING_SUCCESS),
            Box::new(XorMappedAddress {
                ip: from.ip(),
                port: from.port(),
            }),
            Box::new(leg.keys.local.clone()),
            Box::new(FINGERPRINT),
        ]);
        if built.is_ok() {
            let _ = self.sender.send_to(&response.raw, from);
        }
        // A controlling app nominating a pair from another address (its NAT mapping
        // changed under the same credentials): the media follows.
        if !leg.controlling && request.contains(ATTR_USE_CANDIDATE) && from != leg.pair.remote {
            let pair = SelectedPair {
                remote: from,
                remote_type: CandidateType::PeerReflexive,
                ..leg.pair
            };
            tracing::info!(from = %leg.pair.remote, to = %from, "ice: the app nominated another pair");
            table.move_to(id, pair);
        }
        true
    }

    /// An answer to one of the relay's consent checks.
    fn answered(&self, mut response: Message, from: SocketAddr) -> bool {
        let mut table = self.table();
        let spread = table.rng.random();
        let Some(&id) = table.by_remote.get(&from) else {
            return false;
        };
        let leg = table.legs.get_mut(&id).expect("indexed legs exist");
        if !leg.sent_check(response.transaction_id) {
            // The restart agent's, on the same address.
            return false;
        }
        if response.typ.class == CLASS_ERROR_RESPONSE
            || leg.keys.remote.check(&mut response).is_err()
        {
            return true;
        }
        if leg.consent.answered(Instant::now(), spread) {
            leg.states.send_replace(ConnectionState::Connected);
        }
        true
    }

    fn discard(&self, why: PortDiscard) {
        self.discards[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Datagrams the port dropped before any leg or agent saw them, by reason.
    pub fn discards(&self) -> [(PortDiscard, u64); PortDiscard::ALL.len()] {
        PortDiscard::ALL.map(|why| (why, self.discards[why as usize].load(Ordering::Relaxed)))
    }

    fn mux_sent(&self, to: SocketAddr) {
        self.mux_sent_to
            .lock()
            .expect("mux destinations")
            .insert(to, Instant::now());
    }

    fn mux_knows(&self, from: SocketAddr) -> bool {
        self.mux_sent_to
            .lock()
            .expect("mux destinations")
            .contains_key(&from)
    }

    /// The port's timer: each leg's checks and consent.
    fn tick(&self, now: Instant) {
        self.mux_sent_to
            .lock()
            .expect("mux destinations")
            .retain(|_, at| now.duration_since(*at) < MUX_SENT_TO_MEMORY);
        let mut table = self.table();
        let mut expired = Vec::new();
        for (&id, leg) in table.legs.iter_mut() {
            let look = leg.consent.look(now);
            match look.change {
                Some(Change::Doubt) => {
                    leg.states.send_replace(ConnectionState::Disconnected);
                }
                Some(Change::Expired { was_in_doubt }) => {
                    if !was_in_doubt {
                        leg.states.send_replace(ConnectionState::Disconnected);
                    }
                    leg.states.send_replace(ConnectionState::Failed);
                    expired.push(id);
                    continue;
                }
                None => {}
            }
            if look.check {
                self.check(leg);
            }
        }
        for id in expired {
            table.remove(id);
        }
    }

    /// Sends the relay's consent check on the leg's pair (RFC 8445 7.1's attributes).
    fn check(&self, leg: &mut Handed) {
        let transaction = TransactionId::new();
        let role: Box<dyn Setter> = if leg.controlling {
            Box::new(AttrControlling(leg.tie_breaker))
        } else {
            Box::new(AttrControlled(leg.tie_breaker))
        };
        let mut request = Message::new();
        let built = request.build(&[
            Box::new(BINDING_REQUEST),
            Box::new(transaction),
            Box::new(leg.keys.ours.clone()),
            role,
            Box::new(PriorityAttr(leg.priority)),
            Box::new(leg.keys.remote.clone()),
            Box::new(FINGERPRINT),
        ]);
        if built.is_err() {
            return;
        }
        leg.recent_checks[leg.next_slot] = Some(transaction);
        leg.next_slot = (leg.next_slot + 1) % RECENT_CHECKS;
        let _ = self.sender.send_to(&request.raw, leg.pair.remote);
    }
}

async fn tick(handoffs: Weak<Handoffs>) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        every.tick().await;
        let Some(handoffs) = handoffs.upgrade() else {
            return;
        };
        handoffs.tick(Instant::now());
    }
}

/// The ICE port's socket as webrtc-ice's mux sees it: packets of handed-off legs never
/// reach the mux.
pub struct PortSocket {
    pub socket: Arc<UdpSocket>,
    pub handoffs: Arc<Handoffs>,
}

#[async_trait]
impl Conn for PortSocket {
    async fn connect(&self, addr: SocketAddr) -> webrtc_util::Result<()> {
        Ok(self.socket.connect(addr).await?)
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        Ok(self.recv_from(buf).await?.0)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        loop {
            let (n, from) = self.socket.recv_from(buf).await?;
            if !self.handoffs.take(&buf[..n], from) {
                return Ok((n, from));
            }
        }
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        Ok(self.socket.send(buf).await?)
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        self.handoffs.mux_sent(target);
        Ok(self.socket.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        None
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

/// A handed-off leg's connection: what the app sends that is not a consent check, and
/// sends to the leg's current pair.
pub struct HandedConn {
    id: u64,
    handoffs: Arc<Handoffs>,
    packets: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    local: SocketAddr,
}

#[async_trait]
impl Conn for HandedConn {
    async fn connect(&self, _addr: SocketAddr) -> webrtc_util::Result<()> {
        Err(webrtc_util::Error::Other(
            "a leg's connection follows its pair".into(),
        ))
    }

    async fn recv(&self, buf: &mut [u8]) -> webrtc_util::Result<usize> {
        let packet = self
            .packets
            .lock()
            .await
            .recv()
            .await
            .ok_or(webrtc_util::Error::ErrUseClosedNetworkConn)?;
        let n = packet.len().min(buf.len());
        buf[..n].copy_from_slice(&packet[..n]);
        Ok(n)
    }

    async fn recv_from(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        let n = self.recv(buf).await?;
        let from = self
            .remote_addr()
            .ok_or(webrtc_util::Error::ErrUseClosedNetworkConn)?;
        Ok((n, from))
    }

    async fn send(&self, buf: &[u8]) -> webrtc_util::Result<usize> {
        let to = self
            .remote_addr()
            .ok_or(webrtc_util::Error::ErrUseClosedNetworkConn)?;
        Ok(self.handoffs.socket.send_to(buf, to).await?)
    }

    async fn send_to(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        Ok(self.handoffs.socket.send_to(buf, target).await?)
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.local)
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        self.handoffs.remote(self.id)
    }

    async fn close(&self) -> webrtc_util::Result<()> {
        self.handoffs.remove(self.id);
        Ok(())
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

impl HandedConn {
    /// Queues a packet the leg's agent had received before the handoff.
    pub fn queue(&self, packet: Vec<u8>) {
        let table = self.handoffs.table();
        if let Some(leg) = table.legs.get(&self.id) {
            let _ = leg.packets.try_send(packet);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(30);

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Looks every 250 ms from `from` to `to` seconds; the checks sent and changes seen.
    fn run(
        consent: &mut Consent,
        start: Instant,
        from: f64,
        to: f64,
        mut answer: impl FnMut(f64) -> bool,
    ) -> (Vec<f64>, Vec<(f64, Change)>) {
        let (mut checks, mut changes) = (Vec::new(), Vec::new());
        let mut t = from;
        while t <= to {
            let look = consent.look(start + secs(t));
            if look.check {
                checks.push(t);
                if answer(t) {
                    consent.answered(start + secs(t + 0.01), 0.5);
                }
            }
            if let Some(change) = look.change {
                let expired = matches!(change, Change::Expired { .. });
                changes.push((t, change));
                if expired {
                    // The port removes an expired leg.
                    break;
                }
            }
            t += 0.25;
        }
        (checks, changes)
    }

    #[test]
    fn an_answering_app_is_checked_every_period_and_never_in_doubt() {
        let start = Instant::now();
        let mut consent = Consent::new(start, TIMEOUT, 0.5);
        let (checks, changes) = run(&mut consent, start, 0.0, 60.0, |_| true);
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(checks.len(), 11, "{checks:?}");
        for pair in checks.windows(2) {
            assert!((4.75..=5.25).contains(&(pair[1] - pair[0])), "{checks:?}");
        }
    }

    #[test]
    fn the_period_is_randomized_between_four_and_six_seconds() {
        assert_eq!(period(CHECK_EVERY, 0.0), secs(4.0));
        assert_eq!(period(CHECK_EVERY, 0.5), secs(5.0));
        assert_eq!(period(CHECK_EVERY, 1.0), secs(6.0));
    }

    #[test]
    fn a_short_timeout_is_checked_every_third_of_it_and_never_expires_when_answered() {
        let start = Instant::now();
        // The longest period: a 6 s timeout used to expire before its first check.
        let mut consent = Consent::new(start, secs(6.0), 1.0);
        let (checks, changes) = run(&mut consent, start, 0.0, 30.0, |_| true);
        assert!(changes.is_empty(), "{changes:?}");
        assert!(checks[0] <= 2.5, "{checks:?}");
        for pair in checks.windows(2) {
            assert!(pair[1] - pair[0] <= 2.5, "{checks:?}");
        }
    }

    #[test]
    fn a_silent_app_is_in_doubt_within_a_period_and_a_second_and_expires_at_the_timeout() {
        let start = Instant::now();
        let mut consent = Consent::new(start, TIMEOUT, 1.0);
        // Answers until 10 s, then nothing.
        let (checks, changes) = run(&mut consent, start, 0.0, 40.0, |t| t < 10.0);
        let last_answered = checks.iter().copied().rfind(|&t| t < 10.0).unwrap();
        let (doubt_at, _) = changes
            .iter()
            .find(|(_, c)| *c == Change::Doubt)
            .expect("doubt");
        assert!(*doubt_at - last_answered <= 7.5, "{changes:?} {checks:?}");
        assert!(*doubt_at - last_answered >= 5.0, "{changes:?} {checks:?}");
        // Unanswered checks are repeated every second.
        let after: Vec<_> = checks.iter().filter(|&&t| t > 10.0).collect();
        assert!(after.windows(2).all(|p| (p[1] - p[0] - 1.0).abs() < 0.01));
        let (expired_at, expired) = changes.last().unwrap();
        assert_eq!(*expired, Change::Expired { was_in_doubt: true });
        assert!(
            (expired_at - last_answered - 30.0).abs() <= 0.26,
            "{changes:?}"
        );
    }

    #[test]
    fn an_answer_after_doubt_regains_consent() {
        let start = Instant::now();
        let mut consent = Consent::new(start, TIMEOUT, 0.5);
        let (_, changes) = run(&mut consent, start, 0.0, 15.0, |t| t < 1.0);
        assert_eq!(changes.len(), 1);
        assert!(consent.answered(start + secs(15.1), 0.5));
        assert!(!consent.answered(start + secs(15.2), 0.5));
        let (_, changes) = run(&mut consent, start, 15.25, 40.0, |_| true);
        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn a_restart_pauses_checks_and_expires_when_it_never_completes() {
        let start = Instant::now();
        let mut consent = Consent::new(start, TIMEOUT, 0.5);
        consent.restart(start + secs(1.0));
        let (checks, changes) = run(&mut consent, start, 1.0, 40.0, |_| true);
        assert!(checks.is_empty(), "{checks:?}");
        assert_eq!(
            changes,
            [(
                36.0,
                Change::Expired {
                    was_in_doubt: false
                }
            )]
        );
        let mut consent = Consent::new(start, TIMEOUT, 0.5);
        consent.restart(start + secs(1.0));
        assert!(!consent.restarted(start + secs(3.0), 0.5));
        let (checks, changes) = run(&mut consent, start, 3.0, 40.0, |_| true);
        assert!(
            changes.is_empty() && checks.first() == Some(&8.0),
            "{checks:?}"
        );
    }

    /// A leg handed to a port on loopback, and the app's socket.
    async fn handed_leg() -> (
        Arc<Handoffs>,
        Arc<HandedConn>,
        UdpSocket,
        watch::Receiver<ConnectionState>,
    ) {
        let port = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let app = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let handoffs = Handoffs::new(port.clone()).unwrap();
        let (states, states_rx) = watch::channel(ConnectionState::Connected);
        let (pairs, _) = watch::channel(None);
        let (_, conn) = handoffs.hand_off(Handoff {
            credentials: Credentials {
                local_ufrag: "relay".into(),
                local_pwd: "relay-password-0123456789".into(),
                remote_ufrag: "app".into(),
                remote_pwd: "app-password-0123456789".into(),
            },
            controlling: true,
            priority: 1,
            pair: SelectedPair {
                local: port.local_addr().unwrap(),
                remote: app.local_addr().unwrap(),
                local_type: CandidateType::Host,
                remote_type: CandidateType::PeerReflexive,
            },
            consent_timeout: TIMEOUT,
            states,
            pairs,
        });
        (handoffs, conn, app, states_rx)
    }

    fn binding_request(username: &str, password: &str) -> Message {
        let mut request = Message::new();
        request
            .build(&[
                Box::new(BINDING_REQUEST),
                Box::new(TransactionId::new()),
                Box::new(Username::new(ATTR_USERNAME, username.into())),
                Box::new(MessageIntegrity::new_short_term_integrity(password.into())),
                Box::new(FINGERPRINT),
            ])
            .unwrap();
        request
    }

    #[tokio::test]
    async fn the_port_answers_a_connected_legs_checks_and_queues_its_other_packets() {
        let (handoffs, conn, app, _states) = handed_leg().await;
        let from = app.local_addr().unwrap();
        let request = binding_request("relay:app", "relay-password-0123456789");
        assert!(handoffs.take(&request.raw, from));
        let mut buf = [0u8; 1500];
        let n = tokio::time::timeout(Duration::from_secs(2), app.recv(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        let mut response = Message::new();
        response.unmarshal_binary(&buf[..n]).unwrap();
        assert_eq!(response.typ, BINDING_SUCCESS);
        assert_eq!(response.transaction_id, request.transaction_id);
        MessageIntegrity::new_short_term_integrity("relay-password-0123456789".into())
            .check(&mut response)
            .unwrap();
        let mut mapped = XorMappedAddress::default();
        mapped.get_from(&response).unwrap();
        assert_eq!(SocketAddr::new(mapped.ip, mapped.port), from);

        // RTP (or DTLS) from the app's address goes to the leg's connection.
        let rtp = [0x80u8, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7];
        assert!(handoffs.take(&rtp, from));
        let n = conn.recv(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &rtp);
        assert_eq!(conn.remote_addr(), Some(from));
    }

    #[tokio::test]
    async fn checks_with_wrong_credentials_are_dropped_and_other_legs_go_to_the_mux() {
        let (handoffs, _conn, app, _states) = handed_leg().await;
        let from = app.local_addr().unwrap();
        // This leg's, badly signed: taken, not answered.
        let forged = binding_request("relay:app", "not-the-password");
        assert!(handoffs.take(&forged.raw, from));
        let mut buf = [0u8; 1500];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), app.recv(&mut buf))
                .await
                .is_err()
        );
        // Another leg's (still checking on the mux), and packets from anyone else.
        let other = binding_request("other:app", "whatever-password");
        assert!(!handoffs.take(&other.raw, from));
        // A response nobody asked for is the mux's (a checking agent's, same address).
        let mut response = Message::new();
        response
            .build(&[Box::new(BINDING_SUCCESS), Box::new(TransactionId::new())])
            .unwrap();
        assert!(!handoffs.take(&response.raw, from));
        // Media from where an agent of the mux sent its checks is the mux's.
        let elsewhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
        handoffs.mux_sent(elsewhere);
        assert!(!handoffs.take(&[0x80, 0, 0, 1], elsewhere));
        assert_eq!(handoffs.discards()[0], (PortDiscard::UnknownSource, 0));
        // A removed leg's packets are nobody's: dropped and counted, as the mux would
        // drop them unseen.
        handoffs.remove(0);
        assert!(handoffs.take(&[0x80, 0, 0, 1], from));
        assert_eq!(handoffs.discards()[0], (PortDiscard::UnknownSource, 1));
    }

    #[tokio::test]
    async fn strangers_datagrams_are_dropped_and_counted_by_reason() {
        let (handoffs, _conn, _app, _states) = handed_leg().await;
        let stranger: SocketAddr = "127.0.0.1:7".parse().unwrap();
        // Not STUN (RTP, DTLS, garbage, nothing at all), from a source nobody talks to.
        for datagram in [
            &[0x80u8, 0, 0, 1][..],
            &[22, 254, 253],
            b"GET / HTTP/1.1",
            &[],
        ] {
            assert!(handoffs.take(datagram, stranger));
        }
        // STUN's first bytes and magic cookie, then attributes that do not parse.
        let mut broken = binding_request("relay:app", "relay-password-0123456789").raw;
        broken[2..4].copy_from_slice(&[0, 200]);
        broken.truncate(40);
        assert!(handoffs.take(&broken, stranger));
        // A well-formed check for an agent still checking: the mux's to judge.
        let check = binding_request("other:app", "whatever-password");
        assert!(!handoffs.take(&check.raw, stranger));
        assert_eq!(
            handoffs.discards(),
            [
                (PortDiscard::UnknownSource, 4),
                (PortDiscard::MalformedStun, 1),
                (PortDiscard::LegQueueFull, 0),
            ]
        );
        // Forgotten ten minutes after the mux last sent there.
        handoffs.mux_sent(stranger);
        assert!(!handoffs.take(&[0x80, 0, 0, 1], stranger));
        handoffs.tick(Instant::now() + MUX_SENT_TO_MEMORY);
        assert!(handoffs.take(&[0x80, 0, 0, 1], stranger));
    }

    #[tokio::test]
    async fn the_relays_check_is_answered_and_grants_consent() {
        let (handoffs, _conn, app, _states) = handed_leg().await;
        let from = app.local_addr().unwrap();
        {
            let mut table = handoffs.table();
            let leg = table.legs.get_mut(&0).unwrap();
            handoffs.check(leg);
        }
        let mut buf = [0u8; 1500];
        let n = tokio::time::timeout(Duration::from_secs(2), app.recv(&mut buf))
            .await
            .expect("a check")
            .unwrap();
        let mut check = Message::new();
        check.unmarshal_binary(&buf[..n]).unwrap();
        let mut username = Username::new(ATTR_USERNAME, String::new());
        username.get_from(&check).unwrap();
        assert_eq!(username.to_string(), "app:relay");
        assert!(check.contains(stun::attributes::ATTR_ICE_CONTROLLING));
        MessageIntegrity::new_short_term_integrity("app-password-0123456789".into())
            .check(&mut check)
            .unwrap();
        let answered_before = handoffs.table().legs[&0].consent.last_answer;
        let mut response = Message::new();
        response
            .build(&[
                Box::new(check.clone()),
                Box::new(BINDING_SUCCESS),
                Box::new(MessageIntegrity::new_short_term_integrity(
                    "app-password-0123456789".into(),
                )),
                Box::new(FINGERPRINT),
            ])
            .unwrap();
        assert!(handoffs.take(&response.raw, from));
        assert!(handoffs.table().legs[&0].consent.last_answer > answered_before);
    }
}
