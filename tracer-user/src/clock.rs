//! Kernel timestamps (CLOCK_MONOTONIC, as bpf_ktime_get_ns) to wall-clock time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::time::{ClockId, clock_gettime};

/// CLOCK_MONOTONIC in nanoseconds, the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> u64 {
    let ts = clock_gettime(ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A configured duration in nanoseconds, saturating.
pub fn duration_ns(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Wall-clock time in seconds since the Unix epoch, for report lines.
pub fn unix_now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
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
