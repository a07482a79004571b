//! FCM HTTP v1 (`[push.fcm]`): `POST {base_url}/v1/projects/{project_id}/messages:send`
//! with an OAuth2 access token, which the relay gets from the service account's
//! `token_uri` with a JWT it signs with the account's key (RS256, the JWT bearer grant of
//! RFC 7523) and keeps until a minute before it expires. The push is a high-priority data
//! message: every field a string, as FCM wants.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::client::{Answer, Endpoint, HttpsClient};

/// What FCM's access tokens are for.
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// A token is taken again this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);

/// The fields of a service-account file the relay uses.
#[derive(Deserialize)]
struct ServiceAccount {
    project_id: String,
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    token_uri: String,
}

pub struct Fcm {
    email: String,
    key_id: Option<String>,
    key: RsaKeyPair,
    token_endpoint: Endpoint,
    audience: String,
    send: Endpoint,
    /// The access token and when it is to be taken again; the lock makes concurrent
    /// pushes wait for one token request.
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
    /// Access tokens asked for since start.
    token_requests: Mutex<u64>,
}

impl Fcm {
    /// From the service-account file; an error says what in it is wrong.
    pub fn load(service_account: &str, base_url: &str) -> Result<Fcm, String> {
        let text = std::fs::read_to_string(service_account)
            .map_err(|err| format!("cannot read it: {err}"))?;
        let account: ServiceAccount = serde_json::from_str(&text)
            .map_err(|err| format!("not a service-account file: {err}"))?;
        let der = PrivateKeyDer::from_pem_slice(account.private_key.as_bytes())
            .map_err(|err| format!("private_key: {err}"))?;
        let PrivateKeyDer::Pkcs8(pkcs8) = der else {
            return Err("private_key: not a PKCS#8 key".into());
        };
        let key = RsaKeyPair::from_pkcs8(pkcs8.secret_pkcs8_der())
            .map_err(|err| format!("private_key: not an RSA key ring takes: {err}"))?;
        if account.project_id.is_empty()
            || !account
                .project_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(format!(
                "project_id {:?}: letters, digits and -",
                account.project_id
            ));
        }
        let token_endpoint =
            Endpoint::parse(&account.token_uri).map_err(|err| format!("token_uri: {err}"))?;
        let send = Endpoint::parse(&format!(
            "{}/v1/projects/{}/messages:send",
            base_url.trim_end_matches('/'),
            account.project_id
        ))
        .map_err(|err| format!("push.fcm.base_url: {err}"))?;
        Ok(Fcm {
            email: account.client_email,
            key_id: account.private_key_id,
            key,
            token_endpoint,
            audience: account.token_uri,
            send,
            token: tokio::sync::Mutex::new(None),
            token_requests: Mutex::new(0),
        })
    }

    /// The signed JWT the token endpoint takes (RFC 7523), issued at `now` (Unix time).
    fn assertion(&self, now: u64) -> Result<String, String> {
        let mut header = json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = &self.key_id {
            header["kid"] = kid.clone().into();
        }
        let claims = json!({
            "iss": self.email,
            "scope": SCOPE,
            "aud": self.audience,
            "iat": now,
            "exp": now + 3600,
        });
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut signature = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                signed.as_bytes(),
                &mut signature,
            )
            .map_err(|_| "signing the JWT failed".to_owned())?;
        Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }

    /// A valid access token: the kept one, or a new one from the token endpoint.
    async fn access_token(&self, client: &HttpsClient, now: u64) -> Result<String, String> {
        let mut kept = self.token.lock().await;
        if let Some((token, until)) = kept.as_ref()
            && Instant::now() < *until
        {
            return Ok(token.clone());
        }
        *self.token_requests.lock().expect("fcm token requests") += 1;
        let form = format!(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion={}",
            self.assertion(now)?
        );
        let answer = client
            .post(
                &self.token_endpoint,
                "application/x-www-form-urlencoded",
                &[],
                form.into_bytes(),
            )
            .await
            .map_err(|err| format!("token endpoint: {err}"))?;
        if !answer.status.is_success() {
            return Err(format!(
                "token endpoint: HTTP {} (check the service account and its key)",
                answer.status
            ));
        }
        let granted: Value = serde_json::from_slice(&answer.body)
            .map_err(|err| format!("token endpoint: not JSON: {err}"))?;
        let token = granted["access_token"]
            .as_str()
            .ok_or("token endpoint: no access_token in its answer")?
            .to_owned();
        let lifetime = Duration::from_secs(granted["expires_in"].as_u64().unwrap_or(3600));
        *kept = Some((
            token.clone(),
            Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN),
        ));
        Ok(token)
    }

    /// How many access tokens were asked for since start.
    pub fn token_requests(&self) -> u64 {
        *self.token_requests.lock().expect("fcm token requests")
    }

    /// The push to `device` with `data` (string values); a 401 drops the kept token, so
    /// the next try gets a new one.
    pub async fn send(
        &self,
        client: &HttpsClient,
        device: &str,
        data: Map<String, Value>,
        now: u64,
    ) -> Result<Answer, String> {
        let token = self.access_token(client, now).await?;
        let body = json!({
            "message": {
                "token": device,
                "data": data,
                "android": {"priority": "high", "ttl": "30s"},
            }
        });
        let answer = client
            .post(
                &self.send,
                "application/json",
                &[("authorization", format!("Bearer {token}"))],
                body.to_string().into_bytes(),
            )
            .await?;
        if answer.status.as_u16() == 401 {
            *self.token.lock().await = None;
        }
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, sync::Arc};

    use http_body_util::{BodyExt, Full};
    use hyper::{Request, Response, body::Bytes};
    use ring::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};

    use super::*;
    use crate::push::{Outcome, Provider, config::PushConfig, fake};

    const ACCOUNT: &str = include_str!("../../../fixtures/push/fcm-test-service-account.json");

    /// What the fake Google saw: each request's path, whether it came over HTTP/2, and
    /// what was wrong with it (nothing: empty).
    #[derive(Debug, Clone)]
    struct Seen {
        path: String,
        /// The device a push was for.
        device: Option<String>,
        h2: bool,
        problems: Vec<String>,
    }

    fn public_key() -> Vec<u8> {
        let account: ServiceAccount = serde_json::from_str(ACCOUNT).unwrap();
        let PrivateKeyDer::Pkcs8(der) =
            PrivateKeyDer::from_pem_slice(account.private_key.as_bytes()).unwrap()
        else {
            panic!("PKCS#8")
        };
        let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap();
        key.public().as_ref().to_vec()
    }

    /// The token endpoint's checks of the JWT: RS256 with the account's key, its kid,
    /// issuer, scope, audience and an hour's lifetime.
    fn check_assertion(form: &str, audience: &str, problems: &mut Vec<String>) {
        let Some(jwt) = form
            .split('&')
            .find_map(|pair| pair.strip_prefix("assertion="))
        else {
            return problems.push("no assertion".into());
        };
        if !form.contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer") {
            problems.push("grant_type".into());
        }
        let parts: Vec<&str> = jwt.split('.').collect();
        let [header, claims, signature] = parts[..] else {
            return problems.push("not three parts".into());
        };
        let signature = URL_SAFE_NO_PAD.decode(signature).unwrap_or_default();
        let public = public_key();
        if UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &public)
            .verify(format!("{header}.{claims}").as_bytes(), &signature)
            .is_err()
        {
            problems.push("signature".into());
        }
        let decode = |part: &str| -> Value {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap_or_default())
                .unwrap_or_default()
        };
        let (header, claims) = (decode(header), decode(claims));
        if header != json!({"alg": "RS256", "typ": "JWT", "kid": "test-key-1"}) {
            problems.push(format!("header {header}"));
        }
        if claims["iss"] != "relay-push@relay-test-project.iam.gserviceaccount.com"
            || claims["scope"] != SCOPE
            || claims["aud"] != audience
            || claims["exp"].as_u64() != claims["iat"].as_u64().map(|iat| iat + 3600)
        {
            problems.push(format!("claims {claims}"));
        }
    }

    async fn answer(
        request: Request<hyper::body::Incoming>,
        address: SocketAddr,
        seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    ) -> Response<Full<Bytes>> {
        let audience = format!("https://{address}/token");
        let h2 = request.version() == hyper::Version::HTTP_2;
        let path = request.uri().path().to_owned();
        let authorization = request
            .headers()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let mut problems = Vec::new();
        let mut device = None;
        let mut retry_after = None;
        let (status, reply) = match path.as_str() {
            "/token" => {
                check_assertion(&String::from_utf8_lossy(&body), &audience, &mut problems);
                (
                    200,
                    json!({"access_token": "access-1", "expires_in": 3600, "token_type": "Bearer"}),
                )
            }
            "/v1/projects/relay-test-project/messages:send" => {
                if authorization != "Bearer access-1" {
                    problems.push(format!("authorization {authorization:?}"));
                }
                let message: Value = serde_json::from_slice(&body).unwrap_or_default();
                let message = &message["message"];
                let data = message["data"].as_object().cloned().unwrap_or_default();
                if message["android"]["priority"] != "high"
                    || data.values().any(|value| !value.is_string())
                    || data.get("call") != Some(&json!("7"))
                    || data.get("caller") != Some(&json!("Reception"))
                    || data.contains_key("sdp")
                {
                    problems.push(format!("message {message}"));
                }
                let token = message["token"].as_str().unwrap_or_default().to_owned();
                let tries = seen
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|seen| seen.device.as_deref() == Some(token.as_str()))
                    .count();
                device = Some(token.clone());
                match token.as_str() {
                    "device-gone" => (
                        404,
                        json!({"error": {"code": 404, "status": "NOT_FOUND", "details": [{"errorCode": "UNREGISTERED"}]}}),
                    ),
                    // Busy once, then fine: tried again after its Retry-After.
                    "device-busy" if tries == 0 => {
                        retry_after = Some("1");
                        (
                            429,
                            json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED"}}),
                        )
                    }
                    "device-down" => (
                        503,
                        json!({"error": {"code": 503, "status": "UNAVAILABLE"}}),
                    ),
                    _ => (
                        200,
                        json!({"name": "projects/relay-test-project/messages/1"}),
                    ),
                }
            }
            _ => (404, json!({})),
        };
        seen.lock().unwrap().push(Seen {
            path,
            device,
            h2,
            problems,
        });
        let mut response = fake::json(status, reply);
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", seconds.parse().unwrap());
        }
        response
    }

    /// Four devices of a user: FCM gets a push for each over HTTP/2 with one access token
    /// (asked for once, with a JWT signed by the account's key); the one FCM says is
    /// unregistered is dropped, the busy one (429) is tried again after its Retry-After
    /// and delivered, the one behind a 503 is tried three times and counted failed.
    #[tokio::test]
    async fn pushes_go_to_fcm_with_a_token_from_a_signed_jwt() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorded = seen.clone();
        let fake =
            fake::serve(move |request, address| answer(request, address, recorded.clone())).await;
        let address = fake.address;
        let dir = tempfile::tempdir().unwrap();
        let account = dir.path().join("fcm.json");
        std::fs::write(
            &account,
            ACCOUNT.replace(
                "https://127.0.0.1:18445/token",
                &format!("https://{address}/token"),
            ),
        )
        .unwrap();
        let config = PushConfig {
            enabled: true,
            ca_file: fake.ca_file.display().to_string(),
            fcm: crate::push::config::FcmConfig {
                service_account: account.display().to_string(),
                base_url: format!("https://{address}"),
            },
            ..PushConfig::default()
        };
        let push = fake::push_from(&config);
        assert_eq!(
            push.register("acme", "alice", "fcm", "device-live", None, false),
            Ok(1)
        );
        for (n, device) in ["device-gone", "device-busy", "device-down"]
            .into_iter()
            .enumerate()
        {
            assert_eq!(
                push.register("acme", "alice", "fcm", device, None, false),
                Ok(n + 2)
            );
        }
        assert_eq!(
            push.register("acme", "alice", "webhook", "x", None, false)
                .unwrap_err()
                .field,
            "provider"
        );
        let started = std::time::Instant::now();
        let woken = push.wake("acme", "alice", 7, Some("Reception")).unwrap();
        assert_eq!(woken.devices, 4);
        // One was delivered: no word of failure, the sender goes.
        let word = tokio::time::timeout(Duration::from_secs(10), woken.undelivered)
            .await
            .unwrap();
        assert!(word.is_err(), "{word:?}: {:?}", seen.lock().unwrap());
        // The other pushes end after the word about the first: all counted, and the dead
        // device gone. The one behind a 503 waits 1 s and 2 s between its tries.
        for _ in 0..300 {
            if push.outcomes().values().sum::<u64>() == 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let outcomes = push.outcomes();
        assert_eq!(outcomes.get(&(Provider::Fcm, Outcome::Sent)), Some(&2));
        assert_eq!(outcomes.get(&(Provider::Fcm, Outcome::DeadToken)), Some(&1));
        assert_eq!(outcomes.get(&(Provider::Fcm, Outcome::Failed)), Some(&1));
        assert_eq!(
            push.devices("acme", "alice"),
            std::collections::BTreeMap::from([("fcm", 3)])
        );
        assert_eq!(push.fcm.as_ref().unwrap().token_requests(), 1);
        let seen = seen.lock().unwrap().clone();
        let tries = |device: &str| {
            seen.iter()
                .filter(|seen| seen.device.as_deref() == Some(device))
                .count()
        };
        assert_eq!(seen[0].path, "/token");
        assert_eq!(
            ["device-live", "device-gone", "device-busy", "device-down"].map(tries),
            [1, 1, 2, 3]
        );
        assert_eq!(seen.len(), 1 + 7);
        for request in &seen {
            assert!(request.h2, "{request:?}");
            assert_eq!(request.problems, Vec::<String>::new(), "{request:?}");
        }
    }
}
