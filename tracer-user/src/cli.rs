//! The command line: every clap struct and value parser, and their
//! conversion into the plain options of the commands. No other module
//! imports clap.

use std::{path::PathBuf, time::Duration};

use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};
use tracer_common::{DEFAULT_MAX_SOCKETS, DEFAULT_RING_BYTES};

use crate::{
    commands::{self, Command, ReportOptions},
    containers::TargetSpec,
    pipeline,
    probes::{AttachRequest, ModeRequest, ProbeOptions},
    scope::Filter,
    serve::{hdr_log::HdrLogOptions, metrics::DEFAULT_MAX_PROCESSES},
    watch::WatchConfig,
};

#[derive(Debug, Parser)]
#[command(
    name = "socktrace",
    version,
    about = "Trace TCP socket lifecycles per owning process; find CLOSE_WAIT leaks before \"too many open files\""
)]
pub struct Cli {
    /// More diagnostics on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: CommandArgs,
}

#[derive(Debug, Subcommand)]
pub enum CommandArgs {
    /// Print one line per TCP lifecycle event, attributed to the owning process.
    Trace(TraceArgs),
    /// Live per-process view: connect/close imbalance, CLOSE_WAIT build-up, fd exhaustion ETA.
    Watch(WatchArgs),
    /// Run as a daemon: Prometheus metrics on /metrics, alerts as JSON on stderr.
    Serve(ServeArgs),
    /// Show what this kernel supports and which probe mode socktrace will use.
    Doctor(ProbeArgs),
    /// Write the man pages (into DIR) or shell completions (to stdout), for packagers.
    #[command(hide = true)]
    Generate(GenerateArgs),
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    pub what: Generated,
}

#[derive(Debug, Subcommand)]
pub enum Generated {
    /// The man pages, socktrace(1) and one per command, into DIR.
    Man { dir: PathBuf },
    /// Completions for one shell.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Writes what `generate` asks for, from these very definitions.
pub fn generate(what: &Generated, out: &mut impl std::io::Write) -> std::io::Result<()> {
    let mut command = Cli::command();
    match what {
        Generated::Man { dir } => {
            std::fs::create_dir_all(dir)?;
            clap_mangen::generate_to(command, dir)
        }
        Generated::Completions { shell } => {
            clap_complete::generate(*shell, &mut command, "socktrace", out);
            Ok(())
        }
    }
}

#[derive(Debug, Args, Clone)]
#[group(id = "container_or_pidns", multiple = false, args = ["container", "pidns"])]
pub struct FilterArgs {
    /// Only sockets owned by this process (repeatable).
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Only connections with this local or remote port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Only IPv4.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Only IPv6.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
    /// Stop after this many seconds (or a duration: 90s, 10m, 2h).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub duration: Option<Duration>,
    /// Only processes in this container: a host pid in it, its id (or a
    /// unique start of it), or its name (through podman or docker).
    #[arg(long, value_name = "PID|ID|NAME", conflicts_with = "pidns")]
    pub container: Option<String>,
    /// Only processes in this PID namespace (e.g. /proc/PID/ns/pid).
    #[arg(long, value_name = "PATH")]
    pub pidns: Option<PathBuf>,
    /// When the container stops, go on host-wide instead of exiting.
    #[arg(long, requires = "container_or_pidns")]
    pub keep_running: bool,
    #[command(flatten)]
    pub probe: ProbeArgs,
}

#[derive(Debug, Args, Clone)]
pub struct ProbeArgs {
    /// How socket owners are probed besides tracepoints.
    #[arg(long, value_enum, default_value = "auto")]
    pub probe_mode: ModeArg,
    /// How the TCP state tracepoints are attached: tp_btf (BTF-typed, state
    /// in a hash map sized by --max-sockets and in socket storage beyond
    /// it, Linux 5.11+) or classic tracepoints (state in the hash map only).
    #[arg(long, value_enum, default_value = "auto", env = "SOCKTRACE_ATTACH")]
    pub attach: AttachArg,
    /// Size of the kernel-to-collector ring buffer (a power of two, in KiB).
    #[arg(long, value_name = "KIB", default_value_t = DEFAULT_RING_BYTES / 1024, value_parser = parse_ring_kib)]
    pub ring_buffer_kib: u32,
    /// How many sockets the kernel's hash map holds (with tp_btf, the
    /// sockets beyond it live in socket storage; without, they go
    /// untracked, counted).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_SOCKETS, value_parser = parse_max_sockets)]
    pub max_sockets: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// The richest mode the kernel allows: fentry, then kprobe, then tracepoint.
    Auto,
    Fentry,
    Kprobe,
    Tracepoint,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttachArg {
    /// BTF tracepoints with socket storage where the kernel allows, else
    /// classic tracepoints with the hash map.
    Auto,
    #[value(name = "tp_btf")]
    TpBtf,
    Tracepoint,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Print JSON Lines instead of human lines.
    #[arg(long)]
    pub json: bool,
}

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
    /// Seconds between reports (or a duration: 500ms, 2s).
    #[arg(long, value_name = "SECS", default_value = "1", value_parser = parse_secs)]
    pub interval: Duration,
    /// Alert when the soft fd limit is forecast within this time (e.g. 1h, 30m).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub warn_eta: Duration,
    /// CLOSE_WAIT sockets older than this count as stuck (e.g. 60s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub close_wait_age: Duration,
    /// Alert when a process uses this share of its soft fd limit, in percent.
    #[arg(long, value_name = "PERCENT", default_value_t = 90.0, value_parser = parse_percent)]
    pub fd_usage: f64,
}

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
    /// TLS and basic auth for the listener, in the Prometheus exporter
    /// toolkit's web configuration format (tls_server_config,
    /// basic_auth_users).
    #[arg(long, value_name = "FILE")]
    pub web_config: Option<PathBuf>,
    /// Export at most this many processes (those with alerts first, then the
    /// busiest); bounds the number of series.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_PROCESSES, value_parser = parse_max_processes)]
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

/// What the command line asks for: a command to run, or the man page or
/// completions, which [`generate`] writes from the definitions here. Made
/// once per run, so its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Action {
    Run(Command),
    Generate(Generated),
}

impl From<CommandArgs> for Action {
    fn from(args: CommandArgs) -> Self {
        Self::Run(match args {
            CommandArgs::Trace(args) => Command::Trace(commands::trace::Options {
                pipeline: args.filter.into(),
                json: args.json,
            }),
            CommandArgs::Watch(args) => Command::Watch(commands::watch::Options {
                report: args.report.options(&args.filter.pids),
                pipeline: args.filter.into(),
                json: args.json,
                once: args.once,
            }),
            CommandArgs::Serve(args) => Command::Serve(commands::serve::Options {
                report: args.report.options(&args.filter.pids),
                pipeline: args.filter.into(),
                listen: args.listen,
                web_config: args.web_config,
                max_processes: args.max_processes,
                hdr_log: args.hdr_log.map(|path| HdrLogOptions {
                    path,
                    max_bytes: args.hdr_log_max_bytes,
                    keep: args.hdr_log_keep,
                }),
            }),
            CommandArgs::Doctor(args) => Command::Doctor(args.into()),
            CommandArgs::Generate(args) => return Self::Generate(args.what),
        })
    }
}

impl From<FilterArgs> for pipeline::Options {
    fn from(args: FilterArgs) -> Self {
        let target = match (args.container, args.pidns) {
            (Some(container), _) => Some(TargetSpec::Container(container)),
            (_, Some(path)) => Some(TargetSpec::Path(path)),
            _ => None,
        };
        Self {
            filter: Filter {
                pids: args.pids,
                port: args.port,
                ipv4_only: args.ipv4,
                ipv6_only: args.ipv6,
            },
            target,
            probes: args.probe.into(),
            duration: args.duration,
            keep_running: args.keep_running,
        }
    }
}

impl From<ProbeArgs> for ProbeOptions {
    fn from(args: ProbeArgs) -> Self {
        Self {
            ring_bytes: args.ring_buffer_kib * 1024,
            max_sockets: args.max_sockets,
            mode: match args.probe_mode {
                ModeArg::Auto => ModeRequest::Auto,
                ModeArg::Fentry => ModeRequest::Fentry,
                ModeArg::Kprobe => ModeRequest::Kprobe,
                ModeArg::Tracepoint => ModeRequest::Tracepoint,
            },
            attach: match args.attach {
                AttachArg::Auto => AttachRequest::Auto,
                AttachArg::TpBtf => AttachRequest::TpBtf,
                AttachArg::Tracepoint => AttachRequest::Tracepoint,
            },
            ..ProbeOptions::default()
        }
    }
}

impl ReportArgs {
    /// The report options, for the processes `pids` (`-p`).
    fn options(&self, pids: &[u32]) -> ReportOptions {
        ReportOptions {
            interval: self.interval,
            watch: WatchConfig {
                warn_eta: self.warn_eta,
                close_wait_age: self.close_wait_age,
                fd_usage_threshold: self.fd_usage / 100.0,
                pids: pids.to_vec(),
                ..WatchConfig::default()
            },
        }
    }
}

/// A number of seconds ("2", "0.5"), or a duration with its unit ("500ms",
/// "2s", "5m"), up to a year (timers would overflow beyond).
fn parse_secs(text: &str) -> Result<Duration, String> {
    const YEAR: Duration = Duration::from_secs(365 * 24 * 3_600);
    let duration = match text.parse::<f64>() {
        Ok(secs) if secs > 0.0 => Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX),
        Ok(_) => return Err(format!("'{text}' must be a positive number of seconds")),
        Err(_) => humantime::parse_duration(text).map_err(|_| {
            format!("'{text}' is neither a number of seconds nor a duration such as 500ms, 2s, 5m")
        })?,
    };
    match duration {
        Duration::ZERO => Err(format!("'{text}' must be a positive duration")),
        d if d > YEAR => Err(format!("'{text}' is more than a year")),
        d => Ok(d),
    }
}

fn parse_ring_kib(text: &str) -> Result<u32, String> {
    let kib: u32 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a size in KiB"))?;
    // The kernel wants a power-of-two multiple of the page size.
    if kib < 4 || !kib.is_power_of_two() || kib > 1 << 20 {
        return Err(format!(
            "'{text}' must be a power of two between 4 and 1048576"
        ));
    }
    Ok(kib)
}

fn parse_percent(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(percent) if percent > 0.0 && percent <= 100.0 => Ok(percent),
        _ => Err(format!(
            "'{text}' must be a percentage above 0, at most 100"
        )),
    }
}

/// The kernel allocates a bucket per entry at load: a bound on what a typo
/// takes.
const MAX_MAX_SOCKETS: u32 = 1 << 24;

fn parse_max_sockets(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(n) if (1..=MAX_MAX_SOCKETS).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{text}' must be a number of sockets between 1 and {MAX_MAX_SOCKETS}"
        )),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_trace_filters() {
        let cli = Cli::try_parse_from([
            "socktrace",
            "trace",
            "-p",
            "1",
            "-p",
            "2",
            "--port",
            "80",
            "-4",
            "--duration",
            "1.5",
            "--json",
        ])
        .unwrap();
        let CommandArgs::Trace(trace) = cli.command else {
            panic!("not trace");
        };
        assert_eq!(trace.filter.pids, vec![1, 2]);
        assert_eq!(trace.filter.port, Some(80));
        assert!(trace.filter.ipv4 && trace.json);
        assert_eq!(trace.filter.duration, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn rejects_bad_values() {
        assert!(Cli::try_parse_from(["socktrace", "trace", "-4", "-6"]).is_err());
        assert!(Cli::try_parse_from(["socktrace", "trace", "--duration", "-1"]).is_err());
        assert!(Cli::try_parse_from(["socktrace", "trace", "--ring-buffer-kib", "1000"]).is_err());
        assert!(Cli::try_parse_from(["socktrace", "trace", "-p", "abc"]).is_err());
        assert!(Cli::try_parse_from(["socktrace", "trace", "--bogus"]).is_err());
        assert!(Cli::try_parse_from(["socktrace", "trace", "--max-sockets", "0"]).is_err());
        assert!(Cli::try_parse_from(["socktrace", "trace", "--port", "0"]).is_err());
        assert!(Cli::try_parse_from(["socktrace", "watch", "--fd-usage", "150"]).is_err());
    }

    #[test]
    fn seconds_or_durations() {
        assert_eq!(parse_secs("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_secs("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_secs("5m"), Ok(Duration::from_secs(300)));
        for bad in ["0", "-1", "NaN", "0s", "2x", ""] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
        // Beyond what timers take: refused, not a panic.
        for huge in ["1e30", "inf", "2y", "999999999999999h"] {
            assert_eq!(
                parse_secs(huge),
                Err(format!("'{huge}' is more than a year"))
            );
        }
    }

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
        let CommandArgs::Serve(serve) = cli.command else {
            panic!("not serve");
        };
        assert_eq!(serve.listen, "[::1]:9100");
        assert_eq!(serve.hdr_log_max_bytes, 1 << 20);
        assert_eq!(serve.max_processes, DEFAULT_MAX_PROCESSES);
        assert_eq!(
            serve.report.close_wait_age,
            std::time::Duration::from_secs(5)
        );
        assert_eq!(serve.filter.pids, vec![7]);
        // Log options only make sense with a log.
        assert!(Cli::try_parse_from(["socktrace", "serve", "--hdr-log-keep", "2"]).is_err());
        assert!(Cli::try_parse_from(["socktrace", "serve", "--max-processes", "0"]).is_err());
    }

    #[test]
    fn converts_into_the_options_of_the_commands() {
        let cli = Cli::try_parse_from([
            "socktrace",
            "serve",
            "--container",
            "42",
            "--attach",
            "tracepoint",
            "--ring-buffer-kib",
            "64",
            "--fd-usage",
            "80",
            "--hdr-log",
            "/var/log/x.hlog",
            "-6",
        ])
        .unwrap();
        let Action::Run(Command::Serve(serve)) = cli.command.into() else {
            panic!("not serve");
        };
        assert_eq!(
            serve.pipeline.target,
            Some(TargetSpec::Container("42".into()))
        );
        assert_eq!(serve.pipeline.probes.attach, AttachRequest::Tracepoint);
        assert_eq!(serve.pipeline.probes.ring_bytes, 64 * 1024);
        assert!(serve.pipeline.filter.ipv6_only && !serve.pipeline.filter.ipv4_only);
        assert_eq!(serve.report.watch.fd_usage_threshold, 0.8);
        assert_eq!(serve.report.interval, Duration::from_secs(1));
        let log = serve.hdr_log.unwrap();
        assert_eq!((log.max_bytes, log.keep), (64 << 20, 4));
    }

    #[test]
    fn the_man_page_and_completions_come_from_the_definitions() {
        let dir = std::env::temp_dir().join(format!("socktrace-man-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        generate(&Generated::Man { dir: dir.clone() }, &mut std::io::sink()).unwrap();
        let mut pages: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        pages.sort();
        // The packagers' command stays hidden.
        assert_eq!(
            pages,
            [
                "socktrace-doctor.1",
                "socktrace-serve.1",
                "socktrace-trace.1",
                "socktrace-watch.1",
                "socktrace.1"
            ]
        );
        let watch = std::fs::read_to_string(dir.join("socktrace-watch.1")).unwrap();
        assert!(
            watch.starts_with(".ie") && watch.contains("close\\-wait\\-age"),
            "{watch}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let mut bash = Vec::new();
        let shell = clap_complete::Shell::Bash;
        generate(&Generated::Completions { shell }, &mut bash).unwrap();
        let bash = String::from_utf8(bash).unwrap();
        assert!(bash.contains("--close-wait-age") && bash.contains("complete -F"));
    }
}
