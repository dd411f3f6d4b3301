//! What the user asked to see: the filters (`-p`, `--port`, `-4`/`-6`)
//! and the container scope, with the labels of the processes in it.

use std::net::SocketAddr;

use crate::{
    containers::LabelCache,
    model::{Labels, Owner},
};

/// Whether an event about a socket between these addresses passes the
/// user's filters. The kernel applies the same filters; this catches
/// pre-existing sockets and those whose owner was resolved in userspace.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub pids: Vec<u32>,
    pub port: Option<u16>,
    pub ipv4_only: bool,
    pub ipv6_only: bool,
}

impl Filter {
    pub fn accepts(&self, pid: Option<u32>, local: SocketAddr, remote: SocketAddr) -> bool {
        if !self.pids.is_empty() && !pid.is_some_and(|p| self.pids.contains(&p)) {
            return false;
        }
        if let Some(port) = self.port
            && local.port() != port
            && remote.port() != port
        {
            return false;
        }
        (local.is_ipv4() || !self.ipv4_only) && (local.is_ipv6() || !self.ipv6_only)
    }
}

/// The user's filters plus the container scope, with the per-process
/// labels they need (read from /proc once per process, not per event).
pub struct Scope {
    pub filter: Filter,
    /// Only owners in this PID namespace (`--container`/`--pidns`).
    pub pidns: Option<u64>,
    labels: LabelCache,
}

impl Scope {
    pub fn new(filter: Filter, pidns: Option<u64>) -> Self {
        Self {
            filter,
            pidns,
            labels: LabelCache::new(),
        }
    }

    pub fn wants(&mut self, owner: &Owner, local: SocketAddr, remote: SocketAddr) -> bool {
        self.filter.accepts(owner.pid, local, remote) && self.wants_owner(owner)
    }

    /// The owner part of [`Scope::wants`]: the pid filter and the container.
    pub fn wants_owner(&mut self, owner: &Owner) -> bool {
        if !self.filter.pids.is_empty() && !owner.pid.is_some_and(|p| self.filter.pids.contains(&p))
        {
            return false;
        }
        if let (Some(pid), Some(nspid)) = (owner.pid, owner.nspid) {
            // The kernel checked the namespace and named the pid inside it;
            // remember that, the process may be gone before /proc is read.
            self.labels.learn(pid, nspid, self.pidns);
        }
        // Every owner is checked, not only those found in /proc: a socket
        // found at start keeps its finder's verdict in the kernel until
        // another process claims it, so a host process closing its own
        // socket passes the kernel's filter. One lookup per event, cached.
        match (self.pidns, owner.pid) {
            (Some(pidns), Some(pid)) => self.labels.get(pid).pidns == Some(pidns),
            _ => true,
        }
    }

    pub fn labels(&mut self, pid: u32) -> &Labels {
        self.labels.get(pid)
    }

    pub fn process_exited(&mut self, pid: u32, ktime_ns: u64) {
        self.labels.forget(pid, ktime_ns);
    }

    /// The container stopped: from now on, everything.
    pub fn widen_to_host(&mut self) {
        self.pidns = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_by_pid_port_and_family() {
        let local: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let remote: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        let all = Filter::default();
        assert!(all.accepts(None, local, remote));
        let pid = Filter {
            pids: vec![7],
            ..Filter::default()
        };
        assert!(pid.accepts(Some(7), local, remote));
        assert!(!pid.accepts(Some(8), local, remote));
        assert!(
            !pid.accepts(None, local, remote),
            "unknown owners are not the pid asked for"
        );
        let port = Filter {
            port: Some(80),
            ..Filter::default()
        };
        assert!(port.accepts(None, local, remote));
        assert!(!port.accepts(None, local, local));
        let v6_only = Filter {
            ipv6_only: true,
            ..Filter::default()
        };
        assert!(!v6_only.accepts(None, local, remote));
        assert!(v6_only.accepts(None, v6, v6));
    }
}
