//! relayd's configuration: TOML, a `Default` for every section, unknown keys refused, and a
//! `validate()` that reports every problem at once with its key path.

use std::{fmt, path::PathBuf};

use serde::Deserialize;

use crate::paths;

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub datapath: DatapathConfig,
    pub flows: FlowsConfig,
    pub control: ControlConfig,
    pub metrics: MetricsConfig,
    pub turn: TurnSettings,
    pub signalling: SignallingSettings,
    pub calls: CallsSettings,
    pub state: StateConfig,
    pub log: LogConfig,
}

/// The signalling rendezvous: WebSocket over TLS, where controllers (the UC server / PBX
/// side) and clients (the apps) both connect outbound.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SignallingSettings {
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

impl Default for SignallingSettings {
    fn default() -> Self {
        SignallingSettings {
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

impl SignallingSettings {
    fn problems(&self, problem: &mut impl FnMut(&'static str, String, &str)) {
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
            if !crate::signalling::auth::valid_name(&tenant.name) {
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

/// Calls anchored in the relay (issue 4): ICE toward the app on one WAN port, plain RTP
/// toward the PBX from LAN ports. Needs the signalling server.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct CallsSettings {
    pub enabled: bool,
    /// WAN ADDRESS:PORT of the ICE port every call's app leg shares.
    pub ice_listen: String,
    /// The relay's LAN address the PBX sends RTP to.
    pub lan_address: String,
    /// "FIRST-LAST" LAN ports for the calls' RTP.
    pub port_range: String,
    /// Seconds ICE may take to connect before the call fails.
    pub ice_timeout_secs: u64,
    /// Seconds without an answer to the relay's consent checks (RFC 7675) after which the
    /// call ends; from 5 s without one, media toward the app stops.
    pub consent_timeout_secs: u64,
    /// Seconds without media in either direction (the flows' kernel counters) after which
    /// the call ends.
    pub media_timeout_secs: u64,
    /// Seconds between `call.stats` events to the controller (each call's traffic from the
    /// kernel counters); 0: none.
    pub stats_interval_secs: u64,
}

impl Default for CallsSettings {
    fn default() -> Self {
        CallsSettings {
            enabled: false,
            ice_listen: String::new(),
            lan_address: String::new(),
            port_range: "40000-40999".to_owned(),
            ice_timeout_secs: 15,
            consent_timeout_secs: 30,
            media_timeout_secs: 60,
            stats_interval_secs: 10,
        }
    }
}

impl CallsSettings {
    pub fn ports(&self) -> Option<std::ops::RangeInclusive<u16>> {
        let (first, last) = self.port_range.split_once('-')?;
        let (first, last): (u16, u16) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
        (first > 0 && first <= last).then_some(first..=last)
    }

    fn problems(&self, signalling: bool, problem: &mut impl FnMut(&'static str, String, &str)) {
        if !self.enabled {
            return;
        }
        if !signalling {
            problem(
                "calls.enabled",
                "true".to_owned(),
                "calls are set up through the signalling server: enable [signalling]",
            );
        }
        match self.ice_listen.parse::<std::net::SocketAddr>() {
            Ok(address) if !address.ip().is_unspecified() => {}
            _ => problem(
                "calls.ice_listen",
                format!("{:?}", self.ice_listen),
                "expected the WAN ADDRESS:PORT (a specific address: ICE candidates carry it)",
            ),
        }
        match self.lan_address.parse::<std::net::IpAddr>() {
            Ok(address) if !address.is_unspecified() => {}
            _ => problem(
                "calls.lan_address",
                format!("{:?}", self.lan_address),
                "expected the relay's LAN IP address",
            ),
        }
        if self.ports().is_none() {
            problem(
                "calls.port_range",
                format!("{:?}", self.port_range),
                "expected FIRST-LAST with 1 <= FIRST <= LAST <= 65535",
            );
        }
        if self.ice_timeout_secs == 0 {
            problem(
                "calls.ice_timeout_secs",
                "0".to_owned(),
                "must be at least 1",
            );
        }
        if self.consent_timeout_secs < 6 {
            problem(
                "calls.consent_timeout_secs",
                self.consent_timeout_secs.to_string(),
                "must be at least 6 (media toward the app already stops after 5 s without consent)",
            );
        }
        if self.media_timeout_secs == 0 {
            problem(
                "calls.media_timeout_secs",
                "0".to_owned(),
                "must be at least 1",
            );
        }
    }
}

/// Where relayd keeps what a restart needs (TURN allocations).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// The state store file; empty: keep nothing (allocations end with relayd).
    pub path: PathBuf,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            path: PathBuf::from(paths::STATE_FILE),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathMode {
    Auto,
    Xdp,
    Userspace,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeChoice {
    Auto,
    Native,
    Generic,
}

impl XdpModeChoice {
    /// Whether an attachment in `mode` ("native"/"generic") is what this choice asks for.
    pub fn accepts(self, mode: &str) -> bool {
        match self {
            XdpModeChoice::Auto => true,
            XdpModeChoice::Native => mode == "native",
            XdpModeChoice::Generic => mode == "generic",
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DatapathConfig {
    pub mode: DatapathMode,
    pub interfaces: Vec<String>,
    pub xdp_mode: XdpModeChoice,
    pub pin_dir: PathBuf,
    pub capacity: u32,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            mode: DatapathMode::Auto,
            interfaces: Vec::new(),
            xdp_mode: XdpModeChoice::Auto,
            pin_dir: PathBuf::from(paths::PIN_DIR),
            capacity: relay_common::FLOWS_DEFAULT_CAPACITY,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct FlowsConfig {
    pub idle_timeout_secs: u64,
}

impl Default for FlowsConfig {
    fn default() -> Self {
        FlowsConfig {
            idle_timeout_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    pub socket: PathBuf,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: PathBuf::from(paths::CONTROL_SOCKET),
        }
    }
}

/// The TURN server (RFC 8656).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TurnSettings {
    pub enabled: bool,
    /// ADDRESS:PORT to listen on over UDP, one per address (e.g. "203.0.113.1:3478").
    pub listen: Vec<String>,
    pub realm: String,
    /// Addresses allocations are made on, at most one per family; empty: the listening
    /// addresses.
    pub relay_addresses: Vec<String>,
    /// "FIRST-LAST" relay ports.
    pub port_range: String,
    /// Static long-term credentials.
    pub users: Vec<TurnUser>,
    /// TURN REST API shared secrets (coturn's static-auth-secret); several for rotation.
    pub secrets: Vec<String>,
    pub default_lifetime_secs: u64,
    pub max_lifetime_secs: u64,
    pub max_allocations: usize,
    pub max_allocations_per_user: usize,
    /// Peer ranges (CIDR, or single addresses) allowed although refused by default
    /// (loopback, private, link-local, multicast, unspecified, CGN) or by `denied_peers`.
    pub allowed_peers: Vec<String>,
    /// Peer ranges refused on top of the default ones.
    pub denied_peers: Vec<String>,
    /// Allocate requests per client IP address and second; 0: no limit.
    pub max_allocate_rate_per_source: u32,
    /// Forward bound channels' ChannelData in the kernel (XDP datapath only).
    pub offload: bool,
    /// Also accept TURN over TCP on the `listen` addresses, and TURN over TLS on the
    /// signalling port (RFC 8656: clients whose network lets no UDP out); relayed in
    /// userspace, XDP does not touch TCP.
    pub tcp: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TurnUser {
    pub name: String,
    pub password: String,
}

impl Default for TurnSettings {
    fn default() -> Self {
        TurnSettings {
            enabled: false,
            listen: Vec::new(),
            realm: "relay".to_owned(),
            relay_addresses: Vec::new(),
            port_range: "49152-65535".to_owned(),
            users: Vec::new(),
            secrets: Vec::new(),
            default_lifetime_secs: 600,
            max_lifetime_secs: 3600,
            max_allocations: 10_000,
            max_allocations_per_user: 100,
            allowed_peers: Vec::new(),
            denied_peers: Vec::new(),
            max_allocate_rate_per_source: 20,
            offload: true,
            tcp: true,
        }
    }
}

impl TurnSettings {
    /// The peer policy, from ranges `validate` accepted.
    pub fn peer_policy(&self) -> crate::turn::policy::PeerPolicy {
        let ranges = |list: &[String]| list.iter().filter_map(|r| r.parse().ok()).collect();
        crate::turn::policy::PeerPolicy {
            allowed: ranges(&self.allowed_peers),
            denied: ranges(&self.denied_peers),
        }
    }

    pub fn listen_addresses(&self) -> Vec<std::net::SocketAddr> {
        self.listen.iter().filter_map(|a| a.parse().ok()).collect()
    }

    /// The relay ports, when `port_range` is valid.
    pub fn ports(&self) -> Option<std::ops::RangeInclusive<u16>> {
        let (first, last) = self.port_range.split_once('-')?;
        let (first, last): (u16, u16) = (first.trim().parse().ok()?, last.trim().parse().ok()?);
        (first > 0 && first <= last).then_some(first..=last)
    }

    /// The relay addresses: configured, or the listening addresses' IPs.
    pub fn relay_ips(&self) -> Vec<std::net::IpAddr> {
        if self.relay_addresses.is_empty() {
            self.listen_addresses().iter().map(|a| a.ip()).collect()
        } else {
            self.relay_addresses
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect()
        }
    }

    fn problems(&self, problem: &mut impl FnMut(&'static str, String, &str)) {
        for address in &self.listen {
            match address.parse::<std::net::SocketAddr>() {
                Ok(a) if a.ip().is_unspecified() => problem(
                    "turn.listen",
                    format!("{address:?}"),
                    "a specific address, not a wildcard: it is part of the clients' 5-tuple",
                ),
                Ok(_) => {}
                Err(_) => problem(
                    "turn.listen",
                    format!("{address:?}"),
                    "expected ADDRESS:PORT",
                ),
            }
        }
        for address in &self.relay_addresses {
            if address.parse::<std::net::IpAddr>().is_err() {
                problem(
                    "turn.relay_addresses",
                    format!("{address:?}"),
                    "not an IP address",
                );
            }
        }
        let ips = self.relay_ips();
        if ips.iter().filter(|ip| ip.is_ipv4()).count() > 1
            || ips.iter().filter(|ip| ip.is_ipv6()).count() > 1
        {
            problem(
                "turn.relay_addresses",
                format!("{ips:?}"),
                "at most one address per family (set turn.relay_addresses)",
            );
        }
        if self.ports().is_none() {
            problem(
                "turn.port_range",
                format!("{:?}", self.port_range),
                "expected FIRST-LAST with 1 <= FIRST <= LAST <= 65535",
            );
        }
        if self.realm.is_empty() {
            problem("turn.realm", "\"\"".to_owned(), "must not be empty");
        }
        if self.default_lifetime_secs == 0 || self.default_lifetime_secs > self.max_lifetime_secs {
            problem(
                "turn.default_lifetime_secs",
                self.default_lifetime_secs.to_string(),
                "must be between 1 and turn.max_lifetime_secs",
            );
        }
        for (key, ranges) in [
            ("turn.allowed_peers", &self.allowed_peers),
            ("turn.denied_peers", &self.denied_peers),
        ] {
            for range in ranges {
                if let Err(reason) = range.parse::<crate::turn::policy::IpNet>() {
                    problem(key, format!("{range:?}"), &reason);
                }
            }
        }
        if self.enabled {
            if self.listen.is_empty() {
                problem(
                    "turn.listen",
                    "[]".to_owned(),
                    "the TURN server is enabled but listens nowhere",
                );
            }
            if self.users.is_empty() && self.secrets.is_empty() {
                problem(
                    "turn.users",
                    "[]".to_owned(),
                    "no users and no secrets: nobody could authenticate",
                );
            }
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// ADDRESS:PORT to serve Prometheus metrics on (`/metrics`); empty: no metrics.
    pub listen: String,
}

impl MetricsConfig {
    /// The address to listen on, when metrics are on and the address is valid.
    pub fn address(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

/// How log lines look: for people (text) or for a log pipeline (one JSON object a line).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// What a reload (SIGHUP) found changed: keys applied live, and keys that take effect only
/// at the next start.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub live: Vec<&'static str>,
    pub restart: Vec<&'static str>,
}

impl Config {
    /// The keys that differ between `self` (running) and `new`, split by whether relayd
    /// applies them live: credentials, peer policy, limits and the log level.
    pub fn changes(&self, new: &Config) -> Changes {
        let (old_turn, new_turn) = (&self.turn, &new.turn);
        let mut changes = Changes::default();
        let mut key = |name: &'static str, changed: bool, live: bool| {
            if changed {
                if live {
                    changes.live.push(name);
                } else {
                    changes.restart.push(name);
                }
            }
        };
        key("datapath", self.datapath != new.datapath, false);
        key("flows.idle_timeout_secs", self.flows != new.flows, false);
        key("control", self.control != new.control, false);
        key("state.path", self.state != new.state, false);
        key("signalling", self.signalling != new.signalling, false);
        key("calls", self.calls != new.calls, false);
        key("metrics", self.metrics != new.metrics, false);
        key("turn.enabled", old_turn.enabled != new_turn.enabled, false);
        key("turn.listen", old_turn.listen != new_turn.listen, false);
        key("turn.realm", old_turn.realm != new_turn.realm, false);
        key(
            "turn.relay_addresses",
            old_turn.relay_addresses != new_turn.relay_addresses,
            false,
        );
        key(
            "turn.port_range",
            old_turn.port_range != new_turn.port_range,
            false,
        );
        key("turn.offload", old_turn.offload != new_turn.offload, false);
        key("turn.tcp", old_turn.tcp != new_turn.tcp, false);
        key("turn.users", old_turn.users != new_turn.users, true);
        key("turn.secrets", old_turn.secrets != new_turn.secrets, true);
        key(
            "turn.allowed_peers",
            old_turn.allowed_peers != new_turn.allowed_peers,
            true,
        );
        key(
            "turn.denied_peers",
            old_turn.denied_peers != new_turn.denied_peers,
            true,
        );
        key(
            "turn.default_lifetime_secs",
            old_turn.default_lifetime_secs != new_turn.default_lifetime_secs,
            true,
        );
        key(
            "turn.max_lifetime_secs",
            old_turn.max_lifetime_secs != new_turn.max_lifetime_secs,
            true,
        );
        key(
            "turn.max_allocations",
            old_turn.max_allocations != new_turn.max_allocations,
            true,
        );
        key(
            "turn.max_allocations_per_user",
            old_turn.max_allocations_per_user != new_turn.max_allocations_per_user,
            true,
        );
        key(
            "turn.max_allocate_rate_per_source",
            old_turn.max_allocate_rate_per_source != new_turn.max_allocate_rate_per_source,
            true,
        );
        key("log.level", self.log.level != new.log.level, true);
        key("log.format", self.log.format != new.log.format, false);
        changes
    }

    /// `self` with the live keys of `new` taken over: the configuration relayd runs with
    /// after a reload.
    pub fn with_live_changes(&self, new: &Config) -> Config {
        let mut merged = self.clone();
        let (turn, from) = (&mut merged.turn, &new.turn);
        turn.users = from.users.clone();
        turn.secrets = from.secrets.clone();
        turn.allowed_peers = from.allowed_peers.clone();
        turn.denied_peers = from.denied_peers.clone();
        turn.default_lifetime_secs = from.default_lifetime_secs;
        turn.max_lifetime_secs = from.max_lifetime_secs;
        turn.max_allocations = from.max_allocations;
        turn.max_allocations_per_user = from.max_allocations_per_user;
        turn.max_allocate_rate_per_source = from.max_allocate_rate_per_source;
        merged.log.level = new.log.level.clone();
        merged
    }
}

/// One problem in a configuration, with the key it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: &'static str,
    pub value: String,
    pub reason: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.key, self.value, self.reason)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin} is invalid:\n{}", problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        origin: String,
        problems: Vec<ConfigProblem>,
    },
}

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;
/// The flow table is a preallocated BPF hash map: keep it within what a relay box can lock.
const MAX_CAPACITY: u32 = 16 * 1024 * 1024;

impl Config {
    /// Parses TOML text; `origin` names it in errors (a path, or "embedded default").
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|err| ConfigError::Parse {
            origin: origin.to_owned(),
            message: err.to_string().trim_end().to_owned(),
        })
    }

    /// Reads `path`, or the embedded default when `path` is the default location and absent.
    pub fn load(path: Option<&std::path::Path>) -> Result<(Config, String), ConfigError> {
        let (text, origin) = match path {
            Some(path) => (
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?,
                path.display().to_string(),
            ),
            None => match std::fs::read_to_string(paths::CONFIG_FILE) {
                Ok(text) => (text, paths::CONFIG_FILE.to_owned()),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => (
                    paths::DEFAULT_CONFIG.to_owned(),
                    "embedded default configuration".to_owned(),
                ),
                Err(source) => {
                    return Err(ConfigError::Read {
                        path: paths::CONFIG_FILE.into(),
                        source,
                    });
                }
            },
        };
        let config = Config::parse(&text, &origin)?;
        config.validate(&origin)?;
        Ok((config, origin))
    }

    /// Every problem at once, each with its key path.
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let mut problem = |key, value: String, reason: &str| {
            problems.push(ConfigProblem {
                key,
                value,
                reason: reason.to_owned(),
            })
        };
        let mut seen = Vec::new();
        for name in &self.datapath.interfaces {
            if name.is_empty() || name.len() > MAX_IFNAME_LEN {
                problem(
                    "datapath.interfaces",
                    format!("{name:?}"),
                    "an interface name has 1 to 15 characters",
                );
            } else if name.contains(['/', ' ', ':']) || name == "." || name == ".." {
                problem(
                    "datapath.interfaces",
                    format!("{name:?}"),
                    "not a valid interface name",
                );
            } else if seen.contains(&name) {
                problem("datapath.interfaces", format!("{name:?}"), "listed twice");
            }
            seen.push(name);
        }
        if self.datapath.mode == DatapathMode::Xdp && self.datapath.interfaces.is_empty() {
            problem(
                "datapath.interfaces",
                "[]".to_owned(),
                "mode \"xdp\" needs at least one interface to attach to",
            );
        }
        if !self.datapath.pin_dir.is_absolute() {
            problem(
                "datapath.pin_dir",
                self.datapath.pin_dir.display().to_string(),
                "must be an absolute path",
            );
        }
        if self.datapath.capacity == 0 || self.datapath.capacity > MAX_CAPACITY {
            problem(
                "datapath.capacity",
                self.datapath.capacity.to_string(),
                &format!("must be between 1 and {MAX_CAPACITY}"),
            );
        }
        if self.flows.idle_timeout_secs == 0 || self.flows.idle_timeout_secs > 86_400 {
            problem(
                "flows.idle_timeout_secs",
                self.flows.idle_timeout_secs.to_string(),
                "must be between 1 and 86400 seconds",
            );
        }
        if !self.control.socket.is_absolute() {
            problem(
                "control.socket",
                self.control.socket.display().to_string(),
                "must be an absolute path",
            );
        }
        if !self.metrics.listen.is_empty() && self.metrics.address().is_none() {
            problem(
                "metrics.listen",
                format!("{:?}", self.metrics.listen),
                "expected ADDRESS:PORT (IPv6 as [ADDRESS]:PORT), or empty for no metrics",
            );
        }
        self.turn.problems(&mut problem);
        self.signalling.problems(&mut problem);
        self.calls.problems(self.signalling.enabled, &mut problem);
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            problem(
                "log.level",
                format!("{:?}", self.log.level),
                "not a level (error, warn, info, debug, trace) or tracing filter",
            );
        }
        problems
    }

    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                origin: origin.to_owned(),
                problems,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses_to_the_defaults() {
        let config = Config::parse(paths::DEFAULT_CONFIG, "embedded").unwrap();
        assert_eq!(config, Config::default());
        assert!(config.problems().is_empty());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = Config::parse("[datapath]\nmodes = \"xdp\"\n", "test").unwrap_err();
        assert!(err.to_string().contains("unknown field `modes`"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let config = Config::parse(
            r#"
            [datapath]
            mode = "xdp"
            pin_dir = "relative"
            capacity = 0
            [flows]
            idle_timeout_secs = 0
            [control]
            socket = "x.sock"
            [metrics]
            listen = "localhost:9477"
            [log]
            level = "loud=="
            "#,
            "test",
        )
        .unwrap();
        let messages: Vec<String> = config.problems().iter().map(|p| p.to_string()).collect();
        assert_eq!(
            messages,
            [
                "datapath.interfaces: []: mode \"xdp\" needs at least one interface to attach to",
                "datapath.pin_dir: relative: must be an absolute path",
                "datapath.capacity: 0: must be between 1 and 16777216",
                "flows.idle_timeout_secs: 0: must be between 1 and 86400 seconds",
                "control.socket: x.sock: must be an absolute path",
                "metrics.listen: \"localhost:9477\": expected ADDRESS:PORT (IPv6 as [ADDRESS]:PORT), or empty for no metrics",
                "log.level: \"loud==\": not a level (error, warn, info, debug, trace) or tracing filter",
            ]
        );
    }

    #[test]
    fn turn_problems_are_named() {
        let config = Config::parse(
            r#"
            [turn]
            enabled = true
            listen = ["0.0.0.0:3478", "203.0.113.1"]
            relay_addresses = ["203.0.113.1", "203.0.113.2", "nope"]
            port_range = "70000-80000"
            realm = ""
            default_lifetime_secs = 7200
            allowed_peers = ["10.0.0.0/8", "10.1.0.0/8", "fd00::/200"]
            denied_peers = ["192.0.2.0/24", "somewhere"]
            "#,
            "test",
        )
        .unwrap();
        let messages: Vec<String> = config.problems().iter().map(|p| p.to_string()).collect();
        assert_eq!(
            messages,
            [
                "turn.listen: \"0.0.0.0:3478\": a specific address, not a wildcard: it is part of the clients' 5-tuple",
                "turn.listen: \"203.0.113.1\": expected ADDRESS:PORT",
                "turn.relay_addresses: \"nope\": not an IP address",
                "turn.relay_addresses: [203.0.113.1, 203.0.113.2]: at most one address per family (set turn.relay_addresses)",
                "turn.port_range: \"70000-80000\": expected FIRST-LAST with 1 <= FIRST <= LAST <= 65535",
                "turn.realm: \"\": must not be empty",
                "turn.default_lifetime_secs: 7200: must be between 1 and turn.max_lifetime_secs",
                "turn.allowed_peers: \"10.1.0.0/8\": host bits set: the network of /8 is 10.0.0.0",
                "turn.allowed_peers: \"fd00::/200\": prefix length \"200\" is not 0..=128",
                "turn.denied_peers: \"somewhere\": \"somewhere\" is not an IP address",
                "turn.users: []: no users and no secrets: nobody could authenticate",
            ]
        );
    }

    #[test]
    fn bad_interface_names_are_named() {
        let config = Config::parse(
            "[datapath]\ninterfaces = [\"eth0\", \"eth0\", \"a-very-long-interface-name\"]\n",
            "test",
        )
        .unwrap();
        let messages: Vec<String> = config.problems().iter().map(|p| p.to_string()).collect();
        assert_eq!(
            messages,
            [
                "datapath.interfaces: \"eth0\": listed twice",
                "datapath.interfaces: \"a-very-long-interface-name\": an interface name has 1 to 15 characters",
            ]
        );
    }

    #[test]
    fn reload_changes_are_split_into_live_and_restart() {
        let running = Config::parse(
            r#"
            [turn]
            users = [{ name = "alice", password = "a" }]
            port_range = "50000-50100"
            "#,
            "test",
        )
        .unwrap();
        assert_eq!(running.changes(&running.clone()), Changes::default());
        let new = Config::parse(
            r#"
            [log]
            level = "debug"
            [flows]
            idle_timeout_secs = 5
            [turn]
            users = [{ name = "bob", password = "b" }]
            denied_peers = ["192.0.2.0/24"]
            port_range = "50000-50200"
            "#,
            "test",
        )
        .unwrap();
        let changes = running.changes(&new);
        assert_eq!(
            changes,
            Changes {
                live: vec!["turn.users", "turn.denied_peers", "log.level"],
                restart: vec!["flows.idle_timeout_secs", "turn.port_range"],
            }
        );
        let merged = running.with_live_changes(&new);
        assert_eq!(merged.turn.users, new.turn.users);
        assert_eq!(merged.turn.denied_peers, new.turn.denied_peers);
        assert_eq!(merged.log.level, "debug");
        assert_eq!(merged.turn.port_range, "50000-50100", "needs a restart");
        assert_eq!(merged.flows, running.flows, "needs a restart");
        assert_eq!(
            merged.changes(&new).live,
            Vec::<&str>::new(),
            "nothing live is left"
        );
    }

    #[test]
    fn signalling_problems_are_named() {
        let config = Config::parse(
            r#"
            [signalling]
            enabled = true
            listen = "443"
            certificate = "/etc/relay/cert.pem"
            token_secret = "short"
            max_message_bytes = 10
            queue_length = 0
            ping_interval_secs = 0
            tenants = [
                { name = "acme", api_key = "0123456789abcdef" },
                { name = "acme", api_key = "0123456789abcdef" },
                { name = "bad:name", api_key = "0123456789abcdef" },
                { name = "globex", api_key = "short" },
            ]
            "#,
            "test",
        )
        .unwrap();
        let messages: Vec<String> = config.problems().iter().map(|p| p.to_string()).collect();
        assert_eq!(
            messages,
            [
                "signalling.listen: \"443\": expected ADDRESS:PORT (IPv6 as [ADDRESS]:PORT)",
                "signalling.private_key: \"\": give both certificate and private_key, or neither (self-signed)",
                "signalling.tenants: \"acme\": tenant given twice",
                "signalling.tenants: \"bad:name\": a tenant name is 1 to 64 of A-Z a-z 0-9 . _ @ + -",
                "signalling.tenants: \"globex\": api_key must be at least 16 characters",
                "signalling.max_message_bytes: 10: must be at least 1024",
                "signalling.queue_length: 0: must be at least 1",
                "signalling.ping_interval_secs: 0: must be at least 1",
                "signalling.token_secret: (hidden): the signalling server is enabled: give a secret of at least 16 characters",
            ]
        );
        let none = Config::parse(
            "[signalling]\nenabled = true\ntoken_secret = \"0123456789abcdef\"",
            "test",
        )
        .unwrap();
        let messages: Vec<String> = none.problems().iter().map(|p| p.to_string()).collect();
        assert_eq!(
            messages,
            [
                "signalling.tenants: []: the signalling server is enabled but no controller could connect"
            ]
        );
    }

    #[test]
    fn calls_problems_are_named() {
        let config = Config::parse(
            r#"
            [calls]
            enabled = true
            ice_listen = "0.0.0.0:3479"
            lan_address = "lan"
            port_range = "5-1"
            ice_timeout_secs = 0
            consent_timeout_secs = 2
            media_timeout_secs = 0
            "#,
            "test",
        )
        .unwrap();
        let messages: Vec<String> = config.problems().iter().map(|p| p.to_string()).collect();
        assert_eq!(
            messages,
            [
                "calls.enabled: true: calls are set up through the signalling server: enable [signalling]",
                "calls.ice_listen: \"0.0.0.0:3479\": expected the WAN ADDRESS:PORT (a specific address: ICE candidates carry it)",
                "calls.lan_address: \"lan\": expected the relay's LAN IP address",
                "calls.port_range: \"5-1\": expected FIRST-LAST with 1 <= FIRST <= LAST <= 65535",
                "calls.ice_timeout_secs: 0: must be at least 1",
                "calls.consent_timeout_secs: 2: must be at least 6 (media toward the app already stops after 5 s without consent)",
                "calls.media_timeout_secs: 0: must be at least 1",
            ]
        );
    }
}
