#![no_main]
//! What an AF_XDP worker reads from its RX ring: a frame with the XDP program's metadata
//! before the packet. The program steers only untagged Ethernet with IPv4 (no options) or
//! IPv6 (no extension headers) and UDP, but a worker checks every length again before it
//! trusts one. The input is two bytes of packet offset in the frame, a byte choosing the
//! egress (IPv4 or IPv6, how much longer or shorter the handler made the payload), then
//! the frame. Whatever the bytes, the worker drops or rewrites without a panic, and the
//! headers it writes end where the payload starts.
//!
//! Seeds: fuzz/seeds/worker_frame.

use libfuzzer_sys::fuzz_target;
use relay::datapath::worker::{Egress, rewrite_frame};

fuzz_target!(|data: &[u8]| {
    let [hi, lo, choice, frame @ ..] = data else {
        return;
    };
    let mut frame = frame.to_vec();
    let offset = usize::from(u16::from_be_bytes([*hi, *lo])) % (frame.len() + 1);
    let len = frame.len() - offset;
    let (from, to) = if choice & 1 == 0 {
        ("192.0.2.1:5000", "192.0.2.9:6000")
    } else {
        ("[2001:db8::1]:5000", "[2001:db8::9]:6000")
    };
    // The handler's new payload length: up to 16 bytes more (a tag) or fewer.
    let change = i64::from(choice >> 1) % 33 - 16;
    let payload_len = len.saturating_sub(42);
    let egress = Egress {
        len: (payload_len as i64 + change).max(0) as usize,
        from: from.parse().unwrap(),
        to: to.parse().unwrap(),
    };
    if let Some(start) = rewrite_frame(&mut frame, offset, len, egress) {
        assert!(start < frame.len());
    }
});
