//! SRTP and SRTCP (RFC 3711, RFC 7714) for a leg whose security the relay terminates: one
//! context for what the leg's peer sends (unprotect, with a replay window) and one for what
//! the relay sends it (protect), on webrtc-srtp's contexts (RustCrypto's AES-CM, HMAC-SHA1
//! and AES-GCM; rollover counters per SSRC).

use bytes::Bytes;
use webrtc_srtp::{
    context::Context,
    option::{srtcp_replay_protection, srtp_replay_protection},
    protection_profile::ProtectionProfile,
};

/// The SRTP protection profiles the relay implements, in the order it prefers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Suite {
    AeadAes128Gcm,
    AesCm128HmacSha1_80,
    AesCm128HmacSha1_32,
}

/// Packets behind the newest accepted one that are still taken (RFC 3711 section 3.3.2
/// asks for at least 64).
const REPLAY_WINDOW: usize = 128;

impl Suite {
    pub const ALL: [Suite; 3] = [
        Suite::AeadAes128Gcm,
        Suite::AesCm128HmacSha1_80,
        Suite::AesCm128HmacSha1_32,
    ];

    /// The `a=crypto` suite name (RFC 4568 section 6.2, RFC 7714 section 12).
    pub fn sdes_name(self) -> &'static str {
        match self {
            Suite::AeadAes128Gcm => "AEAD_AES_128_GCM",
            Suite::AesCm128HmacSha1_80 => "AES_CM_128_HMAC_SHA1_80",
            Suite::AesCm128HmacSha1_32 => "AES_CM_128_HMAC_SHA1_32",
        }
    }

    pub fn from_sdes_name(name: &str) -> Option<Suite> {
        Suite::ALL
            .into_iter()
            .find(|suite| suite.sdes_name() == name)
    }

    fn profile(self) -> ProtectionProfile {
        match self {
            Suite::AeadAes128Gcm => ProtectionProfile::AeadAes128Gcm,
            Suite::AesCm128HmacSha1_80 => ProtectionProfile::Aes128CmHmacSha1_80,
            Suite::AesCm128HmacSha1_32 => ProtectionProfile::Aes128CmHmacSha1_32,
        }
    }

    pub fn key_len(self) -> usize {
        self.profile().key_len()
    }

    pub fn salt_len(self) -> usize {
        self.profile().salt_len()
    }
}

/// Why a packet from the leg's peer was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SrtpError {
    /// The authentication tag did not verify: wrong keys, or a forged or damaged packet.
    #[error("SRTP authentication failed")]
    Authentication,
    /// Seen before, or older than the replay window.
    #[error("SRTP replay")]
    Replay,
    /// Too short to be SRTP or SRTCP, or not RTP at all.
    #[error("not an SRTP packet")]
    Malformed,
    /// The key has protected 2^48 packets (RFC 3711 section 9.2).
    #[error("SRTP key exhausted")]
    Exhausted,
}

impl From<webrtc_srtp::Error> for SrtpError {
    fn from(err: webrtc_srtp::Error) -> SrtpError {
        use webrtc_srtp::Error as E;
        match err {
            E::RtpFailedToVerifyAuthTag
            | E::RtcpFailedToVerifyAuthTag
            | E::ErrFailedToVerifyAuthTag
            | E::AesGcm(_) => SrtpError::Authentication,
            E::SrtpSsrcDuplicated(..) | E::SrtcpSsrcDuplicated(..) | E::ErrDuplicated => {
                SrtpError::Replay
            }
            E::ErrExceededMaxPackets => SrtpError::Exhausted,
            _ => SrtpError::Malformed,
        }
    }
}

/// One leg's SRTP: what its peer sends is unprotected with `inbound`, what the relay sends
/// it is protected with `outbound`.
pub struct SrtpSession {
    suite: Suite,
    inbound: Context,
    outbound: Context,
}

impl SrtpSession {
    /// From the peer's master key and salt and the relay's own.
    pub fn new(
        suite: Suite,
        (peer_key, peer_salt): (&[u8], &[u8]),
        (own_key, own_salt): (&[u8], &[u8]),
    ) -> Result<SrtpSession, webrtc_srtp::Error> {
        Ok(SrtpSession {
            suite,
            inbound: Context::new(
                peer_key,
                peer_salt,
                suite.profile(),
                Some(srtp_replay_protection(REPLAY_WINDOW)),
                Some(srtcp_replay_protection(REPLAY_WINDOW)),
            )?,
            outbound: Context::new(own_key, own_salt, suite.profile(), None, None)?,
        })
    }

    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// SRTP or SRTCP from the peer to plain RTP or RTCP.
    pub fn unprotect(&mut self, packet: &[u8]) -> Result<Bytes, SrtpError> {
        if is_rtcp(packet) {
            Ok(self.inbound.decrypt_rtcp(packet)?)
        } else if is_rtp(packet) {
            Ok(self.inbound.decrypt_rtp(packet)?)
        } else {
            Err(SrtpError::Malformed)
        }
    }

    /// Plain RTP or RTCP to SRTP or SRTCP for the peer.
    pub fn protect(&mut self, packet: &[u8]) -> Result<Bytes, SrtpError> {
        if is_rtcp(packet) {
            Ok(self.outbound.encrypt_rtcp(packet)?)
        } else if is_rtp(packet) {
            Ok(self.outbound.encrypt_rtp(packet)?)
        } else {
            Err(SrtpError::Malformed)
        }
    }
}

/// RTP version 2 with room for its fixed header.
fn is_rtp(packet: &[u8]) -> bool {
    packet.len() >= 12 && packet[0] >> 6 == 2
}

/// RTCP among RTP on one port (RFC 5761 section 4): version 2, packet type 192..=223. A
/// packet too short to be RTCP is the SRTCP context's to refuse.
pub fn is_rtcp(packet: &[u8]) -> bool {
    packet.len() >= 2 && packet[0] >> 6 == 2 && (192..=223).contains(&packet[1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::Crypto;

    fn rtp(seq: u16) -> Vec<u8> {
        let mut packet = vec![0x80, 0x00];
        packet.extend_from_slice(&seq.to_be_bytes());
        packet.extend_from_slice(&[0, 0, 0, 160, 0x12, 0x34, 0x56, 0x78]);
        packet.extend(std::iter::repeat_n(0xd5, 160));
        packet
    }

    /// A pair of sessions that talk to each other: a's own keys are b's peer keys.
    fn pair(suite: Suite) -> (SrtpSession, SrtpSession) {
        let (a, b) = (Crypto::generate(1, suite), Crypto::generate(1, suite));
        (
            SrtpSession::new(suite, (b.key(), b.salt()), (a.key(), a.salt())).unwrap(),
            SrtpSession::new(suite, (a.key(), a.salt()), (b.key(), b.salt())).unwrap(),
        )
    }

    #[test]
    fn every_suite_round_trips_rtp_and_rtcp() {
        for suite in Suite::ALL {
            let (mut a, mut b) = pair(suite);
            let protected = a.protect(&rtp(7)).unwrap();
            assert_ne!(&protected[12..172], &rtp(7)[12..], "{suite:?}: encrypted");
            assert!(protected.len() > 172, "{suite:?}: a tag");
            assert_eq!(b.unprotect(&protected).unwrap(), rtp(7), "{suite:?}");
            let report = [0x80, 200, 0, 1, 0x12, 0x34, 0x56, 0x78];
            let protected = b.protect(&report).unwrap();
            assert_eq!(&a.unprotect(&protected).unwrap()[..], &report, "{suite:?}");
        }
    }

    #[test]
    fn a_bad_tag_a_replay_and_garbage_are_refused() {
        let (mut a, mut b) = pair(Suite::AesCm128HmacSha1_80);
        let protected = a.protect(&rtp(1)).unwrap().to_vec();
        let mut damaged = protected.clone();
        *damaged.last_mut().unwrap() ^= 1;
        assert_eq!(b.unprotect(&damaged), Err(SrtpError::Authentication));
        assert!(b.unprotect(&protected).is_ok());
        assert_eq!(b.unprotect(&protected), Err(SrtpError::Replay));
        assert_eq!(b.unprotect(&[0x80, 0, 1]), Err(SrtpError::Malformed));
        assert_eq!(b.unprotect(&[0x16; 40]), Err(SrtpError::Malformed));
        let later = a.protect(&rtp(2)).unwrap();
        assert!(b.unprotect(&later).is_ok(), "the session goes on");
    }
}
