#![no_main]
//! The TURN core (sans-IO) under datagrams from strangers: the input is a sequence of
//! datagrams (each a one-byte sender choice and a two-byte length, then the bytes) from
//! two clients to the listening address, with a fixed clock and a fixed random source.
//! No panic; every datagram gets at most one datagram back, always to its sender and from
//! the address it was sent to (no reflection toward a third party, no multiplication), and
//! no larger than the datagram or than the smallest 401 RFC 8656 allows (REALM and NONCE
//! with a bare error code and FINGERPRINT: 84 bytes for this realm), whichever is larger;
//! nothing is allocated, offloaded or relayed for a client that never authenticated (the
//! fuzzer cannot sign with a password it does not know). Seeds: fuzz/seeds/turn_server.

use std::net::{Ipv4Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use rand::{RngCore, SeedableRng, rngs::StdRng};
use relay::turn::{
    credentials::Credentials,
    policy::PeerPolicy,
    server::{Action, ServerConfig, TurnServer},
};

const NOW: u64 = 1_700_000_000;
/// Header 20, ERROR-CODE 8, REALM 4 + 16 ("relay.example" padded), NONCE 4 + 24,
/// FINGERPRINT 8.
const CHALLENGE: usize = 84;

fn server() -> TurnServer {
    let config = ServerConfig {
        realm: "relay.example".to_owned(),
        software: "relay fuzz".to_owned(),
        relay_ipv4: Some(Ipv4Addr::new(203, 0, 113, 1)),
        relay_ipv6: None,
        ports: 49152..=49160,
        default_lifetime: 600,
        max_lifetime: 3600,
        nonce_lifetime: 600,
        max_allocations: 100,
        max_allocations_per_user: 2,
        peers: PeerPolicy {
            allowed: vec!["10.0.0.5".parse().unwrap()],
            denied: vec!["198.18.0.0/15".parse().unwrap()],
        },
        max_allocate_rate_per_source: 3,
        max_request_rate_per_source: 50,
    };
    let random: Box<dyn RngCore + Send> = Box::new(StdRng::seed_from_u64(7));
    TurnServer::new(
        config,
        Credentials::new(
            [("alice".into(), "a password no input knows".into())],
            vec!["a REST API secret no input knows".into()],
        ),
        random,
    )
}

fuzz_target!(|data: &[u8]| {
    let listener: SocketAddr = "203.0.113.1:3478".parse().unwrap();
    let clients: [SocketAddr; 2] = [
        "198.51.100.7:50000".parse().unwrap(),
        "198.51.100.8:50001".parse().unwrap(),
    ];
    let mut server = server();
    let mut rest = data;
    let mut now = NOW;
    while rest.len() >= 3 {
        let client = clients[usize::from(rest[0] & 1)];
        let length = usize::from(u16::from_be_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let datagram = &rest[3..3 + length];
        rest = &rest[3 + length..];
        // Time moves on a little with each datagram (nonces and permissions age).
        now += u64::from(rest.first().copied().unwrap_or(0) % 4);
        let actions = server.from_client(now, listener, client, datagram);
        let mut replies = 0;
        for action in &actions {
            match action {
                Action::Send { from, to, bytes } => {
                    assert_eq!((*from, *to), (listener, client), "{actions:?}");
                    assert!(
                        bytes.len() <= datagram.len().max(CHALLENGE),
                        "a {}-byte datagram got a {}-byte answer",
                        datagram.len(),
                        bytes.len()
                    );
                    replies += 1;
                }
                other => panic!("unauthenticated input made the server act: {other:?}"),
            }
        }
        assert!(replies <= 1, "one datagram, {replies} answers: {actions:?}");
    }
    assert!(server.allocations().is_empty());
});
