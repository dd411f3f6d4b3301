//! The Prometheus view of the per-process reports: which processes are
//! exported, the figures of their last report, and the metric families
//! encoded from them on each scrape (a prometheus-client [`Collector`]).
//!
//! Cardinality is bounded: at most `max_processes` processes have series
//! (alerting ones first, then the busiest), at most [`TOP_PEERS`] peers per
//! process plus `other`, and a fixed set of states, alert kinds and buckets.
//! A process that leaves the report (it exited, went quiet, or was pushed
//! out by the cap) loses its gauges at once, since it holds nothing we can
//! see any more, but keeps its counters and histograms for [`RETIRED_GRACE`]
//! so that `rate()` and `increase()` see its last increments.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, NoLabelSet, text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use super::exposition::{self, Format};
use crate::model::{OTHER_PEERS, ProcessReport, Snapshot};
use crate::probes::Counters;
use crate::watch::distribution::{Distribution, Distributions, Timing};

pub const PREFIX: &str = "socktrace";
/// Processes exported by default (`--max-processes`).
pub const DEFAULT_MAX_PROCESSES: usize = 200;
/// How long the counters and histograms of a process that left the report
/// stay exported.
pub const RETIRED_GRACE: Duration = Duration::from_secs(300);
/// Peers with a `peer` label of their own, per process; the rest are `other`.
pub const TOP_PEERS: usize = 5;

/// Bucket bounds in microseconds. Connects on a LAN take tens of µs to a few
/// ms, and a SYN retransmit adds 1 s, then 2 s, 4 s ...
const CONNECT_LATENCY_BOUNDS_US: [u64; 17] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];
/// From request-per-connection (ms) to pooled connections (hours).
const LIFETIME_BOUNDS_US: [u64; 12] = [
    1_000,
    10_000,
    100_000,
    1_000_000,
    10_000_000,
    60_000_000,
    300_000_000,
    900_000_000,
    3_600_000_000,
    14_400_000_000,
    43_200_000_000,
    86_400_000_000,
];
/// A healthy process closes within milliseconds of the peer's FIN; a leak
/// waits minutes to hours.
const CLOSE_WAIT_DWELL_BOUNDS_US: [u64; 12] = [
    1_000,
    10_000,
    100_000,
    1_000_000,
    5_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
    900_000_000,
    3_600_000_000,
    14_400_000_000,
    86_400_000_000,
];

fn bounds_us(timing: Timing) -> &'static [u64] {
    match timing {
        Timing::ConnectLatency => &CONNECT_LATENCY_BOUNDS_US,
        Timing::Lifetime => &LIFETIME_BOUNDS_US,
        Timing::CloseWaitDwell => &CLOSE_WAIT_DWELL_BOUNDS_US,
    }
}

fn timing_help(timing: Timing) -> &'static str {
    match timing {
        Timing::ConnectLatency => {
            "Time from SYN_SENT to ESTABLISHED of the connections the process opened."
        }
        Timing::Lifetime => "Time from ESTABLISHED to CLOSE of the process's connections.",
        Timing::CloseWaitDwell => {
            "Time the process took to close a socket after the peer closed it (CLOSE_WAIT)."
        }
    }
}

/// A histogram as Prometheus wants it: the count in each bucket (not
/// cumulative; the encoder adds them up), the last one `+Inf`.
#[derive(Clone, Debug, PartialEq)]
pub struct Buckets {
    pub counts: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_s: f64,
}

impl Buckets {
    /// `None` before the first value. A value goes to the first bucket
    /// whose bound is not below it, to HdrHistogram's precision (the lowest
    /// value of its bin counts).
    pub fn from_distribution(distribution: &Distribution, bounds_us: &[u64]) -> Option<Self> {
        let histogram = distribution.histogram()?;
        let mut counts: Vec<(f64, u64)> = bounds_us
            .iter()
            .map(|&bound| (bound as f64 / 1e6, 0))
            .chain(std::iter::once((f64::INFINITY, 0)))
            .collect();
        for value in histogram.iter_recorded() {
            let lowest_us = histogram.lowest_equivalent(value.value_iterated_to());
            let index = bounds_us.partition_point(|&bound| bound < lowest_us);
            if let Some((_, count)) = counts.get_mut(index) {
                *count += value.count_at_value();
            }
        }
        Some(Self {
            counts,
            count: histogram.len(),
            sum_s: distribution.sum_us() as f64 / 1e6,
        })
    }
}

/// `pid`, `comm`, and for a process in a container its `pidns` and
/// `container` (the runtime's id, when the cgroup path has one).
pub type ProcessLabels = Vec<(&'static str, String)>;

fn process_labels(report: &ProcessReport) -> ProcessLabels {
    let mut labels = vec![
        ("pid", report.pid.to_string()),
        ("comm", report.comm.clone()),
    ];
    if let Some(container) = &report.labels.container {
        if let Some(pidns) = report.labels.pidns {
            labels.push(("pidns", pidns.to_string()));
        }
        if let Some(id) = &container.id {
            labels.push(("container", id.clone()));
        }
    }
    labels
}

#[derive(Clone, Debug, PartialEq)]
struct PeerFigures {
    peer: String,
    held: u64,
    close_wait: u64,
    closed_held: u64,
}

/// Gauges of a live process, from its last report.
#[derive(Clone, Debug, PartialEq)]
struct Figures {
    sockets: Vec<(&'static str, u64)>,
    close_wait: u64,
    close_wait_oldest_s: Option<f64>,
    /// CLOSED_HELD sockets by cause.
    closed_held: Vec<(&'static str, u64)>,
    fds: Option<u64>,
    /// `None` when unlimited.
    fd_soft_limit: Option<u64>,
    eta_s: Option<f64>,
    peers: Vec<PeerFigures>,
    alerts: Vec<&'static str>,
}

impl Figures {
    fn of(report: &ProcessReport) -> Self {
        Self {
            sockets: report.sockets.iter().map(|(&s, &n)| (s, n)).collect(),
            close_wait: report.close_wait,
            close_wait_oldest_s: report.close_wait_oldest_s,
            closed_held: report
                .closed_held_causes
                .iter()
                .map(|(&cause, &n)| (cause, n))
                .collect(),
            fds: report.fds,
            fd_soft_limit: report.fd_soft_limit.filter(|&limit| limit != u64::MAX),
            eta_s: report.eta_s,
            peers: top_peers(report),
            alerts: report.alerts.iter().map(|a| a.kind.name()).collect(),
        }
    }
}

/// The [`TOP_PEERS`] peers holding most, then the rest summed as `other`;
/// peers holding nothing are left out.
fn top_peers(report: &ProcessReport) -> Vec<PeerFigures> {
    let mut peers = Vec::new();
    let mut other = PeerFigures {
        peer: OTHER_PEERS.to_string(),
        held: 0,
        close_wait: 0,
        closed_held: 0,
    };
    // The report lists peers busiest first, "other" last.
    for peer in report.peers.iter().filter(|peer| peer.held > 0) {
        if peers.len() < TOP_PEERS && peer.remote != OTHER_PEERS {
            peers.push(PeerFigures {
                peer: peer.remote.clone(),
                held: peer.held,
                close_wait: peer.close_wait,
                closed_held: peer.closed_held,
            });
        } else {
            other.held += peer.held;
            other.close_wait += peer.close_wait;
            other.closed_held += peer.closed_held;
        }
    }
    if other.held > 0 {
        peers.push(other);
    }
    peers
}

/// Everything exported about one process.
#[derive(Clone, Debug)]
struct ProcessSeries {
    labels: ProcessLabels,
    /// `None` once the process left the report.
    live: Option<Figures>,
    connects_total: u64,
    closes_total: u64,
    timings: [Option<Buckets>; 3],
    /// When the process left the report.
    retired_at_ns: Option<u64>,
}

impl ProcessSeries {
    fn new(report: &ProcessReport) -> Self {
        Self {
            labels: process_labels(report),
            live: None,
            connects_total: 0,
            closes_total: 0,
            timings: [None, None, None],
            retired_at_ns: None,
        }
    }

    /// Takes the counters and histograms of `report`; the gauges too while
    /// the process is live.
    fn update(&mut self, report: &ProcessReport, distributions: Option<&Distributions>) {
        self.labels = process_labels(report);
        self.connects_total = report.connects_total;
        self.closes_total = report.closes_total;
        self.live = (!report.exited).then(|| Figures::of(report));
        let Some(distributions) = distributions else {
            return;
        };
        for (slot, timing) in self.timings.iter_mut().zip(Timing::ALL) {
            let distribution = distributions.get(timing);
            // Unchanged since the last report: keep the buckets we have.
            if slot.as_ref().map(|b| b.count) != Some(distribution.count()) {
                *slot = Buckets::from_distribution(distribution, bounds_us(timing));
            }
        }
    }
}

/// Loss counters of the whole run.
#[derive(Clone, Copy, Debug, Default)]
struct Losses {
    ring_buffer_full: u64,
    undecodable: u64,
    missed_runs: u64,
    ends_unseen: u64,
    untracked_sockets: u64,
    reconciled: u64,
}

/// The exported state, updated at each report and read at each scrape.
#[derive(Debug)]
pub struct Exporter {
    max_processes: usize,
    grace_ns: u64,
    /// By pid, so that the output is in a stable order.
    processes: BTreeMap<u32, ProcessSeries>,
    losses: Losses,
    tracked_processes: usize,
}

impl Exporter {
    pub fn new(max_processes: usize) -> Self {
        Self {
            max_processes: max_processes.max(1),
            grace_ns: u64::try_from(RETIRED_GRACE.as_nanos()).unwrap_or(u64::MAX),
            processes: BTreeMap::new(),
            losses: Losses::default(),
            tracked_processes: 0,
        }
    }

    /// Takes in one report. `distributions` gives the histograms of a pid
    /// (from [`crate::watch::Watch::distributions`]). Returns how many live
    /// processes were left out by the cap.
    pub fn update<'a>(
        &mut self,
        snapshot: &Snapshot,
        distributions: impl Fn(u32) -> Option<&'a Distributions>,
        counters: Counters,
        now_ns: u64,
    ) -> usize {
        self.losses = Losses {
            ring_buffer_full: counters.lost_events,
            undecodable: counters.undecodable,
            missed_runs: counters.missed_runs,
            ends_unseen: counters.ends_unseen,
            untracked_sockets: counters.socket_map_full,
            reconciled: counters.reconciled,
        };
        self.tracked_processes = snapshot.processes.len();

        let (chosen, left_out) = self.choose(snapshot);
        for report in &snapshot.processes {
            if chosen.contains(&report.pid) {
                let series = self
                    .processes
                    .entry(report.pid)
                    .or_insert_with(|| ProcessSeries::new(report));
                series.update(report, distributions(report.pid));
                series.retired_at_ns = None;
            } else if report.exited
                && let Some(series) = self.processes.get_mut(&report.pid)
            {
                // Its last report: the final counts.
                series.update(report, distributions(report.pid));
            }
        }
        // Exited, forgotten by the watch, or pushed out by the cap.
        for (pid, series) in &mut self.processes {
            if !chosen.contains(pid) {
                series.live = None;
                series.retired_at_ns.get_or_insert(now_ns);
            }
        }
        self.forget_retired(now_ns);
        left_out
    }

    /// The live processes to export: alerting first, then by sockets held,
    /// then by connection churn; those already exported win ties, so that
    /// series do not flap at the edge of the cap. Also how many are left out.
    fn choose(&self, snapshot: &Snapshot) -> (HashSet<u32>, usize) {
        let mut live: Vec<&ProcessReport> = snapshot
            .processes
            .iter()
            .filter(|report| !report.exited)
            .collect();
        live.sort_by_key(|report| {
            // Per 1000 s: whole numbers sort simply (`as` saturates).
            let churn = ((report.connects_per_s_long + report.closes_per_s_long) * 1e3) as u64;
            let incumbent = self
                .processes
                .get(&report.pid)
                .is_some_and(|series| series.live.is_some());
            (
                Reverse(!report.alerts.is_empty()),
                Reverse(report.held),
                Reverse(churn),
                Reverse(incumbent),
                report.pid,
            )
        });
        let left_out = live.len().saturating_sub(self.max_processes);
        let chosen = live
            .iter()
            .take(self.max_processes)
            .map(|report| report.pid)
            .collect();
        (chosen, left_out)
    }

    /// Drops retired series after the grace period, and the longest retired
    /// ones beyond the cap.
    fn forget_retired(&mut self, now_ns: u64) {
        let grace_ns = self.grace_ns;
        self.processes.retain(|_, series| {
            series
                .retired_at_ns
                .is_none_or(|retired| now_ns.saturating_sub(retired) < grace_ns)
        });
        let excess = self.processes.len().saturating_sub(self.max_processes);
        if excess > 0 {
            let mut retired: Vec<(u64, u32)> = self
                .processes
                .iter()
                .filter_map(|(&pid, series)| Some((series.retired_at_ns?, pid)))
                .collect();
            retired.sort_unstable();
            for (_, pid) in retired.into_iter().take(excess) {
                self.processes.remove(&pid);
            }
        }
    }

    fn live(&self) -> impl Iterator<Item = (&ProcessLabels, &Figures)> {
        self.processes
            .values()
            .filter_map(|series| Some((&series.labels, series.live.as_ref()?)))
    }

    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let all = || self.processes.values();
        counter(
            encoder,
            "connects",
            "TCP connections the process opened (connect or accept).",
            all().map(|s| (&s.labels, s.connects_total)),
        )?;
        counter(
            encoder,
            "closes",
            "TCP connections the process closed.",
            all().map(|s| (&s.labels, s.closes_total)),
        )?;

        let mut sockets = encoder.encode_descriptor(
            "sockets",
            "Live TCP sockets of the process by state (listeners included).",
            None,
            MetricType::Gauge,
        )?;
        for (labels, figures) in self.live() {
            for &(state, count) in &figures.sockets {
                let labels = (labels.as_slice(), [("state", state)]);
                sockets.encode_family(&labels)?.encode_gauge(&count)?;
            }
        }
        gauge(
            encoder,
            "close_wait_sockets",
            "Sockets in CLOSE_WAIT: the peer closed, the process has not.",
            None,
            self.live().map(|(l, f)| (l, Some(f.close_wait))),
        )?;
        gauge(
            encoder,
            "close_wait_oldest_age",
            "Age of the process's oldest CLOSE_WAIT socket.",
            Some(&Unit::Seconds),
            self.live().map(|(l, f)| (l, f.close_wait_oldest_s)),
        )?;
        let mut closed_held = encoder.encode_descriptor(
            "closed_held_sockets",
            "Sockets the network closed (reset, timed out, refused, unreachable) whose fd the process still holds, by cause.",
            None,
            MetricType::Gauge,
        )?;
        for (labels, figures) in self.live() {
            for &(cause, count) in &figures.closed_held {
                let labels = (labels.as_slice(), [("cause", cause)]);
                closed_held.encode_family(&labels)?.encode_gauge(&count)?;
            }
        }
        gauge(
            encoder,
            "open_fds",
            "Open file descriptors of the process.",
            None,
            self.live().map(|(l, f)| (l, f.fds)),
        )?;
        gauge(
            encoder,
            "fd_soft_limit",
            "Soft RLIMIT_NOFILE of the process (absent when unlimited).",
            None,
            self.live().map(|(l, f)| (l, f.fd_soft_limit)),
        )?;
        gauge(
            encoder,
            "fd_exhaustion_eta",
            "Forecast time until the process reaches its soft fd limit (only while its fds grow).",
            Some(&Unit::Seconds),
            self.live().map(|(l, f)| (l, f.eta_s)),
        )?;

        let mut alerts = encoder.encode_descriptor(
            "process_alert",
            "1 while a verdict of socktrace holds for the process (alert: fd_exhaustion, close_wait, socket_growth).",
            None,
            MetricType::Gauge,
        )?;
        for (labels, figures) in self.live() {
            for &alert in &figures.alerts {
                let labels = (labels.as_slice(), [("alert", alert)]);
                alerts.encode_family(&labels)?.encode_gauge(&1u64)?;
            }
        }

        for (name, help, pick) in [
            (
                "peer_connections",
                "Connections the process holds, by peer (the busiest peers, then other).",
                (|peer: &PeerFigures| peer.held) as fn(&PeerFigures) -> u64,
            ),
            (
                "peer_close_wait_sockets",
                "CLOSE_WAIT sockets of the process, by peer (the busiest peers, then other).",
                |peer: &PeerFigures| peer.close_wait,
            ),
            (
                "peer_closed_held_sockets",
                "CLOSED_HELD sockets of the process (closed by the network, fd still open), by peer.",
                |peer: &PeerFigures| peer.closed_held,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, figures) in self.live() {
                for peer in &figures.peers {
                    let labels = (labels.as_slice(), [("peer", peer.peer.as_str())]);
                    family.encode_family(&labels)?.encode_gauge(&pick(peer))?;
                }
            }
        }

        for (index, timing) in Timing::ALL.into_iter().enumerate() {
            let mut family = encoder.encode_descriptor(
                timing.name(),
                timing_help(timing),
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?;
            for series in all() {
                if let Some(buckets) = series.timings.get(index).and_then(Option::as_ref) {
                    family
                        .encode_family(&series.labels)?
                        .encode_histogram::<NoLabelSet>(
                            buckets.sum_s,
                            buckets.count,
                            &buckets.counts,
                            None,
                        )?;
                }
            }
        }

        let mut lost = encoder.encode_descriptor(
            "lost_events",
            "Socket events lost before reaching socktrace (reason: ring_buffer_full, undecodable, probe_skipped, end_unseen); figures may be low by this much.",
            None,
            MetricType::Counter,
        )?;
        for (reason, count) in [
            ("ring_buffer_full", self.losses.ring_buffer_full),
            ("undecodable", self.losses.undecodable),
            ("probe_skipped", self.losses.missed_runs),
            ("end_unseen", self.losses.ends_unseen),
        ] {
            lost.encode_family(&[("reason", reason)])?
                .encode_counter::<NoLabelSet, _, u64>(&count, None)?;
        }
        encoder
            .encode_descriptor(
                "untracked_sockets",
                "Sockets whose owner the kernel could not record (socket map full; raise --max-sockets).",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&self.losses.untracked_sockets, None)?;
        encoder
            .encode_descriptor(
                "reconciled_sockets",
                "Sockets repaired from the kernel's file tables after lost events (their start or end was lost): the figures were healed, not left to drift.",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&self.losses.reconciled, None)?;
        let processes = [
            ("tracked", self.tracked_processes),
            ("exported", self.live().count()),
        ];
        let mut family = encoder.encode_descriptor(
            "processes",
            "Processes with TCP activity that socktrace follows, and how many of them are exported (see --max-processes).",
            None,
            MetricType::Gauge,
        )?;
        for (state, count) in processes {
            family
                .encode_family(&[("state", state)])?
                .encode_gauge(&(count as u64))?;
        }
        Ok(())
    }
}

fn counter<'a, L: EncodeLabelSet + 'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl Iterator<Item = (&'a L, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        family
            .encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
    }
    Ok(())
}

/// A gauge family; series whose value is unknown are left out.
fn gauge<'a, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    series: impl Iterator<Item = (&'a ProcessLabels, Option<V>)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, value) in series {
        if let Some(value) = value {
            family.encode_family(labels)?.encode_gauge(&value)?;
        }
    }
    Ok(())
}

/// The exporter as the registry sees it: read at each scrape.
#[derive(Debug)]
struct ExporterCollector(Arc<Mutex<Exporter>>);

impl Collector for ExporterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        lock(&self.0).encode(&mut encoder)
    }
}

/// A poisoned lock only means a panic elsewhere; the figures are still
/// whole (every update replaces them), so go on with them.
fn lock(exporter: &Mutex<Exporter>) -> MutexGuard<'_, Exporter> {
    exporter.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The registry served on /metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    exporter: Arc<Mutex<Exporter>>,
}

impl Metrics {
    /// `mode` is the probe mode, shown in `socktrace_build_info`.
    pub fn new(exporter: Exporter, mode: &str) -> Self {
        let exporter = Arc::new(Mutex::new(exporter));
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register(
            "build",
            "Version of socktrace and the probe mode it runs in",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_string()),
                ("mode", mode.to_string()),
            ]),
        );
        registry.register_collector(Box::new(ExporterCollector(exporter.clone())));
        Self { registry, exporter }
    }

    pub fn exporter(&self) -> MutexGuard<'_, Exporter> {
        lock(&self.exporter)
    }

    pub fn encode(&self, format: Format) -> Result<String, fmt::Error> {
        let mut openmetrics = String::new();
        text::encode(&mut openmetrics, &self.registry)?;
        Ok(match format {
            Format::OpenMetrics => openmetrics,
            Format::Prometheus => exposition::openmetrics_to_prometheus(&openmetrics),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::{Alert, AlertKind, AlertState, Container, Labels, PeerReport};

    const S: u64 = 1_000_000_000;

    fn report(pid: u32, comm: &str) -> ProcessReport {
        ProcessReport {
            pid,
            comm: comm.to_string(),
            ..ProcessReport::default()
        }
    }

    fn peer(remote: &str, held: u64, close_wait: u64) -> PeerReport {
        PeerReport {
            remote: remote.to_string(),
            opened: held,
            held,
            close_wait,
            peer_closed_first: close_wait,
            ..PeerReport::default()
        }
    }

    /// A leaking client: 30 connections to one server, 20 of them in
    /// CLOSE_WAIT, fds growing toward the limit.
    fn leaker() -> ProcessReport {
        let mut leaker = report(4242, "leaker");
        leaker.connects_total = 30;
        leaker.closes_total = 0;
        leaker.sockets = BTreeMap::from([("ESTABLISHED", 10), ("CLOSE_WAIT", 20)]);
        leaker.held = 30;
        leaker.close_wait = 20;
        leaker.close_wait_oldest_s = Some(12.5);
        leaker.fds = Some(40);
        leaker.fd_soft_limit = Some(1024);
        leaker.eta_s = Some(3000.0);
        leaker.closed_held = 5;
        leaker.closed_held_causes = BTreeMap::from([("reset", 5)]);
        leaker.alerts = vec![Alert {
            kind: AlertKind::CloseWait,
            state: AlertState::Raised,
            pid: 4242,
            comm: "leaker".to_string(),
            remote: None,
            eta_s: None,
            close_wait: 20,
            closed_held: 5,
            held: 30,
            fds: Some(40),
            fd_soft_limit: Some(1024),
            lost_events: 0,
            message: String::new(),
        }];
        leaker.peers = vec![peer("127.0.0.1:8080", 30, 20)];
        leaker.labels = Labels {
            nspid: Some(7),
            pidns: Some(4026532000),
            container: Some(Container {
                id: Some("ab".repeat(32)),
                runtime: Some("docker"),
                cgroup: String::new(),
            }),
        };
        leaker
    }

    fn snapshot(processes: Vec<ProcessReport>) -> Snapshot {
        Snapshot {
            ktime_ns: 0,
            lost_events: 0,
            processes,
            new_alerts: Vec::new(),
            fd_kinds_wanted: Vec::new(),
        }
    }

    fn distributions() -> Distributions {
        let mut distributions = Distributions::default();
        for us in [40, 80, 120, 900, 3_000_000] {
            distributions.connect_latency.record_ns(us * 1_000);
        }
        distributions.close_wait_dwell.record_ns(2 * S);
        distributions
    }

    fn metrics(max_processes: usize) -> Metrics {
        Metrics::new(Exporter::new(max_processes), "tracepoint")
    }

    fn scrape(metrics: &Metrics) -> String {
        metrics.encode(Format::Prometheus).unwrap()
    }

    fn lines_of<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
            .collect()
    }

    #[test]
    fn families_labels_and_values() {
        let metrics = metrics(DEFAULT_MAX_PROCESSES);
        let by_pid = HashMap::from([(4242, distributions())]);
        let counters = Counters {
            lost_events: 3,
            ..Counters::default()
        };
        metrics.exporter().update(
            &snapshot(vec![leaker()]),
            |pid| by_pid.get(&pid),
            counters,
            S,
        );
        let text = scrape(&metrics);

        let labels = format!(
            "pid=\"4242\",comm=\"leaker\",pidns=\"4026532000\",container=\"{}\"",
            "ab".repeat(32)
        );
        for (name, value) in [
            ("socktrace_connects_total", "30"),
            ("socktrace_closes_total", "0"),
            ("socktrace_close_wait_sockets", "20"),
            ("socktrace_close_wait_oldest_age_seconds", "12.5"),
            ("socktrace_open_fds", "40"),
            ("socktrace_fd_soft_limit", "1024"),
            ("socktrace_fd_exhaustion_eta_seconds", "3000.0"),
        ] {
            assert_eq!(
                lines_of(&text, name),
                [format!("{name}{{{labels}}} {value}")],
                "{text}"
            );
        }
        assert!(text.contains(&format!(
            "socktrace_sockets{{{labels},state=\"CLOSE_WAIT\"}} 20\n"
        )));
        assert!(text.contains(&format!(
            "socktrace_process_alert{{{labels},alert=\"close_wait\"}} 1\n"
        )));
        assert!(text.contains(&format!(
            "socktrace_peer_close_wait_sockets{{{labels},peer=\"127.0.0.1:8080\"}} 20\n"
        )));
        assert!(text.contains(&format!(
            "socktrace_closed_held_sockets{{{labels},cause=\"reset\"}} 5\n"
        )));
        assert!(text.contains("socktrace_lost_events_total{reason=\"ring_buffer_full\"} 3\n"));
        assert!(text.contains("socktrace_build_info{version=\""));
        assert!(text.contains("socktrace_processes{state=\"exported\"} 1\n"));
        // Classic text: counters are named with _total, no UNIT or EOF.
        assert!(text.contains("# TYPE socktrace_connects_total counter\n"));
        assert!(text.contains("# TYPE socktrace_build_info gauge\n"));
        assert!(!text.contains("# UNIT") && !text.contains("# EOF"));

        let openmetrics = metrics.encode(Format::OpenMetrics).unwrap();
        assert!(openmetrics.contains("# TYPE socktrace_connects counter\n"));
        assert!(openmetrics.contains("# TYPE socktrace_build info\n"));
        assert!(openmetrics.ends_with("# EOF\n"));
    }

    #[test]
    fn histogram_buckets_follow_the_bounds() {
        let metrics = metrics(DEFAULT_MAX_PROCESSES);
        let by_pid = HashMap::from([(4242, distributions())]);
        metrics.exporter().update(
            &snapshot(vec![leaker()]),
            |pid| by_pid.get(&pid),
            Counters::default(),
            S,
        );
        let text = scrape(&metrics);
        let buckets: Vec<(String, u64)> =
            lines_of(&text, "socktrace_connect_latency_seconds_bucket")
                .iter()
                .map(|line| {
                    let le = line
                        .split("le=\"")
                        .nth(1)
                        .unwrap()
                        .split('"')
                        .next()
                        .unwrap();
                    let count = line.rsplit(' ').next().unwrap().parse().unwrap();
                    (le.to_string(), count)
                })
                .collect();
        assert_eq!(buckets.len(), CONNECT_LATENCY_BOUNDS_US.len() + 1);
        let cumulative = |le: f64| {
            buckets
                .iter()
                .find(|(bound, _)| bound.parse::<f64>().unwrap() == le)
                .map(|&(_, count)| count)
                .unwrap()
        };
        // 40 µs | 80 µs | 120 µs | 900 µs | 3 s
        assert_eq!(cumulative(0.00005), 1);
        assert_eq!(cumulative(0.0001), 2);
        assert_eq!(cumulative(0.00025), 3);
        assert_eq!(cumulative(0.001), 4);
        assert_eq!(cumulative(2.5), 4);
        assert_eq!(cumulative(5.0), 5);
        assert_eq!(buckets.last().unwrap(), &("+Inf".to_string(), 5));
        assert!(text.contains("socktrace_connect_latency_seconds_count{pid=\"4242\""));
        let sum = lines_of(&text, "socktrace_connect_latency_seconds_sum")[0];
        let sum: f64 = sum.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((sum - 3.00114).abs() < 1e-9, "{sum}");
        // Lifetime had no values: no series.
        assert!(lines_of(&text, "socktrace_connection_lifetime_seconds_count").is_empty());
        assert_eq!(
            lines_of(&text, "socktrace_close_wait_dwell_seconds_count").len(),
            1
        );
    }

    #[test]
    fn processes_are_capped_alerting_and_busiest_first() {
        let metrics = metrics(2);
        let mut quiet = report(1, "quiet");
        quiet.held = 1;
        let mut busy = report(2, "busy");
        busy.held = 50;
        let reports = vec![quiet, busy, leaker()];
        let left_out =
            metrics
                .exporter()
                .update(&snapshot(reports), |_| None, Counters::default(), S);
        assert_eq!(left_out, 1);
        let exported: Vec<u32> = metrics
            .exporter()
            .live()
            .map(|(labels, _)| labels[0].1.parse().unwrap())
            .collect();
        assert_eq!(exported, vec![2, 4242]);
        let text = scrape(&metrics);
        // The quiet one was never exported: no series at all.
        assert!(!text.contains("pid=\"1\""), "{text}");
        assert!(text.contains("socktrace_processes{state=\"tracked\"} 3\n"));
        assert!(text.contains("socktrace_processes{state=\"exported\"} 2\n"));
    }

    #[test]
    fn exited_processes_keep_counters_for_the_grace_period() {
        let metrics = metrics(DEFAULT_MAX_PROCESSES);
        let update = |reports: Vec<ProcessReport>, at_s: u64| {
            metrics
                .exporter()
                .update(&snapshot(reports), |_| None, Counters::default(), at_s * S);
        };
        update(vec![leaker()], 1);
        let mut last = leaker();
        last.exited = true;
        last.closes_total = 30;
        update(vec![last], 2);
        let text = scrape(&metrics);
        assert!(
            lines_of(&text, "socktrace_close_wait_sockets").is_empty(),
            "{text}"
        );
        let closes = lines_of(&text, "socktrace_closes_total");
        assert!(closes.len() == 1 && closes[0].ends_with(" 30"), "{text}");

        let grace_s = RETIRED_GRACE.as_secs();
        update(vec![], grace_s + 1);
        assert_eq!(
            lines_of(&scrape(&metrics), "socktrace_closes_total").len(),
            1
        );
        update(vec![], grace_s + 3);
        assert!(lines_of(&scrape(&metrics), "socktrace_closes_total").is_empty());
    }

    #[test]
    fn peers_beyond_the_top_are_other() {
        let mut many = leaker();
        many.peers = (0..8)
            .map(|i| peer(&format!("10.0.0.{i}:80"), 10 - i, 1))
            .chain([peer("other", 4, 0), peer("10.0.0.99:80", 0, 0)])
            .collect();
        let peers = top_peers(&many);
        assert_eq!(peers.len(), TOP_PEERS + 1);
        let other = peers.last().unwrap();
        assert_eq!(other.peer, "other");
        // Peers 5, 6, 7 (held 5, 4, 3) and the report's own "other" (4).
        assert_eq!((other.held, other.close_wait), (16, 3));
    }
}
