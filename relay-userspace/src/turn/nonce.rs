//! Nonces for the long-term credential mechanism (RFC 8489 9.2), stateless: a nonce is the
//! time it was issued and an HMAC over that time and the client's transport address, so the
//! server keeps no table, a nonce is useless from another address, and an old one is
//! answered with 438 (Stale Nonce) so the client retries with a fresh one.

use std::net::SocketAddr;

use ring::{hmac, rand::SystemRandom};
use subtle::ConstantTimeEq;

/// Bytes of the nonces' HMAC key.
pub const KEY_BYTES: usize = 32;

/// Bytes of the HMAC kept in the nonce (hex-encoded: twice as many characters): 64 bits,
/// beyond guessing within a nonce's lifetime, and a 401 that stays small.
const TAG_BYTES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceStatus {
    Valid,
    /// Issued by us for this client, but older than the lifetime: 438.
    Stale,
    /// Not one of ours, or for another client: treated like a missing nonce (401).
    Invalid,
}

pub struct NonceIssuer {
    key: hmac::Key,
    lifetime_secs: u64,
}

impl NonceIssuer {
    /// A fresh random key: without [`NonceIssuer::with_key`] nonces issued before a restart
    /// are unknown to the next relayd, which answers them 401 like a missing nonce.
    pub fn new(lifetime_secs: u64) -> NonceIssuer {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
            .expect("the system random generator works");
        NonceIssuer { key, lifetime_secs }
    }

    /// Nonces under a key kept across restarts (the state store's): the clients of restored
    /// allocations go on with the nonce they hold, until it is stale (438), as they would
    /// have without the restart. Clients handle 438 on a Refresh; several (the `turn` crate,
    /// libwebrtc) give the allocation up on a 401 there.
    pub fn with_key(key: &[u8], lifetime_secs: u64) -> NonceIssuer {
        NonceIssuer {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            lifetime_secs,
        }
    }

    /// A nonce for `client`, issued at `now` (Unix seconds).
    pub fn issue(&self, client: SocketAddr, now: u64) -> String {
        // When it was issued, as 8 hex digits (32-bit Unix seconds, good until 2106).
        let issued = now & u64::from(u32::MAX);
        format!("{issued:08x}{}", self.tag(client, issued))
    }

    pub fn check(&self, nonce: &str, client: SocketAddr, now: u64) -> NonceStatus {
        let Some(issued) = nonce
            .get(..8)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        else {
            return NonceStatus::Invalid;
        };
        let tag = self.tag(client, issued);
        // Without an early exit: timing says nothing about where a forged tag differs.
        if !bool::from(nonce.as_bytes()[8..].ct_eq(tag.as_bytes())) {
            return NonceStatus::Invalid;
        }
        if issued > now || now - issued >= self.lifetime_secs {
            return NonceStatus::Stale;
        }
        NonceStatus::Valid
    }

    fn tag(&self, client: SocketAddr, issued: u64) -> String {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(&issued.to_be_bytes());
        match client {
            SocketAddr::V4(v4) => context.update(&v4.ip().octets()),
            SocketAddr::V6(v6) => context.update(&v6.ip().octets()),
        }
        context.update(&client.port().to_be_bytes());
        context.sign().as_ref()[..TAG_BYTES]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000;

    fn client(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_nonce_is_valid_for_its_client_until_it_expires() {
        let issuer = NonceIssuer::new(600);
        let alice = client("198.51.100.7:50000");
        let nonce = issuer.issue(alice, T0);
        assert_eq!(nonce.len(), 8 + 2 * TAG_BYTES);
        assert_eq!(issuer.check(&nonce, alice, T0), NonceStatus::Valid);
        assert_eq!(issuer.check(&nonce, alice, T0 + 599), NonceStatus::Valid);
        assert_eq!(issuer.check(&nonce, alice, T0 + 600), NonceStatus::Stale);
    }

    #[test]
    fn a_nonce_is_worthless_elsewhere_or_altered() {
        let issuer = NonceIssuer::new(600);
        let alice = client("198.51.100.7:50000");
        let nonce = issuer.issue(alice, T0);
        assert_eq!(
            issuer.check(&nonce, client("198.51.100.7:50001"), T0),
            NonceStatus::Invalid
        );
        assert_eq!(
            issuer.check(&nonce, client("[2001:db8::7]:50000"), T0),
            NonceStatus::Invalid
        );
        let mut altered = nonce.clone().into_bytes();
        altered[20] = if altered[20] == b'0' { b'1' } else { b'0' };
        let altered = String::from_utf8(altered).unwrap();
        assert_eq!(issuer.check(&altered, alice, T0), NonceStatus::Invalid);
        // Moving the issue time forward to make a stale nonce fresh breaks the HMAC.
        let forged = format!("{:08x}{}", T0 + 1000, &nonce[8..]);
        assert_eq!(
            issuer.check(&forged, alice, T0 + 1000),
            NonceStatus::Invalid
        );
        for garbage in ["", "short", "zzzzzzzzzzzzzzzz", &nonce[..20]] {
            assert_eq!(
                issuer.check(garbage, alice, T0),
                NonceStatus::Invalid,
                "{garbage:?}"
            );
        }
        // Another server (another key) does not accept it either.
        assert_eq!(
            NonceIssuer::new(600).check(&nonce, alice, T0),
            NonceStatus::Invalid
        );
    }

    #[test]
    fn a_nonce_outlives_a_restart_under_the_same_key_only() {
        let alice = client("203.0.113.5:40000");
        let key = [7u8; KEY_BYTES];
        let nonce = NonceIssuer::with_key(&key, 600).issue(alice, T0);
        assert_eq!(
            NonceIssuer::with_key(&key, 600).check(&nonce, alice, T0 + 10),
            NonceStatus::Valid
        );
        assert_eq!(
            NonceIssuer::with_key(&key, 600).check(&nonce, alice, T0 + 600),
            NonceStatus::Stale
        );
        assert_eq!(
            NonceIssuer::with_key(&[8u8; KEY_BYTES], 600).check(&nonce, alice, T0 + 10),
            NonceStatus::Invalid
        );
    }

    #[test]
    fn a_nonce_from_the_future_is_stale_not_valid() {
        let issuer = NonceIssuer::new(600);
        let alice = client("198.51.100.7:50000");
        let nonce = issuer.issue(alice, T0 + 10);
        assert_eq!(issuer.check(&nonce, alice, T0), NonceStatus::Stale);
    }
}
