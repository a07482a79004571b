//! Long-term credentials (RFC 8489 9.2) for TURN: static users from the configuration, and
//! the TURN REST API scheme (coturn's `use-auth-secret`): the username is
//! `"<expiry unix time>:<user>"` (or the expiry alone) and the password is
//! `base64(HMAC-SHA1(shared secret, username))`. Several secrets are accepted at once so that
//! a secret can be rotated without cutting off clients holding credentials minted with the
//! previous one. The same credentials work with coturn started with the same secret.

use std::collections::HashMap;

use base64::Engine as _;
use ring::hmac;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("username {0:?}: no such user")]
    UnknownUser(String),
    #[error("username {username:?}: credentials expired at {expiry} (now {now})")]
    Expired {
        username: String,
        expiry: u64,
        now: u64,
    },
}

/// Where passwords come from.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    static_users: HashMap<String, String>,
    rest_secrets: Vec<String>,
}

impl Credentials {
    pub fn new(
        static_users: impl IntoIterator<Item = (String, String)>,
        rest_secrets: Vec<String>,
    ) -> Credentials {
        Credentials {
            static_users: static_users.into_iter().collect(),
            rest_secrets,
        }
    }

    /// The passwords a request signed as `username` may have used, at `now` (Unix seconds):
    /// one for a static user, one per accepted secret for REST API usernames. The caller
    /// checks MESSAGE-INTEGRITY against each.
    pub fn passwords(&self, username: &str, now: u64) -> Result<Vec<String>, CredentialError> {
        if let Some(password) = self.static_users.get(username) {
            return Ok(vec![password.clone()]);
        }
        let Some(expiry) = rest_expiry(username).filter(|_| !self.rest_secrets.is_empty()) else {
            return Err(CredentialError::UnknownUser(username.to_owned()));
        };
        if expiry <= now {
            return Err(CredentialError::Expired {
                username: username.to_owned(),
                expiry,
                now,
            });
        }
        Ok(self
            .rest_secrets
            .iter()
            .map(|secret| rest_api_password(secret, username))
            .collect())
    }
}

/// The expiry time of a TURN REST API username: the decimal number before the first ':',
/// or the whole username when it is only a number.
fn rest_expiry(username: &str) -> Option<u64> {
    let timestamp = username
        .split_once(':')
        .map_or(username, |(expiry, _)| expiry);
    if timestamp.is_empty() || !timestamp.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    timestamp.parse().ok()
}

/// `base64(HMAC-SHA1(secret, username))`: the password the TURN REST API scheme gives a
/// username (what a controller mints for its clients).
pub fn rest_api_password(secret: &str, username: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(hmac::sign(&key, username.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_690_000_000;

    /// Expected values computed independently (Python's hmac and base64 modules).
    #[test]
    fn rest_api_passwords_match_an_independent_implementation() {
        assert_eq!(
            rest_api_password("north", "1700000000:alice"),
            "Cd/49soE35ICqcJF/bCTn8Z4OyE="
        );
        assert_eq!(
            rest_api_password("south", "1700000000:alice"),
            "FJeNoC0yJtNekwCa5JT/sW/1Ls4="
        );
        assert_eq!(
            rest_api_password("logen", "4102444800"),
            "CrueSmSasgJnvlH8Uc++bGAZzM4="
        );
    }

    #[test]
    fn every_secret_in_rotation_gives_a_candidate() {
        let credentials = Credentials::new([], vec!["north".into(), "south".into()]);
        assert_eq!(
            credentials.passwords("1700000000:alice", NOW).unwrap(),
            [
                "Cd/49soE35ICqcJF/bCTn8Z4OyE=",
                "FJeNoC0yJtNekwCa5JT/sW/1Ls4="
            ]
        );
    }

    #[test]
    fn expired_and_unknown_usernames_are_refused() {
        let credentials = Credentials::new([("bob".into(), "pw".into())], vec!["north".into()]);
        assert_eq!(credentials.passwords("bob", NOW).unwrap(), ["pw"]);
        assert_eq!(
            credentials.passwords("1600000000:alice", NOW),
            Err(CredentialError::Expired {
                username: "1600000000:alice".into(),
                expiry: 1_600_000_000,
                now: NOW,
            })
        );
        for username in ["carol", "", ":alice", "12ab:alice", "alice:1700000000"] {
            assert_eq!(
                credentials.passwords(username, NOW),
                Err(CredentialError::UnknownUser(username.into())),
                "{username:?}"
            );
        }
        let static_only = Credentials::new([("bob".into(), "pw".into())], vec![]);
        assert!(matches!(
            static_only.passwords("1700000000:alice", NOW),
            Err(CredentialError::UnknownUser(_))
        ));
    }
}
