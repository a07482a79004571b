//! Rewrites a matched packet in place: MACs, VLAN id, addresses, ports, TTL / hop limit, and
//! the IPv4 header and UDP checksums, updated incrementally (RFC 1624).

use relay_common::{FlowAction, ipv4_octets};

use crate::{
    csum,
    nexthop::NextHop,
    parse::{Ip, UdpPacket},
};

/// # Safety
/// Every pointer in `packet` must have been bounds-checked by `parse::parse` and no
/// `bpf_xdp_adjust_*` may have run since.
#[inline(always)]
pub unsafe fn rewrite(packet: &UdpPacket, action: &FlowAction, next_hop: &NextHop) {
    unsafe {
        (*packet.eth).dst = next_hop.dmac;
        (*packet.eth).src = next_hop.smac;
        if let (Some(tag), Some(vlan_id)) = (packet.vlan, next_hop.vlan_id) {
            // Keep priority (PCP) and DEI, replace the 12-bit VLAN id.
            let tci = u16::from_be_bytes((*tag).tci);
            (*tag).tci = ((tci & 0xf000) | (vlan_id & 0x0fff)).to_be_bytes();
        }

        let udp = &mut *packet.udp;
        let old_ports = ports(udp.src_port, udp.dst_port);
        let new_ports = ports(action.new_src_port, action.new_dst_port);
        let ports_diff = csum::diff(0, &old_ports, &new_ports);
        udp.src_port = action.new_src_port;
        udp.dst_port = action.new_dst_port;

        match packet.ip {
            Ip::V4(ip) => {
                let ip = &mut *ip;
                let new_src = ipv4_octets(&action.new_src_addr);
                let new_dst = ipv4_octets(&action.new_dst_addr);
                let addr_diff = csum::diff(csum::diff(0, &ip.src, &new_src), &ip.dst, &new_dst);
                // TTL shares a 16-bit word with the protocol.
                let old_ttl_word = [ip.ttl, ip.protocol];
                ip.ttl -= 1;
                let ttl_diff = csum::diff(addr_diff, &old_ttl_word, &[ip.ttl, ip.protocol]);
                ip.check = csum::apply(ip.check, ttl_diff);
                // Zero means "no checksum" over IPv4 and stays zero (RFC 768).
                if udp.check != 0 {
                    let diff = addr_diff + ports_diff;
                    udp.check = csum::udp_nonzero(csum::apply(udp.check, diff));
                }
                ip.src = new_src;
                ip.dst = new_dst;
            }
            Ip::V6(ip) => {
                let ip = &mut *ip;
                let addr_diff = csum::diff(
                    csum::diff(ports_diff, &ip.src, &action.new_src_addr),
                    &ip.dst,
                    &action.new_dst_addr,
                );
                // The UDP checksum is mandatory over IPv6 (RFC 8200 8.1).
                udp.check = csum::udp_nonzero(csum::apply(udp.check, addr_diff));
                ip.src = action.new_src_addr;
                ip.dst = action.new_dst_addr;
                ip.hop_limit -= 1;
            }
        }
    }
}

#[inline(always)]
fn ports(src: u16, dst: u16) -> [u8; 4] {
    let src = src.to_ne_bytes();
    let dst = dst.to_ne_bytes();
    [src[0], src[1], dst[0], dst[1]]
}
