//! Everything kept about one process: event counters updated per transition,
//! and the picture recounted from the socket table at each tick.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use super::distribution::{Distributions, empty_histogram};
use super::fd_kinds::FdKinds;
use super::forecast::{Sample, Trends};
use super::lifecycle::{Effects, SocketRecord, elapsed, seeded_closer};
use super::peers::{PeerKey, PeerTable};
use super::rates::Rates;
use super::verdicts::Evidence;
use super::{ProcSample, WatchConfig, round3};
use crate::{
    model::{Comm, DwellSummary, ProcessReport},
    tcp::TcpState,
};

const NS_PER_US: u64 = 1_000;
/// Name of the cause of a CLOSED_HELD socket the kernel gave no error for.
const NO_CAUSE: &str = "unknown";

/// Recounted from the socket table at each tick.
#[derive(Debug, Default)]
struct Current {
    sockets: BTreeMap<&'static str, u64>,
    held: u64,
    close_wait: u64,
    oldest_close_wait_ns: Option<u64>,
    oldest_close_wait_before_start: bool,
    /// Stranded sockets (CLOSE_WAIT, CLOSED_HELD) found at start and still
    /// there.
    stranded_before_start: u64,
    closed_held: u64,
    closed_held_causes: BTreeMap<&'static str, u64>,
    oldest_closed_held_ns: Option<u64>,
    /// Since the connection ended, of the oldest stranded socket.
    oldest_stranded_ns: Option<u64>,
    /// Ended dwells plus the ages of the sockets still waiting, in µs.
    close_wait_dwell_us: Option<Histogram<u64>>,
}

#[derive(Debug)]
pub struct Process {
    pub comm: Comm,
    opens: Rates,
    closes: Rates,
    pub peers: PeerTable,
    pub listen_ports: Vec<u16>,
    /// Connections opened and closed since the process was first seen.
    pub opened_total: u64,
    pub closed_total: u64,
    /// Connect latency, lifetime and ended CLOSE_WAIT dwells.
    pub distributions: Distributions,
    trends: Trends,
    /// Held connections as the events move them, between two recounts (the
    /// recount at each report is the truth; this is for the seconds scale).
    pub held_live: i64,
    /// What its fds are, read when they rise and TCP does not explain it.
    pub fd_kinds: Option<FdKinds>,
    /// Sockets repaired after lost events (see `Watch::on_gone`).
    pub reconciled: u64,
    pub last_event_ns: u64,
    pub exited: bool,
    current: Current,
}

impl Process {
    pub fn new(config: &WatchConfig, comm: Comm, now_ns: u64) -> Self {
        Self {
            comm,
            opens: Rates::new(config.short_window, config.long_window),
            closes: Rates::new(config.short_window, config.long_window),
            peers: PeerTable::default(),
            listen_ports: Vec::new(),
            opened_total: 0,
            closed_total: 0,
            distributions: Distributions::default(),
            trends: Trends::default(),
            held_live: 0,
            fd_kinds: None,
            reconciled: 0,
            last_event_ns: now_ns,
            exited: false,
            current: Current::default(),
        }
    }

    /// Keeps the name current (it changes at exec).
    pub fn set_comm(&mut self, comm: Comm) {
        if !comm.is_empty() {
            self.comm = comm;
        }
    }

    /// `peer_hint`: where the socket's peer was in the table last time.
    pub fn apply(
        &mut self,
        effects: &Effects,
        peer: Option<PeerKey>,
        peer_hint: &mut u32,
        now_ns: u64,
    ) {
        self.last_event_ns = now_ns;
        if let Some(port) = effects.listen_started {
            self.add_listen_port(port);
        }
        if let Some(port) = effects.listen_stopped {
            self.listen_ports.retain(|&listening| listening != port);
        }
        if effects.opened {
            self.opens.add(now_ns);
            self.opened_total += 1;
        }
        if effects.released {
            self.closes.add(now_ns);
            self.closed_total += 1;
        }
        let distributions = &mut self.distributions;
        if let Some(latency_ns) = effects.connect_latency_ns {
            distributions.connect_latency.record_ns(latency_ns);
        }
        if let Some(lifetime_ns) = effects.lifetime_ns {
            distributions.lifetime.record_ns(lifetime_ns);
        }
        if let Some(dwell_ns) = effects.close_wait_dwell_ns {
            distributions.close_wait_dwell.record_ns(dwell_ns);
        }
        // Half the transitions change nothing a peer counts: no lookup.
        let for_peer = effects.opened
            || effects.released
            || effects.closer.is_some()
            || effects.cause.is_some()
            || effects.lifetime_ns.is_some()
            || effects.peer_close_after_ns.is_some();
        let Some(key) = peer.filter(|_| for_peer) else {
            return;
        };
        let stats = self.peers.stats_mut(key, peer_hint);
        stats.last_event_ns = now_ns;
        stats.opened += u64::from(effects.opened);
        stats.closed += u64::from(effects.released);
        if let Some(closer) = effects.closer {
            stats.record_closer(closer);
        }
        if let Some(cause) = effects.cause {
            stats.record_cause(cause);
        }
        if let Some(lifetime_ns) = effects.lifetime_ns {
            stats.record_lifetime(lifetime_ns);
        }
        if let Some(dwell_ns) = effects.peer_close_after_ns {
            stats.record_peer_close_after(dwell_ns);
        }
    }

    fn add_listen_port(&mut self, port: u16) {
        if !self.listen_ports.contains(&port) {
            self.listen_ports.push(port);
        }
    }

    /// Takes in a socket that existed at start.
    pub fn add_seeded(&mut self, record: &mut SocketRecord, local_port: u16, now_ns: u64) {
        if record.listener {
            self.add_listen_port(local_port);
        }
        self.held_live += i64::from(record.is_held_connection());
        let Some(key) = record.peer else {
            return;
        };
        let stats = self.peers.stats_mut(key, &mut record.peer_hint);
        stats.last_event_ns = now_ns;
        if let Some(closer) = seeded_closer(record.state) {
            stats.record_closer(closer);
        }
    }

    pub fn reset_current(&mut self) {
        self.current = Current::default();
        self.peers.reset_current();
    }

    pub fn count_socket(&mut self, record: &SocketRecord, now_ns: u64) {
        *self.current.sockets.entry(record.state.name()).or_default() += 1;
        if !record.is_held_connection() {
            return;
        }
        let current = &mut self.current;
        current.held += 1;
        let close_wait_age_ns = (record.state == TcpState::CloseWait)
            .then(|| elapsed(now_ns, record.close_wait_since_ns));
        if let Some(age_ns) = close_wait_age_ns {
            self.count_close_wait(age_ns, record.close_wait_before_start);
        }
        let closed_held = record.state == TcpState::ClosedHeld;
        if record.is_stranded() {
            let current = &mut self.current;
            if closed_held {
                current.closed_held += 1;
                let cause = record.cause.map_or(NO_CAUSE, |cause| cause.name());
                *current.closed_held_causes.entry(cause).or_default() += 1;
            }
            current.stranded_before_start += u64::from(record.stranded_before_start);
            if let Some(age_ns) = elapsed(now_ns, record.stranded_since_ns) {
                current.oldest_stranded_ns = current.oldest_stranded_ns.max(Some(age_ns));
                if closed_held {
                    current.oldest_closed_held_ns = current.oldest_closed_held_ns.max(Some(age_ns));
                }
            }
        }
        let Some(key) = record.peer else {
            return;
        };
        let stats = self.peers.existing_mut(&key, record.peer_hint);
        stats.held += 1;
        stats.close_wait += u64::from(close_wait_age_ns.is_some());
        stats.closed_held += u64::from(closed_held);
        if let Some(open_ns) = elapsed(now_ns, record.established_at_ns) {
            stats.oldest_open_ns = stats.oldest_open_ns.max(open_ns);
        }
    }

    fn count_close_wait(&mut self, age_ns: Option<u64>, before_start: bool) {
        let current = &mut self.current;
        current.close_wait += 1;
        let Some(age_ns) = age_ns else {
            return;
        };
        if current
            .oldest_close_wait_ns
            .is_none_or(|oldest| age_ns > oldest)
        {
            current.oldest_close_wait_ns = Some(age_ns);
            current.oldest_close_wait_before_start = before_start;
        }
        if current.close_wait_dwell_us.is_none() {
            current.close_wait_dwell_us = self
                .distributions
                .close_wait_dwell
                .histogram()
                .cloned()
                .or_else(empty_histogram);
        }
        if let Some(histogram) = &mut current.close_wait_dwell_us {
            // Auto-resizing: only fails past u64 range, which an age is not.
            let _ = histogram.record(age_ns / NS_PER_US);
        }
    }

    /// Whether any socket of the table was counted under this process.
    pub fn has_sockets(&self) -> bool {
        !self.current.sockets.is_empty()
    }

    /// A sample for the seconds scale, from the event stream.
    pub fn sample_fast(&mut self, now_ns: u64) {
        let held = u64::try_from(self.held_live).unwrap_or(0);
        let stranded = self
            .trends
            .last_fast()
            .map_or(0, |last| u64::from(last.stranded));
        self.trends
            .push_fast(Sample::new(now_ns, None, held, stranded));
    }

    /// Records this tick's sample and computes the figures; call after the
    /// sockets were counted.
    pub fn report(
        &mut self,
        pid: u32,
        now_ns: u64,
        start_ns: u64,
        sample: Option<ProcSample>,
    ) -> (ProcessReport, Evidence) {
        let current = &self.current;
        let stranded = current.close_wait + current.closed_held;
        self.held_live = i64::try_from(current.held).unwrap_or(i64::MAX);
        self.trends.push(Sample::new(
            now_ns,
            sample.map(|sample| sample.fds),
            current.held,
            stranded,
        ));
        let trends = &self.trends;
        let fd_forecast =
            sample.and_then(|sample| trends.fd_forecast(sample.fds, sample.soft_limit));
        let held_growth_window_s = trends.keeps_growing(|s| Some(u64::from(s.held)), 0.9);
        // Rising fds that the held sockets do not follow: something else
        // (pipes, files, other sockets) is piling up.
        let fds_unexplained = fd_forecast.is_some_and(|forecast| {
            let window = forecast.window_s;
            let fd_rise = trends.rise(window, Sample::fds);
            forecast.eta_s.is_some()
                && fd_rise > 0.0
                && trends.rise(window, |s| Some(u64::from(s.held))) < 0.5 * fd_rise
        });
        let evidence = Evidence {
            fds_unexplained,
            fds_keep_growing: fd_forecast
                .is_some_and(|forecast| forecast.steady && forecast.eta_s.is_some()),
            held_growth_window_s,
            held_rise: held_growth_window_s.map_or(0.0, |window| {
                trends.rise(window, |s| Some(u64::from(s.held)))
            }),
            stranded_keeps_growing: trends
                .keeps_growing(|s| Some(u64::from(s.stranded)), 0.0)
                .is_some(),
            stranded_oldest_s: current.oldest_stranded_ns.map(|age| age as f64 / 1e9),
            stranded_before_start: current.stranded_before_start,
            opened_long: self.opens.long.count(now_ns),
            closed_long: self.closes.long.count(now_ns),
        };

        let connects_per_s = round3(self.opens.short.per_second(now_ns, start_ns));
        let closes_per_s = round3(self.closes.short.per_second(now_ns, start_ns));
        let connects_per_s_long = round3(self.opens.long.per_second(now_ns, start_ns));
        let closes_per_s_long = round3(self.closes.long.per_second(now_ns, start_ns));
        let dwell = current
            .close_wait_dwell_us
            .as_ref()
            .or(self.distributions.close_wait_dwell.histogram());
        let seconds = |age_ns: u64| round3(age_ns as f64 / 1e9);
        let report = ProcessReport {
            pid,
            comm: self.comm.to_string(),
            exited: self.exited,
            connects_per_s,
            closes_per_s,
            net_per_s: round3(connects_per_s - closes_per_s),
            connects_per_s_long,
            closes_per_s_long,
            net_per_s_long: round3(connects_per_s_long - closes_per_s_long),
            long_window_s: seconds(self.opens.long.span_ns(now_ns, start_ns)),
            connects_total: self.opened_total,
            closes_total: self.closed_total,
            sockets: current.sockets.clone(),
            held: current.held,
            close_wait: current.close_wait,
            close_wait_oldest_s: current.oldest_close_wait_ns.map(seconds),
            close_wait_oldest_lower_bound: current.oldest_close_wait_before_start,
            close_wait_dwell_s: dwell.and_then(DwellSummary::from_us_histogram),
            closed_held: current.closed_held,
            closed_held_causes: current.closed_held_causes.clone(),
            closed_held_oldest_s: current.oldest_closed_held_ns.map(seconds),
            fds: sample.map(|sample| sample.fds),
            fd_soft_limit: sample.map(|sample| sample.soft_limit),
            fd_hard_limit: sample.map(|sample| sample.hard_limit),
            fd_growth_per_s: fd_forecast.map(|forecast| round3(forecast.growth_per_s)),
            eta_s: fd_forecast.and_then(|forecast| forecast.eta_s).map(round3),
            eta_window_s: fd_forecast
                .filter(|forecast| forecast.eta_s.is_some())
                .map(|forecast| forecast.window_s),
            fd_kinds: self.fd_kinds.as_ref().map(FdKinds::counts),
            fd_kinds_rising: self
                .fd_kinds
                .as_ref()
                .map(FdKinds::rising)
                .unwrap_or_default(),
            alerts: Vec::new(),
            peers: self.peers.report(),
            reconciled: self.reconciled,
            labels: Default::default(),
        };
        (report, evidence)
    }
}

impl DwellSummary {
    fn from_us_histogram(histogram: &Histogram<u64>) -> Option<Self> {
        if histogram.is_empty() {
            return None;
        }
        // Milliseconds are as fine as a dwell summary needs.
        let seconds = |us: u64| (us / 1_000) as f64 / 1e3;
        Some(Self {
            count: histogram.len(),
            p50_s: seconds(histogram.value_at_quantile(0.5)),
            p90_s: seconds(histogram.value_at_quantile(0.9)),
            p99_s: seconds(histogram.value_at_quantile(0.99)),
            max_s: seconds(histogram.max()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dwell_summary_in_seconds() {
        let mut histogram = empty_histogram().unwrap();
        for ms in [1_000, 2_000, 3_000, 60_000] {
            histogram.record(ms * 1_000).unwrap();
        }
        let summary = DwellSummary::from_us_histogram(&histogram).unwrap();
        assert_eq!(summary.count, 4);
        assert!((summary.p50_s - 2.0).abs() < 0.05);
        assert!((summary.max_s - 60.0).abs() < 0.5);
        assert_eq!(
            DwellSummary::from_us_histogram(&empty_histogram().unwrap()),
            None
        );
    }
}
