//! What one side's SDP says about media security, for one m-line: the transport profile,
//! SDES keys (`a=crypto`, RFC 4568) or a DTLS fingerprint and role (`a=fingerprint`,
//! `a=setup`, RFC 8122 / RFC 4145).

use std::fmt;

use base64::{Engine, engine::general_purpose::STANDARD};

use super::srtp::Suite;

/// The security a side asked for on an m-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// `RTP/AVP` or `RTP/AVPF`: nothing.
    Plain,
    /// `RTP/SAVP(F)` with `a=crypto` lines: the keys this side sends with, one per suite it
    /// offers (an answer has one).
    Sdes(Vec<Crypto>),
    /// `UDP/TLS/RTP/SAVP(F)`: DTLS-SRTP with this certificate, in this role.
    Dtls {
        fingerprint: Fingerprint,
        setup: Setup,
    },
}

impl Security {
    pub fn name(&self) -> &'static str {
        match self {
            Security::Plain => "rtp",
            Security::Sdes(_) => "sdes-srtp",
            Security::Dtls { .. } => "dtls-srtp",
        }
    }
}

/// `a=setup` (RFC 4145 section 4): who opens the DTLS association.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// The side that sent it will be the DTLS client.
    Active,
    /// The side that sent it will be the DTLS server.
    Passive,
    /// Either: the answerer chooses (offers only).
    ActPass,
}

impl Setup {
    pub fn parse(value: &str) -> Option<Setup> {
        match value.trim() {
            "active" => Some(Setup::Active),
            "passive" => Some(Setup::Passive),
            "actpass" => Some(Setup::ActPass),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Setup::Active => "active",
            Setup::Passive => "passive",
            Setup::ActPass => "actpass",
        }
    }
}

/// `a=fingerprint:<hash> <hex with colons>` (RFC 8122 section 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// The hash function, lower case (`sha-256`).
    pub hash: String,
    /// The digest's bytes.
    pub digest: Vec<u8>,
}

impl Fingerprint {
    pub fn parse(value: &str) -> Option<Fingerprint> {
        let (hash, hex_digest) = value.trim().split_once(' ')?;
        let digest = hex_digest
            .trim()
            .split(':')
            .map(|byte| {
                u8::from_str_radix(byte, 16)
                    .ok()
                    .filter(|_| byte.len() == 2)
            })
            .collect::<Option<Vec<u8>>>()?;
        if digest.is_empty() {
            return None;
        }
        Some(Fingerprint {
            hash: hash.to_ascii_lowercase(),
            digest,
        })
    }

    pub fn sha256(der: &[u8]) -> Fingerprint {
        Fingerprint {
            hash: "sha-256".to_owned(),
            digest: ring::digest::digest(&ring::digest::SHA256, der)
                .as_ref()
                .to_vec(),
        }
    }
}

impl fmt::Display for Fingerprint {
    /// The attribute's value: `sha-256 AB:CD:...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.hash)?;
        for (i, byte) in self.digest.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02X}")?;
        }
        Ok(())
    }
}

/// One `a=crypto:<tag> <suite> inline:<key||salt base64>[|lifetime][|MKI]` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crypto {
    pub tag: u32,
    pub suite: Suite,
    /// The master key followed by the master salt.
    pub key_salt: Vec<u8>,
}

impl Crypto {
    /// A line's value; None for a suite the relay does not implement, session parameters
    /// it cannot honour (an MKI, a key derivation rate), or a key of the wrong length.
    pub fn parse(value: &str) -> Option<Crypto> {
        let mut words = value.split_whitespace();
        let tag = words.next()?.parse().ok()?;
        let suite = Suite::from_sdes_name(words.next()?)?;
        let key_params = words.next()?;
        // Session parameters (UNENCRYPTED_SRTP, KDR=...) change how SRTP works: refused.
        if words.next().is_some() {
            return None;
        }
        // One key only: several `inline:` separated by ';' are not taken.
        let inline = key_params.strip_prefix("inline:")?;
        if inline.contains(';') {
            return None;
        }
        let mut parts = inline.split('|');
        let key_salt = STANDARD.decode(parts.next()?).ok()?;
        for part in parts {
            // A lifetime (2^n or a number) is accepted; an MKI (`1:4`) is not.
            if part.contains(':') {
                return None;
            }
        }
        (key_salt.len() == suite.key_len() + suite.salt_len()).then_some(Crypto {
            tag,
            suite,
            key_salt,
        })
    }

    /// Fresh keys of `suite` under `tag`, from the system's CSPRNG.
    pub fn generate(tag: u32, suite: Suite) -> Crypto {
        let mut key_salt = vec![0u8; suite.key_len() + suite.salt_len()];
        rand::fill(&mut key_salt[..]);
        Crypto {
            tag,
            suite,
            key_salt,
        }
    }

    pub fn key(&self) -> &[u8] {
        &self.key_salt[..self.suite.key_len()]
    }

    pub fn salt(&self) -> &[u8] {
        &self.key_salt[self.suite.key_len()..]
    }
}

impl fmt::Display for Crypto {
    /// The attribute's value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} inline:{}",
            self.tag,
            self.suite.sdes_name(),
            STANDARD.encode(&self.key_salt)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_lines_round_trip_and_odd_ones_are_refused() {
        let line = "1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz";
        let crypto = Crypto::parse(line).expect("a valid line");
        assert_eq!(crypto.tag, 1);
        assert_eq!(crypto.suite, Suite::AesCm128HmacSha1_80);
        assert_eq!((crypto.key().len(), crypto.salt().len()), (16, 14));
        assert_eq!(crypto.to_string(), line);
        assert!(Crypto::parse(&format!("{line}|2^20")).is_some());
        assert!(Crypto::parse(&format!("{line}|2^20|1:4")).is_none(), "MKI");
        assert!(
            Crypto::parse(&format!("{line} KDR=1")).is_none(),
            "session parameter"
        );
        assert!(Crypto::parse("1 AES_CM_128_HMAC_SHA1_80 inline:c2hvcnQ=").is_none());
        assert!(
            Crypto::parse("1 F8_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz")
                .is_none()
        );
        let gcm = Crypto::generate(2, Suite::AeadAes128Gcm);
        assert_eq!(Crypto::parse(&gcm.to_string()), Some(gcm));
    }

    #[test]
    fn fingerprints_parse_and_print_as_rfc_8122_says() {
        let fingerprint = Fingerprint::sha256(b"certificate");
        let printed = fingerprint.to_string();
        assert!(printed.starts_with("sha-256 "));
        assert_eq!(printed.matches(':').count(), 31);
        assert_eq!(Fingerprint::parse(&printed), Some(fingerprint));
        assert_eq!(
            Fingerprint::parse("SHA-256 0A:1b").map(|f| (f.hash, f.digest)),
            Some(("sha-256".to_owned(), vec![0x0a, 0x1b]))
        );
        assert!(Fingerprint::parse("sha-256 0A:1").is_none());
        assert!(Fingerprint::parse("sha-256").is_none());
        assert!(Fingerprint::parse("sha-256 zz:00").is_none());
    }
}
