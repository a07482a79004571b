//! Why the TURN server refuses a request: a closed set, each with its error code (RFC 8489
//! 14.8, RFC 8656 18) and reason phrase. The same pairs label the refusal metrics, so their
//! number is bounded.

use stun_codec::{
    rfc5389::errors::{BadRequest, StaleNonce, Unauthorized, UnknownAttribute},
    rfc5766::errors::{
        AllocationMismatch, AllocationQuotaReached, Forbidden, InsufficientCapacity,
        UnsupportedTransportProtocol, WrongCredentials,
    },
    rfc8656::errors::{AddressFamilyNotSupported, PeerAddressFamilyMismatch},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    /// Malformed, or attributes that do not go together.
    BadRequest,
    /// No, stale-free but wrong, or unknown credentials (the first one is the challenge).
    Unauthorized,
    /// The peer policy refuses the peer.
    Forbidden,
    /// Comprehension-required attributes the server does not know.
    UnknownAttribute,
    /// No allocation on this 5-tuple, or one already there.
    AllocationMismatch,
    StaleNonce,
    /// No relay address of the requested family.
    AddressFamilyNotSupported,
    /// The allocation belongs to another user.
    WrongCredentials,
    UnsupportedTransportProtocol,
    /// The peer is of a family the allocation has no relayed address for.
    PeerAddressFamilyMismatch,
    /// `turn.max_allocations_per_user`.
    AllocationQuotaReached,
    /// `turn.max_allocate_rate_per_source` (486 too, with its own reason).
    AllocationRateLimitReached,
    /// `turn.max_allocations`, or no free relay port.
    InsufficientCapacity,
    /// The relay port was free in the server's books but another socket on the host holds
    /// it (the port range overlaps ephemeral ports or another service): 508 too, with its
    /// own reason so that an operator sees the overlap in the metrics.
    RelayPortInUse,
}

impl Refusal {
    pub fn code(self) -> u16 {
        match self {
            Refusal::BadRequest => BadRequest::CODEPOINT,
            Refusal::Unauthorized => Unauthorized::CODEPOINT,
            Refusal::Forbidden => Forbidden::CODEPOINT,
            Refusal::UnknownAttribute => UnknownAttribute::CODEPOINT,
            Refusal::AllocationMismatch => AllocationMismatch::CODEPOINT,
            Refusal::StaleNonce => StaleNonce::CODEPOINT,
            Refusal::AddressFamilyNotSupported => AddressFamilyNotSupported::CODEPOINT,
            Refusal::WrongCredentials => WrongCredentials::CODEPOINT,
            Refusal::UnsupportedTransportProtocol => UnsupportedTransportProtocol::CODEPOINT,
            Refusal::PeerAddressFamilyMismatch => PeerAddressFamilyMismatch::CODEPOINT,
            Refusal::AllocationQuotaReached | Refusal::AllocationRateLimitReached => {
                AllocationQuotaReached::CODEPOINT
            }
            Refusal::InsufficientCapacity | Refusal::RelayPortInUse => {
                InsufficientCapacity::CODEPOINT
            }
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Refusal::BadRequest => "Bad Request",
            Refusal::Unauthorized => "Unauthorized",
            Refusal::Forbidden => "Forbidden",
            Refusal::UnknownAttribute => "Unknown Attribute",
            Refusal::AllocationMismatch => "Allocation Mismatch",
            Refusal::StaleNonce => "Stale Nonce",
            Refusal::AddressFamilyNotSupported => "Address Family not Supported",
            Refusal::WrongCredentials => "Wrong Credentials",
            Refusal::UnsupportedTransportProtocol => "Unsupported Transport Protocol",
            Refusal::PeerAddressFamilyMismatch => "Peer Address Family Mismatch",
            Refusal::AllocationQuotaReached => "Allocation Quota Reached",
            Refusal::AllocationRateLimitReached => "Allocation Rate Limit Reached",
            Refusal::InsufficientCapacity => "Insufficient Capacity",
            Refusal::RelayPortInUse => "Relay Port in Use",
        }
    }

    /// The ERROR-CODE attribute of a response refusing an authenticated request.
    pub fn error_code(self) -> stun_codec::rfc5389::attributes::ErrorCode {
        stun_codec::rfc5389::attributes::ErrorCode::new(self.code(), self.reason().to_owned())
            .expect("a valid code and reason")
    }

    /// The ERROR-CODE attribute toward a client that has not authenticated: the code
    /// without a reason phrase (RFC 8489 14.8 allows an empty one), so that an answer to a
    /// stranger's datagram is as small as RFC 8656 lets it be.
    pub fn bare_error_code(self) -> stun_codec::rfc5389::attributes::ErrorCode {
        stun_codec::rfc5389::attributes::ErrorCode::new(self.code(), String::new())
            .expect("a valid code")
    }
}

/// Why the TURN server dropped a datagram without an answer (RFC 8489 6.3 and RFC 8656
/// answer none of these): a closed set, counted, whose labels are the discard metrics'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Discard {
    /// Neither STUN nor ChannelData by its first byte (RFC 7983).
    NotTurn,
    /// A STUN header that does not decode, in a message that is not a request.
    UndecodableStun,
    /// ChannelData whose length field says more than the datagram holds.
    ChannelDataLength,
    /// A response, or an indication other than Send: nothing a server takes.
    NotForServer,
    /// A Send indication or ChannelData on a 5-tuple with no allocation.
    NoAllocation,
    /// ChannelData on a channel not bound (or expired), or a Send without a peer or data.
    NoChannel,
    /// Toward or from a peer without a permission (or of the other family).
    NoPermission,
    /// A request over `turn.max_request_rate_per_source`: dropped unanswered, so that a
    /// flood with spoofed sources reflects nothing; a real client retransmits.
    RequestRate,
}

impl Discard {
    pub fn label(self) -> &'static str {
        match self {
            Discard::NotTurn => "not_turn",
            Discard::UndecodableStun => "undecodable_stun",
            Discard::ChannelDataLength => "channel_data_length",
            Discard::NotForServer => "not_for_server",
            Discard::NoAllocation => "no_allocation",
            Discard::NoChannel => "no_channel",
            Discard::NoPermission => "no_permission",
            Discard::RequestRate => "request_rate",
        }
    }

    /// Why `bytes`, which did not decode, was dropped.
    pub fn undecodable(bytes: &[u8]) -> Discard {
        match bytes.first() {
            Some(0..=3) => Discard::UndecodableStun,
            Some(0x40..=0x7f) => Discard::ChannelDataLength,
            _ => Discard::NotTurn,
        }
    }
}
