//! Trends over the per-tick samples of a process: the fd exhaustion forecast
//! and the "keeps growing" test used by the verdicts.
//!
//! Both are rank-based so that a few odd samples (a burst of short-lived
//! sockets, a slow /proc read) do not move them: the slope is Theil–Sen (the
//! median of pairwise slopes) and growth must be significant by the
//! Mann–Kendall test (are later samples larger than earlier ones more often
//! than chance allows).

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::time::Duration;

/// At most this many samples are kept per process; Theil–Sen costs
/// O(n²) per tick, 2,016 pairs here.
const CAPACITY: usize = 64;
/// The forecast needs this many samples over at least [`MIN_SPAN_S`]
/// before it says anything.
const MIN_POINTS: usize = 5;
const MIN_SPAN_S: f64 = 5.0;
/// One-sided Mann–Kendall significance: 1.96 is the 97.5th percentile of the
/// normal distribution; five strictly rising samples just pass it.
const MIN_TREND_Z: f64 = 1.96;

/// What the collector saw of a process at one tick.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub ktime_ns: u64,
    /// `None` when the fd table could not be read.
    pub fds: Option<u64>,
    pub held: u64,
    pub close_wait: u64,
}

/// The samples of the last `window`, thinned to at most [`CAPACITY`].
#[derive(Clone, Debug)]
pub struct History {
    window_ns: u64,
    min_spacing_ns: u64,
    samples: VecDeque<Sample>,
}

impl History {
    pub fn new(window: Duration) -> Self {
        let window_ns = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        Self {
            window_ns,
            // A little under window/CAPACITY, so ticks that arrive slightly
            // early are still kept while fast ticks are thinned.
            min_spacing_ns: window_ns / (CAPACITY as u64 * 5 / 4),
            samples: VecDeque::with_capacity(CAPACITY),
        }
    }

    pub fn push(&mut self, sample: Sample) {
        if let Some(last) = self.samples.back()
            && sample.ktime_ns < last.ktime_ns.saturating_add(self.min_spacing_ns)
        {
            return;
        }
        let horizon = sample.ktime_ns.saturating_sub(self.window_ns);
        while self
            .samples
            .front()
            .is_some_and(|oldest| oldest.ktime_ns < horizon)
            || self.samples.len() >= CAPACITY
        {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// (seconds, value) points of one measure, oldest first.
    pub fn points(&self, measure: impl Fn(&Sample) -> Option<u64>) -> Vec<(f64, f64)> {
        self.samples
            .iter()
            .filter_map(|sample| {
                let value = measure(sample)?;
                Some((sample.ktime_ns as f64 / 1e9, value as f64))
            })
            .collect()
    }
}

/// Robust straight-line fit of a series.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Trend {
    /// Theil–Sen slope, units per second.
    pub slope_per_s: f64,
    /// The fitted value at the last point (less noisy than the last sample).
    pub level: f64,
    /// Mann–Kendall z score: above [`MIN_TREND_Z`] the series is rising.
    pub z: f64,
    /// Fitted rise over the span of the points.
    pub rise: f64,
    /// Median absolute deviation of the points from the fitted line.
    pub noise: f64,
}

impl Trend {
    /// `points` must be in time order.
    pub fn fit(points: &[(f64, f64)]) -> Option<Self> {
        let (&(first_t, first_value), &(last_t, _)) = (points.first()?, points.last()?);
        if points.len() < MIN_POINTS || last_t - first_t < MIN_SPAN_S {
            return None;
        }
        // Most processes hold a steady count: skip the pairwise work.
        if points.iter().all(|&(_, value)| value == first_value) {
            return Some(Self {
                slope_per_s: 0.0,
                level: first_value,
                z: 0.0,
                rise: 0.0,
                noise: 0.0,
            });
        }
        let mut slopes = Vec::with_capacity(points.len() * (points.len() - 1) / 2);
        let mut kendall_s = 0i64;
        for (i, &(t1, v1)) in points.iter().enumerate() {
            for &(t2, v2) in &points[i + 1..] {
                kendall_s += match v2.partial_cmp(&v1) {
                    Some(Ordering::Greater) => 1,
                    Some(Ordering::Less) => -1,
                    _ => 0,
                };
                if t2 > t1 {
                    slopes.push((v2 - v1) / (t2 - t1));
                }
            }
        }
        let slope_per_s = median(&mut slopes)?;
        let mut intercepts: Vec<f64> = points.iter().map(|&(t, v)| v - slope_per_s * t).collect();
        let intercept = median(&mut intercepts)?;
        let mut deviations: Vec<f64> = intercepts
            .iter()
            .map(|each| (each - intercept).abs())
            .collect();
        let noise = median(&mut deviations)?;

        let n = points.len() as f64;
        let sd = (n * (n - 1.0) * (2.0 * n + 5.0) / 18.0).sqrt();
        // Continuity correction: S moves in steps of 2.
        let z = match kendall_s {
            0 => 0.0,
            s if s > 0 => (s - 1) as f64 / sd,
            s => (s + 1) as f64 / sd,
        };
        Some(Self {
            slope_per_s,
            level: intercept + slope_per_s * last_t,
            z,
            rise: slope_per_s * (last_t - first_t),
            noise,
        })
    }

    /// Significantly rising, and by more than the noise: on a long flat and
    /// noisy series the rank test alone is fooled about once in forty.
    pub fn is_rising(&self) -> bool {
        self.slope_per_s > 0.0 && self.z >= MIN_TREND_Z && self.rise >= 2.0 * self.noise
    }
}

/// How fast fds grow and when they reach the soft limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FdForecast {
    /// Theil–Sen slope of the fd count, whether or not it is significant.
    pub growth_per_s: f64,
    /// Seconds until the soft limit; `None` unless fds are significantly rising.
    pub eta_s: Option<f64>,
}

pub fn fd_forecast(fd_points: &[(f64, f64)], soft_limit: u64) -> Option<FdForecast> {
    let trend = Trend::fit(fd_points)?;
    let eta_s = trend.is_rising().then(|| {
        let level = fd_points
            .last()
            .map_or(trend.level, |&(_, last)| last.max(trend.level));
        (soft_limit as f64 - level).max(0.0) / trend.slope_per_s
    });
    Some(FdForecast {
        growth_per_s: trend.slope_per_s,
        eta_s,
    })
}

/// Whether a count keeps growing over at least `min_span_s`: significantly
/// rising, and the (lower) median of each third of the window above the one
/// before. The second test rejects a single step, such as a connection pool
/// filling up at once: with only two levels, three strictly rising medians
/// are impossible.
pub fn keeps_growing(points: &[(f64, f64)], min_span_s: f64) -> bool {
    let span_s = match (points.first(), points.last()) {
        (Some(&(first, _)), Some(&(last, _))) => last - first,
        _ => 0.0,
    };
    if span_s < min_span_s
        || points.len() < 2 * MIN_POINTS
        || !Trend::fit(points).is_some_and(|trend| trend.z >= MIN_TREND_Z)
    {
        return false;
    }
    let third = points.len() / 3;
    let (early, rest) = points.split_at(third);
    let (middle, late) = rest.split_at(rest.len() - third);
    let level = |part: &[(f64, f64)]| {
        let mut values: Vec<f64> = part.iter().map(|&(_, value)| value).collect();
        lower_median(&mut values)
    };
    matches!(
        (level(early), level(middle), level(late)),
        (Some(early), Some(middle), Some(late)) if early < middle && middle < late
    )
}

fn lower_median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mid = (values.len() - 1) / 2;
    Some(*values.select_nth_unstable_by(mid, f64::total_cmp).1)
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let odd = values.len() % 2 == 1;
    let (lower, upper, _) = values.select_nth_unstable_by(values.len() / 2, f64::total_cmp);
    if odd {
        return Some(*upper);
    }
    let lower = lower.iter().copied().max_by(f64::total_cmp)?;
    Some(f64::midpoint(lower, *upper))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic noise in [-amplitude, amplitude] (a small LCG).
    fn noise(seed: &mut u64, amplitude: f64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * amplitude
    }

    fn series(seconds: u32, value: impl Fn(f64) -> f64) -> Vec<(f64, f64)> {
        (0..seconds)
            .map(|s| {
                let t = 100.0 + f64::from(s);
                (t, value(t - 100.0).round())
            })
            .collect()
    }

    #[test]
    fn linear_leak_gives_exact_eta() {
        // 10 fds/s from 50, limit 400: at t=20 s there are 250 fds, 15 s left.
        let points = series(21, |t| 50.0 + 10.0 * t);
        let forecast = fd_forecast(&points, 400).unwrap();
        assert!((forecast.growth_per_s - 10.0).abs() < 1e-9);
        assert!((forecast.eta_s.unwrap() - 15.0).abs() < 1e-6);
    }

    #[test]
    fn noisy_leak_eta_within_a_quarter() {
        let mut seed = 42;
        for run in 0..500 {
            let noisy: Vec<(f64, f64)> = series(20, |t| 40.0 + 10.0 * t)
                .into_iter()
                .map(|(t, v)| (t, (v + noise(&mut seed, 15.0)).round()))
                .collect();
            let true_remaining = (400.0 - (40.0 + 10.0 * 19.0)) / 10.0;
            let eta = fd_forecast(&noisy, 400).unwrap().eta_s.unwrap();
            assert!(
                (eta - true_remaining).abs() <= 0.25 * true_remaining,
                "run {run}: eta {eta} vs {true_remaining}"
            );
        }
    }

    #[test]
    fn flat_or_noisy_flat_gives_no_eta() {
        let flat = series(30, |_| 1_000.0);
        assert_eq!(fd_forecast(&flat, 4096).unwrap().eta_s, None);
        let mut seed = 7;
        for _ in 0..500 {
            let noisy: Vec<(f64, f64)> = series(60, |_| 1_000.0)
                .into_iter()
                .map(|(t, v)| (t, (v + noise(&mut seed, 30.0)).round()))
                .collect();
            assert_eq!(fd_forecast(&noisy, 4096).unwrap().eta_s, None);
        }
    }

    #[test]
    fn decreasing_gives_no_eta() {
        let points = series(30, |t| 900.0 - 5.0 * t);
        let forecast = fd_forecast(&points, 1024).unwrap();
        assert!(forecast.growth_per_s < 0.0);
        assert_eq!(forecast.eta_s, None);
    }

    #[test]
    fn too_few_samples_or_too_short_gives_nothing() {
        assert_eq!(fd_forecast(&series(4, |t| 10.0 * t), 100), None);
        let quick: Vec<(f64, f64)> = (0..10)
            .map(|i| (f64::from(i) * 0.1, f64::from(i)))
            .collect();
        assert_eq!(fd_forecast(&quick, 100), None);
        assert_eq!(fd_forecast(&[], 100), None);
    }

    #[test]
    fn five_rising_samples_are_enough() {
        let eta = fd_forecast(&series(6, |t| 100.0 + 10.0 * t), 400)
            .unwrap()
            .eta_s;
        assert!((eta.unwrap() - 25.0).abs() < 1e-6);
    }

    #[test]
    fn over_the_limit_means_now() {
        let eta = fd_forecast(&series(10, |t| 390.0 + 5.0 * t), 400)
            .unwrap()
            .eta_s;
        assert_eq!(eta, Some(0.0));
    }

    #[test]
    fn steady_growth_keeps_growing_but_a_step_does_not() {
        let stairs = series(30, |t| (t / 3.0).floor());
        assert!(keeps_growing(&stairs, 0.0));
        assert!(!keeps_growing(&stairs, 60.0), "not for long enough yet");
        // A pool of 100 filled at once, early or midway.
        let step = |at: f64| series(30, move |t| if t < at { 0.0 } else { 100.0 });
        assert!(!keeps_growing(&step(5.0), 0.0));
        assert!(!keeps_growing(&step(15.0), 0.0));
        assert!(!keeps_growing(&series(30, |_| 12.0), 0.0));
        assert!(!keeps_growing(&series(5, |t| t), 0.0));
    }

    #[test]
    fn history_keeps_the_window_and_thins_fast_ticks() {
        let mut history = History::new(Duration::from_secs(60));
        for tick in 0..1_000u64 {
            history.push(Sample {
                ktime_ns: tick * 100_000_000, // every 0.1 s
                fds: Some(tick),
                held: 0,
                close_wait: 0,
            });
        }
        let points = history.points(|sample| sample.fds);
        assert!(points.len() <= CAPACITY);
        let span = points.last().unwrap().0 - points.first().unwrap().0;
        assert!(span > 50.0 && span <= 60.0, "{span}");
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
        assert_eq!(lower_median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.0));
    }
}
