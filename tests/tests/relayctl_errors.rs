//! Bad input to relayctl, the control API and relayd's configuration: every refusal names the
//! field and the reason, exits non-zero, and changes nothing.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    process::{Command, Output},
};

use relay_tests::{
    config_file::ConfigFile,
    netns::NetNs,
    relayd::{Relayd, binary},
    require_root,
};
use serde_json::Value;

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn flow_add(
    relayd: &Relayd,
    src: &str,
    dst: &str,
    new_src: &str,
    new_dst: &str,
    extra: &[&str],
) -> Output {
    let mut args = vec![
        "flow",
        "add",
        "--src",
        src,
        "--dst",
        dst,
        "--new-src",
        new_src,
        "--new-dst",
        new_dst,
    ];
    args.extend_from_slice(extra);
    relayd.ctl(&args)
}

/// The flow table without the fields that change with time (idle, rate).
fn flows(relayd: &Relayd) -> Vec<Value> {
    relayd.ctl_json(&["flow", "list"])["flows"]
        .as_array()
        .expect("flow list")
        .iter()
        .map(|flow| {
            let mut flow = flow.clone();
            let object = flow.as_object_mut().unwrap();
            object.remove("idle_secs");
            object.remove("rate_pps");
            flow
        })
        .collect()
}

/// A relayd with the userspace datapath and room for 3 flows, in a namespace that owns the
/// relay addresses 10.20.0.1 and 10.20.1.1.
fn relayd_with_capacity_3() -> (NetNs, Relayd, ConfigFile) {
    let ns = NetNs::new("rerr");
    ns.exec(&[
        "ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ]);
    ns.exec(&["ip", "link", "set", "d0", "up"]);
    ns.exec(&["ip", "addr", "add", "10.20.0.1/24", "dev", "d0"]);
    ns.exec(&["ip", "addr", "add", "10.20.1.1/24", "dev", "d0"]);
    let config = ConfigFile::new("[datapath]\nmode = \"userspace\"\ncapacity = 3\n");
    let relayd = Relayd::start(Some(&ns), &["--config", config.path()]);
    (ns, relayd, config)
}

#[test]
fn bad_flow_arguments_are_named_and_change_nothing() {
    require_root();
    let (_ns, relayd, _config) = relayd_with_capacity_3();
    let ok = flow_add(
        &relayd,
        "10.20.9.9:4000",
        "10.20.0.1:20000",
        "10.20.1.1:30000",
        "10.20.1.9:5004",
        &[],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    let before = flows(&relayd);

    // (arguments, expected exit code, expected text in the error)
    let cases: Vec<([&str; 4], i32, &str)> = vec![
        (
            [
                "10.20.9.300:4000",
                "10.20.0.1:20001",
                "10.20.1.1:30001",
                "10.20.1.9:5004",
            ],
            2,
            "'--src <SRC>': \"10.20.9.300\" is not an IPv4 or IPv6 address",
        ),
        (
            [
                "10.20.9.9:4000",
                "10.20.0.1:20001",
                "10.20.1.1:30001",
                "10.20.1.9:70000",
            ],
            2,
            "'--new-dst <NEW_DST>': port 70000 out of range (1-65535)",
        ),
        (
            [
                "10.20.9.9:4000",
                "10.20.0.1",
                "10.20.1.1:30001",
                "10.20.1.9:5004",
            ],
            2,
            "'--dst <DST>': expected ADDRESS:PORT",
        ),
        (
            [
                "10.20.9.9:0",
                "10.20.0.1:20001",
                "10.20.1.1:30001",
                "10.20.1.9:5004",
            ],
            1,
            "src: 10.20.9.9:0: port 0 is not a UDP port",
        ),
        (
            [
                "10.20.9.9:4000",
                "10.20.0.1:20001",
                "[fd00::1]:30001",
                "10.20.1.9:5004",
            ],
            1,
            "new_src: [fd00::1]:30001: all four addresses of a flow must be of one family",
        ),
        (
            [
                "10.20.9.9:4000",
                "10.20.0.1:20001",
                "10.20.1.1:30001",
                "239.1.1.1:5004",
            ],
            1,
            "new_dst: 239.1.1.1:5004: only unicast addresses can be relayed",
        ),
        (
            [
                "10.20.9.9:4000",
                "10.99.0.1:20001",
                "10.20.1.1:30001",
                "10.20.1.9:5004",
            ],
            1,
            "dst: 10.99.0.1:20001: cannot bind a UDP socket",
        ),
        (
            [
                "10.20.9.9:4000",
                "10.20.0.1:20000",
                "10.20.1.1:30002",
                "10.20.1.9:5006",
            ],
            1,
            "src 10.20.9.9:4000 -> dst 10.20.0.1:20000: a flow with this key already exists (id 1)",
        ),
    ];
    for (args, code, text) in cases {
        let output = flow_add(&relayd, args[0], args[1], args[2], args[3], &[]);
        assert_eq!(
            output.status.code(),
            Some(code),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains(text),
            "{args:?}: expected {text:?} in {:?}",
            stderr(&output)
        );
        assert_eq!(flows(&relayd), before, "{args:?} changed the flow table");
    }

    // A pair that does not fit leaves the table as it was: all or nothing.
    let output = flow_add(
        &relayd,
        "10.20.9.8:4000",
        "10.20.0.1:20010",
        "10.20.1.1:30010",
        "10.20.1.8:5004",
        &["--reverse"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let full = flows(&relayd);
    let output = flow_add(
        &relayd,
        "10.20.9.7:4000",
        "10.20.0.1:20020",
        "10.20.1.1:30020",
        "10.20.1.7:5004",
        &[],
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("flow table full: it holds 3 flows (datapath.capacity)"),
        "{}",
        stderr(&output)
    );
    assert_eq!(flows(&relayd), full);

    for args in [["flow", "del", "99"], ["flow", "show", "99"]] {
        let output = relayd.ctl(&args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&output).contains("id: 99: no such flow"),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let output = relayd.ctl(&["flow", "del", "-3"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_eq!(flows(&relayd), full);

    // And a good deletion works and frees the slot and the sockets.
    relayd.ctl_ok(&["flow", "del", "1"]);
    assert_eq!(flows(&relayd).len(), 2);
}

#[test]
fn control_api_answers_bad_requests_and_keeps_the_connection() {
    require_root();
    let (_ns, relayd, _config) = relayd_with_capacity_3();
    let stream = UnixStream::connect(&relayd.socket).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut ask = |line: &str| -> Value {
        writer.write_all(line.as_bytes()).unwrap();
        writer.write_all(b"\n").unwrap();
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    };
    for (request, code, field) in [
        ("{not json", "bad_request", Value::Null),
        ("[1,2,3]", "bad_request", Value::Null),
        (
            r#"{"version":1,"id":5,"method":"flow.explode"}"#,
            "bad_request",
            "method".into(),
        ),
        (
            r#"{"version":9,"id":6,"method":"status"}"#,
            "unsupported_version",
            "version".into(),
        ),
        (
            r#"{"version":1,"id":7,"method":"flow.add","params":{"src":"1.2.3.4:5"}}"#,
            "bad_request",
            "params".into(),
        ),
        (
            r#"{"version":1,"id":8,"method":"flow.add","params":{"src":"1.2.3.4:5","dst":"10.20.0.1:1","new_src":"10.20.1.1:2","new_dst":"1.2.3.4:99999"}}"#,
            "invalid_argument",
            "new_dst".into(),
        ),
        (
            r#"{"version":1,"id":9,"method":"flow.show","params":{"id":42}}"#,
            "not_found",
            "id".into(),
        ),
    ] {
        let answer = ask(request);
        assert_eq!(answer["error"]["code"], code, "{request}: {answer}");
        assert_eq!(answer["error"]["field"], field, "{request}: {answer}");
        assert!(answer["result"].is_null(), "{request}: {answer}");
    }
    let answer = ask(r#"{"version":1,"id":10,"method":"status"}"#);
    assert_eq!(answer["id"], 10);
    assert_eq!(answer["result"]["flows"], 0, "{answer}");
}

#[test]
fn relayctl_without_relayd_says_so() {
    let output = Command::new(binary("relayctl"))
        .args(["--socket", "/nonexistent/relay.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    assert!(
        stderr(&output).contains("cannot connect to relayd at /nonexistent/relay.sock"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn relayd_check_names_every_bad_key() {
    let config = ConfigFile::new(
        "[datapath]\nmode = \"xdp\"\ncapacity = 0\n[flows]\nidle_timeout_secs = 0\n",
    );
    let output = Command::new(binary("relayd"))
        .args(["--check", "--config", config.path()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let text = stderr(&output);
    for expected in [
        "datapath.interfaces: []: mode \"xdp\" needs at least one interface to attach to",
        "datapath.capacity: 0: must be between 1 and 16777216",
        "flows.idle_timeout_secs: 0: must be between 1 and 86400 seconds",
    ] {
        assert!(text.contains(expected), "expected {expected:?} in {text}");
    }
    let shipped = Command::new(binary("relayd"))
        .args([
            "--check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/relay.toml"),
        ])
        .output()
        .unwrap();
    assert!(shipped.status.success(), "{}", stderr(&shipped));
}
