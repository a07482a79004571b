//! Next hop of a rewritten packet: `bpf_fib_lookup` for the egress interface and MACs, the
//! VLAN device table for tagged egress, and the egress devmap for the redirect.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use relay_common::{FAMILY_IPV4, FlowAction, NEXT_HOP_CACHE_NS, NextHopCache, Verdict};

use crate::{EGRESS, VLANS};

const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;
const IPPROTO_UDP: u8 = 17;
/// The lookup runs as if the packet arrived on `lo`. bpf_fib_lookup refuses to work when
/// forwarding is off on `params.ifindex`, and relayd turns forwarding on for `lo` only, so the
/// kernel itself still forwards nothing (XDP-FACTS.md).
const LOOPBACK_IFINDEX: u32 = 1;

#[repr(C, align(8))]
struct AlignedFibParams(FibParams);

/// Zeroes a request a word at a time, in place: `mem::zeroed` (or moving a zeroed value)
/// becomes a call to a byte-loop memset subprogram on this target, which costs more than the
/// lookup's own setup.
#[inline(always)]
fn zero(params: &mut core::mem::MaybeUninit<AlignedFibParams>) -> &mut FibParams {
    let words = params.as_mut_ptr().cast::<u64>();
    let mut i = 0;
    while i < size_of::<AlignedFibParams>() / 8 {
        // SAFETY: in bounds of the 8-byte aligned buffer; volatile so LLVM cannot fold the
        // stores back into a memset.
        unsafe { words.add(i).write_volatile(0) };
        i += 1;
    }
    // SAFETY: every byte was written and all-zero is a valid bpf_fib_lookup.
    unsafe { &mut (*params.as_mut_ptr()).0 }
}

pub struct NextHop {
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// Physical interface to send on (the parent, for a VLAN device).
    pub ifindex: u32,
    /// VLAN id to tag with, when the egress is a VLAN device.
    pub vlan_id: Option<u16>,
    /// MTU of the egress route.
    pub mtu: u16,
}

/// The next hop of a flow: from the flow's cache while it is fresh, else resolved and cached.
/// Only next hops the program can send to are cached.
#[inline(always)]
pub fn of_flow(
    ctx: &XdpContext,
    family: u16,
    action: &FlowAction,
    ip_len: u16,
    cache: *mut NextHopCache,
    now: u64,
) -> Result<NextHop, Verdict> {
    // SAFETY: `cache` points into the flow's map value, valid while the program runs. CPUs
    // forwarding the same flow may rewrite it at once; they write the same values.
    unsafe {
        let cached = &*cache;
        if cached.resolved_ns != 0 && now.wrapping_sub(cached.resolved_ns) < NEXT_HOP_CACHE_NS {
            if ip_len > cached.mtu {
                return Err(Verdict::PassTooBig);
            }
            return Ok(NextHop {
                smac: cached.smac,
                dmac: cached.dmac,
                ifindex: cached.ifindex,
                vlan_id: if cached.vlan_id == 0 {
                    None
                } else {
                    Some(cached.vlan_id)
                },
                mtu: cached.mtu,
            });
        }
        let next_hop = resolve(ctx, family, action, ip_len)?;
        if !can_send(ctx, next_hop.ifindex) {
            return Err(Verdict::PassNoEgress);
        }
        let cache = &mut *cache;
        cache.ifindex = next_hop.ifindex;
        cache.mtu = next_hop.mtu;
        cache.vlan_id = next_hop.vlan_id.unwrap_or(0);
        cache.smac = next_hop.smac;
        cache.dmac = next_hop.dmac;
        cache.resolved_ns = now;
        Ok(next_hop)
    }
}

/// Looks the next hop up for `action`'s new addresses. Does not touch the packet, so that a
/// failure can still pass the original packet to the kernel.
#[inline(always)]
fn resolve(
    ctx: &XdpContext,
    family: u16,
    action: &FlowAction,
    ip_len: u16,
) -> Result<NextHop, Verdict> {
    let mut storage = core::mem::MaybeUninit::uninit();
    let params = zero(&mut storage);
    params.family = family as u8;
    params.l4_protocol = IPPROTO_UDP;
    params.sport = action.new_src_port;
    params.dport = action.new_dst_port;
    // With tot_len set the kernel compares it to the egress MTU and answers FRAG_NEEDED.
    params.__bindgen_anon_1.tot_len = ip_len;
    params.ifindex = LOOPBACK_IFINDEX;
    if family == FAMILY_IPV4 {
        params.__bindgen_anon_3.ipv4_src = action.new_src_addr[0];
        params.__bindgen_anon_4.ipv4_dst = action.new_dst_addr[0];
    } else {
        params.__bindgen_anon_3.ipv6_src = action.new_src_addr;
        params.__bindgen_anon_4.ipv6_dst = action.new_dst_addr;
    }
    // SAFETY: params is a valid, correctly sized bpf_fib_lookup on the stack.
    let rc = unsafe { bpf_fib_lookup(ctx.ctx as *mut _, params, size_of::<FibParams>() as i32, 0) };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => return Err(Verdict::PassNoNeighbour),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Err(Verdict::PassTooBig),
        _ => return Err(Verdict::PassFibFailed),
    }
    let (ifindex, vlan_id) = match VLANS.get_ptr(params.ifindex) {
        // SAFETY: a pointer into a map value, valid for the duration of the program.
        Some(vlan) => unsafe { ((*vlan).parent_ifindex, Some((*vlan).vlan_id)) },
        None => (params.ifindex, None),
    };
    Ok(NextHop {
        smac: params.smac,
        dmac: params.dmac,
        ifindex,
        vlan_id,
        // SAFETY: on success the kernel writes the route's MTU into this union member.
        mtu: unsafe { params.__bindgen_anon_1.mtu_result },
    })
}

/// The XDP action that sends the rewritten frame out of `ifindex`. Only called after
/// [`can_send`] said yes, so a failing devmap lookup here is a bug (and aborts).
#[inline(always)]
pub fn send(ctx: &XdpContext, ifindex: u32) -> Result<(u32, Verdict), ()> {
    if ifindex as usize == ctx.ingress_ifindex() {
        return Ok((xdp_action::XDP_TX, Verdict::Tx));
    }
    match EGRESS.redirect(ifindex, 0) {
        Ok(action) => Ok((action, Verdict::Redirect)),
        Err(_) => Err(()),
    }
}

/// Whether `ifindex` is the ingress interface or one relayd put into the egress devmap.
#[inline(always)]
fn can_send(ctx: &XdpContext, ifindex: u32) -> bool {
    ifindex as usize == ctx.ingress_ifindex() || EGRESS.get_ifindex(ifindex).is_some()
}
