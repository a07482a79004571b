//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! Words are read in memory order as native-endian u16, and so is the checksum field: the
//! ones'-complement sum is byte-order independent as long as both sides use the same order.

/// Adds `~old + new` for one 16-bit word to an accumulated difference.
#[inline(always)]
pub fn diff16(acc: u32, old: u16, new: u16) -> u32 {
    acc + u32::from(!old) + u32::from(new)
}

/// Adds `~old + new` for the two 16-bit halves of a 32-bit word.
#[inline(always)]
pub fn diff32(acc: u32, old: u32, new: u32) -> u32 {
    let old = !old;
    acc + (old & 0xffff) + (old >> 16) + (new & 0xffff) + (new >> 16)
}

/// Adds the difference of two IPv6 addresses (or any four words).
#[inline(always)]
pub fn diff128(acc: u32, old: &[u32; 4], new: &[u32; 4]) -> u32 {
    let acc = diff32(acc, old[0], new[0]);
    let acc = diff32(acc, old[1], new[1]);
    let acc = diff32(acc, old[2], new[2]);
    diff32(acc, old[3], new[3])
}

/// Applies an accumulated difference to a checksum field (as read from memory).
#[inline(always)]
pub fn apply(check: u16, diff: u32) -> u16 {
    let mut sum = u32::from(!check) + (diff & 0xffff) + (diff >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// A computed UDP checksum of 0 is sent as 0xffff: 0 means "no checksum" (RFC 768, RFC 8200
/// 8.1).
#[inline(always)]
pub fn udp_nonzero(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}
