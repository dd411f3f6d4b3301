//! socktrace: TCP socket lifecycles per owning process.
//!
//! Data flows through one module per stage: `probes` (kernel programs) →
//! `decode` (ring buffer records) → `sockets` (per-socket state and owners) →
//! outputs (`output::trace`, ...). `collector` runs the loop between them.

mod cli;
mod clock;
mod collector;
mod containers;
mod decode;
mod output;
mod privileges;
mod probes;
mod procfs;
mod serve;
mod sockets;
mod tcp;
mod watch;
mod watch_cmd;

use std::{process::ExitCode, time::Duration};

use anyhow::{Context as _, bail};
use clap::Parser as _;
use tracer_common::{AF_INET, AF_INET6, NamespaceFilter};

use crate::{
    cli::{Cli, Command, FilterArgs, ProbeArgs},
    clock::Clock,
    collector::RunOptions,
    containers::Target,
    output::{Filter, Scope, trace::TraceSink},
    probes::{ProbeOptions, Probes},
    sockets::{ExistingSocket, SocketTable},
    watch::Watch,
    watch_cmd::{Display, WatchArgs, WatchFeed, WatchSink},
};

/// Transitions wait this long for their owner (accept) before being shown
/// as unknown.
const OWNER_GRACE: Duration = Duration::from_secs(1);
/// How often the collector drains the ring buffer and runs its timers: the
/// longest an event waits before it is shown.
const COLLECTOR_TICK: Duration = Duration::from_millis(100);
/// After an owner exits, look for the socket's new holder this much later.
const REHOME_DELAY: Duration = Duration::from_millis(100);

fn main() -> ExitCode {
    keep_large_allocations_out_of_the_heap();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("socktrace: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Blocks of 1 MiB or more (the socket tables, which double as they grow)
/// get pages of their own, returned to the system when freed. By default
/// glibc raises that threshold after the first such block is freed (the
/// kernel BTF parsed at start is one), and later tables then leave freed
/// heap behind them: 10 MB more RSS with 100k sockets, in some runs only.
fn keep_large_allocations_out_of_the_heap() {
    // SAFETY: mallopt only changes malloc's tuning; it is called before any
    // other thread exists.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp(None)
        .init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    privileges::check()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Trace(args) => runtime.block_on(trace(args.filter, args.json)),
        Command::Watch(args) => runtime.block_on(watch(args)),
        Command::Serve(args) => runtime.block_on(serve::run(args)),
        Command::Doctor(args) => doctor(&args),
    }
}

/// The container named by `--container`/`--pidns`, if any.
fn container_target(filter: &FilterArgs) -> anyhow::Result<Option<Target>> {
    Ok(match (&filter.container, &filter.pidns) {
        (Some(pid), _) => Some(Target::from_pid(*pid)?),
        (_, Some(path)) => Some(Target::from_path(path)?),
        _ => None,
    })
}

fn probe_options(filter: &FilterArgs, target: Option<&Target>) -> anyhow::Result<ProbeOptions> {
    for &pid in &filter.pids {
        if !procfs::exists(pid) {
            bail!("pid {pid} does not exist");
        }
    }
    Ok(ProbeOptions {
        namespace: target.map(|t| NamespaceFilter {
            enabled: 1,
            netns_ino: t.netns_ino,
            pidns_dev: t.pidns_dev,
            pidns_ino: t.pidns_ino,
        }),
        pids: filter.pids.clone(),
        port: filter.port,
        family: match (filter.ipv4, filter.ipv6) {
            (true, _) => Some(AF_INET),
            (_, true) => Some(AF_INET6),
            _ => None,
        },
        ..base_probe_options(&filter.probe)
    })
}

fn base_probe_options(probe: &ProbeArgs) -> ProbeOptions {
    ProbeOptions {
        pids: Vec::new(),
        port: None,
        family: None,
        ring_bytes: probe.ring_buffer_kib * 1024,
        max_sockets: probe.max_sockets,
        mode: probe.probe_mode,
        attach: probe.attach,
        namespace: None,
        skip_inferable: false,
    }
}

fn user_filter(filter: &FilterArgs) -> Filter {
    Filter {
        pids: filter.pids.clone(),
        port: filter.port,
        ipv4_only: filter.ipv4,
        ipv6_only: filter.ipv6,
    }
}

/// What every collecting command sets up: probes, and the socket stage
/// seeded with the sockets that already exist.
struct Started {
    probes: Probes,
    table: SocketTable,
    target: Option<Target>,
    start_ns: u64,
}

/// `infer_transitions` for the commands that aggregate: the kernel leaves
/// out the transitions the socket stage can infer, 3 of a connection's 11
/// records.
fn start(filter: &FilterArgs, infer_transitions: bool) -> anyhow::Result<Started> {
    let target = container_target(filter)?;
    let mut probes = Probes::load(&ProbeOptions {
        skip_inferable: infer_transitions,
        ..probe_options(filter, target.as_ref())?
    })?;
    let start_ns = clock::monotonic_ns();
    let mut table = SocketTable::new(
        OWNER_GRACE.as_nanos() as u64,
        REHOME_DELAY.as_nanos() as u64,
        probes.skips_inferable(infer_transitions),
    );
    // Seeded after attaching, so no socket falls between the two; only the
    // container's network namespace when pointed at one (a kernel filter).
    let existing = probes
        .socket_files()
        .context("reading the sockets that already exist")?;
    table.seed(ExistingSocket::from_files(existing));
    Ok(Started {
        probes,
        table,
        target,
        start_ns,
    })
}

impl Started {
    /// Runs the collector into `sink` until a signal, `--duration`, or the
    /// container's end.
    async fn run(self, filter: &FilterArgs, sink: &mut dyn collector::Sink) -> anyhow::Result<()> {
        collector::run(
            self.probes,
            self.table,
            sink,
            RunOptions {
                tick: COLLECTOR_TICK,
                duration: filter.duration,
                container: self.target,
                keep_running: filter.keep_running,
            },
        )
        .await?;
        Ok(())
    }
}

fn scope(filter: &FilterArgs, target: Option<&Target>) -> Scope {
    Scope::new(user_filter(filter), target.map(|t| t.pidns_ino))
}

async fn trace(filter: FilterArgs, json: bool) -> anyhow::Result<()> {
    // Every transition as it happens: none inferred.
    let started = start(&filter, false)?;
    let mut sink = TraceSink::new(
        std::io::stdout().lock(),
        json,
        Clock::now(),
        scope(&filter, started.target.as_ref()),
    );
    started.run(&filter, &mut sink).await
}

async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let started = start(&args.filter, true)?;
    // `--once` waits an interval so that its single report has rates; a
    // continuous watch shows the sockets that exist at start right away.
    let first_report_ns = if args.once {
        started.start_ns + watch::duration_ns(args.report.interval)
    } else {
        started.start_ns
    };
    let feed = WatchFeed::new(
        Watch::new(args.report.config(&args.filter.pids), started.start_ns),
        scope(&args.filter, started.target.as_ref()),
        args.report.interval,
        first_report_ns,
    );
    let mut sink = WatchSink::new(
        feed,
        std::io::stdout().lock(),
        Display::choose(args.json),
        args.once,
    );
    started.run(&args.filter, &mut sink).await
}

fn doctor(args: &ProbeArgs) -> anyhow::Result<()> {
    let (checks, mode) = probes::features::doctor(&base_probe_options(args));
    for check in &checks {
        let mark = if check.ok { "ok  " } else { "FAIL" };
        println!("{mark} {:<12} {}", check.name, check.detail);
    }
    match mode {
        Some(chosen) => {
            println!("mode: {}", chosen.mode);
            println!(
                "attach: {} (per-socket state in {})",
                chosen.attach,
                chosen.attach.store()
            );
            Ok(())
        }
        None => bail!("socktrace cannot run on this kernel (see the failures above)"),
    }
}
