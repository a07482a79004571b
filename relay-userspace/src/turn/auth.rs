//! Long-term credentials on requests (RFC 8489 9.2): who signed a request, and the same
//! signature on its response. A request is authenticated once; [`Authenticated::sign`] is
//! the one way a response to it gets its MESSAGE-INTEGRITY(-SHA256).

use std::net::SocketAddr;

use stun_codec::rfc5389::attributes::{MessageIntegrity, Nonce, Realm, Username};

use super::{
    credentials::Credentials,
    message::{MessageIntegritySha256, TurnMessage},
    nonce::{NonceIssuer, NonceStatus},
    refusal::Refusal,
};

/// Who a request authenticated as, and how it was signed (its response is signed alike,
/// RFC 8489 9.2.4).
pub struct Authenticated {
    username: Username,
    realm: Realm,
    password: String,
    sha256: bool,
}

/// Why a request is not authenticated, and whether the error response carries a fresh
/// REALM and NONCE for the client to try again with (401, 438).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailure {
    pub refusal: Refusal,
    pub challenge: bool,
}

impl AuthFailure {
    fn challenge(refusal: Refusal) -> AuthFailure {
        AuthFailure {
            refusal,
            challenge: true,
        }
    }
}

/// What checking a request's credentials needs.
pub struct Verifier<'a> {
    pub realm: &'a str,
    pub nonces: &'a NonceIssuer,
    pub credentials: &'a Credentials,
}

impl Verifier<'_> {
    /// Who signed `message`, with MESSAGE-INTEGRITY-SHA256 when present (MESSAGE-INTEGRITY
    /// is then ignored, 9.2.4), else MESSAGE-INTEGRITY.
    pub fn authenticate(
        &self,
        now: u64,
        client: SocketAddr,
        message: &TurnMessage,
    ) -> Result<Authenticated, AuthFailure> {
        let sha256 = message.get_attribute::<MessageIntegritySha256>();
        let sha1 = message.get_attribute::<MessageIntegrity>();
        if sha256.is_none() && sha1.is_none() {
            return Err(AuthFailure::challenge(Refusal::Unauthorized));
        }
        let (Some(username), Some(realm), Some(nonce)) = (
            message.get_attribute::<Username>(),
            message.get_attribute::<Realm>(),
            message.get_attribute::<Nonce>(),
        ) else {
            return Err(AuthFailure {
                refusal: Refusal::BadRequest,
                challenge: false,
            });
        };
        match self.nonces.check(nonce.value(), client, now) {
            NonceStatus::Valid => {}
            NonceStatus::Stale => return Err(AuthFailure::challenge(Refusal::StaleNonce)),
            NonceStatus::Invalid => return Err(AuthFailure::challenge(Refusal::Unauthorized)),
        }
        if realm.text() != self.realm {
            return Err(AuthFailure::challenge(Refusal::Unauthorized));
        }
        let passwords = self
            .credentials
            .passwords(username.name(), now)
            .map_err(|_| AuthFailure::challenge(Refusal::Unauthorized))?;
        passwords
            .into_iter()
            .find(|password| match (sha256, sha1) {
                (Some(sha256), _) => {
                    sha256.check_long_term(username.name(), realm.text(), password)
                }
                (None, Some(sha1)) => sha1
                    .check_long_term_credential(username, realm, password)
                    .is_ok(),
                (None, None) => false,
            })
            .map(|password| Authenticated {
                username: username.clone(),
                realm: realm.clone(),
                password,
                sha256: sha256.is_some(),
            })
            .ok_or(AuthFailure::challenge(Refusal::Unauthorized))
    }
}

impl Authenticated {
    pub fn username(&self) -> &str {
        self.username.name()
    }

    /// Adds the integrity attribute, computed over `response` as it is: call it after every
    /// other attribute but FINGERPRINT.
    pub fn sign(&self, response: &mut TurnMessage) {
        if self.sha256 {
            if let Ok(integrity) = MessageIntegritySha256::new_long_term(
                response,
                self.username.name(),
                self.realm.text(),
                &self.password,
            ) {
                response.add_attribute(integrity);
            }
        } else if let Ok(integrity) = MessageIntegrity::new_long_term_credential(
            response,
            &self.username,
            &self.realm,
            &self.password,
        ) {
            response.add_attribute(integrity);
        }
    }
}
