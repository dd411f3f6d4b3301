//! Command line: bcc-style filters, `--json` for JSON Lines.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracer_common::{DEFAULT_MAX_SOCKETS, DEFAULT_RING_BYTES};

use crate::probes::{AttachRequest, ModeRequest};

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
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print one line per TCP lifecycle event, attributed to the owning process.
    Trace(TraceArgs),
    /// Live per-process view: connect/close imbalance, CLOSE_WAIT build-up, fd exhaustion ETA.
    Watch(crate::watch_cmd::WatchArgs),
    /// Run as a daemon: Prometheus metrics on /metrics, alerts as JSON on stderr.
    Serve(crate::serve::ServeArgs),
    /// Show what this kernel supports and which probe mode socktrace will use.
    Doctor(ProbeArgs),
}

#[derive(Debug, Args, Clone)]
#[group(id = "container_or_pidns", multiple = false, args = ["container", "pidns"])]
pub struct FilterArgs {
    /// Only sockets owned by this process (repeatable).
    #[arg(short = 'p', long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Only connections with this local or remote port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only IPv4.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Only IPv6.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub duration: Option<Duration>,
    /// Only processes in the container (PID namespace) of this host pid.
    #[arg(long, value_name = "PID", conflicts_with = "pidns")]
    pub container: Option<u32>,
    /// Only processes in this PID namespace (e.g. /proc/PID/ns/pid).
    #[arg(long, value_name = "PATH")]
    pub pidns: Option<std::path::PathBuf>,
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
    pub probe_mode: ModeRequest,
    /// How the TCP state tracepoints are attached: tp_btf (BTF-typed, state
    /// in socket storage, Linux 5.11+) or classic tracepoints (state in a
    /// hash map sized by --max-sockets).
    #[arg(long, value_enum, default_value = "auto", env = "SOCKTRACE_ATTACH")]
    pub attach: AttachRequest,
    /// Size of the kernel-to-collector ring buffer (a power of two, in KiB).
    #[arg(long, value_name = "KIB", default_value_t = DEFAULT_RING_BYTES / 1024, value_parser = parse_ring_kib)]
    pub ring_buffer_kib: u32,
    /// How many sockets the kernel can track owners for (with tp_btf: only
    /// the sockets that exist at start; the others live in socket storage).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_SOCKETS)]
    pub max_sockets: u32,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Print JSON Lines instead of human lines.
    #[arg(long)]
    pub json: bool,
}

pub fn parse_secs(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("'{text}' must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
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
        let Command::Trace(trace) = cli.command else {
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
    }
}
