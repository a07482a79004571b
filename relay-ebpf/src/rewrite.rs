//! Rewrites a matched packet in place: MACs, VLAN id, addresses, ports, TTL / hop limit,
//! lengths after a ChannelData edit, and the IPv4 header and UDP checksums, updated
//! incrementally (RFC 1624).

use relay_common::FlowAction;

use crate::{
    channel_data::{Edit, HEADER_LEN},
    csum,
    nexthop::NextHop,
    parse::{Ip, UdpPacket},
};

/// `edit` says what `channel_data` did to the payload: the length fields still hold the
/// lengths from before it, and the checksum still covers the old payload.
///
/// # Safety
/// Every pointer in `packet` must have been bounds-checked (by `parse::parse`, or
/// `UdpPacket::reload` after a `bpf_xdp_adjust_head`) and the packet not resized since.
#[inline(always)]
pub unsafe fn rewrite(packet: &UdpPacket, action: &FlowAction, next_hop: &NextHop, edit: Edit) {
    unsafe {
        (*packet.eth).dst = next_hop.dmac;
        (*packet.eth).src = next_hop.smac;
        if let (Some(tag), Some(vlan_id)) = (packet.vlan, next_hop.vlan_id) {
            // Keep priority (PCP) and DEI, replace the 12-bit VLAN id.
            let tci = u16::from_be((*tag).tci);
            (*tag).tci = ((tci & 0xf000) | (vlan_id & 0x0fff)).to_be();
        }

        let udp = &mut *packet.udp;
        let ports_diff = csum::diff16(
            csum::diff16(0, udp.src_port, action.new_src_port),
            udp.dst_port,
            action.new_dst_port,
        );
        udp.src_port = action.new_src_port;
        udp.dst_port = action.new_dst_port;
        // The ChannelData header words leave or join the checksummed data; the UDP length is
        // in the header and in the pseudo-header, so its change counts twice.
        let (delta, payload_diff) = match edit {
            Edit::None => (0, 0),
            Edit::Stripped(channel) => (
                -(HEADER_LEN as i32),
                csum::diff16(
                    csum::diff16(0, channel.number.to_be(), 0),
                    channel.length.to_be(),
                    0,
                ),
            ),
            Edit::Added(channel) => (
                HEADER_LEN as i32,
                csum::diff16(
                    csum::diff16(0, 0, channel.number.to_be()),
                    0,
                    channel.length.to_be(),
                ),
            ),
        };
        let old_udp_len = udp.len;
        let new_udp_len = resized(old_udp_len, delta);
        udp.len = new_udp_len;
        let ports_diff = csum::diff16(
            csum::diff16(ports_diff + payload_diff, old_udp_len, new_udp_len),
            old_udp_len,
            new_udp_len,
        );

        match packet.ip {
            Ip::V4(ip) => {
                let ip = &mut *ip;
                let new_src = action.new_src_addr[0];
                let new_dst = action.new_dst_addr[0];
                let addr_diff = csum::diff32(csum::diff32(0, ip.src, new_src), ip.dst, new_dst);
                // TTL shares a 16-bit word with the protocol.
                let old_ttl_word = u16::from_ne_bytes([ip.ttl, ip.protocol]);
                ip.ttl -= 1;
                let new_ttl_word = u16::from_ne_bytes([ip.ttl, ip.protocol]);
                let old_tot_len = ip.tot_len;
                ip.tot_len = resized(old_tot_len, delta);
                let header_diff = csum::diff16(addr_diff, old_tot_len, ip.tot_len);
                ip.check = csum::apply(
                    ip.check,
                    csum::diff16(header_diff, old_ttl_word, new_ttl_word),
                );
                // Zero means "no checksum" over IPv4 and stays zero (RFC 768).
                if udp.check != 0 {
                    udp.check = csum::udp_nonzero(csum::apply(udp.check, addr_diff + ports_diff));
                }
                ip.src = new_src;
                ip.dst = new_dst;
            }
            Ip::V6(ip) => {
                let ip = &mut *ip;
                let addr_diff = csum::diff128(
                    csum::diff128(ports_diff, &ip.src, &action.new_src_addr),
                    &ip.dst,
                    &action.new_dst_addr,
                );
                ip.payload_len = resized(ip.payload_len, delta);
                // The UDP checksum is mandatory over IPv6 (RFC 8200 8.1).
                udp.check = csum::udp_nonzero(csum::apply(udp.check, addr_diff));
                store_address(&mut ip.src, &action.new_src_addr);
                store_address(&mut ip.dst, &action.new_dst_addr);
                ip.hop_limit -= 1;
            }
        }
    }
}

/// Copies an IPv6 address a word at a time; a plain array assignment becomes a call to a
/// byte-loop memmove subprogram on this target.
#[inline(always)]
fn store_address(dst: &mut [u32; 4], src: &[u32; 4]) {
    for i in 0..4 {
        // SAFETY: i < 4; volatile so LLVM cannot fold the stores back into a memmove.
        unsafe { (&raw mut dst[i]).write_volatile(src[i]) };
    }
}

/// A big-endian length field grown or shrunk by `delta` bytes.
#[inline(always)]
fn resized(field: u16, delta: i32) -> u16 {
    ((i32::from(u16::from_be(field)) + delta) as u16).to_be()
}
