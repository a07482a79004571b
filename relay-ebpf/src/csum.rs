//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! Words are read in memory order as native-endian u16, and so is the checksum field: the
//! ones'-complement sum is byte-order independent as long as both sides use the same order.

/// Accumulates `~old + new` for every 16-bit word of two equally long byte strings.
#[inline(always)]
pub fn diff<const N: usize>(acc: u32, old: &[u8; N], new: &[u8; N]) -> u32 {
    let mut acc = acc;
    let mut i = 0;
    while i + 1 < N {
        let old_word = u16::from_ne_bytes([old[i], old[i + 1]]);
        let new_word = u16::from_ne_bytes([new[i], new[i + 1]]);
        acc += u32::from(!old_word) + u32::from(new_word);
        i += 2;
    }
    acc
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
