//! The bench's markdown report: targets with pass/miss and margins, then the
//! measurements behind them.
//!
//! Only the part between the markers is rewritten, so notes written below
//! it (why a target is missed, what would close it) survive a re-run.

use std::{
    fmt::{self, Write as _},
    fs,
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::Context as _;
use num_format::{Locale, ToFormattedString as _};

use super::{
    QUIET, Results, StormRun,
    loadgen::StormShape,
    median_run,
    tracer::{Family, Tracer},
};
use crate::cmd;

const BEGIN: &str = "<!-- bench:begin (written by `cargo xtask bench`; edit outside) -->";
const END: &str = "<!-- bench:end -->";

/// The targets of the performance issue.
const MIN_THROUGHPUT_RATIO: f64 = 0.95;
/// socktrace's throughput cost (1 − ratio) against the empty tp_btf
/// program's.
const MAX_COST_OVER_FLOOR: f64 = 1.5;
const MAX_CORES_AT_RATE: f64 = 0.010;
const MAX_IDLE_RSS_MB: f64 = 30.0;
const MAX_HELD_RSS_MB: f64 = 40.0;
const MAX_FIRST_REPORT: Duration = Duration::from_secs(1);

/// A pair is quiet when other load took less than this share of the machine
/// in both runs and no other BPF tracer was attached.
const QUIET_SHARE: f64 = 0.10;

pub struct Machine {
    pub cpus: usize,
    pub model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub date: String,
}

impl Machine {
    pub fn probe() -> anyhow::Result<Self> {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
        let model = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map_or("unknown".to_owned(), |(_, model)| model.trim().to_owned());
        let meminfo = fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Ok(Self {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            model,
            memory_gib: memory_kib / (1024.0 * 1024.0),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .context("reading the kernel release")?
                .trim()
                .to_owned(),
            date: cmd::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
                .map_or("unknown".to_owned(), |date| date.trim().to_owned()),
        })
    }
}

pub struct Settings {
    pub pairs: usize,
    pub secs: f64,
    pub warmup_secs: f64,
    pub rate: f64,
    pub fixed_rounds: usize,
    pub fixed_secs: f64,
    pub shape: StormShape,
    pub tw_reuse: String,
    pub socktrace_version: String,
    pub total: Duration,
    pub background: Background,
}

/// The machine before the bench started.
pub struct Background {
    /// Share of CPU busy over two seconds.
    pub busy: f64,
    /// Other processes with attached BPF programs ("pid comm").
    pub tracers: Vec<String>,
}

pub fn write(path: &Path, results: &Results) -> anyhow::Result<()> {
    let mut generated = String::new();
    render(&mut generated, results).context("formatting the report")?;
    let text = match fs::read_to_string(path) {
        Ok(old) => match (old.find(BEGIN), old.find(END)) {
            (Some(begin), Some(end)) if begin < end => {
                format!("{}{generated}{}", &old[..begin], &old[end + END.len()..])
            }
            _ => format!("{}\n\n{generated}\n", old.trim_end()),
        },
        Err(_) => format!("{HEADER}\n{generated}\n"),
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

const HEADER: &str = "# Benchmarks

Measured with `cargo xtask bench` (as root; about 7 minutes). It runs a
loopback storm of short TCP connections from its own load generator with no
tracer, with socktrace and with its peers, and compares them.
";

fn render(out: &mut String, r: &Results) -> fmt::Result {
    let saturation: Vec<Saturation> = r
        .saturation
        .iter()
        .map(|(tracer, pairs)| Saturation::of(tracer, pairs))
        .collect();
    writeln!(out, "{BEGIN}")?;
    header(out, r)?;
    targets(out, r, &saturation)?;
    saturation_table(out, r, &saturation)?;
    fixed_rate_table(out, r)?;
    memory_table(out, r)?;
    method(out, r)?;
    write!(out, "{END}")
}

/// Medians and totals of one tracer's saturation runs.
struct Saturation<'a> {
    tracer: &'a Tracer,
    runs: usize,
    /// Traced ÷ untraced connections/s within each pair.
    ratio: f64,
    ratio_min: f64,
    ratio_max: f64,
    /// The median ratio over quiet pairs only, and how many there were.
    quiet: Option<(f64, usize)>,
    base_rate: f64,
    traced_rate: f64,
    /// Untraced ÷ traced CPU per connection (storm + tracer) within each pair.
    cost_ratio: f64,
    /// CPU per untraced connection, and what tracing added within each pair, in µs.
    base_cost_us: f64,
    added_cost_us: f64,
    /// The tracer's own CPU.
    cores: Option<f64>,
    core_secs_per_1k: Option<f64>,
    peak_kib: Option<u64>,
    /// Lost events the tracer reported, if it reports them.
    lost: Option<u64>,
    /// Runs of its programs the kernel skipped (recursion): lost silently.
    missed: u64,
    runs_with_losses: usize,
    untracked_sockets: u64,
    failed: u64,
}

impl<'a> Saturation<'a> {
    fn of(tracer: &'a Tracer, pairs: &[(StormRun, StormRun)]) -> Self {
        let per_pair = |f: &dyn Fn(&StormRun, &StormRun) -> f64| -> Vec<f64> {
            pairs.iter().map(|(base, traced)| f(base, traced)).collect()
        };
        let ratios = per_pair(&|base, traced| traced.rate() / base.rate());
        let is_quiet = |run: &StormRun| run.foreign_share < QUIET_SHARE && run.other_tracers == 0;
        let quiet: Vec<f64> = pairs
            .iter()
            .filter(|(base, traced)| is_quiet(base) && is_quiet(traced))
            .map(|(base, traced)| traced.rate() / base.rate())
            .collect();
        let samples: Vec<_> = pairs
            .iter()
            .filter_map(|(_, traced)| Some((traced, traced.tracer.as_ref()?)))
            .collect();
        let losses: Vec<u64> = samples.iter().filter_map(|(_, s)| s.lost_events).collect();
        Self {
            tracer,
            runs: pairs.len(),
            ratio: median(&ratios),
            ratio_min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratio_max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            quiet: (!quiet.is_empty()).then(|| (median(&quiet), quiet.len())),
            base_rate: median(&per_pair(&|base, _| base.rate())),
            traced_rate: median(&per_pair(&|_, traced| traced.rate())),
            cost_ratio: median(&per_pair(&|base, traced| base.cost_us() / traced.cost_us())),
            base_cost_us: median(&per_pair(&|base, _| base.cost_us())),
            added_cost_us: median(&per_pair(&|base, traced| traced.cost_us() - base.cost_us())),
            cores: optional_median(samples.iter().map(|(run, s)| s.cpu_secs / run.secs)),
            core_secs_per_1k: optional_median(
                samples
                    .iter()
                    .map(|(run, s)| s.cpu_secs / (run.connections as f64 / 1e3)),
            ),
            peak_kib: samples.iter().map(|(_, s)| s.memory.peak_kib).max(),
            lost: (!losses.is_empty()).then(|| losses.iter().sum()),
            missed: samples.iter().map(|(_, s)| s.missed_runs).sum(),
            runs_with_losses: samples
                .iter()
                .filter(|(_, s)| s.lost_events.unwrap_or(0) + s.missed_runs > 0)
                .count(),
            untracked_sockets: samples.iter().map(|(_, s)| s.untracked_sockets).sum(),
            failed: pairs.iter().map(|(b, t)| b.failed + t.failed).sum(),
        }
    }
}

fn header(out: &mut String, r: &Results) -> fmt::Result {
    let (m, s) = (&r.machine, &r.settings);
    writeln!(out, "## Run of {}\n", m.date)?;
    writeln!(out, "| | |\n|---|---|")?;
    writeln!(
        out,
        "| machine | {} × {}, {:.0} GiB |",
        m.cpus, m.model, m.memory_gib
    )?;
    writeln!(out, "| kernel | Linux {} |", m.kernel)?;
    writeln!(out, "| socktrace | {} |", s.socktrace_version)?;
    writeln!(
        out,
        "| compared command | `{}`, stdout to /dev/null |",
        r.socktrace.name
    )?;
    writeln!(
        out,
        "| bench time | {:.1} min |",
        s.total.as_secs_f64() / 60.0
    )?;
    let others = if s.background.tracers.is_empty() {
        "none".to_owned()
    } else {
        s.background.tracers.join(", ")
    };
    writeln!(
        out,
        "| before the bench | machine {:.0} % busy; other BPF tracers: {others} |\n",
        s.background.busy * 100.0
    )
}

fn targets(out: &mut String, r: &Results, saturation: &[Saturation]) -> fmt::Result {
    writeln!(out, "### Targets\n")?;
    writeln!(out, "| target | measured | result |\n|---|---|---|")?;
    if let Some(st) = saturation
        .iter()
        .find(|x| x.tracer.name == r.socktrace.name)
    {
        let points = |ratio: f64| (ratio - MIN_THROUGHPUT_RATIO) * 100.0;
        writeln!(
            out,
            "| throughput with socktrace ≥ {MIN_THROUGHPUT_RATIO} × untraced, at saturation | {:.3} × \
             (quiet pairs only: {}) | {} |",
            st.ratio,
            st.quiet
                .map_or("none".into(), |(ratio, n)| format!("{ratio:.3} × over {n}")),
            verdict(
                points(st.ratio) >= 0.0,
                format!("{:.1} points", points(st.ratio).abs())
            )
        )?;
        writeln!(
            out,
            "| the same, from CPU per connection (storm + tracer; less sensitive to other load) | \
             {:.3} × ({:+.1} µs on {:.1} µs) | {} |",
            st.cost_ratio,
            st.added_cost_us,
            st.base_cost_us,
            verdict(
                points(st.cost_ratio) >= 0.0,
                format!("{:.1} points", points(st.cost_ratio).abs())
            )
        )?;
        if let Some(floor) = saturation
            .iter()
            .find(|x| x.tracer.family == (Family::Floor { attach: "tp_btf" }))
        {
            let (cost, floor_cost) = (1.0 - st.ratio, 1.0 - floor.ratio);
            let limit = MAX_COST_OVER_FLOOR * floor_cost.max(0.0);
            // An empty program within the noise of nothing has no ratio.
            let times = if floor_cost > 0.0 {
                format!("{:.2} ×", cost / floor_cost)
            } else {
                "the empty program's cost is not measurable".to_string()
            };
            writeln!(
                out,
                "| throughput cost ≤ {MAX_COST_OVER_FLOOR} × the empty tp_btf program's (cost = 1 − ratio) | \
                 socktrace {cost:.3}, the empty program {floor_cost:.3}: {times} | {} |",
                verdict(
                    cost <= limit,
                    format!("{:.1} points", (cost - limit).abs() * 100.0)
                )
            )?;
        }
        for peer in saturation
            .iter()
            .filter(|x| x.tracer.family == Family::LibbpfTools)
        {
            let ahead = (st.ratio - peer.ratio) * 100.0;
            writeln!(
                out,
                "| lower overhead than {name} | throughput: socktrace {:.3} ×, {name} {:.3} ×; \
                 CPU per connection: {:.3} ×, {:.3} × | {} |",
                st.ratio,
                peer.ratio,
                st.cost_ratio,
                peer.cost_ratio,
                verdict(ahead > 0.0, format!("{:.1} points", ahead.abs())),
                name = peer.tracer.name,
            )?;
        }
        if let Some(lost) = st.lost {
            let all = lost + st.missed;
            writeln!(
                out,
                "| zero lost events at saturation, default buffers | {lost} reported + {} skipped \
                 by the kernel, in {} of {} runs | {} |",
                st.missed,
                st.runs_with_losses,
                st.runs,
                if all == 0 {
                    "pass".to_owned()
                } else {
                    format!("**miss** by {all} events")
                }
            )?;
        }
    }
    if let Some((run, neighbours)) = &r.neighbours
        && let Some(sample) = &run.tracer
    {
        let lost = sample.lost_events.unwrap_or(0);
        // Ends never seen are the README's known problem: shown, not
        // failed on.
        let unseen = match sample.ends_unseen {
            0 => String::new(),
            n => format!("; {n} sockets ended unseen"),
        };
        writeln!(
            out,
            "| 0 probe runs skipped over a {:.0} s saturating storm beside {} | {} skipped, {lost} lost \
             ({} connections{unseen}) | {} |",
            run.secs,
            neighbours
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(" and "),
            sample.missed_runs,
            thousands(run.connections as f64),
            if sample.missed_runs + lost == 0 {
                "pass".to_owned()
            } else {
                format!("**miss** by {} events", sample.missed_runs + lost)
            }
        )?;
    }
    let fixed = r
        .fixed_rate
        .iter()
        .find(|(t, _)| t.as_ref().is_some_and(|t| t.name == r.socktrace.name))
        .and_then(|(_, runs)| median_run(runs));
    if let Some(run) = fixed {
        // Scaled to exactly the target rate, in case the storm fell short.
        let cores = run.tracer_cores() / run.rate().max(1.0) * r.settings.rate;
        writeln!(
            out,
            "| collector CPU ≤ {MAX_CORES_AT_RATE} core at {} connections/s | {cores:.4} core (median of {}) | {} |",
            thousands(r.settings.rate),
            r.settings.fixed_rounds,
            verdict(
                cores <= MAX_CORES_AT_RATE,
                format!(
                    "{:.4} core, {:.1} ×",
                    (cores - MAX_CORES_AT_RATE).abs(),
                    cores / MAX_CORES_AT_RATE
                )
            )
        )?;
    }
    if let Some(idle) = &r.idle {
        memory_target(out, "RSS idle", idle.memory.rss_kib, MAX_IDLE_RSS_MB)?;
    }
    if let Some(held) = &r.held {
        let n = thousands(held.sockets as f64);
        let worst = held
            .opened_while_tracing
            .rss_kib
            .max(held.existing_at_start.rss_kib);
        memory_target(
            out,
            &format!("RSS with {n} tracked sockets"),
            worst,
            MAX_HELD_RSS_MB,
        )?;
        let target = format!(
            "start to first report ≤ {} s with {n} existing sockets",
            MAX_FIRST_REPORT.as_secs()
        );
        match held.first_report {
            Some(first) => writeln!(
                out,
                "| {target} | {:.2} s | {} |",
                first.as_secs_f64(),
                verdict(
                    first <= MAX_FIRST_REPORT,
                    format!("{:.2} s", first.abs_diff(MAX_FIRST_REPORT).as_secs_f64())
                )
            )?,
            None => writeln!(
                out,
                "| {target} | no complete report within a minute | **miss** |"
            )?,
        }
    }
    writeln!(out)?;
    floor(out, saturation)?;
    kernel_side(out, saturation)
}

/// A port that no connection of the storm uses: with `--port` set to it,
/// socktrace's programs do all their work and send no record.
pub const NO_CONNECTION_PORT: &str = "1";

/// The arguments of a run of socktrace's kernel side alone, less the port
/// filter that makes it so; None for any other run.
fn kernel_side_of(tracer: &Tracer) -> Option<Vec<String>> {
    let at = tracer
        .args
        .windows(2)
        .position(|pair| pair[0] == "--port" && pair[1] == NO_CONNECTION_PORT)?;
    let mut args = tracer.args.clone();
    args.drain(at..at + 2);
    Some(args)
}

/// What socktrace's kernel side costs without the records and the
/// collector, beside the same command sending them: how its cost splits.
fn kernel_side(out: &mut String, saturation: &[Saturation]) -> fmt::Result {
    for alone in saturation {
        let Some(args) = kernel_side_of(alone.tracer) else {
            continue;
        };
        let whole = saturation
            .iter()
            .find(|x| x.tracer.family == Family::Socktrace && x.tracer.args == args);
        write!(
            out,
            "The kernel side alone: with `{}` (no connection uses that port, so every program \
             runs for every socket and no record leaves the kernel), the storm keeps {:.3} × its \
             untraced throughput ({:+.1} µs of CPU per connection, CPU ratio {:.3} ×)",
            alone.tracer.name, alone.ratio, alone.added_cost_us, alone.cost_ratio,
        )?;
        match whole {
            // Within one run of pairs, a smaller cost with more work is noise.
            Some(whole) if whole.ratio >= alone.ratio => writeln!(
                out,
                "; `{}`, sending them, {:.3} ×: the records and the collector cost less than \
                 the noise of the pairs.\n",
                whole.tracer.name, whole.ratio,
            )?,
            Some(whole) => writeln!(
                out,
                "; `{}`, sending them, {:.3} ×: the records and the collector take {:.1} points \
                 of the {:.1} its whole cost takes.\n",
                whole.tracer.name,
                whole.ratio,
                (alone.ratio - whole.ratio) * 100.0,
                (1.0 - whole.ratio) * 100.0,
            )?,
            None => writeln!(out, ".\n")?,
        }
    }
    Ok(())
}

/// What an empty program on the state tracepoint costs by itself, each way
/// it can be attached: no tracer that sees every state change can do better.
fn floor(out: &mut String, saturation: &[Saturation]) -> fmt::Result {
    for floor in saturation
        .iter()
        .filter(|x| matches!(x.tracer.family, Family::Floor { .. }))
    {
        let Family::Floor { attach } = floor.tracer.family else {
            continue;
        };
        writeln!(
            out,
            "The floor, {attach}: with only an empty BPF program on `sock:inet_sock_set_state` \
             (`{}`), the storm keeps {:.3} × its untraced throughput ({:+.1} µs of CPU per \
             connection, CPU ratio {:.3} ×).\n",
            floor.tracer.name, floor.ratio, floor.added_cost_us, floor.cost_ratio,
        )?;
    }
    Ok(())
}

fn saturation_table(out: &mut String, r: &Results, saturation: &[Saturation]) -> fmt::Result {
    let s = &r.settings;
    writeln!(out, "### Throughput at saturation\n")?;
    writeln!(
        out,
        "Median over {} untraced/traced pairs of {:.0} s each (after {:.0} s of warm-up); the \
         ratio is traced ÷ untraced connections/s within each pair. CPU per connection adds up \
         the storm's threads, ksoftirqd and the tracer (softirq work is charged to the task it \
         interrupts, on loopback mostly the storm, and so is the time in the tracer's BPF \
         programs); its ratio, untraced ÷ traced within each pair, is what the throughput ratio \
         would be on an otherwise idle machine, and other load moves it less than the rate. \
         A quiet pair is one where other load took under {:.0} % of the machine in both runs \
         and no other BPF tracer was attached. \
         Tracer CPU is its own process (user + system). Lost events: reported by the tracer on \
         exit + runs of its BPF programs that the kernel skipped because another BPF program \
         was running on that CPU (`recursion_misses`; the tracer never sees those events).\n",
        s.pairs,
        s.secs,
        s.warmup_secs,
        QUIET_SHARE * 100.0
    )?;
    writeln!(
        out,
        "| tracer | untraced conn/s | traced conn/s | ratio | ratio range | ratio, quiet pairs | CPU µs per untraced conn | \
         CPU µs added per conn | CPU ratio | tracer CPU, cores | core-s per 1k conn | peak RSS | \
         lost events (reported + skipped) |"
    )?;
    writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for x in saturation {
        writeln!(
            out,
            "| `{}` | {} | {} | {:.3} | {:.3}–{:.3} | {} | {:.1} | {:+.1} | {:.3} | {} | {} | {} | {} + {} |",
            x.tracer.name,
            thousands(x.base_rate),
            thousands(x.traced_rate),
            x.ratio,
            x.ratio_min,
            x.ratio_max,
            x.quiet
                .map_or("none".into(), |(ratio, n)| format!("{ratio:.3} ({n})")),
            x.base_cost_us,
            x.added_cost_us,
            x.cost_ratio,
            x.cores.map_or("-".into(), |c| format!("{c:.3}")),
            x.core_secs_per_1k.map_or("-".into(), |c| format!("{c:.4}")),
            x.peak_kib.map_or("-".into(), mb),
            x.lost.map_or("?".into(), |lost| lost.to_string()),
            x.missed,
        )?;
    }
    writeln!(out)?;
    for x in saturation.iter().filter(|x| x.untracked_sockets > 0) {
        writeln!(
            out,
            "`{}` could not track {} sockets (socket map full).",
            x.tracer.name, x.untracked_sockets
        )?;
    }
    let busy: Vec<f64> = r
        .saturation
        .iter()
        .flat_map(|(_, pairs)| pairs.iter().map(|(base, _)| base.machine_busy))
        .collect();
    let runs = || {
        r.saturation
            .iter()
            .flat_map(|(_, pairs)| pairs.iter().flat_map(|(b, t)| [b, t]))
    };
    let foreign: Vec<f64> = runs().map(|run| run.foreign_share).collect();
    let with_other_tracers = runs().filter(|run| run.other_tracers > 0).count();
    let failed: u64 = saturation.iter().map(|x| x.failed).sum();
    writeln!(
        out,
        "The untraced runs kept the machine {:.0} % busy (median), so the storm saturates it. \
         Other load (CPU used by neither the storm nor the tracer) took {:.0} % of the \
         machine in the median run and {:.0} % at most; other BPF tracers were attached in \
         {with_other_tracers} of {} runs. Failed connections over all runs: {failed}.",
        median(&busy) * 100.0,
        median(&foreign) * 100.0,
        foreign.iter().copied().fold(0.0, f64::max) * 100.0,
        runs().count(),
    )?;
    if let Some((tracer, run)) = &r.tiny_ring {
        writeln!(
            out,
            "With `{}` ({} conn/s) socktrace reported {} lost events on exit: \
             losses are counted, not silent.",
            tracer.name,
            thousands(run.rate()),
            run.tracer
                .as_ref()
                .and_then(|t| t.lost_events)
                .map_or("no".into(), |lost| lost.to_string())
        )?;
    }
    writeln!(out)
}

fn fixed_rate_table(out: &mut String, r: &Results) -> fmt::Result {
    writeln!(
        out,
        "### Fixed rate: {} connections/s\n",
        thousands(r.settings.rate)
    )?;
    writeln!(
        out,
        "{} rounds of one run of {:.0} s per tracer (and one without); each row is the tracer's \
         median run by tracer CPU, with the range over all its runs. BPF run-time stats are on \
         (`BPF_ENABLE_STATS`): BPF time is the kernel time in the tracer's own programs, which \
         the traced processes pay; it is wall time inside the programs, interrupts included.\n",
        r.settings.fixed_rounds, r.settings.fixed_secs
    )?;
    writeln!(
        out,
        "| tracer | conn/s | storm CPU per conn | tracer CPU, cores | range | core-s per 1k conn | \
         peak RSS | lost events (reported + skipped) | BPF time per conn | BPF runs per conn |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for (tracer, runs) in &r.fixed_rate {
        let name = tracer
            .as_ref()
            .map_or("no tracer".to_owned(), |t| format!("`{}`", t.name));
        let Some(run) = median_run(runs) else {
            continue;
        };
        let storm = format!("{:.1} µs", run.storm_us_per_conn());
        let Some(sample) = &run.tracer else {
            writeln!(
                out,
                "| {name} | {} | {storm} | - | - | - | - | - | - | - |",
                thousands(run.rate())
            )?;
            continue;
        };
        let (low, high) = runs
            .iter()
            .map(StormRun::tracer_cores)
            .fold((f64::MAX, 0.0f64), |(low, high), c| {
                (low.min(c), high.max(c))
            });
        let per_conn = |value: u64| value as f64 / run.connections.max(1) as f64;
        writeln!(
            out,
            "| {name} | {} | {storm} | {:.4} | {low:.4}–{high:.4} | {:.5} | {} | {} + {} | {} | {} |",
            thousands(run.rate()),
            run.tracer_cores(),
            sample.cpu_secs / (run.connections.max(1) as f64 / 1e3),
            mb(sample.memory.peak_kib),
            sample
                .lost_events
                .map_or("?".into(), |lost| lost.to_string()),
            sample.missed_runs,
            sample.bpf.as_ref().map_or("-".into(), |b| format!(
                "{:.2} µs",
                per_conn(b.run_time_ns) / 1e3
            )),
            sample
                .bpf
                .as_ref()
                .map_or("-".into(), |b| format!("{:.1}", per_conn(b.run_count))),
        )?;
    }
    writeln!(out)?;
    bpf_programs_table(out, r)
}

/// Kernel time per connection in each BPF program of each tracer's median
/// fixed-rate run.
fn bpf_programs_table(out: &mut String, r: &Results) -> fmt::Result {
    writeln!(
        out,
        "BPF time per connection, program by program (the same median runs):\n"
    )?;
    writeln!(out, "| tracer | program | time per conn | runs per conn |")?;
    writeln!(out, "|---|---|---:|---:|")?;
    for (tracer, runs) in &r.fixed_rate {
        let (Some(tracer), Some(run)) = (tracer, median_run(runs)) else {
            continue;
        };
        let Some(bpf) = run.tracer.as_ref().and_then(|t| t.bpf.as_ref()) else {
            continue;
        };
        let per_conn = |value: u64| value as f64 / run.connections.max(1) as f64;
        for program in bpf.by_program.iter().filter(|p| p.run_count > 0) {
            writeln!(
                out,
                "| `{}` | `{}` | {:.0} ns | {:.2} |",
                tracer.name,
                program.name,
                per_conn(program.run_time_ns),
                per_conn(program.run_count)
            )?;
        }
    }
    writeln!(out)
}

fn memory_table(out: &mut String, r: &Results) -> fmt::Result {
    let (Some(idle), Some(held)) = (&r.idle, &r.held) else {
        return Ok(());
    };
    let n = thousands(held.sockets as f64);
    let (reported, skipped) = held.lost_while_tracing;
    writeln!(out, "### Memory and start-up\n")?;
    writeln!(out, "| measurement | value |\n|---|---:|")?;
    writeln!(
        out,
        "| RSS idle, 3 s after start (peak) | {} ({}) |",
        mb(idle.memory.rss_kib),
        mb(idle.memory.peak_kib)
    )?;
    writeln!(
        out,
        "| start to attached, idle | {} |",
        millis(idle.attach_time)
    )?;
    writeln!(
        out,
        "| RSS after {n} sockets were opened while tracing (peak) | {} ({}) |",
        mb(held.opened_while_tracing.rss_kib),
        mb(held.opened_while_tracing.peak_kib)
    )?;
    writeln!(
        out,
        "| collector CPU for {} s, idle / with those {n} sockets open and quiet | {:.4} / {:.4} core |",
        QUIET.as_secs(),
        idle.cores,
        held.quiet_cores
    )?;
    writeln!(
        out,
        "| events lost while they were opened (reported + skipped) | {} + {skipped} |",
        reported.map_or("?".into(), |lost| lost.to_string())
    )?;
    if held.untracked_while_tracing > 0 {
        writeln!(
            out,
            "| sockets socktrace could not track (socket map full) | {} |",
            held.untracked_while_tracing
        )?;
    }
    writeln!(
        out,
        "| RSS with {n} existing sockets at start (peak) | {} ({}) |",
        mb(held.existing_at_start.rss_kib),
        mb(held.existing_at_start.peak_kib)
    )?;
    writeln!(
        out,
        "| start to attached (\"tracing\" on stderr), {n} existing sockets | {} |",
        millis(held.attach_time)
    )?;
    writeln!(
        out,
        "| start to first complete report, {n} existing sockets | {} |\n",
        held.first_report
            .map_or("none within a minute".into(), millis)
    )
}

fn method(out: &mut String, r: &Results) -> fmt::Result {
    let s = &r.settings;
    writeln!(out, "### How it was measured\n")?;
    writeln!(
        out,
        "- Load: {} client threads, each in a loop of connect → send 16 bytes → read 16 bytes → \
         close, against {} server ports on 127.0.0.1 with {} accepting threads each (the server \
         closes on reading end of stream, so both ends close normally and the client's end \
         goes to TIME_WAIT). Clients rotate over the server ports so that each has its own \
         ephemeral port space; `net.ipv4.tcp_tw_reuse` = {} lets connect() reuse a port \
         after a second in TIME_WAIT.",
        s.shape.clients, s.shape.server_ports, s.shape.threads_per_port, s.tw_reuse
    )?;
    writeln!(
        out,
        "- Fixed rate: the same clients, each on an absolute schedule, {} connections/s in all.",
        thousands(s.rate)
    )?;
    writeln!(
        out,
        "- Each tracer is started and attached (socktrace: its \"tracing\" line; libbpf-tools \
         and the floor: an attached BPF link) before the load starts, and stopped with SIGINT \
         after it ends; lost events are what it prints on exit, plus its programs' \
         `recursion_misses` (socktrace says how many runs the kernel skipped, less those its \
         partner programs made up for). The floors, `socktrace-floor` with an empty program \
         attached as a classic and as a BTF tracepoint, are no peers: they show what the \
         tracepoint and one BPF program run per state change cost by themselves."
    )?;
    writeln!(
        out,
        "- CPU: the tracer's from /proc/PID/task/*/schedstat (nanoseconds); the storm's and \
         ksoftirqd's utime + stime from /proc/PID/stat (tick-based, {} Hz granularity), over \
         the measured window. Peak RSS: VmHWM from /proc/PID/status just before stopping. \
         RSS includes the ring buffer's pages, which the kernel maps twice. MB = 10⁶ bytes.",
        super::proc::clock_ticks_per_second()
    )?;
    if let Some(held) = &r.held {
        writeln!(
            out,
            "- Held sockets: {} helper processes (as many as the hard fd limit requires) hold \
             both ends of {} loopback connections. The first complete report is, for `trace`, \
             the last of the existing sockets' lines; for `watch`, its first output.",
            held.helpers,
            thousands((held.sockets / 2) as f64)
        )?;
    }
    for skipped in &r.skipped {
        writeln!(out, "- Not measured: {skipped}.")?;
    }
    Ok(())
}

fn memory_target(out: &mut String, label: &str, kib: u64, limit_mb: f64) -> fmt::Result {
    let measured = kib as f64 * 1024.0 / 1e6;
    writeln!(
        out,
        "| {label} ≤ {limit_mb:.0} MB | {measured:.1} MB | {} |",
        verdict(
            measured <= limit_mb,
            format!("{:.1} MB", (measured - limit_mb).abs())
        )
    )
}

/// "pass, 1.2 points to spare" or "**miss** by 1.2 points".
fn verdict(pass: bool, margin: String) -> String {
    if pass {
        format!("pass, {margin} to spare")
    } else {
        format!("**miss** by {margin}")
    }
}

fn mb(kib: u64) -> String {
    format!("{:.1} MB", kib as f64 * 1024.0 / 1e6)
}

fn millis(duration: Duration) -> String {
    format!("{:.0} ms", duration.as_secs_f64() * 1e3)
}

/// 12345.6 → "12,346".
fn thousands(value: f64) -> String {
    (value.max(0.0).round() as u64).to_formatted_string(&Locale::en)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn optional_median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let values: Vec<f64> = values.collect();
    (!values.is_empty()).then(|| median(&values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{TracerSample, proc::Memory};

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(12_345.6), "12,346");
        assert_eq!(thousands(1_000_000.0), "1,000,000");
    }

    fn run(rate: f64, tracer: Option<(f64, u64)>) -> StormRun {
        StormRun {
            connections: (rate * 5.0) as u64,
            failed: 0,
            secs: 5.0,
            machine_busy: 1.0,
            foreign_share: 0.0,
            other_tracers: 0,
            storm_cpu_secs: 10.0 * 0.9,
            tracer: tracer.map(|(cpu_secs, lost)| TracerSample {
                cpu_secs,
                memory: Memory {
                    rss_kib: 20_000,
                    peak_kib: 40_000,
                },
                lost_events: Some(lost),
                untracked_sockets: 0,
                bpf: None,
                missed_runs: 0,
                ends_unseen: 0,
            }),
        }
    }

    fn results() -> Results {
        let socktrace = Tracer::socktrace(Path::new("socktrace"), &["watch", "--json"]);
        let peer = Tracer::libbpf_tool("tcplife".into(), "tcplife");
        Results {
            machine: Machine {
                cpus: 2,
                model: "Test CPU".into(),
                memory_gib: 24.0,
                kernel: "6.18.0".into(),
                date: "2026-01-01 00:00 UTC".into(),
            },
            settings: Settings {
                pairs: 1,
                secs: 5.0,
                warmup_secs: 1.0,
                rate: 10_000.0,
                fixed_rounds: 3,
                fixed_secs: 10.0,
                shape: StormShape {
                    clients: 8,
                    server_ports: 8,
                    threads_per_port: 2,
                },
                tw_reuse: "2".into(),
                socktrace_version: "socktrace 0.1.0".into(),
                total: Duration::from_secs(60),
                background: Background {
                    busy: 0.01,
                    tracers: Vec::new(),
                },
            },
            socktrace: socktrace.clone(),
            idle: None,
            held: None,
            saturation: vec![
                (
                    socktrace.clone(),
                    vec![(run(20_000.0, None), run(19_900.0, Some((0.1, 0))))],
                ),
                (
                    peer.clone(),
                    vec![(run(20_000.0, None), run(10_000.0, Some((0.5, 3))))],
                ),
                (
                    socktrace.with_args(&["--port", NO_CONNECTION_PORT]),
                    vec![(run(20_000.0, None), run(19_960.0, Some((0.1, 0))))],
                ),
                (
                    Tracer::floor("socktrace-floor".into(), "tp_btf"),
                    vec![(run(20_000.0, None), run(19_800.0, Some((0.0, 0))))],
                ),
            ],
            tiny_ring: None,
            neighbours: Some((
                run(15_000.0, Some((0.2, 0))),
                vec!["socktrace watch --json".into(), "tcpstates".into()],
            )),
            fixed_rate: vec![
                (None, vec![run(10_000.0, None)]),
                (
                    Some(socktrace),
                    vec![
                        run(10_000.0, Some((0.9, 0))),
                        run(10_000.0, Some((0.5, 0))),
                        run(10_000.0, Some((0.1, 0))),
                    ],
                ),
            ],
            skipped: Vec::new(),
        }
    }

    #[test]
    fn a_kernel_side_dearer_than_the_whole_is_called_noise() {
        let mut results = results();
        let (_, pairs) = results
            .saturation
            .iter_mut()
            .find(|(tracer, _)| tracer.args.contains(&"--port".to_owned()))
            .expect("the kernel side's row");
        *pairs = vec![(run(20_000.0, None), run(19_700.0, Some((0.1, 0))))];
        let mut out = String::new();
        render(&mut out, &results).unwrap();
        assert!(
            out.contains(
                "keeps 0.985 × its untraced throughput (+2.4 µs of CPU per connection, CPU ratio \
                 0.974 ×); `socktrace watch --json`, sending them, 0.995 ×: the records and the \
                 collector cost less than the noise of the pairs."
            ),
            "{out}"
        );
    }

    #[test]
    fn report_states_targets_with_margins() {
        let mut out = String::new();
        render(&mut out, &results()).unwrap();
        assert!(out.starts_with(BEGIN) && out.ends_with(END), "{out}");
        let line = |start: &str| {
            out.lines()
                .find(|line| line.starts_with(start))
                .unwrap_or_else(|| panic!("no line starting {start:?} in\n{out}"))
                .to_owned()
        };
        // 19,900 / 20,000 = 0.995 ≥ 0.95.
        assert!(
            line("| throughput with socktrace")
                .contains("0.995 × (quiet pairs only: 0.995 × over 1) | pass, 4.5 points to spare")
        );
        // Costs 0.005 and 0.010 of the empty tp_btf program: 0.5 ×, well
        // within 1.5 × (0.015).
        assert!(line("| throughput cost ≤ 1.5 ×").contains(
            "socktrace 0.005, the empty program 0.010: 0.50 × | pass, 1.0 points to spare"
        ));
        assert!(line("| lower overhead than tcplife").contains("pass, 49.5 points to spare"));
        // The floor is no peer to beat, it bounds what any tracer can reach.
        assert!(!out.contains("| lower overhead than socktrace-floor"));
        let floor = line("The floor, tp_btf:");
        assert!(
            floor.contains("keeps 0.990 × its untraced throughput"),
            "{floor}"
        );
        let alone = line("The kernel side alone:");
        assert!(
            alone.contains("with `socktrace watch --json --port 1`")
                && alone.contains("keeps 0.998 × its untraced throughput")
                && alone.contains(
                    "`socktrace watch --json`, sending them, 0.995 ×: the records and the \
                     collector take 0.3 points of the 0.5 its whole cost takes."
                ),
            "{alone}"
        );
        assert!(line("| zero lost events").ends_with("| pass |"));
        assert!(line("| 0 probe runs skipped").ends_with("| pass |"));
        // 0.5 core-s over 50,000 connections, at 10,000/s: 0.1 core.
        // The median of three runs, not the first or the mean.
        assert!(
            line("| collector CPU")
                .contains("0.1000 core (median of 3) | **miss** by 0.0900 core, 10.0 ×")
        );
        assert!(line("| `socktrace watch --json` | 10,000 |").contains("| 0.0200–0.1800 |"));
        assert!(line("| `tcplife` |").contains("| 3 + 0 |"));
    }

    #[test]
    fn neighbours_row_shows_ends_unseen_without_failing_on_them() {
        let mut results = results();
        let (run, _) = results.neighbours.as_mut().unwrap();
        run.tracer.as_mut().unwrap().ends_unseen = 7;
        let mut out = String::new();
        render(&mut out, &results).unwrap();
        let row = out
            .lines()
            .find(|line| line.starts_with("| 0 probe runs skipped"))
            .unwrap();
        assert!(
            row.ends_with("(75,000 connections; 7 sockets ended unseen) | pass |"),
            "{row}"
        );
    }

    #[test]
    fn rewrites_only_between_the_markers() {
        let dir = std::env::temp_dir().join(format!("bench-report-{}", std::process::id()));
        let path = dir.join("benchmarks.md");
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            &path,
            format!("# Title\n\n{BEGIN}\nold\n{END}\n\n## Notes\nkept\n"),
        )
        .unwrap();
        write(&path, &results()).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(text.starts_with("# Title\n\n"));
        assert!(text.ends_with("\n\n## Notes\nkept\n"));
        assert!(!text.contains("\nold\n"));
        assert!(text.contains("| machine | 2 × Test CPU, 24 GiB |"));
    }

    #[test]
    fn verdicts_say_by_how_much() {
        assert_eq!(verdict(true, "1.0 MB".into()), "pass, 1.0 MB to spare");
        assert_eq!(verdict(false, "2 points".into()), "**miss** by 2 points");
    }
}
