//! A flow as the control plane sees it (socket addresses) and its kernel encoding.

use std::net::{IpAddr, SocketAddr};

use relay_common::{
    CHANNEL_MAX, CHANNEL_MIN, CHANNEL_OP_ADD, CHANNEL_OP_NONE, CHANNEL_OP_STRIP, FAMILY_IPV4,
    FAMILY_IPV6, FLOW_FLAG_OPAQUE_PAYLOAD, FLOW_FLAG_RTCP_TO_USERSPACE, FLOW_FLAG_TO_WORKER,
    FlowAction, FlowKey, address_octets, address_words,
};
use serde::{Deserialize, Serialize};

/// "A UDP packet arriving from `src` to `dst` (the relay's own address) is re-sent from
/// `new_src` (the relay's address on the other side) to `new_dst`" (DESIGN.md), with an
/// optional TURN ChannelData operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlowSpec {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub new_src: SocketAddr,
    pub new_dst: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelOp>,
    /// RTCP on this flow (RFC 5761) is not forwarded by the kernel but passed up to the
    /// socket that owns the flow's relay address: a call whose PBX keeps RTCP on its own
    /// port sends it there.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rtcp_to_userspace: bool,
    /// The payload is someone's data, not a demultiplexing point of the relay's own: a
    /// TURN channel's, both ways. Its first byte is not read (RFC 7983 applies where the
    /// relay is itself the ICE and DTLS endpoint), so STUN- or DTLS-looking data stays in
    /// the kernel with the rest.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub opaque_payload: bool,
    /// The packets are transcrypted by a worker (AF_XDP): the kernel steers them to the
    /// worker socket of their queue, unchanged, and the worker rewrites and sends them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub to_worker: bool,
}

/// What a flow does with TURN ChannelData framing (RFC 8656 section 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOp {
    /// Packets are ChannelData on this channel; the header is removed (client -> peer).
    Strip(u16),
    /// A ChannelData header with this channel number is prepended (peer -> client).
    Add(u16),
}

impl ChannelOp {
    pub fn number(self) -> u16 {
        match self {
            ChannelOp::Strip(number) | ChannelOp::Add(number) => number,
        }
    }
}

/// What identifies a flow: source, destination, and the channel of ChannelData packets.
pub type FlowId = (SocketAddr, SocketAddr, u16);

/// Why a flow spec was refused, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {value}: {reason}")]
pub struct FlowSpecError {
    pub field: &'static str,
    pub value: String,
    pub reason: String,
}

impl FlowSpec {
    /// The flow carrying the answers: from `new_dst` back to `src`, through the same relay
    /// addresses.
    pub fn reverse(&self) -> FlowSpec {
        FlowSpec {
            src: self.new_dst,
            dst: self.new_src,
            new_src: self.dst,
            new_dst: self.src,
            channel: self.channel.map(|op| match op {
                ChannelOp::Strip(number) => ChannelOp::Add(number),
                ChannelOp::Add(number) => ChannelOp::Strip(number),
            }),
            rtcp_to_userspace: false,
            opaque_payload: self.opaque_payload,
            to_worker: self.to_worker,
        }
    }

    /// The key the datapaths look packets up by.
    pub fn id(&self) -> FlowId {
        let channel = match self.channel {
            Some(ChannelOp::Strip(number)) => number,
            _ => 0,
        };
        (self.src, self.dst, channel)
    }

    pub fn fields(&self) -> [(&'static str, SocketAddr); 4] {
        [
            ("src", self.src),
            ("dst", self.dst),
            ("new_src", self.new_src),
            ("new_dst", self.new_dst),
        ]
    }

    /// Checks what makes sense for a unicast UDP relay. The relay's own addresses (`dst`,
    /// `new_src`) are checked by the datapath, which must be able to bind them.
    pub fn validate(&self) -> Result<(), FlowSpecError> {
        let refuse = |field, addr: SocketAddr, reason: &str| {
            Err(FlowSpecError {
                field,
                value: addr.to_string(),
                reason: reason.to_owned(),
            })
        };
        for (field, addr) in self.fields() {
            if addr.port() == 0 {
                return refuse(field, addr, "port 0 is not a UDP port one can send to");
            }
            let ip = addr.ip();
            if ip.is_unspecified() {
                return refuse(
                    field,
                    addr,
                    "the unspecified address is not a flow endpoint",
                );
            }
            if ip.is_multicast() || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
                return refuse(field, addr, "only unicast addresses can be relayed");
            }
            if ip.is_ipv4() != self.src.is_ipv4() {
                return refuse(
                    field,
                    addr,
                    "all four addresses of a flow must be of one family (IPv4/IPv6 translation is not supported)",
                );
            }
        }
        if self.src == self.new_dst {
            return refuse(
                "new_dst",
                self.new_dst,
                "would send packets back to their source",
            );
        }
        if let Some(op) = self.channel
            && !(CHANNEL_MIN..=CHANNEL_MAX).contains(&op.number())
        {
            return Err(FlowSpecError {
                field: "channel",
                value: format!("{:#06x}", op.number()),
                reason: "TURN channel numbers are 0x4000 through 0x7ffe (RFC 5766 11)".to_owned(),
            });
        }
        Ok(())
    }

    pub fn key(&self) -> FlowKey {
        FlowKey {
            src_addr: addr_words(self.src.ip()),
            dst_addr: addr_words(self.dst.ip()),
            src_port: self.src.port().to_be(),
            dst_port: self.dst.port().to_be(),
            family: family(self.src.ip()),
            channel: self.id().2,
        }
    }

    pub fn action(&self, flow_id: u32, generation: u32) -> FlowAction {
        FlowAction {
            new_src_addr: addr_words(self.new_src.ip()),
            new_dst_addr: addr_words(self.new_dst.ip()),
            new_src_port: self.new_src.port().to_be(),
            new_dst_port: self.new_dst.port().to_be(),
            flow_id,
            generation,
            channel_op: match self.channel {
                None => CHANNEL_OP_NONE,
                Some(ChannelOp::Strip(_)) => CHANNEL_OP_STRIP,
                Some(ChannelOp::Add(_)) => CHANNEL_OP_ADD,
            },
            channel_number: self.channel.map_or(0, ChannelOp::number),
            flags: if self.rtcp_to_userspace {
                FLOW_FLAG_RTCP_TO_USERSPACE
            } else {
                0
            } | if self.opaque_payload {
                FLOW_FLAG_OPAQUE_PAYLOAD
            } else {
                0
            } | if self.to_worker {
                FLOW_FLAG_TO_WORKER
            } else {
                0
            },
        }
    }

    /// Rebuilds a spec from what the kernel map holds (adopting pinned flows).
    pub fn from_kernel(key: &FlowKey, action: &FlowAction) -> FlowSpec {
        let addr = |words: &[u32; 4], port: u16| {
            let octets = address_octets(words);
            let ip = if key.family == FAMILY_IPV4 {
                IpAddr::from([octets[0], octets[1], octets[2], octets[3]])
            } else {
                IpAddr::from(octets)
            };
            SocketAddr::new(ip, u16::from_be(port))
        };
        FlowSpec {
            src: addr(&key.src_addr, key.src_port),
            dst: addr(&key.dst_addr, key.dst_port),
            new_src: addr(&action.new_src_addr, action.new_src_port),
            new_dst: addr(&action.new_dst_addr, action.new_dst_port),
            channel: match action.channel_op {
                CHANNEL_OP_STRIP => Some(ChannelOp::Strip(key.channel)),
                CHANNEL_OP_ADD => Some(ChannelOp::Add(action.channel_number)),
                _ => None,
            },
            rtcp_to_userspace: action.flags & FLOW_FLAG_RTCP_TO_USERSPACE != 0,
            opaque_payload: action.flags & FLOW_FLAG_OPAQUE_PAYLOAD != 0,
            to_worker: action.flags & FLOW_FLAG_TO_WORKER != 0,
        }
    }
}

fn family(ip: IpAddr) -> u16 {
    match ip {
        IpAddr::V4(_) => FAMILY_IPV4,
        IpAddr::V6(_) => FAMILY_IPV6,
    }
}

fn addr_words(ip: IpAddr) -> [u32; 4] {
    let octets = match ip {
        IpAddr::V4(v4) => {
            let mut octets = [0; 16];
            octets[..4].copy_from_slice(&v4.octets());
            octets
        }
        IpAddr::V6(v6) => v6.octets(),
    };
    address_words(&octets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(src: &str, dst: &str, new_src: &str, new_dst: &str) -> FlowSpec {
        FlowSpec {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            new_src: new_src.parse().unwrap(),
            new_dst: new_dst.parse().unwrap(),
            channel: None,
            rtcp_to_userspace: false,
            opaque_payload: false,
            to_worker: false,
        }
    }

    #[test]
    fn kernel_encoding_round_trips() {
        for flow in [
            spec(
                "198.51.100.7:4000",
                "203.0.113.1:20000",
                "10.0.0.1:30000",
                "10.0.0.5:5004",
            ),
            spec(
                "[2001:db8::7]:4000",
                "[2001:db8::1]:20000",
                "[fd00::1]:30000",
                "[fd00::5]:5004",
            ),
        ] {
            for channel in [
                None,
                Some(ChannelOp::Strip(0x4001)),
                Some(ChannelOp::Add(0x4fff)),
            ] {
                let flow = FlowSpec { channel, ..flow };
                let key = flow.key();
                let action = flow.action(7, 1);
                assert_eq!(FlowSpec::from_kernel(&key, &action), flow);
                assert_eq!(flow.reverse().reverse(), flow);
            }
        }
    }

    #[test]
    fn keys_are_in_network_byte_order() {
        let key = spec("1.2.3.4:258", "5.6.7.8:1", "9.9.9.9:2", "8.8.8.8:3").key();
        assert_eq!(address_octets(&key.src_addr)[..5], [1, 2, 3, 4, 0]);
        assert_eq!(key.src_port.to_ne_bytes(), [1, 2]);
        assert_eq!(key.family, FAMILY_IPV4);
    }

    #[test]
    fn bad_specs_name_the_field() {
        let err = spec("1.2.3.4:0", "5.6.7.8:1", "9.9.9.9:2", "8.8.8.8:3")
            .validate()
            .unwrap_err();
        assert_eq!(err.field, "src");
        let err = spec("1.2.3.4:1", "5.6.7.8:1", "[::1]:2", "8.8.8.8:3")
            .validate()
            .unwrap_err();
        assert_eq!(err.field, "new_src");
        let err = spec("1.2.3.4:1", "5.6.7.8:1", "9.9.9.9:2", "224.0.0.1:3")
            .validate()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "new_dst: 224.0.0.1:3: only unicast addresses can be relayed"
        );
        let err = spec("1.2.3.4:1", "5.6.7.8:1", "9.9.9.9:2", "1.2.3.4:1")
            .validate()
            .unwrap_err();
        assert_eq!(err.field, "new_dst");
        let err = FlowSpec {
            channel: Some(ChannelOp::Add(0x3fff)),
            ..spec("1.2.3.4:1", "5.6.7.8:1", "9.9.9.9:2", "8.8.8.8:3")
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "channel: 0x3fff: TURN channel numbers are 0x4000 through 0x7ffe (RFC 5766 11)"
        );
    }
}
