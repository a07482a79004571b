//! Per-CPU counters by verdict (relay-common `Verdict`): counters, not logs, on the hot path.

use relay_common::Verdict;

use crate::STATS;

#[inline(always)]
pub fn count(verdict: Verdict, frame_len: u64) {
    if let Some(counter) = STATS.get_ptr_mut(verdict as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += frame_len;
        }
    }
}
