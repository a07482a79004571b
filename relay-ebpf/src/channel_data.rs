//! TURN ChannelData framing in the fast path (RFC 8656 section 12): strip the 4-byte header
//! from client -> relay packets, prepend it to peer -> relay packets. The headers in front
//! of the UDP payload (Ethernet, VLAN tag, IP, UDP) are moved by 4 bytes and the packet start
//! is adjusted with `bpf_xdp_adjust_head` (katran `pckt_encap.h`, firezone's
//! `move_headers.rs`); every packet pointer is invalid afterwards and is looked up again.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use relay_common::Verdict;

use crate::parse::{ChannelHeader, UdpPacket, ptr_at};

/// Size of the ChannelData header.
pub const HEADER_LEN: u16 = 4;
/// Ethernet + VLAN tag + IPv6 + UDP: the most header bytes that are ever moved.
const MAX_HEADER_WORDS: usize = (14 + 4 + 40 + 8) / 2;

/// What happened to the ChannelData header, for the checksum and length updates.
#[derive(Clone, Copy)]
pub enum Edit {
    None,
    Stripped(ChannelHeader),
    Added(ChannelHeader),
}

/// Checks that a packet can be stripped: ChannelData whose Length covers the rest of the
/// UDP payload exactly. Padding after the data (allowed over UDP) would have to be trimmed
/// from the tail; such packets go to userspace. So does STUN or DTLS inside the channel
/// (RFC 7983 on the data's first byte) unless the flow's payload is `opaque`: ICE checks
/// and consent of a TURN-only app whose peer is a call in this relay must reach the relay's
/// ICE agent, not the PBX; a plain TURN channel carries the client's data, whatever it is.
#[inline(always)]
pub fn check_strip(
    ctx: &XdpContext,
    packet: &UdpPacket,
    opaque: bool,
) -> Result<ChannelHeader, Verdict> {
    let channel = packet.channel.ok_or(Verdict::PassNoFlow)?;
    if 8 + HEADER_LEN + channel.length != packet.udp_len || !fills_ip_payload(packet) {
        return Err(Verdict::PassChannelLength);
    }
    if !opaque && channel.length > 0 {
        let first: *const u8 = ptr_at(ctx, packet.payload_offset() + usize::from(HEADER_LEN))
            .ok_or(Verdict::PassMalformed)?;
        // SAFETY: ptr_at checked that the byte is inside the packet.
        if let 0..=3 | 20..=63 = unsafe { *first } {
            return Err(Verdict::PassStunDtls);
        }
    }
    Ok(channel)
}

/// Checks that a packet can get a header: its UDP datagram must fill the IP payload, so that
/// the lengths stay consistent.
#[inline(always)]
pub fn check_add(packet: &UdpPacket, number: u16) -> Result<ChannelHeader, Verdict> {
    if !fills_ip_payload(packet) {
        return Err(Verdict::PassMalformed);
    }
    Ok(ChannelHeader {
        number,
        length: packet.udp_len - 8,
    })
}

#[inline(always)]
fn fills_ip_payload(packet: &UdpPacket) -> bool {
    usize::from(packet.ip_len) == packet.udp_offset - packet.ip_offset + usize::from(packet.udp_len)
}

/// Removes the ChannelData header: the headers move 4 bytes toward the payload, then the
/// packet start moves past the 4 stale bytes. Cannot fail for a packet `check_strip`
/// accepted, so a failure is a broken invariant.
#[inline(always)]
pub fn strip(ctx: &XdpContext, packet: &UdpPacket) -> Result<(), ()> {
    let words = packet.payload_offset() / 2;
    // Overlapping move toward higher addresses: last word first.
    let mut i = MAX_HEADER_WORDS;
    while i > 0 {
        i -= 1;
        if i < words {
            copy_word(ctx, 2 * i, 2 * i + HEADER_LEN as usize)?;
        }
    }
    // SAFETY: ctx is the program's context; a positive delta shrinks the packet.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, HEADER_LEN as i32) } != 0 {
        return Err(());
    }
    Ok(())
}

/// Prepends a ChannelData header: the packet start moves 4 bytes back, the headers move to
/// the new start, and the header is written between them and the payload. Ok(false), with
/// the packet as it was, when the driver left no headroom; an error is a broken invariant.
#[inline(always)]
pub fn add(ctx: &XdpContext, packet: &UdpPacket, channel: ChannelHeader) -> Result<bool, ()> {
    // SAFETY: ctx is the program's context; a negative delta grows the packet at the front.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(HEADER_LEN as i32)) } != 0 {
        return Ok(false);
    }
    let words = packet.payload_offset() / 2;
    // Overlapping move toward lower addresses: first word first.
    let mut i = 0;
    while i < MAX_HEADER_WORDS {
        if i < words {
            copy_word(ctx, 2 * i + HEADER_LEN as usize, 2 * i)?;
        }
        i += 1;
    }
    let header: *mut [u16; 2] = ptr_at(ctx, packet.payload_offset()).ok_or(())?;
    // SAFETY: ptr_at checked that the 4 bytes are inside the packet.
    unsafe { *header = [channel.number.to_be(), channel.length.to_be()] };
    Ok(true)
}

#[inline(always)]
fn copy_word(ctx: &XdpContext, from: usize, to: usize) -> Result<(), ()> {
    // Both bounds checks are for the verifier: the offsets are within the headers parsed.
    let source: *const u16 = ptr_at(ctx, from).ok_or(())?;
    let target: *mut u16 = ptr_at(ctx, to).ok_or(())?;
    // SAFETY: both are inside the packet.
    unsafe { *target = *source };
    Ok(())
}
