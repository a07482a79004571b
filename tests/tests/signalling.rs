//! The signalling rendezvous end to end, from the client namespace to relayd over real TLS
//! (the self-signed certificate pinned by the fingerprint relayd logs): a controller with
//! its API key mints a token, an app connects with it, messages go both ways; offline
//! recipients, bad JSON, unknown types, wrong roles, bad credentials and an oversized frame
//! get their error or close, and nothing else is disturbed. The certificate survives a
//! restart.

use std::{net::SocketAddr, path::PathBuf, process::Command};

use relay_tests::{
    config_file::ConfigFile,
    lab::ThreeHosts,
    relayd::{Relayd, binary, http_get, metric},
    require_root,
    signalling_client::{call, connect, receive, send, send_invalid_utf8, send_raw},
    unique,
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const LISTEN: &str = "10.10.1.1:8443";
const METRICS: &str = "10.10.1.1:9477";
const API_KEY: &str = "acme-api-key-0123456789";

/// A state directory (the self-signed certificate lives there), removed on drop.
struct StateDir(PathBuf);

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start(lab: &ThreeHosts, config: &ConfigFile, state: &StateDir) -> (Relayd, String) {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{}", lab.relay.name))
        .arg("--")
        .arg(binary("relayd"))
        .env("RELAY_STATE_PATH", state.0.join("state.redb"));
    let relayd = Relayd::start_command(command, &["--config", config.path()]);
    let fingerprint = relayd.signalling_fingerprint();
    (relayd, fingerprint)
}

fn hello_controller(key: &str) -> Value {
    json!({"type": "hello", "v": 1, "role": "controller", "tenant": "acme", "api_key": key})
}

#[test]
fn controllers_and_apps_meet_through_the_relay() {
    require_root();
    let lab = ThreeHosts::new();
    let state = StateDir(std::env::temp_dir().join(unique("relay-signalling-state-")));
    std::fs::create_dir_all(&state.0).unwrap();
    let config = ConfigFile::new(&format!(
        r#"
[datapath]
mode = "userspace"
[metrics]
listen = "{METRICS}"
[turn]
enabled = true
listen = ["10.10.1.1:3478"]
users = [{{ name = "unused", password = "unused" }}]
[signalling]
enabled = true
listen = "{LISTEN}"
token_secret = "a token secret of enough length"
max_message_bytes = 16384
tenants = [{{ name = "acme", api_key = "{API_KEY}" }}, {{ name = "globex", api_key = "globex-api-key-0123456789" }}]
"#
    ));
    let (relayd, fingerprint) = start(&lab, &config, &state);
    let address: SocketAddr = LISTEN.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // A wrong API key: unauthorized, closed with 4001.
        let mut intruder = connect(&lab.client, address, &fingerprint).await;
        let answer = call(&mut intruder, hello_controller("not-the-key-at-all")).await;
        assert_eq!(answer["code"], "unauthorized", "{answer}");
        assert_eq!(receive(&mut intruder).await, Err(Some(CloseCode::Library(4001))));

        let mut controller = connect(&lab.client, address, &fingerprint).await;
        let welcome = call(&mut controller, hello_controller(API_KEY)).await;
        assert_eq!(
            (&welcome["type"], &welcome["role"], &welcome["tenant"]),
            (&json!("welcome"), &json!("controller"), &json!("acme")),
            "{welcome}"
        );
        // Tokens: bad requests named, then a good one.
        let answer = call(
            &mut controller,
            json!({"type": "token.mint", "id": 1, "user": "alice", "ttl_secs": 0}),
        )
        .await;
        assert_eq!((&answer["code"], &answer["id"]), (&json!("bad_request"), &json!(1)));
        let answer = call(
            &mut controller,
            json!({"type": "token.mint", "id": 2, "user": "a:b", "ttl_secs": 60}),
        )
        .await;
        assert_eq!(answer["code"], "bad_request", "{answer}");
        let minted = call(
            &mut controller,
            json!({"type": "token.mint", "id": 3, "user": "alice", "ttl_secs": 60}),
        )
        .await;
        assert_eq!((&minted["type"], &minted["id"]), (&json!("result"), &json!(3)));
        let token = minted["token"].as_str().unwrap().to_owned();

        // A forged token (another user in the claims) and no token: refused.
        let mut forger = connect(&lab.client, address, &fingerprint).await;
        let forged = token.replacen("alice", "mallory", 1);
        let answer = call(
            &mut forger,
            json!({"type": "hello", "v": 1, "role": "client", "token": forged}),
        )
        .await;
        assert_eq!(answer["code"], "unauthorized", "{answer}");
        assert_eq!(receive(&mut forger).await, Err(Some(CloseCode::Library(4001))));

        let mut alice = connect(&lab.client, address, &fingerprint).await;
        let welcome = call(
            &mut alice,
            json!({"type": "hello", "v": 1, "role": "client", "token": token}),
        )
        .await;
        assert_eq!((&welcome["role"], &welcome["user"]), (&json!("client"), &json!("alice")));
        let alice_session = welcome["session"].clone();

        // App -> controller and back.
        let answer = call(
            &mut alice,
            json!({"type": "send", "id": 10, "to": {"role": "controller"}, "body": {"hi": 1}}),
        )
        .await;
        assert_eq!((&answer["type"], &answer["delivered"]), (&json!("result"), &json!(1)));
        let message = receive(&mut controller).await.unwrap();
        assert_eq!(
            message,
            json!({"type": "message", "from": {"role": "client", "user": "alice", "session": alice_session}, "body": {"hi": 1}})
        );
        let answer = call(
            &mut controller,
            json!({"type": "send", "id": 11, "to": {"user": "alice"}, "body": "ring"}),
        )
        .await;
        assert_eq!(answer["delivered"], 1, "{answer}");
        let message = receive(&mut alice).await.unwrap();
        assert_eq!((&message["type"], &message["body"]), (&json!("message"), &json!("ring")));
        // Offline user: an error at once.
        let answer = call(
            &mut controller,
            json!({"type": "send", "id": 12, "to": {"user": "bob"}, "body": "ring"}),
        )
        .await;
        assert_eq!((&answer["code"], &answer["id"]), (&json!("offline"), &json!(12)));

        // Bad input from the app: errors, and the session goes on.
        send(&mut alice, json!("ignored")).await;
        let answer = receive(&mut alice).await.unwrap();
        assert_eq!(answer["code"], "unknown_type", "{answer}");
        send_raw(&mut alice, "{not json").await;
        assert_eq!(receive(&mut alice).await.unwrap()["code"], "invalid_json");
        let answer = call(&mut alice, json!({"type": "call.dance", "id": 13})).await;
        assert_eq!((&answer["code"], &answer["id"]), (&json!("unknown_type"), &json!(13)));
        let answer = call(
            &mut alice,
            json!({"type": "token.mint", "id": 14, "user": "alice", "ttl_secs": 60}),
        )
        .await;
        assert_eq!(answer["code"], "forbidden", "{answer}");
        let answer = call(
            &mut alice,
            json!({"type": "send", "id": 15, "to": {"user": "bob"}, "body": 1}),
        )
        .await;
        assert_eq!(answer["code"], "forbidden", "{answer}");
        let answer = call(
            &mut alice,
            json!({"type": "send", "id": 16, "to": {"role": "controller"}, "body": "still here"}),
        )
        .await;
        assert_eq!(answer["delivered"], 1, "the session survived: {answer}");
        assert_eq!(receive(&mut controller).await.unwrap()["body"], "still here");

        // A message of several read buffers (4 KiB each) arrives whole.
        let long = "y".repeat(12_000);
        let answer = call(
            &mut alice,
            json!({"type": "send", "id": 20, "to": {"role": "controller"}, "body": long}),
        )
        .await;
        assert_eq!(answer["delivered"], 1, "{answer}");
        assert_eq!(receive(&mut controller).await.unwrap()["body"], long);

        // An oversized message closes that connection (1009), and only that one.
        send(
            &mut alice,
            json!({"type": "send", "id": 17, "to": {"role": "controller"}, "body": "x".repeat(20_000)}),
        )
        .await;
        assert_eq!(receive(&mut alice).await, Err(Some(CloseCode::Size)));
        let answer = call(
            &mut controller,
            json!({"type": "send", "id": 18, "to": {"user": "alice"}, "body": "gone?"}),
        )
        .await;
        assert_eq!(answer["code"], "offline", "alice's only session is closed: {answer}");
        let answer = call(
            &mut controller,
            json!({"type": "token.mint", "id": 19, "user": "bob", "ttl_secs": 60}),
        )
        .await;
        assert_eq!(answer["type"], "result", "the controller is untouched: {answer}");

        // A text frame that is not UTF-8 closes that connection with 1007 (RFC 6455 8.1).
        let mut garbler = connect(&lab.client, address, &fingerprint).await;
        let welcome = call(
            &mut garbler,
            json!({"type": "hello", "v": 1, "role": "controller", "tenant": "globex", "api_key": "globex-api-key-0123456789"}),
        )
        .await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        send_invalid_utf8(&mut garbler).await;
        assert_eq!(receive(&mut garbler).await, Err(Some(CloseCode::Invalid)));

        let metrics = http_get(&lab.relay, METRICS, "/metrics");
        assert_eq!(
            metric(&metrics, r#"relay_signalling_sessions{role="controller"}"#),
            Some(1),
            "{metrics}"
        );
    });
    drop(relayd);

    // The self-signed certificate is kept: the same fingerprint after a restart.
    let (relayd, again) = start(&lab, &config, &state);
    assert_eq!(again, fingerprint, "{}", relayd.log());
    assert!(state.0.join("signalling-certificate.pem").exists());
}

#[test]
fn a_peer_that_answers_no_pings_is_closed() {
    require_root();
    let lab = ThreeHosts::new();
    let state = StateDir(std::env::temp_dir().join(unique("relay-signalling-state-")));
    std::fs::create_dir_all(&state.0).unwrap();
    let config = ConfigFile::new(&format!(
        r#"
[datapath]
mode = "userspace"
[signalling]
enabled = true
listen = "{LISTEN}"
token_secret = "a token secret of enough length"
ping_interval_secs = 1
tenants = [{{ name = "acme", api_key = "{API_KEY}" }}]
"#
    ));
    let (relayd, fingerprint) = start(&lab, &config, &state);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut controller = connect(&lab.client, LISTEN.parse().unwrap(), &fingerprint).await;
        assert_eq!(
            call(&mut controller, hello_controller(API_KEY)).await["type"],
            "welcome"
        );
        // Not reading means not answering the pings: after three intervals, closed. (The
        // close frame may be lost behind the pongs the client then tries to write to the
        // closed connection; relayd's log says why it closed.)
        tokio::time::sleep(std::time::Duration::from_millis(4500)).await;
        let ended = receive(&mut controller).await;
        assert!(
            matches!(ended, Err(None) | Err(Some(CloseCode::Away))),
            "{ended:?}"
        );
    });
    assert!(
        relayd.log().contains("no answer to three pings"),
        "{}",
        relayd.log()
    );
}
