//! Who may connect: a controller with its tenant's API key, a client with a token its
//! tenant's controller minted: `<tenant>:<user>:<expiry unix secs>:<hex HMAC-SHA256>`, the
//! HMAC over the first three fields with `signalling.token_secret`. Tokens are bound to a
//! user and expire; the relay keeps no list of them.

use ring::hmac;
use subtle::ConstantTimeEq;

/// Tenant names and user ids: 1 to 64 of A-Z a-z 0-9 . _ @ + - (no ':', the token separator).
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@+-".contains(&b))
}

/// Equality for API keys that takes the same time whatever the keys are: their SHA-256
/// digests (of one length, so not even the key's length shows) compared in constant time.
pub fn same_secret(a: &str, b: &str) -> bool {
    let digest = |key: &str| ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    bool::from(digest(a).as_ref().ct_eq(digest(b).as_ref()))
}

pub struct Tokens {
    key: hmac::Key,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    Malformed,
    BadSignature,
    Expired,
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenError::Malformed => "malformed token",
            TokenError::BadSignature => "token signature does not verify",
            TokenError::Expired => "token expired",
        })
    }
}

impl Tokens {
    pub fn new(secret: &str) -> Tokens {
        Tokens {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes()),
        }
    }

    /// A token for `user` of `tenant` valid until `expires` (unix seconds).
    pub fn mint(&self, tenant: &str, user: &str, expires: u64) -> String {
        let claims = format!("{tenant}:{user}:{expires}");
        let tag = hmac::sign(&self.key, claims.as_bytes());
        format!("{claims}:{}", hex::encode(tag))
    }

    /// The (tenant, user) a token names, if it is ours and alive at `now`. Its names must
    /// follow the rules a controller's `token.mint` follows ([`valid_name`]), whoever signed
    /// it: a token made with the secret outside the relay gets no more than one minted here.
    pub fn verify(&self, token: &str, now: u64) -> Result<(String, String), TokenError> {
        let mut parts = token.split(':');
        let (Some(tenant), Some(user), Some(expires), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        if !valid_name(tenant) || !valid_name(user) {
            return Err(TokenError::Malformed);
        }
        let expires: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        let tag = hex::decode(tag).map_err(|_| TokenError::Malformed)?;
        let claims = format!("{tenant}:{user}:{expires}");
        hmac::verify(&self.key, claims.as_bytes(), &tag).map_err(|_| TokenError::BadSignature)?;
        if expires <= now {
            return Err(TokenError::Expired);
        }
        Ok((tenant.to_owned(), user.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_until_they_expire_and_only_with_the_secret() {
        let tokens = Tokens::new("a secret of some length");
        let token = tokens.mint("acme", "alice", 1_000);
        assert_eq!(
            tokens.verify(&token, 999),
            Ok(("acme".to_owned(), "alice".to_owned()))
        );
        assert_eq!(tokens.verify(&token, 1_000), Err(TokenError::Expired));
        let other = Tokens::new("another secret entirely");
        assert_eq!(other.verify(&token, 999), Err(TokenError::BadSignature));
        // Claims changed after signing.
        let forged = token.replacen("alice", "mallory", 1);
        assert_eq!(tokens.verify(&forged, 999), Err(TokenError::BadSignature));
        let later = token.replacen(":1000:", ":9000:", 1);
        assert_eq!(tokens.verify(&later, 999), Err(TokenError::BadSignature));
        for malformed in [
            "",
            "acme:alice:1000",
            "acme:alice:x:00",
            "acme:alice:1000:zz",
            "a:b:1:00:extra",
        ] {
            assert_eq!(
                tokens.verify(malformed, 0),
                Err(TokenError::Malformed),
                "{malformed}"
            );
        }
    }

    #[test]
    fn a_signed_token_for_a_name_mint_would_refuse_is_refused() {
        let tokens = Tokens::new("a secret of some length");
        for (tenant, user) in [
            ("acme", &"x".repeat(65)[..]),
            ("acme", ""),
            ("acme", "with space"),
            ("", "alice"),
        ] {
            let token = tokens.mint(tenant, user, 1_000);
            assert_eq!(
                tokens.verify(&token, 999),
                Err(TokenError::Malformed),
                "{tenant:?} {user:?}"
            );
        }
        let longest = "x".repeat(64);
        let token = tokens.mint("acme", &longest, 1_000);
        assert_eq!(tokens.verify(&token, 999), Ok(("acme".to_owned(), longest)));
    }

    #[test]
    fn names_and_secrets() {
        assert!(valid_name("alice@example.com"));
        assert!(valid_name("user_1+2-3"));
        for bad in ["", "a:b", "with space", &"x".repeat(65), "ünïcode"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(same_secret("0123456789abcdef", "0123456789abcdef"));
        assert!(!same_secret("0123456789abcdef", "0123456789abcdeF"));
        assert!(!same_secret("short", "shorter"));
    }
}
