//! The `[signalling]` section: where the rendezvous listens, its certificate, the tenants
//! and their API keys, the token secret and the per-connection limits.

use serde::Deserialize;

/// The signalling rendezvous: WebSocket over TLS, where controllers (the UC server / PBX
/// side) and clients (the apps) both connect outbound.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SignallingConfig {
    pub enabled: bool,
    /// ADDRESS:PORT (TCP) to accept WebSocket over TLS on.
    pub listen: String,
    /// PEM certificate chain and private key; both empty: a self-signed certificate made on
    /// the first start and kept beside the state store (its SHA-256 fingerprint is logged).
    pub certificate: String,
    pub private_key: String,
    /// The key client tokens are signed with (HMAC-SHA256); controllers mint the tokens.
    pub token_secret: String,
    /// Longest client token lifetime a controller may ask for.
    pub max_token_lifetime_secs: u64,
    /// Controllers, one per tenant, each with its API key.
    pub tenants: Vec<Tenant>,
    /// Largest WebSocket message accepted; bigger ones close the connection (1009).
    pub max_message_bytes: usize,
    /// Messages waiting to be written to one connection; a full queue refuses more.
    pub queue_length: usize,
    /// Seconds between pings; a connection silent for three intervals is closed.
    pub ping_interval_secs: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub name: String,
    pub api_key: String,
}

impl Default for SignallingConfig {
    fn default() -> Self {
        SignallingConfig {
            enabled: false,
            listen: "0.0.0.0:443".to_owned(),
            certificate: String::new(),
            private_key: String::new(),
            token_secret: String::new(),
            max_token_lifetime_secs: 86_400,
            tenants: Vec::new(),
            max_message_bytes: 64 * 1024,
            queue_length: 256,
            ping_interval_secs: 20,
        }
    }
}

impl SignallingConfig {
    pub fn problems(&self, problem: &mut impl FnMut(&'static str, String, &str)) {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            problem(
                "signalling.listen",
                format!("{:?}", self.listen),
                "expected ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)",
            );
        }
        if self.certificate.is_empty() != self.private_key.is_empty() {
            problem(
                "signalling.private_key",
                format!("{:?}", self.private_key),
                "give both certificate and private_key, or neither (self-signed)",
            );
        }
        let mut names = Vec::new();
        for tenant in &self.tenants {
            if !super::auth::valid_name(&tenant.name) {
                problem(
                    "signalling.tenants",
                    format!("{:?}", tenant.name),
                    "a tenant name is 1 to 64 of A-Z a-z 0-9 . _ @ + -",
                );
            } else if names.contains(&&tenant.name) {
                problem(
                    "signalling.tenants",
                    format!("{:?}", tenant.name),
                    "tenant given twice",
                );
            }
            names.push(&tenant.name);
            if tenant.api_key.len() < 16 {
                problem(
                    "signalling.tenants",
                    format!("{:?}", tenant.name),
                    "api_key must be at least 16 characters",
                );
            }
        }
        if self.max_message_bytes < 1024 {
            problem(
                "signalling.max_message_bytes",
                self.max_message_bytes.to_string(),
                "must be at least 1024",
            );
        }
        if self.queue_length == 0 {
            problem(
                "signalling.queue_length",
                "0".to_owned(),
                "must be at least 1",
            );
        }
        if self.ping_interval_secs == 0 {
            problem(
                "signalling.ping_interval_secs",
                "0".to_owned(),
                "must be at least 1",
            );
        }
        if self.enabled {
            if self.token_secret.len() < 16 {
                problem(
                    "signalling.token_secret",
                    "(hidden)".to_owned(),
                    "the signalling server is enabled: give a secret of at least 16 characters",
                );
            }
            if self.tenants.is_empty() {
                problem(
                    "signalling.tenants",
                    "[]".to_owned(),
                    "the signalling server is enabled but no controller could connect",
                );
            }
        }
    }
}
