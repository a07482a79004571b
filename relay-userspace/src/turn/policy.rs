//! Which peers an allocation may reach, and how fast a source may allocate.
//!
//! A relay on the Internet edge must not become a way into the company network or a
//! reflector toward special addresses: peers in loopback, private, link-local, multicast,
//! unspecified and other special ranges are refused unless the operator allows them, as
//! coturn does with `no-loopback-peers`, `denied-peer-ip` and `allowed-peer-ip`. The
//! operator's `denied_peers` add ranges; `allowed_peers` win over both, as in coturn.

use std::{collections::HashMap, fmt, net::IpAddr, str::FromStr};

/// An address range in CIDR notation (`10.0.0.0/8`, `fd00::/8`); a bare address is a /32
/// or /128. Host bits must be clear: `10.1.2.3/8` is almost always a typo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet(ipnet::IpNet);

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.0, ip) {
            // An IPv4-mapped IPv6 peer is judged as the IPv4 address it is.
            (ipnet::IpNet::V4(_), IpAddr::V6(v6)) => v6
                .to_ipv4_mapped()
                .is_some_and(|v4| self.0.contains(&IpAddr::V4(v4))),
            (net, ip) => net.contains(&ip),
        }
    }
}

impl FromStr for IpNet {
    type Err = String;

    fn from_str(text: &str) -> Result<IpNet, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .parse()
            .map_err(|_| format!("{address:?} is not an IP address"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("prefix length {prefix:?} is not 0..={max}"))?,
        };
        let net = ipnet::IpNet::new(network, prefix).map_err(|err| err.to_string())?;
        if net.trunc() != net {
            return Err(format!(
                "host bits set: the network of /{prefix} is {}",
                net.network()
            ));
        }
        Ok(IpNet(net))
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a peer is refused, or None when it may be reached.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    pub allowed: Vec<IpNet>,
    pub denied: Vec<IpNet>,
}

impl PeerPolicy {
    /// True when an allocation may send to and receive from `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        if self.allowed.iter().any(|net| net.contains(ip)) {
            return true;
        }
        !is_special(ip) && !self.denied.iter().any(|net| net.contains(ip))
    }
}

/// Ranges a relay on the edge refuses by default (RFC 8656 21.3 and the IANA special
/// purpose registries): loopback, unspecified, multicast, private, link-local, broadcast,
/// "this network", shared address space (CGN), unique local, IPv4-mapped special ones.
fn is_special(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.octets()[0] == 0
                // 100.64.0.0/10, carrier-grade NAT (RFC 6598)
                || (v4.octets()[0] == 100 && v4.octets()[1] & 0xc0 == 64)
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_special(IpAddr::V4(v4)),
            None => {
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || v6.is_unique_local()
                    || v6.is_unicast_link_local()
            }
        },
    }
}

/// Requests per source IP address and second, counted in fixed one-second windows: enough
/// to stop one address from churning through the port range (Allocate) or keeping the
/// server busy (every request), cheap to keep.
#[derive(Debug, Default)]
pub struct SourceRate {
    /// Source -> (second, requests in it).
    windows: HashMap<IpAddr, (u64, u32)>,
}

impl SourceRate {
    /// Counts a request from `source` at `now`; false when it is over `limit` in this second
    /// (0: no limit).
    pub fn admit(&mut self, source: IpAddr, now: u64, limit: u32) -> bool {
        if limit == 0 {
            return true;
        }
        let window = self.windows.entry(source).or_insert((now, 0));
        if window.0 != now {
            *window = (now, 0);
        }
        window.1 += 1;
        window.1 <= limit
    }

    /// Takes back a request counted at `now` that the server tries again itself (its relay
    /// port could not be bound): a client is not limited for the host's ports.
    pub fn refund(&mut self, source: IpAddr, now: u64) {
        if let Some(window) = self.windows.get_mut(&source)
            && window.0 == now
        {
            window.1 = window.1.saturating_sub(1);
        }
    }

    /// Forgets the windows that ended before `now`.
    pub fn expire(&mut self, now: u64) {
        self.windows.retain(|_, (second, _)| *second >= now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn cidr_parsing_and_matching() {
        assert!(net("10.0.0.0/8").contains(ip("10.200.1.1")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("192.0.2.7").contains(ip("192.0.2.7")));
        assert!(!net("192.0.2.7").contains(ip("192.0.2.8")));
        assert!(net("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(!net("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(net("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
        assert!(!net("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(net("10.0.0.0/8").contains(ip("::ffff:10.1.1.1")));
        assert_eq!(net("fd00::/8").to_string(), "fd00::/8");
    }

    #[test]
    fn cidr_errors_say_why() {
        let error = |text: &str| text.parse::<IpNet>().unwrap_err();
        assert_eq!(error("10.0.0.0/33"), r#"prefix length "33" is not 0..=32"#);
        assert_eq!(error("fd00::/129"), r#"prefix length "129" is not 0..=128"#);
        assert_eq!(error("10.0.0.0/x"), r#"prefix length "x" is not 0..=32"#);
        assert_eq!(
            error("example.com"),
            r#""example.com" is not an IP address"#
        );
        assert_eq!(
            error("10.1.2.3/8"),
            "host bits set: the network of /8 is 10.0.0.0"
        );
    }

    #[test]
    fn special_ranges_are_refused_unless_allowed() {
        let default = PeerPolicy::default();
        for refused in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!default.permits(ip(refused)), "{refused}");
        }
        for permitted in ["192.0.2.1", "8.8.8.8", "100.128.0.1", "2001:db8::1"] {
            assert!(default.permits(ip(permitted)), "{permitted}");
        }
        let operator = PeerPolicy {
            allowed: vec![net("10.20.0.0/16"), net("192.0.2.99")],
            denied: vec![net("192.0.2.0/24")],
        };
        assert!(operator.permits(ip("10.20.3.4")));
        assert!(!operator.permits(ip("10.21.3.4")));
        assert!(!operator.permits(ip("192.0.2.1")));
        // Allowed wins over denied, as in coturn.
        assert!(operator.permits(ip("192.0.2.99")));
    }

    #[test]
    fn allocation_rate_is_per_source_and_second() {
        let mut rate = SourceRate::default();
        let a = ip("198.51.100.1");
        let b = ip("198.51.100.2");
        assert!(rate.admit(a, 10, 2));
        assert!(rate.admit(a, 10, 2));
        assert!(!rate.admit(a, 10, 2));
        assert!(rate.admit(b, 10, 2), "another source has its own window");
        assert!(rate.admit(a, 11, 2), "a new second, a new window");
        assert!(rate.admit(a, 11, 0) && rate.admit(a, 11, 0), "0: no limit");
        assert!(rate.admit(b, 10, 2));
        rate.refund(b, 10);
        assert!(rate.admit(b, 10, 2), "a request taken back");
        rate.refund(b, 9);
        assert!(!rate.admit(b, 10, 2), "only in its own second");
        rate.expire(12);
        assert!(rate.windows.is_empty());
    }
}
