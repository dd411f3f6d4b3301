//! What every collecting command sets up: the kernel programs, the socket
//! stage seeded with the sockets that already exist, and the collector
//! that runs between them until a signal, `--duration`, or the container's
//! end.

use std::time::Duration;

use anyhow::{Context as _, bail};
use tracer_common::{AF_INET, AF_INET6, HOLD_NS, NamespaceFilter};

use crate::{
    clock,
    collector::{self, RunOptions, Sink},
    containers::{Target, TargetSpec},
    model::one_per_socket,
    privileges::{self, Kept},
    probes::{ProbeOptions, Probes},
    procfs,
    scope::{Filter, Scope},
    sockets::{Delays, SocketTable},
};

/// Transitions wait this long for their owner (accept) before being shown
/// as unknown, after the longest the kernel may hold them.
const OWNER_GRACE: Duration = Duration::from_secs(1);
/// How often the collector drains the ring buffer and runs its timers: the
/// longest an event waits in the ring before it is shown.
const COLLECTOR_TICK: Duration = Duration::from_millis(100);
/// After an owner exits, look for the socket's new holder this much later
/// (and after the longest the kernel may hold the transitions of its exit).
const REHOME_DELAY: Duration = Duration::from_millis(100);
/// The longest the kernel holds a transition when the peer answers: a SYN
/// is first retransmitted after a second, when the kernel reports it.
const HELD_AT_MOST: Duration = Duration::from_millis(1_100);

/// What the user asked of the collecting part, whatever the command.
#[derive(Clone, Debug)]
pub struct Options {
    pub filter: Filter,
    pub target: Option<TargetSpec>,
    /// Sizes, probe mode and attach type; the filters are filled in here.
    pub probes: ProbeOptions,
    pub duration: Option<Duration>,
    /// When the container stops, go on host-wide instead of ending.
    pub keep_running: bool,
}

/// Probes attached and sockets seeded, ready to run.
pub struct Started {
    pub probes: Probes,
    table: SocketTable,
    target: Option<Target>,
    pub start_ns: u64,
    /// The capabilities left after attaching.
    kept: Kept,
    duration: Option<Duration>,
    keep_running: bool,
    filter: Filter,
}

/// `hold_transitions` for the commands that aggregate: the kernel holds a
/// socket's transitions into states TCP's timers end and sends them with
/// the next one (half the records), where `trace` shows each as it
/// happens.
pub fn start(options: &Options, hold_transitions: bool) -> anyhow::Result<Started> {
    let target = options
        .target
        .as_ref()
        .map(TargetSpec::resolve)
        .transpose()?;
    let hold_ns = if hold_transitions { HOLD_NS } else { 0 };
    let mut probes = Probes::load(&ProbeOptions {
        hold_ns,
        ..probe_options(options, target.as_ref())?
    })?;
    let start_ns = clock::monotonic_ns();
    // The longest a transition waits in the kernel, then in the ring.
    let latest_ns = if hold_transitions {
        clock::duration_ns(HELD_AT_MOST + COLLECTOR_TICK)
    } else {
        0
    };
    let mut table = SocketTable::new(Delays {
        owner_grace_ns: clock::duration_ns(OWNER_GRACE) + latest_ns,
        rehome_ns: clock::duration_ns(REHOME_DELAY) + latest_ns,
    });
    // Seeded after attaching, so no socket falls between the two; only the
    // container's network namespace when pointed at one (a kernel filter).
    let existing = probes
        .socket_files()
        .context("reading the sockets that already exist")?;
    table.seed(one_per_socket(existing));
    // Attached and seeded: from here on the collector only reads.
    let kept = privileges::drop_after_attach(|| probes.check_steady_state())
        .context("dropping the capabilities not needed after attaching")?;
    Ok(Started {
        probes,
        table,
        target,
        start_ns,
        kept,
        duration: options.duration,
        keep_running: options.keep_running,
        filter: options.filter.clone(),
    })
}

/// The kernel's share of the filters: pids, port, family, namespace.
fn probe_options(options: &Options, target: Option<&Target>) -> anyhow::Result<ProbeOptions> {
    let filter = &options.filter;
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
        family: match (filter.ipv4_only, filter.ipv6_only) {
            (true, _) => Some(AF_INET),
            (_, true) => Some(AF_INET6),
            _ => None,
        },
        ..options.probes.clone()
    })
}

impl Started {
    /// What the views show: the user's filters within the container.
    pub fn scope(&self) -> Scope {
        Scope::new(
            self.filter.clone(),
            self.target.as_ref().map(|t| t.pidns_ino),
        )
    }

    /// Runs the collector into `sink` until a signal, `--duration`, or the
    /// container's end.
    pub async fn run(self, sink: &mut dyn Sink) -> anyhow::Result<()> {
        collector::run(
            self.probes,
            self.table,
            sink,
            RunOptions {
                tick: COLLECTOR_TICK,
                duration: self.duration,
                container: self.target,
                keep_running: self.keep_running,
                kept: self.kept,
            },
        )
        .await?;
        Ok(())
    }
}
