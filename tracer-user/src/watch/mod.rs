//! Stage 4: per-process aggregation for `watch` and `serve`. Finds the
//! process that leaks sockets, the peer involved, and the time left before
//! "too many open files".
//!
//! [`WatchFeed`] hands it attributed transitions ([`Watch::on_transition`],
//! cheap: a few hash updates), process exits, and once per report the fd
//! counts and limits sampled off the event path ([`Watch::tick`]). Each
//! report recounts the live sockets, fits the trends and returns a
//! [`Snapshot`] with the reports, worst first, and the alerts to announce;
//! the views (`crate::output`, `crate::serve`) show it.

pub mod distribution;
mod fd_kinds;
mod feed;
mod forecast;
mod lifecycle;
mod peers;
mod process;
mod rates;
mod verdicts;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use rustc_hash::FxHashMap;
use std::time::Duration;

use crate::clock::duration_ns;
use crate::model::{
    Comm, ExistingSocket, FdKindCounts, Owner, ProcessReport, Snapshot, Transition,
};
use crate::tcp::TcpState;

pub use feed::WatchFeed;

use distribution::Distributions;
use lifecycle::SocketRecord;
use peers::PeerKey;
use process::Process;
use verdicts::AlertBook;

/// Sockets of an exited process keep closing for a moment (the kernel
/// closes its fds); events for them in this time are not pinned on the pid.
const EXIT_GRACE_NS: u64 = 5_000_000_000;

#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// Alert when the soft fd limit is forecast within this time (`--warn-eta`).
    pub warn_eta: Duration,
    /// CLOSE_WAIT sockets older than this count as stuck (`--close-wait-age`).
    pub close_wait_age: Duration,
    /// Alert when fds reach this share of the soft limit, whatever the trend.
    pub fd_usage_threshold: f64,
    /// Only these processes (`-p`); empty means all.
    pub pids: Vec<u32>,
    /// Window of `connects_per_s` and `closes_per_s`.
    pub short_window: Duration,
    /// Window of the `_long` rates and of "opens outpace closes".
    pub long_window: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            warn_eta: Duration::from_secs(3_600),
            close_wait_age: Duration::from_secs(60),
            fd_usage_threshold: 0.9,
            pids: Vec::new(),
            short_window: Duration::from_secs(10),
            long_window: Duration::from_secs(300),
        }
    }
}

/// What the collector read about a process at a tick (`/proc/PID/fd` and
/// RLIMIT_NOFILE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcSample {
    pub fds: u64,
    pub soft_limit: u64,
    pub hard_limit: u64,
}

enum Attribution {
    Owner(u32),
    Unknown,
    /// Outside the `-p` set.
    Excluded,
}

pub struct Watch {
    config: WatchConfig,
    start_ns: u64,
    /// Looked up for every event: a fast hash for kernel addresses and pids.
    sockets: FxHashMap<u64, SocketRecord>,
    processes: FxHashMap<u32, Process>,
    /// pid -> exit time, for [`EXIT_GRACE_NS`]; looked up for every event.
    exited: FxHashMap<u32, u64>,
    /// Distributions of the processes forgotten at the last tick, so that
    /// exporters can report their final values once.
    forgotten: HashMap<u32, Distributions>,
    alerts: AlertBook,
}

impl Watch {
    pub fn new(config: WatchConfig, start_ktime_ns: u64) -> Self {
        Self {
            config,
            start_ns: start_ktime_ns,
            sockets: FxHashMap::default(),
            processes: FxHashMap::default(),
            exited: FxHashMap::default(),
            forgotten: HashMap::new(),
            alerts: AlertBook::default(),
        }
    }

    /// Takes in a socket found at start. Seed listeners first so that the
    /// connections accepted from them are recognised as inbound.
    pub fn on_seeded(&mut self, seeded: &ExistingSocket) {
        let pid = match self.attribute(&seeded.owner, self.start_ns) {
            Attribution::Owner(pid) => Some(pid),
            Attribution::Unknown => None,
            Attribution::Excluded => return,
        };
        let (local_port, start_ns) = (seeded.local.port(), self.start_ns);
        let process = pid.map(|pid| self.process_mut(pid, seeded.owner.comm, start_ns));
        let inbound = process
            .as_ref()
            .is_some_and(|process| process.listen_ports.contains(&local_port));
        let peer = PeerKey::new(seeded.remote, local_port, inbound);
        let mut record = SocketRecord::seeded(seeded.state, seeded.cause, peer, inbound, start_ns);
        record.pid = pid;
        if let Some(process) = process {
            process.add_seeded(&mut record, local_port, start_ns);
        }
        self.sockets.insert(seeded.sock_id, record);
    }

    /// The record of a socket that starts again under the same id, after
    /// the network closed it (or after its CLOSE event was lost): that
    /// connection is over for its owner.
    fn retire_earlier(&mut self, sock_id: u64, ktime_ns: u64) {
        let Some(mut earlier) = self.sockets.remove(&sock_id) else {
            return;
        };
        let process = earlier.pid.and_then(|pid| self.processes.get_mut(&pid));
        if let Some(process) = process.filter(|_| earlier.is_held_connection()) {
            let released = lifecycle::Effects {
                released: true,
                ..lifecycle::Effects::default()
            };
            process.held_live -= 1;
            process.apply(&released, earlier.peer, &mut earlier.peer_hint, ktime_ns);
        }
    }

    pub fn on_transition(&mut self, t: &Transition) {
        let owner = match self.attribute(&t.owner, t.ktime_ns) {
            Attribution::Owner(pid) => Some(pid),
            Attribution::Unknown => None,
            Attribution::Excluded => {
                self.sockets.remove(&t.sock_id);
                return;
            }
        };
        if TcpState::starts_a_socket(t.old, t.new) {
            self.retire_earlier(t.sock_id, t.ktime_ns);
        }
        let config = &self.config;
        let mut process = owner.map(|pid| {
            let process = self
                .processes
                .entry(pid)
                .or_insert_with(|| Process::new(config, t.owner.comm, t.ktime_ns));
            process.set_comm(t.owner.comm);
            process
        });
        let record = match self.sockets.entry(t.sock_id) {
            Entry::Occupied(entry) => entry.into_mut(),
            // First seen as it ends: it holds nothing any more.
            Entry::Vacant(_) if t.new == TcpState::Close => return,
            // Under `-p`, an unowned socket is most likely someone else's.
            Entry::Vacant(_) if owner.is_none() && !config.pids.is_empty() => return,
            Entry::Vacant(entry) => {
                let accepted = t.old == TcpState::Listen && t.new == TcpState::SynRecv;
                let on_our_listener = process
                    .as_ref()
                    .is_some_and(|process| process.listen_ports.contains(&t.local.port()));
                entry.insert(SocketRecord::first_seen(t, accepted || on_our_listener))
            }
        };
        match owner {
            Some(_) => record.pid = owner,
            // Carried from an earlier event.
            None => process = record.pid.and_then(|pid| self.processes.get_mut(&pid)),
        }
        let held_before = record.is_held_connection();
        let effects = record.apply(t, process.is_some());
        if let Some(process) = process {
            process.held_live += i64::from(record.is_held_connection()) - i64::from(held_before);
            process.apply(&effects, record.peer, &mut record.peer_hint, t.ktime_ns);
        }
        if t.new == TcpState::Close {
            self.sockets.remove(&t.sock_id);
        }
    }

    /// The kernel's file tables show that no process holds this socket any
    /// more: its end was among lost events.
    pub fn on_gone(&mut self, sock_id: u64) {
        let Some(record) = self.sockets.remove(&sock_id) else {
            return;
        };
        if let Some(process) = record.pid.and_then(|pid| self.processes.get_mut(&pid)) {
            process.held_live -= i64::from(record.is_held_connection());
            process.reconciled += 1;
        }
    }

    /// A held socket whose start was among lost events, found in the
    /// kernel's file tables.
    pub fn on_found(&mut self, socket: &ExistingSocket) {
        self.on_seeded(socket);
        if let Some(process) = socket
            .owner
            .pid
            .and_then(|pid| self.processes.get_mut(&pid))
        {
            process.reconciled += 1;
        }
    }

    /// A socket's owner became known (or changed) without a state change:
    /// count it as that process's from now on.
    pub fn on_owner_changed(&mut self, sock_id: u64, owner: &Owner, ktime_ns: u64) {
        let Attribution::Owner(pid) = self.attribute(owner, ktime_ns) else {
            return;
        };
        let Some(record) = self.sockets.get_mut(&sock_id) else {
            return;
        };
        // What the process missed while the socket had no owner: its open
        // and who closed first.
        let mut missed = lifecycle::Effects::default();
        if record.pid.is_none() {
            if record.open_pending && record.peer.is_some() {
                record.open_pending = false;
                missed.opened = true;
            }
            if record.closer_known {
                missed.closer = lifecycle::seeded_closer(record.state);
            }
        }
        record.pid = Some(pid);
        let process = self
            .processes
            .entry(pid)
            .or_insert_with(|| Process::new(&self.config, owner.comm, ktime_ns));
        process.apply(&missed, record.peer, &mut record.peer_hint, ktime_ns);
    }

    /// The process is reported once more at the next tick, then forgotten
    /// with its sockets.
    pub fn on_process_exit(&mut self, pid: u32, ktime_ns: u64) {
        if let Some(process) = self.processes.get_mut(&pid) {
            process.exited = true;
            self.exited.insert(pid, ktime_ns);
        }
    }

    /// Processes whose fd count and limits the collector should read before
    /// the next tick: those with TCP activity, and the `-p` set.
    pub fn pids_to_sample(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .processes
            .iter()
            .filter(|(_, process)| !process.exited)
            .map(|(&pid, _)| pid)
            .chain(self.config.pids.iter().copied())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Connect latency, lifetime and CLOSE_WAIT dwell of `pid` since it was
    /// first seen; after the tick that reported it for the last time too.
    pub fn distributions(&self, pid: u32) -> Option<&Distributions> {
        self.processes
            .get(&pid)
            .map(|process| &process.distributions)
            .or_else(|| self.forgotten.get(&pid))
    }

    /// Recounts the live sockets, fits the trends, judges every process.
    /// `lost_events` is the running count of events lost since start.
    pub fn tick(
        &mut self,
        now_ktime_ns: u64,
        samples: &HashMap<u32, ProcSample>,
        lost_events: u64,
    ) -> Snapshot {
        let now = now_ktime_ns;
        let config = &self.config;
        for &pid in config.pids.iter().filter(|pid| samples.contains_key(pid)) {
            self.processes
                .entry(pid)
                .or_insert_with(|| Process::new(config, Comm::default(), now));
        }
        self.count_sockets(now);

        let mut processes = Vec::with_capacity(self.processes.len());
        let mut new_alerts = Vec::new();
        let mut fd_kinds_wanted = Vec::new();
        let quiet_for_ns = duration_ns(self.config.long_window);
        for (&pid, process) in &mut self.processes {
            let sample = samples.get(&pid).copied();
            let (mut report, evidence) = process.report(pid, now, self.start_ns, sample);
            if evidence.fds_unexplained {
                fd_kinds_wanted.push(pid);
            }
            let conditions = if process.exited {
                Vec::new()
            } else {
                verdicts::evaluate(&report, &evidence, &self.config, lost_events)
            };
            let current = |kind| verdicts::figures(kind, &report, &self.config, lost_events);
            let (in_force, announced) =
                self.alerts
                    .update(pid, conditions, current, process.exited, now, quiet_for_ns);
            report.alerts = in_force;
            new_alerts.extend(announced);
            processes.push(report);
        }
        processes.sort_by(worst_first);
        new_alerts.sort_by_key(|alert| (alert.pid, alert.kind));
        self.forget(now);
        Snapshot {
            ktime_ns: now,
            lost_events,
            processes,
            new_alerts,
            fd_kinds_wanted,
        }
    }

    /// A sample of every live process's held count from the event stream,
    /// for the seconds scale of its trends: called every collector tick.
    pub fn sample_fast(&mut self, now_ktime_ns: u64) {
        for process in self.processes.values_mut().filter(|p| !p.exited) {
            process.sample_fast(now_ktime_ns);
        }
    }

    /// The fd kinds the collector read for `pid` (see
    /// [`Snapshot::fd_kinds_wanted`]).
    pub fn record_fd_kinds(&mut self, pid: u32, counts: FdKindCounts, now_ktime_ns: u64) {
        if let Some(process) = self.processes.get_mut(&pid) {
            process
                .fd_kinds
                .get_or_insert_with(Default::default)
                .update(counts, now_ktime_ns);
        }
    }

    /// Whether the fd kinds of `pid` are due a read (at most one every
    /// [`fd_kinds::READ_EVERY_NS`]).
    pub fn fd_kinds_due(&self, pid: u32, now_ktime_ns: u64) -> bool {
        self.processes.get(&pid).is_some_and(|process| {
            process
                .fd_kinds
                .as_ref()
                .is_none_or(|k| k.due(now_ktime_ns))
        })
    }

    fn attribute(&self, owner: &Owner, ktime_ns: u64) -> Attribution {
        let Some(pid) = owner.pid else {
            return Attribution::Unknown;
        };
        if let Some(&exit) = self.exited.get(&pid) {
            // After the exit (the kernel closing its fds), or before it but
            // arriving after its last report (the kernel held it): the
            // process is not brought back.
            if exit <= ktime_ns || !self.processes.contains_key(&pid) {
                return Attribution::Unknown;
            }
        }
        if !self.config.pids.is_empty() && !self.config.pids.contains(&pid) {
            return Attribution::Excluded;
        }
        Attribution::Owner(pid)
    }

    fn process_mut(&mut self, pid: u32, comm: Comm, now_ns: u64) -> &mut Process {
        let process = self
            .processes
            .entry(pid)
            .or_insert_with(|| Process::new(&self.config, comm, now_ns));
        process.set_comm(comm);
        process
    }

    fn count_sockets(&mut self, now_ns: u64) {
        // Sockets never tied to a process and quiet for a long window most
        // likely closed while events were lost.
        let stale_before = now_ns.saturating_sub(duration_ns(self.config.long_window));
        self.sockets
            .retain(|_, record| record.pid.is_some() || record.last_event_ns >= stale_before);
        self.processes.values_mut().for_each(Process::reset_current);
        for record in self.sockets.values() {
            if let Some(process) = record.pid.and_then(|pid| self.processes.get_mut(&pid)) {
                process.count_socket(record, now_ns);
            }
        }
    }

    /// Drops exited processes (reported once more by now) and processes that
    /// hold nothing and have been quiet for a long window.
    fn forget(&mut self, now_ns: u64) {
        let quiet_since = now_ns.saturating_sub(duration_ns(self.config.long_window));
        let gone: Vec<u32> = self
            .processes
            .iter()
            .filter(|&(pid, process)| {
                process.exited
                    || (!process.has_sockets()
                        && process.last_event_ns < quiet_since
                        && !self.config.pids.contains(pid)
                        && !self.alerts.has_pid(*pid))
            })
            .map(|(&pid, _)| pid)
            .collect();
        self.forgotten.clear();
        for pid in &gone {
            if let Some(process) = self.processes.remove(pid) {
                self.forgotten.insert(*pid, process.distributions);
            }
            self.alerts.forget_pid(*pid);
        }
        if !gone.is_empty() {
            let processes = &self.processes;
            self.sockets
                .retain(|_, record| record.pid.is_none_or(|pid| processes.contains_key(&pid)));
        }
        self.exited
            .retain(|_, &mut exit| now_ns.saturating_sub(exit) < EXIT_GRACE_NS);
        for process in self.processes.values_mut() {
            process.peers.evict_quiet(quiet_since);
        }
    }
}

/// Alerting first, then the soonest fd exhaustion, the most CLOSE_WAIT, the
/// fastest net gain, the most held.
fn worst_first(a: &ProcessReport, b: &ProcessReport) -> std::cmp::Ordering {
    let eta = |report: &ProcessReport| report.eta_s.unwrap_or(f64::INFINITY);
    // `false` sorts first: processes with alerts lead.
    a.alerts
        .is_empty()
        .cmp(&b.alerts.is_empty())
        .then_with(|| eta(a).total_cmp(&eta(b)))
        .then_with(|| b.close_wait.cmp(&a.close_wait))
        .then_with(|| b.net_per_s_long.total_cmp(&a.net_per_s_long))
        .then_with(|| b.held.cmp(&a.held))
        .then_with(|| a.pid.cmp(&b.pid))
}

/// Rates and seconds to three decimals: finer digits are noise in the output.
fn round3(value: f64) -> f64 {
    (value * 1e3).round() / 1e3
}
