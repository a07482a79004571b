//! What one direction of a leg has reached per SSRC: the highest SRTP packet index (rollover
//! counter and sequence number, RFC 3711 section 3.3.1) and SRTCP index, each with a replay
//! window (section 3.3.2). Both directions keep a window: a packet index is never used
//! twice with one key, which would repeat the keystream.

use std::collections::HashMap;

use super::SrtpError;

/// Packets behind the newest accepted one that are still taken (RFC 3711 section 3.3.2
/// asks for at least 64).
const REPLAY_WINDOW: u64 = 128;

/// SSRCs one direction keeps state for: a call has a few (audio, video, RTX, FEC); a new
/// one beyond this is refused.
const MAX_SSRCS: usize = 64;

/// The highest index used or accepted, and which of the `REPLAY_WINDOW` before it were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Window {
    pub(super) highest: u64,
    /// Bit n: index `highest - n` was seen (bit 0, the highest itself, always is).
    seen: u128,
}

impl Window {
    /// A window taken back from a record: everything up to `highest` counts as seen.
    pub(super) fn restored(highest: u64) -> Window {
        Window {
            highest,
            seen: u128::MAX,
        }
    }

    fn first(index: u64) -> Window {
        Window {
            highest: index,
            seen: 1,
        }
    }

    fn check(&self, index: u64) -> Result<(), SrtpError> {
        if index > self.highest {
            return Ok(());
        }
        let behind = self.highest - index;
        if behind >= REPLAY_WINDOW || self.seen & (1 << behind) != 0 {
            return Err(SrtpError::Replay);
        }
        Ok(())
    }

    fn accept(&mut self, index: u64) {
        if index > self.highest {
            let ahead = index - self.highest;
            self.seen = if ahead >= REPLAY_WINDOW {
                1
            } else {
                (self.seen << ahead) | 1
            };
            self.highest = index;
        } else {
            self.seen |= 1 << (self.highest - index);
        }
    }
}

/// A sequence number's 48-bit index given the highest index so far (RFC 3711 appendix A).
fn estimate(highest: u64, seq: u16) -> Result<u64, SrtpError> {
    let roc = highest >> 16;
    let s_l = highest as u16;
    let v = if s_l < 0x8000 {
        if seq > s_l && seq - s_l > 0x8000 {
            // From before the last wrap; none before the first.
            roc.checked_sub(1).ok_or(SrtpError::Replay)?
        } else {
            roc
        }
    } else if s_l - 0x8000 > seq {
        roc + 1
    } else {
        roc
    };
    if v > u64::from(u32::MAX) {
        return Err(SrtpError::Exhausted);
    }
    Ok((v << 16) | u64::from(seq))
}

/// One direction's per-SSRC indices.
#[derive(Debug, Default)]
pub(super) struct Indices {
    pub(super) rtp: HashMap<u32, Window>,
    pub(super) rtcp: HashMap<u32, Window>,
}

impl Indices {
    /// The index of an RTP packet of `ssrc` with `seq`, refused when it was used before;
    /// `first` is the rollover counter of an SSRC not seen yet.
    pub(super) fn rtp_index(&self, ssrc: u32, seq: u16, first: u32) -> Result<u64, SrtpError> {
        match self.rtp.get(&ssrc) {
            Some(window) => {
                let index = estimate(window.highest, seq)?;
                window.check(index)?;
                Ok(index)
            }
            None if self.rtp.len() >= MAX_SSRCS => Err(SrtpError::Malformed),
            None => Ok((u64::from(first) << 16) | u64::from(seq)),
        }
    }

    /// After the packet authenticated (or was protected).
    pub(super) fn rtp_accept(&mut self, ssrc: u32, index: u64) {
        self.rtp
            .entry(ssrc)
            .and_modify(|window| window.accept(index))
            .or_insert_with(|| Window::first(index));
    }

    /// The SRTCP index of a packet of `ssrc` from the peer, refused when seen before.
    pub(super) fn rtcp_check(&self, ssrc: u32, index: u32) -> Result<(), SrtpError> {
        match self.rtcp.get(&ssrc) {
            Some(window) => window.check(u64::from(index)),
            None if self.rtcp.len() >= MAX_SSRCS => Err(SrtpError::Malformed),
            None => Ok(()),
        }
    }

    pub(super) fn rtcp_accept(&mut self, ssrc: u32, index: u32) {
        let index = u64::from(index);
        self.rtcp
            .entry(ssrc)
            .and_modify(|window| window.accept(index))
            .or_insert_with(|| Window::first(index));
    }

    /// The next SRTCP index the relay sends `ssrc` with (the first is 1).
    pub(super) fn rtcp_next(&mut self, ssrc: u32) -> Result<u32, SrtpError> {
        let next = self.rtcp.get(&ssrc).map_or(1, |window| window.highest + 1);
        if next > 0x7fff_ffff {
            return Err(SrtpError::Exhausted);
        }
        if !self.rtcp.contains_key(&ssrc) && self.rtcp.len() >= MAX_SSRCS {
            return Err(SrtpError::Malformed);
        }
        self.rtcp_accept(ssrc, next as u32);
        Ok(next as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_follows_the_rollover_both_ways() {
        // Just before a wrap, a packet after it; just after, one from before it.
        assert_eq!(estimate(0x0_fff0, 0x0005), Ok(0x1_0005));
        assert_eq!(estimate(0x1_0005, 0xfff0), Ok(0x0_fff0));
        assert_eq!(estimate(0x1_8000, 0x0001), Ok(0x1_0001));
        assert_eq!(estimate(0x1_9000, 0x0001), Ok(0x2_0001));
        // Nothing before the first rollover.
        assert_eq!(estimate(0x0_0005, 0xfff0), Err(SrtpError::Replay));
        assert_eq!(
            estimate((u64::from(u32::MAX) << 16) | 0xfff0, 1),
            Err(SrtpError::Exhausted)
        );
    }

    #[test]
    fn the_window_takes_late_packets_once_and_refuses_old_ones() {
        let mut indices = Indices::default();
        for seq in [10u16, 12, 11, 200] {
            let index = indices.rtp_index(7, seq, 0).unwrap();
            indices.rtp_accept(7, index);
        }
        assert_eq!(indices.rtp_index(7, 11, 0), Err(SrtpError::Replay));
        assert_eq!(indices.rtp_index(7, 200, 0), Err(SrtpError::Replay));
        assert_eq!(
            indices.rtp_index(7, 72, 0),
            Err(SrtpError::Replay),
            "128 behind"
        );
        assert_eq!(indices.rtp_index(7, 73, 0), Ok(73));
        // A restored window: everything up to its highest counts as seen.
        let mut restored = Indices::default();
        restored.rtp.insert(7, Window::restored(0x2_0010));
        assert_eq!(restored.rtp_index(7, 0x0010, 0), Err(SrtpError::Replay));
        assert_eq!(restored.rtp_index(7, 0x0011, 0), Ok(0x2_0011));
        // SRTCP: the relay's own indices count up from 1.
        assert_eq!(indices.rtcp_next(9), Ok(1));
        assert_eq!(indices.rtcp_next(9), Ok(2));
        indices.rtcp_accept(3, 5);
        assert_eq!(indices.rtcp_check(3, 5), Err(SrtpError::Replay));
        assert_eq!(indices.rtcp_check(3, 4), Ok(()));
    }

    #[test]
    fn ssrcs_beyond_the_limit_are_refused() {
        let mut indices = Indices::default();
        for ssrc in 0..MAX_SSRCS as u32 {
            indices.rtp_accept(ssrc, 1);
        }
        assert_eq!(indices.rtp_index(1000, 1, 0), Err(SrtpError::Malformed));
        assert_eq!(indices.rtp_index(3, 2, 0), Ok(2));
    }
}
