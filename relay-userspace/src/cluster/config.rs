//! The `[cluster]` section: this relayd as one node of several sharing a Redis server.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    pub enabled: bool,
    /// This node's name among the cluster's (letters, digits, `.`, `_`, `-`); empty: the
    /// host name.
    pub node: String,
    /// `redis://[user:password@]host[:port][/db]`, `rediss://` for TLS, or
    /// `unix:///path/to/redis.sock`.
    pub redis_url: String,
    /// For `rediss://`: a PEM file of the certificates that may sign Redis's (a private
    /// CA); empty: the system's trust store.
    pub ca_file: String,
    /// How long a node's health record outlives its last refresh: a node silent this long
    /// is down (and its standby takes over). Refreshed every third of it.
    pub health_ttl_secs: u64,
    /// The most calls this node anchors before new calls for apps connected to it are
    /// placed on the least loaded other node that has room; 0: no limit.
    pub max_calls: usize,
    /// The node this one stands by for (empty: none). A standby shares the active node's
    /// floating addresses (`signalling.listen`, `calls.ice_listen`, `calls.lan_address`,
    /// `calls.port_range`: keepalived moves them) and anchors no calls until the active
    /// node's health record expires; then it takes the active node's calls over from Redis.
    pub standby_for: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: false,
            node: String::new(),
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            ca_file: String::new(),
            health_ttl_secs: 6,
            max_calls: 0,
            standby_for: String::new(),
        }
    }
}

/// The longest node name.
pub const MOST_NODE_NAME: usize = 64;

impl ClusterConfig {
    pub fn problems(&self, problem: &mut impl FnMut(&'static str, String, &str)) {
        if !self.enabled {
            return;
        }
        if let Err(reason) = check_node_name(&self.node) {
            problem("cluster.node", format!("{:?}", self.node), &reason);
        }
        if let Err(err) = redis::Client::open(self.redis_url.as_str()) {
            problem(
                "cluster.redis_url",
                format!("{:?}", redacted(&self.redis_url)),
                &format!("not a Redis URL (redis://, rediss:// or unix://): {err}"),
            );
        }
        if !self.ca_file.is_empty() {
            if !self.redis_url.starts_with("rediss://") {
                problem(
                    "cluster.ca_file",
                    format!("{:?}", self.ca_file),
                    "only for a rediss:// (TLS) redis_url",
                );
            } else if let Err(err) = std::fs::read(&self.ca_file) {
                problem(
                    "cluster.ca_file",
                    format!("{:?}", self.ca_file),
                    &format!("cannot be read: {err}"),
                );
            }
        }
        if !self.standby_for.is_empty() {
            if let Err(reason) = check_node_name(&self.standby_for) {
                problem(
                    "cluster.standby_for",
                    format!("{:?}", self.standby_for),
                    &reason,
                );
            } else if self.standby_for == self.node_name() {
                problem(
                    "cluster.standby_for",
                    format!("{:?}", self.standby_for),
                    "is this node's own name: a standby names the node it takes over from",
                );
            }
        }
        if !(1..=300).contains(&self.health_ttl_secs) {
            problem(
                "cluster.health_ttl_secs",
                self.health_ttl_secs.to_string(),
                "must be 1 to 300",
            );
        }
    }

    /// The Redis client the URL and `ca_file` say.
    pub fn client(&self) -> anyhow::Result<redis::Client> {
        if self.ca_file.is_empty() {
            return Ok(redis::Client::open(self.redis_url.as_str())?);
        }
        let root_cert = std::fs::read(&self.ca_file)
            .map_err(|err| anyhow::anyhow!("cluster.ca_file: {}: {err}", self.ca_file))?;
        Ok(redis::Client::build_with_tls(
            self.redis_url.as_str(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            },
        )?)
    }

    /// The node's name: `node`, or the host name when empty.
    pub fn node_name(&self) -> String {
        if !self.node.is_empty() {
            return self.node.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_owned())
            .ok()
            .filter(|name| check_node_name(name).is_ok())
            .unwrap_or_else(|| "relay".to_owned())
    }
}

/// An empty name stands for the host name; anything else must be a key part Redis and a
/// terminal show as it is.
fn check_node_name(name: &str) -> Result<(), String> {
    if name.len() > MOST_NODE_NAME {
        return Err(format!("longer than {MOST_NODE_NAME} characters"));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(bad) => Err(format!(
            "{bad:?} is not allowed: letters, digits, '.', '_' and '-' only (empty: the host name)"
        )),
        None => Ok(()),
    }
}

/// The URL without its password, for logs and status.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => match rest[..at].split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{}", &rest[at + 1..]),
            None => format!("{scheme}://***@{}", &rest[at + 1..]),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(config: &ClusterConfig) -> Vec<(&'static str, String)> {
        let mut found = Vec::new();
        config.problems(&mut |key, _value, reason: &str| found.push((key, reason.to_owned())));
        found
    }

    #[test]
    fn off_by_default_and_each_bad_value_names_its_key() {
        let off = ClusterConfig {
            node: "bad name".to_owned(),
            ..ClusterConfig::default()
        };
        assert!(
            problems(&off).is_empty(),
            "an unused section is not checked"
        );
        let good = ClusterConfig {
            enabled: true,
            node: "edge-a.dc1".to_owned(),
            ..ClusterConfig::default()
        };
        assert!(problems(&good).is_empty());
        let bad = ClusterConfig {
            enabled: true,
            node: "edge a".to_owned(),
            redis_url: "http://127.0.0.1:6379".to_owned(),
            ca_file: "/nonexistent/ca.pem".to_owned(),
            health_ttl_secs: 0,
            max_calls: 0,
            standby_for: "edge a".to_owned(),
        };
        let found = problems(&bad);
        let keys: Vec<&str> = found.iter().map(|(key, _)| *key).collect();
        assert_eq!(
            keys,
            [
                "cluster.node",
                "cluster.redis_url",
                "cluster.ca_file",
                "cluster.standby_for",
                "cluster.health_ttl_secs"
            ],
            "{found:?}"
        );
        assert!(found[0].1.contains("' ' is not allowed"), "{found:?}");
        assert!(found[2].1.contains("only for a rediss://"), "{found:?}");
        let unreadable = ClusterConfig {
            enabled: true,
            redis_url: "rediss://redis.lan:6380".to_owned(),
            ca_file: "/nonexistent/ca.pem".to_owned(),
            ..ClusterConfig::default()
        };
        let found = problems(&unreadable);
        assert!(
            found.len() == 1 && found[0].1.starts_with("cannot be read"),
            "{found:?}"
        );
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redacted("redis://user:secret@10.0.0.5:6379/2"),
            "redis://user:***@10.0.0.5:6379/2"
        );
        assert_eq!(
            redacted("redis://:secret@redis.lan"),
            "redis://:***@redis.lan"
        );
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(
            redacted("unix:///run/redis/redis.sock"),
            "unix:///run/redis/redis.sock"
        );
    }
}
