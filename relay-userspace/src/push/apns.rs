//! APNs (`[push.apns]`): `POST {base_url}/3/device/{token}` over HTTP/2 with a provider
//! token: a JWT signed ES256 with the team's key (the `.p8` file), `kid` the key id, `iss`
//! the team id, made again every 50 minutes (Apple takes one between 20 and 60 minutes
//! old). A VoIP push (`voip` in the registration) goes to `<topic>.voip` with
//! `apns-push-type: voip`, else an alert; `apns-priority: 10`, and `apns-expiration` at
//! the end of the ring time (a late push is useless).

use std::time::{Duration, Instant};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
use serde_json::{Value, json};

use super::{
    client::{Answer, Endpoint, HttpsClient},
    config::ApnsConfig,
};

/// A provider token is made again after this long.
const TOKEN_AGE: Duration = Duration::from_secs(50 * 60);

pub struct Apns {
    key: EcdsaKeyPair,
    key_id: String,
    team_id: String,
    base_url: String,
    /// The bundle id of registrations that give none.
    topic: String,
    token: std::sync::Mutex<Option<(String, Instant)>>,
    /// Provider tokens made since start.
    made: std::sync::atomic::AtomicU64,
}

/// What a push to an app says.
pub struct Notification<'a> {
    pub device: &'a str,
    /// The app's bundle id (its registration's `app_id`), None: `push.apns.topic`.
    pub topic: Option<&'a str>,
    pub voip: bool,
    pub fields: Value,
    /// The title of an alert.
    pub caller: Option<&'a str>,
    /// Unix time after which APNs drops it.
    pub expiration: u64,
}

fn ten_characters(value: &str) -> bool {
    value.len() == 10 && value.bytes().all(|b| b.is_ascii_alphanumeric())
}

impl Apns {
    /// From `[push.apns]`; an error names the key and why.
    pub fn load(config: &ApnsConfig) -> Result<Apns, (&'static str, String)> {
        let pem = std::fs::read(&config.key_file)
            .map_err(|err| ("push.apns.key_file", format!("cannot read it: {err}")))?;
        let PrivateKeyDer::Pkcs8(der) = PrivateKeyDer::from_pem_slice(&pem)
            .map_err(|err| ("push.apns.key_file", format!("not a PEM key: {err}")))?
        else {
            return Err(("push.apns.key_file", "not a PKCS#8 key (.p8)".into()));
        };
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            der.secret_pkcs8_der(),
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|err| ("push.apns.key_file", format!("not a P-256 key: {err}")))?;
        if !ten_characters(&config.key_id) {
            return Err(("push.apns.key_id", "the key's 10-character id".into()));
        }
        if !ten_characters(&config.team_id) {
            return Err(("push.apns.team_id", "the 10-character team id".into()));
        }
        Endpoint::parse(&config.base_url).map_err(|err| ("push.apns.base_url", err))?;
        Ok(Apns {
            key,
            key_id: config.key_id.clone(),
            team_id: config.team_id.clone(),
            base_url: config.base_url.trim_end_matches('/').to_owned(),
            topic: config.topic.clone(),
            token: std::sync::Mutex::new(None),
            made: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The provider token, made again when it is 50 minutes old.
    fn provider_token(&self, now: u64) -> Result<String, String> {
        let mut kept = self.token.lock().expect("apns token");
        if let Some((token, made)) = kept.as_ref()
            && made.elapsed() < TOKEN_AGE
        {
            return Ok(token.clone());
        }
        let header = json!({"alg": "ES256", "kid": self.key_id});
        let claims = json!({"iss": self.team_id, "iat": now});
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&ring::rand::SystemRandom::new(), signed.as_bytes())
            .map_err(|_| "signing the provider token failed".to_owned())?;
        let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()));
        *kept = Some((token.clone(), Instant::now()));
        self.made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(token)
    }

    pub async fn send(
        &self,
        client: &HttpsClient,
        notification: Notification<'_>,
        now: u64,
    ) -> Result<Answer, String> {
        let token = self.provider_token(now)?;
        let bundle = notification.topic.unwrap_or(&self.topic);
        let (topic, push_type) = if notification.voip {
            (format!("{bundle}.voip"), "voip")
        } else {
            (bundle.to_owned(), "alert")
        };
        let mut payload = notification.fields;
        payload["aps"] = if notification.voip {
            json!({})
        } else {
            json!({
                "alert": {"title": "Incoming call", "body": notification.caller.unwrap_or("Incoming call")},
                "sound": "default",
            })
        };
        let endpoint = Endpoint::parse(&format!(
            "{}/3/device/{}",
            self.base_url, notification.device
        ))?;
        let answer = client
            .post(
                &endpoint,
                "application/json",
                &[
                    ("authorization", format!("bearer {token}")),
                    ("apns-topic", topic),
                    ("apns-push-type", push_type.to_owned()),
                    ("apns-priority", "10".to_owned()),
                    ("apns-expiration", notification.expiration.to_string()),
                ],
                payload.to_string().into_bytes(),
            )
            .await?;
        // A provider token APNs no longer takes is made again for the next try.
        if answer.status.as_u16() == 403 {
            *self.token.lock().expect("apns token") = None;
        }
        Ok(answer)
    }
}

/// Whether an APNs error answer says the device token is of no use: 410 (the app is gone
/// from the device) or 400 `BadDeviceToken`.
pub fn dead_token(answer: &Answer) -> bool {
    match answer.status.as_u16() {
        410 => true,
        400 => serde_json::from_slice::<Value>(&answer.body)
            .is_ok_and(|body| body["reason"] == "BadDeviceToken"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::{Arc, Mutex},
        time::{SystemTime, UNIX_EPOCH},
    };

    use http_body_util::{BodyExt, Full};
    use hyper::{Request, Response, body::Bytes};
    use ring::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

    use super::*;
    use crate::push::{Outcome, Provider, config::PushConfig, fake};

    const LIVE: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    const GONE: &str = "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";

    /// What the fake APNs saw of each request: the device, and what was wrong (nothing:
    /// empty).
    type Seen = Arc<Mutex<Vec<(String, Vec<String>)>>>;

    async fn answer(
        request: Request<hyper::body::Incoming>,
        public_key: Arc<Vec<u8>>,
        seen: Seen,
    ) -> Response<Full<Bytes>> {
        let mut problems = Vec::new();
        if request.version() != hyper::Version::HTTP_2 {
            problems.push("not HTTP/2".to_owned());
        }
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        for (name, want) in [
            ("apns-topic", "com.example.softphone.voip"),
            ("apns-push-type", "voip"),
            ("apns-priority", "10"),
        ] {
            if header(name) != want {
                problems.push(format!("{name}: {:?}", header(name)));
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        if !header("apns-expiration")
            .parse::<u64>()
            .is_ok_and(|at| at > now && at <= now + 31)
        {
            problems.push(format!("apns-expiration {:?}", header("apns-expiration")));
        }
        let jwt = header("authorization")
            .strip_prefix("bearer ")
            .unwrap_or_default()
            .to_owned();
        let parts: Vec<&str> = jwt.split('.').collect();
        if let [head, claims, signature] = parts[..] {
            let decode = |part: &str| -> Value {
                serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap_or_default())
                    .unwrap_or_default()
            };
            if decode(head) != json!({"alg": "ES256", "kid": "KEYID12345"}) {
                problems.push(format!("header {}", decode(head)));
            }
            let claims_json = decode(claims);
            if claims_json["iss"] != "TEAMID1234"
                || claims_json["iat"]
                    .as_u64()
                    .is_none_or(|iat| iat.abs_diff(now) >= 60)
            {
                problems.push(format!("claims {claims_json}"));
            }
            let signature = URL_SAFE_NO_PAD.decode(signature).unwrap_or_default();
            if UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public_key.as_slice())
                .verify(format!("{head}.{claims}").as_bytes(), &signature)
                .is_err()
            {
                problems.push("signature".to_owned());
            }
        } else {
            problems.push(format!("authorization {jwt:?}"));
        }
        let device = request
            .uri()
            .path()
            .strip_prefix("/3/device/")
            .unwrap_or_default()
            .to_owned();
        let body: Value =
            serde_json::from_slice(&request.into_body().collect().await.unwrap().to_bytes())
                .unwrap_or_default();
        if body["aps"] != json!({}) || body["call"] != 9 || body.get("sdp").is_some() {
            problems.push(format!("payload {body}"));
        }
        seen.lock().unwrap().push((device.clone(), problems));
        if device == GONE {
            fake::json(
                410,
                json!({"reason": "Unregistered", "timestamp": now * 1000}),
            )
        } else {
            fake::json(200, json!({}))
        }
    }

    /// Two VoIP devices: APNs gets a push for each over HTTP/2 with one provider token
    /// (ES256 with the team's key), the right topic and headers; the one APNs says is
    /// unregistered is dropped; a token that is not hexadecimal is refused.
    #[tokio::test]
    async fn voip_pushes_go_to_apns_with_a_provider_token() {
        let key = rcgen::KeyPair::generate().unwrap();
        let public_key = Arc::new(key.public_key_raw().to_vec());
        let seen: Seen = Arc::default();
        let recorded = seen.clone();
        let fake = fake::serve(move |request, _: SocketAddr| {
            answer(request, public_key.clone(), recorded.clone())
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("AuthKey_KEYID12345.p8");
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let config = PushConfig {
            enabled: true,
            ring_secs: 30,
            ca_file: fake.ca_file.display().to_string(),
            apns: crate::push::config::ApnsConfig {
                key_file: key_file.display().to_string(),
                key_id: "KEYID12345".into(),
                team_id: "TEAMID1234".into(),
                topic: "com.example.other".into(),
                base_url: format!("https://{}", fake.address),
            },
            ..PushConfig::default()
        };
        let push = fake::push_from(&config);
        for device in [LIVE, GONE] {
            push.register(
                "acme",
                "alice",
                "apns",
                device,
                Some("com.example.softphone"),
                true,
            )
            .unwrap();
        }
        assert_eq!(
            push.register("acme", "alice", "apns", "not/hex", None, true)
                .unwrap_err()
                .field,
            "token"
        );
        let woken = push.wake("acme", "alice", 9, Some("Reception")).unwrap();
        let word = tokio::time::timeout(Duration::from_secs(10), woken.undelivered)
            .await
            .unwrap();
        assert!(word.is_err(), "one was delivered: {word:?}");
        // The second push may end after the word about the first: both counted, and the
        // dead device gone.
        for _ in 0..100 {
            if push.registered() == 1 && push.outcomes().values().sum::<u64>() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let outcomes = push.outcomes();
        assert_eq!(
            outcomes.get(&(Provider::Apns, Outcome::Sent)),
            Some(&1),
            "{outcomes:?} {:?}",
            seen.lock().unwrap()
        );
        assert_eq!(
            outcomes.get(&(Provider::Apns, Outcome::DeadToken)),
            Some(&1),
            "{outcomes:?}"
        );
        assert_eq!(
            push.devices("acme", "alice"),
            std::collections::BTreeMap::from([("apns", 1)])
        );
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        assert_eq!(
            seen,
            [
                (LIVE.to_owned(), Vec::<String>::new()),
                (GONE.to_owned(), Vec::new())
            ]
        );
        // One provider token for both.
        let made = &push.apns.as_ref().unwrap().made;
        assert_eq!(made.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn bad_apns_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("key.p8");
        std::fs::write(
            &key_file,
            rcgen::KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        let config = |key_id: &str, team_id: &str| ApnsConfig {
            key_file: key_file.display().to_string(),
            key_id: key_id.into(),
            team_id: team_id.into(),
            ..ApnsConfig::default()
        };
        assert!(Apns::load(&config("KEYID12345", "TEAMID1234")).is_ok());
        assert_eq!(
            Apns::load(&config("short", "TEAMID1234")).err().unwrap().0,
            "push.apns.key_id"
        );
        assert_eq!(
            Apns::load(&config("KEYID12345", "")).err().unwrap().0,
            "push.apns.team_id"
        );
        std::fs::write(&key_file, "not a key").unwrap();
        assert_eq!(
            Apns::load(&config("KEYID12345", "TEAMID1234"))
                .err()
                .unwrap()
                .0,
            "push.apns.key_file"
        );
    }
}
