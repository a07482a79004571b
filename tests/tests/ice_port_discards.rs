//! What a stranger sends to the calls' ICE port: dropped, counted by reason, not logged.

use std::time::{Duration, Instant};

use relay_tests::{
    config_file::ConfigFile,
    relayd::{Relayd, http_get_here, metric},
    require_root,
};

/// Datagrams on the calls' ICE port that no call or ICE agent can take (not STUN from a
/// source nobody talks to, STUN that does not parse) are dropped without an answer and
/// counted by reason, never logged; a well-formed check for no call is the ICE agents'.
#[test]
fn the_calls_ice_port_counts_what_it_drops() {
    require_root();
    const ICE: &str = "127.0.0.1:13579";
    const METRICS: &str = "127.0.0.1:19579";
    let config = ConfigFile::new(&format!(
        r#"
[datapath]
mode = "userspace"
[metrics]
listen = "{METRICS}"
[signalling]
enabled = true
listen = "127.0.0.1:14443"
token_secret = "a token secret of enough length"
tenants = [{{ name = "acme", api_key = "acme-api-key-0123456789" }}]
[calls]
enabled = true
ice_listen = "{ICE}"
lan_address = "127.0.0.1"
port_range = "41300-41309"
"#
    ));
    let relayd = Relayd::start(None, &["--config", config.path()]);
    let log = relayd.log();
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    stranger
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    for junk in [&[0x80u8, 0, 0, 1][..], &[22, 0xfe, 0xfd], &[0xff; 40], &[]] {
        stranger.send_to(junk, ICE).unwrap();
    }
    // A STUN header with the magic cookie and a length that lies.
    let mut broken = vec![0u8, 1, 0, 200, 0x21, 0x12, 0xa4, 0x42];
    broken.extend_from_slice(&[7; 12]);
    stranger.send_to(&broken, ICE).unwrap();
    let series =
        |reason: &str| format!(r#"relay_calls_ice_discarded_packets_total{{reason="{reason}"}}"#);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(
        &http_get_here(METRICS, "/metrics"),
        &series("malformed_stun"),
    ) != Some(1)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = http_get_here(METRICS, "/metrics");
    assert_eq!(
        metric(&metrics, &series("unknown_source")),
        Some(4),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, &series("malformed_stun")),
        Some(1),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, &series("leg_queue_full")),
        Some(0),
        "{metrics}"
    );
    let mut buf = [0u8; 64];
    assert!(
        stranger.recv_from(&mut buf).is_err(),
        "no answer to a stranger"
    );
    assert_eq!(relayd.log().len(), log.len(), "{}", relayd.log());
}
