//! Types shared by the XDP program (`relay-ebpf`) and the userspace control plane.
//!
//! Everything here is `#[repr(C)]` with explicit padding and no `bool`, so that the kernel and
//! userspace agree on every byte (and `aya::Pod` has no implicit padding to leak). Addresses and
//! ports are kept in network byte order exactly as they appear on the wire, so the XDP program
//! can compare and copy them without swapping. Addresses are held as four u32 words (the wire
//! bytes read in native order) and map types are 8-byte aligned, so the program copies and
//! zeroes them a word at a time: with byte arrays LLVM emits calls to byte-loop memset/memmove
//! subprograms, which cost more than the rest of the hot path together.
#![no_std]

/// Name of the XDP program that forwards flows.
pub const XDP_RELAY_PROGRAM: &str = "relay_xdp";
/// Name of a trivial XDP program that passes everything. On veth, a frame redirected out of an
/// interface is delivered only when its peer runs native XDP (or has GRO on).
pub const XDP_PASS_PROGRAM: &str = "relay_xdp_pass";

/// Flow table: [`FlowKey`] -> [`FlowValue`].
pub const FLOWS_MAP: &str = "RELAY_FLOWS";
/// Default capacity of the flow table; relayd can override it at load time.
pub const FLOWS_DEFAULT_CAPACITY: u32 = 131_072;
/// Per-CPU array of [`StatCounter`], indexed by [`Verdict`].
pub const STATS_MAP: &str = "RELAY_STATS";
/// Devmap of the interfaces XDP may redirect to (key and value: ifindex).
pub const EGRESS_MAP: &str = "RELAY_EGRESS";
pub const EGRESS_CAPACITY: u32 = 64;
/// VLAN devices: ifindex of the VLAN device -> [`VlanDevice`] (its parent and VLAN id).
pub const VLANS_MAP: &str = "RELAY_VLANS";
pub const VLANS_CAPACITY: u32 = 256;
/// AF_XDP sockets of the transcryption workers (XSKMAP), indexed by an interface's first
/// index (in [`XSK_INDEX_MAP`]) plus the receive queue.
pub const XSKS_MAP: &str = "RELAY_XSKS";
/// Receive queues per interface that can have a worker socket.
pub const XSK_QUEUES_PER_INTERFACE: u32 = 16;
pub const XSKS_CAPACITY: u32 = EGRESS_CAPACITY * XSK_QUEUES_PER_INTERFACE;
/// ifindex -> the interface's first index in [`XSKS_MAP`] (u32, host byte order).
pub const XSK_INDEX_MAP: &str = "RELAY_XSK_INDEX";

/// Address family of a flow key (same numbers as `AF_INET` / `AF_INET6`).
pub const FAMILY_IPV4: u16 = 2;
pub const FAMILY_IPV6: u16 = 10;

/// TURN channel numbers: 0x4000 through 0x7FFE as RFC 5766 defined them. RFC 8656 narrowed
/// the range to 0x4FFF, but deployed clients (coturn's among them) still use the old one,
/// whose first byte (64..=127) is still unambiguous next to STUN, DTLS and RTP (RFC 7983).
pub const CHANNEL_MIN: u16 = 0x4000;
pub const CHANNEL_MAX: u16 = 0x7ffe;

/// [`FlowAction::channel_op`]: what to do with the TURN ChannelData header (RFC 8656 12.4).
/// Forward the UDP payload as it is.
pub const CHANNEL_OP_NONE: u8 = 0;
/// The packet is ChannelData on [`FlowKey::channel`]: remove the 4-byte header (client ->
/// relay -> peer).
pub const CHANNEL_OP_STRIP: u8 = 1;
/// Prepend a ChannelData header with [`FlowAction::channel_number`] (peer -> relay -> client).
pub const CHANNEL_OP_ADD: u8 = 2;

/// [`FlowAction::flags`]: RTCP on the flow (RFC 5761: second byte 192..=223) goes to
/// userspace, which sends it to a peer that keeps RTCP on its own port (a PBX without
/// rtcp-mux); RTP stays in the kernel.
pub const FLOW_FLAG_RTCP_TO_USERSPACE: u8 = 1;
/// [`FlowAction::flags`]: the payload is someone's data (a TURN channel's, both ways), not a
/// demultiplexing point of the relay's: forwarded whatever its first byte. Without it, a
/// payload that starts like STUN or DTLS (RFC 7983) goes to userspace, where the relay's
/// own ICE agent and DTLS endpoint are.
pub const FLOW_FLAG_OPAQUE_PAYLOAD: u8 = 2;
/// [`FlowAction::flags`]: the flow's media is transcrypted (SRTP <-> RTP, or between two
/// sets of keys): the program resolves the next hop, puts a [`WorkerMeta`] before the
/// packet and redirects it, unchanged, to the AF_XDP socket of its interface and receive
/// queue, where a userspace worker rewrites it. With no socket there the packet goes up to
/// the kernel as it came, for the relay's sockets.
pub const FLOW_FLAG_TO_WORKER: u8 = 4;

/// One direction of one leg, as seen on the wire: a UDP packet from `src` to `dst`.
///
/// An IPv4 address occupies the first word of an address; the other three are zero.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address, network byte order.
    pub src_addr: [u32; 4],
    /// Destination address (one of the relay's own), network byte order.
    pub dst_addr: [u32; 4],
    /// Source port, network byte order.
    pub src_port: u16,
    /// Destination port, network byte order.
    pub dst_port: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u16,
    /// The TURN channel number of a ChannelData packet (host byte order), 0 for any other
    /// payload: one client 4-tuple carries one flow per bound channel.
    pub channel: u16,
}

/// What to do with a packet that matched a [`FlowKey`]: re-send it from `new_src` to `new_dst`.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowAction {
    /// New source address (the relay's address on the egress side), network byte order.
    pub new_src_addr: [u32; 4],
    /// New destination address, network byte order.
    pub new_dst_addr: [u32; 4],
    /// New source port, network byte order.
    pub new_src_port: u16,
    /// New destination port, network byte order.
    pub new_dst_port: u16,
    /// Identifier userspace gave the flow, host byte order.
    pub flow_id: u32,
    /// Bumped by userspace each time the flow is replaced in place, host byte order.
    pub generation: u32,
    /// One of the `CHANNEL_OP_*` constants. (With `flags`, what was one u16 holding the
    /// operation: flows pinned by an older relayd read as flags 0 on little-endian hosts.)
    pub channel_op: u8,
    /// `FLOW_FLAG_*` bits.
    pub flags: u8,
    /// The channel number [`CHANNEL_OP_ADD`] writes, host byte order.
    pub channel_number: u16,
}

/// Per-flow counters, updated atomically by the XDP program. Host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    pub packets: u64,
    /// IP-layer bytes (IP header included, Ethernet excluded) as received.
    pub bytes: u64,
    /// CLOCK_MONOTONIC of the last packet as of the kernel's last timer tick
    /// (`bpf_ktime_get_coarse_ns()`, up to a tick behind), or of installation.
    pub last_seen_ns: u64,
}

/// The next hop the XDP program resolved for a flow with `bpf_fib_lookup`, cached so that
/// most packets skip the lookup (the largest single cost of the hot path). Written by the
/// program, re-resolved after [`NEXT_HOP_CACHE_NS`] so route and neighbour changes are
/// picked up; userspace installs it zeroed. Host byte order.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHopCache {
    /// `bpf_ktime_get_coarse_ns()` when resolved; 0: not resolved.
    pub resolved_ns: u64,
    /// Interface to send on (the parent, for a VLAN device).
    pub ifindex: u32,
    /// MTU of the egress route.
    pub mtu: u16,
    /// VLAN id to tag with; 0: untagged.
    pub vlan_id: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub _pad: [u8; 4],
}

/// How long a resolved next hop is used before the program looks it up again.
pub const NEXT_HOP_CACHE_NS: u64 = 1_000_000_000;

#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowValue {
    pub action: FlowAction,
    pub counters: FlowCounters,
    pub next_hop: NextHopCache,
}

/// What the program tells a worker about a packet it redirects to an AF_XDP socket: the XDP
/// metadata right before the packet (`bpf_xdp_adjust_meta`). Host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerMeta {
    /// [`FlowAction::flow_id`] of the flow the packet matched.
    pub flow_id: u32,
    /// Interface to send the result on (untagged: VLAN next hops stay on the socket path).
    pub ifindex: u32,
    /// MAC addresses of that next hop, as the fib lookup gave them.
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// A VLAN device the fib lookup may return as egress: XDP sends on `parent_ifindex` with the
/// tag rewritten to `vlan_id`. Host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VlanDevice {
    pub parent_ifindex: u32,
    pub vlan_id: u16,
    pub _pad: [u8; 2],
}

/// Packets and bytes counted for one [`Verdict`]. Host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatCounter {
    pub packets: u64,
    pub bytes: u64,
}

/// Why the XDP program did what it did with a packet: the index into [`STATS_MAP`].
///
/// Defined once here and mirrored nowhere else; userspace prints [`Verdict::name`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forwarded out of the interface it came in on.
    Tx = 0,
    /// Forwarded out of another interface through the egress devmap.
    Redirect,
    /// Not IPv4/IPv6 (ARP, LLDP, ...), or a second VLAN tag.
    PassNotIp,
    /// IP but not UDP, or an IPv6 extension header.
    PassNotUdp,
    /// A header is shorter than its fixed part or than the length it claims.
    PassMalformed,
    /// IPv4 fragment or IPv6 fragment header: the kernel reassembles.
    PassFragment,
    /// IPv4 header with options.
    PassIpOptions,
    /// TTL or hop limit <= 1: the kernel sends the ICMP time exceeded.
    PassTtlExpired,
    /// STUN (first payload byte 0..=3) or DTLS (20..=63), RFC 7983: for the control plane.
    PassStunDtls,
    /// UDP with no payload byte to classify.
    PassEmptyPayload,
    /// No flow for this 4-tuple (including a known relay port from an unregistered source).
    PassNoFlow,
    /// The fib lookup found a route but no neighbour entry: userspace sends this one.
    PassNoNeighbour,
    /// The fib lookup failed otherwise (no route, forwarding disabled, blackhole, ...).
    PassFibFailed,
    /// The packet is bigger than the egress MTU.
    PassTooBig,
    /// The egress interface is not in the egress devmap.
    PassNoEgress,
    /// Tagged in, untagged out or the reverse: pushing/popping a tag is left to the kernel.
    PassVlanMismatch,
    /// ChannelData with padding after its data (allowed over UDP, RFC 8656 12.5), or whose
    /// Length does not fit the packet: userspace handles it.
    PassChannelLength,
    /// No headroom to prepend a ChannelData header.
    PassNoHeadroom,
    /// RTCP on a flow whose peer wants it on its own port (`FLOW_FLAG_RTCP_TO_USERSPACE`).
    PassRtcp,
    /// Redirected to a transcryption worker's AF_XDP socket (`FLOW_FLAG_TO_WORKER`).
    ToWorker,
    /// A `FLOW_FLAG_TO_WORKER` flow's packet that no worker can take here (no socket on
    /// this interface and queue, a VLAN on either side, no metadata room): up to the
    /// kernel unchanged, where the relay's sockets transcrypt it.
    PassNoWorker,
    /// XDP_ABORTED: a check the verifier needs failed where it cannot (a broken invariant in
    /// the program); the packet is dropped. Last: relayd renews the stats map when the
    /// number of verdicts changes.
    Aborted,
}

impl Verdict {
    pub const COUNT: u32 = 22;

    pub const ALL: [Verdict; Self::COUNT as usize] = [
        Verdict::Tx,
        Verdict::Redirect,
        Verdict::PassNotIp,
        Verdict::PassNotUdp,
        Verdict::PassMalformed,
        Verdict::PassFragment,
        Verdict::PassIpOptions,
        Verdict::PassTtlExpired,
        Verdict::PassStunDtls,
        Verdict::PassEmptyPayload,
        Verdict::PassNoFlow,
        Verdict::PassNoNeighbour,
        Verdict::PassFibFailed,
        Verdict::PassTooBig,
        Verdict::PassNoEgress,
        Verdict::PassVlanMismatch,
        Verdict::PassChannelLength,
        Verdict::PassNoHeadroom,
        Verdict::PassRtcp,
        Verdict::ToWorker,
        Verdict::PassNoWorker,
        Verdict::Aborted,
    ];

    /// Stable snake_case name, used in `relayctl stats` and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Tx => "tx",
            Verdict::Redirect => "redirect",
            Verdict::PassNotIp => "pass_not_ip",
            Verdict::PassNotUdp => "pass_not_udp",
            Verdict::PassMalformed => "pass_malformed",
            Verdict::PassFragment => "pass_fragment",
            Verdict::PassIpOptions => "pass_ip_options",
            Verdict::PassTtlExpired => "pass_ttl_expired",
            Verdict::PassStunDtls => "pass_stun_dtls",
            Verdict::PassEmptyPayload => "pass_empty_payload",
            Verdict::PassNoFlow => "pass_no_flow",
            Verdict::PassNoNeighbour => "pass_no_neighbour",
            Verdict::PassFibFailed => "pass_fib_failed",
            Verdict::PassTooBig => "pass_too_big",
            Verdict::PassNoEgress => "pass_no_egress",
            Verdict::PassVlanMismatch => "pass_vlan_mismatch",
            Verdict::PassChannelLength => "pass_channel_length",
            Verdict::PassNoHeadroom => "pass_no_headroom",
            Verdict::PassRtcp => "pass_rtcp",
            Verdict::ToWorker => "to_worker",
            Verdict::PassNoWorker => "pass_no_worker",
            Verdict::Aborted => "aborted",
        }
    }

    /// True when the packet was forwarded by XDP.
    pub const fn is_forwarded(self) -> bool {
        matches!(self, Verdict::Tx | Verdict::Redirect)
    }
}

/// The 16 wire bytes of an address held as words (IPv4: the first 4 bytes).
pub fn address_octets(words: &[u32; 4]) -> [u8; 16] {
    let mut octets = [0; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    octets
}

/// The words holding 16 wire bytes of an address (IPv4: its 4 bytes, then zeros).
pub fn address_words(octets: &[u8; 16]) -> [u32; 4] {
    let mut words = [0; 4];
    for (word, chunk) in words.iter_mut().zip(octets.chunks_exact(4)) {
        *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    words
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are #[repr(C)], Copy, made only of integers and byte arrays, with explicit
    // padding fields, so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowValue {}
    unsafe impl aya::Pod for super::VlanDevice {}
    unsafe impl aya::Pod for super::StatCounter {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 2 + 2);
        assert_eq!(size_of::<FlowAction>(), 16 + 16 + 2 + 2 + 4 + 4 + 1 + 1 + 2);
        assert_eq!(size_of::<FlowCounters>(), 24);
        assert_eq!(size_of::<NextHopCache>(), 8 + 4 + 2 + 2 + 6 + 6 + 4);
        assert_eq!(size_of::<FlowValue>(), 48 + 24 + 32);
        assert_eq!(size_of::<VlanDevice>(), 8);
        assert_eq!(size_of::<StatCounter>(), 16);
        // bpf_xdp_adjust_meta takes multiples of 4, at most 32.
        assert_eq!(size_of::<WorkerMeta>(), 20);
    }

    #[test]
    fn verdict_table_is_complete_and_ordered() {
        for (index, verdict) in Verdict::ALL.iter().enumerate() {
            assert_eq!(*verdict as usize, index);
        }
    }
}
