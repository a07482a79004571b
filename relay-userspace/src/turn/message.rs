//! STUN/TURN messages as the server reads and writes them (stun_codec), and ChannelData
//! framing (RFC 8656 12.4), which is ours.

use std::marker::PhantomData;

use bytecodec::{
    DecodeExt, EncodeExt,
    bytes::{BytesEncoder, RemainingBytesDecoder},
};
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
        AdditionalAddressFamily,
        // RFC 8489 / 8656, not in stun_codec 0.4
        MessageIntegritySha256,
        AddressErrorCode
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

/// An attribute stun_codec 0.4 does not have, whose value we read and write as bytes.
pub trait OpaqueAttribute: Sized {
    const CODEPOINT: u16;
    /// The attribute from its value; an error makes the message undecodable (400).
    fn from_value(value: Vec<u8>) -> bytecodec::Result<Self>;
    fn value(&self) -> Vec<u8>;
}

#[derive(Debug)]
pub struct OpaqueDecoder<T>(RemainingBytesDecoder, PhantomData<T>);

impl<T> Default for OpaqueDecoder<T> {
    fn default() -> Self {
        OpaqueDecoder(RemainingBytesDecoder::new(), PhantomData)
    }
}

impl<T: OpaqueAttribute> bytecodec::Decode for OpaqueDecoder<T> {
    type Item = T;

    fn decode(&mut self, buf: &[u8], eos: bytecodec::Eos) -> bytecodec::Result<usize> {
        self.0.decode(buf, eos)
    }

    fn finish_decoding(&mut self) -> bytecodec::Result<T> {
        T::from_value(self.0.finish_decoding()?)
    }

    fn requiring_bytes(&self) -> bytecodec::ByteCount {
        self.0.requiring_bytes()
    }

    fn is_idle(&self) -> bool {
        self.0.is_idle()
    }
}

impl<T: OpaqueAttribute> bytecodec::TryTaggedDecode for OpaqueDecoder<T> {
    type Tag = stun_codec::AttributeType;

    fn try_start_decoding(&mut self, tag: Self::Tag) -> bytecodec::Result<bool> {
        Ok(tag.as_u16() == T::CODEPOINT)
    }
}

#[derive(Debug)]
pub struct OpaqueEncoder<T>(BytesEncoder<Vec<u8>>, PhantomData<T>);

impl<T> Default for OpaqueEncoder<T> {
    fn default() -> Self {
        OpaqueEncoder(BytesEncoder::new(), PhantomData)
    }
}

impl<T: OpaqueAttribute> bytecodec::Encode for OpaqueEncoder<T> {
    type Item = T;

    fn encode(&mut self, buf: &mut [u8], eos: bytecodec::Eos) -> bytecodec::Result<usize> {
        self.0.encode(buf, eos)
    }

    fn start_encoding(&mut self, item: T) -> bytecodec::Result<()> {
        self.0.start_encoding(item.value())
    }

    fn requiring_bytes(&self) -> bytecodec::ByteCount {
        self.0.requiring_bytes()
    }

    fn is_idle(&self) -> bool {
        self.0.is_idle()
    }
}

impl<T: OpaqueAttribute> bytecodec::SizedEncode for OpaqueEncoder<T> {
    fn exact_requiring_bytes(&self) -> u64 {
        self.0.exact_requiring_bytes()
    }
}

/// MESSAGE-INTEGRITY-SHA256 (RFC 8489 14.6): HMAC-SHA256 over the message up to this
/// attribute, with the key of long-term credentials, MD5(username:realm:password), when no
/// PASSWORD-ALGORITHM says otherwise. The value may be truncated to 16..=32 bytes in steps of
/// 4; we send all 32.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageIntegritySha256 {
    hmac: Vec<u8>,
    /// The message before this attribute, with its Length covering this attribute, as the
    /// HMAC is computed over (set after decoding).
    preceding: Vec<u8>,
}

impl OpaqueAttribute for MessageIntegritySha256 {
    const CODEPOINT: u16 = 0x001c;

    fn from_value(hmac: Vec<u8>) -> bytecodec::Result<Self> {
        if !(16..=32).contains(&hmac.len()) || !hmac.len().is_multiple_of(4) {
            return Err(bytecodec::ErrorKind::InvalidInput.into());
        }
        Ok(MessageIntegritySha256 {
            hmac,
            preceding: Vec::new(),
        })
    }

    fn value(&self) -> Vec<u8> {
        self.hmac.clone()
    }
}

impl stun_codec::Attribute for MessageIntegritySha256 {
    type Decoder = OpaqueDecoder<Self>;
    type Encoder = OpaqueEncoder<Self>;

    fn get_type(&self) -> stun_codec::AttributeType {
        stun_codec::AttributeType::new(Self::CODEPOINT)
    }

    fn after_decode<A: stun_codec::Attribute>(
        &mut self,
        message: &Message<A>,
    ) -> bytecodec::Result<()> {
        self.preceding = preceding_bytes(message.clone(), self.hmac.len())?;
        Ok(())
    }
}

impl MessageIntegritySha256 {
    /// Signs `message` (everything added so far) with long-term credentials.
    pub fn new_long_term<A: stun_codec::Attribute>(
        message: &Message<A>,
        username: &str,
        realm: &str,
        password: &str,
    ) -> bytecodec::Result<Self> {
        let preceding = preceding_bytes(message.clone(), 32)?;
        let hmac = hmac_sha256(&long_term_key(username, realm, password), &preceding);
        Ok(MessageIntegritySha256 { hmac, preceding })
    }

    /// Whether the (possibly truncated) HMAC is right for these credentials; compared in
    /// constant time.
    pub fn check_long_term(&self, username: &str, realm: &str, password: &str) -> bool {
        let expected = hmac_sha256(&long_term_key(username, realm, password), &self.preceding);
        let difference = expected[..self.hmac.len()]
            .iter()
            .zip(&self.hmac)
            .fold(0, |acc, (a, b)| acc | (a ^ b));
        difference == 0
    }
}

/// RFC 8489 9.2.2: the long-term credential key without PASSWORD-ALGORITHM.
fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    md5::compute(format!("{username}:{realm}:{password}")).0
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&key, data).as_ref().to_vec()
}

/// The encoded message with its Length as if an attribute of `value_len` bytes followed.
fn preceding_bytes<A: stun_codec::Attribute>(
    message: Message<A>,
    value_len: usize,
) -> bytecodec::Result<Vec<u8>> {
    let mut bytes = MessageEncoder::new().encode_into_bytes(message)?;
    let length = (bytes.len() - 20 + 4 + value_len) as u16;
    bytes[2..4].copy_from_slice(&length.to_be_bytes());
    Ok(bytes)
}

/// ADDRESS-ERROR-CODE (RFC 8656 18.13): in a successful dual-stack Allocate response, why
/// the relayed address of one family could not be allocated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AddressErrorCode {
    pub family: stun_codec::rfc8656::attributes::AddressFamily,
    pub code: u16,
    pub reason: String,
}

impl OpaqueAttribute for AddressErrorCode {
    const CODEPOINT: u16 = 0x8001;

    fn from_value(value: Vec<u8>) -> bytecodec::Result<Self> {
        use stun_codec::rfc8656::attributes::AddressFamily;
        let (Some(&family), Some(&class), Some(&number)) =
            (value.first(), value.get(2), value.get(3))
        else {
            return Err(bytecodec::ErrorKind::InvalidInput.into());
        };
        let family = match family {
            1 => AddressFamily::V4,
            2 => AddressFamily::V6,
            _ => return Err(bytecodec::ErrorKind::InvalidInput.into()),
        };
        Ok(AddressErrorCode {
            family,
            code: u16::from(class & 0x7) * 100 + u16::from(number),
            reason: String::from_utf8_lossy(&value[4..]).into_owned(),
        })
    }

    fn value(&self) -> Vec<u8> {
        use stun_codec::rfc8656::attributes::AddressFamily;
        let family = match self.family {
            AddressFamily::V4 => 1,
            AddressFamily::V6 => 2,
        };
        let mut value = vec![family, 0, (self.code / 100) as u8, (self.code % 100) as u8];
        value.extend_from_slice(self.reason.as_bytes());
        value
    }
}

impl stun_codec::Attribute for AddressErrorCode {
    type Decoder = OpaqueDecoder<Self>;
    type Encoder = OpaqueEncoder<Self>;

    fn get_type(&self) -> stun_codec::AttributeType {
        stun_codec::AttributeType::new(Self::CODEPOINT)
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

/// Whether `bytes` begins like a STUN request (first byte 0..=3, class bits 00), read
/// from the header alone: what the per-source request rate counts before anything is
/// decoded.
pub fn looks_like_request(bytes: &[u8]) -> bool {
    match bytes {
        [first @ 0..=3, second, ..] => u16::from_be_bytes([*first, *second]) & 0x0110 == 0,
        _ => false,
    }
}

pub fn encode(message: TurnMessage) -> Vec<u8> {
    let (method, class) = (message.method().as_u16(), message.class());
    let mut bytes = MessageEncoder::new()
        .encode_into_bytes(message)
        .expect("messages built by the server encode");
    // stun_codec 0.4 writes a method's bits 4-11 in the wrong places (shifted by 5 and 9,
    // where RFC 8489 5 puts them 1 and 2 up; it reads them right). Every method the
    // server knows is below 0x10; an error response to an unknown one gets its type
    // written again, and its FINGERPRINT, which covers the type, with it. Such answers
    // are never signed (the request did not authenticate).
    if method > 0x000f {
        let class = match class {
            MessageClass::Request => 0x0000,
            MessageClass::Indication => 0x0010,
            MessageClass::SuccessResponse => 0x0100,
            MessageClass::ErrorResponse => 0x0110,
        };
        bytes[..2].copy_from_slice(&message_type(method, class).to_be_bytes());
        let length = bytes.len();
        if length >= 28 && bytes[length - 8..length - 6] == FINGERPRINT_TYPE.to_be_bytes() {
            let crc = crc32fast::hash(&bytes[..length - 8]) ^ FINGERPRINT_XOR;
            bytes[length - 4..].copy_from_slice(&crc.to_be_bytes());
        }
    }
    bytes
}

const FINGERPRINT_TYPE: u16 = 0x8028;
/// RFC 8489 14.7: the CRC-32 XORed with "STUN".
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// A STUN message type (RFC 8489 5): the method's 12 bits around the class's two
/// (`class` already in place: 0x0000, 0x0010, 0x0100 or 0x0110).
pub fn message_type(method: u16, class: u16) -> u16 {
    (method & 0x000f) | ((method & 0x0070) << 1) | ((method & 0x0f80) << 2) | class
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
