//! The SRTP transforms of one direction: key derivation (RFC 3711 section 4.3, the AES-CM
//! PRF with a key derivation rate of 0), AES-CM with HMAC-SHA1 (RFC 3711 sections 4.1.1 and
//! 4.2) and AEAD_AES_128_GCM (RFC 7714), on RustCrypto's AES (AES-NI where the CPU has it),
//! HMAC-SHA1 and AES-GCM. Packets are transformed in place in a buffer with room for the
//! tag: no allocation beyond the packet's own.

use aes::{
    Aes128,
    cipher::{BlockEncrypt, KeyInit, generic_array::GenericArray},
};
use aes_gcm::{AeadInPlace, Aes128Gcm};
use hmac::{Hmac, Mac};
use sha1::Sha1;

use super::{SrtpError, Suite};

/// Key derivation labels (RFC 3711 section 4.3.1).
const LABEL_RTP_ENCRYPTION: u8 = 0;
const LABEL_RTP_AUTH: u8 = 1;
const LABEL_RTP_SALT: u8 = 2;
const LABEL_RTCP_ENCRYPTION: u8 = 3;
const LABEL_RTCP_AUTH: u8 = 4;
const LABEL_RTCP_SALT: u8 = 5;

/// HMAC-SHA1 session authentication key length (RFC 3711 section 8.2).
const AUTH_KEY_LEN: usize = 20;
/// SRTCP's authentication tag is 80 bits in both AES-CM suites (RFC 4568 section 6.2).
const SRTCP_TAG_LEN: usize = 10;
/// AES-GCM's tag (RFC 7714 section 14.2).
pub(super) const GCM_TAG_LEN: usize = 16;
/// The E flag and SRTCP index after an SRTCP packet's payload.
pub(super) const SRTCP_INDEX_LEN: usize = 4;

/// A packet in a buffer with room after it for what protection adds: `buf[..len]` is the
/// packet. Made by the session, which checks the room first.
pub(super) struct Frame<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Frame<'a> {
    pub(super) fn new(buf: &'a mut [u8], len: usize) -> Frame<'a> {
        Frame { buf, len }
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    fn data(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }

    /// Appends `bytes`; the session made sure of the room.
    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// AES-CM keystream from a 16-byte initial counter block, XORed into `data`: blocks are
/// encrypted in batches so AES-NI pipelines them.
fn aes_cm_xor(aes: &Aes128, iv: u128, data: &mut [u8]) {
    const BATCH: usize = 8;
    let mut counter = iv;
    for chunk in data.chunks_mut(16 * BATCH) {
        let mut blocks = [GenericArray::default(); BATCH];
        let n = chunk.len().div_ceil(16);
        for block in blocks.iter_mut().take(n) {
            *block = GenericArray::from(counter.to_be_bytes());
            counter = counter.wrapping_add(1);
        }
        aes.encrypt_blocks(&mut blocks[..n]);
        for (byte, key) in chunk.iter_mut().zip(blocks.iter().flatten()) {
            *byte ^= key;
        }
    }
}

/// The AES-CM PRF: `len` bytes of session key material for `label` from the master key
/// and salt. The salt (14 bytes for AES-CM, 12 for GCM) is placed at the start of the
/// block, as libsrtp and browsers do.
fn derive(master: &Aes128, master_salt: &[u8], label: u8, len: usize) -> Vec<u8> {
    let mut block = [0u8; 16];
    block[..master_salt.len()].copy_from_slice(master_salt);
    block[7] ^= label;
    let mut out = vec![0u8; len];
    aes_cm_xor(master, u128::from_be_bytes(block), &mut out);
    out
}

/// One stream kind's (SRTP or SRTCP) session keys.
struct CmKeys {
    aes: Aes128,
    salt: u128,
    auth: Hmac<Sha1>,
}

struct GcmKeys {
    aead: Aes128Gcm,
    salt: [u8; 12],
}

// One per direction of a leg, made once and never moved: the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
enum Keys {
    AesCm {
        rtp: CmKeys,
        rtcp: CmKeys,
        tag_len: usize,
    },
    Gcm {
        rtp: GcmKeys,
        rtcp: GcmKeys,
    },
}

/// One direction's session keys, derived once from its master key and salt.
pub(super) struct Cipher {
    keys: Keys,
}

/// The AES-CM counter block: salt XOR SSRC XOR index, shifted by 16 bits (RFC 3711 section
/// 4.1.1).
fn cm_iv(salt: u128, ssrc: u32, index: u64) -> u128 {
    salt ^ (u128::from(ssrc) << 64) ^ (u128::from(index) << 16)
}

impl Cipher {
    pub(super) fn new(suite: Suite, master_key: &[u8], master_salt: &[u8]) -> Option<Cipher> {
        if master_key.len() != suite.key_len() || master_salt.len() != suite.salt_len() {
            return None;
        }
        let master = Aes128::new_from_slice(master_key).ok()?;
        let key = |label| derive(&master, master_salt, label, 16);
        let keys = match suite {
            Suite::AesCm128HmacSha1_80 | Suite::AesCm128HmacSha1_32 => {
                let cm = |enc, auth, salt| -> Option<CmKeys> {
                    let mut block = [0u8; 16];
                    block[..14].copy_from_slice(&derive(&master, master_salt, salt, 14));
                    Some(CmKeys {
                        aes: Aes128::new_from_slice(&key(enc)).ok()?,
                        salt: u128::from_be_bytes(block),
                        auth: <Hmac<Sha1> as Mac>::new_from_slice(&derive(
                            &master,
                            master_salt,
                            auth,
                            AUTH_KEY_LEN,
                        ))
                        .ok()?,
                    })
                };
                Keys::AesCm {
                    rtp: cm(LABEL_RTP_ENCRYPTION, LABEL_RTP_AUTH, LABEL_RTP_SALT)?,
                    rtcp: cm(LABEL_RTCP_ENCRYPTION, LABEL_RTCP_AUTH, LABEL_RTCP_SALT)?,
                    tag_len: if suite == Suite::AesCm128HmacSha1_80 {
                        10
                    } else {
                        4
                    },
                }
            }
            Suite::AeadAes128Gcm => {
                let gcm = |enc, salt| -> Option<GcmKeys> {
                    Some(GcmKeys {
                        aead: Aes128Gcm::new_from_slice(&key(enc)).ok()?,
                        salt: derive(&master, master_salt, salt, 12).try_into().ok()?,
                    })
                };
                Keys::Gcm {
                    rtp: gcm(LABEL_RTP_ENCRYPTION, LABEL_RTP_SALT)?,
                    rtcp: gcm(LABEL_RTCP_ENCRYPTION, LABEL_RTCP_SALT)?,
                }
            }
        };
        Some(Cipher { keys })
    }

    /// What SRTP adds to an RTP packet (the tag).
    pub(super) fn rtp_overhead(&self) -> usize {
        match &self.keys {
            Keys::AesCm { tag_len, .. } => *tag_len,
            Keys::Gcm { .. } => GCM_TAG_LEN,
        }
    }

    /// What SRTCP adds to an RTCP packet (the index word and the tag).
    pub(super) fn rtcp_overhead(&self) -> usize {
        SRTCP_INDEX_LEN
            + match &self.keys {
                Keys::AesCm { .. } => SRTCP_TAG_LEN,
                Keys::Gcm { .. } => GCM_TAG_LEN,
            }
    }

    /// Protects the RTP packet in `packet` (header of `header_len` bytes) with the 48-bit
    /// `index`, appending the tag.
    pub(super) fn protect_rtp(
        &self,
        packet: &mut Frame<'_>,
        header_len: usize,
        ssrc: u32,
        index: u64,
    ) -> Result<(), SrtpError> {
        let roc = (index >> 16) as u32;
        match &self.keys {
            Keys::AesCm { rtp, tag_len, .. } => {
                aes_cm_xor(
                    &rtp.aes,
                    cm_iv(rtp.salt, ssrc, index),
                    &mut packet.data_mut()[header_len..],
                );
                let mut mac = rtp.auth.clone();
                mac.update(packet.data());
                mac.update(&roc.to_be_bytes());
                let tag = mac.finalize().into_bytes();
                packet.push(&tag[..*tag_len]);
            }
            Keys::Gcm { rtp, .. } => {
                let nonce = gcm_rtp_nonce(&rtp.salt, ssrc, index);
                let (header, payload) = packet.data_mut().split_at_mut(header_len);
                let tag = rtp
                    .aead
                    .encrypt_in_place_detached(&nonce.into(), header, payload)
                    .map_err(|_| SrtpError::Malformed)?;
                packet.push(&tag);
            }
        }
        Ok(())
    }

    /// Checks and decrypts the SRTP packet in `packet` with the 48-bit `index`, leaving
    /// the plain RTP packet (the tag removed).
    pub(super) fn unprotect_rtp(
        &self,
        packet: &mut Frame<'_>,
        header_len: usize,
        ssrc: u32,
        index: u64,
    ) -> Result<(), SrtpError> {
        let roc = (index >> 16) as u32;
        let body = packet
            .len()
            .checked_sub(self.rtp_overhead())
            .filter(|&body| body >= header_len)
            .ok_or(SrtpError::Malformed)?;
        match &self.keys {
            Keys::AesCm { rtp, .. } => {
                let mut mac = rtp.auth.clone();
                mac.update(&packet.data()[..body]);
                mac.update(&roc.to_be_bytes());
                mac.verify_truncated_left(&packet.data()[body..])
                    .map_err(|_| SrtpError::Authentication)?;
                packet.truncate(body);
                aes_cm_xor(
                    &rtp.aes,
                    cm_iv(rtp.salt, ssrc, index),
                    &mut packet.data_mut()[header_len..],
                );
            }
            Keys::Gcm { rtp, .. } => {
                let nonce = gcm_rtp_nonce(&rtp.salt, ssrc, index);
                let (rest, tag) = packet.data_mut().split_at_mut(body);
                let (header, payload) = rest.split_at_mut(header_len);
                rtp.aead
                    .decrypt_in_place_detached(&nonce.into(), header, payload, (&*tag).into())
                    .map_err(|_| SrtpError::Authentication)?;
                packet.truncate(body);
            }
        }
        Ok(())
    }

    /// Protects the RTCP packet in `packet` (at least 8 bytes) with the 31-bit `index`,
    /// always encrypted (E set).
    pub(super) fn protect_rtcp(&self, packet: &mut Frame<'_>, ssrc: u32, index: u32) {
        let trailer = (0x8000_0000 | index).to_be_bytes();
        match &self.keys {
            Keys::AesCm { rtcp, .. } => {
                aes_cm_xor(
                    &rtcp.aes,
                    cm_iv(rtcp.salt, ssrc, u64::from(index)),
                    &mut packet.data_mut()[8..],
                );
                packet.push(&trailer);
                let mut mac = rtcp.auth.clone();
                mac.update(packet.data());
                let tag = mac.finalize().into_bytes();
                packet.push(&tag[..SRTCP_TAG_LEN]);
            }
            Keys::Gcm { rtcp, .. } => {
                let nonce = gcm_rtcp_nonce(&rtcp.salt, ssrc, index);
                let mut aad = [0u8; 12];
                aad[..8].copy_from_slice(&packet.data()[..8]);
                aad[8..].copy_from_slice(&trailer);
                let tag = rtcp
                    .aead
                    .encrypt_in_place_detached(&nonce.into(), &aad, &mut packet.data_mut()[8..])
                    .expect("an RTCP packet is far below GCM's limit");
                packet.push(&tag);
                packet.push(&trailer);
            }
        }
    }

    /// The SRTCP index and E flag of a protected packet long enough for its trailer.
    pub(super) fn rtcp_index(&self, packet: &[u8]) -> Option<(u32, bool)> {
        if packet.len() < 8 + self.rtcp_overhead() {
            return None;
        }
        let at = match &self.keys {
            Keys::AesCm { .. } => packet.len() - SRTCP_TAG_LEN - SRTCP_INDEX_LEN,
            Keys::Gcm { .. } => packet.len() - SRTCP_INDEX_LEN,
        };
        let word = u32::from_be_bytes(packet[at..at + 4].try_into().ok()?);
        Some((word & 0x7fff_ffff, word & 0x8000_0000 != 0))
    }

    /// Checks and (when E is set) decrypts an SRTCP packet, leaving the plain RTCP packet.
    pub(super) fn unprotect_rtcp(
        &self,
        packet: &mut Frame<'_>,
        ssrc: u32,
        index: u32,
        encrypted: bool,
    ) -> Result<(), SrtpError> {
        let body = packet.len() - self.rtcp_overhead();
        match &self.keys {
            Keys::AesCm { rtcp, .. } => {
                let tagged = packet.len() - SRTCP_TAG_LEN;
                let mut mac = rtcp.auth.clone();
                mac.update(&packet.data()[..tagged]);
                mac.verify_truncated_left(&packet.data()[tagged..])
                    .map_err(|_| SrtpError::Authentication)?;
                packet.truncate(body);
                if encrypted {
                    aes_cm_xor(
                        &rtcp.aes,
                        cm_iv(rtcp.salt, ssrc, u64::from(index)),
                        &mut packet.data_mut()[8..],
                    );
                }
            }
            Keys::Gcm { rtcp, .. } => {
                let nonce = gcm_rtcp_nonce(&rtcp.salt, ssrc, index);
                let trailer_at = packet.len() - SRTCP_INDEX_LEN;
                let trailer: [u8; 4] = packet.data()[trailer_at..].try_into().expect("4 bytes");
                let (rest, tag) = packet.data_mut()[..trailer_at].split_at_mut(body);
                // Unencrypted SRTCP (RFC 7714 section 9.2): the whole packet is
                // authenticated data, nothing is decrypted.
                let mut aad = Vec::with_capacity(body + 4);
                let payload: &mut [u8] = if encrypted {
                    aad.extend_from_slice(&rest[..8]);
                    &mut rest[8..]
                } else {
                    aad.extend_from_slice(rest);
                    &mut []
                };
                aad.extend_from_slice(&trailer);
                rtcp.aead
                    .decrypt_in_place_detached(&nonce.into(), &aad, payload, (&*tag).into())
                    .map_err(|_| SrtpError::Authentication)?;
                packet.truncate(body);
            }
        }
        Ok(())
    }
}

/// RFC 7714 section 8.1: 00 00 || SSRC || ROC || SEQ, XOR the session salt.
fn gcm_rtp_nonce(salt: &[u8; 12], ssrc: u32, index: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[2..6].copy_from_slice(&ssrc.to_be_bytes());
    nonce[6..12].copy_from_slice(&index.to_be_bytes()[2..]);
    for (byte, salt) in nonce.iter_mut().zip(salt) {
        *byte ^= salt;
    }
    nonce
}

/// RFC 7714 section 9.1: 00 00 || SSRC || 00 00 || 0 || SRTCP index, XOR the session salt.
fn gcm_rtcp_nonce(salt: &[u8; 12], ssrc: u32, index: u32) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[2..6].copy_from_slice(&ssrc.to_be_bytes());
    nonce[8..12].copy_from_slice(&index.to_be_bytes());
    for (byte, salt) in nonce.iter_mut().zip(salt) {
        *byte ^= salt;
    }
    nonce
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(hex: &str) -> Vec<u8> {
        hex::decode(hex.split_whitespace().collect::<String>()).unwrap()
    }

    /// RFC 3711 appendix B.3: the session keys from the master key and salt.
    #[test]
    fn key_derivation_matches_rfc_3711_b3() {
        let master = Aes128::new_from_slice(&bytes("E1F97A0D3E018BE0D64FA32C06DE4139")).unwrap();
        let salt = bytes("0EC675AD498AFEEBB6960B3AABE6");
        assert_eq!(
            derive(&master, &salt, LABEL_RTP_ENCRYPTION, 16),
            bytes("C61E7A93744F39EE10734AFE3FF7A087")
        );
        assert_eq!(
            derive(&master, &salt, LABEL_RTP_SALT, 14),
            bytes("30CBBC08863D8C85D49DB34A9AE1")
        );
        assert_eq!(
            derive(&master, &salt, LABEL_RTP_AUTH, 94),
            bytes(
                "CEBE321F6FF7716B6FD4AB49AF256A15 6D38BAA48F0A0ACF3C34E2359E6CDBCE
                 E049646C43D9327AD175578EF7227098 6371C10C9A369AC2F94A8C5FBCDDDC25
                 6D6E919A48B610EF17C2041E47403576 6B68642C59BBFC2F34DB60DBDFB2"
            )
        );
    }

    /// RFC 3711 appendix B.2: the AES-CM keystream of a session key, salt and IV.
    #[test]
    fn aes_cm_keystream_matches_rfc_3711_b2() {
        let aes = Aes128::new_from_slice(&bytes("2B7E151628AED2A6ABF7158809CF4F3C")).unwrap();
        let iv = u128::from_be_bytes(
            bytes("F0F1F2F3F4F5F6F7F8F9FAFBFCFD0000")
                .try_into()
                .unwrap(),
        );
        let mut keystream = vec![0u8; 48];
        aes_cm_xor(&aes, iv, &mut keystream);
        assert_eq!(
            keystream,
            bytes(
                "E03EAD0935C95E80E166B16DD92B4EB4 D23513162B02D0F72A43A2FE4A5F97AB
                 41E95B3BB0A2E8DD477901E4FCA894C0"
            )
        );
        // The last block of the 2^16 the counter may take.
        let mut last = vec![0u8; 16];
        aes_cm_xor(&aes, iv + 0xfeff, &mut last);
        assert_eq!(last, bytes("EC8CDF7398607CB0F2D21675EA9EA1E4"));
    }

    /// RFC 7714 section 16.1.1: an RTP packet protected with AEAD_AES_128_GCM, from the
    /// session key and salt.
    #[test]
    fn gcm_rtp_matches_rfc_7714_16() {
        let keys = GcmKeys {
            aead: Aes128Gcm::new_from_slice(&bytes("000102030405060708090a0b0c0d0e0f")).unwrap(),
            salt: bytes("517569642070726f2071756f").try_into().unwrap(),
        };
        let cipher = Cipher {
            keys: Keys::Gcm {
                rtp: keys,
                rtcp: GcmKeys {
                    aead: Aes128Gcm::new_from_slice(&[0; 16]).unwrap(),
                    salt: [0; 12],
                },
            },
        };
        let plain = bytes(
            "8040f17b8041f8d35501a0b247616c6c 696120657374206f6d6e697320646976
             69736120696e20706172746573207472 6573",
        );
        let mut buf = plain.clone();
        buf.resize(plain.len() + GCM_TAG_LEN, 0);
        let mut packet = Frame::new(&mut buf, plain.len());
        let index = 0xf17b; // ROC 0, SEQ 0xf17b
        cipher
            .protect_rtp(&mut packet, 12, 0x5501a0b2, index)
            .unwrap();
        assert_eq!(
            packet.data(),
            bytes(
                "8040f17b8041f8d35501a0b2f24de3a3 fb34de6cacba861c9d7e4bcabe633bd5
                 0d294e6f42a5f47a51c7d19b36de3adf 8833899d7f27beb16a9152cf765ee439
                 0cce"
            )
        );
        cipher
            .unprotect_rtp(&mut packet, 12, 0x5501a0b2, index)
            .unwrap();
        assert_eq!(packet.data(), plain);
    }
}
