//! The `[turn]` section: listening and relay addresses, credentials, lifetimes, limits and
//! the peer policy.

use serde::Deserialize;

/// The TURN server (RFC 8656).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TurnConfig {
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
    /// STUN requests of any method per client IP address and second, beyond which they
    /// are dropped unanswered; 0: no limit.
    pub max_request_rate_per_source: u32,
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

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
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
            max_request_rate_per_source: 200,
            offload: true,
            tcp: true,
        }
    }
}

impl TurnConfig {
    /// The peer policy, from ranges `validate` accepted.
    pub fn peer_policy(&self) -> super::policy::PeerPolicy {
        let ranges = |list: &[String]| list.iter().filter_map(|r| r.parse().ok()).collect();
        super::policy::PeerPolicy {
            allowed: ranges(&self.allowed_peers),
            denied: ranges(&self.denied_peers),
        }
    }

    pub fn listen_addresses(&self) -> Vec<std::net::SocketAddr> {
        self.listen.iter().filter_map(|a| a.parse().ok()).collect()
    }

    /// The relay ports, when `port_range` is valid.
    pub fn ports(&self) -> Option<std::ops::RangeInclusive<u16>> {
        crate::datapath::config::port_range(&self.port_range)
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

    pub fn problems(&self, problem: &mut impl FnMut(&'static str, String, &str)) {
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
                if let Err(reason) = range.parse::<super::policy::IpNet>() {
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
