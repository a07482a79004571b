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
    helpers::bpf_xdp_adjust_meta,
    macros::{map, xdp},
    maps::{DevMapHash, HashMap, PerCpuArray, XskMap},
    programs::XdpContext,
};
use channel_data::Edit;
use relay_common::{
    CHANNEL_OP_ADD, CHANNEL_OP_STRIP, EGRESS_CAPACITY, FLOW_FLAG_OPAQUE_PAYLOAD,
    FLOW_FLAG_RTCP_TO_USERSPACE, FLOW_FLAG_TO_WORKER, FLOWS_DEFAULT_CAPACITY, FlowKey, FlowValue,
    StatCounter, VLANS_CAPACITY, Verdict, VlanDevice, WorkerMeta, XSKS_CAPACITY,
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

/// The transcryption workers' AF_XDP sockets; relayd fills it when its workers start. Not
/// pinned: a socket lives as long as the relayd that opened it.
#[map(name = "RELAY_XSKS")]
static XSKS: XskMap = XskMap::with_max_entries(XSKS_CAPACITY, 0);

/// Interfaces with worker sockets: ifindex -> the interface's first index in `XSKS`.
#[map(name = "RELAY_XSK_INDEX")]
static XSK_INDEX: HashMap<u32, u32> = HashMap::with_max_entries(EGRESS_CAPACITY, 0);

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
    if action.flags & FLOW_FLAG_TO_WORKER != 0 {
        return to_worker(ctx, &packet, action, value);
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
    let now = coarse_now();
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
    count_flow(value, packet.ip_len, now);
    Ok(nexthop::send(ctx, next_hop.ifindex)?)
}

/// CLOCK_MONOTONIC as of the last timer tick: the clock userspace compares last-seen times
/// with, a few milliseconds coarse, without reading the TSC for every packet.
#[inline(always)]
fn coarse_now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() }
}

/// Counts a packet of `ip_len` bytes on the flow whose value `value` points to.
#[inline(always)]
fn count_flow(value: *mut FlowValue, ip_len: u16, now: u64) {
    // SAFETY: a pointer into the flow table's value, valid while this program runs; the
    // counters are updated atomically because several CPUs may see packets of the same
    // flow at once.
    unsafe {
        let counters = &raw mut (*value).counters;
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*counters).packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
            &raw mut (*counters).bytes,
            u64::from(ip_len),
        );
        (*counters).last_seen_ns = now;
    }
}

/// Bytes a worker may add to a packet (an SRTP authentication tag, at most 16 bytes):
/// what the egress MTU must have room for.
const WORKER_GROWTH: u16 = 16;

/// Hands a transcrypted flow's packet, unchanged, to the worker socket of its interface and
/// receive queue, with the flow and its next hop in the metadata before it.
#[inline(always)]
fn to_worker(
    ctx: &XdpContext,
    packet: &parse::UdpPacket,
    action: &relay_common::FlowAction,
    value: *mut FlowValue,
) -> Result<(u32, Verdict), Fail> {
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: a pointer into the map value, valid while the program runs.
    let first = unsafe { *XSK_INDEX.get(&ingress).ok_or(Verdict::PassNoWorker)? };
    let index = first + ctx.rx_queue_index();
    if packet.vlan.is_some() || XSKS.get(index).is_none() {
        return Err(Verdict::PassNoWorker.into());
    }
    let now = coarse_now();
    let next_hop = nexthop::of_flow(
        ctx,
        packet.family(),
        action,
        packet.ip_len.saturating_add(WORKER_GROWTH),
        // SAFETY: as for `action`.
        unsafe { &raw mut (*value).next_hop },
        now,
    )?;
    if next_hop.vlan_id.is_some() {
        return Err(Verdict::PassNoWorker.into());
    }
    let meta_len = core::mem::size_of::<WorkerMeta>();
    // SAFETY: ctx is the program's context; the helper checks the room itself.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(meta_len as i32)) } != 0 {
        return Err(Verdict::PassNoWorker.into());
    }
    // Re-read after the adjustment; the check is for the verifier.
    let (meta, data) = (ctx.metadata(), ctx.data());
    if meta + meta_len > data {
        return Err(Fail::Abort);
    }
    // SAFETY: [meta, meta + meta_len) was checked to lie before the packet data.
    unsafe {
        (meta as *mut WorkerMeta).write_unaligned(WorkerMeta {
            flow_id: action.flow_id,
            ifindex: next_hop.ifindex,
            smac: next_hop.smac,
            dmac: next_hop.dmac,
        });
    }
    count_flow(value, packet.ip_len, now);
    // The socket was there a moment ago; if it went since, the kernel gets the packet (the
    // metadata is invisible to it).
    match XSKS.redirect(index, u64::from(xdp_action::XDP_PASS)) {
        Ok(action) => Ok((action, Verdict::ToWorker)),
        Err(action) => Ok((action, Verdict::PassNoWorker)),
    }
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
