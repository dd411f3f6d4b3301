//! Timing distributions of one process's connections, kept in HdrHistogram
//! from the first event on: for the CLOSE_WAIT dwell summary, and for the
//! exporters (Prometheus buckets, HdrHistogram interval logs).

use hdrhistogram::Histogram;

/// Two significant digits: under 1% error at any magnitude, which is finer
/// than any bucket an exporter uses.
pub const SIGNIFICANT_DIGITS: u8 = 2;
/// Values are clamped to a week so that auto-resizing stays bounded.
const MAX_US: u64 = 7 * 24 * 3_600 * 1_000_000;

/// One quantity, in microseconds. The histogram resizes itself to the
/// largest value seen, so a process with only short values costs little.
#[derive(Clone, Debug, Default)]
pub struct Distribution {
    /// Created on the first value.
    histogram: Option<Histogram<u64>>,
    /// Exact sum of the recorded values (the histogram only keeps buckets).
    sum_us: u64,
}

impl Distribution {
    pub fn record_ns(&mut self, ns: u64) {
        let us = (ns / 1_000).min(MAX_US);
        if self.histogram.is_none() {
            self.histogram = empty_histogram();
        }
        if let Some(histogram) = &mut self.histogram {
            // With auto-resize and a clamped value, recording cannot fail.
            if histogram.record(us).is_ok() {
                self.sum_us = self.sum_us.saturating_add(us);
            }
        }
    }

    /// `None` until the first value.
    pub fn histogram(&self) -> Option<&Histogram<u64>> {
        self.histogram.as_ref()
    }

    pub fn count(&self) -> u64 {
        self.histogram.as_ref().map_or(0, Histogram::len)
    }

    pub fn sum_us(&self) -> u64 {
        self.sum_us
    }
}

/// An empty auto-resizing histogram in microseconds. Creation only fails for
/// more than five significant digits, so `None` never happens.
pub fn empty_histogram() -> Option<Histogram<u64>> {
    Histogram::new(SIGNIFICANT_DIGITS).ok()
}

/// The distributions socktrace keeps for each process.
#[derive(Clone, Debug, Default)]
pub struct Distributions {
    /// SYN_SENT to ESTABLISHED of the connections the process opened.
    pub connect_latency: Distribution,
    /// ESTABLISHED to CLOSE.
    pub lifetime: Distribution,
    /// From the peer's FIN (CLOSE_WAIT) to the process's close, for the
    /// sockets that left CLOSE_WAIT.
    pub close_wait_dwell: Distribution,
}

impl Distributions {
    pub fn get(&self, timing: Timing) -> &Distribution {
        match timing {
            Timing::ConnectLatency => &self.connect_latency,
            Timing::Lifetime => &self.lifetime,
            Timing::CloseWaitDwell => &self.close_wait_dwell,
        }
    }
}

/// Names the distributions, for the exporters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Timing {
    ConnectLatency,
    Lifetime,
    CloseWaitDwell,
}

impl Timing {
    pub const ALL: [Self; 3] = [Self::ConnectLatency, Self::Lifetime, Self::CloseWaitDwell];

    /// In metric names and log tags.
    pub fn name(self) -> &'static str {
        match self {
            Self::ConnectLatency => "connect_latency",
            Self::Lifetime => "connection_lifetime",
            Self::CloseWaitDwell => "close_wait_dwell",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_microseconds_with_an_exact_sum() {
        let mut distribution = Distribution::default();
        assert_eq!(distribution.count(), 0);
        assert!(distribution.histogram().is_none());
        distribution.record_ns(52_300);
        distribution.record_ns(3_000_000_000);
        assert_eq!(distribution.count(), 2);
        assert_eq!(distribution.sum_us(), 52 + 3_000_000);
        let histogram = distribution.histogram().unwrap();
        assert_eq!(histogram.min(), 52);
        assert!(histogram.max().abs_diff(3_000_000) < 30_000);
    }

    #[test]
    fn clamps_absurd_values() {
        let mut distribution = Distribution::default();
        distribution.record_ns(u64::MAX);
        assert_eq!(distribution.count(), 1);
        assert!(distribution.histogram().unwrap().max() <= MAX_US * 101 / 100);
    }
}
