//! When a process is in trouble, the one sentence that says why, and how
//! long the verdict stays in force.
//!
//! Healthy patterns stay quiet by construction: prompt closes keep CLOSE_WAIT
//! young and opens level with closes; the active closer's TIME_WAIT churn
//! releases its sockets at FIN_WAIT1; an idle pool holds a flat count;
//! listeners are not connections.
//!
//! A leaked socket ends in whatever state the network leaves it: CLOSE_WAIT
//! after the peer's FIN, CLOSED_HELD after a reset or a timeout. Both are
//! "stranded": the connection is over, the process still holds the fd.

use std::collections::HashMap;

use super::WatchConfig;
use crate::model::{Alert, AlertKind, AlertState, PeerReport, ProcessReport};
use crate::text::{
    age, count, counted, eta_phrase, per_second_pair, per_second_phrase, seconds_phrase,
};

/// A pile of stranded sockets that flags a process whether it grows or not:
/// at once when found at start, else once its oldest is `--close-wait-age`
/// old (a leak that hit the fd limit stops growing). A process that closes
/// after the peer's FIN does so within milliseconds, so even a busy one has
/// only a handful waiting at any instant.
pub const STRANDED_PILE: u64 = 32;
/// Net sockets gained before growth is a verdict ...
const MIN_NET_GAIN: u64 = 20;
/// ... and, over the minute, at least this share of the connections opened
/// over the long window: high churn leaves a few in flight at the edges.
const MIN_NET_GAIN_SHARE: f64 = 0.05;

/// Trends behind the verdicts that the report does not carry.
#[derive(Clone, Copy, Debug, Default)]
pub struct Evidence {
    pub fds_keep_growing: bool,
    /// The fds rise faster than the held sockets explain.
    pub fds_unexplained: bool,
    /// The longest window over which the held count keeps growing.
    pub held_growth_window_s: Option<f64>,
    /// The fitted rise of the held count over that window.
    pub held_rise: f64,
    pub stranded_keeps_growing: bool,
    /// Since the connection of the oldest stranded socket ended.
    pub stranded_oldest_s: Option<f64>,
    /// Stranded sockets that were already there at start.
    pub stranded_before_start: u64,
    /// Connections opened and closed over the long window.
    pub opened_long: u64,
    pub closed_long: u64,
}

/// The conditions that hold for `report` now, each as a raised alert.
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
        if soon || crowded(fds, soft_limit, config) {
            kinds.push(AlertKind::FdExhaustion);
        }
    }
    let stranded = report.close_wait + report.closed_held;
    let old_enough = evidence
        .stranded_oldest_s
        .is_some_and(|age| age >= config.close_wait_age.as_secs_f64());
    let piling_up = evidence.stranded_keeps_growing && old_enough;
    let piled = old_enough && stranded >= STRANDED_PILE;
    let found_piled = evidence.stranded_before_start >= STRANDED_PILE;
    if stranded > 0 && (piling_up || piled || found_piled) {
        kinds.push(AlertKind::CloseWait);
    }
    let growing = match evidence.held_growth_window_s {
        // Over a minute, opens must outpace closes over the long window.
        Some(window) if window <= 60.0 => {
            let net_gain = evidence.opened_long.saturating_sub(evidence.closed_long);
            net_gain >= MIN_NET_GAIN
                && net_gain as f64 >= MIN_NET_GAIN_SHARE * evidence.opened_long as f64
        }
        // Over ten minutes or an hour, slow leaks: the steady rise says it.
        Some(_) => evidence.held_rise >= MIN_NET_GAIN as f64,
        None => false,
    };
    if growing {
        kinds.push(AlertKind::SocketGrowth);
    }
    kinds
        .into_iter()
        .map(|kind| figures(kind, report, config, lost_events))
        .collect()
}

fn crowded(fds: u64, soft_limit: u64, config: &WatchConfig) -> bool {
    soft_limit > 0 && fds as f64 >= config.fd_usage_threshold * soft_limit as f64
}

/// The fd kinds that grew, when TCP sockets are not what grows.
fn not_tcp_growth(report: &ProcessReport) -> Option<&[(&'static str, u64)]> {
    let rising = report.fd_kinds_rising.as_slice();
    match rising.first() {
        Some(&(kind, _)) if kind != "tcp" => Some(rising),
        _ => None,
    }
}

/// An alert of `kind` on `report`'s figures: a condition that holds, or the
/// latest figures of one in force.
pub fn figures(
    kind: AlertKind,
    report: &ProcessReport,
    config: &WatchConfig,
    lost_events: u64,
) -> Alert {
    let other_fds = not_tcp_growth(report);
    // Peers come most-held first; for stranded sockets the one with most.
    let peer = match kind {
        _ if other_fds.is_some() && kind == AlertKind::FdExhaustion => None,
        AlertKind::CloseWait => report
            .peers
            .iter()
            .filter(|peer| peer.close_wait + peer.closed_held > 0)
            .max_by_key(|peer| peer.close_wait + peer.closed_held),
        _ => report.peers.first().filter(|peer| peer.held > 0),
    };
    let mut parts = Vec::new();
    match kind {
        AlertKind::CloseWait => {
            parts.push(stranded_phrase(report, peer));
            if let Some(share) = peer.and_then(PeerReport::peer_closed_first_share) {
                parts.push(format!("the peer closed first in {:.0}%", share * 100.0));
            }
            parts.extend(fd_phrase(report, config));
        }
        AlertKind::FdExhaustion => {
            parts.extend(fd_phrase(report, config));
            match other_fds {
                Some(rising) => parts.push(rising_kinds_phrase(rising)),
                None if report.held > 0 => parts.push(held_phrase(report, peer)),
                None => {}
            }
        }
        AlertKind::SocketGrowth => {
            let (opens, closes) =
                per_second_pair(report.connects_per_s_long, report.closes_per_s_long);
            parts.push(format!(
                "opens outpace closes, {opens} vs {closes} over {}",
                age(report.long_window_s),
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
            " ({} lost; figures may be low)",
            counted(lost_events, "event", "events")
        ));
    }
    Alert {
        kind,
        state: AlertState::Raised,
        pid: report.pid,
        comm: report.comm.clone(),
        remote: peer.map(|peer| peer.remote.clone()),
        eta_s: report.eta_s,
        close_wait: report.close_wait,
        closed_held: report.closed_held,
        held: report.held,
        fds: report.fds,
        fd_soft_limit: report.fd_soft_limit,
        lost_events,
        message,
    }
}

/// "closed by the peer's reset", "timed out", ... for CLOSED_HELD causes.
fn cause_phrase(cause: &str) -> &'static str {
    match cause {
        "reset" => "closed by the peer's reset",
        "timed_out" => "timed out",
        "refused" => "refused",
        "unreachable" => "unreachable",
        "other_error" => "closed on an error",
        _ => "closed by the network",
    }
}

/// "88 closed by the peer's reset" or "90 closed by the network (88 by the
/// peer's reset, 2 timed out)".
fn closed_held_split(report: &ProcessReport) -> String {
    let total = count(report.closed_held);
    let causes: Vec<(&str, u64)> = report
        .closed_held_causes
        .iter()
        .map(|(&cause, &n)| (cause, n))
        .collect();
    match causes.as_slice() {
        [(cause, _)] => format!("{total} {}", cause_phrase(cause)),
        _ => {
            let split: Vec<String> = causes
                .iter()
                .map(|(cause, n)| format!("{} {}", count(*n), cause_phrase(cause)))
                .collect();
            format!("{total} closed by the network ({})", split.join(", "))
        }
    }
}

/// "318 sockets to 10.0.0.5:17000 in CLOSE_WAIT, oldest 9m12s", or with
/// CLOSED_HELD ones: "150 sockets held to 10.0.0.5:17000 after the
/// connection ended: 62 in CLOSE_WAIT, 88 closed by the peer's reset but
/// never closed by the process, oldest 9m12s".
fn stranded_phrase(report: &ProcessReport, peer: Option<&PeerReport>) -> String {
    let stranded = report.close_wait + report.closed_held;
    let total = count(stranded);
    let peer_stranded = peer.map_or(0, |peer| peer.close_wait + peer.closed_held);
    let mut phrase = if report.closed_held == 0 {
        match peer {
            Some(peer) if peer_stranded == stranded => {
                format!("{total} sockets {} in CLOSE_WAIT", peer.phrase())
            }
            Some(peer) => format!(
                "{total} sockets in CLOSE_WAIT, {} {}",
                count(peer_stranded),
                peer.phrase()
            ),
            None => format!("{total} sockets in CLOSE_WAIT"),
        }
    } else {
        let whose = match peer {
            Some(peer) if peer_stranded == stranded => format!("held {}", peer.phrase()),
            Some(peer) => format!("held ({} {})", count(peer_stranded), peer.phrase()),
            None => "held".to_string(),
        };
        let mut split = Vec::new();
        if report.close_wait > 0 {
            split.push(format!("{} in CLOSE_WAIT", count(report.close_wait)));
        }
        split.push(format!(
            "{} but never closed by the process",
            closed_held_split(report)
        ));
        format!(
            "{total} sockets {whose} after the connection ended: {}",
            split.join(", ")
        )
    };
    let oldest = report
        .close_wait_oldest_s
        .into_iter()
        .chain(report.closed_held_oldest_s)
        .max_by(f64::total_cmp);
    if let Some(oldest) = oldest {
        // Sockets found in CLOSE_WAIT at start are dated from it.
        if report.close_wait_oldest_lower_bound && report.close_wait_oldest_s == Some(oldest) {
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

/// "350 sockets held to 10.0.0.5:17000 (300 in CLOSE_WAIT, 40 closed by the
/// peer's reset)"
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
    let mut split = Vec::new();
    if report.close_wait > 0 {
        split.push(format!("{} in CLOSE_WAIT", count(report.close_wait)));
    }
    if report.closed_held > 0 {
        split.push(closed_held_split(report));
    }
    if !split.is_empty() {
        phrase.push_str(&format!(" ({})", split.join(", ")));
    }
    phrase
}

/// "the rise is pipes (+95 in the last read), not TCP sockets"
fn rising_kinds_phrase(rising: &[(&str, u64)]) -> String {
    let kinds: Vec<String> = rising
        .iter()
        .take(3)
        .map(|(kind, grew)| format!("{kind} (+{})", count(*grew)))
        .collect();
    format!("the rise is {}, not TCP sockets", kinds.join(", "))
}

/// "fds 1,034/65,535 rising 2.0/min → limit in ~20 days"
fn fd_phrase(report: &ProcessReport, config: &WatchConfig) -> Option<String> {
    let (fds, soft_limit) = (report.fds?, report.fd_soft_limit?);
    let mut phrase = format!("fds {}/{}", count(fds), count(soft_limit));
    match (report.eta_s, report.fd_growth_per_s) {
        // No forecast left to make: the process's next open fails.
        _ if soft_limit > 0 && fds >= soft_limit => phrase.push_str(&format!(
            ", {} the soft limit: opening more fails (EMFILE)",
            if fds > soft_limit { "over" } else { "at" }
        )),
        (Some(eta), Some(growth)) => phrase.push_str(&format!(
            " rising {} → limit in {}",
            per_second_phrase(growth),
            eta_phrase(eta)
        )),
        _ if crowded(fds, soft_limit, config) => {
            phrase.push_str(&format!(
                " ({:.0}% of the soft limit)",
                fds as f64 * 100.0 / soft_limit as f64
            ));
        }
        _ => {}
    }
    Some(phrase)
}

/// The figure each kind watches to tell whether the leak goes on.
fn measure(alert: &Alert) -> u64 {
    match alert.kind {
        AlertKind::FdExhaustion => alert.fds.unwrap_or(0),
        AlertKind::CloseWait => alert.close_wait + alert.closed_held,
        AlertKind::SocketGrowth => alert.held,
    }
}

/// One alert in force.
#[derive(Clone, Debug)]
struct InForce {
    /// The latest figures and message.
    alert: Alert,
    /// The figures last announced, to announce again only when twice as bad.
    announced: Alert,
    /// The highest the measure has been, and when.
    peak: u64,
    peak_at_ns: u64,
}

/// Whether `now` is twice as bad as `then`: the ETA or the fd headroom
/// halved, or the count behind the alert doubled. A figure already at zero
/// cannot get worse (an ETA of 0 s stays 0 s once the limit is reached).
fn is_worse(then: &Alert, now: &Alert) -> bool {
    match now.kind {
        AlertKind::FdExhaustion => {
            let eta_halved = match (then.eta_s, now.eta_s) {
                (Some(then), Some(now)) => then > 0.0 && now <= then / 2.0,
                _ => false,
            };
            let headroom = |alert: &Alert| {
                alert
                    .fds
                    .zip(alert.fd_soft_limit)
                    .map(|(fds, limit)| limit.saturating_sub(fds))
            };
            let headroom_halved = match (headroom(then), headroom(now)) {
                (Some(then), Some(now)) => then > 0 && now <= then / 2,
                _ => false,
            };
            eta_halved || headroom_halved
        }
        AlertKind::CloseWait => doubled(
            then.close_wait + then.closed_held,
            now.close_wait + now.closed_held,
        ),
        AlertKind::SocketGrowth => doubled(then.held, now.held),
    }
}

fn doubled(then: u64, now: u64) -> bool {
    then > 0 && now >= then.saturating_mul(2)
}

/// The life of each (process, kind) alert: raised when its condition first
/// holds; in force while it holds, and after, while the measure behind it
/// (fds, stranded or held sockets) keeps setting new highs; its figures
/// current all the while, announced again when twice as bad; resolved once
/// the measure has set no new high for a long window (or dropped to
/// nothing), or when the process exits.
#[derive(Debug, Default)]
pub struct AlertBook {
    in_force: HashMap<(u32, AlertKind), InForce>,
}

impl AlertBook {
    /// `conditions` hold for `pid` now, and `current` gives the latest
    /// figures of an alert in force whose condition does not; returns the
    /// alerts in force and those to announce (raised, worse, resolved).
    pub fn update(
        &mut self,
        pid: u32,
        conditions: Vec<Alert>,
        current: impl Fn(AlertKind) -> Alert,
        exited: bool,
        now_ns: u64,
        quiet_for_ns: u64,
    ) -> (Vec<Alert>, Vec<Alert>) {
        let mut in_force = Vec::new();
        let mut announce = Vec::new();
        let mut conditions: Vec<Option<Alert>> = conditions.into_iter().map(Some).collect();
        for kind in AlertKind::ALL {
            let key = (pid, kind);
            let holding = conditions
                .iter_mut()
                .find(|alert| alert.as_ref().is_some_and(|a| a.kind == kind))
                .and_then(Option::take);
            let Some(entry) = self.in_force.get_mut(&key) else {
                if let Some(alert) = holding {
                    announce.push(alert.clone());
                    in_force.push(alert.clone());
                    self.in_force.insert(
                        key,
                        InForce {
                            peak: measure(&alert),
                            peak_at_ns: now_ns,
                            announced: alert.clone(),
                            alert,
                        },
                    );
                }
                continue;
            };
            let holds = holding.is_some();
            // A condition that lapsed (a forecast changing scale, a pile
            // that stopped growing) must not freeze the figures it was
            // raised on.
            let mut alert = holding.unwrap_or_else(|| current(kind));
            let measure = measure(&alert);
            if measure > entry.peak {
                entry.peak = measure;
                entry.peak_at_ns = now_ns;
            }
            let quiet = now_ns.saturating_sub(entry.peak_at_ns) >= quiet_for_ns;
            let resolution = if exited {
                Some("the process exited".to_string())
            } else if !holds && measure == 0 {
                Some("none left".to_string())
            } else if !holds && quiet {
                Some(format!(
                    "no new high for {}",
                    age(quiet_for_ns as f64 / 1e9)
                ))
            } else {
                None
            };
            if let Some(why) = resolution {
                let mut resolved = entry.alert.clone();
                resolved.state = AlertState::Resolved;
                resolved.message = format!("{}; resolved: {why}", entry.alert.message);
                announce.push(resolved);
                self.in_force.remove(&key);
                continue;
            }
            if is_worse(&entry.announced, &alert) {
                alert.state = AlertState::Worse;
                entry.announced = alert.clone();
                announce.push(alert.clone());
            }
            entry.alert = alert;
            in_force.push(entry.alert.clone());
        }
        (in_force, announce)
    }

    pub fn has_pid(&self, pid: u32) -> bool {
        AlertKind::ALL
            .iter()
            .any(|&kind| self.in_force.contains_key(&(pid, kind)))
    }

    pub fn forget_pid(&mut self, pid: u32) {
        for kind in AlertKind::ALL {
            self.in_force.remove(&(pid, kind));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd_alert(eta_s: Option<f64>, fds: u64) -> Alert {
        Alert {
            kind: AlertKind::FdExhaustion,
            state: AlertState::Raised,
            pid: 7,
            comm: "leaky".to_string(),
            remote: None,
            eta_s,
            close_wait: 0,
            closed_held: 0,
            held: 0,
            fds: Some(fds),
            fd_soft_limit: Some(1_000),
            lost_events: 0,
            message: "m".to_string(),
        }
    }

    fn close_wait_alert(close_wait: u64) -> Alert {
        Alert {
            kind: AlertKind::CloseWait,
            close_wait,
            ..fd_alert(None, 0)
        }
    }

    /// The latest figures of any alert in force: `alert`'s.
    fn figures_of(alert: Alert) -> impl Fn(AlertKind) -> Alert {
        move |kind| Alert {
            kind,
            ..alert.clone()
        }
    }

    const S: u64 = 1_000_000_000;
    const QUIET: u64 = 300 * S;

    /// The states announced at one update.
    fn states(announced: &[Alert]) -> Vec<AlertState> {
        announced.iter().map(|alert| alert.state).collect()
    }

    #[test]
    fn raised_once_then_again_when_eta_halves() {
        use AlertState::*;
        let mut book = AlertBook::default();
        let at = |book: &mut AlertBook, eta: f64, fds: u64, t: u64| {
            let (_, out) = book.update(
                7,
                vec![fd_alert(Some(eta), fds)],
                figures_of(fd_alert(Some(eta), fds)),
                false,
                t * S,
                QUIET,
            );
            states(&out)
        };
        assert_eq!(at(&mut book, 100.0, 500, 1), [Raised]);
        assert!(at(&mut book, 80.0, 600, 2).is_empty());
        assert!(at(&mut book, 51.0, 700, 3).is_empty());
        assert_eq!(at(&mut book, 50.0, 700, 4), [Worse]);
        // Measured from the last announcement now.
        assert!(at(&mut book, 30.0, 700, 5).is_empty());
    }

    #[test]
    fn limit_reached_is_not_raised_again_at_every_tick() {
        let mut book = AlertBook::default();
        // fds at the soft limit: ETA 0 s, no headroom left.
        let at_limit = || vec![fd_alert(Some(0.0), 1_000)];
        let (_, out) = book.update(7, at_limit(), |_| unreachable!(), false, S, QUIET);
        assert_eq!(out.len(), 1);
        for tick in 2..10 {
            let (in_force, out) =
                book.update(7, at_limit(), |_| unreachable!(), false, tick * S, QUIET);
            assert!(out.is_empty());
            assert_eq!(in_force.len(), 1);
        }
    }

    #[test]
    fn raised_again_when_stranded_sockets_double() {
        let mut book = AlertBook::default();
        let mut update = |pid: u32, alert: Alert, t: u64| {
            book.update(pid, vec![alert], |_| unreachable!(), false, t * S, QUIET)
                .1
                .len()
        };
        assert_eq!(update(7, close_wait_alert(10), 1), 1);
        assert_eq!(update(7, close_wait_alert(19), 2), 0);
        let half_closed_held = Alert {
            closed_held: 10,
            ..close_wait_alert(10)
        };
        assert_eq!(update(7, half_closed_held, 3), 1, "20 stranded in all");
        // Other pids are separate.
        assert_eq!(update(8, close_wait_alert(20), 3), 1);
    }

    #[test]
    fn in_force_while_rising_resolved_after_a_quiet_window() {
        use AlertState::*;
        let mut book = AlertBook::default();
        let (in_force, out) = book.update(
            7,
            vec![close_wait_alert(10)],
            |_| unreachable!(),
            false,
            S,
            QUIET,
        );
        assert_eq!((in_force.len(), states(&out)), (1, vec![Raised]));
        // The condition no longer holds at some tick, but the pile still
        // grows: the alert stays in force, its figures current, and says
        // so each time the pile doubles.
        let mut worse = Vec::new();
        for (tick, stranded) in (2..200).zip(11..) {
            let current = figures_of(close_wait_alert(stranded));
            let (in_force, out) = book.update(7, Vec::new(), current, false, tick * S, QUIET);
            assert_eq!(in_force.len(), 1, "tick {tick}");
            assert_eq!(in_force[0].close_wait, stranded);
            worse.extend(out.iter().map(|alert| (alert.state, alert.close_wait)));
        }
        assert_eq!(worse, [(Worse, 20), (Worse, 40), (Worse, 80), (Worse, 160)]);
        // Flat from there on: resolved once a whole quiet window passed.
        let flat = 11 + 197;
        let (in_force, _) = book.update(
            7,
            Vec::new(),
            figures_of(close_wait_alert(flat)),
            false,
            400 * S,
            QUIET,
        );
        assert_eq!(in_force.len(), 1);
        let (in_force, out) = book.update(
            7,
            Vec::new(),
            figures_of(close_wait_alert(flat)),
            false,
            500 * S,
            QUIET,
        );
        assert!(in_force.is_empty());
        assert_eq!(states(&out), [Resolved]);
        assert!(
            out[0].message.ends_with("resolved: no new high for 5m00s"),
            "{}",
            out[0].message
        );
        assert!(!book.has_pid(7));
    }

    #[test]
    fn resolved_when_the_process_exits_or_nothing_is_left() {
        use AlertState::*;
        let mut book = AlertBook::default();
        book.update(
            7,
            vec![close_wait_alert(10)],
            |_| unreachable!(),
            false,
            S,
            QUIET,
        );
        let (in_force, out) = book.update(
            7,
            Vec::new(),
            figures_of(close_wait_alert(10)),
            true,
            2 * S,
            QUIET,
        );
        assert!(in_force.is_empty());
        assert_eq!(states(&out), [Resolved]);
        assert!(out[0].message.ends_with("resolved: the process exited"));

        book.update(
            8,
            vec![close_wait_alert(10)],
            |_| unreachable!(),
            false,
            S,
            QUIET,
        );
        let (_, out) = book.update(
            8,
            Vec::new(),
            figures_of(close_wait_alert(0)),
            false,
            2 * S,
            QUIET,
        );
        assert_eq!(states(&out), [Resolved]);
    }

    #[test]
    fn a_condition_that_still_holds_keeps_it_in_force_when_flat() {
        let mut book = AlertBook::default();
        // 95% of the limit, flat: crowded is a condition of its own.
        for tick in 1..1_000 {
            let (in_force, _) = book.update(
                7,
                vec![fd_alert(None, 950)],
                |_| unreachable!(),
                false,
                tick * S,
                QUIET,
            );
            assert_eq!(in_force.len(), 1);
        }
    }
}
