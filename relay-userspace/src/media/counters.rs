//! What the relay counted of a call's media it carried itself (transcrypted legs): each
//! direction's packets and bytes, and the packets it refused.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::SrtpError;

/// Updated by the media tasks, read by `relayctl calls`, `call.stats` and `/metrics`.
#[derive(Debug, Default)]
pub struct MediaCounters {
    to_pbx_packets: AtomicU64,
    to_pbx_bytes: AtomicU64,
    to_app_packets: AtomicU64,
    to_app_bytes: AtomicU64,
    auth_failures: AtomicU64,
    replays: AtomicU64,
    malformed: AtomicU64,
    /// Monotonic nanoseconds of the last packet either way that was carried.
    last_seen_ns: AtomicU64,
}

/// A reading of [`MediaCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MediaTotals {
    pub to_pbx_packets: u64,
    pub to_pbx_bytes: u64,
    pub to_app_packets: u64,
    pub to_app_bytes: u64,
    /// SRTP or SRTCP whose tag did not verify: dropped.
    pub auth_failures: u64,
    /// SRTP or SRTCP seen before or older than the replay window: dropped.
    pub replays: u64,
    /// Neither RTP nor RTCP, or too short: dropped.
    pub malformed: u64,
    pub last_seen_ns: u64,
}

impl MediaTotals {
    /// Adds another reading (the last seen is the later one).
    pub fn add(&mut self, other: &MediaTotals) {
        self.to_pbx_packets += other.to_pbx_packets;
        self.to_pbx_bytes += other.to_pbx_bytes;
        self.to_app_packets += other.to_app_packets;
        self.to_app_bytes += other.to_app_bytes;
        self.auth_failures += other.auth_failures;
        self.replays += other.replays;
        self.malformed += other.malformed;
        self.last_seen_ns = self.last_seen_ns.max(other.last_seen_ns);
    }
}

impl MediaCounters {
    /// A packet sent on to the PBX (`bytes` as sent).
    pub fn to_pbx(&self, bytes: usize, now_ns: u64) {
        self.to_pbx_packets.fetch_add(1, Relaxed);
        self.to_pbx_bytes.fetch_add(bytes as u64, Relaxed);
        self.last_seen_ns.fetch_max(now_ns, Relaxed);
    }

    /// A packet sent on to the app.
    pub fn to_app(&self, bytes: usize, now_ns: u64) {
        self.to_app_packets.fetch_add(1, Relaxed);
        self.to_app_bytes.fetch_add(bytes as u64, Relaxed);
        self.last_seen_ns.fetch_max(now_ns, Relaxed);
    }

    /// A packet refused.
    pub fn refused(&self, why: SrtpError) {
        let counter = match why {
            SrtpError::Authentication => &self.auth_failures,
            SrtpError::Replay => &self.replays,
            SrtpError::Malformed | SrtpError::Exhausted => &self.malformed,
        };
        counter.fetch_add(1, Relaxed);
    }

    pub fn read(&self) -> MediaTotals {
        MediaTotals {
            to_pbx_packets: self.to_pbx_packets.load(Relaxed),
            to_pbx_bytes: self.to_pbx_bytes.load(Relaxed),
            to_app_packets: self.to_app_packets.load(Relaxed),
            to_app_bytes: self.to_app_bytes.load(Relaxed),
            auth_failures: self.auth_failures.load(Relaxed),
            replays: self.replays.load(Relaxed),
            malformed: self.malformed.load(Relaxed),
            last_seen_ns: self.last_seen_ns.load(Relaxed),
        }
    }
}
