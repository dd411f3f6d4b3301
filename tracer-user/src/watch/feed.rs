//! Keeps a [`Watch`] fed from the socket stage, for `watch` and `serve`
//! alike: the outputs the scope wants as they come, the held counts at every
//! collector tick, and once per interval the fd counts and limits read from
//! /proc (never per event); the reports it makes get their labels.

use std::{collections::HashMap, time::Duration};

use super::{ProcSample, Watch};
use crate::{
    clock::duration_ns,
    model::{Output, Snapshot},
    procfs,
    scope::Scope,
};

/// Keeps a [`Watch`] fed: hands it the outputs the scope wants and, once
/// per interval, the fd samples, and labels the reports it makes.
pub struct WatchFeed {
    watch: Watch,
    scope: Scope,
    interval_ns: u64,
    next_report_ns: u64,
}

impl WatchFeed {
    /// Reports every `interval`, the first at `first_report_ns`.
    pub fn new(watch: Watch, scope: Scope, interval: Duration, first_report_ns: u64) -> Self {
        Self {
            watch,
            scope,
            interval_ns: duration_ns(interval),
            next_report_ns: first_report_ns,
        }
    }

    pub fn watch(&self) -> &Watch {
        &self.watch
    }

    pub fn output(&mut self, output: &Output) {
        match output {
            Output::Existing(s) => {
                // Our own sockets (serve's listener) found at start; the
                // kernel programs already skip our events.
                let ours = s.owner.pid == Some(std::process::id());
                if !ours && self.scope.wants(&s.owner, s.local, s.remote) {
                    self.watch.on_seeded(s);
                }
            }
            Output::Transition(t) => {
                if self.scope.wants(&t.owner, t.local, t.remote) {
                    self.watch.on_transition(t);
                }
            }
            &Output::ProcessExit { pid, ktime_ns } => {
                self.watch.on_process_exit(pid, ktime_ns);
                self.scope.process_exited(pid, ktime_ns);
            }
            Output::OwnerChanged {
                sock_id,
                owner,
                ktime_ns,
            } => {
                if self.scope.wants_owner(owner) {
                    self.watch.on_owner_changed(*sock_id, owner, *ktime_ns);
                }
            }
            &Output::Gone { sock_id, .. } => self.watch.on_gone(sock_id),
            Output::Found(s) => {
                if self.scope.wants(&s.owner, s.local, s.remote) {
                    self.watch.on_found(s);
                }
            }
            Output::LearnedOwner { .. } => {}
        }
    }

    /// Whether a report is due at `now_ns`; if so, the next one is due an
    /// interval later.
    pub fn due(&mut self, now_ns: u64) -> bool {
        if now_ns < self.next_report_ns {
            return false;
        }
        self.next_report_ns = now_ns.saturating_add(self.interval_ns);
        true
    }

    /// Called every collector tick: the held counts for the seconds scale
    /// of the trends (from the event stream, no /proc read).
    pub fn sample(&mut self, now_ns: u64) {
        self.watch.sample_fast(now_ns);
    }

    /// Samples fds and limits, judges every process, labels the reports;
    /// reads the fd kinds of the processes whose fds rise for reasons
    /// other than TCP.
    pub fn report(&mut self, now_ns: u64, lost_events: u64) -> Snapshot {
        let samples = sample(&self.watch.pids_to_sample());
        let mut snapshot = self.watch.tick(now_ns, &samples, lost_events);
        for process in &mut snapshot.processes {
            process.labels = self.scope.labels(process.pid).clone();
        }
        for &pid in &snapshot.fd_kinds_wanted {
            if !self.watch.fd_kinds_due(pid, now_ns) {
                continue;
            }
            match procfs::fd_kinds(pid) {
                Ok(kinds) => self.watch.record_fd_kinds(pid, kinds, now_ns),
                Err(e) if procfs::is_vanished(&e) => {}
                Err(e) => log::debug!("reading the fd kinds of pid {pid}: {e}"),
            }
        }
        snapshot
    }

    pub fn container_stopped(&mut self) {
        self.scope.widen_to_host();
    }
}

/// fd counts and RLIMIT_NOFILE of each process, read once per report.
fn sample(pids: &[u32]) -> HashMap<u32, ProcSample> {
    pids.iter()
        .filter_map(|&pid| {
            // No fd at all: the process is exiting (the kernel closes its
            // files just after the exit event that the next drain brings),
            // and a count of 0 beside its held sockets would be a lie.
            let fds = procfs::fd_count(pid).ok().filter(|&fds| fds > 0)?;
            let (soft_limit, hard_limit) = procfs::nofile_limits(pid).ok()?;
            Some((
                pid,
                ProcSample {
                    fds,
                    soft_limit,
                    hard_limit,
                },
            ))
        })
        .collect()
}
