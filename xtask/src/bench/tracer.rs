//! The tracers under test: starting one, knowing when it is attached,
//! sampling it, and stopping it to read what it says about lost events.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::proc::{self, Memory};

/// How long a tracer may take to attach before the bench gives up.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a tracer may take to exit after SIGINT before it is killed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// socktrace says this on stderr once its programs are attached.
const SOCKTRACE_READY: &str = "socktrace: tracing";

/// One way of tracing the storm, as the report names it.
#[derive(Clone, Debug)]
pub struct Tracer {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub family: Family,
}

/// Whose conventions a tracer follows: how it says it is ready and how it
/// reports lost events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Socktrace,
    /// libbpf-tools: no ready line when stdout is not read, and
    /// "lost N events on CPU #C" on stderr.
    LibbpfTools,
    /// `socktrace-floor`, an empty program on the TCP state tracepoint: the
    /// floor, what the hook costs (attached as `attach`) before any tracer
    /// does anything with it.
    Floor {
        attach: &'static str,
    },
}

impl Tracer {
    pub fn socktrace(binary: &Path, args: &[&str]) -> Self {
        Self {
            name: format!("socktrace {}", args.join(" ")),
            program: binary.to_path_buf(),
            args: args.iter().map(|arg| arg.to_string()).collect(),
            family: Family::Socktrace,
        }
    }

    pub fn libbpf_tool(program: PathBuf, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            program,
            args: Vec::new(),
            family: Family::LibbpfTools,
        }
    }

    /// `attach`: "tp_btf" or "tracepoint".
    pub fn floor(binary: PathBuf, attach: &'static str) -> Self {
        Self {
            name: format!("socktrace-floor --attach {attach}"),
            program: binary,
            args: vec!["--attach".to_owned(), attach.to_owned()],
            family: Family::Floor { attach },
        }
    }

    /// The same tracer with more arguments.
    pub fn with_args(&self, args: &[&str]) -> Self {
        let mut tracer = self.clone();
        tracer.args.extend(args.iter().map(|arg| arg.to_string()));
        tracer.name = format!("{} {}", tracer.name, args.join(" "));
        tracer
    }
}

/// Where a tracer's stdout goes.
pub enum Output {
    /// /dev/null, as in every throughput run.
    Discard,
    /// Read by the bench, which notes when `lines` lines containing `marker`
    /// have arrived (any line if `marker` is empty).
    Watch { marker: &'static str, lines: u64 },
    /// Read, and the lines `keep` wants are kept (a long run prints
    /// millions): [`Running::take_kept`].
    Keep(fn(&str) -> bool),
}

pub struct Running {
    pub name: String,
    child: Child,
    family: Family,
    started: Instant,
    /// From start until the tracer was attached.
    pub attach_time: Duration,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_reader: Option<JoinHandle<()>>,
    report: Option<mpsc::Receiver<Instant>>,
    kept: Arc<Mutex<Vec<String>>>,
    stdout_reader: Option<JoinHandle<()>>,
}

/// What a tracer said when it stopped.
#[derive(Clone, Debug, Default)]
pub struct Finished {
    /// Events the tracer reported as lost, if it reports them.
    pub lost_events: Option<u64>,
    /// socktrace only: sockets it could not track (socket map full).
    pub untracked_sockets: u64,
    /// socktrace only: the probe runs the kernel skipped, as it counts them
    /// (the runs its partner programs made up for do not count).
    pub skipped_runs: Option<u64>,
    /// socktrace only: events it could not decode.
    pub undecodable: u64,
    /// socktrace only: sockets whose end it never saw.
    pub ends_unseen: u64,
    /// It exited with status 0 when asked to stop.
    pub exited_cleanly: bool,
}

impl Finished {
    /// Everything the tracer said it lost, of every kind but one: ends
    /// never seen, the README's known problem, are reported beside it and
    /// not failed on (the kernel programs see no event of those sockets
    /// after FIN_WAIT1, in every socktrace at once).
    pub fn all_lost(&self) -> u64 {
        self.lost_events.unwrap_or(0)
            + self.untracked_sockets
            + self.skipped_runs.unwrap_or(0)
            + self.undecodable
    }
}

impl Running {
    pub fn start(tracer: &Tracer, output: Output) -> anyhow::Result<Self> {
        let mut command = Command::new(&tracer.program);
        command
            .args(&tracer.args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        match output {
            Output::Discard => {
                let null = File::create("/dev/null").context("opening /dev/null")?;
                command.stdout(null);
            }
            Output::Watch { .. } | Output::Keep(_) => {
                command.stdout(Stdio::piped());
            }
        }
        let started = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", tracer.program.display()))?;

        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let pipe = child
            .stderr
            .take()
            .context("the tracer's stderr is not piped")?;
        let stderr_reader = {
            let stderr = stderr.clone();
            thread::spawn(move || collect_lines(pipe, &stderr, ready_tx))
        };
        let kept = Arc::new(Mutex::new(Vec::new()));
        let (report, stdout_reader) = match (output, child.stdout.take()) {
            (Output::Watch { marker, lines }, Some(pipe)) => {
                let (report_tx, report_rx) = mpsc::channel();
                let reader = thread::spawn(move || count_lines(pipe, marker, lines, report_tx));
                (Some(report_rx), Some(reader))
            }
            (Output::Keep(keep), Some(pipe)) => {
                let kept = kept.clone();
                (
                    None,
                    Some(thread::spawn(move || keep_lines(pipe, keep, &kept))),
                )
            }
            _ => (None, None),
        };

        let mut running = Self {
            name: tracer.name.clone(),
            child,
            family: tracer.family,
            started,
            attach_time: Duration::ZERO,
            stderr,
            stderr_reader: Some(stderr_reader),
            report,
            kept,
            stdout_reader,
        };
        match running.wait_until_attached(&ready_rx) {
            Ok(()) => {
                running.attach_time = started.elapsed();
                Ok(running)
            }
            Err(err) => {
                // Stopped only to collect everything it said.
                let _ = running.stop();
                Err(err.context(format!(
                    "{} did not start; it said: {}",
                    tracer.name,
                    running.stderr_text()
                )))
            }
        }
    }

    fn wait_until_attached(&mut self, ready: &mpsc::Receiver<String>) -> anyhow::Result<()> {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().context("checking on the tracer")? {
                bail!("it exited ({status})");
            }
            match self.family {
                Family::Socktrace => {
                    if let Ok(line) = ready.recv_timeout(Duration::from_millis(20))
                        && line.starts_with(SOCKTRACE_READY)
                    {
                        return Ok(());
                    }
                }
                Family::LibbpfTools | Family::Floor { .. } => {
                    if proc::has_attached_bpf(self.pid()) {
                        // Attached; give it a moment to open its perf buffer.
                        thread::sleep(Duration::from_millis(200));
                        return Ok(());
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
        bail!("not attached after {} s", ATTACH_TIMEOUT.as_secs())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        proc::run_time_seconds(self.pid())
    }

    pub fn memory(&self) -> anyhow::Result<Memory> {
        Memory::read(self.pid())
    }

    /// Waits up to `timeout` for the first complete report on stdout
    /// (see [`Output::Watch`]); returns the time from start, or None.
    pub fn first_report(&self, timeout: Duration) -> Option<Duration> {
        let at = self.report.as_ref()?.recv_timeout(timeout).ok()?;
        Some(at - self.started)
    }

    /// The lines kept from stdout so far (see [`Output::Keep`]); after
    /// [`Running::stop`], all of them.
    pub fn take_kept(&self) -> Vec<String> {
        self.kept
            .lock()
            .map(|mut lines| std::mem::take(&mut *lines))
            .unwrap_or_default()
    }

    /// SIGINT, as Ctrl-C would; SIGKILL if it does not exit in time.
    pub fn stop(&mut self) -> anyhow::Result<Finished> {
        if self.child.try_wait()?.is_none() {
            // SAFETY: kill has no memory effects; the pid is our own child,
            // not yet reaped, so it cannot name another process.
            unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGINT) };
            let deadline = Instant::now() + EXIT_TIMEOUT;
            while self.child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    self.child.kill().context("killing the tracer")?;
                    self.child.wait().context("reaping the tracer")?;
                    bail!(
                        "{} did not exit within {} s of SIGINT",
                        self.name,
                        EXIT_TIMEOUT.as_secs()
                    );
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        let exited_cleanly = self
            .child
            .try_wait()?
            .is_some_and(|status| status.success());
        // Both pipes reach end of file now that the tracer is gone.
        for reader in [self.stderr_reader.take(), self.stdout_reader.take()]
            .into_iter()
            .flatten()
        {
            if reader.join().is_err() {
                bail!("a thread reading {}'s output panicked", self.name);
            }
        }
        let lines = self
            .stderr
            .lock()
            .map(|lines| lines.clone())
            .unwrap_or_default();
        Ok(match self.family {
            Family::Socktrace => Finished {
                lost_events: Some(socktrace_count(&lines, "events lost")),
                untracked_sockets: socktrace_count(&lines, "sockets untracked"),
                skipped_runs: Some(socktrace_count(&lines, "probe runs skipped")),
                undecodable: socktrace_count(&lines, "events could not be decoded"),
                ends_unseen: socktrace_count(&lines, "sockets ended unseen"),
                exited_cleanly,
            },
            Family::LibbpfTools => Finished {
                lost_events: Some(libbpf_tools_lost(&lines)),
                exited_cleanly,
                ..Finished::default()
            },
            // Its program sends nothing, so nothing can be lost.
            Family::Floor { .. } => Finished {
                lost_events: Some(0),
                exited_cleanly,
                ..Finished::default()
            },
        })
    }

    pub fn stderr_text(&self) -> String {
        running_stderr(&self.stderr)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A tracer left behind by an error would keep tracing the next runs.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn running_stderr(stderr: &Mutex<Vec<String>>) -> String {
    stderr
        .lock()
        .map(|lines| lines.join("\n"))
        .unwrap_or_default()
}

fn collect_lines(pipe: impl Read, into: &Mutex<Vec<String>>, ready: mpsc::Sender<String>) {
    for line in BufReader::new(pipe).lines() {
        let Ok(line) = line else { break };
        // Nobody listens any more once the tracer is attached.
        let _ = ready.send(line.clone());
        if let Ok(mut lines) = into.lock() {
            lines.push(line);
        }
    }
}

fn keep_lines(pipe: impl Read, keep: fn(&str) -> bool, into: &Mutex<Vec<String>>) {
    for line in BufReader::new(pipe).lines().map_while(Result::ok) {
        if keep(&line)
            && let Ok(mut lines) = into.lock()
        {
            lines.push(line);
        }
    }
}

/// Counts stdout lines holding `marker` and sends the time the `wanted`-th
/// arrived; reads on to the end so that the tracer never blocks on the pipe.
fn count_lines(pipe: impl Read, marker: &str, wanted: u64, done: mpsc::Sender<Instant>) {
    let mut seen = 0;
    let mut reader = BufReader::with_capacity(1 << 20, pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if seen < wanted && contains(&line, marker.as_bytes()) {
            seen += 1;
            if seen == wanted {
                let _ = done.send(Instant::now());
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

/// socktrace ends with lines like "socktrace: 12 events lost (ring buffer
/// full); ..." and says nothing when the count is zero.
fn socktrace_count(lines: &[String], what: &str) -> u64 {
    lines
        .iter()
        .filter_map(|line| line.strip_prefix("socktrace: "))
        .filter_map(|rest| rest.split_once(' '))
        .filter(|(_, after)| after.starts_with(what))
        .filter_map(|(count, _)| count.parse::<u64>().ok())
        .sum()
}

/// libbpf-tools print "lost N events on CPU #C" per perf buffer loss.
fn libbpf_tools_lost(lines: &[String]) -> u64 {
    lines
        .iter()
        .filter_map(|line| line.strip_prefix("lost "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|count| count.parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_socktrace_loss_lines() {
        let lines = [
            "socktrace: tracing TCP sockets (tracepoint mode); Ctrl-C to stop".to_owned(),
            "socktrace: 1234 events lost (ring buffer full); raise --ring-buffer-kib".to_owned(),
            "socktrace: 7 sockets untracked (socket map full); raise --max-sockets".to_owned(),
        ];
        assert_eq!(socktrace_count(&lines, "events lost"), 1234);
        assert_eq!(socktrace_count(&lines, "sockets untracked"), 7);
        assert_eq!(socktrace_count(&lines[..1], "events lost"), 0);
    }

    #[test]
    fn sums_libbpf_tools_losses_over_cpus() {
        let lines = [
            "lost 10 events on CPU #0".to_owned(),
            "lost 5 events on CPU #1".to_owned(),
            "something else".to_owned(),
        ];
        assert_eq!(libbpf_tools_lost(&lines), 15);
    }

    #[test]
    fn finds_markers_in_lines() {
        assert!(contains(
            br#"{"existing":true,"sock":"1"}"#,
            br#""existing":true"#
        ));
        assert!(!contains(br#"{"existing":false}"#, br#""existing":true"#));
        assert!(contains(b"anything", b""));
    }
}
