//! relayd's configuration: TOML, a `Default` for every section, unknown keys refused, and a
//! `validate()` that reports every problem at once with its key path. Each module owns its
//! section's type and checks (`turn::config`, `calls::config`, ...); this module composes
//! them, and no module below the daemon imports it.

use std::{fmt, path::PathBuf};

use serde::Deserialize;

use crate::{
    admission::ConnectionsConfig,
    calls::config::CallsConfig,
    cluster::config::ClusterConfig,
    datapath::config::{DatapathConfig, FlowsConfig},
    metrics::MetricsConfig,
    ng::config::NgConfig,
    paths,
    push::config::PushConfig,
    signalling::config::SignallingConfig,
    state::StateConfig,
    turn::config::TurnConfig,
};

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub datapath: DatapathConfig,
    pub flows: FlowsConfig,
    pub control: ControlConfig,
    pub metrics: MetricsConfig,
    pub connections: ConnectionsConfig,
    pub turn: TurnConfig,
    pub signalling: SignallingConfig,
    pub calls: CallsConfig,
    pub ng: NgConfig,
    pub push: PushConfig,
    pub state: StateConfig,
    pub cluster: ClusterConfig,
    pub runtime: RuntimeConfig,
    pub log: LogConfig,
}

/// The `[runtime]` section: the threads relayd's async runtime runs on.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads for signalling, TURN, ICE, DTLS and the media relayd itself carries
    /// (bridged calls, the userspace datapath); 0: one per CPU. Media in XDP needs none. One
    /// thread is the default: measured on two cores, a second one made 1,000 connected XDP
    /// calls cost relayd 3-5% of a core instead of 2% (its sleeps and cross-thread wake-ups),
    /// and each bridged packet 10% more CPU.
    pub worker_threads: usize,
}

impl RuntimeConfig {
    /// The most worker threads relayd starts.
    pub const MOST_WORKER_THREADS: usize = 1024;

    /// The count to start: `worker_threads`, or one per CPU when 0.
    pub fn threads(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    pub fn problems(&self, problem: &mut impl FnMut(&'static str, String, &str)) {
        if self.worker_threads > Self::MOST_WORKER_THREADS {
            problem(
                "runtime.worker_threads",
                self.worker_threads.to_string(),
                "must be at most 1024 (0: one per CPU)",
            );
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { worker_threads: 1 }
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

/// The filter `log.level` says, with field values matched as plain text: tracing's
/// default reads them as regular expressions, and a pattern can take seconds and gigabytes
/// to compile (the config fuzz target found one). Only printable ASCII is read: targets are
/// Rust module paths, and tracing's directive parser panics on some multibyte text (it
/// slices inside a character; the config fuzz target found that too). Each target, span
/// and field filter is given once: which of two would count is anybody's guess, and two
/// alike with a field value make tracing-subscriber 0.3.23 fail an invariant of its own in
/// debug builds (its field values compare equal in order but not in equality; the fuzz
/// target found it). Directives are split at commas, as tracing splits them.
pub fn log_filter(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    if let Some(bad) = level.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        return Err(format!(
            "{bad:?} is not allowed: a filter is printable ASCII (targets, levels, fields)"
        ));
    }
    let builder = tracing_subscriber::EnvFilter::builder().with_regex(false);
    let mut selectors = std::collections::HashSet::new();
    for directive in level.split(',').filter(|directive| !directive.is_empty()) {
        let alone = builder.clone().parse(directive).map_err(|err| {
            if level.contains(',') {
                format!("{directive:?}: {err}")
            } else {
                err.to_string()
            }
        })?;
        // As tracing writes it back: the selector, then `=level` (a level alone: no `=`).
        let written = alone.to_string();
        let selector = written
            .rsplit_once('=')
            .map_or("", |(selector, _)| selector);
        if !selectors.insert(selector.to_owned()) {
            return Err(format!(
                "{directive:?}: {} has a level already: give each target, span and field filter once",
                if selector.is_empty() {
                    "the default"
                } else {
                    selector
                }
            ));
        }
    }
    builder.parse(level).map_err(|err| err.to_string())
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// The `[control]` section: the Unix socket relayctl talks to. Defined here, not in
/// `control`: the control API sits above the configuration (it reloads it).
#[derive(Debug, Clone, serde::Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    pub socket: std::path::PathBuf,
    /// The group the socket belongs to (mode 0660): its members, root and relayd's own user
    /// may use the API. Empty: relayd's own group (the unit runs it as relay:relay).
    pub group: String,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: std::path::PathBuf::from(crate::paths::CONTROL_SOCKET),
            group: String::new(),
        }
    }
}

impl ControlConfig {
    pub fn problems(&self, problem: &mut impl FnMut(&'static str, String, &str)) {
        if !self.socket.is_absolute() {
            problem(
                "control.socket",
                self.socket.display().to_string(),
                "must be an absolute path",
            );
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
        key("ng", self.ng != new.ng, false);
        key("push", self.push != new.push, false);
        key("metrics", self.metrics != new.metrics, false);
        key("connections", self.connections != new.connections, false);
        key("runtime.worker_threads", self.runtime != new.runtime, false);
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
        key(
            "turn.max_request_rate_per_source",
            old_turn.max_request_rate_per_source != new_turn.max_request_rate_per_source,
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
        turn.max_request_rate_per_source = from.max_request_rate_per_source;
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
        self.datapath.problems(&mut problem);
        self.flows.problems(&mut problem);
        self.control.problems(&mut problem);
        self.metrics.problems(&mut problem);
        self.turn.problems(&mut problem);
        self.signalling.problems(&mut problem);
        self.calls.problems(self.signalling.enabled, &mut problem);
        self.ng.problems(&mut problem);
        self.push.problems(self.signalling.enabled, &mut problem);
        self.connections.problems(&mut problem);
        self.cluster.problems(&mut problem);
        self.runtime.problems(&mut problem);
        if let Err(reason) = log_filter(&self.log.level) {
            problem(
                "log.level",
                format!("{:?}", self.log.level),
                &format!(
                    "not a level (error, warn, info, debug, trace) or tracing filter: {reason}"
                ),
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

    /// Inputs the config fuzz target found taking seconds (and one more than 2 GB) while
    /// tracing compiled a field filter as a regular expression: now read as plain text, at
    /// once.
    #[test]
    fn a_log_filter_with_field_patterns_is_read_at_once() {
        for seed in [
            "log-level-regex-oom.toml",
            "log-level-regex-slow-1.toml",
            "log-level-regex-slow-2.toml",
            "log-level-multibyte-panic.toml",
        ] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../fuzz/seeds/config_parse")
                .join(seed);
            let text = std::fs::read_to_string(&path).unwrap();
            let started = std::time::Instant::now();
            if let Ok(config) = Config::parse(&text, seed) {
                let _ = config.validate(seed);
            }
            assert!(
                started.elapsed() < std::time::Duration::from_millis(500),
                "{seed}: {:?}",
                started.elapsed()
            );
        }
    }

    /// tracing's directive parser panicked on this one (it sliced inside a character); the
    /// filter is refused with the character named, and nothing panics.
    #[test]
    fn a_log_filter_with_multibyte_text_is_refused_by_name() {
        let config =
            Config::parse("[log]\nlevel = \" \u{664}\u{7d1}={  =  }# \"\n", "test").unwrap();
        let messages: Vec<String> = config.problems().iter().map(|p| p.to_string()).collect();
        assert_eq!(messages.len(), 1, "{messages:?}");
        assert!(
            messages[0].starts_with("log.level: ")
                && messages[0].contains("'\u{664}' is not allowed"),
            "{messages:?}"
        );
    }

    #[test]
    fn a_log_filter_that_gives_a_selector_twice_is_refused() {
        for level in [
            "info,relay=debug,relay=trace",
            "warn,[{user=alice}]=debug,[{user=alice}]=info",
            "info,debug",
        ] {
            let err = log_filter(level).err().unwrap_or_else(|| panic!("{level}"));
            assert!(err.contains("give each target"), "{level}: {err}");
        }
        // The fuzz target's input (tracing-subscriber's invariant, in debug builds).
        let found = include_str!("../../fuzz/seeds/config_parse/log-level-twice-invariant.toml");
        let config = Config::parse(found, "test").unwrap();
        let messages: Vec<String> = config.problems().iter().map(|p| p.to_string()).collect();
        assert!(
            messages.iter().any(|m| m.starts_with("log.level: ")),
            "{messages:?}"
        );
        for level in [
            "info",
            "info,relay=debug,relay::turn=trace",
            "relay[call]=debug",
        ] {
            assert!(log_filter(level).is_ok(), "{level}");
        }
    }

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
                "log.level: \"loud==\": not a level (error, warn, info, debug, trace) or tracing filter: error parsing level filter: expected one of \"off\", \"error\", \"warn\", \"info\", \"debug\", \"trace\", or a number 0-5",
            ]
        );
    }

    #[test]
    fn af_xdp_workers_need_the_xdp_datapath() {
        let parse = |text: &str| Config::parse(text, "test").unwrap();
        let refused = parse("[datapath]\nmode = \"userspace\"\ntranscrypt = \"af_xdp\"\n");
        let messages: Vec<String> = refused.problems().iter().map(|p| p.to_string()).collect();
        assert_eq!(
            messages,
            [
                "datapath.transcrypt: \"af_xdp\": AF_XDP workers need the XDP datapath (mode \"xdp\" or \"auto\")"
            ]
        );
        for text in [
            "[datapath]\nmode = \"userspace\"\ntranscrypt = \"sockets\"\n",
            "[datapath]\ntranscrypt = \"af_xdp\"\n",
            "[datapath]\ntranscrypt = \"auto\"\n",
        ] {
            assert!(parse(text).problems().is_empty(), "{text}");
        }
        assert!(Config::parse("[datapath]\ntranscrypt = \"dpdk\"\n", "test").is_err());
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
    fn runtime_worker_threads_default_to_one_and_are_bounded() {
        let config = Config::parse("", "test").unwrap();
        assert_eq!(config.runtime.threads(), 1);
        let per_cpu = Config::parse("[runtime]\nworker_threads = 0\n", "test").unwrap();
        assert_eq!(
            per_cpu.runtime.threads(),
            std::thread::available_parallelism().unwrap().get()
        );
        let too_many = Config::parse("[runtime]\nworker_threads = 5000\n", "test").unwrap();
        let messages: Vec<String> = too_many.problems().iter().map(|p| p.to_string()).collect();
        assert_eq!(messages.len(), 1, "{messages:?}");
        assert!(
            messages[0].starts_with("runtime.worker_threads: ") && messages[0].contains("1024"),
            "{messages:?}"
        );
        assert_eq!(
            config.changes(&per_cpu),
            Changes {
                live: vec![],
                restart: vec!["runtime.worker_threads"],
            }
        );
        assert!(Config::parse("[runtime]\nthreads = 2\n", "test").is_err());
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
