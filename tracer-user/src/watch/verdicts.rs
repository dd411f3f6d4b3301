//! When a process is in trouble, and the one sentence that says why.
//!
//! Healthy patterns stay quiet by construction: prompt closes keep CLOSE_WAIT
//! young and opens level with closes; the active closer's TIME_WAIT churn
//! releases its sockets at FIN_WAIT1; an idle pool holds a flat count;
//! listeners are not connections.

use std::collections::HashMap;

use serde::Serialize;

use super::peers::PeerReport;
use super::render::{age, count, eta_phrase, per_second_phrase, seconds_phrase};
use super::{ProcessReport, WatchConfig};

/// Sockets found in CLOSE_WAIT at start, still there, that flag a process
/// at once. A process that closes after the peer's FIN does so within
/// milliseconds, so even a busy one has only a handful waiting at any instant.
pub const SEEDED_CLOSE_WAIT_PILE: u64 = 32;
/// Net sockets gained over the long window before growth is a verdict ...
const MIN_NET_GAIN: u64 = 20;
/// ... and at least this share of the connections opened in it: high churn
/// leaves a few in flight at the window's edges.
const MIN_NET_GAIN_SHARE: f64 = 0.05;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The soft RLIMIT_NOFILE will be reached within `--warn-eta`, or usage
    /// is past the threshold.
    FdExhaustion,
    /// CLOSE_WAIT sockets keep piling up and are old.
    CloseWait,
    /// Opens outpace closes and the held count keeps growing.
    SocketGrowth,
}

impl AlertKind {
    const ALL: [Self; 3] = [Self::FdExhaustion, Self::CloseWait, Self::SocketGrowth];
}

/// One verdict about one process, with its evidence.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Alert {
    pub kind: AlertKind,
    pub pid: u32,
    pub comm: String,
    /// The remote endpoint most responsible (`ip:port`, or `ip:*` for
    /// inbound clients), if any.
    pub remote: Option<String>,
    pub eta_s: Option<f64>,
    pub close_wait: u64,
    pub held: u64,
    pub fds: Option<u64>,
    pub fd_soft_limit: Option<u64>,
    /// Events lost since start; the figures may be low by up to this much.
    pub lost_events: u64,
    pub message: String,
}

/// Trends behind the verdicts that the report does not carry.
#[derive(Clone, Copy, Debug, Default)]
pub struct Evidence {
    pub fds_keep_growing: bool,
    pub held_keeps_growing: bool,
    pub close_wait_keeps_growing: bool,
    /// Connections opened and closed over the long window.
    pub opened_long: u64,
    pub closed_long: u64,
    /// Sockets still in CLOSE_WAIT that were already there at start.
    pub close_wait_before_start: u64,
}

/// The conditions that hold for `report` now.
pub fn evaluate(
    report: &ProcessReport,
    evidence: &Evidence,
    config: &WatchConfig,
    lost_events: u64,
) -> Vec<Alert> {
    let mut kinds = Vec::new();
    if let (Some(fds), Some(soft_limit)) = (report.fds, report.fd_soft_limit) {
        let soon = evidence.fds_keep_growing
            && report
                .eta_s
                .is_some_and(|eta| eta <= config.warn_eta.as_secs_f64());
        let crowded = soft_limit > 0 && fds as f64 >= config.fd_usage_threshold * soft_limit as f64;
        if soon || crowded {
            kinds.push(AlertKind::FdExhaustion);
        }
    }
    let old_enough = report
        .close_wait_oldest_s
        .is_some_and(|age| age >= config.close_wait_age.as_secs_f64());
    let piling_up = evidence.close_wait_keeps_growing && old_enough;
    let found_piled = evidence.close_wait_before_start >= SEEDED_CLOSE_WAIT_PILE;
    if report.close_wait > 0 && (piling_up || found_piled) {
        kinds.push(AlertKind::CloseWait);
    }
    let net_gain = evidence.opened_long.saturating_sub(evidence.closed_long);
    let outpacing = net_gain >= MIN_NET_GAIN
        && net_gain as f64 >= MIN_NET_GAIN_SHARE * evidence.opened_long as f64;
    if outpacing && evidence.held_keeps_growing {
        kinds.push(AlertKind::SocketGrowth);
    }
    kinds
        .into_iter()
        .map(|kind| alert(kind, report, config, lost_events))
        .collect()
}

fn alert(kind: AlertKind, report: &ProcessReport, config: &WatchConfig, lost_events: u64) -> Alert {
    // Peers come most-held first; for CLOSE_WAIT the one with most waiting.
    let peer = match kind {
        AlertKind::CloseWait => report
            .peers
            .iter()
            .filter(|peer| peer.close_wait > 0)
            .max_by_key(|peer| peer.close_wait),
        _ => report.peers.first().filter(|peer| peer.held > 0),
    };
    let mut parts = Vec::new();
    match kind {
        AlertKind::CloseWait => {
            parts.push(close_wait_phrase(report, peer));
            if let Some(share) = peer.and_then(PeerReport::peer_closed_first_share) {
                parts.push(format!("the peer closed first in {:.0}%", share * 100.0));
            }
            parts.extend(fd_phrase(report, config));
        }
        AlertKind::FdExhaustion => {
            parts.extend(fd_phrase(report, config));
            if report.held > 0 {
                parts.push(held_phrase(report, peer));
            }
        }
        AlertKind::SocketGrowth => {
            parts.push(format!(
                "opens outpace closes, {} vs {} over {}",
                per_second_phrase(report.connects_per_s_long),
                per_second_phrase(report.closes_per_s_long),
                age(config.long_window.as_secs_f64()),
            ));
            parts.push(held_phrase(report, peer));
            parts.extend(fd_phrase(report, config));
        }
    }
    if let Some(timeout) = peer.and_then(|peer| peer.peer_idle_timeout_s) {
        parts.push(format!(
            "the peer closes idle connections after ≈{}",
            seconds_phrase(timeout)
        ));
    }
    let mut message = format!("pid {} ({}): {}", report.pid, report.comm, parts.join("; "));
    if lost_events > 0 {
        message.push_str(&format!(
            " ({} events lost; figures may be low)",
            count(lost_events)
        ));
    }
    Alert {
        kind,
        pid: report.pid,
        comm: report.comm.clone(),
        remote: peer.map(|peer| peer.remote.clone()),
        eta_s: report.eta_s,
        close_wait: report.close_wait,
        held: report.held,
        fds: report.fds,
        fd_soft_limit: report.fd_soft_limit,
        lost_events,
        message,
    }
}

/// "318 sockets to 10.0.0.5:17000 in CLOSE_WAIT, oldest 9m12s"
fn close_wait_phrase(report: &ProcessReport, peer: Option<&PeerReport>) -> String {
    let total = count(report.close_wait);
    let mut phrase = match peer {
        Some(peer) if peer.close_wait == report.close_wait => {
            format!("{total} sockets {} in CLOSE_WAIT", peer.phrase())
        }
        Some(peer) => format!(
            "{total} sockets in CLOSE_WAIT, {} {}",
            count(peer.close_wait),
            peer.phrase()
        ),
        None => format!("{total} sockets in CLOSE_WAIT"),
    };
    if let Some(oldest) = report.close_wait_oldest_s {
        if report.close_wait_oldest_lower_bound {
            phrase.push_str(&format!(
                ", oldest ≥ {} (already waiting when socktrace started)",
                age(oldest)
            ));
        } else {
            phrase.push_str(&format!(", oldest {}", age(oldest)));
        }
    }
    phrase
}

/// "350 sockets held to 10.0.0.5:17000 (300 in CLOSE_WAIT)"
fn held_phrase(report: &ProcessReport, peer: Option<&PeerReport>) -> String {
    let held = count(report.held);
    let mut phrase = match peer {
        Some(peer) if peer.held == report.held => format!("{held} sockets held {}", peer.phrase()),
        Some(peer) => format!(
            "{held} sockets held, {} {}",
            count(peer.held),
            peer.phrase()
        ),
        None => format!("{held} sockets held"),
    };
    if report.close_wait > 0 {
        phrase.push_str(&format!(" ({} in CLOSE_WAIT)", count(report.close_wait)));
    }
    phrase
}

/// "fds 1,034/65,535 rising 2.0/min → limit in ~20 days"
fn fd_phrase(report: &ProcessReport, config: &WatchConfig) -> Option<String> {
    let (fds, soft_limit) = (report.fds?, report.fd_soft_limit?);
    let mut phrase = format!("fds {}/{}", count(fds), count(soft_limit));
    match (report.eta_s, report.fd_growth_per_s) {
        (Some(eta), Some(growth)) => phrase.push_str(&format!(
            " rising {} → limit in {}",
            per_second_phrase(growth),
            eta_phrase(eta)
        )),
        _ if soft_limit > 0 && fds as f64 >= config.fd_usage_threshold * soft_limit as f64 => {
            phrase.push_str(&format!(
                " ({:.0}% of the soft limit)",
                fds as f64 * 100.0 / soft_limit as f64
            ));
        }
        _ => {}
    }
    Some(phrase)
}

/// What was last raised for one (pid, kind), to raise it again only when
/// it gets worse.
#[derive(Clone, Copy, Debug)]
struct Raised {
    eta_s: Option<f64>,
    fd_headroom: Option<u64>,
    close_wait: u64,
    held: u64,
    quiet_since_ns: Option<u64>,
}

impl Raised {
    fn from(alert: &Alert) -> Self {
        Self {
            eta_s: alert.eta_s,
            fd_headroom: alert
                .fds
                .zip(alert.fd_soft_limit)
                .map(|(fds, limit)| limit.saturating_sub(fds)),
            close_wait: alert.close_wait,
            held: alert.held,
            quiet_since_ns: None,
        }
    }

    /// Worse means twice as bad: the ETA or the fd headroom halved, or the
    /// count behind the alert doubled. A figure already at zero cannot get
    /// worse (an ETA of 0 s stays 0 s once the limit is reached); without
    /// this guard, 0 <= 0 / 2 raised the alert again at every tick.
    fn is_worse(&self, alert: &Alert) -> bool {
        let now = Raised::from(alert);
        match alert.kind {
            AlertKind::FdExhaustion => {
                let eta_halved = match (self.eta_s, now.eta_s) {
                    (Some(then), Some(now)) => then > 0.0 && now <= then / 2.0,
                    _ => false,
                };
                let headroom_halved = match (self.fd_headroom, now.fd_headroom) {
                    (Some(then), Some(now)) => then > 0 && now <= then / 2,
                    _ => false,
                };
                eta_halved || headroom_halved
            }
            AlertKind::CloseWait => doubled(self.close_wait, now.close_wait),
            AlertKind::SocketGrowth => doubled(self.held, now.held),
        }
    }
}

fn doubled(then: u64, now: u64) -> bool {
    then > 0 && now >= then.saturating_mul(2)
}

/// Raises each condition once per process, again when it worsens, and
/// forgets it once it has been quiet for a while.
#[derive(Debug, Default)]
pub struct AlertBook {
    raised: HashMap<(u32, AlertKind), Raised>,
}

impl AlertBook {
    /// `active` are the conditions of `pid` now; returns those to announce.
    pub fn update(
        &mut self,
        pid: u32,
        active: &[Alert],
        now_ns: u64,
        forget_after_ns: u64,
    ) -> Vec<Alert> {
        let mut announce = Vec::new();
        for kind in AlertKind::ALL {
            let key = (pid, kind);
            match (
                active.iter().find(|alert| alert.kind == kind),
                self.raised.get_mut(&key),
            ) {
                (Some(alert), Some(raised)) => {
                    raised.quiet_since_ns = None;
                    if raised.is_worse(alert) {
                        *raised = Raised::from(alert);
                        announce.push(alert.clone());
                    }
                }
                (Some(alert), None) => {
                    self.raised.insert(key, Raised::from(alert));
                    announce.push(alert.clone());
                }
                (None, Some(raised)) => {
                    let quiet_since = *raised.quiet_since_ns.get_or_insert(now_ns);
                    if now_ns.saturating_sub(quiet_since) >= forget_after_ns {
                        self.raised.remove(&key);
                    }
                }
                (None, None) => {}
            }
        }
        announce
    }

    pub fn has_pid(&self, pid: u32) -> bool {
        AlertKind::ALL
            .iter()
            .any(|&kind| self.raised.contains_key(&(pid, kind)))
    }

    pub fn forget_pid(&mut self, pid: u32) {
        for kind in AlertKind::ALL {
            self.raised.remove(&(pid, kind));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd_alert(eta_s: Option<f64>, fds: u64) -> Alert {
        Alert {
            kind: AlertKind::FdExhaustion,
            pid: 7,
            comm: "leaky".to_string(),
            remote: None,
            eta_s,
            close_wait: 0,
            held: 0,
            fds: Some(fds),
            fd_soft_limit: Some(1_000),
            lost_events: 0,
            message: String::new(),
        }
    }

    fn close_wait_alert(close_wait: u64) -> Alert {
        Alert {
            kind: AlertKind::CloseWait,
            close_wait,
            ..fd_alert(None, 0)
        }
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn raised_once_then_again_when_eta_halves() {
        let mut book = AlertBook::default();
        let forget = 60 * S;
        assert_eq!(
            book.update(7, &[fd_alert(Some(100.0), 500)], S, forget)
                .len(),
            1
        );
        assert!(
            book.update(7, &[fd_alert(Some(80.0), 600)], 2 * S, forget)
                .is_empty()
        );
        assert!(
            book.update(7, &[fd_alert(Some(51.0), 700)], 3 * S, forget)
                .is_empty()
        );
        assert_eq!(
            book.update(7, &[fd_alert(Some(50.0), 700)], 4 * S, forget)
                .len(),
            1
        );
        // Measured from the last announcement now.
        assert!(
            book.update(7, &[fd_alert(Some(30.0), 700)], 5 * S, forget)
                .is_empty()
        );
    }

    #[test]
    fn limit_reached_is_not_raised_again_at_every_tick() {
        let mut book = AlertBook::default();
        let forget = 60 * S;
        // fds at the soft limit: ETA 0 s, no headroom left.
        let at_limit = || fd_alert(Some(0.0), 1_000);
        assert_eq!(book.update(7, &[at_limit()], S, forget).len(), 1);
        for tick in 2..10 {
            assert!(book.update(7, &[at_limit()], tick * S, forget).is_empty());
        }
    }

    #[test]
    fn raised_again_when_close_wait_doubles() {
        let mut book = AlertBook::default();
        let forget = 60 * S;
        assert_eq!(book.update(7, &[close_wait_alert(10)], S, forget).len(), 1);
        assert!(
            book.update(7, &[close_wait_alert(19)], 2 * S, forget)
                .is_empty()
        );
        assert_eq!(
            book.update(7, &[close_wait_alert(20)], 3 * S, forget).len(),
            1
        );
        // Other kinds and pids are separate.
        assert_eq!(
            book.update(8, &[close_wait_alert(20)], 3 * S, forget).len(),
            1
        );
        assert_eq!(
            book.update(7, &[fd_alert(None, 950)], 3 * S, forget).len(),
            1
        );
    }

    #[test]
    fn forgotten_after_quiet_then_raised_anew() {
        let mut book = AlertBook::default();
        let forget = 10 * S;
        book.update(7, &[close_wait_alert(10)], S, forget);
        book.update(7, &[], 2 * S, forget);
        assert!(book.has_pid(7));
        // Back before the quiet period is over: still the same alert.
        assert!(
            book.update(7, &[close_wait_alert(10)], 5 * S, forget)
                .is_empty()
        );
        book.update(7, &[], 6 * S, forget);
        book.update(7, &[], 16 * S, forget);
        assert!(!book.has_pid(7));
        assert_eq!(
            book.update(7, &[close_wait_alert(10)], 17 * S, forget)
                .len(),
            1
        );
    }
}
