//! The bench's markdown report: targets with pass/miss and margins, then the
//! measurements behind them.
//!
//! Only the part between the markers is rewritten, so notes written below
//! it (why a target is missed, what would close it) survive a re-run.

use std::{fmt::Write as _, fs, path::Path, process::Command, time::Duration};

use anyhow::Context as _;

use super::{Results, StormRun, loadgen::StormShape, tracer::Tracer};
use crate::cmd;

const BEGIN: &str = "<!-- bench:begin (written by `cargo xtask bench`; edit outside) -->";
const END: &str = "<!-- bench:end -->";

/// The targets of the performance issue.
const MIN_THROUGHPUT_RATIO: f64 = 0.99;
const MAX_CORES_AT_RATE: f64 = 0.02;
const MAX_IDLE_RSS_MB: f64 = 30.0;
const MAX_HELD_RSS_MB: f64 = 64.0;
const MAX_FIRST_REPORT: Duration = Duration::from_secs(1);

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
    pub fixed_secs: f64,
    pub shape: StormShape,
    pub tw_reuse: String,
    pub socktrace_version: String,
    pub total: Duration,
}

pub fn write(path: &Path, results: &Results) -> anyhow::Result<()> {
    let generated = render(results);
    let text = match fs::read_to_string(path) {
        Ok(old) => match (old.find(BEGIN), old.find(END)) {
            (Some(begin), Some(end)) if begin < end => {
                format!("{}{generated}{}", &old[..begin], &old[end + END.len()..])
            }
            _ => format!("{}\n{generated}\n", old.trim_end()),
        },
        Err(_) => format!("{HEADER}\n{generated}\n"),
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

const HEADER: &str = "# Benchmarks

Measured with `cargo xtask bench` (as root; about 10 minutes). It runs a
loopback storm of short TCP connections from its own load generator with no
tracer, with socktrace and with its peers, and compares them.
";

/// Medians and totals of one tracer's saturation runs.
struct Saturation<'a> {
    tracer: &'a Tracer,
    ratio: f64,
    ratio_min: f64,
    ratio_max: f64,
    base_rate: f64,
    traced_rate: f64,
    cores: Option<f64>,
    core_secs_per_1k: Option<f64>,
    peak_kib: Option<u64>,
    lost: Option<u64>,
    runs: usize,
    runs_with_losses: usize,
    untracked_sockets: u64,
    failed: u64,
}

fn summarize<'a>(tracer: &'a Tracer, pairs: &[(StormRun, StormRun)]) -> Saturation<'a> {
    let ratios: Vec<f64> = pairs
        .iter()
        .map(|(base, traced)| traced.rate() / base.rate())
        .collect();
    let samples = || {
        pairs
            .iter()
            .filter_map(|(_, traced)| traced.tracer.as_ref())
    };
    let losses: Vec<u64> = samples().filter_map(|s| s.lost_events).collect();
    Saturation {
        tracer,
        ratio: median(&ratios),
        ratio_min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratio_max: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        base_rate: median(&pairs.iter().map(|(b, _)| b.rate()).collect::<Vec<_>>()),
        traced_rate: median(&pairs.iter().map(|(_, t)| t.rate()).collect::<Vec<_>>()),
        cores: optional_median(
            pairs
                .iter()
                .filter_map(|(_, t)| t.tracer.as_ref().map(|s| s.cpu_secs / t.secs)),
        ),
        core_secs_per_1k: optional_median(pairs.iter().filter_map(|(_, t)| {
            t.tracer
                .as_ref()
                .map(|s| s.cpu_secs / (t.connections as f64 / 1e3))
        })),
        peak_kib: samples().map(|s| s.memory.peak_kib).max(),
        lost: (!losses.is_empty()).then(|| losses.iter().sum()),
        runs: pairs.len(),
        runs_with_losses: losses.iter().filter(|&&lost| lost > 0).count(),
        untracked_sockets: samples().map(|s| s.untracked_sockets).sum(),
        failed: pairs.iter().map(|(b, t)| b.failed + t.failed).sum(),
    }
}

fn render(results: &Results) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = render_into(&mut out, results);
    out
}

fn render_into(out: &mut String, r: &Results) -> std::fmt::Result {
    let m = &r.machine;
    let s = &r.settings;
    let saturation: Vec<Saturation> = r
        .saturation
        .iter()
        .map(|(tracer, pairs)| summarize(tracer, pairs))
        .collect();
    let socktrace = saturation
        .iter()
        .find(|x| x.tracer.name == r.socktrace.name);

    writeln!(out, "{BEGIN}")?;
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
    writeln!(out)?;

    writeln!(out, "### Targets\n")?;
    writeln!(out, "| target | measured | result |\n|---|---|---|")?;
    if let Some(st) = socktrace {
        let pts = (st.ratio - MIN_THROUGHPUT_RATIO) * 100.0;
        writeln!(
            out,
            "| throughput with socktrace ≥ {MIN_THROUGHPUT_RATIO} × untraced, at saturation | {:.3} × | {} |",
            st.ratio,
            verdict(pts >= 0.0, format!("{:.1} points", pts.abs()))
        )?;
        for peer in saturation
            .iter()
            .filter(|x| x.tracer.family != st.tracer.family)
        {
            let pts = (st.ratio - peer.ratio) * 100.0;
            writeln!(
                out,
                "| lower overhead than {} | socktrace {:.3} ×, {} {:.3} × | {} |",
                peer.tracer.name,
                st.ratio,
                peer.tracer.name,
                peer.ratio,
                verdict(pts > 0.0, format!("{:.1} points", pts.abs()))
            )?;
        }
        if let Some(lost) = st.lost {
            writeln!(
                out,
                "| zero lost events at saturation, default buffers | {lost} lost in {} of {} runs | {} |",
                st.runs_with_losses,
                st.runs,
                verdict(lost == 0, format!("{lost} events"))
            )?;
        }
    }
    if let Some((_, run)) = r
        .fixed_rate
        .iter()
        .find(|(t, _)| t.as_ref().is_some_and(|t| t.name == r.socktrace.name))
        && let Some(sample) = &run.tracer
    {
        // Scaled to exactly the target rate, in case the storm fell short.
        let cores = sample.cpu_secs / run.connections as f64 * s.rate;
        writeln!(
            out,
            "| collector CPU ≤ {MAX_CORES_AT_RATE} core at {} connections/s | {cores:.4} core | {} |",
            thousands(s.rate),
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
        let label = format!(
            "RSS with {} tracked sockets",
            thousands(held.sockets as f64)
        );
        let worst = held
            .opened_while_tracing
            .rss_kib
            .max(held.existing_at_start.rss_kib);
        memory_target(out, &label, worst, MAX_HELD_RSS_MB)?;
        match held.first_report {
            Some(first) => writeln!(
                out,
                "| start to first report ≤ {} s with {} existing sockets | {:.2} s | {} |",
                MAX_FIRST_REPORT.as_secs(),
                thousands(held.sockets as f64),
                first.as_secs_f64(),
                verdict(
                    first <= MAX_FIRST_REPORT,
                    format!(
                        "{:.2} s",
                        (first.as_secs_f64() - MAX_FIRST_REPORT.as_secs_f64()).abs()
                    )
                )
            )?,
            None => writeln!(
                out,
                "| start to first report ≤ {} s with {} existing sockets | no complete report within a minute | **miss** |",
                MAX_FIRST_REPORT.as_secs(),
                thousands(held.sockets as f64)
            )?,
        }
    }
    writeln!(out)?;

    writeln!(out, "### Throughput at saturation\n")?;
    writeln!(
        out,
        "Median over {} untraced/traced pairs of {:.0} s each (after {:.0} s of warm-up); \
         the ratio is traced ÷ untraced connections/s within each pair. Tracer CPU is its \
         own process (user + system) over the same window; kernel time spent in its BPF \
         programs is charged to the traced processes and shows up in the ratio.\n",
        s.pairs, s.secs, s.warmup_secs
    )?;
    writeln!(
        out,
        "| tracer | untraced conn/s | traced conn/s | ratio | ratio range | tracer CPU, cores | core-s per 1k conn | peak RSS | lost events |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for x in &saturation {
        writeln!(
            out,
            "| `{}` | {} | {} | {:.3} | {:.3}–{:.3} | {} | {} | {} | {} |",
            x.tracer.name,
            thousands(x.base_rate),
            thousands(x.traced_rate),
            x.ratio,
            x.ratio_min,
            x.ratio_max,
            x.cores.map_or("-".into(), |c| format!("{c:.3}")),
            x.core_secs_per_1k.map_or("-".into(), |c| format!("{c:.4}")),
            x.peak_kib.map_or("-".into(), mb),
            x.lost.map_or("-".into(), |lost| lost.to_string()),
        )?;
    }
    let busy: Vec<f64> = r
        .saturation
        .iter()
        .flat_map(|(_, pairs)| pairs.iter().map(|(base, _)| base.machine_busy))
        .collect();
    for x in saturation.iter().filter(|x| x.untracked_sockets > 0) {
        writeln!(
            out,
            "\n`{}` could not track {} sockets (socket map full).",
            x.tracer.name, x.untracked_sockets
        )?;
    }
    let failed: u64 = saturation.iter().map(|x| x.failed).sum();
    writeln!(
        out,
        "\nThe untraced runs kept the machine {:.0} % busy (median), so the storm saturates it. \
         Failed connections over all runs: {failed}.",
        median(&busy) * 100.0
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
    writeln!(out)?;

    writeln!(out, "### Fixed rate: {} connections/s\n", thousands(s.rate))?;
    writeln!(
        out,
        "One run of {:.0} s per tracer with `kernel.bpf_stats_enabled=1`. \
         BPF time is the kernel time in the tracer's own programs, which the traced \
         processes pay.\n",
        s.fixed_secs
    )?;
    writeln!(
        out,
        "| tracer | conn/s | tracer CPU, cores | core-s per 1k conn | peak RSS | lost events | BPF time per conn | BPF runs per conn |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for (tracer, run) in &r.fixed_rate {
        let name = tracer
            .as_ref()
            .map_or("no tracer".to_owned(), |t| format!("`{}`", t.name));
        let sample = run.tracer.as_ref();
        let per_conn = |value: u64| value as f64 / run.connections.max(1) as f64;
        writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {} | {} |",
            thousands(run.rate()),
            sample.map_or("-".into(), |t| format!("{:.4}", t.cpu_secs / run.secs)),
            sample.map_or("-".into(), |t| format!(
                "{:.5}",
                t.cpu_secs / (run.connections as f64 / 1e3)
            )),
            sample.map_or("-".into(), |t| mb(t.memory.peak_kib)),
            sample
                .and_then(|t| t.lost_events)
                .map_or("-".into(), |lost| lost.to_string()),
            sample.and_then(|t| t.bpf).map_or("-".into(), |b| format!(
                "{:.2} µs",
                per_conn(b.run_time_ns) / 1e3
            )),
            sample
                .and_then(|t| t.bpf)
                .map_or("-".into(), |b| format!("{:.1}", per_conn(b.run_count))),
        )?;
    }
    writeln!(out)?;

    if let (Some(idle), Some(held)) = (&r.idle, &r.held) {
        writeln!(out, "### Memory and start-up\n")?;
        writeln!(out, "| measurement | value |\n|---|---:|")?;
        writeln!(
            out,
            "| RSS idle, 3 s after start | {} |",
            mb(idle.memory.rss_kib)
        )?;
        writeln!(
            out,
            "| start to attached, idle | {} |",
            millis(idle.attach_time)
        )?;
        let n = thousands(held.sockets as f64);
        writeln!(
            out,
            "| RSS after {n} sockets were opened while tracing (peak) | {} ({}) |",
            mb(held.opened_while_tracing.rss_kib),
            mb(held.opened_while_tracing.peak_kib)
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
            "| start to first complete report, {n} existing sockets | {} |",
            held.first_report
                .map_or("none within a minute".into(), millis)
        )?;
        writeln!(out)?;
    }

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
        "- Each tracer is started and attached (socktrace: its \"tracing\" line; libbpf-tools: \
         an attached BPF link) before the load starts, and stopped with SIGINT after it ends; \
         lost events are what it prints on exit."
    )?;
    writeln!(
        out,
        "- CPU: utime + stime from /proc/PID/stat over the measured window. Peak RSS: VmHWM \
         from /proc/PID/status just before stopping. MB = 10⁶ bytes."
    )?;
    writeln!(
        out,
        "- Held sockets: a helper process holds both ends of {} loopback connections. The \
         first complete report is, for `trace`, the last of the existing sockets' lines; for \
         `watch`, its first output.",
        r.held
            .as_ref()
            .map_or("-".into(), |h| thousands((h.sockets / 2) as f64))
    )?;
    for skipped in &r.skipped {
        writeln!(out, "- Not measured: {skipped}.")?;
    }
    write!(out, "{END}")?;
    Ok(())
}

fn memory_target(out: &mut String, label: &str, kib: u64, limit_mb: f64) -> std::fmt::Result {
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
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
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

    #[test]
    fn verdicts_say_by_how_much() {
        assert_eq!(verdict(true, "1.0 MB".into()), "pass, 1.0 MB to spare");
        assert_eq!(verdict(false, "2 points".into()), "**miss** by 2 points");
    }
}
