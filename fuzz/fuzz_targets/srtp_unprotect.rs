#![no_main]
//! What a bridged call's SRTP leg takes from the app (after ICE, anyone on the selected
//! pair can send): datagrams through the relay's unprotect, in each suite. The input is a
//! suite selector, then packets, each a length byte, a mode byte and the bytes:
//! - mode 0: the bytes as they are: refused unless they authenticate (no panic);
//! - mode 1: the bytes protected by the peer (when they are RTP or RTCP): the relay takes
//!   them and gets the bytes back, whatever sequence numbers, SSRCs and rollovers came
//!   before (its per-SSRC indices follow the peer's);
//! - mode 2: protected with the peer's keys by another sender (the peer's own indices stay
//!   as the relay knows them), then one bit flipped: always refused (forged or damaged).
//!
//! Seeds: fuzz/seeds/srtp_unprotect.

use libfuzzer_sys::fuzz_target;
use relay::media::{SrtpSession, Suite};

const PEER_KEY: [u8; 16] = [0x11; 16];
const PEER_SALT: [u8; 14] = [0x22; 14];
const OWN_KEY: [u8; 16] = [0x33; 16];
const OWN_SALT: [u8; 14] = [0x44; 14];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, mut rest)) = data.split_first() else {
        return;
    };
    let suite = Suite::ALL[usize::from(selector) % Suite::ALL.len()];
    let salt = suite.salt_len();
    let mut relay = SrtpSession::new(
        suite,
        (&PEER_KEY, &PEER_SALT[..salt]),
        (&OWN_KEY, &OWN_SALT[..salt]),
    )
    .expect("keys of the suite's lengths");
    let mut peer = SrtpSession::new(
        suite,
        (&OWN_KEY, &OWN_SALT[..salt]),
        (&PEER_KEY, &PEER_SALT[..salt]),
    )
    .expect("keys of the suite's lengths");
    let mut forger = SrtpSession::new(
        suite,
        (&OWN_KEY, &OWN_SALT[..salt]),
        (&PEER_KEY, &PEER_SALT[..salt]),
    )
    .expect("keys of the suite's lengths");
    while let [len, mode, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (bytes, next) = tail.split_at(len);
        rest = next;
        match mode % 3 {
            0 => {
                let _ = relay.unprotect(bytes);
            }
            1 => {
                let Ok(protected) = peer.protect(bytes) else {
                    continue;
                };
                assert_eq!(
                    relay.unprotect(&protected).as_deref(),
                    Ok(bytes),
                    "{suite:?}: what the peer protected comes back"
                );
            }
            _ => {
                let Ok(protected) = forger.protect(bytes) else {
                    continue;
                };
                let mut damaged = protected.to_vec();
                let bit = usize::from(*mode / 3) * 7 + len;
                let at = bit / 8 % damaged.len();
                damaged[at] ^= 1 << (bit % 8);
                assert!(
                    relay.unprotect(&damaged).is_err(),
                    "{suite:?}: a damaged packet is refused (byte {at})"
                );
            }
        }
    }
});
