//! `socktrace watch`: feeds the per-process view from the socket stage,
//! samples each process's fds and limits once per interval (never per
//! event), and prints a live table or JSON Lines. [`WatchFeed`] is the part
//! that `socktrace serve` shares.

use std::{
    collections::HashMap,
    io::{self, IsTerminal as _, Write},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::Args;

use crate::{
    cli::{FilterArgs, parse_secs},
    collector::Sink,
    output::{Scope, trace::report_losses},
    probes::Counters,
    procfs,
    sockets::Output,
    watch::{
        ProcSample, Snapshot, Watch, WatchConfig,
        render::{self, TableStyle},
    },
};

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Print JSON Lines (also whenever stdout is not a terminal).
    #[arg(long)]
    pub json: bool,
    /// Print one report, after one interval, and exit (without it, the
    /// first report shows the sockets found at start right away).
    #[arg(long)]
    pub once: bool,
    #[command(flatten)]
    pub report: ReportArgs,
}

/// How often processes are judged and by which thresholds (`watch` and
/// `serve`).
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Seconds between reports.
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_secs)]
    pub interval: Duration,
    /// Alert when the soft fd limit is forecast within this time (e.g. 1h, 30m).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub warn_eta: Duration,
    /// CLOSE_WAIT sockets older than this count as stuck (e.g. 60s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub close_wait_age: Duration,
    /// Alert when a process uses this share of its soft fd limit, in percent.
    #[arg(long, value_name = "PERCENT", default_value_t = 90.0)]
    pub fd_usage: f64,
}

impl ReportArgs {
    /// The watch configuration, for the processes `pids` (`-p`).
    pub fn config(&self, pids: &[u32]) -> WatchConfig {
        WatchConfig {
            warn_eta: self.warn_eta,
            close_wait_age: self.close_wait_age,
            fd_usage_threshold: self.fd_usage / 100.0,
            pids: pids.to_vec(),
            ..WatchConfig::default()
        }
    }
}

/// How reports are shown.
pub enum Display {
    /// A live table redrawn in place, like `top`.
    Terminal,
    /// JSON Lines (`--json`, or whenever stdout is not a terminal).
    Json,
}

impl Display {
    pub fn choose(json: bool) -> Self {
        if json || !io::stdout().is_terminal() {
            Self::Json
        } else {
            Self::Terminal
        }
    }
}

/// Keeps a [`Watch`] fed: hands it the outputs the scope wants and, once
/// per interval, the fd samples, and labels the reports it makes.
pub struct WatchFeed {
    watch: Watch,
    scope: Scope,
    interval_ns: u64,
    next_report_ns: u64,
}

impl WatchFeed {
    /// Reports every `interval`, the first at `first_report_ns`.
    pub fn new(watch: Watch, scope: Scope, interval: Duration, first_report_ns: u64) -> Self {
        Self {
            watch,
            scope,
            interval_ns: crate::watch::duration_ns(interval),
            next_report_ns: first_report_ns,
        }
    }

    pub fn watch(&self) -> &Watch {
        &self.watch
    }

    pub fn output(&mut self, output: &Output) {
        match output {
            Output::Existing(s) => {
                // Our own sockets (serve's listener) found at start; the
                // kernel programs already skip our events.
                let ours = s.owner.pid == Some(std::process::id());
                if !ours && self.scope.wants(&s.owner, s.local, s.remote) {
                    self.watch.on_seeded(s);
                }
            }
            Output::Transition(t) => {
                if self.scope.wants(&t.owner, t.local, t.remote) {
                    self.watch.on_transition(t);
                }
            }
            &Output::ProcessExit { pid, ktime_ns } => {
                self.watch.on_process_exit(pid, ktime_ns);
                self.scope.process_exited(pid);
            }
            Output::OwnerChanged {
                sock_id,
                owner,
                ktime_ns,
            } => {
                if self.scope.wants_owner(owner) {
                    self.watch.on_owner_changed(*sock_id, owner, *ktime_ns);
                }
            }
            &Output::Gone { sock_id, .. } => self.watch.on_gone(sock_id),
            Output::Found(s) => {
                if self.scope.wants(&s.owner, s.local, s.remote) {
                    self.watch.on_found(s);
                }
            }
            Output::LearnedOwner { .. } => {}
        }
    }

    /// Whether a report is due at `now_ns`; if so, the next one is due an
    /// interval later.
    pub fn due(&mut self, now_ns: u64) -> bool {
        if now_ns < self.next_report_ns {
            return false;
        }
        self.next_report_ns = now_ns.saturating_add(self.interval_ns);
        true
    }

    /// Called every collector tick: the held counts for the seconds scale
    /// of the trends (from the event stream, no /proc read).
    pub fn sample(&mut self, now_ns: u64) {
        self.watch.sample_fast(now_ns);
    }

    /// Samples fds and limits, judges every process, labels the reports;
    /// reads the fd kinds of the processes whose fds rise for reasons
    /// other than TCP.
    pub fn report(&mut self, now_ns: u64, lost_events: u64) -> Snapshot {
        let samples = sample(&self.watch.pids_to_sample());
        let mut snapshot = self.watch.tick(now_ns, &samples, lost_events);
        for process in &mut snapshot.processes {
            process.labels = self.scope.labels(process.pid).clone();
        }
        for &pid in &snapshot.fd_kinds_wanted {
            if !self.watch.fd_kinds_due(pid, now_ns) {
                continue;
            }
            match procfs::fd_kinds(pid) {
                Ok(kinds) => self.watch.record_fd_kinds(pid, kinds, now_ns),
                Err(e) if procfs::is_vanished(&e) => {}
                Err(e) => log::debug!("reading the fd kinds of pid {pid}: {e}"),
            }
        }
        snapshot
    }

    pub fn container_stopped(&mut self) {
        self.scope.widen_to_host();
    }
}

/// Wall-clock time in seconds since the Unix epoch, for report lines.
pub fn unix_now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

pub struct WatchSink<W: Write> {
    feed: WatchFeed,
    out: W,
    display: Display,
    once: bool,
    reported: bool,
}

impl<W: Write> WatchSink<W> {
    pub fn new(feed: WatchFeed, out: W, display: Display, once: bool) -> Self {
        Self {
            feed,
            out,
            display,
            once,
            reported: false,
        }
    }

    fn report(&mut self, now_ns: u64, lost_events: u64) -> io::Result<()> {
        let snapshot = self.feed.report(now_ns, lost_events);
        let ts = unix_now_s();
        match self.display {
            Display::Json => {
                let lines = render::json_lines(&snapshot, ts).map_err(io::Error::other)?;
                self.out.write_all(lines.as_bytes())?;
            }
            Display::Terminal => {
                let (width, height) = terminal_size();
                let style = TableStyle {
                    width,
                    max_rows: height.saturating_sub(10).max(5),
                    color: true,
                };
                // Home and clear, then redraw: a live view like top.
                write!(
                    self.out,
                    "\x1b[H\x1b[2J{}",
                    render::table(&snapshot, &style)
                )?;
            }
        }
        self.out.flush()
    }
}

/// fd counts and RLIMIT_NOFILE of each process, read once per report.
fn sample(pids: &[u32]) -> HashMap<u32, ProcSample> {
    pids.iter()
        .filter_map(|&pid| {
            let fds = procfs::fd_count(pid).ok()?;
            let (soft_limit, hard_limit) = procfs::nofile_limits(pid).ok()?;
            Some((
                pid,
                ProcSample {
                    fds,
                    soft_limit,
                    hard_limit,
                },
            ))
        })
        .collect()
}

fn terminal_size() -> (usize, usize) {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ fills the winsize we own; on failure it stays zero.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    if ok && size.ws_col > 0 {
        (usize::from(size.ws_col), usize::from(size.ws_row))
    } else {
        (120, 40)
    }
}

impl<W: Write> Sink for WatchSink<W> {
    fn output(&mut self, output: &Output) -> io::Result<()> {
        self.feed.output(output);
        Ok(())
    }

    fn tick(&mut self, now_ns: u64, counters: &dyn Fn() -> Counters) -> io::Result<()> {
        self.feed.sample(now_ns);
        if (self.once && self.reported) || !self.feed.due(now_ns) {
            return Ok(());
        }
        self.report(now_ns, counters().lost())?;
        self.reported = true;
        Ok(())
    }

    fn finish(&mut self, counters: Counters) -> io::Result<()> {
        self.out.flush()?;
        report_losses(counters);
        Ok(())
    }

    fn container_stopped(&mut self) {
        self.feed.container_stopped();
    }

    fn done(&self) -> bool {
        self.once && self.reported
    }
}
