//! `socktrace serve`: the collector as a daemon. The per-process view of
//! `watch` is exported on `/metrics` (Prometheus text or OpenMetrics, see
//! `serve::metrics`), optionally written as an HdrHistogram interval log
//! (`serve::hdr_log`); alerts go to stderr as JSON lines; `/healthz` says
//! whether the collector is turning. SIGTERM or SIGINT stop the collector,
//! then the HTTP server.

use std::io::{self, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;

use super::ReportOptions;
use crate::{
    clock::{self, duration_ns},
    collector::Sink,
    model::{Output, Snapshot},
    output::{self, json},
    pipeline,
    probes::Counters,
    serve::{
        hdr_log::{HdrLog, HdrLogOptions},
        http::{self, Health},
        metrics::{Exporter, Metrics},
        web_config::WebConfig,
    },
    watch::{Watch, WatchFeed},
};

pub struct Options {
    pub pipeline: pipeline::Options,
    pub report: ReportOptions,
    /// `IP:PORT` of /metrics and /healthz.
    pub listen: String,
    /// TLS and basic auth for them (`--web-config`).
    pub web_config: Option<PathBuf>,
    /// At most this many processes exported (bounds the series).
    pub max_processes: usize,
    pub hdr_log: Option<HdrLogOptions>,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    // Bound first: a busy port or a bad address fails before the probes load.
    let addr = http::parse_listen(&options.listen)?;
    let web = match &options.web_config {
        Some(path) => WebConfig::load(path)?,
        None => WebConfig::open(),
    };
    let listener = http::bind(addr).await?;
    let local = listener.local_addr().unwrap_or(addr);
    if !addr.ip().is_loopback() && web.is_open() {
        eprintln!(
            "socktrace: warning: serving on {local}, not a loopback address, without --web-config: anyone who can reach it sees process names and peers"
        );
    }
    let scheme = if web.tls.is_some() { "https" } else { "http" };
    let hdr_log = match options.hdr_log {
        Some(log) => {
            Some(HdrLog::create(log, SystemTime::now()).context("starting the HdrHistogram log")?)
        }
        None => None,
    };
    eprintln!("socktrace: serving metrics on {scheme}://{local}/metrics");

    let started = pipeline::start(&options.pipeline, true)?;
    let metrics = Arc::new(Metrics::new(
        Exporter::new(options.max_processes),
        &started.probes.mode.to_string(),
    ));
    let health = Arc::new(Health::new());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        health.clone(),
        Arc::new(web),
        stopped,
    ));
    let feed = WatchFeed::new(
        Watch::new(options.report.watch, started.start_ns),
        started.scope(),
        options.report.interval,
        started.start_ns + duration_ns(options.report.interval),
    );
    let mut sink = ServeSink {
        feed,
        metrics,
        health,
        hdr_log,
        hdr_log_failing: false,
        max_processes: options.max_processes,
        cap_reported: false,
    };
    let result = started.run(&mut sink).await;
    // The collector stopped (signal, --duration, or an error): so does HTTP.
    // Sending fails only if the server has already ended.
    let _ = stop.send(true);
    if let Err(e) = server.await {
        log::warn!("the HTTP server ended abnormally: {e}");
    }
    result?;
    Ok(())
}

/// Feeds the watch, and at each report updates the exported metrics, logs
/// the histograms and prints the new alerts.
struct ServeSink {
    feed: WatchFeed,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    hdr_log: Option<HdrLog>,
    /// Set after a write failed, so that a full disk warns once, not at
    /// every report; serving metrics goes on.
    hdr_log_failing: bool,
    max_processes: usize,
    /// The cap was reached and said so (once).
    cap_reported: bool,
}

impl ServeSink {
    fn report(&mut self, now_ns: u64, counters: Counters) {
        let snapshot = self.feed.report(now_ns, counters.lost());
        log_alerts(&snapshot);
        let watch = self.feed.watch();
        let left_out = self.metrics.exporter().update(
            &snapshot,
            |pid| watch.distributions(pid),
            counters,
            now_ns,
        );
        if left_out > 0 && !self.cap_reported {
            eprintln!(
                "socktrace: {left_out} processes with TCP activity are not exported (--max-processes {})",
                self.max_processes
            );
            self.cap_reported = true;
        }
        let Some(log) = &mut self.hdr_log else {
            return;
        };
        let processes = snapshot.processes.iter().filter_map(|report| {
            let distributions = watch.distributions(report.pid)?;
            Some((report.pid, report.comm.as_str(), distributions))
        });
        match log.write_interval(SystemTime::now(), processes) {
            Ok(()) => self.hdr_log_failing = false,
            Err(e) if !self.hdr_log_failing => {
                eprintln!("socktrace: HdrHistogram log: {e}");
                self.hdr_log_failing = true;
            }
            Err(_) => {}
        }
    }
}

/// New alerts as JSON `alert` lines on stderr, like `watch --json` prints them.
fn log_alerts(snapshot: &Snapshot) {
    if snapshot.new_alerts.is_empty() {
        return;
    }
    let ts = clock::unix_now_s();
    let mut stderr = io::stderr().lock();
    for alert in &snapshot.new_alerts {
        match json::alert_line(alert, ts) {
            // Nowhere else to report a failing stderr.
            Ok(line) => drop(writeln!(stderr, "{line}")),
            Err(e) => log::warn!("encoding an alert: {e}"),
        }
    }
}

impl Sink for ServeSink {
    fn output(&mut self, output: &Output) -> io::Result<()> {
        self.feed.output(output);
        Ok(())
    }

    fn tick(&mut self, now_ns: u64, counters: &dyn Fn() -> Counters) -> io::Result<()> {
        self.health.beat();
        self.feed.sample(now_ns);
        if self.feed.due(now_ns) {
            self.report(now_ns, counters());
        }
        Ok(())
    }

    fn finish(&mut self, counters: Counters) -> io::Result<()> {
        // One last report, so that the log has everything up to the end.
        self.report(clock::monotonic_ns(), counters);
        output::report_losses(counters);
        Ok(())
    }

    fn container_stopped(&mut self) {
        self.feed.container_stopped();
    }
}
