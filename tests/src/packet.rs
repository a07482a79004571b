//! Ethernet/IP/UDP frames built from scratch, with checksums computed here (RFC 1071), never
//! copied from the program under test.

use std::net::{IpAddr, SocketAddr};

pub const ETH_HEADER: usize = 14;
pub const VLAN_TAG: usize = 4;

#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// The full 802.1Q TCI (priority, DEI, VLAN id), when tagged.
    pub vlan_tci: Option<u16>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// TTL or hop limit.
    pub ttl: u8,
    pub ip_id: u16,
    /// IPv4 options (a multiple of 4 bytes).
    pub ipv4_options: Vec<u8>,
    /// IPv4 flags + fragment offset field.
    pub ipv4_frag: u16,
    /// Insert an IPv6 fragment extension header.
    pub ipv6_fragment_header: bool,
    /// IPv4 only: send with UDP checksum 0 ("none").
    pub zero_udp_checksum: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Frame {
        Frame {
            src_mac: [0x02, 0, 0, 0, 0, 0x01],
            dst_mac: [0x02, 0, 0, 0, 0, 0x02],
            vlan_tci: None,
            src,
            dst,
            ttl: 64,
            ip_id: 0x1234,
            ipv4_options: Vec::new(),
            ipv4_frag: 0x4000, // don't fragment
            ipv6_fragment_header: false,
            zero_udp_checksum: false,
            payload: payload.to_vec(),
        }
    }

    /// Offset of the IP header in the frame.
    pub fn ip_offset(&self) -> usize {
        ETH_HEADER + if self.vlan_tci.is_some() { VLAN_TAG } else { 0 }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        let ether_type: u16 = if self.src.is_ipv4() { 0x0800 } else { 0x86dd };
        if let Some(tci) = self.vlan_tci {
            frame.extend_from_slice(&0x8100u16.to_be_bytes());
            frame.extend_from_slice(&tci.to_be_bytes());
        }
        frame.extend_from_slice(&ether_type.to_be_bytes());
        let udp_len = 8 + self.payload.len();
        let mut udp = Vec::with_capacity(udp_len);
        udp.extend_from_slice(&self.src.port().to_be_bytes());
        udp.extend_from_slice(&self.dst.port().to_be_bytes());
        udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&self.payload);
        let mut pseudo = Vec::new();
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                pseudo.extend_from_slice(&src.octets());
                pseudo.extend_from_slice(&dst.octets());
                pseudo.extend_from_slice(&[0, 17]);
                pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
                if !self.zero_udp_checksum {
                    set_udp_checksum(&mut udp, &pseudo);
                }
                let header_len = 20 + self.ipv4_options.len();
                let mut ip = Vec::with_capacity(header_len);
                ip.push(0x40 | (header_len / 4) as u8);
                ip.push(0);
                ip.extend_from_slice(&((header_len + udp_len) as u16).to_be_bytes());
                ip.extend_from_slice(&self.ip_id.to_be_bytes());
                ip.extend_from_slice(&self.ipv4_frag.to_be_bytes());
                ip.push(self.ttl);
                ip.push(17);
                ip.extend_from_slice(&[0, 0]);
                ip.extend_from_slice(&src.octets());
                ip.extend_from_slice(&dst.octets());
                ip.extend_from_slice(&self.ipv4_options);
                let check = internet_checksum(&ip);
                ip[10..12].copy_from_slice(&check.to_be_bytes());
                frame.extend_from_slice(&ip);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                pseudo.extend_from_slice(&src.octets());
                pseudo.extend_from_slice(&dst.octets());
                pseudo.extend_from_slice(&(udp_len as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, 17]);
                set_udp_checksum(&mut udp, &pseudo);
                let extension = if self.ipv6_fragment_header { 8 } else { 0 };
                frame.extend_from_slice(&[0x60, 0, 0, 0]);
                frame.extend_from_slice(&((udp_len + extension) as u16).to_be_bytes());
                frame.push(if self.ipv6_fragment_header { 44 } else { 17 });
                frame.push(self.ttl);
                frame.extend_from_slice(&src.octets());
                frame.extend_from_slice(&dst.octets());
                if self.ipv6_fragment_header {
                    // Next header UDP, offset 0, more fragments, identification 1.
                    frame.extend_from_slice(&[17, 0, 0, 1, 0, 0, 0, 1]);
                }
            }
            _ => panic!("frame with mixed address families"),
        }
        frame.extend_from_slice(&udp);
        frame
    }
}

fn set_udp_checksum(udp: &mut [u8], pseudo: &[u8]) {
    let mut data = pseudo.to_vec();
    data.extend_from_slice(udp);
    let check = match internet_checksum(&data) {
        0 => 0xffff,
        check => check,
    };
    udp[6..8].copy_from_slice(&check.to_be_bytes());
}

/// The Internet checksum of `data` (RFC 1071), as a big-endian value.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = match chunk {
            [hi, lo] => u16::from_be_bytes([*hi, *lo]),
            [hi] => u16::from_be_bytes([*hi, 0]),
            _ => unreachable!(),
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ARP request, for the "not IP" fixture.
pub fn arp_request() -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x06]);
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 10, 1, 0, 2]);
    frame.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 1, 0, 1]);
    frame
}

/// A STUN Binding request (RFC 8489) payload: first byte 0, magic cookie.
pub fn stun_binding_request() -> Vec<u8> {
    let mut message = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    message.extend_from_slice(&[7; 12]);
    message
}

/// A TURN ChannelData message (RFC 8656 12.4) carrying `data`, without padding.
pub fn channel_data(number: u16, data: &[u8]) -> Vec<u8> {
    let mut message = number.to_be_bytes().to_vec();
    message.extend_from_slice(&(data.len() as u16).to_be_bytes());
    message.extend_from_slice(data);
    message
}

/// An RTP packet (version 2, PT 0 / PCMU) with a 160-byte payload: 172 bytes, a 20 ms G.711
/// frame.
pub fn rtp_payload(sequence: u16) -> Vec<u8> {
    let mut rtp = vec![0x80, 0x00];
    rtp.extend_from_slice(&sequence.to_be_bytes());
    rtp.extend_from_slice(&(u32::from(sequence) * 160).to_be_bytes());
    rtp.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    rtp.extend(std::iter::repeat_n(0xd5, 160));
    rtp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2.
        assert_eq!(
            internet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }

    #[test]
    fn a_built_ipv4_header_checks_to_zero() {
        let frame = Frame::udp(
            "10.0.0.1:1".parse().unwrap(),
            "10.0.0.2:2".parse().unwrap(),
            b"x",
        )
        .bytes();
        assert_eq!(internet_checksum(&frame[14..34]), 0);
    }
}
