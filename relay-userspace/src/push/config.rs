//! The `[push]` section: waking a sleeping app for an incoming call through a push
//! provider. The webhook provider posts the push to the operator's own gateway.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PushConfig {
    pub enabled: bool,
    /// How long a call to a user with no app connected waits for one of its devices to
    /// wake and connect after the push (then it ends `no-answer`).
    pub ring_secs: u64,
    /// Each request to a provider, connection included, must be done within this.
    pub timeout_secs: u64,
    /// A PEM file of certificates to trust for the providers beside the public roots (a
    /// gateway with a private CA).
    pub ca_file: String,
    pub webhook: WebhookConfig,
    pub fcm: FcmConfig,
    pub apns: ApnsConfig,
}

/// APNs with a provider token (token-based authentication).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ApnsConfig {
    /// The team's signing key (`AuthKey_<key id>.p8`); empty: no APNs.
    pub key_file: String,
    pub key_id: String,
    pub team_id: String,
    /// The app's bundle id, for registrations that give no `app_id`.
    pub topic: String,
    /// `https://api.push.apple.com`, or `https://api.sandbox.push.apple.com` for
    /// development builds.
    pub base_url: String,
}

impl Default for ApnsConfig {
    fn default() -> Self {
        ApnsConfig {
            key_file: String::new(),
            key_id: String::new(),
            team_id: String::new(),
            topic: String::new(),
            base_url: "https://api.push.apple.com".to_owned(),
        }
    }
}

/// FCM HTTP v1 with a Google service account.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct FcmConfig {
    /// The service account's JSON key file (project_id, client_email, private_key,
    /// token_uri); empty: no FCM.
    pub service_account: String,
    /// Where FCM's API is.
    pub base_url: String,
}

impl Default for FcmConfig {
    fn default() -> Self {
        FcmConfig {
            service_account: String::new(),
            base_url: "https://fcm.googleapis.com".to_owned(),
        }
    }
}

/// The operator's push gateway: a POST of the push's JSON to `url`, signed with
/// HMAC-SHA256 of `secret` in `X-Relay-Signature`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    /// `https://host[:port]/path`; empty: no webhook provider.
    pub url: String,
    pub secret: String,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            enabled: false,
            ring_secs: 30,
            timeout_secs: 5,
            ca_file: String::new(),
            webhook: WebhookConfig::default(),
            fcm: FcmConfig::default(),
            apns: ApnsConfig::default(),
        }
    }
}

/// The shortest webhook secret taken: HMAC-SHA256 keys shorter than this are guessable.
const MIN_SECRET: usize = 16;

impl PushConfig {
    pub fn problems(&self, signalling: bool, problem: &mut impl FnMut(&'static str, String, &str)) {
        if !self.enabled {
            return;
        }
        if !signalling {
            problem(
                "push.enabled",
                "true".into(),
                "apps register for pushes over signalling: enable [signalling] too",
            );
        }
        if self.ring_secs == 0 || self.ring_secs > 300 {
            problem(
                "push.ring_secs",
                self.ring_secs.to_string(),
                "must be 1 to 300",
            );
        }
        if self.timeout_secs == 0 || self.timeout_secs > 60 {
            problem(
                "push.timeout_secs",
                self.timeout_secs.to_string(),
                "must be 1 to 60",
            );
        }
        if !self.ca_file.is_empty()
            && let Err(reason) = super::client::read_certificates(&self.ca_file)
        {
            problem("push.ca_file", self.ca_file.clone(), &reason);
        }
        if !self.fcm.service_account.is_empty()
            && let Err(reason) =
                super::fcm::Fcm::load(&self.fcm.service_account, &self.fcm.base_url)
        {
            problem(
                "push.fcm.service_account",
                self.fcm.service_account.clone(),
                &reason,
            );
        }
        if !self.apns.key_file.is_empty()
            && let Err((key, reason)) = super::apns::Apns::load(&self.apns)
        {
            let value = match key {
                "push.apns.key_file" => self.apns.key_file.clone(),
                "push.apns.key_id" => self.apns.key_id.clone(),
                "push.apns.team_id" => self.apns.team_id.clone(),
                _ => self.apns.base_url.clone(),
            };
            problem(key, value, &reason);
        }
        if self.webhook.url.is_empty() {
            if self.fcm.service_account.is_empty() && self.apns.key_file.is_empty() {
                problem(
                    "push.webhook.url",
                    String::new(),
                    "no provider is configured: set the webhook's URL, push.fcm.service_account or push.apns.key_file",
                );
            }
            return;
        }
        if let Err(reason) = super::client::Endpoint::parse(&self.webhook.url) {
            problem("push.webhook.url", self.webhook.url.clone(), &reason);
        }
        if self.webhook.secret.len() < MIN_SECRET {
            problem(
                "push.webhook.secret",
                "(hidden)".into(),
                "at least 16 characters: the gateway checks the pushes' signatures with it",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(config: &PushConfig, signalling: bool) -> Vec<(&'static str, String)> {
        let mut found = Vec::new();
        config.problems(signalling, &mut |key, _, reason: &str| {
            found.push((key, reason.to_owned()))
        });
        found
    }

    #[test]
    fn a_bad_push_section_names_each_field() {
        let good = PushConfig {
            enabled: true,
            webhook: WebhookConfig {
                url: "https://push.example.com/relay".into(),
                secret: "a secret of enough length".into(),
            },
            ..PushConfig::default()
        };
        assert_eq!(problems(&good, true), []);
        assert_eq!(
            problems(&PushConfig::default(), false),
            [],
            "off: nothing checked"
        );
        let bad = PushConfig {
            enabled: true,
            ring_secs: 0,
            timeout_secs: 61,
            ca_file: "/nonexistent/ca.pem".into(),
            webhook: WebhookConfig {
                url: "http://push.example.com/".into(),
                secret: "short".into(),
            },
            fcm: FcmConfig {
                service_account: "/nonexistent/fcm.json".into(),
                ..FcmConfig::default()
            },
            apns: ApnsConfig {
                key_file: "/nonexistent/AuthKey.p8".into(),
                ..ApnsConfig::default()
            },
        };
        let keys: Vec<&str> = problems(&bad, false).iter().map(|(key, _)| *key).collect();
        assert_eq!(
            keys,
            [
                "push.enabled",
                "push.ring_secs",
                "push.timeout_secs",
                "push.ca_file",
                "push.fcm.service_account",
                "push.apns.key_file",
                "push.webhook.url",
                "push.webhook.secret"
            ]
        );
        let no_provider = PushConfig {
            enabled: true,
            ..PushConfig::default()
        };
        assert_eq!(problems(&no_provider, true)[0].0, "push.webhook.url");
    }
}
