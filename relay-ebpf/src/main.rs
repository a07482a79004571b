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
use relay_common::{
    EGRESS_CAPACITY, FLOWS_DEFAULT_CAPACITY, FlowKey, FlowValue, StatCounter, VLANS_CAPACITY,
    Verdict, VlanDevice,
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
        Ok(sent) => sent?,
        Err(verdict) => (xdp_action::XDP_PASS, verdict),
    };
    stats::count(verdict, frame_len);
    Ok(action)
}

/// Forwards the packet if it belongs to a flow, or says why not. The outer `Result` is the
/// verdict for packets left to the kernel; the inner one fails only on a broken invariant.
#[inline(always)]
fn forward(ctx: &XdpContext) -> Result<Result<(u32, Verdict), ()>, Verdict> {
    let packet = parse::parse(ctx)?;
    let key = flow_key(&packet);
    let value = FLOWS.get_ptr_mut(&key).ok_or(Verdict::PassNoFlow)?;
    // SAFETY: a pointer into the flow table's value, valid while this program runs. Userspace
    // replaces values whole; a torn read at worst sends one packet with the old action.
    let action = unsafe { &(*value).action };
    // SAFETY: no preconditions.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    let next_hop = nexthop::of_flow(
        ctx,
        packet.family(),
        action,
        packet.ip_len,
        unsafe { &raw mut (*value).next_hop },
        now,
    )?;
    match (packet.vlan.is_some(), next_hop.vlan_id.is_some()) {
        (true, true) | (false, false) => {}
        _ => return Err(Verdict::PassVlanMismatch),
    }
    // SAFETY: the packet's pointers were checked by parse and the packet has not been resized.
    unsafe { rewrite::rewrite(&packet, action, &next_hop) };
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
    Ok(nexthop::send(ctx, next_hop.ifindex))
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
