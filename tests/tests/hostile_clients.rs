//! relayd against clients that try to take what others need, on loopback: relayd started
//! with 1,024 open files (soft and hard, as a shell would give it), 1,100 TCP connections
//! held on its TURN/TCP, signalling and metrics ports from two source addresses. The
//! connections are capped per source and in total (half the open-files limit) and the
//! rest closed at once and counted; relayctl and a TURN allocation over UDP still work;
//! the log stays a few lines. Connections that send part of a message, or nothing, are
//! closed in time. The control socket refuses callers outside its group.

use std::{
    io::Read,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use relay_tests::{
    config_file::ConfigFile,
    relayd::{Relayd, binary, http_get_here, metric},
    require_root,
};
use serde_json::Value;
use turn::client::{Client, ClientConfig};

const TURN: &str = "127.0.0.1:13478";
const SIGNALLING: &str = "127.0.0.1:18443";
const METRICS: &str = "127.0.0.1:19477";
const PER_SOURCE: u64 = 300;
/// Half of the 1,024 open files relayd is started with.
const TOTAL: u64 = 512;

fn config() -> ConfigFile {
    ConfigFile::new(&format!(
        r#"
[datapath]
mode = "userspace"
[metrics]
listen = "{METRICS}"
[connections]
max_per_source = {PER_SOURCE}
[turn]
enabled = true
tcp = true
listen = ["{TURN}"]
relay_addresses = ["127.0.0.1"]
port_range = "41000-41099"
users = [{{ name = "alice", password = "alice-password" }}]
[signalling]
enabled = true
listen = "{SIGNALLING}"
token_secret = "a token secret of enough length"
tenants = [{{ name = "acme", api_key = "acme-api-key-0123456789" }}]
"#
    ))
}

/// A TCP connection from `source` to `to`.
fn connect(source: Ipv4Addr, to: &str) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    socket
        .connect_timeout(
            &to.parse::<SocketAddr>().unwrap().into(),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|err| panic!("connect {source} -> {to}: {err}"));
    socket.into()
}

fn connections(relayd: &Relayd) -> Value {
    relayd.ctl_json(&["status"])["connections"].clone()
}

/// Waits until relayd's connection counts satisfy `done`, at most 10 s.
fn wait_for(relayd: &Relayd, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = connections(relayd);
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {status}\n{}",
            relayd.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How long until relayd closes `stream` (EOF or reset), at most `limit`.
fn closed_within(mut stream: TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => continue,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(err) if err.kind() == std::io::ErrorKind::TimedOut => return None,
            Err(_) => return Some(started.elapsed()),
        }
    }
}

fn allocate_over_udp(relayd: &Relayd) -> SocketAddr {
    try_allocate_over_udp(relayd, TURN)
        .unwrap_or_else(|err| panic!("allocate: {err}\n{}", relayd.log()))
}

/// An allocation by alice through the TURN server on `turn`: its relayed address, or the
/// client's error.
fn try_allocate_over_udp(relayd: &Relayd, turn: &str) -> Result<SocketAddr, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let client = Client::new(ClientConfig {
            stun_serv_addr: turn.into(),
            turn_serv_addr: turn.into(),
            username: "alice".into(),
            password: "alice-password".into(),
            realm: String::new(),
            software: String::new(),
            rto_in_ms: 0,
            conn: Arc::new(socket),
            vnet: None,
        })
        .await
        .expect("turn client");
        client.listen().await.expect("listen");
        let relay = tokio::time::timeout(Duration::from_secs(10), client.allocate())
            .await
            .unwrap_or_else(|_| panic!("no answer to Allocate within 10 s\n{}", relayd.log()));
        let address = relay
            .map(|relay| webrtc_util::Conn::local_addr(&relay).unwrap())
            .map_err(|err| err.to_string());
        client.close().await.unwrap();
        address
    })
}

#[test]
fn connections_are_capped_and_relayd_keeps_answering() {
    require_root();
    // The test holds more descriptors than a shell's soft limit gives.
    relay::admission::raise_open_files_limit().unwrap();
    let config = config();
    let mut command = Command::new("prlimit");
    command
        .args(["--nofile=1024:1024", "--"])
        .arg(binary("relayd"));
    let relayd = Relayd::start_command(command, &["--config", config.path()]);
    let log = relayd.log();
    assert!(
        log.contains("max_total=512"),
        "the total is half the open-files limit:\n{log}"
    );

    // 400 from one address over the three listeners: 300 held, 100 refused at the
    // per-source limit.
    // Not metrics here: its 5 s request limit would close some while the test counts.
    let ports = [TURN, SIGNALLING];
    let one = Ipv4Addr::new(127, 0, 0, 1);
    let mut held: Vec<TcpStream> = (0..400).map(|i| connect(one, ports[i % 2])).collect();
    let status = wait_for(&relayd, "300 from 127.0.0.1", |s| {
        s["open"] == PER_SOURCE && s["refused_per_source"] == 100
    });
    assert_eq!(status["refused_total"], 0, "{status}");
    // 700 from another: 212 more held, until the total; 488 refused at it.
    let two = Ipv4Addr::new(127, 0, 0, 2);
    held.extend((0..700).map(|i| connect(two, ports[i % 2])));
    let status = wait_for(&relayd, "the total reached", |s| {
        s["open"] == TOTAL && s["refused_total"] == 1100 - TOTAL - 100
    });
    assert_eq!(status["max_total"], TOTAL, "{status}");
    assert_eq!(held.len(), 1100);

    // relayd still answers its operator and TURN over UDP.
    let text = relayd.ctl_ok(&["status"]);
    assert!(
        text.contains("connections 512 TCP open, at most 512 (300 per source)"),
        "{text}"
    );
    assert!(
        text.contains("refused 588 (100 at the per-source limit, 488 at the total)"),
        "{text}"
    );
    let relayed = allocate_over_udp(&relayd);
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    // A few lines about it, not one per refusal.
    let log = relayd.log();
    let refusal_lines = log.matches("a connection refused at its limit").count();
    assert!(
        (1..=2).contains(&refusal_lines),
        "{refusal_lines} refusal lines:\n{log}"
    );
    assert!(log.len() < 64 * 1024, "the log grew to {} bytes", log.len());
    drop(held);
    wait_for(&relayd, "all connections gone", |s| s["open"] == 0);

    // Slow clients: part of a TURN message, then nothing; nothing at all on the signalling
    // port (TLS) or the metrics port. Each is closed within its limit (10 s for a TURN
    // message begun and a TLS handshake, 10 s in all for a metrics request).
    let mut partial = connect(one, TURN);
    std::io::Write::write_all(&mut partial, &[0x00]).unwrap();
    let waiting: Vec<(&str, std::thread::JoinHandle<Option<Duration>>)> = [
        ("one byte of a TURN message", partial),
        ("nothing on the signalling port", connect(one, SIGNALLING)),
        ("nothing on the metrics port", connect(one, METRICS)),
    ]
    .into_iter()
    .map(|(what, stream)| {
        (
            what,
            std::thread::spawn(move || closed_within(stream, Duration::from_secs(15))),
        )
    })
    .collect();
    for (what, thread) in waiting {
        let closed = thread.join().unwrap();
        assert!(
            closed.is_some_and(|after| after >= Duration::from_secs(4)),
            "{what}: closed after {closed:?}\n{}",
            relayd.log()
        );
        println!("{what}: closed after {closed:?}");
    }
}

/// relayctl as another user: uid, gid and supplementary groups for setpriv.
fn relayctl_as(relayd: &Relayd, uid: u32, gid: u32, groups: &str) -> std::process::Output {
    Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .args(if groups.is_empty() {
            vec!["--clear-groups".to_owned()]
        } else {
            vec![format!("--groups={groups}")]
        })
        .arg(binary("relayctl"))
        .arg("--socket")
        .arg(&relayd.socket)
        .arg("status")
        .output()
        .unwrap()
}

#[test]
fn the_control_socket_serves_its_group_only() {
    require_root();
    let config = ConfigFile::new(
        r#"
[datapath]
mode = "userspace"
[control]
group = "nogroup"
"#,
    );
    let relayd = Relayd::start(None, &["--config", config.path()]);
    let nogroup = 65534;
    let metadata = std::fs::metadata(&relayd.socket).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::gid(&metadata),
        nogroup,
        "control.group"
    );
    assert_eq!(metadata.permissions().mode() & 0o777, 0o660);
    // A member, by its own group or a supplementary one, gets its status.
    for (uid, gid, groups) in [(65534, nogroup, ""), (65533, 65533, "65534")] {
        let output = relayctl_as(&relayd, uid, gid, groups);
        assert!(
            output.status.success(),
            "uid {uid}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Anyone else: the socket's mode keeps them out, and relayctl says what to do.
    let output = relayctl_as(&relayd, 65533, 65533, "");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("Permission denied") && stderr.contains("control.group"),
        "{stderr}"
    );
    // With the mode loosened, relayd itself refuses them, naming why.
    std::fs::set_permissions(&relayd.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let output = relayctl_as(&relayd, 65533, 65533, "");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("permission denied: uid 65533 is not root")
            && stderr.contains("\"nogroup\" (gid 65534)"),
        "{stderr}"
    );
    assert!(relayd.log().contains("control API: a connection refused"));
}

/// relayd with TURN on loopback, relaying on `ports`, and the metrics it serves.
fn turn_relayd(turn: &str, metrics: &str, ports: &str) -> (ConfigFile, Relayd) {
    let config = ConfigFile::new(&format!(
        r#"
[datapath]
mode = "userspace"
[metrics]
listen = "{metrics}"
[turn]
enabled = true
listen = ["{turn}"]
relay_addresses = ["127.0.0.1"]
port_range = "{ports}"
users = [{{ name = "alice", password = "alice-password" }}]
"#
    ));
    let relayd = Relayd::start(None, &["--config", config.path()]);
    (config, relayd)
}

/// UDP sockets of this test on 127.0.0.1 `ports`, as another service would hold them.
fn hold(ports: std::ops::RangeInclusive<u16>) -> Vec<std::net::UdpSocket> {
    ports
        .map(|port| std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap())
        .collect()
}

/// Ports of the relay range that another process holds: the server's books say they are
/// free, the bind says no. Each such port is left out and the Allocate tried on another
/// (at most four), so a client gets a port while one is free; never a success for an
/// allocation that carries nothing. Counted, and logged with what to do.
#[test]
fn relay_ports_another_process_holds_are_skipped_then_answered_508() {
    require_root();
    const TURN: &str = "127.0.0.1:13578";
    const METRICS: &str = "127.0.0.1:19577";
    let bind_failures = "relay_turn_relay_bind_failures_total";
    // Two of three ports held: the Allocate gets the third, whichever it tried first;
    // the next finds no free port.
    let _held = hold(41200..=41201);
    let (_config, relayd) = turn_relayd(TURN, METRICS, "41200-41202");
    let relayed = try_allocate_over_udp(&relayd, TURN)
        .unwrap_or_else(|err| panic!("allocate: {err}\n{}", relayd.log()));
    assert_eq!(relayed, SocketAddr::from(([127, 0, 0, 1], 41202)));
    let err = try_allocate_over_udp(&relayd, TURN).expect_err("no port left");
    assert!(err.contains("508"), "{err}\n{}", relayd.log());
    let metrics = http_get_here(METRICS, "/metrics");
    assert_eq!(metric(&metrics, bind_failures), Some(2), "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            r#"relay_turn_refusals_total{code="508",reason="Insufficient Capacity"}"#
        ),
        Some(1),
        "{metrics}"
    );
    let log = relayd.log();
    assert!(
        log.contains("cannot open a relay socket") && log.contains("turn.port_range"),
        "{log}"
    );
    // What is not TURN is dropped without an answer and counted, not logged.
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for junk in [&[0x80u8, 0, 0, 1][..], &[22, 0xfe, 0xfd], &[0xff; 40]] {
        stranger.send_to(junk, TURN).unwrap();
    }
    let not_turn = r#"relay_turn_discarded_total{reason="not_turn"}"#;
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&http_get_here(METRICS, "/metrics"), not_turn) != Some(3)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics = http_get_here(METRICS, "/metrics");
    assert_eq!(metric(&metrics, not_turn), Some(3), "{metrics}");
    assert_eq!(relayd.log().len(), log.len(), "{}", relayd.log());
    drop(relayd);

    // Every port held: four tried, then 508 with its own reason, and nothing allocated.
    let _held = hold(41210..=41213);
    let (_config, relayd) = turn_relayd(TURN, METRICS, "41210-41213");
    let err = try_allocate_over_udp(&relayd, TURN).expect_err("no port can be bound");
    assert!(
        err.contains("508: Relay Port in Use"),
        "{err}\n{}",
        relayd.log()
    );
    let allocations = relayd.ctl_json(&["turn", "allocations"]);
    assert_eq!(
        allocations["allocations"],
        serde_json::json!([]),
        "{allocations}"
    );
    let metrics = http_get_here(METRICS, "/metrics");
    assert_eq!(metric(&metrics, bind_failures), Some(4), "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            r#"relay_turn_refusals_total{code="508",reason="Relay Port in Use"}"#
        ),
        Some(1),
        "{metrics}"
    );
}

/// A burst of 1,000 Binding requests from one source: at most the default 200 a second are
/// answered, the rest dropped unanswered, counted, and logged once.
#[test]
fn requests_over_the_per_source_rate_are_dropped_unanswered() {
    require_root();
    const TURN: &str = "127.0.0.1:13678";
    const METRICS: &str = "127.0.0.1:19677";
    let (_config, relayd) = turn_relayd(TURN, METRICS, "41220-41229");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    const SENT: u64 = 1000;
    for n in 0..SENT as u32 {
        let mut binding = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        binding.extend_from_slice(&[0; 8]);
        binding.extend_from_slice(&n.to_be_bytes());
        socket.send_to(&binding, TURN).unwrap();
    }
    let mut answered = 0u64;
    let mut buf = [0u8; 1500];
    while socket.recv_from(&mut buf).is_ok() {
        answered += 1;
    }
    let metrics = http_get_here(METRICS, "/metrics");
    let dropped = metric(
        &metrics,
        r#"relay_turn_discarded_total{reason="request_rate"}"#,
    )
    .unwrap_or(0);
    println!("{SENT} Binding requests: {answered} answered, {dropped} dropped over the rate");
    // Two one-second windows at most while the burst lasts.
    assert!((1..=400).contains(&answered), "{answered} answered");
    assert!(
        dropped >= SENT - 400 && answered + dropped <= SENT,
        "{dropped} dropped\n{metrics}"
    );
    let log = relayd.log();
    let lines = log.matches("max_request_rate_per_source").count();
    assert!((1..=2).contains(&lines), "{lines} lines:\n{log}");
}
