#![no_main]
//! What a TURN listening socket and a TURN-over-TCP stream decode from strangers: a
//! datagram as STUN or ChannelData (RFC 7983), and the stream framing. No panic; a
//! ChannelData's data is exactly what its Length says and within the datagram; the TCP
//! framing never claims fewer bytes than a header, and its padded length covers the
//! message. Seeds: fuzz/seeds/stun_decode.

use libfuzzer_sys::fuzz_target;
use relay::turn::{
    message::{self, CHANNEL_HEADER, Incoming},
    tcp,
};

fuzz_target!(|data: &[u8]| {
    if let Some(Incoming::ChannelData {
        channel,
        data: payload,
    }) = message::decode(data)
    {
        assert!((0x4000..=0x7fff).contains(&channel), "channel {channel:#x}");
        let length = usize::from(u16::from_be_bytes([data[2], data[3]]));
        assert_eq!(payload.len(), length);
        assert_eq!(&data[CHANNEL_HEADER..CHANNEL_HEADER + length], &payload[..]);
    }
    match tcp::frame(data) {
        Ok(Some((message, taken))) => {
            assert!(message >= CHANNEL_HEADER, "a message is at least a header");
            assert!(
                taken >= message && taken - message < 4,
                "{message} -> {taken}"
            );
        }
        Ok(None) => assert!(data.len() < 4, "{} bytes are enough to frame", data.len()),
        Err(first) => assert_eq!(Some(&first), data.first()),
    }
});
