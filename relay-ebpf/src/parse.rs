//! Header parsing, one function per header, each bounds-checked (katran `pckt_parsing.h`).
//!
//! Every function returns either the parsed header or the [`Verdict`] to pass the packet with.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use relay_common::{FAMILY_IPV4, FAMILY_IPV6, Verdict};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const IPPROTO_UDP: u8 = 17;
const IPV6_FRAGMENT_HEADER: u8 = 44;

// Header layouts as the kernel declares them: multi-byte fields are typed words holding the
// wire bytes (network byte order) so that LLVM loads and stores them whole. The IP header
// sits 2 bytes off a 4-byte boundary behind Ethernet; the verifier allows such packet
// accesses on architectures with efficient unaligned access (x86-64, arm64), as Katran's and
// Cilium's C structs rely on.

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: u16,
}

#[repr(C)]
pub struct VlanHdr {
    /// PCP (3 bits), DEI (1), VLAN id (12).
    pub tci: u16,
    pub inner_ether_type: u16,
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub check: u16,
    pub src: u32,
    pub dst: u32,
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub version_class_flow: u32,
    pub payload_len: u16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

#[repr(C)]
pub struct UdpHdr {
    pub src_port: u16,
    pub dst_port: u16,
    pub len: u16,
    pub check: u16,
}

/// The one bounds-checked accessor: a pointer to a `T` at `offset`, if the packet holds it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[derive(Clone, Copy)]
pub enum Ip {
    V4(*mut Ipv4Hdr),
    V6(*mut Ipv6Hdr),
}

/// A TURN ChannelData header (RFC 8656 12.4), host byte order.
#[derive(Clone, Copy)]
pub struct ChannelHeader {
    pub number: u16,
    /// Length of the application data that follows, padding excluded.
    pub length: u16,
}

/// The headers of a UDP packet the program may forward.
pub struct UdpPacket {
    pub eth: *mut EthHdr,
    /// The 802.1Q tag, when the frame carries one.
    pub vlan: Option<*mut VlanHdr>,
    pub ip: Ip,
    pub udp: *mut UdpHdr,
    /// IP total length in bytes (header included), host byte order.
    pub ip_len: u16,
    /// UDP length (header included), host byte order.
    pub udp_len: u16,
    pub ip_offset: usize,
    pub udp_offset: usize,
    /// Present when the payload is ChannelData (first byte 64..=79, RFC 7983).
    pub channel: Option<ChannelHeader>,
    /// The payload starts like STUN or DTLS (first byte 0..=3 or 20..=63, RFC 7983): for
    /// userspace where the relay is itself the ICE and DTLS endpoint, data elsewhere.
    pub stun_dtls: bool,
}

impl UdpPacket {
    pub fn family(&self) -> u16 {
        match self.ip {
            Ip::V4(_) => FAMILY_IPV4,
            Ip::V6(_) => FAMILY_IPV6,
        }
    }

    /// Offset of the UDP payload: everything before it is headers.
    pub fn payload_offset(&self) -> usize {
        self.udp_offset + size_of::<UdpHdr>()
    }

    /// The same headers at the same offsets, looked up again after `bpf_xdp_adjust_head`,
    /// which invalidates every packet pointer (the verifier insists, and rightly).
    #[inline(always)]
    pub fn reload(&self, ctx: &XdpContext) -> Option<UdpPacket> {
        Some(UdpPacket {
            eth: ptr_at(ctx, 0)?,
            vlan: match self.vlan {
                Some(_) => Some(ptr_at(ctx, size_of::<EthHdr>())?),
                None => None,
            },
            ip: match self.ip {
                Ip::V4(_) => Ip::V4(ptr_at(ctx, self.ip_offset)?),
                Ip::V6(_) => Ip::V6(ptr_at(ctx, self.ip_offset)?),
            },
            udp: ptr_at(ctx, self.udp_offset)?,
            ..*self
        })
    }
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<UdpPacket, Verdict> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::PassMalformed)?;
    let mut offset = size_of::<EthHdr>();
    // SAFETY: ptr_at checked that the header is inside the packet.
    let mut ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let mut vlan = None;
    if ether_type == ETH_P_8021Q {
        let tag: *mut VlanHdr = ptr_at(ctx, offset).ok_or(Verdict::PassMalformed)?;
        ether_type = u16::from_be(unsafe { (*tag).inner_ether_type });
        offset += size_of::<VlanHdr>();
        vlan = Some(tag);
    }
    let (ip, ip_len, udp_offset) = match ether_type {
        ETH_P_IP => parse_ipv4(ctx, offset)?,
        ETH_P_IPV6 => parse_ipv6(ctx, offset)?,
        // A second tag (QinQ) lands here too.
        _ => return Err(Verdict::PassNotIp),
    };
    let (udp, udp_len, payload) = parse_udp(ctx, offset, udp_offset, ip_len)?;
    Ok(UdpPacket {
        eth,
        vlan,
        ip,
        udp,
        ip_len,
        udp_len,
        ip_offset: offset,
        udp_offset,
        channel: match payload {
            Payload::Channel(channel) => Some(channel),
            _ => None,
        },
        stun_dtls: matches!(payload, Payload::StunDtls),
    })
}

/// Returns the header, the IP total length and the offset of the UDP header.
#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, offset: usize) -> Result<(Ip, u16, usize), Verdict> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, offset).ok_or(Verdict::PassMalformed)?;
    // SAFETY: ptr_at checked that the fixed header is inside the packet.
    let hdr = unsafe { &*ip };
    if hdr.version_ihl >> 4 != 4 {
        return Err(Verdict::PassMalformed);
    }
    match hdr.version_ihl & 0x0f {
        5 => {}
        0..=4 => return Err(Verdict::PassMalformed),
        _ => return Err(Verdict::PassIpOptions),
    }
    let tot_len = u16::from_be(hdr.tot_len);
    // Shorter than its header or longer than the frame: the kernel drops and counts it.
    if usize::from(tot_len) < size_of::<Ipv4Hdr>()
        || offset + usize::from(tot_len) > ctx.data_end() - ctx.data()
    {
        return Err(Verdict::PassMalformed);
    }
    // More-fragments flag or a fragment offset: only the kernel can reassemble.
    if u16::from_be(hdr.frag_off) & 0x3fff != 0 {
        return Err(Verdict::PassFragment);
    }
    if hdr.protocol != IPPROTO_UDP {
        return Err(Verdict::PassNotUdp);
    }
    if hdr.ttl <= 1 {
        return Err(Verdict::PassTtlExpired);
    }
    Ok((Ip::V4(ip), tot_len, offset + size_of::<Ipv4Hdr>()))
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, offset: usize) -> Result<(Ip, u16, usize), Verdict> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, offset).ok_or(Verdict::PassMalformed)?;
    // SAFETY: ptr_at checked that the fixed header is inside the packet.
    let hdr = unsafe { &*ip };
    if u32::from_be(hdr.version_class_flow) >> 28 != 6 {
        return Err(Verdict::PassMalformed);
    }
    let payload_len = u16::from_be(hdr.payload_len);
    let tot_len = payload_len as usize + size_of::<Ipv6Hdr>();
    // Jumbograms (payload length 0) and lengths beyond the frame are the kernel's business.
    if payload_len == 0 || offset + tot_len > ctx.data_end() - ctx.data() {
        return Err(Verdict::PassMalformed);
    }
    match hdr.next_header {
        IPPROTO_UDP => {}
        IPV6_FRAGMENT_HEADER => return Err(Verdict::PassFragment),
        _ => return Err(Verdict::PassNotUdp),
    }
    if hdr.hop_limit <= 1 {
        return Err(Verdict::PassTtlExpired);
    }
    Ok((Ip::V6(ip), tot_len as u16, offset + size_of::<Ipv6Hdr>()))
}

/// RTCP multiplexed with RTP (RFC 5761 section 4): version 2 and a second byte (RTCP's
/// packet type; RTP's marker and payload type) in 192..=223. In ChannelData (a TURN-only
/// app's call) the data after the 4-byte header.
#[inline(always)]
pub fn is_rtcp(ctx: &XdpContext, packet: &UdpPacket) -> bool {
    let data = packet.payload_offset() + if packet.channel.is_some() { 4 } else { 0 };
    let Some(head) = ptr_at::<[u8; 2]>(ctx, data) else {
        return false;
    };
    // SAFETY: ptr_at checked that the 2 bytes are inside the packet.
    let [first, second] = unsafe { *head };
    first >> 6 == 2 && (192..=223).contains(&second)
}

/// What a UDP payload's first byte says it is (RFC 7983).
enum Payload {
    StunDtls,
    Channel(ChannelHeader),
    Other,
}

/// Checks the UDP header and classifies the payload by its first byte (RFC 7983).
#[inline(always)]
fn parse_udp(
    ctx: &XdpContext,
    ip_offset: usize,
    udp_offset: usize,
    ip_len: u16,
) -> Result<(*mut UdpHdr, u16, Payload), Verdict> {
    let udp: *mut UdpHdr = ptr_at(ctx, udp_offset).ok_or(Verdict::PassMalformed)?;
    // SAFETY: ptr_at checked that the header is inside the packet.
    let udp_len = u16::from_be(unsafe { (*udp).len });
    let ip_payload = usize::from(ip_len) - (udp_offset - ip_offset);
    if usize::from(udp_len) < size_of::<UdpHdr>() || usize::from(udp_len) > ip_payload {
        return Err(Verdict::PassMalformed);
    }
    if usize::from(udp_len) == size_of::<UdpHdr>() {
        return Err(Verdict::PassEmptyPayload);
    }
    let payload = udp_offset + size_of::<UdpHdr>();
    let first: *const u8 = ptr_at(ctx, payload).ok_or(Verdict::PassMalformed)?;
    // SAFETY: ptr_at checked that the byte is inside the packet.
    match unsafe { *first } {
        // STUN (ICE checks, consent, TURN control) and DTLS handshakes: for userspace unless
        // the flow says its payload is someone else's data.
        0..=3 | 20..=63 => Ok((udp, udp_len, Payload::StunDtls)),
        // TURN ChannelData: channel number and length, 2 bytes each. RFC 7983 gives channels
        // 64..=79; RFC 5766 clients use numbers up to 0x7ffe (relay-common CHANNEL_MAX).
        64..=127 => {
            let header: *const [u16; 2] = ptr_at(ctx, payload).ok_or(Verdict::PassMalformed)?;
            // SAFETY: ptr_at checked that the 4 bytes are inside the packet.
            let [number, length] = unsafe { *header };
            let channel = ChannelHeader {
                number: u16::from_be(number),
                length: u16::from_be(length),
            };
            Ok((udp, udp_len, Payload::Channel(channel)))
        }
        _ => Ok((udp, udp_len, Payload::Other)),
    }
}
