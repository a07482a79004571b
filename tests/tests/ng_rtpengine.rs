//! The relay and rtpengine 10.5 (Debian `rtpengine-daemon`, userspace) side by side, driven
//! by rtpengine's own Perl ng client (Debian `rtpengine-utils`, `rtpengine-ng-client`) with
//! the same offer, answer, query and delete: the SDP the relay writes is rtpengine's apart
//! from the media ports, and its query and delete replies carry every key rtpengine's do.

use std::collections::BTreeSet;

use relay_tests::{
    config_file::ConfigFile,
    lab::{ThreeHosts, ng_config},
    netns::{NetNs, PinDir},
    relayd::Relayd,
    require_root,
    rtpengine::Rtpengine,
};
use serde_json::{Value, json};

const RELAY_NG: &str = "127.0.0.1:2223";
const RTPENGINE_NG: &str = "127.0.0.1:2224";

const OFFER: &str = "v=0\r\no=user1 53655765 2353687637 IN IP4 10.10.1.2\r\ns=-\r\nc=IN IP4 10.10.1.2\r\nt=0 0\r\nm=audio 6000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-11,16\r\na=sendrecv\r\n";
const ANSWER: &str = "v=0\r\no=user2 1 1 IN IP4 10.10.2.2\r\ns=-\r\nc=IN IP4 10.10.2.2\r\nt=0 0\r\nm=audio 7000 RTP/AVP 8 101\r\na=rtpmap:8 PCMA/8000\r\na=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n";

/// What `rtpengine-ng-client` printed: the new SDP, and the result dictionary (as JSON).
struct Printed {
    sdp: Option<String>,
    result: Value,
}

fn ng_client(ns: &NetNs, server: &str, args: &[&str]) -> Printed {
    let port = server.rsplit(':').next().unwrap();
    let mut full = vec![
        "rtpengine-ng-client".to_owned(),
        format!("--proxy-port={port}"),
    ];
    full.extend(args.iter().map(|a| (*a).to_owned()));
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    let output = ns.exec(&full);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let block = |title: &str| {
        let start = text.find(title)?;
        let rest = &text[start..];
        let open = rest.find("-----8<")? + rest[rest.find("-----8<")?..].find('\n')? + 1;
        let close = rest.find("----->8")?;
        Some(rest[open..close].to_owned())
    };
    Printed {
        sdp: block("New SDP:"),
        result: block("Result dictionary:").map_or(Value::Null, |dump| dumper_to_json(&dump)),
    }
}

/// Data::Dumper's output as JSON: `key => 'value'` lines, `{`/`[` blocks; the outer
/// `$VAR1 = ...;` of the untersed form dropped.
fn dumper_to_json(dump: &str) -> Value {
    let quote = |s: &str| -> String {
        let inner = s
            .trim_matches('\'')
            .replace("\\'", "'")
            .replace("\\\\", "\\");
        serde_json::to_string(&inner).unwrap()
    };
    let mut json = String::new();
    for line in dump.lines() {
        let mut line = line.trim();
        if let Some(rest) = line.strip_prefix("$VAR1 = ") {
            line = rest;
        }
        let line = line.trim_end_matches(';');
        if line.is_empty() {
            continue;
        }
        let (key, value) = match line.split_once(" => ") {
            Some((key, value)) => (Some(key), value),
            None => (None, line),
        };
        if let Some(key) = key {
            json.push_str(&quote(key));
            json.push(':');
        }
        let (value, comma) = match value.strip_suffix(',') {
            Some(value) => (value, ","),
            None => (value, ""),
        };
        if value.starts_with('\'') {
            json.push_str(&quote(value));
        } else {
            json.push_str(value);
        }
        json.push_str(comma);
    }
    serde_json::from_str(&json).unwrap_or_else(|err| panic!("{err}: {json}\nfrom:\n{dump}"))
}

/// Every key path of a reply: `tags.*.medias[].streams[].stats.packets`, with the call's
/// tags as `*`.
fn key_paths(value: &Value, path: &str, tags: bool, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(fields) => {
            for (key, value) in fields {
                let name = if tags { "*" } else { key.as_str() };
                let here = if path.is_empty() {
                    name.to_owned()
                } else {
                    format!("{path}.{name}")
                };
                out.insert(here.clone());
                key_paths(value, &here, key == "tags" && path.is_empty(), out);
            }
        }
        Value::Array(items) => {
            for item in items {
                key_paths(item, &format!("{path}[]"), false, out);
            }
        }
        _ => {}
    }
}

/// The SDP with the media ports (m-line and a=rtcp) replaced by P.
fn without_ports(sdp: &str) -> String {
    sdp.lines()
        .map(|line| {
            if let Some(rest) = line.strip_prefix("m=audio ") {
                let (_, tail) = rest.split_once(' ').unwrap();
                format!("m=audio P {tail}")
            } else if line.starts_with("a=rtcp:") {
                "a=rtcp:P".to_owned()
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_perl_ng_client_gets_from_the_relay_what_rtpengine_answers() {
    require_root();
    let lab = ThreeHosts::new();
    let pins = PinDir::new();
    let config = ConfigFile::new(&ng_config(&pins.path, RELAY_NG, ""));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let _rtpengine = Rtpengine::start(
        &lab.relay,
        &["wan/10.10.1.1", "lan/10.10.2.1"],
        RTPENGINE_NG,
        (32000, 32999),
        &[],
    );

    let mut replies = Vec::new();
    for server in [RELAY_NG, RTPENGINE_NG] {
        let run = |args: &[&str]| ng_client(&lab.relay, server, args);
        let offer = run(&[
            "offer",
            "--call-id=c1",
            "--from-tag=a",
            "--trust-address",
            "--replace-origin",
            "--replace-session-connection",
            "--direction=wan,lan",
            &format!("--sdp={OFFER}"),
        ]);
        let answer = run(&[
            "answer",
            "--call-id=c1",
            "--from-tag=a",
            "--to-tag=b",
            "--trust-address",
            "--replace-origin",
            &format!("--sdp={ANSWER}"),
        ]);
        let query = run(&["query", "--call-id=c1"]);
        let delete = run(&["delete", "--call-id=c1", "--from-tag=a"]);
        let list = run(&["list"]);
        replies.push((server, offer, answer, query, delete, list));
    }
    let (relay, rtpengine) = (&replies[0], &replies[1]);
    for (what, ours, theirs) in [
        ("offer", &relay.1, &rtpengine.1),
        ("answer", &relay.2, &rtpengine.2),
    ] {
        let (ours, theirs) = (ours.sdp.as_deref().unwrap(), theirs.sdp.as_deref().unwrap());
        assert_eq!(
            without_ports(ours),
            without_ports(theirs),
            "the {what}'s SDP, relay then rtpengine"
        );
    }
    // The offer went to the LAN side, the answer to the WAN side.
    assert!(
        relay
            .1
            .sdp
            .as_deref()
            .unwrap()
            .contains("c=IN IP4 10.10.2.1")
    );
    assert!(
        relay
            .2
            .sdp
            .as_deref()
            .unwrap()
            .contains("c=IN IP4 10.10.1.1")
    );
    // No warning either way: every option the Perl client sent is known.
    assert_eq!(relay.1.result, Value::Null, "{}", relay.1.result);
    for (what, ours, theirs) in [
        ("query", &relay.3, &rtpengine.3),
        ("delete", &relay.4, &rtpengine.4),
    ] {
        let (mut mine, mut reference) = (BTreeSet::new(), BTreeSet::new());
        key_paths(&ours.result, "", false, &mut mine);
        key_paths(&theirs.result, "", false, &mut reference);
        let missing: Vec<&String> = reference.difference(&mine).collect();
        assert!(
            missing.is_empty(),
            "{what}: keys rtpengine has and the relay not: {missing:?}\nrelay: {}\nrtpengine: {}",
            ours.result,
            theirs.result
        );
        let endpoint = &ours.result["tags"]["a"]["medias"][0]["streams"][0]["endpoint"];
        assert_eq!(
            endpoint,
            &json!({"family": "IPv4", "address": "10.10.1.2", "port": "6000"}),
            "{what}"
        );
        assert_eq!(
            ours.result["tags"]["b"]["medias"][0]["streams"][1]["advertised endpoint"]["port"],
            "7001"
        );
    }
    // Deleted at once (rtpengine keeps a deleted call listed for its --delete-delay, 30 s).
    assert_eq!(relay.5.result["calls"], json!([]), "{}", relay.5.result);
    let flows = relayd.ctl_json(&["flow", "list"]);
    assert_eq!(flows["flows"], json!([]), "{flows}");
}
