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
        Data, DontFragment, EvenPort, Lifetime, RequestedTransport, ReservationToken,
        XorPeerAddress, XorRelayAddress,
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

/// CHANNEL-NUMBER (RFC 8656 14.1), decoded without a range check: RFC 8656 narrowed channel
/// numbers to 0x4000..=0x4fff, but RFC 5766 clients (coturn's among them) still use up to
/// 0x7ffe, and the server decides what to accept rather than failing to decode the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelNumber(pub u16);

impl ChannelNumber {
    pub const CODEPOINT: u16 = 0x000c;
}

impl stun_codec::Attribute for ChannelNumber {
    type Decoder = ChannelNumberDecoder;
    type Encoder = ChannelNumberEncoder;

    fn get_type(&self) -> stun_codec::AttributeType {
        stun_codec::AttributeType::new(Self::CODEPOINT)
    }
}

/// The value is the number, then two reserved bytes.
#[derive(Debug, Default)]
pub struct ChannelNumberDecoder(bytecodec::fixnum::U32beDecoder);

impl bytecodec::Decode for ChannelNumberDecoder {
    type Item = ChannelNumber;

    fn decode(&mut self, buf: &[u8], eos: bytecodec::Eos) -> bytecodec::Result<usize> {
        self.0.decode(buf, eos)
    }

    fn finish_decoding(&mut self) -> bytecodec::Result<ChannelNumber> {
        Ok(ChannelNumber((self.0.finish_decoding()? >> 16) as u16))
    }

    fn requiring_bytes(&self) -> bytecodec::ByteCount {
        self.0.requiring_bytes()
    }

    fn is_idle(&self) -> bool {
        self.0.is_idle()
    }
}

impl bytecodec::TryTaggedDecode for ChannelNumberDecoder {
    type Tag = stun_codec::AttributeType;

    fn try_start_decoding(&mut self, tag: Self::Tag) -> bytecodec::Result<bool> {
        Ok(tag.as_u16() == ChannelNumber::CODEPOINT)
    }
}

#[derive(Debug, Default)]
pub struct ChannelNumberEncoder(bytecodec::fixnum::U32beEncoder);

impl bytecodec::Encode for ChannelNumberEncoder {
    type Item = ChannelNumber;

    fn encode(&mut self, buf: &mut [u8], eos: bytecodec::Eos) -> bytecodec::Result<usize> {
        self.0.encode(buf, eos)
    }

    fn start_encoding(&mut self, item: ChannelNumber) -> bytecodec::Result<()> {
        self.0.start_encoding(u32::from(item.0) << 16)
    }

    fn requiring_bytes(&self) -> bytecodec::ByteCount {
        self.0.requiring_bytes()
    }

    fn is_idle(&self) -> bool {
        self.0.is_idle()
    }
}

impl bytecodec::SizedEncode for ChannelNumberEncoder {
    fn exact_requiring_bytes(&self) -> u64 {
        self.0.exact_requiring_bytes()
    }
}

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
        // ChannelData: 64..=79 by RFC 7983, up to 127 for RFC 5766 channel numbers.
        0x40..=0x7f => {
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
