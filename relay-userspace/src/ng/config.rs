//! The `[ng]` section: rtpengine's ng control protocol for SIP proxies (Kamailio's and
//! OpenSIPS's `rtpengine` modules), the relay's named interfaces their `direction=` flags
//! pick, and the ports ng calls' media uses.

use std::{collections::BTreeMap, net::IpAddr, net::SocketAddr, ops::RangeInclusive};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct NgConfig {
    /// ADDRESS:PORT of the ng socket (UDP), e.g. "127.0.0.1:2223"; empty: ng off. The
    /// protocol has no authentication: listen on loopback or the SIP proxies' LAN only.
    pub listen: String,
    /// The relay's interfaces by the names `direction=` uses (rtpengine's
    /// `--interface=NAME/ADDRESS`), e.g. `{ lan = "10.0.0.1", wan = "198.51.100.1" }`.
    /// Without `direction=` both sides of a call use the first name in alphabetical order.
    pub interfaces: BTreeMap<String, String>,
    /// "FIRST-LAST" ports for ng calls' media: RTP on an even port, RTCP on the one above.
    pub port_range: String,
    /// Seconds without media in either direction after which an ng call is deleted (the
    /// SIP proxy may never send `delete`, as rtpengine's `--timeout`).
    pub media_timeout_secs: u64,
    /// Seconds an offer may wait for its answer before the call is deleted.
    pub answer_timeout_secs: u64,
    /// Seconds without answers to the relay's consent checks (RFC 7675) after which a side
    /// the relay speaks ICE toward (`ICE=force`) loses its flows.
    pub ice_consent_timeout_secs: u64,
}

impl Default for NgConfig {
    fn default() -> Self {
        NgConfig {
            listen: String::new(),
            interfaces: BTreeMap::new(),
            port_range: "30000-39999".to_owned(),
            media_timeout_secs: 60,
            answer_timeout_secs: 120,
            ice_consent_timeout_secs: 30,
        }
    }
}

impl NgConfig {
    pub fn address(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }

    pub fn enabled(&self) -> bool {
        !self.listen.is_empty()
    }

    pub fn ports(&self) -> Option<RangeInclusive<u16>> {
        // At least two ports: RTP and RTCP.
        crate::datapath::config::port_range(&self.port_range)
            .filter(|ports| ports.start() < ports.end())
    }

    /// The interfaces with their addresses, those that parse.
    pub fn interface_addresses(&self) -> Vec<(String, IpAddr)> {
        self.interfaces
            .iter()
            .filter_map(|(name, address)| Some((name.clone(), address.parse().ok()?)))
            .collect()
    }

    pub fn problems(&self, problem: &mut impl FnMut(&'static str, String, &str)) {
        if !self.enabled() {
            return;
        }
        if self.address().is_none() {
            problem(
                "ng.listen",
                format!("{:?}", self.listen),
                "expected ADDRESS:PORT (UDP), e.g. 127.0.0.1:2223",
            );
        }
        if self.interfaces.is_empty() {
            problem(
                "ng.interfaces",
                "{}".to_owned(),
                "name at least one interface with its address, e.g. { lan = \"10.0.0.1\" }",
            );
        }
        for (name, address) in &self.interfaces {
            match address.parse::<IpAddr>() {
                Ok(ip) if !ip.is_unspecified() => {}
                _ => problem(
                    "ng.interfaces",
                    format!("{name} = {address:?}"),
                    "expected the relay's IP address on that side (a specific address: SDP carries it)",
                ),
            }
        }
        if self.ports().is_none() {
            problem(
                "ng.port_range",
                format!("{:?}", self.port_range),
                "expected FIRST-LAST with 1 <= FIRST < LAST <= 65535",
            );
        }
        for (key, value) in [
            ("ng.media_timeout_secs", self.media_timeout_secs),
            ("ng.answer_timeout_secs", self.answer_timeout_secs),
            ("ng.ice_consent_timeout_secs", self.ice_consent_timeout_secs),
        ] {
            if value == 0 {
                problem(key, "0".to_owned(), "must be at least 1");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(config: &NgConfig) -> Vec<(&'static str, String)> {
        let mut found = Vec::new();
        config.problems(&mut |key, value, _reason: &str| found.push((key, value)));
        found
    }

    #[test]
    fn off_by_default_and_each_bad_value_names_its_key() {
        assert!(!NgConfig::default().enabled());
        assert!(problems(&NgConfig::default()).is_empty());
        let config = NgConfig {
            listen: "localhost".into(),
            interfaces: [("lan".to_owned(), "0.0.0.0".to_owned())].into(),
            port_range: "40-40".into(),
            media_timeout_secs: 0,
            ice_consent_timeout_secs: 0,
            ..NgConfig::default()
        };
        assert_eq!(
            problems(&config),
            [
                ("ng.listen", "\"localhost\"".to_owned()),
                ("ng.interfaces", "lan = \"0.0.0.0\"".to_owned()),
                ("ng.port_range", "\"40-40\"".to_owned()),
                ("ng.media_timeout_secs", "0".to_owned()),
                ("ng.ice_consent_timeout_secs", "0".to_owned()),
            ]
        );
        let none = NgConfig {
            listen: "127.0.0.1:2223".into(),
            ..NgConfig::default()
        };
        assert_eq!(problems(&none), [("ng.interfaces", "{}".to_owned())]);
    }
}
