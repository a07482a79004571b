//! Waking a sleeping app for an incoming call (`[push]`, docs/push.md). An app registers
//! its push target over signalling (`push.register`); a call to its user while no app of
//! theirs is connected sends a push to each registered device, and the call waits
//! `push.ring_secs` for one to connect. Registrations are kept in the state store; a
//! provider that says a token is dead (404, 410) removes it. Sends never block signalling:
//! each push is a task of its own, retried on 429 and 5xx after `Retry-After` or a backoff.
//!
//! Providers: `webhook` (the operator's own gateway, a POST signed with HMAC-SHA256),
//! `fcm` (FCM HTTP v1 with a service account) and `apns` (APNs with a provider token).

pub mod apns;
pub mod client;
pub mod config;
#[cfg(test)]
mod fake;
pub mod fcm;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use self::{
    client::{Endpoint, HttpsClient},
    config::PushConfig,
};
use crate::{
    calls::Woken,
    state::{PushRecord, StateStore},
};

/// The longest device token taken (FCM's are about 160 characters, APNs' 64).
pub const MAX_TOKEN: usize = 4096;
/// Devices one user may register.
pub const MAX_DEVICES: usize = 10;
/// Tries per push (the first and two more).
const TRIES: u32 = 3;

/// Where a push goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Provider {
    Webhook,
    Fcm,
    Apns,
}

impl Provider {
    pub const ALL: [Provider; 3] = [Provider::Webhook, Provider::Fcm, Provider::Apns];

    pub fn name(self) -> &'static str {
        match self {
            Provider::Webhook => "webhook",
            Provider::Fcm => "fcm",
            Provider::Apns => "apns",
        }
    }
}

/// How a push ended, for the metrics and `push.stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    Sent,
    /// The provider says the token is dead: the registration is removed.
    DeadToken,
    /// Refused for good (4xx other than 404, 410, 429): a configuration problem.
    Refused,
    /// Not delivered after the last try (timeouts, 429, 5xx, unreachable).
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Sent,
        Outcome::DeadToken,
        Outcome::Refused,
        Outcome::Failed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::DeadToken => "dead-token",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// A registration refused: the field and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct RegisterError {
    pub field: &'static str,
    pub reason: String,
}

fn refuse(field: &'static str, reason: impl Into<String>) -> RegisterError {
    RegisterError {
        field,
        reason: reason.into(),
    }
}

struct Webhook {
    endpoint: Endpoint,
    key: ring::hmac::Key,
}

type User = (String, String);

pub struct Push {
    webhook: Option<Webhook>,
    fcm: Option<fcm::Fcm>,
    apns: Option<apns::Apns>,
    client: HttpsClient,
    ring: Duration,
    store: Option<Arc<StateStore>>,
    /// (tenant, user) -> their devices.
    devices: Mutex<HashMap<User, Vec<PushRecord>>>,
    outcomes: Mutex<BTreeMap<(Provider, Outcome), u64>>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_secs())
        .unwrap_or(0)
}

impl Push {
    /// The providers of a validated `[push]`, and the registrations the store kept.
    pub fn new(config: &PushConfig, store: Option<Arc<StateStore>>) -> anyhow::Result<Push> {
        let client = HttpsClient::new(&config.ca_file, Duration::from_secs(config.timeout_secs))
            .map_err(|err| anyhow::anyhow!("push: {err}"))?;
        let webhook = if config.webhook.url.is_empty() {
            None
        } else {
            Some(Webhook {
                endpoint: Endpoint::parse(&config.webhook.url)
                    .map_err(|err| anyhow::anyhow!("push.webhook.url: {err}"))?,
                key: ring::hmac::Key::new(
                    ring::hmac::HMAC_SHA256,
                    config.webhook.secret.as_bytes(),
                ),
            })
        };
        let fcm = if config.fcm.service_account.is_empty() {
            None
        } else {
            Some(
                fcm::Fcm::load(&config.fcm.service_account, &config.fcm.base_url).map_err(
                    |err| {
                        anyhow::anyhow!(
                            "push.fcm.service_account: {}: {err}",
                            config.fcm.service_account
                        )
                    },
                )?,
            )
        };
        let apns = if config.apns.key_file.is_empty() {
            None
        } else {
            Some(
                apns::Apns::load(&config.apns)
                    .map_err(|(key, reason)| anyhow::anyhow!("{key}: {reason}"))?,
            )
        };
        let mut devices: HashMap<User, Vec<PushRecord>> = HashMap::new();
        if let Some(store) = &store {
            match store.load_push() {
                Ok(records) => {
                    for record in records {
                        devices
                            .entry((record.tenant.clone(), record.user.clone()))
                            .or_default()
                            .push(record);
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "push: cannot read the registrations from the state store; apps register again when they next connect")
                }
            }
        }
        let registered: usize = devices.values().map(Vec::len).sum();
        tracing::info!(
            webhook = config.webhook.url.as_str(),
            fcm = fcm.is_some(),
            apns = apns.is_some(),
            registered,
            ring_secs = config.ring_secs,
            "push: ready"
        );
        Ok(Push {
            webhook,
            fcm,
            apns,
            client,
            ring: Duration::from_secs(config.ring_secs),
            store,
            devices: Mutex::new(devices),
            outcomes: Mutex::new(BTreeMap::new()),
        })
    }

    /// How long a pushed call waits for an app.
    pub fn ring_time(&self) -> Duration {
        self.ring
    }

    fn devices_mut(&self) -> std::sync::MutexGuard<'_, HashMap<User, Vec<PushRecord>>> {
        self.devices.lock().expect("push devices")
    }

    fn provider(&self, name: &str) -> Result<Provider, RegisterError> {
        match name {
            "webhook" if self.webhook.is_some() => Ok(Provider::Webhook),
            "fcm" if self.fcm.is_some() => Ok(Provider::Fcm),
            "apns" if self.apns.is_some() => Ok(Provider::Apns),
            "webhook" | "fcm" | "apns" => Err(refuse(
                "provider",
                format!("{name:?} is not configured on this relay"),
            )),
            other => Err(refuse(
                "provider",
                format!("{other:?} is not one of webhook, fcm, apns"),
            )),
        }
    }

    /// `push.register` from an app of `user`: its device's token (a registration with the
    /// same token is replaced). Returns how many devices the user has registered.
    pub fn register(
        &self,
        tenant: &str,
        user: &str,
        provider: &str,
        token: &str,
        app_id: Option<&str>,
        voip: bool,
    ) -> Result<usize, RegisterError> {
        let provider = self.provider(provider)?;
        if provider == Provider::Apns && !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(refuse("token", "an APNs device token is hexadecimal"));
        }
        if token.is_empty() || token.len() > MAX_TOKEN {
            return Err(refuse(
                "token",
                format!("{} bytes: must be 1 to {MAX_TOKEN}", token.len()),
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(refuse("token", "printable ASCII without spaces only"));
        }
        if let Some(app_id) = app_id
            && (app_id.is_empty()
                || app_id.len() > 255
                || !app_id.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(refuse("app_id", "1 to 255 printable ASCII characters"));
        }
        let count = {
            let mut devices = self.devices_mut();
            // A device wakes one user: a token another user of the tenant holds would
            // bring that user's calls (and callers) to this one.
            let held_by_another = devices.iter().any(|((holder_tenant, holder), list)| {
                holder_tenant == tenant
                    && holder != user
                    && list.iter().any(|record| record.token == token)
            });
            if held_by_another {
                return Err(refuse(
                    "token",
                    "registered for another user of this tenant; that user's app unregisters it first",
                ));
            }
            let list = devices
                .entry((tenant.to_owned(), user.to_owned()))
                .or_default();
            list.retain(|record| record.token != token);
            if list.len() >= MAX_DEVICES {
                return Err(refuse(
                    "token",
                    format!("user {user} has {MAX_DEVICES} devices registered already"),
                ));
            }
            list.push(PushRecord {
                tenant: tenant.to_owned(),
                user: user.to_owned(),
                provider: provider.name().to_owned(),
                token: token.to_owned(),
                app_id: app_id.map(str::to_owned),
                voip,
                registered: unix_now(),
            });
            list.len()
        };
        tracing::info!(
            tenant,
            user,
            provider = provider.name(),
            devices = count,
            "push: device registered"
        );
        self.save();
        Ok(count)
    }

    /// `push.unregister`: whether the token was registered for the user.
    pub fn unregister(&self, tenant: &str, user: &str, token: &str) -> bool {
        let removed = {
            let mut devices = self.devices_mut();
            let key = (tenant.to_owned(), user.to_owned());
            let Some(list) = devices.get_mut(&key) else {
                return false;
            };
            let before = list.len();
            list.retain(|record| record.token != token);
            let removed = list.len() != before;
            if list.is_empty() {
                devices.remove(&key);
            }
            removed
        };
        if removed {
            tracing::info!(tenant, user, "push: device unregistered");
            self.save();
        }
        removed
    }

    /// A user's registered devices by provider (never the tokens).
    pub fn devices(&self, tenant: &str, user: &str) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        if let Some(list) = self
            .devices_mut()
            .get(&(tenant.to_owned(), user.to_owned()))
        {
            for record in list {
                if let Some(provider) = provider_named(&record.provider) {
                    *counts.entry(provider.name()).or_default() += 1;
                }
            }
        }
        counts
    }

    /// Devices registered, all users.
    pub fn registered(&self) -> usize {
        self.devices_mut().values().map(Vec::len).sum()
    }

    /// Pushes by provider and outcome since start.
    pub fn outcomes(&self) -> BTreeMap<(Provider, Outcome), u64> {
        self.outcomes.lock().expect("push outcomes").clone()
    }

    fn save(&self) {
        let Some(store) = &self.store else { return };
        let records: Vec<PushRecord> = self.devices_mut().values().flatten().cloned().collect();
        if let Err(err) = store.save_push(&records) {
            tracing::warn!(%err, "push: cannot write the registrations to the state store; a restart would lose the newest");
        }
    }

    /// A call for `user` while none of their apps is connected: a push to each of their
    /// devices, sent by tasks of their own. None when the user has no device; else how
    /// many, and word when the last push ended if none was delivered.
    pub fn wake(
        self: &Arc<Self>,
        tenant: &str,
        user: &str,
        call: u64,
        caller: Option<&str>,
    ) -> Option<Woken> {
        let devices: Vec<PushRecord> = self
            .devices_mut()
            .get(&(tenant.to_owned(), user.to_owned()))
            .cloned()
            .unwrap_or_default();
        if devices.is_empty() {
            return None;
        }
        let (tx, undelivered) = tokio::sync::oneshot::channel();
        let pending = Arc::new(Pending {
            left: Mutex::new((devices.len(), Some(tx))),
        });
        for device in &devices {
            let (push, pending) = (self.clone(), pending.clone());
            let device = device.clone();
            let caller = caller.map(str::to_owned);
            tokio::spawn(async move {
                let result = push.send(device, call, caller).await;
                pending.done(result);
            });
        }
        Some(Woken {
            devices: devices.len(),
            undelivered,
        })
    }

    /// One push to one device, tried up to three times; Err: why it was not delivered.
    async fn send(
        &self,
        device: PushRecord,
        call: u64,
        caller: Option<String>,
    ) -> Result<(), String> {
        let Some(provider) = provider_named(&device.provider) else {
            return Err(format!("unknown provider {:?}", device.provider));
        };
        let body = serde_json::to_vec(&serde_json::json!({
            "type": "call.incoming",
            "tenant": device.tenant,
            "user": device.user,
            "call": call,
            "caller": caller,
            "device": device.token,
            "app_id": device.app_id,
            "sent": unix_now(),
        }))
        .expect("JSON");
        let mut outcome = Outcome::Failed;
        let mut why = String::new();
        for attempt in 1..=TRIES {
            let answer = match provider {
                Provider::Webhook => self.send_webhook(&body).await,
                Provider::Fcm => self.send_fcm(&device, call, caller.as_deref()).await,
                Provider::Apns => self.send_apns(&device, call, caller.as_deref()).await,
            };
            let retry_in = match answer {
                Ok(answer) if answer.status.is_success() => {
                    outcome = Outcome::Sent;
                    break;
                }
                Ok(answer)
                    if matches!(answer.status.as_u16(), 404 | 410)
                        || (provider == Provider::Apns && apns::dead_token(&answer)) =>
                {
                    outcome = Outcome::DeadToken;
                    break;
                }
                Ok(answer) if answer.status.as_u16() == 429 || answer.status.is_server_error() => {
                    why = format!("HTTP {}", answer.status);
                    answer.retry_after
                }
                Ok(answer) => {
                    outcome = Outcome::Refused;
                    why = format!("HTTP {}", answer.status);
                    break;
                }
                Err(err) => {
                    why = err;
                    None
                }
            };
            if attempt < TRIES {
                // Retry-After when the provider gave one, within the ring time; else 1 s, 2 s.
                let backoff = Duration::from_secs(1 << (attempt - 1));
                tokio::time::sleep(retry_in.unwrap_or(backoff).min(self.ring / 2)).await;
            }
        }
        *self
            .outcomes
            .lock()
            .expect("push outcomes")
            .entry((provider, outcome))
            .or_default() += 1;
        match outcome {
            Outcome::Sent => {
                tracing::info!(call, tenant = %device.tenant, user = %device.user, provider = provider.name(), "push: sent");
                Ok(())
            }
            Outcome::DeadToken => {
                tracing::info!(call, tenant = %device.tenant, user = %device.user, provider = provider.name(), "push: the provider says the device's token is dead; its registration is removed");
                self.unregister(&device.tenant, &device.user, &device.token);
                Err(format!("{}: the device's token is dead", provider.name()))
            }
            Outcome::Refused | Outcome::Failed => {
                tracing::warn!(call, tenant = %device.tenant, user = %device.user, provider = provider.name(), outcome = outcome.name(), %why, "push: not delivered; check the provider's configuration and reachability");
                Err(format!("{}: {why}", provider.name()))
            }
        }
    }

    /// FCM's data message: the webhook's fields but the device token (FCM's own), all
    /// strings.
    async fn send_fcm(
        &self,
        device: &PushRecord,
        call: u64,
        caller: Option<&str>,
    ) -> Result<client::Answer, String> {
        let fcm = self.fcm.as_ref().ok_or("FCM is not configured")?;
        let mut data = serde_json::Map::new();
        data.insert("type".into(), "call.incoming".into());
        data.insert("tenant".into(), device.tenant.clone().into());
        data.insert("user".into(), device.user.clone().into());
        data.insert("call".into(), call.to_string().into());
        if let Some(caller) = caller {
            data.insert("caller".into(), caller.into());
        }
        fcm.send(&self.client, &device.token, data, unix_now())
            .await
    }

    async fn send_apns(
        &self,
        device: &PushRecord,
        call: u64,
        caller: Option<&str>,
    ) -> Result<client::Answer, String> {
        let apns = self.apns.as_ref().ok_or("APNs is not configured")?;
        let now = unix_now();
        let notification = apns::Notification {
            device: &device.token,
            topic: device.app_id.as_deref(),
            voip: device.voip,
            fields: serde_json::json!({
                "type": "call.incoming",
                "tenant": device.tenant,
                "user": device.user,
                "call": call,
                "caller": caller,
            }),
            caller,
            expiration: now + self.ring.as_secs(),
        };
        apns.send(&self.client, notification, now).await
    }

    async fn send_webhook(&self, body: &[u8]) -> Result<client::Answer, String> {
        let webhook = self.webhook.as_ref().ok_or("no webhook configured")?;
        let signature = ring::hmac::sign(&webhook.key, body);
        let header = format!("sha256={}", hex::encode(signature.as_ref()));
        self.client
            .post(
                &webhook.endpoint,
                "application/json",
                &[("x-relay-signature", header)],
                body.to_vec(),
            )
            .await
    }
}

/// A call's pushes still under way, and where to say that none was delivered.
struct Pending {
    left: Mutex<(usize, Option<tokio::sync::oneshot::Sender<String>>)>,
}

impl Pending {
    /// One push ended: a delivered one drops the word; the last undelivered one sends its
    /// reason.
    fn done(&self, result: Result<(), String>) {
        let mut left = self.left.lock().expect("push pending");
        left.0 -= 1;
        match result {
            Ok(()) => left.1 = None,
            Err(why) if left.0 == 0 => {
                if let Some(tx) = left.1.take() {
                    let _ = tx.send(why);
                }
            }
            Err(_) => {}
        }
    }
}

fn provider_named(name: &str) -> Option<Provider> {
    Provider::ALL
        .into_iter()
        .find(|provider| provider.name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(store: Option<Arc<StateStore>>) -> Push {
        let config = PushConfig {
            enabled: true,
            webhook: config::WebhookConfig {
                url: "https://127.0.0.1:9/push".into(),
                secret: "a webhook secret of length".into(),
            },
            ..PushConfig::default()
        };
        Push::new(&config, store).unwrap()
    }

    #[test]
    fn registrations_are_checked_replaced_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let push = push(Some(Arc::new(StateStore::open(&path).unwrap())));
            assert_eq!(
                push.register("acme", "alice", "webhook", "device-1", None, false),
                Ok(1)
            );
            assert_eq!(
                push.register(
                    "acme",
                    "alice",
                    "webhook",
                    "device-2",
                    Some("com.example"),
                    false
                ),
                Ok(2)
            );
            // The same token again replaces it.
            assert_eq!(
                push.register("acme", "alice", "webhook", "device-1", None, false),
                Ok(2)
            );
            let err = push
                .register("acme", "alice", "carrier-pigeon", "x", None, false)
                .unwrap_err();
            assert_eq!(err.field, "provider");
            let err = push
                .register("acme", "alice", "fcm", "x", None, false)
                .unwrap_err();
            assert!(err.reason.contains("not configured"), "{err}");
            let long = "x".repeat(MAX_TOKEN + 1);
            assert_eq!(
                push.register("acme", "alice", "webhook", &long, None, false)
                    .unwrap_err()
                    .field,
                "token"
            );
            assert_eq!(
                push.register("acme", "alice", "webhook", "a b", None, false)
                    .unwrap_err()
                    .field,
                "token"
            );
            assert_eq!(
                push.register("acme", "alice", "webhook", "t", Some(""), false)
                    .unwrap_err()
                    .field,
                "app_id"
            );
            assert_eq!(
                push.devices("acme", "alice"),
                BTreeMap::from([("webhook", 2)])
            );
            assert!(push.devices("acme", "bob").is_empty());
            assert!(push.devices("other", "alice").is_empty());
        }
        // A restart finds them; an unregister removes one.
        let push = push(Some(Arc::new(StateStore::open(&path).unwrap())));
        assert_eq!(
            push.devices("acme", "alice"),
            BTreeMap::from([("webhook", 2)])
        );
        assert!(push.unregister("acme", "alice", "device-1"));
        assert!(!push.unregister("acme", "alice", "device-1"));
        assert_eq!(
            push.devices("acme", "alice"),
            BTreeMap::from([("webhook", 1)])
        );
    }

    /// A gateway nobody listens for: each try fails at once, three tries, then the call
    /// hears that nothing was delivered, with the reason; counted `failed`.
    #[tokio::test]
    async fn pushes_that_reach_nobody_say_so_after_the_last_try() {
        let config = PushConfig {
            enabled: true,
            ring_secs: 1,
            webhook: config::WebhookConfig {
                url: "https://127.0.0.1:9/push".into(),
                secret: "a webhook secret of length".into(),
            },
            ..PushConfig::default()
        };
        let push = Arc::new(Push::new(&config, None).unwrap());
        assert!(push.wake("acme", "alice", 1, None).is_none(), "no device");
        push.register("acme", "alice", "webhook", "device-1", None, false)
            .unwrap();
        let started = std::time::Instant::now();
        let woken = push.wake("acme", "alice", 1, Some("Reception")).unwrap();
        assert_eq!(woken.devices, 1);
        let why = tokio::time::timeout(Duration::from_secs(10), woken.undelivered)
            .await
            .unwrap()
            .unwrap();
        assert!(why.contains("webhook: connect"), "{why}");
        // Two waits of half the ring time between the tries.
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            push.outcomes().get(&(Provider::Webhook, Outcome::Failed)),
            Some(&1)
        );
    }

    #[test]
    fn a_token_another_user_holds_is_refused() {
        let push = push(None);
        push.register("acme", "alice", "webhook", "shared-phone", None, false)
            .unwrap();
        let refused = push
            .register("acme", "bob", "webhook", "shared-phone", None, false)
            .unwrap_err();
        assert_eq!(refused.field, "token");
        assert!(refused.reason.contains("another user"), "{refused:?}");
        assert_eq!(push.devices("acme", "bob"), BTreeMap::new());
        // Another tenant's account on the same device is its own.
        assert_eq!(
            push.register("other", "bob", "webhook", "shared-phone", None, false),
            Ok(1)
        );
        // Once alice's app lets it go, bob's may take it.
        assert!(push.unregister("acme", "alice", "shared-phone"));
        assert_eq!(
            push.register("acme", "bob", "webhook", "shared-phone", None, false),
            Ok(1)
        );
    }

    #[test]
    fn a_user_has_at_most_ten_devices() {
        let push = push(None);
        for n in 0..MAX_DEVICES {
            push.register("acme", "alice", "webhook", &format!("d{n}"), None, false)
                .unwrap();
        }
        assert_eq!(
            push.register("acme", "alice", "webhook", "one-more", None, false)
                .unwrap_err()
                .field,
            "token"
        );
        // Replacing one still works.
        assert_eq!(
            push.register("acme", "alice", "webhook", "d3", None, false),
            Ok(MAX_DEVICES)
        );
    }
}
