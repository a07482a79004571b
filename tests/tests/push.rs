//! Waking a sleeping app with a push, in the edge lab. The providers are a stand-in in the
//! test: HTTPS on the relay's loopback with a certificate of its own (trusted through
//! `push.ca_file`) that plays the operator's webhook gateway (checking each push's HMAC
//! signature, answering 200 for a live device and 410 for a dead one), FCM (its token
//! endpoint for the service account's JWT grant, and `messages:send` with that token) and
//! APNs (`/3/device/{token}` with a provider token and the VoIP headers).
//!
//! The app registers four devices (two webhook, one FCM, one APNs VoIP) and disconnects; the controller calls its user: the
//! controller hears `ringing`, the gateway gets a signed push per device without any SDP,
//! two apps of the user connect within the ring time and both get `call.incoming`, the
//! first answers and the media flows through XDP, the other is told `answered-elsewhere`;
//! the device the gateway called dead is no longer registered afterwards. A second
//! call that no app takes ends `no-answer`. Bad registrations are refused naming the field.

use std::{
    io::{Read, Write},
    sync::mpsc,
    time::Duration,
};

use relay_tests::{
    app::{App, talk},
    config_file::ConfigFile,
    lab::{EdgeLab, calls_config},
    netns::{PinDir, enter_by_name},
    pbx::rtp_echo,
    relayd::Relayd,
    require_root, runtime,
    signalling_client::{Socket, mint_token, receive_within, request},
};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

/// The next thing a channel gets, within 20 s.
async fn within<T>(rx: &mut UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("in time")
        .expect("not closed")
}

const API_KEY: &str = "acme-api-key-0123456789";
const SECRET: &str = "the gateway's shared secret";
const GATEWAY: &str = "127.0.0.1:18444";
const RING_SECS: u64 = 3;

/// The access token the FCM stand-in grants.
const FCM_ACCESS_TOKEN: &str = "lab-access-token";

/// A push the gateway received: its body (for FCM, the message's data and `device`), and
/// whether it was authenticated (the webhook's signature; FCM's bearer token).
struct Received {
    body: Value,
    signed: bool,
}

/// An APNs device token (hexadecimal).
const APNS_DEVICE: &str = "0a1b2c3d4e5f60718293a4b5c6d7e8f9";

/// The APNs stand-in's answer to `/3/device/{token}`: a VoIP push for the app's bundle with
/// a provider token (a JWT) and APNs' headers.
fn apns_answer(path: &str, headers: &str, body: &[u8]) -> (&'static str, String, Option<Received>) {
    let header = |name: &str| {
        headers
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}: ")))
            .unwrap_or_default()
    };
    let jwt = header("authorization")
        .strip_prefix("bearer ")
        .unwrap_or_default();
    let signed = jwt.split('.').count() == 3
        && header("apns-topic") == "com.example.softphone.voip"
        && header("apns-push-type") == "voip"
        && header("apns-priority") == "10"
        && header("apns-expiration").parse::<u64>().is_ok();
    let mut payload: Value = serde_json::from_slice(body).unwrap_or_default();
    payload["device"] = json!(path.trim_start_matches("/3/device/"));
    (
        "200 OK",
        String::new(),
        Some(Received {
            body: payload,
            signed,
        }),
    )
}

/// The FCM stand-in's answer to `path`: the token endpoint grants a token for a JWT bearer
/// grant; `messages:send` takes a high-priority data message with that token.
fn fcm_answer(path: &str, headers: &str, body: &[u8]) -> (&'static str, String, Option<Received>) {
    if path == "/token" {
        let form = String::from_utf8_lossy(body);
        let granted = form
            .contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer")
            && form
                .split('&')
                .find_map(|pair| pair.strip_prefix("assertion="))
                .is_some_and(|jwt| jwt.split('.').count() == 3);
        return if granted {
            let token = json!({"access_token": FCM_ACCESS_TOKEN, "expires_in": 3600, "token_type": "Bearer"});
            ("200 OK", token.to_string(), None)
        } else {
            (
                "400 Bad Request",
                json!({"error": "invalid_grant"}).to_string(),
                None,
            )
        };
    }
    let message: Value = serde_json::from_slice(body).unwrap_or_default();
    let message = &message["message"];
    let bearer = headers
        .lines()
        .any(|line| line == format!("authorization: bearer {}", FCM_ACCESS_TOKEN.to_lowercase()));
    let mut data = message["data"].clone();
    data["device"] = message["token"].clone();
    let received = Received {
        body: data,
        signed: bearer && message["android"]["priority"] == "high",
    };
    (
        "200 OK",
        json!({"name": "projects/relay-test-project/messages/1"}).to_string(),
        Some(received),
    )
}

/// The gateway, in the relay's namespace: one request per connection, as relayd sends.
fn start_gateway(
    relay_ns: String,
    certificate: rcgen::CertifiedKey<rcgen::KeyPair>,
) -> UnboundedReceiver<Received> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready) = mpsc::channel();
    std::thread::spawn(move || {
        enter_by_name(&relay_ns);
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![certificate.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(certificate.signing_key.serialize_der())
                .unwrap(),
        )
        .unwrap();
        let config = std::sync::Arc::new(config);
        let listener = std::net::TcpListener::bind(GATEWAY).unwrap();
        ready_tx.send(()).unwrap();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
        for stream in listener.incoming() {
            let Ok(mut tcp) = stream else { continue };
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut connection = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::Stream::new(&mut connection, &mut tcp);
            let Some((headers, body)) = read_request(&mut tls) else {
                continue;
            };
            let path = headers.split(' ').nth(1).unwrap_or_default().to_owned();
            if path != "/relay/push" {
                let (status, answer, received) = if path.starts_with("/3/device/") {
                    apns_answer(&path, &headers, &body)
                } else {
                    fcm_answer(&path, &headers, &body)
                };
                let _ = write!(
                    tls,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = tls.flush();
                if let Some(received) = received
                    && tx.send(received).is_err()
                {
                    return;
                }
                continue;
            }
            let signature = headers
                .lines()
                .find_map(|line| line.strip_prefix("x-relay-signature: sha256="))
                .and_then(|hex| {
                    (0..hex.len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
                        .collect::<Option<Vec<u8>>>()
                });
            let signed = signature.is_some_and(|tag| ring::hmac::verify(&key, &body, &tag).is_ok());
            let body: Value = serde_json::from_slice(&body).unwrap_or_default();
            let status = if body["device"] == "phone-gone" {
                "410 Gone"
            } else {
                "200 OK"
            };
            let _ = write!(
                tls,
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
            let _ = tls.flush();
            if tx.send(Received { body, signed }).is_err() {
                return;
            }
        }
    });
    ready.recv().unwrap();
    rx
}

/// An HTTP/1.1 request's header block (lower-cased names) and body.
fn read_request(stream: &mut impl Read) -> Option<(String, Vec<u8>)> {
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&chunk[..n]);
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at;
        }
    };
    let headers = String::from_utf8_lossy(&data[..end]).to_lowercase();
    let length: usize = headers
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0);
    let mut body = data[end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((headers, body))
}

/// Waits until relayd has seen every app session go (a closed session is noticed a moment
/// after the app closes it).
async fn no_app_connected(relayd: &Relayd) {
    for _ in 0..100 {
        if relayd.ctl_json(&["status"])["signalling"]["clients"] == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("an app session stays:\n{}", relayd.log());
}

/// The next event `name` on `socket`, within 10 s each message; relayd's log if none comes.
async fn next_event(socket: &mut Socket, name: &str, relayd: &Relayd) -> Value {
    loop {
        let message = tokio::time::timeout(
            Duration::from_secs(10),
            receive_within(socket, Duration::from_secs(11)),
        )
        .await
        .unwrap_or_else(|_| panic!("no {name} within 10 s:\n{}", relayd.log()))
        .unwrap_or_else(|err| panic!("waiting for {name}: {err:?}"));
        if message["event"] == name {
            return message;
        }
    }
}

#[test]
fn a_sleeping_app_is_woken_by_a_push_and_takes_the_call() {
    require_root();
    let lab = EdgeLab::new();
    let pins = PinDir::new();
    let certificate = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), certificate.cert.pem()).unwrap();
    let mut pushes = start_gateway(lab.relay.name.clone(), certificate);
    // The test project's service account, its token endpoint the stand-in's.
    let mut account: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fixtures/push/fcm-test-service-account.json"
        ))
        .unwrap(),
    )
    .unwrap();
    account["token_uri"] = json!(format!("https://{GATEWAY}/token"));
    let account_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(account_file.path(), account.to_string()).unwrap();
    // The team's APNs signing key (a .p8 file: PKCS#8 P-256).
    let apns_key = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        apns_key.path(),
        rcgen::KeyPair::generate().unwrap().serialize_pem(),
    )
    .unwrap();
    let config = ConfigFile::new(&format!(
        "{}\n[push]\nenabled = true\nring_secs = {RING_SECS}\nca_file = \"{}\"\n[push.webhook]\nurl = \"https://{GATEWAY}/relay/push\"\nsecret = \"{SECRET}\"\n[push.fcm]\nservice_account = \"{}\"\nbase_url = \"https://{GATEWAY}\"\n[push.apns]\nkey_file = \"{}\"\nkey_id = \"KEYID12345\"\nteam_id = \"TEAMID1234\"\ntopic = \"com.example.other\"\nbase_url = \"https://{GATEWAY}\"\n",
        calls_config(&pins.path, "acme", API_KEY, ""),
        ca.path().display(),
        account_file.path().display(),
        apns_key.path().display()
    ));
    let relayd = Relayd::start(Some(&lab.relay), &["--config", config.path()]);
    let echo_socket = lab.pbx.udp_socket(relay_tests::pbx::RTP.parse().unwrap());
    runtime().block_on(async {
        let echo = tokio::spawn(rtp_echo(echo_socket));
        let fingerprint = relayd.signalling_fingerprint();
        let mut controller = lab.controller(&fingerprint, "acme", API_KEY).await;
        let token = mint_token(&mut controller, "alice", 300).await;
        let bob = mint_token(&mut controller, "bob", 300).await;
        let (to_app, woken) = mpsc::channel::<()>();
        let (to_test, mut from_app) = tokio::sync::mpsc::unbounded_channel::<Value>();
        let app_ns = lab.app.name.clone();
        let app = std::thread::spawn(move || {
            enter_by_name(&app_ns);
            runtime().block_on(async move {
                // The app registers its device (and a second one the provider will say is
                // gone), then sleeps: no session.
                let mut app = App::in_edge_lab(&fingerprint, &token).await;
                for (id, provider, device) in [
                    (1, "carrier-pigeon", "phone-1".to_owned()),
                    (2, "webhook", "x".repeat(5000)),
                    (3, "webhook", "phone-1".to_owned()),
                    (4, "webhook", "phone-gone".to_owned()),
                    (5, "fcm", "phone-fcm".to_owned()),
                    (6, "apns", APNS_DEVICE.to_owned()),
                ] {
                    let voip = provider == "apns";
                    let answer = app
                        .request(json!({"type": "push.register", "id": id, "provider": provider, "token": device, "app_id": "com.example.softphone", "voip": voip}))
                        .await;
                    to_test.send(answer).unwrap();
                }
                // An app registers its own user's device only.
                let answer = app
                    .request(json!({"type": "push.register", "id": 7, "provider": "webhook", "token": "phone-2", "user": "bob"}))
                    .await;
                to_test.send(answer).unwrap();
                app.close().await;
                let mut app = App::in_edge_lab(&fingerprint, &bob).await;
                let answer = app
                    .request(json!({"type": "push.register", "id": 1, "provider": "webhook", "token": "phone-1"}))
                    .await;
                to_test.send(answer).unwrap();
                app.close().await;
                // Woken: two devices connect, both are offered the call, the first takes
                // it and the other is told.
                woken.recv().unwrap();
                let mut app = App::in_edge_lab(&fingerprint, &token).await;
                let mut other = App::in_edge_lab(&fingerprint, &token).await;
                let incoming = app.next_within(Duration::from_secs(5)).await;
                to_test.send(incoming.clone()).unwrap();
                to_test.send(other.next_within(Duration::from_secs(5)).await).unwrap();
                let media = app.answer(&incoming).await;
                to_test.send(other.next_within(Duration::from_secs(5)).await).unwrap();
                other.close().await;
                let echoed = talk(&media, 0, 100).await.echoed;
                to_test.send(json!(echoed)).unwrap();
                // Hung up by the controller.
                let ended = app.next_within(Duration::from_secs(10)).await;
                app.close().await;
                to_test.send(ended).unwrap();
            })
        });
        let refused = within(&mut from_app).await;
        assert_eq!(refused["code"], "bad_request", "{refused}");
        assert!(refused["message"].as_str().unwrap().contains("provider"), "{refused}");
        let refused = within(&mut from_app).await;
        assert_eq!(refused["code"], "bad_request", "{refused}");
        assert!(refused["message"].as_str().unwrap().contains("token: 5000 bytes"), "{refused}");
        assert_eq!(within(&mut from_app).await["devices"], 1);
        assert_eq!(within(&mut from_app).await["devices"], 2);
        assert_eq!(within(&mut from_app).await["devices"], 3);
        assert_eq!(within(&mut from_app).await["devices"], 4);
        let refused = within(&mut from_app).await;
        assert_eq!(refused["code"], "bad_request", "{refused}");
        assert!(refused["message"].as_str().unwrap().contains("unknown field `user`"), "{refused}");
        let refused = within(&mut from_app).await;
        assert_eq!(refused["code"], "bad_request", "{refused}");
        assert!(refused["message"].as_str().unwrap().contains("token: registered for another user"), "{refused}");
        let devices = request(&mut controller, json!({"type": "push.devices", "id": 2, "user": "alice"})).await;
        assert_eq!(devices["devices"], json!({"apns": 1, "fcm": 1, "webhook": 2}), "{devices}");
        let devices = request(&mut controller, json!({"type": "push.devices", "id": 7, "user": "bob"})).await;
        assert_eq!(devices["devices"], json!({}), "{devices}");
        no_app_connected(&relayd).await;

        let created = request(&mut controller, json!({"type": "call.create", "id": 3, "user": "alice", "sdp": relay_tests::pbx::SDP, "caller": "Reception <+49 30 1234>"})).await;
        assert_eq!(created["type"], "result", "{created}\n{}", relayd.log());
        let call = created["call"].clone();
        let ringing = next_event(&mut controller, "call.state", &relayd).await;
        assert_eq!(
            (&ringing["state"], &ringing["via"], &ringing["devices"], &ringing["call"]),
            (&json!("ringing"), &json!("push"), &json!(4), &call),
            "{ringing}"
        );
        let mut received: Vec<Received> = Vec::new();
        for _ in 0..4 {
            received.push(within(&mut pushes).await);
        }
        received.sort_by_key(|push| push.body["device"].as_str().unwrap_or_default().to_owned());
        for push in &received {
            assert!(push.signed, "signed with the shared secret, FCM's bearer token or an APNs provider token: {}", push.body);
            // FCM's data values are strings.
            assert_eq!(push.body["call"].to_string().trim_matches('"'), call.to_string(), "{}", push.body);
            assert_eq!((&push.body["tenant"], &push.body["user"]), (&json!("acme"), &json!("alice")));
            assert_eq!(push.body["caller"], "Reception <+49 30 1234>");
            assert!(push.body.get("sdp").is_none(), "no SDP in a push: {}", push.body);
        }
        let devices: Vec<&Value> = received.iter().map(|push| &push.body["device"]).collect();
        assert_eq!(devices, [&json!(APNS_DEVICE), &json!("phone-1"), &json!("phone-fcm"), &json!("phone-gone")]);
        assert_eq!(received[1].body["app_id"], "com.example.softphone");
        assert_eq!(received[0].body["aps"], json!({}), "a VoIP push: {}", received[0].body);
        to_app.send(()).unwrap();
        let incoming = within(&mut from_app).await;
        assert_eq!((&incoming["event"], &incoming["call"]), (&json!("call.incoming"), &call), "{incoming}");
        assert_eq!(incoming["caller"], "Reception <+49 30 1234>", "{incoming}");
        let offered_too = within(&mut from_app).await;
        assert_eq!(
            (&offered_too["event"], &offered_too["call"]),
            (&json!("call.incoming"), &call),
            "the second device is offered the call too: {offered_too}"
        );
        let told = within(&mut from_app).await;
        assert_eq!(
            (&told["event"], &told["call"], &told["reason"]),
            (&json!("call.ended"), &call, &json!("answered-elsewhere")),
            "{told}"
        );
        let connected = next_event(&mut controller, "call.state", &relayd).await;
        let connected = if connected["state"] == "checking" {
            next_event(&mut controller, "call.state", &relayd).await
        } else {
            connected
        };
        assert_eq!(connected["state"], "connected", "{connected}\n{}", relayd.log());
        let echoed = within(&mut from_app).await;
        assert!(echoed.as_u64().unwrap() >= 95, "echoed {echoed}\n{}", relayd.log());
        let flows = relayd.ctl_json(&["flow", "list"]);
        assert_eq!(flows["flows"].as_array().unwrap().len(), 2, "{flows}");
        let hung_up = request(&mut controller, json!({"type": "call.hangup", "id": 4, "call": call})).await;
        assert_eq!(hung_up["type"], "result", "{hung_up}");
        let ended = within(&mut from_app).await;
        assert_eq!(ended["event"], "call.ended", "{ended}");
        tokio::task::spawn_blocking(move || app.join().unwrap()).await.unwrap();

        // The provider said the second device is gone: its registration went.
        let devices = request(&mut controller, json!({"type": "push.devices", "id": 5, "user": "alice"})).await;
        assert_eq!(devices["devices"], json!({"apns": 1, "fcm": 1, "webhook": 1}), "{devices}");

        // Nobody takes the next call: it rings, then ends no-answer.
        no_app_connected(&relayd).await;
        let created = request(&mut controller, json!({"type": "call.create", "id": 6, "user": "alice", "sdp": relay_tests::pbx::SDP})).await;
        assert_eq!(created["type"], "result", "{created}");
        let started = std::time::Instant::now();
        let ringing = next_event(&mut controller, "call.state", &relayd).await;
        assert_eq!((&ringing["state"], &ringing["devices"]), (&json!("ringing"), &json!(3)), "{ringing}");
        let mut devices = Vec::new();
        for _ in 0..3 {
            devices.push(within(&mut pushes).await.body["device"].clone());
        }
        devices.sort_by_key(|device| device.to_string());
        assert_eq!(devices, [json!(APNS_DEVICE), json!("phone-1"), json!("phone-fcm")]);
        let ended = next_event(&mut controller, "call.ended", &relayd).await;
        assert_eq!((&ended["reason"], &ended["call"]), (&json!("no-answer"), &created["call"]), "{ended}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(RING_SECS - 1) && waited < Duration::from_secs(RING_SECS + 3),
            "ended after {waited:?}"
        );
        assert_eq!(relayd.ctl_json(&["flow", "list"])["flows"], json!([]));
        let stats = relayd.ctl_json(&["push", "stats"]);
        let count = |provider: &str, outcome: &str| {
            stats["pushes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|push| push["provider"] == provider && push["outcome"] == outcome)
                .map(|push| push["count"].clone())
        };
        assert_eq!(stats["devices"], 3, "{stats}");
        assert_eq!(
            (count("webhook", "sent"), count("webhook", "dead-token"), count("webhook", "failed")),
            (Some(json!(2)), Some(json!(1)), Some(json!(0))),
            "{stats}"
        );
        for provider in ["fcm", "apns"] {
            assert_eq!((count(provider, "sent"), count(provider, "failed")), (Some(json!(2)), Some(json!(0))), "{provider}: {stats}");
        }
        // Device tokens and access tokens are not logged.
        for secret in ["phone-1", "phone-fcm", APNS_DEVICE, FCM_ACCESS_TOKEN] {
            assert!(!relayd.log().contains(secret), "{secret}:\n{}", relayd.log());
        }
        echo.abort();
    });
}
