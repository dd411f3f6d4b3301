//! Kernel timestamps (CLOCK_MONOTONIC, as bpf_ktime_get_ns) to wall-clock time.

use std::time::{Duration, SystemTime};

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC
    // always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Maps monotonic nanoseconds to wall-clock time, anchored once at start.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    mono_anchor_ns: u64,
    wall_anchor: SystemTime,
}

impl Clock {
    pub fn now() -> Self {
        Self {
            mono_anchor_ns: monotonic_ns(),
            wall_anchor: SystemTime::now(),
        }
    }

    #[cfg(test)]
    pub fn fixed(mono_anchor_ns: u64, wall_anchor: SystemTime) -> Self {
        Self {
            mono_anchor_ns,
            wall_anchor,
        }
    }

    pub fn wall(&self, ktime_ns: u64) -> SystemTime {
        if ktime_ns >= self.mono_anchor_ns {
            self.wall_anchor + Duration::from_nanos(ktime_ns - self.mono_anchor_ns)
        } else {
            self.wall_anchor - Duration::from_nanos(self.mono_anchor_ns - ktime_ns)
        }
    }

    /// RFC 3339 in UTC with microseconds, e.g. `2026-11-24T03:32:22.123456Z`.
    pub fn rfc3339(&self, ktime_ns: u64) -> String {
        humantime::format_rfc3339_micros(self.wall(ktime_ns)).to_string()
    }
}
