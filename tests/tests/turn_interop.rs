//! Our TURN server with independent clients: coturn's `turnutils_uclient` allocates, binds
//! channels and exchanges RTP-sized packets with an echo peer (`turnutils_peer`) through
//! the relay, with static and TURN REST API credentials. With the XDP datapath the bound
//! channels are offloaded and the kernel counters show the media took the fast path; with
//! the userspace datapath the TURN server relays them itself. The same REST credentials
//! are accepted by coturn started with use-auth-secret, side by side.

use std::{process::Command, thread, time::Duration};

use relay_tests::{
    config_file::ConfigFile,
    lab::{ThreeHosts, turn_config},
    netns::{NetNs, PinDir},
    process::Background,
    relayd::Relayd,
    require_root,
};
use serde_json::Value;

const MESSAGES: u32 = 300;
/// Two REST API secrets, as during a rotation.
const SECRETS: &str = r#"secrets = ["north", "south"]"#;
/// Messages of the run whose fast-path share is checked: long enough that the first
/// moments (uclient sends Send indications until its ChannelBind is answered) are a small
/// part of it.
const LONG_RUN: u32 = 1000;

/// Runs turnutils_uclient against the lab's IPv4 server on `server_port` and returns (sent,
/// received, lost) from its summary.
fn uclient(
    client: &NetNs,
    server_port: u16,
    messages: u32,
    credentials: &[&str],
) -> (u32, u32, String) {
    uclient_to(
        client,
        ("10.10.1.1", "10.10.2.2"),
        server_port,
        messages,
        credentials,
    )
}

/// turnutils_uclient toward `(server, peer)` addresses; `credentials` may carry other
/// uclient options too.
fn uclient_to(
    client: &NetNs,
    (server, peer): (&str, &str),
    server_port: u16,
    messages: u32,
    credentials: &[&str],
) -> (u32, u32, String) {
    let port = server_port.to_string();
    let messages = messages.to_string();
    let mut args = vec![
        "turnutils_uclient",
        "-e",
        peer,
        "-r",
        "3480",
        "-n",
        &messages,
        "-l",
        "172",
        "-c",
        "-z",
        "5",
        "-p",
        &port,
    ];
    args.extend_from_slice(credentials);
    args.push(server);
    let output = Command::new("timeout")
        .args(["60", "ip", "netns", "exec", &client.name])
        .args(&args)
        .output()
        .expect("run turnutils_uclient");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let number_after = |label: &str| -> u32 {
        text.rsplit(label)
            .next()
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|digits| digits.parse().ok())
            .unwrap_or(0)
    };
    let sent = number_after("tot_send_msgs=");
    let received = number_after("tot_recv_msgs=");
    let lost = text
        .lines()
        .find(|line| line.contains("Total lost packets"))
        .unwrap_or("")
        .to_owned();
    (
        sent,
        received,
        format!("{lost}\n--- uclient output ---\n{text}"),
    )
}

/// Packets the XDP program counted under any of `verdicts` (`relayctl stats`).
fn verdicts(relayd: &Relayd, verdicts: &[&str]) -> u64 {
    let stats = relayd.ctl_json(&["stats"]);
    stats["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| verdicts.iter().any(|name| v["verdict"] == *name))
        .map(|v| v["packets"].as_u64().unwrap())
        .sum()
}

fn redirects(relayd: &Relayd) -> u64 {
    verdicts(relayd, &["redirect", "tx"])
}

/// uclient's payloads start with any byte; about 19% of them look like STUN or DTLS (RFC
/// 7983). Inside a channel and from the peer they are data and stay in the kernel: what goes
/// up as `pass_stun_dtls` is the client's own STUN (Allocate, CreatePermission, ChannelBind,
/// Refresh, the Send indications before the ChannelBind answer), a dozen or so messages.
fn only_client_stun_passed(relayd: &Relayd, stun_before: u64, forwarded: u64, family: &str) {
    let stun = verdicts(relayd, &["pass_stun_dtls"]) - stun_before;
    eprintln!(
        "xdp, {family}: {forwarded} relayed packets forwarded in the kernel, {stun} passed up as STUN/DTLS"
    );
    assert!(
        stun <= u64::from(LONG_RUN) / 25,
        "{family}: relayed payloads went to userspace as STUN/DTLS: {stun} of {} packets\n{}",
        2 * LONG_RUN,
        relayd.log()
    );
}

fn run(datapath: &str) {
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&turn_config(
        datapath,
        &pins.path.to_string_lossy(),
        SECRETS,
    ));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let _peer = Background::spawn(
        &lab.peer,
        &["turnutils_peer", "-L", "10.10.2.2", "-p", "3480"],
    );
    thread::sleep(Duration::from_millis(300));

    let (before, stun_before) = if datapath == "xdp" {
        (redirects(&relayd), verdicts(&relayd, &["pass_stun_dtls"]))
    } else {
        (0, 0)
    };
    let (sent, received, report) = uclient(
        &lab.client,
        3478,
        LONG_RUN,
        &["-u", "alice", "-w", "wonderland"],
    );
    assert_eq!(
        (sent, received),
        (LONG_RUN, LONG_RUN),
        "{datapath}, static credentials: {report}\n{}",
        relayd.log()
    );
    if datapath == "xdp" {
        let forwarded = redirects(&relayd) - before;
        // Each message goes client -> peer and back: two packets through the relay. Before
        // the ChannelBind answer uclient uses Send indications, which userspace relays.
        assert!(
            forwarded >= 2 * u64::from(LONG_RUN) * 8 / 10,
            "the channels' media should have taken the fast path: {forwarded} forwarded by XDP\n{}",
            relayd.log()
        );
        assert!(
            relayd
                .log()
                .contains("turn: channel offloaded to the kernel"),
            "{}",
            relayd.log()
        );
        only_client_stun_passed(&relayd, stun_before, forwarded, "IPv4");
    }
    // Over TCP (uclient -t): the same TURN core, relayed in userspace (XDP does not touch
    // TCP), ChannelData padded to 4 bytes on the stream; the allocation ends with the
    // connection.
    let (sent, received, report) = uclient(
        &lab.client,
        3478,
        MESSAGES,
        &["-u", "alice", "-w", "wonderland", "-t"],
    );
    assert_eq!(
        (sent, received),
        (MESSAGES, MESSAGES),
        "{datapath}, over TCP: {report}\n{}",
        relayd.log()
    );
    assert!(
        relayd.log().contains("turn: TCP client gone"),
        "{}",
        relayd.log()
    );
    // uclient has exited: its connections close, and their allocations end (the UDP run's
    // may still be there: UDP has no connection to lose).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !relayd.log().contains("allocations_ended=1") && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let log = relayd.log();
    let tcp_clients: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("turn: TCP client gone"))
        .filter_map(|line| line.split("client=").nth(1)?.split_whitespace().next())
        .collect();
    assert!(
        log.lines()
            .any(|line| line.contains("turn: TCP client gone")
                && line.contains("allocations_ended=1")),
        "{log}"
    );
    let allocations = relayd.ctl_json(&["turn", "allocations"]);
    for allocation in allocations["allocations"].as_array().unwrap() {
        let client = allocation["client"].as_str().unwrap();
        assert!(
            !tcp_clients.contains(&client),
            "an allocation over TCP outlived its connection: {allocation}"
        );
    }

    // A TCP stream that is not STUN or ChannelData cannot be followed: closed at once.
    lab.client.enter(|| {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect("10.10.1.1:3478").expect("TCP to TURN");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(&[0x80; 32]).unwrap();
        let mut buf = [0u8; 64];
        assert!(
            matches!(stream.read(&mut buf), Ok(0) | Err(_)),
            "the relay closes a TCP stream it cannot frame"
        );
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !relayd.log().contains("not STUN or ChannelData") {
        assert!(std::time::Instant::now() < deadline, "{}", relayd.log());
        thread::sleep(Duration::from_millis(50));
    }

    // All IPv6: uclient asks for an IPv6 relayed address (-x, REQUESTED-ADDRESS-FAMILY) and
    // talks to an IPv6 peer; with XDP the channels are offloaded as IPv6 flows.
    let _peer6 = Background::spawn(
        &lab.peer,
        &["turnutils_peer", "-L", "fd10:2::2", "-p", "3480"],
    );
    thread::sleep(Duration::from_millis(300));
    let (before, stun_before) = if datapath == "xdp" {
        (redirects(&relayd), verdicts(&relayd, &["pass_stun_dtls"]))
    } else {
        (0, 0)
    };
    let (sent, received, report) = uclient_to(
        &lab.client,
        ("fd10:1::1", "fd10:2::2"),
        3478,
        LONG_RUN,
        &["-u", "alice", "-w", "wonderland", "-x"],
    );
    assert_eq!(
        (sent, received),
        (LONG_RUN, LONG_RUN),
        "{datapath}, IPv6: {report}\n{}",
        relayd.log()
    );
    if datapath == "xdp" {
        let forwarded = redirects(&relayd) - before;
        assert!(
            forwarded >= 2 * u64::from(LONG_RUN) * 8 / 10,
            "IPv6 channels should have taken the fast path: {forwarded} forwarded by XDP\n{}",
            relayd.log()
        );
        only_client_stun_passed(&relayd, stun_before, forwarded, "IPv6");
    }

    // REST API credentials minted by the client itself from the shared secret; "south" is
    // the second secret in rotation.
    for secret in ["north", "south"] {
        let (sent, received, report) =
            uclient(&lab.client, 3478, MESSAGES, &["-u", "alice", "-W", secret]);
        assert_eq!(
            (sent, received),
            (MESSAGES, MESSAGES),
            "{datapath}, REST secret {secret}: {report}"
        );
    }
    // A wrong secret is refused: nothing gets through.
    let (_, received, _) = uclient(&lab.client, 3478, MESSAGES, &["-u", "alice", "-W", "west"]);
    assert_eq!(
        received, 0,
        "{datapath}: a wrong REST secret must not allocate"
    );

    // Allocations end with the client (it refreshes with lifetime 0): no flow stays behind.
    thread::sleep(Duration::from_millis(300));
    let flows: Value = relayd.ctl_json(&["flow", "list"]);
    assert_eq!(flows["flows"].as_array().unwrap().len(), 0, "{flows}");
}

#[test]
fn coturn_client_through_our_turn_server_with_xdp_offload() {
    require_root();
    run("xdp");
}

#[test]
fn coturn_client_through_our_turn_server_in_userspace() {
    require_root();
    run("userspace");
}

#[test]
fn rest_credentials_accepted_by_coturn_and_by_us_alike() {
    require_root();
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&turn_config(
        "userspace",
        &pins.path.to_string_lossy(),
        SECRETS,
    ));
    let _relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let _coturn = Background::spawn(
        &lab.relay,
        &[
            "turnserver",
            "-n",
            "--listening-ip",
            "10.10.1.1",
            "--listening-port",
            "3479",
            "--relay-ip",
            "10.10.2.1",
            "--min-port",
            "50000",
            "--max-port",
            "50100",
            "--use-auth-secret",
            "--static-auth-secret=north",
            "--realm",
            "relay",
            "--allow-loopback-peers",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--allowed-peer-ip",
            "10.10.2.2",
        ],
    );
    let _peer = Background::spawn(
        &lab.peer,
        &["turnutils_peer", "-L", "10.10.2.2", "-p", "3480"],
    );
    thread::sleep(Duration::from_millis(800));
    for port in [3478, 3479] {
        let (sent, received, report) =
            uclient(&lab.client, port, MESSAGES, &["-u", "alice", "-W", "north"]);
        assert_eq!(
            (sent, received),
            (MESSAGES, MESSAGES),
            "server on port {port}: {report}"
        );
        let (_, received, _) = uclient(&lab.client, port, MESSAGES, &["-u", "alice", "-W", "west"]);
        assert_eq!(received, 0, "server on port {port} accepted a wrong secret");
    }
}
