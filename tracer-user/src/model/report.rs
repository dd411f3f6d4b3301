//! What `watch` and `serve` report: one record per process per interval,
//! its peers and alerts, serialized as the JSON Lines bodies (see
//! [`super::records`]) and read by the views.

use std::collections::BTreeMap;

use serde::{Serialize, Serializer};

/// The peer that stands for the peers merged beyond the top ones.
pub const OTHER_PEERS: &str = "other";

/// Distribution of CLOSE_WAIT dwell: from the peer's FIN to the owner's
/// close, or to now for sockets still waiting.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct DwellSummary {
    pub count: u64,
    pub p50_s: f64,
    pub p90_s: f64,
    pub p99_s: f64,
    pub max_s: f64,
}

/// One process at one tick. Serialized as the body of a JSON `process` line.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcessReport {
    pub pid: u32,
    pub comm: String,
    /// The process exited since the last tick; this is its last report.
    pub exited: bool,
    /// Connections opened (connect or accept) per second, short window.
    pub connects_per_s: f64,
    /// Connections the process closed per second, short window.
    pub closes_per_s: f64,
    /// `connects_per_s - closes_per_s`: sockets gained per second.
    pub net_per_s: f64,
    pub connects_per_s_long: f64,
    pub closes_per_s_long: f64,
    pub net_per_s_long: f64,
    /// The span the `_long` rates cover: the long window, or the time since
    /// socktrace started when that is shorter.
    pub long_window_s: f64,
    /// Connections opened (connect or accept) since the process was first
    /// seen.
    pub connects_total: u64,
    /// Connections the process closed since it was first seen.
    pub closes_total: u64,
    /// Live TCP sockets by state name (listeners included).
    pub sockets: BTreeMap<&'static str, u64>,
    /// Connections not yet closed by the process (listeners excluded).
    pub held: u64,
    pub close_wait: u64,
    pub close_wait_oldest_s: Option<f64>,
    /// The oldest was in CLOSE_WAIT before socktrace started: its age is
    /// counted from the start, so it is at least that old.
    pub close_wait_oldest_lower_bound: bool,
    pub close_wait_dwell_s: Option<DwellSummary>,
    /// Held sockets the network closed (CLOSED_HELD)...
    pub closed_held: u64,
    /// ... by why the kernel closed them (`reset`, `timed_out`, ...).
    pub closed_held_causes: BTreeMap<&'static str, u64>,
    /// Time since the connection of the oldest of them ended.
    pub closed_held_oldest_s: Option<f64>,
    pub fds: Option<u64>,
    pub fd_soft_limit: Option<u64>,
    pub fd_hard_limit: Option<u64>,
    /// Robust slope of the fd count over the trend window.
    pub fd_growth_per_s: Option<f64>,
    /// Seconds until the soft limit; `None` unless fds are rising.
    pub eta_s: Option<f64>,
    /// The window the ETA's trend was measured over (5 s to 1 h).
    pub eta_window_s: Option<f64>,
    /// What the process's fds are, read from /proc when they rise faster
    /// than its TCP sockets explain; `None` otherwise.
    pub fd_kinds: Option<FdKindCounts>,
    /// The kinds that grew between the last two reads, most first.
    #[serde(serialize_with = "serialize_rising")]
    pub fd_kinds_rising: Vec<(&'static str, u64)>,
    /// Conditions in force now (serialized as their kinds).
    #[serde(serialize_with = "alert_kinds")]
    pub alerts: Vec<Alert>,
    /// Busiest peers first.
    pub peers: Vec<PeerReport>,
    /// Sockets of the process repaired from the kernel's file tables after
    /// lost events (their start or end was lost): its figures were healed.
    pub reconciled: u64,
    /// Container labels (`nspid`, `pidns`, `container`), filled in by the
    /// collector from /proc.
    #[serde(flatten)]
    pub labels: Labels,
}

fn alert_kinds<S: Serializer>(alerts: &[Alert], serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(alerts.iter().map(|alert| alert.kind))
}

#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub ktime_ns: u64,
    /// Events lost since start, as counted by the kernel programs.
    pub lost_events: u64,
    /// Worst first.
    pub processes: Vec<ProcessReport>,
    /// Alerts raised, worse, or resolved at this tick.
    pub new_alerts: Vec<Alert>,
    /// Processes whose fd kinds the collector should read from /proc:
    /// their fds rise faster than their TCP sockets explain.
    pub fd_kinds_wanted: Vec<u32>,
}

/// One remote endpoint as reported.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PeerReport {
    /// `ip:port`; `ip:*` for inbound clients; `other` for the merged rest.
    pub remote: String,
    /// The local listening port, for inbound clients.
    pub local_port: Option<u16>,
    pub opened: u64,
    pub closed: u64,
    /// Connections held: open, in CLOSE_WAIT, or CLOSED_HELD.
    pub held: u64,
    pub close_wait: u64,
    /// Held sockets the network closed (reset, timed out, ...).
    pub closed_held: u64,
    /// Who closed first.
    pub local_closed_first: u64,
    pub peer_closed_first: u64,
    pub network_closed_first: u64,
    /// How the kernel ended connections with an error, by cause.
    pub reset: u64,
    pub timed_out: u64,
    pub refused: u64,
    pub unreachable: u64,
    pub other_error: u64,
    /// Mean time from ESTABLISHED to CLOSE of the connections that ended.
    pub lifetime_mean_s: Option<f64>,
    /// Longest lifetime, counting connections still open at their age now.
    pub lifetime_max_s: Option<f64>,
    /// Inferred idle timeout of the peer, when it closes idle connections
    /// after a consistent time.
    pub peer_idle_timeout_s: Option<f64>,
}

impl PeerReport {
    /// Share of the ended or ending connections where the peer closed first.
    pub fn peer_closed_first_share(&self) -> Option<f64> {
        let decided = self.local_closed_first + self.peer_closed_first + self.network_closed_first;
        (decided > 0).then(|| self.peer_closed_first as f64 / decided as f64)
    }

    /// "to 10.0.0.5:17000" or "from 10.0.0.7 on :8080", for sentences.
    pub fn phrase(&self) -> String {
        match self.local_port {
            Some(port) => {
                let client = self.remote.strip_suffix(":*").unwrap_or(&self.remote);
                format!("from {client} on :{port}")
            }
            None if self.remote == OTHER_PEERS => "to other peers".to_string(),
            None => format!("to {}", self.remote),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The soft RLIMIT_NOFILE will be reached within `--warn-eta`, or usage
    /// is past the threshold.
    FdExhaustion,
    /// Stranded sockets (CLOSE_WAIT, CLOSED_HELD) keep piling up and are
    /// old.
    CloseWait,
    /// Opens outpace closes and the held count keeps growing.
    SocketGrowth,
}

impl AlertKind {
    pub const ALL: [Self; 3] = [Self::FdExhaustion, Self::CloseWait, Self::SocketGrowth];

    /// As it appears in JSON and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::FdExhaustion => "fd_exhaustion",
            Self::CloseWait => "close_wait",
            Self::SocketGrowth => "socket_growth",
        }
    }
}

/// Where an alert is in its life, as its JSON line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    /// The condition began to hold.
    Raised,
    /// It got twice as bad since it was last announced.
    Worse,
    /// The leak stopped (no new high for a long window, or nothing left),
    /// or the process exited.
    Resolved,
}

/// One verdict about one process, with its evidence.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Alert {
    pub kind: AlertKind,
    pub state: AlertState,
    pub pid: u32,
    pub comm: String,
    /// The remote endpoint most responsible (`ip:port`, or `ip:*` for
    /// inbound clients), if any; none when the fds that grow are not TCP.
    pub remote: Option<String>,
    pub eta_s: Option<f64>,
    pub close_wait: u64,
    pub closed_held: u64,
    pub held: u64,
    pub fds: Option<u64>,
    pub fd_soft_limit: Option<u64>,
    /// Events lost since start; the figures may be low by up to this much.
    pub lost_events: u64,
    pub message: String,
}

/// The container a process runs in, from its cgroup path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Container {
    /// The runtime's container id, when the cgroup path carries one.
    pub id: Option<String>,
    /// `docker`, `containerd`, `cri-o` or `podman`, when recognised.
    pub runtime: Option<&'static str>,
    pub cgroup: String,
}

/// How a process is known inside and outside its container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Labels {
    /// The pid as seen inside the process's own PID namespace.
    pub nspid: Option<u32>,
    /// Inode of the PID namespace.
    pub pidns: Option<u64>,
    pub container: Option<Container>,
}

/// fds by kind, e.g. `{"pipe": 512, "tcp": 3}`.
pub type FdKindCounts = BTreeMap<&'static str, u64>;

/// `fd_kinds_rising` as a JSON object, most first: `{"pipe": 95}`.
pub fn serialize_rising<S: Serializer>(
    rising: &[(&'static str, u64)],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(rising.iter().map(|(kind, grew)| (kind, grew)))
}
