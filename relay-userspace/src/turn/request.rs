//! A TURN request read once into a typed value: each method's attributes, checked for what
//! the RFC says makes the request malformed (400) or unsupported (442, 420). The server core
//! then never looks at attributes again.

use std::net::SocketAddr;

use stun_codec::{
    Attribute as _, AttributeType, Method,
    rfc5766::{
        attributes::{
            DontFragment, EvenPort, Lifetime, RequestedTransport, ReservationToken, XorPeerAddress,
        },
        methods::{ALLOCATE, CHANNEL_BIND, CREATE_PERMISSION, REFRESH},
    },
    rfc8656::attributes::{AdditionalAddressFamily, AddressFamily, RequestedAddressFamily},
};

use super::{
    message::{Attribute, ChannelNumber, TurnMessage},
    refusal::Refusal,
};

/// The only transport relayed: UDP (IANA protocol number 17).
const UDP: u8 = 17;

/// An authenticated request's method and what it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Allocate(Allocate),
    /// LIFETIME, if given (0 deletes the allocation).
    Refresh {
        lifetime: Option<u64>,
    },
    /// One or more XOR-PEER-ADDRESS.
    CreatePermission {
        peers: Vec<SocketAddr>,
    },
    ChannelBind {
        number: u16,
        peer: SocketAddr,
    },
}

/// What an Allocate asks for (RFC 8656 7.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocate {
    /// EVEN-PORT: an even port, and with R set the odd one above reserved too.
    pub even_port: Option<EvenPortRequest>,
    /// RESERVATION-TOKEN: the port an earlier EVEN-PORT(R) reserved.
    pub token: Option<u64>,
    /// REQUESTED-ADDRESS-FAMILY (the default is IPv4).
    pub family: AddressFamily,
    /// ADDITIONAL-ADDRESS-FAMILY (IPv6): an IPv6 relayed address besides the IPv4 one.
    pub additional_ipv6: bool,
    pub dont_fragment: bool,
    pub lifetime: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvenPortRequest {
    pub reserve_next: bool,
}

/// The comprehension-required attributes of `message` that the server does not know
/// (RFC 8489 14: answered with 420 and UNKNOWN-ATTRIBUTES).
pub fn unknown_attributes(message: &TurnMessage) -> Vec<AttributeType> {
    message
        .unknown_attributes()
        .map(|attribute| attribute.get_type())
        .filter(|attribute_type| attribute_type.is_comprehension_required())
        .collect()
}

/// Whether the server handles `method` with authentication (Binding needs none).
pub fn is_authenticated_method(method: Method) -> bool {
    [ALLOCATE, REFRESH, CREATE_PERMISSION, CHANNEL_BIND].contains(&method)
}

/// Reads an authenticated method's request.
pub fn parse(message: &TurnMessage) -> Result<Request, Refusal> {
    let lifetime = message
        .get_attribute::<Lifetime>()
        .map(|l| l.lifetime().as_secs());
    match message.method() {
        ALLOCATE => parse_allocate(message, lifetime).map(Request::Allocate),
        REFRESH => Ok(Request::Refresh { lifetime }),
        CREATE_PERMISSION => {
            let peers: Vec<SocketAddr> = message
                .attributes()
                .filter_map(|attribute| match attribute {
                    Attribute::XorPeerAddress(peer) => Some(peer.address()),
                    _ => None,
                })
                .collect();
            if peers.is_empty() {
                return Err(Refusal::BadRequest);
            }
            Ok(Request::CreatePermission { peers })
        }
        CHANNEL_BIND => {
            let (Some(number), Some(peer)) = (
                message.get_attribute::<ChannelNumber>().map(|n| n.0),
                message
                    .get_attribute::<XorPeerAddress>()
                    .map(|p| p.address()),
            ) else {
                return Err(Refusal::BadRequest);
            };
            if !(relay_common::CHANNEL_MIN..=relay_common::CHANNEL_MAX).contains(&number) {
                return Err(Refusal::BadRequest);
            }
            Ok(Request::ChannelBind { number, peer })
        }
        _ => Err(Refusal::BadRequest),
    }
}

fn parse_allocate(message: &TurnMessage, lifetime: Option<u64>) -> Result<Allocate, Refusal> {
    let transport = message
        .get_attribute::<RequestedTransport>()
        .ok_or(Refusal::BadRequest)?;
    if transport.protocol() != UDP {
        return Err(Refusal::UnsupportedTransportProtocol);
    }
    let even_port = message
        .get_attribute::<EvenPort>()
        .map(|e| EvenPortRequest {
            reserve_next: e.is_requested(),
        });
    let token = message
        .get_attribute::<ReservationToken>()
        .map(|t| t.token());
    let requested = message
        .get_attribute::<RequestedAddressFamily>()
        .map(|f| f.address_family());
    let additional = message
        .get_attribute::<AdditionalAddressFamily>()
        .map(|f| f.address_family());
    // RFC 8656 7.2: a reservation token says which port, so it goes with none of the
    // others; REQUESTED- and ADDITIONAL-ADDRESS-FAMILY exclude each other; the additional
    // family can only be IPv6.
    if (token.is_some() && (even_port.is_some() || requested.is_some() || additional.is_some()))
        || (requested.is_some() && additional.is_some())
        || additional == Some(AddressFamily::V4)
    {
        return Err(Refusal::BadRequest);
    }
    Ok(Allocate {
        even_port,
        token,
        family: requested.unwrap_or(AddressFamily::V4),
        additional_ipv6: additional.is_some(),
        dont_fragment: message.get_attribute::<DontFragment>().is_some(),
        lifetime,
    })
}
