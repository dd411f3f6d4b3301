//! The event loop: drain the ring buffer, decode, hand off to the socket
//! stage, and pass its output to a sink, record by record. Slow work (/proc
//! reads, formatting, I/O) happens in the sink or on ticks, never per ring
//! buffer record.

use std::{io, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    time::{Instant, MissedTickBehavior},
};

use crate::{
    clock::monotonic_ns,
    containers::{Target, pidns_of},
    decode::decode,
    model::Output,
    privileges::Kept,
    probes::{self, Counters, Probes},
    sockets::SocketTable,
};

/// Where the attributed output goes (trace lines, the watch view, ...).
pub trait Sink {
    /// An error of kind `BrokenPipe` ends the run quietly.
    fn output(&mut self, output: &Output) -> io::Result<()>;
    /// Called every `tick`; `counters` reads the loss counters (from the
    /// kernel, so only when a report needs them).
    fn tick(&mut self, now_ns: u64, counters: &dyn Fn() -> Counters) -> io::Result<()>;
    /// Called once at the end.
    fn finish(&mut self, counters: Counters) -> io::Result<()>;
    /// The container we were pointed at stopped and the run goes on host-wide.
    fn container_stopped(&mut self);
    /// The sink has all it wants (`watch --once`): end the run.
    fn done(&self) -> bool {
        false
    }
}

pub struct RunOptions {
    /// Period of the socket stage's and the sink's timers, and of draining the
    /// ring buffer: the kernel wakes the collector early only for a backlog.
    pub tick: Duration,
    pub duration: Option<Duration>,
    /// The container the run is restricted to, if any.
    pub container: Option<Target>,
    /// When that container stops: go on host-wide (true) or end the run.
    pub keep_running: bool,
    /// The capabilities left after attaching (said in the start-up line).
    pub kept: Kept,
}

/// How often to check that the container still has processes.
const CONTAINER_CHECK: Duration = Duration::from_secs(1);
/// How often to look whether events were lost since the last repair (or a
/// disagreement waits for its second look), and if so to heal the socket
/// stage from the kernel's file tables.
const HEAL_CHECK: Duration = Duration::from_secs(1);

/// Runs until SIGINT/SIGTERM, `duration`, or a closed output pipe; returns the
/// final loss counters.
pub async fn run(
    mut probes: Probes,
    mut table: SocketTable,
    sink: &mut dyn Sink,
    options: RunOptions,
) -> anyhow::Result<Counters> {
    let mut ring =
        // SAFETY: the map fd is owned by the RingBuf, which the AsyncFd owns
        // in turn, so it stays open and unchanged.
        unsafe { AsyncFd::register_with_interest(probes.take_events()?, Interest::READABLE) }
            .map_err(io::Error::from)
            .context("polling the ring buffer")?;
    let mut logger = match probes.logger.take() {
        Some(logger) => Some(
            // SAFETY: as for the ring buffer, the logger owns its fd.
            unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
                .map_err(io::Error::from)
                .context("polling the aya-log buffer")?,
        ),
        None => None,
    };
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    // Only now, with the signal handlers in place, is a Ctrl-C a clean stop.
    eprintln!(
        "socktrace: tracing TCP sockets ({} mode; {} attach, per-socket state in {}; capabilities kept: {}); Ctrl-C to stop",
        probes.mode,
        probes.attach,
        probes.attach.store(),
        options.kept
    );
    if !options.kept.bounding_narrowed {
        log::info!("the bounding set is left as it was: narrowing it takes CAP_SETPCAP");
    }
    let mut ticker = tokio::time::interval(options.tick);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let deadline = options.duration.map(|d| Instant::now() + d);
    let mut container = options.container;
    let mut next_container_check = Instant::now() + CONTAINER_CHECK;
    let mut next_heal_check = Instant::now() + HEAL_CHECK;
    let mut undecodable = 0u64;
    // Losses already healed, and the sockets repaired since start.
    let mut healed_losses = 0u64;
    let mut reconciled = 0u64;

    let result: io::Result<()> = async {
        pass_on(&mut table, &mut probes, sink, container.as_ref())?;
        // The sockets found at start are with the sink now; what it took to
        // find them (netlink replies, /proc scans, the output queue) is free.
        table.shrink_output();
        probes::release_freed_memory();
        loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    let ring = guard.get_inner_mut();
                    let (bad, emptied) =
                        feed(ring, &mut table, &mut probes, sink, container.as_ref())?;
                    undecodable += bad;
                    // Stay ready while records remain, so the next turn
                    // drains more after signals and ticks had their chance.
                    if emptied {
                        guard.clear_ready();
                    }
                }
                guard = async { logger.as_mut()?.readable_mut().await.ok() }, if logger.is_some() => {
                    if let Some(mut guard) = guard {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                }
                _ = ticker.tick() => {
                    let now = monotonic_ns();
                    let ring = ring.get_mut();
                    undecodable += feed(ring, &mut table, &mut probes, sink, container.as_ref())?.0;
                    table.tick(now, &mut probes);
                    pass_on(&mut table, &mut probes, sink, container.as_ref())?;
                    if Instant::now() >= next_heal_check {
                        next_heal_check = Instant::now() + HEAL_CHECK;
                        let losses = counters(&probes, &table, undecodable, reconciled).losses();
                        if losses > healed_losses || table.second_look_due(now) {
                            healed_losses = losses;
                            reconciled += heal(&mut probes, &mut table, now);
                            pass_on(&mut table, &mut probes, sink, container.as_ref())?;
                        }
                    }
                    sink.tick(now, &|| counters(&probes, &table, undecodable, reconciled))?;
                    if sink.done() {
                        break;
                    }
                    if Instant::now() >= next_container_check {
                        next_container_check = Instant::now() + CONTAINER_CHECK;
                        if let Some(target) = container.as_ref().filter(|t| !t.is_alive()) {
                            eprintln!(
                                "socktrace: the container's PID namespace (inode {}) has no processes left",
                                target.pidns_ino
                            );
                            if !options.keep_running {
                                break;
                            }
                            if let Err(e) = probes.clear_namespace_filter() {
                                log::warn!("{e:#}");
                            }
                            sink.container_stopped();
                            container = None;
                            eprintln!("socktrace: continuing host-wide (--keep-running)");
                        }
                    }
                }
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                _ = sleep_until(deadline) => break,
            }
        }
        // Whatever is still in the ring when we stop is reported, not lost:
        // detached first, the kernel adds nothing more, so the drain ends
        // even in the middle of a storm.
        probes.detach();
        undecodable += drain(ring.get_mut(), &mut table, &mut probes, sink, container.as_ref())?;
        // Transitions still waiting for their owner are resolved now or
        // shown as unknown: nothing is dropped at exit.
        table.tick(u64::MAX, &mut probes);
        pass_on(&mut table, &mut probes, sink, container.as_ref())
    }
    .await;

    let counters = counters(&probes, &table, undecodable, reconciled);
    match result.and_then(|()| sink.finish(counters)) {
        Ok(()) => Ok(counters),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(counters),
        Err(e) => Err(e).context("writing output"),
    }
}

/// At most this many records per drain: under a storm the kernel refills
/// the ring as fast as we empty it, and the loop must still get to signals
/// and ticks.
const MAX_DRAIN: usize = 65_536;

/// Hands up to [`MAX_DRAIN`] records to the socket stage as they are
/// decoded, and what each one produces straight on to the sink: a queue
/// filled by a whole drain (thousands of records at 10k connections/s)
/// falls out of the cache before the sink reads it. Returns how many
/// records could not be decoded and whether the ring was emptied.
fn feed(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    table: &mut SocketTable,
    probes: &mut Probes,
    sink: &mut dyn Sink,
    container: Option<&Target>,
) -> io::Result<(u64, bool)> {
    let mut undecodable = 0;
    for _ in 0..MAX_DRAIN {
        let Some(record) = ring.next() else {
            return Ok((undecodable, true));
        };
        match decode(&record) {
            Ok(event) => {
                table.on_event(event);
                pass_on(table, probes, sink, container)?;
            }
            Err(e) => {
                undecodable += 1;
                log::debug!("undecodable event: {e}");
            }
        }
    }
    Ok((undecodable, false))
}

/// Feeds until the ring is empty; returns how many records could not be
/// decoded.
fn drain(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    table: &mut SocketTable,
    probes: &mut Probes,
    sink: &mut dyn Sink,
    container: Option<&Target>,
) -> io::Result<u64> {
    let mut undecodable = 0;
    loop {
        let (bad, emptied) = feed(ring, table, probes, sink, container)?;
        undecodable += bad;
        if emptied {
            return Ok(undecodable);
        }
    }
}

fn pass_on(
    table: &mut SocketTable,
    probes: &mut Probes,
    sink: &mut dyn Sink,
    container: Option<&Target>,
) -> io::Result<()> {
    // Read in place and cleared after: outputs are too big to copy out one
    // by one at this rate.
    let outputs = table.output_queue();
    let passed = outputs.iter().try_for_each(|output| {
        if let Output::LearnedOwner {
            kernel_sock_id,
            pid,
            comm,
            state,
        } = output
        {
            let in_pidns = container.is_none_or(|t| pidns_of(*pid) == Some(t.pidns_ino));
            if let Err(e) = probes.set_owner(*kernel_sock_id, *pid, comm, state.raw(), in_pidns) {
                log::warn!("recording the owner of a socket in the kernel map: {e:#}");
            }
            return Ok(());
        }
        sink.output(output)
    });
    outputs.clear();
    passed
}

fn counters(probes: &Probes, table: &SocketTable, undecodable: u64, reconciled: u64) -> Counters {
    let kernel = probes.counters().unwrap_or_else(|e| {
        log::warn!("reading the loss counters: {e:#}");
        Counters::default()
    });
    Counters {
        undecodable,
        ends_unseen: table.ends_unseen(),
        reconciled,
        ..kernel
    }
}

/// Events were lost (a full ring, a skipped probe run, a full socket map):
/// what the socket stage holds may have drifted from the truth. Reads the
/// kernel's own view of who holds which socket and repairs what a second
/// look confirms; returns how many sockets were repaired.
fn heal(probes: &mut Probes, table: &mut SocketTable, now_ns: u64) -> u64 {
    match probes.socket_files() {
        Ok(files) => {
            let repaired = table.reconcile(files, now_ns) as u64;
            log::info!(
                "events were lost: {repaired} sockets repaired from the kernel's file tables"
            );
            repaired
        }
        Err(e) => {
            log::warn!("healing after lost events: {e:#}");
            0
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
