//! The relay's XDP program: forwards UDP packets of installed flows in the kernel.
//!
//! Parse (Ethernet, one 802.1Q tag, IPv4/IPv6, UDP) → look the 4-tuple up in the flow table →
//! resolve the next hop → rewrite addresses, ports, TTL and checksums → `XDP_TX` or
//! `XDP_REDIRECT`. Anything it does not handle goes to the kernel with `XDP_PASS`, counted by
//! reason in the per-CPU stats (relay-common `Verdict`).
#![no_std]
#![no_main]
// The bpf target has no compare-and-swap, so `AtomicU64::fetch_add` does not exist; the
// intrinsic lowers to the BPF atomic add instruction.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod channel_data;
mod csum;
mod nexthop;
mod parse;
mod rewrite;
mod stats;

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{DevMapHash, HashMap, PerCpuArray},
    programs::XdpContext,
};
use channel_data::Edit;
use relay_common::{
    CHANNEL_OP_ADD, CHANNEL_OP_STRIP, EGRESS_CAPACITY, FLOW_FLAG_OPAQUE_PAYLOAD,
    FLOW_FLAG_RTCP_TO_USERSPACE, FLOWS_DEFAULT_CAPACITY, FlowKey, FlowValue, StatCounter,
    VLANS_CAPACITY, Verdict, VlanDevice,
};

/// The flow table. Pinned by name so flows survive a restart of relayd.
#[map(name = "RELAY_FLOWS")]
static FLOWS: HashMap<FlowKey, FlowValue> = HashMap::pinned(FLOWS_DEFAULT_CAPACITY, 0);

/// Counters by verdict, per CPU so the hot path never contends.
#[map(name = "RELAY_STATS")]
static STATS: PerCpuArray<StatCounter> = PerCpuArray::pinned(Verdict::COUNT, 0);

/// Interfaces the program may redirect to; relayd fills it with the interfaces it attached to.
#[map(name = "RELAY_EGRESS")]
static EGRESS: DevMapHash = DevMapHash::pinned(EGRESS_CAPACITY, 0);

/// VLAN devices a fib lookup may return, mapped to their parent and VLAN id.
#[map(name = "RELAY_VLANS")]
static VLANS: HashMap<u32, VlanDevice> = HashMap::pinned(VLANS_CAPACITY, 0);

#[xdp]
pub fn relay_xdp(ctx: XdpContext) -> u32 {
    match try_relay(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_ABORTED,
    }
}

fn try_relay(ctx: &XdpContext) -> Result<u32, ()> {
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    let (action, verdict) = match forward(ctx) {
        Ok(sent) => sent,
        Err(Fail::Pass(verdict)) => (xdp_action::XDP_PASS, verdict),
        Err(Fail::Abort) => {
            stats::count(Verdict::Aborted, frame_len);
            return Err(());
        }
    };
    stats::count(verdict, frame_len);
    Ok(action)
}

/// Why a packet was not forwarded.
enum Fail {
    /// Left to the kernel, counted under this verdict; the packet is as it arrived.
    Pass(Verdict),
    /// A broken invariant (a bounds check that cannot fail did): XDP_ABORTED.
    Abort,
}

impl From<Verdict> for Fail {
    fn from(verdict: Verdict) -> Fail {
        Fail::Pass(verdict)
    }
}

impl From<()> for Fail {
    fn from((): ()) -> Fail {
        Fail::Abort
    }
}

/// Forwards the packet if it belongs to a flow: the action to return and its verdict.
#[inline(always)]
fn forward(ctx: &XdpContext) -> Result<(u32, Verdict), Fail> {
    let packet = parse::parse(ctx)?;
    let key = flow_key(&packet);
    let unknown = if packet.stun_dtls {
        Verdict::PassStunDtls
    } else {
        Verdict::PassNoFlow
    };
    let value = match FLOWS.get_ptr_mut(&key) {
        Some(value) => value,
        // A payload that merely looks like ChannelData (a peer's data sent to a relay
        // address starts with any byte) is looked up as plain data too.
        None if key.channel != 0 => FLOWS
            .get_ptr_mut(&FlowKey { channel: 0, ..key })
            .ok_or(unknown)?,
        None => return Err(unknown.into()),
    };
    // SAFETY: a pointer into the flow table's value, valid while this program runs. Userspace
    // replaces values whole; a torn read at worst sends one packet with the old action.
    let action = unsafe { &(*value).action };
    let opaque = action.flags & FLOW_FLAG_OPAQUE_PAYLOAD != 0;
    // STUN or DTLS is the relay's own business where it is the ICE and DTLS endpoint, and on
    // a TURN client's 5-tuple (its Refresh and ChannelBind arrive beside its ChannelData);
    // a TURN peer's data toward a relayed address is forwarded whatever its first byte.
    if packet.stun_dtls && (!opaque || action.channel_op == CHANNEL_OP_STRIP) {
        return Err(Verdict::PassStunDtls.into());
    }
    if action.flags & FLOW_FLAG_RTCP_TO_USERSPACE != 0 && parse::is_rtcp(ctx, &packet) {
        return Err(Verdict::PassRtcp.into());
    }
    let (edit, out_ip_len) = match action.channel_op {
        CHANNEL_OP_STRIP => (
            Edit::Stripped(channel_data::check_strip(ctx, &packet, opaque)?),
            packet.ip_len - channel_data::HEADER_LEN,
        ),
        CHANNEL_OP_ADD => (
            Edit::Added(channel_data::check_add(&packet, action.channel_number)?),
            packet.ip_len + channel_data::HEADER_LEN,
        ),
        _ => (Edit::None, packet.ip_len),
    };
    // CLOCK_MONOTONIC as of the last timer tick: the clock userspace compares last-seen
    // times with, a few milliseconds coarse, without reading the TSC for every packet.
    // SAFETY: no preconditions.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() };
    let next_hop = nexthop::of_flow(
        ctx,
        packet.family(),
        action,
        out_ip_len,
        // SAFETY: as for `action`.
        unsafe { &raw mut (*value).next_hop },
        now,
    )?;
    match (packet.vlan.is_some(), next_hop.vlan_id.is_some()) {
        (true, true) | (false, false) => {}
        _ => return Err(Verdict::PassVlanMismatch.into()),
    }
    // Resizing is the last step that may still pass the packet up unchanged.
    let packet = match edit {
        Edit::None => packet,
        Edit::Stripped(_) => {
            channel_data::strip(ctx, &packet)?;
            packet.reload(ctx).ok_or(())?
        }
        Edit::Added(channel) => {
            if !channel_data::add(ctx, &packet, channel)? {
                return Err(Verdict::PassNoHeadroom.into());
            }
            packet.reload(ctx).ok_or(())?
        }
    };
    // SAFETY: the packet's pointers were checked by parse (or reload, after the resize).
    unsafe { rewrite::rewrite(&packet, action, &next_hop, edit) };
    // SAFETY: as above; the counters are updated atomically because several CPUs may forward
    // packets of the same flow at once.
    unsafe {
        let counters = &raw mut (*value).counters;
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*counters).packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &raw mut (*counters).bytes,
            u64::from(packet.ip_len),
        );
        (*counters).last_seen_ns = now;
    }
    Ok(nexthop::send(ctx, next_hop.ifindex)?)
}

#[inline(always)]
fn flow_key(packet: &parse::UdpPacket) -> FlowKey {
    // Every field is written: no memset of the key first.
    // SAFETY: the headers were bounds-checked by parse.
    unsafe {
        let (src_addr, dst_addr) = match packet.ip {
            parse::Ip::V4(ip) => ([(*ip).src, 0, 0, 0], [(*ip).dst, 0, 0, 0]),
            parse::Ip::V6(ip) => ((*ip).src, (*ip).dst),
        };
        FlowKey {
            src_addr,
            dst_addr,
            src_port: (*packet.udp).src_port,
            dst_port: (*packet.udp).dst_port,
            family: packet.family(),
            channel: match packet.channel {
                Some(channel) => channel.number,
                None => 0,
            },
        }
    }
}

/// Passes everything. Attached to the far end of a veth so that frames redirected into it by
/// native-mode XDP are delivered (XDP-FACTS.md).
#[xdp]
pub fn relay_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
