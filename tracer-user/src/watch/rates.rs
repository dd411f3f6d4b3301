//! Event rates over sliding windows, kept as rings of fixed-width buckets so
//! that recording an event is one addition and memory does not grow with the
//! event rate.

use std::time::Duration;

const NS_PER_S: u64 = 1_000_000_000;

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// `ktime_ns / bucket_ns` of the interval this bucket currently counts.
    index: u64,
    count: u64,
}

/// Counts events in the last `window`, split into equal buckets.
#[derive(Clone, Debug)]
pub struct RateWindow {
    bucket_ns: u64,
    buckets: Box<[Bucket]>,
}

impl RateWindow {
    pub fn new(window: Duration, bucket_count: usize) -> Self {
        let bucket_count = bucket_count.max(1);
        let window_ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        Self {
            bucket_ns: (window_ns / bucket_count as u64).max(1),
            buckets: vec![Bucket::default(); bucket_count].into_boxed_slice(),
        }
    }

    pub fn add(&mut self, ktime_ns: u64) {
        let index = ktime_ns / self.bucket_ns;
        let len = self.buckets.len() as u64;
        let Some(bucket) = self.buckets.get_mut((index % len) as usize) else {
            return;
        };
        // A bucket already reused for a later interval means this event is
        // older than the whole window (events from different CPUs arrive
        // slightly out of order): it no longer counts.
        if bucket.index > index {
            return;
        }
        if bucket.index < index {
            *bucket = Bucket { index, count: 0 };
        }
        bucket.count += 1;
    }

    /// Events in the buckets that make up the window ending at `now_ns`.
    pub fn count(&self, now_ns: u64) -> u64 {
        let oldest = self.oldest_index(now_ns);
        let newest = now_ns / self.bucket_ns;
        self.buckets
            .iter()
            .filter(|bucket| (oldest..=newest).contains(&bucket.index))
            .map(|bucket| bucket.count)
            .sum()
    }

    /// Events per second over the window, or over the time since `since_ns`
    /// when that is shorter, so that a young window does not read low.
    pub fn per_second(&self, now_ns: u64, since_ns: u64) -> f64 {
        self.count(now_ns) as f64 * NS_PER_S as f64 / self.span_ns(now_ns, since_ns) as f64
    }

    /// The time [`Self::per_second`] divides by: the window, or the time
    /// since `since_ns` when that is shorter.
    pub fn span_ns(&self, now_ns: u64, since_ns: u64) -> u64 {
        let window_start = self.oldest_index(now_ns).saturating_mul(self.bucket_ns);
        now_ns
            .saturating_sub(window_start.max(since_ns))
            // Less than a second of history would turn one event into a burst.
            .max(NS_PER_S)
    }

    fn oldest_index(&self, now_ns: u64) -> u64 {
        (now_ns / self.bucket_ns + 1).saturating_sub(self.buckets.len() as u64)
    }
}

/// One kind of event (connects, closes) over the short and the long window.
#[derive(Clone, Debug)]
pub struct Rates {
    pub short: RateWindow,
    pub long: RateWindow,
}

impl Rates {
    /// One-second buckets for the short window; thirty buckets for the long
    /// one (10 s each for the default 5 min) keep it small.
    pub fn new(short: Duration, long: Duration) -> Self {
        let short_buckets = usize::try_from(short.as_secs()).unwrap_or(1).max(1);
        Self {
            short: RateWindow::new(short, short_buckets),
            long: RateWindow::new(long, 30),
        }
    }

    pub fn add(&mut self, ktime_ns: u64) {
        self.short.add(ktime_ns);
        self.long.add(ktime_ns);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = NS_PER_S;

    #[test]
    fn steady_rate_is_measured_over_the_window() {
        let mut window = RateWindow::new(Duration::from_secs(10), 10);
        // 5 events a second for 30 s.
        for tenth in 0..300u64 {
            if tenth % 2 == 0 {
                window.add(tenth * S / 10);
            }
        }
        let now = 30 * S;
        assert!((window.per_second(now, 0) - 5.0).abs() < 0.6);
        assert!(window.count(now) <= 50);
    }

    #[test]
    fn old_events_leave_the_window() {
        let mut window = RateWindow::new(Duration::from_secs(10), 10);
        for i in 0..100 {
            window.add(S + i);
        }
        assert_eq!(window.count(5 * S), 100);
        assert_eq!(window.count(20 * S), 0);
        assert_eq!(window.per_second(20 * S, 0), 0.0);
    }

    #[test]
    fn young_window_is_not_diluted() {
        let mut window = RateWindow::new(Duration::from_secs(300), 30);
        let start = 1000 * S;
        for i in 0..40 {
            window.add(start + i * S / 10);
        }
        // 40 events in 4 s since the start: 10/s, not 40/300.
        let rate = window.per_second(start + 4 * S, start);
        assert!((rate - 10.0).abs() < 0.5, "{rate}");
    }

    #[test]
    fn events_older_than_the_ring_are_ignored() {
        let mut window = RateWindow::new(Duration::from_secs(10), 10);
        window.add(25 * S);
        window.add(5 * S); // same slot, two laps earlier
        assert_eq!(window.count(25 * S), 1);
    }

    #[test]
    fn short_and_long_windows_diverge_after_a_burst() {
        let mut rates = Rates::new(Duration::from_secs(10), Duration::from_secs(300));
        for i in 0..100 {
            rates.add(10 * S + i * S / 100);
        }
        let now = 100 * S;
        assert_eq!(rates.short.per_second(now, 0), 0.0);
        assert!((rates.long.per_second(now, 0) - 1.0).abs() < 0.01);
    }
}
