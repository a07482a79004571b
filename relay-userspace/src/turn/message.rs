//! STUN/TURN messages as the server reads and writes them (stun_codec), and ChannelData
//! framing (RFC 8656 12.4), which is ours.

use bytecodec::{DecodeExt, EncodeExt};
use stun_codec::{
    Message, MessageClass, MessageDecoder, MessageEncoder, define_attribute_enums,
    rfc5389::attributes::{
        ErrorCode, Fingerprint, MessageIntegrity, Nonce, Realm, Software, UnknownAttributes,
        Username, XorMappedAddress,
    },
    rfc5766::attributes::{
        ChannelNumber, Data, DontFragment, EvenPort, Lifetime, RequestedTransport,
        ReservationToken, XorPeerAddress, XorRelayAddress,
    },
    rfc8656::attributes::{AdditionalAddressFamily, RequestedAddressFamily},
};

define_attribute_enums!(
    Attribute,
    AttributeDecoder,
    AttributeEncoder,
    [
        // RFC 5389 / 8489
        Username,
        MessageIntegrity,
        ErrorCode,
        UnknownAttributes,
        Realm,
        Nonce,
        XorMappedAddress,
        Software,
        Fingerprint,
        // RFC 5766 / 8656
        ChannelNumber,
        Lifetime,
        XorPeerAddress,
        Data,
        XorRelayAddress,
        EvenPort,
        RequestedTransport,
        DontFragment,
        ReservationToken,
        RequestedAddressFamily,
        AdditionalAddressFamily
    ]
);

pub type TurnMessage = Message<Attribute>;

/// What arrived on a TURN listening socket.
pub enum Incoming {
    Stun(TurnMessage),
    /// A STUN header that could not be decoded further (a bad attribute): the method, class
    /// and transaction id, enough to answer 400.
    Broken(stun_codec::BrokenMessage),
    ChannelData {
        channel: u16,
        data: Vec<u8>,
    },
}

/// Size of a ChannelData header.
pub const CHANNEL_HEADER: usize = 4;

/// Decodes a datagram from a client: STUN (first byte 0..=3) or ChannelData (64..=79), by
/// RFC 7983. None for anything else or anything that does not parse: dropped silently, as
/// RFC 8489 6.3 asks for messages that are not STUN.
pub fn decode(bytes: &[u8]) -> Option<Incoming> {
    match bytes.first()? {
        0..=3 => match MessageDecoder::<Attribute>::new()
            .decode_from_bytes(bytes)
            .ok()?
        {
            Ok(message) => Some(Incoming::Stun(message)),
            Err(broken) => Some(Incoming::Broken(broken)),
        },
        0x40..=0x4f => {
            let channel = u16::from_be_bytes([bytes[0], *bytes.get(1)?]);
            let length = usize::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?]));
            // Over UDP the message may be padded; the data is what Length says (RFC 8656 12.5).
            let data = bytes.get(CHANNEL_HEADER..CHANNEL_HEADER + length)?;
            Some(Incoming::ChannelData {
                channel,
                data: data.to_vec(),
            })
        }
        _ => None,
    }
}

pub fn encode(message: TurnMessage) -> Vec<u8> {
    MessageEncoder::new()
        .encode_into_bytes(message)
        .expect("messages built by the server encode")
}

/// A ChannelData message, unpadded (allowed over UDP).
pub fn channel_data(channel: u16, data: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(CHANNEL_HEADER + data.len());
    message.extend_from_slice(&channel.to_be_bytes());
    message.extend_from_slice(&(data.len() as u16).to_be_bytes());
    message.extend_from_slice(data);
    message
}

/// A response of `class` to `request`, with the same method and transaction id.
pub fn response_to(
    request_method: stun_codec::Method,
    transaction: stun_codec::TransactionId,
    class: MessageClass,
) -> TurnMessage {
    Message::new(class, request_method, transaction)
}
