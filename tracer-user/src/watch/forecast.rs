//! Trends over the per-tick samples of a process: the fd exhaustion forecast
//! and the "keeps growing" test used by the verdicts.
//!
//! Both are rank-based so that a few odd samples (a burst of short-lived
//! sockets, a slow /proc read) do not move them: the slope is Theil–Sen (the
//! median of pairwise slopes) and growth must be significant by the
//! Mann–Kendall test (are later samples larger than earlier ones more often
//! than chance allows).
//!
//! Leaks run at every pace, from ten sockets a second to one every half
//! minute for weeks, so each process keeps its samples at four time scales
//! ([`Trends`]): seconds (from the event stream, every collector tick), a
//! minute, ten minutes and an hour, each at most [`CAPACITY`] samples.

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

/// What the collector saw of a process at one tick. Kept small: a process
/// keeps up to 256 of them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub ktime_ns: u64,
    /// [`NO_FDS`] when the fd table could not be read.
    fds: u32,
    pub held: u32,
    /// Held sockets whose connection has ended (CLOSE_WAIT, CLOSED_HELD).
    pub stranded: u32,
}

const NO_FDS: u32 = u32::MAX;

impl Sample {
    pub fn new(ktime_ns: u64, fds: Option<u64>, held: u64, stranded: u64) -> Self {
        let narrow = |value: u64| u32::try_from(value).unwrap_or(NO_FDS - 1);
        Self {
            ktime_ns,
            fds: fds.map_or(NO_FDS, narrow),
            held: narrow(held),
            stranded: narrow(stranded),
        }
    }

    pub fn fds(&self) -> Option<u64> {
        (self.fds != NO_FDS).then_some(u64::from(self.fds))
    }
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
            // So that the samples kept span the whole window.
            min_spacing_ns: window_ns / CAPACITY as u64,
            // Grown as samples come: most processes never fill the long
            // scales.
            samples: VecDeque::new(),
        }
    }

    pub fn window_s(&self) -> f64 {
        self.window_ns as f64 / 1e9
    }

    /// Seconds between the first and the last sample.
    pub fn span_s(&self) -> f64 {
        match (self.samples.front(), self.samples.back()) {
            (Some(first), Some(last)) => (last.ktime_ns - first.ktime_ns) as f64 / 1e9,
            _ => 0.0,
        }
    }

    pub fn last(&self) -> Option<&Sample> {
        self.samples.back()
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
        Self::fit_spanning(points, MIN_SPAN_S)
    }

    /// As [`Trend::fit`], over at least `min_span_s`.
    fn fit_spanning(points: &[(f64, f64)], min_span_s: f64) -> Option<Self> {
        let (&(first_t, first_value), &(last_t, _)) = (points.first()?, points.last()?);
        if points.len() < MIN_POINTS || last_t - first_t < min_span_s {
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
    /// The window the slope was measured over, in seconds.
    pub window_s: f64,
    /// The growth is steady over that window (see [`keeps_growing`]), not
    /// only a significant slope: what a verdict needs.
    pub steady: bool,
}

pub fn fd_forecast(fd_points: &[(f64, f64)], soft_limit: u64) -> Option<FdForecast> {
    fd_forecast_spanning(fd_points, soft_limit, MIN_SPAN_S)
}

fn fd_forecast_spanning(
    fd_points: &[(f64, f64)],
    soft_limit: u64,
    min_span_s: f64,
) -> Option<FdForecast> {
    let trend = Trend::fit_spanning(fd_points, min_span_s)?;
    let eta_s = trend.is_rising().then(|| {
        let level = fd_points
            .last()
            .map_or(trend.level, |&(_, last)| last.max(trend.level));
        (soft_limit as f64 - level).max(0.0) / trend.slope_per_s
    });
    Some(FdForecast {
        growth_per_s: trend.slope_per_s,
        eta_s,
        window_s: 0.0,
        steady: keeps_growing(fd_points, 0.0),
    })
}

/// The time scales: the seconds scale is fed every collector tick from the
/// event stream (held sockets), the others at each report (fds from /proc).
pub const SCALES: [Duration; 4] = [
    Duration::from_secs(5),
    Duration::from_secs(60),
    Duration::from_secs(600),
    Duration::from_secs(3_600),
];
const SECONDS: usize = 0;
/// A slower scale speaks once it spans this share of its window; before,
/// the shorter scales do.
const MIN_SPAN_SHARE: f64 = 0.5;
/// A shorter scale overrides a longer one when its forecast is this much
/// sooner: the leak sped up. Noise at a short scale moves a forecast far
/// less (a staircase of one socket per 30 s seen over a minute: ±50%).
const SPED_UP: f64 = 3.0;
/// The seconds scale forecasts only exhaustion this near: beyond, a few
/// seconds of growth (a pool warming up) say too little.
pub const FAST_ETA_MAX_S: f64 = 60.0;
/// The seconds scale needs this much steady growth first.
const FAST_MIN_SPAN_S: f64 = 1.5;
/// A slower scale's growth is steady (a verdict) only once it spans this
/// share of its window: a server or a pool warming up on a slow host adds
/// fds for several seconds before it levels off, and that is no leak.
const STEADY_SPAN_SHARE: f64 = 1.0 / 3.0;

/// One process's samples at every scale.
#[derive(Clone, Debug)]
pub struct Trends {
    scales: [History; SCALES.len()],
}

impl Default for Trends {
    fn default() -> Self {
        Self {
            scales: SCALES.map(History::new),
        }
    }
}

impl Trends {
    /// A sample from the event stream (every collector tick).
    pub fn push_fast(&mut self, sample: Sample) {
        self.scales[SECONDS].push(sample);
    }

    /// A sample with the fd count read from /proc (every report).
    pub fn push(&mut self, sample: Sample) {
        for history in &mut self.scales {
            history.push(sample);
        }
    }

    /// The last sample of the seconds scale.
    pub fn last_fast(&self) -> Option<&Sample> {
        self.scales[SECONDS].last()
    }

    /// When the soft limit is reached, from the longest scale that has
    /// enough history and sees fds rising, unless a shorter one sees them
    /// rising [`SPED_UP`] times faster. `None` before any scale can say.
    /// `fds_now` is the count just read.
    pub fn fd_forecast(&self, fds_now: u64, soft_limit: u64) -> Option<FdForecast> {
        let mut best: Option<FdForecast> = None;
        let mut flat: Option<FdForecast> = None;
        for (index, history) in self.scales.iter().enumerate().rev() {
            let forecast = if index == SECONDS {
                Self::fast_forecast(history, fds_now, soft_limit)
            } else if index == 1 || history.span_s() >= MIN_SPAN_SHARE * history.window_s() {
                fd_forecast(&history.points(Sample::fds), soft_limit)
            } else {
                None
            };
            let Some(mut forecast) = forecast else {
                continue;
            };
            forecast.window_s = history.window_s();
            if index != SECONDS {
                forecast.steady &= history.span_s() >= STEADY_SPAN_SHARE * history.window_s();
            }
            let Some(eta) = forecast.eta_s else {
                flat.get_or_insert(forecast);
                continue;
            };
            match best {
                Some(longer) if longer.eta_s.is_some_and(|then| eta * SPED_UP >= then) => {}
                _ => best = Some(forecast),
            }
        }
        best.or(flat)
    }

    /// The seconds scale sees the held sockets, from the event stream, and
    /// forecasts from their growth: only steady growth, and only for an
    /// exhaustion near enough that a few seconds of growth say enough.
    fn fast_forecast(history: &History, fds_now: u64, soft_limit: u64) -> Option<FdForecast> {
        let points = history.points(|sample| Some(u64::from(sample.held)));
        if !keeps_growing(&points, FAST_MIN_SPAN_S) {
            return None;
        }
        let trend = Trend::fit_spanning(&points, FAST_MIN_SPAN_S).filter(Trend::is_rising)?;
        let eta_s = soft_limit.saturating_sub(fds_now) as f64 / trend.slope_per_s;
        (eta_s <= FAST_ETA_MAX_S).then_some(FdForecast {
            growth_per_s: trend.slope_per_s,
            eta_s: Some(eta_s),
            window_s: 0.0,
            steady: true,
        })
    }

    /// The window (seconds) over which `measure` keeps growing, if any
    /// slow scale with enough history shows it; `min_span_share` of the
    /// one-minute window at least (a pool filling over some seconds is no
    /// leak). The longest scale that shows it is named.
    pub fn keeps_growing(
        &self,
        measure: impl Fn(&Sample) -> Option<u64> + Copy,
        min_span_share: f64,
    ) -> Option<f64> {
        self.scales
            .iter()
            .enumerate()
            .skip(1)
            .rev()
            .find(|(index, history)| {
                let share = if *index == 1 {
                    min_span_share
                } else {
                    min_span_share.max(MIN_SPAN_SHARE)
                };
                keeps_growing(&history.points(measure), share * history.window_s())
            })
            .map(|(_, history)| history.window_s())
    }

    /// The fitted rise of `measure` over the scale of `window_s`.
    pub fn rise(&self, window_s: f64, measure: impl Fn(&Sample) -> Option<u64>) -> f64 {
        self.scales
            .iter()
            .find(|history| history.window_s() == window_s)
            .and_then(|history| Trend::fit(&history.points(measure)))
            .map_or(0.0, |trend| trend.rise)
    }
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
        || !Trend::fit_spanning(points, 0.0).is_some_and(|trend| trend.z >= MIN_TREND_Z)
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
            // Every 0.1 s.
            history.push(Sample::new(tick * 100_000_000, Some(tick), 0, 0));
        }
        let points = history.points(Sample::fds);
        assert!(points.len() <= CAPACITY);
        let span = points.last().unwrap().0 - points.first().unwrap().0;
        assert!(span > 50.0 && span <= 60.0, "{span}");
    }

    /// One sample per second of `fds(t)` over `seconds`, fed like the
    /// collector feeds them (seconds scale every 0.1 s, with the same value).
    fn trends(seconds: u64, fds: impl Fn(f64) -> f64) -> Trends {
        let mut trends = Trends::default();
        for tenth in 0..seconds * 10 {
            let t = tenth as f64 / 10.0;
            let at = 1_000_000_000_000 + tenth * 100_000_000;
            let value = fds(t).round() as u64;
            if tenth % 10 == 0 {
                trends.push(Sample::new(at, Some(value), value, 0));
            } else {
                trends.push_fast(Sample::new(at, Some(value), value, 0));
            }
        }
        trends
    }

    #[test]
    fn a_slow_leak_is_forecast_from_ten_minutes() {
        // One fd every 30 s (the incident), 65,535 allowed.
        let trends = trends(600, |t| 100.0 + (t / 30.0).floor());
        let forecast = trends.fd_forecast(119, 65_535).unwrap();
        let truth = (65_535.0 - 119.0) * 30.0;
        let eta = forecast.eta_s.unwrap();
        assert!((eta - truth).abs() <= 0.25 * truth, "{eta} vs {truth}");
        assert_eq!(forecast.window_s, 600.0);
        assert_eq!(
            trends.keeps_growing(|s| s.fds(), 0.9),
            Some(600.0),
            "steady growth over ten minutes"
        );
    }

    #[test]
    fn a_fast_leak_is_forecast_within_seconds() {
        // 10 fds/s against 256: exhausted 25 s in.
        let trends = trends(2, |t| 6.0 + 10.0 * t);
        let forecast = trends.fd_forecast(26, 256).unwrap();
        let eta = forecast.eta_s.unwrap();
        assert!((eta - 23.0).abs() < 3.0, "{eta}");
        assert_eq!(forecast.window_s, 5.0);
    }

    #[test]
    fn a_pool_that_filled_at_once_has_no_forecast() {
        let filled = trends(120, |t| if t < 3.0 { 10.0 } else { 60.0 });
        assert_eq!(filled.fd_forecast(60, 1_024).and_then(|f| f.eta_s), None);
        assert_eq!(filled.keeps_growing(|s| s.fds(), 0.9), None);
        // Warming up over two seconds towards a far limit: no forecast either.
        let warming = trends(3, |t| 10.0 + 10.0 * t.min(2.0));
        assert_eq!(warming.fd_forecast(30, 65_535).and_then(|f| f.eta_s), None);
    }

    #[test]
    fn a_server_warming_up_for_seconds_is_never_a_steady_rise() {
        // 4 fds, then 1.4 more a second for 7 s, then level (as a threaded
        // server under emulation did): forecasts, but never a verdict.
        let fds = |t: f64| 4.0 + 1.4 * t.min(7.0);
        for seconds in 6..=90 {
            let warming = trends(seconds, fds);
            let forecast = warming.fd_forecast(fds(seconds as f64) as u64, 1_024);
            assert!(
                !forecast.is_some_and(|f| f.steady),
                "{seconds} s: {forecast:?}"
            );
        }
        // A leak at the same pace is a steady rise by a third of a minute.
        let leak = trends(21, |t| 4.0 + 1.4 * t);
        assert!(leak.fd_forecast(33, 1_024).unwrap().steady);
    }

    #[test]
    fn a_leak_that_sped_up_is_forecast_from_its_new_pace() {
        // One a second for ten minutes, then 20 a second.
        let trends = trends(660, |t| {
            if t < 600.0 {
                t
            } else {
                600.0 + 20.0 * (t - 600.0)
            }
        });
        let forecast = trends.fd_forecast(1_800, 100_000).unwrap();
        assert!(forecast.growth_per_s > 10.0, "{forecast:?}");
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
        assert_eq!(lower_median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.0));
    }
}
