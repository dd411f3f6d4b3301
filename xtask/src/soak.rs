//! `cargo xtask soak --minutes N` (root): socktrace for a long run against a
//! churn of short-lived processes, checked against what the workload itself
//! recorded.
//!
//! A local server closes every connection 200 ms after accepting it (as the
//! incident's server did, sooner). Workers, thousands a minute, each open a
//! few connections to it and exit: most close theirs at once, one in five
//! leaks them into CLOSE_WAIT until it exits. Every twentieth worker is
//! given the pid of one that has exited (`ns_last_pid`), so pids are
//! reused while socktrace still remembers the old process. A steady leaker
//! keeps one connection more every two seconds through the warm-up, then
//! holds them all to the end: after the warm-up the load is the same from
//! start to end, so a cost that grows is socktrace's own.
//!
//! Two socktraces watch the server's port: `trace --json` (each worker's
//! connections must be attributed to it: at least 99.9 %) and `watch
//! --json` (alerts for the steady leaker only). Both must lose nothing,
//! and their RSS and CPU must stay flat (within 10 %) after the warm-up.
//! CPU times move in clock ticks and the host is shared, so the CPU rate
//! is compared with its standard error: it fails only when it is above
//! 10 % beyond doubt, and a run too short to tell says so.

use std::{
    collections::HashMap,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::Value;

use crate::{
    bench::{
        proc,
        tracer::{Finished, Output, Running, Tracer},
    },
    build, cmd,
};

/// The server hangs up this long after accepting.
const SERVER_CLOSE_AFTER: Duration = Duration::from_millis(200);
const WORKERS_PER_SECOND: u32 = 30;
const CONNECTIONS_PER_WORKER: u32 = 3;
/// A leaking worker holds its sockets this long, then exits.
const LEAKER_HOLD: Duration = Duration::from_millis(600);
const STEADY_EVERY: Duration = Duration::from_secs(2);
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const ATTRIBUTION_TARGET: f64 = 0.999;
const FLAT_WITHIN: f64 = 0.10;

#[derive(Args)]
pub struct SoakOptions {
    /// Length of the run in minutes (docs/soak.md's figures come from 30).
    #[arg(long, default_value_t = 30)]
    minutes: u32,
    /// Also write the report (Markdown) to this file.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

/// `xtask soak-worker`: one process of the churn (hidden; the soak runs
/// it).
#[derive(Args)]
pub struct WorkerOptions {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value_t = CONNECTIONS_PER_WORKER)]
    connections: u32,
    /// Keep the sockets until exit (after the hold) instead of closing them.
    #[arg(long)]
    leak: bool,
    /// Connect every STEADY_EVERY until `connections` are held, never
    /// closing, then hold them until killed.
    #[arg(long)]
    steady: bool,
    /// The process name to take (PR_SET_NAME): each worker's is its own,
    /// so a socket shown with the name of a process that had the pid
    /// before is caught.
    #[arg(long)]
    name: String,
}

/// One connection, as its process recorded it (a line on its stdout).
#[derive(Clone, Copy, Debug)]
struct Truth {
    pid: u32,
    name: [u8; 15],
    local_port: u16,
    unix_ns: u128,
}

pub fn worker(options: &WorkerOptions) -> anyhow::Result<()> {
    let pid = std::process::id();
    let name = std::ffi::CString::new(options.name.as_str()).context("a worker name")?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes (the kernel truncates longer ones); `name` outlives the call.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    let name = &options.name;
    let mut out = std::io::stdout().lock();
    let mut held = Vec::new();
    let mut connect = |held: &mut Vec<TcpStream>| -> anyhow::Result<()> {
        let stream = TcpStream::connect(("127.0.0.1", options.port))?;
        let unix_ns = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let local_port = stream.local_addr()?.port();
        writeln!(out, "{pid} {name} {local_port} {unix_ns}")?;
        out.flush()?;
        held.push(stream);
        Ok(())
    };
    for _ in 0..options.connections {
        connect(&mut held)?;
        if options.steady {
            thread::sleep(STEADY_EVERY);
        } else if !options.leak {
            held.clear();
        }
    }
    if options.steady {
        loop {
            thread::park();
        }
    }
    if options.leak {
        thread::sleep(LEAKER_HOLD);
    }
    Ok(())
}

pub fn run(options: &SoakOptions) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("the soak loads socktrace's eBPF programs: run it as root");
    }
    let socktrace = build::socktrace(false, None)?;
    let port = start_server()?;
    let port_arg = port.to_string();
    // Only the lines the checks read are kept: a long run prints millions.
    let trace = Running::start(
        &Tracer::socktrace(&socktrace, &["trace", "--json", "--port", &port_arg]),
        Output::Keep(|line| line.contains(r#""old":"SYN_SENT","#)),
    )?;
    let watch_args = [
        "watch",
        "--json",
        "--port",
        &port_arg,
        "--interval",
        "5",
        "--close-wait-age",
        "30s",
    ];
    let watch = Running::start(
        &Tracer::socktrace(&socktrace, &watch_args),
        Output::Keep(|line| line.contains(r#""type":"alert""#)),
    )?;
    let worker_exe = std::env::current_exe().context("finding the xtask binary")?;
    let worker = |extra: &[&str]| {
        let mut command = Command::new(&worker_exe);
        command
            .args(["soak-worker", "--port", &port_arg])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        command
    };
    let steady_connections =
        (warm_up(options.minutes).as_secs() / STEADY_EVERY.as_secs()).to_string();
    let steady_args = [
        "--steady",
        "--connections",
        &steady_connections,
        "--name",
        "soak-steady",
    ];
    let mut steady = worker(&steady_args)
        .spawn()
        .context("starting the steady leaker")?;
    let steady_pid = steady.id();
    let truth = Arc::new(Mutex::new(Vec::new()));
    let steady_reader = {
        let stdout = steady.stdout.take().context("the steady leaker's stdout")?;
        let truth = truth.clone();
        thread::spawn(move || collect_truth(stdout, &truth))
    };

    println!(
        "soak: {} minutes; {WORKERS_PER_SECOND} workers/s on port {port}; steady leaker pid {steady_pid}",
        options.minutes
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(u64::from(options.minutes) * 60);
    let mut samples = Vec::new();
    let mut next_sample = started;
    let mut running: Vec<Child> = Vec::new();
    let mut exited_pids: Vec<u32> = Vec::new();
    let mut pids_seen: HashMap<u32, u32> = HashMap::new();
    let mut spawned = 0u64;
    let mut leakers = 0u64;
    let interval = Duration::from_secs(1) / WORKERS_PER_SECOND;
    let mut next_spawn = started;
    while Instant::now() < deadline {
        if Instant::now() >= next_spawn {
            next_spawn += interval;
            if spawned % 20 == 19
                && let Some(&old) = exited_pids.last()
            {
                // Best effort: another process may take the pid first.
                let _ = fs::write("/proc/sys/kernel/ns_last_pid", (old - 1).to_string());
            }
            let leak = spawned.is_multiple_of(5);
            let name = format!("soak-{}", spawned % 100_000);
            let mut args = vec!["--name", &name];
            if leak {
                args.push("--leak");
            }
            let child = worker(&args).spawn().context("starting a worker")?;
            *pids_seen.entry(child.id()).or_default() += 1;
            leakers += u64::from(leak);
            spawned += 1;
            running.push(child);
        }
        reap(&mut running, &mut exited_pids, &truth)?;
        if Instant::now() >= next_sample {
            next_sample += SAMPLE_EVERY;
            samples.push(Sample::take(started, &trace, &watch)?);
        }
        thread::sleep(Duration::from_millis(2));
    }
    while !running.is_empty() {
        reap(&mut running, &mut exited_pids, &truth)?;
        thread::sleep(Duration::from_millis(10));
    }
    samples.push(Sample::take(started, &trace, &watch)?);
    let _ = steady.kill();
    let _ = steady.wait();
    let _ = steady_reader.join();
    // Let the last events through before stopping.
    thread::sleep(Duration::from_secs(2));
    let trace = stop(trace)?;
    let watch = stop(watch)?;

    let truth = truth.lock().map(|t| t.clone()).unwrap_or_default();
    let reused = pids_seen.values().filter(|&&n| n > 1).count();
    let report = Report {
        minutes: options.minutes,
        spawned,
        leakers,
        reused_pids: reused,
        connections: truth.len(),
        attribution: attribution(&truth, &trace.stdout, port),
        losses: [trace.finished, watch.finished],
        alerted: alerted_pids(&watch.stdout),
        steady_pid,
        samples,
    };
    let text = report.markdown();
    println!("{text}");
    if let Some(path) = &options.report {
        fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    report.verdict()
}

/// A server on a free loopback port that closes each connection
/// [`SERVER_CLOSE_AFTER`] after accepting it.
fn start_server() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the soak's server")?;
    let port = listener.local_addr()?.port();
    let (accepted, to_close) = mpsc::channel::<(Instant, TcpStream)>();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if accepted.send((Instant::now(), stream)).is_err() {
                return;
            }
        }
    });
    thread::spawn(move || {
        for (at, stream) in to_close {
            let close_at = at + SERVER_CLOSE_AFTER;
            if let Some(wait) = close_at.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            drop(stream);
        }
    });
    Ok(port)
}

fn reap(
    running: &mut Vec<Child>,
    exited: &mut Vec<u32>,
    truth: &Mutex<Vec<Truth>>,
) -> anyhow::Result<()> {
    let mut index = 0;
    while index < running.len() {
        if running[index].try_wait()?.is_some() {
            let mut child = running.swap_remove(index);
            if let Some(stdout) = child.stdout.take() {
                collect_truth(stdout, truth);
            }
            // Reaped already: this returns its status at once.
            child.wait()?;
            exited.push(child.id());
            if exited.len() > 1000 {
                exited.drain(..500);
            }
        } else {
            index += 1;
        }
    }
    Ok(())
}

fn collect_truth(stdout: impl std::io::Read, truth: &Mutex<Vec<Truth>>) {
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [pid, name, port, ns] = fields[..] else {
            continue;
        };
        if let (Ok(pid), Ok(local_port), Ok(unix_ns)) = (pid.parse(), port.parse(), ns.parse())
            && let Ok(mut truth) = truth.lock()
        {
            truth.push(Truth {
                pid,
                name: comm(name),
                local_port,
                unix_ns,
            });
        }
    }
}

/// A name as the kernel keeps it (15 bytes).
fn comm(name: &str) -> [u8; 15] {
    let mut comm = [0; 15];
    let len = name.len().min(15);
    comm[..len].copy_from_slice(&name.as_bytes()[..len]);
    comm
}

/// One socktrace of the soak, and what it said at the end.
struct Stopped {
    /// The stdout lines the soak kept.
    stdout: Vec<String>,
    finished: Finished,
}

/// Stops `socktrace` and takes what it kept; a socktrace that did not exit
/// cleanly fails the soak.
fn stop(mut socktrace: Running) -> anyhow::Result<Stopped> {
    let finished = socktrace.stop()?;
    if !finished.exited_cleanly {
        bail!("{} failed: {}", socktrace.name, socktrace.stderr_text());
    }
    Ok(Stopped {
        stdout: socktrace.take_kept(),
        finished,
    })
}

/// What the two socktraces use at one moment.
struct Sample {
    at_s: f64,
    trace_rss_kib: u64,
    trace_cpu_s: f64,
    watch_rss_kib: u64,
    watch_cpu_s: f64,
}

impl Sample {
    fn take(started: Instant, trace: &Running, watch: &Running) -> anyhow::Result<Self> {
        Ok(Self {
            at_s: started.elapsed().as_secs_f64(),
            trace_rss_kib: proc::Memory::read(trace.pid())?.rss_kib,
            trace_cpu_s: proc::cpu_seconds(trace.pid())?,
            watch_rss_kib: proc::Memory::read(watch.pid())?.rss_kib,
            watch_cpu_s: proc::cpu_seconds(watch.pid())?,
        })
    }
}

/// (attributed right, attributed wrong, not seen): each recorded
/// connection against `trace`'s SYN_SENT -> ESTABLISHED line for the same
/// local port closest in time (ports are reused over a long run); right
/// means the worker's pid and name.
fn attribution(truth: &[Truth], trace: &[String], port: u16) -> (usize, usize, usize) {
    let remote = format!("127.0.0.1:{port}");
    let mut by_port: HashMap<u16, Vec<(u128, u32, [u8; 15])>> = HashMap::new();
    for line in trace {
        let Ok(event) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if event["old"] != "SYN_SENT" || event["new"] != "ESTABLISHED" || event["remote"] != remote
        {
            continue;
        }
        let local_port = event["local"]
            .as_str()
            .and_then(|local| local.rsplit_once(':')?.1.parse().ok());
        let unix_ns = event["ts"]
            .as_str()
            .and_then(|ts| humantime::parse_rfc3339(ts).ok())
            .and_then(|ts| ts.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_nanos());
        let pid = event["pid"]
            .as_u64()
            .and_then(|pid| u32::try_from(pid).ok());
        let name = event["comm"].as_str().map(comm);
        if let (Some(local_port), Some(unix_ns), Some(pid), Some(name)) =
            (local_port, unix_ns, pid, name)
        {
            by_port
                .entry(local_port)
                .or_default()
                .push((unix_ns, pid, name));
        }
    }
    let (mut right, mut wrong, mut unseen) = (0, 0, 0);
    for t in truth {
        let closest = by_port.get(&t.local_port).and_then(|events| {
            events
                .iter()
                .min_by_key(|(ns, ..)| ns.abs_diff(t.unix_ns))
                .filter(|(ns, ..)| ns.abs_diff(t.unix_ns) < 2_000_000_000)
        });
        match closest {
            Some(&(_, pid, name)) if pid == t.pid && name == t.name => right += 1,
            Some(_) => wrong += 1,
            None => unseen += 1,
        }
    }
    (right, wrong, unseen)
}

/// The pids `watch` raised an alert for.
fn alerted_pids(watch: &[String]) -> Vec<u32> {
    let mut pids: Vec<u32> = watch
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["type"] == "alert" && line["state"] == "raised")
        .filter_map(|line| u32::try_from(line["pid"].as_u64()?).ok())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

struct Report {
    minutes: u32,
    spawned: u64,
    leakers: u64,
    reused_pids: usize,
    connections: usize,
    attribution: (usize, usize, usize),
    /// What `trace` and `watch` said they lost.
    losses: [Finished; 2],
    alerted: Vec<u32>,
    steady_pid: u32,
    samples: Vec<Sample>,
}

impl Report {
    fn losses_phrase(&self) -> String {
        let [trace, watch] = &self.losses;
        let pair = |what: &str, count: fn(&Finished) -> u64| {
            format!("{what} {} / {}", count(trace), count(watch))
        };
        [
            pair("events (ring buffer full)", |f| f.lost_events.unwrap_or(0)),
            pair("probe runs skipped", |f| f.skipped_runs.unwrap_or(0)),
            pair("sockets untracked", |f| f.untracked_sockets),
            pair("undecodable", |f| f.undecodable),
            pair("sockets ended unseen", |f| f.ends_unseen),
        ]
        .join(", ")
    }

    fn attributed_share(&self) -> f64 {
        let (right, wrong, unseen) = self.attribution;
        right as f64 / (right + wrong + unseen).max(1) as f64
    }

    /// The samples after the warm-up.
    fn settled(&self) -> &[Sample] {
        let warm_up = warm_up(self.minutes).as_secs_f64();
        let from = self
            .samples
            .iter()
            .position(|s| s.at_s >= warm_up)
            .unwrap_or(self.samples.len());
        &self.samples[from..]
    }

    /// Growth of RSS from the end of the warm-up to its highest after.
    fn rss_growth(&self, rss: fn(&Sample) -> u64) -> Option<f64> {
        let settled = self.settled();
        let peak = settled.iter().map(rss).max()?;
        Some(peak as f64 / rss(settled.first()?).max(1) as f64 - 1.0)
    }

    /// The CPU rate of each sampling interval after the warm-up, first half
    /// against second.
    fn cpu_change(&self, cpu: fn(&Sample) -> f64) -> Option<CpuChange> {
        let rates: Vec<f64> = self
            .settled()
            .windows(2)
            // The last sample, taken once the workers are gone, closes a
            // shorter, quieter interval.
            .filter(|pair| pair[1].at_s - pair[0].at_s >= SAMPLE_EVERY.as_secs_f64() / 2.0)
            .map(|pair| (cpu(&pair[1]) - cpu(&pair[0])) / (pair[1].at_s - pair[0].at_s))
            .collect();
        let (early, late) = rates.split_at(rates.len() / 2);
        CpuChange::between(early, late)
    }

    /// Each socktrace's RSS growth and CPU change, if there were samples
    /// enough after the warm-up.
    fn flatness(&self) -> [(&'static str, Option<(f64, CpuChange)>); 2] {
        let both = |rss, cpu| Some((self.rss_growth(rss)?, self.cpu_change(cpu)?));
        [
            ("trace", both(|s| s.trace_rss_kib, |s| s.trace_cpu_s)),
            ("watch", both(|s| s.watch_rss_kib, |s| s.watch_cpu_s)),
        ]
    }

    fn markdown(&self) -> String {
        let (right, wrong, unseen) = self.attribution;
        let mut text = format!(
            "## Soak ({} minutes)\n\n\
             - workers: {} ({} leaking), {} pids reused while the run went on; {} connections recorded by the workers\n\
             - attribution: {right} right, {wrong} wrong, {unseen} not seen: {:.3} % (target {:.1} %)\n\
             - lost, trace / watch: {}\n\
             - alerts raised for pids {:?}; the steady leaker is {}\n\n\
             | at | trace RSS | trace CPU | watch RSS | watch CPU |\n|---|---|---|---|---|\n",
            self.minutes,
            self.spawned,
            self.leakers,
            self.reused_pids,
            self.connections,
            self.attributed_share() * 100.0,
            ATTRIBUTION_TARGET * 100.0,
            self.losses_phrase(),
            self.alerted,
            self.steady_pid,
        );
        for s in &self.samples {
            text.push_str(&format!(
                "| {:.0} s | {:.1} MB | {:.2} s | {:.1} MB | {:.2} s |\n",
                s.at_s,
                s.trace_rss_kib as f64 / 1024.0,
                s.trace_cpu_s,
                s.watch_rss_kib as f64 / 1024.0,
                s.watch_cpu_s
            ));
        }
        for (name, flatness) in self.flatness() {
            if let Some((rss, cpu)) = flatness {
                text.push_str(&format!(
                    "\n{name} after the warm-up: RSS grew {:.1} %; CPU {:.4} -> {:.4} core, {:+.1} % ± {:.1} %: {}",
                    rss * 100.0,
                    cpu.early,
                    cpu.late,
                    cpu.growth * 100.0,
                    cpu.margin() * 100.0,
                    cpu.outcome().phrase(),
                ));
            }
        }
        text.push('\n');
        text
    }

    fn verdict(&self) -> anyhow::Result<()> {
        let mut failures = Vec::new();
        if self.attributed_share() < ATTRIBUTION_TARGET {
            failures.push(format!(
                "attribution {:.3} % is below {:.1} %",
                self.attributed_share() * 100.0,
                ATTRIBUTION_TARGET * 100.0
            ));
        }
        if self.losses.iter().any(|f| f.all_lost() > 0) {
            failures.push(format!("lost, trace / watch: {}", self.losses_phrase()));
        }
        if self.alerted != [self.steady_pid] {
            failures.push(format!(
                "alerts for {:?}, expected the steady leaker {} only",
                self.alerted, self.steady_pid
            ));
        }
        for (name, flatness) in self.flatness() {
            match flatness {
                Some((rss, cpu)) if rss > FLAT_WITHIN || cpu.outcome() == Outcome::Grew => failures
                    .push(format!(
                        "{name} is not flat: RSS +{:.1} %, CPU {:+.1} % ± {:.1} %",
                        rss * 100.0,
                        cpu.growth * 100.0,
                        cpu.margin() * 100.0
                    )),
                Some(_) => {}
                None => failures.push(format!("too few samples after the warm-up for {name}")),
            }
        }
        if self.reused_pids == 0 {
            failures.push("no pid was reused: the run did not test pid reuse".to_string());
        }
        if failures.is_empty() {
            Ok(())
        } else {
            bail!("the soak failed: {}", failures.join("; "))
        }
    }
}

/// The first fifth of the run, at least a minute: socktrace fills its
/// tables and the steady leaker reaches what it holds.
fn warm_up(minutes: u32) -> Duration {
    Duration::from_secs((u64::from(minutes) * 60 / 5).max(60))
}

/// A CPU rate (cores) early and late in the settled run.
#[derive(Clone, Copy, Debug)]
struct CpuChange {
    early: f64,
    late: f64,
    /// late / early - 1
    growth: f64,
    /// Of `growth`, from the spread of the rates within each half.
    standard_error: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    Flat,
    Grew,
    /// The interval (two standard errors either side) straddles the bound.
    TooShortToTell,
}

impl CpuChange {
    /// Needs two rates or more in each half.
    fn between(early: &[f64], late: &[f64]) -> Option<Self> {
        let (early_mean, early_se) = mean_and_standard_error(early)?;
        let (late_mean, late_se) = mean_and_standard_error(late)?;
        let base = early_mean.max(1e-6);
        let ratio = late_mean / base;
        Some(Self {
            early: early_mean,
            late: late_mean,
            growth: ratio - 1.0,
            // The ratio's error, to first order.
            standard_error: (late_se.powi(2) + (ratio * early_se).powi(2)).sqrt() / base,
        })
    }

    /// Two standard errors: the ± the report prints and the outcome uses.
    fn margin(&self) -> f64 {
        2.0 * self.standard_error
    }

    fn outcome(&self) -> Outcome {
        let margin = self.margin();
        if self.growth - margin > FLAT_WITHIN {
            Outcome::Grew
        } else if self.growth + margin <= FLAT_WITHIN {
            Outcome::Flat
        } else {
            Outcome::TooShortToTell
        }
    }
}

impl Outcome {
    fn phrase(self) -> String {
        let bound = FLAT_WITHIN * 100.0;
        match self {
            Outcome::Flat => format!("flat (within {bound:.0} %)"),
            Outcome::Grew => format!("grew by more than {bound:.0} %"),
            Outcome::TooShortToTell => {
                format!("too few samples to tell whether it is within {bound:.0} %")
            }
        }
    }
}

fn mean_and_standard_error(values: &[f64]) -> Option<(f64, f64)> {
    if values.len() < 2 {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Some((mean, (variance / n).sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_matched_by_port_and_time() {
        let truth = [
            Truth {
                pid: 10,
                name: comm("w10"),
                local_port: 40000,
                unix_ns: 1_700_000_000_000_000_000,
            },
            // The same port later, by another process (a reused port).
            Truth {
                pid: 11,
                name: comm("w11"),
                local_port: 40000,
                unix_ns: 1_700_000_060_000_000_000,
            },
            Truth {
                pid: 12,
                name: comm("w12"),
                local_port: 40001,
                unix_ns: 1_700_000_000_000_000_000,
            },
        ];
        let line = |pid: u32, port: u16, ts: &str| {
            format!(
                r#"{{"pid":{pid},"comm":"w{pid}","local":"127.0.0.1:{port}","remote":"127.0.0.1:9000","old":"SYN_SENT","new":"ESTABLISHED","ts":"{ts}"}}"#
            )
        };
        let trace = [
            line(10, 40000, "2023-11-14T22:13:20.000100Z"),
            line(11, 40000, "2023-11-14T22:14:20.000100Z"),
            // Wrongly attributed.
            line(99, 40001, "2023-11-14T22:13:20.000100Z"),
        ];
        assert_eq!(attribution(&truth, &trace, 9000), (2, 1, 0));
        assert_eq!(attribution(&truth, &trace[..1], 9000), (1, 0, 2));
    }

    #[test]
    fn a_cpu_rate_is_judged_against_its_noise() {
        let steady = [0.012, 0.013, 0.011, 0.012, 0.012, 0.013, 0.011, 0.012];
        let change = CpuChange::between(&steady, &steady).unwrap();
        assert_eq!(change.outcome(), Outcome::Flat);

        let higher: Vec<f64> = steady.iter().map(|rate| rate * 1.25).collect();
        let change = CpuChange::between(&steady, &higher).unwrap();
        assert!((change.growth - 0.25).abs() < 1e-9);
        assert_eq!(change.outcome(), Outcome::Grew);

        // Three noisy rates a half cannot tell +8 % from +20 %.
        let noisy = [0.010, 0.014, 0.012];
        let slightly_higher: Vec<f64> = noisy.iter().map(|rate| rate * 1.08).collect();
        let change = CpuChange::between(&noisy, &slightly_higher).unwrap();
        assert_eq!(change.outcome(), Outcome::TooShortToTell);

        assert!(CpuChange::between(&[0.01], &steady).is_none());
    }
}
