//! SRTP for the test peers that keep SDES keys of their own (RFC 4568 `a=crypto` with
//! AES_CM_128_HMAC_SHA1_80), on webrtc-srtp's contexts: independent of the relay's wrapper.

use base64::{Engine, engine::general_purpose::STANDARD};
use webrtc_srtp::{context::Context, protection_profile::ProtectionProfile};

/// A context for a 30-byte master key and salt (16 + 14).
pub fn context(key_salt: &[u8]) -> Context {
    Context::new(
        &key_salt[..16],
        &key_salt[16..],
        ProtectionProfile::Aes128CmHmacSha1_80,
        None,
        None,
    )
    .expect("an AES_CM_128_HMAC_SHA1_80 key")
}

/// A context for the key of an `a=crypto` value (`1 AES_CM_128_HMAC_SHA1_80 inline:...`).
pub fn context_of(crypto: &str) -> Context {
    let inline = crypto
        .split_whitespace()
        .nth(2)
        .and_then(|key| key.strip_prefix("inline:"))
        .unwrap_or_else(|| panic!("no inline key in a=crypto:{crypto}"));
    let key_salt = STANDARD
        .decode(inline.split('|').next().expect("a key"))
        .expect("base64");
    context(&key_salt)
}

/// The `a=crypto` value of tag 1 for a 30-byte key.
pub fn crypto_line(key_salt: &[u8]) -> String {
    format!(
        "1 AES_CM_128_HMAC_SHA1_80 inline:{}",
        STANDARD.encode(key_salt)
    )
}

/// `sdp` with its `a=crypto` lines replaced by `a=crypto:{crypto}` (an answerer's own key
/// under the offer's tag).
pub fn with_crypto(sdp: &str, crypto: &str) -> String {
    sdp.split("\r\n")
        .map(|line| {
            if line.starts_with("a=crypto:") {
                format!("a=crypto:{crypto}")
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}
