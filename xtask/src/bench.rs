//! `cargo xtask bench`: socktrace against no tracer and against its peers,
//! under a loopback storm of short TCP connections from our own load
//! generator. Writes `docs/benchmarks.md`.
//!
//! Phases, in this order so that each starts from a quiet machine:
//! 1. idle: socktrace's memory with nothing happening;
//! 2. held sockets: socktrace's memory with 100k sockets open, and its
//!    start-up time when they already exist;
//! 3. saturation: untraced and traced runs alternate (A/B pairs, tracers
//!    interleaved round by round) so that drift hits both sides of a pair;
//! 4. tiny ring buffer: losses are reported, not silent;
//! 5. neighbours: a long saturating storm with a second socktrace and
//!    tcpstates attached beside socktrace: does the kernel skip its runs?
//! 6. fixed rate (10k connections/s): each tracer's CPU per connection, and
//!    the kernel time in each of its BPF programs (`BPF_ENABLE_STATS`).
//!
//! Ratios, not absolute times, are what carry over to other machines.

mod held;
mod loadgen;
pub mod proc;
mod report;
pub mod tracer;

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use which::which;

use crate::{build, cmd, setup};
use loadgen::{Storm, StormShape};
use proc::{BpfStats, MachineCpu, Memory};
use tracer::{Output, Running, Tracer};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchOptions {
    #[command(subcommand)]
    tool: Option<Tool>,
    /// Untraced/traced pairs per tracer at saturation.
    #[arg(long, default_value_t = 5)]
    pairs: usize,
    /// Measured seconds of each saturation run.
    #[arg(long, default_value_t = 5.0, value_parser = seconds)]
    secs: f64,
    /// Seconds of load before each measurement starts.
    #[arg(long, default_value_t = 1.0, value_parser = seconds)]
    warmup_secs: f64,
    /// Connections per second of the fixed-rate runs.
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// Rounds of fixed-rate runs (one run per tracer each); the report
    /// gives each tracer's median run.
    #[arg(long, default_value_t = 5)]
    fixed_rounds: usize,
    /// Measured seconds of each fixed-rate run.
    #[arg(long, default_value_t = 8.0, value_parser = seconds)]
    fixed_secs: f64,
    /// Sockets held open for the memory and start-up measurements.
    #[arg(long, default_value_t = 100_000)]
    held_sockets: u64,
    /// Seconds of the storm with neighbours (0 leaves the phase out).
    #[arg(long, default_value_t = 60.0, value_parser = seconds)]
    neighbour_secs: f64,
    #[command(flatten)]
    shape: StormShape,
    /// Benchmark this socktrace binary instead of building one.
    #[arg(long, value_name = "PATH")]
    socktrace: Option<PathBuf>,
    /// Leave out the peers (tcpstates, tcplife).
    #[arg(long)]
    no_peers: bool,
    /// Where to write the report, relative to the workspace root.
    #[arg(long, default_value = "docs/benchmarks.md")]
    report: PathBuf,
}

#[derive(Subcommand)]
enum Tool {
    /// Run the load generator alone and print connections per second.
    Loadgen(loadgen::LoadgenOptions),
    /// Hold loopback sockets open until stdin closes (the bench's helper).
    #[command(hide = true)]
    Hold(held::HoldOptions),
}

pub fn run(options: &BenchOptions) -> anyhow::Result<()> {
    match &options.tool {
        Some(Tool::Loadgen(loadgen)) => loadgen::run(loadgen),
        Some(Tool::Hold(hold)) => held::hold(hold),
        None => bench(options),
    }
}

/// Timing of one storm run.
#[derive(Clone, Copy)]
struct Window {
    warmup: Duration,
    measured: Duration,
}

/// One storm run, measured over its window.
#[derive(Clone, Debug)]
pub struct StormRun {
    pub connections: u64,
    pub failed: u64,
    pub secs: f64,
    /// Share of the machine's CPU that was busy.
    pub machine_busy: f64,
    /// Share of the machine's CPU used by anything but the storm and the
    /// tracer (other processes, the hypervisor's steal): other load that
    /// blurs the comparison.
    pub foreign_share: f64,
    /// Other processes with attached BPF programs at the end of the window:
    /// their programs slow the storm down too.
    pub other_tracers: usize,
    /// CPU time of the storm's threads and of ksoftirqd (with tick-based
    /// accounting, softirq work is charged to the task it interrupts, on
    /// loopback mostly the storm itself).
    pub storm_cpu_secs: f64,
    pub tracer: Option<TracerSample>,
}

impl StormRun {
    pub fn rate(&self) -> f64 {
        self.connections as f64 / self.secs
    }

    /// CPU time per connection, storm and tracer together, in µs. Other load
    /// on the machine moves it less than the rate.
    pub fn cost_us(&self) -> f64 {
        let tracer = self.tracer.as_ref().map_or(0.0, |t| t.cpu_secs);
        (self.storm_cpu_secs + tracer) / self.connections.max(1) as f64 * 1e6
    }

    /// The tracer's CPU in cores; 0 for an untraced run.
    pub fn tracer_cores(&self) -> f64 {
        self.tracer.as_ref().map_or(0.0, |t| t.cpu_secs / self.secs)
    }

    /// The storm's own CPU per connection in µs, BPF programs included.
    pub fn storm_us_per_conn(&self) -> f64 {
        self.storm_cpu_secs / self.connections.max(1) as f64 * 1e6
    }
}

/// The run whose tracer CPU is the median (by rate for untraced runs).
pub fn median_run(runs: &[StormRun]) -> Option<&StormRun> {
    let mut sorted: Vec<&StormRun> = runs.iter().collect();
    sorted.sort_by(|a, b| {
        (a.tracer_cores().total_cmp(&b.tracer_cores())).then(a.rate().total_cmp(&b.rate()))
    });
    sorted.get(sorted.len() / 2).copied()
}

/// A tracer's (untraced, traced) runs at saturation.
pub type Pairs = Vec<(StormRun, StormRun)>;

/// What a tracer cost during a run.
#[derive(Clone, Debug)]
pub struct TracerSample {
    pub cpu_secs: f64,
    pub memory: Memory,
    pub lost_events: Option<u64>,
    pub untracked_sockets: u64,
    /// Its BPF programs over the measured window (run time only when bpf
    /// stats were on).
    pub bpf: Option<BpfStats>,
    /// Runs of its programs the kernel skipped, over the whole run: as
    /// socktrace counts them (less those its partner programs made up
    /// for), from `recursion_misses` for the others.
    pub missed_runs: u64,
    /// socktrace only: sockets whose end it never saw (the README's known
    /// problem; reported, not failed on).
    pub ends_unseen: u64,
}

/// Everything the report shows.
pub struct Results {
    pub machine: report::Machine,
    pub settings: report::Settings,
    /// The socktrace command compared with the peers.
    pub socktrace: Tracer,
    pub idle: Option<Idle>,
    pub held: Option<Held>,
    /// Per tracer, the (untraced, traced) pairs.
    pub saturation: Vec<(Tracer, Pairs)>,
    pub tiny_ring: Option<(Tracer, StormRun)>,
    /// socktrace's run beside its neighbours, and who they were.
    pub neighbours: Option<(StormRun, Vec<String>)>,
    /// The untraced runs first, then each tracer's; one run per round.
    pub fixed_rate: Vec<(Option<Tracer>, Vec<StormRun>)>,
    /// Tracers that could not be measured, and why.
    pub skipped: Vec<String>,
}

pub struct Idle {
    pub memory: Memory,
    pub attach_time: Duration,
    /// Cores used while nothing happens.
    pub cores: f64,
}

pub struct Held {
    pub sockets: u64,
    /// Processes holding them.
    pub helpers: usize,
    /// socktrace running while the sockets were opened.
    pub opened_while_tracing: Memory,
    /// Cores used afterwards, while they stay open and quiet.
    pub quiet_cores: f64,
    pub untracked_while_tracing: u64,
    /// Events lost while they were opened: reported, and skipped by the kernel.
    pub lost_while_tracing: (Option<u64>, u64),
    /// socktrace started after they were open.
    pub attach_time: Duration,
    pub first_report: Option<Duration>,
    pub existing_at_start: Memory,
}

/// A number of seconds for a bench option: a week at most, so that it
/// always makes a `Duration`.
pub fn seconds(arg: &str) -> Result<f64, String> {
    const WEEK: f64 = 7.0 * 24.0 * 3600.0;
    match arg.parse::<f64>() {
        Ok(secs) if (0.0..=WEEK).contains(&secs) => Ok(secs),
        Ok(_) => Err(format!("between 0 and {WEEK} seconds, please")),
        Err(e) => Err(e.to_string()),
    }
}

fn bench(options: &BenchOptions) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("the bench loads eBPF programs and raises limits: run `cargo xtask bench` as root");
    }
    if options.pairs == 0
        || options.secs <= 0.0
        || options.fixed_rounds == 0
        || options.fixed_secs <= 0.0
    {
        bail!("--pairs, --secs, --fixed-rounds and --fixed-secs must be positive");
    }
    let binary = match &options.socktrace {
        Some(path) => path.clone(),
        None => build_socktrace()?,
    };
    let lineup = Lineup::find(&binary, !options.no_peers)?;
    // connect() may reuse a loopback port in TIME_WAIT after a second; without
    // that the storm runs out of ports (see loadgen.rs).
    let _tw_reuse = SysctlGuard::ensure("net/ipv4/tcp_tw_reuse", &["1", "2"], "2")?;
    let window = Window {
        warmup: Duration::from_secs_f64(options.warmup_secs),
        measured: Duration::from_secs_f64(options.secs),
    };
    let background = background_check()?;
    let started = Instant::now();

    println!("== idle");
    let idle = measure_idle(&lineup.socktrace)?;
    println!("== {} held sockets", options.held_sockets);
    let held = measure_held(&lineup.socktrace, options.held_sockets)?;
    let saturation = saturation_phase(&lineup.tracers, options, window)?;
    println!("== tiny ring buffer");
    let tiny = lineup.socktrace.with_args(&["--ring-buffer-kib", "4"]);
    let tiny_ring = storm_run(Some(&tiny), &options.shape, None, window)?;
    println!("  {}{}", tiny.name, lost_note(&tiny_ring));
    let neighbours = neighbours_phase(&lineup, options)?;
    let fixed_rate = fixed_rate_phase(&lineup.tracers, options)?;

    let results = Results {
        machine: report::Machine::probe()?,
        settings: report::Settings {
            pairs: options.pairs,
            secs: options.secs,
            warmup_secs: options.warmup_secs,
            rate: options.rate,
            fixed_rounds: options.fixed_rounds,
            fixed_secs: options.fixed_secs,
            shape: options.shape.clone(),
            tw_reuse: proc::sysctl("net/ipv4/tcp_tw_reuse")?,
            socktrace_version: socktrace_version(&binary),
            total: started.elapsed(),
            background,
        },
        socktrace: lineup.socktrace,
        idle: Some(idle),
        held: Some(held),
        saturation,
        tiny_ring: Some((tiny, tiny_ring)),
        neighbours,
        fixed_rate,
        skipped: lineup.skipped,
    };
    let path = cmd::workspace_root()?.join(&options.report);
    report::write(&path, &results)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The tracers to compare: socktrace's main command first.
struct Lineup {
    socktrace: Tracer,
    tracers: Vec<Tracer>,
    /// Tracers that cannot be measured, and why.
    skipped: Vec<String>,
}

impl Lineup {
    fn find(binary: &Path, with_peers: bool) -> anyhow::Result<Self> {
        let commands = socktrace_commands(binary)?;
        let has = |name: &str| commands.iter().any(|c| c == name);
        // `watch --json` is the command meant to run all the time; until it
        // exists, `trace --json`, which does strictly more work per event.
        let main = if has("watch") { "watch" } else { "trace" };
        let socktrace = Tracer::socktrace(binary, &[main, "--json"]);
        let mut tracers = vec![socktrace.clone()];
        let mut skipped = Vec::new();
        // The same command on classic tracepoints with the hash map, the
        // fallback of older kernels, where this one chooses BTF tracepoints.
        let help = cmd::output(Command::new(binary).args([main, "--help"])).unwrap_or_default();
        if help.contains("--attach") {
            tracers.push(socktrace.with_args(&["--attach", "tracepoint"]));
        }
        if has("serve") {
            // On a port of the kernel's choosing, never one already in use.
            tracers.push(Tracer::socktrace(
                binary,
                &["serve", "--listen", "127.0.0.1:0"],
            ));
        } else {
            skipped.push("`socktrace serve`: this build has no `serve` command".to_owned());
        }
        if with_peers {
            for name in ["tcpstates", "tcplife"] {
                match which(name) {
                    Ok(path) => tracers.push(Tracer::libbpf_tool(path, name)),
                    Err(_) => skipped.push(format!("{name}: not installed (Debian libbpf-tools)")),
                }
            }
            // The kernel side alone, each way: every program runs, but a
            // port filter that no connection passes keeps every record in
            // the kernel, so the collector has nothing to do.
            let kernel_sides: Vec<Tracer> = tracers
                .iter()
                .filter(|tracer| tracer.args.first().is_some_and(|command| command == main))
                .map(|tracer| tracer.with_args(&["--port", report::NO_CONNECTION_PORT]))
                .collect();
            tracers.extend(kernel_sides);
            let floor = binary.with_file_name("socktrace-floor");
            if floor.is_file() {
                for attach in ["tracepoint", "tp_btf"] {
                    tracers.push(Tracer::floor(floor.clone(), attach));
                }
            } else {
                skipped.push(format!("the floor: {} is missing", floor.display()));
            }
        }
        Ok(Self {
            socktrace,
            tracers,
            skipped,
        })
    }
}

/// Untraced/traced pairs, tracers interleaved round by round.
fn saturation_phase(
    tracers: &[Tracer],
    options: &BenchOptions,
    window: Window,
) -> anyhow::Result<Vec<(Tracer, Pairs)>> {
    println!(
        "== saturation: {} pairs x {} tracers, {:.0} s each",
        options.pairs,
        tracers.len(),
        options.secs
    );
    let mut saturation: Vec<(Tracer, Pairs)> =
        tracers.iter().map(|t| (t.clone(), Vec::new())).collect();
    for round in 1..=options.pairs {
        for (tracer, pairs) in &mut saturation {
            let base = storm_run(None, &options.shape, None, window)?;
            let traced = storm_run(Some(tracer), &options.shape, None, window)?;
            println!(
                "  round {round}: {:<28} {:>7.0}/s vs {:>7.0}/s untraced: {:.3}{} \
                 (other load {:.0} % / {:.0} %, other tracers {} / {})",
                tracer.name,
                traced.rate(),
                base.rate(),
                traced.rate() / base.rate(),
                lost_note(&traced),
                base.foreign_share * 100.0,
                traced.foreign_share * 100.0,
                base.other_tracers,
                traced.other_tracers,
            );
            pairs.push((base, traced));
        }
    }
    Ok(saturation)
}

/// A saturating storm of `--neighbour-secs` with a second socktrace and
/// tcpstates attached beside socktrace, as on hosts where several BPF
/// agents run side by side: how many of socktrace's runs the kernel skips.
fn neighbours_phase(
    lineup: &Lineup,
    options: &BenchOptions,
) -> anyhow::Result<Option<(StormRun, Vec<String>)>> {
    if options.neighbour_secs <= 0.0 {
        return Ok(None);
    }
    let mut neighbours = vec![lineup.socktrace.clone()];
    neighbours.extend(
        lineup
            .tracers
            .iter()
            .filter(|t| t.name == "tcpstates")
            .cloned(),
    );
    println!(
        "== neighbours: {:.0} s at saturation beside {}",
        options.neighbour_secs,
        neighbours
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(" and ")
    );
    let mut running = neighbours
        .iter()
        .map(|t| Running::start(t, Output::Discard))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let window = Window {
        warmup: Duration::from_secs_f64(options.warmup_secs),
        measured: Duration::from_secs_f64(options.neighbour_secs),
    };
    let run = storm_run(Some(&lineup.socktrace), &options.shape, None, window);
    for neighbour in &mut running {
        neighbour.stop()?;
    }
    let run = run?;
    println!(
        "  {:.0}/s, socktrace's runs skipped by the kernel: {}{}",
        run.rate(),
        run.tracer.as_ref().map_or(0, |t| t.missed_runs),
        lost_note(&run)
    );
    Ok(Some((
        run,
        neighbours.into_iter().map(|t| t.name).collect(),
    )))
}

/// At `--rate`, rounds of one run without a tracer and one per tracer, so
/// that drift in the machine's speed spreads over all of them.
fn fixed_rate_phase(
    tracers: &[Tracer],
    options: &BenchOptions,
) -> anyhow::Result<Vec<(Option<Tracer>, Vec<StormRun>)>> {
    println!("== fixed rate: {:.0} connections/s", options.rate);
    let window = Window {
        warmup: Duration::from_secs_f64(options.warmup_secs),
        measured: Duration::from_secs_f64(options.fixed_secs),
    };
    // Counts the time spent in each BPF program; only for these runs, as the
    // counting has a cost of its own.
    let _stats = proc::BpfRunTimeStats::enable()?;
    let lineup: Vec<Option<&Tracer>> = std::iter::once(None)
        .chain(tracers.iter().map(Some))
        .collect();
    let mut runs: Vec<Vec<StormRun>> = lineup.iter().map(|_| Vec::new()).collect();
    for round in 1..=options.fixed_rounds {
        for (tracer, runs) in lineup.iter().zip(&mut runs) {
            let run = storm_run(*tracer, &options.shape, Some(options.rate), window)?;
            println!(
                "  round {round}: {:<28} {:>7.0}/s, tracer CPU {}",
                tracer.map_or("no tracer", |t| t.name.as_str()),
                run.rate(),
                run.tracer.as_ref().map_or("-".to_owned(), |t| format!(
                    "{:.4} cores",
                    t.cpu_secs / run.secs
                ))
            );
            runs.push(run);
        }
    }
    Ok(lineup.into_iter().map(|t| t.cloned()).zip(runs).collect())
}

/// What else the machine was doing before the bench started.
fn background_check() -> anyhow::Result<report::Background> {
    let before = MachineCpu::read()?;
    thread::sleep(Duration::from_secs(2));
    let busy = MachineCpu::read()?.busy_since(&before);
    let tracers = proc::other_bpf_holders(None);
    if busy > 0.05 {
        println!(
            "warning: the machine is {:.0} % busy before the bench starts; \
             results will be noisy",
            busy * 100.0
        );
    }
    if !tracers.is_empty() {
        println!(
            "warning: other processes hold attached BPF programs and slow every run: {}",
            tracers.join(", ")
        );
    }
    if let Some(entries) = conntrack_entries().filter(|&n| n > 0) {
        println!(
            "warning: connection tracking holds {entries} entries: NAT or stateful \
             firewall rules (podman's bridge network adds some) track every loopback \
             connection, and once the table is full the storm stalls on dropped SYNs"
        );
    }
    Ok(report::Background { busy, tracers })
}

/// Entries in the kernel's connection-tracking table, when it is loaded.
fn conntrack_entries() -> Option<u64> {
    let count = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count").ok()?;
    count.trim().parse().ok()
}

fn lost_note(run: &StormRun) -> String {
    match run.tracer.as_ref().and_then(|t| t.lost_events) {
        Some(lost) if lost > 0 => format!(", {lost} events lost"),
        _ => String::new(),
    }
}

/// Builds the release binary, as `cargo xtask build` does.
fn build_socktrace() -> anyhow::Result<PathBuf> {
    setup::run(setup::Needs::Bench)?;
    build::socktrace(false, None)
}

/// The subcommands `socktrace --help` lists.
fn socktrace_commands(binary: &Path) -> anyhow::Result<Vec<String>> {
    let help = cmd::output(Command::new(binary).arg("--help"))
        .with_context(|| format!("`{} --help` failed", binary.display()))?;
    Ok(help
        .lines()
        .skip_while(|line| !line.starts_with("Commands:"))
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

fn socktrace_version(binary: &Path) -> String {
    let version = cmd::output(Command::new(binary).arg("--version"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| "socktrace (version unknown)".to_owned());
    let commit = cmd::output(Command::new("git").args(["rev-parse", "--short", "HEAD"]))
        .map(|c| c.trim().to_owned());
    let dirty = cmd::output(Command::new("git").args(["status", "--porcelain"]))
        .is_some_and(|status| !status.trim().is_empty());
    match commit {
        Some(commit) if dirty => format!("{version}, commit {commit} with local changes"),
        Some(commit) => format!("{version}, commit {commit}"),
        None => version,
    }
}

/// A snapshot of the counters a run compares at the ends of its window.
struct Snapshot {
    at: Instant,
    connections: u64,
    failed: u64,
    machine: MachineCpu,
    storm_cpu: f64,
    tracer_cpu: f64,
    bpf: Option<BpfStats>,
}

impl Snapshot {
    fn take(storm: &Storm, tracer: Option<&Running>) -> anyhow::Result<Self> {
        let progress = storm.progress();
        Ok(Self {
            at: Instant::now(),
            connections: progress.completed,
            failed: progress.failed,
            machine: MachineCpu::read()?,
            storm_cpu: proc::cpu_seconds(std::process::id())? + proc::ksoftirqd_cpu_seconds(),
            tracer_cpu: tracer.map(Running::cpu_seconds).transpose()?.unwrap_or(0.0),
            bpf: tracer.map(|t| BpfStats::read(t.pid())).transpose()?,
        })
    }
}

/// One storm run, traced or not. The tracer is attached before the load
/// starts and stopped after it ends, so that it sees whole connections.
fn storm_run(
    tracer: Option<&Tracer>,
    shape: &StormShape,
    rate: Option<f64>,
    window: Window,
) -> anyhow::Result<StormRun> {
    let mut running = tracer
        .map(|t| Running::start(t, Output::Discard))
        .transpose()?;
    let storm = Storm::start(shape, rate)?;
    thread::sleep(window.warmup);
    let before = Snapshot::take(&storm, running.as_ref())?;
    thread::sleep(window.measured);
    let after = Snapshot::take(&storm, running.as_ref())?;
    let other_tracers = proc::other_bpf_holders(running.as_ref().map(Running::pid)).len();
    storm.stop()?;

    let sample = match running.as_mut() {
        Some(running) => {
            let memory = running.memory()?;
            let whole_run = BpfStats::read(running.pid())?;
            // After the window, while the programs are loaded: the names
            // take a read of kallsyms.
            let bpf = after
                .bpf
                .clone()
                .zip(before.bpf.clone())
                .map(|(a, b)| a.since(&b).with_full_names());
            let finished = running.stop()?;
            Some(TracerSample {
                cpu_secs: after.tracer_cpu - before.tracer_cpu,
                memory,
                lost_events: finished.lost_events,
                untracked_sockets: finished.untracked_sockets,
                bpf,
                missed_runs: finished.skipped_runs.unwrap_or(whole_run.recursion_misses),
                ends_unseen: finished.ends_unseen,
            })
        }
        None => None,
    };
    // Lets the last connections finish closing before the next run.
    thread::sleep(Duration::from_millis(500));
    Ok(StormRun {
        connections: after.connections - before.connections,
        failed: after.failed - before.failed,
        secs: (after.at - before.at).as_secs_f64(),
        machine_busy: after.machine.busy_since(&before.machine),
        foreign_share: foreign_share(&before, &after),
        other_tracers,
        storm_cpu_secs: after.storm_cpu - before.storm_cpu,
        tracer: sample,
    })
}

fn foreign_share(before: &Snapshot, after: &Snapshot) -> f64 {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let window = (after.at - before.at).as_secs_f64() * cpus;
    let ours = (after.storm_cpu - before.storm_cpu) + (after.tracer_cpu - before.tracer_cpu);
    let busy = after.machine.busy_secs_since(&before.machine);
    if window > 0.0 {
        ((busy - ours) / window).clamp(0.0, 1.0)
    } else {
        0.0
    }
}

fn measure_idle(socktrace: &Tracer) -> anyhow::Result<Idle> {
    let mut running = Running::start(socktrace, Output::Discard)?;
    thread::sleep(Duration::from_secs(3));
    let memory = running.memory()?;
    let cores = quiet_cores(&running)?;
    running.stop()?;
    println!(
        "  attached in {:.0} ms, RSS {} KiB",
        running.attach_time.as_secs_f64() * 1e3,
        memory.rss_kib
    );
    Ok(Idle {
        memory,
        attach_time: running.attach_time,
        cores,
    })
}

/// How long a quiet collector's CPU use is measured: /proc counts it in
/// 10 ms ticks.
const QUIET: Duration = Duration::from_secs(10);

fn quiet_cores(running: &Running) -> anyhow::Result<f64> {
    let before = running.cpu_seconds()?;
    thread::sleep(QUIET);
    Ok((running.cpu_seconds()? - before) / QUIET.as_secs_f64())
}

/// How long socktrace gets to take in the held sockets before we look.
const SETTLE: Duration = Duration::from_secs(3);
/// How long we wait for the first report with the held sockets.
const FIRST_REPORT_TIMEOUT: Duration = Duration::from_secs(60);

fn measure_held(socktrace: &Tracer, sockets: u64) -> anyhow::Result<Held> {
    // socktrace running while they open: it tracks them from their events.
    let mut running = Running::start(socktrace, Output::Discard)?;
    let held = held::HeldSockets::open(sockets)?;
    thread::sleep(SETTLE);
    let opened_while_tracing = running.memory()?;
    let quiet_cores = quiet_cores(&running)?;
    let missed = BpfStats::read(running.pid())?.recursion_misses;
    let finished = running.stop()?;
    println!(
        "  opened while tracing: RSS {} KiB (peak {} KiB)",
        opened_while_tracing.rss_kib, opened_while_tracing.peak_kib
    );

    // Started after they exist: it finds them in the socket table and /proc.
    // `trace` lists each as one "existing" line; `watch` reports per tick.
    let output = if socktrace.args.first().is_some_and(|a| a == "trace") {
        Output::Watch {
            marker: r#""existing":true"#,
            lines: held.count,
        }
    } else {
        Output::Watch {
            marker: "",
            lines: 1,
        }
    };
    let mut running = Running::start(socktrace, output)?;
    let first_report = running.first_report(FIRST_REPORT_TIMEOUT);
    thread::sleep(SETTLE);
    let existing_at_start = running.memory()?;
    running.stop()?;
    let (count, helpers) = (held.count, held.helpers());
    held.close()?;
    println!(
        "  existing at start: attached in {:.0} ms, first report after {}, RSS {} KiB",
        running.attach_time.as_secs_f64() * 1e3,
        first_report.map_or("(none)".to_owned(), |d| format!(
            "{:.0} ms",
            d.as_secs_f64() * 1e3
        )),
        existing_at_start.rss_kib
    );
    Ok(Held {
        sockets: count,
        helpers,
        opened_while_tracing,
        quiet_cores,
        untracked_while_tracing: finished.untracked_sockets,
        lost_while_tracing: (finished.lost_events, missed),
        attach_time: running.attach_time,
        first_report,
        existing_at_start,
    })
}

/// Sets a sysctl for the bench and puts the old value back afterwards.
struct SysctlGuard {
    name: &'static str,
    previous: Option<String>,
}

impl SysctlGuard {
    fn set(name: &'static str, value: &str) -> anyhow::Result<Self> {
        let previous = proc::sysctl(name)?;
        proc::set_sysctl(name, value)?;
        Ok(Self {
            name,
            previous: Some(previous),
        })
    }

    /// Leaves the sysctl alone if it already has one of `good`.
    fn ensure(name: &'static str, good: &[&str], value: &str) -> anyhow::Result<Self> {
        let current = proc::sysctl(name)?;
        if good.contains(&current.as_str()) {
            return Ok(Self {
                name,
                previous: None,
            });
        }
        println!("setting {name} to {value} for the bench (was {current})");
        Self::set(name, value)
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if let Some(previous) = &self.previous
            && let Err(err) = proc::set_sysctl(self.name, previous)
        {
            eprintln!("xtask: could not restore {}: {err:#}", self.name);
        }
    }
}
