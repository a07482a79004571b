//! The TURN core driven directly: a client signing requests with long-term credentials,
//! a fixed clock and a predictable random source.

use bytecodec::DecodeExt;
use stun_codec::{
    Message, MessageDecoder, Method,
    rfc5389::attributes::ErrorCode,
    rfc5766::{
        attributes::{DontFragment, EvenPort, RequestedTransport},
        methods::{ALLOCATE, CHANNEL_BIND, CREATE_PERMISSION, REFRESH},
    },
    rfc8656::attributes::{AdditionalAddressFamily, RequestedAddressFamily},
};

use super::*;
use crate::turn::{
    credentials::rest_api_password,
    message::{Attribute, ChannelNumber},
};

const UDP: u8 = 17;

/// Relay ports from the bottom of the range (the first free one, as a scan finds it), and
/// distinct tokens and transaction ids: a random source whose results a test can predict.
struct StepRandom(u64);

impl RngCore for StepRandom {
    fn next_u32(&mut self) -> u32 {
        0
    }

    fn next_u64(&mut self) -> u64 {
        self.0 += 1;
        self.0
    }

    fn fill_bytes(&mut self, bytes: &mut [u8]) {
        for chunk in bytes.chunks_mut(8) {
            let next = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&next[..chunk.len()]);
        }
    }
}

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
        max_request_rate_per_source: 0,
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
        Box::new(StepRandom(0)),
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
        // A new allocation's answer waits for its relay sockets: here they open, shown as
        // the `OpenRelay` actions they amount to, and the 508 kept for a failure is checked.
        if let Some(position) = actions
            .iter()
            .position(|a| matches!(a, Action::Allocate { .. }))
        {
            let Action::Allocate {
                relays,
                dont_fragment,
                answer,
                refusal,
                ..
            } = actions.remove(position)
            else {
                unreachable!()
            };
            let answer = self.response(*answer);
            let refusal = self.response(*refusal);
            assert_eq!(code(&refusal), 508, "{refusal:?}");
            assert_eq!(refusal.transaction_id(), answer.transaction_id());
            assert!(refusal.get_attribute::<MessageIntegrity>().is_some() || self.sha256);
            let opens = relays.into_iter().map(|relay| Action::OpenRelay {
                relay,
                dont_fragment,
            });
            actions.splice(position..position, opens);
            return (answer, actions);
        }
        let position = actions
            .iter()
            .position(|a| matches!(a, Action::Send { to, .. } if *to == self.from))
            .expect("a response");
        (self.response(actions.remove(position)), actions)
    }

    /// The message a `Send` to this client carries.
    fn response(&self, action: Action) -> TurnMessage {
        let Action::Send { bytes, from, to } = action else {
            panic!("not a send: {action:?}")
        };
        assert_eq!((from, to), (addr(LISTENER), self.from));
        decode(&bytes)
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
fn a_relay_port_held_elsewhere_is_left_out_and_the_allocate_tried_again() {
    let mut server = server();
    // Two relay ports only.
    server.config.ports = 49152..=49153;
    let mut alice = Client::new(ALICE, "alice", "wonderland");
    let (challenge, _) = alice.send(&mut server, T0, ALLOCATE, vec![]);
    alice.nonce_from(&challenge);
    let request = alice.request(ALLOCATE, vec![RequestedTransport::new(UDP).into()]);
    let first = server.from_client(T0, addr(LISTENER), addr(ALICE), &request);
    let [
        Action::Allocate {
            relays,
            client,
            server: listener,
            request: kept,
            ..
        },
    ] = first.as_slice()
    else {
        panic!("{first:?}")
    };
    assert_eq!(
        (*client, *listener, kept.as_slice()),
        (addr(ALICE), addr(LISTENER), request.as_slice())
    );
    let held = relays[0];
    // The driver could not bind it: the allocation goes, nothing is refused yet.
    assert_eq!(
        server.relay_unavailable(T0, held, true),
        [Action::CloseRelay(held)]
    );
    assert!(server.allocations().is_empty());
    assert!(server.refusals().is_empty(), "{:?}", server.refusals());
    // The same request again gets the other port (no 437, no rate limit).
    let again = server.from_client(T0, addr(LISTENER), addr(ALICE), &request);
    let [Action::Allocate { relays, .. }] = again.as_slice() else {
        panic!("{again:?}")
    };
    let other = relays[0];
    assert_ne!(other, held);
    // That one is held too, and tries are over: counted with its own reason, and no port
    // is left for a minute.
    assert_eq!(
        server.relay_unavailable(T0, other, false),
        [Action::CloseRelay(other)]
    );
    assert_eq!(server.refusals(), [(508, "Relay Port in Use", 1)]);
    assert_eq!(server.relay_bind_failures(), 2);
    let (response, _) = Client::new("198.51.100.7:40001", "bob", "builder").call(
        &mut server,
        T0 + 1,
        ALLOCATE,
        vec![RequestedTransport::new(UDP).into()],
    );
    assert_eq!(code(&response), 508);
    server.expire(T0 + HELD_ELSEWHERE_LIFETIME + 1);
    let mut carol = Client::new("198.51.100.7:40002", "alice", "wonderland");
    let relay = carol.allocate(&mut server, T0 + HELD_ELSEWHERE_LIFETIME + 1);
    assert!([held, other].contains(&relay));
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
    let mut send = TurnMessage::new(MessageClass::Indication, SEND, TransactionId::new([1; 12]));
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
        opaque_payload: true,
        to_worker: false,
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
                Action::Allocate { answer, .. } => match answer.as_ref() {
                    Action::Send { bytes, .. } => Some(decode(bytes)),
                    _ => None,
                },
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(answer(&first).class(), MessageClass::SuccessResponse);
    assert_eq!(answer(&again).class(), MessageClass::SuccessResponse);
    assert_eq!(relays(&answer(&first)), relays(&answer(&again)));
    assert!(
        matches!(first.as_slice(), [Action::Allocate { .. }]),
        "the answer after the relay socket opens: {first:?}"
    );
    assert!(
        matches!(again.as_slice(), [Action::Send { .. }]),
        "the answer only: {again:?}"
    );
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
        let mut send =
            TurnMessage::new(MessageClass::Indication, SEND, TransactionId::new([7; 12]));
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
        opaque_payload: true,
        to_worker: false,
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

#[test]
fn relay_ports_are_drawn_at_random_within_the_range() {
    let mut server = server();
    server.config.ports = 49152..=59151;
    server.config.max_allocations_per_user = 10;
    server.random = Box::new(<rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(7));
    let ports: Vec<u16> = (1..=4)
        .map(|host| {
            let mut alice = Client::new(&format!("198.51.100.{host}:50000"), "alice", "wonderland");
            alice.allocate(&mut server, T0).port()
        })
        .collect();
    assert!(
        ports.iter().all(|port| server.config.ports.contains(port)),
        "{ports:?}"
    );
    let mut distinct = ports.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), ports.len(), "{ports:?}");
    // A scan from the bottom would have given 49152, 49153, 49154, 49155.
    assert!(ports.iter().any(|port| *port > 49152 + 100), "{ports:?}");
}

/// Amplification: what a spoofed source gets back for each request a stranger can send
/// (no credentials), as bytes answered per byte received. A 20-byte request's 401 must
/// carry ERROR-CODE, REALM and NONCE (RFC 8489 9.2.4); the relay adds only FINGERPRINT,
/// with no reason phrase and no SOFTWARE, so the worst case is 84 bytes for 20 with this
/// realm (4.2x; coturn answered 5.4x on the same probes).
#[test]
fn unauthenticated_answers_are_the_smallest_rfc_8656_allows() {
    let mut server = server();
    let stranger = Client::new(ALICE, "", "");
    let mut unknown = stranger.request(REFRESH, vec![]);
    // A comprehension-required attribute nobody knows (0x7777) with 4 bytes of value.
    unknown.extend_from_slice(&[0x77, 0x77, 0, 4, 1, 2, 3, 4]);
    unknown[3] += 8;
    let probes: Vec<(&str, Vec<u8>)> = vec![
        ("Binding", stranger.request(BINDING, vec![])),
        ("Refresh", stranger.request(REFRESH, vec![])),
        (
            "Allocate",
            stranger.request(ALLOCATE, vec![RequestedTransport::new(UDP).into()]),
        ),
        (
            "CreatePermission",
            stranger.request(CREATE_PERMISSION, vec![peer(PEER)]),
        ),
        (
            "ChannelBind",
            stranger.request(CHANNEL_BIND, vec![ChannelNumber(0x4001).into(), peer(PEER)]),
        ),
        ("unknown method", {
            // Method 0x00b, class request: no TURN method.
            let mut bytes = stranger.request(BINDING, vec![]);
            bytes[1] = 0x0b;
            bytes
        }),
        ("unknown attribute", unknown),
    ];
    let mut worst: f64 = 0.0;
    for (name, request) in &probes {
        let actions = server.from_client(T0, addr(LISTENER), addr(ALICE), request);
        let answered: usize = actions
            .iter()
            .map(|action| match action {
                Action::Send { bytes, .. } => bytes.len(),
                other => panic!("{name}: {other:?}"),
            })
            .sum();
        let ratio = answered as f64 / request.len() as f64;
        println!(
            "{name:<18} {:>3} bytes -> {answered:>3} bytes  {ratio:.1}x",
            request.len()
        );
        worst = worst.max(ratio);
        if let Some(Action::Send { bytes, .. }) = actions.first() {
            let answer = decode(bytes);
            assert!(answer.get_attribute::<Software>().is_none(), "{name}");
        }
    }
    assert!(worst <= 4.2, "the worst answer is {worst:.1}x its request");
    // The challenge still has what a client needs to authenticate.
    let (challenge, _) = stranger.send(&mut server, T0, REFRESH, vec![]);
    assert_eq!(code(&challenge), 401);
    assert!(challenge.get_attribute::<Realm>().is_some());
    assert!(challenge.get_attribute::<Nonce>().is_some());
}

/// A request of a method no TURN server knows gets a 400 error response of that same
/// method (and transaction): every method bit where the request had it.
#[test]
fn an_unknown_method_is_answered_in_its_own_method() {
    use crate::turn::message::message_type;
    let mut server = server();
    for method in [0x00b_u16, 0x010, 0x07f, 0x0ff] {
        let mut request = vec![0u8; 20];
        request[..2].copy_from_slice(&message_type(method, 0x0000).to_be_bytes());
        request[4..8].copy_from_slice(&0x2112_a442_u32.to_be_bytes());
        request[8..20].copy_from_slice(&[7; 12]);
        let actions = server.from_client(T0, addr(LISTENER), addr(ALICE), &request);
        let [Action::Send { bytes, .. }] = &actions[..] else {
            panic!("method {method:#05x}: {actions:?}");
        };
        assert_eq!(
            u16::from_be_bytes([bytes[0], bytes[1]]),
            message_type(method, 0x0110),
            "method {method:#05x}: an error response of the same method"
        );
        assert_eq!(&bytes[8..20], &[7; 12]);
        // ERROR-CODE 400 with no reason, then a FINGERPRINT over the header as sent (not
        // stun_codec's check: it recomputes the CRC over its own encoding of the type).
        assert_eq!(&bytes[20..28], &[0x00, 0x09, 0x00, 0x04, 0, 0, 4, 0]);
        let length = bytes.len();
        assert_eq!(&bytes[length - 8..length - 4], &[0x80, 0x28, 0x00, 0x04]);
        let crc = crc32fast::hash(&bytes[..length - 8]) ^ 0x5354_554e;
        assert_eq!(&bytes[length - 4..], &crc.to_be_bytes());
    }
}

/// What is dropped without an answer is counted, by reason.
#[test]
fn datagrams_dropped_without_an_answer_are_counted_by_reason() {
    let mut server = server();
    let from_alice = |server: &mut TurnServer, bytes: &[u8]| {
        let actions = server.from_client(T0, addr(LISTENER), addr(ALICE), bytes);
        assert!(actions.is_empty(), "{bytes:02x?}: {actions:?}");
    };
    // RTP, DTLS, random bytes.
    from_alice(&mut server, &[0x80, 0x00, 0x00, 0x01]);
    from_alice(&mut server, &[22, 0xfe, 0xfd]);
    // ChannelData saying 100 bytes and holding 4.
    from_alice(&mut server, &[0x40, 0x01, 0x00, 100, 1, 2, 3, 4]);
    // ChannelData and a Send indication with no allocation.
    from_alice(&mut server, &[0x40, 0x01, 0x00, 4, 1, 2, 3, 4]);
    // A Binding success response: not for a server.
    let mut response = vec![0u8; 20];
    response[..2].copy_from_slice(&0x0101_u16.to_be_bytes());
    response[4..8].copy_from_slice(&0x2112_a442_u32.to_be_bytes());
    from_alice(&mut server, &response);
    // Nothing toward a relay address nobody holds.
    assert!(
        server
            .from_peer(T0, addr("203.0.113.1:50000"), addr(PEER), b"x")
            .is_empty()
    );
    assert_eq!(
        server.discards(),
        [
            ("not_turn", 2),
            ("channel_data_length", 1),
            ("not_for_server", 1),
            ("no_allocation", 2),
        ]
    );
}

/// Requests beyond `turn.max_request_rate_per_source` are dropped unanswered, counted;
/// the next second lets them in again, and other sources are not touched.
#[test]
fn requests_over_the_per_source_rate_are_dropped_unanswered() {
    let mut server = server();
    server.config.max_request_rate_per_source = 5;
    let binding = |server: &mut TurnServer, now: u64, from: &str| {
        let client = Client::new(from, "alice", "wonderland");
        server.from_client(
            now,
            addr(LISTENER),
            addr(from),
            &client.request(BINDING, vec![]),
        )
    };
    for n in 0..5 {
        assert_eq!(binding(&mut server, T0, ALICE).len(), 1, "request {n}");
    }
    assert!(binding(&mut server, T0, ALICE).is_empty());
    assert!(
        binding(&mut server, T0, "198.51.100.7:40000").is_empty(),
        "same IP"
    );
    assert_eq!(binding(&mut server, T0, "198.51.100.9:40000").len(), 1);
    // Media and indications are not requests.
    assert!(
        server
            .from_client(
                T0,
                addr(LISTENER),
                addr(ALICE),
                &message::channel_data(0x4001, b"x")
            )
            .is_empty()
    );
    assert_eq!(
        server.discards(),
        [("no_allocation", 1), ("request_rate", 2)]
    );
    server.expire(T0 + 1);
    assert_eq!(binding(&mut server, T0 + 1, ALICE).len(), 1);
}
