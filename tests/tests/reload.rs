//! SIGHUP reloads the configuration: TURN users and the log level change live (a user added
//! can allocate at once, a user removed cannot), a change that needs a restart is named in
//! the log and not applied, and a configuration with problems changes nothing.

use std::{process::Command, thread, time::Duration};

use relay_tests::{
    config_file::ConfigFile,
    lab::{ThreeHosts, turn_config},
    measure::Sink,
    netns::PinDir,
    relayd::{Relayd, binary},
    require_root,
    turn_client::bind_channel,
};

const SERVER: &str = "10.10.1.1:3478";
const PEER: &str = "10.10.2.2:5004";

fn allocates(lab: &ThreeHosts, user: &str, password: &str) -> Result<(), String> {
    bind_channel(
        &lab.client,
        "10.10.1.2:0".parse().unwrap(),
        SERVER.parse().unwrap(),
        user,
        password,
        PEER.parse().unwrap(),
    )
    .map(|_| ())
}

fn hang_up(relayd: &Relayd, expect: &str) -> String {
    let before = relayd.log().matches(expect).count();
    // SAFETY: kill on the pid of a child the guard owns.
    unsafe { libc::kill(relayd.pid() as libc::pid_t, libc::SIGHUP) };
    for _ in 0..100 {
        let log = relayd.log();
        if log.matches(expect).count() > before {
            return log;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("no {expect:?} after SIGHUP:\n{}", relayd.log());
}

#[test]
fn sighup_applies_credentials_and_log_level_and_names_what_needs_a_restart() {
    require_root();
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let original = turn_config("userspace", &pins.path.to_string_lossy(), "");
    let config = ConfigFile::new(&original);
    // RELAY_LOG would override log.level: the file decides here.
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{}", lab.relay.name))
        .arg("--")
        .arg(binary("relayd"))
        .env_remove("RELAY_LOG");
    let relayd = Relayd::start_command(command, &["--config", config.path()]);
    let _sink = Sink::bind(&lab.peer, PEER.parse().unwrap());
    allocates(&lab, "alice", "wonderland").expect("alice allocates before the reload");

    // Bob replaces alice, the log turns to debug, and the port range moves (a restart).
    let edited = original
        .replace(
            r#"name = "alice", password = "wonderland""#,
            r#"name = "bob", password = "builder""#,
        )
        .replace(
            "[turn]",
            "[log]\nlevel = \"debug\"\n[turn]\nport_range = \"40000-40100\"",
        );
    assert_ne!(edited, original);
    config.rewrite(&edited);
    let log = hang_up(&relayd, "reload: configuration reloaded");
    let line = log
        .lines()
        .rfind(|line| line.contains("reload: configuration reloaded"))
        .unwrap();
    assert!(
        line.contains("applied=turn.users, log.level")
            && line.contains("needs_restart=turn.port_range"),
        "{line}"
    );
    assert!(
        log.contains("reload: these changes take effect only when relayd restarts"),
        "{log}"
    );
    allocates(&lab, "bob", "builder").expect("bob allocates after the reload");
    // relayctl reload does the same and says so; nothing is left to apply now.
    assert_eq!(
        relayd.ctl_ok(&["reload"]),
        "needs a restart (systemctl restart relayd; media keeps flowing): turn.port_range\n"
    );
    let refused = allocates(&lab, "alice", "wonderland");
    assert!(refused.is_err(), "alice was removed: {refused:?}");
    // Debug lines now: the refusal of alice's request is one.
    assert!(
        relayd
            .log()
            .lines()
            .any(|l| l.contains("DEBUG") && l.contains("turn")),
        "{}",
        relayd.log()
    );
    // The port range did not change: allocations still come from the old one.
    let allocations = relayd.ctl_json(&["turn", "allocations"]);
    let list = allocations["allocations"].as_array().unwrap();
    assert!(
        !list.is_empty(),
        "alice's and bob's allocations: {allocations}"
    );
    for allocation in list {
        let relay = allocation["relays"][0].as_str().unwrap();
        let port: u16 = relay.rsplit(':').next().unwrap().parse().unwrap();
        assert!(!(40000..=40100).contains(&port), "{allocations}");
    }

    // A configuration with problems: an error naming them, and nothing changes.
    config.rewrite(&edited.replace(
        "port_range = \"40000-40100\"",
        "port_range = \"40000-40100\"\nmax_allocations = \"many\"",
    ));
    let log = hang_up(&relayd, "reload: nothing changed");
    assert!(log.contains("max_allocations"), "{log}");
    let refused = relayd.ctl(&["reload"]);
    assert_eq!(refused.status.code(), Some(1));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.starts_with("relayctl: configuration: nothing changed:")
            && message.contains("max_allocations"),
        "{message}"
    );
    allocates(&lab, "bob", "builder").expect("bob still allocates");
}

#[test]
fn json_logs_are_one_object_a_line() {
    require_root();
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let relayd = Relayd::start(
        Some(&lab.relay),
        &lab.relayd_args(
            &["--datapath", "userspace", "--log-format", "json"],
            &pins.path.to_string_lossy(),
        ),
    );
    let log = relayd.log();
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 2, "{log}");
    for line in lines {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"));
        assert!(object["timestamp"].is_string(), "{line}");
        assert!(object["level"].is_string(), "{line}");
        assert!(object["fields"]["message"].is_string(), "{line}");
    }
    assert!(
        log.contains(r#""message":"control API listening""#),
        "{log}"
    );
}
