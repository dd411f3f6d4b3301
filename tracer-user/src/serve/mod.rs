//! `socktrace serve`: the collector as a daemon. The per-process view of
//! `watch` is exported on `/metrics` (Prometheus text or OpenMetrics, see
//! [`metrics`]), optionally written as an HdrHistogram interval log
//! ([`hdr_log`]); alerts go to stderr as JSON lines; `/healthz` says whether
//! the collector is turning. SIGTERM or SIGINT stop the collector, then the
//! HTTP server.

mod exposition;
mod hdr_log;
mod http;
mod metrics;

use std::io::{self, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use clap::Args;

use crate::{
    cli::FilterArgs,
    clock,
    collector::Sink,
    output::trace::report_losses,
    probes::Counters,
    sockets::Output,
    watch::{Snapshot, Watch, render},
    watch_cmd::{ReportArgs, WatchFeed, unix_now_s},
};

use hdr_log::{HdrLog, HdrLogOptions};
use http::Health;
use metrics::{Exporter, Metrics};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub report: ReportArgs,
    /// Address of /metrics and /healthz (IP:PORT). Anything but loopback
    /// shows process names and peers to whoever can connect.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9477")]
    pub listen: String,
    /// Export at most this many processes (those with alerts first, then the
    /// busiest); bounds the number of series.
    #[arg(long, value_name = "N", default_value_t = metrics::DEFAULT_MAX_PROCESSES, value_parser = parse_max_processes)]
    pub max_processes: usize,
    /// Also write the histograms to FILE as an HdrHistogram interval log.
    #[arg(long, value_name = "FILE")]
    pub hdr_log: Option<PathBuf>,
    /// Rotate the log at this size (bytes, or with a K, M or G suffix).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size, requires = "hdr_log")]
    pub hdr_log_max_bytes: u64,
    /// Rotated logs to keep (FILE.1 is the newest).
    #[arg(long, value_name = "N", default_value_t = 4, requires = "hdr_log")]
    pub hdr_log_keep: usize,
}

fn parse_max_processes(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("'{text}' must be a positive number")),
    }
}

/// `4096`, `512K`, `64M`, `1G` (powers of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(format!("'{text}' is not a size (e.g. 64M)")),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&bytes| bytes > 0)
        .ok_or_else(|| format!("'{text}' is not a size (e.g. 64M)"))
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    // Bound first: a busy port or a bad address fails before the probes load.
    let addr = http::parse_listen(&args.listen)?;
    let listener = http::bind(addr).await?;
    let local = listener.local_addr().unwrap_or(addr);
    if !addr.ip().is_loopback() {
        eprintln!(
            "socktrace: warning: serving on {local}, not a loopback address: anyone who can reach it sees process names and peers"
        );
    }
    let hdr_log = match &args.hdr_log {
        Some(path) => Some(
            HdrLog::create(
                HdrLogOptions {
                    path: path.clone(),
                    max_bytes: args.hdr_log_max_bytes,
                    keep: args.hdr_log_keep,
                },
                SystemTime::now(),
            )
            .context("starting the HdrHistogram log")?,
        ),
        None => None,
    };
    eprintln!("socktrace: serving metrics on http://{local}/metrics");

    let started = crate::start(&args.filter, true)?;
    let metrics = Arc::new(Metrics::new(
        Exporter::new(args.max_processes),
        &started.probes.mode.to_string(),
    ));
    let health = Arc::new(Health::new());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(http::serve(
        listener,
        metrics.clone(),
        health.clone(),
        stopped,
    ));
    let feed = WatchFeed::new(
        Watch::new(args.report.config(&args.filter.pids), started.start_ns),
        crate::scope(&args.filter, started.target.as_ref()),
        args.report.interval,
        started.start_ns + crate::watch::duration_ns(args.report.interval),
    );
    let mut sink = ServeSink {
        feed,
        metrics,
        health,
        hdr_log,
        hdr_log_failing: false,
        max_processes: args.max_processes,
        cap_reported: false,
    };
    let result = started.run(&args.filter, &mut sink).await;
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
    let ts = unix_now_s();
    let mut stderr = io::stderr().lock();
    for alert in &snapshot.new_alerts {
        match render::alert_line(alert, ts) {
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
        report_losses(counters);
        Ok(())
    }

    fn container_stopped(&mut self) {
        self.feed.container_stopped();
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999G").is_err());
    }

    #[test]
    fn parses_serve_options() {
        let cli = Cli::try_parse_from([
            "socktrace",
            "serve",
            "--listen",
            "[::1]:9100",
            "--hdr-log",
            "/tmp/x.hlog",
            "--hdr-log-max-bytes",
            "1M",
            "--close-wait-age",
            "5s",
            "-p",
            "7",
        ])
        .unwrap();
        let Command::Serve(serve) = cli.command else {
            panic!("not serve");
        };
        assert_eq!(serve.listen, "[::1]:9100");
        assert_eq!(serve.hdr_log_max_bytes, 1 << 20);
        assert_eq!(serve.max_processes, metrics::DEFAULT_MAX_PROCESSES);
        assert_eq!(
            serve.report.close_wait_age,
            std::time::Duration::from_secs(5)
        );
        assert_eq!(serve.filter.pids, vec![7]);
        // Log options only make sense with a log.
        assert!(Cli::try_parse_from(["socktrace", "serve", "--hdr-log-keep", "2"]).is_err());
        assert!(Cli::try_parse_from(["socktrace", "serve", "--max-processes", "0"]).is_err());
    }
}
