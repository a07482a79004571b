//! SRTP and SRTCP (RFC 3711, RFC 7714) for a leg whose security the relay terminates: one
//! context for what the leg's peer sends (unprotect, with a replay window) and one for what
//! the relay sends it (protect). The transforms are ours on RustCrypto's AES, HMAC-SHA1 and
//! AES-GCM (`cipher`); the per-SSRC indices (`context`) can be read out and put back, so a
//! restarted relayd goes on with a call's keys where the last one stopped.

mod cipher;
mod context;

use bytes::Bytes;

use self::{
    cipher::{Cipher, Frame},
    context::{Indices, Window},
};
use crate::state::{SrtpRecord, SsrcRecord};

/// The SRTP protection profiles the relay implements, in the order it prefers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Suite {
    AeadAes128Gcm,
    AesCm128HmacSha1_80,
    AesCm128HmacSha1_32,
}

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

    pub fn key_len(self) -> usize {
        16
    }

    /// 112 bits for AES-CM (RFC 3711), 96 for GCM (RFC 7714 section 12).
    pub fn salt_len(self) -> usize {
        match self {
            Suite::AeadAes128Gcm => 12,
            Suite::AesCm128HmacSha1_80 | Suite::AesCm128HmacSha1_32 => 14,
        }
    }
}

/// Why a packet was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SrtpError {
    /// The authentication tag did not verify: wrong keys, or a forged or damaged packet.
    #[error("SRTP authentication failed")]
    Authentication,
    /// Seen before, or older than the replay window.
    #[error("SRTP replay")]
    Replay,
    /// Too short to be SRTP or SRTCP, not RTP at all, or an SSRC too many.
    #[error("not an SRTP packet")]
    Malformed,
    /// The key has protected 2^48 packets (RFC 3711 section 9.2).
    #[error("SRTP key exhausted")]
    Exhausted,
}

/// Why a record cannot be made an SRTP session again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("SRTP suite {0:?} is not one the relay implements")]
    Suite(String),
    #[error("an SRTP master key and salt of {0} bytes do not fit the suite")]
    KeyLength(usize),
}

/// The most protection adds to a packet: SRTCP's index word and a GCM tag.
pub const MAX_OVERHEAD: usize = cipher::SRTCP_INDEX_LEN + cipher::GCM_TAG_LEN;

/// How many SRTCP packets the relay may have sent since a record was written: a restored
/// leg starts its own SRTCP indices this far above the recorded ones, so none is used
/// twice (the peer takes an index ahead of its window).
const SRTCP_INDEX_MARGIN: u32 = 1024;

/// One direction: its session keys and per-SSRC indices.
struct Context {
    cipher: Cipher,
    indices: Indices,
}

impl Context {
    fn new(suite: Suite, key: &[u8], salt: &[u8]) -> Option<Context> {
        Some(Context {
            cipher: Cipher::new(suite, key, salt)?,
            indices: Indices::default(),
        })
    }
}

/// One leg's SRTP: what its peer sends is unprotected with `inbound`, what the relay sends
/// it is protected with `outbound`.
pub struct SrtpSession {
    suite: Suite,
    /// The master keys and salts, the peer's and the relay's (for the record).
    peer_key_salt: Vec<u8>,
    own_key_salt: Vec<u8>,
    inbound: Context,
    outbound: Context,
}

impl SrtpSession {
    /// From the peer's master key and salt and the relay's own; None when their lengths do
    /// not fit the suite.
    pub fn new(
        suite: Suite,
        (peer_key, peer_salt): (&[u8], &[u8]),
        (own_key, own_salt): (&[u8], &[u8]),
    ) -> Option<SrtpSession> {
        Some(SrtpSession {
            suite,
            peer_key_salt: [peer_key, peer_salt].concat(),
            own_key_salt: [own_key, own_salt].concat(),
            inbound: Context::new(suite, peer_key, peer_salt)?,
            outbound: Context::new(suite, own_key, own_salt)?,
        })
    }

    pub fn suite(&self) -> Suite {
        self.suite
    }

    /// SRTP or SRTCP from the peer to plain RTP or RTCP.
    pub fn unprotect(&mut self, packet: &[u8]) -> Result<Bytes, SrtpError> {
        let mut buf = packet.to_vec();
        let len = self.unprotect_in_place(&mut buf, packet.len())?;
        buf.truncate(len);
        Ok(buf.into())
    }

    /// Plain RTP or RTCP to SRTP or SRTCP for the peer.
    pub fn protect(&mut self, packet: &[u8]) -> Result<Bytes, SrtpError> {
        let mut buf = Vec::with_capacity(packet.len() + MAX_OVERHEAD);
        buf.extend_from_slice(packet);
        buf.resize(packet.len() + MAX_OVERHEAD, 0);
        let len = self.protect_in_place(&mut buf, packet.len())?;
        buf.truncate(len);
        Ok(buf.into())
    }

    /// The SRTP or SRTCP packet `buf[..len]` from the peer, unprotected where it is;
    /// returns the plain packet's length.
    pub fn unprotect_in_place(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        let Context { cipher, indices } = &mut self.inbound;
        let packet = buf.get(..len).ok_or(SrtpError::Malformed)?;
        if is_rtcp(packet) {
            let (index, encrypted) = cipher.rtcp_index(packet).ok_or(SrtpError::Malformed)?;
            let ssrc = ssrc_at(packet, 4);
            indices.rtcp_check(ssrc, index)?;
            let mut frame = Frame::new(buf, len);
            cipher.unprotect_rtcp(&mut frame, ssrc, index, encrypted)?;
            indices.rtcp_accept(ssrc, index);
            Ok(frame.len())
        } else {
            let header_len = rtp_header_len(packet).ok_or(SrtpError::Malformed)?;
            let ssrc = ssrc_at(packet, 8);
            let index = indices.rtp_index(ssrc, sequence(packet), 0)?;
            let mut frame = Frame::new(buf, len);
            cipher.unprotect_rtp(&mut frame, header_len, ssrc, index)?;
            indices.rtp_accept(ssrc, index);
            Ok(frame.len())
        }
    }

    /// The plain RTP or RTCP packet `buf[..len]` protected where it is, for the peer;
    /// `buf` has room for [`MAX_OVERHEAD`] more bytes. Returns the protected length.
    pub fn protect_in_place(&mut self, buf: &mut [u8], len: usize) -> Result<usize, SrtpError> {
        let Context { cipher, indices } = &mut self.outbound;
        if buf.len() < len + MAX_OVERHEAD {
            return Err(SrtpError::Malformed);
        }
        let packet = &buf[..len];
        if is_rtcp(packet) {
            if packet.len() < 8 {
                return Err(SrtpError::Malformed);
            }
            let ssrc = ssrc_at(packet, 4);
            let index = indices.rtcp_next(ssrc)?;
            let mut frame = Frame::new(buf, len);
            cipher.protect_rtcp(&mut frame, ssrc, index);
            Ok(frame.len())
        } else {
            let header_len = rtp_header_len(packet).ok_or(SrtpError::Malformed)?;
            let ssrc = ssrc_at(packet, 8);
            let index = indices.rtp_index(ssrc, sequence(packet), 0)?;
            let mut frame = Frame::new(buf, len);
            cipher.protect_rtp(&mut frame, header_len, ssrc, index)?;
            indices.rtp_accept(ssrc, index);
            Ok(frame.len())
        }
    }

    /// The state store's view: keys and the indices reached.
    pub fn record(&self) -> SrtpRecord {
        SrtpRecord {
            suite: self.suite.sdes_name().to_owned(),
            peer_key_salt: self.peer_key_salt.clone(),
            own_key_salt: self.own_key_salt.clone(),
            inbound: ssrc_records(&self.inbound.indices),
            outbound: ssrc_records(&self.outbound.indices),
        }
    }

    /// A session that goes on where a record left it: the peer's packets are taken from
    /// the recorded indices on (the rollover counters carried over), the relay's SRTCP
    /// indices start above what it may have sent since the record was written.
    pub fn from_record(record: &SrtpRecord) -> Result<SrtpSession, RecordError> {
        let suite = Suite::from_sdes_name(&record.suite)
            .ok_or_else(|| RecordError::Suite(record.suite.clone()))?;
        let key = suite.key_len();
        let split = |key_salt: &[u8]| -> Result<(Vec<u8>, Vec<u8>), RecordError> {
            if key_salt.len() != key + suite.salt_len() {
                return Err(RecordError::KeyLength(key_salt.len()));
            }
            Ok((key_salt[..key].to_vec(), key_salt[key..].to_vec()))
        };
        let (peer_key, peer_salt) = split(&record.peer_key_salt)?;
        let (own_key, own_salt) = split(&record.own_key_salt)?;
        let mut session = SrtpSession::new(suite, (&peer_key, &peer_salt), (&own_key, &own_salt))
            .ok_or(RecordError::KeyLength(record.peer_key_salt.len()))?;
        restore_indices(&mut session.inbound.indices, &record.inbound, 0);
        restore_indices(
            &mut session.outbound.indices,
            &record.outbound,
            SRTCP_INDEX_MARGIN,
        );
        Ok(session)
    }

    /// Whether the indices moved far enough from `record` that a restart from it could
    /// mistake them: a rollover counter the record has not (RFC 3711's estimate holds
    /// within 2^15 packets of the last one known), an SSRC it lacks, or SRTCP indices
    /// halfway to the margin.
    pub fn drifted_from(&self, record: &SrtpRecord) -> bool {
        drifted(&self.inbound.indices, &record.inbound)
            || drifted(&self.outbound.indices, &record.outbound)
    }
}

fn ssrc_records(indices: &Indices) -> Vec<SsrcRecord> {
    let mut ssrcs: Vec<u32> = indices
        .rtp
        .keys()
        .chain(indices.rtcp.keys())
        .copied()
        .collect();
    ssrcs.sort_unstable();
    ssrcs.dedup();
    ssrcs
        .into_iter()
        .map(|ssrc| SsrcRecord {
            ssrc,
            rtp: indices.rtp.get(&ssrc).map(|window| window.highest),
            rtcp: indices.rtcp.get(&ssrc).map(|window| window.highest as u32),
        })
        .collect()
}

fn restore_indices(indices: &mut Indices, records: &[SsrcRecord], rtcp_margin: u32) {
    for record in records {
        if let Some(index) = record.rtp {
            indices.rtp.insert(record.ssrc, Window::restored(index));
        }
        if let Some(index) = record.rtcp {
            let index = index.saturating_add(rtcp_margin).min(0x7fff_ffff);
            indices
                .rtcp
                .insert(record.ssrc, Window::restored(u64::from(index)));
        }
    }
}

/// RTP packets between two records before a restart could mistake the rollover counter.
const RTP_DRIFT: u64 = 1 << 14;

fn drifted(indices: &Indices, records: &[SsrcRecord]) -> bool {
    let recorded = |ssrc: &u32| records.iter().find(|record| record.ssrc == *ssrc);
    indices.rtp.iter().any(|(ssrc, window)| {
        recorded(ssrc)
            .and_then(|record| record.rtp)
            .is_none_or(|index| window.highest.abs_diff(index) >= RTP_DRIFT)
    }) || indices.rtcp.iter().any(|(ssrc, window)| {
        recorded(ssrc)
            .and_then(|record| record.rtcp)
            .is_none_or(|index| {
                window.highest.abs_diff(u64::from(index)) >= u64::from(SRTCP_INDEX_MARGIN / 2)
            })
    })
}

/// The length of an RTP packet's header: fixed part, CSRCs and header extension.
fn rtp_header_len(packet: &[u8]) -> Option<usize> {
    if !is_rtp(packet) {
        return None;
    }
    let mut len = 12 + 4 * usize::from(packet[0] & 0x0f);
    if packet[0] & 0x10 != 0 {
        let words = packet.get(len + 2..len + 4)?;
        len += 4 + 4 * usize::from(u16::from_be_bytes([words[0], words[1]]));
    }
    (packet.len() >= len).then_some(len)
}

fn ssrc_at(packet: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(packet[at..at + 4].try_into().expect("length checked"))
}

fn sequence(packet: &[u8]) -> u16 {
    u16::from_be_bytes([packet[2], packet[3]])
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

    fn profile(suite: Suite) -> webrtc_srtp::protection_profile::ProtectionProfile {
        use webrtc_srtp::protection_profile::ProtectionProfile as P;
        match suite {
            Suite::AeadAes128Gcm => P::AeadAes128Gcm,
            Suite::AesCm128HmacSha1_80 => P::Aes128CmHmacSha1_80,
            Suite::AesCm128HmacSha1_32 => P::Aes128CmHmacSha1_32,
        }
    }

    fn webrtc(suite: Suite, keys: &Crypto) -> webrtc_srtp::context::Context {
        webrtc_srtp::context::Context::new(keys.key(), keys.salt(), profile(suite), None, None)
            .unwrap()
    }

    fn rtp_with(seq: u16, ssrc: u32, extension: bool) -> Vec<u8> {
        let mut packet = rtp(seq);
        packet[8..12].copy_from_slice(&ssrc.to_be_bytes());
        if extension {
            // X set, one CSRC, a one-word extension.
            packet[0] |= 0x11;
            packet.splice(12..12, [0, 0, 0, 9, 0xbe, 0xde, 0, 1, 0x10, 0xff, 0, 0]);
        }
        packet
    }

    /// webrtc-srtp (an implementation the relay's shares nothing with but RustCrypto's
    /// block ciphers) and the relay's take each other's SRTP and SRTCP in every suite,
    /// with CSRCs and header extensions, across a rollover of the sequence numbers.
    #[test]
    fn every_suite_interoperates_with_webrtc_srtp_across_a_rollover() {
        for suite in Suite::ALL {
            let (peer, own) = (Crypto::generate(1, suite), Crypto::generate(1, suite));
            let mut relay =
                SrtpSession::new(suite, (peer.key(), peer.salt()), (own.key(), own.salt()))
                    .unwrap();
            let (mut peer_out, mut peer_in) = (webrtc(suite, &peer), webrtc(suite, &own));
            for (n, seq) in (0xfff0u16..=0xffff).chain(0..0x10).enumerate() {
                let plain = rtp_with(seq, 0x1234_5678, n % 3 == 0);
                let from_peer = peer_out.encrypt_rtp(&plain).unwrap();
                assert_eq!(
                    relay.unprotect(&from_peer).unwrap(),
                    plain,
                    "{suite:?} {seq}"
                );
                let to_peer = relay.protect(&plain).unwrap();
                assert_eq!(
                    peer_in.decrypt_rtp(&to_peer).unwrap(),
                    plain,
                    "{suite:?} {seq}"
                );
            }
            let report = [
                0x81, 200, 0, 6, 0x12, 0x34, 0x56, 0x78, 1, 2, 3, 4, 5, 6, 7, 8,
            ];
            for _ in 0..3 {
                let from_peer = peer_out.encrypt_rtcp(&report).unwrap();
                assert_eq!(
                    &relay.unprotect(&from_peer).unwrap()[..],
                    &report,
                    "{suite:?}"
                );
                let to_peer = relay.protect(&report).unwrap();
                assert_eq!(
                    &peer_in.decrypt_rtcp(&to_peer).unwrap()[..],
                    &report,
                    "{suite:?}"
                );
            }
            let record = relay.record();
            assert_eq!(
                record.inbound,
                [SsrcRecord {
                    ssrc: 0x1234_5678,
                    rtp: Some(0x1_000f),
                    rtcp: Some(3),
                }],
                "{suite:?}"
            );
        }
    }

    /// A session made again from its record goes on where the first left off: the
    /// rollover counter carried over both ways, the peer's old packets refused, the
    /// relay's SRTCP indices above any it may have used.
    #[test]
    fn a_session_from_its_record_goes_on_after_a_rollover() {
        for suite in Suite::ALL {
            let (peer, own) = (Crypto::generate(1, suite), Crypto::generate(1, suite));
            let mut relay =
                SrtpSession::new(suite, (peer.key(), peer.salt()), (own.key(), own.salt()))
                    .unwrap();
            let (mut peer_out, mut peer_in) = (webrtc(suite, &peer), webrtc(suite, &own));
            let mut sent = Vec::new();
            // Through a rollover, and on for a while after it.
            for seq in (0xff00u16..=0xffff).chain(0..0x100) {
                let plain = rtp_with(seq, 7, false);
                let from_peer = peer_out.encrypt_rtp(&plain).unwrap();
                relay.unprotect(&from_peer).unwrap();
                sent.push(from_peer);
                peer_in
                    .decrypt_rtp(&relay.protect(&plain).unwrap())
                    .unwrap();
            }
            let report = [0x80, 200, 0, 1, 0, 0, 0, 7];
            peer_in
                .decrypt_rtcp(&relay.protect(&report).unwrap())
                .unwrap();
            let record = relay.record();
            assert!(!relay.drifted_from(&record));
            let mut restored = SrtpSession::from_record(&record).unwrap();
            assert_eq!(restored.suite(), suite);
            // The peer's next packets (ROC 1) are taken; an old one is not.
            for seq in 0x100u16..0x110 {
                let plain = rtp_with(seq, 7, false);
                let from_peer = peer_out.encrypt_rtp(&plain).unwrap();
                assert_eq!(restored.unprotect(&from_peer).unwrap(), plain, "{suite:?}");
                // And the relay's toward it carry ROC 1 too.
                let to_peer = restored.protect(&plain).unwrap();
                assert_eq!(peer_in.decrypt_rtp(&to_peer).unwrap(), plain, "{suite:?}");
            }
            assert_eq!(
                restored.unprotect(sent.last().unwrap()),
                Err(SrtpError::Replay),
                "{suite:?}"
            );
            let to_peer = restored.protect(&report).unwrap();
            assert_eq!(&peer_in.decrypt_rtcp(&to_peer).unwrap()[..], &report);
            let index = u32::from_be_bytes(
                to_peer[to_peer.len() - if suite == Suite::AeadAes128Gcm { 4 } else { 14 }..][..4]
                    .try_into()
                    .unwrap(),
            );
            assert_eq!(
                index,
                0x8000_0000 | (1 + SRTCP_INDEX_MARGIN + 1),
                "{suite:?}"
            );
        }
    }

    #[test]
    fn records_that_do_not_fit_are_refused_and_drift_is_seen() {
        let suite = Suite::AesCm128HmacSha1_80;
        let keys = Crypto::generate(1, suite);
        let mut session =
            SrtpSession::new(suite, (keys.key(), keys.salt()), (keys.key(), keys.salt())).unwrap();
        let mut record = session.record();
        record.suite = "NULL_HMAC_SHA1_80".into();
        assert!(matches!(
            SrtpSession::from_record(&record),
            Err(RecordError::Suite(_))
        ));
        let mut record = session.record();
        record.own_key_salt.pop();
        assert_eq!(
            SrtpSession::from_record(&record).err(),
            Some(RecordError::KeyLength(29))
        );
        // A new SSRC, and 2^14 packets on, are drift; a few packets are not.
        let record = session.record();
        session.protect(&rtp(1)).unwrap();
        assert!(session.drifted_from(&record));
        let record = session.record();
        session.protect(&rtp(100)).unwrap();
        assert!(!session.drifted_from(&record));
        session.protect(&rtp(1 + (1 << 14))).unwrap();
        assert!(session.drifted_from(&record));
    }

    #[test]
    fn short_and_odd_packets_are_refused_without_a_panic() {
        for suite in Suite::ALL {
            let (mut a, mut b) = pair(suite);
            for len in 0..64 {
                for first in [0x80u8, 0x90, 0x8f, 0x9f] {
                    for second in [0u8, 200, 201] {
                        let mut packet = vec![0u8; len];
                        if len > 1 {
                            packet[0] = first;
                            packet[1] = second;
                        }
                        let _ = b.unprotect(&packet);
                        let _ = a.protect(&packet);
                    }
                }
            }
        }
    }
}
