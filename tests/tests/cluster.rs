//! Relays sharing a real redis-server (`[cluster]`): each node's health record has a TTL and
//! every member sees the others; a node killed without a goodbye is down once its record
//! expires; a node goes on serving without Redis (degraded, said in `relayctl status` and
//! the log) and rejoins when Redis is back; a node started while Redis is unreachable
//! starts and says so; a clean stop leaves the cluster; the operator forgets a node that is
//! down for good, and only such a node.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use relay_tests::{
    config_file::ConfigFile,
    netns::NetNs,
    redis::RedisServer,
    relayd::{Relayd, binary, http_get, metric},
    require_root,
};
use serde_json::Value;

const TTL_SECS: u64 = 3;

const METRICS: &str = "127.0.0.1:9479";

fn node_config(node: &str, redis_url: &str) -> ConfigFile {
    node_config_with(node, redis_url, "", "")
}

/// A node's configuration: `extra` in its `[cluster]`, metrics on `metrics` (empty: off).
fn node_config_with(node: &str, redis_url: &str, extra: &str, metrics: &str) -> ConfigFile {
    ConfigFile::new(&format!(
        r#"
[datapath]
mode = "userspace"
[metrics]
listen = "{metrics}"
[cluster]
enabled = true
node = "{node}"
redis_url = "{redis_url}"
health_ttl_secs = {TTL_SECS}
{extra}
"#
    ))
}

fn member<'a>(status: &'a Value, node: &str) -> Option<&'a Value> {
    status["members"]
        .as_array()?
        .iter()
        .find(|member| member["node"] == node)
}

fn state_of(status: &Value, node: &str) -> Option<String> {
    member(status, node).map(|member| member["state"].as_str().unwrap_or("").to_owned())
}

#[test]
fn nodes_share_health_through_redis_and_serve_without_it() {
    require_root();
    let ns = NetNs::new("clu");
    let redis = RedisServer::start(&ns, 6379);

    // A bad node name is refused by name before anything starts.
    let bad = node_config("edge a", &redis.url());
    let checked = Command::new(binary("relayd"))
        .args(["--check", "--config", bad.path()])
        .output()
        .expect("relayd --check");
    let stderr = String::from_utf8_lossy(&checked.stderr);
    assert_eq!(checked.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cluster.node") && stderr.contains("' ' is not allowed"),
        "{stderr}"
    );

    let (config_a, config_b) = (
        node_config_with("edge-a", &redis.url(), "", METRICS),
        node_config("edge-b", &redis.url()),
    );
    let mut a = Relayd::start(Some(&ns), &["--config", config_a.path()]);
    let mut b = Relayd::start(Some(&ns), &["--config", config_b.path()]);

    // Each sees both alive, with the other's load and version.
    let both_alive = |status: &Value| {
        state_of(status, "edge-a").as_deref() == Some("alive")
            && state_of(status, "edge-b").as_deref() == Some("alive")
    };
    for (relayd, this) in [(&a, "edge-a"), (&b, "edge-b")] {
        let status =
            relayd.ctl_json_until(&["cluster", "status"], Duration::from_secs(10), both_alive);
        assert!(both_alive(&status), "{this}: {status:#}\n{}", relayd.log());
        assert_eq!(status["node"], this, "{status:#}");
        assert_eq!(status["redis"], "up", "{status:#}");
        assert_eq!(status["nodes_alive"], 2, "{status:#}");
        let me = member(&status, this).unwrap();
        assert_eq!(me["this_node"], true, "{status:#}");
        assert_eq!(
            me["load"]["version"],
            env!("CARGO_PKG_VERSION"),
            "{status:#}"
        );
        assert_eq!(me["load"]["calls"], 0, "{status:#}");
        assert!(
            me["load"]["record_age_ms"].as_u64().unwrap() <= TTL_SECS * 1000,
            "{status:#}"
        );
    }
    assert!(a.log().contains("cluster: joined"), "{}", a.log());
    // In Redis itself: the records with their TTL, both in the member set.
    let ttl: u64 = redis.cli(&["TTL", "relay:node:edge-b"]).parse().unwrap();
    assert!((1..=TTL_SECS).contains(&ttl), "TTL {ttl}");
    let members = redis.cli(&["SMEMBERS", "relay:nodes"]);
    assert!(
        members.contains("edge-a") && members.contains("edge-b"),
        "{members}"
    );
    let record: Value = serde_json::from_str(&redis.cli(&["GET", "relay:node:edge-a"])).unwrap();
    assert_eq!(record["node"], "edge-a", "{record:#}");
    // The operator's table.
    let table = a.ctl_ok(&["cluster", "status"]);
    println!("relayctl cluster status:\n{table}");
    for expected in [
        "node edge-a, Redis redis://127.0.0.1:6379 up for",
        "members     2 alive of 2",
        "edge-a (this)",
        "edge-b",
        "alive",
    ] {
        assert!(table.contains(expected), "{expected:?} not in:\n{table}");
    }
    assert!(
        a.ctl_ok(&["status"])
            .contains("Redis redis://127.0.0.1:6379 up")
    );
    let metrics = http_get(&ns, METRICS, "/metrics");
    for (series, value) in [
        ("relay_cluster_redis_up", 1),
        ("relay_cluster_redis_unavailable_total", 0),
        (r#"relay_cluster_members{state="alive"}"#, 2),
        (r#"relay_cluster_members{state="down"}"#, 0),
    ] {
        assert_eq!(metric(&metrics, series), Some(value), "{series}\n{metrics}");
    }

    // Only a member that is down can be forgotten.
    let refused = |args: &[&str], expected: &str| {
        let output = a.ctl(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    };
    refused(&["cluster", "forget", "edge-b"], "edge-b is alive");
    refused(&["cluster", "forget", "edge-a"], "edge-a is this node");
    refused(&["cluster", "forget", "edge-z"], "edge-z is not a member");

    // A node killed (no goodbye): down once its record expires, within the TTL and a refresh.
    b.kill();
    let killed = Instant::now();
    let status = a.ctl_json_until(
        &["cluster", "status"],
        Duration::from_secs(3 * TTL_SECS),
        |s| state_of(s, "edge-b").as_deref() == Some("down"),
    );
    assert_eq!(
        state_of(&status, "edge-b").as_deref(),
        Some("down"),
        "{status:#}"
    );
    let noticed = killed.elapsed();
    assert!(
        noticed <= Duration::from_secs(TTL_SECS + TTL_SECS / 3 + 2),
        "edge-b seen down after {noticed:?}"
    );
    println!("a killed node was seen down after {noticed:?} (TTL {TTL_SECS} s)");
    assert!(a.ctl_ok(&["cluster", "status"]).contains("down"));
    let metrics = http_get(&ns, METRICS, "/metrics");
    assert_eq!(
        metric(&metrics, r#"relay_cluster_members{state="down"}"#),
        Some(1),
        "{metrics}"
    );
    // Decommissioned for good: the operator removes it from the list.
    assert_eq!(
        a.ctl_ok(&["cluster", "forget", "edge-b"]),
        "edge-b forgotten: no longer a member\n"
    );
    redis.cli_until(
        &["SISMEMBER", "relay:nodes", "edge-b"],
        Duration::from_secs(2),
        |got| got == "0",
    );
    let status = a.ctl_json(&["cluster", "status"]);
    assert!(member(&status, "edge-b").is_none(), "{status:#}");

    // Redis gone: the node says so and goes on answering.
    drop(redis);
    let status = a.ctl_json_until(&["status"], Duration::from_secs(3 * TTL_SECS), |s| {
        s["cluster"]["redis"] == "degraded"
    });
    assert_eq!(
        status["cluster"]["redis"],
        "degraded",
        "{status:#}\n{}",
        a.log()
    );
    assert!(
        !status["cluster"]["reason"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "{status:#}"
    );
    let text = a.ctl_ok(&["status"]);
    assert!(
        text.contains("UNAVAILABLE")
            && text.contains("serving this node's own sessions and calls only"),
        "{text}"
    );
    assert!(
        a.log().contains("cluster: Redis unavailable"),
        "{}",
        a.log()
    );
    let metrics = http_get(&ns, METRICS, "/metrics");
    for (series, value) in [
        ("relay_cluster_redis_up", 0),
        ("relay_cluster_redis_unavailable_total", 1),
        (r#"relay_cluster_members{state="alive"}"#, 1),
    ] {
        assert_eq!(metric(&metrics, series), Some(value), "{series}\n{metrics}");
    }

    // Back (empty, as after a Redis restart without persistence): the node rejoins and
    // writes its record again.
    let redis = RedisServer::start(&ns, 6379);
    let status = a.ctl_json_until(
        &["cluster", "status"],
        Duration::from_secs(3 * TTL_SECS),
        |s| s["redis"] == "up" && state_of(s, "edge-a").as_deref() == Some("alive"),
    );
    assert_eq!(status["redis"], "up", "{status:#}\n{}", a.log());
    assert_eq!(redis.cli(&["EXISTS", "relay:node:edge-a"]), "1");
    assert!(a.log().contains("rejoined"), "{}", a.log());

    // A node whose Redis does not answer at its start starts anyway, degraded.
    let config_c = node_config("edge-c", "redis://127.0.0.1:6390");
    let c = Relayd::start(Some(&ns), &["--config", config_c.path()]);
    let status = c.ctl_json_until(&["status"], Duration::from_secs(3 * TTL_SECS), |s| {
        s["cluster"]["redis"] == "degraded"
    });
    assert_eq!(
        status["cluster"]["redis"],
        "degraded",
        "{status:#}\n{}",
        c.log()
    );
    assert_eq!(redis.cli(&["SISMEMBER", "relay:nodes", "edge-c"]), "0");

    // A clean stop leaves: no record, no membership.
    assert!(a.stop(), "relayd stopped uncleanly:\n{}", a.log());
    assert_eq!(redis.cli(&["EXISTS", "relay:node:edge-a"]), "0");
    assert_eq!(redis.cli(&["SISMEMBER", "relay:nodes", "edge-a"]), "0");
}

/// `rediss://` to a Redis whose certificate a private CA signed: with the CA in
/// `cluster.ca_file` the node joins over TLS; without it (the system's trust store) the
/// certificate is refused and the node says so, degraded.
#[test]
fn a_node_reaches_redis_over_tls_with_a_private_ca() {
    require_root();
    let ns = NetNs::new("clt");
    let redis = RedisServer::start_tls(&ns, 6380);
    let ca = redis.ca_file().unwrap();
    let trusted = node_config_with("edge-t", &redis.url(), &format!("ca_file = \"{ca}\""), "");
    let node = Relayd::start(Some(&ns), &["--config", trusted.path()]);
    let status = node.ctl_json_until(&["cluster", "status"], Duration::from_secs(10), |s| {
        s["redis"] == "up"
    });
    assert_eq!(status["redis"], "up", "{status:#}\n{}", node.log());
    assert_eq!(status["redis_url"], "rediss://127.0.0.1:6380", "{status:#}");
    let record: Value = serde_json::from_str(&redis.cli(&["GET", "relay:node:edge-t"])).unwrap();
    assert_eq!(record["node"], "edge-t", "{record:#}");

    let untrusted = node_config("edge-u", &redis.url());
    let refused = Relayd::start(Some(&ns), &["--config", untrusted.path()]);
    let status = refused.ctl_json_until(&["status"], Duration::from_secs(10), |s| {
        s["cluster"]["redis"] == "degraded"
    });
    assert_eq!(
        status["cluster"]["redis"],
        "degraded",
        "{status:#}\n{}",
        refused.log()
    );
    let reason = status["cluster"]["reason"].as_str().unwrap().to_lowercase();
    println!("Redis's certificate without cluster.ca_file: {reason}");
    assert!(reason.contains("certificate"), "{reason}");
    assert_eq!(redis.cli(&["EXISTS", "relay:node:edge-u"]), "0");
}

/// Signalling across nodes: the controller on one node, the app on another, both sharing
/// Redis. Messages go both ways through the nodes' channels with the same answers as on one
/// node (`delivered`, or `offline` when the user is connected nowhere).
#[test]
fn a_controller_and_an_app_on_different_nodes_reach_each_other() {
    use relay_tests::signalling_client::{call, connect, controller, receive_within};
    use serde_json::json;
    require_root();
    let ns = NetNs::new("cls");
    let mut redis = Some(RedisServer::start(&ns, 6379));
    let url = redis.as_ref().unwrap().url();
    let signalling = |listen: &str| {
        format!(
            "[signalling]\nenabled = true\nlisten = \"{listen}\"\n\
             token_secret = \"a token secret of enough length\"\n\
             tenants = [{{ name = \"acme\", api_key = \"acme-api-key-0123456789\" }}]\n"
        )
    };
    let config = |node: &str, listen: &str| {
        ConfigFile::new(&format!(
            "[datapath]\nmode = \"userspace\"\n[metrics]\nlisten = \"\"\n{}\
             [cluster]\nenabled = true\nnode = \"{node}\"\nredis_url = \"{}\"\nhealth_ttl_secs = {TTL_SECS}\n",
            signalling(listen),
            url
        ))
    };
    let (config_a, config_b) = (
        config("edge-a", "127.0.0.1:4431"),
        config("edge-b", "127.0.0.1:4432"),
    );
    let a = Relayd::start(Some(&ns), &["--config", config_a.path()]);
    let b = Relayd::start(Some(&ns), &["--config", config_b.path()]);
    let (fingerprint_a, fingerprint_b) = (a.signalling_fingerprint(), b.signalling_fingerprint());
    let runtime = relay_tests::runtime();
    runtime.block_on(async {
        let (address_a, address_b) = ("127.0.0.1:4431".parse().unwrap(), "127.0.0.1:4432".parse().unwrap());
        let mut acme = controller(&ns, address_a, &fingerprint_a, "acme", "acme-api-key-0123456789").await;
        let minted = call(
            &mut acme,
            json!({"type": "token.mint", "id": 1, "user": "alice", "ttl_secs": 60}),
        )
        .await;
        let token = minted["token"].as_str().unwrap().to_owned();
        // The app connects to the other node (the same secret signs tokens on both).
        let mut alice = connect(&ns, address_b, &fingerprint_b).await;
        let welcome = call(
            &mut alice,
            json!({"type": "hello", "v": 1, "role": "client", "token": token}),
        )
        .await;
        assert_eq!(welcome["user"], "alice", "{welcome}");
        let alice_session = welcome["session"].clone();

        // Controller -> app across nodes, once edge-a has read that edge-b is alive.
        let started = Instant::now();
        let answer = send_until(
            &mut acme,
            json!({"type": "send", "id": 2, "to": {"user": "alice"}, "body": "ring"}),
            Duration::from_secs(2 * TTL_SECS),
            |answer| answer["type"] == "result",
            |answer| answer["code"] == "offline",
        )
        .await;
        assert_eq!((&answer["type"], &answer["delivered"]), (&json!("result"), &json!(1)), "{answer}\n{}", a.log());
        println!("alice, connected to edge-b, reachable from edge-a after {:?}", started.elapsed());
        let message = receive_within(&mut alice, Duration::from_secs(2)).await.unwrap();
        assert_eq!(
            (&message["type"], &message["from"]["role"], &message["body"]),
            (&json!("message"), &json!("controller"), &json!("ring")),
            "{message}"
        );

        // App -> controller across nodes.
        let answer = send_until(
            &mut alice,
            json!({"type": "send", "id": 3, "to": {"role": "controller"}, "body": {"answer": true}}),
            Duration::from_secs(2 * TTL_SECS),
            |answer| answer["type"] == "result",
            |_| true,
        )
        .await;
        assert_eq!(answer["delivered"], 1, "{answer}\n{}", b.log());
        let message = receive_within(&mut acme, Duration::from_secs(2)).await.unwrap();
        assert_eq!(
            message,
            json!({"type": "message", "from": {"role": "client", "user": "alice", "session": alice_session}, "body": {"answer": true}})
        );

        // Nobody anywhere: offline at once, saying so.
        let started = Instant::now();
        let answer = call(
            &mut acme,
            json!({"type": "send", "id": 4, "to": {"user": "bob"}, "body": "ring"}),
        )
        .await;
        assert_eq!(answer["code"], "offline", "{answer}");
        assert!(
            answer["message"].as_str().unwrap().contains("on any relay of the cluster"),
            "{answer}"
        );
        assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());

        // Alice leaves: once edge-b has seen her session close, offline again.
        drop(alice);
        send_until(
            &mut acme,
            json!({"type": "send", "id": 5, "to": {"user": "alice"}, "body": "ring"}),
            Duration::from_secs(3 * TTL_SECS),
            |answer| answer["code"] == "offline",
            |_| true,
        )
        .await;

        // Redis gone: only this relay's sessions, and the answer says why.
        drop(redis.take());
        let deadline = Instant::now() + Duration::from_secs(3 * TTL_SECS);
        while a.ctl_json(&["status"])["cluster"]["redis"] != "degraded" {
            assert!(Instant::now() < deadline, "{}", a.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let answer = call(
            &mut acme,
            json!({"type": "send", "id": 6, "to": {"user": "alice"}, "body": "ring"}),
        )
        .await;
        assert_eq!(answer["code"], "offline", "{answer}");
        assert!(
            answer["message"].as_str().unwrap().contains("cannot be reached now"),
            "{answer}"
        );
    });
}

/// `message` sent again (100 ms apart) until its answer is `done`, at most `within`; every
/// answer before must be `meanwhile`. The answer.
async fn send_until(
    socket: &mut relay_tests::signalling_client::Socket,
    message: Value,
    within: Duration,
    done: impl Fn(&Value) -> bool,
    meanwhile: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let answer = relay_tests::signalling_client::call(socket, message.clone()).await;
        if done(&answer) {
            return answer;
        }
        assert!(meanwhile(&answer), "{answer}");
        assert!(
            started.elapsed() < within,
            "{message} -> {answer} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
