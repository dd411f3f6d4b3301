//! Per remote endpoint accounting of one process: who it talks to, who
//! closes first, how long connections live, and the peer's idle timeout
//! inferred from when it hangs up.

use std::net::{IpAddr, SocketAddr};

use rustc_hash::FxHashMap;

use super::round3;
use crate::model::{OTHER_PEERS, PeerReport};
use crate::tcp::CloseCause;

/// Peers tracked one by one per process; the rest share the "other" entry so
/// that a process talking to thousands of hosts costs bounded memory.
pub const MAX_PEERS: usize = 64;
/// Peers listed in a report; the rest are summed into "other".
const REPORTED_PEERS: usize = 16;
/// Dwell samples kept per peer for the idle timeout inference.
const DWELL_SAMPLES: usize = 16;
/// Peers that hang up sooner than this after the connection was opened are
/// answering a request with a close (HTTP/1.0 style), not timing out.
const MIN_IDLE_TIMEOUT_MS: u32 = 1_000;
/// The dwells must agree this closely with their median ...
const IDLE_SPREAD: f64 = 0.2;
/// ... in this share of the samples, and in at least three of them.
const IDLE_AGREEING_SHARE: f64 = 0.75;
const MIN_IDLE_AGREEING: usize = 3;

/// Who a connection is with. Outbound connections are keyed by the remote
/// address and port. Inbound ones by the client address and the local
/// (listening) port: each client connects from a fresh ephemeral port, which
/// would make every connection a peer of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub ip: IpAddr,
    /// `None` for inbound connections.
    pub port: Option<u16>,
    /// The listening port, for inbound connections.
    pub local_port: Option<u16>,
}

impl PeerKey {
    /// `None` while the remote end is not known yet.
    pub fn new(remote: SocketAddr, local_port: u16, inbound: bool) -> Option<Self> {
        if remote.ip().is_unspecified() || remote.port() == 0 {
            return None;
        }
        Some(Self {
            ip: remote.ip(),
            port: (!inbound).then_some(remote.port()),
            local_port: inbound.then_some(local_port),
        })
    }

    /// `10.0.0.5:17000`, `[::1]:17000`, or `10.0.0.7:*` for inbound clients.
    pub fn remote_label(&self) -> String {
        let port = self
            .port
            .map_or_else(|| "*".to_string(), |port| port.to_string());
        match self.ip {
            IpAddr::V4(ip) => format!("{ip}:{port}"),
            IpAddr::V6(ip) => format!("[{ip}]:{port}"),
        }
    }
}

/// How a connection's end began.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closer {
    /// The owner closed first (ESTABLISHED -> FIN_WAIT1).
    Local,
    /// The peer's FIN came first (ESTABLISHED -> CLOSE_WAIT).
    Peer,
    /// The network ended it first: straight to CLOSE (or CLOSED_HELD) by a
    /// reset, a timeout, a failed connect, or the owner's abort.
    Network,
}

/// The last few ESTABLISHED dwells before the peer's FIN, in milliseconds.
#[derive(Clone, Copy, Debug, Default)]
struct PeerCloseDwells {
    ms: [u32; DWELL_SAMPLES],
    len: usize,
    next: usize,
}

impl PeerCloseDwells {
    fn push(&mut self, dwell_ns: u64) {
        let ms = u32::try_from(dwell_ns / 1_000_000).unwrap_or(u32::MAX);
        if let Some(slot) = self.ms.get_mut(self.next) {
            *slot = ms;
        }
        self.next = (self.next + 1) % DWELL_SAMPLES;
        self.len = (self.len + 1).min(DWELL_SAMPLES);
    }

    /// The peer's idle timeout in seconds, when it keeps closing connections
    /// after about the same time. For a connection that carried a request,
    /// the dwell also includes the request itself; requests are short next to
    /// idle timeouts, and scattered dwells give no answer at all.
    fn idle_timeout_s(&self) -> Option<f64> {
        if self.len < MIN_IDLE_AGREEING {
            return None;
        }
        let mut sorted = self.ms;
        let sorted = sorted.get_mut(..self.len)?;
        sorted.sort_unstable();
        let (lower, upper) = (sorted.get((self.len - 1) / 2)?, sorted.get(self.len / 2)?);
        let median = (f64::from(*lower) + f64::from(*upper)) / 2.0;
        if median < f64::from(MIN_IDLE_TIMEOUT_MS) {
            return None;
        }
        let agreeing = sorted
            .iter()
            .filter(|&&ms| (f64::from(ms) - median).abs() <= IDLE_SPREAD * median)
            .count();
        let enough = agreeing >= MIN_IDLE_AGREEING
            && agreeing as f64 >= IDLE_AGREEING_SHARE * self.len as f64;
        enough.then_some(median / 1000.0)
    }
}

#[derive(Clone, Debug, Default)]
pub struct PeerStats {
    pub opened: u64,
    pub closed: u64,
    pub local_closed_first: u64,
    pub peer_closed_first: u64,
    pub network_closed_first: u64,
    /// Connections the kernel ended with an error, by [`CloseCause`].
    causes: [u64; CloseCause::ALL.len()],
    lifetimes: u64,
    lifetime_total_ns: u128,
    lifetime_max_ns: u64,
    peer_close_dwells: PeerCloseDwells,
    pub last_event_ns: u64,
    /// Recounted from the socket table at every tick.
    pub held: u64,
    pub close_wait: u64,
    pub closed_held: u64,
    pub oldest_open_ns: u64,
}

impl PeerStats {
    pub fn record_closer(&mut self, closer: Closer) {
        match closer {
            Closer::Local => self.local_closed_first += 1,
            Closer::Peer => self.peer_closed_first += 1,
            Closer::Network => self.network_closed_first += 1,
        }
    }

    pub fn record_cause(&mut self, cause: CloseCause) {
        self.causes[cause as usize] += 1;
    }

    /// A connection ended `lifetime_ns` after it was established.
    pub fn record_lifetime(&mut self, lifetime_ns: u64) {
        self.lifetimes += 1;
        self.lifetime_total_ns += u128::from(lifetime_ns);
        self.lifetime_max_ns = self.lifetime_max_ns.max(lifetime_ns);
    }

    /// The peer's FIN arrived `dwell_ns` after the connection was established.
    pub fn record_peer_close_after(&mut self, dwell_ns: u64) {
        self.peer_close_dwells.push(dwell_ns);
    }

    pub fn reset_current(&mut self) {
        self.held = 0;
        self.close_wait = 0;
        self.closed_held = 0;
        self.oldest_open_ns = 0;
    }

    /// Folds `self` into the "other" entry. Dwells are not merged: an idle
    /// timeout means something only for one peer.
    fn merge_into(&self, other: &mut PeerStats) {
        other.opened += self.opened;
        other.closed += self.closed;
        other.local_closed_first += self.local_closed_first;
        other.peer_closed_first += self.peer_closed_first;
        other.network_closed_first += self.network_closed_first;
        for (other, ours) in other.causes.iter_mut().zip(self.causes) {
            *other += ours;
        }
        other.lifetimes += self.lifetimes;
        other.lifetime_total_ns += self.lifetime_total_ns;
        other.lifetime_max_ns = other.lifetime_max_ns.max(self.lifetime_max_ns);
        other.last_event_ns = other.last_event_ns.max(self.last_event_ns);
        other.held += self.held;
        other.close_wait += self.close_wait;
        other.closed_held += self.closed_held;
        other.oldest_open_ns = other.oldest_open_ns.max(self.oldest_open_ns);
    }

    fn is_empty(&self) -> bool {
        self.opened == 0 && self.closed == 0 && self.held == 0
    }

    fn cause_count(&self, cause: CloseCause) -> u64 {
        self.causes[cause as usize]
    }

    fn report(&self, remote: String, local_port: Option<u16>) -> PeerReport {
        let lifetime_max_ns = self.lifetime_max_ns.max(self.oldest_open_ns);
        PeerReport {
            remote,
            local_port,
            opened: self.opened,
            closed: self.closed,
            held: self.held,
            close_wait: self.close_wait,
            closed_held: self.closed_held,
            local_closed_first: self.local_closed_first,
            peer_closed_first: self.peer_closed_first,
            network_closed_first: self.network_closed_first,
            reset: self.cause_count(CloseCause::Reset),
            timed_out: self.cause_count(CloseCause::TimedOut),
            refused: self.cause_count(CloseCause::Refused),
            unreachable: self.cause_count(CloseCause::Unreachable),
            other_error: self.cause_count(CloseCause::Other),
            lifetime_mean_s: (self.lifetimes > 0)
                .then(|| round3(self.lifetime_total_ns as f64 / self.lifetimes as f64 / 1e9)),
            lifetime_max_s: (lifetime_max_ns > 0).then(|| round3(lifetime_max_ns as f64 / 1e9)),
            peer_idle_timeout_s: self.peer_close_dwells.idle_timeout_s().map(round3),
        }
    }
}

/// The peers of one process.
#[derive(Clone, Debug, Default)]
pub struct PeerTable {
    /// Where each peer's entry is in `entries`.
    index: FxHashMap<PeerKey, u32>,
    entries: Vec<(PeerKey, PeerStats)>,
    other: PeerStats,
}

impl PeerTable {
    /// The entry of `key`, created while there is room; "other" after that.
    /// `hint` is where the socket found its peer last time: checked by key,
    /// so a stale hint (the owner changed, peers were evicted) costs only
    /// the hash lookup it saves when it is right, as it nearly always is.
    pub fn stats_mut(&mut self, key: PeerKey, hint: &mut u32) -> &mut PeerStats {
        let at = match self.find(&key, *hint) {
            Some(at) => at,
            None if self.entries.len() < MAX_PEERS => {
                let at = self.entries.len();
                self.index.insert(key, at as u32);
                self.entries.push((key, PeerStats::default()));
                at
            }
            None => return &mut self.other,
        };
        *hint = at as u32;
        &mut self.entries[at].1
    }

    /// The entry of `key` if it has one, else "other"; never inserts.
    pub fn existing_mut(&mut self, key: &PeerKey, hint: u32) -> &mut PeerStats {
        match self.find(key, hint) {
            Some(at) => &mut self.entries[at].1,
            None => &mut self.other,
        }
    }

    fn find(&self, key: &PeerKey, hint: u32) -> Option<usize> {
        let hint = hint as usize;
        if self
            .entries
            .get(hint)
            .is_some_and(|(at_hint, _)| at_hint == key)
        {
            return Some(hint);
        }
        self.index.get(key).map(|&at| at as usize)
    }

    pub fn reset_current(&mut self) {
        self.entries
            .iter_mut()
            .for_each(|(_, stats)| stats.reset_current());
        self.other.reset_current();
    }

    /// Makes room for new peers once the table is full: peers holding
    /// nothing and quiet since `quiet_since_ns` fold into "other".
    pub fn evict_quiet(&mut self, quiet_since_ns: u64) {
        if self.entries.len() < MAX_PEERS {
            return;
        }
        let other = &mut self.other;
        self.entries.retain(|(_, stats)| {
            let keep = stats.held > 0 || stats.last_event_ns >= quiet_since_ns;
            if !keep {
                stats.merge_into(other);
            }
            keep
        });
        // Entries after an evicted one moved down: index them again.
        self.index = self
            .entries
            .iter()
            .enumerate()
            .map(|(at, (key, _))| (*key, at as u32))
            .collect();
    }

    /// The busiest peers first (most held, then most opened), at most
    /// [`REPORTED_PEERS`] of them and then "other" if it has anything.
    pub fn report(&self) -> Vec<PeerReport> {
        let mut ranked: Vec<(&PeerKey, &PeerStats)> = self
            .entries
            .iter()
            .map(|(key, stats)| (key, stats))
            .collect();
        ranked.sort_by(|(a_key, a), (b_key, b)| {
            (b.held, b.close_wait, b.opened)
                .cmp(&(a.held, a.close_wait, a.opened))
                .then_with(|| a_key.remote_label().cmp(&b_key.remote_label()))
        });
        let mut other = self.other.clone();
        for (_, stats) in ranked.iter().skip(REPORTED_PEERS) {
            stats.merge_into(&mut other);
        }
        let mut reports: Vec<PeerReport> = ranked
            .iter()
            .take(REPORTED_PEERS)
            .map(|(key, stats)| stats.report(key.remote_label(), key.local_port))
            .collect();
        if !other.is_empty() {
            reports.push(other.report(OTHER_PEERS.to_string(), None));
        }
        reports
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn dwells(ms: &[u64]) -> PeerCloseDwells {
        let mut dwells = PeerCloseDwells::default();
        for &dwell in ms {
            dwells.push(dwell * MS);
        }
        dwells
    }

    #[test]
    fn consistent_dwell_gives_idle_timeout() {
        let timeout = dwells(&[10_020, 9_990, 10_150, 10_003]).idle_timeout_s();
        assert!((timeout.unwrap() - 10.0).abs() < 0.2);
    }

    #[test]
    fn request_then_idle_gives_two_seconds() {
        // Connect, one request (a few ms), then 2 s idle before the peer's FIN.
        let timeout = dwells(&[2_004, 2_011, 2_003, 2_007, 2_005]).idle_timeout_s();
        assert!((timeout.unwrap() - 2.0).abs() < 0.05);
    }

    #[test]
    fn scattered_dwell_gives_nothing() {
        assert_eq!(
            dwells(&[1_200, 5_000, 12_000, 30_000, 3_300]).idle_timeout_s(),
            None
        );
        assert_eq!(dwells(&[]).idle_timeout_s(), None);
    }

    #[test]
    fn two_samples_are_not_enough() {
        assert_eq!(dwells(&[10_000, 10_000]).idle_timeout_s(), None);
    }

    #[test]
    fn prompt_close_after_response_is_no_timeout() {
        assert_eq!(dwells(&[3, 4, 3, 5, 4]).idle_timeout_s(), None);
    }

    #[test]
    fn one_outlier_among_many_is_tolerated() {
        let timeout = dwells(&[10_000, 10_100, 9_900, 10_050, 45_000]).idle_timeout_s();
        assert!((timeout.unwrap() - 10.05).abs() < 0.01);
    }

    #[test]
    fn ring_keeps_the_latest_dwells() {
        let mut samples = vec![30_000; DWELL_SAMPLES];
        samples.extend([2_000; DWELL_SAMPLES]);
        let timeout = dwells(&samples).idle_timeout_s();
        assert_eq!(timeout, Some(2.0));
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn labels() {
        let out = PeerKey::new(addr("10.0.0.5:17000"), 40000, false).unwrap();
        assert_eq!(out.remote_label(), "10.0.0.5:17000");
        let inbound = PeerKey::new(addr("[::1]:51000"), 8080, true).unwrap();
        assert_eq!(inbound.remote_label(), "[::1]:*");
        assert_eq!(inbound.local_port, Some(8080));
        assert_eq!(PeerKey::new(addr("0.0.0.0:0"), 8080, false), None);
    }

    #[test]
    fn table_is_bounded_and_reports_other() {
        let mut table = PeerTable::default();
        for port in 0..(MAX_PEERS as u16 + 10) {
            let key = PeerKey::new(addr(&format!("10.0.0.1:{}", 1000 + port)), 1, false).unwrap();
            table.stats_mut(key, &mut 0).opened += 1;
        }
        assert_eq!(table.entries.len(), MAX_PEERS);
        let reports = table.report();
        assert_eq!(reports.len(), REPORTED_PEERS + 1);
        let other = reports.last().unwrap();
        assert_eq!(other.remote, "other");
        assert_eq!(other.opened, (MAX_PEERS + 10 - REPORTED_PEERS) as u64);

        // Quiet peers make room again.
        table.evict_quiet(1);
        assert!(table.entries.is_empty());
        let key = PeerKey::new(addr("10.0.0.2:80"), 1, false).unwrap();
        table.stats_mut(key, &mut 0).opened += 1;
        assert_eq!(table.entries.len(), 1);
    }

    #[test]
    fn hints_that_went_stale_are_not_trusted() {
        let mut table = PeerTable::default();
        let peer = |port: u16| PeerKey::new(addr(&format!("10.0.0.1:{port}")), 1, false).unwrap();
        let (mut quiet_hint, mut busy_hint) = (0, 0);
        table.stats_mut(peer(1), &mut quiet_hint).opened += 1;
        table.stats_mut(peer(2), &mut busy_hint).held += 1;
        assert_eq!((quiet_hint, busy_hint), (0, 1));
        for port in 3..=MAX_PEERS as u16 {
            table.stats_mut(peer(port), &mut 0).held += 1;
        }

        // The quiet peer goes, and every other moves down one place.
        table.evict_quiet(1);
        assert_eq!(table.entries.len(), MAX_PEERS - 1);
        table.stats_mut(peer(2), &mut busy_hint).opened += 1;
        assert_eq!(busy_hint, 0);
        assert_eq!(table.existing_mut(&peer(2), 1).opened, 1);
        // A hint that now points at another peer's entry is not used.
        table.stats_mut(peer(1), &mut quiet_hint).opened += 1;
        assert_eq!(quiet_hint, MAX_PEERS as u32 - 1);
        assert_eq!(table.existing_mut(&peer(1), 0).opened, 1);
        assert_eq!(table.existing_mut(&peer(3), 0).opened, 0);
    }

    #[test]
    fn phrases_and_shares() {
        let mut stats = PeerStats::default();
        stats.record_closer(Closer::Peer);
        stats.record_closer(Closer::Peer);
        stats.record_closer(Closer::Local);
        stats.record_closer(Closer::Network);
        let report = stats.report("10.0.0.7:*".to_string(), Some(8080));
        assert_eq!(report.phrase(), "from 10.0.0.7 on :8080");
        assert_eq!(report.peer_closed_first_share(), Some(0.5));
    }
}
